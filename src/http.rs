//! What every HTTP client of the daemon shares: the retry policy, `Retry-After`, the rate
//! quota, and error text that names the cause without leaking the body's bulk.

use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use backon::ExponentialBuilder;
use governor::Quota;
use reqwest::header::{HeaderMap, RETRY_AFTER};

use crate::config::plan::RateLimit;

/// How much of an error body goes into a message.
const ERROR_BODY_CHARS: usize = 300;

/// A client builder with the process's one TLS configuration. Each `reqwest::Client` would
/// otherwise read and parse the system's trust roots into a store of its own (about 200 KiB,
/// and the parsing) — once per connector, hundreds of times in one daemon.
pub fn client_builder() -> reqwest::ClientBuilder {
    let builder = reqwest::Client::builder();
    match shared_tls() {
        Some(config) => builder.tls_backend_preconfigured(config),
        // reqwest builds its own and reports the same failure, if it fails for it too.
        None => builder,
    }
}

/// rustls with the system's roots, as reqwest would make it, made once.
fn shared_tls() -> Option<rustls::ClientConfig> {
    static CONFIG: OnceLock<Option<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            crate::source::rest::ensure_crypto_provider();
            let provider = rustls::crypto::CryptoProvider::get_default()?.clone();
            let verifier = rustls_platform_verifier::Verifier::new(Arc::clone(&provider)).ok()?;
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .ok()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            // reqwest leaves ALPN to a preconfigured config: offer HTTP/2, then HTTP/1.1.
            config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
            Some(config)
        })
        .clone()
}

/// Exponential backoff with jitter and no count limit: callers bound retries by time, and cut
/// every wait to what is left of their budget.
pub fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .without_max_times()
}

/// At most `limit.requests` in any window of `limit.per`, evenly spaced: no burst, and 2 % of
/// the budget (at least one request) kept back for the time requests spend on the way — a
/// request sent late and the next on time arrive closer together than they were sent, and the
/// server counts arrivals. So a long backfill runs at 98 % of the budget without a 429.
pub fn quota(limit: RateLimit) -> Quota {
    let burst = 1;
    let margin = (limit.requests / 50).max(1);
    let refills = limit.requests.saturating_sub(margin).max(1);
    let period = (limit.per / refills).max(Duration::from_micros(1));
    Quota::with_period(period)
        .expect("period is positive")
        .allow_burst(NonZeroU32::new(burst).expect("burst is positive"))
}

/// `Retry-After` in seconds or as an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = jiff::fmt::rfc2822::parse(text).ok()?.timestamp();
    let wait = at.duration_since(jiff::Timestamp::now());
    Some(wait.try_into().unwrap_or(Duration::ZERO))
}

pub fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut cut: String = text.chars().take(ERROR_BODY_CHARS).collect();
    if text.chars().count() > ERROR_BODY_CHARS {
        cut.push('…');
    }
    cut.replace(['\n', '\r'], " ")
}

/// reqwest's top-level message ("error sending request") hides the cause; show the chain.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(
            RETRY_AFTER,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(
            retry_after(&h),
            Some(Duration::ZERO),
            "a date in the past means now"
        );
    }

    #[test]
    fn the_quota_never_allows_more_than_the_limit_in_a_window() {
        for (requests, per) in [(1000, 60), (50, 1), (7, 60), (1, 60)] {
            let limit = RateLimit {
                requests,
                per: Duration::from_secs(per),
            };
            let q = quota(limit);
            let burst = q.burst_size().get();
            // In any half-open window of `per`: the burst, then one per interval.
            let in_window =
                burst as u128 + (limit.per.as_nanos() - 1) / q.replenish_interval().as_nanos();
            assert!(
                in_window <= requests as u128,
                "{requests}/{per}s allows {in_window}"
            );
        }
    }
}
