//! More than one daemon: the real binary, several at once, sharing brokers through the real
//! PostgreSQL (`T360_TEST_POSTGRES_URL`, which `.ci/run` sets), each test in a schema of its own.
//! Daemons are killed (`kill -9`), paused past their lease (`SIGSTOP`/`SIGCONT`) and cut off from
//! PostgreSQL (a proxy that drops every connection and refuses new ones, as a restart does).
//!
//! Without the variable every test here says SKIPPED and passes: `cargo test` on a laptop.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde_json::{Value, json};
use sqlx::postgres::PgPoolOptions;
use sqlx::{AssertSqlSafe, PgPool, Row as _};
use support::{
    Daemon, Dataset, DatasetSpec, Paging, Row, SampleBroker, assert_same, free_port, truth,
};
use t360_connector::model::Entity;

fn postgres(test: &str) -> Option<String> {
    match std::env::var("T360_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("SKIPPED {test}: T360_TEST_POSTGRES_URL is not set (see .ci/run)");
            None
        }
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// Brokers on loopback, one connectors folder every daemon reads, one PostgreSQL schema.
struct World {
    dir: tempfile::TempDir,
    url: String,
    schema: String,
    brokers: Vec<SampleBroker>,
    pool: PgPool,
    /// `[state]` TOML after the url, for every daemon.
    state_extra: String,
}

impl World {
    async fn start(url: &str, brokers: usize, customers: usize, schedule: &str) -> World {
        let dir = tempfile::tempdir().unwrap();
        let connectors = dir.path().join("connectors");
        std::fs::create_dir_all(&connectors).unwrap();
        let schema = format!(
            "fleet_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let mut started = Vec::new();
        for i in 0..brokers {
            let data = Dataset::generate(&DatasetSpec {
                seed: 100 + i as u64,
                customers,
                transactions: customers * 2,
                activity: customers * 2,
                ..DatasetSpec::default()
            });
            let broker =
                SampleBroker::start("127.0.0.1:0".parse().unwrap(), data, Paging::Cursor, None)
                    .await
                    .unwrap();
            std::fs::write(
                connectors.join(format!("b{i:02}.toml")),
                format!(
                    r#"broker = "b{i:02}"
kind = "rest"
preset = "track360-standard"

[rest]
base_url = "{url}"
allow_http = true
per_page = 10
timeout = "10s"
max_retry_time = "2s"
rate_limit = "5000/s"

[sync]
lookback = "1h"
settle = "0s"

[schedule]
customers = "{schedule}"
transactions = "{schedule}"
trading_activity = "{schedule}"
"#,
                    url = broker.base_url()
                ),
            )
            .unwrap();
            started.push(broker);
        }
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(url)
            .await
            .expect("the test PostgreSQL");
        World {
            dir,
            url: url.to_owned(),
            schema,
            brokers: started,
            pool,
            state_extra: "lease_ttl = \"3s\"\nheartbeat = \"1s\"\n".into(),
        }
    }

    /// A daemon with its own settings file and listener, on the shared folder and schema.
    fn daemon(&self, state_url: &str) -> Daemon {
        self.daemon_reading(state_url, &self.dir.path().join("connectors"))
    }

    /// A daemon reading the connectors folder `connectors`.
    fn daemon_reading(&self, state_url: &str, connectors: &std::path::Path) -> Daemon {
        let port = free_port();
        let config = self.dir.path().join(format!("daemon-{port}.toml"));
        std::fs::write(
            &config,
            format!(
                "state_dir = \"state-{port}\"\nconnectors_dir = \"{connectors}\"\n\
                 [daemon]\nlisten = \"127.0.0.1:{port}\"\nshutdown_grace = \"5s\"\n\
                 [state]\nbackend = \"postgres\"\nurl = \"{state_url}\"\ntls = \"disable\"\n\
                 schema = \"{schema}\"\n{extra}",
                connectors = connectors.display(),
                schema = self.schema,
                extra = self.state_extra,
            ),
        )
        .unwrap();
        let log = self.dir.path().join(format!("daemon-{port}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_t360-connector"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .env("RUST_LOG", "info")
            .stdin(std::process::Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .expect("spawn the daemon");
        Daemon { child, port, log }
    }

    fn daemon_pid(&self, d: &Daemon) -> String {
        format!("/{}/", d.child.id())
    }

    /// A settings file for one-off commands (`sync`, `backfill`, `reconcile`) on the schema.
    fn cli_settings(&self) -> std::path::PathBuf {
        let config = self.dir.path().join("cli.toml");
        std::fs::write(
            &config,
            format!(
                "connectors_dir = \"connectors\"\n[state]\nbackend = \"postgres\"\nurl = \"{}\"\n\
                 tls = \"disable\"\nschema = \"{}\"\n{}",
                self.url, self.schema, self.state_extra
            ),
        )
        .unwrap();
        config
    }

    /// Valid live leases per holder.
    async fn holders(&self) -> BTreeMap<String, BTreeSet<(String, String)>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT holder, broker, entity FROM {}.leases
             WHERE lane = 'live' AND holder IS NOT NULL AND expires_at > now()",
            self.schema
        )))
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        let mut out: BTreeMap<String, BTreeSet<(String, String)>> = BTreeMap::new();
        for r in rows {
            out.entry(r.get(0))
                .or_default()
                .insert((r.get(1), r.get(2)));
        }
        out
    }

    /// How many pairs the daemon `d` holds now.
    async fn held_by(&self, d: &Daemon) -> usize {
        let pid = self.daemon_pid(d);
        self.holders()
            .await
            .iter()
            .filter(|(h, _)| h.contains(&pid))
            .map(|(_, p)| p.len())
            .sum()
    }

    fn pairs(&self) -> usize {
        self.brokers.len() * 3
    }

    /// How many (broker, entity) pairs had a successful sync whose `column` (`started_at`,
    /// `finished_at`) is after `since`.
    async fn pairs_synced_since(&self, column: &str, since: Timestamp) -> usize {
        let since: chrono::DateTime<chrono::Utc> = since.to_string().parse().unwrap();
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(DISTINCT (broker, entity)) FROM {}.runs
             WHERE outcome = 'success' AND {column} > $1",
            self.schema
        )))
        .bind(since)
        .fetch_one(&self.pool)
        .await
        .unwrap_or(0);
        n as usize
    }

    async fn rows(&self, broker: &str, entity: Entity) -> BTreeMap<String, Row> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT * FROM {}.{} WHERE broker = $1",
            self.schema,
            entity.as_str()
        )))
        .bind(broker)
        .fetch_all(&self.pool)
        .await
        .unwrap_or_default();
        rows.iter()
            .map(|r| {
                let mut row = Row::new();
                for c in entity.fields() {
                    row.insert(c.to_string(), r.get::<Option<String>, _>(*c));
                }
                let key = entity
                    .key_fields()
                    .iter()
                    .map(|f| row[*f].clone().unwrap_or_default())
                    .collect::<Vec<_>>()
                    .join("|");
                (key, row)
            })
            .collect()
    }

    /// Whether every broker's every entity in PostgreSQL equals the broker's data.
    async fn converged(&self) -> bool {
        for (i, b) in self.brokers.iter().enumerate() {
            for entity in Entity::ALL {
                let want = b.with_data(|d| truth(d, entity));
                if self.rows(&format!("b{i:02}"), entity).await != want {
                    return false;
                }
            }
        }
        true
    }

    async fn assert_converged(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.converged().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        for (i, b) in self.brokers.iter().enumerate() {
            for entity in Entity::ALL {
                let want = b.with_data(|d| truth(d, entity));
                assert_same(entity, &self.rows(&format!("b{i:02}"), entity).await, &want);
            }
        }
    }

    /// No broker ever answered two requests for one entity at once: no (broker, entity) was
    /// paged by two daemons at the same time.
    fn assert_never_paged_twice_at_once(&self) {
        for (i, b) in self.brokers.iter().enumerate() {
            for entity in Entity::ALL {
                assert!(
                    b.max_concurrent(entity) <= 1,
                    "b{i:02}/{entity} was paged by two clients at once"
                );
            }
        }
    }

    async fn drop_schema(&self) {
        let _ = sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            self.schema
        )))
        .execute(&self.pool)
        .await;
    }
}

/// Changes the brokers' data while the fleet syncs: updated transactions and new customers,
/// stamped now, until stopped.
fn mutate(brokers: Vec<SampleBroker>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let b = &brokers[(n as usize * 7) % brokers.len()];
            let now = Timestamp::now();
            b.with_data(|d| {
                let keys: Vec<String> = d
                    .table(Entity::Transactions)
                    .records()
                    .filter_map(|r| r["transaction_id"].as_str().map(str::to_owned))
                    .collect();
                let key = &keys[(n as usize * 13) % keys.len()];
                d.modify(
                    Entity::Transactions,
                    key,
                    json!({ "amount": format!("{}.{:02}", 100 + n, n % 100) }),
                    now,
                );
                let mut customer: Value = d
                    .table(Entity::Customers)
                    .records()
                    .next()
                    .cloned()
                    .expect("a customer");
                customer["customer_id"] = json!(format!("NEW{n}"));
                customer["last_modified_date"] = json!(now.to_string());
                d.put(Entity::Customers, customer);
            });
            n += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        n
    })
}

async fn eventually_async<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_daemons_share_thirty_brokers_a_fourth_takes_its_share_and_a_killed_ones_work_moves()
{
    let Some(url) = postgres("three_daemons_share_thirty_brokers") else {
        return;
    };
    let world = World::start(&url, 30, 12, "*/2 * * * * *").await;
    // Requests that take a moment: a sync is seen in flight, and two clients paging one
    // (broker, entity) at once would overlap.
    for b in &world.brokers {
        b.set_delay(Duration::from_millis(30));
    }
    let pairs = world.pairs();
    let mut daemons: Vec<Daemon> = (0..3).map(|_| world.daemon(&world.url)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mutations = mutate(world.brokers.clone(), Arc::clone(&stop));

    // Every pair is held, and each daemon holds at most its share: ceil(90 / 3) = 30.
    let shared = eventually_async(Duration::from_secs(30), || async {
        let holders = world.holders().await;
        let total: usize = holders.values().map(BTreeSet::len).sum();
        total == pairs && holders.len() == 3 && holders.values().all(|p| p.len() <= 30)
    })
    .await;
    assert!(
        shared,
        "90 pairs not shared by 3 daemons: {:?}",
        world
            .holders()
            .await
            .iter()
            .map(|(h, p)| (h, p.len()))
            .collect::<Vec<_>>()
    );

    eprintln!("fleet: 90 pairs shared by 3 daemons");
    // A fourth daemon joins: its share is ceil(90 / 4) = 23, and it gets it.
    daemons.push(world.daemon(&world.url));
    let joined = eventually_async(Duration::from_secs(30), || async {
        let holders = world.holders().await;
        let total: usize = holders.values().map(BTreeSet::len).sum();
        world.held_by(&daemons[3]).await >= 20
            && holders.values().all(|p| p.len() <= 23)
            && total == pairs
    })
    .await;
    assert!(
        joined,
        "the fourth daemon did not take its share: {:?}",
        world
            .holders()
            .await
            .iter()
            .map(|(h, p)| (h, p.len()))
            .collect::<Vec<_>>()
    );

    eprintln!("fleet: the fourth daemon took its share");
    // kill -9 of a daemon in the middle of a sync of one of its brokers.
    let victim = 0;
    let pid = world.daemon_pid(&daemons[victim]);
    let victims: BTreeSet<(String, String)> = world
        .holders()
        .await
        .into_iter()
        .filter(|(h, _)| h.contains(&pid))
        .flat_map(|(_, p)| p)
        .collect();
    let mid_sync = eventually_async(Duration::from_secs(20), || async {
        victims.iter().any(|(b, e)| {
            let i: usize = b[1..].parse().unwrap();
            world.brokers[i].in_flight_of(e.parse().unwrap()) > 0
        })
    })
    .await;
    assert!(mid_sync, "the victim never synced one of its brokers");
    daemons[victim].child.kill().unwrap();
    daemons[victim].child.wait().unwrap();
    let killed_at = Instant::now();

    // Its leases expire after the TTL (3 s) and the others take them over, within a heartbeat
    // (1 s) more; the taken-over pairs sync again at once (their tick was missed).
    let moved = eventually_async(Duration::from_secs(15), || async {
        let holders = world.holders().await;
        let total: usize = holders.values().map(BTreeSet::len).sum();
        total == pairs && !holders.keys().any(|h| h.contains(&pid))
    })
    .await;
    let took = killed_at.elapsed();
    assert!(moved, "the killed daemon's pairs were not taken over");
    assert!(
        took < Duration::from_secs(12),
        "took over after {took:?}, more than TTL + heartbeat + a schedule interval"
    );
    eprintln!("fleet: the killed daemon's pairs moved after {took:?}");
    let since_kill = Timestamp::now();
    let synced_again = eventually_async(Duration::from_secs(20), || async {
        world.pairs_synced_since("finished_at", since_kill).await == pairs
    })
    .await;
    assert!(synced_again, "not every pair synced after the takeover");

    eprintln!("fleet: every pair synced again after the kill");
    // The brokers stop changing; the store converges on every broker's data exactly.
    stop.store(true, Ordering::SeqCst);
    let changes = mutations.await.unwrap();
    assert!(changes > 20, "only {changes} mutations ran");
    world.assert_converged(Duration::from_secs(40)).await;
    world.assert_never_paged_twice_at_once();

    // Takeovers were counted by the survivors, and `status` shows the members.
    let mut takeovers = 0.0;
    for d in &daemons[1..] {
        let (_, body) = d.get("/metrics").await.expect("metrics");
        takeovers += metric(&body, "t360_fleet_takeovers_total");
        assert_eq!(metric(&body, "t360_fleet_members"), 3.0, "{body}");
    }
    assert!(takeovers >= 1.0, "no takeover counted");
    let config = std::fs::read_dir(world.dir.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "toml"))
        .unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_t360-connector"))
        .arg("--config")
        .arg(&config)
        .arg("status")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains(" alive ")).count(),
        3,
        "{text}"
    );
    assert!(text.contains("MEMBER") && text.contains("HOLDS"), "{text}");
    drop(daemons);
    world.drop_schema().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_daemon_paused_past_its_ttl_is_fenced_out_and_writes_nothing_twice() {
    let Some(url) = postgres("a_daemon_paused_past_its_ttl") else {
        return;
    };
    let world = World::start(&url, 2, 30, "*/2 * * * * *").await;
    for b in &world.brokers {
        b.set_delay(Duration::from_millis(150));
    }
    let a = world.daemon(&world.url);
    // A alone first: it holds everything.
    assert!(
        eventually_async(Duration::from_secs(20), || async {
            world.held_by(&a).await == world.pairs()
        })
        .await,
        "the first daemon did not take every pair"
    );
    // Every write to the state, with the session that made it (application_name names the
    // member): what A writes after losing its lease shows up here.
    let s = &world.schema;
    let mut audit = format!(
        "CREATE TABLE {s}.audit (app TEXT, at TIMESTAMPTZ, tbl TEXT);
         CREATE FUNCTION {s}.audit() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           INSERT INTO {s}.audit VALUES (current_setting('application_name'), clock_timestamp(), TG_TABLE_NAME);
           RETURN NULL;
         END $$;"
    );
    for table in [
        "customers",
        "transactions",
        "trading_activity",
        "checkpoints",
        "quarantine",
        "held",
        "backfills",
    ] {
        audit.push_str(&format!(
            "CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON {s}.{table}
             FOR EACH ROW EXECUTE FUNCTION {s}.audit();"
        ));
    }
    sqlx::raw_sql(AssertSqlSafe(audit))
        .execute(&world.pool)
        .await
        .unwrap();

    // Pause A while it pages (only A pages: B is not started yet), past its TTL.
    let paged = eventually_async(Duration::from_secs(20), || async {
        world.brokers.iter().any(|b| b.in_flight() > 0)
    })
    .await;
    assert!(paged, "A never synced");
    a.signal("STOP");
    let paused_at = Timestamp::now();
    let b = world.daemon(&world.url);
    // B takes A's leases over (TTL 3 s + a heartbeat) and syncs them; meanwhile the brokers'
    // data changes, so that a stale page of A's would differ from what B stores.
    let took = eventually_async(Duration::from_secs(20), || async {
        world.held_by(&b).await == world.pairs()
    })
    .await;
    assert!(took, "B did not take over the paused daemon's leases");
    let stop = Arc::new(AtomicBool::new(false));
    let mutations = mutate(world.brokers.clone(), Arc::clone(&stop));
    let synced = eventually_async(Duration::from_secs(20), || async {
        world.pairs_synced_since("started_at", paused_at).await == world.pairs()
    })
    .await;
    assert!(synced, "B did not sync every pair");

    // A resumes: its leases are gone. It learns so (at once from its own clock, or from the
    // store refusing its commit), writes nothing under the old epochs, and asks the brokers
    // for nothing while it holds no lease.
    let resumed_at = Timestamp::now();
    a.signal("CONT");
    let lost = eventually_async(Duration::from_secs(10), || async {
        a.logs().contains("Lease lost")
    })
    .await;
    assert!(
        lost,
        "the resumed daemon did not notice it lost its leases:\n{}",
        a.logs()
    );
    // A rejoins as a member: the pairs are shared again (3 each), under new epochs.
    let reshared = eventually_async(Duration::from_secs(20), || async {
        world.held_by(&a).await == 3 && world.held_by(&b).await == 3
    })
    .await;
    assert!(reshared, "the pairs were not shared again after A resumed");
    stop.store(true, Ordering::SeqCst);
    mutations.await.unwrap();
    // Between its resumption and the first lease it won back, A held nothing: any write of
    // A's in that interval is a stale write.
    let first_new: chrono::DateTime<chrono::Utc> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT min(acquired_at) FROM {s}.leases WHERE holder LIKE $1"
    )))
    .bind(format!("%/{}/%", a.child.id()))
    .fetch_one(&world.pool)
    .await
    .unwrap();
    let resumed: chrono::DateTime<chrono::Utc> = resumed_at.to_string().parse().unwrap();
    let stale: Vec<(String, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT tbl, at::text FROM {s}.audit WHERE app LIKE $1 AND at > $2 AND at < $3"
    )))
    .bind(format!("%/{}/%", a.child.id()))
    .bind(resumed)
    .bind(first_new)
    .fetch_all(&world.pool)
    .await
    .unwrap();
    assert!(
        stale.is_empty(),
        "A wrote after losing its lease: {stale:?}"
    );
    // The audit does see a member's writes by its name (B's), so the check above can fail.
    let by_b: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {s}.audit WHERE app LIKE $1"
    )))
    .bind(format!("%/{}/%", b.child.id()))
    .fetch_one(&world.pool)
    .await
    .unwrap();
    assert!(
        by_b > 0,
        "the audit saw nothing of B's: the check above proves nothing"
    );
    world.assert_never_paged_twice_at_once();
    world.assert_converged(Duration::from_secs(30)).await;
    drop((a, b));
    world.drop_schema().await;
}

/// A TCP proxy in front of PostgreSQL that can drop every connection and refuse new ones for a
/// while: what a PostgreSQL restart looks like from the daemons.
struct Proxy {
    port: u16,
    down: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
}

impl Proxy {
    async fn start(target: String) -> Proxy {
        // A port below Linux's ephemeral range (32768 up): while the proxy is down and its
        // port closed, no outgoing connection can take the port and keep it from reopening.
        let mut seed = std::process::id() as u64 ^ Timestamp::now().as_nanosecond() as u64;
        let listener = loop {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let port = 20_000 + (seed >> 33) as u16 % 12_000;
            if let Ok(l) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                break l;
            }
        };
        let port = listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let (d, g) = (Arc::clone(&down), Arc::clone(&generation));
        tokio::spawn(async move {
            // While down the port is closed: connections are refused, as by a server that
            // is restarting.
            let mut listener = Some(listener);
            loop {
                if d.load(Ordering::SeqCst) {
                    listener = None;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                if listener.is_none() {
                    match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                        Ok(l) => listener = Some(l),
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    }
                }
                let Some(open) = listener.as_ref() else {
                    continue;
                };
                let accepted = tokio::select! {
                    a = open.accept() => a,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                };
                let Ok((mut client, _)) = accepted else {
                    continue;
                };
                let (target, g2, born) = (target.clone(), Arc::clone(&g), g.load(Ordering::SeqCst));
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                        return;
                    };
                    let copy = tokio::io::copy_bidirectional(&mut client, &mut server);
                    tokio::pin!(copy);
                    loop {
                        tokio::select! {
                            _ = &mut copy => return,
                            _ = tokio::time::sleep(Duration::from_millis(50)) => {
                                if g2.load(Ordering::SeqCst) != born {
                                    return; // cut: both sockets dropped
                                }
                            }
                        }
                    }
                });
            }
        });
        Proxy {
            port,
            down,
            generation,
        }
    }

    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_outage_fails_runs_cleanly_and_the_fleet_recovers_by_itself() {
    let Some(url) = postgres("a_postgres_outage") else {
        return;
    };
    let world = World::start(&url, 6, 10, "* * * * * *").await;
    let parsed = url::Url::parse(&url).unwrap();
    let target = format!(
        "{}:{}",
        parsed.host_str().unwrap_or("127.0.0.1"),
        parsed.port().unwrap_or(5432)
    );
    let proxy = Proxy::start(target).await;
    let mut via_proxy = parsed.clone();
    via_proxy.set_host(Some("127.0.0.1")).unwrap();
    via_proxy.set_port(Some(proxy.port)).unwrap();
    let mut daemons: Vec<Daemon> = (0..2).map(|_| world.daemon(via_proxy.as_str())).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let mutations = mutate(world.brokers.clone(), Arc::clone(&stop));
    assert!(
        eventually_async(Duration::from_secs(30), || async {
            world
                .holders()
                .await
                .values()
                .map(BTreeSet::len)
                .sum::<usize>()
                == world.pairs()
        })
        .await,
        "the fleet never held every pair"
    );

    // PostgreSQL goes away for 6 s (past the 3 s TTL): every connection dropped, none taken.
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(6)).await;
    proxy.restore();

    // Both daemons are still running, said what failed, and the fleet holds every pair again.
    for d in &mut daemons {
        let exited = d.child.try_wait().unwrap();
        assert!(
            exited.is_none(),
            "a daemon died with PostgreSQL ({exited:?}):\n{}",
            d.logs()
        );
    }
    let recovered = eventually_async(Duration::from_secs(20), || async {
        world
            .holders()
            .await
            .values()
            .map(BTreeSet::len)
            .sum::<usize>()
            == world.pairs()
    })
    .await;
    assert!(recovered, "the fleet did not take every pair back");
    let logs: String = daemons.iter().map(Daemon::logs).collect();
    assert!(
        logs.contains("Fleet heartbeat failed") || logs.contains("Sync failed"),
        "the outage was not reported:\n{logs}"
    );
    stop.store(true, Ordering::SeqCst);
    mutations.await.unwrap();
    world.assert_converged(Duration::from_secs(30)).await;
    world.assert_never_paged_twice_at_once();
    drop(daemons);
    world.drop_schema().await;
}

/// The fence itself, without daemons: a commit under a lease that was taken over is refused
/// whole — no record, no quarantine row, no cursor — and the new holder's commit goes through.
#[test]
fn a_commit_under_a_stale_epoch_is_refused_and_writes_nothing() {
    use t360_connector::config::sql::Tls;
    use t360_connector::config::state::PgStatePlan;
    use t360_connector::sink::{PageBatch, Progress, Reject, Stage, Valid};
    use t360_connector::state::lease::{Fence, LeaseLane};
    use t360_connector::state::postgres::PgStore;
    let Some(url) = postgres("a_commit_under_a_stale_epoch_is_refused") else {
        return;
    };
    let schema = format!("fence_{}", std::process::id());
    let plan = PgStatePlan {
        url: url.clone(),
        password: None,
        tls: Tls::Disable,
        ca_file: None,
        schema: schema.clone(),
        max_connections: 2,
        lease_ttl: Duration::from_secs(1),
        heartbeat: Duration::from_millis(300),
    };
    let a = PgStore::open(&plan).unwrap();
    let b = PgStore::open(&plan).unwrap();
    let ttl = Duration::from_secs(2);
    let won_a = a
        .acquire("acme", Entity::Customers, LeaseLane::Live, ttl)
        .unwrap()
        .expect("a free lease");
    assert!(
        b.acquire("acme", Entity::Customers, LeaseLane::Live, ttl)
            .unwrap()
            .is_none(),
        "a held lease was granted twice"
    );
    std::thread::sleep(Duration::from_millis(2_200));
    let won_b = b
        .acquire(
            "acme",
            Entity::Customers,
            LeaseLane::Live,
            Duration::from_secs(5),
        )
        .unwrap()
        .expect("an expired lease is free");
    assert_eq!(won_b.epoch, won_a.epoch + 1);
    assert_eq!(won_b.taken_from.as_deref(), Some(a.member()));

    let record = |id: &str| {
        t360_connector::validate::validate(
            Entity::Customers,
            &json!({"customer_id": id, "signup_date": "2026-01-01T00:00:00Z",
                    "last_modified_date": "2026-01-02T00:00:00Z", "affiliate_id": "AFF1"}),
        )
        .unwrap()
    };
    let batch = |holder: &PgStore, epoch: i64, id: &str| PageBatch {
        broker: "acme".into(),
        entity: Entity::Customers,
        records: vec![Valid { record: record(id) }],
        rejects: vec![Reject {
            key: format!("bad-{id}"),
            raw: "{}".into(),
            reasons: vec!["test".into()],
            stage: Stage::Validation,
        }],
        progress: Progress::Cursor("2026-01-03T00:00:00Z".parse().unwrap()),
        keep_records: true,
        stage_records: false,
        hold_orphans: true,
        fence: Some(Fence {
            broker: "acme".into(),
            entity: Entity::Customers,
            lane: LeaseLane::Live,
            holder: holder.member().to_owned(),
            epoch,
        }),
    };
    let stale = a.commit_page(&batch(&a, won_a.epoch, "FROM-A"));
    assert!(
        matches!(stale, Err(t360_connector::state::StoreError::Fenced(..))),
        "{stale:?}"
    );
    assert_eq!(a.cursor("acme", Entity::Customers).unwrap(), None);
    assert_eq!(a.quarantine_count("acme", Entity::Customers).unwrap(), 0);
    assert!(
        !a.renew(
            &[batch(&a, won_a.epoch, "x").fence.unwrap()],
            Duration::from_secs(5)
        )
        .unwrap()[0],
        "a lost lease was renewed"
    );
    // The same commit under the current holder and epoch goes through.
    b.commit_page(&batch(&b, won_b.epoch, "FROM-B")).unwrap();
    assert!(b.cursor("acme", Entity::Customers).unwrap().is_some());
    let status = b.status(&[]).unwrap();
    assert_eq!(status[0].stored, 1, "only B's record is stored: {status:?}");
    assert_eq!(status[0].quarantined, 1);
    // A wrong holder with the right epoch is refused too.
    let forged = a.commit_page(&batch(&a, won_b.epoch, "FORGED"));
    assert!(matches!(
        forged,
        Err(t360_connector::state::StoreError::Fenced(..))
    ));
    drop((a, b));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let pool = PgPoolOptions::new().connect(&url).await.unwrap();
        sqlx::query(AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
            .execute(&pool)
            .await
            .unwrap();
    });
}

/// Mistakes in `[state]` are named by key, before anything connects.
#[test]
fn a_bad_state_table_is_reported_by_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("connectors")).unwrap();
    let cases = [
        ("[state]\nbackend = \"postgres\"\n", "state.url"),
        ("[state]\nbackend = \"mongo\"\n", "state.backend"),
        (
            "[state]\nbackend = \"postgres\"\nurl = \"postgres://u:secret@db/x\"\n",
            "password_env or password_file",
        ),
        (
            "[state]\nbackend = \"postgres\"\nurl = \"postgres://u@db/x\"\nschema = \"Bad-Name\"\n",
            "state.schema",
        ),
        (
            "[state]\nbackend = \"postgres\"\nurl = \"postgres://u@db/x\"\nlease_ttl = \"3s\"\nheartbeat = \"2s\"\n",
            "twice the heartbeat",
        ),
        (
            "[state]\nurl = \"postgres://u@db/x\"\n",
            "only for backend = \"postgres\"",
        ),
        (
            "[sink]\nkind = \"sqlite\"\n[state]\nbackend = \"postgres\"\nurl = \"postgres://u@db/x\"\n",
            "use `postgres`",
        ),
        ("[sink]\nkind = \"postgres\"\n", "needs state.backend"),
    ];
    for (toml, expected) in cases {
        let config = dir.path().join("config.toml");
        std::fs::write(&config, format!("connectors_dir = \"connectors\"\n{toml}")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_t360-connector"))
            .arg("--config")
            .arg(&config)
            .arg("check")
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{toml} was accepted:\n{text}");
        assert!(
            text.contains(expected),
            "{toml}: expected {expected:?} in:\n{text}"
        );
        assert!(!text.contains("secret"), "the password was echoed:\n{text}");
    }
}

/// A backfill with the postgres state runs under the pair's backfill lease: a second backfill
/// of the same pair is refused while the first runs, and the lease is free once it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_runs_under_its_lease_and_a_second_one_is_refused() {
    let Some(url) = postgres("a_backfill_runs_under_its_lease") else {
        return;
    };
    let world = World::start(&url, 1, 40, "0 0 1 1 *").await;
    world.brokers[0].set_delay(Duration::from_millis(40));
    let config = world.cli_settings();
    let backfill = || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_t360-connector"));
        cmd.arg("--config")
            .arg(&config)
            .args(["backfill", "--broker", "b00", "--entity", "transactions"])
            .args(["--since", "2025-12-01T00:00:00Z"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    };
    let first = backfill().spawn().unwrap();
    let leased = eventually_async(Duration::from_secs(20), || async {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {}.leases WHERE lane = 'backfill' AND holder IS NOT NULL
             AND expires_at > now()",
            world.schema
        )))
        .fetch_one(&world.pool)
        .await
        .unwrap_or(0);
        n == 1
    })
    .await;
    assert!(leased, "the backfill took no lease");
    let second = backfill().output().unwrap();
    let text = String::from_utf8_lossy(&second.stderr);
    assert!(
        !second.status.success(),
        "a second backfill ran beside the first: {text}"
    );
    assert!(text.contains("backfill lease is held by"), "{text}");
    let first = first.wait_with_output().unwrap();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let stored = world.rows("b00", Entity::Transactions).await;
    let want = world.brokers[0].with_data(|d| truth(d, Entity::Transactions));
    // Transactions whose customer is not stored yet are held, not lost: count them in.
    let held: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM {}.held WHERE entity = 'transactions'",
        world.schema
    )))
    .fetch_one(&world.pool)
    .await
    .unwrap();
    assert_eq!(stored.len() + held as usize, want.len());
    let free: bool = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT bool_and(holder IS NULL) FROM {}.leases WHERE lane = 'backfill'",
        world.schema
    )))
    .fetch_one(&world.pool)
    .await
    .unwrap();
    assert!(free, "the backfill kept its lease after it ended");
    world.drop_schema().await;
}

/// A daemon whose connectors folder is not the others' says so, and `status` flags it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_with_a_different_connectors_folder_is_flagged() {
    let Some(url) = postgres("a_member_with_a_different_connectors_folder") else {
        return;
    };
    let world = World::start(&url, 1, 5, "*/5 * * * * *").await;
    let a = world.daemon(&world.url);
    // B reads a copy of the folder with one file changed.
    let other = world.dir.path().join("connectors-b");
    std::fs::create_dir_all(&other).unwrap();
    let text = std::fs::read_to_string(world.dir.path().join("connectors/b00.toml")).unwrap();
    std::fs::write(
        other.join("b00.toml"),
        text.replace("per_page = 10", "per_page = 20"),
    )
    .unwrap();
    let b = world.daemon_reading(&world.url, &other);
    let warned = eventually_async(Duration::from_secs(15), || async {
        (a.logs() + &b.logs()).contains("connectors folder differs from other members")
    })
    .await;
    assert!(
        warned,
        "no member said its folder differs:\n{}\n{}",
        a.logs(),
        b.logs()
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_t360-connector"))
        .arg("--config")
        .arg(world.dir.path().join(format!("daemon-{}.toml", a.port)))
        .arg("status")
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&out.stdout);
    assert_eq!(status.matches("DIFFERS").count(), 1, "{status}");
    drop((a, b));
    world.drop_schema().await;
}

/// `reconcile` with the postgres state: the drift in PostgreSQL's entity tables is found per
/// key, and the repair (through the pipeline) makes them equal to the broker again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_and_repairs_drift_in_the_postgres_store() {
    let Some(url) = postgres("reconcile_finds_and_repairs_drift_in_the_postgres_store") else {
        return;
    };
    let world = World::start(&url, 1, 20, "0 0 1 1 *").await;
    let config = world.cli_settings();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_t360-connector"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap()
    };
    let checked = run(&["check"]);
    let text = String::from_utf8_lossy(&checked.stdout);
    assert!(
        text.contains(&format!(
            "state in PostgreSQL {}, schema {}",
            world.url, world.schema
        )),
        "{text}"
    );
    let synced = run(&["sync"]);
    assert!(
        synced.status.success(),
        "{}",
        String::from_utf8_lossy(&synced.stderr)
    );
    assert!(
        world.converged().await,
        "the first sync did not store the broker's data"
    );

    // Damage the store: one transaction gone, one with another amount.
    let keys: Vec<String> = world
        .rows("b00", Entity::Transactions)
        .await
        .into_keys()
        .take(2)
        .collect();
    let table = format!("{}.transactions", world.schema);
    sqlx::query(AssertSqlSafe(format!(
        "DELETE FROM {table} WHERE transaction_id = $1"
    )))
    .bind(&keys[0])
    .execute(&world.pool)
    .await
    .unwrap();
    sqlx::query(AssertSqlSafe(format!(
        "UPDATE {table} SET amount = '0.01' WHERE transaction_id = $1"
    )))
    .bind(&keys[1])
    .execute(&world.pool)
    .await
    .unwrap();

    let args = [
        "reconcile",
        "--broker",
        "b00",
        "--entity",
        "transactions",
        "--from",
        "2000-01-01",
        "--to",
        "2100-12-31",
        "--format",
        "json",
    ];
    let found = run(&args);
    let report: Value = serde_json::from_slice(&found.stdout).unwrap_or_else(|_| {
        panic!("{}", String::from_utf8_lossy(&found.stderr));
    });
    assert_eq!(found.status.code(), Some(3), "{report}");
    let before = &report["reconciliations"][0]["before"];
    assert_eq!(
        before["missing"].as_array().map(Vec::len),
        Some(1),
        "{before}"
    );
    assert_eq!(
        before["different"].as_array().map(Vec::len),
        Some(1),
        "{before}"
    );

    let mut repair = args.to_vec();
    repair.push("--repair");
    let repaired = run(&repair);
    assert_eq!(
        repaired.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&repaired.stdout),
        String::from_utf8_lossy(&repaired.stderr)
    );
    let want = world.brokers[0].with_data(|d| truth(d, Entity::Transactions));
    assert_same(
        Entity::Transactions,
        &world.rows("b00", Entity::Transactions).await,
        &want,
    );
    // No scratch file is left behind in the temporary folder.
    let left: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("reconcile-b00-transactions-")
        })
        .collect();
    assert!(left.is_empty(), "scratch files left: {left:?}");
    world.drop_schema().await;
}

/// The state database's password, from the environment, appears in no output: not at `trace`,
/// not from `status`, not when PostgreSQL refuses the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_password_is_never_logged() {
    let Some(url) = postgres("the_state_password_is_never_logged") else {
        return;
    };
    const SECRET: &str = "pg-state-Secret-7c1f";
    let mut world = World::start(&url, 1, 5, "* * * * * *").await;
    world.state_extra = format!("password_env = \"T360_STATE_PW\"\n{}", world.state_extra);
    let port = free_port();
    let config = world.dir.path().join("secret.toml");
    let write = |state_url: &str| {
        std::fs::write(
            &config,
            format!(
                "connectors_dir = \"connectors\"\n[daemon]\nlisten = \"127.0.0.1:{port}\"\n\
                 [state]\nbackend = \"postgres\"\nurl = \"{state_url}\"\ntls = \"disable\"\n\
                 schema = \"{}\"\n{}",
                world.schema, world.state_extra
            ),
        )
        .unwrap();
    };
    let run = |args: &[&str]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_t360-connector"));
        cmd.arg("--config")
            .arg(&config)
            .args(args)
            .env("RUST_LOG", "trace")
            .env("T360_STATE_PW", SECRET);
        cmd
    };
    write(&world.url);
    // Into a file: at `trace` a pipe nobody reads fills up and stops the daemon.
    let log = world.dir.path().join("secret.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut daemon = run(&["run"])
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let synced = eventually_async(Duration::from_secs(20), || async {
        world
            .pairs_synced_since("finished_at", Timestamp::UNIX_EPOCH)
            .await
            == 3
    })
    .await;
    daemon.kill().unwrap();
    daemon.wait().unwrap();
    let daemon = std::process::Output {
        status: std::process::ExitStatus::default(),
        stdout: std::fs::read(&log).unwrap(),
        stderr: Vec::new(),
    };
    assert!(synced, "the daemon did not sync");
    let status = run(&["status"]).output().unwrap();
    // A server that refuses the connection (nothing listens there).
    write(&format!("postgres://nobody@127.0.0.1:{}/none", free_port()));
    let refused = run(&["status"]).output().unwrap();
    assert!(!refused.status.success());
    for (what, out) in [
        ("daemon", &daemon),
        ("status", &status),
        ("refused", &refused),
    ] {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.len() > 100, "{what}: little output:\n{text}");
        assert!(
            !text.contains(SECRET),
            "{what} printed the state password:\n{text}"
        );
    }
    world.drop_schema().await;
}

/// A pair whose holder died and whose tick passed while nobody held it syncs as soon as a
/// member takes it over, not at its next tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_over_pair_whose_tick_was_missed_syncs_at_once() {
    let Some(url) = postgres("a_taken_over_pair_whose_tick_was_missed_syncs_at_once") else {
        return;
    };
    // Ticks every 20 s: at :00, :20 and :40.
    let world = World::start(&url, 1, 5, "*/20 * * * * *").await;
    let mut a = world.daemon(&world.url);
    // A syncs at once (no sync before), then dies.
    let synced = eventually_async(Duration::from_secs(20), || async {
        world
            .pairs_synced_since("finished_at", Timestamp::UNIX_EPOCH)
            .await
            == 3
    })
    .await;
    assert!(synced, "the first daemon did not sync");
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    // Wait for the next tick to pass (nobody runs it), and for A's leases to expire.
    let second = |t: Timestamp| t.as_second().rem_euclid(20);
    let until_tick = 20 - second(Timestamp::now());
    tokio::time::sleep(Duration::from_secs(until_tick as u64 + 1).max(Duration::from_secs(4)))
        .await;
    let started = Timestamp::now();
    let next_tick_in = 20 - second(started);
    assert!(
        next_tick_in >= 12,
        "the test started too close to a tick ({next_tick_in} s)"
    );
    let b = world.daemon(&world.url);
    let caught_up = eventually_async(Duration::from_secs(11), || async {
        world.pairs_synced_since("started_at", started).await == 3
    })
    .await;
    assert!(
        caught_up,
        "the taken-over pairs waited for their next tick:\n{}",
        b.logs()
    );
    assert!(
        b.logs().contains("Catching up a missed run."),
        "{}",
        b.logs()
    );
    drop(b);
    world.drop_schema().await;
}
