//! Instants in the formats brokers use, both ways: reading a record's field and writing a
//! window bound into a query.

use jiff::Timestamp;
use jiff::civil::{Date, DateTime};
use jiff::fmt::strtime::BrokenDownTime;
use jiff::tz::TimeZone;

use super::raw::Leaf;
use crate::config::plan::TimeFormat;

/// Reads an instant from `value` as `format` says; naive times are in `zone`.
pub fn parse_instant_as(
    value: &Leaf,
    format: &TimeFormat,
    zone: &TimeZone,
) -> Result<Timestamp, String> {
    match format {
        TimeFormat::Rfc3339 => {
            let Leaf::Str(text) = value else {
                return Err("expected an ISO 8601 string".into());
            };
            if let Ok(ts) = text.parse::<Timestamp>() {
                return Ok(ts);
            }
            let civil = text
                .parse::<DateTime>()
                .or_else(|_| {
                    text.parse::<Date>()
                        .map(|d| d.to_datetime(jiff::civil::Time::midnight()))
                })
                .map_err(|_| "not an ISO 8601 date-time".to_owned())?;
            in_zone(civil, zone)
        }
        TimeFormat::EpochSeconds | TimeFormat::EpochMillis => {
            let text = match value {
                Leaf::Number(n) => n,
                Leaf::Str(s) => s.trim(),
                _ => return Err("expected an epoch number".into()),
            };
            let n: i64 = text
                .parse()
                .map_err(|_| "not an integer epoch time".to_owned())?;
            let ts = if *format == TimeFormat::EpochSeconds {
                Timestamp::from_second(n)
            } else {
                Timestamp::from_millisecond(n)
            };
            ts.map_err(|e| format!("out of range: {e}"))
        }
        TimeFormat::Format(f) => {
            let Leaf::Str(text) = value else {
                return Err("expected a string".into());
            };
            let tm = BrokenDownTime::parse(f, text.as_bytes())
                .map_err(|_| format!("does not match `{f}`"))?;
            if tm.offset().is_some() {
                return tm.to_timestamp().map_err(|e| e.to_string());
            }
            let civil = tm
                .to_datetime()
                .or_else(|_| {
                    tm.to_date()
                        .map(|d| d.to_datetime(jiff::civil::Time::midnight()))
                })
                .map_err(|e| e.to_string())?;
            in_zone(civil, zone)
        }
    }
}

/// Writes `ts` as `format` says (naive formats in `zone`).
pub fn format_instant(ts: Timestamp, format: &TimeFormat, zone: &TimeZone) -> String {
    match format {
        TimeFormat::Rfc3339 => ts.to_string(),
        TimeFormat::EpochSeconds => ts.as_second().to_string(),
        TimeFormat::EpochMillis => ts.as_millisecond().to_string(),
        TimeFormat::Format(f) => ts.to_zoned(zone.clone()).strftime(f).to_string(),
    }
}

fn in_zone(civil: DateTime, zone: &TimeZone) -> Result<Timestamp, String> {
    // `compatible`: a time in a DST gap moves forward, a repeated hour takes its first
    // occurrence, as the broker's server would have printed it.
    zone.to_ambiguous_zoned(civil)
        .compatible()
        .map(|z| z.timestamp())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn parse_instant_as(
        value: &Value,
        f: &TimeFormat,
        zone: &TimeZone,
    ) -> Result<Timestamp, String> {
        super::parse_instant_as(&Leaf::from_value(value), f, zone)
    }

    #[test]
    fn naive_times_are_read_in_the_broker_zone() {
        let athens = TimeZone::get("Europe/Athens").unwrap();
        let f = TimeFormat::Format("%Y.%m.%d %H:%M:%S".into());
        let winter = parse_instant_as(&json!("2026.01.15 10:00:00"), &f, &athens).unwrap();
        assert_eq!(winter.to_string(), "2026-01-15T08:00:00Z");
        let summer = parse_instant_as(&json!("2026-07-15T10:00:00"), &TimeFormat::Rfc3339, &athens);
        assert_eq!(summer.unwrap().to_string(), "2026-07-15T07:00:00Z");
    }

    #[test]
    fn new_york_close_server_time_follows_us_dst() {
        // Between the US (8 March 2026) and EU (29 March 2026) switches, New-York-close servers
        // are already on UTC+3 while Europe/Athens is still on UTC+2.
        let nyc = TimeZone::posix("EET-2EEST,M3.2.0/9,M11.1.0/9").unwrap();
        let t =
            parse_instant_as(&json!("2026-03-20 12:00:00"), &TimeFormat::Rfc3339, &nyc).unwrap();
        assert_eq!(t.to_string(), "2026-03-20T09:00:00Z");
    }

    #[test]
    fn epochs_and_offsets_round_trip() {
        let utc = TimeZone::UTC;
        let t =
            parse_instant_as(&json!(1767225600123_i64), &TimeFormat::EpochMillis, &utc).unwrap();
        assert_eq!(t.to_string(), "2026-01-01T00:00:00.123Z");
        assert_eq!(
            format_instant(t, &TimeFormat::EpochMillis, &utc),
            "1767225600123"
        );
        let s = parse_instant_as(&json!("1767225600"), &TimeFormat::EpochSeconds, &utc).unwrap();
        assert_eq!(
            format_instant(s, &TimeFormat::EpochSeconds, &utc),
            "1767225600"
        );
        let off = parse_instant_as(
            &json!("2026-01-01T02:00:00+02:00"),
            &TimeFormat::Rfc3339,
            &utc,
        );
        assert_eq!(off.unwrap().to_string(), "2026-01-01T00:00:00Z");
        assert!(parse_instant_as(&json!("soon"), &TimeFormat::Rfc3339, &utc).is_err());
    }
}
