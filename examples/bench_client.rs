//! Streaming and idle-stream load for `bench/run.sh`; loopback only.
//!
//!     bench_client stream URL MODEL CONCURRENCY REQUESTS
//!         JSON on stdout: per request, the time to first chunk, to last
//!         chunk, and each SSE event's arrival time (ms since the request).
//!     bench_client idle URL MODEL STREAMS
//!         opens STREAMS streaming requests, prints `ready N` once each has
//!         its first chunk, holds them until stdin closes, then exits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

fn request(url: &str, model: &str) -> http::Request<Full<Bytes>> {
    let body = format!(
        r#"{{"model":"{model}","stream":true,"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("valid request")
}

/// Arrival times (ms since send) of each SSE event of one streaming request.
async fn one_stream(client: &HttpClient, url: &str, model: &str) -> Result<Vec<f64>, String> {
    let start = Instant::now();
    let resp = client
        .request(request(url, model))
        .await
        .map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let mut body = resp.into_body();
    let mut events = Vec::new();
    let mut pending = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            let at = start.elapsed().as_secs_f64() * 1000.0;
            // Count complete events (blank-line terminated) in this frame.
            let text = String::from_utf8_lossy(&data);
            let n = text.matches("\n\n").count();
            pending += n;
            for _ in 0..n {
                events.push(at);
            }
        }
    }
    if pending == 0 {
        return Err("no events".into());
    }
    Ok(events)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage =
        "usage: bench_client stream URL MODEL CONCURRENCY REQUESTS | idle URL MODEL STREAMS";
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(2048)
        .build_http();
    match args.get(1).map(String::as_str) {
        Some("stream") if args.len() == 6 => {
            let (url, model) = (args[2].clone(), args[3].clone());
            let concurrency: usize = args[4].parse().expect("CONCURRENCY");
            let requests: usize = args[5].parse().expect("REQUESTS");
            let slots = Arc::new(Semaphore::new(concurrency));
            let mut tasks = Vec::new();
            for _ in 0..requests {
                let permit = slots.clone().acquire_owned().await.expect("open semaphore");
                let (client, url, model) = (client.clone(), url.clone(), model.clone());
                tasks.push(tokio::spawn(async move {
                    let r = one_stream(&client, &url, &model).await;
                    drop(permit);
                    r
                }));
            }
            let mut results = Vec::new();
            let mut errors = 0;
            for t in tasks {
                match t.await.expect("task") {
                    Ok(ev) => results.push(ev),
                    Err(_) => errors += 1,
                }
            }
            let json = serde_json::json!({ "errors": errors, "events_ms": results });
            println!("{json}");
        }
        Some("idle") if args.len() == 5 => {
            let (url, model) = (args[2].clone(), args[3].clone());
            let streams: usize = args[4].parse().expect("STREAMS");
            let mut bodies = Vec::with_capacity(streams);
            let mut failed = 0;
            for chunk in (0..streams).collect::<Vec<_>>().chunks(100) {
                let mut opening = Vec::new();
                for _ in chunk {
                    let (client, url, model) = (client.clone(), url.clone(), model.clone());
                    opening.push(tokio::spawn(async move {
                        let resp = client
                            .request(request(&url, &model))
                            .await
                            .map_err(|e| e.to_string())?;
                        let mut body = resp.into_body();
                        // Wait for the first chunk: the stream is open end to end.
                        match tokio::time::timeout(Duration::from_secs(30), body.frame()).await {
                            Ok(Some(Ok(_))) => Ok(body),
                            _ => Err("no first chunk".to_string()),
                        }
                    }));
                }
                for o in opening {
                    match o.await.expect("task") {
                        Ok(b) => bodies.push(b),
                        Err(_) => failed += 1,
                    }
                }
            }
            println!("ready {} failed {failed}", bodies.len());
            let _ = tokio::task::spawn_blocking(|| {
                let mut sink = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink)
            })
            .await;
            drop(bodies);
        }
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
