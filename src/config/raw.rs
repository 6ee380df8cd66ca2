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
    #[serde(default)]
    pub sync: RawSync,
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
    /// `auto` (follow `next_cursor` when the broker sends one) or `page_number`.
    pub pagination: Option<String>,
    pub timeout: Option<String>,
    pub connect_timeout: Option<String>,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub params: RawParams,
    /// Per-entity path overrides, e.g. `customers = "/crm/v2/customers"`.
    #[serde(default)]
    pub paths: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// `none` or `bearer`.
    #[serde(rename = "type", default = "auth_none")]
    pub kind: String,
    /// Name of the environment variable holding the token.
    pub token_env: Option<String>,
    /// Path of a file holding the token (e.g. a systemd credential).
    pub token_file: Option<String>,
}

fn auth_none() -> String {
    "none".into()
}

impl Default for RawAuth {
    fn default() -> Self {
        RawAuth {
            kind: auth_none(),
            token_env: None,
            token_file: None,
        }
    }
}

/// Names of the query parameters the broker's API takes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawParams {
    pub page: String,
    pub per_page: String,
    pub modified_from: String,
    pub modified_to: String,
    pub cursor: String,
}

impl Default for RawParams {
    fn default() -> Self {
        RawParams {
            page: "page".into(),
            per_page: "per_page".into(),
            modified_from: "last_modified_from".into(),
            modified_to: "last_modified_to".into(),
            cursor: "cursor".into(),
        }
    }
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
