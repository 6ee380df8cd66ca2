//! A broker's database replica or data warehouse (`kind = "postgres" | "mysql" | "sqlite"`):
//! the `[sql]` table of a connector file and its checked form.

use std::path::PathBuf;
use std::time::Duration;

use jiff::civil::Time;
use jiff::tz::TimeZone;
use rust_decimal::Decimal;
use secrecy::SecretString;
use serde::Deserialize;

use super::plan::{Problems, optional_duration, parse_zone};
use super::secret;
use crate::model::Entity;
pub use crate::source::sql::value::Epoch;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSql {
    /// `postgres://user@host:5432/db`, `mysql://user@host:3306/db` or `sqlite:///path/file.db`;
    /// never with a password in it.
    pub url: String,
    pub password_env: Option<String>,
    pub password_file: Option<String>,
    /// `disable`, `prefer`, `require`, `verify-ca` or `verify-full` (the default).
    pub tls: Option<String>,
    /// PEM file of the CA that signed the server's certificate (private CAs).
    pub ca_file: Option<String>,
    /// Connections this broker may hold open at once.
    pub max_connections: Option<i64>,
    /// The longest one page's query may run, enforced by the server and by us.
    pub statement_timeout: Option<String>,
    pub connect_timeout: Option<String>,
    /// How long a page may keep being retried after connection failures before the run fails.
    pub max_retry_time: Option<String>,
    /// Rows per page (one query each).
    pub page_size: Option<i64>,
    /// Zone of the database's naive timestamps (`timestamp without time zone`, `DATETIME`);
    /// the connector's `timezone` when absent.
    pub naive_timezone: Option<String>,
    /// What integer time columns count since 1970: `s` or `ms`. Required when a cursor or
    /// deal time column is an integer: a wrong guess would read nothing, silently.
    pub epoch: Option<String>,
    pub customers: Option<RawSqlEntity>,
    pub transactions: Option<RawSqlEntity>,
    pub trading_activity: Option<RawSqlEntity>,
}

/// Where one entity's rows are: a table or view, or a query, with its cursor and key columns.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSqlEntity {
    pub table: Option<String>,
    /// A SELECT; it is wrapped as a subquery, so its output column names are what the cursor,
    /// the key and the mapping name.
    pub query: Option<String>,
    /// The `last_modified_date` column (default `last_modified_date`).
    pub cursor: Option<String>,
    /// The unique key columns, the keyset's tie-break (default: the entity's natural key; for
    /// deals, the deal column).
    pub key: Option<Vec<String>>,
    /// The rows are MetaTrader deals, aggregated into daily trading activity.
    pub deals: Option<RawDeals>,
}

/// Column names of an MT5-style deals table, and how deals become days.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeals {
    pub deal: Option<String>,
    pub login: Option<String>,
    pub time: Option<String>,
    pub symbol: Option<String>,
    pub action: Option<String>,
    pub entry: Option<String>,
    pub volume: Option<String>,
    pub commission: Option<String>,
    pub swap: Option<String>,
    pub profit: Option<String>,
    /// A column, or `currency_const` for an account base currency shared by every deal.
    pub currency: Option<String>,
    pub currency_const: Option<String>,
    /// Volume units per lot: 10000 for MT5 `Volume`, 100000000 for `VolumeExt`.
    pub volume_per_lot: Option<String>,
    /// Wall-clock time at which a trading day begins, in `day_zone` (default `00:00`).
    pub day_start: Option<String>,
    /// Zone of `day_start` (default: the connector's `timezone`, the trade server's).
    pub day_zone: Option<String>,
    /// Which deals' volume counts as lots: `all` (default), `in` or `out`.
    pub lots_on: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Postgres,
    MySql,
    Sqlite,
}

impl Engine {
    pub fn parse(kind: &str) -> Option<Engine> {
        match kind {
            "postgres" => Some(Engine::Postgres),
            "mysql" => Some(Engine::MySql),
            "sqlite" => Some(Engine::Sqlite),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::MySql => "mysql",
            Engine::Sqlite => "sqlite",
        }
    }
}

/// TLS to the database server, named as libpq names its `sslmode`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl Tls {
    pub(super) fn parse(text: &str) -> Result<Tls, String> {
        Ok(match text {
            "disable" => Tls::Disable,
            "prefer" => Tls::Prefer,
            "require" => Tls::Require,
            "verify-ca" => Tls::VerifyCa,
            "verify-full" => Tls::VerifyFull,
            _ => {
                return Err(format!(
                    "`{text}` is not one of disable, prefer, require, verify-ca, verify-full"
                ));
            }
        })
    }
}

#[derive(Debug, Clone)]
pub struct SqlPlan {
    pub engine: Engine,
    /// The URL as configured: it holds no password.
    pub url: String,
    pub password: Option<SecretString>,
    pub tls: Tls,
    pub ca_file: Option<PathBuf>,
    pub max_connections: u32,
    pub statement_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_retry_time: Duration,
    pub page_size: u32,
    pub naive_zone: TimeZone,
    pub epoch: Option<Epoch>,
    /// Per entity, in `Entity::ALL` order; `None` for entities the connector does not pull.
    pub entities: [Option<SqlEntityPlan>; 3],
}

#[derive(Debug, Clone)]
pub enum From {
    Table(String),
    Query(String),
}

#[derive(Debug, Clone)]
pub struct SqlEntityPlan {
    pub from: From,
    pub cursor: String,
    pub key: Vec<String>,
    pub deals: Option<DealsPlan>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LotsOn {
    All,
    In,
    Out,
}

#[derive(Debug, Clone)]
pub struct DealsPlan {
    pub deal: String,
    pub login: String,
    pub time: String,
    pub symbol: String,
    pub action: String,
    pub entry: String,
    pub volume: String,
    pub commission: String,
    pub swap: String,
    pub profit: String,
    pub currency: Currency,
    pub volume_per_lot: Decimal,
    pub day_start: Time,
    pub day_zone: TimeZone,
    pub lots_on: LotsOn,
}

#[derive(Debug, Clone)]
pub enum Currency {
    Column(String),
    Const(String),
}

/// A column or table name: letters, digits and `_` (a table may be `schema.table`). Names are
/// the only text of a connector file that reaches SQL, quoted; values are always bound.
pub fn is_identifier(name: &str, dotted: bool) -> bool {
    let part = |p: &str| {
        (1..=64).contains(&p.len())
            && !p.starts_with(|c: char| c.is_ascii_digit())
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    if dotted {
        let parts: Vec<&str> = name.split('.').collect();
        parts.len() <= 2 && parts.iter().all(|p| part(p))
    } else {
        part(name)
    }
}

pub(super) fn sql_plan(
    engine: Engine,
    raw: &RawSql,
    zone: &TimeZone,
    entities: &[Entity],
    problems: &mut Problems,
) -> Option<SqlPlan> {
    let url = problems.take("sql.url", check_url(engine, &raw.url));
    let password = match (&raw.password_env, &raw.password_file) {
        (None, None) => Some(None),
        (env, file) => problems
            .take(
                "sql.password",
                secret::load(env.as_deref(), file.as_deref(), "password"),
            )
            .map(Some),
    };
    let tls = match (engine, raw.tls.as_deref(), &raw.ca_file) {
        (Engine::Sqlite, None, None) => Some(Tls::Disable),
        (Engine::Sqlite, _, _) => {
            problems.add(
                "sql.tls",
                "a SQLite file has no TLS: remove tls and ca_file",
            );
            None
        }
        (_, text, _) => problems.take("sql.tls", Tls::parse(text.unwrap_or("verify-full"))),
    };
    let max_connections = match raw.max_connections {
        None => Some(2),
        Some(n) if (1..=16).contains(&n) => Some(n as u32),
        Some(n) => {
            problems.add(
                "sql.max_connections",
                format!("must be between 1 and 16, found {n}: a replica is shared with others"),
            );
            None
        }
    };
    let page_size = match raw.page_size {
        None => Some(1000),
        Some(n) if (1..=100_000).contains(&n) => Some(n as u32),
        Some(n) => {
            problems.add(
                "sql.page_size",
                format!("must be between 1 and 100000, found {n}"),
            );
            None
        }
    };
    let duration = |text: &Option<String>, default, key, problems: &mut Problems| {
        optional_duration(text, default, key, problems).map(|d| d.unsigned_abs())
    };
    let statement_timeout = duration(
        &raw.statement_timeout,
        "5m",
        "sql.statement_timeout",
        problems,
    );
    let connect_timeout = duration(&raw.connect_timeout, "10s", "sql.connect_timeout", problems);
    let max_retry_time = duration(&raw.max_retry_time, "1m", "sql.max_retry_time", problems);
    let epoch = match raw.epoch.as_deref() {
        None => Some(None),
        Some("s") => Some(Some(Epoch::Seconds)),
        Some("ms") => Some(Some(Epoch::Millis)),
        Some(other) => {
            problems.add("sql.epoch", format!("`{other}` is not one of s, ms"));
            None
        }
    };
    let naive_zone = match &raw.naive_timezone {
        None => Some(zone.clone()),
        Some(name) => problems.take("sql.naive_timezone", parse_zone(name)),
    };
    let by_entity = [&raw.customers, &raw.transactions, &raw.trading_activity];
    let mut plans: [Option<SqlEntityPlan>; 3] = [None, None, None];
    let mut complete = true;
    for entity in Entity::ALL {
        let key = format!("sql.{entity}");
        match (by_entity[entity as usize], entities.contains(&entity)) {
            (Some(raw), _) => match entity_plan(entity, raw, zone, &key, problems) {
                Some(plan) => plans[entity as usize] = Some(plan),
                None => complete = false,
            },
            (None, true) => {
                problems.add(
                    &key,
                    format!("a [{key}] table is required to pull {entity} (or leave it out of `entities`)"),
                );
                complete = false;
            }
            (None, false) => {}
        }
    }
    Some(SqlPlan {
        engine,
        url: url?,
        password: password?,
        tls: tls?,
        ca_file: raw.ca_file.as_ref().map(PathBuf::from),
        max_connections: max_connections?,
        statement_timeout: statement_timeout?,
        connect_timeout: connect_timeout?,
        max_retry_time: max_retry_time?,
        page_size: page_size?,
        naive_zone: naive_zone?,
        epoch: epoch?,
        entities: if complete { plans } else { return None },
    })
}

pub(super) fn check_url(engine: Engine, text: &str) -> Result<String, String> {
    let url = url::Url::parse(text).map_err(|e| format!("`{text}` is not a URL: {e}"))?;
    let schemes: &[&str] = match engine {
        Engine::Postgres => &["postgres", "postgresql"],
        Engine::MySql => &["mysql", "mariadb"],
        Engine::Sqlite => &["sqlite"],
    };
    if !schemes.contains(&url.scheme()) {
        return Err(format!(
            "a {} URL starts with {}://",
            engine.as_str(),
            schemes[0]
        ));
    }
    if url.password().is_some() {
        return Err(
            "the URL holds a password: put it in password_env or password_file instead".into(),
        );
    }
    Ok(text.to_owned())
}

fn column(
    value: &Option<String>,
    default: &str,
    key: &str,
    problems: &mut Problems,
) -> Option<String> {
    let name = value.as_deref().unwrap_or(default);
    if is_identifier(name, false) {
        Some(name.to_owned())
    } else {
        problems.add(
            key,
            format!("`{name}` is not a column name (letters, digits and _; alias it in a query)"),
        );
        None
    }
}

fn entity_plan(
    entity: Entity,
    raw: &RawSqlEntity,
    zone: &TimeZone,
    key: &str,
    problems: &mut Problems,
) -> Option<SqlEntityPlan> {
    let from = match (&raw.table, &raw.query) {
        (Some(table), None) if is_identifier(table, true) => Some(From::Table(table.clone())),
        (Some(table), None) => {
            problems.add(
                &format!("{key}.table"),
                format!("`{table}` is not a table name (`name` or `schema.name`)"),
            );
            None
        }
        (None, Some(query)) => Some(From::Query(query.trim().trim_end_matches(';').to_owned())),
        _ => {
            problems.add(key, "set exactly one of `table` and `query`");
            None
        }
    };
    let deals = match (&raw.deals, entity) {
        (None, _) => Some(None),
        (Some(deals), Entity::TradingActivity) => {
            deals_plan(deals, zone, &format!("{key}.deals"), problems).map(Some)
        }
        (Some(_), _) => {
            problems.add(
                &format!("{key}.deals"),
                "only trading_activity can be computed from deals",
            );
            None
        }
    };
    let cursor = column(
        &raw.cursor,
        "last_modified_date",
        &format!("{key}.cursor"),
        problems,
    );
    let deals = deals?;
    let default_key: Vec<String> = match &deals {
        Some(d) => vec![d.deal.clone()],
        None => entity
            .key_fields()
            .iter()
            .map(|f| (*f).to_owned())
            .collect(),
    };
    let mut keys = Vec::new();
    for (i, name) in raw.key.clone().unwrap_or(default_key).iter().enumerate() {
        keys.push(column(
            &Some(name.clone()),
            "",
            &format!("{key}.key[{i}]"),
            problems,
        ));
    }
    if keys.is_empty() {
        problems.add(&format!("{key}.key"), "at least one key column is required");
        return None;
    }
    let key_columns: Option<Vec<String>> = keys.into_iter().collect();
    Some(SqlEntityPlan {
        from: from?,
        cursor: cursor?,
        key: key_columns?,
        deals,
    })
}

fn deals_plan(
    raw: &RawDeals,
    zone: &TimeZone,
    key: &str,
    problems: &mut Problems,
) -> Option<DealsPlan> {
    let mut col = |value: &Option<String>, default: &str, name: &str| {
        column(value, default, &format!("{key}.{name}"), problems)
    };
    let deal = col(&raw.deal, "Deal", "deal");
    let login = col(&raw.login, "Login", "login");
    let time = col(&raw.time, "Time", "time");
    let symbol = col(&raw.symbol, "Symbol", "symbol");
    let action = col(&raw.action, "Action", "action");
    let entry = col(&raw.entry, "Entry", "entry");
    let volume = col(&raw.volume, "Volume", "volume");
    let commission = col(&raw.commission, "Commission", "commission");
    let swap = col(&raw.swap, "Storage", "swap");
    let profit = col(&raw.profit, "Profit", "profit");
    let currency = match (&raw.currency, &raw.currency_const) {
        (Some(_), Some(_)) => {
            problems.add(
                &format!("{key}.currency"),
                "set currency or currency_const, not both",
            );
            None
        }
        (None, Some(code)) => Some(Currency::Const(code.clone())),
        (column_name, None) => col(column_name, "Currency", "currency").map(Currency::Column),
    };
    let volume_per_lot = match raw
        .volume_per_lot
        .as_deref()
        .unwrap_or("10000")
        .parse::<Decimal>()
    {
        Ok(d) if d > Decimal::ZERO => Some(d),
        _ => {
            problems.add(
                &format!("{key}.volume_per_lot"),
                "must be a positive number (10000 for MT5 Volume)",
            );
            None
        }
    };
    let day_start = problems.take(
        &format!("{key}.day_start"),
        raw.day_start
            .as_deref()
            .unwrap_or("00:00")
            .parse::<Time>()
            .map_err(|_| "must be a wall-clock time such as 00:00 or 17:00".to_owned()),
    );
    let day_zone = match &raw.day_zone {
        None => Some(zone.clone()),
        Some(name) => problems.take(&format!("{key}.day_zone"), parse_zone(name)),
    };
    let lots_on = match raw.lots_on.as_deref().unwrap_or("all") {
        "all" => Some(LotsOn::All),
        "in" => Some(LotsOn::In),
        "out" => Some(LotsOn::Out),
        other => {
            problems.add(
                &format!("{key}.lots_on"),
                format!("`{other}` is not one of all, in, out"),
            );
            None
        }
    };
    Some(DealsPlan {
        deal: deal?,
        login: login?,
        time: time?,
        symbol: symbol?,
        action: action?,
        entry: entry?,
        volume: volume?,
        commission: commission?,
        swap: swap?,
        profit: profit?,
        currency: currency?,
        volume_per_lot: volume_per_lot?,
        day_start: day_start?,
        day_zone: day_zone?,
        lots_on: lots_on?,
    })
}
