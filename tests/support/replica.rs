//! A broker's replica for the SQL source's tests: a fresh schema (PostgreSQL), database
//! (MariaDB/MySQL) or file (SQLite) per test, written through an admin connection.
//!
//! PostgreSQL and MariaDB are reached through `T360_TEST_POSTGRES_URL` and
//! `T360_TEST_MYSQL_URL` (`.ci/run` sets both and starts the servers). When one is unset its
//! tests say so loudly and run on the others; SQLite always runs.

use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, Executor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Postgres,
    MySql,
    Sqlite,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Postgres => "postgres",
            Kind::MySql => "mysql",
            Kind::Sqlite => "sqlite",
        }
    }
}

enum Admin {
    Postgres(PgPool),
    MySql(MySqlPool),
    Sqlite(SqlitePool),
}

pub struct Replica {
    pub kind: Kind,
    /// The URL a connector file names (no password: the test servers trust loopback).
    pub url: String,
    /// Prefix of every table name: `schema.` on servers, empty for SQLite.
    pub prefix: String,
    pub schema: String,
    admin: Admin,
    _dir: Option<tempfile::TempDir>,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn unique(tag: &str) -> String {
    format!(
        "t360_{tag}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// The replicas this machine offers, SQLite first; a loud line for each one skipped.
pub async fn available(test: &str) -> Vec<Replica> {
    let mut out = vec![Replica::sqlite().await];
    match std::env::var("T360_TEST_POSTGRES_URL") {
        Ok(url) => out.push(Replica::postgres(&url).await),
        Err(_) => eprintln!(
            "!!! SKIPPED {test} on PostgreSQL: T360_TEST_POSTGRES_URL is not set (bash .ci/run sets it)"
        ),
    }
    match std::env::var("T360_TEST_MYSQL_URL") {
        Ok(url) => out.push(Replica::mysql(&url).await),
        Err(_) => eprintln!(
            "!!! SKIPPED {test} on MariaDB/MySQL: T360_TEST_MYSQL_URL is not set (bash .ci/run sets it)"
        ),
    }
    out
}

impl Replica {
    pub async fn sqlite() -> Replica {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replica.db");
        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .unwrap();
        Replica {
            kind: Kind::Sqlite,
            url: format!("sqlite://{}", path.display()),
            prefix: String::new(),
            schema: String::new(),
            admin: Admin::Sqlite(pool),
            _dir: Some(dir),
        }
    }

    pub async fn postgres(url: &str) -> Replica {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(url)
            .await
            .unwrap_or_else(|e| panic!("T360_TEST_POSTGRES_URL={url}: {e}"));
        let schema = unique("pg");
        pool.execute(AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .await
            .unwrap();
        Replica {
            kind: Kind::Postgres,
            url: url.to_owned(),
            prefix: format!("{schema}."),
            schema,
            admin: Admin::Postgres(pool),
            _dir: None,
        }
    }

    pub async fn mysql(url: &str) -> Replica {
        let options = MySqlConnectOptions::from_str(url)
            .unwrap()
            .timezone(Some("+00:00".into()));
        let pool = MySqlPoolOptions::new()
            .max_connections(2)
            .connect_with(options)
            .await
            .unwrap_or_else(|e| panic!("T360_TEST_MYSQL_URL={url}: {e}"));
        let schema = unique("my");
        pool.execute(AssertSqlSafe(format!("CREATE DATABASE {schema}")))
            .await
            .unwrap();
        Replica {
            kind: Kind::MySql,
            url: url.to_owned(),
            prefix: format!("{schema}."),
            schema,
            admin: Admin::MySql(pool),
            _dir: None,
        }
    }

    /// Runs one statement; in `sql`, `{p}` is the table prefix, `{ts}` a naive timestamp type,
    /// `{tsz}` one with a time zone, `{dec}` an exact decimal, `{text}` a short string.
    pub async fn exec(&self, sql: &str) {
        let sql = self.dialect(sql);
        let result = match &self.admin {
            Admin::Postgres(pool) => pool.execute(AssertSqlSafe(sql.clone())).await.map(drop),
            Admin::MySql(pool) => pool.execute(AssertSqlSafe(sql.clone())).await.map(drop),
            Admin::Sqlite(pool) => pool.execute(AssertSqlSafe(sql.clone())).await.map(drop),
        };
        result.unwrap_or_else(|e| panic!("{}: {sql}: {e}", self.kind.name()));
    }

    /// The first column of the first row of `sql`, as text (PostgreSQL only).
    pub async fn exec_scalar(&self, sql: &str) -> String {
        match &self.admin {
            Admin::Postgres(pool) => sqlx::query_scalar::<_, String>(AssertSqlSafe(sql.to_owned()))
                .fetch_one(pool)
                .await
                .unwrap(),
            _ => unimplemented!("exec_scalar is for PostgreSQL"),
        }
    }

    /// Every row's first column of `sql`, as text (PostgreSQL only): `EXPLAIN`'s lines.
    pub async fn exec_lines(&self, sql: &str) -> Vec<String> {
        match &self.admin {
            Admin::Postgres(pool) => sqlx::query_scalar::<_, String>(AssertSqlSafe(sql.to_owned()))
                .fetch_all(pool)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
            _ => unimplemented!("exec_lines is for PostgreSQL"),
        }
    }

    fn dialect(&self, sql: &str) -> String {
        let (ts, tsz, dec) = match self.kind {
            Kind::Postgres => ("timestamp(6)", "timestamptz", "numeric(24,8)"),
            Kind::MySql => ("DATETIME(6)", "TIMESTAMP(6) NULL", "DECIMAL(24,8)"),
            Kind::Sqlite => ("DATETIME", "TEXT", "TEXT"),
        };
        sql.replace("{p}", &self.prefix)
            .replace("{tsz}", tsz)
            .replace("{ts}", ts)
            .replace("{dec}", dec)
            .replace("{text}", "VARCHAR(100)")
    }

    /// A literal of an instant for a `{tsz}` column (`2026-01-05 10:00:00` is UTC).
    pub fn tsz(&self, utc: &str) -> String {
        match self.kind {
            Kind::Postgres => format!("'{utc}+00'"),
            // The admin session's time zone is UTC.
            Kind::MySql => format!("'{utc}'"),
            Kind::Sqlite => format!("'{}Z'", utc.replace(' ', "T")),
        }
    }

    /// A literal of a wall-clock time for a `{ts}` column.
    pub fn ts(&self, civil: &str) -> String {
        format!("'{civil}'")
    }

    /// The connector file's `[sql]` connection keys for this replica.
    pub fn connection(&self) -> String {
        let tls = match self.kind {
            Kind::Sqlite => String::new(),
            _ => "tls = \"disable\"\n".into(),
        };
        format!(
            "url = \"{}\"\n{tls}max_retry_time = \"1s\"\nconnect_timeout = \"3s\"\n",
            self.url
        )
    }

    /// Closes every admin connection (a proxy test wants the server to itself).
    pub async fn drop_schema(&self) {
        match &self.admin {
            Admin::Postgres(pool) => {
                let _ = pool
                    .execute(AssertSqlSafe(format!(
                        "DROP SCHEMA {} CASCADE",
                        self.schema
                    )))
                    .await;
            }
            Admin::MySql(pool) => {
                let _ = pool
                    .execute(AssertSqlSafe(format!("DROP DATABASE {}", self.schema)))
                    .await;
            }
            Admin::Sqlite(_) => {}
        }
    }
}

/// A TCP proxy in front of a database server that a test can cut off (every connection
/// dropped, new ones refused) and restore on the same port.
pub struct Proxy {
    port: u16,
    target: String,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Proxy {
    pub async fn start(url: &str) -> Proxy {
        let parsed = url::Url::parse(url).unwrap();
        let target = format!(
            "{}:{}",
            parsed.host_str().unwrap(),
            parsed
                .port_or_known_default()
                .unwrap_or(match parsed.scheme() {
                    "mysql" | "mariadb" => 3306,
                    _ => 5432,
                })
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = Proxy {
            port,
            target,
            task: tokio::sync::Mutex::new(None),
        };
        proxy.serve(listener).await;
        proxy
    }

    /// `url` pointed at the proxy.
    pub fn url(&self, url: &str) -> String {
        let mut parsed = url::Url::parse(url).unwrap();
        parsed.set_host(Some("127.0.0.1")).unwrap();
        parsed.set_port(Some(self.port)).unwrap();
        parsed.to_string()
    }

    async fn serve(&self, listener: tokio::net::TcpListener) {
        let target = self.target.clone();
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the task drops them all.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let target = target.clone();
                connections.spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        *self.task.lock().await = Some(task);
    }

    /// The database goes away: open connections break, new ones are refused.
    pub async fn cut(&self) {
        if let Some(task) = self.task.lock().await.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// The database is back, on the same address.
    pub async fn restore(&self) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        self.serve(listener).await;
    }
}
