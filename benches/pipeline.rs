//! The pipeline benchmark: `cargo bench --bench pipeline -- [--sizes 100k,1m,10m]`.
//!
//! For each size N (customers : transactions : trading activity = 1 : 2 : 2), on loopback:
//!
//! - (a) raw download: a bare reqwest client reads every page of every entity, unparsed;
//! - (b) store ceiling: a minimal rusqlite upsert loop in key order (WAL, 500 rows a transaction);
//!   and, with `--parts …r…`, (r) the same loop in the broker's (modified) order, as a backfill
//!   writes: the random-B-tree-page share of (c)'s cost;
//! - (c) `t360-connector backfill` (the release binary, a child process) from the synthetic REST
//!   broker into a fresh embedded store: wall, records/s, the child's CPU (`wait4`) and peak
//!   RSS (its own VmHWM), and the store must hold exactly N rows;
//! - (d) the same from PostgreSQL when `T360_TEST_POSTGRES_URL` is set.
//!
//! Then, once: (e) a backfill against a broker that allows `--rate` requests a minute, (f)
//! delivery to the mock Track360 ingestion API at its rate limit, and (g) the daemon idle with
//! `--idle-connectors` (500) connector files: its CPU share of a core and its RSS.
//!
//! Flags: `--sizes 100k,1m` `--parts abcdefg` (add `r` for (r)) `--rate 300` `--rate-requests 300`
//! `--sink-rate 300` `--sink-batch 1000` `--sink-requests 150` `--idle-connectors 500`
//! `--idle-seconds 60` `--quiet-wait 60` (seconds to wait before each measurement for other
//! processes to use under 10 % of the machine; 0: don't).

#[path = "pipeline/broker.rs"]
mod broker;
#[path = "pipeline/dataset.rs"]
mod dataset;
#[path = "../tests/support/measure.rs"]
mod measure;
#[path = "pipeline/pg.rs"]
mod pg;
#[path = "pipeline/run.rs"]
mod run;
#[path = "pipeline/store.rs"]
mod store;
#[path = "../tests/support/track360.rs"]
#[allow(dead_code)]
mod track360;

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};

use broker::Broker;
use dataset::{Ent, Gen, START, Sizes};
use run::{ChildStats, Setup};

/// The mock ingestion API's money and lots fields (`super::DECIMAL_FIELDS` in its module).
const DECIMAL_FIELDS: [&str; 6] = [
    "amount",
    "lots_traded",
    "volume_usd",
    "spread_cost",
    "commission",
    "pnl",
];

const PER_PAGE: u64 = 500;
/// The connector's rate limit where it should not matter: 833k records/s at 500 a page.
const NO_LIMIT: &str = "100000/min";

struct Opts {
    sizes: Vec<u64>,
    parts: String,
    rate: u64,
    rate_requests: u64,
    sink_rate: u64,
    sink_batch: u64,
    sink_requests: u64,
    quiet_wait: Duration,
    idle_connectors: u64,
    idle_seconds: u64,
}

fn parse_count(text: &str) -> anyhow::Result<u64> {
    let t = text.trim().to_ascii_lowercase().replace('_', "");
    let (digits, factor) = match t.strip_suffix('k') {
        Some(d) => (d, 1_000.0),
        None => match t.strip_suffix('m') {
            Some(d) => (d, 1_000_000.0),
            None => (t.as_str(), 1.0),
        },
    };
    let value: f64 = digits
        .parse()
        .with_context(|| format!("`{text}` is not a count such as 100k or 1m"))?;
    Ok((value * factor).round() as u64)
}

fn opts() -> anyhow::Result<Opts> {
    let mut o = Opts {
        sizes: vec![100_000, 1_000_000],
        parts: "abcdefg".into(),
        rate: 300,
        rate_requests: 0,
        sink_rate: 300,
        sink_batch: 1000,
        sink_requests: 150,
        quiet_wait: Duration::from_secs(60),
        idle_connectors: 500,
        idle_seconds: 60,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        // `cargo bench` passes `--bench`; filters of libtest mean nothing here.
        if name == "--bench" {
            continue;
        }
        let mut value = || -> anyhow::Result<String> {
            inline
                .clone()
                .or_else(|| args.next())
                .with_context(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "--sizes" => {
                o.sizes = value()?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(parse_count)
                    .collect::<anyhow::Result<_>>()?
            }
            "--parts" => o.parts = value()?,
            "--rate" => o.rate = parse_count(&value()?)?,
            "--rate-requests" => o.rate_requests = parse_count(&value()?)?,
            "--sink-rate" => o.sink_rate = parse_count(&value()?)?,
            "--sink-batch" => o.sink_batch = parse_count(&value()?)?,
            "--sink-requests" => o.sink_requests = parse_count(&value()?)?,
            "--quiet-wait" => o.quiet_wait = Duration::from_secs(parse_count(&value()?)?),
            "--idle-connectors" => o.idle_connectors = parse_count(&value()?)?.max(1),
            "--idle-seconds" => o.idle_seconds = parse_count(&value()?)?.max(1),
            "-h" | "--help" => {
                println!(
                    "cargo bench --bench pipeline -- [--sizes 100k,1m,10m] [--parts abcdefg] \
                     [--rate 300] [--rate-requests N] [--sink-rate 300] [--sink-batch 1000] \
                     [--sink-requests 150] [--quiet-wait 60] [--idle-connectors 500] \
                     [--idle-seconds 60]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument `{other}` (try --help)"),
        }
    }
    if o.rate_requests == 0 {
        o.rate_requests = o.rate;
    }
    ensure!(
        o.rate > 0 && o.sink_rate > 0 && o.sink_batch > 0,
        "rates and batch must be > 0"
    );
    ensure!(
        o.sizes.iter().all(|&n| n >= 5),
        "sizes must be at least 5 records"
    );
    Ok(o)
}

fn ts(secs: i64) -> String {
    let mut s = String::new();
    dataset::push_ts(&mut s, secs);
    s
}

fn per_sec(count: u64, wall: Duration) -> f64 {
    count as f64 / wall.as_secs_f64().max(1e-9)
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// One measurement: a table row and a JSON line.
#[derive(Default)]
struct Measure {
    part: &'static str,
    what: String,
    records: u64,
    wall: Duration,
    bytes: Option<u64>,
    /// The child's user + sys ((c), (d)), or this process's ((a), (b)).
    cpu: Option<Duration>,
    rss_kib: Option<u64>,
    /// This process (the broker) during a child's run.
    broker_cpu: Option<Duration>,
    /// Every other process's CPU, as a share of the machine (PostgreSQL's own in (d)).
    others: f64,
    /// records/s over those of (a) and (b).
    ratios: Vec<(&'static str, f64)>,
    extra: serde_json::Map<String, Value>,
}

impl Measure {
    fn rate(&self) -> f64 {
        per_sec(self.records, self.wall)
    }

    fn json(&self, size: u64) -> Value {
        let us = |d: Option<Duration>| {
            d.map(|d| round(d.as_secs_f64() * 1e6 / self.records.max(1) as f64, 2))
        };
        let mut v = json!({
            "bench": "pipeline",
            "part": self.part,
            "what": self.what,
            "size": size,
            "records": self.records,
            "wall_s": round(self.wall.as_secs_f64(), 3),
            "records_per_s": self.rate().round(),
            "mb_per_s": self.bytes.map(|b| round(b as f64 / 1e6 / self.wall.as_secs_f64(), 1)),
            "cpu_s": self.cpu.map(|d| round(d.as_secs_f64(), 3)),
            "cpu_us_per_record": us(self.cpu),
            "peak_rss_mib": self.rss_kib.map(|k| round(k as f64 / 1024.0, 1)),
            "broker_cpu_us_per_record": us(self.broker_cpu),
            "other_cpu_pct": round(self.others * 100.0, 1),
        });
        let o = v.as_object_mut().expect("an object");
        for (name, ratio) in &self.ratios {
            o.insert((*name).into(), json!(round(*ratio, 3)));
        }
        o.extend(self.extra.clone());
        o.retain(|_, value| !value.is_null());
        v
    }
}

fn child_measure(part: &'static str, what: &str, records: u64, s: ChildStats) -> Measure {
    Measure {
        part,
        what: what.into(),
        records,
        wall: s.wall,
        cpu: Some(s.cpu),
        rss_kib: Some(s.max_rss_kib),
        broker_cpu: Some(s.self_cpu),
        others: s.others,
        ..Measure::default()
    }
}

/// The REST connector file for the synthetic broker.
fn rest_connector(base_url: &str, rate_limit: &str) -> String {
    format!(
        r#"broker = "bench"
kind = "rest"
preset = "track360-standard"
timezone = "UTC"
entities = ["customers", "transactions", "trading_activity"]

[rest]
base_url = "{base_url}"
allow_http = true
per_page = {PER_PAGE}
rate_limit = "{rate_limit}"
max_retry_time = "5m"

[rest.auth]
type = "none"

[sync]
settle = "0s"
backfill_slice = "30d"
"#
    )
}

fn backfill_args(broker: &str, sizes: Sizes) -> Vec<String> {
    [
        "backfill",
        "--broker",
        broker,
        "--since",
        &ts(START),
        "--until",
        &ts(sizes.end()),
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The store must hold exactly the data set: a benchmark that stores nothing fails here.
fn check_store(setup: &Setup, sizes: Sizes, what: &str) -> anyhow::Result<()> {
    let counts = store::count_rows(&setup.store())
        .with_context(|| format!("{what}: cannot read the store"))?;
    if counts != sizes.n {
        bail!(
            "{what}: the store holds {counts:?} rows (customers, transactions, activity), \
             expected {:?}; quarantine {}, held {}; the connector's log ends:\n{}",
            sizes.n,
            store::count_table(&setup.store(), "quarantine"),
            store::count_table(&setup.store(), "held"),
            setup.log_tail()
        );
    }
    Ok(())
}

/// (a) every page of every entity, unparsed.
async fn raw_download(data: &Gen) -> anyhow::Result<Measure> {
    let broker = Broker::start(*data, None).await;
    let client = reqwest::Client::builder()
        .build()
        .context("build the reqwest client")?;
    let (from, to) = (ts(START), ts(data.sizes.end()));
    let probe = run::Probe::start();
    let started = Instant::now();
    let mut bytes = 0u64;
    for e in Ent::ALL {
        let pages = data.sizes.of(e).div_ceil(PER_PAGE).max(1);
        for page in 1..=pages {
            let url = format!(
                "{}/api/v1/forex/{}?page={page}&per_page={PER_PAGE}&last_modified_from={from}&last_modified_to={to}",
                broker.base_url(),
                e.segment()
            );
            let response = client.get(&url).send().await?;
            ensure!(
                response.status().is_success(),
                "(a) {url}: {}",
                response.status()
            );
            bytes += response.bytes().await?.len() as u64;
        }
    }
    let wall = started.elapsed();
    ensure!(
        broker.counters().bytes == bytes,
        "(a) read {bytes} bytes, the broker sent {}",
        broker.counters().bytes
    );
    let (cpu, others) = probe.finish(Duration::ZERO);
    Ok(Measure {
        part: "a",
        what: "raw download (reqwest, unparsed)".into(),
        records: data.sizes.total(),
        wall,
        bytes: Some(bytes),
        cpu: Some(cpu),
        others,
        ..Measure::default()
    })
}

/// (b) the rusqlite ceiling, in a thread of its own (it blocks); (r) the same in broker order.
async fn ceiling(data: &Gen, in_key_order: bool) -> anyhow::Result<Measure> {
    let data = *data;
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir()?;
        let probe = run::Probe::start();
        let wall = store::ceiling(&data, dir.path(), in_key_order)?;
        let (cpu, others) = probe.finish(Duration::ZERO);
        Ok(Measure {
            part: if in_key_order { "b" } else { "r" },
            what: if in_key_order {
                "store ceiling (rusqlite, key order)"
            } else {
                "store ceiling (rusqlite, broker order)"
            }
            .into(),
            records: data.sizes.total(),
            wall,
            cpu: Some(cpu),
            others,
            ..Measure::default()
        })
    })
    .await?
}

/// (c) `backfill` from the synthetic broker into a fresh store.
async fn rest_backfill(data: &Gen) -> anyhow::Result<Measure> {
    let broker = Broker::start(*data, None).await;
    let dir = tempfile::tempdir()?;
    let setup = Setup::new(
        dir.path(),
        "",
        "bench",
        &rest_connector(&broker.base_url(), NO_LIMIT),
    );
    let stats = run::connector(&setup, &backfill_args("bench", data.sizes), &[]).await?;
    check_store(&setup, data.sizes, "(c)")?;
    let mut m = child_measure("c", "backfill REST -> SQLite", data.sizes.total(), stats);
    m.bytes = Some(broker.counters().bytes);
    m.extra
        .insert("requests".into(), json!(broker.counters().served));
    Ok(m)
}

/// (d) `backfill` from PostgreSQL, or why not.
async fn pg_backfill(sizes: Sizes) -> anyhow::Result<Option<Measure>> {
    let Ok(url) = std::env::var("T360_TEST_POSTGRES_URL") else {
        println!("(d) skipped: T360_TEST_POSTGRES_URL unset");
        return Ok(None);
    };
    // The connector refuses a password in the URL: it goes through password_env instead.
    let mut parsed = url::Url::parse(&url).context("T360_TEST_POSTGRES_URL")?;
    let password = parsed.password().map(str::to_owned);
    let _ = parsed.set_password(None);
    let replica = pg::Replica::connect(&url).await.context("(d) connect")?;
    let outcome = async {
        let filled = replica.fill(sizes).await.context("(d) generate the rows")?;
        let s = &replica.schema;
        let password_line = if password.is_some() {
            "password_env = \"BENCH_PG_PASSWORD\"\n"
        } else {
            ""
        };
        let connector = format!(
            r#"broker = "bench-pg"
kind = "postgres"
timezone = "UTC"
entities = ["customers", "transactions", "trading_activity"]

[sql]
url = "{parsed}"
{password_line}tls = "disable"

[sql.customers]
table = "{s}.customers"

[sql.transactions]
table = "{s}.transactions"

[sql.trading_activity]
table = "{s}.trading_activity"

[sync]
settle = "0s"
backfill_slice = "30d"
"#
        );
        let dir = tempfile::tempdir()?;
        let setup = Setup::new(dir.path(), "", "bench-pg", &connector);
        let env: Vec<(String, String)> = password
            .iter()
            .map(|p| ("BENCH_PG_PASSWORD".to_owned(), p.clone()))
            .collect();
        let stats = run::connector(&setup, &backfill_args("bench-pg", sizes), &env).await?;
        check_store(&setup, sizes, "(d)")?;
        let mut m = child_measure("d", "backfill PostgreSQL -> SQLite", sizes.total(), stats);
        m.broker_cpu = None;
        m.extra
            .insert("generate_s".into(), json!(round(filled.as_secs_f64(), 1)));
        anyhow::Ok(m)
    }
    .await;
    replica.drop_schema().await.context("(d) drop the schema")?;
    outcome.map(Some)
}

/// (e) a backfill against a broker allowing `rate` requests a minute (sliding window).
async fn rate_limited(o: &Opts) -> anyhow::Result<Measure> {
    let sizes = Sizes::split(o.rate_requests * PER_PAGE);
    let data = Gen::new(sizes);
    let broker = Broker::start(data, Some((o.rate as usize, Duration::from_secs(60)))).await;
    let dir = tempfile::tempdir()?;
    let setup = Setup::new(
        dir.path(),
        "",
        "bench",
        &rest_connector(&broker.base_url(), &format!("{}/min", o.rate)),
    );
    let stats = run::connector(&setup, &backfill_args("bench", sizes), &[]).await?;
    check_store(&setup, sizes, "(e)")?;
    let c = broker.counters();
    let achieved = c.served as f64 / stats.wall.as_secs_f64() * 60.0;
    let mut m = child_measure("e", "backfill, broker rate-limited", sizes.total(), stats);
    m.bytes = Some(c.bytes);
    let x = &mut m.extra;
    x.insert("budget_per_min".into(), json!(o.rate));
    x.insert("requests".into(), json!(c.served));
    x.insert("achieved_per_min".into(), json!(round(achieved, 1)));
    x.insert(
        "achieved_over_budget".into(),
        json!(round(achieved / o.rate as f64, 3)),
    );
    let between = c.served.saturating_sub(1) as f64 / c.span.as_secs_f64().max(1e-9) * 60.0;
    x.insert("first_to_last_per_min".into(), json!(round(between, 1)));
    x.insert("max_in_60s".into(), json!(c.max_in_window));
    x.insert("http_429".into(), json!(c.throttled));
    Ok(m)
}

/// (g) `t360-connector run` with `--idle-connectors` connector files scheduled daily: once
/// every entity has caught up (empty windows), its CPU over `--idle-seconds` and its RSS.
async fn idle_daemon(o: &Opts) -> anyhow::Result<()> {
    let broker = Broker::start(Gen::new(Sizes::split(1_000)), None).await;
    let dir = tempfile::tempdir()?;
    let base = broker.base_url();
    // Every entity catches up once at start, over an empty window (no data since `start`).
    let file = |i: u64| {
        rest_connector(&base, NO_LIMIT).replace("broker = \"bench\"", &format!("broker = \"b{i}\""))
            + "start = \"2099-01-01\"\n[schedule]\ncustomers = \"0 3 * * *\"\n\
               transactions = \"0 3 * * *\"\ntrading_activity = \"0 3 * * *\"\n"
    };
    let setup = Setup::new(dir.path(), "[daemon]\nlisten = \"off\"\n", "b0", &file(0));
    for i in 1..o.idle_connectors {
        std::fs::write(
            setup.dir.join("connectors").join(format!("b{i}.toml")),
            file(i),
        )?;
    }
    let log = std::fs::File::create(setup.log())?;
    let mut child = std::process::Command::new(run::BINARY)
        .arg("-c")
        .arg(setup.dir.join("settings.toml"))
        .arg("run")
        .current_dir(&setup.dir)
        .stdout(log.try_clone()?)
        .stderr(log)
        .env("RUST_LOG", "warn")
        .spawn()?;
    let pid = child.id();
    let ticks = || -> anyhow::Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // utime and stime: fields 14 and 15, after the parenthesised command name.
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
    };
    // Catch-up: wait until the daemon's CPU stops moving (every run finished).
    let mut last = ticks()?;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = ticks()?;
        ensure!(
            child.try_wait()?.is_none(),
            "the daemon exited:\n{}",
            setup.log_tail()
        );
        if now - last <= 5 {
            break;
        }
        last = now;
    }
    let before = ticks()?;
    tokio::time::sleep(Duration::from_secs(o.idle_seconds)).await;
    let spent = ticks()? - before;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: SIGTERM to our own child.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    child.wait()?;
    // Clock ticks are 1/100 s on Linux.
    let core_share = spent as f64 / 100.0 / o.idle_seconds as f64;
    println!(
        "(g) idle daemon, {} connector files ({} entity loops): {:.2} % of a core over {} s, \
         RSS {:.1} MiB (peak {:.1} MiB)",
        o.idle_connectors,
        o.idle_connectors * 3,
        core_share * 100.0,
        o.idle_seconds,
        kib("VmRSS:") as f64 / 1024.0,
        kib("VmHWM:") as f64 / 1024.0,
    );
    println!(
        "{}",
        json!({"bench": "pipeline", "part": "g", "connectors": o.idle_connectors,
               "idle_seconds": o.idle_seconds, "core_share": round(core_share, 4),
               "rss_mib": round(kib("VmRSS:") as f64 / 1024.0, 1),
               "peak_rss_mib": round(kib("VmHWM:") as f64 / 1024.0, 1)})
    );
    Ok(())
}

/// (f) delivery to the mock Track360 ingestion API at its rate limit.
async fn delivery(o: &Opts) -> anyhow::Result<Measure> {
    let sizes = Sizes::split(o.sink_requests * o.sink_batch);
    let data = Gen::new(sizes);
    let broker = Broker::start(data, None).await;
    let ingestion =
        track360::Ingestion::start(o.sink_batch as usize, Duration::from_secs(3600)).await;
    ingestion.set_rate_limit(o.sink_rate as usize, Duration::from_secs(60));
    let dir = tempfile::tempdir()?;
    let secret = dir.path().join("t360-secret");
    std::fs::write(&secret, track360::CLIENT_SECRET)?;
    let sink = ingestion.settings(
        "track360",
        &secret,
        &format!(
            "batch_size = {}\nrate_limit = \"{}/min\"\nmax_retry_time = \"5m\"",
            o.sink_batch, o.sink_rate
        ),
    );
    let setup = Setup::new(
        dir.path(),
        &sink,
        "bench",
        &rest_connector(&broker.base_url(), NO_LIMIT),
    );
    let stats = run::connector(&setup, &backfill_args("bench", sizes), &[]).await?;
    let delivered: [u64; 3] =
        t360_connector::model::Entity::ALL.map(|e| ingestion.records(e).len() as u64);
    ensure!(
        delivered == sizes.n,
        "(f) the ingestion API holds {delivered:?}, expected {:?}; quarantine {}; log ends:\n{}",
        sizes.n,
        store::count_table(&setup.store(), "quarantine"),
        setup.log_tail()
    );
    let (throttled, oversized, largest, _, _) = ingestion.manners();
    let posts = ingestion.posts();
    let max_rate = o.sink_rate as f64 * o.sink_batch as f64 / 60.0;
    let mut m = child_measure(
        "f",
        "backfill -> Track360 API, rate-limited",
        sizes.total(),
        stats,
    );
    let rate = m.rate();
    let x = &mut m.extra;
    x.insert("budget_per_min".into(), json!(o.sink_rate));
    x.insert("batch_size".into(), json!(o.sink_batch));
    x.insert("budget_max_records_per_s".into(), json!(round(max_rate, 1)));
    x.insert(
        "records_over_budget_max".into(),
        json!(round(rate / max_rate, 3)),
    );
    x.insert("posts".into(), json!(posts));
    x.insert(
        "records_per_post".into(),
        json!(round(sizes.total() as f64 / posts.max(1) as f64, 1)),
    );
    x.insert("largest_batch".into(), json!(largest));
    x.insert("oversized".into(), json!(oversized));
    x.insert(
        "posts_per_min".into(),
        json!(round(posts as f64 / m.wall.as_secs_f64() * 60.0, 1)),
    );
    x.insert("http_429".into(), json!(throttled));
    Ok(m)
}

fn print_header(title: &str) {
    println!("\n== {title} ==");
    println!(
        "{:<4} {:<40} {:>10} {:>8} {:>10} {:>7} {:>9} {:>8} {:>9} {:>6} {:>6} {:>7}",
        "part",
        "measurement",
        "records",
        "wall s",
        "records/s",
        "MB/s",
        "CPU µs/r",
        "RSS MiB",
        "brkr µs/r",
        "÷(a)",
        "÷(b)",
        "others%"
    );
}

/// A measurement's table row, printed as soon as it is done.
fn print_row(m: &Measure) {
    let per = |d: Option<Duration>| {
        d.map_or("-".into(), |d| {
            format!("{:.1}", d.as_secs_f64() * 1e6 / m.records.max(1) as f64)
        })
    };
    let ratio = |name: &str| {
        m.ratios
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("-".into(), |(_, r)| format!("{r:.2}"))
    };
    println!(
        "({})  {:<40} {:>10} {:>8.2} {:>10.0} {:>7} {:>9} {:>8} {:>9} {:>6} {:>6} {:>7.1}",
        m.part,
        m.what,
        m.records,
        m.wall.as_secs_f64(),
        m.rate(),
        m.bytes.map_or("-".into(), |b| format!(
            "{:.1}",
            b as f64 / 1e6 / m.wall.as_secs_f64()
        )),
        per(m.cpu),
        m.rss_kib
            .map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0)),
        per(m.broker_cpu),
        ratio("over_a"),
        ratio("over_b"),
        m.others * 100.0,
    );
}

/// Before a measurement: waits for the rest of the machine to quiet down, and says so.
async fn quiet(o: &Opts, part: &str) {
    if o.quiet_wait.is_zero() {
        return;
    }
    match run::wait_quiet(o.quiet_wait).await {
        Some(waited) if waited > Duration::from_secs(2) => {
            println!(
                "({part}) waited {:.0} s for other processes to quiet down",
                waited.as_secs_f64()
            )
        }
        Some(_) => {}
        None => println!(
            "({part}) other processes kept the machine busy for {} s: measuring anyway (see others%)",
            o.quiet_wait.as_secs()
        ),
    }
}

async fn bench(o: Opts) -> anyhow::Result<()> {
    dataset::self_check();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let want = |p: char| o.parts.contains(p);
    println!(
        "pipeline bench: binary {}, {} cores; (a)/(b) CPU = this process (broker + client), \
         (c)-(f) CPU = the connector child (wait4), RSS = its VmHWM, brkr = this process during the \
         child's run, others% = every other process's CPU as a share of the machine (PostgreSQL \
         in (d); above a few % the figures are not clean)",
        run::BINARY,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for &n in &o.sizes {
        let sizes = Sizes::split(n);
        let data = Gen::new(sizes);
        let [c, t, a] = sizes.n;
        let title = format!(
            "N = {n} (customers {c}, transactions {t}, trading activity {a}; per_page {PER_PAGE})"
        );
        print_header(&title);
        let mut done: Vec<Measure> = Vec::new();
        for part in ['a', 'b', 'r', 'c', 'd'] {
            if !want(part) {
                continue;
            }
            quiet(&o, &part.to_string()).await;
            let measured = match part {
                'a' => Some(raw_download(&data).await?),
                'b' => Some(ceiling(&data, true).await?),
                'r' => Some(ceiling(&data, false).await?),
                'c' => Some(rest_backfill(&data).await?),
                _ => pg_backfill(sizes).await?,
            };
            let Some(mut m) = measured else { continue };
            for (name, base) in [("over_a", "a"), ("over_b", "b")] {
                let base = done.iter().find(|d| d.part == base).map(Measure::rate);
                if let (true, Some(base)) = (matches!(m.part, "c" | "d"), base) {
                    m.ratios.push((name, m.rate() / base));
                }
            }
            print_row(&m);
            done.push(m);
        }
        for m in &done {
            println!("{}", m.json(n));
        }
    }
    if want('e') || want('f') {
        print_header("rate limits (independent of --sizes)");
        let mut done = Vec::new();
        if want('e') {
            println!(
                "(e) running: {} requests' worth at {}/min (~{:.0} s)…",
                o.rate_requests,
                o.rate,
                o.rate_requests as f64 * 60.0 / o.rate as f64
            );
            quiet(&o, "e").await;
            let m = rate_limited(&o).await?;
            print_row(&m);
            done.push(m);
        }
        if want('f') {
            println!(
                "(f) running: {} posts' worth of {} records at {}/min…",
                o.sink_requests, o.sink_batch, o.sink_rate
            );
            quiet(&o, "f").await;
            let m = delivery(&o).await?;
            print_row(&m);
            done.push(m);
        }
        for m in &done {
            let x = &m.extra;
            let get = |k: &str| x.get(k).map_or("-".into(), Value::to_string);
            match m.part {
                "e" => println!(
                    "(e) broker budget {}/min: {} requests in {:.1} s = {}/min over the whole run \
                     (÷ budget {}), {}/min first-to-last; most in any 60 s {}; 429s {}",
                    get("budget_per_min"),
                    get("requests"),
                    m.wall.as_secs_f64(),
                    get("achieved_per_min"),
                    get("achieved_over_budget"),
                    get("first_to_last_per_min"),
                    get("max_in_60s"),
                    get("http_429"),
                ),
                _ => println!(
                    "(f) API budget {}/min × {} = {} records/s max: achieved {:.0} records/s \
                     (÷ max {}), {} posts ({}/min), {} records/post, 429s {}",
                    get("budget_per_min"),
                    get("batch_size"),
                    get("budget_max_records_per_s"),
                    m.rate(),
                    get("records_over_budget_max"),
                    get("posts"),
                    get("posts_per_min"),
                    get("records_per_post"),
                    get("http_429"),
                ),
            }
        }
        for m in &done {
            println!("{}", m.json(m.records));
        }
    }
    if want('g') {
        print_header("idle daemon");
        quiet(&o, "g").await;
        idle_daemon(&o).await?;
    }
    Ok(())
}

fn main() {
    let outcome = opts().and_then(|o| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("start the runtime")?
            .block_on(bench(o))
    });
    if let Err(e) = outcome {
        eprintln!("\npipeline bench FAILED: {e:#}");
        std::process::exit(1);
    }
}
