//! A fleet of daemons sharing the brokers through the PostgreSQL state (`state.backend =
//! "postgres"`): each daemon heartbeats as a member, holds the live leases of at most its share
//! of the (broker, entity) pairs, renews them, and takes over the pairs whose leases expired.
//!
//! Every daemon reads the same connectors folder and runs a worker per (broker, entity); a
//! worker syncs only while this daemon holds the pair's lease (`Coordinator::watch`). A lease
//! not renewed within the TTL (its daemon died, paused or lost the database) is free for any
//! other member at its next heartbeat; the new holder's epoch fences the old one's commits out.
//!
//! Share: `ceil(pairs / members alive)`. A member over its share releases idle leases; one under
//! it takes free ones. So work spreads when a daemon joins and moves when one leaves or dies.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::model::Entity;
use crate::state::lease::{Fence, Lease, LeaseLane};
use crate::state::{Store, StoreError};
use crate::telemetry;

type Pair = (String, Entity);

/// One pair's lease as its worker sees it: `Some` while this daemon holds it.
pub type LeaseWatch = watch::Receiver<Option<Arc<Held>>>;

/// A live lease this daemon holds, and whether a run is using it now (an idle one can be
/// handed to another member without interrupting anything).
#[derive(Debug)]
pub struct Held {
    pub lease: Arc<Lease>,
    busy: AtomicUsize,
}

impl Held {
    /// Busy until the guard is dropped (a sync and a reconciliation can overlap: a count).
    pub fn busy_while(self: &Arc<Self>) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::SeqCst);
        BusyGuard(Arc::clone(self))
    }

    fn is_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst) > 0
    }
}

pub struct BusyGuard(Arc<Held>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct Coordinator {
    store: Arc<Store>,
    ttl: Duration,
    pub heartbeat: Duration,
    started_at: Timestamp,
    /// What this daemon's connectors folder asks for, and its digest.
    work: Mutex<(BTreeSet<Pair>, String)>,
    slots: Mutex<BTreeMap<Pair, watch::Sender<Option<Arc<Held>>>>>,
    /// The config digests other members differ by, last logged (logged again on a change).
    differing: Mutex<Vec<String>>,
    /// Since when each pair has been wanted (a reload adds pairs).
    wanted_since: Mutex<BTreeMap<Pair, std::time::Instant>>,
}

impl Coordinator {
    pub fn new(store: Arc<Store>, ttl: Duration, heartbeat: Duration) -> Coordinator {
        telemetry::fleet_started();
        Coordinator {
            store,
            ttl,
            heartbeat,
            started_at: Timestamp::now(),
            work: Mutex::new((BTreeSet::new(), String::new())),
            slots: Mutex::new(BTreeMap::new()),
            differing: Mutex::new(Vec::new()),
            wanted_since: Mutex::new(BTreeMap::new()),
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, BTreeMap<Pair, watch::Sender<Option<Arc<Held>>>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pairs the connectors folder asks for now (after a start or a reload).
    pub fn set_work(&self, pairs: BTreeSet<Pair>, config_hash: String) {
        *self.work.lock().unwrap_or_else(|p| p.into_inner()) = (pairs, config_hash);
    }

    /// The lease of `(broker, entity)` as its worker follows it.
    pub fn watch(&self, broker: &str, entity: Entity) -> LeaseWatch {
        self.slots()
            .entry((broker.to_owned(), entity))
            .or_insert_with(|| watch::channel(None).0)
            .subscribe()
    }

    fn held(&self) -> Vec<(Pair, Arc<Held>)> {
        self.slots()
            .iter()
            .filter_map(|(pair, tx)| tx.borrow().clone().map(|h| (pair.clone(), h)))
            .collect()
    }

    fn set(&self, pair: &Pair, held: Option<Arc<Held>>) {
        let mut slots = self.slots();
        let tx = slots
            .entry(pair.clone())
            .or_insert_with(|| watch::channel(None).0);
        tx.send_replace(held);
    }

    /// Heartbeats, renews, rebalances and takes over, every `heartbeat`, until `stop`; then
    /// leaves the fleet (its leases free for the others at once).
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let me = Arc::clone(&self);
            if let Ok(Err(e)) = tokio::task::spawn_blocking(move || me.round()).await {
                warn!(error = %e, "Fleet heartbeat failed; leases not renewed run out after the TTL.");
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(self.heartbeat) => {}
            }
        }
    }

    /// Gives every lease back and leaves the fleet (after the workers stopped).
    pub fn leave(&self) {
        for (pair, held) in self.held() {
            held.lease.lose();
            self.set(&pair, None);
        }
        if let Some(pg) = self.store.postgres()
            && let Err(e) = pg.leave()
        {
            warn!(error = %e, "Could not leave the fleet; its leases expire after the TTL.");
        }
    }

    fn round(&self) -> Result<(), StoreError> {
        let Some(pg) = self.store.postgres() else {
            return Ok(());
        };
        let (wanted, hash) = self.work.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let members = pg.heartbeat(&hash, self.ttl, self.started_at)?;
        self.compare_configs(&members, &hash);

        // Renew what is held; what cannot be renewed is lost (taken over, or expired while
        // this process was stopped or cut off).
        let held = self.held();
        let fences: Vec<Fence> = held.iter().map(|(_, h)| h.lease.fence().clone()).collect();
        let sent_at = std::time::Instant::now();
        let renewed = pg.renew(&fences, self.ttl)?;
        let mut holding: Vec<(Pair, Arc<Held>)> = Vec::new();
        for ((pair, h), ok) in held.into_iter().zip(renewed) {
            if ok {
                h.lease.renewed(sent_at, self.ttl);
                holding.push((pair, h));
            } else {
                warn!(broker = %pair.0, entity = %pair.1, epoch = h.lease.fence().epoch,
                    "Lease lost (expired or taken over): this daemon stops working it.");
                telemetry::lease_lost(&pair.0, pair.1);
                h.lease.lose();
                self.set(&pair, None);
            }
        }

        // Release what the folder no longer asks for, and idle leases over the share.
        let share = wanted.len().div_ceil(members.len().max(1));
        let mut keep = Vec::new();
        for (pair, h) in holding {
            if !wanted.contains(&pair) {
                self.release(pg, &pair, &h)?;
            } else {
                keep.push((pair, h));
            }
        }
        let mut count = keep.len();
        let rows: Vec<_> = pg
            .leases()?
            .into_iter()
            .filter(|l| l.lane == LeaseLane::Live.as_str())
            .collect();
        // Over the share, leases are handed back only while another member has room: one
        // held past the share because nobody else took it would otherwise go back and forth.
        // (Members reading the same folder only: one that runs fewer connectors has room
        // that is no use for ours.)
        let room_elsewhere = members
            .iter()
            .filter(|m| m.id != pg.member() && m.config_hash == hash)
            .any(|m| {
                rows.iter()
                    .filter(|l| l.valid && l.holder.as_deref() == Some(m.id.as_str()))
                    .count()
                    < share
            });
        // Newest-sorted first, so that members converge on a stable split.
        for (pair, h) in keep.iter().rev() {
            if count <= share || !room_elsewhere {
                break;
            }
            if !h.is_busy() {
                info!(broker = %pair.0, entity = %pair.1, share, "Handing a lease to the fleet (over this daemon's share).");
                self.release(pg, pair, h)?;
                count -= 1;
            }
        }

        // Take free leases up to the share, starting at a point of our own so that members
        // starting together do not all queue on the same rows. Past the share, a pair left
        // free for longer than the TTL is taken all the same: the share assumes every member
        // runs every connector, and one that cannot start a connector must not leave its
        // pairs to nobody.
        let mine: BTreeSet<Pair> = self.held().into_iter().map(|(p, _)| p).collect();
        let taken: BTreeSet<Pair> = rows
            .iter()
            .filter(|l| l.valid)
            .filter_map(|l| Some((l.broker.clone(), l.entity.parse().ok()?)))
            .collect();
        let starving: BTreeSet<Pair> = rows
            .iter()
            .filter(|l| !l.valid && l.free_for > self.ttl)
            .filter_map(|l| Some((l.broker.clone(), l.entity.parse().ok()?)))
            .collect();
        let wanted_since = {
            let mut since = self.wanted_since.lock().unwrap_or_else(|p| p.into_inner());
            since.retain(|p, _| wanted.contains(p));
            for p in &wanted {
                since
                    .entry(p.clone())
                    .or_insert_with(std::time::Instant::now);
            }
            since.clone()
        };
        // A pair no member has ever taken, though wanted here for three TTLs.
        let never_held = |p: &Pair| {
            wanted_since
                .get(p)
                .is_some_and(|t| t.elapsed() > self.ttl * 3)
                && !rows
                    .iter()
                    .any(|l| l.broker == p.0 && l.entity == p.1.as_str())
        };
        let free: Vec<&Pair> = wanted
            .iter()
            .filter(|p| !taken.contains(*p) && !mine.contains(*p))
            .collect();
        let start = if free.is_empty() {
            0
        } else {
            (Sha256::digest(pg.member().as_bytes())[0] as usize) % free.len()
        };
        for pair in free.iter().cycle().skip(start).take(free.len()) {
            if count >= share && !starving.contains(*pair) && !never_held(pair) {
                continue;
            }
            if let Some(won) = pg.acquire(&pair.0, pair.1, LeaseLane::Live, self.ttl)? {
                let fence = Fence {
                    broker: pair.0.clone(),
                    entity: pair.1,
                    lane: LeaseLane::Live,
                    holder: pg.member().to_owned(),
                    epoch: won.epoch,
                };
                match &won.taken_from {
                    Some(previous) => {
                        telemetry::takeover(&pair.0, pair.1);
                        info!(broker = %pair.0, entity = %pair.1, epoch = won.epoch, from = %previous,
                            "Took over a lease whose holder stopped renewing it.");
                    }
                    None => {
                        info!(broker = %pair.0, entity = %pair.1, epoch = won.epoch, "Lease acquired.")
                    }
                }
                let lease = Arc::new(Lease::new(fence, won.sent_at, self.ttl));
                self.set(
                    pair,
                    Some(Arc::new(Held {
                        lease,
                        busy: AtomicUsize::new(0),
                    })),
                );
                count += 1;
            }
        }
        telemetry::fleet(members.len(), self.held().len());
        Ok(())
    }

    fn release(
        &self,
        pg: &crate::state::postgres::PgStore,
        pair: &Pair,
        h: &Held,
    ) -> Result<(), StoreError> {
        // Locally first: from here the worker sends no request and its commits are refused.
        h.lease.lose();
        self.set(pair, None);
        pg.release(h.lease.fence())
    }

    fn compare_configs(&self, members: &[crate::state::postgres::Member], mine: &str) {
        let differing: Vec<String> = members
            .iter()
            .filter(|m| m.config_hash != mine)
            .map(|m| format!("{} ({})", m.id, short(&m.config_hash)))
            .collect();
        let mut last = self.differing.lock().unwrap_or_else(|p| p.into_inner());
        if *last != differing {
            if !differing.is_empty() {
                warn!(mine = %short(mine), others = ?differing,
                    "This daemon's connectors folder differs from other members': every daemon must read the same files.");
            }
            *last = differing;
        }
    }
}

/// A config digest as logs and `status` show it.
pub(crate) fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// A digest of every `.toml` file of the connectors folder (names and contents), compared
/// between members through their heartbeats.
pub fn folder_hash(dir: &Path) -> String {
    let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        h.update(
            f.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        h.update([0]);
        h.update(std::fs::read(&f).unwrap_or_default());
        h.update([0]);
    }
    h.finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
}
