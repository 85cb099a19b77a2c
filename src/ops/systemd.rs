//! systemd's notify protocol; every call is a no-op without `NOTIFY_SOCKET`.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "systemd notify failed");
    }
}

pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// Around a reload: systemd (Type=notify-reload) wants the monotonic time.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// The watchdog interval systemd asks for: `WATCHDOG_USEC`, for this
/// process when `WATCHDOG_PID` is set (as libsystemd's sd_watchdog_enabled).
fn watchdog_usec() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    match std::env::var("WATCHDOG_PID") {
        Ok(pid) if pid.parse::<u32>().ok() != Some(std::process::id()) => None,
        _ => (usec > 0).then_some(usec),
    }
}

/// Pings the watchdog at half its interval, when `WATCHDOG_USEC` asks for it.
pub fn spawn_watchdog() {
    let Some(usec) = watchdog_usec() else {
        return;
    };
    let every = Duration::from_micros(usec / 2);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    });
}
