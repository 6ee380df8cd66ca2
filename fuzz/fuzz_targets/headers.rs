//! The response headers the client reads: `Link` (rel="next") and `Retry-After`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
use t360_connector::http;
use t360_connector::source::rest::parse_link_next;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Some(target) = parse_link_next(text) {
            assert!(text.contains(&target));
        }
    }
    if let Ok(value) = HeaderValue::from_bytes(data) {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, value);
        let _ = http::retry_after(&headers);
    }
});
