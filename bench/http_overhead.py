#!/usr/bin/env python3
"""Overhead of the HTTP side on `runner serve` throughput (issue 16).

    python3 bench/http_overhead.py --runs 5                 # builds --release
    python3 bench/http_overhead.py --bin target/release/runner --runs 7

Three variants of the `serve` figure of bench/run.py (4,000 agents with one
message each, fake agent `--lines 0`, `--max-concurrent 8 --poll 50ms`,
turns ended in an 8 s window that starts 1 s after the first turn):

  plain    serve without --http
  idle     serve --http, nobody connected
  watched  serve --http, one dashboard connected to /live (the store polled
           once a second) and a /metrics scrape every second

Runs are interleaved (the order rotates every run) because the machine is
shared; the figure is the median of each variant and the paired difference
(watched vs plain of the same run) is reported too.
"""

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: roots, agents, timestamps)


WEB_CPU = {"idle": [], "watched": [], "serve_cpu_per_s": []}


def listening_addr(errpath, deadline):
    while time.time() < deadline:
        m = re.search(rb"listening on http://([0-9.]+:[0-9]+)/", errpath.read_bytes())
        if m:
            return m.group(1).decode()
        time.sleep(0.02)
    raise SystemExit(f"serve never listened:\n{errpath.read_text(errors='replace')}")


class Watcher(threading.Thread):
    """A dashboard: holds /live open and reads its events; scrapes /metrics
    every second."""

    def __init__(self, addr):
        super().__init__(daemon=True)
        self.addr, self.stop, self.events, self.scrapes = addr, False, 0, 0
        host, port = addr.split(":")
        self.sock = socket.create_connection((host, int(port)))
        self.sock.sendall(f"GET /live HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n".encode())
        self.sock.settimeout(0.2)
        self.scraper = threading.Thread(target=self.scrape, daemon=True)

    def run(self):
        self.scraper.start()
        while not self.stop:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            self.events += data.count(b"event: snapshot")

    def scrape(self):
        while not self.stop:
            t0 = time.time()
            try:
                with urllib.request.urlopen(f"http://{self.addr}/metrics", timeout=10) as r:
                    r.read()
                self.scrapes += 1
            except OSError:
                if self.stop:
                    return
            time.sleep(max(0.0, 1.0 - (time.time() - t0)))

    def close(self):
        self.stop = True
        self.sock.close()


def cpu_s(pid):
    """utime + stime of a process, in seconds."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def web_cpu(root, watched, secs):
    """CPU seconds per second of a standalone `runner web` on `root`: with
    nobody connected, or with one live dashboard and a scrape a second."""
    errp = root / "web.stderr"
    with open(errp, "wb") as errf:
        p = subprocess.Popen([str(a) for a in bench.runner("--root", root, "web", "--http", "127.0.0.1:0")],
                             stdout=subprocess.DEVNULL, stderr=errf)
    addr = listening_addr(errp, time.time() + 30)
    w = Watcher(addr) if watched else None
    if w:
        w.start()
    c0, t0 = cpu_s(p.pid), time.time()
    time.sleep(secs)
    c1, t1 = cpu_s(p.pid), time.time()
    if w:
        w.close()
    p.send_signal(signal.SIGINT)
    p.wait(timeout=30)
    return (c1 - c0) / (t1 - t0)


def one_run(tpl, variant):
    root = bench.copy_root(tpl, "hv")
    errp = root / "serve.stderr"
    argv = bench.runner("--root", root, "serve", "--max-concurrent", bench.SERVE_CONC, "--poll", "50ms",
                        "--grace", "1s")
    if variant != "plain":
        argv += ["--http", "127.0.0.1:0"]
    with open(errp, "wb") as errf:
        p = subprocess.Popen([str(a) for a in argv], stdout=subprocess.DEVNULL, stderr=errf)
    t_start = time.time()
    w = None
    if variant != "plain":
        addr = listening_addr(errp, time.time() + 30)
        if variant == "watched":
            w = Watcher(addr)
            w.start()
    deadline = time.time() + 60
    first = None
    while first is None and time.time() < deadline:
        time.sleep(0.05)
        first = min((t for t, _ in bench.ended_times(root)), default=None)
    assert first is not None, "serve finished no turn in 60 s"
    w0 = first + bench.SERVE_WARMUP
    w1 = w0 + bench.SERVE_WINDOW
    time.sleep(max(0.0, w1 - time.time() + 0.3))
    cpu = cpu_s(p.pid)
    p.send_signal(signal.SIGINT)
    p.wait(timeout=30)
    note = ""
    if w:
        w.close()
        note = f"{w.events} live updates, {w.scrapes} scrapes"
    e = bench.ended_times(root)
    n = sum(1 for t, o in e if w0 <= t < w1 and o != "interrupted")
    done = sum(1 for _, o in e if o != "interrupted")
    note += f" serve CPU {cpu * 1000 / max(done, 1):.2f} ms/turn"
    if variant == "plain" and WEB_CPU is not None:
        # The store serve left behind (thousands of turns), watched by a
        # standalone `runner web`: the HTTP side's own CPU, load aside.
        WEB_CPU["idle"].append(web_cpu(root, False, 15))
        WEB_CPU["watched"].append(web_cpu(root, True, 15))
        WEB_CPU["serve_cpu_per_s"].append(cpu / (time.time() - t_start))
    bench.rm(root)
    return n / bench.SERVE_WINDOW * 60, note


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bin", help="use this binary instead of building target/release/runner")
    a = ap.parse_args()
    if a.bin is None:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=bench.REPO, check=True)
    src = Path(a.bin or bench.REPO / "target" / "release" / "runner").resolve()
    bench.WORK = tempfile.mkdtemp(prefix="runner-bench-http-")
    bench.BIN = Path(bench.WORK) / "runner"
    shutil.copy2(src, bench.BIN)
    try:
        tpl = bench.template_root("hv", bench.SERVE_AGENTS, "booting", bench.fake("--lines", 0), mail=True)
        variants = ["plain", "idle", "watched"]
        s = {v: [] for v in variants}
        paired = []
        load0 = open("/proc/loadavg").read().split()[0]
        for i in range(a.runs):
            order = variants[i % 3:] + variants[:i % 3]
            got = {}
            for v in order:
                rate, note = one_run(tpl, v)
                got[v] = rate
                s[v].append(rate)
                bench.log(f"run {i + 1} {v}: {rate:,.0f} turns/min {note}")
            paired.append((got["watched"] - got["plain"]) / got["plain"] * 100)
        load1 = open("/proc/loadavg").read().split()[0]
        med = {v: statistics.median(x) for v, x in s.items()}
        print(f"\nserve throughput, {a.runs} interleaved runs per variant (load {load0} -> {load1}):")
        for v in variants:
            print(f"  {v:8s} median {med[v]:8,.0f} turns/min   runs: {', '.join(f'{x:,.0f}' for x in s[v])}")
        for v in ("idle", "watched"):
            print(f"  {v} vs plain (medians): {(med[v] - med['plain']) / med['plain'] * 100:+.1f} %")
        print(f"  watched vs plain, paired per run: median {statistics.median(paired):+.1f} % "
              f"(runs: {', '.join(f'{x:+.1f}' for x in paired)})")
        wi, ww, sv = (statistics.median(WEB_CPU[k]) for k in ("idle", "watched", "serve_cpu_per_s"))
        print(f"  standalone `runner web` on the store a plain run left: CPU {wi * 1000:.1f} ms/s with nobody "
              f"connected, {ww * 1000:.1f} ms/s with one live dashboard and a scrape a second "
              f"(runs: {', '.join(f'{x * 1000:.1f}' for x in WEB_CPU['watched'])}); serve itself used "
              f"{sv * 1000:.0f} ms/s, so watching costs {ww / sv * 100:.1f} % of serve's CPU")
    finally:
        bench.rm(bench.WORK)


if __name__ == "__main__":
    main()
