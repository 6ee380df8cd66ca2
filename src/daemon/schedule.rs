//! When an entity syncs: a cron expression in a time zone, with fire times computed by `croner`
//! on `jiff` zoned times, so that a zone schedule keeps its wall-clock time across DST changes
//! (tokio-cron-scheduler freezes the offset when a job is created: issues #87, #107).

use std::fmt;

use croner::Cron;
use croner::parser::{CronParser, Seconds};
use jiff::Timestamp;
use jiff::tz::TimeZone;

/// A compiled cron schedule in a zone.
#[derive(Clone)]
pub struct Schedule {
    cron: Cron,
    zone: TimeZone,
    text: String,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.text)
    }
}

impl Schedule {
    /// Standard 5-field cron (`*/5 * * * *`) or 6-field with seconds first (`*/10 * * * * *`);
    /// day-of-month and day-of-week combine with OR, as in Vixie cron.
    pub fn parse(text: &str, zone: TimeZone) -> Result<Schedule, String> {
        // croner takes an empty list item (`1,,2`, a lone `,`) for a field that matches nothing,
        // then searches years of fire times before saying the expression never fires: a
        // quarter of a second per `check`, over ten seconds under a fuzzer's sanitizer.
        if let Some(field) = text
            .split_whitespace()
            .find(|f| f.split(',').any(str::is_empty))
        {
            return Err(format!(
                "`{text}` is not a cron expression: field `{field}` has an empty list item"
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(text)
            .map_err(|e| format!("`{text}` is not a cron expression: {e}"))?;
        let schedule = Schedule {
            cron,
            zone,
            text: text.to_owned(),
        };
        // An expression that never fires (30 February) is a mistake, not a schedule.
        schedule
            .next_after(Timestamp::now())
            .ok_or_else(|| format!("`{text}` never fires"))?;
        Ok(schedule)
    }

    /// The first fire time strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        let zoned = t.to_zoned(self.zone.clone());
        self.cron
            .find_next_occurrence(&zoned, false)
            .ok()
            .map(|z| z.timestamp())
    }

    /// The last fire time at or before `t`.
    pub fn previous_at_or_before(&self, t: Timestamp) -> Option<Timestamp> {
        let zoned = t.to_zoned(self.zone.clone());
        self.cron
            .find_previous_occurrence(&zoned, true)
            .ok()
            .map(|z| z.timestamp())
    }

    /// How many fire times fall in `(after, until]` (ticks that passed while a run was busy).
    pub fn fires_between(&self, after: Timestamp, until: Timestamp) -> u64 {
        let mut count = 0;
        let mut t = after;
        while let Some(next) = self.next_after(t).filter(|n| *n <= until) {
            count += 1;
            t = next;
            if count > 10_000 {
                break;
            }
        }
        count
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn empty_list_items_are_refused_before_any_search() {
        // Found by the `cron` fuzz target (a timeout): each took 0.17–0.27 s to be called
        // "never fires", minutes under AddressSanitizer.
        for text in [
            "2 ,  , * *  * \t*\t",
            " 2 , *  * *",
            "1,,2 * * * *",
            "0 0 1, * *",
        ] {
            for zone in [TimeZone::UTC, TimeZone::get("Europe/Athens").unwrap()] {
                let e = Schedule::parse(text, zone).unwrap_err();
                assert!(e.contains("has an empty list item"), "{text:?}: {e}");
            }
        }
        assert!(Schedule::parse("1,2 * * * *", TimeZone::UTC).is_ok());
    }

    #[test]
    fn five_and_six_field_expressions_are_accepted() {
        let five = Schedule::parse("*/5 * * * *", TimeZone::UTC).unwrap();
        assert_eq!(
            five.next_after(at("2026-01-01T00:02:00Z")),
            Some(at("2026-01-01T00:05:00Z"))
        );
        let six = Schedule::parse("*/10 * * * * *", TimeZone::UTC).unwrap();
        assert_eq!(
            six.next_after(at("2026-01-01T00:00:01Z")),
            Some(at("2026-01-01T00:00:10Z"))
        );
        assert!(Schedule::parse("every five minutes", TimeZone::UTC).is_err());
        assert!(Schedule::parse("0 0 30 2 *", TimeZone::UTC).is_err());
    }

    #[test]
    fn a_zone_schedule_keeps_its_wall_clock_time_across_dst() {
        // 06:15 in Nicosia is 04:15 UTC in winter and 03:15 UTC in summer.
        let s = Schedule::parse("15 6 * * *", TimeZone::get("Asia/Nicosia").unwrap()).unwrap();
        assert_eq!(
            s.next_after(at("2026-03-28T12:00:00Z")),
            Some(at("2026-03-29T03:15:00Z"))
        );
        assert_eq!(
            s.next_after(at("2026-03-27T12:00:00Z")),
            Some(at("2026-03-28T04:15:00Z"))
        );
    }

    #[test]
    fn ticks_missed_during_a_run_are_counted() {
        let s = Schedule::parse("* * * * * *", TimeZone::UTC).unwrap();
        assert_eq!(
            s.fires_between(at("2026-01-01T00:00:00Z"), at("2026-01-01T00:00:05Z")),
            5
        );
        assert_eq!(
            s.previous_at_or_before(at("2026-01-01T00:00:05.5Z")),
            Some(at("2026-01-01T00:00:05Z"))
        );
    }
}
