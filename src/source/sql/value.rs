//! Database values: what a row's columns are read into, how they become the JSON the field
//! mapping reads, and how they are bound back (keyset positions, window bounds).
//!
//! Numbers stay exact (decimals as text, integers as integers); instants leave as RFC 3339 UTC;
//! naive timestamps are read in the database's naive zone on the way out, but bound back as the
//! very value read, so that a keyset position never moves by a round trip through a zone.

use jiff::Timestamp;
use jiff::civil::{Date, DateTime};
use jiff::tz::{Disambiguation, TimeZone};
use rust_decimal::Decimal;
use serde_json::Value;

/// One column value as the database gave it.
#[derive(Debug, Clone, PartialEq)]
pub enum DbValue {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Decimal(Decimal),
    /// A binary float (a `REAL`/`DOUBLE` column): passed on as the shortest text that reads
    /// back to the same float. Money belongs in exact columns; this is the best a float allows.
    Float(f64),
    Text(String),
    /// A SQLite timestamp, stored as text: bound back as that text.
    TimeText(String),
    /// `timestamp without time zone`, `DATETIME`: wall-clock time in the naive zone.
    Civil(DateTime),
    /// `timestamptz`, MySQL `TIMESTAMP`.
    Instant(Timestamp),
    Date(Date),
}

/// How a time column's values are written when a bound is bound to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeKind {
    Instant,
    Civil,
    /// SQLite text, compared as text: bounds are written the way the column's values are.
    Text(TextStyle),
    /// An integer count since 1970 (`[sql] epoch` says in what).
    Epoch(Epoch),
    /// A calendar day (`DATE`): an instant's UTC day.
    Date,
}

/// The unit of integer time columns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Epoch {
    Seconds,
    Millis,
}

/// How a SQLite file writes a time column, read off one of its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextStyle {
    /// `2026-01-02T03:04:05` rather than `2026-01-02 03:04:05`.
    pub t_separator: bool,
    /// UTC with a `Z` (an instant) rather than wall-clock in the naive zone.
    pub zulu: bool,
}

impl TextStyle {
    /// The style of `sample`; `None` when text comparison cannot order it (a numeric
    /// offset other than `Z`, or no time at all).
    pub fn of(sample: &str) -> Option<TextStyle> {
        let sample = sample.trim();
        let t_separator = sample.as_bytes().get(10) == Some(&b'T');
        let zulu = sample.ends_with('Z') || sample.ends_with('z');
        // jiff reads `…+02:00` as a civil time too; an offset other than Z would make text
        // order disagree with time order.
        let offset = sample
            .get(19..)
            .is_some_and(|tail| tail.contains(['+', '-']));
        let naive = !offset && sample.parse::<DateTime>().is_ok();
        (naive || zulu && sample.parse::<Timestamp>().is_ok())
            .then_some(TextStyle { t_separator, zulu })
    }
}

impl DbValue {
    /// The instant this value names, naive ones read in `zone`. `None` for non-times.
    ///
    /// A wall-clock time that happens twice (the hour clocks go back) is read as the earlier
    /// instant, one that never happens (the hour they go forward) as after the gap: the
    /// sync's lookback covers the hour either way.
    pub fn instant(&self, zone: &TimeZone) -> Option<Timestamp> {
        match self {
            DbValue::Instant(t) => Some(*t),
            DbValue::Civil(dt) => civil_instant(*dt, zone),
            DbValue::TimeText(text) => parse_time_text(text, zone),
            _ => None,
        }
    }

    /// The instant this value of a column of `kind` names: integers count in the epoch's unit.
    pub fn instant_as(&self, kind: TimeKind, zone: &TimeZone) -> Option<Timestamp> {
        let count = match self {
            DbValue::Int(i) => *i,
            DbValue::UInt(u) => i64::try_from(*u).ok()?,
            _ => return self.instant(zone),
        };
        match kind {
            TimeKind::Epoch(Epoch::Seconds) => Timestamp::from_second(count).ok(),
            TimeKind::Epoch(Epoch::Millis) => Timestamp::from_millisecond(count).ok(),
            _ => None,
        }
    }

    /// The JSON the field mapping reads.
    pub fn to_json(&self, zone: &TimeZone) -> Value {
        match self {
            DbValue::Null => Value::Null,
            DbValue::Bool(b) => Value::Bool(*b),
            DbValue::Int(i) => Value::from(*i),
            DbValue::UInt(u) => Value::from(*u),
            DbValue::Decimal(d) => Value::String(d.to_string()),
            DbValue::Float(f) => Value::String(f.to_string()),
            DbValue::Text(s) => Value::String(s.clone()),
            DbValue::Date(d) => Value::String(d.to_string()),
            DbValue::TimeText(text) => match parse_time_text(text, zone) {
                Some(t) => Value::String(t.to_string()),
                // Not a time after all: validation names the field and the text.
                None => Value::String(text.clone()),
            },
            DbValue::Civil(_) | DbValue::Instant(_) => match self.instant(zone) {
                Some(t) => Value::String(t.to_string()),
                None => Value::Null,
            },
        }
    }

    /// Text for messages and keys.
    pub fn text(&self) -> String {
        match self.to_json(&TimeZone::UTC) {
            Value::String(s) => s,
            other => other.to_string(),
        }
    }
}

/// `t` as a value of a time column of `kind` whose naive values are in `zone`.
pub fn bound(t: Timestamp, kind: TimeKind, zone: &TimeZone) -> DbValue {
    match kind {
        TimeKind::Instant => DbValue::Instant(t),
        TimeKind::Epoch(Epoch::Seconds) => DbValue::Int(t.as_second()),
        TimeKind::Epoch(Epoch::Millis) => DbValue::Int(t.as_millisecond()),
        TimeKind::Date => DbValue::Date(t.to_zoned(TimeZone::UTC).date()),
        TimeKind::Civil => DbValue::Civil(t.to_zoned(zone.clone()).datetime()),
        TimeKind::Text(style) => {
            let sep = if style.t_separator { 'T' } else { ' ' };
            let text = if style.zulu {
                t.strftime(&format!("%Y-%m-%d{sep}%H:%M:%SZ")).to_string()
            } else {
                let civil = t.to_zoned(zone.clone()).datetime();
                civil
                    .strftime(&format!("%Y-%m-%d{sep}%H:%M:%S"))
                    .to_string()
            };
            DbValue::TimeText(text)
        }
    }
}

fn civil_instant(dt: DateTime, zone: &TimeZone) -> Option<Timestamp> {
    zone.to_ambiguous_zoned(dt)
        .disambiguate(Disambiguation::Compatible)
        .ok()
        .map(|z| z.timestamp())
}

/// SQLite's time text: RFC 3339 with an offset, or wall-clock `YYYY-MM-DD[ T]HH:MM[:SS[.f]]`
/// (or a bare date) in `zone`.
fn parse_time_text(text: &str, zone: &TimeZone) -> Option<Timestamp> {
    let text = text.trim();
    if let Ok(t) = text.parse::<Timestamp>() {
        return Some(t);
    }
    if let Ok(dt) = text.parse::<DateTime>() {
        return civil_instant(dt, zone);
    }
    text.parse::<Date>()
        .ok()
        .and_then(|d| civil_instant(d.at(0, 0, 0, 0), zone))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn naive_times_are_read_in_the_zone_and_bound_back_as_wall_clock() {
        let athens = TimeZone::get("Europe/Athens").unwrap();
        let civil: DateTime = "2026-07-01 03:00:00".parse().unwrap();
        let t = DbValue::Civil(civil).instant(&athens).unwrap();
        assert_eq!(t.to_string(), "2026-07-01T00:00:00Z");
        assert_eq!(bound(t, TimeKind::Civil, &athens), DbValue::Civil(civil));
        let style = TextStyle::of("2026-01-01 00:00:00.123").unwrap();
        assert_eq!(
            bound(t, TimeKind::Text(style), &athens),
            DbValue::TimeText("2026-07-01 03:00:00".into())
        );
        let style = TextStyle::of("2026-01-01T00:00:00Z").unwrap();
        assert_eq!(
            bound(t, TimeKind::Text(style), &athens),
            DbValue::TimeText("2026-07-01T00:00:00Z".into())
        );
        assert_eq!(TextStyle::of("2026-01-01T00:00:00+02:00"), None);
        assert_eq!(bound(t, TimeKind::Instant, &athens), DbValue::Instant(t));
        let ms = TimeKind::Epoch(Epoch::Millis);
        assert_eq!(bound(t, ms, &athens), DbValue::Int(1_782_864_000_000));
        assert_eq!(
            DbValue::Int(1_782_864_000_000).instant_as(ms, &athens),
            Some(t)
        );
        let s = TimeKind::Epoch(Epoch::Seconds);
        assert_eq!(DbValue::UInt(1_782_864_000).instant_as(s, &athens), Some(t));
    }

    #[test]
    fn a_repeated_wall_clock_hour_reads_as_its_first_instant() {
        // 2026-10-25 03:30 happens twice in Athens (EEST → EET).
        let athens = TimeZone::get("Europe/Athens").unwrap();
        let civil: DateTime = "2026-10-25 03:30:00".parse().unwrap();
        let t = DbValue::Civil(civil).instant(&athens).unwrap();
        assert_eq!(t.to_string(), "2026-10-25T00:30:00Z");
    }

    #[test]
    fn exact_numbers_stay_exact() {
        let d: Decimal = "1234567890.123456789".parse().unwrap();
        assert_eq!(
            DbValue::Decimal(d).to_json(&TimeZone::UTC),
            Value::String("1234567890.123456789".into())
        );
        assert_eq!(
            DbValue::Float(0.1).to_json(&TimeZone::UTC),
            Value::String("0.1".into())
        );
        assert_eq!(
            DbValue::Int(i64::MAX).to_json(&TimeZone::UTC).to_string(),
            "9223372036854775807"
        );
    }

    #[test]
    fn sqlite_time_text_in_any_common_shape() {
        let utc = TimeZone::UTC;
        for text in [
            "2026-01-02 03:04:05",
            "2026-01-02T03:04:05",
            "2026-01-02T03:04:05Z",
            "2026-01-02T05:04:05+02:00",
        ] {
            let t = DbValue::TimeText(text.into()).instant(&utc).unwrap();
            assert_eq!(t.to_string(), "2026-01-02T03:04:05Z", "{text}");
        }
        assert_eq!(
            DbValue::TimeText("yesterday".into()).to_json(&utc),
            Value::String("yesterday".into())
        );
    }
}
