#!/usr/bin/env bash
# The benchmark: direct (the floor) vs nginx proxy_pass (the reference) vs
# gptbalance, one after another in one run, on 127.0.0.1 only, bounded in
# time. Installs wrk and nginx with apt-get when they are missing, builds the
# release binaries, runs bench/bench.py, prints one table and saves it as
# JSON in bench/results/. See bench/README.md.
#
#   bench/run.sh           full run (about 4 minutes after the build)
#   bench/run.sh --smoke   1 s per point (a few seconds; what CI runs)
#
# Exits non-zero only when something is broken (a tool missing, a build or
# a process failing, a request failing), never because a target was missed.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=full
case "${1:-}" in
  --smoke) mode=smoke ;;
  "") ;;
  -h | --help)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
    ;;
  *)
    echo "usage: bench/run.sh [--smoke]" >&2
    exit 2
    ;;
esac
[ $# -le 1 ] || { echo "usage: bench/run.sh [--smoke]" >&2; exit 2; }

# Tools: wrk, nginx, python3 (the orchestration; standard library only).
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v python3 >/dev/null 2>&1 || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  echo "bench: installing ${need[*]} with apt-get" >&2
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The nginx package may start a system nginx on port 80; this benchmark
  # never uses it and starts its own on a free loopback port.
fi
export PATH="$PATH:/usr/sbin:/sbin"

# 1,000 open streams are about 2,000 sockets in each process.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The smoke run only checks that the harness works: it uses the debug build
# that `cargo test` shares, so CI compiles nothing twice.
profile=(--release)
bin_dir="${CARGO_TARGET_DIR:-target}/release"
if [ "$mode" = smoke ]; then
  profile=()
  bin_dir="${CARGO_TARGET_DIR:-target}/debug"
fi
echo "bench: cargo build ${profile[*]} --locked" >&2
cargo build "${profile[@]}" --locked --bin gptbalance --example mock_upstream --example bench_client >&2

work=$(mktemp -d "${TMPDIR:-/tmp}/gptbalance-bench.XXXXXX")
pidfile="$work/pids"
: >"$pidfile"
py=""

# On any exit: stop the orchestrator, then anything it started that is still
# running (by the pids it recorded, and only if they still run from this
# benchmark's binaries or temp dir), then remove the temp dir.
cleanup() {
  trap - EXIT INT TERM HUP
  if [ -n "$py" ] && kill -0 "$py" 2>/dev/null; then
    kill -TERM "$py" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$py" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$py" 2>/dev/null || true
  fi
  local left=()
  while read -r pid; do
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || continue
    if tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qE "$work|$bin_dir"; then
      kill -TERM "$pid" 2>/dev/null || true
      left+=("$pid")
    fi
  done <"$pidfile"
  for pid in "${left[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

python3 bench/bench.py --mode "$mode" --bin-dir "$bin_dir" --tmp "$work" --pidfile "$pidfile" &
py=$!
set +e
wait "$py"
status=$?
set -e
py=""
exit "$status"
