//! The REST source: any broker API that lists records of a `last_modified_date` window, in the
//! guide's shape or, with field mapping and paging settings, in its own.

mod auth;
mod body;
mod client;
mod pager;
pub mod token_cache;

use jiff::tz::TimeZone;

use crate::config::RestPlan;
use crate::model::Entity;
use crate::source::{Pager, Source, Window};

pub use client::{Fetched, HttpClient, parse_link_next};
pub use pager::RestPager;

/// A broker's REST API: one HTTP client (connection pool, rate limiter, token) per connector.
pub struct RestSource {
    plan: RestPlan,
    zone: TimeZone,
    http: client::HttpClient,
}

impl RestSource {
    pub fn new(
        broker: &str,
        plan: &RestPlan,
        zone: &TimeZone,
    ) -> Result<RestSource, reqwest::Error> {
        ensure_crypto_provider();
        Ok(RestSource {
            http: client::HttpClient::new(broker, plan)?,
            plan: plan.clone(),
            zone: zone.clone(),
        })
    }
}

impl Source for RestSource {
    fn pages(&self, entity: Entity, window: Window) -> Box<dyn Pager + '_> {
        Box::new(RestPager::new(
            &self.http, &self.plan, &self.zone, entity, window,
        ))
    }
}

/// rustls needs one process-wide crypto provider; `ring` is the one compiled in.
pub fn ensure_crypto_provider() {
    // Fails only when a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
