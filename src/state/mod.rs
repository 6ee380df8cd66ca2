//! Durable state: checkpoints, run history, backfill progress, quarantine, held orphans and the
//! entity store, in one database so that a page's records and the checkpoint they complete
//! commit in one transaction.
//!
//! Two backends behind one `Store`: a SQLite file (`sqlite`, the default: one host) and
//! PostgreSQL (`postgres`: a fleet of daemons sharing the brokers, with leases and fencing).

pub mod lease;
mod pg_schema;
pub mod postgres;
pub(crate) mod schema;
mod sqlite;

use std::path::{Path, PathBuf};

use jiff::Timestamp;

pub use lease::Fence;
use postgres::PgStore;
use sqlite::SqliteStore;
pub use sqlite::StagingGuard;

use crate::config::Settings;
use crate::config::state::StatePlan;
use crate::model::Entity;
use crate::sink::{CommitStats, PageBatch, Stage};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("state database task failed: {0}")]
    Task(String),
    #[error("state database (PostgreSQL): {0}")]
    Pg(#[from] sqlx::Error),
    #[error("state database (PostgreSQL) {url}: {message}")]
    PgOpen { url: String, message: String },
    /// The commit's lease was taken over or expired: nothing of it was written.
    #[error(
        "lease of {0} lost (fencing epoch {1} is stale): the commit was refused, nothing was written"
    )]
    Fenced(String, i64),
    #[error(
        "{0} needs the sqlite state backend (not yet supported with state.backend = \"postgres\")"
    )]
    Unsupported(&'static str),
}

/// A (broker, entity)'s checkpoint and latest runs, for `status`.
#[derive(Debug, Clone)]
pub struct EntityStatus {
    pub broker: String,
    pub entity: Entity,
    pub cursor: Option<Timestamp>,
    pub last_success: Option<Timestamp>,
    pub last_error: Option<(Timestamp, String)>,
    pub stored: u64,
    pub quarantined: u64,
    pub held: u64,
}

/// One reconciliation of a (broker, entity), as `status` shows it.
#[derive(Debug, Clone)]
pub struct Reconciliation {
    pub broker: String,
    pub entity: Entity,
    pub finished_at: Timestamp,
    /// First and last day compared.
    pub range: (String, String),
    /// `equal`, `drift`, `repaired` or `failed`.
    pub outcome: String,
    pub missing: u64,
    pub different: u64,
    pub gone: u64,
    /// Records re-sent or deleted by the repair.
    pub repaired: u64,
    pub error: Option<String>,
}

/// One row of the quarantine.
#[derive(Debug, Clone)]
pub struct Quarantined {
    pub broker: String,
    pub entity: String,
    pub key: String,
    pub raw: String,
    pub reasons: Vec<String>,
    pub stage: Stage,
    pub times_seen: i64,
}

/// A backfill lane's progress.
#[derive(Debug, Clone, PartialEq)]
pub struct BackfillProgress {
    pub since: Timestamp,
    pub until: Timestamp,
    pub done_until: Timestamp,
    pub finished: bool,
}

/// Which quarantined records a command acts on (`None`: any).
#[derive(Debug, Clone, Default)]
pub struct QuarantineFilter {
    pub broker: Option<String>,
    pub entity: Option<Entity>,
    pub key: Option<String>,
}

/// What a merge of staged backfill records did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Merged {
    /// Rows upserted into the entity tables.
    pub stored: usize,
    /// Records held instead, their customer not being stored.
    pub held: u64,
}

impl std::ops::AddAssign for Merged {
    fn add_assign(&mut self, o: Self) {
        self.stored += o.stored;
        self.held += o.held;
    }
}

/// The state database, whichever backend holds it.
pub struct Store {
    backend: Backend,
}

enum Backend {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

/// Calls the same method on whichever backend this is.
macro_rules! on_backend {
    ($self:ident, $s:ident => $call:expr) => {
        match &$self.backend {
            Backend::Sqlite($s) => $call,
            Backend::Postgres($s) => $call,
        }
    };
}

impl Store {
    /// Opens (creating if needed) the SQLite state file at `path` and migrates it.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Ok(Store {
            backend: Backend::Sqlite(SqliteStore::open(path)?),
        })
    }

    /// Opens the state database `settings` name, creating and migrating its schema.
    pub fn open_settings(settings: &Settings) -> Result<Store, StoreError> {
        match &settings.state {
            StatePlan::Sqlite => Store::open(&settings.database_path()),
            StatePlan::Postgres(plan) => Ok(Store {
                backend: Backend::Postgres(PgStore::open(plan)?),
            }),
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// The PostgreSQL state, which also coordinates a fleet (leases, members).
    pub fn postgres(&self) -> Option<&PgStore> {
        match &self.backend {
            Backend::Postgres(pg) => Some(pg),
            Backend::Sqlite(_) => None,
        }
    }

    /// The SQLite state file (reconciliation attaches it to its scratch database).
    pub fn path(&self) -> Result<&Path, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => Ok(s.path()),
            Backend::Postgres(_) => Err(StoreError::Unsupported("reconcile")),
        }
    }

    /// Commits one page: records (or holds them), quarantine changes and the progress, all in
    /// one transaction — refused whole when the batch's lease (`batch.fence`) is no longer held.
    /// Idempotent: committing the same batch twice leaves the same state.
    pub fn commit_page(&self, batch: &PageBatch) -> Result<CommitStats, StoreError> {
        on_backend!(self, s => s.commit_page(batch))
    }

    /// Marks this process as staging backfill records until the guard drops (SQLite only):
    /// meanwhile, opening the store in another process leaves the staged records to this
    /// backfill's own merge.
    pub fn staging(&self) -> Option<StagingGuard> {
        match &self.backend {
            Backend::Sqlite(s) => Some(s.staging()),
            Backend::Postgres(_) => None,
        }
    }

    /// Merges staged backfill records into the entity tables, holding those whose customer is
    /// not stored (SQLite only; PostgreSQL upserts them as they come).
    pub fn merge_staged(&self) -> Result<Merged, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.merge_staged(),
            Backend::Postgres(_) => Ok(Merged::default()),
        }
    }

    /// The live cursor of (broker, entity), if a sync has completed.
    pub fn cursor(&self, broker: &str, entity: Entity) -> Result<Option<Timestamp>, StoreError> {
        on_backend!(self, s => s.cursor(broker, entity))
    }

    /// When the last live sync of (broker, entity) succeeded.
    pub fn last_success(
        &self,
        broker: &str,
        entity: Entity,
    ) -> Result<Option<Timestamp>, StoreError> {
        on_backend!(self, s => s.last_success(broker, entity))
    }

    /// Every live cursor.
    pub fn cursors(&self) -> Result<Vec<(String, Entity, Timestamp)>, StoreError> {
        on_backend!(self, s => s.cursors())
    }

    /// Records the start of a run and returns its id.
    pub fn start_run(
        &self,
        broker: &str,
        entity: Entity,
        kind: &str,
        window: (Timestamp, Timestamp),
    ) -> Result<i64, StoreError> {
        on_backend!(self, s => s.start_run(broker, entity, kind, window))
    }

    /// Records how a run ended.
    pub fn finish_run(
        &self,
        run: i64,
        outcome: &str,
        pages: u64,
        pulled: u64,
        stats: CommitStats,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        on_backend!(self, s => s.finish_run(run, outcome, pages, pulled, stats, error))
    }

    /// The backfill lane of (broker, entity) that starts at `since`, creating it ending at
    /// `until` when there is none. An unfinished lane resumes where it stopped.
    pub fn backfill(
        &self,
        broker: &str,
        entity: Entity,
        since: Timestamp,
        until: Timestamp,
    ) -> Result<BackfillProgress, StoreError> {
        on_backend!(self, s => s.backfill(broker, entity, since, until))
    }

    /// Starts a finished backfill lane over, for a backfill asked for again with a new end.
    pub fn restart_backfill(
        &self,
        broker: &str,
        entity: Entity,
        since: Timestamp,
        until: Timestamp,
    ) -> Result<(), StoreError> {
        on_backend!(self, s => s.restart_backfill(broker, entity, since, until))
    }

    /// Per (broker, entity) status, for every pair that has state or is configured.
    pub fn status(&self, configured: &[(String, Entity)]) -> Result<Vec<EntityStatus>, StoreError> {
        on_backend!(self, s => s.status(configured))
    }

    /// Deletes stored records of `entity` by natural key (refused whole, as a commit is, when
    /// `fence` no longer holds). Returns how many were there.
    pub fn delete_records(
        &self,
        broker: &str,
        entity: Entity,
        keys: &[String],
        fence: Option<&Fence>,
    ) -> Result<u64, StoreError> {
        match &self.backend {
            // One host: nothing else can hold the pair.
            Backend::Sqlite(s) => s.delete_records(broker, entity, keys),
            Backend::Postgres(s) => s.delete_records(broker, entity, keys, fence),
        }
    }

    /// Records of (broker, entity) in quarantine now.
    pub fn quarantine_count(&self, broker: &str, entity: Entity) -> Result<u64, StoreError> {
        on_backend!(self, s => s.quarantine_count(broker, entity))
    }

    /// Records a reconciliation's outcome.
    pub fn record_reconciliation(&self, r: &Reconciliation) -> Result<(), StoreError> {
        on_backend!(self, s => s.record_reconciliation(r))
    }

    /// The latest reconciliation of every (broker, entity) that had one.
    pub fn last_reconciliations(&self) -> Result<Vec<Reconciliation>, StoreError> {
        on_backend!(self, s => s.last_reconciliations())
    }

    /// The quarantined records that `filter` selects.
    pub fn quarantine(&self, filter: &QuarantineFilter) -> Result<Vec<Quarantined>, StoreError> {
        on_backend!(self, s => s.quarantine(filter))
    }

    /// Deletes the quarantined records that `filter` selects; returns how many.
    pub fn purge_quarantine(&self, filter: &QuarantineFilter) -> Result<usize, StoreError> {
        on_backend!(self, s => s.purge_quarantine(filter))
    }
}

/// Where a stored `stage` text came from.
fn parse_stage(stage: &str) -> Stage {
    if stage == "delivery" {
        Stage::Delivery
    } else {
        Stage::Validation
    }
}
