//! The command line as an operator meets it: `check` names file, key and problem; exit codes;
//! `status`; bad flags.

mod support;

use std::process::Output;

use support::*;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_accepts_a_valid_connector() {
    let env = Env::start(dataset(5), Paging::Cursor, Connector::default()).await;
    let out = env.binary().arg("check").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("ok  acme"), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_file_the_key_and_the_problem() {
    let env = Env::start(dataset(5), Paging::Cursor, Connector::default()).await;
    let dir = env.dir.path().join("connectors");
    let cases = [
        // (file content, expected fragments of the one line naming the problem)
        (
            "kind = \"rest\"\nschedul = \"*/5 * * * *\"\n",
            vec!["typo.toml", "unknown field `schedul`"],
        ),
        (
            "kind = \"rest\"\n[rest]\nbase_url = \"https://b.example\"\nper_page = \"five hundred\"\n",
            vec!["typo.toml", "rest.per_page", "invalid type"],
        ),
        (
            "kind = \"rest\"\n[rest]\nbase_url = \"https://b.example\"\nper_page = 1000\n",
            vec![
                "typo.toml",
                "key `rest.per_page`",
                "between 1 and 500, found 1000",
            ],
        ),
        (
            "kind = \"rest\"\n[rest]\nbase_url = \"http://b.example\"\n",
            vec!["typo.toml", "key `rest.base_url`", "plain http is refused"],
        ),
        (
            "kind = \"rest\"\ntimezone = \"Mars/Olympus\"\n[rest]\nbase_url = \"https://b.example\"\n",
            vec!["typo.toml", "key `timezone`", "Mars/Olympus"],
        ),
        (
            "kind = \"rest\"\n[rest]\nbase_url = \"https://b.example\"\n[rest.auth]\ntype = \"bearer\"\ntoken_env = \"T360_TEST_UNSET_TOKEN\"\n",
            vec![
                "typo.toml",
                "key `rest.auth`",
                "T360_TEST_UNSET_TOKEN",
                "not set",
            ],
        ),
        (
            "kind = \"rest\"\n[rest]\nbase_url = \"https://b.example\"\n[sync]\nlookback = \"an hour\"\n",
            vec!["typo.toml", "key `sync.lookback`", "an hour"],
        ),
        (
            "kind = \"rest\"\n[rest\nbase_url = 1\n",
            vec!["typo.toml", "line 2"],
        ),
    ];
    for (content, expected) in cases {
        std::fs::write(dir.join("typo.toml"), content).unwrap();
        let out = env.binary().arg("check").output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "check must fail with exit code 2 for {content:?}"
        );
        let err = stderr(&out);
        let line = err
            .lines()
            .find(|l| l.contains("typo.toml"))
            .unwrap_or_default();
        for fragment in expected {
            assert!(
                line.contains(fragment),
                "{fragment:?} not in {line:?} (for {content:?})"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_every_problem_of_a_file_at_once() {
    let env = Env::start(dataset(5), Paging::Cursor, Connector::default()).await;
    let file = env.dir.path().join("connectors").join("many.toml");
    std::fs::write(
        &file,
        "kind = \"soap\"\ntimezone = \"Nowhere\"\n[rest]\nbase_url = \"ftp://x\"\nper_page = 0\n",
    )
    .unwrap();
    let out = env.binary().arg("check").output().unwrap();
    let err = stderr(&out);
    for key in ["`kind`", "`timezone`", "`rest.base_url`", "`rest.per_page`"] {
        assert!(err.contains(key), "{key} not reported: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_override_with_a_bad_value_is_named() {
    let env = Env::start(dataset(5), Paging::Cursor, Connector::default()).await;
    let out = env
        .binary()
        .arg("check")
        .env("T360__SYNC__SETTLE", "later")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("sync.settle") && err.contains("later"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_then_status_shows_each_entity() {
    let env = Env::start(dataset(40), Paging::Cursor, Connector::default()).await;
    let out = env.binary().arg("sync").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = env.binary().arg("status").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(table.starts_with("BROKER"), "{table}");
    for entity in ["customers", "transactions", "trading_activity"] {
        let row = table
            .lines()
            .find(|l| l.starts_with("acme") && l.split_whitespace().nth(1) == Some(entity))
            .unwrap_or_else(|| panic!("no {entity} row in {table}"));
        assert!(
            !row.contains(" - "),
            "{entity} has no cursor or success: {row}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_sync_exits_non_zero_with_a_one_line_reason() {
    let env = Env::start(dataset(5), Paging::Cursor, Connector::default()).await;
    env.broker
        .fail_next(t360_connector::model::Entity::Customers, 100, 500);
    let out = env
        .binary()
        .args(["sync", "--entity", "customers"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let last = stderr(&out).lines().last().unwrap_or_default().to_owned();
    assert!(
        last.starts_with("error: ") && last.contains("HTTP 500"),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_flags_are_named() {
    let env = Env::start(dataset(5), Paging::Cursor, Connector::default()).await;
    let out = env
        .binary()
        .args(["backfill", "--broker", "acme", "--since", "last tuesday"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--since: `last tuesday`"),
        "{}",
        stderr(&out)
    );
    let out = env
        .binary()
        .args(["sync", "--broker", "nobody"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("no connector `nobody`"),
        "{}",
        stderr(&out)
    );
    let out = env
        .binary()
        .args(["sync", "--entity", "orders"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2)); // clap's usage error
    assert!(
        stderr(&out).contains("unknown entity `orders`"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_every_problem_of_a_sql_connector() {
    let env = Env::start(dataset(5), Paging::Cursor, Connector::default()).await;
    let file = env.dir.path().join("connectors").join("replica.toml");
    std::fs::write(
        &file,
        r#"kind = "postgres"
timezone = "Europe/Athens"
[sql]
url = "postgres://reader:hunter2@db.example/crm"
tls = "sometimes"
max_connections = 100
[sql.customers]
table = "customers; DROP TABLE customers"
[sql.trading_activity]
table = "mt5_deals"
cursor = "Time stamp"
[sql.trading_activity.deals]
lots_on = "sideways"
day_start = "25:00"
"#,
    )
    .unwrap();
    let out = env.binary().arg("check").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    for key in [
        "`sql.url`",
        "`sql.tls`",
        "`sql.max_connections`",
        "`sql.customers.table`",
        "`sql.transactions`",
        "`sql.trading_activity.cursor`",
        "`sql.trading_activity.deals.lots_on`",
        "`sql.trading_activity.deals.day_start`",
    ] {
        assert!(err.contains(key), "{key} not reported: {err}");
    }
    assert!(!err.contains("hunter2"), "the password is echoed: {err}");
}
