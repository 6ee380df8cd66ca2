//! The bundled sample broker: serves the Track360 guide's recommended API
//! (`GET /api/v1/forex/{customers,transactions,trading-activity}`, `{data, meta}` envelope,
//! `page`/`per_page` up to 500, `next_cursor`, a `last_modified_date` window) from a
//! deterministic data set, on loopback.
//!
//! It is the newcomer's first broker (`t360-connector sample-broker`) and the tests' mock: tests
//! change its data while the daemon pages (mutations, late records, ties, invalid records) and
//! compare the store with it.

pub mod data;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use jiff::Timestamp;
use serde_json::{Value, json};
use tokio::net::TcpListener;

pub use data::{Dataset, DatasetSpec, Table, natural_key};

use crate::model::Entity;

/// The largest page the guide's API serves.
const MAX_PER_PAGE: usize = 500;
const DEFAULT_PER_PAGE: usize = 50;

/// How the sample broker pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paging {
    /// `meta.next_cursor` is a keyset position on (`last_modified_date`, key).
    Cursor,
    /// Page numbers only: `next_cursor` is always null.
    PageNumber,
    /// Sends a `next_cursor` but ignores the cursor parameter: pages by number only.
    IgnoredCursor,
}

/// A test's hook, run after the broker served the `after`-th request for `entity`.
type Hook = Box<dyn FnOnce(&mut Dataset) + Send>;

struct Shared {
    data: Mutex<Dataset>,
    paging: Mutex<Paging>,
    token: Option<String>,
    delay: Mutex<Duration>,
    requests: [AtomicU64; 3],
    hooks: Mutex<Vec<(Entity, u64, Hook)>>,
    /// Per entity: how many of the next requests fail, and with which status.
    failures: Mutex<[(u32, u16); 3]>,
    /// A page size the broker silently caps `per_page` to, leaving `meta.per_page` out.
    cap: Mutex<Option<usize>>,
}

/// A running sample broker. Dropping it does not stop the server; the runtime does.
#[derive(Clone)]
pub struct SampleBroker {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl SampleBroker {
    /// Serves `data` on `addr` (port 0 picks a free one). `token`: bearer token required.
    pub async fn start(
        addr: SocketAddr,
        data: Dataset,
        paging: Paging,
        token: Option<String>,
    ) -> std::io::Result<SampleBroker> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            data: Mutex::new(data),
            paging: Mutex::new(paging),
            token,
            delay: Mutex::new(Duration::ZERO),
            requests: Default::default(),
            hooks: Mutex::new(Vec::new()),
            failures: Mutex::new([(0, 200); 3]),
            cap: Mutex::new(None),
        });
        let app = Router::new()
            .route("/api/v1/forex/{entity}", get(list))
            .with_state(Arc::clone(&shared));
        tokio::spawn(async move {
            // Serves until the runtime shuts down; an accept error ends only this server.
            let _ = axum::serve(listener, app).await;
        });
        Ok(SampleBroker { shared, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, the base URL for a connector file.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Runs `f` on the data set (to add, change or inspect records).
    pub fn with_data<T>(&self, f: impl FnOnce(&mut Dataset) -> T) -> T {
        f(&mut lock(&self.shared.data))
    }

    /// Runs `hook` on the data set right after the `after`-th request for `entity` is answered:
    /// a change that lands while a client is paging.
    pub fn after_request(
        &self,
        entity: Entity,
        after: u64,
        hook: impl FnOnce(&mut Dataset) + Send + 'static,
    ) {
        lock(&self.shared.hooks).push((entity, after, Box::new(hook)));
    }

    /// Requests answered so far for `entity`.
    pub fn requests(&self, entity: Entity) -> u64 {
        self.shared.requests[entity as usize].load(Ordering::SeqCst)
    }

    /// Slows every answer down by `delay` (to catch a client mid-run).
    pub fn set_delay(&self, delay: Duration) {
        *lock(&self.shared.delay) = delay;
    }

    /// Answers the next `count` requests for `entity` with HTTP `status` (a broker outage).
    pub fn fail_next(&self, entity: Entity, count: u32, status: u16) {
        lock(&self.shared.failures)[entity as usize] = (count, status);
    }

    /// Serves at most `cap` records a page whatever `per_page` asks, and no `meta.per_page`.
    pub fn set_page_cap(&self, cap: Option<usize>) {
        *lock(&self.shared.cap) = cap;
    }

    pub fn set_paging(&self, paging: Paging) {
        *lock(&self.shared.paging) = paging;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn list(
    State(shared): State<Arc<Shared>>,
    Path(segment): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let Some(entity) = Entity::ALL.into_iter().find(|e| e.api_segment() == segment) else {
        return error(StatusCode::NOT_FOUND, "no such endpoint");
    };
    if let Some(token) = &shared.token {
        let expected = format!("Bearer {token}");
        if headers.get("authorization").and_then(|h| h.to_str().ok()) != Some(expected.as_str()) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
        }
    }
    if let Some(status) = take_failure(&shared, entity) {
        return error(status, "injected failure");
    }
    let delay = *lock(&shared.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let body = match answer(&shared, entity, &query) {
        Ok(body) => body,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let served = shared.requests[entity as usize].fetch_add(1, Ordering::SeqCst) + 1;
    run_hooks(&shared, entity, served);
    (StatusCode::OK, axum::Json(body)).into_response()
}

fn answer(
    shared: &Shared,
    entity: Entity,
    query: &HashMap<String, String>,
) -> Result<Value, String> {
    let number = |name: &str, default: usize| -> Result<usize, String> {
        query.get(name).map_or(Ok(default), |v| {
            v.parse()
                .map_err(|_| format!("`{name}` must be a positive integer"))
        })
    };
    let instant = |name: &str| -> Result<Option<Timestamp>, String> {
        query
            .get(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| format!("`{name}` must be an RFC 3339 instant"))
            })
            .transpose()
    };
    let cap = *lock(&shared.cap);
    let per_page = number("per_page", DEFAULT_PER_PAGE)?
        .clamp(1, MAX_PER_PAGE)
        .min(cap.unwrap_or(MAX_PER_PAGE));
    let page = number("page", 1)?.max(1);
    let paging = *lock(&shared.paging);
    let from = instant("last_modified_from")?.unwrap_or(Timestamp::MIN);
    let to = instant("last_modified_to")?.unwrap_or(Timestamp::MAX);
    let after = match query.get("cursor") {
        Some(cursor) if paging == Paging::Cursor => Some(decode_cursor(cursor)?),
        _ => None,
    };
    let data = lock(&shared.data);
    let table = data.table(entity);
    let total = table.window(from, to, None).count();
    let offset = if after.is_some() {
        0
    } else {
        (page - 1) * per_page
    };
    let mut rows: Vec<(&(Timestamp, String), &Value)> = table
        .window(from, to, after)
        .skip(offset)
        .take(per_page + 1)
        .collect();
    let more = rows.len() > per_page;
    rows.truncate(per_page);
    let next_cursor = match (paging, more, rows.last()) {
        (Paging::Cursor, true, Some((position, _))) => Some(encode_cursor(position)),
        (Paging::IgnoredCursor, true, _) => Some(format!("page-{}", page + 1)),
        _ => None,
    };
    let mut meta =
        json!({"total": total, "page": page, "per_page": per_page, "next_cursor": next_cursor});
    if cap.is_some() {
        meta.as_object_mut().map(|m| m.remove("per_page"));
    }
    Ok(json!({
        "data": rows.into_iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
        "meta": meta,
    }))
}

fn take_failure(shared: &Shared, entity: Entity) -> Option<StatusCode> {
    let mut failures = lock(&shared.failures);
    let (count, status) = &mut failures[entity as usize];
    if *count == 0 {
        return None;
    }
    *count -= 1;
    StatusCode::from_u16(*status).ok()
}

fn run_hooks(shared: &Shared, entity: Entity, served: u64) {
    let due: Vec<Hook> = {
        let mut hooks = lock(&shared.hooks);
        let (due, keep) = hooks
            .drain(..)
            .partition::<Vec<_>, _>(|(e, after, _)| *e == entity && *after <= served);
        *hooks = keep;
        due.into_iter().map(|(_, _, hook)| hook).collect()
    };
    let mut data = lock(&shared.data);
    for hook in due {
        hook(&mut data);
    }
}

fn encode_cursor((modified, key): &(Timestamp, String)) -> String {
    format!("{}~{}", modified.as_nanosecond(), key)
}

fn decode_cursor(cursor: &str) -> Result<(Timestamp, String), String> {
    let bad = || format!("`cursor` `{cursor}` is not one this broker issued");
    let (nanos, key) = cursor.split_once('~').ok_or_else(bad)?;
    let nanos: i128 = nanos.parse().map_err(|_| bad())?;
    let modified = Timestamp::from_nanosecond(nanos).map_err(|_| bad())?;
    Ok((modified, key.to_owned()))
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"error": message}))).into_response()
}
