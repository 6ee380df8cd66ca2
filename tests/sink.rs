//! Delivery to the Track360 ingestion API (a mock with its own validation and faults): at
//! least once, nothing lost, refused records quarantined with the API's reasons.

mod support;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::track360::{CLIENT_SECRET, Ingestion};
use support::*;
use t360_connector::model::Entity;

/// An env whose settings send records to `ingestion` with `kind` (`track360` or `both`).
async fn env_with(data: Dataset, ingestion: &Ingestion, kind: &str, extra: &str) -> Env {
    let env = Env::start(data, Paging::Cursor, Connector::default()).await;
    let secret = env.dir.path().join("t360.secret");
    std::fs::write(&secret, CLIENT_SECRET).unwrap();
    env.write_settings(&ingestion.settings(kind, &secret, extra));
    env
}

fn as_rows(entity: Entity, records: BTreeMap<String, Value>) -> BTreeMap<String, Row> {
    records
        .into_iter()
        .map(|(k, v)| (k, row_of(entity, &v)))
        .collect()
}

/// The mock holds exactly the broker's valid records, field for field.
fn assert_delivered_equals_broker(env: &Env, ingestion: &Ingestion) {
    for entity in Entity::ALL {
        assert_same(
            entity,
            &as_rows(entity, ingestion.records(entity)),
            &env.truth(entity),
        );
    }
}

fn invalid_data() -> Dataset {
    Dataset::generate(&DatasetSpec {
        customers: 200,
        transactions: 400,
        activity: 400,
        invalid_every: 20,
        ..DatasetSpec::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_track360_sink_delivers_exactly_the_brokers_data() {
    let ingestion = Ingestion::start(1000, Duration::from_secs(3600)).await;
    let env = env_with(invalid_data(), &ingestion, "track360", "batch_size = 60").await;
    env.sync().await.expect("sync");
    assert_delivered_equals_broker(&env, &ingestion);
    // Locally: no entity rows, but the quarantine and the cursors.
    assert_eq!(env.count("SELECT count(*) FROM customers"), 0);
    assert!(env.count("SELECT count(*) FROM quarantine") > 0);
    for entity in Entity::ALL {
        assert!(env.cursor(entity).is_some(), "{entity} has no cursor");
    }
    let (_, oversized, largest, _, _) = ingestion.manners();
    assert_eq!(oversized, 0);
    assert!(largest <= 60, "a batch of {largest} records was posted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_smaller_than_the_apis_batch_are_joined_into_full_posts() {
    // The broker serves 100 records a page, the API takes 300 a request: every post but a
    // window's last carries 300, so the request budget buys all the records it can.
    let ingestion = Ingestion::start(1000, Duration::from_secs(3600)).await;
    let env = env_with(dataset(700), &ingestion, "track360", "batch_size = 300").await;
    env.sync_entity(Entity::Customers).await.expect("sync");
    assert_eq!(ingestion.records(Entity::Customers).len(), 700);
    let (_, oversized, largest, _, _) = ingestion.manners();
    assert_eq!((oversized, largest), (0, 300));
    assert_eq!(
        ingestion.posts(),
        3,
        "700 records in posts of 300, 300 and 100"
    );
    assert!(env.cursor(Entity::Customers).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_sinks_keep_the_same_records() {
    let ingestion = Ingestion::start(1000, Duration::from_secs(3600)).await;
    let env = env_with(invalid_data(), &ingestion, "both", "").await;
    env.sync().await.expect("sync");
    assert_delivered_equals_broker(&env, &ingestion);
    env.assert_store_equals_broker();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_api_refuses_are_quarantined_with_its_reasons_and_the_rest_delivered() {
    let ingestion = Ingestion::start(1000, Duration::from_secs(3600)).await;
    let env = env_with(dataset(100), &ingestion, "track360", "").await;
    let refused: Vec<String> = env.broker.with_data(|d| {
        d.table(Entity::Transactions)
            .records()
            .step_by(37)
            .map(|r| natural_key(Entity::Transactions, r))
            .collect()
    });
    for key in &refused {
        ingestion.refuse(key, "amount exceeds the account's limit");
    }
    env.sync().await.expect("sync");
    let quarantined = env.quarantined(Entity::Transactions);
    assert_eq!(quarantined.len(), refused.len());
    for key in &refused {
        let reasons = &quarantined[key];
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("track360") && r.contains("exceeds")),
            "{reasons:?}"
        );
    }
    let delivered = ingestion.records(Entity::Transactions);
    assert_eq!(delivered.len(), 200 - refused.len());
    assert!(refused.iter().all(|k| !delivered.contains_key(k)));

    // Track360 fixed its side: a retry delivers them and empties the quarantine.
    ingestion.accept_all();
    let out = env.binary().args(["quarantine", "retry"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.count("SELECT count(*) FROM quarantine"), 0);
    assert_delivered_equals_broker(&env, &ingestion);

    // Purge needs a filter or --all.
    let out = env.binary().args(["quarantine", "purge"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--all"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_and_the_rate_limit_leave_the_data_exact() {
    let ingestion = Ingestion::start(25, Duration::from_secs(3600)).await;
    ingestion.set_faults(0.10, 0.10);
    ingestion.set_rate_limit(40, Duration::from_secs(1));
    let env = env_with(
        dataset(150),
        &ingestion,
        "track360",
        "batch_size = 25\nrate_limit = \"40/s\"",
    )
    .await;
    env.sync().await.expect("sync through the faults");
    assert_delivered_equals_broker(&env, &ingestion);
    let (throttled, oversized, largest, _, _) = ingestion.manners();
    assert_eq!(throttled, 0, "the rate limit was exceeded");
    assert_eq!((oversized, largest <= 25), (0, true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_moves_no_checkpoint() {
    let ingestion = Ingestion::start(1000, Duration::from_secs(3600)).await;
    ingestion.set_down(true);
    let env = env_with(
        dataset(20),
        &ingestion,
        "track360",
        "max_retry_time = \"2s\"",
    )
    .await;
    let started = Instant::now();
    let error = env
        .sync_entity(Entity::Customers)
        .await
        .expect_err("delivery must fail");
    assert!(error.to_string().contains("503"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(
        env.cursor(Entity::Customers),
        None,
        "the cursor moved over undelivered records"
    );
    assert!(
        env.quarantined(Entity::Customers).is_empty(),
        "valid records were quarantined"
    );
    ingestion.set_down(false);
    env.sync().await.expect("sync once the API is back");
    assert_delivered_equals_broker(&env, &ingestion);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_replaced_mid_delivery() {
    let ingestion = Ingestion::start(1000, Duration::from_secs(3600)).await;
    let env = env_with(dataset(100), &ingestion, "track360", "batch_size = 10").await;
    let revoker = ingestion.clone();
    let watcher = tokio::spawn(async move {
        while revoker.posts() < 5 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        revoker.revoke_tokens();
    });
    env.sync().await.expect("sync");
    watcher.await.unwrap();
    let (_, _, _, issued, unauthorized) = ingestion.manners();
    assert!(
        issued >= 2 && unauthorized >= 1,
        "issued {issued}, refused {unauthorized}"
    );
    assert_delivered_equals_broker(&env, &ingestion);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_delivery_then_restart_ends_with_exactly_the_brokers_data() {
    let ingestion = Ingestion::start(1000, Duration::from_secs(3600)).await;
    ingestion.set_delay(Duration::from_millis(15));
    let env = env_with(dataset(300), &ingestion, "track360", "batch_size = 20").await;
    let mut killed = 0;
    for after in [3_u64, 11, 19, 28] {
        let start = ingestion.posts();
        let mut child = env
            .binary()
            .arg("sync")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            if ingestion.posts() >= start + after {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                killed += 1;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the sync neither progressed nor ended"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert!(killed >= 3, "only {killed} kills landed mid-delivery");
    let out = env.binary().arg("sync").output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_delivered_equals_broker(&env, &ingestion);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_overlaps_fetching_the_next_page() {
    // Both sides answer slowly; while a page is being posted, the next one is being fetched.
    let ingestion = Ingestion::start(1000, Duration::from_secs(3600)).await;
    ingestion.set_delay(Duration::from_millis(50));
    let env = env_with(dataset(100), &ingestion, "track360", "batch_size = 20").await;
    env.write_connector(&Connector {
        per_page: 20,
        ..Connector::default()
    });
    // The probe runs when a post's 50 ms are up: a fetch started with it (100 ms) is still on.
    env.broker.set_delay(Duration::from_millis(100));
    let broker = env.broker.clone();
    ingestion.set_probe(move || broker.in_flight() > 0);
    env.sync_entity(Entity::Customers).await.expect("sync");
    assert_eq!(ingestion.records(Entity::Customers).len(), 100);
    assert!(
        ingestion.overlapped() >= 2,
        "pages were posted and fetched one after the other ({} overlaps in {} posts)",
        ingestion.overlapped(),
        ingestion.posts()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_422_whose_indexes_do_not_fit_the_batch_fails_instead_of_guessing() {
    // A server counting from one would make "record 20 of 20" refer to nothing: quarantining
    // the neighbour, or posting the batch forever, would both be wrong.
    let ingestion = Ingestion::start(1000, Duration::from_secs(3600)).await;
    ingestion.set_index_base(1);
    let env = env_with(dataset(20), &ingestion, "track360", "batch_size = 20").await;
    let last = env.broker.with_data(|d| {
        natural_key(
            Entity::Customers,
            d.table(Entity::Customers).records().last().unwrap(),
        )
    });
    ingestion.refuse(&last, "refused");
    let started = Instant::now();
    let error = env
        .sync_entity(Entity::Customers)
        .await
        .expect_err("must fail");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the batch was posted again and again"
    );
    assert!(
        error.to_string().contains("cannot tell which records"),
        "{error}"
    );
    assert!(
        env.quarantined(Entity::Customers).is_empty(),
        "a record was quarantined on a guess"
    );
    assert_eq!(env.cursor(Entity::Customers), None);
}
