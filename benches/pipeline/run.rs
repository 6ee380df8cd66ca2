//! The release binary as a child process: its settings and connector files in a temp dir, its
//! wall time, its own CPU time (`wait4`) and its own peak RSS (`VmHWM`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub const BINARY: &str = env!("CARGO_BIN_EXE_t360-connector");

/// A fresh state dir with a settings file and one connector file.
pub struct Setup {
    pub dir: PathBuf,
}

impl Setup {
    /// `settings_tail`: tables appended to the settings file (`[sink]`…).
    pub fn new(dir: &Path, settings_tail: &str, broker: &str, connector: &str) -> Setup {
        let connectors = dir.join("connectors");
        std::fs::create_dir_all(&connectors).expect("create the connectors dir");
        let settings = format!(
            "state_dir = {:?}\nconnectors_dir = {:?}\n{settings_tail}",
            dir.join("state").display().to_string(),
            connectors.display().to_string(),
        );
        std::fs::write(dir.join("settings.toml"), settings).expect("write settings.toml");
        std::fs::write(connectors.join(format!("{broker}.toml")), connector)
            .expect("write the connector file");
        Setup {
            dir: dir.to_owned(),
        }
    }

    pub fn store(&self) -> PathBuf {
        self.dir.join("state").join("t360-connector.db")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("connector.log")
    }

    /// The last lines of the connector's log, for a failure message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

/// What one child run cost.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChildStats {
    pub wall: Duration,
    /// user + sys of the child alone.
    pub cpu: Duration,
    /// The child's own peak RSS (VmHWM), KiB.
    pub max_rss_kib: u64,
    /// user + sys of this process (the broker and mocks) during the run.
    pub self_cpu: Duration,
    /// Every other process's CPU during the run, as a share of the machine.
    pub others: f64,
}

fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
}

/// CPU time used on the whole machine so far (every process, from /proc/stat).
fn machine_busy() -> Duration {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal; guest time is counted in user.
    let busy: u64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&k| ticks.get(k))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Duration::from_secs_f64(busy as f64 / hz)
}

/// How busy the machine was besides us: the benchmark's figures mean little when another
/// build or benchmark shares the two cores.
pub struct Probe {
    busy: Duration,
    own: Duration,
    started: Instant,
}

impl Probe {
    pub fn start() -> Probe {
        Probe {
            busy: machine_busy(),
            own: self_cpu(),
            started: Instant::now(),
        }
    }

    /// This process's CPU since the start, and the CPU of every other process (`child_cpu`
    /// excluded) as a share of the machine's capacity over the same time.
    pub fn finish(&self, child_cpu: Duration) -> (Duration, f64) {
        let own = self_cpu().saturating_sub(self.own);
        let others = machine_busy()
            .saturating_sub(self.busy)
            .saturating_sub(own + child_cpu);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let capacity = self.started.elapsed().as_secs_f64() * cores;
        (own, others.as_secs_f64() / capacity.max(1e-9))
    }
}

/// Waits until every other process together uses under 10 % of the machine over a second, at
/// most `max`: how long it waited, or `None` when it gave up.
pub async fn wait_quiet(max: Duration) -> Option<Duration> {
    let started = Instant::now();
    loop {
        let probe = Probe::start();
        tokio::time::sleep(Duration::from_secs(1)).await;
        if probe.finish(Duration::ZERO).1 < 0.10 {
            return Some(started.elapsed());
        }
        if started.elapsed() >= max {
            return None;
        }
    }
}

pub fn self_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Runs `t360-connector -c settings.toml ARGS…` to its end; fails on a non-zero exit.
pub async fn connector(
    setup: &Setup,
    args: &[String],
    env: &[(String, String)],
) -> anyhow::Result<ChildStats> {
    let log = std::fs::File::create(setup.log())?;
    // `T360_BENCH_WRAP="valgrind --tool=callgrind"`: the connector under a profiler.
    let wrap = std::env::var("T360_BENCH_WRAP").unwrap_or_default();
    let mut words = wrap.split_whitespace();
    let mut command = match words.next() {
        Some(program) => {
            let mut c = Command::new(program);
            c.args(words).arg(BINARY);
            c
        }
        None => Command::new(BINARY),
    };
    command
        .arg("-c")
        .arg(setup.dir.join("settings.toml"))
        .args(args)
        .current_dir(&setup.dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env_remove("RUST_LOG")
        .env_remove("T360_CONFIG");
    for (name, value) in env {
        command.env(name, value);
    }
    let probe = Probe::start();
    let started = Instant::now();
    let child = command.spawn()?;
    let pid = child.id();
    // Its own CPU and peak RSS (not ru_maxrss: see `measure`).
    let reaped =
        tokio::task::spawn_blocking(move || super::measure::reap(pid, Duration::from_millis(5)))
            .await?;
    let status = reaped.status;
    let wall = started.elapsed();
    drop(child);
    let exited_ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    anyhow::ensure!(
        exited_ok,
        "t360-connector {} failed (wait status {status}); its log ends:\n{}",
        args.join(" "),
        setup.log_tail()
    );
    let cpu = reaped.cpu;
    let (self_cpu, others) = probe.finish(cpu);
    Ok(ChildStats {
        wall,
        cpu,
        max_rss_kib: reaped.peak_rss_kib,
        self_cpu,
        others,
    })
}
