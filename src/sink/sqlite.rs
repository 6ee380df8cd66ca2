//! The embedded entity store: upserts of validated records into the SQLite tables named after
//! the Track360 entities (SPEC §6). Runs inside the caller's transaction.

use rusqlite::{Transaction, params};

use crate::model::{Customer, Record, TradingActivity, Transaction as Txn};

// Each upsert's WHERE clause: a stored row is replaced only by a record at least as new as it
// (`>=`, so an unchanged re-send is harmless). A backfill page fetched just before a record
// changed must not overwrite the newer state a concurrent sync stored. `julianday` compares
// instants, not text: as text "…00Z" sorts after "…00.5Z".

/// Inserts or updates `record` on its natural key. Idempotent: the same record twice is one row.
pub fn upsert(tx: &Transaction, broker: &str, record: &Record) -> rusqlite::Result<()> {
    match record {
        Record::Customer(c) => upsert_customer(tx, broker, c),
        Record::Transaction(t) => upsert_transaction(tx, broker, t),
        Record::TradingActivity(a) => upsert_activity(tx, broker, a),
    }
}

/// Whether the store holds `customer_id` of `broker`.
pub fn customer_exists(
    tx: &Transaction,
    broker: &str,
    customer_id: &str,
) -> rusqlite::Result<bool> {
    let mut stmt =
        tx.prepare_cached("SELECT 1 FROM customers WHERE broker = ?1 AND customer_id = ?2")?;
    stmt.exists(params![broker, customer_id])
}

fn upsert_customer(tx: &Transaction, broker: &str, c: &Customer) -> rusqlite::Result<()> {
    const SQL: &str =
        "INSERT INTO customers (broker, customer_id, signup_date, last_modified_date, affiliate_id,
            campaign_id, click_id, lang_id, country_code, kyc_status_id, sales_status_id,
            trading_account_type, leverage, first_name, last_name, email)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)
         ON CONFLICT (broker, customer_id) DO UPDATE SET
            signup_date = excluded.signup_date, last_modified_date = excluded.last_modified_date,
            affiliate_id = excluded.affiliate_id, campaign_id = excluded.campaign_id,
            click_id = excluded.click_id, lang_id = excluded.lang_id,
            country_code = excluded.country_code, kyc_status_id = excluded.kyc_status_id,
            sales_status_id = excluded.sales_status_id,
            trading_account_type = excluded.trading_account_type, leverage = excluded.leverage,
            first_name = excluded.first_name, last_name = excluded.last_name,
            email = excluded.email
         WHERE excluded.last_modified_date IS NULL OR customers.last_modified_date IS NULL
            OR julianday(excluded.last_modified_date) >= julianday(customers.last_modified_date)";
    tx.prepare_cached(SQL)?.execute(params![
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
    ])?;
    Ok(())
}

fn upsert_transaction(tx: &Transaction, broker: &str, t: &Txn) -> rusqlite::Result<()> {
    const SQL: &str = "INSERT INTO transactions (broker, transaction_id, customer_id, transaction_type, amount,
            currency, transaction_date, status, last_modified_date)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (broker, transaction_id) DO UPDATE SET
            customer_id = excluded.customer_id, transaction_type = excluded.transaction_type,
            amount = excluded.amount, currency = excluded.currency,
            transaction_date = excluded.transaction_date, status = excluded.status,
            last_modified_date = excluded.last_modified_date
         WHERE excluded.last_modified_date IS NULL OR transactions.last_modified_date IS NULL
            OR julianday(excluded.last_modified_date) >= julianday(transactions.last_modified_date)";
    tx.prepare_cached(SQL)?.execute(params![
        broker,
        t.transaction_id,
        t.customer_id,
        t.transaction_type.as_str(),
        t.amount.to_string(),
        t.currency,
        t.transaction_date.to_string(),
        t.status,
        t.last_modified_date.map(|t| t.to_string()),
    ])?;
    Ok(())
}

fn upsert_activity(tx: &Transaction, broker: &str, a: &TradingActivity) -> rusqlite::Result<()> {
    const SQL: &str = "INSERT INTO trading_activity (broker, date, customer_id, instrument, lots_traded,
            volume_usd, spread_cost, commission, pnl, currency, last_modified_date)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
         ON CONFLICT (broker, date, customer_id, instrument, currency) DO UPDATE SET
            lots_traded = excluded.lots_traded, volume_usd = excluded.volume_usd,
            spread_cost = excluded.spread_cost, commission = excluded.commission,
            pnl = excluded.pnl, last_modified_date = excluded.last_modified_date
         WHERE excluded.last_modified_date IS NULL OR trading_activity.last_modified_date IS NULL
            OR julianday(excluded.last_modified_date) >= julianday(trading_activity.last_modified_date)";
    tx.prepare_cached(SQL)?.execute(params![
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
    ])?;
    Ok(())
}
