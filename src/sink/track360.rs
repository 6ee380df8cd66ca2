//! The Track360 ingestion API as a sink: `POST /api/v1/forex/{customers,transactions,
//! trading-activity}` with batches of at most 1000 records, OAuth 2.0 client credentials, the
//! guide's 1000 requests a minute, and 429/5xx retried with backoff honouring `Retry-After`.
//!
//! At least once: a page's checkpoint is committed only after every record of it was
//! acknowledged or quarantined; a crash in between re-sends the page, and the API upserts on
//! natural keys.
//!
//! A 422 names the records it refuses, in this body (the format parsed):
//!
//! ```json
//! {"errors": [{"index": 3, "field": "currency", "message": "must be an ISO 4217 code"}]}
//! ```
//!
//! `index` is the record's position in the posted batch (`record_index` is read too);
//! `message` (or `messages`, a list) says why, `field` where. Those records go to quarantine
//! with the API's reasons; the rest of the batch is posted again, since an API that refuses a
//! batch may have stored none of it (re-posting is an upsert). A 422 that names no record fails
//! the run: which records are at fault cannot be told, and none is dropped on a guess.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use backon::Retryable;
use governor::{DefaultDirectRateLimiter, RateLimiter};
use reqwest::{StatusCode, Url};
use secrecy::ExposeSecret;
use serde_json::Value;
use tracing::warn;

use super::{BoxFuture, CommitStats, PageBatch, Reject, Sink, SinkError, Stage, commit_locally};
use crate::config::plan::Track360Plan;
use crate::http;
use crate::model::Entity;
use crate::source::rest::token_cache::TokenCache;
use crate::state::{Store, StoreError};

/// One client per daemon: one token and one rate limit, shared by every connector.
pub struct Track360Client {
    plan: Track360Plan,
    http: reqwest::Client,
    tokens: TokenCache,
    limiter: DefaultDirectRateLimiter,
}

/// Why one attempt failed.
#[derive(Debug)]
enum Attempt {
    /// Worth trying again (connection, timeout, 429, 5xx, a refused token once).
    Retry(String, Option<Duration>),
    /// Not: the run fails.
    Fatal(String),
    /// The API refused these records (index in the batch, reasons).
    Refused(Vec<(usize, Vec<String>)>),
}

impl Track360Client {
    pub fn new(plan: &Track360Plan) -> Result<Track360Client, reqwest::Error> {
        crate::source::rest::ensure_crypto_provider();
        let http = http::client_builder()
            .user_agent(concat!("t360-connector/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .timeout(plan.timeout)
            .pool_idle_timeout(Duration::from_secs(30))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Track360Client {
            tokens: TokenCache::new(plan.oauth.clone(), http.clone()),
            limiter: RateLimiter::direct(http::quota(plan.rate_limit)),
            plan: plan.clone(),
            http,
        })
    }

    fn url(&self, entity: Entity) -> Url {
        let mut url = self.plan.base_url.clone();
        let base = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base}/api/v1/forex/{}", entity.api_segment()));
        url
    }

    /// Posts `records`; returns the ones refused (index into `records`, reasons).
    pub async fn post(
        &self,
        entity: Entity,
        records: &[Value],
    ) -> Result<Vec<(usize, Vec<String>)>, SinkError> {
        let mut refused = Vec::new();
        for (chunk_no, chunk) in records.chunks(self.plan.batch_size).enumerate() {
            let offset = chunk_no * self.plan.batch_size;
            // Post, and post again without what the API refused, until it takes the rest.
            let mut pending: Vec<usize> = (0..chunk.len()).collect();
            while !pending.is_empty() {
                let body: Vec<&Value> = pending.iter().map(|i| &chunk[*i]).collect();
                let outcome = self.post_with_retries(entity, &body).await?;
                if outcome.is_empty() {
                    break;
                }
                // Every index must name a record of the batch just posted; otherwise the body
                // is not what we think it is (1-based, or counted over something else) and a
                // guess would quarantine the wrong records, or post the same batch forever.
                if let Some((bad, _)) = outcome.iter().find(|(i, _)| *i >= pending.len()) {
                    return Err(SinkError::Delivery {
                        url: self.url(entity).to_string(),
                        message: format!(
                            "HTTP 422 names record {bad} of a batch of {}: cannot tell which records it refuses",
                            pending.len()
                        ),
                    });
                }
                let mut rejected: Vec<usize> = Vec::new();
                for (index, reasons) in outcome {
                    let original = pending[index];
                    refused.push((offset + original, reasons));
                    rejected.push(original);
                }
                pending.retain(|i| !rejected.contains(i));
            }
        }
        Ok(refused)
    }

    async fn post_with_retries(
        &self,
        entity: Entity,
        body: &[&Value],
    ) -> Result<Vec<(usize, Vec<String>)>, SinkError> {
        let url = self.url(entity);
        let started = Instant::now();
        let budget = self.plan.max_retry_time;
        let payload = if self.plan.wrap_in_data {
            serde_json::json!({ "data": body })
        } else {
            serde_json::json!(body)
        };
        let refreshed = AtomicBool::new(false);
        let result = (|| async { self.attempt(&url, &payload, &refreshed).await })
            .retry(http::backoff())
            .when(|e: &Attempt| matches!(e, Attempt::Retry(..)) && started.elapsed() < budget)
            .adjust(|e: &Attempt, ours| {
                let left = budget.saturating_sub(started.elapsed());
                let asked = match e {
                    Attempt::Retry(_, after) => *after,
                    _ => None,
                };
                asked.or(ours).map(|wait| wait.min(left))
            })
            .notify(|e: &Attempt, after: Duration| {
                warn!(url = %url, error = ?e, retry_in_ms = after.as_millis() as u64, "Delivery failed; retrying.");
            })
            .await;
        match result {
            Ok(()) => Ok(Vec::new()),
            Err(Attempt::Refused(refused)) => Ok(refused),
            Err(Attempt::Retry(message, _) | Attempt::Fatal(message)) => Err(SinkError::Delivery {
                url: url.to_string(),
                message,
            }),
        }
    }

    async fn attempt(
        &self,
        url: &Url,
        payload: &Value,
        refreshed: &AtomicBool,
    ) -> Result<(), Attempt> {
        self.limiter.until_ready().await;
        let token = self
            .tokens
            .token()
            .await
            .map_err(|e| Attempt::Retry(e.to_string(), None))?;
        let response = self
            .http
            .post(url.clone())
            .bearer_auth(token.secret.expose_secret())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(payload.to_string())
            .send()
            .await
            .map_err(|e| Attempt::Retry(http::error_chain(&e.without_url()), None))?;
        let status = response.status();
        let retry_after = http::retry_after(response.headers());
        let body = response
            .bytes()
            .await
            .map_err(|e| Attempt::Retry(http::error_chain(&e.without_url()), None))?;
        // An error body that echoes our request must not carry the token into a log line.
        let says = || {
            let excerpt = http::snippet(&body).replace(token.secret.expose_secret(), "REDACTED");
            format!("HTTP {}: {excerpt}", status.as_u16())
        };
        match status {
            s if s.is_success() => Ok(()),
            StatusCode::UNAUTHORIZED if !refreshed.swap(true, Ordering::Relaxed) => {
                self.tokens.invalidate(&token).await;
                Err(Attempt::Retry(says(), None))
            }
            StatusCode::UNPROCESSABLE_ENTITY => match refused_records(&body) {
                Some(refused) if !refused.is_empty() => Err(Attempt::Refused(refused)),
                _ => Err(Attempt::Fatal(format!(
                    "{} (no record named: cannot tell which to quarantine)",
                    says()
                ))),
            },
            s if s == StatusCode::TOO_MANY_REQUESTS
                || s == StatusCode::REQUEST_TIMEOUT
                || s.is_server_error() =>
            {
                Err(Attempt::Retry(says(), retry_after))
            }
            _ => Err(Attempt::Fatal(says())),
        }
    }
}

/// The records a 422 body names: `{"errors": [{"index", "field", "message"|"messages"}]}`.
fn refused_records(body: &[u8]) -> Option<Vec<(usize, Vec<String>)>> {
    let body: Value = serde_json::from_slice(body).ok()?;
    let mut refused: Vec<(usize, Vec<String>)> = Vec::new();
    for error in body.get("errors")?.as_array()? {
        let index = error
            .get("index")
            .or_else(|| error.get("record_index"))
            .and_then(Value::as_u64)? as usize;
        let field = error.get("field").and_then(Value::as_str);
        let mut messages: Vec<String> = match (error.get("message"), error.get("messages")) {
            (Some(Value::String(m)), _) => vec![m.clone()],
            (_, Some(Value::Array(ms))) => ms
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect(),
            _ => vec!["refused".to_owned()],
        };
        for m in &mut messages {
            *m = match field {
                Some(f) => format!("track360: {f}: {m}"),
                None => format!("track360: {m}"),
            };
        }
        match refused.iter_mut().find(|(i, _)| *i == index) {
            Some((_, reasons)) => reasons.extend(messages),
            None => refused.push((index, messages)),
        }
    }
    Some(refused)
}

/// Delivers to Track360, then keeps quarantine and checkpoints (and, with `keep_local`, the
/// records themselves as an audit copy) in the embedded store.
pub struct Track360Sink {
    client: Arc<Track360Client>,
    store: Arc<Store>,
    keep_local: bool,
}

impl Track360Sink {
    pub fn new(client: Arc<Track360Client>, store: Arc<Store>, keep_local: bool) -> Self {
        Track360Sink {
            client,
            store,
            keep_local,
        }
    }
}

impl Sink for Track360Sink {
    fn batch_records(&self) -> usize {
        self.client.plan.batch_size
    }

    fn deliver<'a>(&'a self, batch: &'a mut PageBatch) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            batch.keep_records = self.keep_local;
            batch.hold_orphans = false;
            if batch.records.is_empty() {
                return Ok(());
            }
            let bodies: Vec<Value> = batch.records.iter().map(|v| v.record.to_json()).collect();
            let refused = self.client.post(batch.entity, &bodies).await?;
            if refused.is_empty() {
                return Ok(());
            }
            warn!(
                count = refused.len(),
                "Track360 refused records; quarantined with its reasons."
            );
            let mut refused_at: Vec<Option<Vec<String>>> = vec![None; batch.records.len()];
            for (index, reasons) in refused {
                refused_at[index] = Some(reasons);
            }
            let records = std::mem::take(&mut batch.records);
            for ((valid, body), reasons) in records.into_iter().zip(bodies).zip(refused_at) {
                match reasons {
                    None => batch.records.push(valid),
                    Some(reasons) => batch.rejects.push(Reject {
                        key: valid.record.key(),
                        raw: body.to_string(),
                        reasons,
                        stage: Stage::Delivery,
                    }),
                }
            }
            Ok(())
        })
    }

    fn finalize(&self, batch: PageBatch) -> BoxFuture<'_, Result<CommitStats, StoreError>> {
        Box::pin(commit_locally(&self.store, batch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_422_body_names_its_records() {
        let body = br#"{"errors": [{"index": 2, "field": "currency", "message": "bad"},
                                   {"record_index": 0, "messages": ["x", "y"]},
                                   {"index": 2, "field": "amount", "message": "too long"}]}"#;
        let refused = refused_records(body).unwrap();
        assert_eq!(refused.len(), 2);
        assert_eq!(
            refused[0],
            (
                2,
                vec![
                    "track360: currency: bad".into(),
                    "track360: amount: too long".into()
                ]
            )
        );
        assert_eq!(refused[1].1, ["track360: x", "track360: y"]);
        assert!(refused_records(b"<html>").is_none());
    }
}
