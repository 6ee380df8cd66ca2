//! A mock Track360 ingestion API: its own token endpoint, validation per the guide (its own
//! checks, not the connector's), the batch limit, a rate limit, and injectable 429/503/422s.
//! It keeps what it accepted, upserted on natural keys, for tests to compare with the broker.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use t360_connector::model::Entity;
use t360_connector::sample_broker::natural_key;

pub const CLIENT_ID: &str = "t360-client";
pub const CLIENT_SECRET: &str = "t360-ingest-secret-7c1d";

#[derive(Default)]
#[allow(clippy::type_complexity)]
struct Shared {
    ttl: Duration,
    tokens: Mutex<HashMap<String, Instant>>,
    stored: Mutex<BTreeMap<(Entity, String), Value>>,
    batch_limit: usize,
    rate: Mutex<Option<(usize, Duration, VecDeque<Instant>)>>,
    throttled: AtomicU64,
    oversized: AtomicU64,
    posts: AtomicU64,
    largest_batch: AtomicUsize,
    /// Probabilities of a 503 and a 429, per post.
    faults: Mutex<(f64, f64)>,
    dice: AtomicU64,
    down: AtomicBool,
    delay: Mutex<Duration>,
    /// Keys refused with a 422, with the reason.
    refuse: Mutex<HashMap<String, String>>,
    issued: AtomicU64,
    unauthorized: AtomicU64,
    /// Added to every index of a 422 (1: a server that counts from one).
    index_base: AtomicUsize,
    /// Asked during each post: is the broker answering a request right now?
    probe: Mutex<Option<Arc<dyn Fn() -> bool + Send + Sync>>>,
    overlapped: AtomicU64,
}

#[derive(Clone)]
pub struct Ingestion {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

impl Ingestion {
    pub async fn start(batch_limit: usize, ttl: Duration) -> Ingestion {
        let shared = Arc::new(Shared {
            ttl,
            batch_limit,
            ..Shared::default()
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new()
            .route("/oauth/token", post(token))
            .route("/api/v1/forex/{segment}", post(ingest))
            .with_state(Arc::clone(&shared));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ingestion { shared, addr }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The settings-file tables that point a daemon at this mock.
    pub fn settings(&self, kind: &str, secret_file: &std::path::Path, extra: &str) -> String {
        let retry = if extra.contains("max_retry_time") {
            ""
        } else {
            "max_retry_time = \"20s\"\n"
        };
        format!(
            "[sink]\nkind = \"{kind}\"\n[sink.track360]\nbase_url = \"{url}\"\nallow_http = true\n\
             token_url = \"{url}/oauth/token\"\nclient_id = \"{CLIENT_ID}\"\n\
             client_secret_file = {secret:?}\n{retry}{extra}\n",
            url = self.base_url(),
            secret = secret_file.display().to_string(),
        )
    }

    pub fn set_rate_limit(&self, limit: usize, window: Duration) {
        *self.shared.rate.lock().unwrap() = Some((limit, window, VecDeque::new()));
    }

    pub fn set_faults(&self, unavailable: f64, throttle: f64) {
        *self.shared.faults.lock().unwrap() = (unavailable, throttle);
    }

    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
    }

    pub fn set_delay(&self, delay: Duration) {
        *self.shared.delay.lock().unwrap() = delay;
    }

    pub fn refuse(&self, key: &str, reason: &str) {
        self.shared
            .refuse
            .lock()
            .unwrap()
            .insert(key.to_owned(), reason.to_owned());
    }

    /// Counts the posts during which `probe` held (e.g. the broker was answering a request).
    pub fn set_probe(&self, probe: impl Fn() -> bool + Send + Sync + 'static) {
        *self.shared.probe.lock().unwrap() = Some(Arc::new(probe));
    }

    /// Posts during which the probe held.
    pub fn overlapped(&self) -> u64 {
        self.shared.overlapped.load(Ordering::SeqCst)
    }

    /// Numbers the records of a 422 from `base` (1: a server that counts from one).
    pub fn set_index_base(&self, base: usize) {
        self.shared.index_base.store(base, Ordering::SeqCst);
    }

    /// Stops refusing the keys `refuse` named.
    pub fn accept_all(&self) {
        self.shared.refuse.lock().unwrap().clear();
    }

    pub fn revoke_tokens(&self) {
        self.shared.tokens.lock().unwrap().clear();
    }

    /// What the mock holds for `entity`, by natural key.
    pub fn records(&self, entity: Entity) -> BTreeMap<String, Value> {
        self.shared
            .stored
            .lock()
            .unwrap()
            .iter()
            .filter(|((e, _), _)| *e == entity)
            .map(|((_, k), v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn posts(&self) -> u64 {
        self.shared.posts.load(Ordering::SeqCst)
    }

    /// (429s for going over the rate limit, batches over the limit, largest batch, tokens
    /// issued, 401s).
    pub fn manners(&self) -> (u64, u64, usize, u64, u64) {
        let s = &self.shared;
        (
            s.throttled.load(Ordering::SeqCst),
            s.oversized.load(Ordering::SeqCst),
            s.largest_batch.load(Ordering::SeqCst),
            s.issued.load(Ordering::SeqCst),
            s.unauthorized.load(Ordering::SeqCst),
        )
    }
}

async fn token(State(s): State<Arc<Shared>>, headers: HeaderMap, body: String) -> Response {
    use base64::Engine;
    let form: HashMap<String, String> = url::form_urlencoded::parse(body.as_bytes())
        .into_owned()
        .collect();
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok()?.strip_prefix("Basic ").map(str::to_owned))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok());
    let ok = basic.as_deref() == Some(&format!("{CLIENT_ID}:{CLIENT_SECRET}"))
        || (form.get("client_id").map(String::as_str) == Some(CLIENT_ID)
            && form.get("client_secret").map(String::as_str) == Some(CLIENT_SECRET));
    if !ok || form.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_client"})),
        )
            .into_response();
    }
    let n = s.issued.fetch_add(1, Ordering::SeqCst) + 1;
    let token = format!("ingest-token-{n}");
    s.tokens
        .lock()
        .unwrap()
        .insert(token.clone(), Instant::now() + s.ttl);
    axum::Json(
        json!({"access_token": token, "token_type": "bearer", "expires_in": s.ttl.as_secs()}),
    )
    .into_response()
}

async fn ingest(
    State(s): State<Arc<Shared>>,
    Path(segment): Path<String>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let Some(entity) = Entity::ALL.into_iter().find(|e| e.api_segment() == segment) else {
        return (StatusCode::NOT_FOUND, "no such endpoint").into_response();
    };
    if let Some((limit, window, seen)) = s.rate.lock().unwrap().as_mut() {
        let now = Instant::now();
        while seen
            .front()
            .is_some_and(|t| now.duration_since(*t) >= *window)
        {
            seen.pop_front();
        }
        if seen.len() >= *limit {
            s.throttled.fetch_add(1, Ordering::SeqCst);
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, "1")],
                "slow down",
            )
                .into_response();
        }
        seen.push_back(now);
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok()?.strip_prefix("Bearer ").map(str::to_owned));
    let valid = bearer
        .and_then(|t| s.tokens.lock().unwrap().get(&t).copied())
        .is_some_and(|expires| Instant::now() < expires);
    if !valid {
        s.unauthorized.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::UNAUTHORIZED,
            axum::Json(json!({"error": "invalid_token"})),
        )
            .into_response();
    }
    if s.down.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "down").into_response();
    }
    let (unavailable, throttle) = *s.faults.lock().unwrap();
    let roll = |salt: u64| {
        let n = s.dice.fetch_add(1, Ordering::SeqCst);
        (t360_connector::sample_broker::data::scramble(salt, n) % 1000) as f64 / 1000.0
    };
    if roll(1) < unavailable {
        return (StatusCode::SERVICE_UNAVAILABLE, "injected 503").into_response();
    }
    if roll(2) < throttle {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, "1")],
            "injected 429",
        )
            .into_response();
    }
    let delay = *s.delay.lock().unwrap();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let probe = s.probe.lock().unwrap().clone();
    if probe.is_some_and(|p| p()) {
        s.overlapped.fetch_add(1, Ordering::SeqCst);
    }
    let records: Vec<Value> = match serde_json::from_str::<Value>(&body) {
        Ok(Value::Object(mut o)) => match o.remove("data") {
            Some(Value::Array(records)) => records,
            _ => return (StatusCode::BAD_REQUEST, "expected {\"data\": [...]}").into_response(),
        },
        _ => return (StatusCode::BAD_REQUEST, "expected JSON").into_response(),
    };
    s.posts.fetch_add(1, Ordering::SeqCst);
    s.largest_batch.fetch_max(records.len(), Ordering::SeqCst);
    if records.len() > s.batch_limit {
        s.oversized.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            "bulk payloads must not exceed the batch limit",
        )
            .into_response();
    }
    let errors = validate(&s, entity, &records);
    if !errors.is_empty() {
        // The whole batch is refused: nothing of it is stored.
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({"errors": errors})),
        )
            .into_response();
    }
    let mut stored = s.stored.lock().unwrap();
    for record in records {
        stored.insert((entity, natural_key(entity, &record)), record);
    }
    axum::Json(json!({"accepted": true})).into_response()
}

/// The guide's rules, as the API would check them: required fields, currency codes, number
/// types, non-negative lots, references to known customers.
fn validate(s: &Shared, entity: Entity, records: &[Value]) -> Vec<Value> {
    let required: &[&str] = match entity {
        Entity::Customers => &["customer_id", "signup_date", "affiliate_id"],
        Entity::Transactions => &[
            "transaction_id",
            "customer_id",
            "transaction_type",
            "amount",
            "currency",
            "transaction_date",
            "status",
        ],
        Entity::TradingActivity => &[
            "date",
            "customer_id",
            "instrument",
            "lots_traded",
            "currency",
        ],
    };
    let refuse = s.refuse.lock().unwrap();
    let customers: HashSet<String> = s
        .stored
        .lock()
        .unwrap()
        .keys()
        .filter(|(e, _)| *e == Entity::Customers)
        .map(|(_, k)| k.clone())
        .collect();
    let mut errors = Vec::new();
    let base = s.index_base.load(Ordering::SeqCst);
    for (index, r) in records.iter().enumerate() {
        let index = index + base;
        let mut fail = |field: &str, message: &str| {
            errors.push(json!({"index": index, "field": field, "message": message}))
        };
        for field in required {
            if r.get(*field).is_none_or(Value::is_null) {
                fail(field, "is required");
            }
        }
        if let Some(c) = r.get("currency").and_then(Value::as_str)
            && !(c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()))
        {
            fail("currency", "must be an ISO 4217 code");
        }
        for number in super::DECIMAL_FIELDS {
            if r.get(number).is_some_and(|v| !v.is_number()) {
                fail(number, "must be a number");
            }
        }
        if entity != Entity::Customers
            && let Some(c) = r.get("customer_id").and_then(Value::as_str)
            && !customers.contains(c)
        {
            fail("customer_id", "must reference an existing customer_id");
        }
        if let Some(reason) = refuse.get(&natural_key(entity, r)) {
            fail("record", reason);
        }
    }
    errors
}
