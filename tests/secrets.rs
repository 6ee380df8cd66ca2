//! No configured secret, nor a token issued for one, appears in anything the daemon prints or
//! serves: every CLI command and a daemon, at `trace` level (every crate's logs, text and
//! JSON), with faults that make requests fail, retry and print their URLs, and revoked tokens.
//!
//! The secrets: a bearer token (environment), an OAuth2 client secret (file), an API key in
//! the query (file) and in a header (environment), a basic password (file), the Track360
//! sink's client secret (file), and a PostgreSQL password (file) when PostgreSQL is available.

mod support;

use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use support::track360::{CLIENT_SECRET as T360_SECRET, Ingestion};
use support::*;
use t360_connector::model::Entity;
use t360_connector::sample_broker::{Faults, OAuthClient};

const BEARER: &str = "bearer-t0ken-5e1f";
const OAUTH_SECRET: &str = "oauth-s3cret-a2b9";
const QUERY_KEY: &str = "query-k3y-9d8c";
const HEADER_KEY: &str = "header-k3y-41d0";
const PASSWORD: &str = "basic-pa55-77c3";
const PG_PASSWORD: &str = "pg-pa55-0b6e";

fn file(env: &Env, name: &str, secret: &str) -> String {
    let path = env.dir.path().join(name);
    std::fs::write(&path, format!("{secret}\n")).unwrap();
    format!("{:?}", path.display().to_string())
}

/// A copy of the standard connector under another broker name, with `auth` appended.
fn variant(env: &Env, broker: &str, auth: &str) {
    let text = std::fs::read_to_string(env.connector_file())
        .unwrap()
        .replace("broker = \"acme\"", &format!("broker = \"{broker}\""));
    env.add_connector(broker, &format!("{text}\n{auth}\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_appears_in_any_output_of_any_command() {
    let data = Dataset::generate(&DatasetSpec {
        customers: 40,
        transactions: 80,
        activity: 80,
        invalid_every: 9,
        ..DatasetSpec::default()
    });
    let env = Env::start_with_token(
        data,
        Paging::Cursor,
        Connector {
            per_page: 10,
            max_retry_time: "4s",
            rest_extra: "[rest.auth]\ntype = \"bearer\"\ntoken_env = \"ACME_TOKEN\"\n".into(),
            tail: "[schedule]\ncustomers = \"* * * * * *\"\ntransactions = \"* * * * * *\"\ntrading_activity = \"* * * * * *\"\n".into(),
            ..Connector::default()
        },
        Some(BEARER.into()),
    )
    .await;
    // The broker wants the bearer token on its standard API: the variants below are refused
    // (401), which is more error text to search.
    env.broker.enable_oauth(OAuthClient {
        client_id: "sample-client".into(),
        client_secret: OAUTH_SECRET.into(),
        ttl: Duration::from_secs(2),
    });
    let legacy = env
        .legacy_connector()
        .replace("per_page = 500", "per_page = 10")
        .replace(
            "client_secret_env = \"LEGACY_BROKER_CLIENT_SECRET\"",
            &format!("client_secret_file = {}", file(&env, "oauth", OAUTH_SECRET)),
        );
    env.add_connector("legacy-broker", &legacy);
    let query_file = file(&env, "query-key", QUERY_KEY);
    variant(
        &env,
        "keyed",
        &format!("[rest.auth]\ntype = \"api_key\"\nquery = \"apikey\"\nkey_file = {query_file}"),
    );
    variant(
        &env,
        "headed",
        "[rest.auth]\ntype = \"api_key\"\nheader = \"X-Api-Key\"\nkey_env = \"HEADED_KEY\"",
    );
    let password_file = file(&env, "password", PASSWORD);
    variant(
        &env,
        "basic",
        &format!(
            "[rest.auth]\ntype = \"basic\"\nusername = \"ops\"\npassword_file = {password_file}"
        ),
    );
    // The variants replaced the bearer table of the standard file: drop the duplicate.
    for broker in ["keyed", "headed", "basic"] {
        let path = env
            .dir
            .path()
            .join("connectors")
            .join(format!("{broker}.toml"));
        let text = std::fs::read_to_string(&path).unwrap().replacen(
            "[rest.auth]\ntype = \"bearer\"\ntoken_env = \"ACME_TOKEN\"\n",
            "",
            1,
        );
        std::fs::write(&path, text).unwrap();
    }
    let postgres = std::env::var("T360_TEST_POSTGRES_URL").ok();
    match &postgres {
        Some(url) => {
            // Trust authentication takes any password; the table is missing, so the query
            // fails and prints where it went.
            let pg_file = file(&env, "pg-password", PG_PASSWORD);
            env.add_connector(
                "replica",
                &format!(
                    "broker = \"replica\"\nkind = \"postgres\"\nentities = [\"customers\"]\n\n\
                     [sql]\nurl = \"{url}\"\ntls = \"disable\"\npassword_file = {pg_file}\n\
                     max_retry_time = \"1s\"\n\n[sql.customers]\ntable = \"t360_no_such_table\"\n"
                ),
            );
        }
        None => eprintln!(
            "SKIPPED (PostgreSQL): T360_TEST_POSTGRES_URL is unset; the SQL password is not searched for"
        ),
    }
    let ingestion = Ingestion::start(1000, Duration::from_secs(2)).await;
    ingestion.set_faults(0.1, 0.1);
    let t360_file = env.dir.path().join("t360.secret");
    std::fs::write(&t360_file, T360_SECRET).unwrap();
    let port = env.daemon_settings(&ingestion.settings("both", &t360_file, ""));

    env.broker.set_faults(Faults {
        server_errors: 0.1,
        throttles: 0.05,
        resets: 0.05,
        truncations: 0.05,
        ..Faults::default()
    });
    let broker = env.broker.clone();
    env.broker
        .after_request(Entity::Transactions, 3, move |_| broker.revoke_tokens());

    let secret_env = [("ACME_TOKEN", BEARER), ("HEADED_KEY", HEADER_KEY)];
    let mut captured = String::new();
    let commands: Vec<Vec<&str>> = vec![
        vec!["check"],
        vec!["sync"],
        vec!["--log-format", "json", "sync", "--broker", "keyed"],
        vec!["sync", "--broker", "legacy-broker"],
        vec!["status"],
        vec![
            "backfill",
            "--broker",
            BROKER,
            "--since",
            "2026-01-01",
            "--until",
            "2026-01-04",
        ],
        vec![
            "backfill",
            "--broker",
            "basic",
            "--since",
            "2026-01-01",
            "--until",
            "2026-01-02",
        ],
        vec![
            "reconcile",
            "--broker",
            BROKER,
            "--from",
            "2026-01-01",
            "--to",
            "2026-01-10",
        ],
        vec![
            "reconcile",
            "--broker",
            "legacy-broker",
            "--from",
            "2026-01-01",
            "--to",
            "2026-01-03",
            "--format",
            "json",
        ],
        vec!["quarantine", "list"],
        vec!["quarantine", "retry"],
        vec!["quarantine", "purge", "--broker", "keyed"],
        vec!["status"],
    ];
    for args in &commands {
        if args.contains(&"keyed") {
            env.broker.fail_next(Entity::Customers, 2, 503);
        }
        let out = env
            .binary()
            .args(args)
            .envs(secret_env)
            .env("RUST_LOG", "trace")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        captured.push_str(&String::from_utf8_lossy(&out.stdout));
        captured.push_str(&String::from_utf8_lossy(&out.stderr));
    }

    // The daemon: a few seconds of schedules at trace, its endpoints, its shutdown.
    let mut envs: Vec<(&str, &str)> = secret_env.to_vec();
    envs.push(("RUST_LOG", "trace"));
    let mut daemon = env.start_daemon(port, &envs);
    tokio::time::sleep(Duration::from_secs(4)).await;
    ingestion.revoke_tokens();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for path in ["/metrics", "/healthz"] {
        let (status, body) = daemon.get(path).await.expect("the daemon answers");
        assert_eq!(status, 200, "{path}: {body}");
        captured.push_str(&body);
    }
    daemon.signal("TERM");
    assert!(daemon.exit(Duration::from_secs(20)).await.is_some());
    captured.push_str(&daemon.logs());

    // The search has something to search: the faults printed failed requests.
    for trace in [
        "Request failed; retrying",
        "apikey=REDACTED",
        "t360_records_pulled_total",
        "legacy-broker",
    ] {
        assert!(captured.contains(trace), "no `{trace}` in the output");
    }
    if postgres.is_some() {
        assert!(
            captured.contains("t360_no_such_table"),
            "the replica's error is missing"
        );
    }
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("ops:{PASSWORD}"));
    for secret in [
        BEARER,
        OAUTH_SECRET,
        QUERY_KEY,
        HEADER_KEY,
        PASSWORD,
        basic.as_str(),
        PG_PASSWORD,
        T360_SECRET,
        // Tokens issued for the secrets: the sample broker's and the ingestion API's.
        "tok-",
        "ingest-token-",
    ] {
        if let Some(at) = captured.find(secret) {
            let line = captured[..at].rfind('\n').map_or(0, |i| i + 1);
            let end = captured[at..].find('\n').map_or(captured.len(), |i| at + i);
            panic!("`{secret}` leaked: {}", &captured[line..end]);
        }
    }
}
