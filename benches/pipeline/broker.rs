//! A synthetic broker serving the guide's standard API (`GET /api/v1/forex/{customers,
//! transactions,trading-activity}`, `{data, meta}` envelope, `page`/`per_page` ≤ 500,
//! `last_modified_from`/`last_modified_to`, keyset `next_cursor`) over `dataset::Gen`: windows by
//! index arithmetic, pages written straight into a byte buffer. Optional sliding-window rate
//! limit (429 + `Retry-After`), and counters.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::dataset::{Ent, Fields, Gen, push_u64};

const MAX_PER_PAGE: u64 = 500;
const DEFAULT_PER_PAGE: u64 = 50;

struct RateWindow {
    limit: usize,
    window: Duration,
    seen: VecDeque<Instant>,
    max_in_window: usize,
}

struct Shared {
    data: Gen,
    rate: Mutex<Option<RateWindow>>,
    /// Pages answered with 200.
    served: AtomicU64,
    /// 429s sent for going over the rate limit.
    throttled: AtomicU64,
    /// Body bytes of the 200s.
    bytes: AtomicU64,
    /// First and last 200.
    span: Mutex<Option<(Instant, Instant)>>,
}

/// Counters of a broker.
#[derive(Debug, Clone, Copy, Default)]
pub struct Counters {
    pub served: u64,
    pub throttled: u64,
    pub bytes: u64,
    pub max_in_window: usize,
    /// From the first 200 to the last.
    pub span: Duration,
}

pub struct Broker {
    shared: Arc<Shared>,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl Broker {
    pub async fn start(data: Gen, rate: Option<(usize, Duration)>) -> Broker {
        let shared = Arc::new(Shared {
            data,
            rate: Mutex::new(rate.map(|(limit, window)| RateWindow {
                limit,
                window,
                seen: VecDeque::new(),
                max_in_window: 0,
            })),
            served: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            span: Mutex::new(None),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a loopback port");
        let addr = listener.local_addr().expect("local address");
        let app = Router::new()
            .route("/api/v1/forex/{entity}", get(page))
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Broker {
            shared,
            addr,
            server,
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn counters(&self) -> Counters {
        let s = &self.shared;
        Counters {
            served: s.served.load(Ordering::Relaxed),
            throttled: s.throttled.load(Ordering::Relaxed),
            bytes: s.bytes.load(Ordering::Relaxed),
            max_in_window: lock(&s.rate).as_ref().map_or(0, |r| r.max_in_window),
            span: lock(&s.span).map_or(Duration::ZERO, |(a, b)| b - a),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn bad(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{{\"error\":\"{message}\"}}"),
    )
        .into_response()
}

/// Waits this long before a request would fit, or `None` (and counts it) when it fits now.
fn over_rate_limit(shared: &Shared) -> Option<Duration> {
    let mut rate = lock(&shared.rate);
    let rate = rate.as_mut()?;
    let now = Instant::now();
    while rate
        .seen
        .front()
        .is_some_and(|t| now.duration_since(*t) >= rate.window)
    {
        rate.seen.pop_front();
    }
    if rate.seen.len() >= rate.limit {
        let oldest = *rate.seen.front()?;
        return Some(rate.window.saturating_sub(now.duration_since(oldest)));
    }
    rate.seen.push_back(now);
    rate.max_in_window = rate.max_in_window.max(rate.seen.len());
    None
}

fn instant(text: &str) -> Option<i64> {
    text.parse::<jiff::Timestamp>().ok().map(|t| t.as_second())
}

async fn page(
    State(shared): State<Arc<Shared>>,
    Path(segment): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let Some(entity) = Ent::ALL.into_iter().find(|e| e.segment() == segment) else {
        return (StatusCode::NOT_FOUND, "no such endpoint").into_response();
    };
    if let Some(wait) = over_rate_limit(&shared) {
        shared.throttled.fetch_add(1, Ordering::Relaxed);
        let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, seconds.to_string())],
            "{\"error\":\"rate limit exceeded\"}",
        )
            .into_response();
    }
    let (mut from, mut to) = (i64::MIN, i64::MAX);
    let (mut page, mut per_page, mut cursor) = (1u64, DEFAULT_PER_PAGE, None::<u64>);
    for (name, value) in url::form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match &*name {
            "last_modified_from" => match instant(&value) {
                Some(t) => from = t,
                None => return bad("`last_modified_from` must be an RFC 3339 instant"),
            },
            "last_modified_to" => match instant(&value) {
                Some(t) => to = t,
                None => return bad("`last_modified_to` must be an RFC 3339 instant"),
            },
            "page" => match value.parse::<u64>() {
                Ok(p) => page = p.max(1),
                Err(_) => return bad("`page` must be a positive integer"),
            },
            "per_page" => match value.parse::<u64>() {
                Ok(p) => per_page = p.clamp(1, MAX_PER_PAGE),
                Err(_) => return bad("`per_page` must be a positive integer"),
            },
            "cursor" => match value.strip_prefix('k').and_then(|c| c.parse().ok()) {
                Some(c) => cursor = Some(c),
                None => return bad("`cursor` is not one this broker issued"),
            },
            _ => {}
        }
    }
    let data = &shared.data;
    let (lo, hi) = data.window(entity, from, to);
    let total = hi - lo;
    // A cursor is the index of the next record: a keyset position, stable under paging.
    let first = match cursor {
        Some(c) => c.clamp(lo, hi),
        None => lo
            .saturating_add((page - 1).saturating_mul(per_page))
            .min(hi),
    };
    let last = first.saturating_add(per_page).min(hi);
    let mut body = Vec::with_capacity(((last - first) * 330 + 128) as usize);
    body.extend_from_slice(b"{\"data\":[");
    let mut fields = Fields::default();
    data.write_records(entity, first, last, &mut body, &mut fields);
    let mut meta = String::with_capacity(96);
    meta.push_str("],\"meta\":{\"total\":");
    push_u64(&mut meta, total);
    meta.push_str(",\"page\":");
    push_u64(&mut meta, page);
    meta.push_str(",\"per_page\":");
    push_u64(&mut meta, per_page);
    if last < hi {
        meta.push_str(",\"next_cursor\":\"k");
        push_u64(&mut meta, last);
        meta.push_str("\"}}");
    } else {
        meta.push_str(",\"next_cursor\":null}}");
    }
    body.extend_from_slice(meta.as_bytes());
    shared.served.fetch_add(1, Ordering::Relaxed);
    shared.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    let now = Instant::now();
    let mut span = lock(&shared.span);
    *span = Some(span.map_or((now, now), |(a, _)| (a, now)));
    drop(span);
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
