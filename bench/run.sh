#!/usr/bin/env bash
# The benchmark: direct vs nginx proxy_pass vs gptbalance, in one run, on
# loopback, bounded in time. Installs wrk and nginx if missing.
#
#   bench/run.sh           full run (a few minutes), release build
#   bench/run.sh --smoke   a few seconds per figure, debug build (what CI runs)
set -euo pipefail
cd "$(dirname "$0")/.."

mode=full
case "${1:-}" in
  --smoke) mode=smoke ;;
  "") ;;
  *) echo "usage: bench/run.sh [--smoke]" >&2; exit 2 ;;
esac

need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || need+=(nginx-light)
if [ ${#need[@]} -gt 0 ]; then
  echo "bench: installing ${need[*]}" >&2
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ "$mode" = smoke ]; then
  cargo build --locked --bin gptbalance --example mock_upstream --example bench_client >&2
  exec python3 bench/bench.py --smoke --bin-dir target/debug
else
  cargo build --release --locked --bin gptbalance --example mock_upstream --example bench_client >&2
  exec python3 bench/bench.py --bin-dir target/release
fi
