//! The integration tests, in one test binary (one link instead of one per
//! file): each file is a module, and `common` holds the mock upstreams
//! and the gateway they all start. Run one file's tests with
//! `cargo test --test integration FILE::`.

mod common;

mod callers;
mod cli;
mod daemon;
mod dashboards;
mod faults;
mod http1_wire;
mod operations;
mod properties;
mod router;
mod selection;
mod shared_state;
mod status_page;
mod tls_listener;
mod toolkit;
mod upstreams;
mod whatif;
