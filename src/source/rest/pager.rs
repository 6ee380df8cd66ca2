//! Paging through one window of the guide's `{data, meta}` envelope.
//!
//! Two styles, told apart by the broker's first answer:
//! - **cursor**: the page's `meta.next_cursor` is sent back as the cursor parameter until a
//!   page has none. A keyset cursor is stable while records change under it.
//! - **page number**: `page=1,2,…` until an empty page, or until `meta.total` is reached.
//!   Page numbers are offsets, and offsets shift when a record leaves the window while we page
//!   (it was modified, so its `last_modified_date` moved past the window's end): every later
//!   record moves one place back, and the one on the page boundary would be skipped
//!   (DOMAIN §4.4). The pager watches `meta.total`; when it changes mid-window the window is
//!   paged again from page 1 (upserts make the re-read harmless), a bounded number of times.

use std::collections::HashSet;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::Url;
use serde_json::Value;
use tracing::{debug, warn};

use super::auth::authorize;
use crate::config::RestPlan;
use crate::model::Entity;
use crate::sink::BoxFuture;
use crate::source::{Page, Pager, SourceError, Window};

/// How many times a window is paged again from the start before the run gives up.
const MAX_RESTARTS: u32 = 5;
/// How much of an error body goes into a message.
const ERROR_BODY_CHARS: usize = 300;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Style {
    Unknown,
    Cursor,
    PageNumber,
}

pub struct RestPager<'a> {
    client: &'a reqwest::Client,
    plan: &'a RestPlan,
    broker: &'a str,
    entity: Entity,
    window: Window,
    style: Style,
    page: u64,
    cursor: Option<String>,
    seen_cursors: HashSet<String>,
    total: Option<u64>,
    fetched_in_pass: u64,
    restarts: u32,
    done: bool,
}

impl<'a> RestPager<'a> {
    pub fn new(
        client: &'a reqwest::Client,
        plan: &'a RestPlan,
        broker: &'a str,
        entity: Entity,
        window: Window,
    ) -> Self {
        RestPager {
            client,
            plan,
            broker,
            entity,
            window,
            style: Style::Unknown,
            page: 1,
            cursor: None,
            seen_cursors: HashSet::new(),
            total: None,
            fetched_in_pass: 0,
            restarts: 0,
            done: false,
        }
    }

    fn url(&self) -> Url {
        let p = &self.plan.params;
        let mut url = self.plan.url(self.entity);
        {
            let mut q = url.query_pairs_mut();
            q.append_pair(&p.per_page, &self.plan.per_page.to_string());
            q.append_pair(&p.modified_from, &self.window.from.to_string());
            if !p.modified_to.is_empty() {
                q.append_pair(&p.modified_to, &self.window.to.to_string());
            }
            match &self.cursor {
                Some(cursor) => q.append_pair(&p.cursor, cursor),
                None => q.append_pair(&p.page, &self.page.to_string()),
            };
        }
        url
    }

    async fn fetch(&self, url: &Url) -> Result<Value, SourceError> {
        let shown = url.to_string();
        let transport = |e: reqwest::Error| SourceError::Transport {
            url: shown.clone(),
            message: error_chain(&e),
        };
        let request = authorize(self.client.get(url.clone()), &self.plan.auth)
            .header(reqwest::header::ACCEPT, "application/json");
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(transport)?;
        if !status.is_success() {
            return Err(SourceError::Status {
                url: shown,
                status: status.as_u16(),
                body: snippet(&body),
            });
        }
        serde_json::from_slice(&body).map_err(|e| SourceError::BadPage {
            url: shown,
            message: format!("body is not JSON ({e}): {}", snippet(&body)),
        })
    }

    /// Reads the envelope and decides what comes next.
    fn advance(&mut self, url: &Url, body: Value) -> Result<Vec<Value>, SourceError> {
        let bad = |message: String| SourceError::BadPage {
            url: url.to_string(),
            message,
        };
        let Value::Object(mut envelope) = body else {
            return Err(bad("expected a JSON object with `data` and `meta`".into()));
        };
        let records = match envelope.remove("data") {
            Some(Value::Array(records)) => records,
            // A null or missing `data` on the last page means "nothing more" (dlt #2932).
            Some(Value::Null) | None => Vec::new(),
            Some(_) => return Err(bad("`data` is not an array".into())),
        };
        let meta = envelope.remove("meta").unwrap_or(Value::Null);
        let total = meta.get("total").and_then(Value::as_u64);
        let next_cursor = meta
            .get("next_cursor")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty());

        if self.style == Style::Unknown {
            self.style = if next_cursor.is_some() {
                Style::Cursor
            } else {
                Style::PageNumber
            };
        }
        match self.style {
            Style::Cursor => match next_cursor {
                Some(cursor) if records.is_empty() => {
                    // A cursor with nothing behind it: trust the emptiness, not the cursor.
                    debug!(cursor, "Empty page with a next cursor; window done.");
                    self.done = true;
                }
                Some(cursor) => {
                    if !self.seen_cursors.insert(cursor.to_owned()) {
                        return Err(SourceError::Unstable {
                            url: url.to_string(),
                            message: format!(
                                "next_cursor `{cursor}` was already followed: the broker's cursor loops"
                            ),
                        });
                    }
                    self.cursor = Some(cursor.to_owned());
                }
                None => self.done = true,
            },
            Style::PageNumber | Style::Unknown => {
                self.fetched_in_pass += records.len() as u64;
                if let (Some(first), Some(now)) = (self.total, total)
                    && first != now
                {
                    self.restart(url, first, now)?;
                    return Ok(records);
                }
                self.total = self.total.or(total);
                let reached_total = total.is_some_and(|t| self.fetched_in_pass >= t);
                if records.is_empty() || reached_total {
                    self.done = true;
                } else {
                    self.page += 1;
                }
            }
        }
        Ok(records)
    }

    /// The window changed under page numbers: page it again from the start.
    fn restart(&mut self, url: &Url, was: u64, now: u64) -> Result<(), SourceError> {
        self.restarts += 1;
        if self.restarts > MAX_RESTARTS {
            return Err(SourceError::Unstable {
                url: url.to_string(),
                message: format!(
                    "the window's total kept changing while paging ({MAX_RESTARTS} restarts); \
                     the cursor stays put and the next run tries again"
                ),
            });
        }
        warn!(
            was,
            now,
            restart = self.restarts,
            "Records moved while paging by page number; paging the window again from page 1."
        );
        self.page = 1;
        self.total = None;
        self.fetched_in_pass = 0;
        Ok(())
    }
}

impl Pager for RestPager<'_> {
    fn next_page(&mut self) -> BoxFuture<'_, Result<Option<Page>, SourceError>> {
        Box::pin(async move {
            if self.done {
                return Ok(None);
            }
            let url = self.url();
            let backoff = ExponentialBuilder::default()
                .with_jitter()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(10))
                .with_max_times(4);
            let body = (|| self.fetch(&url))
                .retry(backoff)
                .when(SourceError::is_retryable)
                .notify(|e, after| {
                    warn!(broker = self.broker, error = %e, retry_in = ?after, "Page request failed; retrying.");
                })
                .await?;
            let records = self.advance(&url, body)?;
            Ok(Some(Page {
                records,
                origin: url.to_string(),
            }))
        })
    }
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut cut: String = text.chars().take(ERROR_BODY_CHARS).collect();
    if text.chars().count() > ERROR_BODY_CHARS {
        cut.push('…');
    }
    cut.replace(['\n', '\r'], " ")
}

/// reqwest's top-level message ("error sending request") hides the cause; show the chain.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
