//! Validated, compiled configuration: what the runtime reads. Built in one fallible step from
//! the raw files; nothing after this step re-parses a string or re-reads a file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use reqwest::Url;
use secrecy::SecretString;

use super::ConfigError;
use super::raw::{RawConnector, RawPii, RawReconcile, RawRest, RawSchedule, RawSettings, RawSync};
use super::sql::{Engine, SqlPlan, sql_plan};
use super::state::{StatePlan, state_plan};
use crate::daemon::schedule::Schedule;
use crate::model::Entity;
use crate::normalise::Mapping;
use crate::normalise::pii::{PII_FIELDS, PiiAction, PiiPolicy};

/// The largest page the guide's API serves.
pub const MAX_PER_PAGE: u32 = 500;
/// A page of 500 records is well under 1 MiB; 8 MiB leaves room for fat records and still
/// bounds what a broker that never stops sending (or a gzip bomb) can make us hold.
const DEFAULT_MAX_PAGE_MIB: i64 = 8;

/// The daemon's settings, paths resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub state_dir: PathBuf,
    pub connectors_dir: PathBuf,
    pub sync: RawSync,
    pub daemon: DaemonPlan,
    pub sink: SinkPlan,
    pub state: StatePlan,
}

/// Where records go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkKind {
    /// The embedded store: the entity tables of the SQLite state file.
    Sqlite,
    /// The entity tables of the PostgreSQL state database (`state.backend = "postgres"`).
    Postgres,
    Track360,
    /// Track360, and a copy in the state database's entity tables.
    Both,
}

impl SinkKind {
    /// The store a sink writes to must be the state database's: records and checkpoint commit
    /// in one transaction only there.
    pub fn fits_state(self, postgres_state: bool) -> Result<(), String> {
        match (self, postgres_state) {
            (SinkKind::Sqlite, true) => Err(
                "`sqlite` stores records in the SQLite state file, but state.backend is \
                 \"postgres\": use `postgres` (records commit with their checkpoint there)"
                    .into(),
            ),
            (SinkKind::Postgres, false) => Err(
                "`postgres` stores records in the PostgreSQL state database: it needs \
                 state.backend = \"postgres\""
                    .into(),
            ),
            _ => Ok(()),
        }
    }

    pub fn parse(text: &str) -> Result<SinkKind, String> {
        match text {
            "sqlite" => Ok(SinkKind::Sqlite),
            "postgres" => Ok(SinkKind::Postgres),
            "track360" => Ok(SinkKind::Track360),
            "both" => Ok(SinkKind::Both),
            other => Err(format!(
                "`{other}` is not one of: sqlite, postgres, track360, both"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SinkPlan {
    pub kind: SinkKind,
    pub track360: Option<Track360Plan>,
}

/// Track360's ingestion API.
#[derive(Debug, Clone)]
pub struct Track360Plan {
    pub base_url: Url,
    pub oauth: OAuth2Plan,
    pub batch_size: usize,
    pub rate_limit: RateLimit,
    pub max_retry_time: Duration,
    pub timeout: Duration,
    /// `{"data": [...]}` when true, a bare array otherwise.
    pub wrap_in_data: bool,
}

/// The guide's bulk limit.
pub const MAX_BATCH: usize = 1000;

/// `t360-connector run`'s settings.
#[derive(Debug, Clone)]
pub struct DaemonPlan {
    /// Where `/healthz` and `/metrics` listen; `None`: nowhere.
    pub listen: Option<std::net::SocketAddr>,
    pub max_concurrent_syncs: usize,
    pub shutdown_grace: Duration,
}

impl Settings {
    /// The one SQLite file holding checkpoints, run history, quarantine and the entity store
    /// (one file, so that records and checkpoint commit in one transaction).
    pub fn database_path(&self) -> PathBuf {
        self.state_dir.join("t360-connector.db")
    }
}

/// One broker, ready to run.
#[derive(Debug, Clone)]
pub struct ConnectorPlan {
    pub broker: String,
    pub file: PathBuf,
    pub enabled: bool,
    pub entities: Vec<Entity>,
    pub zone: TimeZone,
    pub source: SourcePlan,
    /// Shared with the threads that normalise and validate pages (`engine`).
    pub mapping: Arc<Mapping>,
    pub sync: SyncPlan,
    /// When each entity syncs, in `Entity::ALL` order.
    pub schedules: [Schedule; 3],
    /// A digest of the file's text: a reload restarts a connector whose file changed.
    pub fingerprint: u64,
    /// This broker's sink, when it differs from the daemon's.
    pub sink: Option<SinkKind>,
    pub reconcile: ReconcilePlan,
}

/// Scheduled reconciliation (`[reconcile]`).
#[derive(Debug, Clone)]
pub struct ReconcilePlan {
    pub schedule: Option<Schedule>,
    pub days: i64,
    pub entities: Vec<Entity>,
    pub auto_repair: bool,
}

#[derive(Debug, Clone)]
pub enum SourcePlan {
    Rest(Box<RestPlan>),
    Sql(Box<SqlPlan>),
}

/// A broker's REST API.
#[derive(Debug, Clone)]
pub struct RestPlan {
    pub base_url: Url,
    pub per_page: u32,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub rate_limit: RateLimit,
    pub max_retry_time: Duration,
    /// The largest page body read, decompressed: a page over it fails the run.
    pub max_page_bytes: usize,
    pub auth: AuthPlan,
    pub paging: PagingPlan,
    pub params: QueryParams,
    /// How window bounds are written into the query.
    pub time_format: TimeFormat,
    pub paths: [String; 3],
}

impl RestPlan {
    /// The URL of `entity`'s list endpoint.
    pub fn url(&self, entity: Entity) -> Url {
        let mut url = self.base_url.clone();
        let base = url.path().trim_end_matches('/').to_owned();
        url.set_path(&format!("{base}{}", self.paths[entity as usize]));
        url
    }
}

/// At most `requests` in any `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
}

/// How a page is read and the next one asked for.
#[derive(Debug, Clone)]
pub struct PagingPlan {
    pub style: PagingStyle,
    /// JSON pointer to the record array; `""` is the body itself.
    pub records: String,
    pub total: Option<String>,
    pub next_cursor: Option<String>,
    pub has_more: Option<String>,
    pub page_size: Option<String>,
    /// Offset style: how many records of the previous page each request reads again.
    pub overlap: u32,
    /// Whether a 200 whose body is an error envelope fails the run.
    pub error_envelope: bool,
    /// Whether a body without the record array or paging fields is an empty page.
    pub missing_is_empty: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagingStyle {
    /// Follow the body's next cursor when the broker sends one, page numbers otherwise.
    Auto,
    /// Page numbers only, whatever the body says.
    Page,
    /// The body's next cursor, sent back as the cursor parameter.
    Cursor,
    /// offset/limit.
    Offset,
    /// The `Link: <…>; rel="next"` response header.
    Link,
}

/// How instants are written in a query or read from a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeFormat {
    Rfc3339,
    EpochSeconds,
    EpochMillis,
    /// A strftime format; without an offset in it, the time is the connector's zone's.
    Format(String),
}

impl TimeFormat {
    pub fn parse(text: &str) -> Result<TimeFormat, String> {
        match text {
            "rfc3339" | "iso8601" => Ok(TimeFormat::Rfc3339),
            "epoch_s" => Ok(TimeFormat::EpochSeconds),
            "epoch_ms" => Ok(TimeFormat::EpochMillis),
            f if f.contains('%') => Ok(TimeFormat::Format(f.to_owned())),
            other => Err(format!(
                "`{other}` is not rfc3339, epoch_s, epoch_ms or a strftime format such as \"%Y.%m.%d %H:%M:%S\""
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct QueryParams {
    pub page: String,
    pub per_page: String,
    pub offset: String,
    pub limit: String,
    pub modified_from: String,
    pub modified_to: String,
    pub cursor: String,
}

/// How requests authenticate.
#[derive(Debug, Clone)]
pub enum AuthPlan {
    None,
    Bearer(SecretString),
    ApiKeyHeader {
        name: String,
        key: SecretString,
    },
    ApiKeyQuery {
        name: String,
        key: SecretString,
    },
    Basic {
        username: String,
        password: SecretString,
    },
    OAuth2(OAuth2Plan),
}

/// OAuth 2.0 client credentials.
#[derive(Debug, Clone)]
pub struct OAuth2Plan {
    pub token_url: Url,
    pub client_id: String,
    pub client_secret: SecretString,
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct SyncPlan {
    /// How far behind the cursor each window starts, to catch records that arrive late.
    pub lookback: SignedDuration,
    /// How far behind now each window ends, so that records still being written are not missed.
    pub settle: SignedDuration,
    /// Trading activity: the last N days are re-pulled on every sync (intra-day replaces).
    pub activity_repull_days: i64,
    pub backfill_slice: SignedDuration,
    pub start: Option<Timestamp>,
}

/// Collects the problems of one file, so that `check` reports all of them at once.
pub(super) struct Problems<'a> {
    pub file: &'a Path,
    pub found: Vec<ConfigError>,
}

impl Problems<'_> {
    pub fn add(&mut self, key: &str, message: impl Into<String>) {
        self.found.push(ConfigError::new(self.file, key, message));
    }

    /// `Some(value)` when `result` is Ok, otherwise records the problem under `key`.
    pub fn take<T>(&mut self, key: &str, result: Result<T, String>) -> Option<T> {
        result.map_err(|message| self.add(key, message)).ok()
    }
}

impl Settings {
    pub(super) fn build(raw: RawSettings, base: &Path, problems: &mut Problems) -> Settings {
        sync_plan(&raw.sync, &RawSync::default(), "sync", problems);
        let d = &raw.daemon;
        let listen = match d.listen.as_deref() {
            None => Some("127.0.0.1:9360".parse().ok()),
            Some("off") => Some(None),
            Some(text) => problems.take(
                "daemon.listen",
                text.parse().map(Some).map_err(|_| {
                    format!("`{text}` is not an address such as 127.0.0.1:9360, or \"off\"")
                }),
            ),
        };
        let max = match d.max_concurrent_syncs {
            None => Some(4),
            Some(n) if (1..=1024).contains(&n) => Some(n as usize),
            Some(n) => {
                problems.add(
                    "daemon.max_concurrent_syncs",
                    format!("must be between 1 and 1024, found {n}"),
                );
                None
            }
        };
        let grace = optional_duration(&d.shutdown_grace, "30s", "daemon.shutdown_grace", problems);
        let state = state_plan(&raw.state, problems);
        let postgres = matches!(state, Some(StatePlan::Postgres(_)));
        let sink = sink_plan(&raw.sink, postgres, problems);
        Settings {
            state_dir: base.join(&raw.state_dir),
            connectors_dir: base.join(&raw.connectors_dir),
            sync: raw.sync,
            daemon: DaemonPlan {
                listen: listen.flatten(),
                max_concurrent_syncs: max.unwrap_or(4),
                shutdown_grace: grace.map_or(Duration::from_secs(30), |g| g.unsigned_abs()),
            },
            sink: sink.unwrap_or(SinkPlan {
                kind: SinkKind::Sqlite,
                track360: None,
            }),
            state: state.unwrap_or(StatePlan::Sqlite),
        }
    }
}

pub(super) fn connector_plan(
    raw: RawConnector,
    defaults: &RawSync,
    file: &Path,
    problems: &mut Problems,
) -> Option<ConnectorPlan> {
    let stem = file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    let broker = raw.broker.clone().unwrap_or_else(|| stem.to_owned());
    if !is_broker_id(&broker) {
        problems.add(
            "broker",
            format!("`{broker}` must be 1–64 letters, digits, `-`, `_` or `.`"),
        );
    }
    if let Some(preset) = &raw.preset
        && preset != "track360-standard"
    {
        problems.add(
            "preset",
            format!("`{preset}` is not a known preset: track360-standard"),
        );
    }
    let zone = match &raw.timezone {
        None => Some(TimeZone::UTC),
        Some(name) => problems.take("timezone", parse_zone(name)),
    };
    let entities = match &raw.entities {
        None => Entity::ALL.to_vec(),
        Some(names) => {
            let mut entities = Vec::new();
            for name in names {
                if let Some(e) = problems.take("entities", name.parse::<Entity>()) {
                    entities.push(e);
                }
            }
            entities.sort();
            entities.dedup();
            entities
        }
    };
    let source = match (raw.kind.as_str(), &raw.rest, &raw.sql) {
        ("rest", Some(rest), None) => {
            rest_plan(rest, problems).map(|plan| SourcePlan::Rest(Box::new(plan)))
        }
        ("rest", None, _) => {
            problems.add("rest", "a `[rest]` table is required for kind = \"rest\"");
            None
        }
        (kind, _, sql) if Engine::parse(kind).is_some() => match (sql, &raw.rest, &zone) {
            (Some(sql), None, Some(zone)) => {
                let engine = Engine::parse(kind).expect("matched above");
                sql_plan(engine, sql, zone, &entities, problems)
                    .map(|plan| SourcePlan::Sql(Box::new(plan)))
            }
            (None, _, _) => {
                problems.add(
                    "sql",
                    format!("a `[sql]` table is required for kind = \"{kind}\""),
                );
                None
            }
            (_, Some(_), _) => {
                problems.add(
                    "rest",
                    format!("a `[rest]` table has no use with kind = \"{kind}\""),
                );
                None
            }
            (_, _, None) => None,
        },
        ("rest", _, Some(_)) => {
            problems.add("sql", "a `[sql]` table has no use with kind = \"rest\"");
            None
        }
        (kind, rest, _) => {
            // Still check what is there, so that one `check` reports every problem.
            if let Some(rest) = rest {
                rest_plan(rest, problems);
            }
            problems.add(
                "kind",
                format!(
                    "`{kind}` is not a source kind this build knows: rest, postgres, mysql, sqlite"
                ),
            );
            None
        }
    };
    let sync = sync_plan(&raw.sync, defaults, "sync", problems);
    let pii = pii_policy(&raw.pii, problems);
    let zone = zone?;
    let mapping = match Mapping::compile(&raw.mapping, zone.clone(), pii?) {
        Ok(mapping) => Some(mapping),
        Err(found) => {
            for (key, message) in found {
                problems.add(&key, message);
            }
            None
        }
    };
    let schedules = schedule_plan(&raw.schedule, problems);
    let reconcile = reconcile_plan(&raw.reconcile, &raw.schedule, &entities, problems);
    let sink = match &raw.sink {
        None => Some(None),
        Some(text) => problems.take("sink", SinkKind::parse(text)).map(Some),
    };
    Some(ConnectorPlan {
        broker,
        file: file.to_owned(),
        enabled: raw.enabled,
        entities,
        zone,
        source: source?,
        mapping: Arc::new(mapping?),
        sync: sync?,
        schedules: schedules?,
        fingerprint: 0,
        sink: sink?,
        reconcile: reconcile?,
    })
}

fn sink_plan(
    raw: &super::raw::RawSink,
    postgres_state: bool,
    problems: &mut Problems,
) -> Option<SinkPlan> {
    let kind = match raw.kind.as_deref() {
        None if postgres_state => SinkKind::Postgres,
        None => SinkKind::Sqlite,
        Some(text) => problems.take("sink.kind", SinkKind::parse(text))?,
    };
    if let Err(e) = kind.fits_state(postgres_state) {
        problems.add("sink.kind", e);
        return None;
    }
    let track360 = match &raw.track360 {
        None if matches!(kind, SinkKind::Track360 | SinkKind::Both) => {
            problems.add("sink.track360", "sink.kind needs a [sink.track360] table");
            return None;
        }
        None => None,
        Some(t) => Some(track360_plan(t, problems)?),
    };
    Some(SinkPlan { kind, track360 })
}

fn track360_plan(raw: &super::raw::RawTrack360, problems: &mut Problems) -> Option<Track360Plan> {
    let base_url = http_url(
        &raw.base_url,
        raw.allow_http,
        "sink.track360.base_url",
        problems,
    );
    let token_url = http_url(
        &raw.token_url,
        raw.allow_http,
        "sink.track360.token_url",
        problems,
    );
    let secret = super::secret::load(
        raw.client_secret_env.as_deref(),
        raw.client_secret_file.as_deref(),
        "sink.track360.client_secret",
    );
    let secret = problems.take("sink.track360", secret);
    let batch_size = match raw.batch_size {
        None => Some(MAX_BATCH),
        Some(n) if (1..=MAX_BATCH as i64).contains(&n) => Some(n as usize),
        Some(n) => {
            problems.add(
                "sink.track360.batch_size",
                format!("must be between 1 and {MAX_BATCH}, found {n}"),
            );
            None
        }
    };
    let rate_limit = match &raw.rate_limit {
        None => Some(RateLimit {
            requests: 1000,
            per: Duration::from_secs(60),
        }),
        Some(value) => problems.take("sink.track360.rate_limit", parse_rate_limit(value)),
    };
    let max_retry_time = optional_duration(
        &raw.max_retry_time,
        "5m",
        "sink.track360.max_retry_time",
        problems,
    );
    let timeout = optional_duration(&raw.timeout, "60s", "sink.track360.timeout", problems);
    let wrap_in_data = match raw.body.as_deref() {
        None | Some("data") => Some(true),
        Some("array") => Some(false),
        Some(other) => {
            problems.add(
                "sink.track360.body",
                format!("`{other}` is not one of: data, array"),
            );
            None
        }
    };
    Some(Track360Plan {
        base_url: base_url?,
        oauth: OAuth2Plan {
            token_url: token_url?,
            client_id: raw.client_id.clone(),
            client_secret: secret?,
            scopes: raw.scopes.clone(),
        },
        batch_size: batch_size?,
        rate_limit: rate_limit?,
        max_retry_time: max_retry_time?.unsigned_abs(),
        timeout: timeout?.unsigned_abs(),
        wrap_in_data: wrap_in_data?,
    })
}

/// The guide's freshness: customers and transactions every 5 minutes, trading activity daily
/// after 06:00 UTC (its rows are due by 06:00 UTC).
const DEFAULT_SCHEDULES: [&str; 3] = ["*/5 * * * *", "*/5 * * * *", "15 6 * * *"];

fn schedule_plan(raw: &RawSchedule, problems: &mut Problems) -> Option<[Schedule; 3]> {
    let zone = match &raw.timezone {
        None => Some(TimeZone::UTC),
        Some(name) => problems.take("schedule.timezone", parse_zone(name)),
    }?;
    let texts = [&raw.customers, &raw.transactions, &raw.trading_activity];
    let mut schedules = Vec::with_capacity(3);
    for ((entity, text), default) in Entity::ALL.iter().zip(texts).zip(DEFAULT_SCHEDULES) {
        let text = text.as_deref().unwrap_or(default);
        let key = format!("schedule.{entity}");
        schedules.push(problems.take(&key, Schedule::parse(text, zone.clone())));
    }
    let [a, b, c]: [Option<Schedule>; 3] = schedules.try_into().ok()?;
    Some([a?, b?, c?])
}

fn reconcile_plan(
    raw: &RawReconcile,
    schedule: &RawSchedule,
    pulled: &[Entity],
    problems: &mut Problems,
) -> Option<ReconcilePlan> {
    let zone = match &schedule.timezone {
        None => TimeZone::UTC,
        // Reported once, by the schedule's own check.
        Some(name) => parse_zone(name).unwrap_or(TimeZone::UTC),
    };
    let parsed = match &raw.schedule {
        None => Some(None),
        Some(text) => problems
            .take("reconcile.schedule", Schedule::parse(text, zone))
            .map(Some),
    };
    let days = match raw.days {
        None => Some(7),
        Some(n) if (1..=366).contains(&n) => Some(n),
        Some(n) => {
            problems.add(
                "reconcile.days",
                format!("must be between 1 and 366, found {n}"),
            );
            None
        }
    };
    let entities = match &raw.entities {
        None => Some(
            [Entity::Transactions, Entity::TradingActivity]
                .into_iter()
                .filter(|e| pulled.contains(e))
                .collect(),
        ),
        Some(names) => {
            let mut entities = Vec::new();
            for name in names {
                match name.parse::<Entity>() {
                    Ok(e) if pulled.contains(&e) => entities.push(e),
                    Ok(e) => problems.add(
                        "reconcile.entities",
                        format!("{e} is not pulled by this connector (`entities`)"),
                    ),
                    Err(message) => problems.add("reconcile.entities", message),
                }
            }
            Some(entities)
        }
    };
    Some(ReconcilePlan {
        schedule: parsed?,
        days: days?,
        entities: entities?,
        auto_repair: raw.auto_repair,
    })
}

fn pii_policy(raw: &RawPii, problems: &mut Problems) -> Option<PiiPolicy> {
    let mut policy = PiiPolicy::default();
    let fields = [&raw.first_name, &raw.last_name, &raw.email];
    for ((name, value), action) in PII_FIELDS.iter().zip(fields).zip(policy.actions.iter_mut()) {
        if let Some(text) = value {
            *action = problems.take(&format!("pii.{name}"), PiiAction::parse(text))?;
        }
    }
    if raw.hash_key_env.is_some() || raw.hash_key_file.is_some() {
        let key = super::secret::load(
            raw.hash_key_env.as_deref(),
            raw.hash_key_file.as_deref(),
            "pii.hash_key",
        );
        policy.hash_key = Some(problems.take("pii", key)?);
    }
    Some(policy)
}

fn rest_plan(raw: &RawRest, problems: &mut Problems) -> Option<RestPlan> {
    let base_url = http_url(&raw.base_url, raw.allow_http, "rest.base_url", problems);
    let per_page = match raw.per_page {
        None => Some(MAX_PER_PAGE),
        Some(n) if (1..=MAX_PER_PAGE as i64).contains(&n) => Some(n as u32),
        Some(n) => {
            problems.add(
                "rest.per_page",
                format!("must be between 1 and {MAX_PER_PAGE}, found {n}"),
            );
            None
        }
    };
    let timeout = optional_duration(&raw.timeout, "60s", "rest.timeout", problems);
    let connect_timeout = optional_duration(
        &raw.connect_timeout,
        "10s",
        "rest.connect_timeout",
        problems,
    );
    let max_retry_time =
        optional_duration(&raw.max_retry_time, "2m", "rest.max_retry_time", problems);
    let max_page_bytes = match raw.max_page_mib.unwrap_or(DEFAULT_MAX_PAGE_MIB) {
        n @ 1..=1024 => Some(n as usize * 1024 * 1024),
        n => {
            problems.add(
                "rest.max_page_mib",
                format!("must be between 1 and 1024 (MiB), found {n}"),
            );
            None
        }
    };
    let rate_limit = match &raw.rate_limit {
        None => Some(RateLimit {
            requests: 1000,
            per: Duration::from_secs(60),
        }),
        Some(value) => problems.take("rest.rate_limit", parse_rate_limit(value)),
    };
    let auth = auth_plan(raw, problems);
    let paging = paging_plan(raw, problems);
    let time_format = problems.take(
        "rest.params.time_format",
        TimeFormat::parse(&raw.params.time_format),
    );
    let mut paths = Entity::ALL.map(|e| format!("/api/v1/forex/{}", e.api_segment()));
    for (name, path) in &raw.paths {
        let key = format!("rest.paths.{name}");
        if let Some(entity) = problems.take(&key, name.parse::<Entity>()) {
            if path.starts_with('/') {
                paths[entity as usize] = path.clone();
            } else {
                problems.add(&key, format!("`{path}` must start with `/`"));
            }
        }
    }
    if paging
        .as_ref()
        .is_some_and(|p| p.style == PagingStyle::Offset)
        && per_page.is_some_and(|n| n < 2)
    {
        problems.add(
            "rest.per_page",
            "offset paging needs pages of at least 2 records to follow records that move",
        );
    }
    let p = &raw.params;
    let params = QueryParams {
        page: p.page.clone(),
        per_page: p.per_page.clone(),
        offset: p.offset.clone(),
        limit: p.limit.clone(),
        modified_from: p.modified_from.clone(),
        modified_to: p.modified_to.clone(),
        cursor: p.cursor.clone(),
    };
    Some(RestPlan {
        base_url: base_url?,
        per_page: per_page?,
        timeout: timeout?.unsigned_abs(),
        connect_timeout: connect_timeout?.unsigned_abs(),
        rate_limit: rate_limit?,
        max_retry_time: max_retry_time?.unsigned_abs(),
        max_page_bytes: max_page_bytes?,
        auth: auth?,
        paging: paging?,
        params,
        time_format: time_format?,
        paths,
    })
}

/// An http(s) URL; plain http only when allowed.
fn http_url(text: &str, allow_http: bool, key: &str, problems: &mut Problems) -> Option<Url> {
    // A password in a URL ends up in every log line that names the URL.
    if let Ok(url) = Url::parse(text)
        && (!url.username().is_empty() || url.password().is_some())
    {
        problems.add(key, "credentials in the URL are refused: use the auth settings (secrets from the environment or a file)");
        return None;
    }
    match Url::parse(text) {
        Ok(url) if url.scheme() == "https" => Some(url),
        Ok(url) if url.scheme() == "http" && allow_http => Some(url),
        Ok(url) if url.scheme() == "http" => {
            problems.add(
                key,
                "plain http is refused; use https, or set rest.allow_http = true for loopback tests",
            );
            None
        }
        Ok(url) => {
            problems.add(
                key,
                format!("scheme `{}` is not http or https", url.scheme()),
            );
            None
        }
        Err(e) => {
            problems.add(key, format!("`{text}` is not a URL: {e}"));
            None
        }
    }
}

/// `1000` (per minute), `"50/s"`, `"1000/min"`, `"20000/h"`.
fn parse_rate_limit(value: &toml::Value) -> Result<RateLimit, String> {
    let (count, per) = match value {
        toml::Value::Integer(n) => (*n, 60),
        toml::Value::String(text) => {
            let (n, unit) = text
                .split_once('/')
                .ok_or_else(|| format!("`{text}` is not a rate such as 1000/min or 50/s"))?;
            let per = match unit.trim() {
                "s" | "sec" | "second" => 1,
                "m" | "min" | "minute" => 60,
                "h" | "hour" => 3600,
                other => return Err(format!("unit `{other}` is not s, min or h")),
            };
            let n = n
                .trim()
                .parse::<i64>()
                .map_err(|_| format!("`{text}` is not a rate such as 1000/min or 50/s"))?;
            (n, per)
        }
        other => return Err(format!("expected a number or a string, found {other}")),
    };
    match u32::try_from(count) {
        Ok(requests) if requests > 0 => Ok(RateLimit {
            requests,
            per: Duration::from_secs(per),
        }),
        _ => Err(format!(
            "must be a positive number of requests, found {count}"
        )),
    }
}

fn paging_plan(raw: &RawRest, problems: &mut Problems) -> Option<PagingPlan> {
    let p = &raw.paging;
    let style = match p.style.as_deref() {
        None | Some("auto") => Some(PagingStyle::Auto),
        Some("page") => Some(PagingStyle::Page),
        Some("cursor") => Some(PagingStyle::Cursor),
        Some("offset") => Some(PagingStyle::Offset),
        Some("link") => Some(PagingStyle::Link),
        Some(other) => {
            problems.add(
                "rest.paging.style",
                format!("`{other}` is not one of: auto, page, cursor, offset, link"),
            );
            None
        }
    };
    let mut pointer = |key: &str, value: &Option<String>, default: Option<&str>| {
        let text = value.as_deref().or(default)?;
        match json_pointer(text) {
            Ok(pointer) => Some(pointer),
            Err(e) => {
                problems.add(&format!("rest.paging.{key}"), e);
                None
            }
        }
    };
    // The guide's envelope: {"data": [...], "meta": {"total", "page", "per_page", "next_cursor"}}.
    let records = pointer("records", &p.records, Some("/data")).unwrap_or_default();
    let total = pointer("total", &p.total, Some("/meta/total"));
    let next_cursor = pointer("next_cursor", &p.next_cursor, Some("/meta/next_cursor"));
    let has_more = pointer("has_more", &p.has_more, None);
    let page_size = pointer("page_size", &p.page_size, Some("/meta/per_page"));
    let overlap = match p.overlap {
        None => Some(10),
        Some(n) if (1..=100).contains(&n) => Some(n as u32),
        Some(n) => {
            problems.add(
                "rest.paging.overlap",
                format!("must be between 1 and 100, found {n}"),
            );
            None
        }
    };
    if style == Some(PagingStyle::Cursor) && next_cursor.is_none() {
        problems.add(
            "rest.paging.next_cursor",
            "style = \"cursor\" needs the cursor's location",
        );
    }
    Some(PagingPlan {
        style: style?,
        records,
        total,
        next_cursor,
        has_more,
        page_size,
        overlap: overlap?,
        error_envelope: p.error_envelope.unwrap_or(true),
        missing_is_empty: p.missing_is_empty.unwrap_or(false),
    })
}

/// A JSON pointer (`/a/b`, `""` for the whole value) or a dotted path (`a.b`) as a pointer.
/// A JSON pointer's segments, unescaped (`""` has none: the whole document).
pub fn pointer_segments(pointer: &str) -> Vec<String> {
    pointer
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect()
}

pub fn json_pointer(text: &str) -> Result<String, String> {
    if text.is_empty() || text.starts_with('/') {
        return Ok(text.to_owned());
    }
    if text.split('.').any(str::is_empty) || text.starts_with('$') {
        return Err(format!(
            "`{text}` is not a JSON pointer (/data/items) or a dotted path (data.items)"
        ));
    }
    // A dotted path's segments are names: `~` and `/` in them are escaped as a pointer wants.
    Ok(text
        .split('.')
        .map(|seg| format!("/{}", seg.replace('~', "~0").replace('/', "~1")))
        .collect())
}

fn auth_plan(raw: &RawRest, problems: &mut Problems) -> Option<AuthPlan> {
    let a = &raw.auth;
    let secret =
        |env: &Option<String>, file: &Option<String>, name: &str, problems: &mut Problems| {
            let loaded = super::secret::load(
                env.as_deref(),
                file.as_deref(),
                &format!("rest.auth.{name}"),
            );
            problems.take("rest.auth", loaded)
        };
    match a.kind.as_str() {
        "none" => Some(AuthPlan::None),
        "bearer" => secret(&a.token_env, &a.token_file, "token", problems).map(AuthPlan::Bearer),
        "api_key" => {
            let key = secret(&a.key_env, &a.key_file, "key", problems);
            match (&a.header, &a.query) {
                (Some(name), None) => Some(AuthPlan::ApiKeyHeader {
                    name: name.clone(),
                    key: key?,
                }),
                (None, Some(name)) => Some(AuthPlan::ApiKeyQuery {
                    name: name.clone(),
                    key: key?,
                }),
                _ => {
                    problems.add(
                        "rest.auth",
                        "api_key needs exactly one of `header` or `query`",
                    );
                    None
                }
            }
        }
        "basic" => {
            let password = secret(&a.password_env, &a.password_file, "password", problems);
            let Some(username) = a.username.clone() else {
                problems.add("rest.auth.username", "basic auth needs a username");
                return None;
            };
            Some(AuthPlan::Basic {
                username,
                password: password?,
            })
        }
        "oauth2" => {
            let client_secret = secret(
                &a.client_secret_env,
                &a.client_secret_file,
                "client_secret",
                problems,
            );
            let token_url = match &a.token_url {
                Some(url) => http_url(url, raw.allow_http, "rest.auth.token_url", problems),
                None => {
                    problems.add(
                        "rest.auth.token_url",
                        "oauth2 needs the token endpoint's URL",
                    );
                    None
                }
            };
            let Some(client_id) = a.client_id.clone() else {
                problems.add("rest.auth.client_id", "oauth2 needs a client_id");
                return None;
            };
            Some(AuthPlan::OAuth2(OAuth2Plan {
                token_url: token_url?,
                client_id,
                client_secret: client_secret?,
                scopes: a.scopes.clone(),
            }))
        }
        other => {
            problems.add(
                "rest.auth.type",
                format!("`{other}` is not one of: none, bearer, api_key, basic, oauth2"),
            );
            None
        }
    }
}

fn sync_plan(
    raw: &RawSync,
    defaults: &RawSync,
    table: &str,
    problems: &mut Problems,
) -> Option<SyncPlan> {
    let pick = |own: &Option<String>, default: &Option<String>, fallback: &str| {
        own.clone()
            .or_else(|| default.clone())
            .unwrap_or_else(|| fallback.to_owned())
    };
    let mut duration = |key: &str, text: String| {
        let key = format!("{table}.{key}");
        match parse_duration(&text) {
            Ok(d) if d.is_negative() => {
                problems.add(&key, format!("`{text}` must not be negative"));
                None
            }
            other => problems.take(&key, other),
        }
    };
    let lookback = duration("lookback", pick(&raw.lookback, &defaults.lookback, "1h"));
    let settle = duration("settle", pick(&raw.settle, &defaults.settle, "30s"));
    let slice = duration(
        "backfill_slice",
        pick(&raw.backfill_slice, &defaults.backfill_slice, "1d"),
    );
    let repull = raw
        .activity_repull_days
        .or(defaults.activity_repull_days)
        .unwrap_or(3);
    if !(0..=366).contains(&repull) {
        problems.add(
            &format!("{table}.activity_repull_days"),
            format!("must be between 0 and 366, found {repull}"),
        );
    }
    if slice.is_some_and(|s| s.is_zero()) {
        problems.add(
            &format!("{table}.backfill_slice"),
            "must be longer than zero",
        );
    }
    let start = match raw.start.as_ref().or(defaults.start.as_ref()) {
        None => Some(None),
        Some(text) => problems
            .take(&format!("{table}.start"), parse_instant(text))
            .map(Some),
    };
    Some(SyncPlan {
        lookback: lookback?,
        settle: settle?,
        activity_repull_days: repull,
        backfill_slice: slice?,
        start: start?,
    })
}

pub(super) fn optional_duration(
    text: &Option<String>,
    default: &str,
    key: &str,
    problems: &mut Problems,
) -> Option<SignedDuration> {
    let text = text.as_deref().unwrap_or(default);
    match parse_duration(text) {
        Ok(d) if d.is_positive() => Some(d),
        Ok(_) => {
            problems.add(key, format!("`{text}` must be longer than zero"));
            None
        }
        Err(e) => {
            problems.add(key, e);
            None
        }
    }
}

/// A duration such as `90s`, `5m`, `1h 30m`, `2d` or ISO 8601 `PT1H`; a day is 24 hours.
pub fn parse_duration(text: &str) -> Result<SignedDuration, String> {
    let span: jiff::Span = text
        .parse()
        .map_err(|_| format!("`{text}` is not a duration such as 30s, 5m, 1h or 1d"))?;
    span.to_duration(jiff::SpanRelativeTo::days_are_24_hours())
        .map_err(|e| format!("`{text}` is not a fixed duration: {e}"))
}

/// A date (`2026-01-01`, midnight UTC) or an RFC 3339 instant; naive date-times are UTC.
pub fn parse_instant(text: &str) -> Result<Timestamp, String> {
    if let Ok(ts) = text.parse::<Timestamp>() {
        return Ok(ts);
    }
    let civil = text
        .parse::<jiff::civil::DateTime>()
        .or_else(|_| text.parse::<jiff::civil::Date>().map(|d| d.at(0, 0, 0, 0)))
        .map_err(|_| {
            format!("`{text}` is not a date (2026-01-31) or date-time (2026-01-31T06:00:00Z)")
        })?;
    civil
        .to_zoned(TimeZone::UTC)
        .map(|z| z.timestamp())
        .map_err(|e| format!("`{text}`: {e}"))
}

/// An IANA zone name (`Europe/Nicosia`) or a POSIX TZ rule (`EET-2EEST,M3.2.0/9,M11.1.0/9`).
pub fn parse_zone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name)
        .or_else(|_| TimeZone::posix(name))
        .map_err(|_| format!("`{name}` is neither an IANA time zone nor a POSIX TZ rule"))
}

fn is_broker_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(
            parse_duration("90s").unwrap(),
            SignedDuration::from_secs(90)
        );
        assert_eq!(
            parse_duration("1d").unwrap(),
            SignedDuration::from_hours(24)
        );
        assert_eq!(
            parse_duration("PT1H").unwrap(),
            SignedDuration::from_hours(1)
        );
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn instants_accept_dates_and_date_times() {
        assert_eq!(
            parse_instant("2026-01-31").unwrap().to_string(),
            "2026-01-31T00:00:00Z"
        );
        assert_eq!(
            parse_instant("2026-01-31T06:00:00+02:00")
                .unwrap()
                .to_string(),
            "2026-01-31T04:00:00Z"
        );
        assert!(parse_instant("31/01/2026").is_err());
    }

    #[test]
    fn zones_accept_iana_names_and_posix_rules() {
        assert!(parse_zone("Europe/Nicosia").is_ok());
        assert!(parse_zone("EET-2EEST,M3.2.0/9,M11.1.0/9").is_ok());
        assert!(parse_zone("Mars/Olympus").is_err());
    }
}
