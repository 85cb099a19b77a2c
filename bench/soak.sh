#!/usr/bin/env bash
# Soak run: mixed requests, streams and reloads against gptbalance on
# loopback for a bounded time, then checks that RSS stayed flat after
# warm-up, that no request failed, and that every request has its usage row.
#
#   bench/soak.sh              # 10 minutes
#   bench/soak.sh --minutes 2  # shorter
set -euo pipefail
cd "$(dirname "$0")/.."

minutes=10
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) minutes="$2"; shift 2 ;;
    *) echo "usage: bench/soak.sh [--minutes N]" >&2; exit 2 ;;
  esac
done
seconds=$((minutes * 60))

cargo build --release --locked --bin gptbalance --example mock_upstream >&2

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
mock_port=$(free_port)
gw_port=$(free_port)

target/release/examples/mock_upstream --listen "127.0.0.1:$mock_port" --name soak --chunks 8 --chunk-delay-ms 5 >"$work/mock.log" 2>&1 &
pids+=($!)

write_config() { # weight
  cat <<YAML
server:
  listen: "127.0.0.1:$gw_port"
  auth_tokens: ["soak"]
usage:
  dir: "$work/usage"
logging:
  level: warn
openai_clients:
  - name: a
    base_url: "http://127.0.0.1:$mock_port/v1"
    api_keys: ["ka1", "ka2"]
    weight: $1
    model_match: { type: exact, value: ["soak-model"] }
  - name: b
    base_url: "http://127.0.0.1:$mock_port/v1"
    api_key: "kb"
    model_match: { type: exact, value: ["soak-model"] }
YAML
}
write_config 1 >"$work/config-a.yaml"
write_config 3 >"$work/config-b.yaml"
cp "$work/config-a.yaml" "$work/config.yaml"

target/release/gptbalance serve --config "$work/config.yaml" 2>"$work/gptbalance.log" &
gw_pid=$!
pids+=($gw_pid)
for _ in $(seq 100); do
  curl -sf "http://127.0.0.1:$gw_port/healthz" >/dev/null 2>&1 && break
  sleep 0.1
done

echo "soak: ${minutes} min of mixed load with a reload every 5 s (gptbalance pid $gw_pid)" >&2
result=$(python3 bench/soak.py --port "$gw_port" --pid "$gw_pid" --config "$work/config.yaml" \
  --config-a "$work/config-a.yaml" --config-b "$work/config-b.yaml" --seconds "$seconds")

kill -TERM "$gw_pid"
wait "$gw_pid" || true
rows=$(python3 bench/soak.py count-rows "$work/usage")

mkdir -p bench/results
out="bench/results/soak-$(date -u +%Y%m%dT%H%M%SZ).json"
python3 - "$result" "$rows" "$out" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); rows = int(sys.argv[2]); out = sys.argv[3]
rss = r["rss"]
warm = [s for s in rss if s["t"] >= 60] or rss
drift = warm[-1]["rss_kib"] - warm[0]["rss_kib"]
summary = {
    "requests_sent": r["sent"], "requests_ok": r["ok"], "unexpected_errors": r["sent"] - r["ok"],
    "usage_rows": rows, "rows_missing": r["sent"] - rows, "reloads": r["reloads"],
    "rss_after_warmup_kib": warm[0]["rss_kib"], "rss_end_kib": warm[-1]["rss_kib"], "rss_drift_kib": drift,
    "rss_samples": rss, "first_errors": r["errors"],
}
json.dump(summary, open(out, "w"), indent=2)
print(json.dumps({k: v for k, v in summary.items() if k != "rss_samples"}, indent=2))
ok = summary["unexpected_errors"] == 0 and summary["rows_missing"] == 0
print("soak: PASS" if ok else "soak: FAIL", f"(saved {out})")
sys.exit(0 if ok else 1)
PY
