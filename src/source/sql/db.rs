//! One connection pool per connector, read-only sessions with a statement timeout, and rows
//! read into `DbValue`s by the column's database type.

use std::str::FromStr;
use std::time::Duration;

use chrono::{Datelike, Timelike};
use futures_util::TryStreamExt;
use jiff::Timestamp;
use jiff::civil::{Date, DateTime};
use rust_decimal::Decimal;
use secrecy::ExposeSecret;
use sqlx::mysql::{
    MySql, MySqlConnectOptions, MySqlPool, MySqlPoolOptions, MySqlRow, MySqlSslMode,
};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow, PgSslMode, Postgres};
use sqlx::sqlite::{Sqlite, SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow};
use sqlx::{AssertSqlSafe, Column, Executor, Row, SqlSafeStr, Statement, TypeInfo, ValueRef};

use super::value::DbValue;
use crate::config::sql::{Engine, SqlPlan, Tls};

/// A failed query: its text for the message, and whether asking again may succeed.
#[derive(Debug)]
pub struct DbError {
    pub message: String,
    pub transient: bool,
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> DbError {
        let transient = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => true,
            // A certificate that does not verify will not verify on the next try either.
            // PostgreSQL class 08 (connection exception), 57P01–57P03 (shutdown, restart);
            // MySQL 1053 (server shutdown) and 2006/2013 (gone away, lost).
            sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                code.starts_with("08")
                    || matches!(
                        &*code,
                        "57P01" | "57P02" | "57P03" | "1053" | "2006" | "2013"
                    )
            }),
            _ => false,
        };
        DbError {
            message: e.to_string(),
            transient,
        }
    }
}

impl DbError {
    fn unreadable(message: String) -> DbError {
        DbError {
            message,
            transient: false,
        }
    }
}

/// Rows of one query, with the names of their columns.
#[derive(Debug, Default)]
pub struct Rows {
    pub names: Vec<String>,
    pub rows: Vec<Vec<DbValue>>,
}

pub enum Db {
    Postgres(PgPool),
    MySql(MySqlPool),
    Sqlite(SqlitePool),
}

/// A `tls` setting as sqlx's PostgreSQL TLS mode (replicas and the fleet's state database).
pub(crate) fn pg_ssl_mode(tls: Tls) -> PgSslMode {
    match tls {
        Tls::Disable => PgSslMode::Disable,
        Tls::Prefer => PgSslMode::Prefer,
        Tls::Require => PgSslMode::Require,
        Tls::VerifyCa => PgSslMode::VerifyCa,
        Tls::VerifyFull => PgSslMode::VerifyFull,
    }
}

impl Db {
    /// The pool; connections are opened on first use, so a database that is down fails a run,
    /// not the daemon's start.
    pub fn connect_lazy(plan: &SqlPlan) -> Result<Db, String> {
        let bad_url = |e: sqlx::Error| format!("sql.url: {e}");
        let password = plan.password.as_ref().map(|p| p.expose_secret().to_owned());
        let timeout_ms = plan.statement_timeout.as_millis().to_string();
        Ok(match plan.engine {
            Engine::Postgres => {
                let mut options = PgConnectOptions::from_str(&plan.url)
                    .map_err(bad_url)?
                    .application_name("t360-connector")
                    .ssl_mode(pg_ssl_mode(plan.tls))
                    // Session settings at connection start: read-only whatever the grants,
                    // the server's own statement timeout, and UTC for any cast of a timestamp.
                    .options([
                        ("default_transaction_read_only", "on"),
                        ("statement_timeout", timeout_ms.as_str()),
                        ("TimeZone", "UTC"),
                    ]);
                if let Some(p) = &password {
                    options = options.password(p);
                }
                if let Some(ca) = &plan.ca_file {
                    options = options.ssl_root_cert(ca);
                }
                Db::Postgres(pool_options(PgPoolOptions::new(), plan).connect_lazy_with(options))
            }
            Engine::MySql => {
                let mut options = MySqlConnectOptions::from_str(&plan.url)
                    .map_err(bad_url)?
                    .ssl_mode(match plan.tls {
                        Tls::Disable => MySqlSslMode::Disabled,
                        Tls::Prefer => MySqlSslMode::Preferred,
                        Tls::Require => MySqlSslMode::Required,
                        Tls::VerifyCa => MySqlSslMode::VerifyCa,
                        Tls::VerifyFull => MySqlSslMode::VerifyIdentity,
                    })
                    // TIMESTAMP columns are read and compared in UTC.
                    .timezone(Some("+00:00".to_owned()));
                if let Some(p) = &password {
                    options = options.password(p);
                }
                if let Some(ca) = &plan.ca_file {
                    options = options.ssl_ca(ca);
                }
                let seconds = plan.statement_timeout.as_secs().max(1);
                let ms = plan.statement_timeout.as_millis().max(1);
                let pool =
                    pool_options(MySqlPoolOptions::new(), plan).after_connect(move |conn, _| {
                        Box::pin(async move {
                            conn.execute("SET SESSION TRANSACTION READ ONLY").await?;
                            let version: String = sqlx::query_scalar("SELECT VERSION()")
                                .fetch_one(&mut *conn)
                                .await?;
                            // MariaDB and MySQL name their statement timeouts differently.
                            let set = if version.contains("MariaDB") {
                                format!("SET SESSION max_statement_time = {seconds}")
                            } else {
                                format!("SET SESSION max_execution_time = {ms}")
                            };
                            conn.execute(AssertSqlSafe(set)).await?;
                            Ok(())
                        })
                    });
                Db::MySql(pool.connect_lazy_with(options))
            }
            Engine::Sqlite => {
                let options = SqliteConnectOptions::from_str(&plan.url)
                    .map_err(bad_url)?
                    .read_only(true)
                    .busy_timeout(plan.connect_timeout);
                Db::Sqlite(pool_options(SqlitePoolOptions::new(), plan).connect_lazy_with(options))
            }
        })
    }

    /// Runs `sql` with `params` bound in order; every row is read before returning (a page is
    /// bounded by its LIMIT). The statement timeout is also enforced here, for SQLite and for
    /// a server that ignores its own.
    pub async fn fetch(
        &self,
        sql: &str,
        params: &[DbValue],
        timeout: Duration,
    ) -> Result<Rows, DbError> {
        match tokio::time::timeout(timeout, self.fetch_inner(sql, params)).await {
            Ok(result) => result,
            Err(_) => Err(DbError {
                message: format!("the query ran longer than the statement timeout ({timeout:?})"),
                transient: false,
            }),
        }
    }

    async fn fetch_inner(&self, sql: &str, params: &[DbValue]) -> Result<Rows, DbError> {
        let sql = AssertSqlSafe(sql.to_owned());
        let mut out = Rows::default();
        match self {
            Db::Postgres(pool) => {
                let mut query = sqlx::query::<Postgres>(sql);
                for p in params {
                    query = bind_pg(query, p);
                }
                let mut rows = query.fetch(pool);
                while let Some(row) = rows.try_next().await? {
                    names(&mut out, &row);
                    out.rows.push(decode_pg(&row)?);
                }
            }
            Db::MySql(pool) => {
                let mut query = sqlx::query::<MySql>(sql);
                for p in params {
                    query = bind_mysql(query, p);
                }
                let mut rows = query.fetch(pool);
                while let Some(row) = rows.try_next().await? {
                    names(&mut out, &row);
                    out.rows.push(decode_mysql(&row)?);
                }
            }
            Db::Sqlite(pool) => {
                let mut query = sqlx::query::<Sqlite>(sql);
                for p in params {
                    query = bind_sqlite(query, p);
                }
                let mut rows = query.fetch(pool);
                while let Some(row) = rows.try_next().await? {
                    names(&mut out, &row);
                    out.rows.push(decode_sqlite(&row)?);
                }
            }
        }
        Ok(out)
    }

    /// The names and database types of `sql`'s result columns, from the prepared statement:
    /// an empty table needs no guess.
    pub async fn describe(&self, sql: &str) -> Result<Vec<(String, String)>, DbError> {
        let sql = AssertSqlSafe(sql.to_owned()).into_sql_str();
        Ok(match self {
            Db::Postgres(pool) => shape(pool.prepare(sql).await?.columns()),
            Db::MySql(pool) => shape(pool.prepare(sql).await?.columns()),
            Db::Sqlite(pool) => shape(pool.prepare(sql).await?.columns()),
        })
    }

    pub async fn close(&self) {
        match self {
            Db::Postgres(pool) => pool.close().await,
            Db::MySql(pool) => pool.close().await,
            Db::Sqlite(pool) => pool.close().await,
        }
    }
}

fn pool_options<DB: sqlx::Database>(
    options: sqlx::pool::PoolOptions<DB>,
    plan: &SqlPlan,
) -> sqlx::pool::PoolOptions<DB> {
    options
        .max_connections(plan.max_connections)
        .min_connections(0)
        .acquire_timeout(plan.connect_timeout)
        // A replica is shared: connections idle between scheduled runs are given back.
        .idle_timeout(Some(Duration::from_secs(60)))
}

fn shape<C: Column>(columns: &[C]) -> Vec<(String, String)> {
    columns
        .iter()
        .map(|c| (c.name().to_owned(), c.type_info().name().to_owned()))
        .collect()
}

fn names<R: Row>(out: &mut Rows, row: &R) {
    if out.names.is_empty() {
        out.names = row.columns().iter().map(|c| c.name().to_owned()).collect();
    }
}

fn unsupported(name: &str, type_name: &str) -> DbError {
    DbError::unreadable(format!(
        "column `{name}` is {type_name}, which is not read: cast it in the query (to text, \
         numeric or a timestamp)"
    ))
}

fn bad_value(name: &str, e: sqlx::Error) -> DbError {
    DbError::unreadable(format!("column `{name}`: {e}"))
}

fn decode_pg(row: &PgRow) -> Result<Vec<DbValue>, DbError> {
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let name = column.name();
        let bad = |e| bad_value(name, e);
        if row.try_get_raw(i).map_err(bad)?.is_null() {
            values.push(DbValue::Null);
            continue;
        }
        let type_name = column.type_info().name();
        values.push(match type_name {
            "BOOL" => DbValue::Bool(row.try_get(i).map_err(bad)?),
            "INT2" => DbValue::Int(row.try_get::<i16, _>(i).map_err(bad)?.into()),
            "INT4" => DbValue::Int(row.try_get::<i32, _>(i).map_err(bad)?.into()),
            "INT8" => DbValue::Int(row.try_get(i).map_err(bad)?),
            "NUMERIC" => DbValue::Decimal(row.try_get(i).map_err(bad)?),
            "FLOAT4" => DbValue::Float(f32_to_f64(row.try_get(i).map_err(bad)?)),
            "FLOAT8" => DbValue::Float(row.try_get(i).map_err(bad)?),
            "TEXT" | "VARCHAR" | "CHAR" | "NAME" => DbValue::Text(row.try_get(i).map_err(bad)?),
            "TIMESTAMP" => DbValue::Civil(civil(row.try_get(i).map_err(bad)?)),
            "TIMESTAMPTZ" => DbValue::Instant(instant(row.try_get(i).map_err(bad)?)),
            "DATE" => DbValue::Date(date(row.try_get(i).map_err(bad)?)),
            other => return Err(unsupported(name, other)),
        });
    }
    Ok(values)
}

fn decode_mysql(row: &MySqlRow) -> Result<Vec<DbValue>, DbError> {
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let name = column.name();
        let bad = |e| bad_value(name, e);
        if row.try_get_raw(i).map_err(bad)?.is_null() {
            values.push(DbValue::Null);
            continue;
        }
        let type_name = column.type_info().name();
        values.push(match type_name {
            "BOOLEAN" => DbValue::Bool(row.try_get(i).map_err(bad)?),
            "TINYINT" | "SMALLINT" | "MEDIUMINT" | "INT" | "BIGINT" | "YEAR" => {
                DbValue::Int(row.try_get(i).map_err(bad)?)
            }
            t if t.ends_with(" UNSIGNED") => DbValue::UInt(row.try_get(i).map_err(bad)?),
            "DECIMAL" => DbValue::Decimal(row.try_get(i).map_err(bad)?),
            "FLOAT" => DbValue::Float(f32_to_f64(row.try_get(i).map_err(bad)?)),
            "DOUBLE" => DbValue::Float(row.try_get(i).map_err(bad)?),
            // MySQL's zero dates (`0000-00-00`) are no dates: read as NULL, so that the
            // record is judged by validation instead of failing every run on the same row.
            "DATETIME" => row
                .try_get(i)
                .map_or(DbValue::Null, |v| DbValue::Civil(civil(v))),
            "TIMESTAMP" => row
                .try_get(i)
                .map_or(DbValue::Null, |v| DbValue::Instant(instant(v))),
            "DATE" => row
                .try_get(i)
                .map_or(DbValue::Null, |v| DbValue::Date(date(v))),
            t if t.contains("CHAR") || t.contains("TEXT") || t == "ENUM" => {
                DbValue::Text(row.try_get(i).map_err(bad)?)
            }
            other => return Err(unsupported(name, other)),
        });
    }
    Ok(values)
}

fn decode_sqlite(row: &SqliteRow) -> Result<Vec<DbValue>, DbError> {
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let name = column.name();
        let bad = |e| bad_value(name, e);
        let raw = row.try_get_raw(i).map_err(bad)?;
        if raw.is_null() {
            values.push(DbValue::Null);
            continue;
        }
        // SQLite types values, not columns: read by the stored value's class.
        let class = raw.type_info().name().to_owned();
        values.push(match class.as_str() {
            "INTEGER" => DbValue::Int(row.try_get(i).map_err(bad)?),
            "REAL" => DbValue::Float(row.try_get(i).map_err(bad)?),
            "TEXT" => {
                let text: String = row.try_get(i).map_err(bad)?;
                // A date-time in text is a time (SQLite has no other kind); a bare date, like
                // trading activity's `date`, stays a date.
                if text.len() > 10 && text.parse::<DateTime>().is_ok()
                    || text.len() > 10 && text.parse::<Timestamp>().is_ok()
                {
                    DbValue::TimeText(text)
                } else {
                    DbValue::Text(text)
                }
            }
            other => return Err(unsupported(name, other)),
        });
    }
    Ok(values)
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, sqlx::postgres::PgArguments>;
type MySqlQuery<'q> = sqlx::query::Query<'q, MySql, sqlx::mysql::MySqlArguments>;
type SqliteQuery<'q> = sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>;

fn bind_pg<'q>(query: PgQuery<'q>, value: &DbValue) -> PgQuery<'q> {
    match value {
        DbValue::Null => query.bind(None::<String>),
        DbValue::Bool(b) => query.bind(*b),
        DbValue::Int(i) => query.bind(*i),
        DbValue::UInt(u) => query.bind(Decimal::from(*u)),
        DbValue::Decimal(d) => query.bind(*d),
        DbValue::Float(f) => query.bind(*f),
        DbValue::Text(s) | DbValue::TimeText(s) => query.bind(s.clone()),
        DbValue::Civil(dt) => query.bind(to_chrono_civil(*dt)),
        DbValue::Instant(t) => query.bind(to_chrono_instant(*t)),
        DbValue::Date(d) => query.bind(to_chrono_date(*d)),
    }
}

fn bind_mysql<'q>(query: MySqlQuery<'q>, value: &DbValue) -> MySqlQuery<'q> {
    match value {
        DbValue::Null => query.bind(None::<String>),
        DbValue::Bool(b) => query.bind(*b),
        DbValue::Int(i) => query.bind(*i),
        DbValue::UInt(u) => query.bind(*u),
        DbValue::Decimal(d) => query.bind(*d),
        DbValue::Float(f) => query.bind(*f),
        DbValue::Text(s) | DbValue::TimeText(s) => query.bind(s.clone()),
        DbValue::Civil(dt) => query.bind(to_chrono_civil(*dt)),
        DbValue::Instant(t) => query.bind(to_chrono_instant(*t)),
        DbValue::Date(d) => query.bind(to_chrono_date(*d)),
    }
}

fn bind_sqlite<'q>(query: SqliteQuery<'q>, value: &DbValue) -> SqliteQuery<'q> {
    match value {
        DbValue::Null => query.bind(None::<String>),
        DbValue::Bool(b) => query.bind(*b),
        DbValue::Int(i) => query.bind(*i),
        DbValue::UInt(u) => query.bind(u.to_string()),
        DbValue::Decimal(d) => query.bind(d.to_string()),
        DbValue::Float(f) => query.bind(*f),
        DbValue::Text(s) | DbValue::TimeText(s) => query.bind(s.clone()),
        // Text, as SQLite's datetime() writes it; these come from bounds, not from rows.
        DbValue::Civil(dt) => query.bind(dt.strftime("%Y-%m-%d %H:%M:%S").to_string()),
        DbValue::Instant(t) => query.bind(t.strftime("%Y-%m-%d %H:%M:%S").to_string()),
        DbValue::Date(d) => query.bind(d.to_string()),
    }
}

/// A float4 through its shortest text, so that 0.1 stays 0.1 and not 0.10000000149.
fn f32_to_f64(f: f32) -> f64 {
    f.to_string().parse().unwrap_or(f64::from(f))
}

fn civil(dt: chrono::NaiveDateTime) -> DateTime {
    DateTime::new(
        dt.year() as i16,
        dt.month() as i8,
        dt.day() as i8,
        dt.hour() as i8,
        dt.minute() as i8,
        dt.second() as i8,
        dt.nanosecond().min(999_999_999) as i32,
    )
    .unwrap_or(DateTime::MIN)
}

fn instant(t: chrono::DateTime<chrono::Utc>) -> Timestamp {
    Timestamp::new(
        t.timestamp(),
        t.timestamp_subsec_nanos().min(999_999_999) as i32,
    )
    .unwrap_or(Timestamp::MIN)
}

fn date(d: chrono::NaiveDate) -> Date {
    Date::new(d.year() as i16, d.month() as i8, d.day() as i8).unwrap_or(Date::MIN)
}

fn to_chrono_civil(dt: DateTime) -> chrono::NaiveDateTime {
    to_chrono_date(dt.date())
        .and_hms_nano_opt(
            dt.hour() as u32,
            dt.minute() as u32,
            dt.second() as u32,
            dt.subsec_nanosecond() as u32,
        )
        .unwrap_or_default()
}

fn to_chrono_instant(t: Timestamp) -> chrono::DateTime<chrono::Utc> {
    chrono::DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond() as u32)
        .unwrap_or_default()
}

fn to_chrono_date(d: Date) -> chrono::NaiveDate {
    chrono::NaiveDate::from_ymd_opt(i32::from(d.year()), d.month() as u32, d.day() as u32)
        .unwrap_or_default()
}
