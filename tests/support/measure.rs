//! A finished child process's own cost: its CPU time (`wait4`) and its peak RSS.
//!
//! Peak RSS is the child's `VmHWM`, read until it exits: `ru_maxrss` would not do, because
//! Linux carries the parent's high-water mark into a spawned child across `exec`, so a test or
//! bench process holding a large data set would be charged to the child. Shared by the tests
//! (`tests/support`) and the pipeline bench.

use std::time::Duration;

/// What `reap` found.
pub struct Reaped {
    /// The raw wait status.
    pub status: libc::c_int,
    /// User + system CPU of the child alone.
    pub cpu: Duration,
    /// Peak resident set size of the child's own address space, KiB.
    pub peak_rss_kib: u64,
}

/// The child's `VmHWM` (KiB), while it lives.
pub fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Waits for child `pid` to exit, reading its `VmHWM` every `poll`, then reaps it. The caller
/// must not wait for it itself (drop a `std::process::Child` unwaited).
pub fn reap(pid: u32, poll: Duration) -> Reaped {
    // VmHWM only grows; the last reading before the exit is the peak, give or take the last
    // poll. The process is not reaped until wait4 below, so the pid stays its.
    let mut peak = 0;
    loop {
        // SAFETY: WNOWAIT leaves the child to be reaped by wait4; `info` is a valid buffer.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let exited = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            ) == 0
                && info.si_pid() != 0
        };
        if exited {
            break;
        }
        if let Some(kib) = vm_hwm_kib(pid) {
            peak = peak.max(kib);
        }
        std::thread::sleep(poll);
    }
    let mut status = 0;
    // SAFETY: a zeroed rusage is valid; wait4 reaps this child and fills it with its own times.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let reaped = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(
        reaped,
        pid as libc::pid_t,
        "wait4: {}",
        std::io::Error::last_os_error()
    );
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Reaped {
        status,
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        peak_rss_kib: peak,
    }
}
