//! Configuration: the daemon's settings file and one TOML file per broker.
//!
//! `raw` mirrors the files; `plan` is the validated form the runtime uses. Loading reports every
//! problem with its file, its key and what is wrong (`t360-connector check`).

pub mod plan;
pub mod raw;
pub mod secret;
pub mod sql;
pub mod state;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use plan::Problems;
pub use plan::{AuthPlan, ConnectorPlan, RestPlan, Settings, SourcePlan, SyncPlan};
use raw::{RawConnector, RawSettings};
pub use sql::SqlPlan;

/// One problem in one configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// The dotted key (`rest.per_page`), or empty when the file as a whole is at fault.
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: &Path, key: &str, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_owned(),
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}: key `{}`: {}",
                self.file.display(),
                self.key,
                self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// Everything configured: the settings, the connectors that are valid, and the problems of
/// those that are not (a broken broker file does not stop the others).
#[derive(Debug)]
pub struct Loaded {
    pub settings: Settings,
    pub connectors: Vec<ConnectorPlan>,
    pub problems: Vec<ConfigError>,
}

impl Loaded {
    /// The connector of `broker`, or why it cannot be had.
    pub fn connector(&self, broker: &str) -> Result<&ConnectorPlan, String> {
        if let Some(c) = self.connectors.iter().find(|c| c.broker == broker) {
            return Ok(c);
        }
        let stem_matches = |p: &ConfigError| p.file.file_stem().is_some_and(|s| s == broker);
        match self.problems.iter().find(|p| stem_matches(p)) {
            Some(problem) => Err(format!("connector `{broker}` is invalid: {problem}")),
            None => Err(format!(
                "no connector `{broker}` in {}",
                self.settings.connectors_dir.display()
            )),
        }
    }
}

/// Environment variables override settings keys: `T360__STATE_DIR`, `T360__SYNC__LOOKBACK`.
pub const ENV_PREFIX: &str = "T360";

/// Loads the settings file (built-in defaults when `path` is `None`), applies environment
/// overrides, then loads every `*.toml` in the connectors folder.
pub fn load(path: Option<&Path>) -> Result<Loaded, ConfigError> {
    let settings = load_settings(path)?;
    let (connectors, problems) = load_connectors(&settings);
    Ok(Loaded {
        settings,
        connectors,
        problems,
    })
}

/// The daemon's settings alone; a problem here stops everything, so it is returned as an error.
pub fn load_settings(path: Option<&Path>) -> Result<Settings, ConfigError> {
    let shown = path.unwrap_or(Path::new("(built-in defaults)"));
    let mut builder = config::Config::builder();
    if let Some(path) = path {
        if !path.is_file() {
            return Err(ConfigError::new(path, "", "settings file not found"));
        }
        builder = builder.add_source(
            config::File::from(path)
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true),
    );
    let raw: RawSettings = builder
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| settings_error(shown, e))?;
    // Relative paths are relative to the settings file, so that a unit file's working
    // directory does not change which database the daemon opens.
    let base = path
        .and_then(Path::parent)
        .map(Path::to_owned)
        .unwrap_or_default();
    let mut problems = Problems {
        file: shown,
        found: Vec::new(),
    };
    let settings = Settings::build(raw, &base, &mut problems);
    match problems.found.into_iter().next() {
        Some(problem) => Err(problem),
        None => Ok(settings),
    }
}

fn settings_error(file: &Path, error: config::ConfigError) -> ConfigError {
    // config-rs puts the key in its message (`... for key `sync.lookback``); keep it whole.
    ConfigError::new(file, "", error.to_string())
}

/// Every connector file of the folder, in file-name order: the valid plans and the problems.
pub fn load_connectors(settings: &Settings) -> (Vec<ConnectorPlan>, Vec<ConfigError>) {
    let dir = &settings.connectors_dir;
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(e) => {
            let problem = ConfigError::new(dir, "", format!("cannot read connectors folder: {e}"));
            return (Vec::new(), vec![problem]);
        }
    };
    files.sort();
    let mut plans: Vec<ConnectorPlan> = Vec::new();
    let mut problems = Vec::new();
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    let postgres = matches!(settings.state, state::StatePlan::Postgres(_));
    for file in files {
        match load_connector(&file, settings) {
            Ok(plan) if plan.sink.is_some_and(|k| k.fits_state(postgres).is_err()) => {
                let problem = plan.sink.map(|k| k.fits_state(postgres));
                if let Some(Err(e)) = problem {
                    problems.push(ConfigError::new(&file, "sink", e));
                }
            }
            Ok(plan)
                if matches!(
                    plan.sink,
                    Some(plan::SinkKind::Track360 | plan::SinkKind::Both)
                ) && settings.sink.track360.is_none() =>
            {
                problems.push(ConfigError::new(
                    &file,
                    "sink",
                    "a track360 sink needs a [sink.track360] table in the settings file",
                ));
            }
            Ok(plan) => {
                if let Some(first) = seen.insert(plan.broker.clone(), file.clone()) {
                    problems.push(ConfigError::new(
                        &file,
                        "broker",
                        format!(
                            "`{}` is already the broker of {}",
                            plan.broker,
                            first.display()
                        ),
                    ));
                } else {
                    plans.push(plan);
                }
            }
            Err(mut found) => problems.append(&mut found),
        }
    }
    (plans, problems)
}

/// One connector file: its plan, or every problem in it.
pub fn load_connector(file: &Path, settings: &Settings) -> Result<ConnectorPlan, Vec<ConfigError>> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| vec![ConfigError::new(file, "", format!("cannot read: {e}"))])?;
    parse_connector(&text, file, settings)
}

/// A connector file's text, `file` naming it in messages: its plan, or every problem in it.
pub fn parse_connector(
    text: &str,
    file: &Path,
    settings: &Settings,
) -> Result<ConnectorPlan, Vec<ConfigError>> {
    let deserializer = toml::Deserializer::parse(text)
        .map_err(|e| vec![ConfigError::new(file, "", one_line(&e.to_string()))])?;
    let raw: RawConnector = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." { String::new() } else { key };
        vec![ConfigError::new(
            file,
            &key,
            one_line(&e.inner().to_string()),
        )]
    })?;
    let mut problems = Problems {
        file,
        found: Vec::new(),
    };
    let plan = plan::connector_plan(raw, &settings.sync, file, &mut problems);
    match plan {
        Some(mut plan) if problems.found.is_empty() => {
            plan.fingerprint = fingerprint(text);
            Ok(plan)
        }
        _ => Err(problems.found),
    }
}

fn fingerprint(text: &str) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// toml's messages draw the offending line with a caret over several lines; a log line or a
/// `check` report wants one line: the position and the message, without the drawing.
fn one_line(message: &str) -> String {
    let is_drawing = |l: &str| {
        let rest = l
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .trim_start();
        rest.starts_with('|')
    };
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !is_drawing(l))
        .collect::<Vec<_>>()
        .join(": ")
}
