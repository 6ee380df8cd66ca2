//! `reconcile` against the sample broker: a store damaged on purpose, and a broker changed
//! behind the delta cursor's back, reported exactly per day and per key, then repaired.

mod support;

use std::collections::BTreeSet;
use std::process::Output;

use serde_json::Value;
use support::{BROKER, Connector, Env, Paging, dataset};
use t360_connector::model::Entity;

const T: Entity = Entity::Transactions;

/// `reconcile` of the transactions of every day the data can have.
fn reconcile_command(env: &Env) -> std::process::Command {
    let mut cmd = env.binary();
    cmd.args([
        "reconcile",
        "--broker",
        BROKER,
        "--entity",
        "transactions",
        "--from",
        "2000-01-01",
        "--to",
        "2100-12-31",
    ]);
    cmd
}

async fn reconcile(env: &Env, extra: &[&str]) -> Output {
    let mut cmd = reconcile_command(env);
    cmd.args(["--format", "json"]).args(extra);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: stdout {} stderr {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn keys(report: &Value, what: &str) -> BTreeSet<String> {
    report[what]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["key"].as_str().unwrap().to_owned())
        .collect()
}

fn store(env: &Env) -> rusqlite::Connection {
    rusqlite::Connection::open(env.database()).unwrap()
}

/// Three valid transactions of valid customers, with their days.
fn three_keys(env: &Env) -> Vec<(String, String)> {
    env.truth(T)
        .iter()
        .take(3)
        .map(|(k, row)| {
            let day = row["transaction_date"].as_deref().unwrap()[..10].to_owned();
            (day, k.clone())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_reported_per_day_and_key_and_repair_makes_it_equal() {
    let env = Env::start(dataset(40), Paging::Cursor, Connector::default()).await;
    env.sync().await.unwrap();
    let out = reconcile(&env, &[]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let picked = three_keys(&env);
    let [(day1, deleted), (day2, damaged), (day3, behind)] =
        [picked[0].clone(), picked[1].clone(), picked[2].clone()];
    let db = store(&env);
    // A row lost from the store, an amount changed in it, and a row only in the store.
    db.execute(
        "DELETE FROM transactions WHERE broker = ?1 AND transaction_id = ?2",
        [BROKER, &deleted],
    )
    .unwrap();
    db.execute(
        "UPDATE transactions SET amount = '999999.99' WHERE broker = ?1 AND transaction_id = ?2",
        [BROKER, &damaged],
    )
    .unwrap();
    let stray_day = "2031-06-15";
    db.execute(
        "INSERT INTO transactions VALUES (?1, 'T-stray', (SELECT customer_id FROM customers LIMIT 1),
             'deposit', '5', 'EUR', '2031-06-15T10:00:00Z', 'approved', '2031-06-15T10:00:00Z')",
        [BROKER],
    )
    .unwrap();
    // The broker changes an amount without bumping last_modified_date: a delta sync never
    // sees it.
    env.broker.with_data(|d| {
        let mut record = d.table(T).get(&behind).unwrap().clone();
        record["amount"] = Value::String("4242.42".into());
        d.put(T, record);
    });
    env.sync().await.unwrap();
    assert_ne!(env.rows(T), env.truth(T), "a sync cannot repair this");

    let out = reconcile(&env, &[]).await;
    assert_eq!(out.status.code(), Some(3), "drift exits 3");
    let report = &json(&out)["reconciliations"][0]["before"];
    assert_eq!(keys(report, "missing"), BTreeSet::from([deleted.clone()]));
    assert_eq!(
        keys(report, "different"),
        BTreeSet::from([damaged.clone(), behind.clone()])
    );
    assert_eq!(keys(report, "gone"), BTreeSet::from(["T-stray".to_owned()]));
    for d in report["different"].as_array().unwrap() {
        assert_eq!(d["fields"], serde_json::json!(["amount"]), "{d}");
    }
    // Per day: counts and sums differ exactly on the days touched.
    let touched: BTreeSet<&str> = [day1.as_str(), day2.as_str(), day3.as_str(), stray_day].into();
    for day in report["days"].as_array().unwrap() {
        let name = day["day"].as_str().unwrap();
        let (b, s) = (&day["broker"], &day["store"]);
        if touched.contains(name) {
            assert_ne!(b, s, "{name} differs");
        } else {
            assert_eq!(b, s, "{name} is equal");
        }
        let count = |side: &Value| side["count"].as_u64().unwrap_or(0);
        let lost = u64::from(name == day1);
        let stray = u64::from(name == stray_day);
        assert_eq!(count(b) + stray, count(s) + lost, "{name}: counts");
    }

    let out = reconcile(&env, &["--repair"]).await;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}");
    let outcome = &json(&out)["reconciliations"][0];
    assert_eq!(outcome["repaired"]["resent"], 3, "{outcome}");
    assert_eq!(outcome["repaired"]["deleted"], 1, "{outcome}");
    assert_eq!(outcome["after"]["missing"].as_array().unwrap().len(), 0);
    env.assert_store_equals_broker();
    // The repair moved no cursor and the status shows it.
    let status = env.binary().arg("status").output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.contains("repaired"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_failing_mid_read_fails_the_reconciliation_and_writes_nothing() {
    let connector = Connector {
        per_page: 10,
        max_retry_time: "1s",
        ..Connector::default()
    };
    let env = Env::start(dataset(40), Paging::Cursor, connector).await;
    env.sync().await.unwrap();
    let picked = three_keys(&env);
    let deleted = &picked[0].1;
    store(&env)
        .execute(
            "DELETE FROM transactions WHERE broker = ?1 AND transaction_id = ?2",
            [BROKER, deleted],
        )
        .unwrap();
    let before = env.rows(T);
    // After the first page is served, the broker answers 503 to everything.
    let served = env.broker.requests(T);
    let broker = env.broker.clone();
    let fault = tokio::spawn(async move {
        while broker.requests(T) <= served {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        broker.fail_next(T, 10_000, 503);
    });
    let out = reconcile(&env, &["--repair"]).await;
    fault.await.unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("acme/transactions") && err.contains("503"),
        "{err}"
    );
    assert_eq!(env.rows(T), before, "nothing was written");
    let leftovers: Vec<String> = std::fs::read_dir(env.database().parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("reconcile-"))
        .collect();
    assert!(leftovers.is_empty(), "scratch files left: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_reconciles_on_schedule_and_auto_repair_restores_what_a_sync_cannot() {
    let connector = Connector {
        tail: "[schedule]\ncustomers = \"* * * * * *\"\ntransactions = \"* * * * * *\"\n\
               trading_activity = \"* * * * * *\"\n\
               [reconcile]\nschedule = \"*/2 * * * * *\"\ndays = 366\nauto_repair = true\n"
            .into(),
        ..Connector::default()
    };
    let env = Env::start(dataset(30), Paging::Cursor, connector).await;
    env.sync().await.unwrap();
    let picked = three_keys(&env);
    let lost = picked[0].1.clone();
    store(&env)
        .execute(
            "DELETE FROM transactions WHERE broker = ?1 AND transaction_id = ?2",
            [BROKER, &lost],
        )
        .unwrap();
    let port = env.daemon_settings("");
    let daemon = env.start_daemon(port, &[]);
    let repaired = support::eventually(std::time::Duration::from_secs(15), || {
        env.rows(T).contains_key(&lost)
    })
    .await;
    assert!(
        repaired,
        "the scheduled reconciliation did not restore {lost}"
    );
    env.assert_store_equals_broker();
    let (_, metrics) = daemon.get("/metrics").await.expect("metrics");
    assert!(
        metrics.contains("t360_reconcile_runs_total{broker=\"acme\",entity=\"transactions\",outcome=\"repaired\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "t360_reconcile_repaired_records_total{broker=\"acme\",entity=\"transactions\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        daemon.logs().contains("The store differs from the broker"),
        "a warning is logged"
    );
}

/// Peak RSS of `reconcile` over a broker of `customers` customers (and five times as many
/// transactions), with the store already equal to it.
async fn reconcile_peak_rss(customers: usize) -> u64 {
    let data = support::Dataset::generate(&support::DatasetSpec {
        customers,
        transactions: customers * 5,
        activity: 0,
        ..support::DatasetSpec::default()
    });
    let connector = Connector {
        per_page: 500,
        ..Connector::default()
    };
    let env = Env::start(data, Paging::Cursor, connector).await;
    env.sync().await.unwrap();
    let cmd = reconcile_command(&env);
    let usage = tokio::task::spawn_blocking(move || support::run_measured(cmd))
        .await
        .unwrap();
    let out = &usage.output;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // It compared every record: equal, and the daily counts add up to the broker's.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(": 0 missing, 0 different, 0 gone"), "{text}");
    let counted: usize = text
        .lines()
        .filter_map(|l| {
            l.split("broker")
                .nth(1)?
                .split("store")
                .next()?
                .trim()
                .parse::<usize>()
                .ok()
        })
        .sum();
    assert_eq!(counted, customers * 5, "{text}");
    usage.peak_rss_kib
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_range_is_compared_in_bounded_memory() {
    // 100× the records: held in memory they would add tens of MiB (a JSON record is about
    // 1 KiB as a value); read page by page into the scratch file they add nothing.
    let small = reconcile_peak_rss(60).await;
    let large = reconcile_peak_rss(6_000).await;
    assert!(
        large < small + 12 * 1024,
        "peak RSS grew from {small} KiB to {large} KiB for 100× the records"
    );
}
