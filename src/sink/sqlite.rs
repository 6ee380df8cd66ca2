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

use std::sync::LazyLock;

use rusqlite::{Transaction, params};

use crate::model::{Entity, Record};

/// Inserts or updates `record` on its natural key. Idempotent: the same record twice is one row.
pub fn upsert(tx: &Transaction, broker: &str, record: &Record) -> rusqlite::Result<()> {
    write(tx, &SQL[record.entity() as usize].upsert, broker, record)
}

/// Appends `record` to its entity's staging table; `merge` upserts it later. Idempotent once
/// merged: staging the same record twice merges into one row.
pub fn stage(tx: &Transaction, broker: &str, record: &Record) -> rusqlite::Result<()> {
    write(tx, &SQL[record.entity() as usize].stage, broker, record)
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

/// Whether the store holds `customer_id` of `broker`.
pub fn customer_exists(
    tx: &Transaction,
    broker: &str,
    customer_id: &str,
) -> rusqlite::Result<bool> {
    let mut stmt = tx.prepare_cached(
        "SELECT 1 FROM customers INDEXED BY customers_by_key
         WHERE broker = ?1 AND customer_id = ?2",
    )?;
    stmt.exists(params![broker, customer_id])
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
        // have record by record.
        merge: format!(
            "INSERT INTO {table} ({columns}) SELECT {columns} FROM staged_{table} WHERE true
             ORDER BY broker, {keys}, rowid {on_conflict}",
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

/// Binds `record` to `sql`, whose parameters are `broker` then the entity's fields in order.
fn write(tx: &Transaction, sql: &str, broker: &str, record: &Record) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(sql)?;
    match record {
        Record::Customer(c) => stmt.execute(params![
            broker,
            c.customer_id,
            c.signup_date.to_string(),
            c.last_modified_date.map(|t| t.to_string()),
            c.affiliate_id,
            c.campaign_id,
            c.click_id,
            c.lang_id,
            c.country_code,
            c.kyc_status_id,
            c.sales_status_id,
            c.trading_account_type,
            c.leverage,
            c.first_name,
            c.last_name,
            c.email,
        ]),
        Record::Transaction(t) => stmt.execute(params![
            broker,
            t.transaction_id,
            t.customer_id,
            t.transaction_type.as_str(),
            t.amount.to_string(),
            t.currency,
            t.transaction_date.to_string(),
            t.status,
            t.last_modified_date.map(|t| t.to_string()),
        ]),
        Record::TradingActivity(a) => stmt.execute(params![
            broker,
            a.date.to_string(),
            a.customer_id,
            a.instrument,
            a.lots_traded.to_string(),
            a.volume_usd.map(|d| d.to_string()),
            a.spread_cost.map(|d| d.to_string()),
            a.commission.map(|d| d.to_string()),
            a.pnl.map(|d| d.to_string()),
            a.currency,
            a.last_modified_date.map(|t| t.to_string()),
        ]),
    }?;
    Ok(())
}
