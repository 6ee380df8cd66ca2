//! A schedule's cron expression: parsed in UTC and in a zone with DST, and its fire times
//! computed around a DST change.
#![no_main]

use libfuzzer_sys::fuzz_target;
use jiff::Timestamp;
use jiff::tz::TimeZone;
use t360_connector::daemon::schedule::Schedule;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The spring-forward night in Athens, and a plain day.
    let instants = [1_774_745_000, 1_767_225_600].map(|s| Timestamp::from_second(s).unwrap());
    for zone in [TimeZone::UTC, TimeZone::get("Europe/Athens").unwrap()] {
        let Ok(schedule) = Schedule::parse(text, zone) else {
            continue;
        };
        for t in instants {
            if let Some(next) = schedule.next_after(t) {
                assert!(next > t, "{text}: next {next} is not after {t}");
            }
            if let Some(previous) = schedule.previous_at_or_before(t) {
                assert!(previous <= t, "{text}: previous {previous} is after {t}");
            }
            let _ = schedule.fires_between(t, t + jiff::SignedDuration::from_hours(2));
        }
    }
});
