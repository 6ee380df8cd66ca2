//! The SQL source against real databases: SQLite always, PostgreSQL and MariaDB when
//! `.ci/run` (or you) set their URLs. Each test runs once per available engine.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use jiff::Timestamp;
use t360_connector::cli::SyncArgs;
use t360_connector::commands;
use t360_connector::config::{self, ConnectorPlan, SourcePlan};
use t360_connector::engine::Runner;
use t360_connector::model::Entity;
use t360_connector::sink::{BoxFuture, EmbeddedSink};
use t360_connector::source::sql::SqlSource;
use t360_connector::source::{Page, Pager, Source, SourceError, Window};
use t360_connector::state::Store;
use tokio_util::sync::CancellationToken;

use support::replica::{self, Kind, Proxy, Replica};
use support::{BROKER, Row, stored_cursor, stored_rows};

/// A connectors folder and state for one replica.
struct World {
    dir: tempfile::TempDir,
    config: PathBuf,
    replica: Replica,
}

impl World {
    fn new(replica: Replica) -> World {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("connectors")).unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(
            &config,
            "state_dir = \"state\"\nconnectors_dir = \"connectors\"\n",
        )
        .unwrap();
        World {
            dir,
            config,
            replica,
        }
    }

    /// Writes the connector: `entities`, the `[sql]` table with `sql_extra`, then `tables`
    /// (with `{p}` the replica's table prefix).
    fn connector(&self, entities: &[&str], sql_extra: &str, tables: &str) {
        self.connector_with_url(&self.replica.url.clone(), entities, sql_extra, tables);
    }

    fn connector_with_url(&self, url: &str, entities: &[&str], sql_extra: &str, tables: &str) {
        let connection = self.replica.connection().replace(&self.replica.url, url);
        let text = format!(
            r#"broker = "{BROKER}"
kind = "{kind}"
timezone = "Europe/Athens"
entities = {entities:?}

[sql]
{connection}{sql_extra}

{tables}

[sync]
lookback = "1h"
settle = "0s"
"#,
            kind = self.replica.kind.name(),
            tables = tables.replace("{p}", &self.replica.prefix),
        );
        std::fs::write(
            self.dir
                .path()
                .join("connectors")
                .join(format!("{BROKER}.toml")),
            text,
        )
        .unwrap();
    }

    async fn sync(&self) -> anyhow::Result<()> {
        let args = SyncArgs {
            broker: None,
            entity: None,
        };
        commands::sync(Some(&self.config), &args).await
    }

    fn database(&self) -> PathBuf {
        self.dir.path().join("state").join("t360-connector.db")
    }

    fn rows(&self, entity: Entity) -> BTreeMap<String, Row> {
        stored_rows(&self.database(), BROKER, entity)
    }

    fn cursor(&self, entity: Entity) -> Option<String> {
        stored_cursor(&self.database(), BROKER, entity)
    }

    /// Quarantined (entity, key, reasons).
    fn quarantine(&self) -> Vec<(String, String, String)> {
        let conn = rusqlite::Connection::open(self.database()).unwrap();
        let mut stmt = conn
            .prepare("SELECT entity, record_key, reasons FROM quarantine ORDER BY 1, 2")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn assert_valid(&self) {
        let loaded = config::load(Some(&self.config)).unwrap();
        let problems: Vec<String> = loaded.problems.iter().map(ToString::to_string).collect();
        assert!(problems.is_empty(), "{problems:#?}");
    }

    fn plan(&self) -> ConnectorPlan {
        self.assert_valid();
        let loaded = config::load(Some(&self.config)).unwrap();
        loaded.connector(BROKER).unwrap().clone()
    }

    fn source(&self) -> SqlSource {
        match &self.plan().source {
            SourcePlan::Sql(sql) => SqlSource::new(BROKER, sql).unwrap(),
            other => panic!("not a SQL source: {other:?}"),
        }
    }
}

const CUSTOMERS: &str = "CREATE TABLE {p}customers (
    customer_id {text} PRIMARY KEY,
    signup_date {ts},
    last_modified_date {tsz},
    affiliate_id {text},
    country_code {text},
    leverage INTEGER,
    email {text})";

const CUSTOMERS_TABLE: &str = "[sql.customers]\ntable = \"{p}customers\"";

async fn insert_customer(r: &Replica, id: &str, modified_utc: &str) {
    let mut id = id.replace('\'', "''");
    if r.kind == Kind::MySql {
        // MySQL string literals take backslash escapes.
        id = id.replace('\\', "\\\\");
    }
    r.exec(&format!(
        "INSERT INTO {{p}}customers VALUES ('{id}', {}, {}, 'aff-1', 'CY', 500, NULL)",
        r.ts("2026-01-05 12:00:00"),
        r.tsz(modified_utc)
    ))
    .await;
}

/// Every customer id a pager yields over `window`, in order, with the page count.
async fn pull_ids(source: &SqlSource, window: Window) -> (Vec<String>, usize) {
    let mut pager = source.pages(Entity::Customers, window);
    let mut ids = Vec::new();
    let mut pages = 0;
    while let Some(page) = pager.next_page().await.unwrap() {
        pages += 1;
        ids.extend(page.records.iter().map(|r| {
            r.clone().into_value()["customer_id"]
                .as_str()
                .unwrap()
                .to_owned()
        }));
    }
    (ids, pages)
}

fn all_time() -> Window {
    Window {
        from: Timestamp::UNIX_EPOCH,
        to: Timestamp::now(),
    }
}

#[tokio::test]
async fn ties_larger_than_a_page_are_read_exactly_once() {
    for replica in replica::available("ties_larger_than_a_page_are_read_exactly_once").await {
        let w = World::new(replica);
        let r = &w.replica;
        r.exec(CUSTOMERS).await;
        // 30 customers share one stamp; a page holds 7.
        for i in 0..30 {
            insert_customer(r, &format!("tie-{i:02}"), "2026-01-05 10:00:00").await;
        }
        for i in 0..5 {
            insert_customer(r, &format!("solo-{i}"), &format!("2026-01-05 1{i}:30:00")).await;
        }
        w.connector(&["customers"], "page_size = 7", CUSTOMERS_TABLE);

        let (ids, pages) = pull_ids(&w.source(), all_time()).await;
        let unique: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(ids.len(), 35, "{}: every row once: {ids:?}", r.kind.name());
        assert_eq!(unique.len(), 35, "{}: no row twice", r.kind.name());
        assert_eq!(pages, 5, "{}: 35 rows in pages of 7", r.kind.name());

        w.sync().await.unwrap();
        let rows = w.rows(Entity::Customers);
        assert_eq!(rows.len(), 35, "{}", r.kind.name());
        assert!(
            w.cursor(Entity::Customers).is_some(),
            "{}: the cursor moved",
            r.kind.name()
        );
        r.drop_schema().await;
    }
}

#[tokio::test]
async fn rows_updated_while_a_sync_pages_are_not_lost() {
    for replica in replica::available("rows_updated_while_a_sync_pages_are_not_lost").await {
        let w = World::new(replica);
        let r = &w.replica;
        r.exec(CUSTOMERS).await;
        for i in 0..20 {
            insert_customer(r, &format!("c{i:02}"), &format!("2026-01-05 10:{i:02}:00")).await;
        }
        w.connector(&["customers"], "page_size = 5", CUSTOMERS_TABLE);
        let source = w.source();
        let mut pager = source.pages(Entity::Customers, all_time());
        let mut seen: Vec<(String, String)> = Vec::new();
        let mut take = |page: Page| {
            for rec in page.records {
                let rec = rec.into_value();
                seen.push((
                    rec["customer_id"].as_str().unwrap().to_owned(),
                    rec["country_code"].as_str().unwrap().to_owned(),
                ));
            }
        };
        take(pager.next_page().await.unwrap().unwrap());
        // Behind the pager's position, one row changes; ahead of it, another moves later
        // still; and one not yet read moves to the very end. OFFSET paging would skip one.
        r.exec(&format!(
            "UPDATE {{p}}customers SET country_code = 'GR', last_modified_date = {} WHERE customer_id = 'c02'",
            r.tsz("2026-01-05 11:00:00")
        ))
        .await;
        r.exec(&format!(
            "UPDATE {{p}}customers SET country_code = 'DE', last_modified_date = {} WHERE customer_id = 'c10'",
            r.tsz("2026-01-05 11:30:00")
        ))
        .await;
        r.exec("DELETE FROM {p}customers WHERE customer_id = 'c11'")
            .await;
        while let Some(page) = pager.next_page().await.unwrap() {
            take(page);
        }
        let ids: BTreeSet<&str> = seen.iter().map(|(id, _)| id.as_str()).collect();
        for i in (0..20).filter(|i| *i != 11) {
            assert!(
                ids.contains(format!("c{i:02}").as_str()),
                "{}: c{i:02} lost",
                r.kind.name()
            );
        }
        assert!(
            seen.contains(&("c02".into(), "GR".into())),
            "{}: c02's change read",
            r.kind.name()
        );
        assert!(
            seen.contains(&("c10".into(), "DE".into())),
            "{}: c10 read as changed",
            r.kind.name()
        );
        r.drop_schema().await;
    }
}

#[tokio::test]
async fn a_keyset_position_with_quotes_is_bound_not_spliced() {
    for replica in replica::available("a_keyset_position_with_quotes_is_bound_not_spliced").await {
        let w = World::new(replica);
        let r = &w.replica;
        r.exec(CUSTOMERS).await;
        let nasty = [
            "O'Brien",
            "x'); DROP TABLE customers; --",
            "back\\slash'",
            "\"double\"",
            "plain",
        ];
        for id in nasty {
            insert_customer(r, id, "2026-01-05 10:00:00").await;
        }
        // A page of one: every key becomes the bound keyset position of the next query.
        w.connector(&["customers"], "page_size = 1", CUSTOMERS_TABLE);
        w.sync().await.unwrap();
        let stored: BTreeSet<String> = w.rows(Entity::Customers).into_keys().collect();
        let want: BTreeSet<String> = nasty.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(stored, want, "{}", r.kind.name());
        // The table is still there and still read.
        let (ids, _) = pull_ids(&w.source(), all_time()).await;
        assert_eq!(ids.len(), nasty.len(), "{}", r.kind.name());
        r.drop_schema().await;
    }
}

const TRANSACTIONS: &str = "CREATE TABLE {p}transactions (
    transaction_id BIGINT PRIMARY KEY,
    customer_id {text},
    transaction_type {text},
    amount {dec},
    currency {text},
    transaction_date {tsz},
    status {text},
    last_modified_date {ts})";

#[tokio::test]
async fn database_types_map_to_the_entity_model() {
    for replica in replica::available("database_types_map_to_the_entity_model").await {
        let w = World::new(replica);
        let r = &w.replica;
        r.exec(CUSTOMERS).await;
        r.exec(TRANSACTIONS).await;
        insert_customer(r, "c1", "2026-07-01 09:00:00").await;
        // Naive times are Athens wall-clock (UTC+3 in July); amounts exact to 8 places.
        r.exec(&format!(
            "INSERT INTO {{p}}transactions VALUES (9007199254740993, 'c1', 'deposit', '1234567.12345678', 'EUR', {}, 'approved', {})",
            r.tsz("2026-07-01 08:59:59"),
            r.ts("2026-07-01 12:00:00"),
        ))
        .await;
        r.exec(&format!(
            "INSERT INTO {{p}}transactions VALUES (2, 'c1', 'withdrawal', '0.10000000', 'EUR', {}, 'approved', {})",
            r.tsz("2026-07-01 09:00:00"),
            r.ts("2026-07-01 12:00:01"),
        ))
        .await;
        let tables =
            format!("{CUSTOMERS_TABLE}\n[sql.transactions]\ntable = \"{{p}}transactions\"\n");
        w.connector(&["customers", "transactions"], "", &tables);
        w.sync().await.unwrap();

        let customers = w.rows(Entity::Customers);
        let c1 = &customers["c1"];
        assert_eq!(
            c1["signup_date"].as_deref(),
            Some("2026-01-05T10:00:00Z"),
            "{}: naive in Athens (UTC+2 in January)",
            r.kind.name()
        );
        assert_eq!(
            c1["last_modified_date"].as_deref(),
            Some("2026-07-01T09:00:00Z"),
            "{}",
            r.kind.name()
        );
        assert_eq!(c1["leverage"].as_deref(), Some("500"), "{}", r.kind.name());

        let transactions = w.rows(Entity::Transactions);
        assert_eq!(
            transactions.len(),
            2,
            "{}: {:?}",
            r.kind.name(),
            w.quarantine()
        );
        let big = &transactions["9007199254740993"];
        let amount: rust_decimal::Decimal = big["amount"].as_deref().unwrap().parse().unwrap();
        assert_eq!(
            amount.to_string().trim_end_matches('0'),
            "1234567.12345678",
            "{}",
            r.kind.name()
        );
        assert_eq!(
            big["last_modified_date"].as_deref(),
            Some("2026-07-01T09:00:00Z"),
            "{}",
            r.kind.name()
        );
        assert_eq!(
            big["transaction_date"].as_deref(),
            Some("2026-07-01T08:59:59Z"),
            "{}",
            r.kind.name()
        );
        let small: rust_decimal::Decimal = transactions["2"]["amount"]
            .as_deref()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(small.normalize().to_string(), "0.1", "{}", r.kind.name());
        // The naive cursor column: the cursor is the window's end, an instant.
        assert!(w.cursor(Entity::Transactions).unwrap().ends_with('Z'));
        r.drop_schema().await;
    }
}

const DEALS: &str = "CREATE TABLE {p}mt5_deals (
    Deal BIGINT PRIMARY KEY,
    Timestamp {tsz},
    Login BIGINT,
    Time {ts},
    Symbol {text},
    Action INTEGER,
    Entry INTEGER,
    Volume BIGINT,
    Commission {dec},
    Storage {dec},
    Profit {dec},
    Currency {text})";

/// One deal: (deal, server time, login, symbol, action, entry, volume, commission, swap,
/// profit, currency).
type Deal = (
    i64,
    &'static str,
    i64,
    &'static str,
    i64,
    i64,
    i64,
    &'static str,
    &'static str,
    &'static str,
    &'static str,
);

async fn insert_deals(r: &Replica, deals: &[Deal], stamp: &str) {
    for (deal, time, login, symbol, action, entry, volume, commission, swap, profit, currency) in
        deals
    {
        r.exec(&format!(
            "INSERT INTO {{p}}mt5_deals VALUES ({deal}, {}, {login}, {}, '{symbol}', {action}, {entry}, {volume}, '{commission}', '{swap}', '{profit}', '{currency}')",
            r.tsz(stamp),
            r.ts(time)
        ))
        .await;
    }
}

/// A change stamp `seconds` ago, in whole seconds, as `{tsz}` literals take it.
fn stamp_ago(seconds: i64) -> String {
    let t = Timestamp::now() - jiff::SignedDuration::from_secs(seconds);
    t.strftime("%Y-%m-%d %H:%M:%S").to_string()
}

async fn customers_for_logins(r: &Replica, logins: &[&str]) {
    r.exec(CUSTOMERS).await;
    for login in logins {
        insert_customer(r, login, "2026-01-01 00:00:00").await;
    }
}

/// Stored activity as `date|login|symbol|currency` → (lots, commission, pnl), normalised.
fn activity(w: &World) -> BTreeMap<String, (String, String, String)> {
    let norm = |v: &Option<String>| {
        v.as_deref()
            .map(|s| {
                s.parse::<rust_decimal::Decimal>()
                    .unwrap()
                    .normalize()
                    .to_string()
            })
            .unwrap_or_default()
    };
    w.rows(Entity::TradingActivity)
        .into_iter()
        .map(|(k, row)| {
            (
                k,
                (
                    norm(&row["lots_traded"]),
                    norm(&row["commission"]),
                    norm(&row["pnl"]),
                ),
            )
        })
        .collect()
}

fn expect(rows: &[(&str, &str, &str, &str)]) -> BTreeMap<String, (String, String, String)> {
    rows.iter()
        .map(|(k, l, c, p)| {
            (
                (*k).to_owned(),
                ((*l).to_owned(), (*c).to_owned(), (*p).to_owned()),
            )
        })
        .collect()
}

const DEALS_TABLE: &str = "[sql.trading_activity]
table = \"{p}mt5_deals\"
cursor = \"Timestamp\"
[sql.trading_activity.deals]
";

#[tokio::test]
async fn deals_become_daily_rows_cut_at_server_midnight_across_the_dst_change() {
    for replica in replica::available("deals_become_daily_rows").await {
        let w = World::new(replica);
        let r = &w.replica;
        customers_for_logins(r, &["1001", "1002", "1003"]).await;
        r.exec(DEALS).await;
        // Server time is Athens: 2026-03-29 is the EU spring-forward day (23 hours).
        let deals: [Deal; 10] = [
            (
                1,
                "2026-03-28 23:59:59",
                1001,
                "EURUSD",
                0,
                0,
                10000,
                "-3.50",
                "0",
                "0",
                "USD",
            ),
            (
                2,
                "2026-03-29 00:00:00",
                1001,
                "EURUSD",
                1,
                1,
                10000,
                "-3.50",
                "-0.56",
                "12.34",
                "USD",
            ),
            (
                3,
                "2026-03-29 04:30:00",
                1001,
                "EURUSD",
                0,
                0,
                5000,
                "-1.75",
                "0",
                "0",
                "USD",
            ),
            (
                4,
                "2026-03-29 23:59:59",
                1001,
                "EURUSD",
                0,
                0,
                25000,
                "-8.75",
                "0",
                "0",
                "USD",
            ),
            (
                5,
                "2026-03-30 00:00:01",
                1001,
                "EURUSD",
                1,
                1,
                25000,
                "-8.75",
                "-1.10",
                "-20",
                "USD",
            ),
            (
                6,
                "2026-03-29 10:00:00",
                1002,
                "XAUUSD",
                0,
                0,
                500,
                "0",
                "0",
                "0",
                "EUR",
            ),
            // A deposit: money movement, not trading.
            (
                7,
                "2026-03-29 11:00:00",
                1002,
                "",
                2,
                0,
                0,
                "0",
                "0",
                "1000",
                "EUR",
            ),
            (
                8,
                "2026-03-29 12:00:00",
                1002,
                "XAUUSD",
                1,
                1,
                500,
                "-0.40",
                "0",
                "7.5",
                "EUR",
            ),
            // A trade the dealer cancelled: nothing counts, the group is still written.
            (
                9,
                "2026-03-29 13:00:00",
                1003,
                "GBPUSD",
                13,
                0,
                10000,
                "-3.5",
                "0",
                "0",
                "USD",
            ),
            // A close-by on a reversal day: INOUT counts as traded volume.
            (
                10,
                "2026-03-29 14:00:00",
                1002,
                "XAUUSD",
                0,
                2,
                1000,
                "-0.80",
                "0",
                "-2.5",
                "EUR",
            ),
        ];
        let first_stamp = stamp_ago(60);
        insert_deals(r, &deals, &first_stamp).await;
        let tables = format!("{CUSTOMERS_TABLE}\n{DEALS_TABLE}");
        w.connector(&["customers", "trading_activity"], "page_size = 3", &tables);
        w.sync().await.unwrap();
        let want = expect(&[
            ("2026-03-28|1001|EURUSD|USD", "1", "3.5", "0"),
            ("2026-03-29|1001|EURUSD|USD", "4", "14", "11.78"),
            ("2026-03-30|1001|EURUSD|USD", "2.5", "8.75", "-21.1"),
            ("2026-03-29|1002|XAUUSD|EUR", "0.2", "1.2", "5"),
            ("2026-03-29|1003|GBPUSD|USD", "0", "0", "0"),
        ]);
        assert_eq!(activity(&w), want, "{}", r.kind.name());
        let stored = w.rows(Entity::TradingActivity);
        assert_eq!(
            stored["2026-03-29|1001|EURUSD|USD"]["last_modified_date"].as_deref(),
            Some(format!("{}Z", first_stamp.replace(' ', "T")).as_str())
        );

        // The dealer cancels deal 4 and books a late deal on the 28th: both days are
        // recomputed whole and replace the stored ones.
        r.exec(&format!(
            "UPDATE {{p}}mt5_deals SET Action = 13, Timestamp = {} WHERE Deal = 4",
            r.tsz(&stamp_ago(2))
        ))
        .await;
        insert_deals(
            r,
            &[(
                11,
                "2026-03-28 09:00:00",
                1001,
                "EURUSD",
                1,
                1,
                10000,
                "-3.50",
                "0",
                "1.5",
                "USD",
            )],
            &stamp_ago(2),
        )
        .await;
        w.sync().await.unwrap();
        let want = expect(&[
            ("2026-03-28|1001|EURUSD|USD", "2", "7", "1.5"),
            ("2026-03-29|1001|EURUSD|USD", "1.5", "5.25", "11.78"),
            ("2026-03-30|1001|EURUSD|USD", "2.5", "8.75", "-21.1"),
            ("2026-03-29|1002|XAUUSD|EUR", "0.2", "1.2", "5"),
            ("2026-03-29|1003|GBPUSD|USD", "0", "0", "0"),
        ]);
        assert_eq!(activity(&w), want, "{}", r.kind.name());
        r.drop_schema().await;
    }
}

#[tokio::test]
async fn a_five_pm_new_york_day_follows_us_dst_while_the_server_follows_the_eu() {
    for replica in replica::available("a_five_pm_new_york_day").await {
        let w = World::new(replica);
        let r = &w.replica;
        customers_for_logins(r, &["7"]).await;
        r.exec(DEALS).await;
        // Athens server time. In January 23:30 Athens is 16:30 New York: the same day. On
        // 2026-03-10 the US is on summer time and the EU is not yet: 23:30 Athens is 17:30
        // New York, past the close, so the deal trades on the 11th.
        let deals: [Deal; 3] = [
            (
                1,
                "2026-01-12 23:30:00",
                7,
                "EURUSD",
                0,
                0,
                10000,
                "0",
                "0",
                "0",
                "USD",
            ),
            (
                2,
                "2026-03-10 23:30:00",
                7,
                "EURUSD",
                0,
                0,
                20000,
                "0",
                "0",
                "0",
                "USD",
            ),
            (
                3,
                "2026-03-10 23:59:00",
                7,
                "EURUSD",
                1,
                1,
                30000,
                "0",
                "0",
                "1",
                "USD",
            ),
        ];
        insert_deals(r, &deals, &stamp_ago(60)).await;
        let tables = format!(
            "{CUSTOMERS_TABLE}\n{DEALS_TABLE}day_start = \"17:00\"\nday_zone = \"America/New_York\"\n"
        );
        w.connector(&["customers", "trading_activity"], "", &tables);
        w.sync().await.unwrap();
        let want = expect(&[
            ("2026-01-12|7|EURUSD|USD", "1", "0", "0"),
            ("2026-03-11|7|EURUSD|USD", "5", "0", "1"),
        ]);
        assert_eq!(activity(&w), want, "{}", r.kind.name());
        r.drop_schema().await;
    }
}

/// Pages through `inner`, cutting the database off (the proxy drops every connection and
/// refuses new ones) once `after` pages were handed out.
struct CutOff<'a> {
    inner: &'a SqlSource,
    proxy: &'a Proxy,
    after: usize,
}

struct CutOffPager<'a> {
    inner: Box<dyn Pager + 'a>,
    proxy: &'a Proxy,
    after: usize,
    served: usize,
}

impl Source for CutOff<'_> {
    fn pages(&self, entity: Entity, window: Window) -> Box<dyn Pager + '_> {
        Box::new(CutOffPager {
            inner: self.inner.pages(entity, window),
            proxy: self.proxy,
            after: self.after,
            served: 0,
        })
    }
}

impl Pager for CutOffPager<'_> {
    fn next_page(&mut self) -> BoxFuture<'_, Result<Option<Page>, SourceError>> {
        Box::pin(async move {
            let page = self.inner.next_page().await;
            self.served += 1;
            if self.served == self.after {
                self.proxy.cut().await;
            }
            page
        })
    }
}

#[tokio::test]
async fn a_database_that_goes_away_mid_sync_fails_the_run_and_the_next_completes() {
    for replica in replica::available("a_database_that_goes_away_mid_sync").await {
        if replica.kind == Kind::Sqlite {
            // A SQLite file cannot go away under an open connection; the servers can.
            continue;
        }
        let w = World::new(replica);
        let r = &w.replica;
        r.exec(CUSTOMERS).await;
        for i in 0..40 {
            insert_customer(r, &format!("c{i:02}"), &format!("2026-01-05 10:{i:02}:00")).await;
        }
        let proxy = Proxy::start(&r.url).await;
        w.connector_with_url(
            &proxy.url(&r.url),
            &["customers"],
            "page_size = 5",
            CUSTOMERS_TABLE,
        );
        let plan = w.plan();
        let store = Arc::new(Store::open(&w.database()).unwrap());
        let sink = EmbeddedSink::new(store.clone());
        let source = w.source();
        let cut = CutOff {
            inner: &source,
            proxy: &proxy,
            after: 3,
        };
        let runner = Runner {
            plan: &plan,
            source: &cut,
            sink: &sink,
            store: &store,
            stop: CancellationToken::new(),
            lease: None,
        };
        let failed = runner.sync(Entity::Customers, Timestamp::now()).await;
        let message = failed.expect_err("the run fails").to_string();
        assert!(message.contains("acme/customers"), "{message}");
        assert_eq!(
            w.cursor(Entity::Customers),
            None,
            "{}: the cursor stays",
            r.kind.name()
        );
        let kept = w.rows(Entity::Customers).len();
        assert!(
            (5..40).contains(&kept),
            "{}: pages read before the cut are kept: {kept}",
            r.kind.name()
        );

        proxy.restore().await;
        let runner = Runner {
            source: &source,
            ..runner
        };
        runner
            .sync(Entity::Customers, Timestamp::now())
            .await
            .unwrap();
        assert_eq!(w.rows(Entity::Customers).len(), 40, "{}", r.kind.name());
        assert!(w.cursor(Entity::Customers).is_some());
        r.drop_schema().await;
    }
}

#[tokio::test]
async fn a_statement_over_its_timeout_fails_the_run_with_a_clear_message() {
    for replica in replica::available("a_statement_over_its_timeout").await {
        let sleep = match replica.kind {
            Kind::Postgres => "pg_sleep(3)",
            Kind::MySql => "SLEEP(3)",
            Kind::Sqlite => continue,
        };
        let w = World::new(replica);
        let r = &w.replica;
        r.exec(CUSTOMERS).await;
        insert_customer(r, "c1", "2026-01-05 10:00:00").await;
        let table = format!(
            "[sql.customers]\nquery = \"SELECT c.*, {sleep} AS slept FROM {{p}}customers c\"\n"
        );
        w.connector(&["customers"], "statement_timeout = \"1s\"", &table);
        let started = std::time::Instant::now();
        let error = w.sync().await.expect_err("the query is cut off");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let text = format!("{error:#}");
        assert!(text.contains("acme"), "{text}");
        assert_eq!(w.cursor(Entity::Customers), None);
        r.drop_schema().await;
    }
}

#[tokio::test]
async fn the_session_is_read_only() {
    for replica in replica::available("the_session_is_read_only").await {
        let w = World::new(replica);
        let r = &w.replica;
        r.exec(CUSTOMERS).await;
        let write = "INSERT INTO {p}customers (customer_id) VALUES ('evil')";
        let table = "[sql.customers]\nquery = \"SELECT * FROM {p}customers\"\n";
        w.connector(&["customers"], "", table);
        let plan = match w.plan().source {
            SourcePlan::Sql(sql) => sql,
            _ => unreachable!(),
        };
        let db = t360_connector::source::sql::db::Db::connect_lazy(&plan).unwrap();
        let sql = write.replace("{p}", &r.prefix);
        let refused = db.fetch(&sql, &[], std::time::Duration::from_secs(5)).await;
        let message = refused.expect_err("a write is refused").message;
        assert!(
            message.to_lowercase().contains("read"),
            "{}: {message}",
            r.kind.name()
        );
        r.drop_schema().await;
    }
}

#[tokio::test]
async fn tls_verifies_the_server_by_default_and_names_what_failed() {
    let Ok(url) = std::env::var("T360_TEST_POSTGRES_URL") else {
        eprintln!(
            "!!! SKIPPED tls_verifies_the_server_by_default: T360_TEST_POSTGRES_URL is not set"
        );
        return;
    };
    let w = World::new(Replica::postgres(&url).await);
    let r = &w.replica;
    r.exec(CUSTOMERS).await;
    insert_customer(r, "c1", "2026-01-05 10:00:00").await;
    // The test server's certificate is self-signed (or it has no TLS at all): the default,
    // verify-full, refuses it; `require` encrypts without verifying.
    w.connector(&["customers"], "", CUSTOMERS_TABLE);
    let file = w
        .dir
        .path()
        .join("connectors")
        .join(format!("{BROKER}.toml"));
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.replace("tls = \"disable\"\n", "")).unwrap();
    let error = format!(
        "{:#}",
        w.sync().await.expect_err("an unverified server is refused")
    );
    assert!(
        ["certificate", "tls", "TLS", "ssl", "SSL"]
            .iter()
            .any(|w| error.contains(w)),
        "{error}"
    );
    assert_eq!(w.cursor(Entity::Customers), None);
    if r.exec_scalar("SHOW ssl").await == "on" {
        std::fs::write(
            &file,
            text.replace("tls = \"disable\"", "tls = \"require\""),
        )
        .unwrap();
        w.sync().await.unwrap();
        assert_eq!(w.rows(Entity::Customers).len(), 1);
    }
    r.drop_schema().await;
}

/// The statements of a shipped `.sql` file, with `name` standing for its schema.
fn statements(file: &str, schema: &str, name: &str) -> Vec<String> {
    let text: String = std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n")
        .replace(schema, name);
    text.split(";\n")
        .map(|s| s.trim().trim_end_matches(';').to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// A shipped example connector file, pointed at `r` (its schema renamed to `name`).
fn example_connector(
    file: &str,
    schema: &str,
    name: &str,
    r: &Replica,
    extra: &[(&str, &str)],
) -> String {
    let mut text = std::fs::read_to_string(file).unwrap().replace(schema, name);
    let url_line = text
        .lines()
        .find(|l| l.starts_with("url = "))
        .unwrap()
        .to_owned();
    text = text.replace(&url_line, &format!("url = \"{}\"", r.url));
    text = text.replace("tls = \"verify-full\"", "tls = \"disable\"");
    let secret_lines: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("password_env") || l.starts_with("password_file"))
        .map(str::to_owned)
        .collect();
    for line in secret_lines {
        text = text.replace(&line, "");
    }
    for (from, to) in extra {
        text = text.replace(from, to);
    }
    text
}

#[tokio::test]
async fn the_shipped_postgres_crm_example_pulls_its_sample_replica() {
    let Ok(url) = std::env::var("T360_TEST_POSTGRES_URL") else {
        eprintln!(
            "!!! SKIPPED the_shipped_postgres_crm_example: T360_TEST_POSTGRES_URL is not set"
        );
        return;
    };
    let w = World::new(Replica::postgres(&url).await);
    let r = &w.replica;
    let name = r.prefix.trim_end_matches('.').to_owned();
    // The example creates its own schema.
    r.drop_schema().await;
    for statement in statements("connectors/examples/postgres-crm.sql", "crm_replica", &name) {
        r.exec(&statement).await;
    }
    let key_file = w.dir.path().join("hash.key");
    std::fs::write(&key_file, "test-hash-key\n").unwrap();
    let text = example_connector(
        "connectors/examples/postgres-crm.toml",
        "crm_replica",
        &name,
        r,
        &[(
            "hash_key_env = \"POSTGRES_CRM_HASH_KEY\"",
            &format!("hash_key_file = \"{}\"", key_file.display()),
        )],
    );
    std::fs::write(w.dir.path().join("connectors/postgres-crm.toml"), text).unwrap();
    w.assert_valid();
    w.sync().await.unwrap();

    let db = w.database();
    let customers = stored_rows(&db, "postgres-crm", Entity::Customers);
    assert_eq!(customers.len(), 2);
    let ada = &customers["1001"];
    assert_eq!(ada["signup_date"].as_deref(), Some("2026-01-05T09:30:00Z"));
    assert_eq!(ada["affiliate_id"].as_deref(), Some("IB-7"));
    assert_ne!(ada["email"].as_deref(), Some("ada@example.com"), "hashed");
    let transactions = stored_rows(&db, "postgres-crm", Entity::Transactions);
    assert_eq!(transactions.len(), 3);
    assert_eq!(
        transactions["P-2"]["transaction_type"].as_deref(),
        Some("withdrawal")
    );
    assert_eq!(transactions["P-2"]["amount"].as_deref(), Some("-50.00"));
    assert_eq!(
        transactions["P-3"]["transaction_type"].as_deref(),
        Some("ib_rebate")
    );
    let activity = stored_rows(&db, "postgres-crm", Entity::TradingActivity);
    let row = &activity["2026-01-07|1001|EURUSD|USD"];
    assert_eq!(row["lots_traded"].as_deref(), Some("3.50"));
    assert_eq!(row["pnl"].as_deref(), Some("-120.75"));
    assert_eq!(activity.len(), 2);
    r.exec(&format!("DROP SCHEMA {name} CASCADE")).await;
}

#[tokio::test]
async fn the_shipped_mysql_mt5_example_pulls_its_sample_replica() {
    let Ok(url) = std::env::var("T360_TEST_MYSQL_URL") else {
        eprintln!("!!! SKIPPED the_shipped_mysql_mt5_example: T360_TEST_MYSQL_URL is not set");
        return;
    };
    let w = World::new(Replica::mysql(&url).await);
    let r = &w.replica;
    let name = r.prefix.trim_end_matches('.').to_owned();
    r.drop_schema().await;
    for statement in statements("connectors/examples/mysql-mt5.sql", "mt5_replica", &name) {
        r.exec(&statement).await;
    }
    let text = example_connector(
        "connectors/examples/mysql-mt5.toml",
        "mt5_replica",
        &name,
        r,
        &[],
    );
    std::fs::write(w.dir.path().join("connectors/mysql-mt5.toml"), text).unwrap();
    w.assert_valid();
    w.sync().await.unwrap();

    let db = w.database();
    let customers = stored_rows(&db, "mysql-mt5", Entity::Customers);
    assert_eq!(customers.len(), 2);
    // Server wall-clock 10:00 in Athens (UTC+2 in March).
    assert_eq!(
        customers["50001"]["signup_date"].as_deref(),
        Some("2026-03-02T08:00:00Z")
    );
    assert_eq!(customers["50001"]["affiliate_id"].as_deref(), Some("9001"));
    let transactions = stored_rows(&db, "mysql-mt5", Entity::Transactions);
    assert_eq!(transactions.len(), 2);
    assert_eq!(
        transactions["7"]["transaction_type"].as_deref(),
        Some("withdrawal")
    );
    assert_eq!(
        transactions["1"]["transaction_date"].as_deref(),
        Some("2026-03-02T08:05:00Z")
    );
    let norm = |s: &Option<String>| {
        s.as_deref()
            .unwrap()
            .parse::<rust_decimal::Decimal>()
            .unwrap()
            .normalize()
            .to_string()
    };
    let activity = stored_rows(&db, "mysql-mt5", Entity::TradingActivity);
    let got: BTreeMap<String, (String, String, String)> = activity
        .iter()
        .map(|(k, row)| {
            (
                k.clone(),
                (
                    norm(&row["lots_traded"]),
                    norm(&row["commission"]),
                    norm(&row["pnl"]),
                ),
            )
        })
        .collect();
    let want = expect(&[
        ("2026-03-02|50001|EURUSD|USD", "4", "14", "34.3"),
        ("2026-03-03|50001|EURUSD|USD", "1", "3.5", "0"),
        ("2026-03-03|50002|XAUUSD|EUR", "0.1", "2", "-12"),
    ]);
    assert_eq!(got, want);
    r.exec(&format!("DROP DATABASE {name}")).await;
}

#[tokio::test]
async fn a_select_only_user_reads_with_its_password_from_a_file() {
    let Ok(url) = std::env::var("T360_TEST_MYSQL_URL") else {
        eprintln!(
            "!!! SKIPPED a_select_only_user_reads_with_its_password_from_a_file: T360_TEST_MYSQL_URL is not set"
        );
        return;
    };
    let w = World::new(Replica::mysql(&url).await);
    let r = &w.replica;
    r.exec(CUSTOMERS).await;
    insert_customer(r, "c1", "2026-01-05 10:00:00").await;
    // The grants README asks a broker for: SELECT on the tables pulled, nothing else.
    let user = format!("{}_ro", r.prefix.trim_end_matches('.'));
    let secret = "s3cret-'quote\"-pass";
    r.exec(&format!(
        "CREATE USER '{user}'@'%' IDENTIFIED BY 's3cret-''quote\"-pass'"
    ))
    .await;
    r.exec(&format!("GRANT SELECT ON {{p}}customers TO '{user}'@'%'"))
        .await;
    let password = w.dir.path().join("db.password");
    std::fs::write(&password, format!("{secret}\n")).unwrap();
    let mut reader = url::Url::parse(&r.url).unwrap();
    reader.set_username(&user).unwrap();
    reader.set_path(r.prefix.trim_end_matches('.'));
    let extra = format!("password_file = \"{}\"", password.display());
    w.connector_with_url(reader.as_str(), &["customers"], &extra, CUSTOMERS_TABLE);
    w.sync().await.unwrap();
    assert_eq!(w.rows(Entity::Customers).len(), 1);

    // A wrong password fails the run, and the message does not carry the secret.
    std::fs::write(&password, "wrong-password-xyz\n").unwrap();
    let error = format!("{:#}", w.sync().await.expect_err("refused"));
    assert!(error.contains("Access denied"), "{error}");
    assert!(!error.contains("wrong-password-xyz"), "{error}");
    r.exec(&format!("DROP USER '{user}'@'%'")).await;
    r.drop_schema().await;
}

#[tokio::test]
async fn an_integer_change_stamp_counts_in_the_configured_epoch_unit() {
    for replica in replica::available("an_integer_change_stamp").await {
        let w = World::new(replica);
        let r = &w.replica;
        customers_for_logins(r, &["1"]).await;
        // The MT5 SQL Export keeps some change stamps as milliseconds since 1970.
        r.exec(&DEALS.replace("Timestamp {tsz}", "Timestamp BIGINT"))
            .await;
        let stamp_ms = (Timestamp::now() - jiff::SignedDuration::from_secs(30)).as_millisecond();
        r.exec(&format!(
            "INSERT INTO {{p}}mt5_deals VALUES (1, {stamp_ms}, 1, {}, 'EURUSD', 0, 0, 10000, '-1', '0', '0', 'USD')",
            r.ts("2026-01-12 10:00:00")
        ))
        .await;
        let tables = format!("{CUSTOMERS_TABLE}\n{DEALS_TABLE}");
        w.connector(&["customers", "trading_activity"], "", &tables);
        // Without the unit the run fails naming the fix: guessing wrong would read nothing.
        let error = format!("{:#}", w.sync().await.expect_err("the unit is unknown"));
        assert!(error.contains("epoch"), "{}: {error}", r.kind.name());
        assert_eq!(w.cursor(Entity::TradingActivity), None);

        w.connector(
            &["customers", "trading_activity"],
            "epoch = \"ms\"",
            &tables,
        );
        w.sync().await.unwrap();
        let want = expect(&[("2026-01-12|1|EURUSD|USD", "1", "1", "0")]);
        assert_eq!(activity(&w), want, "{}", r.kind.name());
        let stored = w.rows(Entity::TradingActivity);
        let modified: Timestamp = stored["2026-01-12|1|EURUSD|USD"]["last_modified_date"]
            .as_deref()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(modified.as_millisecond(), stamp_ms, "{}", r.kind.name());
        r.drop_schema().await;
    }
}

#[tokio::test]
async fn a_null_key_fails_the_run_naming_the_row_instead_of_skipping_rows() {
    for replica in replica::available("a_null_key_fails_the_run").await {
        let w = World::new(replica);
        let r = &w.replica;
        r.exec(CUSTOMERS).await;
        for id in ["c1", "c2", "c3"] {
            insert_customer(r, id, "2026-01-05 10:00:00").await;
        }
        let table = "[sql.customers]\nquery = \"SELECT c.*, NULLIF(c.customer_id, 'c2') AS k FROM {p}customers c\"\nkey = [\"k\"]\n";
        w.connector(&["customers"], "page_size = 1", table);
        let error = format!("{:#}", w.sync().await.expect_err(r.kind.name()));
        assert!(
            error.contains("NULL key column"),
            "{}: {error}",
            r.kind.name()
        );
        assert_eq!(w.cursor(Entity::Customers), None);
        r.drop_schema().await;
    }
}

async fn reconcile_json(w: &World, repair: bool) -> (bool, serde_json::Value) {
    let args = t360_connector::cli::ReconcileArgs {
        broker: BROKER.into(),
        entity: Some(Entity::Transactions),
        from: "2026-02-01".into(),
        to: "2026-02-28".into(),
        repair,
        format: t360_connector::cli::ReportFormat::Json,
    };
    let (equal, text) = match commands::reconcile(Some(&w.config), &args).await {
        Ok(text) => (true, text),
        Err(e) => match e.downcast::<commands::Drift>() {
            Ok(drift) => (false, drift.0),
            Err(e) => panic!("{e:#}"),
        },
    };
    (equal, serde_json::from_str(&text).unwrap())
}

#[tokio::test]
async fn reconcile_sums_days_in_the_database_and_reads_only_the_days_that_differ() {
    for replica in replica::available("reconcile_sums_days_in_the_database").await {
        let w = World::new(replica);
        let r = &w.replica;
        r.exec(CUSTOMERS).await;
        r.exec(TRANSACTIONS).await;
        insert_customer(r, "c1", "2026-02-01 00:00:00").await;
        let stamp = stamp_ago(60);
        for day in 1..=3 {
            for n in 0..4 {
                r.exec(&format!(
                    "INSERT INTO {{p}}transactions VALUES ({id}, 'c1', 'deposit', '{n}0.25', '{cur}', {}, 'approved', {})",
                    r.tsz(&format!("2026-02-0{day} 1{n}:00:00")),
                    r.ts(&stamp),
                    id = day * 10 + n,
                    cur = if n % 2 == 0 { "EUR" } else { "USD" },
                ))
                .await;
            }
        }
        let tables =
            format!("{CUSTOMERS_TABLE}\n[sql.transactions]\ntable = \"{{p}}transactions\"\n");
        w.connector(
            &["customers", "transactions"],
            "naive_timezone = \"UTC\"",
            &tables,
        );
        w.sync().await.unwrap();
        let (equal, _) = reconcile_json(&w, false).await;
        assert!(equal, "{}", r.kind.name());

        // The store loses a row of the 1st; the broker changes an amount on the 2nd without
        // touching last_modified_date. The 3rd is untouched.
        let db = rusqlite::Connection::open(w.database()).unwrap();
        db.execute("DELETE FROM transactions WHERE transaction_id = '11'", [])
            .unwrap();
        r.exec("UPDATE {p}transactions SET amount = '77.77' WHERE transaction_id = 22")
            .await;
        let (equal, json) = reconcile_json(&w, false).await;
        assert!(!equal, "{}", r.kind.name());
        let report = &json["reconciliations"][0]["before"];
        let keys = |what: &str| -> Vec<String> {
            report[what]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["key"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(keys("missing"), ["11"], "{}: {report}", r.kind.name());
        assert_eq!(keys("different"), ["22"], "{}: {report}", r.kind.name());
        assert!(keys("gone").is_empty(), "{}: {report}", r.kind.name());
        let days_read = report["days_read"].as_u64();
        match r.kind {
            // The database summed the days; only the two that differ were read.
            Kind::Postgres | Kind::MySql => {
                assert_eq!(days_read, Some(2), "{}: {report}", r.kind.name())
            }
            Kind::Sqlite => assert_eq!(days_read, None, "SQLite sums are not exact: read whole"),
        }
        let day2 = report["days"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["day"] == "2026-02-02")
            .unwrap();
        assert_ne!(day2["broker"]["sums"], day2["store"]["sums"], "{day2}");
        assert_eq!(day2["broker"]["count"], day2["store"]["count"], "{day2}");

        let (equal, json) = reconcile_json(&w, true).await;
        assert!(equal, "{}: {json}", r.kind.name());
        let rows = w.rows(Entity::Transactions);
        assert_eq!(rows.len(), 12);
        let amount: rust_decimal::Decimal =
            rows["22"]["amount"].as_deref().unwrap().parse().unwrap();
        assert_eq!(amount.normalize().to_string(), "77.77");
        r.drop_schema().await;
    }
}

#[tokio::test]
async fn a_later_page_starts_its_index_scan_at_the_last_row_read() {
    // Each page must start reading the `(cursor, key)` index at the previous page's last row;
    // a page that starts at the window's start and filters its way to the position reads the
    // whole window again, page after page (quadratic: hours for a 10M-row backfill).
    use t360_connector::config::sql::{Engine, From};
    use t360_connector::source::sql::query::{Slot, Upper, page};
    let Ok(url) = std::env::var("T360_TEST_POSTGRES_URL") else {
        eprintln!(
            "!!! SKIPPED a_later_page_starts_its_index_scan_at_the_last_row_read: \
             T360_TEST_POSTGRES_URL is not set (bash .ci/run sets it)"
        );
        return;
    };
    let r = replica::Replica::postgres(&url).await;
    r.exec(
        "CREATE TABLE {p}rows AS SELECT 'c' || lpad(i::text, 6, '0') AS customer_id,
             timestamptz '2026-01-01 00:00:00+00' + i * interval '1 second' AS last_modified_date
         FROM generate_series(1, 20000) AS i",
    )
    .await;
    r.exec("CREATE INDEX rows_delta ON {p}rows (last_modified_date, customer_id)")
        .await;
    r.exec("ANALYZE {p}rows").await;
    let order = ["last_modified_date".to_owned(), "customer_id".to_owned()];
    let q = page(
        Engine::Postgres,
        &From::Table(format!("{}.rows", r.schema)),
        None,
        &order,
        Upper::Inclusive,
        true,
        100,
    );
    // The bound values, spliced here only to EXPLAIN the statement (the source binds them).
    let mut sql = q.sql.clone();
    for (i, slot) in q.slots.iter().enumerate().rev() {
        let value = match slot {
            Slot::Lower => "timestamptz '2000-01-01 00:00:00+00'",
            Slot::Upper => "timestamptz '2100-01-01 00:00:00+00'",
            Slot::After(0) => "timestamptz '2026-01-01 04:26:40+00'", // row 16000
            Slot::After(_) => "'c016000'",
        };
        sql = sql.replace(&format!("${}", i + 1), value);
    }
    let plan = r
        .exec_lines(&format!("EXPLAIN (ANALYZE, COSTS OFF) {sql}"))
        .await
        .join("\n");
    let removed: u64 = plan
        .lines()
        .filter_map(|l| l.split("Rows Removed by Filter:").nth(1))
        .filter_map(|n| n.trim().parse::<u64>().ok())
        .sum();
    assert!(plan.contains("Index"), "{plan}");
    assert!(
        removed < 100,
        "the page read {removed} rows before its position:\n{plan}"
    );
    r.drop_schema().await;
}
