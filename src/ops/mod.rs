//! Running as a daemon: reload, signals, systemd notify, logging,
//! background key probes.

pub mod discovery;
pub mod logging;
pub mod probe;
pub mod reload;
pub mod systemd;
