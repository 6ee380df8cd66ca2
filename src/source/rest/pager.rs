//! Paging through one window of the guide's `{data, meta}` envelope.
//!
//! Two styles, told apart by the broker's first answer:
//! - **cursor**: the page's `meta.next_cursor` is sent back as the cursor parameter until a
//!   page has none. A keyset cursor is stable while records change under it. A broker that
//!   answers a cursor with the cursor it was sent ignores the parameter: the pager falls back to
//!   page numbers.
//! - **page number**: `page=1,2,…` until an empty page, or until `meta.total` is reached.
//!   Page numbers are offsets, and offsets shift when a record leaves the window while we page
//!   (it was modified, so its `last_modified_date` moved past the window's end): every later
//!   record moves back, and the ones on the page boundary would be skipped (DOMAIN §4.4).
//!   The pager watches `meta.total`: when it drops by `d`, the `d` skipped records now sit at
//!   the end of the page before, so the pager steps back over them and reads on (upserts make
//!   the re-read harmless). A rise means records were added inside the window behind us: late
//!   arrivals, which the next window's lookback reads.

use std::collections::HashSet;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use reqwest::Url;
use serde_json::Value;
use tracing::warn;

use super::auth::authorize;
use crate::config::plan::{Pagination, RestPlan};
use crate::model::Entity;
use crate::sink::BoxFuture;
use crate::source::{Page, Pager, SourceError, Window};

/// How many times one window may step back before the run gives up on a broker whose data
/// never holds still.
const MAX_STEP_BACKS: u32 = 1_000;
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
    page_size: u64,
    step_backs: u32,
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
            style: match plan.pagination {
                Pagination::Auto => Style::Unknown,
                Pagination::PageNumber => Style::PageNumber,
            },
            page: 1,
            cursor: None,
            seen_cursors: HashSet::new(),
            total: None,
            page_size: 0,
            step_backs: 0,
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
            Style::Cursor => self.follow_cursor(url, next_cursor, records.is_empty())?,
            Style::PageNumber | Style::Unknown => {
                let page_size = meta.get("per_page").and_then(Value::as_u64);
                self.next_page_number(records.len() as u64, page_size, total)?;
            }
        }
        Ok(records)
    }

    fn follow_cursor(
        &mut self,
        url: &Url,
        next: Option<&str>,
        empty: bool,
    ) -> Result<(), SourceError> {
        let Some(next) = next.filter(|_| !empty) else {
            // No cursor, or a cursor with nothing behind it: the window is done.
            self.done = true;
            return Ok(());
        };
        if self.cursor.as_deref() == Some(next) {
            // The answer to cursor X is the page that led to X: the broker ignores the cursor
            // parameter and served page 1 again. Page numbers it is, from page 2.
            warn!(
                broker = self.broker,
                parameter = %self.plan.params.cursor,
                "The broker ignores the cursor parameter; paging by page number instead."
            );
            self.style = Style::PageNumber;
            self.cursor = None;
            self.page = 2;
            return Ok(());
        }
        if !self.seen_cursors.insert(next.to_owned()) {
            return Err(SourceError::Unstable {
                url: url.to_string(),
                message: format!(
                    "next_cursor `{next}` was already followed: the broker's cursor loops"
                ),
            });
        }
        self.cursor = Some(next.to_owned());
        Ok(())
    }

    fn next_page_number(
        &mut self,
        received: u64,
        page_size: Option<u64>,
        total: Option<u64>,
    ) -> Result<(), SourceError> {
        // The broker's page size: what it says, else the largest page it served (a broker may
        // serve fewer records than asked for; stopping at `page × asked ≥ total` would then
        // stop early).
        self.page_size = page_size
            .filter(|n| *n > 0)
            .unwrap_or(self.page_size.max(received))
            .max(1);
        if let (Some(was), Some(now)) = (self.total, total)
            && now < was
        {
            self.step_backs += 1;
            if self.step_backs > MAX_STEP_BACKS {
                return Err(SourceError::Unstable {
                    url: self.url().to_string(),
                    message: format!(
                        "records kept leaving the window while paging ({MAX_STEP_BACKS} times); \
                         the cursor stays put and the next run tries again"
                    ),
                });
            }
            let back = (was - now).div_ceil(self.page_size);
            warn!(
                broker = self.broker,
                was,
                now,
                pages_back = back,
                "Records left the window while paging by page number; re-reading the pages they shifted."
            );
            self.total = Some(now);
            self.page = self.page.saturating_sub(back).max(1);
            return Ok(());
        }
        self.total = total.or(self.total);
        let reached_total = self.total.is_some_and(|t| self.page * self.page_size >= t);
        if received == 0 || reached_total {
            self.done = true;
        } else {
            self.page += 1;
        }
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
