//! The daemon (`t360-connector run`) as systemd runs it: schedules, no overlap, SIGTERM and
//! SIGHUP, readiness, `/healthz` and `/metrics`.

mod support;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use jiff::Timestamp;
use serde_json::{Value, json};
use support::*;
use t360_connector::model::Entity;

/// Every entity every second.
const EVERY_SECOND: &str = "[schedule]\ncustomers = \"* * * * * *\"\ntransactions = \"* * * * * *\"\ntrading_activity = \"* * * * * *\"\n";

fn every_second() -> Connector {
    Connector {
        tail: EVERY_SECOND.into(),
        ..Connector::default()
    }
}

fn new_customer(id: &str) -> Value {
    let now = Timestamp::now().to_string();
    json!({"customer_id": id, "signup_date": now, "affiliate_id": "IB1", "last_modified_date": now})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_picks_up_broker_changes_within_one_interval() {
    let env = Env::start(dataset(50), Paging::Cursor, every_second()).await;
    let port = env.daemon_settings("");
    let daemon = env.start_daemon(port, &[]);
    // At start, a never-synced entity catches up at once.
    assert!(
        eventually(Duration::from_secs(10), || env
            .rows(Entity::Customers)
            .len()
            == 50)
        .await,
        "the first sync did not happen: {}",
        daemon.logs()
    );
    env.broker
        .with_data(|d| d.put(Entity::Customers, new_customer("ARRIVED")));
    // One interval is a second; allow for the window's whole-second end and a busy machine.
    assert!(
        eventually(Duration::from_secs(4), || env
            .rows(Entity::Customers)
            .contains_key("ARRIVED"))
        .await,
        "a new customer was not picked up: {}",
        daemon.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_sync_is_never_overlapped_and_its_ticks_are_counted() {
    let connector = Connector {
        per_page: 20,
        ..every_second()
    };
    let env = Env::start(dataset(60), Paging::Cursor, connector).await;
    // Every page takes 500 ms: a customers run (3 pages) outlasts its one-second interval.
    env.broker.set_delay(Duration::from_millis(500));
    let port = env.daemon_settings("");
    let daemon = env.start_daemon(port, &[]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let runs = assert_runs_never_overlap(&env, "entity = 'customers'");
    assert!(runs >= 2, "too few runs to judge: {runs}");
    let (_, metrics) = daemon.get("/metrics").await.expect("metrics");
    let skipped = metric(&metrics, "t360_schedule_ticks_skipped_total", "customers");
    assert!(skipped >= 1.0, "no skipped tick counted:\n{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_sync_then_restart_loses_nothing() {
    let connector = Connector {
        per_page: 25,
        ..every_second()
    };
    let env = Env::start(dataset(400), Paging::PageNumber, connector).await;
    env.broker.set_delay(Duration::from_millis(50));
    let port = env.daemon_settings("");
    let mut daemon = env.start_daemon(port, &[]);
    assert!(
        eventually(Duration::from_secs(10), || env
            .broker
            .requests(Entity::Customers)
            >= 3)
        .await
    );
    daemon.signal("TERM");
    let status = daemon
        .exit(Duration::from_secs(10))
        .await
        .expect("the daemon did not stop within its grace");
    assert!(
        status.success(),
        "exit status {status:?}: {}",
        daemon.logs()
    );
    let logs = daemon.logs();
    assert!(logs.contains("Daemon stopped."), "{logs}");
    let interrupted = env.count("SELECT count(*) FROM runs WHERE outcome = 'interrupted'");
    assert!(interrupted >= 1, "no run was stopped mid-window: {logs}");
    assert_eq!(
        env.count("SELECT count(*) FROM runs WHERE outcome = 'running'"),
        0,
        "a run was left open"
    );

    let _again = env.start_daemon(port, &[]);
    assert!(
        eventually(Duration::from_secs(20), || {
            Entity::ALL
                .iter()
                .all(|e| env.rows(*e).len() == env.truth(*e).len())
        })
        .await,
        "the restarted daemon did not finish the job"
    );
    env.assert_store_equals_broker();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_adds_a_broker_and_removes_another() {
    let env = Env::start(dataset(30), Paging::Cursor, every_second()).await;
    let port = env.daemon_settings("");
    let daemon = env.start_daemon(port, &[]);
    assert!(
        eventually(Duration::from_secs(10), || env
            .rows(Entity::Customers)
            .len()
            == 30)
        .await
    );

    // A second broker appears, the first goes away, and a third file is broken.
    let acme = std::fs::read_to_string(env.connector_file()).unwrap();
    env.add_connector(
        "beta",
        &acme.replace("broker = \"acme\"", "broker = \"beta\""),
    );
    env.add_connector(
        "broken",
        "kind = \"rest\"\n[rest]\nbase_url = \"ftp://nowhere\"\n",
    );
    std::fs::remove_file(env.connector_file()).unwrap();
    daemon.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || env
            .rows_of("beta", Entity::Customers)
            .len()
            == 30)
        .await,
        "the added broker did not start: {}",
        daemon.logs()
    );
    // acme's workers stop; a run in flight may finish, then nothing more.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let acme_runs = env.count("SELECT count(*) FROM runs WHERE broker = 'acme'");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.count("SELECT count(*) FROM runs WHERE broker = 'acme'"),
        acme_runs,
        "the removed broker still runs"
    );
    let logs = daemon.logs();
    assert!(
        logs.contains("broken.toml") && logs.contains("rest.base_url"),
        "the broken file was not reported: {logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_health_match_the_store() {
    let env = Env::start(dataset(80), Paging::Cursor, every_second()).await;
    let port = env.daemon_settings("");
    let daemon = env.start_daemon(port, &[]);
    assert!(
        eventually(Duration::from_secs(10), || env
            .rows(Entity::Transactions)
            .len()
            == 160)
        .await
    );
    // Stop the broker's changes from racing the comparison: no new records arrive, so the counters
    // stay put once every entity has run.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (status, metrics) = daemon.get("/metrics").await.expect("metrics");
    assert_eq!(status, 200);
    for entity in Entity::ALL {
        let stored = metric(&metrics, "t360_records_stored_total", entity.as_str());
        assert_eq!(
            stored,
            env.rows(entity).len() as f64,
            "{entity}:\n{metrics}"
        );
    }
    assert!(metric(&metrics, "t360_runs_total", "customers") >= 2.0);
    assert!(
        metrics.contains(
            "t360_http_requests_total{broker=\"acme\",entity=\"customers\",status=\"200\"}"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("t360_cursor_lag_seconds{broker=\"acme\",entity=\"customers\"}"),
        "{metrics}"
    );

    let (status, body) = daemon.get("/healthz").await.expect("healthz");
    assert_eq!(status, 200, "{body}");
    let health: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["status"], "ok");
    let connectors = health["connectors"].as_array().unwrap();
    assert_eq!(connectors.len(), 3, "{body}");
    assert!(
        connectors
            .iter()
            .all(|c| c["last_success"].is_string() && c["broker"] == "acme"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_watchdog_reach_systemd() {
    let env = Env::start(dataset(10), Paging::Cursor, every_second()).await;
    let port = env.daemon_settings("");
    let socket_path = env.dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _daemon = env.start_daemon(
        port,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    );
    let mut seen = String::new();
    let mut buffer = [0u8; 4096];
    while !(seen.contains("READY=1") && seen.contains("WATCHDOG=1") && seen.contains("STATUS=")) {
        let n = socket
            .recv(&mut buffer)
            .expect("no notification within 10 s");
        seen.push_str(&String::from_utf8_lossy(&buffer[..n]));
        seen.push('\n');
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_broker_entity_and_run_id() {
    let env = Env::start(dataset(10), Paging::Cursor, Connector::default()).await;
    let out = env
        .binary()
        .args(["--log-format", "json", "sync"])
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let finished: Vec<Value> = stderr
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .filter(|v| v["fields"]["message"] == "Sync finished.")
        .collect();
    assert_eq!(finished.len(), 3, "{stderr}");
    for line in finished {
        let span = &line["span"];
        assert_eq!(span["broker"], "acme", "{line}");
        assert!(
            span["entity"].is_string() && span["run_id"].is_number(),
            "{line}"
        );
    }
}

/// Asserts that no two finished runs matching `filter` (an SQL condition) overlapped in time;
/// returns how many there were.
fn assert_runs_never_overlap(env: &Env, filter: &str) -> usize {
    let conn = rusqlite::Connection::open(env.database()).unwrap();
    let sql = format!(
        "SELECT started_at, finished_at FROM runs WHERE finished_at IS NOT NULL AND {filter} ORDER BY started_at"
    );
    let mut stmt = conn.prepare(&sql).unwrap();
    let runs: Vec<(String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for pair in runs.windows(2) {
        let finished: Timestamp = pair[0].1.parse().unwrap();
        let next_started: Timestamp = pair[1].0.parse().unwrap();
        assert!(next_started >= finished, "runs overlapped: {pair:?}");
    }
    runs.len()
}

/// The value of `name{broker="acme",entity="<entity>",…}` in a Prometheus text page, summed
/// over the other labels.
fn metric(page: &str, name: &str, entity: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.starts_with(&format!("{name}{{")) && l.contains(&format!("entity=\"{entity}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_run_is_caught_up_at_start_and_a_recent_one_is_not() {
    // A yearly schedule: without catch-up nothing would run for months.
    let yearly = Connector {
        tail: "[schedule]\ncustomers = \"0 0 1 1 *\"\ntransactions = \"0 0 1 1 *\"\ntrading_activity = \"0 0 1 1 *\"\n".into(),
        ..Connector::default()
    };
    let env = Env::start(dataset(20), Paging::Cursor, yearly).await;
    let port = env.daemon_settings("");
    let mut daemon = env.start_daemon(port, &[]);
    assert!(
        eventually(Duration::from_secs(10), || env
            .rows(Entity::Transactions)
            .len()
            == 40)
        .await,
        "a never-synced entity was not caught up: {}",
        daemon.logs()
    );
    daemon.signal("TERM");
    daemon.exit(Duration::from_secs(10)).await.expect("stopped");
    let runs = env.count("SELECT count(*) FROM runs");
    // Restarted: the last success is newer than the last fire time (1 January), so no run.
    let _again = env.start_daemon(port, &[]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.count("SELECT count(*) FROM runs"),
        runs,
        "a run that was not due happened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_limit_holds_and_a_failing_broker_stalls_no_other() {
    let connector = Connector {
        per_page: 10,
        ..every_second()
    };
    let env = Env::start(dataset(40), Paging::Cursor, connector).await;
    env.broker.set_delay(Duration::from_millis(100));
    // A second broker whose API is down for good.
    let down = std::fs::read_to_string(env.connector_file())
        .unwrap()
        .replace("broker = \"acme\"", "broker = \"down\"")
        .replace(&env.broker.base_url(), "http://127.0.0.1:9");
    env.add_connector("down", &down);
    let port = env.daemon_settings("max_concurrent_syncs = 1");
    let daemon = env.start_daemon(port, &[]);
    assert!(
        eventually(Duration::from_secs(20), || env
            .rows(Entity::TradingActivity)
            .len()
            == 80)
        .await,
        "the healthy broker was stalled: {}",
        daemon.logs()
    );
    // Never two runs at once, across brokers and entities.
    assert_runs_never_overlap(&env, "1 = 1");
    // …while the broken broker keeps failing on its own schedule.
    assert!(
        eventually(Duration::from_secs(15), || env.count(
            "SELECT count(*) FROM runs WHERE broker = 'down' AND outcome = 'failed'"
        ) >= 1)
        .await,
        "the failing broker never ran: {}",
        daemon.logs()
    );
    assert_runs_never_overlap(&env, "1 = 1");
}

/// Every `t360_…` metric name in the dashboard's queries (panel targets and template variables).
fn dashboard_metrics(value: &Value, names: &mut std::collections::BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                match (key.as_str(), v) {
                    ("expr" | "query", Value::String(text)) => {
                        for (at, _) in text.match_indices("t360_") {
                            let name: String = text[at..]
                                .chars()
                                .take_while(|c| {
                                    c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_'
                                })
                                .collect();
                            names.insert(name);
                        }
                    }
                    _ => dashboard_metrics(v, names),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| dashboard_metrics(v, names)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_grafana_dashboard_queries_is_exported() {
    let dashboard: Value =
        serde_json::from_str(include_str!("../contrib/grafana/t360-connector.json")).unwrap();
    let mut names = std::collections::BTreeSet::new();
    dashboard_metrics(&dashboard, &mut names);
    assert!(names.len() >= 10, "{names:?}");
    for name in &names {
        let base = name.trim_end_matches("_bucket");
        assert!(
            t360_connector::telemetry::ALL.contains(&base),
            "the dashboard queries {name}, which telemetry does not define"
        );
    }
    // A daemon that syncs and reconciles every few seconds exports every one of them.
    let connector = Connector {
        tail: format!("{EVERY_SECOND}\n[reconcile]\nschedule = \"*/2 * * * * *\"\ndays = 2\n"),
        ..Connector::default()
    };
    let env = Env::start(dataset(20), Paging::Cursor, connector).await;
    let port = env.daemon_settings("");
    let daemon = env.start_daemon(port, &[]);
    let mut last = String::new();
    let mut missing: Vec<&String> = names.iter().collect();
    for _ in 0..100 {
        if let Some((_, metrics)) = daemon.get("/metrics").await {
            missing = names
                .iter()
                .filter(|n| !metrics.contains(n.as_str()))
                .collect();
            last = metrics;
        }
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(missing.is_empty(), "not exported: {missing:?}\n{last}");
}
