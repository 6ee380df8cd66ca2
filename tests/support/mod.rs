//! Shared fixtures: a sample broker on loopback, a connector folder and state in a temporary
//! directory, and the comparison of the store with the broker's truth.
#![allow(dead_code)] // each test file uses its own subset

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;
use t360_connector::cli::{BackfillArgs, SyncArgs};
use t360_connector::commands;
use t360_connector::model::Entity;
pub use t360_connector::sample_broker::{Dataset, DatasetSpec, Paging, SampleBroker, natural_key};

pub mod measure;
pub mod replica;
pub mod track360;

/// The Track360 fields that hold money or lots (JSON numbers, exact decimals).
pub const DECIMAL_FIELDS: [&str; 6] = [
    "amount",
    "lots_traded",
    "volume_usd",
    "spread_cost",
    "commission",
    "pnl",
];

/// A row as text: column → value (NULL is `None`).
pub type Row = BTreeMap<String, Option<String>>;

/// How the test's connector file is written.
#[derive(Debug, Clone)]
pub struct Connector {
    pub per_page: u32,
    pub lookback: &'static str,
    pub settle: &'static str,
    pub activity_repull_days: i64,
    pub backfill_slice: &'static str,
    /// How long a request is retried before the run fails (short: failing tests end fast).
    pub max_retry_time: &'static str,
    /// Requests the connector may send (the guide's 1000/min would slow every test down).
    pub rate_limit: &'static str,
    /// Extra TOML appended to the `[rest]` table's end (e.g. an auth table).
    pub rest_extra: String,
    /// Extra TOML at the file's end (e.g. a `[schedule]` table).
    pub tail: String,
}

impl Default for Connector {
    fn default() -> Self {
        Connector {
            per_page: 100,
            lookback: "1h",
            settle: "0s",
            activity_repull_days: 0,
            backfill_slice: "1d",
            rate_limit: "5000/s",
            max_retry_time: "3s",
            rest_extra: String::new(),
            tail: String::new(),
        }
    }
}

pub const BROKER: &str = "acme";

/// One test's world: the sample broker, a config file and a state folder.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub broker: SampleBroker,
    pub config: PathBuf,
}

impl Env {
    pub async fn start(data: Dataset, paging: Paging, connector: Connector) -> Env {
        Self::start_with_token(data, paging, connector, None).await
    }

    pub async fn start_with_token(
        data: Dataset,
        paging: Paging,
        connector: Connector,
        token: Option<String>,
    ) -> Env {
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let broker = SampleBroker::start(addr, data, paging, token)
            .await
            .expect("sample broker");
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("connectors")).unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            "state_dir = \"state\"\nconnectors_dir = \"connectors\"\n",
        )
        .unwrap();
        let env = Env {
            dir,
            broker,
            config,
        };
        env.write_connector(&connector);
        env
    }

    pub fn write_connector(&self, c: &Connector) {
        let text = format!(
            r#"broker = "{BROKER}"
kind = "rest"
preset = "track360-standard"

[rest]
base_url = "{url}"
allow_http = true
per_page = {per_page}
timeout = "10s"
max_retry_time = "{max_retry_time}"
rate_limit = "{rate_limit}"
{rest_extra}

[sync]
lookback = "{lookback}"
settle = "{settle}"
activity_repull_days = {repull}
backfill_slice = "{slice}"
{tail}
"#,
            url = self.broker.base_url(),
            per_page = c.per_page,
            rest_extra = c.rest_extra,
            rate_limit = c.rate_limit,
            max_retry_time = c.max_retry_time,
            lookback = c.lookback,
            settle = c.settle,
            repull = c.activity_repull_days,
            slice = c.backfill_slice,
            tail = c.tail,
        );
        std::fs::write(self.connector_file(), text).unwrap();
    }

    pub fn connector_file(&self) -> PathBuf {
        self.dir
            .path()
            .join("connectors")
            .join(format!("{BROKER}.toml"))
    }

    pub fn database(&self) -> PathBuf {
        self.dir.path().join("state").join("t360-connector.db")
    }

    /// One delta sync of every entity, in process.
    pub async fn sync(&self) -> anyhow::Result<()> {
        let args = SyncArgs {
            broker: None,
            entity: None,
        };
        commands::sync(Some(&self.config), &args).await
    }

    pub async fn sync_entity(&self, entity: Entity) -> anyhow::Result<()> {
        let args = SyncArgs {
            broker: Some(BROKER.into()),
            entity: Some(entity),
        };
        commands::sync(Some(&self.config), &args).await
    }

    pub async fn backfill(&self, since: &str, until: Option<&str>) -> anyhow::Result<()> {
        let args = BackfillArgs {
            broker: BROKER.into(),
            entity: None,
            since: since.into(),
            until: until.map(Into::into),
        };
        commands::backfill(Some(&self.config), &args).await
    }

    /// The real binary, with this env's config.
    pub fn binary(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_t360-connector"));
        cmd.arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "warn");
        cmd
    }

    fn open(&self) -> rusqlite::Connection {
        rusqlite::Connection::open(self.database()).expect("state database")
    }

    /// Every stored row of `entity`, by natural key, without the `broker` column.
    pub fn rows(&self, entity: Entity) -> BTreeMap<String, Row> {
        self.rows_of(BROKER, entity)
    }

    /// Writes another connector file into the connectors folder.
    pub fn add_connector(&self, name: &str, text: &str) {
        let path = self
            .dir
            .path()
            .join("connectors")
            .join(format!("{name}.toml"));
        std::fs::write(path, text).unwrap();
    }

    /// The shipped legacy example connector, pointed at this env's sample broker.
    pub fn legacy_connector(&self) -> String {
        let shipped = include_str!("../../connectors/legacy-broker.toml");
        shipped
            .replace("http://127.0.0.1:8700", &self.broker.base_url())
            .replace("rate_limit = \"1000/min\"", "rate_limit = \"5000/s\"")
            .replace("max_retry_time = \"2m\"", "max_retry_time = \"5s\"")
    }

    pub async fn sync_broker(&self, broker: &str) -> anyhow::Result<()> {
        let args = SyncArgs {
            broker: Some(broker.into()),
            entity: None,
        };
        commands::sync(Some(&self.config), &args).await
    }

    /// Every stored row of `entity` of `broker`.
    pub fn rows_of(&self, broker: &str, entity: Entity) -> BTreeMap<String, Row> {
        stored_rows(&self.database(), broker, entity)
    }

    pub fn count(&self, sql: &str) -> i64 {
        self.open().query_row(sql, [], |r| r.get(0)).unwrap()
    }

    pub fn cursor(&self, entity: Entity) -> Option<String> {
        self.cursor_of(BROKER, entity)
    }

    /// Every record of the broker stamped at or before `broker`'s cursor of `entity` is stored
    /// as the broker has it: the cursor never runs ahead of the data it covers, and nothing
    /// inside a synced window was skipped. A no-op before the first cursor.
    pub fn assert_cursor_covers_store(&self, broker: &str, entity: Entity) {
        let Some(cursor) = self.cursor_of(broker, entity) else {
            return;
        };
        let cursor: jiff::Timestamp = cursor.parse().unwrap();
        let rows = self.rows_of(broker, entity);
        for (key, row) in self.truth(entity) {
            let modified: jiff::Timestamp = row["last_modified_date"]
                .as_deref()
                .unwrap()
                .parse()
                .unwrap();
            if modified <= cursor {
                assert_eq!(
                    rows.get(&key),
                    Some(&row),
                    "{broker} {entity} {key}, stamped before the cursor, is missing or stale"
                );
            }
        }
    }

    pub fn cursor_of(&self, broker: &str, entity: Entity) -> Option<String> {
        stored_cursor(&self.database(), broker, entity)
    }

    /// Quarantined keys of `entity` with their reasons.
    pub fn quarantined(&self, entity: Entity) -> BTreeMap<String, Vec<String>> {
        let conn = self.open();
        let mut stmt = conn
            .prepare("SELECT record_key, reasons FROM quarantine WHERE broker = ?1 AND entity = ?2")
            .unwrap();
        stmt.query_map([BROKER, entity.as_str()], |r| {
            let reasons: String = r.get(1)?;
            Ok((r.get(0)?, serde_json::from_str(&reasons).unwrap()))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    pub fn held(&self, entity: Entity) -> Vec<String> {
        let conn = self.open();
        let mut stmt = conn
            .prepare("SELECT record_key FROM held WHERE broker = ?1 AND entity = ?2 ORDER BY 1")
            .unwrap();
        stmt.query_map([BROKER, entity.as_str()], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    /// What the store must hold for `entity`: the broker's valid records whose customer is
    /// valid too, as text.
    pub fn truth(&self, entity: Entity) -> BTreeMap<String, Row> {
        self.broker.with_data(|data| truth(data, entity))
    }

    /// The store holds exactly the broker's valid records, field for field.
    pub fn assert_store_equals_broker(&self) {
        for entity in Entity::ALL {
            let rows = self.rows(entity);
            let truth = self.truth(entity);
            assert_same(entity, &rows, &truth);
        }
    }
}

/// Every row of `entity` of `broker` in the store at `database`, by natural key, without the
/// `broker` column.
pub fn stored_rows(
    database: &std::path::Path,
    broker: &str,
    entity: Entity,
) -> BTreeMap<String, Row> {
    let conn = rusqlite::Connection::open(database).expect("state database");
    let mut stmt = conn
        .prepare(&format!(
            "SELECT * FROM {} WHERE broker = ?1",
            entity.as_str()
        ))
        .unwrap();
    let columns: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
    let rows = stmt
        .query_map([broker], |r| {
            let mut row = Row::new();
            for (i, column) in columns.iter().enumerate() {
                if column != "broker" {
                    row.insert(column.clone(), r.get::<_, Option<String>>(i)?);
                }
            }
            Ok(row)
        })
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    rows.into_iter()
        .map(|row| (key_of_row(entity, &row), row))
        .collect()
}

/// The live cursor of (`broker`, `entity`) in the store at `database`.
pub fn stored_cursor(database: &std::path::Path, broker: &str, entity: Entity) -> Option<String> {
    let conn = rusqlite::Connection::open(database).ok()?;
    conn.query_row(
        "SELECT cursor FROM checkpoints WHERE broker = ?1 AND entity = ?2",
        [broker, entity.as_str()],
        |r| r.get(0),
    )
    .ok()
}

/// Compares two keyed row sets and names the first differences.
pub fn assert_same(entity: Entity, got: &BTreeMap<String, Row>, want: &BTreeMap<String, Row>) {
    let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let differ: Vec<(&String, &Row, &Row)> = want
        .iter()
        .filter_map(|(k, w)| got.get(k).filter(|g| *g != w).map(|g| (k, g, w)))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && differ.is_empty(),
        "{entity}: {} missing (e.g. {:?}), {} unexpected (e.g. {:?}), {} different (e.g. {:?})",
        missing.len(),
        missing.iter().take(3).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(3).collect::<Vec<_>>(),
        differ.len(),
        differ.first()
    );
}

/// The broker's valid records of `entity` as rows (orphans of invalid customers left out).
pub fn truth(data: &Dataset, entity: Entity) -> BTreeMap<String, Row> {
    let invalid = &data.invalid[entity as usize];
    let valid_customers: std::collections::HashSet<String> = data
        .table(Entity::Customers)
        .records()
        .map(|r| natural_key(Entity::Customers, r))
        .filter(|k| !data.invalid[0].contains(k))
        .collect();
    data.table(entity)
        .records()
        .filter(|r| !invalid.contains(&natural_key(entity, r)))
        .filter(|r| match entity {
            Entity::Customers => true,
            _ => r
                .get("customer_id")
                .and_then(Value::as_str)
                .is_some_and(|c| valid_customers.contains(c)),
        })
        .map(|r| (natural_key(entity, r), row_of(entity, r)))
        .collect()
}

/// A broker record as the store's row must read: each column's text, NULL when absent.
pub fn row_of(entity: Entity, record: &Value) -> Row {
    columns(entity)
        .iter()
        .map(|c| {
            let text = match record.get(*c) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(other) => Some(other.to_string()),
            };
            (c.to_string(), text)
        })
        .collect()
}

pub fn columns(entity: Entity) -> &'static [&'static str] {
    entity.fields()
}

fn key_of_row(entity: Entity, row: &Row) -> String {
    entity
        .key_fields()
        .iter()
        .map(|f| row.get(*f).cloned().flatten().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("|")
}

/// Waits into the next whole second. A window ends on a whole second, so a change stamped
/// "now" is read by the first sync that starts after this.
pub async fn next_second() {
    tokio::time::sleep(std::time::Duration::from_millis(1_050)).await;
}

/// A small data set: `customers` customers, twice as many transactions and activity rows.
pub fn dataset(customers: usize) -> Dataset {
    Dataset::generate(&DatasetSpec {
        customers,
        transactions: customers * 2,
        activity: customers * 2,
        ..DatasetSpec::default()
    })
}

/// A free loopback port (bound, then released for the daemon to take).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `check` every 50 ms until it holds or `timeout` passes; whether it held.
pub async fn eventually(timeout: std::time::Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    check()
}

/// The real binary running `run`, killed when dropped.
pub struct Daemon {
    pub child: std::process::Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Env {
    /// Rewrites the settings file with `extra` TOML after the paths.
    pub fn write_settings(&self, extra: &str) {
        std::fs::write(
            &self.config,
            format!("state_dir = \"state\"\nconnectors_dir = \"connectors\"\n{extra}\n"),
        )
        .unwrap();
    }

    /// Settings for a daemon: `/healthz` and `/metrics` on a free port, a short grace period.
    pub fn daemon_settings(&self, extra: &str) -> u16 {
        let port = free_port();
        std::fs::write(
            &self.config,
            format!(
                "state_dir = \"state\"\nconnectors_dir = \"connectors\"\n[daemon]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"10s\"\n{extra}\n"
            ),
        )
        .unwrap();
        port
    }

    /// Starts `t360-connector run`, its logs in a file of the env.
    pub fn start_daemon(&self, port: u16, envs: &[(&str, &str)]) -> Daemon {
        let log = self.dir.path().join(format!("daemon-{}.log", free_port()));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = self.binary();
        cmd.arg("run")
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let daemon = Daemon {
            child: cmd.spawn().expect("spawn the daemon"),
            port,
            log,
        };
        // The tests read the state database; the daemon creates and migrates it first thing.
        let migrated = || {
            self.database().exists()
                && rusqlite::Connection::open(self.database())
                    .and_then(|c| c.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0)))
                    .is_ok_and(|v| v > 0)
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !migrated() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        daemon
    }
}

impl Daemon {
    /// Sends a signal by name (`TERM`, `HUP`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .expect("kill(1)");
        assert!(status.success(), "kill -s {name} failed");
    }

    /// Waits for the process to exit; its status, or `None` after `timeout`.
    pub async fn exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET `path` on the daemon's listener: status and body.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        t360_connector::source::rest::ensure_crypto_provider();
        let url = format!("http://127.0.0.1:{}{path}", self.port);
        let response = reqwest::get(&url).await.ok()?;
        let status = response.status().as_u16();
        Some((status, response.text().await.ok()?))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a finished child process used: its own, not its siblings'.
#[derive(Debug)]
pub struct Usage {
    pub output: std::process::Output,
    /// Peak resident set size, KiB.
    pub peak_rss_kib: u64,
    /// User + system CPU time.
    pub cpu: std::time::Duration,
}

/// Runs `cmd` to completion and returns its output with its own peak RSS and CPU time
/// (`measure::reap`).
pub fn run_measured(mut cmd: Command) -> Usage {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id();
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let readers = [
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            out.read_to_end(&mut buf).unwrap();
            buf
        }),
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            err.read_to_end(&mut buf).unwrap();
            buf
        }),
    ];
    let reaped = measure::reap(pid, std::time::Duration::from_millis(2));
    // Reaped by `measure::reap`: std must not wait for it.
    drop(child);
    let [stdout, stderr] = readers.map(|r| r.join().unwrap());
    Usage {
        output: std::process::Output {
            status: std::process::ExitStatus::from_raw(reaped.status),
            stdout,
            stderr,
        },
        peak_rss_kib: reaped.peak_rss_kib,
        cpu: reaped.cpu,
    }
}
