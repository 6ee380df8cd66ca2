//! The delta-sync guarantees (SPEC §4–§5), each against the sample broker over loopback HTTP
//! and a real SQLite file.

mod support;

use jiff::{SignedDuration, Timestamp};
use serde_json::json;
use support::*;
use t360_connector::model::Entity;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_sync_stores_exactly_the_brokers_records() {
    let env = Env::start(dataset(300), Paging::Cursor, Connector::default()).await;
    env.sync().await.expect("sync");
    env.assert_store_equals_broker();
    // Every entity's cursor sits at the window's end.
    for entity in Entity::ALL {
        assert!(env.cursor(entity).is_some(), "{entity} has no cursor");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_numbers_without_a_cursor_reach_every_page() {
    let env = Env::start(dataset(300), Paging::PageNumber, Connector::default()).await;
    env.sync().await.expect("sync");
    env.assert_store_equals_broker();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ties_across_page_boundaries_lose_nothing() {
    // 1,234 customers on one last_modified_date, paged 100 at a time: ties span 13 pages.
    let data = Dataset::generate(&DatasetSpec {
        customers: 1234,
        transactions: 0,
        activity: 0,
        tie_group: 10_000,
        ..DatasetSpec::default()
    });
    for paging in [Paging::Cursor, Paging::PageNumber] {
        let env = Env::start(data.clone(), paging, Connector::default()).await;
        env.sync().await.expect("sync");
        assert_eq!(env.rows(Entity::Customers).len(), 1234, "{paging:?}");
        env.assert_store_equals_broker();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_tied_at_the_cursor_that_arrive_later_are_read() {
    // No lookback at all: only the inclusive lower bound catches a record stamped exactly at
    // the cursor that becomes visible after the sync (estuary #5205, airbyte #44402).
    let connector = Connector {
        lookback: "0s",
        ..Connector::default()
    };
    let env = Env::start(dataset(50), Paging::Cursor, connector).await;
    env.sync_entity(Entity::Customers)
        .await
        .expect("first sync");
    let cursor = env.cursor(Entity::Customers).expect("cursor");
    env.broker.with_data(|d| {
        d.put(
            Entity::Customers,
            json!({"customer_id": "LATE-TIE", "signup_date": "2026-01-01T00:00:00Z",
                   "affiliate_id": "IB1", "last_modified_date": cursor}),
        )
    });
    next_second().await;
    env.sync_entity(Entity::Customers)
        .await
        .expect("second sync");
    assert!(env.rows(Entity::Customers).contains_key("LATE-TIE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_modified_while_paging_by_page_number_are_not_lost() {
    // The broker modifies a record on page 1 while page 4 is being fetched: it leaves the window
    // (its new last_modified_date is past the window's end) and every later record moves one
    // place back, so page-number paging would skip the record on each page boundary.
    let env = Env::start(dataset(500), Paging::PageNumber, Connector::default()).await;
    let first_on_page_one = env.broker.with_data(|d| {
        natural_key(
            Entity::Customers,
            d.table(Entity::Customers).records().next().unwrap(),
        )
    });
    let moved = first_on_page_one.clone();
    env.broker.after_request(Entity::Customers, 3, move |d| {
        assert!(d.modify(
            Entity::Customers,
            &moved,
            json!({"kyc_status_id": "approved-late"}),
            Timestamp::now()
        ));
    });
    env.sync_entity(Entity::Customers).await.expect("sync");

    // Everything whose latest state is inside the synced window is stored as the broker has it.
    let cursor: Timestamp = env.cursor(Entity::Customers).unwrap().parse().unwrap();
    let mut truth = env.truth(Entity::Customers);
    truth.retain(|_, row| {
        row["last_modified_date"]
            .as_deref()
            .unwrap()
            .parse::<Timestamp>()
            .unwrap()
            <= cursor
    });
    let mut rows = env.rows(Entity::Customers);
    rows.remove(&first_on_page_one); // its old state may be stored; its new one is the next window's
    assert_same(Entity::Customers, &rows, &truth);

    // The next sync picks up the modified record's new state.
    next_second().await;
    env.sync_entity(Entity::Customers)
        .await
        .expect("second sync");
    assert_eq!(
        env.rows(Entity::Customers)[&first_on_page_one]["kyc_status_id"].as_deref(),
        Some("approved-late")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heavy_churn_while_paging_by_page_number_loses_nothing() {
    // After each of the first eight pages, more records leave the window — at one point more
    // than a whole page of them — from positions behind and ahead of the pager.
    let env = Env::start(dataset(1500), Paging::PageNumber, Connector::default()).await;
    for (request, count) in [
        (1, 3),
        (2, 1),
        (3, 130),
        (4, 7),
        (5, 2),
        (6, 40),
        (7, 1),
        (8, 9),
    ] {
        env.broker
            .after_request(Entity::Customers, request, move |d| {
                let keys: Vec<String> = d
                    .table(Entity::Customers)
                    .records()
                    .skip(request as usize * 37)
                    .take(count)
                    .map(|r| natural_key(Entity::Customers, r))
                    .collect();
                for key in keys {
                    d.modify(
                        Entity::Customers,
                        &key,
                        json!({"sales_status_id": "moved"}),
                        Timestamp::now(),
                    );
                }
            });
    }
    env.sync_entity(Entity::Customers).await.expect("sync");
    env.assert_cursor_covers_store(BROKER, Entity::Customers);
    next_second().await;
    env.sync_entity(Entity::Customers)
        .await
        .expect("second sync");
    assert_same(
        Entity::Customers,
        &env.rows(Entity::Customers),
        &env.truth(Entity::Customers),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_ignores_the_cursor_parameter_is_paged_by_number() {
    let env = Env::start(dataset(250), Paging::IgnoredCursor, Connector::default()).await;
    env.sync().await.expect("sync");
    env.assert_store_equals_broker();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_serving_smaller_pages_than_asked_is_read_to_the_end() {
    // per_page = 100 is asked; the broker serves 30 and does not say so in `meta`.
    let env = Env::start(dataset(250), Paging::PageNumber, Connector::default()).await;
    env.broker.set_page_cap(Some(30));
    env.sync().await.expect("sync");
    env.assert_store_equals_broker();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_modified_while_paging_by_cursor_are_not_lost() {
    let env = Env::start(dataset(500), Paging::Cursor, Connector::default()).await;
    let keys: Vec<String> = env.broker.with_data(|d| {
        d.table(Entity::Customers)
            .records()
            .take(3)
            .map(|r| natural_key(Entity::Customers, r))
            .collect()
    });
    env.broker.after_request(Entity::Customers, 2, move |d| {
        for key in &keys {
            d.modify(
                Entity::Customers,
                key,
                json!({"leverage": "1:30"}),
                Timestamp::now(),
            );
        }
    });
    env.sync_entity(Entity::Customers).await.expect("sync");
    next_second().await;
    env.sync_entity(Entity::Customers)
        .await
        .expect("second sync");
    assert_same(
        Entity::Customers,
        &env.rows(Entity::Customers),
        &env.truth(Entity::Customers),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_records_inside_the_lookback_are_caught_and_older_ones_by_backfill() {
    let env = Env::start(dataset(100), Paging::Cursor, Connector::default()).await;
    env.sync().await.expect("first sync");
    let cursor: Timestamp = env.cursor(Entity::Transactions).unwrap().parse().unwrap();
    let customer = env.rows(Entity::Customers).into_keys().next().unwrap();
    let late = |id: &str, modified: Timestamp| {
        json!({"transaction_id": id, "customer_id": customer, "transaction_type": "deposit",
               "amount": "250.00", "currency": "EUR", "transaction_date": "2026-02-01T10:00:00Z",
               "status": "approved", "last_modified_date": modified.to_string()})
    };
    // Replica lag: a record stamped 20 minutes before the cursor shows up after the sync.
    let within = late("LATE-20M", cursor - SignedDuration::from_mins(20));
    // One stamped 3 hours before it: outside the 1 h lookback, for a backfill to repair.
    let beyond = late("LATE-3H", cursor - SignedDuration::from_hours(3));
    env.broker.with_data(|d| {
        d.put(Entity::Transactions, within);
        d.put(Entity::Transactions, beyond);
    });
    env.sync().await.expect("second sync");
    let rows = env.rows(Entity::Transactions);
    assert!(
        rows.contains_key("LATE-20M"),
        "late record inside the lookback was lost"
    );
    assert!(
        !rows.contains_key("LATE-3H"),
        "the lookback is 1 h; this record is older"
    );

    let since = (cursor - SignedDuration::from_hours(4)).to_string();
    env.backfill(&since, None).await.expect("backfill");
    env.assert_store_equals_broker();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn re_pulling_creates_no_duplicates() {
    let connector = Connector {
        lookback: "10000d",
        ..Connector::default()
    };
    let env = Env::start(dataset(200), Paging::Cursor, connector).await;
    env.sync().await.expect("sync");
    env.sync().await.expect("sync again, over the same window");
    env.backfill("2025-01-01", None)
        .await
        .expect("backfill over everything");
    env.assert_store_equals_broker();
    assert_eq!(env.count("SELECT count(*) FROM customers"), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_records_are_quarantined_with_every_reason_and_leave_when_fixed() {
    let data = Dataset::generate(&DatasetSpec {
        customers: 100,
        transactions: 200,
        activity: 200,
        invalid_every: 10,
        ..DatasetSpec::default()
    });
    let env = Env::start(data, Paging::Cursor, Connector::default()).await;
    env.sync().await.expect("sync");
    env.assert_store_equals_broker();

    let invalid = env.broker.with_data(|d| d.invalid.clone());
    for entity in Entity::ALL {
        let quarantined = env.quarantined(entity);
        let expected: std::collections::BTreeSet<&String> =
            invalid[entity as usize].iter().collect();
        assert_eq!(
            quarantined
                .keys()
                .collect::<std::collections::BTreeSet<_>>(),
            expected,
            "{entity}"
        );
    }
    // Both of a bad transaction's faults are named, not only the first.
    let (_, reasons) = env
        .quarantined(Entity::Transactions)
        .into_iter()
        .next()
        .unwrap();
    assert!(
        reasons.iter().any(|r| r.starts_with("currency")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.starts_with("transaction_type")),
        "{reasons:?}"
    );

    // The broker fixes a customer: it leaves quarantine and is stored.
    let fixed = invalid[0][0].clone();
    env.broker.with_data(|d| {
        d.modify(
            Entity::Customers,
            &fixed,
            json!({"country_code": "CY", "affiliate_id": "IB9"}),
            Timestamp::now() - SignedDuration::from_secs(1),
        );
        d.invalid[0].retain(|k| *k != fixed);
    });
    env.sync().await.expect("sync after the fix");
    assert!(!env.quarantined(Entity::Customers).contains_key(&fixed));
    env.assert_store_equals_broker();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_are_held_until_their_customer_arrives() {
    orphans_held(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfills_orphans_are_held_until_their_customer_arrives() {
    // A backfill decides at its merge, not page by page: the outcome must be the same.
    orphans_held(true).await;
}

async fn orphans_held(by_backfill: bool) {
    let env = Env::start(dataset(20), Paging::Cursor, Connector::default()).await;
    env.sync().await.expect("sync");
    let now = Timestamp::now() - SignedDuration::from_secs(2);
    env.broker.with_data(|d| {
        d.put(
            Entity::Transactions,
            json!({"transaction_id": "ORPHAN-1", "customer_id": "NEWCOMER", "transaction_type": "deposit",
                   "amount": "100.00", "currency": "USD", "transaction_date": "2026-03-01T09:00:00Z",
                   "status": "approved", "last_modified_date": now.to_string()}),
        );
        d.put(
            Entity::TradingActivity,
            json!({"date": "2026-03-01", "customer_id": "NEWCOMER", "instrument": "EURUSD",
                   "lots_traded": "1.50", "currency": "USD", "last_modified_date": now.to_string()}),
        );
    });
    // Transactions and activity only: the customer is not there yet.
    if by_backfill {
        env.backfill("2025-01-01", None).await.unwrap();
    } else {
        env.sync_entity(Entity::Transactions).await.unwrap();
        env.sync_entity(Entity::TradingActivity).await.unwrap();
    }
    assert_eq!(env.held(Entity::Transactions), vec!["ORPHAN-1"]);
    assert_eq!(env.held(Entity::TradingActivity).len(), 1);
    assert!(!env.rows(Entity::Transactions).contains_key("ORPHAN-1"));

    // The customer arrives: what was held is released into the store, nothing stays held.
    env.broker.with_data(|d| {
        d.put(
            Entity::Customers,
            json!({"customer_id": "NEWCOMER", "signup_date": "2026-03-01T08:00:00Z",
                   "affiliate_id": "IB1", "last_modified_date": now.to_string()}),
        )
    });
    env.sync_entity(Entity::Customers).await.unwrap();
    assert!(env.held(Entity::Transactions).is_empty());
    assert!(env.held(Entity::TradingActivity).is_empty());
    env.assert_store_equals_broker();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trading_activity_re_pulls_its_last_days() {
    // A broker recomputes yesterday's row without a fresh last_modified_date (older than the
    // lookback): only the re-pull of the last days picks the new numbers up.
    let connector = Connector {
        lookback: "0s",
        activity_repull_days: 3,
        ..Connector::default()
    };
    let env = Env::start(dataset(20), Paging::Cursor, connector).await;
    env.sync().await.expect("sync");
    let customer = env.rows(Entity::Customers).into_keys().next().unwrap();
    let yesterday = Timestamp::now() - SignedDuration::from_hours(30);
    env.broker.with_data(|d| {
        d.put(
            Entity::TradingActivity,
            json!({"date": "2026-11-24", "customer_id": customer, "instrument": "XAUUSD",
                   "lots_traded": "3.25", "commission": "12.50", "currency": "USD",
                   "last_modified_date": yesterday.to_string()}),
        )
    });
    env.sync().await.expect("second sync");
    env.assert_store_equals_broker();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_keeps_what_it_received_and_does_not_move_the_cursor() {
    let env = Env::start(dataset(300), Paging::Cursor, Connector::default()).await;
    // Page 1 answers; then the broker is down for longer than the retries last.
    let broker = env.broker.clone();
    env.broker.after_request(Entity::Customers, 1, move |_| {
        broker.fail_next(Entity::Customers, 50, 503)
    });
    let error = env
        .sync_entity(Entity::Customers)
        .await
        .expect_err("sync must fail");
    assert!(error.to_string().contains("503"), "{error}");
    assert_eq!(
        env.cursor(Entity::Customers),
        None,
        "cursor moved over a failed window"
    );
    assert_eq!(
        env.rows(Entity::Customers).len(),
        100,
        "the page received was not kept"
    );

    env.broker.fail_next(Entity::Customers, 0, 200);
    env.sync_entity(Entity::Customers)
        .await
        .expect("sync after the outage");
    assert_same(
        Entity::Customers,
        &env.rows(Entity::Customers),
        &env.truth(Entity::Customers),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_cannot_be_committed_fails_the_run_and_later_pages_wait() {
    // Page N commits while N+1 is fetched: a commit that fails must end the run (not leave the
    // fetching half waiting), keep the pages before it, commit none after it, and not move the
    // cursor.
    let connector = Connector {
        per_page: 10,
        ..Connector::default()
    };
    let env = Env::start(dataset(100), Paging::Cursor, connector).await;
    env.sync_entity(Entity::Customers).await.unwrap();
    // The 55th transaction by modification time: on page 6 of 20.
    let mut by_modified: Vec<(String, String)> = env
        .truth(Entity::Transactions)
        .into_iter()
        .map(|(key, row)| (row["last_modified_date"].clone().unwrap(), key))
        .collect();
    by_modified.sort();
    let refused = by_modified[54].1.clone();
    let db = rusqlite::Connection::open(env.database()).unwrap();
    db.execute_batch(&format!(
        "CREATE TRIGGER refuse BEFORE INSERT ON transactions WHEN NEW.transaction_id = '{refused}'
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;"
    ))
    .unwrap();
    let run = env.sync_entity(Entity::Transactions);
    let error = tokio::time::timeout(std::time::Duration::from_secs(30), run)
        .await
        .expect("the run ended")
        .expect_err("the run failed");
    assert!(error.to_string().contains("refused by the test"), "{error}");
    assert_eq!(env.cursor(Entity::Transactions), None);
    let stored: std::collections::BTreeSet<String> =
        env.rows(Entity::Transactions).into_keys().collect();
    let before: std::collections::BTreeSet<String> =
        by_modified[..50].iter().map(|(_, k)| k.clone()).collect();
    assert_eq!(
        stored, before,
        "exactly the five pages before the refused one"
    );

    db.execute_batch("DROP TRIGGER refuse;").unwrap();
    env.sync_entity(Entity::Transactions).await.unwrap();
    assert_same(
        Entity::Transactions,
        &env.rows(Entity::Transactions),
        &env.truth(Entity::Transactions),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_never_moves_the_live_cursor_backwards() {
    let env = Env::start(dataset(100), Paging::Cursor, Connector::default()).await;
    env.sync().await.expect("sync");
    let before = env.cursor(Entity::Customers).unwrap();
    env.backfill("2025-12-01", Some("2026-01-01T01:00:00Z"))
        .await
        .expect("backfill");
    assert_eq!(env.cursor(Entity::Customers).unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_come_from_the_environment_and_a_wrong_one_fails_cleanly() {
    let connector = Connector {
        rest_extra: "[rest.auth]\ntype = \"bearer\"\ntoken_env = \"T360_TEST_ACME_TOKEN\"\n".into(),
        ..Connector::default()
    };
    // SAFETY: the variable is only read by this test's connector.
    unsafe { std::env::set_var("T360_TEST_ACME_TOKEN", "s3cret-token") };
    let env = Env::start_with_token(
        dataset(30),
        Paging::Cursor,
        connector.clone(),
        Some("s3cret-token".into()),
    )
    .await;
    env.sync().await.expect("sync with the right token");
    env.assert_store_equals_broker();

    let wrong = Env::start_with_token(
        dataset(30),
        Paging::Cursor,
        connector,
        Some("another".into()),
    )
    .await;
    let error = wrong
        .sync()
        .await
        .expect_err("a wrong token must fail")
        .to_string();
    assert!(error.contains("401"), "{error}");
    assert!(
        !error.contains("s3cret-token"),
        "the token leaked into a message: {error}"
    );
    assert_eq!(wrong.cursor(Entity::Customers), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_window_keeps_the_slices_it_finished_when_it_fails() {
    // A first sync from `start`, three days of history in one-day slices; the broker goes down
    // while the third slice is read. The first two days stay synced: the cursor moved past
    // them, and the next sync starts there instead of from the beginning.
    let connector = Connector {
        per_page: 500,
        ..Connector::default()
    };
    let mut data = Dataset::default();
    for day in 20..23 {
        for hour in 0..10 {
            let at = format!("2026-11-{day}T{hour:02}:30:00Z");
            data.put(
                Entity::Customers,
                json!({"customer_id": format!("D{day}-{hour}"), "signup_date": at,
                       "affiliate_id": "IB1", "last_modified_date": at}),
            );
        }
    }
    let env = Env::start(data, Paging::Cursor, connector).await;
    let file = env.connector_file();
    let text = std::fs::read_to_string(&file).unwrap().replace(
        "backfill_slice = \"1d\"",
        "backfill_slice = \"1d\"\nstart = \"2026-11-20\"",
    );
    std::fs::write(&file, text).unwrap();
    let broker = env.broker.clone();
    // One request a day-slice: 20 November, 21 November, then the broker answers 503.
    env.broker.after_request(Entity::Customers, 2, move |_| {
        broker.fail_next(Entity::Customers, 1000, 503)
    });
    env.sync_entity(Entity::Customers)
        .await
        .expect_err("the broker went down");
    let cursor: Timestamp = env
        .cursor(Entity::Customers)
        .expect("slices committed")
        .parse()
        .unwrap();
    assert!(
        cursor >= "2026-11-21T00:00:00Z".parse().unwrap(),
        "no slice kept: {cursor}"
    );
    env.assert_cursor_covers_store(BROKER, Entity::Customers);
}

#[test]
fn an_older_version_never_replaces_a_newer_one_stored_or_held() {
    // A backfill page fetched before a record changed commits after the sync that stored the
    // change: the newer state stays, for stored and for held records alike — whether the page
    // was upserted at once (a sync's) or staged and merged later (a backfill's).
    for staged in [false, true] {
        older_versions_lose(staged);
    }
}

fn older_versions_lose(staged: bool) {
    use t360_connector::state::Store;

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("t.db")).unwrap();
    let deposit = |status: &str, at: &str| deposit_json("T1", "LATER", status, at);
    let commit = |entity: Entity, records: &[serde_json::Value]| {
        let stats = store
            .commit_page(&page_of(entity, records, staged))
            .unwrap();
        store.merge_staged().unwrap();
        stats
    };
    // Held (its customer is unknown): newer, then older.
    commit(
        Entity::Transactions,
        &[deposit("approved", "2026-01-02T00:00:00Z")],
    );
    commit(
        Entity::Transactions,
        &[deposit("pending", "2026-01-01T12:00:00Z")],
    );
    let released = commit(Entity::Customers, &[customer_json("LATER")]);
    assert_eq!(released.released[Entity::Transactions as usize], 1);
    // Stored: older again, and within one page, newer then older.
    commit(
        Entity::Transactions,
        &[deposit("pending", "2026-01-01T06:00:00Z")],
    );
    commit(
        Entity::Transactions,
        &[
            deposit("approved", "2026-01-02T00:00:00Z"),
            deposit("rejected", "2026-01-01T18:00:00Z"),
        ],
    );

    let conn = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
    let status: String = conn
        .query_row(
            "SELECT status FROM transactions WHERE transaction_id = 'T1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        status, "approved",
        "an older version replaced the newer one (staged: {staged})"
    );
    let staged_left: i64 = conn
        .query_row("SELECT count(*) FROM staged_transactions", [], |r| r.get(0))
        .unwrap();
    assert_eq!(staged_left, 0, "merged rows leave the staging table");
}

#[test]
fn records_held_for_a_staged_customer_are_stored_when_it_is_merged() {
    // A sync's transaction arrives while its customer sits in a backfill's staging table: it
    // is held, and the merge that stores the customer releases it.
    use t360_connector::state::Store;

    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("t.db")).unwrap();
    store
        .commit_page(&page_of(Entity::Customers, &[customer_json("C1")], true))
        .unwrap();
    let deposit = deposit_json("T1", "C1", "approved", "2026-01-01T00:00:00Z");
    let stats = store
        .commit_page(&page_of(Entity::Transactions, &[deposit], false))
        .unwrap();
    assert_eq!(stats.held, 1, "the customer is not stored yet");
    assert_eq!(store.merge_staged().unwrap().stored, 1);
    let conn = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
    let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
    assert_eq!(count("SELECT count(*) FROM customers"), 1);
    assert_eq!(count("SELECT count(*) FROM transactions"), 1, "released");
    assert_eq!(count("SELECT count(*) FROM held"), 0);
}

#[test]
fn a_backfills_records_without_their_customer_are_held_when_merged() {
    // A backfill stages its records unchecked; the merge asks for their customers all at once
    // and holds those without one, as a sync's page would have. A staged row that no longer
    // validates (rules changed by an upgrade before the merge) goes to quarantine, not to the
    // store.
    use t360_connector::state::{Merged, Store};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let store = Store::open(&path).unwrap();
    let deposit =
        |id: &str, customer: &str| deposit_json(id, customer, "approved", "2026-01-01T00:00:00Z");
    store
        .commit_page(&page_of(
            Entity::Customers,
            &[customer_json("KNOWN")],
            false,
        ))
        .unwrap();
    // More orphans than the merge holds at a time, of fewer customers than orphans.
    let mut records = vec![deposit("T1", "LATER"), deposit("T2", "KNOWN")];
    records.extend((0..2500).map(|i| deposit(&format!("O{i}"), &format!("GONE-{}", i % 700))));
    let stats = store
        .commit_page(&page_of(Entity::Transactions, &records, true))
        .unwrap();
    assert_eq!(
        (stats.stored, stats.held),
        (2502, 0),
        "decided at the merge"
    );
    assert_eq!(
        store.merge_staged().unwrap(),
        Merged {
            stored: 1,
            held: 2501
        }
    );
    let conn = rusqlite::Connection::open(&path).unwrap();
    let keys = |sql: &str| -> Vec<String> {
        let mut stmt = conn.prepare(sql).unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(keys("SELECT transaction_id FROM transactions"), ["T2"]);
    let held = keys("SELECT record_key FROM held ORDER BY record_key");
    assert_eq!(held.len(), 2501);
    assert_eq!(held.last().map(String::as_str), Some("T1"));
    assert!(keys("SELECT transaction_id FROM staged_transactions").is_empty());

    conn.execute(
        "INSERT INTO staged_transactions (broker, transaction_id, customer_id, transaction_type,
             amount, currency, transaction_date, status)
         VALUES ('b', 'T9', 'NOBODY', 'deposit', 'ten', 'USD', '2026-01-01T00:00:00Z', 'approved')",
        [],
    )
    .unwrap();
    assert_eq!(store.merge_staged().unwrap(), Merged::default());
    assert_eq!(keys("SELECT record_key FROM quarantine"), ["T9"]);
    assert!(keys("SELECT transaction_id FROM staged_transactions").is_empty());
    assert_eq!(keys("SELECT transaction_id FROM transactions"), ["T2"]);

    // The customer arrives: the held record is stored.
    let stats = store
        .commit_page(&page_of(
            Entity::Customers,
            &[customer_json("LATER")],
            false,
        ))
        .unwrap();
    assert_eq!(stats.released[Entity::Transactions as usize], 1);
    assert_eq!(
        keys("SELECT transaction_id FROM transactions ORDER BY 1"),
        ["T1", "T2"]
    );
    assert_eq!(keys("SELECT record_key FROM held").len(), 2500);
}

#[test]
fn opening_the_store_leaves_a_running_backfills_staged_records_to_it() {
    // A `status` while a backfill runs must not merge under its feet (the merge holds the
    // write lock for as long as it takes, and the backfill's next commit would time out);
    // once no backfill runs, opening the store merges what was left staged.
    use t360_connector::state::Store;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let count = |table: &str| -> i64 {
        rusqlite::Connection::open(&path)
            .unwrap()
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap()
    };
    let backfill = Store::open(&path).unwrap();
    let staging = backfill
        .staging()
        .expect("the SQLite store has a staging lock");
    backfill
        .commit_page(&page_of(Entity::Customers, &[customer_json("C1")], true))
        .unwrap();

    drop(Store::open(&path).unwrap());
    assert_eq!(count("staged_customers"), 1, "left to the running backfill");
    assert_eq!(count("customers"), 0);

    // The backfill stops without merging (as a killed one would): the next open merges.
    drop(staging);
    drop(backfill);
    drop(Store::open(&path).unwrap());
    assert_eq!(count("staged_customers"), 0);
    assert_eq!(count("customers"), 1);
}

#[test]
fn a_staged_older_version_never_displaces_a_newer_held_one() {
    // A sync holds v2 of a transaction (its customer is not there yet); a backfill then stages
    // v1, older, waiting for the same customer. When the customer arrives, v2 is what is
    // stored: the older version must meet the newer in `held`, not delete it on the way.
    use t360_connector::state::Store;

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let store = Store::open(&path).unwrap();
    let commit = |entity: Entity, record: serde_json::Value, staged: bool| {
        store
            .commit_page(&page_of(entity, &[record], staged))
            .unwrap()
    };
    let deposit = |status: &str, at: &str| deposit_json("T1", "LATER", status, at);
    assert_eq!(
        commit(
            Entity::Transactions,
            deposit("approved", "2026-01-02T00:00:00Z"),
            false
        )
        .held,
        1
    );
    commit(
        Entity::Transactions,
        deposit("pending", "2026-01-01T00:00:00Z"),
        true,
    );
    store.merge_staged().unwrap();
    commit(Entity::Customers, customer_json("LATER"), false);
    let status: String = rusqlite::Connection::open(&path)
        .unwrap()
        .query_row(
            "SELECT status FROM transactions WHERE transaction_id = 'T1'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(status, "approved", "the older staged version won");
}

/// A page of broker `b`'s `records`, each valid, for the store to commit: staged as a
/// backfill's, or not.
/// A valid customer as a broker sends it.
fn customer_json(id: &str) -> serde_json::Value {
    json!({"customer_id": id, "signup_date": "2026-01-01T00:00:00Z", "affiliate_id": "IB1",
           "last_modified_date": "2026-01-01T00:00:00Z"})
}

/// A valid deposit of `customer`, with its status and when it was last modified.
fn deposit_json(id: &str, customer: &str, status: &str, modified: &str) -> serde_json::Value {
    json!({"transaction_id": id, "customer_id": customer, "transaction_type": "deposit",
           "amount": "10.00", "currency": "USD", "transaction_date": "2026-01-01T00:00:00Z",
           "status": status, "last_modified_date": modified})
}

fn page_of(
    entity: Entity,
    records: &[serde_json::Value],
    staged: bool,
) -> t360_connector::sink::PageBatch {
    use t360_connector::sink::{PageBatch, Progress, Valid};
    PageBatch {
        broker: "b".into(),
        entity,
        records: records
            .iter()
            .map(|r| Valid {
                record: t360_connector::validate::validate(entity, r).unwrap(),
            })
            .collect(),
        rejects: vec![],
        progress: Progress::None,
        stage_records: staged,
        keep_records: true,
        hold_orphans: true,
        fence: None,
    }
}
