//! The state in PostgreSQL, shared by a fleet of daemons: the same state as the SQLite file
//! (checkpoints, runs, backfill lanes, quarantine, held orphans, entity tables), plus the fleet's
//! members and leases.
//!
//! Records, quarantine and progress of a page commit in one transaction that first checks the
//! page's lease (`Fence`) under a row lock: a lease taken over (its epoch bumped) or expired
//! refuses the whole commit, and a takeover waits for a commit in flight to finish. Exactly once,
//! as with SQLite.
//!
//! The `Store` API is synchronous (SQLite's is); sqlx is async. Each call runs its future on this
//! thread with `futures_executor::block_on` inside the context of a small runtime of its own,
//! whose worker drives the connections' I/O: it works from async tasks, blocking threads and
//! plain threads alike, as the SQLite store does.

use std::future::Future;
use std::str::FromStr;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use jiff::Timestamp;
use secrecy::ExposeSecret;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{AssertSqlSafe, PgConnection, Row};

use super::lease::{Fence, LeaseLane};
use super::{
    BackfillProgress, EntityStatus, QuarantineFilter, Quarantined, Reconciliation, StoreError,
    pg_schema,
};
use crate::config::state::PgStatePlan;
use crate::model::{Entity, Record};
use crate::sink::{CommitStats, PageBatch, Progress, Reject};
use crate::source::sql::db::pg_ssl_mode;
use crate::validate;

pub struct PgStore {
    pool: PgPool,
    runtime: Option<tokio::runtime::Runtime>,
    /// This process, as the fleet knows it (`host/pid/start`).
    member: String,
}

/// One member of the fleet, as `status` shows it.
#[derive(Debug, Clone)]
pub struct Member {
    pub id: String,
    pub heartbeat_at: Timestamp,
    pub config_hash: String,
    /// Whether its heartbeat is younger than the lease TTL.
    pub alive: bool,
}

/// One lease row.
#[derive(Debug, Clone)]
pub struct LeaseRow {
    pub broker: String,
    pub entity: String,
    pub lane: String,
    pub holder: Option<String>,
    pub valid: bool,
    /// How long it has been free (zero while valid), on the server's clock.
    pub free_for: Duration,
}

/// A lease won: its epoch, and who held it before when it was taken over from another member.
#[derive(Debug, Clone)]
pub struct Acquired {
    pub epoch: i64,
    pub sent_at: Instant,
    pub taken_from: Option<String>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is refused inside another runtime; nothing of ours
        // is left running (every call waited for its answer).
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn to_chrono(t: Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(t.as_second(), t.subsec_nanosecond().max(0) as u32).unwrap_or_default()
}

fn from_chrono(t: DateTime<Utc>) -> Timestamp {
    Timestamp::new(t.timestamp(), t.timestamp_subsec_nanos() as i32).unwrap_or_default()
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// `host/pid/start`: unique across restarts of the same pid.
fn member_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    let started = Timestamp::now().as_millisecond();
    format!("{host}/{}/{started:x}", std::process::id())
}

impl PgStore {
    /// Connects (lazily) and creates or migrates the schema.
    pub fn open(plan: &PgStatePlan) -> Result<PgStore, StoreError> {
        let failed = |message: String| StoreError::PgOpen {
            url: plan.url.clone(),
            message,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("t360-state")
            .enable_all()
            .build()
            .map_err(|e| failed(e.to_string()))?;
        let idle = millis(plan.lease_ttl).to_string();
        let member = member_id();
        let mut options = PgConnectOptions::from_str(&plan.url)
            .map_err(|e| failed(e.to_string()))?
            // `pg_stat_activity` shows which member each session is.
            .application_name(&format!("t360-connector {member}"))
            .ssl_mode(pg_ssl_mode(plan.tls))
            // Every statement names its tables bare: the schema is the search path.
            // A daemon frozen inside a transaction (SIGSTOP, a VM paused) would hold its lease
            // row's lock and stall the takeover: the server ends such a session after the TTL.
            .options([
                ("search_path", plan.schema.as_str()),
                ("TimeZone", "UTC"),
                ("idle_in_transaction_session_timeout", idle.as_str()),
            ]);
        if let Some(p) = &plan.password {
            options = options.password(p.expose_secret());
        }
        if let Some(ca) = &plan.ca_file {
            options = options.ssl_root_cert(ca);
        }
        let pool = {
            let _context = runtime.enter();
            PgPoolOptions::new()
                .max_connections(plan.max_connections)
                // Store calls can run on the daemon's async threads: while PostgreSQL is away,
                // each gives up after this rather than the pool's default 30 s.
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(options)
        };
        let store = PgStore {
            pool,
            runtime: Some(runtime),
            member,
        };
        let schema = plan.schema.clone();
        store
            .block(migrate(&store.pool, &schema))
            .map_err(|e| failed(e.to_string()))?;
        Ok(store)
    }

    /// This process's id in the fleet.
    pub fn member(&self) -> &str {
        &self.member
    }

    fn block<T>(&self, f: impl Future<Output = Result<T, sqlx::Error>>) -> Result<T, StoreError> {
        let wait = || {
            let _context = self.runtime.as_ref().map(|rt| rt.enter());
            // Unconstrained: on a worker thread of the caller's runtime, tokio's cooperative
            // budget would run out and defer every wake-up to a scheduler this loop never
            // yields to.
            futures_executor::block_on(tokio::task::unconstrained(f)).map_err(StoreError::Pg)
        };
        // On a worker of a multi-threaded runtime (the daemon's), the worker's other tasks
        // (timers, /healthz, signals) move to another thread while this one waits, which may
        // be seconds while PostgreSQL is away.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(wait)
            }
            _ => wait(),
        }
    }

    pub fn commit_page(&self, batch: &PageBatch) -> Result<CommitStats, StoreError> {
        let pool = &self.pool;
        let result = self.block(async {
            let mut tx = pool.begin().await?;
            // One broker's commits one at a time: a transactions page holding an orphan and a
            // customers page storing its customer, committed side by side, would each miss the
            // other's row (READ COMMITTED) and leave the orphan held for good. Taken before the
            // lease row, never after: a commit holding a lease row never waits on this lock,
            // so renewals and commits cannot deadlock.
            lock_broker(&mut tx, &batch.broker).await?;
            if let Some(fence) = &batch.fence
                && !holds(&mut tx, fence).await?
            {
                // Rolled back on drop: nothing of the page is written.
                return Ok(Err(fence.clone()));
            }
            let stats = write_page(&mut tx, batch).await?;
            tx.commit().await?;
            Ok(Ok(stats))
        })?;
        result.map_err(|fence| {
            crate::telemetry::fencing_rejected(&fence.broker, fence.entity);
            StoreError::Fenced(fence.to_string(), fence.epoch)
        })
    }

    pub fn cursor(&self, broker: &str, entity: Entity) -> Result<Option<Timestamp>, StoreError> {
        self.block(async {
            let t: Option<DateTime<Utc>> = sqlx::query_scalar(
                "SELECT cursor FROM checkpoints WHERE broker = $1 AND entity = $2",
            )
            .bind(broker)
            .bind(entity.as_str())
            .fetch_optional(&self.pool)
            .await?;
            Ok(t.map(from_chrono))
        })
    }

    pub fn last_success(
        &self,
        broker: &str,
        entity: Entity,
    ) -> Result<Option<Timestamp>, StoreError> {
        self.block(async {
            let t: Option<DateTime<Utc>> = sqlx::query_scalar(
                "SELECT max(finished_at) FROM runs
                 WHERE broker = $1 AND entity = $2 AND kind = 'sync' AND outcome = 'success'",
            )
            .bind(broker)
            .bind(entity.as_str())
            .fetch_one(&self.pool)
            .await?;
            Ok(t.map(from_chrono))
        })
    }

    pub fn cursors(&self) -> Result<Vec<(String, Entity, Timestamp)>, StoreError> {
        self.block(async {
            let rows = sqlx::query("SELECT broker, entity, cursor FROM checkpoints")
                .fetch_all(&self.pool)
                .await?;
            let mut out = Vec::new();
            for r in rows {
                let entity: String = r.try_get(1)?;
                if let Ok(entity) = entity.parse() {
                    out.push((r.try_get(0)?, entity, from_chrono(r.try_get(2)?)));
                }
            }
            Ok(out)
        })
    }

    pub fn start_run(
        &self,
        broker: &str,
        entity: Entity,
        kind: &str,
        window: (Timestamp, Timestamp),
    ) -> Result<i64, StoreError> {
        self.block(
            sqlx::query_scalar(
                "INSERT INTO runs (broker, entity, kind, holder, started_at, outcome, window_from, window_to)
                 VALUES ($1, $2, $3, $4, now(), 'running', $5, $6) RETURNING id",
            )
            .bind(broker)
            .bind(entity.as_str())
            .bind(kind)
            .bind(&self.member)
            .bind(to_chrono(window.0))
            .bind(to_chrono(window.1))
            .fetch_one(&self.pool),
        )
    }

    pub fn finish_run(
        &self,
        run: i64,
        outcome: &str,
        pages: u64,
        pulled: u64,
        stats: CommitStats,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        self.block(
            sqlx::query(
                "UPDATE runs SET finished_at = now(), outcome = $2, pages = $3, pulled = $4,
                    stored = $5, quarantined = $6, held = $7, error = $8 WHERE id = $1",
            )
            .bind(run)
            .bind(outcome)
            .bind(pages as i64)
            .bind(pulled as i64)
            .bind(stats.stored as i64)
            .bind(stats.quarantined as i64)
            .bind(stats.held as i64)
            .bind(error)
            .execute(&self.pool),
        )?;
        Ok(())
    }

    pub fn backfill(
        &self,
        broker: &str,
        entity: Entity,
        since: Timestamp,
        until: Timestamp,
    ) -> Result<BackfillProgress, StoreError> {
        self.block(async {
            sqlx::query(
                "INSERT INTO backfills (broker, entity, since, until, done_until, started_at)
                 VALUES ($1, $2, $3, $4, $3, now()) ON CONFLICT (broker, entity, since) DO NOTHING",
            )
            .bind(broker)
            .bind(entity.as_str())
            .bind(to_chrono(since))
            .bind(to_chrono(until))
            .execute(&self.pool)
            .await?;
            let r = sqlx::query(
                "SELECT until, done_until, finished_at IS NOT NULL FROM backfills
                 WHERE broker = $1 AND entity = $2 AND since = $3",
            )
            .bind(broker)
            .bind(entity.as_str())
            .bind(to_chrono(since))
            .fetch_one(&self.pool)
            .await?;
            Ok(BackfillProgress {
                since,
                until: from_chrono(r.try_get(0)?),
                done_until: from_chrono(r.try_get(1)?),
                finished: r.try_get(2)?,
            })
        })
    }

    pub fn restart_backfill(
        &self,
        broker: &str,
        entity: Entity,
        since: Timestamp,
        until: Timestamp,
    ) -> Result<(), StoreError> {
        self.block(
            sqlx::query(
                "UPDATE backfills SET until = $4, done_until = since, finished_at = NULL,
                    started_at = now() WHERE broker = $1 AND entity = $2 AND since = $3",
            )
            .bind(broker)
            .bind(entity.as_str())
            .bind(to_chrono(since))
            .bind(to_chrono(until))
            .execute(&self.pool),
        )?;
        Ok(())
    }

    pub fn status(&self, configured: &[(String, Entity)]) -> Result<Vec<EntityStatus>, StoreError> {
        let mut pairs: Vec<(String, Entity)> = configured.to_vec();
        let known: Vec<(String, String)> = self.block(
            sqlx::query_as(
                "SELECT broker, entity FROM checkpoints UNION SELECT broker, entity FROM runs",
            )
            .fetch_all(&self.pool),
        )?;
        pairs.extend(
            known
                .into_iter()
                .filter_map(|(b, e)| Some((b, e.parse::<Entity>().ok()?))),
        );
        pairs.sort();
        pairs.dedup();
        pairs
            .into_iter()
            .map(|(broker, entity)| self.entity_status(broker, entity))
            .collect()
    }

    fn entity_status(&self, broker: String, entity: Entity) -> Result<EntityStatus, StoreError> {
        let cursor = self.cursor(&broker, entity)?;
        let e = entity.as_str();
        self.block(async {
            let last_success: Option<DateTime<Utc>> = sqlx::query_scalar(
                "SELECT max(finished_at) FROM runs WHERE broker = $1 AND entity = $2 AND outcome = 'success'",
            )
            .bind(&broker)
            .bind(e)
            .fetch_one(&self.pool)
            .await?;
            let last_error: Option<(DateTime<Utc>, Option<String>)> = sqlx::query_as(
                "SELECT finished_at, error FROM runs
                 WHERE broker = $1 AND entity = $2 AND outcome = 'failed' AND finished_at IS NOT NULL
                   AND id > coalesce((SELECT max(id) FROM runs
                       WHERE broker = $1 AND entity = $2 AND outcome = 'success'), 0)
                 ORDER BY id DESC LIMIT 1",
            )
            .bind(&broker)
            .bind(e)
            .fetch_optional(&self.pool)
            .await?;
            // `e` is one of three fixed table names, never input.
            let stored: i64 =
                sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {e} WHERE broker = $1")))
                    .bind(&broker)
                    .fetch_one(&self.pool)
                    .await?;
            let count = |sql: &'static str| {
                sqlx::query_scalar::<_, i64>(sql)
                    .bind(&broker)
                    .bind(e)
                    .fetch_one(&self.pool)
            };
            let quarantined =
                count("SELECT count(*) FROM quarantine WHERE broker = $1 AND entity = $2").await?;
            let held = count("SELECT count(*) FROM held WHERE broker = $1 AND entity = $2").await?;
            Ok(EntityStatus {
                cursor,
                last_success: last_success.map(from_chrono),
                last_error: last_error
                    .map(|(at, err)| (from_chrono(at), err.unwrap_or_default())),
                stored: stored as u64,
                quarantined: quarantined as u64,
                held: held as u64,
                broker: broker.clone(),
                entity,
            })
        })
    }

    pub fn delete_records(
        &self,
        broker: &str,
        entity: Entity,
        keys: &[String],
        fence: Option<&Fence>,
    ) -> Result<u64, StoreError> {
        let fields = entity.key_fields();
        let condition: Vec<String> = fields
            .iter()
            .enumerate()
            .map(|(i, f)| format!("{f} = ${}", i + 2))
            .collect();
        let sql = format!(
            "DELETE FROM {} WHERE broker = $1 AND {}",
            entity.as_str(),
            condition.join(" AND ")
        );
        let deleted = self.block(async {
            let mut tx = self.pool.begin().await?;
            lock_broker(&mut tx, broker).await?;
            if let Some(fence) = fence
                && !holds(&mut tx, fence).await?
            {
                return Ok(None);
            }
            let mut deleted = 0;
            for key in keys {
                let mut q = sqlx::query(AssertSqlSafe(sql.as_str())).bind(broker);
                for part in key.splitn(fields.len(), '|') {
                    q = q.bind(part);
                }
                deleted += q.execute(&mut *tx).await?.rows_affected();
            }
            tx.commit().await?;
            Ok(Some(deleted))
        })?;
        deleted.ok_or_else(|| {
            let fence = fence.expect("refused only under a fence");
            crate::telemetry::fencing_rejected(&fence.broker, fence.entity);
            StoreError::Fenced(fence.to_string(), fence.epoch)
        })
    }

    pub fn quarantine_count(&self, broker: &str, entity: Entity) -> Result<u64, StoreError> {
        let n: i64 = self.block(
            sqlx::query_scalar("SELECT count(*) FROM quarantine WHERE broker = $1 AND entity = $2")
                .bind(broker)
                .bind(entity.as_str())
                .fetch_one(&self.pool),
        )?;
        Ok(n as u64)
    }

    pub fn record_reconciliation(&self, r: &Reconciliation) -> Result<(), StoreError> {
        self.block(
            sqlx::query(
                "INSERT INTO reconciliations (broker, entity, finished_at, range_from, range_to,
                     outcome, missing, different, gone, repaired, error)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(&r.broker)
            .bind(r.entity.as_str())
            .bind(to_chrono(r.finished_at))
            .bind(&r.range.0)
            .bind(&r.range.1)
            .bind(&r.outcome)
            .bind(r.missing as i64)
            .bind(r.different as i64)
            .bind(r.gone as i64)
            .bind(r.repaired as i64)
            .bind(&r.error)
            .execute(&self.pool),
        )?;
        Ok(())
    }

    pub fn last_reconciliations(&self) -> Result<Vec<Reconciliation>, StoreError> {
        let rows = self.block(
            sqlx::query(
                "SELECT broker, entity, finished_at, range_from, range_to, outcome, missing,
                        different, gone, repaired, error
                 FROM reconciliations WHERE id IN
                     (SELECT max(id) FROM reconciliations GROUP BY broker, entity)
                 ORDER BY broker, entity",
            )
            .fetch_all(&self.pool),
        )?;
        let read = |r: &sqlx::postgres::PgRow| -> Result<Reconciliation, sqlx::Error> {
            let entity: String = r.try_get(1)?;
            Ok(Reconciliation {
                broker: r.try_get(0)?,
                entity: entity.parse().unwrap_or(Entity::Customers),
                finished_at: from_chrono(r.try_get(2)?),
                range: (r.try_get(3)?, r.try_get(4)?),
                outcome: r.try_get(5)?,
                missing: r.try_get::<i64, _>(6)? as u64,
                different: r.try_get::<i64, _>(7)? as u64,
                gone: r.try_get::<i64, _>(8)? as u64,
                repaired: r.try_get::<i64, _>(9)? as u64,
                error: r.try_get(10)?,
            })
        };
        rows.iter()
            .map(|r| read(r).map_err(StoreError::Pg))
            .collect()
    }

    pub fn quarantine(&self, filter: &QuarantineFilter) -> Result<Vec<Quarantined>, StoreError> {
        let rows = self.block(
            sqlx::query(
                "SELECT broker, entity, record_key, raw, reasons, stage, times_seen FROM quarantine
                 WHERE ($1::text IS NULL OR broker = $1) AND ($2::text IS NULL OR entity = $2)
                   AND ($3::text IS NULL OR record_key = $3)
                 ORDER BY broker, entity, record_key",
            )
            .bind(&filter.broker)
            .bind(filter.entity.map(Entity::as_str))
            .bind(&filter.key)
            .fetch_all(&self.pool),
        )?;
        let read = |r: &sqlx::postgres::PgRow| -> Result<Quarantined, sqlx::Error> {
            let reasons: String = r.try_get(4)?;
            let stage: String = r.try_get(5)?;
            Ok(Quarantined {
                broker: r.try_get(0)?,
                entity: r.try_get(1)?,
                key: r.try_get(2)?,
                raw: r.try_get(3)?,
                reasons: serde_json::from_str(&reasons).unwrap_or_else(|_| vec![reasons]),
                stage: super::parse_stage(&stage),
                times_seen: r.try_get(6)?,
            })
        };
        rows.iter()
            .map(|r| read(r).map_err(StoreError::Pg))
            .collect()
    }

    pub fn purge_quarantine(&self, filter: &QuarantineFilter) -> Result<usize, StoreError> {
        let done = self.block(
            sqlx::query(
                "DELETE FROM quarantine
                 WHERE ($1::text IS NULL OR broker = $1) AND ($2::text IS NULL OR entity = $2)
                   AND ($3::text IS NULL OR record_key = $3)",
            )
            .bind(&filter.broker)
            .bind(filter.entity.map(Entity::as_str))
            .bind(&filter.key)
            .execute(&self.pool),
        )?;
        Ok(done.rows_affected() as usize)
    }

    /// Streams the stored rows of `broker`'s `entity` whose day (`day_sql`, the same text
    /// expression as in SQLite) is within `days`, each as its columns' text in field order.
    pub fn export_rows(
        &self,
        broker: &str,
        entity: Entity,
        day_sql: &str,
        days: &(String, String),
        mut row: impl FnMut(Vec<Option<String>>),
    ) -> Result<(), StoreError> {
        use futures_util::TryStreamExt;
        let fields = entity.fields();
        let sql = format!(
            "SELECT {} FROM {} WHERE broker = $1 AND {day_sql} BETWEEN $2 AND $3",
            fields.join(", "),
            entity.as_str()
        );
        self.block(async {
            let mut rows = sqlx::query(AssertSqlSafe(sql))
                .bind(broker)
                .bind(&days.0)
                .bind(&days.1)
                .fetch(&self.pool);
            while let Some(r) = rows.try_next().await? {
                let mut values = Vec::with_capacity(fields.len());
                for i in 0..fields.len() {
                    values.push(r.try_get::<Option<String>, _>(i)?);
                }
                row(values);
            }
            Ok(())
        })
    }

    /// Streams the held records of `broker`'s `entity`: key, customer and record (JSON text).
    pub fn export_held(
        &self,
        broker: &str,
        entity: Entity,
        mut held: impl FnMut(String, String, String),
    ) -> Result<(), StoreError> {
        use futures_util::TryStreamExt;
        self.block(async {
            let mut rows = sqlx::query_as::<_, (String, String, String)>(
                "SELECT record_key, customer_id, record::text FROM held
                 WHERE broker = $1 AND entity = $2",
            )
            .bind(broker)
            .bind(entity.as_str())
            .fetch(&self.pool);
            while let Some((key, customer, record)) = rows.try_next().await? {
                held(key, customer, record);
            }
            Ok(())
        })
    }

    // ---- the fleet: members and leases ----

    /// Registers or refreshes this member; returns the members alive (heartbeat younger than
    /// `ttl`), this one included, and forgets members silent for ten TTLs.
    pub fn heartbeat(
        &self,
        config_hash: &str,
        ttl: Duration,
        started_at: Timestamp,
    ) -> Result<Vec<Member>, StoreError> {
        let (host, pid) = {
            let mut parts = self.member.splitn(3, '/');
            let host = parts.next().unwrap_or_default().to_owned();
            let pid: i64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            (host, pid)
        };
        self.block(async {
            sqlx::query(
                "INSERT INTO members (id, host, pid, started_at, heartbeat_at, config_hash, version)
                 VALUES ($1, $2, $3, $4, now(), $5, $6)
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), config_hash = excluded.config_hash",
            )
            .bind(&self.member)
            .bind(&host)
            .bind(pid)
            .bind(to_chrono(started_at))
            .bind(config_hash)
            .bind(env!("CARGO_PKG_VERSION"))
            .execute(&self.pool)
            .await?;
            sqlx::query("DELETE FROM members WHERE heartbeat_at < now() - $1 * interval '1 millisecond'")
                .bind(millis(ttl) * 10)
                .execute(&self.pool)
                .await?;
            Ok(())
        })?;
        Ok(self.members(ttl)?.into_iter().filter(|m| m.alive).collect())
    }

    /// Every member known, alive or not.
    pub fn members(&self, ttl: Duration) -> Result<Vec<Member>, StoreError> {
        let rows = self.block(
            sqlx::query(
                "SELECT id, heartbeat_at, config_hash,
                        heartbeat_at > now() - $1 * interval '1 millisecond'
                 FROM members ORDER BY id",
            )
            .bind(millis(ttl))
            .fetch_all(&self.pool),
        )?;
        let read = |r: &sqlx::postgres::PgRow| -> Result<Member, sqlx::Error> {
            Ok(Member {
                id: r.try_get(0)?,
                heartbeat_at: from_chrono(r.try_get(1)?),
                config_hash: r.try_get(2)?,
                alive: r.try_get(3)?,
            })
        };
        rows.iter()
            .map(|r| read(r).map_err(StoreError::Pg))
            .collect()
    }

    /// Leaves the fleet: releases every lease of this member and removes it.
    pub fn leave(&self) -> Result<(), StoreError> {
        self.block(async {
            sqlx::query("UPDATE leases SET holder = NULL, expires_at = now() WHERE holder = $1")
                .bind(&self.member)
                .execute(&self.pool)
                .await?;
            sqlx::query("DELETE FROM members WHERE id = $1")
                .bind(&self.member)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }

    /// Every lease row.
    pub fn leases(&self) -> Result<Vec<LeaseRow>, StoreError> {
        let rows = self.block(
            sqlx::query(
                "SELECT broker, entity, lane, holder,
                        holder IS NOT NULL AND expires_at > now(),
                        greatest(0, extract(epoch FROM now() - expires_at) * 1000)::bigint
                 FROM leases ORDER BY broker, entity, lane",
            )
            .fetch_all(&self.pool),
        )?;
        let read = |r: &sqlx::postgres::PgRow| -> Result<LeaseRow, sqlx::Error> {
            Ok(LeaseRow {
                broker: r.try_get(0)?,
                entity: r.try_get(1)?,
                lane: r.try_get(2)?,
                holder: r.try_get(3)?,
                valid: r.try_get(4)?,
                free_for: Duration::from_millis(r.try_get::<i64, _>(5)?.max(0) as u64),
            })
        };
        rows.iter()
            .map(|r| read(r).map_err(StoreError::Pg))
            .collect()
    }

    /// Takes the lease of (broker, entity, lane) for this member when it is free (released or
    /// expired), bumping its epoch. `None`: another member holds it.
    pub fn acquire(
        &self,
        broker: &str,
        entity: Entity,
        lane: LeaseLane,
        ttl: Duration,
    ) -> Result<Option<Acquired>, StoreError> {
        let sent_at = Instant::now();
        let won: Option<(i64, Option<String>)> = self.block(async {
            let mut tx = self.pool.begin().await?;
            let current: Option<(Option<String>, bool)> = sqlx::query_as(
                // SKIP LOCKED: a row locked by a commit in flight (its holder is alive, or
                // frozen until the server ends its session) is not free now; the coordinator's
                // round moves on instead of queueing behind it.
                "SELECT holder, holder IS NULL OR expires_at <= clock_timestamp() FROM leases
                 WHERE broker = $1 AND entity = $2 AND lane = $3 FOR UPDATE SKIP LOCKED",
            )
            .bind(broker)
            .bind(entity.as_str())
            .bind(lane.as_str())
            .fetch_optional(&mut *tx)
            .await?;
            let won = match current {
                None => sqlx::query_scalar(
                    "INSERT INTO leases (broker, entity, lane, holder, epoch, acquired_at, expires_at)
                     VALUES ($1, $2, $3, $4, 1, now(), now() + $5 * interval '1 millisecond')
                     ON CONFLICT DO NOTHING RETURNING epoch",
                )
                .bind(broker)
                .bind(entity.as_str())
                .bind(lane.as_str())
                .bind(&self.member)
                .bind(millis(ttl))
                .fetch_optional(&mut *tx)
                .await?
                .map(|epoch: i64| (epoch, None)),
                Some((previous, true)) => sqlx::query_scalar(
                    "UPDATE leases SET holder = $4, epoch = epoch + 1, acquired_at = now(),
                        expires_at = now() + $5 * interval '1 millisecond'
                     WHERE broker = $1 AND entity = $2 AND lane = $3 RETURNING epoch",
                )
                .bind(broker)
                .bind(entity.as_str())
                .bind(lane.as_str())
                .bind(&self.member)
                .bind(millis(ttl))
                .fetch_optional(&mut *tx)
                .await?
                .map(|epoch: i64| (epoch, previous)),
                Some((_, false)) => None,
            };
            tx.commit().await?;
            Ok(won)
        })?;
        Ok(won.map(|(epoch, previous)| Acquired {
            epoch,
            sent_at,
            taken_from: previous.filter(|p| *p != self.member),
        }))
    }

    /// Extends the given leases of this member by `ttl`; returns, in order, whether each was
    /// still held (not taken over, not expired).
    pub fn renew(&self, fences: &[Fence], ttl: Duration) -> Result<Vec<bool>, StoreError> {
        if fences.is_empty() {
            return Ok(Vec::new());
        }
        let brokers: Vec<&str> = fences.iter().map(|f| f.broker.as_str()).collect();
        let entities: Vec<&str> = fences.iter().map(|f| f.entity.as_str()).collect();
        let lanes: Vec<&str> = fences.iter().map(|f| f.lane.as_str()).collect();
        let epochs: Vec<i64> = fences.iter().map(|f| f.epoch).collect();
        let renewed: Vec<(String, String, String)> = self.block(
            sqlx::query_as(
                "UPDATE leases l SET expires_at = now() + $6 * interval '1 millisecond'
                 FROM unnest($2::text[], $3::text[], $4::text[], $5::bigint[]) AS w(broker, entity, lane, epoch)
                 WHERE l.broker = w.broker AND l.entity = w.entity AND l.lane = w.lane
                   AND l.epoch = w.epoch AND l.holder = $1 AND l.expires_at > now()
                 RETURNING l.broker, l.entity, l.lane",
            )
            .bind(&self.member)
            .bind(&brokers)
            .bind(&entities)
            .bind(&lanes)
            .bind(&epochs)
            .bind(millis(ttl))
            .fetch_all(&self.pool),
        )?;
        Ok(fences
            .iter()
            .map(|f| {
                renewed.iter().any(|(b, e, l)| {
                    *b == f.broker && e == f.entity.as_str() && l == f.lane.as_str()
                })
            })
            .collect())
    }

    /// Gives a lease back (only if still this member's, at this epoch): free for others at once.
    pub fn release(&self, fence: &Fence) -> Result<(), StoreError> {
        self.block(
            sqlx::query(
                "UPDATE leases SET holder = NULL, expires_at = now()
                 WHERE broker = $1 AND entity = $2 AND lane = $3 AND holder = $4 AND epoch = $5",
            )
            .bind(&fence.broker)
            .bind(fence.entity.as_str())
            .bind(fence.lane.as_str())
            .bind(&fence.holder)
            .bind(fence.epoch)
            .execute(&self.pool),
        )?;
        Ok(())
    }
}

/// Creates the schema or brings it to the newest version, under an advisory lock so that
/// daemons starting together migrate one at a time. Refuses a schema newer than this build.
async fn migrate(pool: &PgPool, schema: &str) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('t360-connector migrate'))")
        .execute(&mut *tx)
        .await?;
    // The schema name is checked (lower-case letters, digits, _) where the settings are read.
    // Created only when missing (`IF NOT EXISTS` would log a server notice at every start).
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)")
            .bind(schema)
            .fetch_one(&mut *tx)
            .await?;
    if !exists {
        sqlx::query(AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
            .execute(&mut *tx)
            .await?;
    }
    let versioned: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'schema_version')",
    )
    .bind(schema)
    .fetch_one(&mut *tx)
    .await?;
    if !versioned {
        sqlx::query("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            .execute(&mut *tx)
            .await?;
    }
    let current: Option<i32> = sqlx::query_scalar("SELECT max(version) FROM schema_version")
        .fetch_one(&mut *tx)
        .await?;
    let current = current.unwrap_or(0).max(0) as usize;
    if current > pg_schema::MIGRATIONS.len() {
        return Err(sqlx::Error::Protocol(format!(
            "schema \"{schema}\" is at version {current}, newer than this build ({}); refusing to touch it",
            pg_schema::MIGRATIONS.len()
        )));
    }
    for (version, sql) in pg_schema::MIGRATIONS.iter().enumerate().skip(current) {
        sqlx::raw_sql(AssertSqlSafe(*sql)).execute(&mut *tx).await?;
        sqlx::query("DELETE FROM schema_version")
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
            .bind((version + 1) as i32)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// Serialises the writes of one broker (commits, deletions) across the fleet, until the
/// transaction ends.
async fn lock_broker(conn: &mut PgConnection, broker: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(7360, hashtext($1))")
        .bind(broker)
        .execute(conn)
        .await?;
    Ok(())
}

/// Whether `fence` still holds: same holder and epoch, unexpired. Locks the lease row until the
/// transaction ends, so a takeover waits for this commit rather than racing it.
async fn holds(conn: &mut PgConnection, fence: &Fence) -> Result<bool, sqlx::Error> {
    let ok: Option<bool> = sqlx::query_scalar(
        // The clock now, not the transaction's start: the advisory lock may have been waited for.
        "SELECT holder = $4 AND epoch = $5 AND expires_at > clock_timestamp() FROM leases
         WHERE broker = $1 AND entity = $2 AND lane = $3 FOR SHARE",
    )
    .bind(&fence.broker)
    .bind(fence.entity.as_str())
    .bind(fence.lane.as_str())
    .bind(&fence.holder)
    .bind(fence.epoch)
    .fetch_optional(conn)
    .await?;
    Ok(ok == Some(true))
}

/// The page's writes, as `SqliteStore::commit_page` makes them (see there for the rules).
async fn write_page(
    conn: &mut PgConnection,
    batch: &PageBatch,
) -> Result<CommitStats, sqlx::Error> {
    let (broker, entity) = (batch.broker.as_str(), batch.entity.as_str());
    let mut stats = CommitStats::default();
    for reject in &batch.rejects {
        quarantine(conn, batch, reject).await?;
        stats.quarantined += 1;
    }
    let any_quarantined: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM quarantine WHERE broker = $1 AND entity = $2)",
    )
    .bind(broker)
    .bind(entity)
    .fetch_one(&mut *conn)
    .await?;
    let mut any_held: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM held WHERE broker = $1 AND entity = $2)")
            .bind(broker)
            .bind(entity)
            .fetch_one(&mut *conn)
            .await?;
    let any_held_for_customers = batch.entity == Entity::Customers && {
        sqlx::query_scalar::<_, bool>("SELECT EXISTS (SELECT 1 FROM held WHERE broker = $1)")
            .bind(broker)
            .fetch_one(&mut *conn)
            .await?
    };
    let mut known: std::collections::HashMap<&str, bool> = std::collections::HashMap::new();
    for valid in &batch.records {
        if any_quarantined {
            stats.unquarantined += sqlx::query(
                "DELETE FROM quarantine WHERE broker = $1 AND entity = $2 AND record_key = $3",
            )
            .bind(broker)
            .bind(entity)
            .bind(valid.record.key())
            .execute(&mut *conn)
            .await?
            .rows_affected();
        }
        if !batch.keep_records {
            stats.stored += 1;
            continue;
        }
        let orphan = match valid.record.parent_customer() {
            Some(customer) if batch.hold_orphans => match known.get(customer) {
                Some(exists) => !exists,
                None => {
                    let exists: bool = sqlx::query_scalar(
                        "SELECT EXISTS (SELECT 1 FROM customers WHERE broker = $1 AND customer_id = $2)",
                    )
                    .bind(broker)
                    .bind(customer)
                    .fetch_one(&mut *conn)
                    .await?;
                    known.insert(customer, exists);
                    !exists
                }
            },
            _ => false,
        };
        if orphan {
            hold(conn, broker, &valid.record).await?;
            any_held = true;
            stats.held += 1;
            continue;
        }
        upsert(conn, broker, &valid.record).await?;
        if any_held {
            unhold(conn, broker, batch.entity, &valid.record.key()).await?;
        }
        stats.stored += 1;
        if let (Record::Customer(c), true) = (&valid.record, any_held_for_customers) {
            release_held(conn, broker, &c.customer_id, &mut stats.released).await?;
        }
    }
    save_progress(conn, batch).await?;
    Ok(stats)
}

async fn quarantine(
    conn: &mut PgConnection,
    batch: &PageBatch,
    reject: &Reject,
) -> Result<(), sqlx::Error> {
    let reasons = serde_json::to_string(&reject.reasons).unwrap_or_default();
    sqlx::query(
        "INSERT INTO quarantine (broker, entity, record_key, raw, reasons, first_seen, last_seen, times_seen, stage)
         VALUES ($1, $2, $3, $4, $5, now(), now(), 1, $6)
         ON CONFLICT (broker, entity, record_key) DO UPDATE SET
            raw = excluded.raw, reasons = excluded.reasons, last_seen = excluded.last_seen,
            times_seen = quarantine.times_seen + 1, stage = excluded.stage",
    )
    .bind(&batch.broker)
    .bind(batch.entity.as_str())
    .bind(&reject.key)
    .bind(&reject.raw)
    .bind(reasons)
    .bind(reject.stage.as_str())
    .execute(conn)
    .await?;
    Ok(())
}

async fn hold(conn: &mut PgConnection, broker: &str, record: &Record) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO held (broker, entity, record_key, customer_id, record, first_seen, last_seen)
         VALUES ($1, $2, $3, $4, $5::jsonb, now(), now())
         ON CONFLICT (broker, entity, record_key) DO UPDATE SET
            customer_id = excluded.customer_id, record = excluded.record,
            last_seen = excluded.last_seen
         WHERE excluded.record->>'last_modified_date' IS NULL
            OR held.record->>'last_modified_date' IS NULL
            OR (excluded.record->>'last_modified_date')::timestamptz
               >= (held.record->>'last_modified_date')::timestamptz",
    )
    .bind(broker)
    .bind(record.entity().as_str())
    .bind(record.key())
    .bind(record.parent_customer().unwrap_or_default())
    .bind(record.to_json().to_string())
    .execute(conn)
    .await?;
    Ok(())
}

async fn unhold(
    conn: &mut PgConnection,
    broker: &str,
    entity: Entity,
    key: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM held WHERE broker = $1 AND entity = $2 AND record_key = $3")
        .bind(broker)
        .bind(entity.as_str())
        .bind(key)
        .execute(conn)
        .await?;
    Ok(())
}

async fn release_held(
    conn: &mut PgConnection,
    broker: &str,
    customer_id: &str,
    released: &mut [u64; 3],
) -> Result<(), sqlx::Error> {
    let held: Vec<(String, String)> = sqlx::query_as(
        "SELECT entity, record::text FROM held WHERE broker = $1 AND customer_id = $2",
    )
    .bind(broker)
    .bind(customer_id)
    .fetch_all(&mut *conn)
    .await?;
    for (entity, text) in held {
        let record = entity
            .parse::<Entity>()
            .ok()
            .zip(serde_json::from_str(&text).ok())
            .and_then(|(e, v)| validate::validate(e, &v).ok());
        if let Some(record) = record {
            upsert(conn, broker, &record).await?;
            unhold(conn, broker, record.entity(), &record.key()).await?;
            released[record.entity() as usize] += 1;
        }
    }
    Ok(())
}

async fn save_progress(conn: &mut PgConnection, batch: &PageBatch) -> Result<(), sqlx::Error> {
    match &batch.progress {
        Progress::None => {}
        Progress::Cursor(cursor) => {
            sqlx::query(
                "INSERT INTO checkpoints (broker, entity, cursor, updated_at) VALUES ($1, $2, $3, now())
                 ON CONFLICT (broker, entity) DO UPDATE SET cursor = excluded.cursor,
                    updated_at = excluded.updated_at
                 WHERE excluded.cursor > checkpoints.cursor",
            )
            .bind(&batch.broker)
            .bind(batch.entity.as_str())
            .bind(to_chrono(*cursor))
            .execute(conn)
            .await?;
        }
        Progress::Backfill { since, done_until } => {
            sqlx::query(
                "UPDATE backfills SET done_until = $4,
                    finished_at = CASE WHEN $4 >= until THEN now() END
                 WHERE broker = $1 AND entity = $2 AND since = $3",
            )
            .bind(&batch.broker)
            .bind(batch.entity.as_str())
            .bind(to_chrono(*since))
            .bind(to_chrono(*done_until))
            .execute(conn)
            .await?;
        }
    }
    Ok(())
}

/// Upserts `record` with the embedded store's newest-wins rule.
async fn upsert(conn: &mut PgConnection, broker: &str, record: &Record) -> Result<(), sqlx::Error> {
    let mut q = sqlx::query(AssertSqlSafe(UPSERT[record.entity() as usize].as_str())).bind(broker);
    for value in crate::sink::sqlite::field_texts(record) {
        q = q.bind(value);
    }
    q.execute(conn).await?;
    Ok(())
}

static UPSERT: std::sync::LazyLock<[String; 3]> =
    std::sync::LazyLock::new(|| Entity::ALL.map(upsert_sql));

fn upsert_sql(entity: Entity) -> String {
    let table = entity.as_str();
    let fields = entity.fields();
    let keys = entity.key_fields();
    let placeholders: Vec<String> = (1..=fields.len() + 1).map(|i| format!("${i}")).collect();
    let updates: Vec<String> = fields
        .iter()
        .filter(|f| !keys.contains(f))
        .map(|f| format!("{f} = excluded.{f}"))
        .collect();
    format!(
        "INSERT INTO {table} (broker, {columns}) VALUES ({values})
         ON CONFLICT (broker, {keys}) DO UPDATE SET {updates}
         WHERE excluded.last_modified_date IS NULL OR {table}.last_modified_date IS NULL
            OR excluded.last_modified_date::timestamptz >= {table}.last_modified_date::timestamptz",
        columns = fields.join(", "),
        values = placeholders.join(", "),
        keys = keys.join(", "),
        updates = updates.join(", "),
    )
}
