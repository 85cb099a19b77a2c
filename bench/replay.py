#!/usr/bin/env python3
"""Replay speed: a generated month file of N rows, `gptbalance replay` over it.

    python3 bench/replay.py BIN [ROWS]

Writes a usage file in the schema gptbalance writes (via the binary itself is
too slow to fill: rows are made here with the standard library's sqlite3, in
one transaction), a config with a caller under an rpm limit and prices, then
times `BIN replay --format json` and prints rows per minute. Loopback only:
replay sends nothing anywhere.
"""
import json, os, random, shutil, sqlite3, subprocess, sys, tempfile, time

def main():
    binary = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1_000_000
    d = tempfile.mkdtemp(prefix="gptb-replay-")
    usage = os.path.join(d, "usage")
    os.makedirs(usage)
    # Let the binary create the file with its own schema (one row), then fill it.
    cfg = os.path.join(d, "config.yaml")
    with open(cfg, "w") as f:
        f.write("""usage:
  dir: ./usage
prices:
  "*": { input: 1, output: 4 }
callers:
  - { name: app, token: app-token-0123456789, limits: { rpm: 600, tpm: 2000000 } }
  - { name: batch, token: batch-token-0123456789, limits: { budget_usd: { amount: 50, per: day } } }
openai_clients:
  - { name: a, base_url: "http://127.0.0.1:9", api_key: k1, model_match: { type: exact, value: [gpt-4o, gpt-4o-mini] } }
  - { name: b, base_url: "http://127.0.0.1:9", api_key: k2, priority: 50, model_match: { type: keyword, value: [deepseek] } }
""")
    path = os.path.join(usage, "usage-2026-05.sqlite")
    schema = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    db = sqlite3.connect(path)
    db.executescript("""
PRAGMA page_size=16384; PRAGMA journal_mode=WAL;
CREATE TABLE requests (id INTEGER PRIMARY KEY, ts TEXT NOT NULL, request_id TEXT NOT NULL, caller TEXT,
 endpoint TEXT NOT NULL, model TEXT, routed_model TEXT, client TEXT, key_id TEXT, status INTEGER NOT NULL,
 stream INTEGER NOT NULL, attempts INTEGER NOT NULL, latency_ms INTEGER NOT NULL, ttft_ms INTEGER,
 prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER, error TEXT, cached_tokens INTEGER,
 reasoning_tokens INTEGER, cost_usd REAL, reserved_usd REAL, reserved_tokens INTEGER, shadow INTEGER NOT NULL DEFAULT 0);
PRAGMA application_id=1735423074; PRAGMA user_version=2;
""")
    rng = random.Random(7)
    start = 1777593600  # 2026-05-01T00:00:00Z
    span = 31 * 86400
    models = ["gpt-4o", "gpt-4o-mini", "deepseek-chat", "retired"]
    callers = ["app", "batch", None]
    def rows():
        for i in range(n):
            t = start + span * i / n
            ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".%03dZ" % int((t % 1) * 1000)
            m = models[i % 4]
            p, c = rng.randint(10, 2000), rng.randint(1, 500)
            yield (ts, "req_%d" % i, callers[i % 3], "chat/completions", m, m, "a", "key-00000000",
                   200, 0, 1, rng.randint(50, 5000), None, p, c, p + c, None, 0, 0, (p + 4 * c) / 1e6, None, None, 0)
    t0 = time.time()
    db.executemany("INSERT INTO requests (ts, request_id, caller, endpoint, model, routed_model, client, key_id, status, stream, attempts, latency_ms, ttft_ms, prompt_tokens, completion_tokens, total_tokens, error, cached_tokens, reasoning_tokens, cost_usd, reserved_usd, reserved_tokens, shadow) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows())
    db.commit()
    db.close()
    made = time.time() - t0
    t0 = time.time()
    out = subprocess.run([binary, "replay", "--config", cfg, "--month", "2026-05", "--format", "json"],
                         capture_output=True, text=True)
    took = time.time() - t0
    shutil.rmtree(d, ignore_errors=True)
    if out.returncode != 0:
        print(out.stderr, file=sys.stderr)
        sys.exit(1)
    v = json.loads(out.stdout)
    assert v["rows"] == n, v["rows"]
    print(json.dumps({"binary": binary, "version": schema, "rows": n, "generate_s": round(made, 2),
                      "replay_s": round(took, 2), "rows_per_minute": int(n / took * 60),
                      "refused": v["after"]["refused"], "unroutable": v["after"]["unroutable"]}, indent=1))

main()
