#!/usr/bin/env python3
"""The benchmark: direct (floor), nginx proxy_pass (reference) and gptbalance,
one after another in one run, on loopback, bounded in time. Standard library
only; started by bench/run.sh, which installs wrk and nginx and builds.

Every figure is also given as a ratio to nginx measured in the same run.
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "bench-model"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port}")


def proc_status(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])  # KiB
    return 0


def cpu_seconds(pids):
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except FileNotFoundError:
            pass
    return total / tick


def children(pid):
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]
    except FileNotFoundError:
        return []


class Procs:
    def __init__(self):
        self.procs = []

    def start(self, args, **kw):
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)
        self.procs.append(p)
        return p

    def stop(self, p):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def stop_all(self):
        for p in self.procs:
            self.stop(p)


UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(text):
    def dur(v):
        m = re.match(r"([\d.]+)(us|ms|s)", v)
        return float(m.group(1)) * UNITS[m.group(2)]

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    p50 = dur(re.search(r"\s50%\s+(\S+)", text).group(1))
    p99 = dur(re.search(r"\s99%\s+(\S+)", text).group(1))
    total = int(re.search(r"(\d+) requests in", text).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    errors = (int(bad.group(1)) if bad else 0) + (sum(int(x) for x in sock.groups()) if sock else 0)
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "requests": total, "errors": errors}


def wrk(url, conns, seconds):
    threads = min(2, conns)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", os.path.join(ROOT, "bench/post.lua"), url],
        capture_output=True, text=True, timeout=seconds + 60,
    )
    if out.returncode != 0:
        raise SystemExit(f"wrk failed: {out.stderr}")
    return parse_wrk(out.stdout)


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q * (len(v) - 1)))))]


def stream_run(client, url, conc, requests):
    out = subprocess.run([client, "stream", url, MODEL, str(conc), str(requests)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"bench_client failed: {out.stderr}")
    data = json.loads(out.stdout)
    ttfc = [ev[0] for ev in data["events_ms"] if ev]
    ttlc = [ev[-1] for ev in data["events_ms"] if ev]
    # Per-chunk lag: how late each later event is relative to the first.
    gaps = [e - ev[0] for ev in data["events_ms"] for e in ev[1:]]
    return {
        "errors": data["errors"], "ttfc_p50_ms": pct(ttfc, 0.5), "ttfc_p99_ms": pct(ttfc, 0.99),
        "ttlc_p50_ms": pct(ttlc, 0.5), "ttlc_p99_ms": pct(ttlc, 0.99),
        "chunk_offset_median_ms": statistics.median(gaps) if gaps else None,
    }


def gateway_config(path, upstream_port, listen_port, usage_dir, usage_on=True, extra_clients=0):
    lines = [
        "server:", f'  listen: "127.0.0.1:{listen_port}"',
        "usage:", f'  dir: "{usage_dir}"', f"  enabled: {'true' if usage_on else 'false'}",
        "logging:", "  level: warn",
        "openai_clients:",
    ]
    for i in range(extra_clients):
        kind = "keyword" if i % 2 == 0 else "regex"
        value = f"other-model-{i}" if kind == "keyword" else f"other-[a-z]+-{i}-.*"
        lines += [f"  - {{ name: filler{i}, base_url: \"http://127.0.0.1:{upstream_port}/v1\", api_key: k{i}, model_match: {{ type: {kind}, value: [\"{value}\"] }} }}"]
    lines += [f"  - {{ name: bench, base_url: \"http://127.0.0.1:{upstream_port}/v1\", api_key: bench, model_match: {{ type: exact, value: [{MODEL}] }} }}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def nginx_config(path, tmp, upstream_port, listen_port):
    cores = os.cpu_count() or 1
    with open(path, "w") as f:
        f.write(f"""
daemon off;
user root;
worker_processes {cores};
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream mock {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{listen_port};
        location / {{
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
""")


def ratio(a, b):
    return None if a is None or b in (None, 0) else round(a / b, 3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--bin-dir", required=True)
    args = ap.parse_args()
    secs = 1 if args.smoke else 10
    concs = [1, 64] if args.smoke else [1, 64, 256]
    stream_reqs = 64 if args.smoke else 640
    idle_streams = 100 if args.smoke else 1000
    gw_bin = os.path.join(args.bin_dir, "gptbalance")
    mock_bin = os.path.join(args.bin_dir, "examples", "mock_upstream")
    client_bin = os.path.join(args.bin_dir, "examples", "bench_client")
    tmp = tempfile.mkdtemp(prefix="gptbalance-bench-")
    for d in ["body", "proxy", "fastcgi", "uwsgi", "scgi", "usage"]:
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    procs = Procs()
    results = {"mode": "smoke" if args.smoke else "full", "cores": os.cpu_count(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        mock_port, slow_port, nginx_port, gw_port = free_port(), free_port(), free_port(), free_port()
        procs.start([mock_bin, "--listen", f"127.0.0.1:{mock_port}", "--name", "bench", "--chunks", "10", "--chunk-delay-ms", "10"])
        procs.start([mock_bin, "--listen", f"127.0.0.1:{slow_port}", "--name", "idle", "--chunks", "2", "--chunk-delay-ms", "600000"])
        wait_port(mock_port)
        wait_port(slow_port)
        nginx_conf = os.path.join(tmp, "nginx.conf")
        nginx_config(nginx_conf, tmp, mock_port, nginx_port)
        nginx = procs.start(["nginx", "-c", nginx_conf, "-p", tmp])
        wait_port(nginx_port)

        starts = [0]

        def start_gateway(usage_on=True, extra=0, upstream=mock_port):
            # A fresh usage dir each time: a file grown by earlier runs would
            # make later inserts dearer and skew the comparisons.
            starts[0] += 1
            usage_dir = os.path.join(tmp, f"usage-{starts[0]}")
            conf = os.path.join(tmp, "gw.yaml")
            gateway_config(conf, upstream, gw_port, usage_dir, usage_on, extra)
            p = procs.start([gw_bin, "serve", "--config", conf])
            wait_port(gw_port)
            time.sleep(0.3)
            return p

        path = "/v1/chat/completions"
        urls = {"direct": f"http://127.0.0.1:{mock_port}{path}", "nginx": f"http://127.0.0.1:{nginx_port}{path}", "gptbalance": f"http://127.0.0.1:{gw_port}{path}"}
        gw = start_gateway()
        results["gptbalance_idle_rss_kib"] = proc_status(gw.pid, "VmRSS")
        results["nginx_idle_rss_kib"] = sum(proc_status(p, "VmRSS") for p in [nginx.pid] + children(nginx.pid))

        # Non-streaming throughput and latency, each target in turn.
        nonstream = {}
        for c in concs:
            for target in ["direct", "nginx", "gptbalance"]:
                pids = {"nginx": [nginx.pid] + children(nginx.pid), "gptbalance": [gw.pid], "direct": []}[target]
                cpu0 = cpu_seconds(pids)
                r = wrk(urls[target], c, secs)
                cpu = cpu_seconds(pids) - cpu0
                if pids and r["requests"]:
                    r["cpu_ms_per_1000"] = round(cpu * 1000 / r["requests"] * 1000, 2)
                nonstream[f"{target}_c{c}"] = r
        results["nonstream"] = nonstream
        results["gptbalance_peak_rss_kib"] = proc_status(gw.pid, "VmHWM")

        # Streaming through each target (10 chunks, 10 ms apart).
        streaming = {}
        for target in ["direct", "nginx", "gptbalance"]:
            streaming[target] = stream_run(client_bin, urls[target], 64, stream_reqs)
        results["streaming_c64"] = streaming

        # Usage recording on/off and a 1- vs 1,000-client config, at c=64:
        # interleaved rounds, so drift on a shared machine hits all alike.
        procs.stop(gw)
        many = 1000 if not args.smoke else 100
        variants = {"usage_on": dict(), "usage_off": dict(usage_on=False), "many_clients": dict(extra=many)}
        runs = {k: [] for k in variants}
        names = list(variants)
        for round_no in range(1 if args.smoke else 3):
            # Rotate the order each round: no variant always runs first.
            for name in names[round_no % len(names):] + names[:round_no % len(names)]:
                kw = variants[name]
                gw = start_gateway(**kw)
                runs[name].append(wrk(urls["gptbalance"], 64, secs)["rps"])
                procs.stop(gw)
        results["interleaved_c64_rps"] = {k: round(statistics.mean(v), 1) for k, v in runs.items()}
        results["interleaved_c64_runs"] = runs
        results["config_clients"] = many + 1

        # Open idle streams: RSS while they are held.
        gw = start_gateway(upstream=slow_port)
        for target, pid_list, url in [("gptbalance", lambda: [gw.pid], urls["gptbalance"]), ("nginx", lambda: [nginx.pid] + children(nginx.pid), f"http://127.0.0.1:{nginx_port}{path}")]:
            if target == "nginx":
                # nginx must proxy to the slow mock for this part: reuse its port via a second config.
                procs.stop(nginx)
                nginx_config(nginx_conf, tmp, slow_port, nginx_port)
                nginx = procs.start(["nginx", "-c", nginx_conf, "-p", tmp])
                wait_port(nginx_port)
            holder = subprocess.Popen([client_bin, "idle", url, MODEL, str(idle_streams)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            line = holder.stdout.readline().split()
            rss = sum(proc_status(p, "VmRSS") for p in pid_list())
            holder.stdin.close()
            holder.wait(timeout=60)
            results[f"{target}_idle_streams"] = {"open": int(line[1]) if len(line) > 1 else 0, "rss_kib": rss}
        procs.stop(gw)
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)

    report(results)
    os.makedirs(os.path.join(ROOT, "bench/results"), exist_ok=True)
    name = f"{results['mode']}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    with open(os.path.join(ROOT, "bench/results", name), "w") as f:
        json.dump(results, f, indent=2)
    print(f"\nsaved bench/results/{name}")
    errors = sum(v.get("errors", 0) for v in results["nonstream"].values()) + sum(v["errors"] for v in results["streaming_c64"].values())
    if errors:
        print(f"bench: {errors} failed requests", file=sys.stderr)
        sys.exit(1)


def report(r):
    ns = r["nonstream"]
    concs = sorted({int(k.rsplit("_c", 1)[1]) for k in ns})
    rows = []

    def row(name, direct, nginx, gw, unit, ratio_of=None):
        rows.append((name, direct, nginx, gw, unit, ratio(gw, nginx) if ratio_of is None else ratio_of))

    for c in concs:
        d, n, g = ns[f"direct_c{c}"], ns[f"nginx_c{c}"], ns[f"gptbalance_c{c}"]
        row(f"req/s c={c}", d["rps"], n["rps"], g["rps"], "req/s")
        row(f"p50 c={c}", d["p50_ms"], n["p50_ms"], g["p50_ms"], "ms")
        row(f"p99 c={c}", d["p99_ms"], n["p99_ms"], g["p99_ms"], "ms")
        add_n50, add_g50 = n["p50_ms"] - d["p50_ms"], g["p50_ms"] - d["p50_ms"]
        add_n99, add_g99 = n["p99_ms"] - d["p99_ms"], g["p99_ms"] - d["p99_ms"]
        row(f"added p50 c={c}", None, round(add_n50, 3), round(add_g50, 3), "ms")
        row(f"added p99 c={c}", None, round(add_n99, 3), round(add_g99, 3), "ms")
    c64 = "c64" if "gptbalance_c64" in ns else f"c{concs[-1]}"
    row("CPU per 1000 req (c=64)", None, ns[f"nginx_{c64}"].get("cpu_ms_per_1000"), ns[f"gptbalance_{c64}"].get("cpu_ms_per_1000"), "ms")
    s = r["streaming_c64"]
    for k, label in [("ttfc_p50_ms", "stream TTFC p50"), ("ttfc_p99_ms", "stream TTFC p99"), ("ttlc_p50_ms", "stream last chunk p50"), ("ttlc_p99_ms", "stream last chunk p99"), ("chunk_offset_median_ms", "stream chunk offset median")]:
        row(label, s["direct"][k], s["nginx"][k], s["gptbalance"][k], "ms")
    row("RSS idle", None, r["nginx_idle_rss_kib"] / 1024, r["gptbalance_idle_rss_kib"] / 1024, "MiB")
    row("RSS peak under load", None, None, r["gptbalance_peak_rss_kib"] / 1024, "MiB")
    gi, ni = r["gptbalance_idle_streams"], r["nginx_idle_streams"]
    row(f"RSS with {gi['open']} idle streams", None, ni["rss_kib"] / 1024, gi["rss_kib"] / 1024, "MiB")
    il = r["interleaved_c64_rps"]
    row("req/s c=64, usage on (interleaved)", None, None, il["usage_on"], "req/s", None)
    row("req/s c=64, usage off (interleaved)", None, None, il["usage_off"], "req/s", ratio(il["usage_on"], il["usage_off"]))
    row(f"req/s c=64, {r['config_clients']} clients (interleaved)", None, None, il["many_clients"], "req/s", ratio(il["many_clients"], il["usage_on"]))

    def fmt(v):
        if v is None:
            return "-"
        return f"{v:,.2f}" if isinstance(v, float) else str(v)

    head = ("figure", "direct", "nginx", "gptbalance", "unit", "ratio")
    table = [head] + [(a, fmt(b), fmt(c), fmt(d), e, fmt(f)) for a, b, c, d, e, f in rows]
    widths = [max(len(str(t[i])) for t in table) for i in range(6)]
    for t in table:
        print("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(t, widths))))
    print("\nratio: gptbalance / nginx; for 'usage off' rows: usage on / usage off; for the config row: many clients / one client.")
    r["table"] = [dict(zip(head, t)) for t in table[1:]]


if __name__ == "__main__":
    main()
