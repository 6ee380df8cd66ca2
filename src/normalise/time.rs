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

/// Appends `ts` to `out` exactly as `ts.to_string()` would (RFC 3339 in UTC, `Z`, the
/// fraction only when there is one, without trailing zeros), without the formatting
/// machinery: the store writes two or three instants a record.
pub fn write_rfc3339(ts: Timestamp, out: &mut String) {
    let (seconds, nanos) = (ts.as_second(), ts.subsec_nanosecond());
    // Years 1970 to 9999; anything else the slow way.
    if !(0..=253_402_300_799).contains(&seconds) || nanos < 0 {
        use std::fmt::Write;
        let _ = write!(out, "{ts}");
        return;
    }
    let (days, of_day) = (seconds / 86_400, seconds % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`).
    let z = days + 719_468;
    let era = z / 146_097;
    let of_era = z - era * 146_097;
    let year_of_era = (of_era - of_era / 1460 + of_era / 36_524 - of_era / 146_096) / 365;
    let day_of_year = of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    let mut text = *b"0000-00-00T00:00:00.000000000Z";
    let mut put = |at: usize, width: usize, mut n: i64| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, of_day / 3600);
    put(14, 2, of_day / 60 % 60);
    put(17, 2, of_day % 60);
    let end = if nanos == 0 {
        19
    } else {
        put(20, 9, i64::from(nanos));
        let mut end = 29;
        while text[end - 1] == b'0' {
            end -= 1;
        }
        end
    };
    text[end] = b'Z';
    // Only ASCII digits and separators were written.
    out.push_str(std::str::from_utf8(&text[..=end]).unwrap_or_default());
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
    fn instants_are_written_as_jiff_writes_them() {
        let check = |ts: Timestamp| {
            let mut ours = String::from("x");
            write_rfc3339(ts, &mut ours);
            assert_eq!(ours, format!("x{ts}"));
        };
        for (s, n) in [
            (0, 0),
            (0, 1),
            (0, 100_000_000),
            (0, 999_999_999),
            (951_782_400, 0), // 2000-02-29
            (1_767_225_599, 120_000_000),
            (4_107_542_400, 0), // 2100-03-01
            (253_402_207_200, 0),
            (-1, 0),
            (-62_135_596_800, 5),
        ] {
            check(Timestamp::new(s, n).unwrap());
        }
        // Days all over 1970–9999 (leap days and century years among them), at odd times.
        let mut s = 0_i64;
        while s < 253_402_207_200 {
            check(Timestamp::new(s, (s % 1_000_000_007 % 1_000_000_000) as i32).unwrap());
            s += 86_400 * 29 + 3_607;
        }
        for year in [2000, 2024, 2100, 2400] {
            for (month, day) in [(2, 28), (2, 29), (3, 1), (12, 31)] {
                if let Ok(date) = Date::new(year, month, day) {
                    check(date.to_zoned(TimeZone::UTC).unwrap().timestamp());
                }
            }
        }
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
