//! Running as a daemon: reload, signals, systemd notify, logging, limits.

pub mod discovery;
pub mod logging;
pub mod metrics;
pub mod reload;
pub mod systemd;
