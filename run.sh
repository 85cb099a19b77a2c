#!/usr/bin/env bash
# gptbalance from a checkout.
#
#   ./run.sh demo                 two local mock upstreams + the router on examples/demo/config.yaml
#   ./run.sh test                 the test suite
#   ./run.sh [serve args...]      build if needed, then `gptbalance serve` (default: config/config.yaml)
set -euo pipefail
cd "$(dirname "$0")"

build() {
  cargo build --release --locked "$@"
}

case "${1:-serve}" in
  demo)
    # Two builds, not one: an example gets the dev-dependencies' features
    # (tokio's test-util), and built in one go with the router it would give
    # the router other dependency builds than `cargo build --release` has,
    # which would then rebuild everything.
    build --bin gptbalance
    build --example mock_upstream
    pids=()
    cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
    trap cleanup EXIT INT TERM
    target/release/examples/mock_upstream --listen 127.0.0.1:9101 --name mock-a & pids+=($!)
    target/release/examples/mock_upstream --listen 127.0.0.1:9102 --name mock-b --fail-every 5 & pids+=($!)
    cat <<'TXT'

gptbalance demo: two mock upstreams on 127.0.0.1:9101 and :9102 (mock-b fails every 5th request),
the router on http://127.0.0.1:8000. No keys, no network. Try:

  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'content-type: application/json' \
       -d '{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
  curl -sN http://127.0.0.1:8000/v1/chat/completions \
       -d '{"model":"demo","stream":true,"messages":[{"role":"user","content":"hi"}]}'
  curl -s http://127.0.0.1:8000/metrics | grep gptbalance_requests

The status page (keys, usage per day, latest errors; admin token in the fragment):

  http://127.0.0.1:8000/admin/ui#token=demo-admin

or with the OpenAI SDK (pip install openai):

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
  print(client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]))

Usage rows land in examples/demo/data/usage-YYYY-MM.sqlite. Ctrl-C stops everything.

TXT
    target/release/gptbalance serve --config examples/demo/config.yaml
    ;;
  test)
    shift
    exec cargo test --locked "$@"
    ;;
  serve)
    shift || true
    build --bin gptbalance
    exec target/release/gptbalance serve "$@"
    ;;
  *)
    build --bin gptbalance
    exec target/release/gptbalance serve "$@"
    ;;
esac
