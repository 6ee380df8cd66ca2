//! The REST source for APIs shaped like the Track360 guide's recommended endpoints.

mod auth;
mod pager;

use std::time::Duration;

use crate::config::RestPlan;
use crate::model::Entity;
use crate::source::{Pager, Source, Window};

pub use pager::RestPager;

/// A broker's REST API: one HTTP client (connection pool) per connector.
pub struct RestSource {
    broker: String,
    plan: RestPlan,
    client: reqwest::Client,
}

impl RestSource {
    pub fn new(broker: &str, plan: &RestPlan) -> Result<RestSource, reqwest::Error> {
        ensure_crypto_provider();
        let client = reqwest::Client::builder()
            .user_agent(concat!("t360-connector/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(plan.connect_timeout)
            // A total deadline per page, body included: a stalled broker fails the run
            // instead of hanging it.
            .timeout(plan.timeout)
            // Shorter than the 60–75 s idle timeout of common load balancers, which otherwise
            // close pooled connections under us (hyper #2136).
            .pool_idle_timeout(Duration::from_secs(30))
            // A redirect could carry the bearer token to another host.
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(RestSource {
            broker: broker.to_owned(),
            plan: plan.clone(),
            client,
        })
    }
}

impl Source for RestSource {
    fn pages(&self, entity: Entity, window: Window) -> Box<dyn Pager + '_> {
        Box::new(RestPager::new(
            &self.client,
            &self.plan,
            &self.broker,
            entity,
            window,
        ))
    }
}

/// rustls needs one process-wide crypto provider; `ring` is the one compiled in.
fn ensure_crypto_provider() {
    // Fails only when a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
