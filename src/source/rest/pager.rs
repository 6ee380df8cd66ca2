//! Paging through one window, in the broker's style.
//!
//! - **cursor**: the body's next cursor is sent back as the cursor parameter until a page has
//!   none. A keyset cursor is stable while records change under it. A broker that answers a
//!   cursor with the cursor it was sent ignores the parameter: the pager falls back to page
//!   numbers.
//! - **link**: the `Link: <…>; rel="next"` header is followed (same origin only: it carries
//!   our credentials).
//! - **page number**: `page=1,2,…` until an empty page, `has_more = false`, or `total` reached.
//!   Page numbers are offsets, and offsets shift when a record leaves the window while we page
//!   (it was modified, so its `last_modified_date` moved past the window's end): every later
//!   record moves back, and the ones on the page boundary would be skipped (DOMAIN §4.4). The
//!   pager watches `total`: when it drops by `d`, the `d` skipped records now sit at the end of
//!   the page before, so the pager steps back over them and reads on (upserts make the re-read
//!   harmless). A rise means records were added behind us inside the window: late arrivals,
//!   which the next window's lookback reads.
//! - **offset/limit**: each request starts `overlap` records before where the previous page
//!   ended, and the pager finds the last records it read (its anchors) in the answer. Records
//!   after the last anchor found are new, wherever the anchors moved: records leaving the
//!   window before our position (the anchors move back) and records added before it (they move
//!   forward) are both handled, with or without a `total`. If no anchor is found they moved by
//!   more than the overlap: the pager steps back a page and looks again.
//!
//! Whatever the style, a broker that answers a new request with the page it just served (it
//! ignores the paging parameter) or with a loop of cursors or links is stopped, not followed
//! forever; a 200 whose body is an error envelope, or has no record array and no paging
//! fields, fails the run instead of passing for an empty page (which would move the cursor
//! past records never read).

use std::collections::{HashSet, VecDeque};

use jiff::tz::TimeZone;
use reqwest::Url;
use serde_json::Value;
use tracing::warn;

use super::client::{Fetched, HttpClient};
use crate::config::RestPlan;
use crate::config::plan::PagingStyle;
use crate::http;
use crate::model::Entity;
use crate::normalise::RawRecord;
use crate::normalise::format_instant;
use crate::sink::BoxFuture;
use crate::source::{Page, Pager, SourceError, Window};

/// How many times one window may step back before the run gives up on a broker whose data
/// never holds still.
const MAX_STEP_BACKS: u32 = 1_000;

/// How many answers in a row may repeat the page before them before the broker is taken to
/// ignore the paging parameters.
const MAX_REPEATS: u32 = 3;

/// Where the next request goes.
#[derive(Debug, Clone, PartialEq)]
enum Position {
    Page(u64),
    Cursor(String),
    Offset,
    Link(Url),
    Done,
}

pub struct RestPager<'a> {
    http: &'a HttpClient,
    plan: &'a RestPlan,
    zone: &'a TimeZone,
    entity: Entity,
    window: Window,
    style: PagingStyle,
    next: Position,
    /// Cursors and links followed, to detect a broker that loops.
    followed: HashSet<String>,
    total: Option<u64>,
    page_size: u64,
    /// The largest page the broker served in this window.
    page_size_served: u64,
    step_backs: u32,
    /// Offset style: records read so far in the broker's current order…
    offset: u64,
    /// …and the identities of the last `overlap` of them.
    anchors: VecDeque<u64>,
    /// The last page served (its length, first and last record), to spot a broker that
    /// answers every request with the same page…
    last_page: Option<(usize, u64, u64)>,
    /// …unless the next request deliberately reads again (a step back); and how many
    /// answers in a row repeated the one before.
    rereading: bool,
    repeats: u32,
}

impl<'a> RestPager<'a> {
    pub fn new(
        http: &'a HttpClient,
        plan: &'a RestPlan,
        zone: &'a TimeZone,
        entity: Entity,
        window: Window,
    ) -> Self {
        let style = plan.paging.style;
        RestPager {
            http,
            plan,
            zone,
            entity,
            window,
            style,
            next: if style == PagingStyle::Offset {
                Position::Offset
            } else {
                Position::Page(1)
            },
            followed: HashSet::new(),
            total: None,
            page_size: 0,
            page_size_served: 0,
            step_backs: 0,
            offset: 0,
            anchors: VecDeque::new(),
            last_page: None,
            rereading: false,
            repeats: 0,
        }
    }

    fn url(&self) -> Url {
        if let Position::Link(url) = &self.next {
            return url.clone();
        }
        let p = &self.plan.params;
        let mut url = self.plan.url(self.entity);
        {
            let mut q = url.query_pairs_mut();
            let format = &self.plan.time_format;
            q.append_pair(
                &p.modified_from,
                &format_instant(self.window.from, format, self.zone),
            );
            if !p.modified_to.is_empty() {
                q.append_pair(
                    &p.modified_to,
                    &format_instant(self.window.to, format, self.zone),
                );
            }
            let size = self.plan.per_page.to_string();
            match &self.next {
                Position::Page(n) => {
                    q.append_pair(&p.per_page, &size);
                    q.append_pair(&p.page, &n.to_string());
                }
                Position::Cursor(cursor) => {
                    q.append_pair(&p.per_page, &size);
                    q.append_pair(&p.cursor, cursor);
                }
                Position::Offset => {
                    let from = self.offset.saturating_sub(self.anchors.len() as u64);
                    q.append_pair(&p.offset, &from.to_string());
                    q.append_pair(&p.limit, &size);
                }
                Position::Link(_) | Position::Done => {}
            }
        }
        url
    }

    /// Reads the page `url` answered with: returns its records and decides where the next
    /// request goes.
    pub fn advance(&mut self, url: &Url, fetched: Fetched) -> Result<Vec<RawRecord>, SourceError> {
        let paging = &self.plan.paging;
        let shown = || self.http.shown(url);
        let mut body = fetched.body;
        let envelope = paging
            .error_envelope
            .then(|| error_envelope(&body, &paging.records));
        if let Some(error) = envelope.flatten() {
            return Err(SourceError::BadPage {
                url: shown(),
                message: format!(
                    "HTTP 200 with an error in the body: {}",
                    self.http.scrub(http::snippet(error.to_string().as_bytes()))
                ),
            });
        }
        let read = |pointer: &Option<String>| pointer.as_deref().and_then(|p| body.pointer(p));
        let total = read(&paging.total).and_then(as_count);
        let has_more = read(&paging.has_more).and_then(Value::as_bool);
        let page_size = read(&paging.page_size).and_then(as_count);
        let next_cursor = read(&paging.next_cursor)
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())
            .map(str::to_owned);
        let paging_fields = [
            &paging.total,
            &paging.has_more,
            &paging.next_cursor,
            &paging.page_size,
        ]
        .into_iter()
        .any(|p| read(p).is_some())
            || fetched.link_next.is_some()
            || paging.missing_is_empty;
        // `{"result": null}` for `/result/items`: an explicit nothing, like a null array.
        let null_parent = null_ancestor(&body, &paging.records);
        // Taken out of the body, not copied: the rest of the body is read above. The client
        // kept an array of records at the pointer as each record's text (its place in `body`
        // holds an empty array).
        let records = match (
            fetched.records,
            body.pointer_mut(&paging.records).map(Value::take),
        ) {
            (Some(records), _) => records,
            (None, Some(Value::Array(records))) => {
                records.into_iter().map(RawRecord::Value).collect()
            }
            // A null record array, or none beside the paging fields, on the last page means
            // "nothing more" (dlt #2932)…
            (None, Some(Value::Null)) => Vec::new(),
            (None, None) if paging_fields || null_parent => Vec::new(),
            // …but a body with neither is not a page: taking it for an empty one would move
            // the cursor past the window unread.
            (None, None) => {
                return Err(SourceError::BadPage {
                    url: shown(),
                    message: format!(
                        "no record array at `{}` and no paging fields: {}",
                        paging.records,
                        self.http.scrub(http::snippet(body.to_string().as_bytes()))
                    ),
                });
            }
            (None, Some(_)) => {
                return Err(SourceError::BadPage {
                    url: shown(),
                    message: format!("`{}` is not an array of records", paging.records),
                });
            }
        };
        let rereading = std::mem::take(&mut self.rereading);
        let page = match (records.first(), records.last()) {
            (Some(first), Some(last)) => Some((records.len(), first.identity(), last.identity())),
            _ => None,
        };
        let repeated = page.is_some() && page == self.last_page && !rereading;
        self.last_page = page;
        let style_before = self.style;

        if self.style == PagingStyle::Auto {
            self.style = if fetched.link_next.is_some() {
                PagingStyle::Link
            } else if next_cursor.is_some() {
                PagingStyle::Cursor
            } else {
                PagingStyle::Page
            };
        }
        let received = records.len() as u64;
        // Some brokers serve fewer records than asked for; their page size is what they say,
        // else the largest page they served.
        // A broker may also claim a page size it does not serve: the smaller of the two wins.
        let served = self.page_size_served.max(received);
        self.page_size_served = served;
        self.page_size = page_size
            .filter(|n| *n > 0)
            .map_or(served, |claimed| {
                if served > 0 {
                    claimed.min(served)
                } else {
                    claimed
                }
            })
            .max(1);
        if received == 0 {
            self.check_empty_page(url, has_more, total)?;
        }
        let finished = received == 0 || has_more == Some(false);
        self.next = match self.style {
            PagingStyle::Cursor | PagingStyle::Auto => match next_cursor {
                _ if finished => Position::Done,
                None => Position::Done,
                Some(cursor) => self.follow_cursor(url, cursor, total)?,
            },
            PagingStyle::Link => match fetched.link_next {
                _ if finished => Position::Done,
                None => Position::Done,
                Some(target) => self.follow_link(url, &target)?,
            },
            PagingStyle::Page => self.next_page_number(url, finished, total)?,
            PagingStyle::Offset => self.next_offset(url, &records, finished, total)?,
        };
        // The broker ignoring a cursor serves the first page again: the pager has just
        // switched to page numbers for that, which is not a loop. Nor is a page that repeats
        // because records moved by exactly a page: the pager has just stepped back for that.
        let fell_back = style_before == PagingStyle::Cursor && self.style == PagingStyle::Page;
        if !repeated || fell_back || self.rereading {
            self.repeats = 0;
            return Ok(records);
        }
        // A short page served again for the next page number is the last page: some APIs
        // answer a page past the end with the last one (Django's `get_page`). Nothing is
        // behind a short page.
        if self.style == PagingStyle::Page && received < self.page_size {
            self.next = Position::Done;
            return Ok(records);
        }
        // Records shifting by exactly a page can repeat one answer once; a broker that
        // ignores the paging parameter repeats it every time.
        self.repeats += 1;
        if self.repeats >= MAX_REPEATS {
            return Err(self.unstable(
                url,
                format!(
                    "the broker answered {} requests in a row with the page it served before ({} records, the same first and last): it ignores the paging parameters; not reading it forever",
                    self.repeats,
                    records.len()
                ),
            ));
        }
        Ok(records)
    }

    /// An empty page where this page's own paging fields say records remain (`has_more`, or
    /// a `total` beyond what the pages before it held) is a broker answering badly, not the
    /// end: taking it for the end would move the cursor past records never read. Retried.
    fn check_empty_page(
        &self,
        url: &Url,
        has_more: Option<bool>,
        total: Option<u64>,
    ) -> Result<(), SourceError> {
        let before = match (&self.next, self.style) {
            (Position::Page(page), PagingStyle::Page | PagingStyle::Auto) => {
                Some((page - 1) * self.page_size)
            }
            (Position::Offset, _) => Some(self.offset.saturating_sub(self.anchors.len() as u64)),
            _ => None,
        };
        let short_of_total = matches!((before, total), (Some(b), Some(t)) if b < t);
        if has_more == Some(true) || short_of_total {
            return Err(SourceError::BadPage {
                url: self.http.shown(url),
                message: format!(
                    "an empty page, yet the page says more remain (has_more {has_more:?}, total {total:?})"
                ),
            });
        }
        Ok(())
    }

    fn follow_cursor(
        &mut self,
        url: &Url,
        cursor: String,
        total: Option<u64>,
    ) -> Result<Position, SourceError> {
        if self.next == Position::Cursor(cursor.clone()) {
            // The answer to cursor X is the page that led to X: the broker ignores the cursor
            // parameter and served page 1 again. Page numbers it is, from page 2.
            warn!(
                parameter = %self.plan.params.cursor,
                "The broker ignores the cursor parameter; paging by page number instead."
            );
            self.style = PagingStyle::Page;
            // Page 1's total is the reference the page-number pager watches from now on.
            self.total = self.total.or(total);
            return Ok(Position::Page(2));
        }
        if !self.followed.insert(cursor.clone()) {
            return Err(self.unstable(
                url,
                format!("next cursor `{cursor}` was already followed: the broker's cursor loops"),
            ));
        }
        Ok(Position::Cursor(cursor))
    }

    fn follow_link(&mut self, url: &Url, target: &str) -> Result<Position, SourceError> {
        let next = url.join(target).map_err(|e| SourceError::BadPage {
            url: self.http.shown(url),
            // The target is not shown: a broker's link may carry credentials.
            message: format!("Link rel=\"next\" is not a URL: {e}"),
        })?;
        if next.origin() != self.plan.base_url.origin() {
            return Err(self.unstable(
                url,
                format!("Link rel=\"next\" points to another origin ({}); not following it with our credentials", next.origin().ascii_serialization()),
            ));
        }
        if !self.followed.insert(next.to_string()) {
            return Err(self.unstable(
                url,
                "Link rel=\"next\" points to a page already read: the broker's links loop".into(),
            ));
        }
        Ok(Position::Link(next))
    }

    fn next_page_number(
        &mut self,
        url: &Url,
        finished: bool,
        total: Option<u64>,
    ) -> Result<Position, SourceError> {
        let Position::Page(page) = self.next else {
            return Ok(Position::Done);
        };
        if let (Some(was), Some(now)) = (self.total, total)
            && now < was
        {
            self.step_back(url)?;
            let back = (was - now).div_ceil(self.page_size);
            warn!(
                was,
                now,
                pages_back = back,
                "Records left the window while paging; re-reading the pages they shifted."
            );
            self.total = Some(now);
            return Ok(Position::Page(page.saturating_sub(back).max(1)));
        }
        self.total = total.or(self.total);
        let reached_total = self.total.is_some_and(|t| page * self.page_size >= t);
        Ok(if finished || reached_total {
            Position::Done
        } else {
            Position::Page(page + 1)
        })
    }

    fn next_offset(
        &mut self,
        url: &Url,
        records: &[RawRecord],
        finished: bool,
        total: Option<u64>,
    ) -> Result<Position, SourceError> {
        let requested_from = self.offset.saturating_sub(self.anchors.len() as u64);
        let ids: Vec<u64> = records.iter().map(RawRecord::identity).collect();
        // The last anchor found in the answer: everything after it is unread.
        let found = self
            .anchors
            .iter()
            .rev()
            .find_map(|anchor| ids.iter().position(|id| id == anchor));
        match found {
            _ if self.anchors.is_empty() => {}
            Some(_) => {}
            None if requested_from == 0 => {
                // Back at the start: everything here is read again, nothing can be behind it.
            }
            None => {
                // The anchors moved by more than the overlap: look a page further back.
                self.step_back(url)?;
                warn!(
                    offset = requested_from,
                    "Records moved while paging by offset; stepping back a page."
                );
                let back = requested_from.saturating_sub(self.page_size);
                self.offset = back + self.anchors.len() as u64;
                return Ok(Position::Offset);
            }
        }
        self.offset = requested_from + ids.len() as u64;
        // The anchors are the tail of this answer: at most half a page (of what the broker
        // really serves), so that every full page brings at least half a page past them and
        // the offset always moves on.
        let page = self.page_size.min(u64::from(self.plan.per_page)) as usize;
        let overlap = (self.plan.paging.overlap as usize).min(page / 2);
        self.anchors = ids[ids.len().saturating_sub(overlap)..]
            .iter()
            .copied()
            .collect();
        // A short page with nothing new is the end; a full one is not: we may have stepped
        // back onto records already read.
        let new = records.len() - found.map_or(0, |p| p + 1);
        let short = (records.len() as u64) < self.page_size.min(u64::from(self.plan.per_page));
        let reached_total = total.is_some_and(|t| self.offset >= t);
        Ok(if finished || reached_total || (new == 0 && short) {
            Position::Done
        } else {
            Position::Offset
        })
    }

    fn step_back(&mut self, url: &Url) -> Result<(), SourceError> {
        self.rereading = true;
        self.step_backs += 1;
        if self.step_backs > MAX_STEP_BACKS {
            return Err(self.unstable(
                url,
                format!("records kept moving while paging ({MAX_STEP_BACKS} step-backs); the cursor stays put and the next run tries again"),
            ));
        }
        Ok(())
    }

    fn unstable(&self, url: &Url, message: String) -> SourceError {
        SourceError::Unstable {
            url: self.http.shown(url),
            message,
        }
    }
}

impl Pager for RestPager<'_> {
    fn next_page(&mut self) -> BoxFuture<'_, Result<Option<Page>, SourceError>> {
        Box::pin(async move {
            if self.next == Position::Done {
                return Ok(None);
            }
            let url = self.url();
            let fetched = self.http.get_json(&url, self.entity).await?;
            let records = self.advance(&url, fetched)?;
            Ok(Some(Page {
                records,
                origin: self.http.shown(&url),
            }))
        })
    }
}

/// The error a 200 carries in its body, in the envelopes brokers use: `error`/`errors` set,
/// `success: false`, or `status: "error"`. None where the records themselves live there.
fn error_envelope<'b>(body: &'b Value, records: &str) -> Option<&'b Value> {
    let object = body.as_object()?;
    // `"error": 0`, `false`, `null`, `""`, `[]` and `{}` are how some brokers say "none".
    let set = |v: &&Value| match v {
        Value::Null | Value::Bool(false) => false,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        _ => true,
    };
    for key in ["error", "errors"] {
        if !records.starts_with(&format!("/{key}"))
            && let Some(error) = object.get(key).filter(set)
        {
            return Some(error);
        }
    }
    let failed = object.get("success") == Some(&Value::Bool(false))
        || object
            .get("status")
            .and_then(Value::as_str)
            .is_some_and(|s| {
                ["error", "fail", "failed", "failure"]
                    .iter()
                    .any(|e| s.eq_ignore_ascii_case(e))
            });
    failed.then_some(body)
}

/// Whether a proper prefix of `pointer` holds `null` in `body`.
fn null_ancestor(body: &Value, pointer: &str) -> bool {
    pointer
        .match_indices('/')
        .skip(1)
        .any(|(at, _)| body.pointer(&pointer[..at]) == Some(&Value::Null))
}

fn as_count(value: &Value) -> Option<u64> {
    value
        .as_u64()
        .or_else(|| value.as_str()?.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn error_envelopes_are_told_from_pages() {
        for body in [
            json!({"error": {"code": 503}, "data": []}),
            json!({"errors": [{"message": "db down"}]}),
            json!({"error": "timeout"}),
            json!({"success": false, "data": []}),
            json!({"status": "Error", "message": "try later"}),
        ] {
            assert!(error_envelope(&body, "/data").is_some(), "{body}");
        }
        for body in [
            json!({"data": [], "meta": {"total": 0}}),
            json!({"error": 0, "data": []}),
            json!({"error": null, "errors": [], "success": true, "status": "ok", "data": []}),
            json!([{"customer_id": "C1"}]),
        ] {
            assert!(error_envelope(&body, "/data").is_none(), "{body}");
        }
        assert!(null_ancestor(&json!({"result": null}), "/result/items"));
        assert!(!null_ancestor(&json!({"result": {}}), "/result/items"));
        assert!(!null_ancestor(&json!({"message": "down"}), "/data"));
        // Records that live under `errors` are records.
        let body = json!({"errors": [{"id": 1}]});
        assert!(error_envelope(&body, "/errors").is_none());
    }
}
