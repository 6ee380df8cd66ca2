//! Backfill: re-pull a history range in slices, each committed with its own progress, in a lane
//! of its own. It never touches the live cursor (DOMAIN §4.11): a backfill of last year cannot
//! make the next delta sync skip last week.

use indicatif::{ProgressBar, ProgressStyle};
use jiff::Timestamp;
use tracing::{debug, info};

use crate::engine::{EngineError, Lane, RunSummary, Runner};
use crate::model::Entity;
use crate::source::Window;

/// Pulls `[since, until]` of `entity` slice by slice, resuming a lane left unfinished.
/// `until` defaults to now − settle. Idempotent: a finished lane asked again is pulled again.
pub async fn backfill(
    runner: &Runner<'_>,
    entity: Entity,
    since: Timestamp,
    until: Option<Timestamp>,
    now: Timestamp,
    bar: &ProgressBar,
) -> Result<RunSummary, EngineError> {
    let plan = runner.plan;
    let store_error = |source| EngineError::Store {
        broker: plan.broker.clone(),
        entity,
        source,
    };
    // Whole seconds, as the live window: some brokers refuse nanoseconds in a query.
    let default_until = now - plan.sync.settle;
    let default_until = Timestamp::from_second(default_until.as_second()).unwrap_or(default_until);
    let wanted_until = until.unwrap_or(default_until).max(since);
    let mut lane = runner
        .store
        .backfill(&plan.broker, entity, since, wanted_until)
        .map_err(store_error)?;
    // A finished lane, or one asked for with a different end, starts over; otherwise resume.
    if lane.finished || (until.is_some() && lane.until != wanted_until) {
        runner
            .store
            .restart_backfill(&plan.broker, entity, since, wanted_until)
            .map_err(store_error)?;
        lane.until = wanted_until;
        lane.done_until = since;
    } else if lane.done_until > since {
        info!(broker = %plan.broker, %entity, resume_from = %lane.done_until, "Resuming backfill.");
    }
    // Until this lane's records are merged (below), another process opening the store leaves
    // them staged rather than merging under this backfill's feet.
    let _staging = runner.store.staging();
    let slice = plan.sync.backfill_slice;
    let slices = |from: Timestamp, to: Timestamp| {
        let span = to.duration_since(from).as_secs_f64().max(0.0);
        (span / slice.as_secs_f64()).ceil() as u64
    };
    bar.set_length(slices(since, lane.until).max(1));
    bar.set_position(slices(since, lane.done_until));
    bar.set_message(format!("{}/{entity}", plan.broker));

    let mut total = RunSummary::default();
    let mut from = lane.done_until;
    let pulled = async {
        while from < lane.until {
            let to = (from + slice).min(lane.until);
            let done = runner
                .run(entity, Window { from, to }, Lane::Backfill { since })
                .await?;
            total.pages += done.pages;
            total.pulled += done.pulled;
            total.stats += done.stats;
            bar.inc(1);
            from = to;
        }
        Ok(())
    }
    .await;
    // The lane's records were committed to the staging table: merge them into the entity
    // tables, whether the lane finished or stopped. (This blocks the thread for the merge; a
    // backfill command has nothing else to do meanwhile.) Pages count their records as
    // stored when staged; those the merge held for want of their customer count as held.
    let merged = runner.store.merge_staged().map_err(store_error);
    pulled?;
    let merged = merged?;
    total.stats.stored = total.stats.stored.saturating_sub(merged.held);
    total.stats.held += merged.held;
    debug!(broker = %plan.broker, %entity, merged = merged.stored, held = merged.held,
           "Backfill merged into the store.");
    Ok(total)
}

/// A progress bar on a terminal; hidden (and free) when stderr is not one.
pub fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    if let Ok(style) =
        ProgressStyle::with_template("{msg:>28} [{bar:40}] {pos}/{len} slices, ETA {eta}")
    {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}
