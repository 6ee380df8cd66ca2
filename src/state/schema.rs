//! The SQLite schema, versioned with `PRAGMA user_version`; migrations only go forward.

use rusqlite::Connection;

/// Each entry moves the schema from version `index` to `index + 1`.
const MIGRATIONS: &[&str] = &[
    // v1: the entity store (SPEC §6: Track360 field names, plus `broker`), quarantine, held
    // orphans, checkpoints, run history and backfill progress.
    r#"
    CREATE TABLE customers (
        broker TEXT NOT NULL,
        customer_id TEXT NOT NULL,
        signup_date TEXT NOT NULL,
        last_modified_date TEXT,
        affiliate_id TEXT NOT NULL,
        campaign_id TEXT,
        click_id TEXT,
        lang_id TEXT,
        country_code TEXT,
        kyc_status_id TEXT,
        sales_status_id TEXT,
        trading_account_type TEXT,
        leverage TEXT,
        first_name TEXT,
        last_name TEXT,
        email TEXT,
        PRIMARY KEY (broker, customer_id)
    ) WITHOUT ROWID;

    CREATE TABLE transactions (
        broker TEXT NOT NULL,
        transaction_id TEXT NOT NULL,
        customer_id TEXT NOT NULL,
        transaction_type TEXT NOT NULL,
        amount TEXT NOT NULL,
        currency TEXT NOT NULL,
        transaction_date TEXT NOT NULL,
        status TEXT NOT NULL,
        last_modified_date TEXT,
        PRIMARY KEY (broker, transaction_id)
    ) WITHOUT ROWID;

    CREATE TABLE trading_activity (
        broker TEXT NOT NULL,
        date TEXT NOT NULL,
        customer_id TEXT NOT NULL,
        instrument TEXT NOT NULL,
        lots_traded TEXT NOT NULL,
        volume_usd TEXT,
        spread_cost TEXT,
        commission TEXT,
        pnl TEXT,
        currency TEXT NOT NULL,
        last_modified_date TEXT,
        PRIMARY KEY (broker, date, customer_id, instrument, currency)
    ) WITHOUT ROWID;

    CREATE TABLE quarantine (
        broker TEXT NOT NULL,
        entity TEXT NOT NULL,
        record_key TEXT NOT NULL,
        raw TEXT NOT NULL,
        reasons TEXT NOT NULL,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        times_seen INTEGER NOT NULL,
        PRIMARY KEY (broker, entity, record_key)
    ) WITHOUT ROWID;

    CREATE TABLE held (
        broker TEXT NOT NULL,
        entity TEXT NOT NULL,
        record_key TEXT NOT NULL,
        customer_id TEXT NOT NULL,
        record TEXT NOT NULL,
        first_seen TEXT NOT NULL,
        last_seen TEXT NOT NULL,
        PRIMARY KEY (broker, entity, record_key)
    ) WITHOUT ROWID;
    CREATE INDEX held_by_customer ON held (broker, customer_id);

    CREATE TABLE checkpoints (
        broker TEXT NOT NULL,
        entity TEXT NOT NULL,
        cursor TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (broker, entity)
    ) WITHOUT ROWID;

    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        broker TEXT NOT NULL,
        entity TEXT NOT NULL,
        kind TEXT NOT NULL,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        outcome TEXT NOT NULL,
        window_from TEXT,
        window_to TEXT,
        pages INTEGER NOT NULL DEFAULT 0,
        pulled INTEGER NOT NULL DEFAULT 0,
        stored INTEGER NOT NULL DEFAULT 0,
        quarantined INTEGER NOT NULL DEFAULT 0,
        held INTEGER NOT NULL DEFAULT 0,
        error TEXT
    );
    CREATE INDEX runs_by_entity ON runs (broker, entity, id);

    CREATE TABLE backfills (
        broker TEXT NOT NULL,
        entity TEXT NOT NULL,
        since TEXT NOT NULL,
        until TEXT NOT NULL,
        done_until TEXT NOT NULL,
        started_at TEXT NOT NULL,
        finished_at TEXT,
        PRIMARY KEY (broker, entity, since)
    ) WITHOUT ROWID;
    "#,
    // v2: what a quarantined record's `raw` is — the broker's record ('validation') or the
    // record as posted to the ingestion API ('delivery') — so that a retry reads it right.
    "ALTER TABLE quarantine ADD COLUMN stage TEXT NOT NULL DEFAULT 'validation';",
    // v3: reconciliations, for `status` and the drift metrics.
    r#"
    CREATE TABLE reconciliations (
        id INTEGER PRIMARY KEY,
        broker TEXT NOT NULL,
        entity TEXT NOT NULL,
        finished_at TEXT NOT NULL,
        range_from TEXT NOT NULL,
        range_to TEXT NOT NULL,
        outcome TEXT NOT NULL,
        missing INTEGER NOT NULL DEFAULT 0,
        different INTEGER NOT NULL DEFAULT 0,
        gone INTEGER NOT NULL DEFAULT 0,
        repaired INTEGER NOT NULL DEFAULT 0,
        error TEXT
    );
    CREATE INDEX reconciliations_by_entity ON reconciliations (broker, entity, id);
    "#,
    // v4: staging tables for backfills (`sink::sqlite::stage`): the entity tables' columns in
    // a rowid table without keys, so that appends are cheap and a merge sorts them by key.
    r#"
    CREATE TABLE staged_customers AS SELECT * FROM customers WHERE false;
    CREATE TABLE staged_transactions AS SELECT * FROM transactions WHERE false;
    CREATE TABLE staged_trading_activity AS SELECT * FROM trading_activity WHERE false;
    -- Every transaction and activity row asks whether its customer is stored: this narrow
    -- copy of the key answers from a few cached pages, where the table itself (whole rows)
    -- would be read from disk at random.
    CREATE INDEX customers_by_key ON customers (broker, customer_id);
    "#,
];

/// Brings the database to the newest schema. Each step runs in its own transaction together
/// with its `user_version` bump, so a crash mid-migration leaves the old version intact.
pub fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let current: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let current = usize::try_from(current).unwrap_or(usize::MAX);
    if current > MIGRATIONS.len() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "database schema version {current} is newer than this build ({}); refusing to touch it",
            MIGRATIONS.len()
        )));
    }
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (version + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}
