//! A small OpenAI-compatible upstream for the demo and the benchmarks.
//!
//! Answers `POST .../chat/completions`, `.../completions`, `.../embeddings`
//! (JSON, or SSE when `"stream": true`) and `GET .../models`, on loopback.
//!
//!     cargo run --release --example mock_upstream -- --listen 127.0.0.1:9001 --name demo
//!
//! `--chunks N` and `--chunk-delay-ms D` shape streams (`D` = 0 sends the
//! chunks back to back; a large `D`, e.g. 600000, holds streams open and idle
//! after their first chunk); `--fail-every N` answers every Nth request with a
//! 503, to watch failover. `--stamp-chunks` adds `"x_sent_us"` (Unix time in
//! microseconds when the chunk was handed to the connection) to every stream
//! chunk, so a client on the same machine can tell how long each chunk took
//! to reach it (`examples/bench_client.rs` uses it). `--ratelimit-headers`
//! adds OpenAI's four `x-ratelimit-remaining-*` / `-reset-*` headers, with
//! large remaining figures, to every non-streaming answer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpSocket;

#[derive(Clone)]
struct Opts {
    name: String,
    chunks: usize,
    delay: Duration,
    fail_every: u64,
    stamp: bool,
    ratelimit: bool,
    seen: Arc<AtomicU64>,
    /// The words of every answer (the same for every request), and their
    /// concatenation as a JSON string for non-streaming answers.
    words: Arc<[String]>,
    text_json: Arc<str>,
}

/// The fields of a request body the mock looks at; parsed without building a
/// `serde_json::Value`, so the mock stays cheap under benchmark load.
#[derive(serde::Deserialize, Default)]
struct Req {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(serde::Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

type Body = http_body_util::Either<Full<Bytes>, ChannelBody>;

/// A body fed by a channel, one frame per message.
struct ChannelBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen: SocketAddr = arg(&args, "--listen")
        .unwrap_or_else(|| "127.0.0.1:9001".into())
        .parse()
        .expect("--listen takes an address such as 127.0.0.1:9001");
    let name = arg(&args, "--name").unwrap_or_else(|| "mock".into());
    let chunks: usize = arg(&args, "--chunks")
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let words: Vec<String> = (0..chunks)
        .map(|i| {
            if i == 0 {
                format!("Hello from {name}")
            } else {
                format!(" #{i}")
            }
        })
        .collect();
    let text_json = serde_json::to_string(&words.concat()).expect("a string serializes");
    let opts = Opts {
        name,
        chunks,
        delay: Duration::from_millis(
            arg(&args, "--chunk-delay-ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(20),
        ),
        fail_every: arg(&args, "--fail-every")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        stamp: args.iter().any(|a| a == "--stamp-chunks"),
        ratelimit: args.iter().any(|a| a == "--ratelimit-headers"),
        seen: Arc::new(AtomicU64::new(0)),
        words: words.into(),
        text_json: text_json.into(),
    };
    // A deep accept queue, as a provider's front end has: with the
    // standard 128, a proxy that opens a burst of upstream connections
    // (concurrency going from 64 to 256) finds handshakes dropped and
    // waits for 1-second retransmits, which the benchmark then reports
    // as the proxy's tail latency.
    let socket = if listen.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .expect("cannot open a socket");
    let _ = socket.set_reuseaddr(true);
    socket.bind(listen).expect("cannot bind --listen");
    let listener = socket.listen(4096).expect("cannot listen on --listen");
    eprintln!(
        "mock upstream `{}` on http://{}",
        opts.name,
        listener.local_addr().unwrap()
    );
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let opts = opts.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| answer(opts.clone(), req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(
        v.to_string(),
    ))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

async fn answer(o: Opts, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_owned();
    if req.method() == http::Method::GET && path.ends_with("/models") {
        return Ok(json(
            StatusCode::OK,
            serde_json::json!({"object": "list", "data": [{"id": "mock-model", "object": "model", "created": 0, "owned_by": o.name}]}),
        ));
    }
    let n = o.seen.fetch_add(1, Ordering::Relaxed) + 1;
    if o.fail_every > 0 && n % o.fail_every == 0 {
        return Ok(json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({"error": {"message": "mock overloaded", "type": "server_error"}}),
        ));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let v: Req = serde_json::from_slice(&body).unwrap_or_default();
    let model = v.model.unwrap_or_else(|| "unknown".into());
    if path.ends_with("/embeddings") {
        return Ok(json(
            StatusCode::OK,
            serde_json::json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}], "model": model, "usage": {"prompt_tokens": 9, "total_tokens": 9}}),
        ));
    }
    let chat = path.ends_with("/chat/completions");
    if v.stream != Some(true) {
        // Written out by hand rather than through `serde_json::Value`: this
        // is the benchmark's hot path and the mock should cost little.
        let text = &o.text_json;
        let (object, choice) = if chat {
            (
                "chat.completion",
                format!(
                    r#"{{"index":0,"message":{{"role":"assistant","content":{text}}},"finish_reason":"stop"}}"#
                ),
            )
        } else {
            (
                "text_completion",
                format!(r#"{{"index":0,"text":{text},"finish_reason":"stop"}}"#),
            )
        };
        let model = serde_json::to_string(&model).expect("a string serializes");
        let (completion, total) = (o.chunks, 9 + o.chunks);
        let body = format!(
            r#"{{"id":"mock-1","object":"{object}","created":0,"model":{model},"choices":[{choice}],"usage":{{"prompt_tokens":9,"completion_tokens":{completion},"total_tokens":{total}}}}}"#
        );
        let mut r = Response::new(http_body_util::Either::Left(Full::new(Bytes::from(body))));
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        if o.ratelimit {
            for (name, value) in [
                ("x-ratelimit-remaining-requests", "9999"),
                ("x-ratelimit-remaining-tokens", "1999000"),
                ("x-ratelimit-reset-requests", "6ms"),
                ("x-ratelimit-reset-tokens", "1m0s"),
            ] {
                r.headers_mut().insert(
                    http::HeaderName::from_static(name),
                    http::HeaderValue::from_static(value),
                );
            }
        }
        return Ok(r);
    }
    let usage = serde_json::json!({"prompt_tokens": 9, "completion_tokens": o.chunks, "total_tokens": 9 + o.chunks});
    let words = o.words.clone();
    let include_usage = v.stream_options.and_then(|o| o.include_usage) == Some(true);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        for w in words.iter() {
            let choice = if chat {
                serde_json::json!({"index": 0, "delta": {"content": w}, "finish_reason": null})
            } else {
                serde_json::json!({"index": 0, "text": w, "finish_reason": null})
            };
            let mut ev = serde_json::json!({"id": "mock-1", "object": object, "created": 0, "model": model, "choices": [choice]});
            if o.stamp {
                ev["x_sent_us"] = unix_micros().into();
            }
            if tx
                .send(Bytes::from(format!("data: {ev}\n\n")))
                .await
                .is_err()
            {
                return;
            }
            if !o.delay.is_zero() {
                tokio::time::sleep(o.delay).await;
            }
        }
        if include_usage {
            let ev = serde_json::json!({"id": "mock-1", "object": object, "created": 0, "model": model, "choices": [], "usage": usage});
            let _ = tx.send(Bytes::from(format!("data: {ev}\n\n"))).await;
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let mut r = Response::new(http_body_util::Either::Right(ChannelBody(rx)));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    Ok(r)
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
