//! One sync of one (broker, entity): the window, the pages, the commits, the cursor.
//!
//! source → normalise → validate → sink → checkpoint, in that order, one page at a time, so
//! memory stays flat however long the backfill. The checkpoint moves only in the same commit as
//! the window's last page: a crash anywhere before it leaves the cursor where it was, and the
//! re-run re-reads pages whose records are already stored (upserts: no duplicates).

use std::borrow::Cow;
use std::sync::Arc;

use jiff::{SignedDuration, Timestamp};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tracing::{Instrument, debug, error_span, info, warn};

use crate::config::ConnectorPlan;
use crate::model::{Entity, Record};
use crate::normalise::{Mapping, PiiPolicy, RawRecord};
use crate::sink::{CommitStats, PageBatch, Progress, Reject, Sink, SinkError, Stage, Valid};
use crate::source::{Page, Source, SourceError, Window};
use crate::state::lease::Lease;
use crate::state::{Store, StoreError};
use crate::telemetry;
use crate::validate;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{broker}/{entity}: {source}")]
    Source {
        broker: String,
        entity: Entity,
        source: SourceError,
    },
    #[error("{broker}/{entity}: {source}")]
    Store {
        broker: String,
        entity: Entity,
        source: StoreError,
    },
    #[error("{broker}/{entity}: {source}")]
    Sink {
        broker: String,
        entity: Entity,
        source: SinkError,
    },
    /// Asked to stop: the pages read so far are committed, the cursor stays where it was.
    #[error("{broker}/{entity}: stopped before the window's end")]
    Interrupted { broker: String, entity: Entity },
}

impl EngineError {
    /// The run outcome recorded for this error.
    pub fn outcome(&self) -> &'static str {
        match self {
            EngineError::Interrupted { .. } => "interrupted",
            _ => "failed",
        }
    }
}

/// What one run did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunSummary {
    pub pages: u64,
    pub pulled: u64,
    pub stats: CommitStats,
}

/// Whether a run advances the live cursor or a backfill lane.
#[derive(Debug, Clone, Copy)]
pub enum Lane {
    Live,
    Backfill { since: Timestamp },
}

/// Everything one connector's runs need.
pub struct Runner<'a> {
    pub plan: &'a ConnectorPlan,
    pub source: &'a dyn Source,
    pub sink: &'a dyn Sink,
    pub store: &'a Store,
    /// Cancelled on shutdown: the run stops after the page it is committing.
    pub stop: CancellationToken,
    /// The lease the run works under (a fleet's PostgreSQL state): no request is sent once it
    /// may have gone, and every commit carries its fence.
    pub lease: Option<Arc<Lease>>,
}

impl Runner<'_> {
    /// The live window of `entity` at `now`: `[cursor − lookback, now − settle]`.
    ///
    /// Trading activity also reaches back `activity_repull_days` whole days, because a day's
    /// rows are replaced by intra-day re-sends.
    pub fn live_window(&self, entity: Entity, now: Timestamp) -> Result<Window, EngineError> {
        let sync = &self.plan.sync;
        let cursor = self
            .store
            .cursor(&self.plan.broker, entity)
            .map_err(|source| self.store_error(entity, source))?;
        let to = now - sync.settle;
        let mut from = match cursor {
            Some(cursor) => cursor - sync.lookback,
            None => sync.start.unwrap_or(Timestamp::UNIX_EPOCH),
        };
        if entity == Entity::TradingActivity && sync.activity_repull_days > 0 {
            let days = SignedDuration::from_hours(24 * sync.activity_repull_days);
            from = from.min(now - days);
        }
        // Whole seconds: some brokers' parsers choke on nanoseconds, and flooring only widens
        // the next window (its lower bound is inclusive), so nothing falls between windows.
        let floor = |t: Timestamp| Timestamp::from_second(t.as_second()).unwrap_or(t);
        let to = floor(to);
        Ok(Window {
            from: floor(from.min(to)),
            to,
        })
    }

    /// One delta sync of `entity`: pulls the live window and moves the cursor to its end.
    ///
    /// A window longer than `backfill_slice` (days of downtime, a first sync from
    /// `sync.start`) is pulled slice by slice, the cursor moving at the end of each: a failure
    /// or a stop keeps the slices done. A first sync with no `start` is one window: where the
    /// broker's history begins is unknown, and slicing from 1970 would cost a request a slice.
    pub async fn sync(&self, entity: Entity, now: Timestamp) -> Result<RunSummary, EngineError> {
        let window = self.live_window(entity, now)?;
        let slice = self.plan.sync.backfill_slice;
        if window.from == Timestamp::UNIX_EPOCH {
            return self.run(entity, window, Lane::Live).await;
        }
        // The first slice takes the lookback (and activity re-pull) whole and one slice past
        // the cursor: a sync that is merely on time stays one window, however long the
        // lookback; only time the daemon was away is cut into slices.
        let cursor = self
            .store
            .cursor(&self.plan.broker, entity)
            .map_err(|source| self.store_error(entity, source))?;
        let mut to = (cursor.unwrap_or(window.from).max(window.from) + slice).min(window.to);
        let mut from = window.from;
        let mut total = RunSummary::default();
        loop {
            let done = self.run(entity, Window { from, to }, Lane::Live).await?;
            total.pages += done.pages;
            total.pulled += done.pulled;
            total.stats += done.stats;
            if to >= window.to {
                break;
            }
            if self.stop.is_cancelled() {
                return Err(EngineError::Interrupted {
                    broker: self.plan.broker.clone(),
                    entity,
                });
            }
            from = to;
            to = (from + slice).min(window.to);
        }
        Ok(total)
    }

    /// Pulls `window` of `entity` and commits it, moving `lane`'s progress to the window's end
    /// in the same commit as the last page.
    pub async fn run(
        &self,
        entity: Entity,
        window: Window,
        lane: Lane,
    ) -> Result<RunSummary, EngineError> {
        let broker = &self.plan.broker;
        let kind = match lane {
            Lane::Live => "sync",
            Lane::Backfill { .. } => "backfill",
        };
        let run = self
            .store
            .start_run(broker, entity, kind, (window.from, window.to))
            .map_err(|source| self.store_error(entity, source))?;
        // At ERROR level so that it is on whenever any line is: `RUST_LOG=warn` would otherwise
        // drop the span and with it the broker and entity from every warning of the run.
        let span = error_span!("run", broker = %broker, entity = %entity, run_id = run);
        let started = std::time::Instant::now();
        let mut summary = RunSummary::default();
        let result = self
            .pull(entity, window, lane, &mut summary)
            .instrument(span.clone())
            .await;
        let outcome = result
            .as_ref()
            .err()
            .map_or("success", EngineError::outcome);
        telemetry::run_finished(broker, entity, outcome, started.elapsed().as_secs_f64());
        let error = result.as_ref().err().map(ToString::to_string);
        if let Err(e) = self.store.finish_run(
            run,
            outcome,
            summary.pages,
            summary.pulled,
            summary.stats,
            error.as_deref(),
        ) {
            span.in_scope(|| warn!(error = %e, "Could not record the run's end."));
        }
        if let Ok(n) = self.store.quarantine_count(broker, entity) {
            telemetry::quarantine_size(broker, entity, n);
        }
        if outcome == "success" && matches!(lane, Lane::Live) {
            let lag = jiff::Timestamp::now().duration_since(window.to);
            telemetry::cursor_lag(broker, entity, lag.as_secs_f64());
        }
        result.map(|()| summary)
    }

    async fn pull(
        &self,
        entity: Entity,
        window: Window,
        lane: Lane,
        summary: &mut RunSummary,
    ) -> Result<(), EngineError> {
        // A backfill runs one window per slice: its per-slice lines are detail, its summary
        // (logged by the caller) is the news.
        let live = matches!(lane, Lane::Live);
        if live {
            info!(from = %window.from, to = %window.to, "Sync started.");
        } else {
            debug!(from = %window.from, to = %window.to, "Backfill slice started.");
        }
        let mut pager = self.source.pages(entity, window);
        let source_error = |source| EngineError::Source {
            broker: self.plan.broker.clone(),
            entity,
            source,
        };
        // Three stages, each on its own thread where it can: `produce` fetches page N+2 and
        // parses its JSON (here), while page N+1 is normalised and validated on a blocking
        // thread and page N commits on SQLite's. A page is CPU work in each stage, and
        // one thread doing the first two in turn was a backfill's bottleneck.
        //
        // One page of look-ahead: a page is committed once we know whether it is the last,
        // so that the last page's records and the checkpoint share one transaction. The page
        // is delivered (a remote sink posts it) while the next one is fetched.
        //
        // `fetch` takes prepared pages in order, delivers them and hands them to `commit`
        // through a channel of one. Commits stay in page order, each after the one before it.
        let (ready_tx, mut ready) = tokio::sync::mpsc::channel::<Prepared>(1);
        let produce = async move {
            loop {
                let next = match self.next_page(&mut pager).await {
                    Ok(Some(page)) => {
                        let pulled = page.records.len();
                        let mapping = Arc::clone(&self.plan.mapping);
                        let origin = page.origin;
                        let records = page.records;
                        let checked =
                            tokio::task::spawn_blocking(move || prepare(entity, records, &mapping));
                        Ok(Some((checked, origin, pulled)))
                    }
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                };
                let last = !matches!(next, Ok(Some(_)));
                // `fetch` gone (it failed or stopped): nothing more is wanted.
                if ready_tx.send(next).await.is_err() || last {
                    return;
                }
            }
        };
        let (handoff, mut handed) = tokio::sync::mpsc::channel::<(PageBatch, usize)>(1);
        let gather = self.sink.batch_records();
        let fetch = async move {
            let mut current = self
                .next_ready(entity, &mut ready)
                .await
                .map_err(source_error)?;
            while let Some((mut batch, mut pulled)) = current {
                batch.stage_records = !live;
                // Pages joined up to the sink's batch size (the Track360 API takes 1000
                // records a request, a broker serves 500 a page); the window may end, or the
                // broker fail, on the way.
                let mut early: Option<Result<Option<(PageBatch, usize)>, SourceError>> = None;
                while early.is_none() && batch.records.len() + batch.rejects.len() < gather {
                    match self.next_ready(entity, &mut ready).await {
                        Ok(Some((extra, more))) => {
                            pulled += more;
                            batch.records.extend(extra.records);
                            batch.rejects.extend(extra.rejects);
                        }
                        ended_or_failed => early = Some(ended_or_failed),
                    }
                }
                let (delivered, next) = match (early, self.lease_held()) {
                    // The lease may be gone: nothing is delivered (a newer holder may have
                    // delivered newer versions) or committed.
                    (_, Err(lost)) => (Ok(()), Err(lost)),
                    (Some(next), Ok(())) => (self.sink.deliver(&mut batch).await, next),
                    (None, Ok(())) => tokio::join!(
                        self.sink.deliver(&mut batch),
                        self.next_ready(entity, &mut ready)
                    ),
                };
                // Undelivered: nothing of this page is committed and the cursor stays.
                delivered.map_err(|source| EngineError::Sink {
                    broker: self.plan.broker.clone(),
                    entity,
                    source,
                })?;
                let next = match next {
                    Ok(next) => next,
                    // The lease may be gone: the page in hand is neither delivered nor
                    // committed (the new holder reads it again).
                    Err(e @ SourceError::LeaseLost { .. }) => return Err(source_error(e)),
                    Err(e) => {
                        // Keep what was received: commit the page in hand, then fail.
                        let _ = handoff.send((batch, pulled)).await;
                        return Err(source_error(e));
                    }
                };
                batch.progress = match (&next, lane) {
                    (Some(_), _) => Progress::None,
                    (None, Lane::Live) => Progress::Cursor(window.to),
                    (None, Lane::Backfill { since }) => Progress::Backfill {
                        since,
                        done_until: window.to,
                    },
                };
                if handoff.send((batch, pulled)).await.is_err() {
                    // The commit half failed: its error is the run's.
                    return Ok(());
                }
                current = next;
                if current.is_some() && self.stop.is_cancelled() {
                    // The page in hand is committed; the rest of the window waits for the
                    // next run.
                    info!("Stopping after the committed page.");
                    return Err(EngineError::Interrupted {
                        broker: self.plan.broker.clone(),
                        entity,
                    });
                }
            }
            Ok(())
        };
        // Once `fetch` is done (the window read, or a failure, or a stop), a page `produce`
        // is still fetching is not wanted: dropping it drops the request where it stands.
        let fetch = async move {
            tokio::pin!(fetch);
            tokio::select! {
                done = &mut fetch => done,
                () = produce => fetch.await,
            }
        };
        // `move`: a failed commit drops the receiver, which ends `fetch` at its next send
        // instead of leaving it waiting on a full channel.
        let totals = &mut *summary;
        let commit = async move {
            while let Some((batch, pulled)) = handed.recv().await {
                self.finalize(entity, batch, pulled, totals).await?;
            }
            Ok::<(), EngineError>(())
        };
        let (fetched, committed) = tokio::join!(fetch, commit);
        // A failed commit first: no page after it was committed.
        committed?;
        fetched?;
        let s = summary.stats;
        if live {
            info!(
                pages = summary.pages,
                pulled = summary.pulled,
                stored = s.stored,
                quarantined = s.quarantined,
                held = s.held,
                released = s.released.iter().sum::<u64>(),
                "Sync finished."
            );
        } else {
            debug!(
                pages = summary.pages,
                pulled = summary.pulled,
                "Backfill slice finished."
            );
        }
        Ok(())
    }

    /// Runs quarantined records of `entity` through the pipeline again (after the broker's
    /// mapping or the API's rules were fixed): those that pass are delivered and stored and
    /// leave quarantine; the others stay, with today's reasons. Moves no cursor.
    pub async fn replay(
        &self,
        entity: Entity,
        raws: Vec<Value>,
        stage: Stage,
    ) -> Result<RunSummary, EngineError> {
        // A record the API refused was quarantined as posted: Track360-shaped, PII policy
        // applied. It is read as the standard preset would, and not hashed twice.
        let posted = Mapping::standard(self.plan.zone.clone(), PiiPolicy::default());
        let mapping = match stage {
            Stage::Validation => &self.plan.mapping,
            Stage::Delivery => &posted,
        };
        let pulled = raws.len();
        let page = Page {
            records: raws.into_iter().map(RawRecord::Value).collect(),
            origin: "quarantine".into(),
        };
        let mut batch = self.batch(entity, page, mapping);
        self.sink
            .deliver(&mut batch)
            .await
            .map_err(|source| EngineError::Sink {
                broker: self.plan.broker.clone(),
                entity,
                source,
            })?;
        let mut summary = RunSummary::default();
        self.finalize(entity, batch, pulled, &mut summary).await?;
        Ok(summary)
    }

    /// The pager's next page, unless the run's lease goes first: then the request (its rate
    /// limit wait, token fetch and retries included) is dropped where it stands, and nothing
    /// more is asked of the broker. The lease is looked at first on every wake-up, so a
    /// process resumed after a pause past its lease sends nothing.
    pub async fn next_page(
        &self,
        pager: &mut Box<dyn crate::source::Pager + '_>,
    ) -> Result<Option<Page>, SourceError> {
        self.lease_held()?;
        let Some(lease) = &self.lease else {
            return pager.next_page().await;
        };
        tokio::select! {
            biased;
            _ = lease.gone() => Err(SourceError::LeaseLost {
                lease: lease.fence().to_string(),
            }),
            page = pager.next_page() => page,
        }
    }

    /// The next page `produce` fetched, normalised and validated (`None` after the window's
    /// last), or the error that ended the fetching.
    async fn next_ready(
        &self,
        entity: Entity,
        ready: &mut tokio::sync::mpsc::Receiver<Prepared>,
    ) -> Result<Option<(PageBatch, usize)>, SourceError> {
        // `produce` sends a last `Ok(None)` or an error before it ends: a channel closed
        // without one must not read as the window's end (the cursor would move past pages
        // never read).
        let cut_short = |message: &str| SourceError::Query {
            origin: self.plan.broker.clone(),
            message: message.to_owned(),
            retryable: false,
        };
        let Some(next) = ready.recv().await else {
            return Err(cut_short("the page reader stopped before the window's end"));
        };
        let Some((checked, origin, pulled)) = next? else {
            return Ok(None);
        };
        let (records, rejects) = match checked.await {
            Ok(checked) => checked,
            // A panic in validation is a bug: it stays one, here, as it would have been inline.
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // The runtime is shutting down: the page was not checked, so it is not committed.
            Err(_) => return Err(cut_short("validation of a page was cancelled")),
        };
        Ok(Some((
            self.assemble(entity, records, rejects, &origin),
            pulled,
        )))
    }

    /// Whether the run may still ask the broker for a page: without a lease, always.
    fn lease_held(&self) -> Result<(), SourceError> {
        match &self.lease {
            Some(lease) if !lease.is_valid() => Err(SourceError::LeaseLost {
                lease: lease.fence().to_string(),
            }),
            _ => Ok(()),
        }
    }

    /// A page, normalised and validated, ready for the sink (progress decided later).
    fn batch(&self, entity: Entity, page: Page, mapping: &Mapping) -> PageBatch {
        let (records, rejects) = prepare(entity, page.records, mapping);
        self.assemble(entity, records, rejects, &page.origin)
    }

    /// A page's valid records and rejects as a batch for the sink; says what was quarantined.
    fn assemble(
        &self,
        entity: Entity,
        records: Vec<Valid>,
        rejects: Vec<Reject>,
        origin: &str,
    ) -> PageBatch {
        if let Some(first) = rejects.first() {
            // One line per page; `t360-connector quarantine list` shows every record and reason.
            warn!(
                count = rejects.len(),
                first_key = %first.key,
                first_reasons = ?first.reasons,
                origin = %origin,
                "Records quarantined."
            );
        }
        PageBatch {
            broker: self.plan.broker.clone(),
            entity,
            records,
            rejects,
            progress: Progress::None,
            stage_records: false,
            keep_records: true,
            hold_orphans: true,
            fence: self.lease.as_ref().map(|l| l.fence().clone()),
        }
    }

    async fn finalize(
        &self,
        entity: Entity,
        batch: PageBatch,
        pulled: usize,
        summary: &mut RunSummary,
    ) -> Result<(), EngineError> {
        let stats = self.sink.finalize(batch).await.map_err(|source| {
            // Refused by the fence: the lease is gone, whatever this process's clock says.
            if let (StoreError::Fenced(..), Some(lease)) = (&source, &self.lease) {
                lease.lose();
            }
            self.store_error(entity, source)
        })?;
        debug!(records = pulled, stored = stats.stored, "Page stored.");
        telemetry::page_committed(&self.plan.broker, entity, pulled, &stats);
        summary.pages += 1;
        summary.pulled += pulled as u64;
        summary.stats += stats;
        Ok(())
    }

    fn store_error(&self, entity: Entity, source: StoreError) -> EngineError {
        EngineError::Store {
            broker: self.plan.broker.clone(),
            entity,
            source,
        }
    }
}

/// A page `produce` fetched, its normalisation and validation under way (on a blocking
/// thread), with where it came from and how many records it had; `None` after the last.
type Prepared = Result<
    Option<(
        tokio::task::JoinHandle<(Vec<Valid>, Vec<Reject>)>,
        String,
        usize,
    )>,
    SourceError,
>;

/// Normalises and validates a page: valid records and rejects with every reason.
fn prepare(entity: Entity, raw: Vec<RawRecord>, mapping: &Mapping) -> (Vec<Valid>, Vec<Reject>) {
    let mut valid = Vec::with_capacity(raw.len());
    let mut rejects = Vec::new();
    for original in raw {
        match check(entity, original, mapping) {
            Ok(v) => valid.push(v),
            Err(r) => rejects.push(r),
        }
    }
    (valid, rejects)
}

/// One broker record through the pipeline's pure part: field mapping, validation and the
/// personal-data policy. A reject carries every reason and the record as it may be kept.
pub fn check(entity: Entity, original: RawRecord, mapping: &Mapping) -> Result<Valid, Reject> {
    let (result, mapping_reasons, key) = match original.view() {
        Some(view) => {
            let (fields, mapping_reasons) = mapping.fields(entity, &view);
            let result = validate::validate_fields(entity, &fields);
            let failed = result.is_err() || !mapping_reasons.is_empty();
            // The key is made only for a reject: it needs the record as a JSON value.
            let key = failed.then(|| quarantine_key(entity, &fields.to_value()));
            (result, mapping_reasons, key)
        }
        // Only a value can be other than an object (a page's non-object records are values).
        None => {
            let value = match &original {
                RawRecord::Value(value) => Cow::Borrowed(value),
                other => Cow::Owned(other.clone().into_value()),
            };
            let result = validate::validate(entity, &value);
            let key = Some(quarantine_key(entity, &value));
            (result, Vec::new(), key)
        }
    };
    match result {
        Ok(mut record) if mapping_reasons.is_empty() => {
            if let Record::Customer(customer) = &mut record {
                mapping.pii.apply(customer);
            }
            Ok(Valid { record })
        }
        result => {
            // A field that failed to convert also fails validation; its mapping reason
            // (which names the source path) says it better, once.
            let failed = |r: &String| {
                mapping_reasons
                    .iter()
                    .any(|m| m.split(':').next() == r.split(':').next())
            };
            let mut reasons = mapping_reasons.clone();
            reasons.extend(
                result
                    .err()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|r| !failed(r)),
            );
            let mut original = original.into_value();
            mapping.redact_raw(entity, &mut original);
            Err(Reject {
                key: key.unwrap_or_default(),
                raw: original.to_string(),
                reasons,
                stage: Stage::Validation,
            })
        }
    }
}

/// The key a rejected record is quarantined under: its natural key when its key fields are
/// there (the same text `Record::key` gives, so that a fixed re-send finds and clears it),
/// otherwise (or when a key is too long to be one: a hostile page's megabyte string, which
/// would fill every log line that names the key) a digest of the record.
pub fn quarantine_key(entity: Entity, record: &Value) -> String {
    // Characters, as validation counts them: a valid key of 300 CJK characters is 900 bytes.
    const LONGEST_KEY: usize = 500;
    let parts: Option<Vec<String>> = entity
        .key_fields()
        .iter()
        .map(|field| match record.get(*field) {
            Some(Value::String(s))
                if !s.trim().is_empty() && s.chars().nth(LONGEST_KEY).is_none() =>
            {
                Some(s.clone())
            }
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
        .collect();
    match parts {
        Some(parts) => parts.join("|"),
        None => {
            let digest = Sha256::digest(record.to_string().as_bytes());
            let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
            format!("sha256:{hex}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_quarantine_key_is_the_natural_key_unless_it_is_too_long_to_be_one() {
        // 300 CJK characters (900 bytes) are a valid key: a fixed re-send finds it.
        let cjk = "客".repeat(300);
        assert_eq!(
            quarantine_key(Entity::Customers, &json!({"customer_id": cjk})),
            cjk
        );
        let huge = "x".repeat(501);
        let key = quarantine_key(Entity::Customers, &json!({"customer_id": huge}));
        assert!(key.starts_with("sha256:"), "{key}");
    }
}
