#!/usr/bin/env python3
"""The benchmark: direct (the floor), nginx proxy_pass (the reference) and
gptbalance, one after another in one run, on 127.0.0.1 only, bounded in time.

Started by bench/run.sh, which installs wrk and nginx, builds the binaries and
cleans up after us. Standard library only. Every gptbalance and direct figure
is also given as a ratio to nginx measured in the same run; the machine is
shared and noisy, so the ratios are the result, not the absolute numbers.

Exit status: 0 when every phase ran and every request succeeded, whether or
not the performance targets were met; 1 when something is broken.
"""
import shutil
import argparse
import ctypes
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = "bench-model"
PATH = "/v1/chat/completions"
CORES = os.cpu_count() or 1
MIB = 1024.0

SETTINGS = {
    # "parts" x "secs": each non-streaming point is measured in that many
    # wrk runs per target, interleaved in rotating order (see `interleave`),
    # so that a drift of the machine's speed hits all three alike; short
    # parts interleave finely (bench/README.md, "How far to trust a figure").
    "smoke": dict(parts=1, secs=1, warmup_secs=0, concs=[1, 64, 256], stream_chunks=10,
                  stream_delay_ms=10, stream_requests=128, idle_streams=200, rounds=1,
                  round_secs=1, filler_clients=1000, limited_callers=1000),
    "full": dict(parts=6, secs=2, warmup_secs=1, concs=[1, 64, 256], stream_chunks=20,
                 stream_delay_ms=10, stream_requests=640, idle_streams=1000, rounds=16,
                 round_secs=2, filler_clients=1000, limited_callers=1000),
}

TARGETS = {
    "rps": 0.90,           # gptbalance req/s >= 0.9x nginx at c=64 and c=256
    "added_p50": 1.5,      # latency added over direct <= 1.5x what nginx adds
    "added_p99": 2.0,
    "chunk_delay_ms": 1.0,  # median per-chunk delay over direct <= 1 ms
    "idle_rss_mib": 20.0,
    "idle_streams_rss_mib": 60.0,
    "usage_cost": 0.05,
    "config_ratio": 0.95,
    "callers_ratio": 0.97,  # callers without limits >= 0.97x no callers
    "limits_ratio": 0.90,   # 1,000 callers with every limit >= 0.9x callers without
    "shared_ratio": 0.80,   # the same through Redis (shared_state) >= 0.8x in process
    "shared_p99_ms": 1.0,   # and adds at most 1 ms of p99
}


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class Broken(Exception):
    """Something is actually broken (not merely slow): exit 1."""


class Interrupted(Exception):
    pass


def on_signal(signum, _frame):
    raise Interrupted(f"signal {signum}")


# ---------------------------------------------------------------- processes

_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent():
    # PR_SET_PDEATHSIG: if this script dies, even by SIGKILL, the child gets
    # SIGTERM (nginx's master then stops its workers).
    _libc.prctl(1, signal.SIGTERM, 0, 0, 0)


class Procs:
    def __init__(self, tmp, pidfile):
        self.tmp = tmp
        self.pidfile = pidfile
        self.live = []

    def start(self, name, args, stdin=None, stdout=None):
        errlog = open(os.path.join(self.tmp, f"{name}.log"), "ab")
        p = subprocess.Popen(args, stdin=stdin, stdout=stdout if stdout else subprocess.DEVNULL,
                             stderr=errlog, preexec_fn=_die_with_parent, cwd=self.tmp)
        errlog.close()
        p.name = name
        self.live.append(p)
        if self.pidfile:
            with open(self.pidfile, "a") as f:
                f.write(f"{p.pid}\n")
        return p

    def stop(self, p, timeout=10):
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if p in self.live:
            self.live.remove(p)

    def stop_all(self):
        for p in reversed(list(self.live)):
            try:
                self.stop(p)
            except Exception:  # keep stopping the others
                pass

    def check_alive(self, p):
        if p.poll() is not None:
            tail = ""
            try:
                with open(os.path.join(self.tmp, f"{p.name}.log"), errors="replace") as f:
                    tail = f.read()[-2000:]
            except OSError:
                pass
            raise Broken(f"{p.name} exited with status {p.returncode}:\n{tail}")


def free_ports(names):
    """Distinct free loopback ports, one per name, below the ephemeral range:
    the load's own outgoing connections take ephemeral ports, and a listener
    started later must not find its port taken by one of them."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    lo, hi = (10000, low - 1) if low > 12000 else (low // 2, low - 1)
    rng = random.Random(os.getpid() ^ int(time.time()))
    held, ports = [], {}
    try:
        while len(ports) < len(names):
            port = rng.randint(lo, hi)
            if port in ports.values():
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            held.append(s)
            ports[names[len(ports)]] = port
    finally:
        for s in held:
            s.close()
    return ports


def wait_http(procs, p, url, expect, timeout=30):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        procs.check_alive(p)
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                body = r.read()
                if r.status == 200 and body == expect:
                    return
                last = f"status {r.status}, body {body[:100]!r}"
        except Exception as e:  # not up yet
            last = e
        time.sleep(0.05)
    raise Broken(f"{p.name} did not answer {url} within {timeout}s: {last}")


def wait_port(procs, p, port, timeout=30):
    deadline = time.time() + timeout
    while time.time() < deadline:
        procs.check_alive(p)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise Broken(f"{p.name}: nothing listens on 127.0.0.1:{port} after {timeout}s")


def children(pid):
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def status_kib(pids, field):
    """Sum of a /proc/PID/status field (KiB) over pids; every pid must exist."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        total += int(line.split()[1])
        except OSError as e:
            raise Broken(f"cannot read {field} of process {pid}: {e}")
    return total


def cpu_seconds(pids):
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, all threads
        except OSError:
            pass
    return total / tick


# ---------------------------------------------------------------- configs

def nginx_config(tmp, routes):
    """routes: [(listen_port, upstream_port)]"""
    upstreams, servers = [], []
    for i, (listen, upstream) in enumerate(routes):
        upstreams.append(f"    upstream mock{i} {{ server 127.0.0.1:{upstream}; keepalive 256; keepalive_requests 1000000; }}")
        servers.append(f"""    server {{
        listen 127.0.0.1:{listen};
        location / {{
            proxy_pass http://mock{i};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}""")
    user = "user root;\n" if os.geteuid() == 0 else ""
    nl = "\n"
    path = os.path.join(tmp, "nginx.conf")
    with open(path, "w") as f:
        f.write(f"""# generated by bench/bench.py
daemon off;
master_process on;
{user}worker_processes {CORES};
worker_rlimit_nofile 65536;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path {tmp}/nginx-body;
    proxy_temp_path {tmp}/nginx-proxy;
    fastcgi_temp_path {tmp}/nginx-fastcgi;
    uwsgi_temp_path {tmp}/nginx-uwsgi;
    scgi_temp_path {tmp}/nginx-scgi;
{nl.join(upstreams)}
{nl.join(servers)}
}}
""")
    return path


def gateway_config(tmp, name, listen, upstream, usage=True, fillers=0, callers=0, limits=False, redis=None):
    usage_dir = os.path.join(tmp, f"usage-{name}")
    os.makedirs(usage_dir, exist_ok=True)
    lines = [
        "# generated by bench/bench.py",
        "server:",
        f'  listen: "127.0.0.1:{listen}"',
        '  shutdown_grace: "1s"',
        "usage:",
        f'  dir: "{usage_dir}"',
        f"  enabled: {'true' if usage else 'false'}",
        "logging:",
        "  level: warn",
    ]
    if callers:
        # Tokens as bench/post_callers.lua sends them. With `limits`, every
        # limit is set, far above what a run can reach: each request is
        # admitted, reserved and settled, none refused.
        every = ('limits: { rpm: 1000000000, tpm: 1000000000000, concurrency: 100000, '
                 'budget_usd: { amount: 1000000000, per: month }, '
                 'budget_tokens: { amount: 1000000000000000, per: month } }')
        if limits:
            lines += ["prices:", '  "*": { input: 0.15, output: 0.60 }']
        if redis:
            lines += ["shared_state:", f'  url: "redis://127.0.0.1:{redis}/0"', '  timeout: "50ms"',
                      "  on_outage: deny", f'  instance: "bench-{name}"']
        lines.append("callers:")
        for i in range(callers):
            extra = f", {every}" if limits else ""
            lines.append(f'  - {{ name: c{i}, token: "bench-token-{i:06d}-padding"{extra} }}')
    lines.append("openai_clients:")
    base = f'"http://127.0.0.1:{upstream}/v1"'
    for i in range(fillers):
        # Half keyword, half regex rules; none matches the bench model.
        if i % 2 == 0:
            rule = f'{{ type: keyword, value: ["filler-{i}-model"] }}'
        else:
            rule = f'{{ type: regex, value: ["filler-[a-z]+-{i}(-.*)?"] }}'
        lines.append(f"  - {{ name: filler{i}, base_url: {base}, api_key: k{i}, model_match: {rule} }}")
    lines.append(f"  - {{ name: bench, base_url: {base}, api_key: bench, model_match: {{ type: exact, value: [{MODEL}] }} }}")
    path = os.path.join(tmp, f"gptbalance-{name}.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- load

UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(text):
    def dur(v):
        m = re.match(r"([\d.]+)(us|ms|s|m)$", v)
        if not m:
            raise Broken(f"cannot read wrk duration {v!r}")
        return float(m.group(1)) * UNITS[m.group(2)]

    def find(pattern):
        m = re.search(pattern, text)
        if not m:
            raise Broken(f"unexpected wrk output:\n{text}")
        return m

    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    return {
        "rps": float(find(r"Requests/sec:\s+([\d.]+)").group(1)),
        "p50_ms": dur(find(r"\s50%\s+(\S+)").group(1)),
        "p99_ms": dur(find(r"\s99%\s+(\S+)").group(1)),
        "requests": int(find(r"(\d+) requests in").group(1)),
        "non2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
    }


def wrk(url, conns, secs, callers=0):
    """`callers`: send as that many callers in turn (bench/post_callers.lua)."""
    threads = max(1, min(CORES, conns))
    script = "bench/post_callers.lua" if callers else "bench/post.lua"
    args = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{secs}s", "--timeout", "10s", "--latency",
            "-s", os.path.join(ROOT, script), url]
    if callers:
        args += ["--", str(callers)]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=secs + 60,
                             preexec_fn=_die_with_parent)
    except subprocess.TimeoutExpired:
        raise Broken(f"wrk did not finish: {' '.join(args)}")
    if out.returncode != 0:
        raise Broken(f"wrk failed ({' '.join(args)}): {out.stderr}")
    r = parse_wrk(out.stdout)
    if r["requests"] == 0:
        raise Broken(f"wrk completed no request against {url}")
    if r["non2xx"]:
        raise Broken(f"{r['non2xx']} of {r['requests']} requests to {url} were not 2xx")
    if r["socket_errors"] > max(2, r["requests"] // 100):
        raise Broken(f"{r['socket_errors']} socket errors in {r['requests']} requests to {url}")
    return r


def interleave(names, i):
    """The order of round `i`: rotated each round, and backwards in every
    other set of rounds, so that each name takes each place equally often
    and does not always run right after the same one."""
    k = i % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if (i // len(names)) % 2 else order


def combine(parts):
    """One load point measured in several parts: requests/s over the whole,
    percentiles as the mean of the parts'."""
    return {
        "rps": statistics.mean(h["rps"] for h in parts),
        "p50_ms": statistics.mean(h["p50_ms"] for h in parts),
        "p99_ms": statistics.mean(h["p99_ms"] for h in parts),
        "requests": sum(h["requests"] for h in parts),
        "socket_errors": sum(h["socket_errors"] for h in parts),
        "parts": parts,
    }


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def stream_run(client, url, conc, requests, chunks):
    args = [client, "stream", url, MODEL, str(conc), str(requests), str(conc)]
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=240,
                             preexec_fn=_die_with_parent)
    except subprocess.TimeoutExpired:
        raise Broken(f"bench_client stream did not finish against {url}")
    if out.returncode != 0:
        raise Broken(f"bench_client stream failed against {url}: {out.stderr}")
    data = json.loads(out.stdout)
    if data["errors"]:
        raise Broken(f"{data['errors']} of {requests} streams to {url} failed, e.g. {data['error_samples']}")
    reqs = data["requests"]
    for r in reqs:
        # chunks content events + [DONE] (the usage chunk gptbalance asks for is removed)
        if len(r["latency_ms"]) != chunks:
            raise Broken(f"a stream through {url} had {len(r['latency_ms'])} stamped chunks, expected {chunks}")
    ttfc = [r["arrivals_ms"][0] for r in reqs]
    ttlc = [r["arrivals_ms"][-1] for r in reqs]
    later = [x for r in reqs for x in r["latency_ms"][1:]]  # chunks after the first
    gaps = [b - a for r in reqs for a, b in zip(r["arrivals_ms"][:chunks], r["arrivals_ms"][1:chunks])]
    by_index = [statistics.median(r["arrivals_ms"][i] for r in reqs) for i in range(chunks)]
    return {
        "requests": len(reqs),
        "ttfc_p50_ms": pct(ttfc, 0.5), "ttfc_p99_ms": pct(ttfc, 0.99),
        "ttlc_p50_ms": pct(ttlc, 0.5), "ttlc_p99_ms": pct(ttlc, 0.99),
        "chunk_latency_p50_ms": pct(later, 0.5), "chunk_latency_p99_ms": pct(later, 0.99),
        "gap_p50_ms": pct(gaps, 0.5), "gap_p99_ms": pct(gaps, 0.99),
        "arrival_median_by_chunk_ms": by_index,
    }


def idle_streams(procs, client, url, n, pids_of):
    holder = procs.start("bench_client-idle", [client, "idle", url, MODEL, str(n), "120"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    line = holder.stdout.readline().decode().split()
    try:
        if len(line) != 3 or line[0] != "ready":
            raise Broken(f"bench_client idle: unexpected output {line!r} (see its log)")
        opened, failed = int(line[1]), int(line[2])
        if failed:
            raise Broken(f"{failed} of {n} idle streams through {url} did not open (see bench_client-idle.log)")
        time.sleep(0.5)
        pids = pids_of()
        rss = status_kib(pids, "VmRSS")
    finally:
        holder.stdin.close()
        try:
            holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        procs.stop(holder)
    return {"open": opened, "rss_kib": rss}


def sanity(url, via):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            data = json.loads(r.read())
            headers = r.headers
    except Exception as e:
        raise Broken(f"POST {url} ({via}) failed: {e}")
    if data.get("object") != "chat.completion" or "Hello from bench" not in json.dumps(data):
        raise Broken(f"POST {url} ({via}) answered an unexpected body: {data}")
    if via == "gptbalance" and "x-request-id" not in headers:
        raise Broken(f"{url} did not answer with gptbalance's x-request-id")
    if via == "nginx" and "nginx" not in (headers.get("server") or ""):
        raise Broken(f"{url} did not answer through nginx")


# ---------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["smoke", "full"], default="full")
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--tmp", required=True)
    ap.add_argument("--pidfile")
    ap.add_argument("--only", metavar="A,B,...",
                    help="A/B only: alternate these gateway variants (gw_on, gw_callers, gw_limits, "
                         "gw_shared) at c=64, --rounds times, and report medians, ratios to the first "
                         "and CPU time per request of the gateway (and Redis)")
    ap.add_argument("--old-bin", metavar="PATH",
                    help="with --only: a variant written NAME@old runs this gptbalance binary "
                         "(another build) with NAME's config, for an A/B of two builds")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--secs", type=int, default=3)
    args = ap.parse_args()
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    cfg = SETTINGS[args.mode]
    bin_dir = os.path.abspath(args.bin_dir)
    gw_bin = os.path.join(bin_dir, "gptbalance")
    mock_bin = os.path.join(bin_dir, "examples", "mock_upstream")
    client_bin = os.path.join(bin_dir, "examples", "bench_client")
    for b in (gw_bin, mock_bin, client_bin):
        if not os.access(b, os.X_OK):
            raise Broken(f"{b} is missing: build it first (bench/run.sh does)")
    tmp = args.tmp
    for d in ["nginx-body", "nginx-proxy", "nginx-fastcgi", "nginx-uwsgi", "nginx-scgi"]:
        os.makedirs(os.path.join(tmp, d), exist_ok=True)
    procs = Procs(tmp, args.pidfile)
    t0 = time.time()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    raw = {"mode": args.mode, "started": started, "settings": cfg, "machine": machine()}
    if args.only:
        try:
            only(procs, tmp, raw, gw_bin, mock_bin, args.only.split(","), args.rounds, args.secs,
                 old_bin=args.old_bin)
        finally:
            procs.stop_all()
        return
    try:
        run(procs, tmp, cfg, raw, gw_bin, mock_bin, client_bin)
    finally:
        procs.stop_all()
    raw["duration_s"] = round(time.time() - t0, 1)
    rows, checks = figures(raw, cfg)
    print_table(raw, cfg, rows, checks)
    save(raw, rows, checks, started)


def machine():
    def version(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except Exception:
            return None
    wrk_version = version(["wrk", "--version"])
    return {"cores": CORES, "kernel": platform.release(), "nginx": version(["nginx", "-v"]),
            "wrk": " ".join(wrk_version.split()[:2]) if wrk_version else None}


def run(procs, tmp, cfg, raw, gw_bin, mock_bin, client_bin):
    ports = free_ports(["mock", "idle_mock", "nginx", "nginx_idle", "gw", "gw_on", "gw_off", "gw_many",
                        "gw_callers", "gw_limits", "gw_shared", "redis", "gw_idle"])
    url = lambda port: f"http://127.0.0.1:{port}{PATH}"  # noqa: E731

    # The upstreams: one answering at once (streams: N chunks D ms apart,
    # stamped), one whose streams stay idle after their first chunk.
    log("starting the mock upstreams and nginx")
    mock = procs.start("mock", [mock_bin, "--listen", f"127.0.0.1:{ports['mock']}", "--name", "bench",
                                "--chunks", str(cfg["stream_chunks"]), "--chunk-delay-ms", str(cfg["stream_delay_ms"]),
                                "--stamp-chunks"])
    idle_mock = procs.start("idle_mock", [mock_bin, "--listen", f"127.0.0.1:{ports['idle_mock']}", "--name", "idle",
                                          "--chunks", "2", "--chunk-delay-ms", "600000"])
    wait_port(procs, mock, ports["mock"])
    wait_port(procs, idle_mock, ports["idle_mock"])

    nginx_conf = nginx_config(tmp, [(ports["nginx"], ports["mock"]), (ports["nginx_idle"], ports["idle_mock"])])
    nginx_args = ["nginx", "-p", tmp, "-e", os.path.join(tmp, "nginx-error.log"), "-c", nginx_conf]
    nginx = procs.start("nginx", nginx_args)
    wait_port(procs, nginx, ports["nginx"])

    def start_gw(name, upstream, **kw):
        conf = gateway_config(tmp, name, ports[name], upstream, **kw)
        p = procs.start(f"gptbalance-{name}", [gw_bin, "serve", "--config", conf])
        wait_http(procs, p, f"http://127.0.0.1:{ports[name]}/healthz", b"ok\n")
        return p

    nginx_pids = lambda: [nginx.pid] + children(nginx.pid)  # noqa: E731
    log("starting gptbalance")
    gw = start_gw("gw", ports["mock"])
    time.sleep(1.0)
    raw["rss_idle_kib"] = {"gptbalance": status_kib([gw.pid], "VmRSS"), "nginx": status_kib(nginx_pids(), "VmRSS")}

    urls = {"direct": url(ports["mock"]), "nginx": url(ports["nginx"]), "gptbalance": url(ports["gw"])}
    for target, u in urls.items():
        sanity(u, target)

    # Non-streaming chat completions.
    targets = ["direct", "nginx", "gptbalance"]
    pids = {"direct": lambda: [], "nginx": nginx_pids, "gptbalance": lambda: [gw.pid]}
    if cfg["warmup_secs"]:
        log("warm-up")
        for t in targets:
            wrk(urls[t], 64, cfg["warmup_secs"])
    nonstream = {}
    for c in cfg["concs"]:
        log(f"non-streaming, c={c}: {cfg['parts']} part(s) of {cfg['secs']} s per target, interleaved")
        parts = {t: [] for t in targets}
        cpu = {t: 0.0 for t in targets}
        for i in range(cfg["parts"]):
            for t in interleave(targets, i):
                before = cpu_seconds(pids[t]())
                parts[t].append(wrk(urls[t], c, cfg["secs"]))
                cpu[t] += cpu_seconds(pids[t]()) - before
                for p in (mock, nginx, gw):
                    procs.check_alive(p)
        for t in targets:
            r = combine(parts[t])
            if t != "direct":
                r["cpu_s"] = cpu[t]
                r["cpu_ms_per_1000"] = cpu[t] * 1000.0 / r["requests"] * 1000.0
            nonstream[f"{t}_c{c}"] = r
    raw["nonstream"] = nonstream
    raw["rss_peak_kib"] = {"gptbalance": status_kib([gw.pid], "VmHWM"), "nginx": status_kib(nginx_pids(), "VmHWM")}

    # Streaming, c=64.
    streaming = {}
    for t in targets:
        log(f"streaming, c=64, {cfg['stream_requests']} streams: {t}")
        streaming[t] = stream_run(client_bin, urls[t], 64, cfg["stream_requests"], cfg["stream_chunks"])
    raw["streaming_c64"] = streaming
    procs.stop(gw)

    # Usage on/off and 1 vs 1,001 clients, in rotating rounds with nginx, on
    # fresh processes (an empty usage file each).
    log(f"usage on/off, config size, callers: {cfg['rounds']} round(s) of nginx and 5 gptbalance variants, c=64")
    many = cfg["limited_callers"]
    variants = {
        "gw_on": start_gw("gw_on", ports["mock"]),
        "gw_off": start_gw("gw_off", ports["mock"], usage=False),
        "gw_many": start_gw("gw_many", ports["mock"], fillers=cfg["filler_clients"]),
        "gw_callers": start_gw("gw_callers", ports["mock"], callers=1),
        "gw_limits": start_gw("gw_limits", ports["mock"], callers=many, limits=True),
    }
    redis = None
    if shutil.which("redis-server"):
        # The same callers and limits, shared through a local Redis.
        redis = procs.start("redis", ["redis-server", "--port", str(ports["redis"]), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
        wait_port(procs, redis, ports["redis"])
        variants["gw_shared"] = start_gw("gw_shared", ports["mock"], callers=many, limits=True, redis=ports["redis"])
    # Requests as callers for the variants that need a token; the others
    # get the same formatted-once requests without one (callers=0 keeps
    # post.lua, whose single request wrk also formats once).
    as_callers = {"gw_callers": 1, "gw_limits": many, "gw_shared": many}
    rurls = {"nginx": url(ports["nginx"]), **{k: url(ports[k]) for k in variants}}
    for k in variants:
        if k not in as_callers:
            sanity(rurls[k], "gptbalance")
    names = list(rurls)
    if cfg["warmup_secs"]:
        for k in names:
            wrk(rurls[k], 64, cfg["warmup_secs"], callers=as_callers.get(k, 0))
    rounds = {k: [] for k in names}
    p99s = {k: [] for k in names}
    sent = {k: 0 for k in names}
    for i in range(cfg["rounds"]):
        for k in interleave(names, i):
            r = wrk(rurls[k], 64, cfg["round_secs"], callers=as_callers.get(k, 0))
            rounds[k].append(r["rps"])
            p99s[k].append(r["p99_ms"])
            sent[k] += r["requests"]
            for p in list(variants.values()) + [nginx, mock]:
                procs.check_alive(p)
    raw["rounds_c64_rps"] = rounds
    raw["rounds_c64_p99_ms"] = p99s
    if redis:
        out = subprocess.run(["redis-cli", "-p", str(ports["redis"]), "INFO", "commandstats"],
                             capture_output=True, text=True).stdout
        calls = sum(int(m) for m in re.findall(r"cmdstat_evalsha:calls=(\d+)", out))
        calls += sum(int(m) for m in re.findall(r"cmdstat_eval:calls=(\d+)", out))
        raw["redis_calls_per_request"] = calls / max(1, sent["gw_shared"] + cfg["warmup_secs"])
        procs.stop(redis)
    for p in variants.values():
        procs.stop(p)

    # Idle open streams: fresh nginx and gptbalance, streams that stay idle
    # after their first chunk.
    n = cfg["idle_streams"]
    log(f"{n} idle streams through nginx and gptbalance")
    procs.stop(nginx)
    nginx = procs.start("nginx", nginx_args)
    wait_port(procs, nginx, ports["nginx_idle"])
    gwi = start_gw("gw_idle", ports["idle_mock"])
    time.sleep(0.5)
    idle = {
        "nginx": {"rss_before_kib": status_kib(nginx_pids(), "VmRSS")},
        "gptbalance": {"rss_before_kib": status_kib([gwi.pid], "VmRSS")},
    }
    idle["nginx"].update(idle_streams(procs, client_bin, url(ports["nginx_idle"]), n, nginx_pids))
    idle["gptbalance"].update(idle_streams(procs, client_bin, url(ports["gw_idle"]), n, lambda: [gwi.pid]))
    raw["idle_streams"] = idle
    procs.stop(gwi)
    procs.stop(nginx)


def instructions(pid, secs, action):
    """Runs `action` and returns its result with the CPU seconds `pid`
    spent meanwhile (user + system, from /proc: hardware instruction
    counters are not available on every host)."""
    before = cpu_seconds([pid])
    r = action()
    return r, cpu_seconds([pid]) - before


def only(procs, tmp, raw, gw_bin, mock_bin, names, rounds, secs, old_bin=None):
    """`--only`: the named variants alternated at c=64 (rotating order),
    with the CPU each spent; medians, ratios to the first named."""
    ports = free_ports(["mock", "redis"] + names)
    url = lambda port: f"http://127.0.0.1:{port}{PATH}"  # noqa: E731
    mock = procs.start("mock", [mock_bin, "--listen", f"127.0.0.1:{ports['mock']}", "--name", "bench"])
    wait_port(procs, mock, ports["mock"])
    many = SETTINGS["full"]["limited_callers"]
    kinds = {"gw_on": {}, "gw_callers": dict(callers=1), "gw_limits": dict(callers=many, limits=True),
             "gw_shared": dict(callers=many, limits=True)}
    as_callers = {"gw_callers": 1, "gw_limits": many, "gw_shared": many}
    as_callers.update({f"{k}@old": n for k, n in list(as_callers.items())})
    gws, redis = {}, None
    for k in names:
        kind, _, build = k.partition("@")
        if kind not in kinds or build not in ("", "old") or (build and not old_bin):
            raise Broken(f"--only: unknown variant {k} (NAME@old needs --old-bin)")
        kw = dict(kinds[kind])
        if kind == "gw_shared" and redis is None:
            redis = procs.start("redis", ["redis-server", "--port", str(ports["redis"]), "--bind", "127.0.0.1",
                                          "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
            wait_port(procs, redis, ports["redis"])
        if kind == "gw_shared":
            kw["redis"] = ports["redis"]
        conf = gateway_config(tmp, k.replace("@", "-"), ports[k], ports["mock"], **kw)
        gws[k] = procs.start(f"gptbalance-{k}", [old_bin if build else gw_bin, "serve", "--config", conf])
        wait_http(procs, gws[k], f"http://127.0.0.1:{ports[k]}/healthz", b"ok\n")
        if kind == "gw_shared":
            time.sleep(2)  # connected to Redis (it starts in outage mode)
        wrk(url(ports[k]), 64, 1, callers=as_callers.get(k, 0))
    if redis:
        subprocess.run(["redis-cli", "-p", str(ports["redis"]), "CONFIG", "RESETSTAT"], capture_output=True)
    res = {k: {"rps": [], "p99_ms": [], "cpu_us_per_req": [], "requests": 0} for k in names}

    def script_calls():
        """(script calls, every command Redis ran: round trips and the
        commands the scripts ran inside)."""
        out = subprocess.run(["redis-cli", "-p", str(ports["redis"]), "INFO", "commandstats"],
                             capture_output=True, text=True).stdout
        scripts = sum(int(m) for m in re.findall(r"cmdstat_eval(?:sha)?:calls=(\d+)", out))
        return scripts, sum(int(m) for m in re.findall(r"cmdstat_[a-z|]+:calls=(\d+)", out))

    for i in range(rounds):
        for k in interleave(names, i):
            act = lambda: wrk(url(ports[k]), 64, secs, callers=as_callers.get(k, 0))  # noqa: E731
            if k.startswith("gw_shared") and redis:
                # Redis's own CPU counts too: it shares the cores.
                calls, cmds = script_calls()
                r, n = instructions(gws[k].pid, secs, lambda: instructions(redis.pid, secs, act))
                r, rn = r
                res[k].setdefault("redis_cpu_us_per_req", []).append(rn * 1e6 / r["requests"])
                calls2, cmds2 = script_calls()
                res[k]["redis_calls"] = res[k].get("redis_calls", 0) + calls2 - calls
                res[k]["redis_commands"] = res[k].get("redis_commands", 0) + cmds2 - cmds
            else:
                r, n = instructions(gws[k].pid, secs, act)
            res[k]["rps"].append(r["rps"])
            res[k]["p99_ms"].append(r["p99_ms"])
            res[k]["requests"] += r["requests"]
            if n is not None:
                res[k]["cpu_us_per_req"].append(n * 1e6 / r["requests"])
            procs.check_alive(gws[k])
    base = names[0]
    print(f"c=64, {rounds} rounds of {secs} s, alternated; medians")
    print(f"{'variant':<12}{'req/s':>10}{'ratio':>8}{'per-round':>10}{'p99 ms':>9}{'cpu us/req':>10}")
    summary = {}
    for k in names:
        med = statistics.median
        per_round = med(a / b for a, b in zip(res[k]["rps"], res[base]["rps"]))
        insn = med(res[k]["cpu_us_per_req"]) if res[k]["cpu_us_per_req"] else None
        summary[k] = {"rps": med(res[k]["rps"]), "ratio_per_round": per_round,
                      "p99_ms": med(res[k]["p99_ms"]), "cpu_us_per_req": insn}
        print(f"{k:<12}{med(res[k]['rps']):>10.0f}{med(res[k]['rps']) / med(res[base]['rps']):>8.3f}"
              f"{per_round:>10.3f}{med(res[k]['p99_ms']):>9.2f}{(insn or 0):>10.1f}")
    for k in names:
        if "redis_calls" in res[k]:
            summary[k]["redis_calls_per_request"] = res[k]["redis_calls"] / max(1, res[k]["requests"])
            summary[k]["redis_commands_per_request"] = res[k]["redis_commands"] / max(1, res[k]["requests"])
            summary[k]["redis_cpu_us_per_req"] = statistics.median(res[k]["redis_cpu_us_per_req"])
            print(f"{k}: redis {summary[k]['redis_calls_per_request']:.3f} script calls "
                  f"({summary[k]['redis_commands_per_request']:.3f} commands, scripts' own included) per request, "
                  f"{summary[k]['redis_cpu_us_per_req']:.1f} CPU us per request in redis-server")
    if redis:
        if "gw_limits" in res and "gw_shared" in res:
            extra = statistics.median(a - b for a, b in zip(res["gw_shared"]["p99_ms"], res["gw_limits"]["p99_ms"]))
            summary["shared_added_p99_ms"] = extra
            print(f"p99 added by Redis (per-round median): {extra:.2f} ms")
    raw.update({"only": names, "rounds": rounds, "secs": secs, "results": res, "summary": summary})
    out_dir = os.path.join(ROOT, "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    name = "only-" + raw["started"].replace("-", "").replace(":", "") + ".json"
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(raw, f, indent=1)
        f.write("\n")
    print(f"saved bench/results/{name}")


# ---------------------------------------------------------------- report

def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


# A difference is measurable when its mean is above this many standard
# errors (over the interleaved parts; about a one-sided 95 % bound for six).
MEASURABLE = 2.0


def added(proxy, direct, key):
    """The proxy's figure minus direct's, part by part."""
    return [p[key] - q[key] for p, q in zip(proxy["parts"], direct["parts"])]


def std_error(values):
    """Standard error of the mean; 0 for a single value (a smoke run)."""
    if len(values) < 2:
        return 0.0
    return statistics.stdev(values) / len(values) ** 0.5


def figures(raw, cfg):
    """Rows: (figure, direct, nginx, gptbalance, unit, direct/nginx,
    gptbalance/nginx, target text, met). Checks: the targets."""
    rows, checks = [], []

    def row(name, d, n, g, unit, target=None, met=None, g_ratio="auto"):
        gr = ratio(g, n) if g_ratio == "auto" else g_ratio
        rows.append({"figure": name, "direct": d, "nginx": n, "gptbalance": g, "unit": unit,
                     "direct/nginx": ratio(d, n), "gptbalance/nginx": gr, "target": target, "met": met})
        if target is not None:
            checks.append({"figure": name, "target": target, "met": met})

    def section(title):
        rows.append({"section": title})

    ns = raw["nonstream"]
    section(f"non-streaming chat completions (wrk, {cfg['parts']} x {cfg['secs']} s per point, interleaved)")
    for c in cfg["concs"]:
        d, n, g = ns[f"direct_c{c}"], ns[f"nginx_c{c}"], ns[f"gptbalance_c{c}"]
        if c >= 64:
            r = ratio(g["rps"], n["rps"])
            row(f"req/s c={c}", d["rps"], n["rps"], g["rps"], "req/s", f">= {TARGETS['rps']:.2f}x nginx", r is not None and r >= TARGETS["rps"])
        else:
            row(f"req/s c={c}", d["rps"], n["rps"], g["rps"], "req/s")
        row(f"p50 c={c}", d["p50_ms"], n["p50_ms"], g["p50_ms"], "ms")
        row(f"p99 c={c}", d["p99_ms"], n["p99_ms"], g["p99_ms"], "ms")
    for c in cfg["concs"]:
        d, n, g = ns[f"direct_c{c}"], ns[f"nginx_c{c}"], ns[f"gptbalance_c{c}"]
        for q, key in (("p50", "added_p50"), ("p99", "added_p99")):
            # What each proxy adds, per part: part i of every target ran
            # side by side in time, so the differences are paired.
            add_n = added(n, d, f"{q}_ms")
            add_g = added(g, d, f"{q}_ms")
            an, ag = statistics.mean(add_n), statistics.mean(add_g)
            limit = TARGETS[key]
            # When nginx adds nothing measurable (noise can even make it
            # negative) the ratio means nothing, shown as "-", and
            # gptbalance must add nothing measurable either.
            measurable = an > MEASURABLE * std_error(add_n)
            met = ag <= limit * an if measurable else ag <= MEASURABLE * std_error(add_g)
            row(f"added {q} c={c} (minus direct)", None, an, ag, "ms", f"<= {limit:g}x nginx's",
                met, g_ratio=ratio(ag, an) if measurable else None)
            rows[-1]["std_error"] = {"nginx": std_error(add_n), "gptbalance": std_error(add_g)}
    c64 = "c64" if "gptbalance_c64" in ns else f"c{cfg['concs'][-1]}"
    row("CPU per 1,000 req (c=64)", None, ns[f"nginx_{c64}"]["cpu_ms_per_1000"], ns[f"gptbalance_{c64}"]["cpu_ms_per_1000"], "ms")

    s = raw["streaming_c64"]
    section(f"streaming, c=64 ({cfg['stream_requests']} streams of {cfg['stream_chunks']} chunks {cfg['stream_delay_ms']} ms apart)")
    for key, label in [("ttfc_p50_ms", "first chunk p50"), ("ttfc_p99_ms", "first chunk p99"),
                       ("ttlc_p50_ms", "last chunk p50"), ("ttlc_p99_ms", "last chunk p99"),
                       ("chunk_latency_p50_ms", "chunk latency p50 (sent -> received)"),
                       ("chunk_latency_p99_ms", "chunk latency p99 (sent -> received)"),
                       ("gap_p50_ms", "chunk gap p50"), ("gap_p99_ms", "chunk gap p99")]:
        row(label, s["direct"][key], s["nginx"][key], s["gptbalance"][key], "ms")
    dn = s["nginx"]["chunk_latency_p50_ms"] - s["direct"]["chunk_latency_p50_ms"]
    dg = s["gptbalance"]["chunk_latency_p50_ms"] - s["direct"]["chunk_latency_p50_ms"]
    # Differences from direct: a ratio only when nginx's is above zero.
    row("chunk delay over direct (median)", None, dn, dg, "ms", f"<= {TARGETS['chunk_delay_ms']:g} ms",
        dg <= TARGETS["chunk_delay_ms"], g_ratio=ratio(dg, dn) if dn > 0 else None)
    by = {t: s[t]["arrival_median_by_chunk_ms"] for t in s}
    off = {t: statistics.median(a - b for a, b in zip(by[t], by["direct"])) for t in ("nginx", "gptbalance")}
    row("chunk i arrival minus direct's (median)", None, off["nginx"], off["gptbalance"], "ms",
        g_ratio=ratio(off["gptbalance"], off["nginx"]) if off["nginx"] > 0 else None)

    section("memory (VmRSS; nginx: master + workers)")
    ri, rp = raw["rss_idle_kib"], raw["rss_peak_kib"]
    row("RSS idle (after start)", None, ri["nginx"] / MIB, ri["gptbalance"] / MIB, "MiB",
        f"<= {TARGETS['idle_rss_mib']:g} MiB", ri["gptbalance"] / MIB <= TARGETS["idle_rss_mib"])
    row("RSS peak (VmHWM) after c=256", None, rp["nginx"] / MIB, rp["gptbalance"] / MIB, "MiB")
    idle = raw["idle_streams"]
    gi, ni = idle["gptbalance"], idle["nginx"]
    row(f"RSS with {gi['open']:,} idle streams", None, ni["rss_kib"] / MIB, gi["rss_kib"] / MIB, "MiB",
        f"<= {TARGETS['idle_streams_rss_mib']:g} MiB", gi["rss_kib"] / MIB <= TARGETS["idle_streams_rss_mib"] and gi["open"] >= cfg["idle_streams"])
    row("RSS per idle stream", None, (ni["rss_kib"] - ni["rss_before_kib"]) / ni["open"],
        (gi["rss_kib"] - gi["rss_before_kib"]) / gi["open"], "KiB")

    rr = raw["rounds_c64_rps"]
    mean = {k: statistics.mean(v) for k, v in rr.items()}
    per_round = lambda a, b: statistics.median(x / y for x, y in zip(rr[a], rr[b]))  # noqa: E731
    section(f"c=64 in rotating rounds ({cfg['rounds']} x {cfg['round_secs']} s each; ratios: median over rounds)")
    row("req/s usage on", None, mean["nginx"], mean["gw_on"], "req/s", g_ratio=per_round("gw_on", "nginx"))
    row("req/s usage off", None, mean["nginx"], mean["gw_off"], "req/s", g_ratio=per_round("gw_off", "nginx"))
    cost = 1.0 - per_round("gw_on", "gw_off")
    row("usage recording cost (1 - on/off)", None, None, cost * 100.0, "%", f"<= {TARGETS['usage_cost'] * 100:g} %", cost <= TARGETS["usage_cost"], g_ratio=None)
    clients = cfg["filler_clients"] + 1
    row(f"req/s {clients:,} clients", None, mean["nginx"], mean["gw_many"], "req/s", g_ratio=per_round("gw_many", "nginx"))
    cr = per_round("gw_many", "gw_on")
    row(f"{clients:,} clients / 1 client", None, None, cr, "x", f">= {TARGETS['config_ratio']:g}", cr >= TARGETS["config_ratio"], g_ratio=None)
    if "gw_callers" in rr:
        n = cfg["limited_callers"]
        row("req/s 1 caller, no limits", None, mean["nginx"], mean["gw_callers"], "req/s", g_ratio=per_round("gw_callers", "nginx"))
        row(f"req/s {n:,} callers, every limit", None, mean["nginx"], mean["gw_limits"], "req/s", g_ratio=per_round("gw_limits", "nginx"))
        kr = per_round("gw_callers", "gw_on")
        row("callers, no limits / no callers", None, None, kr, "x", f">= {TARGETS['callers_ratio']:g}", kr >= TARGETS["callers_ratio"], g_ratio=None)
        lr = per_round("gw_limits", "gw_callers")
        row(f"{n:,} callers every limit / no limits", None, None, lr, "x", f">= {TARGETS['limits_ratio']:g}", lr >= TARGETS["limits_ratio"], g_ratio=None)
    if "gw_shared" in rr:
        sr = per_round("gw_shared", "gw_limits")
        row("shared_state (Redis) / in process, every limit", None, None, sr, "x", f">= {TARGETS['shared_ratio']:g}", sr >= TARGETS["shared_ratio"], g_ratio=None)
        pp = raw["rounds_c64_p99_ms"]
        extra_p99 = statistics.median(a - b for a, b in zip(pp["gw_shared"], pp["gw_limits"]))
        row("p99 added by shared_state", None, None, extra_p99, "ms", f"<= {TARGETS['shared_p99_ms']:g} ms", extra_p99 <= TARGETS["shared_p99_ms"], g_ratio=None)
        row("Redis calls per request", None, None, raw.get("redis_calls_per_request", 0.0), "", g_ratio=None)
    return rows, checks


def fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, (int, float)):
        if unit == "req/s" or abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return str(v)


def render(rows):
    head = ["figure", "direct", "nginx", "gptbalance", "unit", "direct/nginx", "gptb/nginx", "target", "met"]
    table = []
    for r in rows:
        if "section" in r:
            table.append(r["section"])
            continue
        ratio_fmt = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
        table.append([r["figure"], fmt(r["direct"], r["unit"]), fmt(r["nginx"], r["unit"]), fmt(r["gptbalance"], r["unit"]),
                      r["unit"], ratio_fmt(r["direct/nginx"]), ratio_fmt(r["gptbalance/nginx"]),
                      r["target"] or "", "" if r["target"] is None else fmt(r["met"])])
    widths = [max(len(head[i]), *(len(t[i]) for t in table if isinstance(t, list))) for i in range(len(head))]
    lines = []

    def line(cells):
        return "  ".join(c.ljust(w) if i in (0, 4, 7, 8) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines.append(line(head))
    lines.append("-" * len(line(head)))
    for t in table:
        lines.append(f"== {t}" if isinstance(t, str) else line(t))
    return "\n".join(lines)


def print_table(raw, cfg, rows, checks):
    m = raw["machine"]
    print()
    print(f"gptbalance benchmark ({raw['mode']}), {raw['started']}, {m['cores']} cores, {m['nginx']}, {m['wrk']}, {raw['duration_s']} s")
    print("direct = wrk/client straight to the mock upstream; nginx = proxy_pass with a keepalive pool; loopback only")
    print()
    print(render(rows))
    print()
    met = sum(1 for c in checks if c["met"])
    print(f"targets met: {met} of {len(checks)}" + ("" if met == len(checks) else
          " (missed: " + "; ".join(c["figure"] for c in checks if not c["met"]) + ")"))
    if raw["mode"] == "smoke":
        print("smoke run: 1 s per point, fewer streams; it checks that the harness works, its figures are not the result")


def save(raw, rows, checks, started):
    out_dir = os.path.join(ROOT, "bench", "results")
    os.makedirs(out_dir, exist_ok=True)
    stamp = started.replace("-", "").replace(":", "")
    name = f"{stamp}.json" if raw["mode"] == "full" else f"smoke-{stamp}.json"
    doc = {"mode": raw["mode"], "started": raw["started"], "duration_s": raw["duration_s"],
           "machine": raw["machine"], "settings": raw["settings"], "targets": checks,
           "figures": [r for r in rows if "section" not in r], "raw": raw}
    tmp = os.path.join(out_dir, f".{name}.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(out_dir, name))
    print(f"saved bench/results/{name}")


if __name__ == "__main__":
    try:
        main()
    except Broken as e:
        log(f"BROKEN: {e}")
        sys.exit(1)
    except Interrupted as e:
        log(f"interrupted ({e})")
        sys.exit(130)
