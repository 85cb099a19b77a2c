#!/usr/bin/env python3
"""Soak driver: mixed requests, streams and reloads against a running gptbalance.

Started by bench/soak.sh, which owns the processes; this only drives load and
reports. Standard library only. Loopback only, bounded by --seconds.
"""
import argparse
import http.client
import json
import os
import random
import sqlite3
import threading
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def one_request(port, kind):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        if kind == "stream":
            body = {"model": "soak-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
            path = "/v1/chat/completions"
        elif kind == "embed":
            body = {"model": "soak-model", "input": ["a", "b"]}
            path = "/v1/embeddings"
        else:
            body = {"model": "soak-model", "messages": [{"role": "user", "content": "hi"}]}
            path = "/v1/chat/completions"
        conn.request("POST", path, json.dumps(body), {"content-type": "application/json", "authorization": "Bearer soak"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 200:
            return f"status {resp.status}: {data[:200]!r}"
        if kind == "stream" and not data.endswith(b"data: [DONE]\n\n"):
            return f"stream did not end with [DONE]: {data[-100:]!r}"
        return None
    except Exception as e:  # noqa: BLE001 - every failure is reported
        return f"{type(e).__name__}: {e}"
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--config-a", required=True)
    ap.add_argument("--config-b", required=True)
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--reload-every", type=float, default=5.0)
    args = ap.parse_args()

    deadline = time.time() + args.seconds
    lock = threading.Lock()
    counts = {"sent": 0, "ok": 0}
    errors = []

    def worker(seed):
        rnd = random.Random(seed)
        while time.time() < deadline:
            kind = rnd.choices(["chat", "stream", "embed"], weights=[70, 20, 10])[0]
            err = one_request(args.port, kind)
            with lock:
                counts["sent"] += 1
                if err is None:
                    counts["ok"] += 1
                elif len(errors) < 20:
                    errors.append(err)
                else:
                    errors.append("...")
                    del errors[20:]

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.threads)]
    for t in threads:
        t.start()
    samples = []
    reloads = 0
    next_reload = time.time() + args.reload_every
    next_sample = time.time()
    flip = False
    while time.time() < deadline:
        now = time.time()
        if now >= next_sample:
            samples.append({"t": round(args.seconds - (deadline - now), 1), "rss_kib": rss_kib(args.pid)})
            next_sample = now + 10
        if now >= next_reload:
            flip = not flip
            src = args.config_b if flip else args.config_a
            tmp = args.config + ".tmp"
            with open(src) as f, open(tmp, "w") as g:
                g.write(f.read())
            os.replace(tmp, args.config)
            reloads += 1
            next_reload = now + args.reload_every
        time.sleep(0.2)
    for t in threads:
        t.join(timeout=35)
    samples.append({"t": args.seconds, "rss_kib": rss_kib(args.pid)})
    print(json.dumps({"sent": counts["sent"], "ok": counts["ok"], "errors": errors, "reloads": reloads, "rss": samples}))


def count_rows(usage_dir):
    total = 0
    for name in os.listdir(usage_dir):
        if name.startswith("usage-") and name.endswith(".sqlite"):
            db = sqlite3.connect(f"file:{os.path.join(usage_dir, name)}?mode=ro", uri=True)
            total += db.execute("SELECT count(*) FROM requests").fetchone()[0]
            db.close()
    return total


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "count-rows":
        print(count_rows(sys.argv[2]))
    else:
        main()
