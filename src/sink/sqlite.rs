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
    let (row, n) = columns(broker, record, &mut text);
    let values = row[..n].iter().map(|column| column.text(&text));
    tx.prepare_cached(&SQL[record.entity() as usize].upsert)?
        .execute(rusqlite::params_from_iter(values))
        .map(drop)
}

/// Records a write statement carries at once. A statement's run has a cost of its own,
/// whatever it writes (a cursor opened, the rowid table's last row found again, the statement
/// halted): run for every record of a backfill's page, it was 3 % of the instructions. More
/// rows a run cost more to prepare (once a page) than they save.
const ROWS: usize = 8;

/// A page's records on their way into one entity's table: upserted on their key, or staged.
/// `Writer::run` writes every record it was given before it returns.
pub struct Writer<'c, 'r> {
    tx: &'c Transaction<'c>,
    sql: &'static Statements,
    staged: bool,
    /// One record a run (the last few of a page).
    one: BorrowingStatement<'c>,
    /// `ROWS` records a run, prepared when a page has that many.
    many: Option<BorrowingStatement<'c>>,
    pending: Vec<(&'r str, &'r Record)>,
    /// The pending records' instants and decimals, printed here and bound from here.
    text: String,
}

impl<'c, 'r> Writer<'c, 'r> {
    /// Runs `write` with a writer of `entity`'s records — appended to its staging table when
    /// `staged` (`merge` upserts them later; idempotent once merged), upserted on their key
    /// otherwise — then writes what is still pending.
    pub fn run<T>(
        tx: &'c Transaction<'c>,
        entity: Entity,
        staged: bool,
        write: impl FnOnce(&mut Writer<'c, 'r>) -> rusqlite::Result<T>,
    ) -> rusqlite::Result<T> {
        let sql = &SQL[entity as usize];
        let mut writer = Writer {
            tx,
            sql,
            staged,
            one: BorrowingStatement::prepare(tx, if staged { &sql.stage } else { &sql.upsert })?,
            many: None,
            pending: Vec::with_capacity(ROWS),
            text: String::new(),
        };
        let done = write(&mut writer)?;
        writer.flush()?;
        Ok(done)
    }

    /// Writes `record` (of the writer's entity) with its broker: now or with the next few.
    pub fn write(&mut self, broker: &'r str, record: &'r Record) -> rusqlite::Result<()> {
        self.pending.push((broker, record));
        if self.pending.len() == ROWS {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the pending records, in the order given (a key written twice ends as the later).
    fn flush(&mut self) -> rusqlite::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.text.clear();
        let mut row_of = Vec::with_capacity(self.pending.len() * MAX_COLUMNS);
        for (broker, record) in &self.pending {
            let (row, n) = columns(broker, record, &mut self.text);
            row_of.extend_from_slice(&row[..n]);
        }
        let text = self.text.as_str();
        let values: Vec<Option<&str>> = row_of.iter().map(|c| c.text(text)).collect();
        if self.pending.len() == ROWS {
            let many = match &mut self.many {
                Some(many) => many,
                none => {
                    let sql = if self.staged {
                        &self.sql.stage_many
                    } else {
                        &self.sql.upsert_many
                    };
                    none.insert(BorrowingStatement::prepare(self.tx, sql)?)
                }
            };
            many.execute(&values)?;
        } else {
            for row in values.chunks(values.len() / self.pending.len()) {
                self.one.execute(row)?;
            }
        }
        self.pending.clear();
        Ok(())
    }
}

/// The most columns a table has (customers: the broker and 15 fields).
const MAX_COLUMNS: usize = 16;

/// One column's value as bound: a record's text, or one printed into the writer's buffer.
#[derive(Clone, Copy)]
enum Column<'a> {
    Text(Option<&'a str>),
    Printed(Option<(usize, usize)>),
}

impl<'a> Column<'a> {
    /// The value, given the buffer `columns` printed into (`None` is NULL).
    fn text(self, printed: &'a str) -> Option<&'a str> {
        match self {
            Column::Text(text) => text,
            Column::Printed(at) => at.and_then(|(start, end)| printed.get(start..end)),
        }
    }
}

/// `record`'s row as the statements bind it — `broker`, then the record's fields in the
/// entity's order — and how many columns. Instants and decimals are appended to `text`.
fn columns<'a>(
    broker: &'a str,
    record: &'a Record,
    text: &mut String,
) -> ([Column<'a>; MAX_COLUMNS], usize) {
    use Column::Text as T;
    let mut values = [Column::Text(None); MAX_COLUMNS];
    let mut put = |row: &[Column<'a>]| {
        values[..row.len()].copy_from_slice(row);
        row.len()
    };
    let n = match record {
        Record::Customer(c) => put(&[
            T(Some(broker)),
            T(Some(&c.customer_id)),
            shown(text, Some(c.signup_date)),
            shown(text, c.last_modified_date),
            T(Some(&c.affiliate_id)),
            T(c.campaign_id.as_deref()),
            T(c.click_id.as_deref()),
            T(c.lang_id.as_deref()),
            T(c.country_code.as_deref()),
            T(c.kyc_status_id.as_deref()),
            T(c.sales_status_id.as_deref()),
            T(c.trading_account_type.as_deref()),
            T(c.leverage.as_deref()),
            T(c.first_name.as_deref()),
            T(c.last_name.as_deref()),
            T(c.email.as_deref()),
        ]),
        Record::Transaction(t) => put(&[
            T(Some(broker)),
            T(Some(&t.transaction_id)),
            T(Some(&t.customer_id)),
            T(Some(t.transaction_type.as_str())),
            shown(text, Some(t.amount)),
            T(Some(&t.currency)),
            shown(text, Some(t.transaction_date)),
            T(Some(&t.status)),
            shown(text, t.last_modified_date),
        ]),
        Record::TradingActivity(a) => put(&[
            T(Some(broker)),
            shown(text, Some(a.date)),
            T(Some(&a.customer_id)),
            T(Some(&a.instrument)),
            shown(text, Some(a.lots_traded)),
            shown(text, a.volume_usd),
            shown(text, a.spread_cost),
            shown(text, a.commission),
            shown(text, a.pnl),
            T(Some(&a.currency)),
            shown(text, a.last_modified_date),
        ]),
    };
    debug_assert_eq!(n, record.entity().fields().len() + 1);
    (values, n)
}

/// `record`'s fields as the stores write them, in the entity's order (`None` is NULL), owned:
/// what the PostgreSQL state binds.
pub fn field_texts(record: &Record) -> Vec<Option<String>> {
    let mut text = String::new();
    let (row, n) = columns("", record, &mut text);
    row[1..n]
        .iter()
        .map(|column| column.text(&text).map(str::to_owned))
        .collect()
}

/// Appends `value`'s text to `text`: the column that stands for it.
fn shown(text: &mut String, value: Option<impl Shown>) -> Column<'static> {
    Column::Printed(value.map(|value| {
        let start = text.len();
        value.show(text);
        (start, text.len())
    }))
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
/// merge asks this once, in key order, so that the index of customers is read front to back;
/// asked page by page as records arrive, each lookup read a random page of an index that
/// outgrows the page cache (at 2M customers, a read system call a record and a sixth of a 10M
/// backfill's CPU). A table, not a list in memory: a backfill of transactions into a store
/// without customers has as many missing as it has rows.
///
/// The staged rows are read in the order staged, a chunk at a time (`PARENT_CHUNK_ROWS` and
/// `PARENT_CHUNK_TEXT`); each chunk's customers are sorted and made distinct here, then found
/// by one walk along the index (`customers_missing`). Sorting every staged row with SQLite
/// (`ORDER BY customer_id`) and looking each customer up with a statement of its own took
/// twice the instructions: a tenth of a 100k backfill's.
pub fn note_missing_parents(tx: &Transaction, entity: Entity) -> rusqlite::Result<bool> {
    note_missing_parents_by(tx, entity, PARENT_CHUNK_ROWS, PARENT_CHUNK_TEXT)
}

fn note_missing_parents_by(
    tx: &Transaction,
    entity: Entity,
    chunk_rows: usize,
    chunk_text: usize,
) -> rusqlite::Result<bool> {
    tx.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS missing_customers (
             broker TEXT NOT NULL, customer_id TEXT NOT NULL, PRIMARY KEY (broker, customer_id)
         ) WITHOUT ROWID;
         DELETE FROM temp.missing_customers;",
    )?;
    let mut staged = tx.prepare(&format!(
        "SELECT customer_id, broker FROM staged_{}",
        entity.as_str()
    ))?;
    let mut note = tx.prepare_cached(
        "INSERT OR IGNORE INTO temp.missing_customers (broker, customer_id) VALUES (?1, ?2)",
    )?;
    let mut any = false;
    let mut chunk = ParentChunk::with_capacity(chunk_rows, chunk_text);
    let mut check = |chunk: &mut ParentChunk| -> rusqlite::Result<()> {
        for (broker, keys) in chunk.sort_distinct() {
            let broker = chunk.brokers[broker].as_str();
            let id = |key: &ParentKey| key.id(&chunk.text);
            customers_missing(tx, broker, &chunk.keys[keys], id, |id| {
                any = true;
                note.execute(params![broker, id]).map(drop)
            })?;
        }
        chunk.clear();
        Ok(())
    };
    let mut rows = staged.query([])?;
    while let Some(row) = rows.next()? {
        let id = row.get_ref(0)?.as_str().unwrap_or_default();
        let broker = row.get_ref(1)?.as_str().unwrap_or_default();
        if !chunk.has_room(id) {
            check(&mut chunk)?;
        }
        chunk.push(broker, id);
    }
    check(&mut chunk)?;
    Ok(any)
}

/// Staged rows whose customers `note_missing_parents` sorts at once, 24 bytes each (9 MiB),
/// and the bytes of their ids (6 MiB): at most 15 MiB, allocated once. Each chunk walks the
/// index of customers once: the more rows a chunk, the closer together its ids lie in the
/// index and the cheaper the walk. At 10M records (2M customers, 4M transactions), chunks of
/// 256k rows stepped over 8 index rows an id and the check took 3.8 s of the transactions'
/// 8.1 s merge; chunks of 441k, 2.8 s, but peak RSS reached 59 MiB (the target is 64).
const PARENT_CHUNK_ROWS: usize = 384 * 1024;
const PARENT_CHUNK_TEXT: usize = 6 * 1024 * 1024;

/// Calls `missing` with the id of each of `ids` (sorted by `id` and distinct) that the store
/// holds no customer of `broker` under. One walk along the index of customers, from the first
/// id on: a few rows stepped over cost less than a lookup each (about 5k instructions: a
/// statement run and a descent of the index), but where the next id is far ahead the walk
/// seeks to it instead.
fn customers_missing<'t, K>(
    tx: &Transaction,
    broker: &str,
    ids: &[K],
    id: impl Fn(&K) -> &'t str,
    mut missing: impl FnMut(&str) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    /// Rows stepped over, without reaching the next id, before the walk seeks to it.
    const SEEK_AFTER: usize = 16;
    let mut walk = tx.prepare_cached(
        "SELECT c.customer_id FROM customers AS c INDEXED BY customers_by_key
         WHERE c.broker = ?1 AND c.customer_id >= ?2 ORDER BY c.customer_id",
    )?;
    let mut next = 0;
    while let Some(from) = ids.get(next).map(&id) {
        let mut rows = walk.query(params![broker, from])?;
        let mut stepped = 0;
        while stepped < SEEK_AFTER {
            let Some(row) = rows.next()? else {
                // Past the broker's last customer: the rest are all missing.
                return ids[next..].iter().try_for_each(|key| missing(id(key)));
            };
            let held = row.get_ref(0)?.as_str()?;
            stepped += 1;
            while let Some(wanted) = ids.get(next).map(&id).filter(|wanted| *wanted <= held) {
                if wanted < held {
                    missing(wanted)?;
                }
                next += 1;
                stepped = 0;
            }
            if next == ids.len() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Customer ids (with their broker) in one buffer, to be sorted as the index of customers is:
/// 24 bytes a row besides the id's text. A comparison looks at an id's first 8 bytes as one
/// number, and at the rest only when those are equal.
struct ParentChunk {
    text: String,
    brokers: Vec<String>,
    keys: Vec<ParentKey>,
}

struct ParentKey {
    /// The id's first 8 bytes, big-endian, zero-padded. A smaller prefix is a smaller id as
    /// SQLite compares texts (bytes, then the shorter first); equal prefixes compare in full.
    prefix: u64,
    start: u32,
    len: u32,
    broker: u32,
}

impl ParentKey {
    fn id<'t>(&self, text: &'t str) -> &'t str {
        &text[self.start as usize..self.start as usize + self.len as usize]
    }
}

impl ParentChunk {
    fn with_capacity(rows: usize, text: usize) -> ParentChunk {
        ParentChunk {
            text: String::with_capacity(text),
            brokers: Vec::new(),
            keys: Vec::with_capacity(rows),
        }
    }

    /// Whether `id` fits without growing the buffers (an empty chunk takes any id).
    fn has_room(&self, id: &str) -> bool {
        self.keys.is_empty()
            || (self.keys.len() < self.keys.capacity()
                && self.text.len() + id.len() <= self.text.capacity())
    }

    fn push(&mut self, broker: &str, id: &str) {
        let broker = match self.brokers.iter().position(|b| b == broker) {
            Some(at) => at,
            None => {
                self.brokers.push(broker.to_owned());
                self.brokers.len() - 1
            }
        };
        let mut head = [0u8; 8];
        let n = id.len().min(8);
        head[..n].copy_from_slice(&id.as_bytes()[..n]);
        self.keys.push(ParentKey {
            prefix: u64::from_be_bytes(head),
            start: self.text.len() as u32,
            len: id.len() as u32,
            broker: broker as u32,
        });
        self.text.push_str(id);
    }

    /// Sorts the keys by broker and id, each once, and returns each broker's run of them
    /// (nothing is allocated beyond one entry a broker).
    fn sort_distinct(&mut self) -> Vec<(usize, Range<usize>)> {
        let text = self.text.as_str();
        let order = |a: &ParentKey, b: &ParentKey| {
            (a.broker, a.prefix)
                .cmp(&(b.broker, b.prefix))
                .then_with(|| a.id(text).cmp(b.id(text)))
        };
        self.keys.sort_unstable_by(order);
        self.keys.dedup_by(|a, b| order(a, b).is_eq());
        let mut runs: Vec<(usize, Range<usize>)> = Vec::new();
        for (at, key) in self.keys.iter().enumerate() {
            let broker = key.broker as usize;
            match runs.last_mut() {
                Some((last, run)) if *last == broker => run.end = at + 1,
                _ => runs.push((broker, at..at + 1)),
            }
        }
        runs
    }

    fn clear(&mut self) {
        self.text.clear();
        self.keys.clear();
    }
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
    upsert_many: String,
    stage: String,
    stage_many: String,
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
    // `rows` rows of `?`s: SQLite numbers them in order, row after row.
    let values = |rows: usize| {
        vec![format!("({})", vec!["?"; fields.len() + 1].join(", ")); rows].join(", ")
    };
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
            "INSERT INTO {table} ({columns}) VALUES {} {on_conflict}",
            values(1)
        ),
        upsert_many: format!(
            "INSERT INTO {table} ({columns}) VALUES {} {on_conflict}",
            values(ROWS)
        ),
        stage: format!(
            "INSERT INTO staged_{table} ({columns}) VALUES {}",
            values(1)
        ),
        stage_many: format!(
            "INSERT INTO staged_{table} ({columns}) VALUES {}",
            values(ROWS)
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
    use crate::model::Customer;

    fn customer(id: &str, affiliate: &str) -> Record {
        Record::Customer(Customer {
            customer_id: id.into(),
            signup_date: "2025-01-01T00:00:00Z".parse().unwrap(),
            // No date to decide by: the later write wins, so order is what is tested.
            last_modified_date: None,
            affiliate_id: affiliate.into(),
            campaign_id: None,
            click_id: Some(format!("click of {id}").into()),
            lang_id: None,
            country_code: Some("GB".into()),
            kyc_status_id: None,
            sales_status_id: None,
            trading_account_type: None,
            leverage: None,
            first_name: None,
            last_name: None,
            email: None,
        })
    }

    /// The walk along the index of customers finds every held id and names every other —
    /// before the first, between, after the last, far ahead (where it seeks instead of
    /// stepping), and of another broker — whichever way it gets there.
    #[test]
    fn the_walk_along_the_customers_names_exactly_the_missing() {
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        crate::state::schema::migrate(&mut conn).unwrap();
        let tx = conn.transaction().unwrap();
        let held: Vec<String> = (0..200).map(|i| format!("c{:04}", i * 2)).collect();
        for id in &held {
            upsert(&tx, "a", &customer(id, "aff")).unwrap();
        }
        upsert(&tx, "b", &customer("c0001", "aff")).unwrap();
        // Every held id, every odd one (missing) now and then, and some beyond the last.
        let mut asked: Vec<String> = (0..420).map(|i| format!("c{i:04}")).collect();
        asked.retain(|id| {
            let n: usize = id[1..].parse().unwrap();
            n.is_multiple_of(2) || n % 7 == 1 || n > 398
        });
        asked.insert(0, "a-before-every-customer".into());
        // Far ahead, past many held rows: found by seeking.
        let asked_sparse = ["c0002", "c0300", "c0301", "c0398", "zzz"];
        for ids in [
            asked.iter().map(String::as_str).collect::<Vec<_>>(),
            asked_sparse.to_vec(),
        ] {
            let mut named = Vec::new();
            customers_missing(
                &tx,
                "a",
                &ids,
                |id| id,
                |id| {
                    named.push(id.to_owned());
                    Ok(())
                },
            )
            .unwrap();
            let expected: Vec<&str> = ids
                .iter()
                .copied()
                .filter(|id| !held.iter().any(|h| h == id))
                .collect();
            assert_eq!(named, expected);
        }
        // Another broker's customers are not this one's.
        let mut named = Vec::new();
        customers_missing(
            &tx,
            "b",
            &["c0000", "c0001", "c0002"],
            |id| id,
            |id| {
                named.push(id.to_owned());
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(named, ["c0000", "c0002"]);
    }

    /// Staged rows are checked a chunk at a time: a customer missing in several chunks, or
    /// twice in one, is noted once; held ones never; nothing missing says so.
    #[test]
    fn every_missing_parent_of_the_staged_rows_is_noted_once() {
        use crate::model::{Transaction as Tx, TransactionType};
        let mut conn = rusqlite::Connection::open_in_memory().unwrap();
        crate::state::schema::migrate(&mut conn).unwrap();
        let tx = conn.transaction().unwrap();
        upsert(&tx, "a", &customer("held", "aff")).unwrap();
        let deposit = |id: usize, customer: &str| {
            Record::Transaction(Tx {
                transaction_id: format!("t{id}").into(),
                customer_id: customer.into(),
                transaction_type: TransactionType::Deposit,
                amount: "1".parse().unwrap(),
                currency: "USD".into(),
                transaction_date: "2025-01-01T00:00:00Z".parse().unwrap(),
                status: "approved".into(),
                last_modified_date: None,
            })
        };
        let staged = |tx: &Transaction, customers: &[&str]| {
            tx.execute("DELETE FROM staged_transactions", []).unwrap();
            let page: Vec<Record> = customers
                .iter()
                .enumerate()
                .map(|(i, c)| deposit(i, c))
                .collect();
            Writer::run(tx, Entity::Transactions, true, |w| {
                page.iter().try_for_each(|r| w.write("a", r))
            })
            .unwrap();
        };
        let noted = |tx: &Transaction| -> Vec<String> {
            tx.prepare("SELECT customer_id FROM temp.missing_customers ORDER BY customer_id")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap()
        };
        staged(&tx, &["m2", "held", "m1", "m2", "held", "m1", "m3", "m2"]);
        for (rows, text) in [(1, 100), (3, 100), (1000, 100), (1000, 5), (1000, 1)] {
            assert!(note_missing_parents_by(&tx, Entity::Transactions, rows, text).unwrap());
            assert_eq!(
                noted(&tx),
                ["m1", "m2", "m3"],
                "{rows} rows, {text} bytes a chunk"
            );
        }
        staged(&tx, &["held", "held"]);
        assert!(!note_missing_parents_by(&tx, Entity::Transactions, 1, 100).unwrap());
        assert!(noted(&tx).is_empty());
    }

    /// A page goes out `ROWS` records a statement and the rest one by one: every record is
    /// written, each column where it belongs, and a key written twice ends as the later write,
    /// whether the two share a statement or not, upserted or staged and merged.
    #[test]
    fn a_writer_writes_every_record_in_order() {
        for staged in [false, true] {
            let mut conn = rusqlite::Connection::open_in_memory().unwrap();
            crate::state::schema::migrate(&mut conn).unwrap();
            let tx = conn.transaction().unwrap();
            // 2 full statements and 5 over; "c1" in both statements and then twice in the
            // rest, "c2" twice in the first statement.
            let mut page: Vec<Record> = (0..ROWS * 2 + 5)
                .map(|i| customer(&format!("c{i}"), &format!("first {i}")))
                .collect();
            page[4] = customer("c2", "second");
            page[ROWS + 3] = customer("c1", "second");
            page[ROWS * 2 + 2] = customer("c1", "third");
            page[ROWS * 2 + 4] = customer("c1", "fourth");
            Writer::run(&tx, Entity::Customers, staged, |w| {
                page.iter().try_for_each(|r| w.write("b", r))
            })
            .unwrap();
            if staged {
                assert_eq!(merge(&tx, Entity::Customers).unwrap(), page.len());
            }
            let rows: Vec<(String, String, Option<String>, Option<String>)> = tx
                .prepare(
                    "SELECT customer_id, affiliate_id, click_id, country_code FROM customers
                     ORDER BY customer_id",
                )
                .unwrap()
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            // Three of the ids were written twice or more.
            assert_eq!(rows.len(), page.len() - 4, "staged: {staged}");
            let affiliate = |id: &str| &rows.iter().find(|r| r.0 == id).unwrap().1;
            assert_eq!(affiliate("c1"), "fourth", "staged: {staged}");
            assert_eq!(affiliate("c2"), "second", "staged: {staged}");
            assert_eq!(affiliate("c19"), "first 19", "staged: {staged}");
            for (id, _, click, country) in &rows {
                assert_eq!(click.as_deref(), Some(format!("click of {id}").as_str()));
                assert_eq!(country.as_deref(), Some("GB"));
            }
        }
    }

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
