//! Scheduled reconciliation of one connector (`[reconcile]`): at each fire time, each entity
//! of the last `days` days is compared with the broker — under the entity's lock, so never
//! beside its own sync — and, with `auto_repair`, repaired. Drift becomes metrics and a warning
//! (`reconcile::run`).

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error_span, warn};

use super::Context;
use super::worker::EntityLock;
use crate::config::ConnectorPlan;
use crate::config::plan::SinkKind;
use crate::engine::Runner;
use crate::model::Entity;
use crate::reconcile;
use crate::sink::Sink;
use crate::source::Source;

pub async fn reconciler(
    ctx: Arc<Context>,
    plan: Arc<ConnectorPlan>,
    source: Arc<dyn Source>,
    sink: Arc<dyn Sink>,
    locks: Vec<(Entity, EntityLock)>,
    stop: CancellationToken,
) {
    let Some(schedule) = plan.reconcile.schedule.clone() else {
        return;
    };
    // ERROR level: on whenever any line is (see the engine's `run` span).
    let span = error_span!("reconcile", broker = %plan.broker);
    let delete_gone = matches!(
        plan.sink.unwrap_or(ctx.default_sink),
        SinkKind::Sqlite | SinkKind::Postgres | SinkKind::Both
    );
    async move {
        loop {
            let Some(next) = schedule.next_after(Timestamp::now()) else {
                return;
            };
            let wait: Duration = next
                .duration_since(Timestamp::now())
                .try_into()
                .unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            for (entity, lock) in &locks {
                // In a fleet, the member holding the pair's live lease reconciles it, under
                // that lease (a repair's commits are fenced like a sync's).
                let held = match &ctx.coordinator {
                    None => None,
                    Some(c) => match c.watch(&plan.broker, *entity).borrow().clone() {
                        Some(held) => Some(held),
                        None => continue,
                    },
                };
                // Busy: the coordinator does not hand the pair away mid-reconciliation.
                let _busy = held.as_ref().map(|h| h.busy_while());
                let lease = held.as_ref().map(|h| Arc::clone(&h.lease));
                let _held = tokio::select! {
                    _ = stop.cancelled() => return,
                    held = Arc::clone(lock).lock_owned() => held,
                };
                let _slot = tokio::select! {
                    _ = stop.cancelled() => return,
                    slot = Arc::clone(&ctx.slots).acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => return,
                    },
                };
                let runner = Runner {
                    plan: &plan,
                    source: source.as_ref(),
                    sink: sink.as_ref(),
                    store: &ctx.store,
                    stop: stop.clone(),
                    lease,
                };
                let range = reconcile::last_days(Timestamp::now(), plan.reconcile.days);
                let done = reconcile::run(
                    &runner,
                    *entity,
                    range,
                    plan.reconcile.auto_repair,
                    delete_gone,
                )
                .await;
                if let Err(e) = done {
                    warn!(entity = %entity, error = %e, "Reconciliation failed.");
                }
            }
        }
    }
    .instrument(span)
    .await
}
