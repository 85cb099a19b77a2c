//! Streaming and idle-stream load for `bench/run.sh`; loopback only, every
//! run bounded in count and time.
//!
//!     bench_client stream URL MODEL CONCURRENCY REQUESTS [WARMUP]
//!         Sends WARMUP streaming requests (not recorded; default CONCURRENCY)
//!         to open the connections, then REQUESTS more, CONCURRENCY at a
//!         time. Prints one JSON object: `errors`, `error_samples` and, per
//!         request, `arrivals_ms` (when each SSE event arrived, ms since the
//!         request was sent) and `latency_ms` (for each event stamped by
//!         `mock_upstream --stamp-chunks`: arrival time minus the time the
//!         upstream sent it).
//!     bench_client idle URL MODEL STREAMS HOLD_SECS
//!         Opens STREAMS streaming requests at once, waits until each has its
//!         first chunk, prints `ready OPEN FAILED`, then holds them open until
//!         stdin closes or HOLD_SECS pass, and exits (closing them).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// No single stream may take longer than this (the load stays bounded).
const STREAM_TIMEOUT: Duration = Duration::from_secs(60);

fn request(url: &str, model: &str) -> http::Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"{model}","stream":true,"messages":[{{"role":"user","content":"hello"}}]}}"#
    );
    http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid request")
}

fn unix_micros() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

/// The `"x_sent_us":N` stamp of one SSE event, if it has one.
fn sent_stamp(event: &[u8]) -> Option<f64> {
    const KEY: &[u8] = b"\"x_sent_us\":";
    let at = event.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits: &[u8] = &event[at..];
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

#[derive(Default)]
struct StreamTimes {
    arrivals_ms: Vec<f64>,
    latency_ms: Vec<f64>,
}

/// One streaming request: when each event arrived, and how long each
/// stamped event took from the upstream to here.
async fn one_stream(client: &HttpClient, url: &str, model: &str) -> Result<StreamTimes, String> {
    let start = Instant::now();
    let resp = client
        .request(request(url, model))
        .await
        .map_err(|e| format!("request: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut times = StreamTimes::default();
    let mut pending: Vec<u8> = Vec::new();
    let mut done = false;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("body: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let at_ms = start.elapsed().as_secs_f64() * 1000.0;
        let now_us = unix_micros();
        pending.extend_from_slice(&data);
        // Every complete event (ended by a blank line) arrived with this frame.
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            times.arrivals_ms.push(at_ms);
            if let Some(sent) = sent_stamp(&event) {
                times.latency_ms.push((now_us - sent) / 1000.0);
            }
            if event.starts_with(b"data: [DONE]") {
                done = true;
            }
        }
    }
    if times.arrivals_ms.is_empty() {
        return Err("no events".into());
    }
    if !done {
        return Err("stream ended without [DONE]".into());
    }
    Ok(times)
}

async fn run_streams(
    client: &HttpClient,
    url: &str,
    model: &str,
    concurrency: usize,
    requests: usize,
) -> Vec<Result<StreamTimes, String>> {
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut tasks = Vec::with_capacity(requests);
    for _ in 0..requests {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (client, url, model) = (client.clone(), url.to_owned(), model.to_owned());
        tasks.push(tokio::spawn(async move {
            let r = match tokio::time::timeout(STREAM_TIMEOUT, one_stream(&client, &url, &model))
                .await
            {
                Ok(r) => r,
                Err(_) => Err("timed out".into()),
            };
            drop(permit);
            r
        }));
    }
    let mut out = Vec::with_capacity(requests);
    for t in tasks {
        out.push(t.await.unwrap_or_else(|e| Err(format!("task: {e}"))));
    }
    out
}

async fn stream_mode(
    client: HttpClient,
    url: &str,
    model: &str,
    conc: usize,
    n: usize,
    warm: usize,
) {
    let _ = run_streams(&client, url, model, conc, warm).await;
    let results = run_streams(&client, url, model, conc, n).await;
    let mut errors = 0;
    let mut samples: Vec<String> = Vec::new();
    let mut ok = Vec::new();
    for r in results {
        match r {
            Ok(t) => ok.push(serde_json::json!({
                "arrivals_ms": t.arrivals_ms,
                "latency_ms": t.latency_ms,
            })),
            Err(e) => {
                errors += 1;
                if samples.len() < 5 {
                    samples.push(e);
                }
            }
        }
    }
    let json = serde_json::json!({ "errors": errors, "error_samples": samples, "requests": ok });
    println!("{json}");
}

async fn idle_mode(client: HttpClient, url: &str, model: &str, streams: usize, hold: Duration) {
    // Open them all at once (at most 200 connecting at a time).
    let connecting = Arc::new(Semaphore::new(200));
    let mut opening = Vec::with_capacity(streams);
    for _ in 0..streams {
        let (client, url, model) = (client.clone(), url.to_owned(), model.to_owned());
        let connecting = connecting.clone();
        opening.push(tokio::spawn(async move {
            let permit = connecting
                .acquire_owned()
                .await
                .map_err(|e| e.to_string())?;
            let opened = async {
                let resp = client
                    .request(request(&url, &model))
                    .await
                    .map_err(|e| e.to_string())?;
                if !resp.status().is_success() {
                    return Err(format!("status {}", resp.status()));
                }
                let mut body = resp.into_body();
                // The first chunk: the stream is open end to end.
                match body.frame().await {
                    Some(Ok(_)) => Ok(body),
                    _ => Err("no first chunk".to_string()),
                }
            };
            let r = tokio::time::timeout(Duration::from_secs(30), opened)
                .await
                .unwrap_or_else(|_| Err("timed out".into()));
            drop(permit);
            r
        }));
    }
    let mut bodies = Vec::with_capacity(streams);
    let mut failed = 0;
    let mut first_error = None;
    for o in opening {
        match o.await {
            Ok(Ok(b)) => bodies.push(b),
            Ok(Err(e)) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("bench_client: {failed} streams failed to open, e.g.: {e}");
    }
    println!("ready {} {failed}", bodies.len());
    // Hold until stdin closes (the harness has read the memory) or `hold`.
    let stdin_closed = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    });
    let _ = tokio::time::timeout(hold, stdin_closed).await;
    drop(bodies);
}

fn parse(args: &[String], i: usize, what: &str) -> usize {
    args[i].parse().unwrap_or_else(|_| {
        eprintln!("bench_client: {what} must be a number, not `{}`", args[i]);
        std::process::exit(2)
    })
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: bench_client stream URL MODEL CONCURRENCY REQUESTS [WARMUP]\n       bench_client idle URL MODEL STREAMS HOLD_SECS";
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(4096)
        .build(http);
    match args.get(1).map(String::as_str) {
        Some("stream") if args.len() == 6 || args.len() == 7 => {
            let conc = parse(&args, 4, "CONCURRENCY");
            let n = parse(&args, 5, "REQUESTS");
            let warm = if args.len() == 7 {
                parse(&args, 6, "WARMUP")
            } else {
                conc
            };
            stream_mode(client, &args[2], &args[3], conc, n, warm).await;
        }
        Some("idle") if args.len() == 6 => {
            let streams = parse(&args, 4, "STREAMS");
            let hold = Duration::from_secs(parse(&args, 5, "HOLD_SECS") as u64);
            idle_mode(client, &args[2], &args[3], streams, hold).await;
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
