//! Crash safety: `kill -9` of the real binary at several points, then a restart, ends with
//! exactly the broker's data: nothing lost, nothing duplicated, the database intact.

mod support;

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde_json::json;
use support::*;
use t360_connector::model::Entity;

fn data() -> Dataset {
    // 7,500 records a second apart from 2026-01-01T00:00Z: about two hours of history.
    Dataset::generate(&DatasetSpec {
        customers: 1500,
        transactions: 3000,
        activity: 3000,
        ..DatasetSpec::default()
    })
}

fn connector() -> Connector {
    Connector {
        per_page: 50,
        backfill_slice: "10m",
        ..Connector::default()
    }
}

fn requests(broker: &SampleBroker) -> u64 {
    Entity::ALL.iter().map(|e| broker.requests(*e)).sum()
}

/// Starts the binary, waits until the broker has answered `after` more requests, and kills it
/// with SIGKILL. Returns false if the run ended before that point.
async fn kill_after(env: &Env, args: &[&str], after: u64) -> bool {
    let start = requests(&env.broker);
    let mut child: Child = env
        .binary()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the binary");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().expect("wait").is_some() {
            return false;
        }
        if requests(&env.broker) >= start + after {
            child.kill().expect("SIGKILL"); // std's kill() is SIGKILL on Unix: no clean-up runs
            child.wait().expect("reap");
            return true;
        }
        assert!(
            Instant::now() < deadline,
            "the binary neither progressed nor ended"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn run_to_end(env: &Env, args: &[&str]) {
    let out = env.binary().args(args).output().expect("run the binary");
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_database_intact(env: &Env) {
    let conn = rusqlite::Connection::open(env.database()).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}

fn assert_cursor_covers_store(env: &Env) {
    for entity in Entity::ALL {
        env.assert_cursor_covers_store(BROKER, entity);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_backfill_then_restart_loses_and_duplicates_nothing() {
    let env = Env::start(data(), Paging::Cursor, connector()).await;
    env.broker.set_delay(Duration::from_millis(3));
    let backfill = [
        "backfill",
        "--broker",
        BROKER,
        "--since",
        "2025-12-31",
        "--until",
        "2026-01-02",
    ];
    let mut killed = 0;
    for (i, after) in [5_u64, 23, 41, 77, 120].into_iter().enumerate() {
        if kill_after(&env, &backfill, after).await {
            killed += 1;
        }
        assert_database_intact(&env);
        // The broker keeps changing between crashes, as a live one does: those changes carry
        // a fresh last_modified_date, past the backfill's range, for the live sync to pull.
        env.broker.with_data(|d| {
            let key = natural_key(
                Entity::Customers,
                d.table(Entity::Customers).records().nth(i * 7).unwrap(),
            );
            d.modify(
                Entity::Customers,
                &key,
                json!({"kyc_status_id": format!("v{i}")}),
                Timestamp::now(),
            );
        });
    }
    assert!(killed >= 4, "only {killed} kills landed mid-run");
    let resumable = env.count("SELECT count(*) FROM backfills WHERE done_until > since");
    assert!(
        resumable > 0,
        "no backfill slice survived the crashes: nothing to resume from"
    );
    run_to_end(&env, &backfill);
    run_to_end(&env, &["sync"]);
    env.assert_store_equals_broker();
    assert_database_intact(&env);
    let unfinished = env.count("SELECT count(*) FROM backfills WHERE finished_at IS NULL");
    assert_eq!(unfinished, 0, "a backfill lane was left unfinished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_sync_then_restart_loses_and_duplicates_nothing() {
    let env = Env::start(data(), Paging::PageNumber, connector()).await;
    env.broker.set_delay(Duration::from_millis(3));
    let mut killed = 0;
    // Each run resumes from the cursors the previous ones committed, so these points fall in
    // customers, customers, transactions, transactions and trading activity respectively.
    for after in [3_u64, 17, 31, 46, 64] {
        if kill_after(&env, &["sync"], after).await {
            killed += 1;
        }
        assert_database_intact(&env);
        assert_cursor_covers_store(&env);
    }
    assert!(killed >= 4, "only {killed} kills landed mid-run");
    run_to_end(&env, &["sync"]);
    env.assert_store_equals_broker();
    for entity in Entity::ALL {
        assert!(
            env.cursor(entity).is_some(),
            "{entity} has no cursor after a clean sync"
        );
    }
}
