//! A model-based test of the sync engine: random sequences of broker changes and syncs, with
//! crashes at random commits and restarts, checked after every step against a plain map of
//! what the broker holds.
//!
//! The broker is a SQLite replica read by the real SQL source (keyset pages on
//! (`last_modified_date`, key), the window's lower bound in its own query); the store is the
//! real embedded SQLite store, reopened after every crash. The steps:
//! - inserts and updates stamped anywhere in the last `lookback` (late rows inside the
//!   lookback, and ties: stamps are whole seconds of a short span, so many rows share one),
//! - re-sends of unchanged records (stamped again, same content),
//! - the clock moving on,
//! - syncs with a random page size, some crashing after a random number of commits (the
//!   commit is refused, the process "dies", the store is reopened from its file).
//!
//! Checked after every step:
//! - after a sync that finished, the store holds exactly the broker's records, each at its
//!   latest version;
//! - at every moment, every record stamped before `cursor − lookback` (which no later window
//!   reads again) is stored at its latest version, and nothing stored is a version the broker
//!   never had.
//!
//! It finds the two classic bugs. Each was made in the product and run here (then undone):
//! - The window's lower bound made exclusive (`{range} > {lower}` in
//!   `src/source/sql/query.rs`'s `page`). `cargo test --test model` failed in 2 s, shrunk to:
//!   lookback 0; sync; put k0 on the clock's second; the closing sync →
//!   `after a finished sync: 1 missing (["k0"])`. A record stamped on the cursor's own second
//!   after the sync that set it is never read.
//! - The cursor committed before the records (in `Runner::pull`, the live cursor set on every
//!   page of a window instead of its last): failed in 10 s, shrunk to: put k0; sync; put k4 and
//!   k1; tick 1 s; sync with pages of 1 crashing on its 2nd commit →
//!   `records stamped before cursor − lookback are not stored: ["k1", "k4"] (cursor 101)`.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use jiff::Timestamp;
use proptest::prelude::*;
use t360_connector::config::{self, ConnectorPlan, SourcePlan};
use t360_connector::engine::Runner;
use t360_connector::model::Entity;
use t360_connector::sink::{BoxFuture, CommitStats, EmbeddedSink, PageBatch, Sink, SinkError};
use t360_connector::source::sql::SqlSource;
use t360_connector::state::{Store, StoreError};
use tokio_util::sync::CancellationToken;

use support::{BROKER, stored_cursor, stored_rows};

/// The records' keys: few, so that updates, re-sends and ties are frequent.
const KEYS: u8 = 8;

#[derive(Debug, Clone)]
enum Step {
    /// Insert or update `key` (a new version), stamped `ago` seconds before the clock.
    Put { key: u8, ago: u8 },
    /// Stamp `key` again with the same content, if it exists.
    Resend { key: u8, ago: u8 },
    /// The clock moves on.
    Tick { seconds: u8 },
    /// A sync with pages of `page_size`, crashing on its `crash_at`-th commit if that comes.
    Sync { page_size: u8, crash_at: Option<u8> },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0..KEYS, 0..4u8).prop_map(|(key, ago)| Step::Put { key, ago }),
        1 => (0..KEYS, 0..4u8).prop_map(|(key, ago)| Step::Resend { key, ago }),
        2 => (0..3u8).prop_map(|seconds| Step::Tick { seconds }),
        3 => (1..4u8, proptest::option::weighted(0.4, 1..4u8))
            .prop_map(|(page_size, crash_at)| Step::Sync { page_size, crash_at }),
    ]
}

/// What the broker holds: key → (stamp, version); versions count up across all keys.
#[derive(Default)]
struct Model {
    records: BTreeMap<String, (i64, u32)>,
    versions: u32,
    /// Every version each key has had.
    history: BTreeMap<String, Vec<u32>>,
    /// Finished syncs that compared a non-empty store: a run where none did proves nothing.
    compared: u32,
}

/// The world of one case: the replica, the state folder, the clock.
struct World {
    dir: tempfile::TempDir,
    replica: rusqlite::Connection,
    /// Seconds after `T0`.
    clock: i64,
    lookback: i64,
}

const T0: i64 = 1_767_607_200; // 2026-01-05T10:00:00Z

fn stamp(seconds: i64) -> String {
    Timestamp::from_second(T0 + seconds)
        .unwrap()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

impl World {
    fn new(lookback: i64) -> World {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        let replica = rusqlite::Connection::open(dir.path().join("replica.db")).unwrap();
        replica
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE customers (customer_id TEXT PRIMARY KEY, signup_date DATETIME,
                   last_modified_date TEXT, affiliate_id TEXT, country_code TEXT,
                   leverage INTEGER, email TEXT);",
            )
            .unwrap();
        let world = World {
            dir,
            replica,
            clock: 100,
            lookback,
        };
        // The store's tables, before anything runs.
        drop(Store::open(&world.database()).unwrap());
        world
    }

    fn database(&self) -> std::path::PathBuf {
        self.dir.path().join("state").join("t360-connector.db")
    }

    fn plan(&self, page_size: u8) -> ConnectorPlan {
        let text = format!(
            r#"broker = "{BROKER}"
kind = "sqlite"
entities = ["customers"]

[sql]
url = "sqlite://{replica}"
page_size = {page_size}

[sql.customers]
table = "customers"

[sync]
lookback = "{lookback}s"
settle = "0s"
start = "{start}"
backfill_slice = "7s"
"#,
            replica = self.dir.path().join("replica.db").display(),
            lookback = self.lookback,
            start = stamp(0),
        );
        let settings = config::load_settings(None).unwrap();
        config::parse_connector(&text, Path::new("model.toml"), &settings)
            .unwrap_or_else(|e| panic!("{e:?}"))
    }

    fn put(&self, key: &str, at: i64, version: u32) {
        self.replica
            .execute(
                "INSERT INTO customers VALUES (?1, '2026-01-05 12:00:00', ?2, ?3, 'CY', 500, NULL)
                 ON CONFLICT (customer_id) DO UPDATE
                 SET last_modified_date = ?2, affiliate_id = ?3",
                rusqlite::params![key, stamp(at), format!("v{version}")],
            )
            .unwrap();
    }

    /// The store's records: key → version.
    fn stored(&self) -> BTreeMap<String, u32> {
        stored_rows(&self.database(), BROKER, Entity::Customers)
            .into_iter()
            .map(|(key, row)| {
                let version = row["affiliate_id"].as_deref().unwrap();
                (key, version[1..].parse().unwrap())
            })
            .collect()
    }

    fn cursor(&self) -> Option<i64> {
        stored_cursor(&self.database(), BROKER, Entity::Customers)
            .map(|c| c.parse::<Timestamp>().unwrap().as_second() - T0)
    }
}

/// The embedded sink, refusing its `crash_at`-th commit as a process killed before it would:
/// what was committed before stays, nothing after it happens.
struct Crashing {
    inner: EmbeddedSink,
    left: AtomicI64,
}

impl Sink for Crashing {
    fn deliver<'a>(&'a self, batch: &'a mut PageBatch) -> BoxFuture<'a, Result<(), SinkError>> {
        self.inner.deliver(batch)
    }

    fn finalize(&self, batch: PageBatch) -> BoxFuture<'_, Result<CommitStats, StoreError>> {
        if self.left.fetch_sub(1, Ordering::SeqCst) == 1 {
            return Box::pin(async { Err(StoreError::Task("crashed (injected)".into())) });
        }
        self.inner.finalize(batch)
    }
}

/// Runs one sync at the world's clock; true if it finished.
async fn sync(world: &World, page_size: u8, crash_at: Option<u8>) -> bool {
    let plan = world.plan(page_size);
    let SourcePlan::Sql(sql) = &plan.source else {
        unreachable!()
    };
    let source = SqlSource::new(BROKER, sql).unwrap();
    // A fresh store each run, as a restarted process opens it.
    let store = Arc::new(Store::open(&world.database()).unwrap());
    let sink = Crashing {
        inner: EmbeddedSink::new(store.clone()),
        left: AtomicI64::new(crash_at.map_or(-1, i64::from)),
    };
    let runner = Runner {
        plan: &plan,
        source: &source,
        sink: &sink,
        store: &store,
        stop: CancellationToken::new(),
        lease: None,
    };
    let now = Timestamp::from_second(T0 + world.clock).unwrap();
    let result = runner.sync(Entity::Customers, now).await;
    let crashed = sink.left.load(Ordering::SeqCst) == 0;
    match result {
        Ok(_) => true,
        // The injected crash is the only way a sync here may fail.
        Err(_) if crashed => false,
        Err(e) => panic!("a sync failed without a crash: {e}"),
    }
}

/// The checks that hold at every moment; `finished`: the last step was a sync that finished.
fn check(world: &World, model: &Model, finished: bool) -> Result<(), String> {
    let stored = world.stored();
    let lookback = world.lookback;
    let truth: BTreeMap<String, u32> = model
        .records
        .iter()
        .map(|(k, (_, v))| (k.clone(), *v))
        .collect();
    for (key, version) in &stored {
        match truth.get(key) {
            Some(_) if model.history[key].contains(version) => {}
            _ => {
                return Err(format!(
                    "{key} stored at v{version}, which the broker never had"
                ));
            }
        }
    }
    if finished && stored != truth {
        let missing: Vec<&String> = truth.keys().filter(|k| !stored.contains_key(*k)).collect();
        let stale: Vec<&String> = truth
            .iter()
            .filter(|(k, v)| stored.get(*k).is_some_and(|s| s != *v))
            .map(|(k, _)| k)
            .collect();
        return Err(format!(
            "lookback {lookback}: after a finished sync: {} missing ({missing:?}), {} stale ({stale:?})",
            missing.len(),
            stale.len()
        ));
    }
    if let Some(cursor) = world.cursor() {
        if cursor > world.clock {
            return Err(format!("cursor {cursor} is past the clock {}", world.clock));
        }
        let lost: Vec<&String> = model
            .records
            .iter()
            .filter(|(k, (at, v))| *at < cursor - lookback && stored.get(*k) != Some(v))
            .map(|(k, _)| k)
            .collect();
        if !lost.is_empty() {
            return Err(format!(
                "lookback {lookback}: records stamped before cursor − lookback are not stored: {lost:?} (cursor {cursor})"
            ));
        }
    }
    Ok(())
}

fn run_case(lookback: i64, steps: &[Step]) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut world = World::new(lookback);
    let mut model = Model::default();
    for (i, step) in steps
        .iter()
        .chain(std::iter::once(&Step::Sync {
            page_size: 2,
            crash_at: None,
        }))
        .enumerate()
    {
        let mut finished = false;
        match *step {
            Step::Put { key, ago } => {
                let key = format!("k{key}");
                // A change is never stamped before the record's last stamp.
                let before = model.records.get(&key).map_or(i64::MIN, |r| r.0);
                let at = (world.clock - i64::from(ago).min(lookback)).max(before);
                model.versions += 1;
                world.put(&key, at, model.versions);
                model
                    .history
                    .entry(key.clone())
                    .or_default()
                    .push(model.versions);
                model.records.insert(key, (at, model.versions));
            }
            Step::Resend { key, ago } => {
                let key = format!("k{key}");
                if let Some((stamped, version)) = model.records.get_mut(&key) {
                    let at = (world.clock - i64::from(ago).min(lookback)).max(*stamped);
                    world.put(&key, at, *version);
                    *stamped = at;
                }
            }
            Step::Tick { seconds } => world.clock += i64::from(seconds),
            Step::Sync {
                page_size,
                crash_at,
            } => finished = runtime.block_on(sync(&world, page_size, crash_at)),
        }
        check(&world, &model, finished).map_err(|e| format!("step {i} ({step:?}): {e}"))?;
        if finished && !model.records.is_empty() {
            model.compared += 1;
        }
    }
    // The closing sync cannot crash and must finish: every case compares a whole store.
    if !model.records.is_empty() && model.compared == 0 {
        return Err("no finished sync compared the store".into());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        // A failure shrinks to its shortest sequence; each case opens files, so keep it brief.
        max_shrink_iters: 200,
        .. ProptestConfig::default()
    })]

    #[test]
    fn the_store_follows_the_broker_through_changes_crashes_and_restarts(
        lookback in prop_oneof![Just(0i64), Just(2i64)],
        steps in proptest::collection::vec(step(), 1..40),
    ) {
        if let Err(e) = run_case(lookback, &steps) {
            return Err(TestCaseError::fail(e));
        }
    }
}
