//! One (broker, entity) on its schedule: sleep until the next fire time, take the entity's lock
//! and a global slot, run one sync, repeat. One loop per entity means no two runs of it overlap;
//! ticks that pass while a run is busy are skipped and counted.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error_span, info, warn};

use super::Context;
use super::coordinator::Held;
use crate::config::ConnectorPlan;
use crate::engine::{EngineError, Runner};
use crate::model::Entity;
use crate::sink::Sink;
use crate::source::Source;
use crate::telemetry;

/// Held for the length of a run of one (broker, entity).
pub type EntityLock = Arc<tokio::sync::Mutex<()>>;

pub async fn worker(
    ctx: Arc<Context>,
    plan: Arc<ConnectorPlan>,
    source: Arc<dyn Source>,
    sink: Arc<dyn Sink>,
    entity: Entity,
    lock: EntityLock,
    stop: CancellationToken,
) {
    let Some(coordinator) = ctx.coordinator.clone() else {
        return serve(ctx, plan, source, sink, entity, lock, None, stop).await;
    };
    // In a fleet: serve only while this daemon holds the pair's lease.
    let mut watch = coordinator.watch(&plan.broker, entity);
    loop {
        let held = loop {
            // A lease already lost (a refused commit) stays in the slot until the coordinator's
            // next round clears it: not one to serve again.
            if let Some(held) = watch.borrow_and_update().clone()
                && !held.lease.lost().is_cancelled()
            {
                break held;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = watch.changed() => if changed.is_err() { return },
            }
        };
        let held_stop = stop.child_token();
        let lost = held.lease.lost().clone();
        let serving = serve(
            Arc::clone(&ctx),
            Arc::clone(&plan),
            Arc::clone(&source),
            Arc::clone(&sink),
            entity,
            Arc::clone(&lock),
            Some(held),
            held_stop.clone(),
        );
        tokio::pin!(serving);
        tokio::select! {
            _ = &mut serving => {}
            _ = lost.cancelled() => {
                // The run in flight stops after its page (whose commit the fence refuses).
                held_stop.cancel();
                serving.await;
            }
        }
        if stop.is_cancelled() {
            return;
        }
        // A schedule that never fires again: hold on until the lease goes or the daemon stops.
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = lost.cancelled() => {}
        }
    }
}

/// Runs `entity` of `plan` on its schedule until `stop` (under `held`, in a fleet).
#[allow(clippy::too_many_arguments)]
async fn serve(
    ctx: Arc<Context>,
    plan: Arc<ConnectorPlan>,
    source: Arc<dyn Source>,
    sink: Arc<dyn Sink>,
    entity: Entity,
    lock: EntityLock,
    held: Option<Arc<Held>>,
    stop: CancellationToken,
) {
    let broker = plan.broker.clone();
    // ERROR level: on whenever any line is (see the engine's `run` span).
    let span = error_span!("schedule", broker = %broker, entity = %entity);
    async move {
        let schedule = &plan.schedules[entity as usize];
        // Catch-up: a run missed while the daemon was down (or never done) happens at once.
        let last_success = ctx.store.last_success(&broker, entity).ok().flatten();
        let mut due_now = match (
            last_success,
            schedule.previous_at_or_before(Timestamp::now()),
        ) {
            (None, _) => true,
            (Some(done), Some(due)) => done < due,
            (Some(_), None) => false,
        };
        ctx.health
            .update(&broker, entity, |h| h.last_success = last_success);
        if due_now {
            info!(last_success = ?last_success.map(|t| t.to_string()), "Catching up a missed run.");
        }
        loop {
            let fired_at = if due_now {
                Timestamp::now()
            } else {
                let Some(next) = schedule.next_after(Timestamp::now()) else {
                    warn!(
                        schedule = schedule.as_str(),
                        "The schedule never fires again."
                    );
                    return;
                };
                ctx.health
                    .update(&broker, entity, |h| h.next_run = Some(next));
                let wait: Duration = next
                    .duration_since(Timestamp::now())
                    .try_into()
                    .unwrap_or(Duration::ZERO);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => next,
                }
            };
            due_now = false;
            // Only a restarted connector's old worker can hold the lock: skip, count, go on.
            let Ok(_run) = Arc::clone(&lock).try_lock_owned() else {
                telemetry::ticks_skipped(&broker, entity, 1);
                debug!("Previous run still busy; tick skipped.");
                continue;
            };
            let _slot = tokio::select! {
                _ = stop.cancelled() => return,
                slot = Arc::clone(&ctx.slots).acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return,
                },
            };
            ctx.health.update(&broker, entity, |h| h.running = true);
            telemetry::syncs_running(ctx.slots_in_use());
            let runner = Runner {
                plan: &plan,
                source: source.as_ref(),
                sink: sink.as_ref(),
                store: &ctx.store,
                stop: stop.clone(),
                lease: held.as_ref().map(|h| Arc::clone(&h.lease)),
            };
            let busy = held.as_ref().map(|h| h.busy_while());
            let result = runner.sync(entity, Timestamp::now()).await;
            drop(busy);
            let now = Timestamp::now();
            ctx.health.update(&broker, entity, |h| {
                h.running = false;
                match &result {
                    Ok(_) => h.last_success = Some(now),
                    Err(EngineError::Interrupted { .. }) => {}
                    Err(e) => h.last_error = Some((now, e.to_string())),
                }
            });
            drop(_slot);
            telemetry::syncs_running(ctx.slots_in_use());
            match result {
                Err(EngineError::Interrupted { .. }) => return,
                // One broker failing never stalls the others: log, and try at the next tick.
                Err(e) => warn!(error = %e, "Sync failed; the cursor stays where it was."),
                Ok(_) => {}
            }
            let skipped = schedule.fires_between(fired_at, now);
            if skipped > 0 {
                telemetry::ticks_skipped(&broker, entity, skipped);
                debug!(skipped, "Ticks passed while the run was busy.");
            }
        }
    }
    .instrument(span)
    .await
}
