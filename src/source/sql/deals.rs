//! Daily trading activity from MetaTrader 5 deals.
//!
//! A sync reads the deals whose change stamp (the cursor column) lies in its window only to
//! learn which trading days they fall on. Each such day is then recomputed whole from every
//! deal it holds now, and its rows replace the stored ones: a deal inserted, corrected or
//! cancelled re-totals its day, and nothing depends on having seen the day's earlier changes.
//!
//! What counts (per trading day, login, symbol and currency):
//! - `BUY` (0) and `SELL` (1) deals are trades. `lots_traded` sums `volume / volume_per_lot`
//!   over the trades whose entry `lots_on` selects: `all` (every entry), `in` (IN, INOUT) or
//!   `out` (OUT, INOUT, OUT_BY). `commission` is minus the sum of their commissions (MT5 books
//!   a charge as a negative amount; Track360 wants the charge), and `pnl` the sum of their
//!   profit plus swap — realised P&L, since opening deals carry no profit.
//! - `BUY_CANCELED` (13) and `SELL_CANCELED` (14) are trades the dealer cancelled: they count
//!   for nothing, but their group is still written, so that a day whose only trade was cancelled
//!   is replaced by a zero row instead of keeping the stale total.
//! - Every other action (balance, credit, charges, corrections, bonuses, commissions booked as
//!   deals, dividends, taxes…) is money movement, not trading activity: not counted here.
//! - `last_modified_date` of a row is the newest change stamp of the deals in its group.
//!
//! A trading day starts at `day_start` in `day_zone` (default 00:00 server time). A start at
//! or after noon names the day after the one it starts on, as forex does: with
//! `day_start = "17:00"` in New York, Monday 17:00 to Tuesday 17:00 is Tuesday. Days are 23 or
//! 25 hours long when the zone changes its clocks.

use std::collections::{BTreeMap, BTreeSet};

use jiff::civil::Date;
use jiff::tz::Disambiguation;
use jiff::{SignedDuration, Timestamp};
use rust_decimal::Decimal;
use serde_json::{Value, json};

use super::query::{self, Upper};
use super::value::{DbValue, TimeKind};
use super::{SqlSource, params};
use crate::config::sql::{Currency, DealsPlan, LotsOn, SqlEntityPlan};
use crate::model::Entity;
use crate::normalise::RawRecord;
use crate::sink::BoxFuture;
use crate::source::{Page, Pager, SourceError, Window};

const BUY: i64 = 0;
const SELL: i64 = 1;
const BUY_CANCELED: i64 = 13;
const SELL_CANCELED: i64 = 14;
const ENTRY_IN: i64 = 0;
const ENTRY_INOUT: i64 = 2;

pub struct DealsPager<'a> {
    source: &'a SqlSource,
    entity: Entity,
    spec: &'a SqlEntityPlan,
    deals: &'a DealsPlan,
    window: Window,
    /// `None` until the changed deals were scanned; then the days left to recompute.
    days: Option<Vec<Date>>,
    answered: bool,
    resolved: Option<Resolved>,
}

/// Positions in `DealsPager::columns`.
const STAMP: usize = 0;
const DEAL: usize = 1;
const TIME: usize = 2;

#[derive(Debug, Clone)]
struct Resolved {
    columns: Vec<String>,
    stamp: TimeKind,
    time: TimeKind,
}

impl<'a> DealsPager<'a> {
    pub fn new(
        source: &'a SqlSource,
        entity: Entity,
        spec: &'a SqlEntityPlan,
        deals: &'a DealsPlan,
        window: Window,
    ) -> Self {
        DealsPager {
            source,
            entity,
            spec,
            deals,
            window,
            days: None,
            answered: false,
            resolved: None,
        }
    }

    /// The configured columns, in the order every deals query selects them.
    fn columns(&self) -> Vec<&'a str> {
        let d = self.deals;
        let mut columns = vec![
            self.spec.cursor.as_str(),
            &d.deal,
            &d.time,
            &d.login,
            &d.symbol,
            &d.action,
            &d.entry,
            &d.volume,
            &d.commission,
            &d.swap,
            &d.profit,
        ];
        if let Currency::Column(c) = &d.currency {
            columns.push(c);
        }
        columns
    }

    /// The columns as the database spells them, and how the change stamp and the deal time
    /// are bound. Learned once per run.
    async fn resolve(&mut self) -> Result<Resolved, SourceError> {
        if let Some(resolved) = &self.resolved {
            return Ok(resolved.clone());
        }
        let source = self.source;
        let shape = source.shape(self.entity, &self.spec.from).await?;
        let mut columns = Vec::new();
        for name in self.columns() {
            columns.push(source.resolve(self.entity, &shape, name)?);
        }
        let stamp = source
            .time_kind(self.entity, &self.spec.from, &shape, &columns[STAMP])
            .await?;
        let time = source
            .time_kind(self.entity, &self.spec.from, &shape, &columns[TIME])
            .await?;
        let resolved = Resolved {
            columns,
            stamp,
            time,
        };
        self.resolved = Some(resolved.clone());
        Ok(resolved)
    }

    /// Every deal whose `by` column lies in `range` (with the deal id as the keyset's
    /// tie-break), page by page, handed to `each`.
    async fn scan(
        &self,
        resolved: &Resolved,
        by: usize,
        range: Window,
        upper: Upper,
        mut each: impl FnMut(&[DbValue]) -> Result<(), String>,
    ) -> Result<(), SourceError> {
        let source = self.source;
        let page_size = source.plan.page_size;
        let order = [resolved.columns[by].clone(), resolved.columns[DEAL].clone()];
        let kind = if by == STAMP {
            resolved.stamp
        } else {
            resolved.time
        };
        let mut after: Option<Vec<DbValue>> = None;
        loop {
            let q = query::page(
                source.plan.engine,
                &self.spec.from,
                Some(&resolved.columns),
                &order,
                upper,
                after.is_some(),
                page_size,
            );
            let bound = params(&q.slots, range, kind, source.zone(), after.as_deref());
            let rows = source.fetch(self.entity, &q.sql, &bound).await?;
            for row in &rows.rows {
                each(row).map_err(|m| source.fail(self.entity, m))?;
            }
            match rows.rows.last() {
                Some(last) if rows.rows.len() == page_size as usize => {
                    after = Some(vec![last[by].clone(), last[DEAL].clone()]);
                }
                _ => return Ok(()),
            }
        }
    }

    /// The trading days of the deals changed in the window, oldest first.
    async fn changed_days(&self, resolved: &Resolved) -> Result<Vec<Date>, SourceError> {
        let zone = self.source.zone().clone();
        let mut days = BTreeSet::new();
        self.scan(resolved, STAMP, self.window, Upper::Inclusive, |row| {
            let time = row[2].instant_as(resolved.time, &zone).ok_or_else(|| {
                format!(
                    "deal {}: time `{}` is not a time",
                    row[1].text(),
                    row[2].text()
                )
            })?;
            days.insert(trading_day(time, self.deals));
            Ok(())
        })
        .await?;
        Ok(days.into_iter().collect())
    }

    /// Every group of `day`, from all of its deals as they are now.
    async fn day(&self, resolved: &Resolved, day: Date) -> Result<Vec<Value>, SourceError> {
        let zone = self.source.zone().clone();
        let (from, to) = day_range(day, self.deals);
        let mut groups: BTreeMap<(String, String, String), Group> = BTreeMap::new();
        self.scan(
            resolved,
            TIME,
            Window { from, to },
            Upper::Exclusive,
            |row| add(&mut groups, row, self.deals, resolved.stamp, &zone),
        )
        .await?;
        Ok(groups
            .into_iter()
            .map(|((login, symbol, currency), g)| {
                let commission = -g.commission;
                json!({
                    "date": day.to_string(),
                    "customer_id": login,
                    "instrument": symbol,
                    "lots_traded": g.lots.normalize().to_string(),
                    "commission": zero_is_zero(commission).normalize().to_string(),
                    "pnl": zero_is_zero(g.pnl).normalize().to_string(),
                    "currency": currency,
                    "last_modified_date": g.modified.to_string(),
                })
            })
            .collect())
    }
}

impl Pager for DealsPager<'_> {
    fn next_page(&mut self) -> BoxFuture<'_, Result<Option<Page>, SourceError>> {
        Box::pin(async move {
            let resolved = self.resolve().await?;
            if self.days.is_none() {
                let mut days = self.changed_days(&resolved).await?;
                days.reverse();
                self.days = Some(days);
            }
            let next = self.days.as_mut().and_then(Vec::pop);
            let origin = self.source.origin(self.entity);
            match next {
                Some(day) => {
                    self.answered = true;
                    Ok(Some(Page {
                        records: (self.day(&resolved, day).await?)
                            .into_iter()
                            .map(RawRecord::Value)
                            .collect(),
                        origin: format!("{origin} deals of {day}"),
                    }))
                }
                // No day changed: one empty page, so that the cursor moves.
                None if !self.answered => {
                    self.answered = true;
                    Ok(Some(Page {
                        records: Vec::new(),
                        origin,
                    }))
                }
                None => Ok(None),
            }
        })
    }
}

#[derive(Debug)]
struct Group {
    lots: Decimal,
    commission: Decimal,
    pnl: Decimal,
    modified: Timestamp,
}

/// Adds one deal (columns in `DealsPager::columns` order) to its group.
fn add(
    groups: &mut BTreeMap<(String, String, String), Group>,
    row: &[DbValue],
    deals: &DealsPlan,
    stamp: TimeKind,
    zone: &jiff::tz::TimeZone,
) -> Result<(), String> {
    let deal = row[1].text();
    let action = integer(&row[5])
        .ok_or_else(|| format!("deal {deal}: action `{}` is not an integer", row[5].text()))?;
    let counted = matches!(action, BUY | SELL);
    // A deal on a symbol that is not a trade (cancelled, or re-typed) still belongs to its
    // group: the group is written, with its newest stamp, even when nothing in it counts —
    // so a day whose trades were all cancelled is replaced by zeros, not kept stale.
    if !counted && !matches!(action, BUY_CANCELED | SELL_CANCELED) && row[4].text().is_empty() {
        return Ok(());
    }
    let modified = row[0].instant_as(stamp, zone).ok_or_else(|| {
        format!(
            "deal {deal}: change stamp `{}` is not a time",
            row[0].text()
        )
    })?;
    let currency = match &deals.currency {
        Currency::Const(code) => code.clone(),
        Currency::Column(_) => row[11].text(),
    };
    let key = (row[3].text(), row[4].text(), currency);
    let group = groups.entry(key).or_insert(Group {
        lots: Decimal::ZERO,
        commission: Decimal::ZERO,
        pnl: Decimal::ZERO,
        modified,
    });
    group.modified = group.modified.max(modified);
    if !counted {
        return Ok(());
    }
    let number = |i: usize, what: &str| {
        decimal(&row[i])
            .ok_or_else(|| format!("deal {deal}: {what} `{}` is not a number", row[i].text()))
    };
    let entry = integer(&row[6])
        .ok_or_else(|| format!("deal {deal}: entry `{}` is not an integer", row[6].text()))?;
    let lots_count = match deals.lots_on {
        LotsOn::All => true,
        LotsOn::In => matches!(entry, ENTRY_IN | ENTRY_INOUT),
        LotsOn::Out => entry != ENTRY_IN,
    };
    if lots_count {
        group.lots += number(7, "volume")? / deals.volume_per_lot;
    }
    group.commission += number(8, "commission")?;
    group.pnl += number(10, "profit")? + number(9, "swap")?;
    Ok(())
}

/// The trading day an instant falls on.
pub fn trading_day(t: Timestamp, deals: &DealsPlan) -> Date {
    let local = t.to_zoned(deals.day_zone.clone()).datetime();
    let since_midnight = deals
        .day_start
        .duration_since(jiff::civil::Time::midnight());
    let shift = if deals.day_start.hour() >= 12 {
        SignedDuration::from_hours(24) - since_midnight
    } else {
        -since_midnight
    };
    local
        .checked_add(shift)
        .map_or(local.date(), |shifted| shifted.date())
}

/// The instants `[from, to)` of trading day `day`.
pub fn day_range(day: Date, deals: &DealsPlan) -> (Timestamp, Timestamp) {
    let start_date = if deals.day_start.hour() >= 12 {
        day.yesterday().unwrap_or(day)
    } else {
        day
    };
    let at = |date: Date| {
        let civil = date.to_datetime(deals.day_start);
        deals
            .day_zone
            .to_ambiguous_zoned(civil)
            .disambiguate(Disambiguation::Compatible)
            .map(|z| z.timestamp())
            .unwrap_or(Timestamp::MAX)
    };
    let end_date = start_date.tomorrow().unwrap_or(start_date);
    (at(start_date), at(end_date))
}

fn integer(v: &DbValue) -> Option<i64> {
    match v {
        DbValue::Int(i) => Some(*i),
        DbValue::UInt(u) => i64::try_from(*u).ok(),
        DbValue::Decimal(d) if d.fract().is_zero() => i64::try_from(*d).ok(),
        DbValue::Text(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn decimal(v: &DbValue) -> Option<Decimal> {
    match v {
        DbValue::Int(i) => Some(Decimal::from(*i)),
        DbValue::UInt(u) => Some(Decimal::from(*u)),
        DbValue::Decimal(d) => Some(*d),
        DbValue::Float(f) => f.to_string().parse().ok(),
        DbValue::Text(s) => s.trim().parse().ok(),
        DbValue::Null => Some(Decimal::ZERO),
        _ => None,
    }
}

/// `-0` prints as `-0`; a total of nothing is `0`.
fn zero_is_zero(d: Decimal) -> Decimal {
    if d.is_zero() { Decimal::ZERO } else { d }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::Time;
    use jiff::tz::TimeZone;

    fn plan(start: &str, zone: &str) -> DealsPlan {
        DealsPlan {
            deal: "Deal".into(),
            login: "Login".into(),
            time: "Time".into(),
            symbol: "Symbol".into(),
            action: "Action".into(),
            entry: "Entry".into(),
            volume: "Volume".into(),
            commission: "Commission".into(),
            swap: "Storage".into(),
            profit: "Profit".into(),
            currency: Currency::Const("USD".into()),
            volume_per_lot: Decimal::from(10_000),
            day_start: start.parse::<Time>().unwrap(),
            day_zone: TimeZone::get(zone).unwrap(),
            lots_on: LotsOn::All,
        }
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn server_midnight_days() {
        let p = plan("00:00", "Europe/Athens");
        // 21:59:59Z is 23:59:59 in Athens winter time; 22:00Z is the next day.
        assert_eq!(
            trading_day(ts("2026-01-05T21:59:59Z"), &p).to_string(),
            "2026-01-05"
        );
        assert_eq!(
            trading_day(ts("2026-01-05T22:00:00Z"), &p).to_string(),
            "2026-01-06"
        );
        let (from, to) = day_range("2026-01-06".parse().unwrap(), &p);
        assert_eq!(
            (from.to_string(), to.to_string()),
            ("2026-01-05T22:00:00Z".into(), "2026-01-06T22:00:00Z".into())
        );
    }

    #[test]
    fn new_york_five_pm_days_are_named_after_the_day_they_end() {
        let p = plan("17:00", "America/New_York");
        // Monday 2026-01-05 17:30 New York (22:30Z) trades on Tuesday's day.
        assert_eq!(
            trading_day(ts("2026-01-05T22:30:00Z"), &p).to_string(),
            "2026-01-06"
        );
        assert_eq!(
            trading_day(ts("2026-01-05T21:59:00Z"), &p).to_string(),
            "2026-01-05"
        );
        let (from, to) = day_range("2026-01-06".parse().unwrap(), &p);
        assert_eq!(
            (from.to_string(), to.to_string()),
            ("2026-01-05T22:00:00Z".into(), "2026-01-06T22:00:00Z".into())
        );
    }

    #[test]
    fn days_are_23_or_25_hours_when_clocks_change() {
        let p = plan("00:00", "Europe/Athens");
        let (from, to) = day_range("2026-03-29".parse().unwrap(), &p);
        assert_eq!(to.duration_since(from), SignedDuration::from_hours(23));
        let (from, to) = day_range("2026-10-25".parse().unwrap(), &p);
        assert_eq!(to.duration_since(from), SignedDuration::from_hours(25));
        for day in ["2026-03-29", "2026-10-25"] {
            let (from, to) = day_range(day.parse().unwrap(), &p);
            assert_eq!(trading_day(from, &p).to_string(), day);
            assert_eq!(
                trading_day(to - SignedDuration::from_secs(1), &p).to_string(),
                day
            );
            assert_ne!(trading_day(to, &p).to_string(), day);
        }
    }
}
