//! `/healthz` and `/metrics`: what the daemon knows about itself and each (broker, entity).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use jiff::Timestamp;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::model::Entity;

/// The supervisor is considered dead when its heartbeat is older than this.
const ALIVE_FOR_S: i64 = 30;

#[derive(Debug, Clone, Default)]
pub struct EntityHealth {
    pub last_success: Option<Timestamp>,
    pub last_error: Option<(Timestamp, String)>,
    pub running: bool,
    pub next_run: Option<Timestamp>,
}

#[derive(Default)]
pub struct Health {
    heartbeat: AtomicI64,
    entities: Mutex<BTreeMap<(String, Entity), EntityHealth>>,
}

impl Health {
    /// The supervisor loop is alive.
    pub fn beat(&self) {
        self.heartbeat
            .store(Timestamp::now().as_second(), Ordering::Relaxed);
    }

    pub fn alive(&self) -> bool {
        Timestamp::now().as_second() - self.heartbeat.load(Ordering::Relaxed) < ALIVE_FOR_S
    }

    pub fn update(&self, broker: &str, entity: Entity, f: impl FnOnce(&mut EntityHealth)) {
        let mut entities = self.entities.lock().unwrap_or_else(|p| p.into_inner());
        f(entities.entry((broker.to_owned(), entity)).or_default());
    }

    pub fn forget(&self, broker: &str) {
        let mut entities = self.entities.lock().unwrap_or_else(|p| p.into_inner());
        entities.retain(|(b, _), _| b != broker);
    }

    pub fn snapshot(&self) -> BTreeMap<(String, Entity), EntityHealth> {
        self.entities
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// One line for systemd's STATUS=.
    pub fn summary(&self) -> String {
        let all = self.snapshot();
        let running = all.values().filter(|h| h.running).count();
        let failing = all.values().filter(|h| is_failing(h)).count();
        format!(
            "{} entities scheduled, {running} syncing, {failing} failing",
            all.len()
        )
    }
}

fn is_failing(h: &EntityHealth) -> bool {
    match (&h.last_error, h.last_success) {
        (Some((at, _)), Some(ok)) => *at > ok,
        (Some(_), None) => true,
        _ => false,
    }
}

pub fn router(health: Arc<Health>, prometheus: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .with_state(health)
        .route(
            "/metrics",
            get(move || {
                let body = prometheus.render();
                async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body) }
            }),
        )
}

async fn healthz(State(health): State<Arc<Health>>) -> Response {
    let alive = health.alive();
    let connectors: Vec<_> = health
        .snapshot()
        .into_iter()
        .map(|((broker, entity), h)| {
            json!({
                "broker": broker,
                "entity": entity.as_str(),
                "running": h.running,
                "failing": is_failing(&h),
                "last_success": h.last_success.map(|t| t.to_string()),
                "last_error": h.last_error.as_ref().map(|(at, e)| json!({"at": at.to_string(), "error": e})),
                "next_run": h.next_run.map(|t| t.to_string()),
            })
        })
        .collect();
    let status = if alive {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"status": if alive { "ok" } else { "stalled" }, "connectors": connectors});
    (status, axum::Json(body)).into_response()
}
