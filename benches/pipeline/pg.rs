//! (d) A PostgreSQL replica of the same shape, generated server-side with `generate_series`:
//! columns named as the Track360 fields (so the connector file needs no mapping), ids a
//! permutation of the row number, `last_modified_date` = start + i s, each transaction and
//! activity row pointing at a customer modified no later than it.

use std::time::{Duration, Instant};

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, Executor};

use super::dataset::Sizes;

/// 2^60, the id base; the id spacing; the permutation's multiplier; a mask to non-negative.
const ID_BASE: i64 = 1_152_921_504_606_846_976;
const ID_STEP: i64 = 42_470_972_311;
const A: i64 = 2_654_435_761;
const MASK: i64 = i64::MAX;
const START: &str = "timestamptz '2025-01-01 00:00:00+00'";

pub struct Replica {
    pool: PgPool,
    pub schema: String,
}

/// `'C' || hex(id of permuted position p)`, as SQL over the column expression `p`.
fn id(prefix: char, p: &str) -> String {
    format!(
        "'{prefix}' || to_hex({ID_BASE} + ({p}) * {ID_STEP} + ((hashint8extended({p}, 7) & {MASK}) % {ID_STEP}))"
    )
}

impl Replica {
    pub async fn connect(url: &str) -> anyhow::Result<Replica> {
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await?;
        Ok(Replica {
            pool,
            schema: format!("bench_{}", std::process::id()),
        })
    }

    async fn run(&self, sql: String) -> anyhow::Result<()> {
        self.pool
            .execute(AssertSqlSafe(sql.clone()))
            .await
            .map_err(|e| {
                anyhow::anyhow!("{e}\nin: {}", sql.chars().take(300).collect::<String>())
            })?;
        Ok(())
    }

    /// Creates and fills the schema; returns how long that took.
    pub async fn fill(&self, sizes: Sizes) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let s = &self.schema;
        let [nc, nt, na] = sizes.n.map(|n| n as i64);
        self.run(format!("DROP SCHEMA IF EXISTS {s} CASCADE"))
            .await?;
        self.run(format!("CREATE SCHEMA {s}")).await?;
        self.run("SET maintenance_work_mem = '512MB'".into())
            .await?;
        self.run(format!(
            "CREATE UNLOGGED TABLE {s}.customers (
                customer_id text NOT NULL, signup_date timestamptz NOT NULL,
                last_modified_date timestamptz NOT NULL, affiliate_id text NOT NULL,
                campaign_id text, click_id text, lang_id text, country_code text,
                kyc_status_id text, sales_status_id text, trading_account_type text,
                leverage text, first_name text, last_name text, email text)"
        ))
        .await?;
        self.run(format!(
            "INSERT INTO {s}.customers
             SELECT {cid}, ts - ((h % 2000) * interval '1 hour'), ts,
                    'IB' || lpad(((h >> 11) % 40)::text, 3, '0'), 'CMP' || ((h >> 17) % 12),
                    'clk-' || to_hex(hashint8extended(i, 4)),
                    (ARRAY['en','de','ar','th','es'])[1 + (h >> 22) % 5],
                    (ARRAY['CY','GB','DE','AE','TH','ZA'])[1 + (h >> 26) % 6],
                    (ARRAY['pending','approved'])[1 + (h >> 30) % 2], 'new',
                    (ARRAY['standard','ecn','micro'])[1 + (h >> 32) % 3],
                    (ARRAY['1:100','1:500'])[1 + (h >> 35) % 2],
                    'Trader' || i, 'Sample', 'trader' || i || '@example.com'
             FROM (SELECT i, (i * {A}) % {nc} AS p, {START} + (2 * i) * interval '1 second' AS ts,
                          hashint8extended(i, 1) & {MASK} AS h
                   FROM generate_series(0::bigint, {nc} - 1) AS i) AS g",
            cid = id('C', "p"),
        ))
        .await?;
        // The customer of row i: one modified no later than it (customers are 2 s apart).
        let customer =
            |seed: u32| format!("(hashint8extended(i, {seed}) & {MASK}) % least(i / 2 + 1, {nc})");
        self.run(format!(
            "CREATE UNLOGGED TABLE {s}.transactions (
                transaction_id text NOT NULL, customer_id text NOT NULL,
                transaction_type text NOT NULL, amount numeric(20, 2) NOT NULL,
                currency text NOT NULL, transaction_date timestamptz NOT NULL,
                status text NOT NULL, last_modified_date timestamptz NOT NULL)"
        ))
        .await?;
        self.run(format!(
            "INSERT INTO {s}.transactions
             SELECT {tid}, {cid},
                    (ARRAY['deposit','withdrawal','ib_rebate','bonus','adjustment'])[1 + h % 5],
                    (((h >> 3) % 5000000 + 1)::numeric / 100)::numeric(20, 2),
                    (ARRAY['USD','EUR','GBP','JPY'])[1 + (h >> 26) % 4],
                    ts - (((h >> 28) % 600) * interval '1 minute'),
                    (ARRAY['pending','approved','rejected'])[1 + (h >> 38) % 3], ts
             FROM (SELECT i, (i * {A}) % {nt} AS p, ({customer} * {A}) % {nc} AS pc,
                          {START} + i * interval '1 second' AS ts,
                          hashint8extended(i, 2) & {MASK} AS h
                   FROM generate_series(0::bigint, {nt} - 1) AS i) AS g",
            tid = id('T', "p"),
            cid = id('C', "pc"),
            customer = customer(3),
        ))
        .await?;
        self.run(format!(
            "CREATE UNLOGGED TABLE {s}.trading_activity (
                date date NOT NULL, customer_id text NOT NULL, instrument text NOT NULL,
                lots_traded numeric(18, 2) NOT NULL, volume_usd numeric(20, 2),
                spread_cost numeric(18, 2), commission numeric(18, 2), pnl numeric(18, 2),
                currency text NOT NULL, last_modified_date timestamptz NOT NULL)"
        ))
        .await?;
        self.run(format!(
            "INSERT INTO {s}.trading_activity
             SELECT ((ts AT TIME ZONE 'UTC') - interval '1 day')::date, {cid},
                    (ARRAY['EURUSD','GBPUSD','USDJPY','XAUUSD','US500','BTCUSD'])[1 + i % 6]
                        || CASE WHEN i >= 6 THEN '.' || i ELSE '' END,
                    (lots::numeric / 100)::numeric(18, 2), (lots * 1000)::numeric(20, 2),
                    (lots / 10 + (lots % 10)::numeric / 100)::numeric(18, 2),
                    (lots / 20 + (lots % 20)::numeric / 100)::numeric(18, 2),
                    (((h >> 13) % 200000 - 100000)::numeric / 100)::numeric(18, 2),
                    (ARRAY['USD','EUR','GBP','JPY'])[1 + (h >> 31) % 4], ts
             FROM (SELECT i, ({customer} * {A}) % {nc} AS pc,
                          {START} + i * interval '1 second' AS ts,
                          hashint8extended(i, 5) & {MASK} AS h,
                          (hashint8extended(i, 5) & {MASK}) % 5000 + 1 AS lots
                   FROM generate_series(0::bigint, {na} - 1) AS i) AS g",
            cid = id('C', "pc"),
            customer = customer(6),
        ))
        .await?;
        for (table, key) in [
            ("customers", "customer_id"),
            ("transactions", "transaction_id"),
            (
                "trading_activity",
                "date, customer_id, instrument, currency",
            ),
        ] {
            self.run(format!("ALTER TABLE {s}.{table} ADD PRIMARY KEY ({key})"))
                .await?;
            self.run(format!(
                "CREATE INDEX {table}_delta ON {s}.{table} (last_modified_date, {key})"
            ))
            .await?;
            self.run(format!("ANALYZE {s}.{table}")).await?;
        }
        Ok(started.elapsed())
    }

    pub async fn drop_schema(&self) -> anyhow::Result<()> {
        self.run(format!("DROP SCHEMA IF EXISTS {} CASCADE", self.schema))
            .await
    }
}
