//! Relays an upstream response body to the caller as it arrives.
//!
//! Polls the upstream only when the caller's connection asks for more, so a
//! slow caller slows the upstream read (backpressure) and a caller that goes
//! away drops this body, which drops the upstream request. An upstream
//! failure or an idle gap longer than `idle_timeout` aborts the caller's
//! response; it never ends cleanly.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use smallvec::SmallVec;
use tokio::time::{Instant, Sleep};

use super::anthropic::Expect;
use super::body::BoxError;
use super::report::Completion;
use super::sse::{self, PrefixSlot, SseFilter, Usage};
use super::upstream::UpstreamBody;

/// What the relay does to the bytes besides forwarding them.
pub enum Filter {
    /// `text/event-stream`: event-aligned, usage chunk read (and maybe removed).
    Sse(SseFilter),
    /// A JSON body: forwarded as it comes, `usage` read from a copy.
    Json(JsonSniffer),
    /// A JSON body whose first content gets a prefix: held whole, then sent.
    Prefix(PrefixBuffer),
    /// Anything else: forwarded untouched.
    Raw,
}

/// Chunks waiting for the caller, oldest first. The first waits in a slot
/// of its own, so a body that arrives as one chunk (most non-streaming
/// answers) allocates no queue.
#[derive(Default)]
struct Queue {
    head: Option<Bytes>,
    rest: VecDeque<Bytes>,
}

impl Queue {
    fn push(&mut self, chunk: Bytes) {
        if self.head.is_none() && self.rest.is_empty() {
            self.head = Some(chunk);
        } else {
            self.rest.push_back(chunk);
        }
    }

    fn pop(&mut self) -> Option<Bytes> {
        self.head.take().or_else(|| self.rest.pop_front())
    }

    fn is_empty(&self) -> bool {
        self.head.is_none() && self.rest.is_empty()
    }

    /// Where a filter that queues many pieces at once appends them.
    fn tail(&mut self) -> &mut VecDeque<Bytes> {
        if let Some(head) = self.head.take() {
            self.rest.push_front(head);
        }
        &mut self.rest
    }
}

pub struct Relay {
    upstream: UpstreamBody,
    queued: Queue,
    filter: Filter,
    idle_timeout: Duration,
    /// When the upstream last sent data (or the relay began).
    last_data: Instant,
    /// Armed only once the upstream makes the caller wait: a body that is
    /// complete at once (most non-streaming answers) never touches a timer.
    idle: Option<Pin<Box<Sleep>>>,
    upstream_done: bool,
    completion: Option<Completion>,
    /// An upstream failure, reported on the poll after the one that saw
    /// it: that gives the caller's connection a turn to write out what it
    /// was already handed (hyper drops its unwritten buffer when a body
    /// fails). Best effort: a caller whose socket is full still loses it.
    deferred_error: Option<BoxError>,
}

impl Relay {
    /// `first` is the chunk already read while the response headers were
    /// held, at `first_at` (the idle timeout counts from there).
    pub fn new(
        upstream: UpstreamBody,
        first: Option<Bytes>,
        first_at: std::time::Instant,
        filter: Filter,
        idle_timeout: Duration,
        completion: Completion,
    ) -> Relay {
        let mut relay = Relay {
            upstream,
            queued: Queue::default(),
            filter,
            idle_timeout,
            last_data: Instant::from_std(first_at),
            idle: None,
            upstream_done: false,
            completion: Some(completion),
            deferred_error: None,
        };
        if let Some(first) = first {
            relay.take_chunk(first);
        }
        if relay.upstream.is_end_stream() {
            relay.upstream_done = true;
            relay.end_of_upstream();
            if relay.queued.is_empty() {
                // Nothing will poll an empty body: it is complete now.
                relay.complete(None);
            }
        }
        relay
    }

    fn take_chunk(&mut self, chunk: Bytes) {
        match &mut self.filter {
            Filter::Sse(f) => f.push(chunk, self.queued.tail()),
            Filter::Json(s) => {
                s.observe(&chunk);
                self.queued.push(chunk);
            }
            Filter::Prefix(p) => {
                if let Some(overflow) = p.push(chunk) {
                    self.queued.tail().extend(overflow);
                }
            }
            Filter::Raw => self.queued.push(chunk),
        }
    }

    fn end_of_upstream(&mut self) {
        match &mut self.filter {
            Filter::Sse(f) => f.finish(self.queued.tail()),
            Filter::Prefix(p) => self.queued.tail().extend(p.finish()),
            Filter::Json(_) | Filter::Raw => {}
        }
    }

    /// Tokens the body reported, and what was wrong with it, if anything.
    fn outcome(&self) -> (Option<Usage>, Option<String>) {
        match &self.filter {
            Filter::Sse(f) if f.foreign => (None, Some(f.expect().note())),
            Filter::Sse(f) => (f.usage, None),
            Filter::Json(s) if self.upstream_done => s.outcome(),
            Filter::Json(_) => (None, None),
            Filter::Prefix(p) => (p.usage, None),
            Filter::Raw => (None, None),
        }
    }

    /// Records the request's end, once: later calls do nothing.
    fn complete(&mut self, error: Option<String>) {
        let Some(c) = self.completion.take() else {
            return;
        };
        let (usage, problem) = self.outcome();
        c.finish(usage, error.or(problem));
    }
}

impl Body for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if let Some(chunk) = this.queued.pop() {
                // A caller reading a sized body stops polling after the last
                // byte, so the request is complete when that byte leaves.
                if this.queued.is_empty() && this.upstream_done {
                    this.complete(None);
                }
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            if let Some(e) = this.deferred_error.take() {
                return Poll::Ready(Some(Err(e)));
            }
            if this.upstream_done {
                this.complete(None);
                return Poll::Ready(None);
            }
            // Upstream first: data already waiting is not an idle gap, even
            // if the caller was slow to ask for it.
            match Pin::new(&mut this.upstream).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        this.last_data = Instant::now();
                        if let Some(idle) = &mut this.idle {
                            idle.as_mut().reset(this.last_data + this.idle_timeout);
                        }
                        if !data.is_empty() {
                            this.take_chunk(data);
                        }
                    }
                    if this.upstream.is_end_stream() {
                        this.upstream_done = true;
                        this.end_of_upstream();
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.complete(Some(format!("upstream failed mid-response: {e}")));
                    this.deferred_error = Some(Box::new(e));
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Poll::Ready(None) => {
                    this.upstream_done = true;
                    this.end_of_upstream();
                }
                Poll::Pending => {
                    let deadline = this.last_data + this.idle_timeout;
                    let idle = this
                        .idle
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if idle.as_mut().poll(cx).is_ready() {
                        let msg = format!(
                            "upstream sent nothing for {:?} (idle_timeout)",
                            this.idle_timeout
                        );
                        this.complete(Some(msg.clone()));
                        return Poll::Ready(Some(Err(msg.into())));
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Relay {
    pub fn is_finished(&self) -> bool {
        self.upstream_done && self.queued.is_empty()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.completion.is_some() {
            self.complete(Some("caller closed the connection".to_owned()));
        }
    }
}

/// Bodies up to this size are kept whole to read `usage`; larger ones keep a tail.
const WHOLE_JSON_LIMIT: usize = 256 * 1024;
const JSON_TAIL: usize = 16 * 1024;

/// Keeps what is needed to read `usage` from a JSON body: the chunks
/// themselves (reference-counted, not copied) while the body is small, then
/// only a tail.
#[derive(Default)]
pub struct JsonSniffer {
    expect: Expect,
    /// Inline for the usual body of one or two chunks.
    chunks: SmallVec<[Bytes; 2]>,
    len: usize,
    tail: BytesMut,
    whole: bool,
}

impl JsonSniffer {
    pub fn new() -> Self {
        JsonSniffer {
            whole: true,
            ..JsonSniffer::default()
        }
    }

    /// Notes a whole body in the other API's format than `expect`.
    pub fn expecting(self, expect: Expect) -> Self {
        JsonSniffer { expect, ..self }
    }

    fn observe(&mut self, chunk: &Bytes) {
        if self.whole && self.len + chunk.len() <= WHOLE_JSON_LIMIT {
            self.len += chunk.len();
            self.chunks.push(chunk.clone());
            return;
        }
        if self.whole {
            self.whole = false;
            for c in std::mem::take(&mut self.chunks) {
                self.keep_tail(&c);
            }
        }
        self.keep_tail(chunk);
    }

    fn keep_tail(&mut self, chunk: &[u8]) {
        let keep_old = JSON_TAIL.saturating_sub(chunk.len()).min(self.tail.len());
        self.tail = self.tail.split_off(self.tail.len() - keep_old);
        let from = chunk.len().saturating_sub(JSON_TAIL);
        self.tail.extend_from_slice(&chunk[from..]);
    }

    fn whole_body(&self) -> std::borrow::Cow<'_, [u8]> {
        match self.chunks.as_slice() {
            [one] => std::borrow::Cow::Borrowed(one),
            many => std::borrow::Cow::Owned(many.concat()),
        }
    }

    /// Tokens from `usage`, and a note when a whole body is not JSON.
    fn outcome(&self) -> (Option<Usage>, Option<String>) {
        if !self.whole {
            return (sse::usage_in_json_tail(&self.tail), None);
        }
        let body = self.whole_body();
        if self.expect != Expect::Any && self.expect.foreign_json(&body) {
            return (None, Some(self.expect.note()));
        }
        match sse::usage_in_whole_json(&body) {
            Ok(usage) => (usage, None),
            Err(_) if self.len == 0 => (None, None),
            Err(_) => (
                None,
                Some("upstream sent a body that is not valid JSON".to_owned()),
            ),
        }
    }
}

/// Largest non-stream body held to add a `special_prefix`; beyond it the
/// body is forwarded without the prefix rather than held in memory.
const PREFIX_BUFFER_LIMIT: usize = 64 * 1024 * 1024;

pub struct PrefixBuffer {
    buf: BytesMut,
    prefix: String,
    slot: PrefixSlot,
    overflowed: bool,
    sniffer: JsonSniffer,
    usage: Option<Usage>,
}

impl PrefixBuffer {
    pub fn new(prefix: String, slot: PrefixSlot) -> Self {
        PrefixBuffer {
            buf: BytesMut::new(),
            prefix,
            slot,
            overflowed: false,
            sniffer: JsonSniffer::new(),
            usage: None,
        }
    }

    /// Holds the chunk; returns what to forward now if the body outgrew the limit.
    fn push(&mut self, chunk: Bytes) -> Option<Vec<Bytes>> {
        self.sniffer.observe(&chunk);
        if self.overflowed {
            return Some(vec![chunk]);
        }
        if self.buf.len() + chunk.len() > PREFIX_BUFFER_LIMIT {
            self.overflowed = true;
            return Some(vec![self.buf.split().freeze(), chunk]);
        }
        self.buf.extend_from_slice(&chunk);
        None
    }

    fn finish(&mut self) -> Vec<Bytes> {
        self.usage = self.sniffer.outcome().0;
        if self.overflowed {
            return Vec::new();
        }
        let held = self.buf.split().freeze();
        let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&held) else {
            return vec![held];
        };
        if !sse::prepend(&mut json, &self.prefix, self.slot, false) {
            return vec![held];
        }
        match serde_json::to_vec(&json) {
            Ok(v) => vec![Bytes::from(v)],
            Err(_) => vec![held],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_gives_chunks_back_in_the_order_they_came() {
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        let mut q = Queue::default();
        assert!(q.is_empty());
        q.push(b("1"));
        q.push(b("2"));
        // A filter appending many at once goes behind what is queued,
        // including the chunk in the first slot.
        q.tail().extend([b("3"), b("4")]);
        q.push(b("5"));
        assert_eq!(q.pop(), Some(b("1")));
        // Emptied slot, non-empty rest: a new chunk still goes last.
        q.push(b("6"));
        let rest: Vec<Bytes> = std::iter::from_fn(|| q.pop()).collect();
        assert_eq!(rest, [b("2"), b("3"), b("4"), b("5"), b("6")]);
        assert!(q.is_empty());
    }
}
