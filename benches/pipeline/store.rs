//! (b) The store ceiling: a minimal rusqlite loop into tables with the embedded store's columns
//! (v1 of src/state/schema.rs), WAL, `synchronous = NORMAL`, one prepared upsert per entity,
//! 500 rows per transaction, the store's 16 KiB pages, rows written in key order (or, for
//! comparison, in broker order).

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, params_from_iter};

use super::dataset::{Ent, Fields, Gen};

/// Copied from src/state/schema.rs, migration v1 (the entity tables).
const SCHEMA_V1: &str = r#"
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
"#;

const ROWS_PER_TX: usize = 500;

fn upsert_sql(e: Ent) -> String {
    let columns = e.columns();
    let placeholders: Vec<String> = (1..=columns.len() + 1).map(|k| format!("?{k}")).collect();
    let updates: Vec<String> = columns
        .iter()
        .filter(|c| !e.key().contains(c))
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    format!(
        "INSERT INTO {table} (broker, {columns}) VALUES ({placeholders}) \
         ON CONFLICT (broker, {key}) DO UPDATE SET {updates}",
        table = e.table(),
        columns = columns.join(", "),
        placeholders = placeholders.join(", "),
        key = e.key().join(", "),
        updates = updates.join(", "),
    )
}

/// Every index of `e` in key order.
fn key_order(
    data: &Gen,
    e: Ent,
    mut each: impl FnMut(u64) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    let n = data.sizes.of(e);
    match e {
        // Ids grow with the permuted index: key order is `p` order.
        Ent::Customers | Ent::Transactions => {
            let perm = data.perm(e);
            for p in 0..n {
                each(perm.back(p))?;
            }
        }
        // Keyed on (date, customer_id, instrument, currency); the date grows with the index,
        // so each day is a run of indexes, sorted on the rest of the key.
        Ent::Activity => {
            let mut f = Fields::default();
            let mut day: Vec<(String, u64)> = Vec::new();
            let mut date = String::new();
            let mut flush = |day: &mut Vec<(String, u64)>| -> rusqlite::Result<()> {
                day.sort_unstable();
                for (_, i) in day.drain(..) {
                    each(i)?;
                }
                Ok(())
            };
            for i in 0..n {
                data.fill(e, i, &mut f);
                if f.get(0) != date {
                    flush(&mut day)?;
                    date = f.get(0).to_owned();
                }
                // 0x01 sorts below every character of the values.
                let key = format!("{}\u{1}{}\u{1}{}", f.get(1), f.get(2), f.get(8));
                day.push((key, i));
            }
            flush(&mut day)?;
        }
    }
    Ok(())
}

/// Writes the whole data set in key order, or (`in_key_order` false) in the broker's order (the
/// order a backfill writes in); returns the wall time. The file is counted afterwards.
pub fn ceiling(data: &Gen, dir: &Path, in_key_order: bool) -> anyhow::Result<Duration> {
    let path = dir.join("ceiling.db");
    let mut conn = Connection::open(&path)?;
    // The embedded store's page size (src/state/sqlite.rs, PAGE_SIZE): the engine as the
    // connector runs it.
    conn.pragma_update(None, "page_size", 16 * 1024)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    anyhow::ensure!(mode == "wal", "journal_mode is {mode}, not wal");
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.execute_batch(SCHEMA_V1)?;
    let started = Instant::now();
    let mut f = Fields::default();
    for e in Ent::ALL {
        let sql = upsert_sql(e);
        let mut batch: Vec<u64> = Vec::with_capacity(ROWS_PER_TX);
        let mut write = |conn: &mut Connection, batch: &mut Vec<u64>| -> rusqlite::Result<()> {
            let tx = conn.transaction()?;
            {
                let mut stmt = tx.prepare_cached(&sql)?;
                for &i in batch.iter() {
                    data.fill(e, i, &mut f);
                    stmt.execute(params_from_iter(std::iter::once("bench").chain(f.iter())))?;
                }
            }
            batch.clear();
            tx.commit()
        };
        let mut each = |i| {
            batch.push(i);
            if batch.len() == ROWS_PER_TX {
                write(&mut conn, &mut batch)?;
            }
            Ok(())
        };
        if in_key_order {
            key_order(data, e, each)?;
        } else {
            (0..data.sizes.of(e)).try_for_each(&mut each)?;
        }
        if !batch.is_empty() {
            write(&mut conn, &mut batch)?;
        }
    }
    let wall = started.elapsed();
    drop(conn);
    let stored: u64 = count_rows(&path)?.iter().sum();
    anyhow::ensure!(
        stored == data.sizes.total(),
        "(b) stored {stored} rows, expected {}",
        data.sizes.total()
    );
    Ok(wall)
}

/// Rows of the three entity tables of a store file.
pub fn count_rows(path: &Path) -> anyhow::Result<[u64; 3]> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let mut counts = [0u64; 3];
    for e in Ent::ALL {
        let n: i64 = conn.query_row(&format!("SELECT count(*) FROM {}", e.table()), [], |r| {
            r.get(0)
        })?;
        counts[e as usize] = n as u64;
    }
    Ok(counts)
}

/// Rows of a table that may not exist (quarantine, held): 0 then.
pub fn count_table(path: &Path, table: &str) -> u64 {
    Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .and_then(|c| {
            c.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .map_or(0, |n| n as u64)
}
