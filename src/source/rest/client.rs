//! One connector's HTTP client: every request waits for the rate limiter, carries the
//! connector's credentials, and is retried with exponential backoff and jitter on connection
//! errors, timeouts, 5xx and 429 (honouring `Retry-After`) within a bounded total time.

use std::time::{Duration, Instant};

use backon::Retryable;
use governor::{DefaultDirectRateLimiter, RateLimiter};
use reqwest::header::{ACCEPT, HeaderMap, LINK};
use reqwest::{StatusCode, Url};
use serde_json::Value;
use tracing::warn;

use super::auth::Auth;
use crate::config::RestPlan;
use crate::http;
use crate::model::Entity;
use crate::normalise::RawRecord;
use crate::source::SourceError;
use crate::telemetry;

/// A page as received: its JSON body, the records taken out of it (`body::parse`), and the
/// `Link: rel="next"` target, if any.
pub struct Fetched {
    pub body: Value,
    pub records: Option<Vec<RawRecord>>,
    pub link_next: Option<String>,
}

impl Fetched {
    /// Parses a page's bytes, taking the array of records at `records` (a JSON pointer) out
    /// of the body as record texts.
    pub fn parse(
        bytes: &[u8],
        records: &str,
        link_next: Option<String>,
    ) -> serde_json::Result<Fetched> {
        let body = super::body::parse(bytes, records)?;
        Ok(Fetched {
            body: body.envelope,
            records: body.records,
            link_next,
        })
    }
}

pub struct HttpClient {
    client: reqwest::Client,
    auth: Auth,
    limiter: DefaultDirectRateLimiter,
    max_retry_time: Duration,
    max_page_bytes: usize,
    broker: String,
    /// Where a page's records are (`rest.paging.records`).
    records: String,
}

impl HttpClient {
    pub fn new(broker: &str, plan: &RestPlan) -> Result<HttpClient, reqwest::Error> {
        let client = http::client_builder()
            .user_agent(concat!("t360-connector/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(plan.connect_timeout)
            // A total deadline per page, body included: a stalled broker fails the attempt
            // instead of hanging the run.
            .timeout(plan.timeout)
            // Shorter than the 60–75 s idle timeout of common load balancers, which otherwise
            // close pooled connections under us (hyper #2136).
            .pool_idle_timeout(Duration::from_secs(30))
            // A redirect could carry the credentials to another host.
            .redirect(reqwest::redirect::Policy::none())
            // Pages of JSON compress ten to one; ask for it (decoded transparently).
            .gzip(true)
            .build()?;
        Ok(HttpClient {
            auth: Auth::new(&plan.auth, &client),
            client,
            limiter: RateLimiter::direct(http::quota(plan.rate_limit)),
            max_retry_time: plan.max_retry_time,
            max_page_bytes: plan.max_page_bytes,
            broker: broker.to_owned(),
            records: plan.paging.records.clone(),
        })
    }

    /// The URL as logs and errors show it: as sent, with secret values redacted.
    pub fn shown(&self, url: &Url) -> String {
        self.auth.shown(&self.auth.url(url))
    }

    /// `text` with the connector's static secrets, if it holds one, redacted.
    pub fn scrub(&self, text: String) -> String {
        self.auth.scrub(text)
    }

    /// GETs `url` and parses the JSON body, retrying what may pass.
    pub fn get_json<'a>(
        &'a self,
        url: &'a Url,
        entity: Entity,
    ) -> crate::sink::BoxFuture<'a, Result<Fetched, SourceError>> {
        Box::pin(self.get_json_inner(url, entity))
    }

    async fn get_json_inner(&self, url: &Url, entity: Entity) -> Result<Fetched, SourceError> {
        let started = Instant::now();
        let budget = self.max_retry_time;
        // No count limit: the budget is time. Every wait is cut to what is left of it, so the
        // last attempt runs just as the budget ends.
        let backoff = http::backoff();
        let refreshed = std::sync::atomic::AtomicBool::new(false);
        let broker = self.broker.as_str();
        (|| async { self.attempt(url, entity, &refreshed).await })
            .retry(backoff)
            .when(|e: &SourceError| e.is_retryable() && started.elapsed() < budget)
            // The broker's Retry-After wins over our backoff, within what is left of the budget.
            .adjust(|e: &SourceError, ours| {
                let left = budget.saturating_sub(started.elapsed());
                e.retry_after().or(ours).map(|wait| wait.min(left))
            })
            .notify(|e: &SourceError, after: Duration| {
                telemetry::retry(broker, entity);
                warn!(broker = %broker, entity = %entity, error = %e, retry_in_ms = after.as_millis() as u64, "Request failed; retrying.");
            })
            .await
    }

    async fn attempt(
        &self,
        url: &Url,
        entity: Entity,
        refreshed: &std::sync::atomic::AtomicBool,
    ) -> Result<Fetched, SourceError> {
        use std::sync::atomic::Ordering;
        self.limiter.until_ready().await;
        let shown = self.shown(url);
        // reqwest puts the URL in its messages; ours may hold an API key, and `shown` already
        // says where, redacted.
        let transport = |e: reqwest::Error| SourceError::Transport {
            url: shown.clone(),
            message: http::error_chain(&e.without_url()),
        };
        let request = self
            .client
            .get(self.auth.url(url))
            .header(ACCEPT, "application/json");
        let (request, token) = self.auth.apply(request).await?;
        let response = request.send().await.map_err(|e| {
            telemetry::http_request(&self.broker, entity, "error");
            transport(e)
        })?;
        let status = response.status();
        telemetry::http_request(&self.broker, entity, status.as_str());
        let headers = response.headers().clone();
        let body = read_capped(response, self.max_page_bytes)
            .await
            .map_err(|e| match e {
                Capped::Transport(e) => transport(e),
                Capped::Over => SourceError::Oversized {
                    url: shown.clone(),
                    limit: self.max_page_bytes,
                },
            })?;
        if status == StatusCode::UNAUTHORIZED
            && !refreshed.swap(true, Ordering::Relaxed)
            && self.auth.refused(token.as_ref()).await
        {
            // The token was revoked or expired early: one retry with a new one.
            return Err(SourceError::Transport {
                url: shown,
                message: "HTTP 401: token refused; fetching a new one".into(),
            });
        }
        if !status.is_success() {
            return Err(SourceError::Status {
                url: shown,
                status: status.as_u16(),
                body: self.auth.scrub(http::snippet(&body)),
                retry_after: http::retry_after(&headers),
            });
        }
        Fetched::parse(&body, &self.records, link_next(&headers)).map_err(|e| {
            SourceError::BadPage {
                url: shown.clone(),
                message: format!(
                    "body is not JSON ({e}): {}",
                    self.auth.scrub(http::snippet(&body))
                ),
            }
        })
    }
}

pub(crate) enum Capped {
    Transport(reqwest::Error),
    Over,
}

/// The body, decompressed, read chunk by chunk and given up past `limit` bytes: neither a
/// broker that never stops sending nor a small gzip bomb makes us hold more than the limit.
pub(crate) async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, Capped> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Err(Capped::Over);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(Capped::Transport)? {
        if body.len() + chunk.len() > limit {
            return Err(Capped::Over);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The target of `Link: <…>; rel="next"`.
fn link_next(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(LINK)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(parse_link_next)
}

pub fn parse_link_next(header: &str) -> Option<String> {
    let mut rest = header;
    while let Some(open) = rest.find('<') {
        let close = rest[open..].find('>')? + open;
        let target = &rest[open + 1..close];
        let params_end = rest[close..].find('<').map_or(rest.len(), |i| i + close);
        let params = &rest[close + 1..params_end];
        let is_next = params.split(';').any(|p| {
            let p = p.trim().trim_end_matches(',').trim();
            p.strip_prefix("rel=")
                .map(|v| {
                    v.trim_matches('"')
                        .split_whitespace()
                        .any(|r| r.eq_ignore_ascii_case("next"))
                })
                .unwrap_or(false)
        });
        if is_next {
            return Some(target.to_owned());
        }
        rest = &rest[params_end..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers_yield_their_next_target() {
        let h =
            r#"<https://b.example/x?page=1>; rel="prev", <https://b.example/x?page=3>; rel="next""#;
        assert_eq!(
            parse_link_next(h).as_deref(),
            Some("https://b.example/x?page=3")
        );
        assert_eq!(
            parse_link_next(r#"<https://b.example/x?page=9>; rel="last""#),
            None
        );
        assert_eq!(
            parse_link_next("</x?p=2>; rel=next").as_deref(),
            Some("/x?p=2")
        );
    }
}
