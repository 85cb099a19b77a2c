//! `gptbalance health`: one `GET` of a running gateway's `/readyz`, for
//! container health checks (the images have no curl).
//!
//! Blocking and plain HTTP/1.1 on purpose: it runs every few seconds in a
//! container, so it starts no runtime, sends one request with
//! `Connection: close` and reads only the status line. Exit 0 on 200, 1 on
//! any other status or no answer within `--timeout`, 2 on a bad argument.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The URL to probe (plain http)
    #[arg(long, default_value = "http://127.0.0.1:8000/readyz", value_parser = parse_url)]
    pub url: HealthUrl,
    /// Longest wait for the whole answer, e.g. 2s
    #[arg(long, default_value = "2s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

/// An `http://host[:port][/path]` URL, split for the request.
#[derive(Debug, Clone)]
pub struct HealthUrl {
    text: String,
    /// `host:port` to connect to, and the `Host` header.
    authority: String,
    path: String,
}

fn parse_url(s: &str) -> Result<HealthUrl, String> {
    let bad = |why: &str| format!("`{s}` {why}; expected http://HOST[:PORT][/PATH]");
    let rest = s
        .strip_prefix("http://")
        .ok_or_else(|| bad("is not a plain http:// URL"))?;
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
    let has_port = match authority.rfind(']') {
        Some(close) => authority[close..].contains(':'),
        None => authority.contains(':'),
    };
    let authority = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok(HealthUrl {
        text: s.to_owned(),
        authority,
        path: path.to_owned(),
    })
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    match crate::config::schema::parse_duration(s)? {
        d if d.is_zero() => Err("the timeout must be more than 0".to_owned()),
        d => Ok(d),
    }
}

pub fn run(args: Args) -> ExitCode {
    match probe(&args.url, args.timeout) {
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

/// The status code of `GET url`, all within `timeout`.
fn probe(url: &HealthUrl, timeout: Duration) -> std::io::Result<u16> {
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
    let mut stream = match (stream, last) {
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
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: gptbalance-health\r\nConnection: close\r\n\r\n",
        url.path, url.authority
    );
    stream.write_all(request.as_bytes())?;
    // Read until the head is complete; the body does not matter.
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        stream.set_read_timeout(Some(left()?))?;
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
