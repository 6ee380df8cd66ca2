//! Leases: a (broker, entity, lane) is worked by the one daemon holding its lease, and every
//! commit proves it still holds it (the fencing epoch), so a daemon that lost its lease — paused,
//! partitioned, slow — can never write a record or move a cursor afterwards.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::model::Entity;

/// The lane a lease covers: the live cursor, or backfill lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LeaseLane {
    Live,
    Backfill,
}

impl LeaseLane {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaseLane::Live => "live",
            LeaseLane::Backfill => "backfill",
        }
    }
}

/// What a commit must prove: its writer holds this lease at this epoch, unexpired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    pub broker: String,
    pub entity: Entity,
    pub lane: LeaseLane,
    pub holder: String,
    pub epoch: i64,
}

impl std::fmt::Display for Fence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.broker, self.entity, self.lane.as_str())
    }
}

/// A lease this process holds. The database decides who holds what; this is the local view,
/// used to stop talking to the broker as soon as the lease may have gone: it counts as valid
/// only until the TTL runs out from when its last renewal was *sent* (a monotonic clock, which
/// runs on while the process is stopped), less a margin for clock-rate differences.
#[derive(Debug)]
pub struct Lease {
    fence: Fence,
    deadline: Mutex<Instant>,
    lost: CancellationToken,
}

impl Lease {
    /// A lease granted by a request sent at `sent_at`.
    pub fn new(fence: Fence, sent_at: Instant, ttl: Duration) -> Lease {
        Lease {
            fence,
            deadline: Mutex::new(deadline(sent_at, ttl)),
            lost: CancellationToken::new(),
        }
    }

    pub fn fence(&self) -> &Fence {
        &self.fence
    }

    /// A renewal sent at `sent_at` succeeded.
    pub fn renewed(&self, sent_at: Instant, ttl: Duration) {
        let mut d = self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        *d = (*d).max(deadline(sent_at, ttl));
    }

    /// Until when the lease counts as valid here (as of its last renewal).
    pub fn deadline(&self) -> Instant {
        *self.deadline.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Completes once the lease may be gone: lost, or past its deadline without a renewal.
    pub async fn gone(&self) {
        loop {
            let d = self.deadline();
            if self.lost.is_cancelled() || Instant::now() >= d {
                return;
            }
            tokio::select! {
                _ = self.lost.cancelled() => return,
                _ = tokio::time::sleep_until(d.into()) => {}
            }
        }
    }

    /// Whether this process may still act under the lease (fetch the broker's next page).
    pub fn is_valid(&self) -> bool {
        let d = *self.deadline.lock().unwrap_or_else(|p| p.into_inner());
        !self.lost.is_cancelled() && Instant::now() < d
    }

    /// The lease is gone (a renewal found it taken or expired, or it was released).
    pub fn lose(&self) {
        self.lost.cancel();
    }

    /// Cancelled when the lease is lost.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }
}

fn deadline(sent_at: Instant, ttl: Duration) -> Instant {
    let margin = (ttl / 10).min(Duration::from_secs(2));
    sent_at + ttl.saturating_sub(margin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fence() -> Fence {
        Fence {
            broker: "acme".into(),
            entity: Entity::Customers,
            lane: LeaseLane::Live,
            holder: "a".into(),
            epoch: 1,
        }
    }

    #[test]
    fn a_lease_is_valid_until_its_ttl_less_a_margin_from_the_renewal_sent() {
        let long_ago = Instant::now() - Duration::from_secs(10);
        let lease = Lease::new(fence(), long_ago, Duration::from_secs(5));
        assert!(
            !lease.is_valid(),
            "expired ten seconds after a five-second grant"
        );
        lease.renewed(Instant::now(), Duration::from_secs(5));
        assert!(lease.is_valid());
        // A late answer to an older renewal never shortens the lease.
        lease.renewed(long_ago, Duration::from_secs(5));
        assert!(lease.is_valid());
        lease.lose();
        assert!(!lease.is_valid(), "a lost lease is never valid again");
    }
}
