//! Reconciliation: is the store equal to the broker, day by day and key by key?
//!
//! The broker is read (read-only, with the connector's own source, mapping and validation)
//! over every record it changed since the range's first day, into a scratch SQLite file beside
//! the store with the store's own schema and upsert — so both sides hold records normalised the
//! same way, and memory stays at one page whatever the range. Then SQL compares the two sides
//! on the natural key and every field, and per business day (`signup_date`'s and
//! `transaction_date`'s UTC day, activity's `date`) counts and sums: amounts per currency;
//! lots, commission and P&L per currency.
//!
//! What a delta cursor can never see — a broker row changed without a `last_modified_date`
//! bump, a store row damaged or deleted — shows up here as `different` or `missing`. `repair`
//! sends those records through the normal pipeline (validation, quarantine, sink; no cursor
//! moves) and deletes from the embedded store what the broker no longer has.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::path::{Path, PathBuf};

use jiff::civil::Date;
use jiff::{SignedDuration, Timestamp};
use rusqlite::{Connection, OptionalExtension, params};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::Value;
use tracing::{info, warn};

use crate::engine::{EngineError, Runner, check};
use crate::model::Entity;
use crate::sink::Stage;
use crate::source::Window;
use crate::state::Reconciliation;
use crate::state::Store;
use crate::telemetry;

/// The days compared: both ends inclusive, UTC calendar days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Range {
    pub from: Date,
    pub to: Date,
}

/// Counts and sums of one side of one day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub count: u64,
    /// `field currency` → sum, e.g. `amount EUR`.
    pub sums: BTreeMap<String, Decimal>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DayTotals {
    pub day: String,
    pub broker: Totals,
    pub store: Totals,
}

/// One key that differs, on its business day; `fields` names what differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diff {
    pub day: String,
    pub key: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub broker: String,
    pub entity: Entity,
    pub range: Range,
    /// Every day either side has a record on, with its totals.
    pub days: Vec<DayTotals>,
    /// At the broker, not in the store.
    pub missing: Vec<Diff>,
    /// In both, with different fields.
    pub different: Vec<Diff>,
    /// In the store, no longer at the broker.
    pub gone: Vec<Diff>,
    /// The broker's records in the range that fail validation: in quarantine, not compared.
    pub quarantined_at_broker: u64,
    /// The broker's records held in the store until their customer arrives: known, not missing.
    pub held: u64,
    /// When the broker's database computed the daily totals: the days read row by row (those
    /// whose totals differ). Absent when every record of the range was read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub days_read: Option<usize>,
}

impl Report {
    pub fn equal(&self) -> bool {
        self.missing.is_empty() && self.different.is_empty() && self.gone.is_empty()
    }

    /// Days whose counts or sums differ.
    pub fn days_differing(&self) -> usize {
        self.days.iter().filter(|d| d.broker != d.store).count()
    }

    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} {} {}..{}: {} missing, {} different, {} gone from the broker; {} of {} days differ{}",
            self.broker,
            self.entity,
            self.range.from,
            self.range.to,
            self.missing.len(),
            self.different.len(),
            self.gone.len(),
            self.days_differing(),
            self.days.len(),
            match (self.quarantined_at_broker, self.held) {
                (0, 0) => String::new(),
                (q, h) => format!(
                    "; not compared: {q} quarantined at the broker, {h} held for their customer"
                ),
            }
        );
        for d in &self.days {
            let mark = if d.broker == d.store { " " } else { "≠" };
            let _ = write!(
                out,
                "{mark} {}  broker {:>6}  store {:>6}",
                d.day, d.broker.count, d.store.count
            );
            let labels: BTreeSet<&String> =
                d.broker.sums.keys().chain(d.store.sums.keys()).collect();
            for label in labels {
                let b = d.broker.sums.get(label).copied().unwrap_or_default();
                let s = d.store.sums.get(label).copied().unwrap_or_default();
                let _ = write!(out, "  {label} {} / {}", b.normalize(), s.normalize());
            }
            out.push('\n');
        }
        for (what, diffs) in [
            ("missing", &self.missing),
            ("different", &self.different),
            ("gone", &self.gone),
        ] {
            for d in diffs {
                let fields = if d.fields.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", d.fields.join(", "))
                };
                let _ = writeln!(out, "{what:<9}  {}  {}{fields}", d.day, d.key);
            }
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("reconcile scratch database {path}: {source}")]
    Scratch {
        path: PathBuf,
        source: rusqlite::Error,
    },
}

/// The business day of a stored row, as SQL over the entity's table.
fn day_sql(entity: Entity) -> &'static str {
    match entity {
        Entity::Customers => "substr(signup_date, 1, 10)",
        Entity::Transactions => "substr(transaction_date, 1, 10)",
        Entity::TradingActivity => "date",
    }
}

/// The fields summed per day and currency.
fn summed(entity: Entity) -> &'static [&'static str] {
    match entity {
        Entity::Customers => &[],
        Entity::Transactions => &["amount"],
        Entity::TradingActivity => &["lots_traded", "commission", "pnl"],
    }
}

/// A scratch database beside the store, removed when dropped.
struct Scratch {
    // A `Connection` is `Send` but not `Sync`; the daemon awaits with a `&Scratch` held.
    conn: std::sync::Mutex<Connection>,
    path: PathBuf,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for base in ["", "-store"] {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let _ = std::fs::remove_file(format!("{}{base}{suffix}", self.path.display()));
            }
        }
    }
}

impl Scratch {
    /// A scratch database beside the SQLite store, with the store attached read-only as
    /// `store`. With the PostgreSQL state, the scratch is in the temporary folder and `store`
    /// is a local copy of the broker's rows of `entity` over `range` (and its held records),
    /// streamed in: the comparison's SQL is the same either way.
    fn create(
        store: &Store,
        broker: &str,
        entity: Entity,
        range: Range,
    ) -> Result<Scratch, ReconcileError> {
        let sqlite = store.path().ok();
        let dir = sqlite
            .and_then(Path::parent)
            .map_or_else(std::env::temp_dir, Path::to_owned);
        let path = dir.join(format!(
            "reconcile-{broker}-{entity}-{}-{}.db",
            std::process::id(),
            Timestamp::now().as_nanosecond()
        ));
        let fail = |source| ReconcileError::Scratch {
            path: path.clone(),
            source,
        };
        let conn = Connection::open(&path).map_err(fail)?;
        // From here on, dropping the scratch removes its files.
        let scratch = Scratch {
            conn: std::sync::Mutex::new(conn),
            path,
        };
        let copy = scratch.copy_path();
        let init = |conn: &mut Connection| -> rusqlite::Result<()> {
            conn.pragma_update(None, "journal_mode", "OFF")?;
            conn.pragma_update(None, "synchronous", "OFF")?;
            crate::state::schema::migrate(conn)?;
            conn.execute_batch(
                "CREATE TABLE reconcile_raw (record_key TEXT PRIMARY KEY, valid INTEGER NOT NULL,
                     modified TEXT, raw TEXT NOT NULL) WITHOUT ROWID;
                 CREATE TABLE read_days (day TEXT PRIMARY KEY) WITHOUT ROWID;",
            )?;
            match sqlite {
                // The store, read-only: the comparison never writes to it.
                Some(store) => {
                    let uri = format!("file:{}?mode=ro", store.display());
                    conn.execute("ATTACH DATABASE ?1 AS store", [uri])?;
                }
                None => {
                    crate::state::schema::migrate(&mut Connection::open(&copy)?)?;
                    conn.execute("ATTACH DATABASE ?1 AS store", [copy.display().to_string()])?;
                }
            }
            Ok(())
        };
        if let Err(e) = init(&mut scratch.lock()) {
            return Err(scratch.fail(e));
        }
        if let Some(pg) = store.postgres() {
            scratch.copy_from(pg, broker, entity, range)?;
        }
        Ok(scratch)
    }

    /// Where the local copy of a PostgreSQL store's rows goes.
    fn copy_path(&self) -> PathBuf {
        PathBuf::from(format!("{}-store", self.path.display()))
    }

    fn copy_from(
        &self,
        pg: &crate::state::postgres::PgStore,
        broker: &str,
        entity: Entity,
        range: Range,
    ) -> Result<(), ReconcileError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(|e| self.fail(e))?;
        let fields = entity.fields();
        let insert = format!(
            "INSERT OR REPLACE INTO store.{} (broker, {}) VALUES (?1, {})",
            entity.as_str(),
            fields.join(", "),
            (2..=fields.len() + 1)
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let days = (range.from.to_string(), range.to.to_string());
        let mut failed: Option<rusqlite::Error> = None;
        let mut stmt = tx.prepare(&insert).map_err(|e| self.fail(e))?;
        let copied = pg.export_rows(broker, entity, day_sql(entity), &days, |row| {
            let mut values: Vec<Option<&str>> = vec![Some(broker)];
            values.extend(row.iter().map(Option::as_deref));
            if let Err(e) = stmt.execute(rusqlite::params_from_iter(values)) {
                failed.get_or_insert(e);
            }
        });
        drop(stmt);
        let mut held = tx
            .prepare(
                "INSERT OR REPLACE INTO store.held (broker, entity, record_key, customer_id, record,
                     first_seen, last_seen) VALUES (?1, ?2, ?3, ?4, ?5, '', '')",
            )
            .map_err(|e| self.fail(e))?;
        let copied_held = pg.export_held(broker, entity, |key, customer, record| {
            if let Err(e) = held.execute(rusqlite::params![
                broker,
                entity.as_str(),
                key,
                customer,
                record
            ]) {
                failed.get_or_insert(e);
            }
        });
        drop(held);
        for result in [copied, copied_held] {
            result.map_err(|source| EngineError::Store {
                broker: broker.to_owned(),
                entity,
                source,
            })?;
        }
        if let Some(e) = failed {
            return Err(self.fail(e));
        }
        tx.commit().map_err(|e| self.fail(e))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fail(&self, source: rusqlite::Error) -> ReconcileError {
        ReconcileError::Scratch {
            path: self.path.clone(),
            source,
        }
    }
}

/// Compares `entity` of the runner's broker over `range`. Reads the broker; writes nothing
/// but the scratch file. A broker that fails mid-read fails the reconciliation.
///
/// A database source counts and sums per day itself (one aggregate query), and only the days
/// whose totals differ from the store's are read row by row. Other sources are read whole:
/// every record changed since the range's first day.
pub async fn compare(
    runner: &Runner<'_>,
    entity: Entity,
    range: Range,
    now: Timestamp,
) -> Result<(Report, ScratchHandle), ReconcileError> {
    let plan = runner.plan;
    let scratch = Scratch::create(runner.store, &plan.broker, entity, range)?;
    let start_of = |d: Date| {
        d.to_zoned(jiff::tz::TimeZone::UTC)
            .map(|z| z.timestamp())
            .unwrap_or(Timestamp::UNIX_EPOCH)
    };
    let (first, after_last) = (
        start_of(range.from),
        start_of(range.to.tomorrow().unwrap_or(range.to)),
    );
    let source_error = |source| EngineError::Source {
        broker: plan.broker.clone(),
        entity,
        source,
    };
    if let Some((broker_days, day_column, sql)) =
        pushdown(runner, entity, first, after_last).await?
    {
        let store_days = totals(&scratch.lock(), "store", &plan.broker, entity, range)
            .map_err(|e| scratch.fail(e))?;
        let days: BTreeSet<&String> = broker_days.keys().chain(store_days.keys()).collect();
        let differing: Vec<String> = days
            .into_iter()
            .filter(|d| broker_days.get(*d) != store_days.get(*d))
            .cloned()
            .collect();
        for day in &differing {
            let Ok(date) = day.parse::<Date>() else {
                continue;
            };
            let window = Window {
                from: start_of(date),
                // Inclusive: the last microsecond of the day (the finest a database keeps).
                to: start_of(date.tomorrow().unwrap_or(date)) - SignedDuration::from_micros(1),
            };
            let mut pager = sql.pages_by(entity, &day_column, window);
            while let Some(page) = runner.next_page(&mut pager).await.map_err(source_error)? {
                keep_page(&scratch, &plan.broker, entity, page.records, &plan.mapping)?;
            }
            scratch
                .lock()
                .execute("INSERT OR IGNORE INTO read_days (day) VALUES (?1)", [day])
                .map_err(|e| scratch.fail(e))?;
        }
        info!(broker = %plan.broker, entity = %entity, days_read = differing.len(),
              "Daily totals compared in the database.");
        let report = scratch_report(&scratch, &plan.broker, entity, range, Some(broker_days))
            .map_err(|e| scratch.fail(e))?;
        return Ok((report, ScratchHandle(scratch)));
    }
    // Every record whose business day is in the range was last changed on or after that day
    // (a record changes when it happens or later); the lookback covers a replica's lag.
    let start = first - plan.sync.lookback;
    let end = now - plan.sync.settle;
    let floor = |t: Timestamp| Timestamp::from_second(t.as_second()).unwrap_or(t);
    let window = Window {
        from: floor(start.min(end)),
        to: floor(end),
    };
    let mut pager = runner.source.pages(entity, window);
    let mut pulled = 0u64;
    while let Some(page) = runner.next_page(&mut pager).await.map_err(source_error)? {
        pulled += page.records.len() as u64;
        keep_page(&scratch, &plan.broker, entity, page.records, &plan.mapping)?;
    }
    info!(broker = %plan.broker, entity = %entity, pulled, "Broker read for reconciliation.");
    let report =
        scratch_report(&scratch, &plan.broker, entity, range, None).map_err(|e| scratch.fail(e))?;
    Ok((report, ScratchHandle(scratch)))
}

/// The business date of each entity: what a report's days are days of.
fn day_field(entity: Entity) -> &'static str {
    match entity {
        Entity::Customers => "signup_date",
        Entity::Transactions => "transaction_date",
        Entity::TradingActivity => "date",
    }
}

type Pushed<'a> = (
    BTreeMap<String, Totals>,
    String,
    &'a crate::source::sql::SqlSource,
);

/// The broker's per-day totals, computed by its database, when it is one and the mapping
/// reads the fields involved as plain columns.
async fn pushdown<'a>(
    runner: &Runner<'a>,
    entity: Entity,
    from: Timestamp,
    to: Timestamp,
) -> Result<Option<Pushed<'a>>, ReconcileError> {
    let Some(sql) = runner.source.as_sql() else {
        return Ok(None);
    };
    let mapping = &runner.plan.mapping;
    let Some(day_column) = mapping.plain_column(entity, day_field(entity)) else {
        return Ok(None);
    };
    let currency = match summed(entity) {
        [] => None,
        _ => match mapping.plain_column(entity, "currency") {
            Some(c) => Some(c),
            None => return Ok(None),
        },
    };
    let mut sums = Vec::new();
    for field in summed(entity) {
        match mapping.plain_column(entity, field) {
            Some(c) => sums.push(c),
            None => return Ok(None),
        }
    }
    let rows = sql
        .day_totals(entity, day_column, currency, &sums, from, to)
        .await
        .map_err(|source| EngineError::Source {
            broker: runner.plan.broker.clone(),
            entity,
            source,
        })?;
    let Some(rows) = rows else {
        return Ok(None);
    };
    let mut days: BTreeMap<String, Totals> = BTreeMap::new();
    for row in rows {
        let totals = days.entry(row.day).or_default();
        totals.count += row.count;
        for (field, sum) in summed(entity).iter().zip(row.sums) {
            *totals
                .sums
                .entry(format!("{field} {}", row.currency))
                .or_default() += sum;
        }
    }
    Ok(Some((days, day_column.to_owned(), sql)))
}

/// The broker's side, kept for a repair.
pub struct ScratchHandle(Scratch);

fn keep_page(
    scratch: &Scratch,
    broker: &str,
    entity: Entity,
    records: Vec<crate::normalise::RawRecord>,
    mapping: &crate::normalise::Mapping,
) -> Result<(), ReconcileError> {
    let conn = scratch.lock();
    let tx = conn.unchecked_transaction().map_err(|e| scratch.fail(e))?;
    let result = (|| -> rusqlite::Result<()> {
        for raw in records {
            let text = raw.text();
            match check(entity, raw, mapping) {
                Ok(valid) => {
                    crate::sink::sqlite::upsert(&tx, broker, &valid.record)?;
                    let modified = valid.record.last_modified_date().map(|t| t.to_string());
                    keep_raw(&tx, &valid.record.key(), true, modified, &text)?;
                }
                Err(reject) => keep_raw(&tx, &reject.key, false, None, &text)?,
            }
        }
        Ok(())
    })();
    result.map_err(|e| scratch.fail(e))?;
    tx.commit().map_err(|e| scratch.fail(e))
}

/// The newest version of a record wins, as in the store.
fn keep_raw(
    tx: &rusqlite::Transaction,
    key: &str,
    valid: bool,
    modified: Option<String>,
    raw: &str,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO reconcile_raw (record_key, valid, modified, raw) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (record_key) DO UPDATE SET valid = excluded.valid,
             modified = excluded.modified, raw = excluded.raw
         WHERE excluded.modified IS NULL OR reconcile_raw.modified IS NULL
            OR julianday(excluded.modified) >= julianday(reconcile_raw.modified)",
    )?
    .execute(params![key, valid, modified, raw])?;
    Ok(())
}

fn key_sql(entity: Entity, alias: &str) -> String {
    entity
        .key_fields()
        .iter()
        .map(|f| format!("{alias}.{f}"))
        .collect::<Vec<_>>()
        .join(" || '|' || ")
}

/// The report from the scratch and the store. With `pushed` (the broker's totals computed by
/// its database) only the days in `read_days` were read, and keys are compared on those.
fn scratch_report(
    scratch: &Scratch,
    broker: &str,
    entity: Entity,
    range: Range,
    pushed: Option<BTreeMap<String, Totals>>,
) -> rusqlite::Result<Report> {
    let conn = scratch.lock();
    // One read transaction: the store is seen as of one instant.
    let tx = conn.unchecked_transaction()?;
    let table = entity.as_str();
    let day = day_sql(entity);
    let (from, to) = (range.from.to_string(), range.to.to_string());
    let join = entity
        .key_fields()
        .iter()
        .map(|f| format!("s.{f} = b.{f}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let bday = day
        .replace("signup_date", "b.signup_date")
        .replace("transaction_date", "b.transaction_date");
    let bday = if entity == Entity::TradingActivity {
        "b.date".to_owned()
    } else {
        bday
    };
    let sday = bday.replace("b.", "s.");
    let (bread, sread) = if pushed.is_some() {
        (
            format!(" AND {bday} IN (SELECT day FROM main.read_days)"),
            format!(" AND {sday} IN (SELECT day FROM main.read_days)"),
        )
    } else {
        (String::new(), String::new())
    };
    let keys = |sql: &str| -> rusqlite::Result<Vec<Diff>> {
        let mut stmt = tx.prepare(sql)?;
        let rows = stmt.query_map(params![broker, from, to], |r| {
            Ok(Diff {
                day: r.get(0)?,
                key: r.get(1)?,
                fields: Vec::new(),
            })
        })?;
        rows.collect()
    };
    // Held orphans are in the store's `held` table, waiting for their customer: known.
    let not_stored = format!(
        "FROM main.{table} b
         WHERE b.broker = ?1 AND {bday} BETWEEN ?2 AND ?3{bread}
           AND NOT EXISTS (SELECT 1 FROM store.{table} s WHERE s.broker = b.broker AND {join})",
    );
    let held_sql = format!(
        "EXISTS (SELECT 1 FROM store.held h WHERE h.broker = b.broker AND h.entity = '{table}'
                 AND h.record_key = {bkey})",
        bkey = key_sql(entity, "b"),
    );
    let missing = keys(&format!(
        "SELECT {bday}, {bkey} {not_stored} AND NOT {held_sql} ORDER BY 1, 2",
        bkey = key_sql(entity, "b"),
    ))?;
    let held: i64 = tx.query_row(
        &format!("SELECT count(*) {not_stored} AND {held_sql}"),
        params![broker, from, to],
        |r| r.get(0),
    )?;
    // In the store, not at the broker — unless the broker's copy failed validation (it is in
    // quarantine: known, not gone).
    let gone = keys(&format!(
        "SELECT {sday}, {skey} FROM store.{table} s
         WHERE s.broker = ?1 AND {sday} BETWEEN ?2 AND ?3{sread}
           AND NOT EXISTS (SELECT 1 FROM main.{table} b WHERE b.broker = s.broker AND {join})
           AND NOT EXISTS (SELECT 1 FROM main.reconcile_raw r WHERE r.record_key = {skey})
         ORDER BY 1, 2",
        skey = key_sql(entity, "s"),
    ))?;
    let fields = entity.fields();
    let select_both: Vec<String> = fields
        .iter()
        .flat_map(|f| [format!("b.{f}"), format!("s.{f}")])
        .collect();
    let differs: Vec<String> = fields
        .iter()
        .map(|f| format!("b.{f} IS NOT s.{f}"))
        .collect();
    let mut different = Vec::new();
    {
        let mut stmt = tx.prepare(&format!(
            "SELECT {bday}, {bkey}, {both} FROM main.{table} b
             JOIN store.{table} s ON s.broker = b.broker AND {join}
             WHERE b.broker = ?1 AND ({bday} BETWEEN ?2 AND ?3 OR {sday} BETWEEN ?2 AND ?3)
               AND ({any})
             ORDER BY 1, 2",
            bkey = key_sql(entity, "b"),
            both = select_both.join(", "),
            any = differs.join(" OR "),
        ))?;
        let mut rows = stmt.query(params![broker, from, to])?;
        while let Some(r) = rows.next()? {
            let mut diff = Diff {
                day: r.get(0)?,
                key: r.get(1)?,
                fields: Vec::new(),
            };
            for (i, f) in fields.iter().enumerate() {
                let b: Option<String> = r.get(2 + 2 * i)?;
                let s: Option<String> = r.get(3 + 2 * i)?;
                if b != s {
                    diff.fields.push((*f).to_owned());
                }
            }
            different.push(diff);
        }
    }
    let quarantined_at_broker: i64 = tx.query_row(
        "SELECT count(*) FROM main.reconcile_raw WHERE valid = 0",
        [],
        |r| r.get(0),
    )?;
    let days_read = match &pushed {
        Some(_) => {
            let n: i64 = tx.query_row("SELECT count(*) FROM main.read_days", [], |r| r.get(0))?;
            Some(n as usize)
        }
        None => None,
    };
    let broker_days = match pushed {
        Some(days) => days,
        None => totals(&tx, "main", broker, entity, range)?,
    };
    let store_days = totals(&tx, "store", broker, entity, range)?;
    let all_days: BTreeSet<&String> = broker_days.keys().chain(store_days.keys()).collect();
    let days = all_days
        .into_iter()
        .map(|d| DayTotals {
            day: d.clone(),
            broker: broker_days.get(d).cloned().unwrap_or_default(),
            store: store_days.get(d).cloned().unwrap_or_default(),
        })
        .collect();
    drop(tx);
    Ok(Report {
        broker: broker.to_owned(),
        entity,
        range,
        days,
        missing,
        different,
        gone,
        quarantined_at_broker: quarantined_at_broker as u64,
        held: held as u64,
        days_read,
    })
}

/// Per-day counts and exact sums of one side, streamed in day order.
fn totals(
    conn: &Connection,
    schema: &str,
    broker: &str,
    entity: Entity,
    range: Range,
) -> rusqlite::Result<BTreeMap<String, Totals>> {
    let sums = summed(entity);
    let currency = if sums.is_empty() { "''" } else { "currency" };
    let columns: String = sums.iter().map(|f| format!(", {f}")).collect();
    let day = day_sql(entity);
    let mut stmt = conn.prepare(&format!(
        "SELECT {day}, {currency}{columns} FROM {schema}.{table}
         WHERE broker = ?1 AND {day} BETWEEN ?2 AND ?3 ORDER BY 1",
        table = entity.as_str(),
    ))?;
    let mut rows = stmt.query(params![
        broker,
        range.from.to_string(),
        range.to.to_string()
    ])?;
    let mut out: BTreeMap<String, Totals> = BTreeMap::new();
    while let Some(r) = rows.next()? {
        let day: String = r.get(0)?;
        let currency: String = r.get(1)?;
        let totals = out.entry(day).or_default();
        totals.count += 1;
        for (i, field) in sums.iter().enumerate() {
            let value: Option<String> = r.get(2 + i)?;
            let value = value
                .and_then(|v| v.parse::<Decimal>().ok())
                .unwrap_or_default();
            *totals
                .sums
                .entry(format!("{field} {currency}"))
                .or_default() += value;
        }
    }
    Ok(out)
}

/// What a repair did.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct Repaired {
    /// Broker records sent through the pipeline again.
    pub resent: u64,
    /// Store rows the broker no longer has, deleted.
    pub deleted: u64,
}

/// Sends the missing and different records through the pipeline and deletes the gone ones
/// from the embedded store. Moves no cursor.
pub async fn repair(
    runner: &Runner<'_>,
    report: &Report,
    scratch: &ScratchHandle,
    delete_gone: bool,
) -> Result<Repaired, ReconcileError> {
    let entity = report.entity;
    let scratch = &scratch.0;
    let keys: Vec<&String> = report
        .missing
        .iter()
        .chain(&report.different)
        .map(|d| &d.key)
        .collect();
    let mut repaired = Repaired::default();
    for chunk in keys.chunks(500) {
        let mut raws = Vec::with_capacity(chunk.len());
        for key in chunk {
            let raw: Option<String> = scratch
                .lock()
                .query_row(
                    "SELECT raw FROM reconcile_raw WHERE record_key = ?1",
                    [key.as_str()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(|e| scratch.fail(e))?;
            if let Some(raw) = raw.and_then(|r| serde_json::from_str::<Value>(&r).ok()) {
                raws.push(raw);
            }
        }
        repaired.resent += raws.len() as u64;
        runner.replay(entity, raws, Stage::Validation).await?;
    }
    if delete_gone && !report.gone.is_empty() {
        let keys: Vec<String> = report.gone.iter().map(|d| d.key.clone()).collect();
        repaired.deleted = runner
            .store
            .delete_records(
                &report.broker,
                entity,
                &keys,
                runner.lease.as_ref().map(|l| l.fence()),
            )
            .map_err(|source| EngineError::Store {
                broker: report.broker.clone(),
                entity,
                source,
            })?;
    } else if !report.gone.is_empty() {
        warn!(broker = %report.broker, entity = %entity, count = report.gone.len(),
              "Records gone from the broker stay at the sink: it cannot delete.");
    }
    Ok(repaired)
}

/// Parses `--from`/`--to` days.
pub fn parse_range(from: &str, to: &str) -> Result<Range, String> {
    let day = |s: &str| {
        s.parse::<Date>()
            .map_err(|_| format!("`{s}` is not a date such as 2026-01-31"))
    };
    let range = Range {
        from: day(from)?,
        to: day(to)?,
    };
    if range.from > range.to {
        return Err(format!("--from {} is after --to {}", range.from, range.to));
    }
    Ok(range)
}

/// The last `days` days up to today (UTC), for scheduled reconciliation.
pub fn last_days(now: Timestamp, days: i64) -> Range {
    let today = now.to_zoned(jiff::tz::TimeZone::UTC).date();
    let from = (now - SignedDuration::from_hours(24 * (days - 1).max(0)))
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    Range { from, to: today }
}

/// A reconciliation: the report, and when repaired, what was done and the report after.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub before: Report,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repaired: Option<Repaired>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<Report>,
}

impl Outcome {
    /// Equal now: after the repair when there was one.
    pub fn equal(&self) -> bool {
        self.after.as_ref().unwrap_or(&self.before).equal()
    }

    fn label(&self) -> &'static str {
        match (&self.repaired, self.equal()) {
            (None, true) => "equal",
            (Some(_), true) => "repaired",
            _ => "drift",
        }
    }
}

/// Compares `entity` over `range`, repairs when asked and needed, then records the outcome
/// (store, metrics, a warning on drift).
pub async fn run(
    runner: &Runner<'_>,
    entity: Entity,
    range: Range,
    repair_drift: bool,
    delete_gone: bool,
) -> Result<Outcome, ReconcileError> {
    let broker = runner.plan.broker.clone();
    let result: Result<Outcome, ReconcileError> = async {
        let (before, scratch) = compare(runner, entity, range, Timestamp::now()).await?;
        if !repair_drift || before.equal() {
            return Ok(Outcome {
                before,
                repaired: None,
                after: None,
            });
        }
        let repaired = repair(runner, &before, &scratch, delete_gone).await?;
        drop(scratch);
        let (after, _) = compare(runner, entity, range, Timestamp::now()).await?;
        Ok(Outcome {
            before,
            repaired: Some(repaired),
            after: Some(after),
        })
    }
    .await;
    let (outcome, drift, repaired, error) = match &result {
        Ok(o) => {
            let b = &o.before;
            let drift = [b.missing.len(), b.different.len(), b.gone.len()].map(|n| n as u64);
            let repaired = o.repaired.map_or(0, |r| r.resent + r.deleted);
            if !b.equal() {
                warn!(broker = %broker, entity = %entity, missing = drift[0], different = drift[1],
                      gone = drift[2], repaired, from = %range.from, to = %range.to,
                      "The store differs from the broker.");
            }
            (o.label(), Some(drift), repaired, None)
        }
        Err(e) => ("failed", None, 0, Some(e.to_string())),
    };
    telemetry::reconciled(&broker, entity, outcome, drift, repaired);
    let [missing, different, gone] = drift.unwrap_or_default();
    let record = Reconciliation {
        broker: broker.clone(),
        entity,
        finished_at: Timestamp::now(),
        range: (range.from.to_string(), range.to.to_string()),
        outcome: outcome.to_owned(),
        missing,
        different,
        gone,
        repaired,
        error,
    };
    if let Err(e) = runner.store.record_reconciliation(&record) {
        warn!(broker = %broker, entity = %entity, error = %e, "Could not record the reconciliation.");
    }
    result
}
