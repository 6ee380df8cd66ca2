//! Sinks: where validated records go. The engine hands each page to a `Sink`, which says when
//! the page, and the progress it completes, are durable.
//!
//! The embedded SQLite store (the default) commits records, quarantine, held orphans and the
//! checkpoint in one transaction: exactly once. A remote sink (the Track360 ingestion API)
//! plugs in behind the same trait: deliver, await the acknowledgement, then commit progress.

mod borrowing;
pub mod sqlite;
pub mod track360;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use jiff::Timestamp;

use crate::config::ConnectorPlan;
use crate::config::plan::{SinkKind, SinkPlan};
use crate::model::{Entity, Record};
use crate::state::{Store, StoreError};

/// A boxed future, so that sinks and sources can sit behind `dyn` traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One page's worth of work for the sink.
#[derive(Debug)]
pub struct PageBatch {
    pub broker: String,
    pub entity: Entity,
    pub records: Vec<Valid>,
    pub rejects: Vec<Reject>,
    /// What becomes true once this batch is durable.
    pub progress: Progress,
    /// Whether the valid records are written to the embedded store (a `track360`-only sink
    /// keeps only quarantine and checkpoints locally).
    pub keep_records: bool,
    /// Whether records go to the staging table, to be merged in key order later (a
    /// backfill's), instead of straight into the keyed table. Only with `hold_orphans`: the
    /// merge decides which to hold.
    pub stage_records: bool,
    /// Whether records whose customer is not stored yet are held (only where the embedded
    /// store is the destination: the ingestion API judges references itself).
    pub hold_orphans: bool,
    /// The lease the batch was pulled under (a fleet's PostgreSQL state): the commit is refused
    /// unless it is still held.
    pub fence: Option<crate::state::Fence>,
}

/// A record that passed validation.
#[derive(Debug)]
pub struct Valid {
    pub record: Record,
}

/// A record that failed validation: quarantined with every reason.
#[derive(Debug)]
pub struct Reject {
    pub key: String,
    pub raw: String,
    pub reasons: Vec<String>,
    pub stage: Stage,
}

/// Where a record was refused, which says what its quarantined `raw` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// By mapping or validation: `raw` is the broker's record.
    Validation,
    /// By the ingestion API: `raw` is the record as posted (Track360 shape, PII policy applied).
    Delivery,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Validation => "validation",
            Stage::Delivery => "delivery",
        }
    }
}

/// The progress a batch completes.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Mid-window: records only; the cursor stays where it is.
    None,
    /// The live window is complete up to this instant: the cursor moves here (never back).
    Cursor(Timestamp),
    /// A backfill slice is complete: the backfill `(since)` lane is done up to `done_until`.
    Backfill {
        since: Timestamp,
        done_until: Timestamp,
    },
}

/// What a commit did, for run history and logs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CommitStats {
    pub stored: u64,
    pub quarantined: u64,
    pub held: u64,
    /// Held records stored because their customer arrived, per entity (`Entity as usize`).
    pub released: [u64; 3],
    pub unquarantined: u64,
}

impl std::ops::AddAssign for CommitStats {
    fn add_assign(&mut self, o: Self) {
        self.stored += o.stored;
        self.quarantined += o.quarantined;
        self.held += o.held;
        for (mine, theirs) in self.released.iter_mut().zip(o.released) {
            *mine += theirs;
        }
        self.unquarantined += o.unquarantined;
    }
}

/// A delivery that did not happen: the page is not committed and the cursor stays.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("POST {url}: {message}")]
    Delivery { url: String, message: String },
}

/// Where validated records go.
///
/// `deliver` hands a page's records to their destination and returns once it acknowledged
/// them (records it rejects move to the batch's rejects); the embedded store has nothing to do
/// there. `finalize` then makes the batch (records kept locally, quarantine, held orphans) and
/// its progress durable in one local transaction. The engine runs `deliver` while it fetches the
/// next page, and `finalize` once it knows whether the page was the window's last.
pub trait Sink: Send + Sync {
    fn deliver<'a>(&'a self, batch: &'a mut PageBatch) -> BoxFuture<'a, Result<(), SinkError>>;
    fn finalize(&self, batch: PageBatch) -> BoxFuture<'_, Result<CommitStats, StoreError>>;
    /// Records worth gathering from consecutive pages into one batch before delivery: an API
    /// that takes more records a request than a broker serves a page is otherwise spent at a
    /// fraction of its budget. 0: one page a batch.
    fn batch_records(&self) -> usize {
        0
    }
}

/// The embedded SQLite store as a sink.
pub struct EmbeddedSink {
    store: Arc<Store>,
}

impl EmbeddedSink {
    pub fn new(store: Arc<Store>) -> Self {
        EmbeddedSink { store }
    }
}

/// Commits `batch` in the store, off the async workers (SQLite blocks).
pub async fn commit_locally(
    store: &Arc<Store>,
    batch: PageBatch,
) -> Result<CommitStats, StoreError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || store.commit_page(&batch))
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
}

impl Sink for EmbeddedSink {
    fn deliver<'a>(&'a self, _batch: &'a mut PageBatch) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async { Ok(()) })
    }

    fn finalize(&self, batch: PageBatch) -> BoxFuture<'_, Result<CommitStats, StoreError>> {
        Box::pin(commit_locally(&self.store, batch))
    }
}

/// The sinks of one process: the embedded store, and the Track360 client when configured.
pub struct Sinks {
    store: Arc<Store>,
    default: SinkKind,
    track360: Option<Arc<track360::Track360Client>>,
}

impl Sinks {
    pub fn new(store: Arc<Store>, plan: &SinkPlan) -> Result<Sinks, reqwest::Error> {
        let track360 = match &plan.track360 {
            Some(t) => Some(Arc::new(track360::Track360Client::new(t)?)),
            None => None,
        };
        Ok(Sinks {
            store,
            default: plan.kind,
            track360,
        })
    }

    /// The sink of `connector`: its own choice, else the daemon's.
    pub fn for_connector(&self, connector: &ConnectorPlan) -> Result<Arc<dyn Sink>, String> {
        let kind = connector.sink.unwrap_or(self.default);
        kind.fits_state(self.store.is_postgres())
            .map_err(|e| format!("{}: sink: {e}", connector.broker))?;
        let remote = |keep_local| match &self.track360 {
            Some(client) => Ok(Arc::new(track360::Track360Sink::new(
                Arc::clone(client),
                Arc::clone(&self.store),
                keep_local,
            )) as Arc<dyn Sink>),
            None => Err(format!(
                "{}: sink {kind:?} needs a [sink.track360] table in the settings",
                connector.broker
            )),
        };
        match kind {
            SinkKind::Sqlite | SinkKind::Postgres => {
                Ok(Arc::new(EmbeddedSink::new(Arc::clone(&self.store))))
            }
            SinkKind::Track360 => remote(false),
            SinkKind::Both => remote(true),
        }
    }
}
