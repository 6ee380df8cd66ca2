//! Durable state in one SQLite file: checkpoints, run history, backfill progress, quarantine,
//! held orphans, and the embedded entity store.
//!
//! One file, so that a page's records and the checkpoint they complete commit in one
//! transaction (SQLite's WAL gives atomicity only within one database file). WAL mode with
//! `synchronous = NORMAL`: a `kill -9` loses at most the transaction in flight, never a
//! committed one, and never leaves records without their checkpoint or the reverse.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use jiff::Timestamp;
use rusqlite::{Connection, OptionalExtension, Transaction, params};
use tracing::{debug, warn};

use super::{
    BackfillProgress, EntityStatus, Merged, QuarantineFilter, Quarantined, Reconciliation,
    StoreError, schema,
};
use crate::model::{Entity, Record};
use crate::sink::{CommitStats, PageBatch, Progress, sqlite};
use crate::validate;

/// The state database. One connection behind a mutex: SQLite has one writer anyway, and a
/// `Connection` is `Send` but not `Sync`.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and migrates it.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let open = || -> rusqlite::Result<Connection> {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| rusqlite::Error::InvalidPath(dir.join(e.to_string())))?;
            }
            let mut conn = Connection::open(path)?;
            // Another process (a backfill beside the daemon) may hold the write lock briefly.
            conn.busy_timeout(Duration::from_secs(30))?;
            // Only a new, empty database takes it (an existing one keeps its page size).
            conn.pragma_update(None, "page_size", PAGE_SIZE)?;
            let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(rusqlite::Error::InvalidParameterName(format!(
                    "journal_mode is {mode}, WAL is required"
                )));
            }
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            // Lookups of parents and the upserts of live syncs land on random pages of the
            // keyed tables: a larger cache saves a read system call for each of them.
            conn.pragma_update(None, "cache_size", -CACHE_KIB)?;
            schema::migrate(&mut conn)?;
            Ok(conn)
        };
        let conn = open().map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        let store = SqliteStore {
            conn: Mutex::new(conn),
            path: path.to_owned(),
        };
        // Records left staged by a backfill that was stopped or killed are merged now, unless
        // a backfill is running (it holds the staging lock shared, and merges everything
        // staged when it ends): a merge from here would hold the write lock for as long as it
        // takes (minutes at millions of rows), and that backfill's next commit would give up
        // after the busy timeout.
        match store.staging_lock().map(|lock| (lock.try_lock(), lock)) {
            Ok((Ok(()), _lock)) => {
                store.merge_staged()?;
            }
            Ok((Err(TryLockError::WouldBlock), _)) => {
                debug!(path = %path.display(), "A backfill is staging records; it merges them itself.");
            }
            // No lock to be had (a file system without `flock`, say): the store still opens,
            // and the staged records wait for a backfill's own merge.
            Ok((Err(TryLockError::Error(e)), _)) | Err(e) => {
                warn!(path = %staging_lock_path(path).display(), error = %e,
                      "Cannot take the staging lock; staged records are not merged now.");
            }
        }
        Ok(store)
    }

    /// Holds the staging lock shared until the guard drops (`Store::staging`). Without a lock
    /// to be had the backfill still runs (a `status` meanwhile may then merge under its feet,
    /// as before the lock existed).
    pub fn staging(&self) -> StagingGuard {
        match self
            .staging_lock()
            .and_then(|file| file.lock_shared().map(|()| file))
        {
            Ok(file) => StagingGuard(Some(file)),
            Err(e) => {
                warn!(path = %staging_lock_path(&self.path).display(), error = %e,
                      "Cannot take the staging lock.");
                StagingGuard(None)
            }
        }
    }

    /// The lock file, created if missing. Opened read-only when it exists: `flock` needs no
    /// write access, and a file created by another user (root running `status`) must not keep
    /// the daemon's user out.
    fn staging_lock(&self) -> std::io::Result<File> {
        let path = staging_lock_path(&self.path);
        match File::open(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path),
            opened => opened,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        // A panic while holding the lock leaves SQLite itself consistent (the transaction
        // rolls back on drop), so a poisoned lock is safe to take over.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        Ok(f(&mut conn)?)
    }

    /// Commits one page: records (or holds them), quarantine changes and `progress`, all in one
    /// transaction. Idempotent: committing the same batch twice leaves the same state.
    pub fn commit_page(&self, batch: &PageBatch) -> Result<CommitStats, StoreError> {
        self.with(|conn| {
            // One host: nothing else can hold a (broker, entity), so there is no fence to check.
            let tx = conn.transaction()?;
            let now = Timestamp::now().to_string();
            let mut stats = CommitStats::default();
            for reject in &batch.rejects {
                quarantine(&tx, &batch.broker, batch.entity, reject, &now)?;
                stats.quarantined += 1;
            }
            // Quarantine and held rows are rare: when there are none, the per-record deletes
            // and lookups that would find nothing are skipped (three B-tree probes a record).
            let (broker, entity) = (batch.broker.as_str(), batch.entity.as_str());
            let any_quarantined = any_row(&tx, ANY_QUARANTINED, params![broker, entity])?;
            let mut any_held = any_row(&tx, ANY_HELD, params![broker, entity])?;
            let any_held_for_customers = batch.entity == Entity::Customers
                && any_row(&tx, ANY_HELD_OF_BROKER, params![broker])?;
            // Whether each parent customer of the page is stored, asked once for the page.
            // (A page's customers only change in a customers batch, which has no parents.)
            // A backfill's staged records are checked for their customer when merged, all at
            // once in key order (`hold_staged_orphans`): asked here, page by page, each lookup
            // read a random page of the customers' index, which outgrows the page cache. Not
            // when records of this broker and entity are held, though: a staged record
            // replaces a held version of itself (`unhold` below) only if it is stored, and an
            // older one waiting for the same customer must meet the newer in `hold()` instead.
            let stage = batch.stage_records && batch.hold_orphans;
            let check_parents = batch.keep_records && batch.hold_orphans && (!stage || any_held);
            let known: HashMap<&str, bool> = if check_parents {
                let mut parents: Vec<&str> = batch
                    .records
                    .iter()
                    .filter_map(|v| v.record.parent_customer())
                    .collect();
                // In key order, the index lookups walk the index once, front to back.
                parents.sort_unstable();
                parents.dedup();
                let found = sqlite::customers_found(&tx, &batch.broker, &parents)?;
                parents.into_iter().zip(found).collect()
            } else {
                HashMap::new()
            };
            sqlite::Writer::run(&tx, batch.entity, stage, |writer| {
                for valid in &batch.records {
                    if any_quarantined {
                        let key = valid.record.key();
                        stats.unquarantined +=
                            unquarantine(&tx, &batch.broker, batch.entity, &key)?;
                    }
                    if !batch.keep_records {
                        // Delivered elsewhere (the ingestion API acknowledged it).
                        stats.stored += 1;
                        continue;
                    }
                    let orphan = match valid.record.parent_customer() {
                        Some(customer) if check_parents => known.get(customer) != Some(&true),
                        _ => false,
                    };
                    if orphan {
                        hold(&tx, &batch.broker, &valid.record, &now)?;
                        any_held = true;
                        stats.held += 1;
                        continue;
                    }
                    writer.write(&batch.broker, &valid.record)?;
                    if any_held {
                        unhold(&tx, &batch.broker, batch.entity, &valid.record.key())?;
                    }
                    stats.stored += 1;
                    if let (Record::Customer(c), true) = (&valid.record, any_held_for_customers) {
                        release_held(&tx, &batch.broker, &c.customer_id, &mut stats.released)?;
                    }
                }
                Ok(())
            })?;
            save_progress(&tx, batch, &now)?;
            // A very long backfill merges as it goes, so that the staging table (and the
            // sort a merge needs) stays bounded.
            if stage && sqlite::staged(&tx, batch.entity)? >= MERGE_AT {
                merge_entity(&tx, batch.entity, &now)?;
            }
            tx.commit()?;
            Ok(stats)
        })
    }

    /// Merges every staged record into the entity tables (`sink::sqlite::merge`), one
    /// transaction per entity, and stores the held records whose customer was among them.
    /// Idempotent; called at the end of a backfill and when the store is opened (a backfill
    /// that was stopped or killed leaves its committed records staged).
    pub fn merge_staged(&self) -> Result<Merged, StoreError> {
        self.with(|conn| {
            let mut merged = Merged::default();
            let now = Timestamp::now().to_string();
            for entity in Entity::ALL {
                let tx = conn.transaction()?;
                if sqlite::staged(&tx, entity)? > 0 {
                    merged += merge_entity(&tx, entity, &now)?;
                }
                tx.commit()?;
            }
            Ok(merged)
        })
    }

    /// The live cursor of (broker, entity), if a sync has completed.
    pub fn cursor(&self, broker: &str, entity: Entity) -> Result<Option<Timestamp>, StoreError> {
        self.with(|conn| {
            let text: Option<String> = conn
                .query_row(
                    "SELECT cursor FROM checkpoints WHERE broker = ?1 AND entity = ?2",
                    params![broker, entity.as_str()],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(text.and_then(|t| t.parse().ok()))
        })
    }

    /// When the last live sync of (broker, entity) succeeded.
    pub fn last_success(
        &self,
        broker: &str,
        entity: Entity,
    ) -> Result<Option<Timestamp>, StoreError> {
        self.with(|conn| {
            let text: Option<String> = conn.query_row(
                "SELECT max(finished_at) FROM runs
                 WHERE broker = ?1 AND entity = ?2 AND kind = 'sync' AND outcome = 'success'",
                params![broker, entity.as_str()],
                |r| r.get(0),
            )?;
            Ok(text.and_then(|t| t.parse().ok()))
        })
    }

    /// Every live cursor.
    pub fn cursors(&self) -> Result<Vec<(String, Entity, Timestamp)>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn.prepare_cached("SELECT broker, entity, cursor FROM checkpoints")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            let mut cursors = Vec::new();
            for row in rows {
                let (broker, entity, cursor) = row?;
                if let (Ok(entity), Ok(cursor)) = (entity.parse(), cursor.parse()) {
                    cursors.push((broker, entity, cursor));
                }
            }
            Ok(cursors)
        })
    }

    /// Records the start of a run and returns its id.
    pub fn start_run(
        &self,
        broker: &str,
        entity: Entity,
        kind: &str,
        window: (Timestamp, Timestamp),
    ) -> Result<i64, StoreError> {
        self.with(|conn| {
            conn.execute(
                "INSERT INTO runs (broker, entity, kind, started_at, outcome, window_from, window_to)
                 VALUES (?1, ?2, ?3, ?4, 'running', ?5, ?6)",
                params![
                    broker,
                    entity.as_str(),
                    kind,
                    Timestamp::now().to_string(),
                    window.0.to_string(),
                    window.1.to_string()
                ],
            )?;
            Ok(conn.last_insert_rowid())
        })
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
        self.with(|conn| {
            conn.execute(
                "UPDATE runs SET finished_at = ?2, outcome = ?3, pages = ?4, pulled = ?5,
                    stored = ?6, quarantined = ?7, held = ?8, error = ?9 WHERE id = ?1",
                params![
                    run,
                    Timestamp::now().to_string(),
                    outcome,
                    pages as i64,
                    pulled as i64,
                    stats.stored as i64,
                    stats.quarantined as i64,
                    stats.held as i64,
                    error
                ],
            )?;
            Ok(())
        })
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
        self.with(|conn| {
            conn.execute(
                "INSERT INTO backfills (broker, entity, since, until, done_until, started_at)
                 VALUES (?1, ?2, ?3, ?4, ?3, ?5)
                 ON CONFLICT (broker, entity, since) DO NOTHING",
                params![
                    broker,
                    entity.as_str(),
                    since.to_string(),
                    until.to_string(),
                    Timestamp::now().to_string()
                ],
            )?;
            let (until, done, finished): (String, String, Option<String>) = conn.query_row(
                "SELECT until, done_until, finished_at FROM backfills
                 WHERE broker = ?1 AND entity = ?2 AND since = ?3",
                params![broker, entity.as_str(), since.to_string()],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            Ok(BackfillProgress {
                since,
                until: until.parse().unwrap_or(since),
                done_until: done.parse().unwrap_or(since),
                finished: finished.is_some(),
            })
        })
    }

    /// Starts a finished backfill lane over, for a backfill asked for again with a new end.
    pub fn restart_backfill(
        &self,
        broker: &str,
        entity: Entity,
        since: Timestamp,
        until: Timestamp,
    ) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.execute(
                "UPDATE backfills SET until = ?4, done_until = since, finished_at = NULL,
                    started_at = ?5 WHERE broker = ?1 AND entity = ?2 AND since = ?3",
                params![
                    broker,
                    entity.as_str(),
                    since.to_string(),
                    until.to_string(),
                    Timestamp::now().to_string()
                ],
            )?;
            Ok(())
        })
    }

    /// Per (broker, entity) status, for every pair that has state or is configured.
    pub fn status(&self, configured: &[(String, Entity)]) -> Result<Vec<EntityStatus>, StoreError> {
        let mut pairs: Vec<(String, Entity)> = configured.to_vec();
        self.with(|conn| {
            let mut stmt = conn.prepare(
                "SELECT broker, entity FROM checkpoints UNION SELECT broker, entity FROM runs",
            )?;
            let known =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            for row in known {
                let (broker, entity) = row?;
                if let Ok(entity) = entity.parse::<Entity>() {
                    pairs.push((broker, entity));
                }
            }
            Ok(())
        })?;
        pairs.sort();
        pairs.dedup();
        pairs
            .into_iter()
            .map(|(broker, entity)| self.entity_status(broker, entity))
            .collect()
    }

    fn entity_status(&self, broker: String, entity: Entity) -> Result<EntityStatus, StoreError> {
        let cursor = self.cursor(&broker, entity)?;
        self.with(|conn| {
            let b = broker.as_str();
            let e = entity.as_str();
            let ts = |t: Option<String>| t.and_then(|t| t.parse::<Timestamp>().ok());
            let last_success: Option<String> = conn.query_row(
                "SELECT max(finished_at) FROM runs WHERE broker = ?1 AND entity = ?2 AND outcome = 'success'",
                params![b, e],
                |r| r.get(0),
            )?;
            let last_error: Option<(String, String)> = conn
                .query_row(
                    "SELECT finished_at, error FROM runs
                     WHERE broker = ?1 AND entity = ?2 AND outcome = 'failed'
                       AND id > coalesce((SELECT max(id) FROM runs
                           WHERE broker = ?1 AND entity = ?2 AND outcome = 'success'), 0)
                     ORDER BY id DESC LIMIT 1",
                    params![b, e],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let count = |sql: &str| -> rusqlite::Result<u64> {
                conn.query_row(sql, params![b, e], |r| r.get::<_, i64>(0))
                    .map(|n| n as u64)
            };
            let stored = count(&format!(
                "SELECT count(*) FROM {} WHERE broker = ?1 AND ?2 = ?2",
                e
            ))?;
            Ok(EntityStatus {
                cursor,
                last_success: ts(last_success),
                last_error: last_error.and_then(|(at, err)| Some((at.parse().ok()?, err))),
                stored,
                quarantined: count("SELECT count(*) FROM quarantine WHERE broker = ?1 AND entity = ?2")?,
                held: count("SELECT count(*) FROM held WHERE broker = ?1 AND entity = ?2")?,
                broker,
                entity,
            })
        })
    }

    /// Deletes stored records of `entity` by natural key (reconciliation found them gone from
    /// the broker). Returns how many were there.
    pub fn delete_records(
        &self,
        broker: &str,
        entity: Entity,
        keys: &[String],
    ) -> Result<u64, StoreError> {
        let condition: Vec<String> = entity
            .key_fields()
            .iter()
            .map(|f| format!("{f} = ?"))
            .collect();
        let sql = format!(
            "DELETE FROM {} WHERE broker = ? AND {}",
            entity.as_str(),
            condition.join(" AND ")
        );
        self.with(|conn| {
            let tx = conn.transaction()?;
            let mut deleted = 0;
            {
                let mut stmt = tx.prepare(&sql)?;
                for key in keys {
                    let parts: Vec<&str> = key.splitn(entity.key_fields().len(), '|').collect();
                    let mut values: Vec<&str> = vec![broker];
                    values.extend(parts);
                    deleted += stmt.execute(rusqlite::params_from_iter(values))? as u64;
                }
            }
            tx.commit()?;
            Ok(deleted)
        })
    }

    /// Records of (broker, entity) in quarantine now.
    pub fn quarantine_count(&self, broker: &str, entity: Entity) -> Result<u64, StoreError> {
        self.with(|conn| {
            conn.query_row(
                "SELECT count(*) FROM quarantine WHERE broker = ?1 AND entity = ?2",
                params![broker, entity.as_str()],
                |r| r.get::<_, i64>(0),
            )
            .map(|n| n as u64)
        })
    }

    /// Records a reconciliation's outcome.
    pub fn record_reconciliation(&self, r: &Reconciliation) -> Result<(), StoreError> {
        self.with(|conn| {
            conn.execute(
                "INSERT INTO reconciliations (broker, entity, finished_at, range_from, range_to,
                     outcome, missing, different, gone, repaired, error)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    r.broker,
                    r.entity.as_str(),
                    r.finished_at.to_string(),
                    r.range.0,
                    r.range.1,
                    r.outcome,
                    r.missing as i64,
                    r.different as i64,
                    r.gone as i64,
                    r.repaired as i64,
                    r.error,
                ],
            )?;
            Ok(())
        })
    }

    /// The latest reconciliation of every (broker, entity) that had one.
    pub fn last_reconciliations(&self) -> Result<Vec<Reconciliation>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn.prepare(
                "SELECT broker, entity, finished_at, range_from, range_to, outcome, missing,
                        different, gone, repaired, error
                 FROM reconciliations WHERE id IN
                     (SELECT max(id) FROM reconciliations GROUP BY broker, entity)
                 ORDER BY broker, entity",
            )?;
            let rows = stmt.query_map([], |r| {
                let entity: String = r.get(1)?;
                let finished: String = r.get(2)?;
                Ok(Reconciliation {
                    broker: r.get(0)?,
                    entity: entity.parse().unwrap_or(Entity::Customers),
                    finished_at: finished.parse().unwrap_or(Timestamp::UNIX_EPOCH),
                    range: (r.get(3)?, r.get(4)?),
                    outcome: r.get(5)?,
                    missing: r.get::<_, i64>(6)? as u64,
                    different: r.get::<_, i64>(7)? as u64,
                    gone: r.get::<_, i64>(8)? as u64,
                    repaired: r.get::<_, i64>(9)? as u64,
                    error: r.get(10)?,
                })
            })?;
            rows.collect()
        })
    }

    /// The quarantined records that `filter` selects.
    pub fn quarantine(&self, filter: &QuarantineFilter) -> Result<Vec<Quarantined>, StoreError> {
        self.with(|conn| {
            let mut stmt = conn.prepare(
                "SELECT broker, entity, record_key, raw, reasons, stage, times_seen FROM quarantine
                 WHERE (?1 IS NULL OR broker = ?1) AND (?2 IS NULL OR entity = ?2)
                   AND (?3 IS NULL OR record_key = ?3)
                 ORDER BY broker, entity, record_key",
            )?;
            let rows = stmt.query_map(sqlite_filter(filter), |r| {
                let reasons: String = r.get(4)?;
                let stage: String = r.get(5)?;
                Ok(Quarantined {
                    broker: r.get(0)?,
                    entity: r.get(1)?,
                    key: r.get(2)?,
                    raw: r.get(3)?,
                    reasons: serde_json::from_str(&reasons).unwrap_or_else(|_| vec![reasons]),
                    stage: super::parse_stage(&stage),
                    times_seen: r.get(6)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Deletes the quarantined records that `filter` selects; returns how many.
    pub fn purge_quarantine(&self, filter: &QuarantineFilter) -> Result<usize, StoreError> {
        self.with(|conn| {
            conn.execute(
                "DELETE FROM quarantine
                 WHERE (?1 IS NULL OR broker = ?1) AND (?2 IS NULL OR entity = ?2)
                   AND (?3 IS NULL OR record_key = ?3)",
                sqlite_filter(filter),
            )
        })
    }
}

/// Held (shared) by a process staging backfill records; the lock is released when it drops,
/// or when the process dies, `kill -9` included.
#[derive(Debug)]
pub struct StagingGuard(#[allow(dead_code)] Option<File>);

/// Beside the database: `t360-connector.db-staging.lock`.
fn staging_lock_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-staging.lock");
    PathBuf::from(name)
}

/// Bytes a page of a new state database. SQLite moves a page a system call (WAL appends,
/// checkpoints, a merge's sort runs): with the default 4 KiB a 1M-record backfill made 260k
/// `pwrite`s and 170k `pread`s, a sixth of its CPU in the kernel. Bigger pages cost a live
/// sync more WAL a randomly placed record (a whole page each); 16 KiB is the usual balance
/// (InnoDB's default) and cut the kernel's share by a third. 32 KiB measured no better.
const PAGE_SIZE: i64 = 16 * 1024;

/// SQLite's page cache, KiB.
const CACHE_KIB: i64 = 8 * 1024;

/// Staged rows (of one entity) that make a backfill merge before its end. Merging into rows
/// already stored rewrites most of the table's pages (the new keys fall everywhere), so each
/// merge of a long backfill costs more than the one before: with 1M, a 10M backfill ran at 0.6
/// of a 1M one. 8M staged rows take about 1.2 GB, and the merge's sort as much again while it
/// runs.
const MERGE_AT: u64 = 8_000_000;

/// Merges the staged rows of `entity`: those whose customer is not stored are held (or,
/// should one no longer validate, quarantined), the rest upserted into the keyed table.
fn merge_entity(tx: &Transaction, entity: Entity, now: &str) -> rusqlite::Result<Merged> {
    let started = std::time::Instant::now();
    let held = hold_staged_orphans(tx, entity, now)?;
    let checked = started.elapsed();
    let stored = sqlite::merge(tx, entity)?;
    debug!(%entity, stored, held, parents_checked_in = ?checked, merged_in = ?started.elapsed().saturating_sub(checked),
           "Staged records merged.");
    if entity == Entity::Customers && stored > 0 {
        release_all_held(tx)?;
    }
    Ok(Merged { stored, held })
}

/// Moves the staged records of `entity` whose customer the store does not hold to `held`,
/// as a page of a sync would have held them, a bounded number at a time. Returns how many.
fn hold_staged_orphans(tx: &Transaction, entity: Entity, now: &str) -> rusqlite::Result<u64> {
    const CHUNK: usize = 1000;
    if entity == Entity::Customers || !sqlite::note_missing_parents(tx, entity)? {
        return Ok(0);
    }
    let (mut held, mut after) = (0, 0);
    loop {
        let orphans = sqlite::staged_orphans(tx, entity, after, CHUNK)?;
        let Some((last, _, _)) = orphans.last() else {
            return Ok(held);
        };
        after = *last;
        for (rowid, broker, value) in orphans {
            // It was valid when staged; this build's rules may have changed since (an upgrade
            // between staging and merge). Then it goes to quarantine, not unchecked to the store.
            match validate::validate(entity, &value) {
                Ok(record) => {
                    hold(tx, &broker, &record, now)?;
                    held += 1;
                }
                Err(reasons) => {
                    let key = entity
                        .key_fields()
                        .iter()
                        .map(|f| value.get(*f).and_then(|v| v.as_str()).unwrap_or_default())
                        .collect::<Vec<_>>()
                        .join("|");
                    let reject = crate::sink::Reject {
                        key,
                        raw: value.to_string(),
                        reasons,
                        stage: crate::sink::Stage::Validation,
                    };
                    quarantine(tx, &broker, entity, &reject, now)?;
                }
            }
            sqlite::unstage(tx, entity, rowid)?;
        }
    }
}

/// Stores every held record whose customer is now stored (after customers were merged).
fn release_all_held(tx: &Transaction) -> rusqlite::Result<()> {
    let customers: Vec<(String, String)> = tx
        .prepare_cached(
            "SELECT DISTINCT broker, customer_id FROM held h WHERE EXISTS
                 (SELECT 1 FROM customers c
                  WHERE c.broker = h.broker AND c.customer_id = h.customer_id)",
        )?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut released = [0; 3];
    for (broker, customer) in customers {
        release_held(tx, &broker, &customer, &mut released)?;
    }
    Ok(())
}

const ANY_QUARANTINED: &str =
    "SELECT EXISTS (SELECT 1 FROM quarantine WHERE broker = ?1 AND entity = ?2)";
const ANY_HELD: &str = "SELECT EXISTS (SELECT 1 FROM held WHERE broker = ?1 AND entity = ?2)";
const ANY_HELD_OF_BROKER: &str = "SELECT EXISTS (SELECT 1 FROM held WHERE broker = ?1)";

fn any_row(tx: &Transaction, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<bool> {
    tx.prepare_cached(sql)?.query_row(params, |r| r.get(0))
}

fn quarantine(
    tx: &Transaction,
    broker: &str,
    entity: Entity,
    reject: &crate::sink::Reject,
    now: &str,
) -> rusqlite::Result<()> {
    let reasons = serde_json::to_string(&reject.reasons).unwrap_or_default();
    tx.prepare_cached(
        "INSERT INTO quarantine (broker, entity, record_key, raw, reasons, first_seen, last_seen, times_seen, stage)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 1, ?7)
         ON CONFLICT (broker, entity, record_key) DO UPDATE SET
            raw = excluded.raw, reasons = excluded.reasons, last_seen = excluded.last_seen,
            times_seen = quarantine.times_seen + 1, stage = excluded.stage",
    )?
    .execute(params![
        broker,
        entity.as_str(),
        reject.key,
        reject.raw,
        reasons,
        now,
        reject.stage.as_str()
    ])?;
    Ok(())
}

/// Removes `key` from quarantine: the broker has re-sent it valid. Returns rows removed.
fn unquarantine(
    tx: &Transaction,
    broker: &str,
    entity: Entity,
    key: &str,
) -> rusqlite::Result<u64> {
    let n = tx
        .prepare_cached(
            "DELETE FROM quarantine WHERE broker = ?1 AND entity = ?2 AND record_key = ?3",
        )?
        .execute(params![broker, entity.as_str(), key])?;
    Ok(n as u64)
}

fn hold(tx: &Transaction, broker: &str, record: &Record, now: &str) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO held (broker, entity, record_key, customer_id, record, first_seen, last_seen)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)
         ON CONFLICT (broker, entity, record_key) DO UPDATE SET
            customer_id = excluded.customer_id, record = excluded.record,
            last_seen = excluded.last_seen
         -- As for stored rows: an older version (a backfill page racing a sync) never
         -- replaces a newer one waiting for its customer.
         WHERE json_extract(excluded.record, '$.last_modified_date') IS NULL
            OR json_extract(held.record, '$.last_modified_date') IS NULL
            OR julianday(json_extract(excluded.record, '$.last_modified_date'))
               >= julianday(json_extract(held.record, '$.last_modified_date'))",
    )?
    .execute(params![
        broker,
        record.entity().as_str(),
        record.key(),
        record.parent_customer().unwrap_or_default(),
        record.to_json().to_string(),
        now
    ])?;
    Ok(())
}

fn unhold(tx: &Transaction, broker: &str, entity: Entity, key: &str) -> rusqlite::Result<()> {
    tx.prepare_cached("DELETE FROM held WHERE broker = ?1 AND entity = ?2 AND record_key = ?3")?
        .execute(params![broker, entity.as_str(), key])?;
    Ok(())
}

/// Stores the records held for `customer_id`, now that the customer exists; counts them per
/// entity into `released`.
fn release_held(
    tx: &Transaction,
    broker: &str,
    customer_id: &str,
    released: &mut [u64; 3],
) -> rusqlite::Result<()> {
    let held: Vec<(String, String)> = tx
        .prepare_cached("SELECT entity, record FROM held WHERE broker = ?1 AND customer_id = ?2")?
        .query_map(params![broker, customer_id], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    for (entity, text) in held {
        // Held records were valid when held; re-validating is cheap and keeps one code path.
        let record = entity
            .parse::<Entity>()
            .ok()
            .zip(serde_json::from_str(&text).ok())
            .and_then(|(e, v)| validate::validate(e, &v).ok());
        if let Some(record) = record {
            sqlite::upsert(tx, broker, &record)?;
            unhold(tx, broker, record.entity(), &record.key())?;
            released[record.entity() as usize] += 1;
        }
    }
    Ok(())
}

fn save_progress(tx: &Transaction, batch: &PageBatch, now: &str) -> rusqlite::Result<()> {
    match &batch.progress {
        Progress::None => {}
        // The live cursor never moves backwards, whatever the clock did.
        Progress::Cursor(cursor) => {
            tx.prepare_cached(
                "INSERT INTO checkpoints (broker, entity, cursor, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (broker, entity) DO UPDATE SET cursor = excluded.cursor,
                    updated_at = excluded.updated_at
                 WHERE julianday(excluded.cursor) > julianday(checkpoints.cursor)",
            )?
            .execute(params![batch.broker, batch.entity.as_str(), cursor.to_string(), now])?;
        }
        Progress::Backfill { since, done_until } => {
            tx.prepare_cached(
                "UPDATE backfills SET done_until = ?4,
                    finished_at = CASE WHEN julianday(?4) >= julianday(until) THEN ?5 END
                 WHERE broker = ?1 AND entity = ?2 AND since = ?3",
            )?
            .execute(params![
                batch.broker,
                batch.entity.as_str(),
                since.to_string(),
                done_until.to_string(),
                now
            ])?;
        }
    }
    Ok(())
}

fn sqlite_filter(filter: &QuarantineFilter) -> [Option<String>; 3] {
    [
        filter.broker.clone(),
        filter.entity.map(|e| e.as_str().to_owned()),
        filter.key.clone(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_store_has_big_pages_and_an_old_one_keeps_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let page_size = |path: &Path| -> i64 {
            let store = SqliteStore::open(path).unwrap();
            store
                .with(|c| c.query_row("PRAGMA page_size", [], |r| r.get(0)))
                .unwrap()
        };
        let new = dir.path().join("new.db");
        assert_eq!(page_size(&new), PAGE_SIZE);
        // A store made before pages grew: WAL mode fixes its page size for good.
        let old = dir.path().join("old.db");
        let conn = Connection::open(&old).unwrap();
        conn.query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .unwrap();
        conn.execute_batch("CREATE TABLE t (x)").unwrap();
        drop(conn);
        assert_eq!(page_size(&old), 4096);
    }
}
