//! What each subcommand does. `main.rs` parses the command line and maps results to exit codes.

use std::fmt::Write as _;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use jiff::{Timestamp, Unit};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backfill;
use crate::cli::{
    BackfillArgs, DemoArgs, QuarantineArgs, QuarantineCommand, ReconcileArgs, ReportFormat,
    SampleBrokerArgs, SyncArgs,
};
use crate::config::state::StatePlan;
use crate::config::{self, ConnectorPlan, Loaded, plan::parse_instant};
use crate::engine::Runner;
use crate::model::Entity;
use crate::reconcile;
use crate::sample_broker::{Dataset, DatasetSpec, OAuthClient, Paging, SampleBroker};
use crate::sink::{Sink, Sinks, Stage};
use crate::source::Source;
use crate::state::lease::{Fence, Lease, LeaseLane};
use crate::state::{QuarantineFilter, Store, StoreError};

/// A failure whose message is the whole story (printed as is, exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigProblems(pub String);

/// `check`: every problem of every file, or a summary of what is configured.
pub fn check(config_path: Option<&std::path::Path>) -> anyhow::Result<String> {
    let loaded = config::load(config_path).map_err(|e| ConfigProblems(e.to_string()))?;
    if !loaded.problems.is_empty() {
        let lines: Vec<String> = loaded.problems.iter().map(ToString::to_string).collect();
        return Err(ConfigProblems(lines.join("\n")).into());
    }
    let mut out = String::new();
    for c in &loaded.connectors {
        let entities: Vec<&str> = c.entities.iter().map(|e| e.as_str()).collect();
        let _ = writeln!(
            out,
            "ok  {:<20} {}  {}{}",
            c.broker,
            c.file.display(),
            entities.join(","),
            if c.enabled { "" } else { "  (disabled)" }
        );
    }
    let state = match &loaded.settings.state {
        StatePlan::Sqlite => loaded.settings.database_path().display().to_string(),
        StatePlan::Postgres(pg) => format!("PostgreSQL {}, schema {}", pg.url, pg.schema),
    };
    let _ = write!(
        out,
        "{} connector(s) valid; state in {state}",
        loaded.connectors.len(),
    );
    Ok(out)
}

fn load(config_path: Option<&std::path::Path>) -> anyhow::Result<Loaded> {
    let loaded = config::load(config_path).map_err(|e| ConfigProblems(e.to_string()))?;
    Ok(loaded)
}

fn open_store(loaded: &Loaded) -> anyhow::Result<Arc<Store>> {
    Ok(Arc::new(Store::open_settings(&loaded.settings)?))
}

/// A connector's source and sink, built for one command.
struct Wired {
    source: Arc<dyn Source>,
    sink: Arc<dyn Sink>,
}

impl Wired {
    fn new(plan: &ConnectorPlan, sinks: &Sinks) -> anyhow::Result<Wired> {
        Ok(Wired {
            source: crate::source::for_plan(plan)?,
            sink: sinks.for_connector(plan).map_err(ConfigProblems)?,
        })
    }

    fn runner<'a>(
        &'a self,
        plan: &'a ConnectorPlan,
        store: &'a Store,
        stop: CancellationToken,
    ) -> Runner<'a> {
        Runner {
            plan,
            source: self.source.as_ref(),
            sink: self.sink.as_ref(),
            store,
            stop,
            lease: None,
        }
    }
}

/// The connectors a command acts on: one broker, or every enabled one. Problems in files that
/// are not selected are logged and do not stop the others.
fn select<'a>(loaded: &'a Loaded, broker: Option<&str>) -> anyhow::Result<Vec<&'a ConnectorPlan>> {
    if let Some(broker) = broker {
        return Ok(vec![loaded.connector(broker).map_err(ConfigProblems)?]);
    }
    for problem in &loaded.problems {
        error!(%problem, "Connector file is invalid; its broker is not synced.");
    }
    Ok(loaded.connectors.iter().filter(|c| c.enabled).collect())
}

fn entities(plan: &ConnectorPlan, only: Option<Entity>) -> anyhow::Result<Vec<Entity>> {
    match only {
        Some(e) if !plan.entities.contains(&e) => {
            bail!(
                "{}: entity {e} is not enabled in {}",
                plan.broker,
                plan.file.display()
            )
        }
        Some(e) => Ok(vec![e]),
        None => Ok(plan.entities.clone()),
    }
}

/// A token cancelled by Ctrl-C or SIGTERM: a one-shot command then stops after the page it is
/// committing, as the daemon does.
pub fn stop_on_signal() -> CancellationToken {
    let stop = CancellationToken::new();
    let cancel = stop.clone();
    tokio::spawn(async move {
        crate::daemon::signals::terminated().await;
        warn!("Stopping after the page in flight (signal received).");
        cancel.cancel();
    });
    stop
}

/// `sync`: one delta sync of each selected (broker, entity). Fails if any failed.
pub async fn sync(config_path: Option<&std::path::Path>, args: &SyncArgs) -> anyhow::Result<()> {
    let loaded = load(config_path)?;
    let store = open_store(&loaded)?;
    let sinks = Sinks::new(Arc::clone(&store), &loaded.settings.sink)?;
    let selected = select(&loaded, args.broker.as_deref())?;
    let stop = stop_on_signal();
    let mut failures = Vec::new();
    let mut runs = 0;
    for plan in &selected {
        let wired = Wired::new(plan, &sinks)?;
        for entity in entities(plan, args.entity)? {
            if stop.is_cancelled() {
                break;
            }
            runs += 1;
            // With the postgres state, the live lease: a daemon of the fleet may hold it.
            let held = match CommandLease::take(
                &store,
                &loaded.settings,
                &plan.broker,
                entity,
                LeaseLane::Live,
            )
            .await
            {
                Ok(held) => held,
                Err(e) => {
                    error!(error = %e, "Sync not run.");
                    failures.push(e.to_string());
                    continue;
                }
            };
            let mut runner = wired.runner(plan, &store, stop.clone());
            runner.lease = held.as_ref().map(CommandLease::lease);
            if let Err(e) = runner.sync(entity, Timestamp::now()).await {
                error!(error = %e, "Sync failed; the cursor stays where it was.");
                failures.push(e.to_string());
            }
        }
    }
    if !loaded.problems.is_empty() && args.broker.is_none() {
        failures.push(format!(
            "{} connector file(s) invalid (see `check`)",
            loaded.problems.len()
        ));
    }
    match failures.first() {
        None => Ok(()),
        Some(first) => Err(anyhow!(
            "{} of {runs} sync(s) failed; first: {first}",
            failures.len()
        )),
    }
}

/// `backfill`: re-pull `[since, until]` of a broker, entity by entity, resumably.
pub async fn backfill(
    config_path: Option<&std::path::Path>,
    args: &BackfillArgs,
) -> anyhow::Result<()> {
    let since = parse_instant(&args.since).map_err(|e| anyhow!("--since: {e}"))?;
    let until = match &args.until {
        Some(text) => Some(parse_instant(text).map_err(|e| anyhow!("--until: {e}"))?),
        None => None,
    };
    if until.is_some_and(|u| u < since) {
        bail!(
            "--until {} is before --since {}",
            until.unwrap_or(since),
            since
        );
    }
    let loaded = load(config_path)?;
    let plan = loaded.connector(&args.broker).map_err(ConfigProblems)?;
    let store = open_store(&loaded)?;
    let sinks = Sinks::new(Arc::clone(&store), &loaded.settings.sink)?;
    let wired = Wired::new(plan, &sinks)?;
    let stop = stop_on_signal();
    let now = Timestamp::now();
    for entity in entities(plan, args.entity)? {
        // With the postgres state, the backfill lease: one backfill of a pair at a time.
        let held = CommandLease::take(
            &store,
            &loaded.settings,
            &plan.broker,
            entity,
            LeaseLane::Backfill,
        )
        .await?;
        let mut runner = wired.runner(plan, &store, stop.clone());
        runner.lease = held.as_ref().map(CommandLease::lease);
        let bar = backfill::progress_bar();
        let done = backfill::backfill(&runner, entity, since, until, now, &bar).await;
        bar.finish_and_clear();
        let done = done?;
        info!(
            broker = %plan.broker, %entity, pages = done.pages, pulled = done.pulled,
            stored = done.stats.stored, quarantined = done.stats.quarantined,
            held = done.stats.held, "Backfill finished."
        );
    }
    Ok(())
}

/// A lease held by a one-off command with the postgres state, renewed in the background until
/// dropped, then released.
struct CommandLease {
    lease: Arc<Lease>,
    store: Arc<Store>,
    renew: tokio::task::JoinHandle<()>,
}

impl CommandLease {
    /// `None` with the sqlite state (one host: nothing to share).
    async fn take(
        store: &Arc<Store>,
        settings: &crate::config::Settings,
        broker: &str,
        entity: Entity,
        lane: LeaseLane,
    ) -> anyhow::Result<Option<CommandLease>> {
        let StatePlan::Postgres(plan) = &settings.state else {
            return Ok(None);
        };
        let (ttl, beat) = (plan.lease_ttl, plan.heartbeat);
        let s = Arc::clone(store);
        let (b, l) = (broker.to_owned(), lane);
        let won = tokio::task::spawn_blocking(move || {
            let pg = s.postgres().expect("postgres state");
            let won = pg.acquire(&b, entity, l, ttl)?;
            let holder = match won {
                Some(_) => None,
                None => pg
                    .leases()?
                    .into_iter()
                    .find(|x| x.broker == b && x.entity == entity.as_str() && x.lane == l.as_str())
                    .and_then(|x| x.holder),
            };
            Ok::<_, StoreError>((won, holder, pg.member().to_owned()))
        })
        .await??;
        let (won, holder, me) = won;
        let Some(won) = won else {
            bail!(
                "{broker}/{entity}: its {} lease is held by {} (a member of the fleet is working it); \
                 try again when it is free",
                lane.as_str(),
                holder.unwrap_or_else(|| "another member".into())
            );
        };
        let fence = Fence {
            broker: broker.to_owned(),
            entity,
            lane,
            holder: me,
            epoch: won.epoch,
        };
        let lease = Arc::new(Lease::new(fence, won.sent_at, ttl));
        let (kept, s) = (Arc::clone(&lease), Arc::clone(store));
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(beat).await;
                let (l, s) = (Arc::clone(&kept), Arc::clone(&s));
                let sent_at = std::time::Instant::now();
                let ok = tokio::task::spawn_blocking(move || {
                    s.postgres()
                        .map(|pg| pg.renew(std::slice::from_ref(l.fence()), ttl))
                });
                match ok.await {
                    Ok(Some(Ok(v))) if v.first() == Some(&true) => kept.renewed(sent_at, ttl),
                    Ok(Some(Ok(_))) => {
                        warn!(lease = %kept.fence(), "Lease lost: the command stops before its next request.");
                        kept.lose();
                        return;
                    }
                    // Not renewed this time: the lease runs out locally unless a later
                    // renewal succeeds.
                    _ => warn!(lease = %kept.fence(), "Could not renew the lease."),
                }
            }
        });
        Ok(Some(CommandLease {
            lease,
            store: Arc::clone(store),
            renew,
        }))
    }

    fn lease(&self) -> Arc<Lease> {
        Arc::clone(&self.lease)
    }
}

impl Drop for CommandLease {
    fn drop(&mut self) {
        self.renew.abort();
        self.lease.lose();
        if let Some(pg) = self.store.postgres()
            && let Err(e) = pg.release(self.lease.fence())
        {
            warn!(error = %e, lease = %self.lease.fence(), "Could not release the lease; it expires after the TTL.");
        }
    }
}

/// The store and the broker differ: the report, printed on stdout (exit code 3).
#[derive(Debug)]
pub struct Drift(pub String);

impl std::fmt::Display for Drift {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Drift {}

/// `reconcile`: compares (and with `--repair` repairs) a broker's entities over a day range.
pub async fn reconcile(
    config_path: Option<&std::path::Path>,
    args: &ReconcileArgs,
) -> anyhow::Result<String> {
    let range = reconcile::parse_range(&args.from, &args.to).map_err(|e| anyhow!("{e}"))?;
    let loaded = load(config_path)?;
    let plan = loaded.connector(&args.broker).map_err(ConfigProblems)?;
    let store = open_store(&loaded)?;
    let sinks = Sinks::new(Arc::clone(&store), &loaded.settings.sink)?;
    let wired = Wired::new(plan, &sinks)?;
    let runner = wired.runner(plan, &store, stop_on_signal());
    let delete_gone = embedded_sink(&loaded, plan);
    let mut outcomes = Vec::new();
    for entity in entities(plan, args.entity)? {
        outcomes.push(reconcile::run(&runner, entity, range, args.repair, delete_gone).await?);
    }
    let equal = outcomes.iter().all(reconcile::Outcome::equal);
    let text = match args.format {
        ReportFormat::Json => serde_json::to_string_pretty(&serde_json::json!({
            "equal": equal,
            "reconciliations": outcomes,
        }))?,
        ReportFormat::Table => {
            let mut out = String::new();
            for o in &outcomes {
                out.push_str(&o.before.table());
                if let (Some(repaired), Some(after)) = (&o.repaired, &o.after) {
                    let _ = writeln!(
                        out,
                        "repaired: {} re-sent through the pipeline, {} deleted; after the repair:",
                        repaired.resent, repaired.deleted
                    );
                    out.push_str(&after.table());
                }
                out.push('\n');
            }
            out
        }
    };
    if equal {
        Ok(text)
    } else {
        Err(Drift(text).into())
    }
}

/// Whether the broker's records land in the embedded store (which reconciliation may repair
/// by deleting what the broker no longer has).
fn embedded_sink(loaded: &Loaded, plan: &ConnectorPlan) -> bool {
    use crate::config::plan::SinkKind;
    matches!(
        plan.sink.unwrap_or(loaded.settings.sink.kind),
        SinkKind::Sqlite | SinkKind::Postgres | SinkKind::Both
    )
}

/// `status`: a table of every configured or known (broker, entity).
pub fn status(config_path: Option<&std::path::Path>) -> anyhow::Result<String> {
    let loaded = load(config_path)?;
    let store = open_store(&loaded)?;
    let configured: Vec<(String, Entity)> = loaded
        .connectors
        .iter()
        .flat_map(|c| c.entities.iter().map(|e| (c.broker.clone(), *e)))
        .collect();
    let rows = store.status(&configured)?;
    let now = Timestamp::now();
    let mut table = vec![
        [
            "BROKER",
            "ENTITY",
            "CURSOR",
            "LAG",
            "LAST SUCCESS",
            "STORED",
            "QUARANTINED",
            "HELD",
            "LAST ERROR",
        ]
        .map(String::from),
    ];
    for r in rows {
        let when = |t: Option<Timestamp>| {
            t.map_or("-".to_owned(), |t| {
                t.round(Unit::Second)
                    .map_or(t.to_string(), |t| t.to_string())
            })
        };
        let lag = r
            .cursor
            .map_or("-".to_owned(), |c| human(now.duration_since(c)));
        let error = r.last_error.map_or("-".to_owned(), |(at, e)| {
            let e: String = e.chars().take(80).collect();
            format!("{} {e}", when(Some(at)))
        });
        table.push([
            r.broker,
            r.entity.to_string(),
            when(r.cursor),
            lag,
            when(r.last_success),
            r.stored.to_string(),
            r.quarantined.to_string(),
            r.held.to_string(),
            error,
        ]);
    }
    let mut out = render(&table);
    let reconciled = store.last_reconciliations()?;
    if !reconciled.is_empty() {
        let mut table = vec![
            [
                "RECONCILED",
                "ENTITY",
                "WHEN",
                "DAYS",
                "OUTCOME",
                "MISSING",
                "DIFFERENT",
                "GONE",
                "REPAIRED",
            ]
            .map(String::from)
            .to_vec(),
        ];
        for r in reconciled {
            let when = r
                .finished_at
                .round(Unit::Second)
                .map_or(r.finished_at.to_string(), |t| t.to_string());
            let outcome = match &r.error {
                Some(e) => format!("failed: {}", e.chars().take(60).collect::<String>()),
                None => r.outcome.clone(),
            };
            table.push(vec![
                r.broker,
                r.entity.to_string(),
                when,
                format!("{}..{}", r.range.0, r.range.1),
                outcome,
                r.missing.to_string(),
                r.different.to_string(),
                r.gone.to_string(),
                r.repaired.to_string(),
            ]);
        }
        out.push('\n');
        out.push_str(&render(&table));
    }
    if let (Some(pg), StatePlan::Postgres(plan)) = (store.postgres(), &loaded.settings.state) {
        out.push('\n');
        out.push_str(&fleet_status(pg, plan.lease_ttl, &loaded)?);
    }
    Ok(out)
}

/// The fleet: each member, its last heartbeat, its connectors-folder digest (flagged when it
/// differs from this host's), and what it holds.
fn fleet_status(
    pg: &crate::state::postgres::PgStore,
    ttl: std::time::Duration,
    loaded: &Loaded,
) -> anyhow::Result<String> {
    use crate::daemon::coordinator::{folder_hash, short};
    let mine = folder_hash(&loaded.settings.connectors_dir);
    let leases = pg.leases()?;
    let mut table =
        vec![["MEMBER", "STATE", "LAST HEARTBEAT", "CONFIG", "HOLDS"].map(String::from)];
    let now = Timestamp::now();
    for m in pg.members(ttl)? {
        let holds: Vec<String> = leases
            .iter()
            .filter(|l| l.valid && l.holder.as_deref() == Some(m.id.as_str()))
            .map(|l| {
                format!(
                    "{}/{}{}",
                    l.broker,
                    l.entity,
                    if l.lane == "live" { "" } else { " (backfill)" }
                )
            })
            .collect();
        let config = if m.config_hash == mine {
            short(&m.config_hash).to_owned()
        } else {
            format!("{} DIFFERS", short(&m.config_hash))
        };
        table.push([
            m.id,
            if m.alive { "alive" } else { "silent" }.to_owned(),
            format!("{} ago", human(now.duration_since(m.heartbeat_at))),
            config,
            format!("{}: {}", holds.len(), holds.join(", ")),
        ]);
    }
    let unheld: Vec<String> = leases
        .iter()
        .filter(|l| !l.valid)
        .map(|l| format!("{}/{}", l.broker, l.entity))
        .collect();
    let mut out = render(&table);
    if !unheld.is_empty() {
        let more = unheld.len().saturating_sub(6);
        let _ = writeln!(
            out,
            "{} lease(s) held by no live member (taken at a member's next heartbeat): {}{}",
            unheld.len(),
            unheld[..unheld.len().min(6)].join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
    Ok(out)
}

/// Rows as left-aligned columns two spaces apart.
fn render<R: AsRef<[String]>>(table: &[R]) -> String {
    let columns = table.first().map_or(0, |r| r.as_ref().len());
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            table
                .iter()
                .map(|row| row.as_ref()[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in table {
        let line: Vec<String> = row
            .as_ref()
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// `quarantine list|retry|purge`.
pub async fn quarantine(
    config_path: Option<&std::path::Path>,
    action: &QuarantineCommand,
) -> anyhow::Result<String> {
    let loaded = load(config_path)?;
    let store = open_store(&loaded)?;
    let filter = |a: &QuarantineArgs| QuarantineFilter {
        broker: a.broker.clone(),
        entity: a.entity,
        key: a.key.clone(),
    };
    match action {
        QuarantineCommand::List(args) => {
            let mut out = String::new();
            for q in store.quarantine(&filter(args))? {
                let _ = writeln!(
                    out,
                    "{} {} {} ({}, seen {}×): {}",
                    q.broker,
                    q.entity,
                    q.key,
                    q.stage.as_str(),
                    q.times_seen,
                    q.reasons.join("; ")
                );
                let _ = writeln!(out, "    {}", q.raw);
            }
            Ok(out)
        }
        QuarantineCommand::Purge(args) => {
            let f = filter(&args.filter);
            if f.broker.is_none() && f.entity.is_none() && f.key.is_none() && !args.all {
                bail!("purge needs --broker, --entity or --key, or --all for everything");
            }
            let n = store.purge_quarantine(&f)?;
            Ok(format!("{n} quarantined record(s) purged"))
        }
        QuarantineCommand::Retry(args) => retry(&loaded, &store, &filter(args)).await,
    }
}

/// Replays quarantined records broker by broker, entity by entity, stage by stage.
async fn retry(
    loaded: &Loaded,
    store: &Arc<Store>,
    filter: &QuarantineFilter,
) -> anyhow::Result<String> {
    let sinks = Sinks::new(Arc::clone(store), &loaded.settings.sink)?;
    let rows = store.quarantine(filter)?;
    let mut groups: std::collections::BTreeMap<
        (String, String, &'static str),
        Vec<serde_json::Value>,
    > = Default::default();
    let mut unreadable = 0;
    for q in rows {
        match serde_json::from_str(&q.raw) {
            Ok(raw) => groups
                .entry((q.broker, q.entity, q.stage.as_str()))
                .or_default()
                .push(raw),
            Err(_) => unreadable += 1,
        }
    }
    let mut out = String::new();
    for ((broker, entity, stage), raws) in groups {
        let plan = loaded.connector(&broker).map_err(ConfigProblems)?;
        let entity: Entity = entity.parse().map_err(anyhow::Error::msg)?;
        let wired = Wired::new(plan, &sinks)?;
        let runner = wired.runner(plan, store, CancellationToken::new());
        let stage = if stage == "delivery" {
            Stage::Delivery
        } else {
            Stage::Validation
        };
        let tried = raws.len();
        let done = runner.replay(entity, raws, stage).await?;
        let _ = writeln!(
            out,
            "{broker} {entity}: {tried} retried, {} passed, {} still quarantined, {} held",
            done.stats.unquarantined, done.stats.quarantined, done.stats.held
        );
    }
    if unreadable > 0 {
        let _ = writeln!(
            out,
            "{unreadable} record(s) with an unreadable raw payload were left alone"
        );
    }
    if out.is_empty() {
        out.push_str("nothing quarantined matches");
    }
    Ok(out)
}

fn human(d: jiff::SignedDuration) -> String {
    let s = d.as_secs();
    match s {
        s if s < 0 => "-".into(),
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The sample broker's data set for the given command-line sizes.
fn sample_data(args: &SampleBrokerArgs) -> Dataset {
    Dataset::generate(&DatasetSpec {
        customers: args.customers,
        transactions: args.transactions,
        activity: args.activity,
        invalid_every: args.invalid_every,
        ..DatasetSpec::default()
    })
}

async fn start_sample_broker(args: &SampleBrokerArgs) -> anyhow::Result<SampleBroker> {
    let paging = if args.page_numbers {
        Paging::PageNumber
    } else {
        Paging::Cursor
    };
    let broker = SampleBroker::start(args.listen, sample_data(args), paging, None)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    // The legacy API sits behind OAuth2 (connectors/legacy-broker.toml). This is the sample's
    // own made-up credential, not a secret of anyone's.
    broker.enable_oauth(OAuthClient {
        client_id: "sample-client".into(),
        client_secret: std::env::var("SAMPLE_BROKER_CLIENT_SECRET")
            .unwrap_or_else(|_| SAMPLE_CLIENT_SECRET.into()),
        ttl: std::time::Duration::from_secs(3600),
    });
    Ok(broker)
}

/// `sample-broker`: serves until interrupted.
pub async fn sample_broker(args: &SampleBrokerArgs) -> anyhow::Result<()> {
    let broker = start_sample_broker(args).await?;
    info!(url = %broker.base_url(), "Sample broker serving; Ctrl-C stops it.");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}

/// The sample broker's made-up OAuth2 client secret, which `connectors/legacy-broker.toml` reads
/// from `LEGACY_BROKER_CLIENT_SECRET`.
pub const SAMPLE_CLIENT_SECRET: &str = "sample-secret";

/// For `demo` only, before any thread starts: gives the legacy sample connector the sample
/// broker's credential unless the caller set one.
pub fn demo_credentials() {
    if std::env::var_os("LEGACY_BROKER_CLIENT_SECRET").is_none() {
        // SAFETY: called from `main` before the runtime or any other thread exists, so nothing
        // reads the environment concurrently.
        unsafe { std::env::set_var("LEGACY_BROKER_CLIENT_SECRET", SAMPLE_CLIENT_SECRET) };
    }
}

/// `run`: the daemon, until SIGTERM/SIGINT.
pub async fn run(config_path: Option<&std::path::Path>) -> anyhow::Result<()> {
    let settings = config::load_settings(config_path).map_err(|e| ConfigProblems(e.to_string()))?;
    crate::daemon::run(settings, CancellationToken::new()).await
}

/// `demo`: the sample broker on a free port, the daemon against it on fast schedules while new
/// records arrive, then the status table.
pub async fn demo(
    config_path: Option<&std::path::Path>,
    args: &DemoArgs,
) -> anyhow::Result<String> {
    let mut settings =
        config::load_settings(config_path).map_err(|e| ConfigProblems(e.to_string()))?;
    let sizes = SampleBrokerArgs {
        listen: "127.0.0.1:0".parse().expect("loopback address"),
        customers: 200,
        transactions: 600,
        activity: 800,
        invalid_every: 50,
        page_numbers: false,
    };
    let broker = start_sample_broker(&sizes).await?;
    info!(url = %broker.base_url(), "Sample broker started on a free port.");
    settings.connectors_dir = demo_connectors(&settings, &broker.base_url())?;
    // The demo's own daemon serves no HTTP: a production one may hold the port already.
    settings.daemon.listen = None;

    let stop = CancellationToken::new();
    let arrivals = tokio::spawn(arrive(broker.clone(), stop.clone()));
    let timer = {
        let stop = stop.clone();
        let seconds = args.seconds;
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(seconds)).await;
            stop.cancel();
        })
    };
    info!(
        seconds = args.seconds,
        "Running the daemon against it; new records arrive every second."
    );
    let result = crate::daemon::run(settings, stop.clone()).await;
    stop.cancel();
    timer.abort();
    let _ = arrivals.await;
    result?;
    status(config_path)
}

/// Copies of the connector files pointed at the sample broker's port, on fast schedules.
fn demo_connectors(
    settings: &config::Settings,
    base_url: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let dir = settings.state_dir.join("demo-connectors");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|x| x == "toml") {
            std::fs::remove_file(&path)?;
        }
    }
    for entry in std::fs::read_dir(&settings.connectors_dir)
        .with_context(|| format!("cannot read {}", settings.connectors_dir.display()))?
    {
        let path = entry?.path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let mut text = std::fs::read_to_string(&path)?
            .replace("http://127.0.0.1:8700", base_url)
            .replace("settle = \"30s\"", "settle = \"1s\"");
        // Fast schedules: every two or three seconds instead of minutes and days.
        text = text
            .replace(
                "customers = \"*/5 * * * *\"",
                "customers = \"*/2 * * * * *\"",
            )
            .replace(
                "transactions = \"*/5 * * * *\"",
                "transactions = \"*/2 * * * * *\"",
            )
            .replace(
                "trading_activity = \"15 6 * * *\"",
                "trading_activity = \"*/3 * * * * *\"",
            );
        if !text.contains("[schedule]") {
            text.push_str(
                "\n[schedule]\ncustomers = \"*/2 * * * * *\"\ntransactions = \"*/2 * * * * *\"\ntrading_activity = \"*/3 * * * * *\"\n",
            );
        }
        let name = path.file_name().expect("a file has a name");
        std::fs::write(dir.join(name), text)?;
    }
    Ok(dir)
}

/// New customers and deposits at the sample broker, one of each a second, until `stop`.
async fn arrive(broker: SampleBroker, stop: CancellationToken) {
    let mut n = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
        n += 1;
        let now = Timestamp::now().to_string();
        broker.with_data(|d| {
            d.put(
                Entity::Customers,
                serde_json::json!({"customer_id": format!("NEW-{n}"), "signup_date": now,
                    "last_modified_date": now, "affiliate_id": "IB001", "country_code": "CY"}),
            );
            d.put(
                Entity::Transactions,
                serde_json::json!({"transaction_id": format!("NEW-DEP-{n}"), "customer_id": format!("NEW-{n}"),
                    "transaction_type": "deposit", "amount": "250.00", "currency": "USD",
                    "transaction_date": now, "status": "approved", "last_modified_date": now}),
            );
        });
    }
}
