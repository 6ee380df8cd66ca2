//! systemd notifications (`Type=notify`): READY, WATCHDOG, STATUS, STOPPING. Outside systemd
//! (no `NOTIFY_SOCKET`) every call is a no-op.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::debug;

fn send(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        debug!(error = %e, "systemd notification failed.");
    }
}

pub fn ready() {
    send(&[NotifyState::Ready]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Sent from the supervisor loop, not a free-running timer: a wedged supervisor stops it.
pub fn watchdog() {
    if watchdog_interval().is_some() {
        send(&[NotifyState::Watchdog]);
    }
}

pub fn status(text: &str) {
    send(&[NotifyState::Status(text)]);
}

/// `WatchdogSec=` as systemd passed it, if set for this process.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}
