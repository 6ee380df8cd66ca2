//! Metric names and the events that move them, in one place (Vector's internal_events idea):
//! each function is one event, so names and labels are not scattered string literals.
//!
//! Without a recorder installed (every command but `run`) these calls cost next to nothing.

use metrics::{counter, gauge, histogram};

use crate::model::Entity;
use crate::sink::CommitStats;

pub const RECORDS_PULLED: &str = "t360_records_pulled_total";
pub const RECORDS_STORED: &str = "t360_records_stored_total";
pub const RECORDS_QUARANTINED: &str = "t360_records_quarantined_total";
pub const RECORDS_HELD: &str = "t360_records_held_total";
pub const RUNS: &str = "t360_runs_total";
pub const RUN_DURATION: &str = "t360_run_duration_seconds";
pub const HTTP_REQUESTS: &str = "t360_http_requests_total";
pub const RETRIES: &str = "t360_http_retries_total";
pub const CURSOR_LAG: &str = "t360_cursor_lag_seconds";
pub const TICKS_SKIPPED: &str = "t360_schedule_ticks_skipped_total";
pub const SYNCS_RUNNING: &str = "t360_syncs_running";
pub const QUARANTINE_SIZE: &str = "t360_quarantine_records";
pub const RECONCILE_RUNS: &str = "t360_reconcile_runs_total";
pub const RECONCILE_DRIFT: &str = "t360_reconcile_drift_records";
pub const RECONCILE_REPAIRED: &str = "t360_reconcile_repaired_records_total";
pub const FLEET_MEMBERS: &str = "t360_fleet_members";
pub const FLEET_LEASES_HELD: &str = "t360_fleet_leases_held";
pub const FLEET_TAKEOVERS: &str = "t360_fleet_takeovers_total";
pub const FLEET_FENCING_REJECTIONS: &str = "t360_fleet_fencing_rejections_total";
pub const FLEET_LEASES_LOST: &str = "t360_fleet_leases_lost_total";

/// Every metric this daemon exports (a dashboard may query only these).
pub const ALL: [&str; 20] = [
    RECORDS_PULLED,
    RECORDS_STORED,
    RECORDS_QUARANTINED,
    RECORDS_HELD,
    RUNS,
    RUN_DURATION,
    HTTP_REQUESTS,
    RETRIES,
    CURSOR_LAG,
    TICKS_SKIPPED,
    SYNCS_RUNNING,
    QUARANTINE_SIZE,
    RECONCILE_RUNS,
    RECONCILE_DRIFT,
    RECONCILE_REPAIRED,
    FLEET_MEMBERS,
    FLEET_LEASES_HELD,
    FLEET_TAKEOVERS,
    FLEET_FENCING_REJECTIONS,
    FLEET_LEASES_LOST,
];

/// Run-duration histogram buckets, in seconds.
pub const RUN_DURATION_BUCKETS: [f64; 10] =
    [0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0];

fn labels(broker: &str, entity: Entity) -> [(&'static str, String); 2] {
    [
        ("broker", broker.to_owned()),
        ("entity", entity.as_str().to_owned()),
    ]
}

/// A page was committed. Held records its customers released count as stored for their own
/// entity.
pub fn page_committed(broker: &str, entity: Entity, pulled: usize, stats: &CommitStats) {
    let l = labels(broker, entity);
    counter!(RECORDS_PULLED, &l).increment(pulled as u64);
    counter!(RECORDS_STORED, &l).increment(stats.stored);
    counter!(RECORDS_QUARANTINED, &l).increment(stats.quarantined);
    counter!(RECORDS_HELD, &l).increment(stats.held);
    for released in Entity::ALL {
        let n = stats.released[released as usize];
        if n > 0 {
            counter!(RECORDS_STORED, &labels(broker, released)).increment(n);
        }
    }
}

/// A run ended: `success`, `failed` or `interrupted`.
pub fn run_finished(broker: &str, entity: Entity, outcome: &'static str, seconds: f64) {
    let [b, e] = labels(broker, entity);
    counter!(
        RUNS,
        &[b.clone(), e.clone(), ("outcome", outcome.to_owned())]
    )
    .increment(1);
    histogram!(RUN_DURATION, &[b, e]).record(seconds);
}

/// An HTTP request got an answer (`status`) or none (`status` = "error").
pub fn http_request(broker: &str, entity: Entity, status: &str) {
    let [b, e] = labels(broker, entity);
    counter!(HTTP_REQUESTS, &[b, e, ("status", status.to_owned())]).increment(1);
}

pub fn retry(broker: &str, entity: Entity) {
    counter!(RETRIES, &labels(broker, entity)).increment(1);
}

/// How far the cursor is behind now.
pub fn cursor_lag(broker: &str, entity: Entity, seconds: f64) {
    gauge!(CURSOR_LAG, &labels(broker, entity)).set(seconds);
}

/// Schedule ticks that passed while the previous run was still busy.
pub fn ticks_skipped(broker: &str, entity: Entity, count: u64) {
    counter!(TICKS_SKIPPED, &labels(broker, entity)).increment(count);
}

pub fn syncs_running(count: usize) {
    gauge!(SYNCS_RUNNING).set(count as f64);
}

/// A connector started: its series exist from now on (a dashboard shows 0, not "no data").
pub fn connector_started(broker: &str, entities: &[Entity]) {
    for &entity in entities {
        let [b, e] = labels(broker, entity);
        counter!(RETRIES, &[b.clone(), e.clone()]).increment(0);
        counter!(
            HTTP_REQUESTS,
            &[b.clone(), e.clone(), ("status", "429".to_owned())]
        )
        .increment(0);
        counter!(RECORDS_STORED, &[b.clone(), e.clone()]).increment(0);
        counter!(TICKS_SKIPPED, &[b.clone(), e.clone()]).increment(0);
        counter!(RECORDS_QUARANTINED, &[b, e]).increment(0);
    }
}

/// The records of (broker, entity) in quarantine now.
pub fn quarantine_size(broker: &str, entity: Entity, records: u64) {
    gauge!(QUARANTINE_SIZE, &labels(broker, entity)).set(records as f64);
}

/// A reconciliation ended: `equal`, `drift`, `repaired` or `failed`; the drift it found
/// (missing, different, gone) and the records a repair re-sent or deleted.
pub fn reconciled(
    broker: &str,
    entity: Entity,
    outcome: &str,
    drift: Option<[u64; 3]>,
    repaired: u64,
) {
    let [b, e] = labels(broker, entity);
    counter!(
        RECONCILE_RUNS,
        &[b.clone(), e.clone(), ("outcome", outcome.to_owned())]
    )
    .increment(1);
    if let Some(drift) = drift {
        for (kind, n) in ["missing", "different", "gone"].iter().zip(drift) {
            gauge!(
                RECONCILE_DRIFT,
                &[b.clone(), e.clone(), ("kind", (*kind).to_owned())]
            )
            .set(n as f64);
        }
    }
    counter!(RECONCILE_REPAIRED, &[b, e]).increment(repaired);
}

/// The fleet as this daemon last saw it: members alive, and the leases it holds.
pub fn fleet(members: usize, leases_held: usize) {
    gauge!(FLEET_MEMBERS).set(members as f64);
    gauge!(FLEET_LEASES_HELD).set(leases_held as f64);
}

/// A lease taken over from a member whose lease had expired (dead, paused or partitioned).
pub fn takeover(broker: &str, entity: Entity) {
    counter!(FLEET_TAKEOVERS, &labels(broker, entity)).increment(1);
}

/// A lease this daemon held was found taken or expired at renewal.
pub fn lease_lost(broker: &str, entity: Entity) {
    counter!(FLEET_LEASES_LOST, &labels(broker, entity)).increment(1);
}

/// A commit refused because its lease was no longer held (nothing of it was written).
pub fn fencing_rejected(broker: &str, entity: Entity) {
    counter!(FLEET_FENCING_REJECTIONS, &labels(broker, entity)).increment(1);
}

/// Zeroes the fleet counters, so that they are exported before the first event.
pub fn fleet_started() {
    counter!(FLEET_TAKEOVERS).increment(0);
    counter!(FLEET_FENCING_REJECTIONS).increment(0);
    counter!(FLEET_LEASES_LOST).increment(0);
}
