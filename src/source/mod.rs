//! Sources: where raw records come from. A source opens a pager over one entity's records whose
//! `last_modified_date` falls in a window; the pager yields pages of raw records (JSON text, or values built from rows).
//!
//! The engine owns the window, the commit and the cursor; a source only pages. Each kind of
//! source (a REST API, a SQL replica) is one module implementing these two traits.

pub mod rest;
pub mod sql;

use std::sync::Arc;

use jiff::Timestamp;

use crate::config::{ConnectorPlan, SourcePlan};
use crate::model::Entity;
use crate::normalise::RawRecord;
use crate::sink::BoxFuture;

/// The `last_modified_date` range of one sync: both bounds inclusive.
///
/// The lower bound is inclusive because cursor values are not unique: records that share the
/// cursor's instant and become visible later must be read again (DOMAIN §4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: Timestamp,
    pub to: Timestamp,
}

/// One page of raw records.
#[derive(Debug)]
pub struct Page {
    pub records: Vec<RawRecord>,
    /// Where the page came from, for messages (no secrets in it).
    pub origin: String,
}

/// The source a connector's plan describes (SQL pools need a running tokio runtime).
pub fn for_plan(plan: &ConnectorPlan) -> anyhow::Result<Arc<dyn Source>> {
    use anyhow::Context;
    Ok(match &plan.source {
        SourcePlan::Rest(rest) => Arc::new(
            rest::RestSource::new(&plan.broker, rest, &plan.zone)
                .with_context(|| format!("{}: cannot build the HTTP client", plan.broker))?,
        ),
        SourcePlan::Sql(sql) => Arc::new(
            sql::SqlSource::new(&plan.broker, sql)
                .map_err(|e| anyhow::anyhow!("{}: {e}", plan.broker))?,
        ),
    })
}

/// Opens pagers. Shared by every run of a connector.
pub trait Source: Send + Sync {
    fn pages(&self, entity: Entity, window: Window) -> Box<dyn Pager + '_>;

    /// A database source, which can count and sum where the data is (reconciliation).
    fn as_sql(&self) -> Option<&sql::SqlSource> {
        None
    }
}

/// Yields a window's pages in order; `None` after the last one.
pub trait Pager: Send {
    fn next_page(&mut self) -> BoxFuture<'_, Result<Option<Page>, SourceError>>;
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("GET {url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
        /// The broker's `Retry-After`, when it sent one.
        retry_after: Option<std::time::Duration>,
    },
    #[error("GET {url}: {message}")]
    Transport { url: String, message: String },
    #[error("GET {url}: bad page: {message}")]
    BadPage { url: String, message: String },
    #[error("GET {url}: {message}")]
    Unstable { url: String, message: String },
    /// A page body over the connector's `max_page_mib`: asking again would not make it smaller.
    #[error(
        "GET {url}: the page is larger than {} MiB (rest.max_page_mib); lower rest.per_page or raise the limit",
        limit / (1024 * 1024)
    )]
    Oversized { url: String, limit: usize },
    #[error("{url}: {message}")]
    Auth { url: String, message: String },
    /// A database query failed (`origin` names the database, never with a password).
    #[error("{origin}: {message}")]
    Query {
        origin: String,
        message: String,
        retryable: bool,
    },
    /// The run's lease was lost (a fleet's daemon paused or cut off past its TTL): another
    /// daemon may be paging this (broker, entity) now, so this one asks nothing more.
    #[error("lease of {lease} lost: no further request (another daemon may hold it now)")]
    LeaseLost { lease: String },
}

impl SourceError {
    /// Whether trying the same request again may succeed (decided here, once).
    pub fn is_retryable(&self) -> bool {
        match self {
            SourceError::Status { status, .. } => {
                *status == 429 || *status == 408 || *status >= 500
            }
            SourceError::Transport { .. } => true,
            // A body cut short by a dropped connection parses as bad JSON; asking again is
            // cheap, and a broker that always answers garbage runs out of retry time.
            SourceError::BadPage { .. } => true,
            SourceError::Unstable { .. }
            | SourceError::Oversized { .. }
            | SourceError::Auth { .. }
            | SourceError::LeaseLost { .. } => false,
            SourceError::Query { retryable, .. } => *retryable,
        }
    }

    /// How long the broker asked us to wait before the next request.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            SourceError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}
