//! The `[state]` table: where checkpoints, run history, quarantine and leases live.

use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

use super::plan::{Problems, optional_duration};
use super::raw::RawState;
use super::secret;
use super::sql::{Engine, Tls, check_url};

#[derive(Debug, Clone)]
pub enum StatePlan {
    /// One SQLite file in `state_dir`: one host.
    Sqlite,
    /// Shared PostgreSQL: a fleet of daemons.
    Postgres(Box<PgStatePlan>),
}

#[derive(Debug, Clone)]
pub struct PgStatePlan {
    /// The URL as configured: it holds no password.
    pub url: String,
    pub password: Option<SecretString>,
    pub tls: Tls,
    pub ca_file: Option<PathBuf>,
    pub schema: String,
    pub max_connections: u32,
    pub lease_ttl: Duration,
    pub heartbeat: Duration,
}

pub(super) fn state_plan(raw: &RawState, problems: &mut Problems) -> Option<StatePlan> {
    match raw.backend.as_deref().unwrap_or("sqlite") {
        "sqlite" => {
            let stray = [
                ("url", raw.url.is_some()),
                ("password_env", raw.password_env.is_some()),
                ("password_file", raw.password_file.is_some()),
                ("tls", raw.tls.is_some()),
                ("ca_file", raw.ca_file.is_some()),
                ("schema", raw.schema.is_some()),
                ("max_connections", raw.max_connections.is_some()),
                ("lease_ttl", raw.lease_ttl.is_some()),
                ("heartbeat", raw.heartbeat.is_some()),
            ];
            for (key, _) in stray.iter().filter(|(_, set)| *set) {
                problems.add(
                    &format!("state.{key}"),
                    "only for backend = \"postgres\" (the sqlite state lives in state_dir)",
                );
            }
            Some(StatePlan::Sqlite)
        }
        "postgres" => postgres_plan(raw, problems).map(|p| StatePlan::Postgres(Box::new(p))),
        other => {
            problems.add(
                "state.backend",
                format!("`{other}` is not one of: sqlite, postgres"),
            );
            None
        }
    }
}

fn postgres_plan(raw: &RawState, problems: &mut Problems) -> Option<PgStatePlan> {
    let url = match &raw.url {
        Some(url) => problems.take("state.url", check_url(Engine::Postgres, url)),
        None => {
            problems.add("state.url", "backend = \"postgres\" needs a url");
            None
        }
    };
    let password = match (&raw.password_env, &raw.password_file) {
        (None, None) => Some(None),
        (env, file) => problems
            .take(
                "state.password",
                secret::load(env.as_deref(), file.as_deref(), "password"),
            )
            .map(Some),
    };
    let tls = problems.take(
        "state.tls",
        Tls::parse(raw.tls.as_deref().unwrap_or("verify-full")),
    );
    let schema = raw.schema.clone().unwrap_or_else(|| "t360".into());
    let schema_ok = !schema.is_empty()
        && schema.len() <= 63
        && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !schema_ok {
        problems.add(
            "state.schema",
            format!(
                "`{schema}` is not a schema name (lower-case letters, digits and _, at most 63)"
            ),
        );
    }
    let max_connections = match raw.max_connections {
        None => Some(8),
        Some(n) if (2..=64).contains(&n) => Some(n as u32),
        Some(n) => {
            problems.add(
                "state.max_connections",
                format!("must be between 2 and 64, found {n}"),
            );
            None
        }
    };
    let ttl = optional_duration(&raw.lease_ttl, "30s", "state.lease_ttl", problems)
        .map(|d| d.unsigned_abs());
    let heartbeat = match (&raw.heartbeat, ttl) {
        (None, Some(ttl)) => Some(ttl / 3),
        (text, _) => {
            optional_duration(text, "10s", "state.heartbeat", problems).map(|d| d.unsigned_abs())
        }
    };
    if let (Some(ttl), Some(beat)) = (ttl, heartbeat)
        && (ttl < Duration::from_secs(2) || beat * 2 > ttl)
    {
        problems.add(
            "state.lease_ttl",
            format!(
                "lease_ttl ({}s) must be at least 2s and at least twice the heartbeat ({}s): \
                 a lease must survive one late renewal",
                ttl.as_secs_f64(),
                beat.as_secs_f64()
            ),
        );
        return None;
    }
    Some(PgStatePlan {
        url: url?,
        password: password?,
        tls: tls?,
        ca_file: raw.ca_file.as_ref().map(PathBuf::from),
        schema: if schema_ok { schema } else { return None },
        max_connections: max_connections?,
        lease_ttl: ttl?,
        heartbeat: heartbeat?,
    })
}
