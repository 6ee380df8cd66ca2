//! Serde mirrors of the configuration files, as close to the TOML as possible.
//! Nothing here is checked beyond its type; `plan` turns these into what runs.

use std::collections::BTreeMap;

use serde::Deserialize;

/// The daemon's own settings file (`config.example.toml` documents every key).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    #[serde(default = "default_state_dir")]
    pub state_dir: String,
    #[serde(default = "default_connectors_dir")]
    pub connectors_dir: String,
    /// Defaults for every connector's `[sync]` table.
    #[serde(default)]
    pub sync: RawSync,
    #[serde(default)]
    pub daemon: RawDaemon,
    #[serde(default)]
    pub sink: RawSink,
    #[serde(default)]
    pub state: RawState,
}

/// Where checkpoints, run history, quarantine and leases live: `sqlite` (a file in
/// `state_dir`, one host) or `postgres` (shared by every daemon of a fleet).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub backend: Option<String>,
    /// `postgres://user@host:5432/db`, never with a password in it.
    pub url: Option<String>,
    pub password_env: Option<String>,
    pub password_file: Option<String>,
    /// `disable`, `prefer`, `require`, `verify-ca` or `verify-full` (the default).
    pub tls: Option<String>,
    pub ca_file: Option<String>,
    /// The schema holding every table (created when missing).
    pub schema: Option<String>,
    pub max_connections: Option<i64>,
    /// How long a lease outlives its holder's last renewal.
    pub lease_ttl: Option<String>,
    /// How often a daemon renews its leases and heartbeat (default: a third of the TTL).
    pub heartbeat: Option<String>,
}

/// Where records go: `sqlite` (the embedded store), `track360` (the ingestion API) or `both`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSink {
    pub kind: Option<String>,
    pub track360: Option<RawTrack360>,
}

/// Track360's ingestion API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrack360 {
    pub base_url: String,
    #[serde(default)]
    pub allow_http: bool,
    pub token_url: String,
    pub client_id: String,
    pub client_secret_env: Option<String>,
    pub client_secret_file: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Records per request, at most 1000.
    pub batch_size: Option<i64>,
    pub rate_limit: Option<toml::Value>,
    pub max_retry_time: Option<String>,
    pub timeout: Option<String>,
    /// The request body: `data` (`{"data": [...]}`, the default) or `array` (`[...]`).
    pub body: Option<String>,
}

/// `t360-connector run`'s settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDaemon {
    /// Address of `/healthz` and `/metrics` (`"off"`: none).
    pub listen: Option<String>,
    pub max_concurrent_syncs: Option<i64>,
    /// How long in-flight syncs get to finish their page after SIGTERM.
    pub shutdown_grace: Option<String>,
}

/// When each entity syncs: cron expressions (5 fields, or 6 with seconds) in a zone.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSchedule {
    pub timezone: Option<String>,
    pub customers: Option<String>,
    pub transactions: Option<String>,
    pub trading_activity: Option<String>,
}

/// When `run` compares the store with the broker, and what it does about drift.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReconcile {
    /// A cron expression in `schedule.timezone`; no scheduled reconciliation when absent.
    pub schedule: Option<String>,
    /// The last this many days (UTC, today included) are compared.
    pub days: Option<i64>,
    /// Default: transactions and trading_activity (what commissions are computed from).
    pub entities: Option<Vec<String>>,
    /// Send the drift through the pipeline (and delete what the broker no longer has).
    #[serde(default)]
    pub auto_repair: bool,
}

fn default_state_dir() -> String {
    "state".into()
}

fn default_connectors_dir() -> String {
    "connectors".into()
}

/// One broker's connector file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConnector {
    /// The broker's id in the store and logs; the file name without `.toml` when absent.
    pub broker: Option<String>,
    pub kind: String,
    pub preset: Option<String>,
    /// `false` keeps the file but leaves the broker alone.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// IANA zone name or POSIX TZ rule in which the broker's naive timestamps are read.
    pub timezone: Option<String>,
    /// Which entities to pull; all three when absent.
    pub entities: Option<Vec<String>>,
    pub rest: Option<RawRest>,
    /// kind = "postgres" | "mysql" | "sqlite": the database and each entity's table or query.
    pub sql: Option<super::sql::RawSql>,
    /// Per entity: Track360 field → source field rule.
    #[serde(default)]
    pub mapping: BTreeMap<String, BTreeMap<String, RawField>>,
    #[serde(default)]
    pub pii: RawPii,
    #[serde(default)]
    pub sync: RawSync,
    #[serde(default)]
    pub schedule: RawSchedule,
    /// Scheduled reconciliation of the store with the broker.
    #[serde(default)]
    pub reconcile: RawReconcile,
    /// Overrides the daemon's `sink.kind` for this broker.
    pub sink: Option<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRest {
    pub base_url: String,
    /// Plain `http://` is refused unless this is true (loopback and tests only).
    #[serde(default)]
    pub allow_http: bool,
    pub per_page: Option<i64>,
    pub timeout: Option<String>,
    pub connect_timeout: Option<String>,
    /// Requests per minute (an integer), or `"N/s"`, `"N/min"`, `"N/h"`.
    pub rate_limit: Option<toml::Value>,
    /// How long one request may keep being retried before the run fails.
    pub max_retry_time: Option<String>,
    /// The largest page body accepted, in MiB (after decompression).
    pub max_page_mib: Option<i64>,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub paging: RawPaging,
    #[serde(default)]
    pub params: RawParams,
    /// Per-entity path overrides, e.g. `customers = "/crm/v2/customers"`.
    #[serde(default)]
    pub paths: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// `none`, `bearer`, `api_key`, `basic` or `oauth2`.
    #[serde(rename = "type", default = "auth_none")]
    pub kind: String,
    /// bearer: the token, from an environment variable or a file.
    pub token_env: Option<String>,
    pub token_file: Option<String>,
    /// api_key: sent in this header, or in this query parameter.
    pub header: Option<String>,
    pub query: Option<String>,
    pub key_env: Option<String>,
    pub key_file: Option<String>,
    /// basic: the user name (not a secret) and the password.
    pub username: Option<String>,
    pub password_env: Option<String>,
    pub password_file: Option<String>,
    /// oauth2 client credentials.
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    pub client_secret_env: Option<String>,
    pub client_secret_file: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
}

fn auth_none() -> String {
    "none".into()
}

impl Default for RawAuth {
    fn default() -> Self {
        toml::from_str("").expect("every auth key has a default")
    }
}

/// Where the page's parts are, and how to get the next page.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPaging {
    /// `auto`, `page`, `cursor`, `offset` or `link`.
    pub style: Option<String>,
    /// JSON pointer to the record array (`""`: the body is the array).
    pub records: Option<String>,
    pub total: Option<String>,
    pub next_cursor: Option<String>,
    pub has_more: Option<String>,
    pub page_size: Option<String>,
    /// offset style: records re-read from the previous page to detect records that moved.
    pub overlap: Option<i64>,
    /// Whether a 200 with `error`/`errors` set, `success: false` or `status: "error"` fails
    /// the run (default true); false for a broker that lists warnings there beside its records.
    pub error_envelope: Option<bool>,
    /// Whether a body with no record array and no paging fields is an empty page (default
    /// false: it fails the run); true for a broker that leaves the array out when empty.
    pub missing_is_empty: Option<bool>,
}

/// Names of the query parameters the broker's API takes, and its time format.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawParams {
    pub page: String,
    pub per_page: String,
    pub offset: String,
    pub limit: String,
    pub modified_from: String,
    pub modified_to: String,
    pub cursor: String,
    /// `rfc3339`, `epoch_s`, `epoch_ms`, or a strftime format read in the connector's zone.
    pub time_format: String,
}

impl Default for RawParams {
    fn default() -> Self {
        RawParams {
            page: "page".into(),
            per_page: "per_page".into(),
            offset: "offset".into(),
            limit: "limit".into(),
            modified_from: "last_modified_from".into(),
            modified_to: "last_modified_to".into(),
            cursor: "cursor".into(),
            time_format: "rfc3339".into(),
        }
    }
}

/// One Track360 field's source: a bare string is a path; a table says more.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum RawField {
    Path(String),
    Rule(RawFieldRule),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFieldRule {
    /// JSON pointer (`/a/b`) or dotted path (`a.b`) into the source record.
    pub path: Option<String>,
    /// A constant instead of a path.
    #[serde(rename = "const")]
    pub constant: Option<toml::Value>,
    /// Used when the path is absent or null.
    pub default: Option<toml::Value>,
    /// Timestamps: `rfc3339`, `epoch_s`, `epoch_ms`, or a strftime format; naive ones in the
    /// connector's zone.
    pub time: Option<String>,
    /// Decimals: multiply by this (e.g. "0.0001": MT5 volume units to lots).
    pub scale: Option<String>,
    /// Codes: source value → Track360 value.
    #[serde(rename = "enum")]
    pub map: Option<BTreeMap<String, String>>,
}

/// Per-connector policy for personal data: `keep`, `drop` or `hash` each field.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPii {
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<String>,
    /// Secret mixed into hashes, so that they cannot be reversed by hashing known addresses.
    pub hash_key_env: Option<String>,
    pub hash_key_file: Option<String>,
}

/// The sync window and backfill settings; every key falls back to the daemon's `[sync]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSync {
    pub lookback: Option<String>,
    pub settle: Option<String>,
    pub activity_repull_days: Option<i64>,
    pub backfill_slice: Option<String>,
    /// Lower bound of the very first sync of an entity (date or RFC 3339); all history if absent.
    pub start: Option<String>,
}
