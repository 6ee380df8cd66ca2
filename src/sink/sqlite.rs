//! The embedded entity store: upserts of validated records into the SQLite tables named after
//! the Track360 entities (SPEC §6). Runs inside the caller's transaction.
//!
//! Two ways in. A live sync upserts each record on its natural key. A backfill, whose keys
//! arrive in broker order (by `last_modified_date`, so at random for the key's B-tree), appends
//! each record to the entity's `staged_*` table instead — a rowid table, so every insert lands
//! on its last page — in the same transaction as the page's progress; `merge` later upserts the
//! staged rows into the keyed table sorted by key, so that each B-tree page is written once per
//! merge rather than once per record. Either way the same upsert applies, with the same
//! newest-wins rule.

use std::ops::Range;
use std::sync::LazyLock;

use jiff::{Timestamp, civil::Date};
use rusqlite::{Transaction, params};
use rust_decimal::Decimal;

use crate::model::{Entity, Record};
use crate::sink::borrowing::BorrowingStatement;

/// Inserts or updates `record` on its natural key. Idempotent: the same record twice is one row.
/// For one record at a time (a page goes through a `Writer`): the statement is cached.
pub fn upsert(tx: &Transaction, broker: &str, record: &Record) -> rusqlite::Result<()> {
    let mut text = String::new();
    let (values, n) = columns(broker, record, &mut text);
    tx.prepare_cached(&SQL[record.entity() as usize].upsert)?
        .execute(rusqlite::params_from_iter(&values[..n]))
        .map(drop)
}

/// One entity's write statement for a page's records, prepared once and run record by record
/// with the records' texts bound in place (`BorrowingStatement`).
pub struct Writer<'c> {
    stmt: BorrowingStatement<'c>,
    /// A record's instants and decimals, printed here and bound from here.
    text: String,
}

impl<'c> Writer<'c> {
    /// Upserts on the natural key (`upsert`).
    pub fn upsert(tx: &'c Transaction, entity: Entity) -> rusqlite::Result<Writer<'c>> {
        Writer::new(tx, &SQL[entity as usize].upsert)
    }

    /// Appends to the entity's staging table; `merge` upserts the rows later. Idempotent once
    /// merged: staging the same record twice merges into one row.
    pub fn stage(tx: &'c Transaction, entity: Entity) -> rusqlite::Result<Writer<'c>> {
        Writer::new(tx, &SQL[entity as usize].stage)
    }

    fn new(tx: &'c Transaction, sql: &str) -> rusqlite::Result<Writer<'c>> {
        Ok(Writer {
            stmt: BorrowingStatement::prepare(tx, sql)?,
            text: String::new(),
        })
    }

    /// Runs the statement for `record`, which is of the writer's entity.
    pub fn write(&mut self, broker: &str, record: &Record) -> rusqlite::Result<()> {
        let (values, n) = columns(broker, record, &mut self.text);
        self.stmt.execute(&values[..n])
    }
}

/// The most columns a table has (customers: the broker and 15 fields).
const MAX_COLUMNS: usize = 16;

/// `record`'s row as the statements bind it: `broker`, then the record's fields in the
/// entity's order (`None` is NULL), and how many. Instants and decimals are printed into
/// `text` first, one after the other, then borrowed from it.
fn columns<'a>(
    broker: &'a str,
    record: &'a Record,
    text: &'a mut String,
) -> ([Option<&'a str>; MAX_COLUMNS], usize) {
    let mut values = [None; MAX_COLUMNS];
    let mut put = |row: &[Option<&'a str>]| {
        values[..row.len()].copy_from_slice(row);
        row.len()
    };
    text.clear();
    let n = match record {
        Record::Customer(c) => {
            let signup = shown(text, Some(c.signup_date));
            let modified = shown(text, c.last_modified_date);
            let text = text.as_str();
            put(&[
                Some(broker),
                Some(&c.customer_id),
                part(text, signup),
                part(text, modified),
                Some(&c.affiliate_id),
                c.campaign_id.as_deref(),
                c.click_id.as_deref(),
                c.lang_id.as_deref(),
                c.country_code.as_deref(),
                c.kyc_status_id.as_deref(),
                c.sales_status_id.as_deref(),
                c.trading_account_type.as_deref(),
                c.leverage.as_deref(),
                c.first_name.as_deref(),
                c.last_name.as_deref(),
                c.email.as_deref(),
            ])
        }
        Record::Transaction(t) => {
            let amount = shown(text, Some(t.amount));
            let date = shown(text, Some(t.transaction_date));
            let modified = shown(text, t.last_modified_date);
            let text = text.as_str();
            put(&[
                Some(broker),
                Some(&t.transaction_id),
                Some(&t.customer_id),
                Some(t.transaction_type.as_str()),
                part(text, amount),
                Some(&t.currency),
                part(text, date),
                Some(&t.status),
                part(text, modified),
            ])
        }
        Record::TradingActivity(a) => {
            let date = shown(text, Some(a.date));
            let lots = shown(text, Some(a.lots_traded));
            let volume = shown(text, a.volume_usd);
            let spread = shown(text, a.spread_cost);
            let commission = shown(text, a.commission);
            let pnl = shown(text, a.pnl);
            let modified = shown(text, a.last_modified_date);
            let text = text.as_str();
            put(&[
                Some(broker),
                part(text, date),
                Some(&a.customer_id),
                Some(&a.instrument),
                part(text, lots),
                part(text, volume),
                part(text, spread),
                part(text, commission),
                part(text, pnl),
                Some(&a.currency),
                part(text, modified),
            ])
        }
    };
    debug_assert_eq!(n, record.entity().fields().len() + 1);
    (values, n)
}

/// Appends `value`'s text to `text`; where it is there.
fn shown(text: &mut String, value: Option<impl Shown>) -> Option<Range<usize>> {
    value.map(|value| {
        let start = text.len();
        value.show(text);
        start..text.len()
    })
}

/// The part of `text` that `shown` wrote.
fn part(text: &str, at: Option<Range<usize>>) -> Option<&str> {
    at.and_then(|at| text.get(at))
}

/// A value the store keeps as text: its `Display` text, which is what every row written so far
/// holds and what reads parse back.
trait Shown {
    fn show(self, out: &mut String);
}

impl Shown for Timestamp {
    fn show(self, out: &mut String) {
        use std::fmt::Write;
        let _ = write!(out, "{self}");
    }
}

impl Shown for Date {
    fn show(self, out: &mut String) {
        use std::fmt::Write;
        let _ = write!(out, "{self}");
    }
}

impl Shown for Decimal {
    /// The text `Display` prints (sign, every digit of the mantissa, the point `scale` digits
    /// from the right), written from the mantissa directly: through the formatter, a decimal
    /// cost about 600 instructions, and a backfill writes three for each record on average.
    fn show(self, out: &mut String) {
        let mut buffer = itoa::Buffer::new();
        let digits = buffer.format(self.mantissa().unsigned_abs());
        let scale = self.scale() as usize;
        if self.is_sign_negative() {
            out.push('-');
        }
        if digits.len() > scale {
            let (whole, fraction) = digits.split_at(digits.len() - scale);
            out.push_str(whole);
            if scale > 0 {
                out.push('.');
                out.push_str(fraction);
            }
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', scale - digits.len()));
            out.push_str(digits);
        }
    }
}

/// Upserts every staged row of `entity` (of every broker) into its keyed table, in key order
/// and, per key, in the order staged — the same outcome as upserting each when it was staged —
/// and empties the staging table. Returns the rows merged.
pub fn merge(tx: &Transaction, entity: Entity) -> rusqlite::Result<usize> {
    let sql = &SQL[entity as usize];
    let merged = tx.prepare_cached(&sql.merge)?.execute([])?;
    tx.prepare_cached(&sql.clear)?.execute([])?;
    Ok(merged)
}

/// An upper bound on the rows staged for `entity` (the staging table only grows until merged).
pub fn staged(tx: &Transaction, entity: Entity) -> rusqlite::Result<u64> {
    let n: i64 = tx
        .prepare_cached(&SQL[entity as usize].staged)?
        .query_row([], |r| r.get(0))?;
    Ok(n.max(0) as u64)
}

/// Which of `customer_ids` of `broker` the store holds, in their order: one query for a
/// page's parents (a statement run per id cost more than the index lookups it made).
pub fn customers_found(
    tx: &Transaction,
    broker: &str,
    customer_ids: &[&str],
) -> rusqlite::Result<Vec<bool>> {
    let mut found = vec![false; customer_ids.len()];
    if customer_ids.is_empty() {
        return Ok(found);
    }
    let list = serde_json::to_string(customer_ids)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let mut stmt = tx.prepare_cached(
        "SELECT j.key FROM json_each(?2) j WHERE EXISTS
             (SELECT 1 FROM customers AS c INDEXED BY customers_by_key
              WHERE c.broker = ?1 AND c.customer_id = j.value)",
    )?;
    let mut rows = stmt.query(params![broker, list])?;
    while let Some(row) = rows.next()? {
        let at: i64 = row.get(0)?;
        if let Some(slot) = usize::try_from(at).ok().and_then(|i| found.get_mut(i)) {
            *slot = true;
        }
    }
    Ok(found)
}

/// Notes, in the connection's temporary table `missing_customers`, the customers named by
/// `entity`'s staged rows that the store does not hold; returns whether there are any. A
/// merge asks this once, in key order, so that the index of customers is read front to back
/// once; asked page by page as records arrive, each lookup read a random page of an index that
/// outgrows the page cache (at 2M customers, a read system call a record and a sixth of a 10M
/// backfill's CPU). A table, not a list in memory: a backfill of transactions into a store
/// without customers has as many missing as it has rows.
pub fn note_missing_parents(tx: &Transaction, entity: Entity) -> rusqlite::Result<bool> {
    tx.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS missing_customers (
             broker TEXT NOT NULL, customer_id TEXT NOT NULL, PRIMARY KEY (broker, customer_id)
         ) WITHOUT ROWID;
         DELETE FROM temp.missing_customers;",
    )?;
    // Sorted on the id alone: SQLite's sorter settles a comparison on a sort's first term
    // cheaply, and with a second term every tie (each customer's rows but one) is compared
    // again in full. Made distinct here, row by row (`DISTINCT` has SQLite build an index
    // besides the sort); the rare id of two brokers whose rows interleave is asked twice.
    let mut parents = tx.prepare(&format!(
        "SELECT customer_id, broker FROM staged_{} ORDER BY customer_id",
        entity.as_str()
    ))?;
    let mut exists = tx.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM customers AS c INDEXED BY customers_by_key
                        WHERE c.broker = ?1 AND c.customer_id = ?2)",
    )?;
    let mut note = tx.prepare_cached(
        "INSERT OR IGNORE INTO temp.missing_customers (broker, customer_id) VALUES (?1, ?2)",
    )?;
    let mut any = false;
    let mut last: (String, String) = Default::default();
    let mut rows = parents.query([])?;
    while let Some(row) = rows.next()? {
        let id = row.get_ref(0)?.as_str().unwrap_or_default();
        let broker = row.get_ref(1)?.as_str().unwrap_or_default();
        if last.0 == id && last.1 == broker {
            continue;
        }
        if !exists.query_row(params![broker, id], |r| r.get::<_, bool>(0))? {
            note.execute(params![broker, id])?;
            any = true;
        }
        id.clone_into(&mut last.0);
        broker.clone_into(&mut last.1);
    }
    Ok(any)
}

/// Up to `limit` staged rows of `entity` after rowid `after` whose customer
/// `note_missing_parents` noted as missing, in the order staged: rowid, broker and the record
/// (every stored column that is not NULL, as text, as validation reads it).
pub fn staged_orphans(
    tx: &Transaction,
    entity: Entity,
    after: i64,
    limit: usize,
) -> rusqlite::Result<Vec<(i64, String, serde_json::Value)>> {
    let fields = entity.fields();
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT s.rowid, s.broker, {} FROM staged_{} AS s
         WHERE s.rowid > ?1 AND EXISTS (SELECT 1 FROM temp.missing_customers AS m
                                        WHERE m.broker = s.broker AND m.customer_id = s.customer_id)
         ORDER BY s.rowid LIMIT ?2",
        fields
            .iter()
            .map(|f| format!("s.{f}"))
            .collect::<Vec<_>>()
            .join(", "),
        entity.as_str()
    ))?;
    let mut rows = stmt.query(params![after, limit as i64])?;
    let mut found = Vec::new();
    while let Some(row) = rows.next()? {
        let mut record = serde_json::Map::new();
        for (i, field) in fields.iter().enumerate() {
            if let Some(text) = row.get::<_, Option<String>>(i + 2)? {
                record.insert((*field).to_owned(), serde_json::Value::String(text));
            }
        }
        found.push((row.get(0)?, row.get(1)?, serde_json::Value::Object(record)));
    }
    Ok(found)
}

/// Removes one staged row (held instead of merged).
pub fn unstage(tx: &Transaction, entity: Entity, rowid: i64) -> rusqlite::Result<()> {
    tx.prepare_cached(&format!(
        "DELETE FROM staged_{} WHERE rowid = ?1",
        entity.as_str()
    ))?
    .execute([rowid])?;
    Ok(())
}

/// The statements of one entity's table, made from its field list.
struct Statements {
    upsert: String,
    stage: String,
    merge: String,
    clear: String,
    staged: String,
}

static SQL: LazyLock<[Statements; 3]> = LazyLock::new(|| Entity::ALL.map(statements));

fn statements(entity: Entity) -> Statements {
    let table = entity.as_str();
    let fields = entity.fields();
    let keys = entity.key_fields();
    let columns = format!("broker, {}", fields.join(", "));
    let placeholders: Vec<String> = (1..=fields.len() + 1).map(|i| format!("?{i}")).collect();
    let updates: Vec<String> = fields
        .iter()
        .filter(|f| !keys.contains(f))
        .map(|f| format!("{f} = excluded.{f}"))
        .collect();
    // A stored row is replaced only by a record at least as new as it (`>=`, so an unchanged
    // re-send is harmless): a backfill page fetched just before a record changed must not
    // overwrite the newer state a concurrent sync stored. `julianday` compares instants, not
    // text: as text "…00Z" sorts after "…00.5Z".
    let on_conflict = format!(
        "ON CONFLICT (broker, {keys}) DO UPDATE SET {updates}
         WHERE excluded.last_modified_date IS NULL OR {table}.last_modified_date IS NULL
            OR julianday(excluded.last_modified_date) >= julianday({table}.last_modified_date)",
        keys = keys.join(", "),
        updates = updates.join(", "),
    );
    Statements {
        upsert: format!(
            "INSERT INTO {table} ({columns}) VALUES ({}) {on_conflict}",
            placeholders.join(", ")
        ),
        stage: format!(
            "INSERT INTO staged_{table} ({columns}) VALUES ({})",
            placeholders.join(", ")
        ),
        // `WHERE true` keeps SQLite from reading ON CONFLICT as a join constraint. Within a
        // key, rowid order is the order staged: the newest-wins rule then decides as it would
        // have record by record. No broker in the order: one broker's rows come out in the
        // table's order all the same (brokers interleaved, each in key order), and SQLite's
        // sorter compares on the first column alone (cheaply) only when the sort carries
        // fewer than 13 values — transactions' 2 terms and 10 columns do.
        merge: format!(
            "INSERT INTO {table} ({columns}) SELECT {columns} FROM staged_{table} WHERE true
             ORDER BY {keys}, rowid {on_conflict}",
            keys = keys.join(", "),
        ),
        clear: format!("DELETE FROM staged_{table}"),
        // Two subqueries, each answered from one end of the rowid B-tree (`max(rowid) -
        // min(rowid)` in one select would scan the table).
        staged: format!(
            "SELECT coalesce((SELECT max(rowid) FROM staged_{table})
                 - (SELECT min(rowid) FROM staged_{table}) + 1, 0)"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The store's decimal text must stay `Display`'s, byte for byte: rows written before and
    /// after compare equal, and reconciliation compares texts.
    #[test]
    fn a_decimal_is_shown_as_display_prints_it() {
        let mut cases: Vec<Decimal> = [
            "0",
            "-0",
            "0.00",
            "-0.00",
            "1",
            "-1",
            "0.5",
            "-0.005",
            "10",
            "100.10",
            "123.456",
            "0.0000000000000000000000000001",
            "-0.0000000000000000000000000001",
            "79228162514264337593543950335",
            "-79228162514264337593543950335",
            "7.9228162514264337593543950335",
            "18446744073709551615",
            "18446744073709551616",
            "1e-3",
            "1.5e2",
            "-2.50E+1",
        ]
        .iter()
        .map(|text| {
            Decimal::from_str_exact(text)
                .or_else(|_| Decimal::from_scientific(text))
                .unwrap()
        })
        .collect();
        // Every scale of a few mantissas, both signs.
        for mantissa in [
            0_i128,
            1,
            9,
            10,
            12345,
            99_999_999_999,
            i64::MAX as i128,
            1 << 95,
        ] {
            for scale in 0..=28 {
                for sign in [1, -1] {
                    cases.push(Decimal::from_i128_with_scale(sign * mantissa, scale));
                }
            }
        }
        for decimal in cases {
            let mut shown = String::from("x");
            decimal.show(&mut shown);
            assert_eq!(shown, format!("x{decimal}"), "{decimal:?}");
        }
    }
}
