//! The SQL source: a broker's PostgreSQL or MySQL/MariaDB replica, or a SQLite file.
//!
//! Rows are paged by keyset on `(cursor, key…)`: each page starts strictly after the last row
//! of the one before, so rows sharing one `last_modified_date` (however many) are all read once,
//! and a row updated mid-sync moves to a later position that is still inside the window or
//! falls to the next sync's lookback. OFFSET paging loses rows when they move (DOMAIN §4.4).
//! Every page is one bounded query: memory stays at one page whatever the window.
//!
//! MetaTrader deals are aggregated into daily trading activity by `deals`.

pub mod db;
mod deals;
pub mod query;
pub mod value;

use std::time::{Duration, Instant};

use backon::Retryable;
use jiff::tz::TimeZone;
use serde_json::{Map, Value};
use tracing::warn;

use crate::config::sql::{Engine, From, SqlEntityPlan, SqlPlan};
use crate::model::Entity;
use crate::sink::BoxFuture;
use crate::source::{Page, Pager, Source, SourceError, Window};
use crate::{http, telemetry};
use db::{Db, DbError, Rows};
use query::{Slot, Upper};
use value::{DbValue, TextStyle, TimeKind, bound};

/// The columns a source returns: (name, database type).
pub(super) struct Shape {
    columns: Vec<(String, String)>,
}

/// One connector's database: its pool, shared by every run.
pub struct SqlSource {
    broker: String,
    plan: SqlPlan,
    db: Db,
}

impl SqlSource {
    /// The source with its pool; connections open on first use (a tokio runtime must run).
    pub fn new(broker: &str, plan: &SqlPlan) -> Result<SqlSource, String> {
        Ok(SqlSource {
            broker: broker.to_owned(),
            plan: plan.clone(),
            db: Db::connect_lazy(plan)?,
        })
    }

    fn origin(&self, entity: Entity) -> String {
        format!("{} {} ({entity})", self.plan.engine.as_str(), self.plan.url)
    }

    /// One query, retried while the failure is a lost connection and time is left.
    async fn fetch(
        &self,
        entity: Entity,
        sql: &str,
        params: &[DbValue],
    ) -> Result<Rows, SourceError> {
        let started = Instant::now();
        let budget = self.plan.max_retry_time;
        let timeout = self.plan.statement_timeout;
        let broker = self.broker.as_str();
        (|| async { self.db.fetch(sql, params, timeout).await })
            .retry(http::backoff())
            .when(|e: &DbError| e.transient && started.elapsed() < budget)
            .adjust(|_, ours: Option<Duration>| {
                ours.map(|wait| wait.min(budget.saturating_sub(started.elapsed())))
            })
            .notify(|e: &DbError, after: Duration| {
                telemetry::retry(broker, entity);
                warn!(broker = %broker, entity = %entity, error = %e.message,
                      retry_in_ms = after.as_millis() as u64, "Query failed; retrying.");
            })
            .await
            .map_err(|e| self.error(entity, e))
    }

    /// The names and types of the columns `from` returns (prepared, not run).
    async fn shape(&self, entity: Entity, from: &From) -> Result<Shape, SourceError> {
        let started = Instant::now();
        let budget = self.plan.max_retry_time;
        let sql = query::shape(self.plan.engine, from);
        let columns = (|| async { self.db.describe(&sql).await })
            .retry(http::backoff())
            .when(|e: &DbError| e.transient && started.elapsed() < budget)
            .await
            .map_err(|e| self.error(entity, e))?;
        Ok(Shape { columns })
    }

    /// `name` as the database spells it: an exact match, else the one that differs only in
    /// case (PostgreSQL folds unquoted names to lower case; a connector file says `Login`).
    fn resolve(&self, entity: Entity, shape: &Shape, name: &str) -> Result<String, SourceError> {
        let names = || shape.columns.iter().map(|(n, _)| n);
        names()
            .find(|n| *n == name)
            .or_else(|| names().find(|n| n.eq_ignore_ascii_case(name)))
            .cloned()
            .ok_or_else(|| {
                let known: Vec<&String> = names().collect();
                self.fail(
                    entity,
                    format!("no column `{name}` (the source has {known:?})"),
                )
            })
    }

    /// How bounds are bound to time column `column` (as resolved).
    async fn time_kind(
        &self,
        entity: Entity,
        from: &From,
        shape: &Shape,
        column: &str,
    ) -> Result<TimeKind, SourceError> {
        let type_name = shape
            .columns
            .iter()
            .find(|(n, _)| n == column)
            .map_or("", |(_, t)| t.as_str());
        match (self.plan.engine, type_name) {
            (Engine::Sqlite, _) => {
                // SQLite compares times as text: write bounds as the column's values are.
                let sql = query::sample(self.plan.engine, from, column);
                let rows = self.fetch(entity, &sql, &[]).await?;
                let sample = rows.rows.first().and_then(|r| r.first());
                match sample {
                    Some(DbValue::Int(_)) => self.epoch_kind(entity, column, "INTEGER"),
                    None => Ok(TimeKind::Text(TextStyle {
                        t_separator: false,
                        zulu: false,
                    })),
                    Some(DbValue::Text(text) | DbValue::TimeText(text)) => {
                        TextStyle::of(text).map(TimeKind::Text).ok_or_else(|| {
                            self.fail(
                                entity,
                                format!(
                                    "column `{column}` holds `{text}`: SQLite times must be text \
                                     like 2026-01-31 06:00:00 (wall-clock) or \
                                     2026-01-31T06:00:00Z"
                                ),
                            )
                        })
                    }
                    Some(other) => Err(self.fail(
                        entity,
                        format!(
                            "column `{column}` holds `{}`, not a time in text",
                            other.text()
                        ),
                    )),
                }
            }
            (_, "TIMESTAMPTZ") => Ok(TimeKind::Instant),
            // MySQL TIMESTAMP is an instant, read and compared in the session's UTC.
            (Engine::MySql, "TIMESTAMP") => Ok(TimeKind::Instant),
            (_, "TIMESTAMP" | "DATETIME") => Ok(TimeKind::Civil),
            (_, "DATE") => Ok(TimeKind::Date),
            (_, t) if is_integer_type(t) => self.epoch_kind(entity, column, t),
            (_, other) => Err(self.fail(
                entity,
                format!(
                    "column `{column}` is {other}: the cursor and deal time columns must be \
                     timestamps (timestamp, timestamptz, DATETIME, TIMESTAMP)"
                ),
            )),
        }
    }

    /// An integer time column counts in `[sql] epoch`, which must be said.
    fn epoch_kind(
        &self,
        entity: Entity,
        column: &str,
        type_name: &str,
    ) -> Result<TimeKind, SourceError> {
        self.plan.epoch.map(TimeKind::Epoch).ok_or_else(|| {
            self.fail(
                entity,
                format!(
                    "column `{column}` is {type_name}: set [sql] epoch = \"s\" or \"ms\" to say \
                     what it counts since 1970"
                ),
            )
        })
    }

    /// Rows whose cursor is NULL never fall in a window: say so, loudly, every run.
    async fn warn_null_cursors(
        &self,
        entity: Entity,
        from: &From,
        cursor: &str,
    ) -> Result<(), SourceError> {
        let sql = query::null_count(self.plan.engine, from, cursor);
        let rows = self.fetch(entity, &sql, &[]).await?;
        let count = rows
            .rows
            .first()
            .and_then(|r| r.first())
            .and_then(count)
            .unwrap_or(0);
        if count > 0 {
            warn!(broker = %self.broker, entity = %entity, rows = count, column = cursor,
                  "Rows with a NULL cursor are never synced: COALESCE the column in a query.");
        }
        Ok(())
    }

    fn fail(&self, entity: Entity, message: String) -> SourceError {
        self.error(
            entity,
            DbError {
                message,
                transient: false,
            },
        )
    }

    fn error(&self, entity: Entity, e: DbError) -> SourceError {
        SourceError::Query {
            origin: self.origin(entity),
            message: e.message,
            retryable: e.transient,
        }
    }

    fn zone(&self) -> &TimeZone {
        &self.plan.naive_zone
    }
}

impl Source for SqlSource {
    fn as_sql(&self) -> Option<&SqlSource> {
        Some(self)
    }

    fn pages(&self, entity: Entity, window: Window) -> Box<dyn Pager + '_> {
        let Some(spec) = &self.plan.entities[entity as usize] else {
            return Box::new(Unconfigured {
                source: self,
                entity,
            });
        };
        match &spec.deals {
            Some(deals) => Box::new(deals::DealsPager::new(self, entity, spec, deals, window)),
            None => Box::new(RowPager {
                source: self,
                entity,
                spec,
                cursor: &spec.cursor,
                window,
                resolved: None,
                after: None,
                calls: 0,
                done: false,
            }),
        }
    }
}

/// One day's (and currency's) count and sums, as the database computed them.
#[derive(Debug, Clone)]
pub struct DayRow {
    pub day: String,
    pub currency: String,
    pub count: u64,
    pub sums: Vec<rust_decimal::Decimal>,
}

impl SqlSource {
    /// Per UTC day of `day_column` in `[from, to)`: the count of rows and the sums of `sums`
    /// per `currency`, computed by the database (bound parameters, one query). `None` when it
    /// cannot be computed exactly there: SQLite (no exact sums), deals, naive times in a zone
    /// MySQL cannot convert, integer times.
    pub async fn day_totals(
        &self,
        entity: Entity,
        day_column: &str,
        currency: Option<&str>,
        sums: &[&str],
        from: jiff::Timestamp,
        to: jiff::Timestamp,
    ) -> Result<Option<Vec<DayRow>>, SourceError> {
        let Some(spec) = &self.plan.entities[entity as usize] else {
            return Ok(None);
        };
        if spec.deals.is_some() || self.plan.engine == Engine::Sqlite {
            return Ok(None);
        }
        let shape = self.shape(entity, &spec.from).await?;
        let day = self.resolve(entity, &shape, day_column)?;
        let currency = match currency {
            Some(c) => Some(self.resolve(entity, &shape, c)?),
            None => None,
        };
        let mut summed = Vec::new();
        for s in sums {
            summed.push(self.resolve(entity, &shape, s)?);
        }
        let kind = self.time_kind(entity, &spec.from, &shape, &day).await?;
        let zone_name = self.plan.naive_zone.iana_name().map(str::to_owned);
        let utc_naive = self.plan.naive_zone == TimeZone::UTC;
        let Some(q) = query::day_totals(
            self.plan.engine,
            &spec.from,
            &day,
            kind,
            zone_name.is_some(),
            utc_naive,
            currency.as_deref(),
            &summed,
        ) else {
            return Ok(None);
        };
        let mut params = vec![bound(from, kind, self.zone()), bound(to, kind, self.zone())];
        if q.zone {
            params.push(DbValue::Text(zone_name.unwrap_or_default()));
        }
        let rows = self.fetch(entity, &q.sql, &params).await?;
        let decimal = |v: &DbValue| match v {
            DbValue::Decimal(d) => Some(*d),
            DbValue::Int(i) => Some((*i).into()),
            DbValue::Null => Some(rust_decimal::Decimal::ZERO),
            _ => None,
        };
        let mut out = Vec::with_capacity(rows.rows.len());
        let offset = usize::from(currency.is_some());
        for row in &rows.rows {
            let sums: Option<Vec<_>> = row[2 + offset..].iter().map(decimal).collect();
            let (Some(n), Some(sums)) = (count(&row[1 + offset]), sums) else {
                // An inexact SUM (a float column): let the rows speak instead.
                return Ok(None);
            };
            out.push(DayRow {
                day: row[0].text(),
                currency: if offset == 1 {
                    row[1].text()
                } else {
                    String::new()
                },
                count: n as u64,
                sums,
            });
        }
        Ok(Some(out))
    }

    /// Pages of `entity`'s rows whose `column` (a business date) lies in `window`, in keyset
    /// order on `(column, key)`: the rows of the days whose totals differ.
    pub fn pages_by<'a>(
        &'a self,
        entity: Entity,
        column: &'a str,
        window: Window,
    ) -> Box<dyn Pager + 'a> {
        let Some(spec) = &self.plan.entities[entity as usize] else {
            return Box::new(Unconfigured {
                source: self,
                entity,
            });
        };
        Box::new(RowPager {
            source: self,
            entity,
            spec,
            cursor: column,
            window,
            resolved: None,
            after: None,
            calls: 0,
            done: false,
        })
    }
}

/// Pages of one entity's rows whose cursor column lies in the window.
struct RowPager<'a> {
    source: &'a SqlSource,
    entity: Entity,
    spec: &'a SqlEntityPlan,
    /// The column the window is over: the cursor, or a business date (reconciliation).
    cursor: &'a str,
    window: Window,
    /// The keyset columns as the database spells them, and how the cursor is bound.
    resolved: Option<(Vec<String>, TimeKind)>,
    /// The keyset position: the last row's cursor and key values, as read.
    after: Option<Vec<DbValue>>,
    calls: u64,
    done: bool,
}

impl Pager for RowPager<'_> {
    fn next_page(&mut self) -> BoxFuture<'_, Result<Option<Page>, SourceError>> {
        Box::pin(self.next())
    }
}

impl RowPager<'_> {
    async fn next(&mut self) -> Result<Option<Page>, SourceError> {
        if self.done {
            return Ok(None);
        }
        self.calls += 1;
        let source = self.source;
        let (order, kind) = match &self.resolved {
            Some(resolved) => resolved.clone(),
            None => {
                let shape = source.shape(self.entity, &self.spec.from).await?;
                let mut order = Vec::new();
                for name in
                    std::iter::once(self.cursor).chain(self.spec.key.iter().map(String::as_str))
                {
                    order.push(source.resolve(self.entity, &shape, name)?);
                }
                let names: Vec<&String> = shape.columns.iter().map(|(n, _)| n).collect();
                if let Some(twice) = names
                    .iter()
                    .find(|n| names.iter().filter(|m| m == n).count() > 1)
                {
                    return Err(source.fail(
                        self.entity,
                        format!("the source returns column `{twice}` twice: alias one of them"),
                    ));
                }
                let kind = source
                    .time_kind(self.entity, &self.spec.from, &shape, &order[0])
                    .await?;
                source
                    .warn_null_cursors(self.entity, &self.spec.from, &order[0])
                    .await?;
                let nulls =
                    query::null_keys(source.plan.engine, &self.spec.from, &order[0], &order[1..]);
                let bounds = params(&nulls.slots, self.window, kind, source.zone(), None);
                let found = source.fetch(self.entity, &nulls.sql, &bounds).await?;
                if let Some(n) = found
                    .rows
                    .first()
                    .and_then(|r| r.first())
                    .and_then(count)
                    .filter(|n| *n > 0)
                {
                    return Err(source.fail(
                        self.entity,
                        format!(
                            "{n} row(s) of the window have a NULL key column ({}): key columns must be NOT NULL and unique",
                            order[1..].join(", ")
                        ),
                    ));
                }
                self.resolved = Some((order.clone(), kind));
                (order, kind)
            }
        };
        let page_size = source.plan.page_size;
        let q = query::page(
            source.plan.engine,
            &self.spec.from,
            None,
            &order,
            Upper::Inclusive,
            self.after.is_some(),
            page_size,
        );
        let params = params(
            &q.slots,
            self.window,
            kind,
            source.zone(),
            self.after.as_deref(),
        );
        let rows = source.fetch(self.entity, &q.sql, &params).await?;
        self.done = rows.rows.len() < page_size as usize;
        if rows.rows.is_empty() && self.calls > 1 {
            return Ok(None);
        }
        let positions = positions(&rows.names, &order).map_err(|m| source.fail(self.entity, m))?;
        if let Some(last) = rows.rows.last() {
            let after: Vec<DbValue> = positions.iter().map(|&i| last[i].clone()).collect();
            // A NULL key cannot be a keyset position: `k > NULL` is never true, so the rows
            // after it that share its cursor would be skipped.
            if let Some(i) = after.iter().skip(1).position(|v| *v == DbValue::Null) {
                return Err(source.fail(
                    self.entity,
                    format!(
                        "a row with {} = {} has a NULL key column `{}`: key columns must be NOT NULL and unique",
                        order[0],
                        after[0].text(),
                        order[i + 1]
                    ),
                ));
            }
            self.after = Some(after);
        }
        let zone = source.zone();
        let records = rows
            .rows
            .iter()
            .map(|row| record(&rows.names, row, zone).into())
            .collect();
        // The first call answers even when the window is empty: the engine commits the
        // (empty) last page with the cursor.
        Ok(Some(Page {
            records,
            origin: format!("{} page {}", source.origin(self.entity), self.calls),
        }))
    }
}

/// A `COUNT(*)` as the engine returns it.
fn count(v: &DbValue) -> Option<i64> {
    match v {
        DbValue::Int(n) => Some(*n),
        DbValue::UInt(n) => i64::try_from(*n).ok(),
        DbValue::Decimal(d) => i64::try_from(*d).ok(),
        _ => None,
    }
}

fn is_integer_type(name: &str) -> bool {
    matches!(
        name.trim_end_matches(" UNSIGNED"),
        "INT2" | "INT4" | "INT8" | "SMALLINT" | "MEDIUMINT" | "INT" | "BIGINT" | "INTEGER"
    )
}

/// The bound values for a query's slots.
fn params(
    slots: &[Slot],
    range: Window,
    kind: TimeKind,
    zone: &TimeZone,
    after: Option<&[DbValue]>,
) -> Vec<DbValue> {
    slots
        .iter()
        .map(|slot| match slot {
            Slot::Lower => bound(range.from, kind, zone),
            Slot::Upper => bound(range.to, kind, zone),
            Slot::After(i) => after.map_or(DbValue::Null, |a| a[*i].clone()),
        })
        .collect()
}

/// Where each of `wanted` is among a result's column names.
fn positions(names: &[String], wanted: &[String]) -> Result<Vec<usize>, String> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    wanted
        .iter()
        .map(|w| {
            names
                .iter()
                .position(|n| n == w)
                .or_else(|| names.iter().position(|n| n.eq_ignore_ascii_case(w)))
                .ok_or_else(|| format!("the query returns no column `{w}`"))
        })
        .collect()
}

/// A row as the JSON object the field mapping reads: column name → value.
fn record(names: &[String], row: &[DbValue], zone: &TimeZone) -> Value {
    let mut object = Map::with_capacity(names.len());
    for (name, value) in names.iter().zip(row) {
        object.insert(name.clone(), value.to_json(zone));
    }
    Value::Object(object)
}

/// An entity the connector file has no `[sql.<entity>]` for (`check` refuses such files;
/// this is the message should one be asked anyway).
struct Unconfigured<'a> {
    source: &'a SqlSource,
    entity: Entity,
}

impl Pager for Unconfigured<'_> {
    fn next_page(&mut self) -> BoxFuture<'_, Result<Option<Page>, SourceError>> {
        let error = self.source.fail(
            self.entity,
            format!("no [sql.{}] table in the connector file", self.entity),
        );
        Box::pin(async move { Err(error) })
    }
}
