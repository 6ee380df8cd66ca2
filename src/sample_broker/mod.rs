//! The bundled sample broker: serves the Track360 guide's recommended API
//! (`GET /api/v1/forex/{customers,transactions,trading-activity}`, `{data, meta}` envelope,
//! `page`/`per_page` up to 500, `next_cursor`, a `last_modified_date` window) and a legacy
//! API over the same records (`legacy.rs`), from a deterministic data set, on loopback.
//!
//! It is the newcomer's first broker (`t360-connector sample-broker`) and the tests' mock: tests
//! change its data while the daemon pages (mutations, late records, ties, invalid records),
//! inject faults (5xx, 429 with `Retry-After`, connection resets, truncated JSON, slow answers,
//! a rate limit, revoked OAuth2 tokens) and compare the store with it.

pub mod data;
pub mod legacy;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use jiff::Timestamp;
use serde_json::{Value, json};
use tokio::net::TcpListener;

pub use data::{Dataset, DatasetSpec, Table, natural_key};

use crate::model::Entity;

/// The largest page the guide's API serves.
const MAX_PER_PAGE: usize = 500;
const DEFAULT_PER_PAGE: usize = 50;

/// How the standard API pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Paging {
    /// `meta.next_cursor` is a keyset position on (`last_modified_date`, key).
    Cursor,
    /// Page numbers only: `next_cursor` is always null.
    PageNumber,
    /// Sends a `next_cursor` but ignores the cursor parameter: pages by number only.
    IgnoredCursor,
    /// Page numbers, with the next page's URL in a `Link: <…>; rel="next"` header only.
    Link,
}

/// Random faults, each a probability per request (0.0–1.0), decided by a seeded sequence so
/// that a run is repeatable.
#[derive(Debug, Clone, Copy, Default)]
pub struct Faults {
    /// 503 Service Unavailable.
    pub server_errors: f64,
    /// 429 with `Retry-After: 1`.
    pub throttles: f64,
    /// The connection is dropped halfway through the body.
    pub resets: f64,
    /// A 200 whose JSON body is cut short.
    pub truncations: f64,
    /// Answers delayed by `slow_by`.
    pub slow: f64,
    pub slow_by: Duration,
}

/// OAuth 2.0 client credentials the token endpoint accepts, and its tokens' lifetime.
#[derive(Debug, Clone)]
pub struct OAuthClient {
    pub client_id: String,
    pub client_secret: String,
    pub ttl: Duration,
}

/// What the broker saw, for tests to check the client's manners.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// 429s sent because the client went over the rate limit.
    pub throttled: u64,
    /// The most requests seen in any one rate-limit window.
    pub max_in_window: usize,
    pub tokens_issued: u64,
    /// Requests refused for a missing, expired or revoked token.
    pub unauthorized: u64,
}

/// A test's hook, run after the broker served the `after`-th request for `entity`.
type Hook = Box<dyn FnOnce(&mut Dataset) + Send>;

/// An answer a test makes the broker give instead of its own: hostile or broken bodies.
#[derive(Debug, Clone)]
pub struct RawAnswer {
    pub status: u16,
    pub content_type: &'static str,
    /// Sent as `Content-Encoding` (the body is already encoded), e.g. `gzip`.
    pub content_encoding: Option<&'static str>,
    pub body: Vec<u8>,
}

/// Decides, from the entity's request number (1-based) and the query, whether a request gets
/// a raw answer instead of the broker's own.
type Answerer = Box<dyn Fn(u64, &HashMap<String, String>) -> Option<RawAnswer> + Send + Sync>;

struct RateWindow {
    limit: usize,
    window: Duration,
    seen: VecDeque<Instant>,
}

struct OAuthState {
    client: OAuthClient,
    tokens: HashMap<String, Instant>,
}

struct Shared {
    data: Mutex<Dataset>,
    paging: Mutex<Paging>,
    token: Option<String>,
    delay: Mutex<Duration>,
    requests: [AtomicU64; 3],
    hooks: Mutex<Vec<(Entity, u64, Hook)>>,
    answerers: Mutex<[Option<Arc<Answerer>>; 3]>,
    /// Per entity: how many of the next requests fail, and with which status.
    failures: Mutex<[(u32, u16); 3]>,
    /// A page size the broker silently caps `per_page` to, leaving `meta.per_page` out.
    cap: Mutex<Option<usize>>,
    faults: Mutex<Faults>,
    dice: AtomicU64,
    rate: Mutex<Option<RateWindow>>,
    oauth: Mutex<Option<OAuthState>>,
    /// A header, or (with a `?` prefix) a query parameter, every request must carry.
    required: Mutex<Option<(String, String)>>,
    observed: Mutex<Observed>,
    /// Requests being answered right now.
    in_flight: std::sync::atomic::AtomicUsize,
    /// Per entity: requests being answered now, and the most ever at once (one client pages
    /// one entity a request at a time: more means two clients paged it at once).
    entity_in_flight: [std::sync::atomic::AtomicUsize; 3],
    entity_max_in_flight: [std::sync::atomic::AtomicUsize; 3],
    /// Bodies gzip-compressed for clients that accept it.
    gzip: AtomicBool,
    gzipped: AtomicU64,
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
            answerers: Mutex::new([None, None, None]),
            failures: Mutex::new([(0, 200); 3]),
            cap: Mutex::new(None),
            faults: Mutex::new(Faults::default()),
            dice: AtomicU64::new(0),
            rate: Mutex::new(None),
            oauth: Mutex::new(None),
            required: Mutex::new(None),
            observed: Mutex::new(Observed::default()),
            in_flight: Default::default(),
            entity_in_flight: Default::default(),
            entity_max_in_flight: Default::default(),
            gzip: AtomicBool::new(false),
            gzipped: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/api/v1/forex/{entity}", get(standard))
            .route("/legacy/v2/{entity}", get(legacy_list))
            .route("/oauth/token", post(token_endpoint))
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

    /// Requests answered with data so far for `entity`.
    pub fn requests(&self, entity: Entity) -> u64 {
        self.shared.requests[entity as usize].load(Ordering::SeqCst)
    }

    /// Slows every answer down by `delay` (to catch a client mid-run).
    pub fn set_delay(&self, delay: Duration) {
        *lock(&self.shared.delay) = delay;
    }

    /// Answers the next `count` requests for `entity` with HTTP `status` (a broker outage).
    /// Lets `answer` replace the broker's answers to `entity`'s requests: where it returns
    /// a `RawAnswer`, that is sent as is (after the rate limit and auth, counted as served).
    pub fn answer_with(
        &self,
        entity: Entity,
        answer: impl Fn(u64, &HashMap<String, String>) -> Option<RawAnswer> + Send + Sync + 'static,
    ) {
        lock(&self.shared.answerers)[entity as usize] = Some(Arc::new(Box::new(answer)));
    }

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

    pub fn set_faults(&self, faults: Faults) {
        *lock(&self.shared.faults) = faults;
    }

    /// Answers 429 (with `Retry-After`) to any request beyond `limit` in a sliding `window`.
    pub fn set_rate_limit(&self, limit: usize, window: Duration) {
        *lock(&self.shared.rate) = Some(RateWindow {
            limit,
            window,
            seen: VecDeque::new(),
        });
    }

    /// Requires OAuth2 bearer tokens from `POST /oauth/token` on the legacy API.
    pub fn enable_oauth(&self, client: OAuthClient) {
        *lock(&self.shared.oauth) = Some(OAuthState {
            client,
            tokens: HashMap::new(),
        });
    }

    /// Requires header `name` (or, as `?name`, query parameter `name`) to be `value`: an API
    /// key, or `authorization` for HTTP basic.
    pub fn require(&self, name: &str, value: &str) {
        *lock(&self.shared.required) = Some((name.to_ascii_lowercase(), value.to_owned()));
    }

    /// Revokes every token issued so far (they answer 401 from now on).
    pub fn revoke_tokens(&self) {
        if let Some(oauth) = lock(&self.shared.oauth).as_mut() {
            oauth.tokens.clear();
        }
    }

    /// Compresses bodies with gzip for clients that send `Accept-Encoding: gzip`.
    pub fn set_gzip(&self, on: bool) {
        self.shared.gzip.store(on, Ordering::SeqCst);
    }

    /// Bodies sent gzip-compressed so far.
    pub fn gzipped(&self) -> u64 {
        self.shared.gzipped.load(Ordering::SeqCst)
    }

    /// Requests being answered right now (a client that pipelines has one here while it
    /// delivers the previous page elsewhere).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst)
    }

    /// Requests for `entity` being answered now.
    pub fn in_flight_of(&self, entity: Entity) -> usize {
        self.shared.entity_in_flight[entity as usize].load(Ordering::SeqCst)
    }

    /// The most requests for `entity` ever answered at the same time.
    pub fn max_concurrent(&self, entity: Entity) -> usize {
        self.shared.entity_max_in_flight[entity as usize].load(Ordering::SeqCst)
    }

    pub fn observed(&self) -> Observed {
        lock(&self.shared.observed).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn standard(
    State(shared): State<Arc<Shared>>,
    Path(segment): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let Some(entity) = Entity::ALL.into_iter().find(|e| e.api_segment() == segment) else {
        return error(StatusCode::NOT_FOUND, "no such endpoint");
    };
    let path = format!("/api/v1/forex/{segment}");
    serve(&shared, entity, Api::Standard, &headers, &query, |s| {
        answer(s, entity, &path, &query)
    })
    .await
}

async fn legacy_list(
    State(shared): State<Arc<Shared>>,
    Path(segment): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let Some(entity) = Entity::ALL
        .into_iter()
        .find(|e| legacy::segment(*e) == segment)
    else {
        return error(StatusCode::NOT_FOUND, "no such endpoint");
    };
    serve(&shared, entity, Api::Legacy, &headers, &query, |s| {
        let number = |name: &str| -> Result<Option<i64>, String> {
            query
                .get(name)
                .map(|v| {
                    v.parse()
                        .map_err(|_| format!("`{name}` must be an integer"))
                })
                .transpose()
        };
        let millis = |name: &str| -> Result<Option<Timestamp>, String> {
            number(name)?
                .map(|ms| Timestamp::from_millisecond(ms).map_err(|e| e.to_string()))
                .transpose()
        };
        let from = millis("from")?.unwrap_or(Timestamp::MIN);
        let to = millis("to")?.unwrap_or(Timestamp::MAX);
        let offset = number("offset")?.unwrap_or(0).max(0) as usize;
        let cap = lock(&s.cap).unwrap_or(1000);
        let limit = number("limit")?.unwrap_or(100).clamp(1, 1000) as usize;
        let limit = limit.min(cap);
        let data = lock(&s.data);
        Ok((
            legacy::page(data.table(entity), entity, from, to, offset, limit),
            None,
        ))
    })
    .await
}

/// Everything a list request goes through: rate limit, auth, injected faults, the answer,
/// and the hooks of tests.
async fn serve(
    shared: &Shared,
    entity: Entity,
    api: Api,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    answer: impl FnOnce(&Shared) -> Result<(Value, Option<String>), String>,
) -> Response {
    let _counted = InFlight::enter(shared, entity);
    answer_request(shared, entity, api, headers, query, answer).await
}

/// Counts a request in flight until dropped: also when the client goes away mid-answer and
/// the server drops the handler.
struct InFlight<'a>(&'a Shared, Entity);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared, entity: Entity) -> Self {
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let now = shared.entity_in_flight[entity as usize].fetch_add(1, Ordering::SeqCst) + 1;
        shared.entity_max_in_flight[entity as usize].fetch_max(now, Ordering::SeqCst);
        InFlight(shared, entity)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.entity_in_flight[self.1 as usize].fetch_sub(1, Ordering::SeqCst);
    }
}

async fn answer_request(
    shared: &Shared,
    entity: Entity,
    api: Api,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
    answer: impl FnOnce(&Shared) -> Result<(Value, Option<String>), String>,
) -> Response {
    if let Some(wait) = over_rate_limit(shared) {
        lock(&shared.observed).throttled += 1;
        return throttle(wait);
    }
    if let Err(why) = authorize(shared, api, headers, query) {
        lock(&shared.observed).unauthorized += 1;
        return error(StatusCode::UNAUTHORIZED, why);
    }
    if let Some(status) = take_failure(shared, entity) {
        return error(status, "injected failure");
    }
    let answerer = lock(&shared.answerers)[entity as usize].clone();
    if let Some(answerer) = answerer {
        let n = shared.requests[entity as usize].load(Ordering::SeqCst) + 1;
        if let Some(raw) = answerer(n, query) {
            shared.requests[entity as usize].fetch_add(1, Ordering::SeqCst);
            let status = StatusCode::from_u16(raw.status).unwrap_or(StatusCode::OK);
            let mut response =
                (status, [(header::CONTENT_TYPE, raw.content_type)], raw.body).into_response();
            if let Some(encoding) = raw.content_encoding {
                response.headers_mut().insert(
                    header::CONTENT_ENCODING,
                    header::HeaderValue::from_static(encoding),
                );
            }
            return response;
        }
    }
    let faults = *lock(&shared.faults);
    let roll = || {
        // A repeatable sequence of dice: request n always rolls the same numbers.
        let n = shared.dice.fetch_add(1, Ordering::SeqCst);
        (data::scramble(0xfa17, n) % 1_000_000) as f64 / 1_000_000.0
    };
    if roll() < faults.server_errors {
        return error(StatusCode::SERVICE_UNAVAILABLE, "injected 503");
    }
    if roll() < faults.throttles {
        return throttle(Duration::from_secs(1));
    }
    if roll() < faults.slow {
        tokio::time::sleep(faults.slow_by).await;
    }
    let reset = roll() < faults.resets;
    let truncate = roll() < faults.truncations;
    let delay = *lock(&shared.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (body, link) = match answer(shared) {
        Ok(answer) => answer,
        Err(message) => return error(StatusCode::BAD_REQUEST, &message),
    };
    let served = shared.requests[entity as usize].fetch_add(1, Ordering::SeqCst) + 1;
    run_hooks(shared, entity, served);
    let text = body.to_string();
    if reset {
        // Half the body, then the connection drops: the client sees an incomplete message.
        let half = text.as_bytes()[..text.len() / 2].to_vec();
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            vec![Ok(half), Err(std::io::Error::other("injected reset"))];
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            Body::from_stream(futures_util::stream::iter(chunks)),
        )
            .into_response();
    }
    if truncate {
        let cut = text[..text.len() / 3].to_owned();
        return (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            cut,
        )
            .into_response();
    }
    let accepts_gzip = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h.contains("gzip"));
    let mut response = if accepts_gzip && shared.gzip.load(Ordering::SeqCst) {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let _ = encoder.write_all(text.as_bytes());
        shared.gzipped.fetch_add(1, Ordering::SeqCst);
        let body = encoder.finish().unwrap_or_default();
        let headers = [
            (header::CONTENT_TYPE, "application/json"),
            (header::CONTENT_ENCODING, "gzip"),
        ];
        (StatusCode::OK, headers, body).into_response()
    } else {
        (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            text,
        )
            .into_response()
    };
    if let Some(link) = link.and_then(|l| header::HeaderValue::from_str(&l).ok()) {
        response.headers_mut().insert(header::LINK, link);
    }
    response
}

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
    let mut observed = lock(&shared.observed);
    observed.max_in_window = observed.max_in_window.max(rate.seen.len());
    None
}

/// Which API a request is for: OAuth2, when enabled, guards the legacy one.
#[derive(Clone, Copy, PartialEq)]
enum Api {
    Standard,
    Legacy,
}

fn authorize(
    shared: &Shared,
    api: Api,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<(), &'static str> {
    if let Some((name, value)) = lock(&shared.required).as_ref() {
        let given = match name.strip_prefix('?') {
            Some(param) => query.get(param).map(String::as_str),
            None => headers.get(name.as_str()).and_then(|h| h.to_str().ok()),
        };
        if given != Some(value.as_str()) {
            return Err("missing or wrong credentials");
        }
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    if let Some(oauth) = lock(&shared.oauth).as_ref().filter(|_| api == Api::Legacy) {
        let valid = bearer
            .and_then(|t| oauth.tokens.get(t))
            .is_some_and(|expires| Instant::now() < *expires);
        return if valid {
            Ok(())
        } else {
            Err("missing, expired or revoked token")
        };
    }
    match &shared.token {
        Some(token) if bearer != Some(token.as_str()) => Err("missing or wrong bearer token"),
        _ => Ok(()),
    }
}

/// `POST /oauth/token`: client credentials in a Basic header or the form body.
async fn token_endpoint(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|pair| {
            let (id, secret) = pair.split_once(':')?;
            let decode = |s: &str| {
                url::form_urlencoded::parse(format!("x={s}").as_bytes())
                    .next()
                    .map(|(_, v)| v.into_owned())
            };
            Some((decode(id)?, decode(secret)?))
        });
    let credentials = from_header.or_else(|| {
        Some((
            form.get("client_id")?.clone(),
            form.get("client_secret")?.clone(),
        ))
    });
    let mut oauth = lock(&shared.oauth);
    let Some(oauth) = oauth.as_mut() else {
        return error(StatusCode::NOT_FOUND, "this broker has no OAuth2");
    };
    if form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"error": "unsupported_grant_type"})),
        )
            .into_response();
    }
    let expected = (
        oauth.client.client_id.clone(),
        oauth.client.client_secret.clone(),
    );
    if credentials.as_ref() != Some(&expected) {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let mut observed = lock(&shared.observed);
    observed.tokens_issued += 1;
    let token = format!(
        "tok-{}-{}",
        observed.tokens_issued,
        data::scramble(7, observed.tokens_issued)
    );
    oauth
        .tokens
        .insert(token.clone(), Instant::now() + oauth.client.ttl);
    axum::Json(json!({"access_token": token, "token_type": "bearer", "expires_in": oauth.client.ttl.as_secs()}))
        .into_response()
}

fn answer(
    shared: &Shared,
    entity: Entity,
    path: &str,
    query: &HashMap<String, String>,
) -> Result<(Value, Option<String>), String> {
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
    let link = (paging == Paging::Link && more).then(|| {
        let mut next: Vec<(String, String)> = query
            .iter()
            .filter(|(k, _)| k.as_str() != "page")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        next.push(("page".into(), (page + 1).to_string()));
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(next)
            .finish();
        format!("<{path}?{query}>; rel=\"next\"")
    });
    let body = json!({
        "data": rows.into_iter().map(|(_, v)| v.clone()).collect::<Vec<_>>(),
        "meta": meta,
    });
    Ok((body, link))
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

fn throttle(wait: Duration) -> Response {
    let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, seconds.to_string())],
        axum::Json(json!({"error": "rate limit exceeded"})),
    )
        .into_response()
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(json!({"error": message}))).into_response()
}
