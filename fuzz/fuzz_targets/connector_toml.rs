//! A connector file's text through what `check` runs on it: TOML, the raw schema, and the
//! plan (durations, rate limits, URLs, JSON pointers, cron, time zones, SQL, mappings).
#![no_main]

use std::path::Path;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use t360_connector::config::{self, Settings};

static SETTINGS: LazyLock<Settings> =
    LazyLock::new(|| config::load_settings(None).expect("default settings"));

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(problems) = config::parse_connector(text, Path::new("fuzz.toml"), &SETTINGS) {
        for problem in problems {
            // Every problem renders as a one-line message naming the file.
            let line = problem.to_string();
            assert!(line.contains("fuzz.toml"), "{line}");
        }
    }
});
