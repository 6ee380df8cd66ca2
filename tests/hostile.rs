//! Bad input end to end: a broker that answers with HTML, nothing, an error envelope, invalid
//! UTF-8, a body of 10 MB, or a page that never ends. Each run fails with a message naming the
//! broker, the entity and the URL (its API key redacted); the cursor stays; every page committed
//! before the bad one is kept; and the next run, once the broker behaves, completes the store.
//!
//! Record-level trouble (a 40-digit amount, a 100 KB name) is not a page's: those records are
//! quarantined with their reasons and the rest of the page is stored.

mod support;

use std::process::Output;

use serde_json::{Value, json};
use support::*;
use t360_connector::model::Entity;
use t360_connector::sample_broker::RawAnswer;

const KEY: &str = "hostile-k3y-77aa";

/// A broker with 30 customers (synced) and 60 transactions served 10 a page, behind an API
/// key in the query string.
async fn hostile_env(paging: Paging) -> Env {
    let env = Env::start(
        dataset(30),
        paging,
        Connector {
            per_page: 10,
            max_retry_time: "1s",
            ..Connector::default()
        },
    )
    .await;
    let key_file = env.dir.path().join("key");
    std::fs::write(&key_file, KEY).unwrap();
    env.write_connector(&Connector {
        per_page: 10,
        max_retry_time: "1s",
        rest_extra: format!(
            "[rest.auth]\ntype = \"api_key\"\nquery = \"apikey\"\nkey_file = {:?}\n",
            key_file.display().to_string()
        ),
        ..Connector::default()
    });
    env.broker.require("?apikey", KEY);
    env.sync_entity(Entity::Customers)
        .await
        .expect("customers sync");
    env
}

fn sync_transactions(env: &Env) -> Output {
    env.binary()
        .args(["sync", "--broker", BROKER, "--entity", "transactions"])
        .output()
        .unwrap()
}

fn json_answer(body: impl Into<Vec<u8>>) -> RawAnswer {
    RawAnswer {
        status: 200,
        content_type: "application/json",
        content_encoding: None,
        body: body.into(),
    }
}

/// `{"data": [` and then 64 MiB of spaces, gzipped.
fn gzip_bomb() -> Vec<u8> {
    use std::io::Write;
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(b"{\"data\": [").unwrap();
    let spaces = vec![b' '; 1 << 20];
    for _ in 0..64 {
        encoder.write_all(&spaces).unwrap();
    }
    encoder.finish().unwrap()
}

/// The broker's own page `page` of transactions in pages of `per_page`, as it serves it (the
/// API key goes along for the envs that require it).
async fn broker_page(env: &Env, per_page: u32, page: u32) -> Value {
    let url = format!(
        "{}/api/v1/forex/transactions?per_page={per_page}&page={page}&last_modified_from=1970-01-01T00:00:00Z&apikey={KEY}",
        env.broker.base_url()
    );
    let body = reqwest::get(url).await.unwrap().text().await.unwrap();
    serde_json::from_str(&body).unwrap()
}

async fn first_page(env: &Env) -> Value {
    broker_page(env, 10, 1).await
}

/// Runs a transactions sync whose second page gets `bad` (each time it is asked for), or
/// every request after the first if `forever`, and checks what the operator and the store
/// see; then lets the broker behave.
fn assert_fails_cleanly(
    env: &Env,
    what: &str,
    expected: &str,
    bad: impl Fn(u64) -> RawAnswer + Send + Sync + 'static,
    forever: bool,
) {
    let start = env.broker.requests(Entity::Transactions);
    env.broker
        .answer_with(Entity::Transactions, move |n, query| {
            let hostile = if forever {
                n > start + 1
            } else {
                query.get("page").map(String::as_str) == Some("2")
            };
            hostile.then(|| bad(n))
        });
    let out = sync_transactions(env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{what}: the run succeeded");
    let error = stderr
        .lines()
        .rfind(|l| l.contains(expected))
        .unwrap_or_else(|| panic!("{what}: no error saying `{expected}` in:\n{stderr}"));
    for part in [
        "acme/transactions",
        "/api/v1/forex/transactions?",
        "apikey=REDACTED",
    ] {
        assert!(
            error.contains(part),
            "{what}: `{part}` missing from: {error}"
        );
    }
    assert!(
        !stderr.contains(KEY),
        "{what}: the API key leaked: {stderr}"
    );
    assert!(
        error.len() < 2_000,
        "{what}: the error carries the body's bulk ({} bytes)",
        error.len()
    );
    assert_eq!(
        env.cursor(Entity::Transactions),
        None,
        "{what}: the cursor moved past an unread page"
    );
    // The first page was committed before the bad one and is kept, exactly as served.
    let stored = env.rows(Entity::Transactions);
    let truth = env.truth(Entity::Transactions);
    assert_eq!(stored.len(), 10, "{what}: the page before the bad one");
    for (key, row) in &stored {
        assert_eq!(Some(row), truth.get(key), "{what}: {key}");
    }

    env.broker.answer_with(Entity::Transactions, |_, _| None);
    let out = sync_transactions(env);
    assert!(
        out.status.success(),
        "{what}: the broker behaves again, yet: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same(
        Entity::Transactions,
        &env.rows(Entity::Transactions),
        &env.truth(Entity::Transactions),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_page_fails_the_run_by_name_and_loses_nothing() {
    // Page numbers: the bad answer is the one to `page=2`, however often it is asked for.
    let cases: Vec<(&str, &str, RawAnswer)> = vec![
        (
            "HTML from a proxy",
            "body is not JSON",
            RawAnswer {
                status: 200,
                content_type: "text/html",
                content_encoding: None,
                body: b"<html><body><h1>502 Bad Gateway</h1></body></html>".to_vec(),
            },
        ),
        ("an empty body", "body is not JSON", json_answer("")),
        (
            "a 200 with an error envelope",
            "HTTP 200 with an error in the body",
            json_answer(
                json!({"error": {"code": "DB_TIMEOUT", "message": "replica timed out"}, "data": []})
                    .to_string(),
            ),
        ),
        (
            "a 200 with a status envelope",
            "HTTP 200 with an error in the body",
            json_answer(json!({"status": "error", "message": "try later"}).to_string()),
        ),
        (
            "an empty page short of its own total",
            "an empty page, yet the page says more remain",
            json_answer(json!({"data": [], "meta": {"total": 60}}).to_string()),
        ),
        (
            "a body that is not a page",
            "no record array at `/data`",
            json_answer(json!({"message": "Internal Server Error"}).to_string()),
        ),
        (
            "invalid UTF-8",
            "body is not JSON",
            json_answer(b"{\"data\": [{\"transaction_id\": \"\xff\xfe\"}], \"meta\": {}}".to_vec()),
        ),
        (
            "a string of 10 MB",
            "larger than 8 MiB",
            json_answer(
                json!({"data": [{"transaction_id": "x".repeat(10 << 20)}], "meta": {}}).to_string(),
            ),
        ),
        (
            // 64 MiB of spaces in 64 KiB of gzip: the limit holds for what it decodes to.
            "a gzip bomb",
            "larger than 8 MiB",
            RawAnswer {
                status: 200,
                content_type: "application/json",
                content_encoding: Some("gzip"),
                body: gzip_bomb(),
            },
        ),
    ];
    let env = hostile_env(Paging::PageNumber).await;
    for (what, expected, bad) in cases {
        // A fresh start for each: no cursor, nothing stored.
        let db = rusqlite::Connection::open(env.database()).unwrap();
        db.execute_batch(
            "DELETE FROM transactions; DELETE FROM checkpoints WHERE entity = 'transactions';",
        )
        .unwrap();
        drop(db);
        assert_fails_cleanly(&env, what, expected, move |_| bad.clone(), false);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_never_ends_is_detected_not_followed() {
    // The same page for every page number (the broker ignores `page`), and the same records
    // with a new cursor every time (only the repeat can tell).
    for (what, paging) in [
        ("a repeated page", Paging::PageNumber),
        ("an endless next_cursor", Paging::Cursor),
    ] {
        let env = hostile_env(paging).await;
        let mut body = first_page(&env).await;
        body["meta"]["total"] = json!(1_000_000);
        let answer = move |n: u64| {
            let mut body = body.clone();
            if paging == Paging::Cursor {
                body["meta"]["next_cursor"] = json!(format!("loop-{n}"));
            }
            json_answer(body.to_string())
        };
        let requests = env.broker.requests(Entity::Transactions);
        assert_fails_cleanly(&env, what, "the page it served before", answer, true);
        // A few repeats of it and the recovery run's pages: no more.
        assert!(
            env.broker.requests(Entity::Transactions) - requests < 20,
            "{what}: followed for {} requests",
            env.broker.requests(Entity::Transactions) - requests
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_that_cycles_is_detected_not_followed() {
    let env = hostile_env(Paging::Cursor).await;
    let page = first_page(&env).await;
    let start = env.broker.requests(Entity::Transactions);
    // a → b → a → …, each answer with a different record: only the cursors repeat.
    let records: Vec<Value> = page["data"].as_array().unwrap().clone();
    env.broker.answer_with(Entity::Transactions, move |n, _| {
        let i = (n - start) as usize % records.len();
        let cursor = if n % 2 == 0 { "a" } else { "b" };
        let body = json!({"data": [records[i]], "meta": {"next_cursor": cursor}});
        Some(json_answer(body.to_string()))
    });
    let out = sync_transactions(&env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("was already followed: the broker's cursor loops")
            && stderr.contains("acme/transactions")
            && stderr.contains("apikey=REDACTED"),
        "{stderr}"
    );
    assert!(env.broker.requests(Entity::Transactions) - start < 10);
    assert_eq!(env.cursor(Entity::Transactions), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_quarantined_by_name_and_the_rest_stored() {
    let env = hostile_env(Paging::PageNumber).await;
    let page = first_page(&env).await;
    let mut bad = page.clone();
    let records = bad["data"].as_array_mut().unwrap();
    // A 40-digit amount (parsed exactly, then refused: no decimal holds it) and a name of
    // 100 KB; the JSON number is spliced in as text, as a broker would send it.
    let huge_id = records[1]["transaction_id"].as_str().unwrap().to_owned();
    records[1]["amount"] = json!("__AMOUNT__");
    let long_id = records[2]["transaction_id"].as_str().unwrap().to_owned();
    records[2]["currency"] = json!("E".repeat(100_000));
    let body = bad
        .to_string()
        .replace("\"__AMOUNT__\"", "1234567890123456789012345678901234567890");
    let start = env.broker.requests(Entity::Transactions);
    env.broker.answer_with(Entity::Transactions, move |n, _| {
        (n == start + 1).then(|| json_answer(body.clone()))
    });
    let out = env
        .binary()
        .args(["sync", "--broker", BROKER, "--entity", "transactions"])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let quarantined = env.quarantined(Entity::Transactions);
    let reasons = |key: &str| {
        quarantined
            .iter()
            .find(|(k, _)| k.contains(key))
            .map(|(_, r)| r.join("; "))
            .unwrap_or_else(|| panic!("{key} not quarantined: {quarantined:?}"))
    };
    assert!(
        reasons(&huge_id).contains("amount"),
        "{}",
        reasons(&huge_id)
    );
    assert!(
        reasons(&long_id).contains("currency"),
        "{}",
        reasons(&long_id)
    );
    let line = stderr
        .lines()
        .find(|l| l.contains("Records quarantined"))
        .unwrap_or_else(|| panic!("no quarantine line in: {stderr}"));
    // The broker and entity from the run's span, the URL from the page.
    for part in ["broker=acme", "entity=transactions", "apikey=REDACTED"] {
        assert!(line.contains(part), "`{part}` missing from: {line}");
    }
    assert!(line.len() < 4_000, "the line carries the record's bulk");
    // Everything else of the window is stored.
    let stored = env.rows(Entity::Transactions);
    let truth = env.truth(Entity::Transactions);
    assert_eq!(stored.len(), truth.len() - 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warnings_beside_records_pass_when_error_envelopes_are_off() {
    let env = Env::start(
        dataset(30),
        Paging::PageNumber,
        Connector {
            per_page: 10,
            rest_extra: "[rest.paging]\nerror_envelope = false\n".into(),
            ..Connector::default()
        },
    )
    .await;
    env.sync_entity(Entity::Customers).await.unwrap();
    let mut page = first_page(&env).await;
    page["errors"] = json!([{"warning": "field `tag` is deprecated"}]);
    let start = env.broker.requests(Entity::Transactions);
    env.broker.answer_with(Entity::Transactions, move |n, _| {
        (n == start + 1).then(|| json_answer(page.to_string()))
    });
    env.sync_entity(Entity::Transactions)
        .await
        .expect("warnings in `errors` are not an error here");
    assert_same(
        Entity::Transactions,
        &env.rows(Entity::Transactions),
        &env.truth(Entity::Transactions),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_last_page_served_again_or_left_out_ends_the_window_where_configured() {
    // A broker that answers a page past the end with the last page again (Django's
    // `get_page`), and one that leaves the record array out of an empty page, with
    // `missing_is_empty`: both end the window, and the store is complete.
    let env = Env::start(
        dataset(30),
        Paging::PageNumber,
        Connector {
            per_page: 7,
            rest_extra: "[rest.paging]\ntotal = \"/meta/none\"\nmissing_is_empty = true\n".into(),
            ..Connector::default()
        },
    )
    .await;
    env.sync_entity(Entity::Customers).await.unwrap();
    // 60 transactions in pages of 7: page 9 holds the last 4.
    let last = broker_page(&env, 7, 9).await;
    assert_eq!(last["data"].as_array().unwrap().len(), 4);
    env.broker
        .answer_with(Entity::Transactions, move |_, query| {
            let page: u64 = query.get("page")?.parse().ok()?;
            (page >= 10).then(|| json_answer(last.to_string()))
        });
    env.sync_entity(Entity::Transactions)
        .await
        .expect("a repeated short page is the end");
    assert_same(
        Entity::Transactions,
        &env.rows(Entity::Transactions),
        &env.truth(Entity::Transactions),
    );
    // An empty page as `{}` for trading activity.
    env.broker.answer_with(Entity::TradingActivity, |_, query| {
        let page: u64 = query.get("page")?.parse().ok()?;
        (page >= 10).then(|| json_answer("{}"))
    });
    env.sync_entity(Entity::TradingActivity)
        .await
        .expect("with missing_is_empty, `{}` is an empty page");
    assert_same(
        Entity::TradingActivity,
        &env.rows(Entity::TradingActivity),
        &env.truth(Entity::TradingActivity),
    );
}
