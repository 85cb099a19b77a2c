//! A small OpenAI-compatible upstream for the demo and the benchmarks.
//!
//! Answers `POST .../chat/completions`, `.../completions`, `.../embeddings`
//! (JSON, or SSE when `"stream": true`) and `GET .../models`, on loopback.
//!
//!     cargo run --release --example mock_upstream -- --listen 127.0.0.1:9001 --name demo
//!
//! `--chunks N` and `--chunk-delay-ms D` shape streams; `--fail-every N`
//! answers every Nth request with a 503, to watch failover.

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
use tokio::net::TcpListener;

#[derive(Clone)]
struct Opts {
    name: String,
    chunks: usize,
    delay: Duration,
    fail_every: u64,
    seen: Arc<AtomicU64>,
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
    let opts = Opts {
        name: arg(&args, "--name").unwrap_or_else(|| "mock".into()),
        chunks: arg(&args, "--chunks")
            .and_then(|v| v.parse().ok())
            .unwrap_or(5),
        delay: Duration::from_millis(
            arg(&args, "--chunk-delay-ms")
                .and_then(|v| v.parse().ok())
                .unwrap_or(20),
        ),
        fail_every: arg(&args, "--fail-every")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        seen: Arc::new(AtomicU64::new(0)),
    };
    let listener = TcpListener::bind(listen)
        .await
        .expect("cannot bind --listen");
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
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
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
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let model = v["model"].as_str().unwrap_or("unknown").to_owned();
    let usage = serde_json::json!({"prompt_tokens": 9, "completion_tokens": o.chunks, "total_tokens": 9 + o.chunks});
    if path.ends_with("/embeddings") {
        return Ok(json(
            StatusCode::OK,
            serde_json::json!({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}], "model": model, "usage": {"prompt_tokens": 9, "total_tokens": 9}}),
        ));
    }
    let chat = path.ends_with("/chat/completions");
    let words: Vec<String> = (0..o.chunks)
        .map(|i| {
            if i == 0 {
                format!("Hello from {}", o.name)
            } else {
                format!(" #{i}")
            }
        })
        .collect();
    if v["stream"].as_bool() != Some(true) {
        let text = words.concat();
        let choice = if chat {
            serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"})
        } else {
            serde_json::json!({"index": 0, "text": text, "finish_reason": "stop"})
        };
        let object = if chat {
            "chat.completion"
        } else {
            "text_completion"
        };
        return Ok(json(
            StatusCode::OK,
            serde_json::json!({"id": "mock-1", "object": object, "created": 0, "model": model, "choices": [choice], "usage": usage}),
        ));
    }
    let include_usage = v["stream_options"]["include_usage"].as_bool() == Some(true);
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::spawn(async move {
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        for w in words {
            let choice = if chat {
                serde_json::json!({"index": 0, "delta": {"content": w}, "finish_reason": null})
            } else {
                serde_json::json!({"index": 0, "text": w, "finish_reason": null})
            };
            let ev = serde_json::json!({"id": "mock-1", "object": object, "created": 0, "model": model, "choices": [choice]});
            if tx
                .send(Bytes::from(format!("data: {ev}\n\n")))
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(o.delay).await;
        }
        if include_usage {
            let ev = serde_json::json!({"id": "mock-1", "object": object, "created": 0, "model": model, "choices": [], "usage": usage});
            let _ = tx.send(Bytes::from(format!("data: {ev}\n\n"))).await;
        }
        let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
    });
    let mut r = Response::new(http_body_util::Either::Right(ChannelBody(rx)));
    r.headers_mut()
        .insert("content-type", "text/event-stream".parse().unwrap());
    Ok(r)
}
