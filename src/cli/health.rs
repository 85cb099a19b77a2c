//! `gptbalance health`: one `GET` of a running gateway's `/readyz`, for
//! container health checks (the images have no curl).
//!
//! Blocking and HTTP/1.1 on purpose: it runs every few seconds in a
//! container, so it starts no runtime, sends one request with
//! `Connection: close` and reads only the status line. `https://` speaks
//! TLS (rustls) to a gateway with `server.tls`, verifying its certificate
//! against the public roots, or `--ca`, or not at all with `--insecure`
//! (the probe asks whether the process answers, not who it is). Exit 0 on
//! 200, 1 on any other status or no answer within `--timeout`, 2 on a bad
//! argument.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The URL to probe (http:// or https://)
    #[arg(long, default_value = "http://127.0.0.1:8000/readyz", value_parser = parse_url)]
    pub url: HealthUrl,
    /// Longest wait for the whole answer, e.g. 2s
    #[arg(long, default_value = "2s", value_parser = parse_timeout)]
    pub timeout: Duration,
    /// https: trust the certificates in this PEM file (e.g. the gateway's
    /// own `server.tls.cert`, or its CA) instead of the public roots
    #[arg(long, value_name = "PEM")]
    pub ca: Option<PathBuf>,
    /// https: do not verify the gateway's certificate
    #[arg(long, conflicts_with = "ca")]
    pub insecure: bool,
}

/// An `http(s)://host[:port][/path]` URL, split for the request.
#[derive(Debug, Clone)]
pub struct HealthUrl {
    text: String,
    /// `host:port` to connect to, and the `Host` header.
    authority: String,
    /// The host alone (no brackets), the name a certificate must hold.
    host: String,
    path: String,
    tls: bool,
}

fn parse_url(s: &str) -> Result<HealthUrl, String> {
    let bad = |why: &str| format!("`{s}` {why}; expected http(s)://HOST[:PORT][/PATH]");
    let (tls, rest) = match (s.strip_prefix("http://"), s.strip_prefix("https://")) {
        (Some(rest), _) => (false, rest),
        (_, Some(rest)) => (true, rest),
        _ => return Err(bad("is not an http:// or https:// URL")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(bad("has no host (or has credentials)"));
    }
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(bad("has spaces or control characters in its path"));
    }
    // A bracketed IPv6 address keeps its colons inside the brackets.
    let (host, has_port) = match authority.rfind(']') {
        Some(close) => (
            authority[..close].trim_start_matches('['),
            authority[close..].contains(':'),
        ),
        None => (
            authority.split(':').next().unwrap_or(authority),
            authority.contains(':'),
        ),
    };
    let host = host.to_owned();
    let authority = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:{}", if tls { 443 } else { 80 })
    };
    Ok(HealthUrl {
        text: s.to_owned(),
        authority,
        host,
        path: path.to_owned(),
        tls,
    })
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match crate::config::schema::parse_duration(s)? {
        d if d.is_zero() => Err("the timeout must be more than 0".to_owned()),
        d => Ok(d),
    }
}

pub fn run(args: Args) -> ExitCode {
    if !args.url.tls && (args.ca.is_some() || args.insecure) {
        eprintln!("--ca and --insecure apply to https:// URLs only");
        return ExitCode::from(2);
    }
    let tls = match args
        .url
        .tls
        .then(|| client_config(args.ca.as_deref(), args.insecure))
    {
        Some(Err(e)) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
        Some(Ok(config)) => Some(config),
        None => None,
    };
    match probe(&args.url, tls, args.timeout) {
        Ok(200) => {
            println!("{}: 200", args.url.text);
            ExitCode::SUCCESS
        }
        Ok(status) => {
            eprintln!("unhealthy: {} answered {status}", args.url.text);
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("unhealthy: {}: {e}", args.url.text);
            ExitCode::from(1)
        }
    }
}

/// The status code of `GET url`, all within `timeout`; over TLS with
/// `tls`.
fn probe(
    url: &HealthUrl,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> std::io::Result<u16> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                )
            })
    };
    let mut last = None;
    let mut stream = None;
    for addr in url.authority.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, left()?) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let stream = match (stream, last) {
        (Some(s), _) => s,
        (None, Some(e)) => return Err(e),
        (None, None) => {
            return Err(std::io::Error::other(format!(
                "{} resolves to no address",
                url.authority
            )))
        }
    };
    stream.set_write_timeout(Some(left()?))?;
    stream.set_read_timeout(Some(left()?))?;
    let mut stream: Box<dyn Conn> = match tls {
        None => Box::new(stream),
        Some(config) => {
            let name = ServerName::try_from(url.host.clone()).map_err(|_| {
                std::io::Error::other(format!("`{}` is not a name TLS can verify", url.host))
            })?;
            let conn =
                rustls::ClientConnection::new(config, name).map_err(std::io::Error::other)?;
            Box::new(rustls::StreamOwned::new(conn, stream))
        }
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: gptbalance-health\r\nConnection: close\r\n\r\n",
        url.path, url.authority
    );
    stream.write_all(request.as_bytes())?;
    // Read until the head is complete; the body does not matter.
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        stream.tcp().set_read_timeout(Some(left()?))?;
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection closed before a response",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(_)) => {
                return response
                    .code
                    .ok_or_else(|| std::io::Error::other("a response without a status"))
            }
            Ok(httparse::Status::Partial) if buf.len() < 64 * 1024 => {}
            Ok(httparse::Status::Partial) => {
                return Err(std::io::Error::other("a response head over 64 KiB"))
            }
            Err(e) => return Err(std::io::Error::other(format!("not an HTTP response: {e}"))),
        }
    }
}

/// A connection the probe reads and writes, plain or TLS, with its socket
/// reachable for the timeouts.
trait Conn: Read + Write {
    fn tcp(&self) -> &TcpStream;
}

impl Conn for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Conn for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }
}

/// The TLS client: public roots, `ca`'s certificates, or no verification.
fn client_config(ca: Option<&Path>, insecure: bool) -> Result<Arc<rustls::ClientConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let config = if insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match ca {
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Some(path) => {
                let shown = path.display();
                let pem = std::fs::read(path).map_err(|e| format!("--ca {shown}: {e}"))?;
                let certs = CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| format!("--ca {shown}: not PEM certificates: {e}"))?;
                if certs.is_empty() {
                    return Err(format!("--ca {shown}: holds no certificate"));
                }
                for cert in certs {
                    roots.add(cert).map_err(|e| format!("--ca {shown}: {e}"))?;
                }
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// `--insecure`: any certificate is accepted; the handshake's signatures
/// are still checked, so the connection is TLS all the same.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
