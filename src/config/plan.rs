//! Validated, compiled configuration: what the runtime reads. Built in one fallible step from
//! the raw files; nothing after this step re-parses a string or re-reads a file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use reqwest::Url;
use secrecy::SecretString;

use super::ConfigError;
use super::raw::{RawConnector, RawRest, RawSettings, RawSync};
use crate::model::Entity;

/// The largest page the guide's API serves.
pub const MAX_PER_PAGE: u32 = 500;

/// The daemon's settings, paths resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub state_dir: PathBuf,
    pub connectors_dir: PathBuf,
    pub sync: RawSync,
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
    pub sync: SyncPlan,
}

#[derive(Debug, Clone)]
pub enum SourcePlan {
    Rest(RestPlan),
}

/// A REST API in the shape of the guide's recommended endpoints.
#[derive(Debug, Clone)]
pub struct RestPlan {
    pub base_url: Url,
    pub per_page: u32,
    pub pagination: Pagination,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub auth: AuthPlan,
    pub params: QueryParams,
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

/// How the REST source pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pagination {
    /// Follow `meta.next_cursor` when the broker sends one, page numbers otherwise.
    Auto,
    /// Page numbers only, whatever `meta.next_cursor` says.
    PageNumber,
}

#[derive(Debug, Clone)]
pub struct QueryParams {
    pub page: String,
    pub per_page: String,
    pub modified_from: String,
    pub modified_to: String,
    pub cursor: String,
}

/// How requests authenticate. OAuth 2.0 client credentials plugs in here.
#[derive(Debug, Clone)]
pub enum AuthPlan {
    None,
    Bearer(SecretString),
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
        Settings {
            state_dir: base.join(&raw.state_dir),
            connectors_dir: base.join(&raw.connectors_dir),
            sync: raw.sync,
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
    if raw.kind != "rest" {
        problems.add(
            "kind",
            format!("`{}` is not a source kind this build knows: rest", raw.kind),
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
    let source = match &raw.rest {
        Some(rest) => rest_plan(rest, problems).map(SourcePlan::Rest),
        None => {
            problems.add("rest", "a `[rest]` table is required for kind = \"rest\"");
            None
        }
    };
    let sync = sync_plan(&raw.sync, defaults, "sync", problems);
    Some(ConnectorPlan {
        broker,
        file: file.to_owned(),
        enabled: raw.enabled,
        entities,
        zone: zone?,
        source: source?,
        sync: sync?,
    })
}

fn rest_plan(raw: &RawRest, problems: &mut Problems) -> Option<RestPlan> {
    let base_url = match Url::parse(&raw.base_url) {
        Ok(url) if url.scheme() == "https" => Some(url),
        Ok(url) if url.scheme() == "http" && raw.allow_http => Some(url),
        Ok(url) if url.scheme() == "http" => {
            problems.add(
                "rest.base_url",
                "plain http is refused; use https, or set rest.allow_http = true for loopback tests",
            );
            None
        }
        Ok(url) => {
            problems.add(
                "rest.base_url",
                format!("scheme `{}` is not http or https", url.scheme()),
            );
            None
        }
        Err(e) => {
            problems.add("rest.base_url", format!("not a URL: {e}"));
            None
        }
    };
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
    let pagination = match raw.pagination.as_deref() {
        None | Some("auto") => Some(Pagination::Auto),
        Some("page_number") => Some(Pagination::PageNumber),
        Some(other) => {
            problems.add(
                "rest.pagination",
                format!("`{other}` is not one of: auto, page_number"),
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
    let auth = auth_plan(raw, problems);
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
    let p = &raw.params;
    let params = QueryParams {
        page: p.page.clone(),
        per_page: p.per_page.clone(),
        modified_from: p.modified_from.clone(),
        modified_to: p.modified_to.clone(),
        cursor: p.cursor.clone(),
    };
    Some(RestPlan {
        base_url: base_url?,
        per_page: per_page?,
        pagination: pagination?,
        timeout: timeout?.unsigned_abs(),
        connect_timeout: connect_timeout?.unsigned_abs(),
        auth: auth?,
        params,
        paths,
    })
}

fn auth_plan(raw: &RawRest, problems: &mut Problems) -> Option<AuthPlan> {
    let auth = &raw.auth;
    match auth.kind.as_str() {
        "none" => Some(AuthPlan::None),
        "bearer" => {
            let token = super::secret::load(
                auth.token_env.as_deref(),
                auth.token_file.as_deref(),
                "rest.auth.token",
            );
            problems.take("rest.auth", token).map(AuthPlan::Bearer)
        }
        other => {
            problems.add(
                "rest.auth.type",
                format!("`{other}` is not one of: none, bearer"),
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

fn optional_duration(
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
