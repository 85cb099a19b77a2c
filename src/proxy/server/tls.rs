//! The listener's TLS (`server.tls`): a connection's handshake (rustls,
//! through tokio-rustls), then hyper for the rest of its life.
//!
//! ALPN offers `h2` and `http/1.1`; hyper's auto server reads which one the
//! client speaks. The HTTP/1.1 fast path (`h1_loop`) is plaintext-only:
//! every TLS connection is served by hyper, with `keepalive_timeout`
//! applied by `idle.rs` (HTTP/2: GOAWAY) as on any connection hyper serves.
//!
//! The certificate is looked up at each handshake in the running routing
//! table's config, so a reload (the reload watcher follows the two files)
//! that read a new pair serves it to the next
//! connection, and a connection keeps the one it shook hands with. Whether
//! the listener speaks TLS at all is fixed when it starts (`reload.rs`
//! keeps a removed `server.tls` until a restart). This module reads no
//! file: `config::tls` did, at load.

use std::sync::{Arc, Weak};

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::state::AppState;

/// Makes the acceptor every worker shares (one session cache for all, so a
/// client resuming lands on a worker that knows it). `None` when the config
/// at start has no `server.tls`.
pub fn acceptor(state: &Arc<AppState>) -> Option<tokio_rustls::TlsAcceptor> {
    state.table.load().config.server.tls.as_ref()?;
    let acceptor = state.listener_tls.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports rustls' default protocol versions");
        let mut config = builder
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(CurrentIdentity(Arc::downgrade(state))));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    });
    Some(acceptor.clone())
}

/// The running config's certificate and key, at each handshake. Holds the
/// state weakly: the state holds the acceptor that holds this.
struct CurrentIdentity(Weak<AppState>);

impl std::fmt::Debug for CurrentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CurrentIdentity")
    }
}

impl ResolvesServerCert for CurrentIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let state = self.0.upgrade()?;
        let table = state.table.load();
        table.config.server.tls.as_ref().map(|t| t.identity.clone())
    }
}
