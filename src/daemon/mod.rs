//! The long-running daemon (`t360-connector run`): every connector's entities on their own
//! schedules, with a global limit on concurrent syncs, reload on SIGHUP, a graceful stop on
//! SIGTERM/SIGINT, systemd readiness and watchdog, and `/healthz` + `/metrics`.
//!
//! Shape (mini-redis's shutdown, with tokio-util's `CancellationToken` and `TaskTracker`): the
//! supervisor owns one `Fleet` of running connectors; each (broker, entity) is one worker task
//! that sleeps until its next fire time and runs one sync. Every task is spawned on the tracker
//! and is waited for on shutdown, up to the grace period.

pub mod coordinator;
mod fleet;
pub mod health;
mod reconciler;
pub mod schedule;
pub mod signals;
mod systemd;
mod worker;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::Settings;
use crate::config::state::StatePlan;
use crate::sink::Sinks;
use crate::state::Store;
use crate::telemetry;
use coordinator::Coordinator;
use fleet::Fleet;
use health::Health;

/// How often the supervisor wakes: heartbeat, watchdog, status line, lag gauges.
const TICK: Duration = Duration::from_secs(5);

/// What every worker shares.
pub(crate) struct Context {
    pub store: Arc<Store>,
    pub sinks: Sinks,
    pub slots: Arc<tokio::sync::Semaphore>,
    pub max_slots: usize,
    pub health: Arc<Health>,
    pub tracker: TaskTracker,
    /// The daemon's `sink.kind`, for connectors that do not name their own.
    pub default_sink: crate::config::plan::SinkKind,
    /// With the postgres state: the fleet's leases, without which no worker syncs.
    pub coordinator: Option<Arc<Coordinator>>,
}

impl Context {
    /// Syncs running now.
    pub fn slots_in_use(&self) -> usize {
        self.max_slots
            .saturating_sub(self.slots.available_permits())
    }
}

/// Runs the daemon until SIGTERM/SIGINT or until `stop` is cancelled.
pub async fn run(settings: Settings, stop: CancellationToken) -> anyhow::Result<()> {
    let store = Arc::new(Store::open_settings(&settings)?);
    let health = Arc::new(Health::default());
    let coordinator = match &settings.state {
        StatePlan::Postgres(pg) => {
            let member = store.postgres().map(|p| p.member().to_owned());
            info!(member = ?member, lease_ttl_s = pg.lease_ttl.as_secs_f64(), "Joining the fleet (postgres state).");
            Some(Arc::new(Coordinator::new(
                Arc::clone(&store),
                pg.lease_ttl,
                pg.heartbeat,
            )))
        }
        StatePlan::Sqlite => None,
    };
    let ctx = Arc::new(Context {
        sinks: Sinks::new(Arc::clone(&store), &settings.sink)?,
        store,
        slots: Arc::new(tokio::sync::Semaphore::new(
            settings.daemon.max_concurrent_syncs,
        )),
        max_slots: settings.daemon.max_concurrent_syncs,
        health: Arc::clone(&health),
        tracker: TaskTracker::new(),
        default_sink: settings.sink.kind,
        coordinator: coordinator.clone(),
    });
    // Cancelled once, on shutdown: the workers and the HTTP listener are its children.
    let shutdown = stop.child_token();
    if let Some(addr) = settings.daemon.listen {
        let prometheus = recorder();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (daemon.listen)"))?;
        info!(address = %listener.local_addr()?, "Serving /healthz and /metrics.");
        let app = health::router(Arc::clone(&health), prometheus);
        let done = shutdown.clone();
        ctx.tracker.spawn(async move {
            let served = axum::serve(listener, app).with_graceful_shutdown(done.cancelled_owned());
            if let Err(e) = served.await {
                error!(error = %e, "The health listener failed.");
            }
        });
    }

    let mut fleet = Fleet::new(Arc::clone(&ctx), shutdown.clone());
    fleet.reload(&settings);
    if let Some(c) = &coordinator {
        ctx.tracker.spawn(Arc::clone(c).run(shutdown.clone()));
    }
    systemd::ready();
    info!(connectors = fleet.len(), "Daemon started.");

    let mut hangup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let terminated = signals::terminated();
    tokio::pin!(terminated);
    let watchdog = systemd::watchdog_interval();
    let tick = watchdog.map_or(TICK, |w| (w / 2).min(TICK));
    loop {
        health.beat();
        systemd::watchdog();
        systemd::status(&health.summary());
        // The store's lock can wait on another process's write: not on the supervisor's thread.
        let store = Arc::clone(&ctx.store);
        tokio::task::spawn_blocking(move || update_lag_gauges(&store));
        if let Some(handle) = RECORDER.get() {
            handle.run_upkeep();
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = &mut terminated => {
                info!("Stopping: finishing the pages in flight.");
                break;
            }
            _ = hangup.recv() => {
                info!("Reloading connectors (SIGHUP).");
                fleet.reload(&settings);
            }
            _ = tokio::time::sleep(tick) => {}
        }
    }

    systemd::stopping();
    shutdown.cancel();
    ctx.tracker.close();
    let grace = settings.daemon.shutdown_grace;
    if tokio::time::timeout(grace, ctx.tracker.wait())
        .await
        .is_err()
    {
        // Whatever is still running loses only its uncommitted page: the next start re-reads it.
        warn!(
            grace_s = grace.as_secs(),
            "Grace period over; exiting with syncs in flight."
        );
    } else {
        info!("Daemon stopped.");
    }
    if let Some(c) = coordinator {
        // The other members take this daemon's brokers over at their next heartbeat.
        let _ = tokio::task::spawn_blocking(move || c.leave()).await;
    }
    Ok(())
}

static RECORDER: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();

/// The process-wide Prometheus recorder, installed on first use.
fn recorder() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(telemetry::RUN_DURATION.into()),
                    &telemetry::RUN_DURATION_BUCKETS,
                )
                .expect("buckets are not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder (a second daemon in one test process) keeps the first one's
            // registry; both handles render what was recorded.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Cursor lag keeps growing while nothing runs; the gauges say so between runs too.
fn update_lag_gauges(store: &Store) {
    let now = jiff::Timestamp::now();
    match store.cursors() {
        Ok(cursors) => {
            for (broker, entity, cursor) in cursors {
                telemetry::cursor_lag(&broker, entity, now.duration_since(cursor).as_secs_f64());
            }
        }
        Err(e) => warn!(error = %e, "Cannot read cursors for the lag gauges."),
    }
}
