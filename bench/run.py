#!/usr/bin/env python3
"""Benchmark harness for `runner` (issue 8). Plain python3, nothing installed.

    python3 bench/run.py all                 # build --release, run every figure
    python3 bench/run.py ingest --runs 7     # one figure
    python3 bench/run.py all --no-build --bin target/release/runner --json out.json

Subcommands: env overhead ingest memory watchdog sweep serve callgrind all.

Every figure is a median over several runs, and each run measures the figure
and its baseline back to back (alternating which goes first), because the
machine is shared and noisy. The binary is copied to a scratch directory
first, so a concurrent `cargo build` cannot swap it mid-run.
"""

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENVELOPE = b'{"type":"user","message":{"role":"user","content":[{"type":"text","text":"go"}]}}\n'

# Figures (defaults; see BENCHMARKS.md for why).
INGEST_LINES = 120_000  # --lines: text lines; + 2 per tool pair + init + result
LINE_BYTES = 620
TOOL_EVERY = 10
STALL_MS, GRACE_MS = 500, 300
MEMORY_LINES = (0, 12_000, 120_000, 240_000)
LOCK_S = 3.0  # how long the memory figure's "locked" variant holds events.db's write lock
THROTTLE_RATE = 30_000  # --rate of the throttled memory variant (lines/s asked; less is delivered)
SWEEP_IDLE, SWEEP_ORPHANS = 10_000, 1_000
SERVE_AGENTS, SERVE_CONC, SERVE_WINDOW, SERVE_WARMUP = 4000, 8, 8.0, 1.0

BIN = None  # path of the snapshot binary
BIN_SRC = None  # what it was copied from
WORK = None  # scratch directory
RESULTS = []  # rows of the final table
RAW = {}  # raw samples, for --json
FAILED = {}  # exit code -> count, of pooled processes that did not exit 0


# ---------------------------------------------------------------- helpers


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def sh(argv, check=True, **kw):
    r = subprocess.run([str(a) for a in argv], capture_output=True, **kw)
    if check and r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, argv))}\n{r.stderr.decode(errors='replace')}")
    return r


def runner(*args):
    return [BIN, *args]


class Hwm(threading.Thread):
    """Polls VmHWM (a process's own peak RSS) from /proc until it exits; also
    the agent's, once its pid shows up in `pid_file` (turn.pid). wait4's
    ru_maxrss is no use here: a child forked from python starts with python's
    high-water mark."""

    def __init__(self, pid, pid_file=None):
        super().__init__(daemon=True)
        self.pid, self.pid_file, self.kb, self.child_kb, self.stop = pid, pid_file, 0, 0, False

    @staticmethod
    def hwm(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None  # gone, or a zombie (no mm any more)

    def run(self):
        child = None
        while not self.stop:
            kb = self.hwm(self.pid)
            if kb is None:
                return
            self.kb = max(self.kb, kb)
            if child is None and self.pid_file:
                try:
                    child = int(open(self.pid_file).read().strip())
                except (OSError, ValueError):
                    pass
            if child is not None:
                self.child_kb = max(self.child_kb, self.hwm(child) or 0)
            time.sleep(0.002)


def timed(argv, stdin_bytes=None, hwm=False, env=None, pid_file=None):
    """Runs argv; returns dict(wall s, rc, cpu s (user+sys, with its reaped
    children, i.e. the agent), hwm_kb (its own VmHWM, polled),
    child_hwm_kb (the agent's, when pid_file names it))."""
    t0 = time.perf_counter()
    p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.PIPE if stdin_bytes is not None else subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    poll = None
    if hwm:
        poll = Hwm(p.pid, pid_file)
        poll.start()
    if stdin_bytes is not None:
        try:
            p.stdin.write(stdin_bytes)
            p.stdin.close()
        except BrokenPipeError:
            pass
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if poll:
        poll.stop = True
        poll.join()
    return {"wall": wall, "rc": p.returncode, "cpu": ru.ru_utime + ru.ru_stime,
            "hwm_kb": poll.kb if poll else None,
            "child_hwm_kb": poll.child_kb if poll else None}


def timed_pipe(a, b):
    """Wall time of `a | b` (b's stdout to /dev/null)."""
    t0 = time.perf_counter()
    p1 = subprocess.Popen([str(x) for x in a], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    p2 = subprocess.Popen([str(x) for x in b], stdin=p1.stdout, stdout=subprocess.DEVNULL)
    p1.stdout.close()
    try:
        p1.stdin.write(ENVELOPE)
        p1.stdin.close()
    except BrokenPipeError:
        pass
    p1.wait()
    p2.wait()
    return time.perf_counter() - t0


def new_root(tag):
    root = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=WORK))
    sh(runner("--root", root, "init"))
    return root


def add_agent(root, name, command, capability="builder"):
    sh(runner("--root", root, "agent", "add", name, "--capability", capability, "--worktree", root, "--command", *command))


def fake(*args):
    return [BIN, "fake-agent", *map(str, args)]


def turn_argv(root, agent="a1", *extra, progress=False):
    """`runner turn ... --json` (no live progress; what serve and scripts see).
    progress=True drops --json: one plain progress line per event on stderr."""
    return runner("--root", root, "turn", "--agent", agent, "--message", "go", *extra,
                  *([] if progress else ["--json"]))


def turn_row(root, agent="a1"):
    with closing(sqlite3.connect(root / "sessions.db")) as c:
        c.row_factory = sqlite3.Row
        return dict(c.execute("SELECT * FROM turns WHERE agent_name=? ORDER BY turn_id DESC LIMIT 1", (agent,)).fetchone())


def ts(s):
    return dt.datetime.strptime(s, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()


def result(figure, value, unit, baseline, target, ok, note=""):
    RESULTS.append({"figure": figure, "value": value, "unit": unit, "baseline": baseline, "target": target,
                    "verdict": "n/a" if ok is None else ("MET" if ok else "MISSED"), "note": note})


def fmt(v, unit):
    if isinstance(v, str):
        return v
    if unit in ("lines/s", "turns/min"):
        return f"{v:,.0f} {unit}"
    if unit == "MB":
        return f"{v:+.1f} MB" if v < 0 else f"{v:.1f} MB"
    if unit == "ms":
        return f"{v:.1f} ms"
    if unit == "s":
        return f"{v:.3f} s"
    return f"{v} {unit}"


def rm(path):
    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- figures


def out_of(argv):
    try:
        return sh(argv, check=False).stdout.decode()
    except OSError:
        return ""


def bench_env(_):
    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "lscpu": "\n".join(out_of(["lscpu"]).splitlines()[:20]),
        "loadavg": open("/proc/loadavg").read().strip(),
        "mem": next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).strip(),
        "kernel": os.uname().release,
        "git": out_of(["git", "-C", REPO, "describe", "--always", "--dirty"]).strip(),
        "binary": str(BIN_SRC),
        "binary_mtime": dt.datetime.fromtimestamp(BIN_SRC.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds"),
        "binary_sha256": hashlib.sha256(BIN.read_bytes()).hexdigest()[:16],
    }
    RAW["env"] = info
    log(f"env: nproc {info['nproc']}, load {info['loadavg']}, git {info['git']}")


def bench_overhead(runs):
    """`runner turn` (fake agent --lines 0: an init and a result line) minus the
    same fake agent run alone with the same stdin, paired per run. "first" is
    an agent's first turn on a fresh root (builder); "later" is a lead agent's
    (on_idle = wait) second turn, after an untimed first one. Also: CPU time
    (user+sys) the same way, `runner --version` (process floor), one fsync
    here (disk state), and a phase split from the debug log (first turns)."""
    s = {k: [] for k in ("first", "later", "alone", "first_cpu", "later_cpu", "alone_cpu", "version", "fsync")}
    for i in range(runs):
        fresh = new_root("ovh")
        add_agent(fresh, "a1", fake("--lines", 0))
        warm = new_root("ovw")
        add_agent(warm, "a1", fake("--lines", 0), capability="lead")
        assert timed(turn_argv(warm, "a1", "--stall", "30s"))["rc"] == 0

        def first():
            r = timed(turn_argv(fresh, "a1", "--stall", "30s"))
            assert r["rc"] == 0, f"turn rc {r['rc']}"
            s["first"].append(r["wall"])
            s["first_cpu"].append(r["cpu"])

        def later():
            r = timed(turn_argv(warm, "a1", "--stall", "30s"))
            assert r["rc"] == 0, f"turn rc {r['rc']}"
            s["later"].append(r["wall"])
            s["later_cpu"].append(r["cpu"])

        def alone():
            r = timed(fake("--lines", 0), stdin_bytes=ENVELOPE)
            s["alone"].append(r["wall"])
            s["alone_cpu"].append(r["cpu"])

        order = (first, alone, later)
        for f in (order if i % 2 == 0 else order[::-1]):
            f()
        s["version"].append(timed(runner("--version"))["wall"])
        s["fsync"].append(fsync_latency())
        rm(fresh)
        rm(warm)
    d = {k: [t - a for t, a in zip(s[k], s["alone"])] for k in ("first", "later")}
    cpu = {k: [t - a for t, a in zip(s[k + "_cpu"], s["alone_cpu"])] for k in ("first", "later")}
    phases = overhead_phases(max(5, runs // 2))
    RAW["overhead"] = {**{k + "_s": v for k, v in s.items()}, **{k + "_diff_s": v for k, v in d.items()},
                       **{k + "_cpu_diff_s": v for k, v in cpu.items()}, "phases_ms": phases}
    ms = lambda xs: f"{med(xs) * 1e3:.1f} ms"
    for k, label in (("first", "first turn of an agent, fresh root"), ("later", "a later turn of the same agent")):
        ov = med(d[k]) * 1e3
        result(f"turn overhead, {label} (turn - fake agent alone)", ov, "ms",
               f"turn {ms(s[k])}; fake agent alone {ms(s['alone'])}"
               + (f"; `runner --version` {ms(s['version'])}; one 4 KiB fsync here {med(s['fsync']) * 1e3:.2f} ms"
                  if k == "first" else ""),
               "<= 5 ms", ov <= 5.0,
               f"median of {runs} paired differences (range {min(d[k]) * 1e3:.1f}..{max(d[k]) * 1e3:.1f}); "
               f"CPU user+sys, turn minus fake alone: {ms(cpu[k])}"
               + ("; phases from the debug log: " + ", ".join(f"{p} {med(v):.1f}" for p, v in phases.items()) + " ms"
                  if k == "first" and phases else ""))


def fsync_latency():
    """One 4 KiB write + fsync in the scratch directory (the disk's state now)."""
    fd = os.open(os.path.join(WORK, "fsync.probe"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.write(fd, os.urandom(4096))
        t0 = time.perf_counter()
        os.fsync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


PHASES = (("start", None), ("to first log line", "turn "), ("to spawn", "spawned"),
          ("agent run", "agent exited"), ("to outcome", "outcome"), ("to exit", None))


def overhead_phases(runs):
    """Where the time of a --lines 0 turn goes, from the µs stamps of the
    runner's debug log (process start and end seen from here)."""
    out = {k: [] for k, _ in PHASES[1:]}
    env = dict(os.environ, RUST_LOG="debug", NO_COLOR="1")
    for _ in range(runs):
        root = new_root("ph")
        add_agent(root, "a1", fake("--lines", 0))
        t0 = time.time()
        p = subprocess.run([str(a) for a in turn_argv(root, "a1", "--stall", "30s")], capture_output=True, env=env)
        t_end = time.time()
        stamps = {}
        for line in re.sub(r"\x1b\[[0-9;]*m", "", p.stderr.decode(errors="replace")).splitlines():
            m = re.match(r"(\S+Z)\s+DEBUG\s+(.*)", line)
            if not m:
                continue
            for _, key in PHASES:
                if key and m.group(2).startswith(key) and key not in stamps:
                    stamps[key] = dt.datetime.strptime(m.group(1)[:26] + "Z", "%Y-%m-%dT%H:%M:%S.%fZ") \
                        .replace(tzinfo=dt.timezone.utc).timestamp()
        if len(stamps) < 4:
            log(f"phases: debug log not understood: {p.stderr[:300]!r}")
            rm(root)
            return {}
        prev = t0
        for name, key in PHASES[1:]:
            t = stamps[key] if key else t_end
            out[name].append((t - prev) * 1e3)
            prev = t
        rm(root)
    return out


def gen_stream(n):
    path = Path(WORK) / f"stream-{n}.ndjson"
    if not path.exists():
        with open(path, "wb") as f:
            subprocess.run(fake("--lines", n, "--line-bytes", LINE_BYTES, "--tool-every", TOOL_EVERY,
                                "--session-id", "bench-session"), input=ENVELOPE, stdout=f, check=True)
    return path


CG_LINES = 12_000  # text lines of the callgrind turn: 14,402 stdout lines


def callgrind_ir(argv, out):
    """Instructions (Ir) of one process and all its threads under callgrind
    (the agent it spawns runs natively: --trace-children=no)."""
    sh(["valgrind", "--tool=callgrind", "--trace-children=no", f"--callgrind-out-file={out}", *argv])
    for line in open(out):
        if line.startswith("totals:") or line.startswith("summary:"):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {out}")


def bench_callgrind(runs):
    """Instructions per ingested line, repeatable on a noisy machine: callgrind
    counts every instruction of the runner (all threads) for a `cat` turn of
    the Claude-like NDJSON (CG_LINES text lines, tool pairs every 10, init,
    result) and for a `cat` turn of the same generator with --lines 0 (init +
    result only); per line = the difference / the extra lines. Also the
    instructions of a whole `--lines 0` turn (fake agent), first and later."""
    if shutil.which("valgrind") is None:
        log("callgrind: valgrind not installed; skipped")
        return
    big, small = gen_stream(CG_LINES), gen_stream(0)
    nlines = sum(1 for _ in open(big, "rb"))
    s = {k: [] for k in ("per_line", "turn_first", "turn_later", "version")}
    for i in range(runs):
        irs = {}
        for tag, stream in (("big", big), ("small", small)):
            root = new_root(f"cg{tag}")
            add_agent(root, "a1", ["cat", stream])
            irs[tag] = callgrind_ir(turn_argv(root, "a1", "--stall", "60s"), Path(WORK) / f"cg-{tag}-{i}.out")
            assert turn_row(root)["lines"] == (nlines if tag == "big" else 2), turn_row(root)
            rm(root)
        s["per_line"].append((irs["big"] - irs["small"]) / (nlines - 2))
        root = new_root("cgturn")
        add_agent(root, "a1", fake("--lines", 0), capability="lead")
        s["turn_first"].append(callgrind_ir(turn_argv(root, "a1", "--stall", "60s"), Path(WORK) / f"cg-t1-{i}.out"))
        s["turn_later"].append(callgrind_ir(turn_argv(root, "a1", "--stall", "60s"), Path(WORK) / f"cg-t2-{i}.out"))
        rm(root)
        s["version"].append(callgrind_ir(runner("--version"), Path(WORK) / f"cg-v-{i}.out"))
    RAW["callgrind"] = s
    result("instructions per ingested line (callgrind, `cat` turn)", f"{med(s['per_line']):,.0f} Ir/line", "Ir",
           f"{nlines:,}-line turn minus a 2-line turn", "-", None, f"{runs} runs: {[round(x) for x in s['per_line']]}")
    result("instructions of a `--lines 0` turn (callgrind)", f"{med(s['turn_first']) / 1e6:.1f} M Ir first, "
           f"{med(s['turn_later']) / 1e6:.1f} M Ir later", "Ir", f"runner --version: {med(s['version']) / 1e6:.1f} M Ir",
           "-", None, f"runner process only, all threads; exact: first {[int(x) for x in s['turn_first']]}, "
           f"later {[int(x) for x in s['turn_later']]}; processes on the host: {len(all_host_pids())}")


def all_host_pids():
    return [p for p in os.listdir("/proc") if p.isdigit()]


def bench_ingest(runs):
    """Lines/s end to end into events.db (lines / wall time of `runner turn`):
    the live fake agent, and `cat` of the same NDJSON as the agent (takes the
    producer out); plus the same `cat` turn without --json (a progress line
    per event on stderr). Baselines: the producers alone into a pipe."""
    stream = gen_stream(INGEST_LINES)
    nlines = sum(1 for _ in open(stream, "rb"))
    nbytes = stream.stat().st_size
    keys = ("turn_fake", "fake_pipe", "turn_cat", "cat_pipe", "turn_cat_progress", "cat_devnull")
    s = {k: [] for k in keys}
    rows = {}
    for i in range(runs):
        for k in (keys if i % 2 == 0 else keys[::-1]):
            if k.startswith("turn_"):
                root = new_root("ing")
                cmd = fake("--lines", INGEST_LINES, "--line-bytes", LINE_BYTES, "--tool-every", TOOL_EVERY) \
                    if k == "turn_fake" else ["cat", stream]
                add_agent(root, "a1", cmd)
                r = timed(turn_argv(root, "a1", "--stall", "60s", progress=k.endswith("progress")))
                row = turn_row(root)
                assert r["rc"] == 0 and row["lines"] == nlines, (k, r, row["lines"], nlines)
                with closing(sqlite3.connect(root / "events.db")) as c:
                    ev = c.execute("SELECT COUNT(*) FROM events WHERE turn_id=?", (row["turn_id"],)).fetchone()[0]
                rows[k] = {"lines": row["lines"], "events": ev, "bytes": row["bytes"],
                           "events_db_bytes": sum(f.stat().st_size for f in root.glob("events.db*"))}
                s[k].append(r["wall"])
                rm(root)
            elif k == "fake_pipe":
                s[k].append(timed_pipe(fake("--lines", INGEST_LINES, "--line-bytes", LINE_BYTES,
                                            "--tool-every", TOOL_EVERY), ["cat"]))
            elif k == "cat_pipe":
                s[k].append(timed_pipe(["cat", stream], ["cat"]))
            else:
                s[k].append(timed(["cat", stream])["wall"])
    RAW["ingest"] = {"lines": nlines, "bytes": nbytes, "rows": rows, **{k + "_s": v for k, v in s.items()}}
    lps = {k: nlines / med(v) for k, v in s.items()}
    rng = lambda k: f"range {nlines / max(s[k]):,.0f}..{nlines / min(s[k]):,.0f}"
    note = f"{nlines:,} lines ({INGEST_LINES:,} text + a tool_use/tool_result pair every {TOOL_EVERY} + init + " \
           f"result), {nbytes / 1e6:.1f} MB, {rows['turn_cat']['events']:,} event rows; {runs} runs, {rng('turn_fake')}"
    result("ingest, live fake agent (lines / turn wall)", lps["turn_fake"], "lines/s",
           f"fake agent alone into a pipe: {lps['fake_pipe']:,.0f} lines/s", ">= 400,000 lines/s",
           lps["turn_fake"] >= 400_000, note)
    result("ingest, `cat` of the same NDJSON as the agent", lps["turn_cat"], "lines/s",
           f"cat | cat: {lps['cat_pipe']:,.0f} lines/s; cat > /dev/null: {lps['cat_devnull']:,.0f} lines/s",
           ">= 400,000 lines/s", lps["turn_cat"] >= 400_000,
           f"{rng('turn_cat')}; {nbytes / med(s['turn_cat']) / 1e6:.0f} MB/s in; events.db+wal "
           f"{rows['turn_cat']['events_db_bytes'] / 1e6:.0f} MB")
    result("ingest, same `cat` turn without --json (progress lines on stderr)", lps["turn_cat_progress"], "lines/s",
           f"with --json: {lps['turn_cat']:,.0f} lines/s", ">= 400,000 lines/s", lps["turn_cat_progress"] >= 400_000,
           f"{rng('turn_cat_progress')}; stderr to /dev/null")


def bench_memory(runs):
    """Peak RSS (VmHWM, polled from /proc) of the `runner turn` process.

    live: the fake agent, N = 0, 12k, 120k, 240k text lines. It flushes line
    by line, so the runner mostly reads a line or two at a time; its own peak
    (polled via turn.pid) is shown alongside. Side by side at 120k: the
    producer throttled below the writer's speed (--rate), which tells backlog
    from per-line state.
    cat: `cat` of the same NDJSON as the agent (the pipe fills: 64 KiB reads),
    N = 12k, 120k, 240k. Side by side: at 120k with events.db write-locked by
    another process for LOCK_S s mid-turn; at 240k with MALLOC_ARENA_MAX=1."""
    plans = [("live", n, ["plain"] + (["throttled"] if n == 120_000 else [])) for n in MEMORY_LINES]
    plans += [("cat", n, ["plain"] + (["locked"] if n == 120_000 else []) + (["arena1"] if n == MEMORY_LINES[-1] else []))
              for n in MEMORY_LINES[1:]]
    out = {}
    for src, n, variants in plans:
        v = {var: [] for var in variants}
        v["agent"] = []
        for i in range(runs):
            for var in (variants if i % 2 == 0 else variants[::-1]):
                root = new_root("mem")
                args = ("--lines", n, "--line-bytes", LINE_BYTES, "--tool-every", TOOL_EVERY)
                if src == "cat":
                    add_agent(root, "a1", ["cat", gen_stream(n)])
                else:
                    add_agent(root, "a1", fake(*args, *(("--rate", THROTTLE_RATE) if var == "throttled" else ())))
                env = dict(os.environ, MALLOC_ARENA_MAX="1") if var == "arena1" else None
                holder = threading.Thread(target=hold_write_lock, args=(root / "events.db", 0.3, LOCK_S)) \
                    if var == "locked" else None
                if holder:
                    holder.start()
                r = timed(turn_argv(root, "a1", "--stall", "60s"), hwm=True, env=env,
                          pid_file=root / "agents" / "a1" / "turn.pid")
                if holder:
                    holder.join()
                assert r["rc"] == 0, r
                v[var].append(r["hwm_kb"] / 1024)
                if var == "plain" and src == "live":
                    v["agent"].append(r["child_hwm_kb"] / 1024)
                rm(root)
        out[f"{src}_{n}"] = v
    RAW["memory_mb"] = out
    side = {"throttled": f"producer throttled (--rate {THROTTLE_RATE})",
            "locked": f"events.db write-locked {LOCK_S:.0f} s by another process", "arena1": "MALLOC_ARENA_MAX=1"}
    for src, n, variants in plans:
        v = out[f"{src}_{n}"]
        m = med(v["plain"])
        nl = n + 2 * (n // TOOL_EVERY) + 2
        base = []
        if src == "live":
            base.append(f"fake agent (its child) {med(v['agent']):.1f} MB" if med(v["agent"]) > 0
                        else "fake agent: exited before the first poll")
        base += [f"{side[k]}: {med(v[k]):.1f} MB (range {min(v[k]):.1f}..{max(v[k]):.1f})" for k in variants[1:]]
        result(f"peak RSS, {'live fake agent' if src == 'live' else '`cat` as the agent'}, {n:,} text lines "
               f"({nl:,} lines)", m, "MB", "; ".join(base) or "-", "<= 25 MB", m <= 25,
               f"{runs} runs, range {min(v['plain']):.1f}..{max(v['plain']):.1f} MB")
    for src in ("live", "cat"):
        r = {n: med(out[f"{src}_{n}"]["plain"]) for n in MEMORY_LINES if f"{src}_{n}" in out}
        grow = r[120_000] - r[12_000]
        result(f"peak RSS growth 12k -> 120k text lines, {'live fake agent' if src == 'live' else '`cat`'}", grow, "MB",
               f"120k -> {MEMORY_LINES[-1] // 1000}k: {r[MEMORY_LINES[-1]] - r[120_000]:+.1f} MB",
               "flat in N (<= 2 MB)", grow <= 2.0, "medians of the rows above")


def hold_write_lock(db, after, secs):
    """Takes events.db's write lock (BEGIN IMMEDIATE) after `after` s, for `secs` s."""
    time.sleep(after)
    with closing(sqlite3.connect(db, isolation_level=None, timeout=10)) as c:
        c.execute("BEGIN IMMEDIATE")
        time.sleep(secs)
        c.execute("COMMIT")


def parse_log(path):
    out = {}
    for line in open(path):
        stamp, _, msg = line.partition(" ")
        for key in ("watchdog", "SIGTERM", "SIGKILL", "agent exited", "outcome"):
            if key in msg and key not in out:
                out[key] = ts(stamp)
    return out


def bench_watchdog(runs):
    """stall 500 ms, grace 300 ms, agent that ignores SIGTERM and goes silent
    after one text line: when do SIGTERM and SIGKILL go out after that line?"""
    term_err, kill_err, wd_err, total = [], [], [], []
    per = []
    for _ in range(runs):
        root = new_root("wd")
        add_agent(root, "a1", fake("--lines", 1, "--ignore-term", "--stall"))
        r = timed(turn_argv(root, "a1", "--stall", f"{STALL_MS}ms", "--grace", f"{GRACE_MS}ms"))
        assert r["rc"] == 124, f"expected 124 (stalled), got {r['rc']}"
        d = next((root / "logs" / "a1").iterdir())
        last = (d / "stdout.ndjson").stat().st_mtime_ns / 1e9  # when the last line was written to the tee
        with closing(sqlite3.connect(root / "events.db")) as c:
            last_ev = ts(c.execute("SELECT MAX(created_at) FROM events WHERE line_no IS NOT NULL").fetchone()[0])
        lg = parse_log(d / "runner.log")
        wd_err.append((lg["watchdog"] - last) * 1e3 - STALL_MS)
        term_err.append((lg["SIGTERM"] - last) * 1e3 - STALL_MS)
        kill_err.append((lg["SIGKILL"] - last) * 1e3 - STALL_MS - GRACE_MS)
        total.append(r["wall"])
        per.append({"last_line": last, "last_event_created_at": last_ev, **lg})
        rm(root)
    RAW["watchdog"] = {"sigterm_late_ms": term_err, "sigkill_late_ms": kill_err, "watchdog_late_ms": wd_err,
                       "turn_wall_s": total, "runs": per}
    worst = max(max(map(abs, term_err)), max(map(abs, kill_err)))
    result("watchdog: SIGTERM after last line, minus 500 ms", med(term_err), "ms",
           f"range {min(term_err):+.1f}..{max(term_err):+.1f} ms", "within 20 ms", abs(med(term_err)) <= 20,
           f"{runs} runs; log stamps have 1 ms resolution")
    result("watchdog: SIGKILL after last line, minus 800 ms", med(kill_err), "ms",
           f"range {min(kill_err):+.1f}..{max(kill_err):+.1f} ms; worst of all {worst:.1f} ms", "within 20 ms",
           abs(med(kill_err)) <= 20, f"turn wall {med(total)*1e3:.0f} ms")


def clone_sessions(root, names, state):
    """Inserts sessions rows copied from the template agent `tpl` (so every
    column the current schema has is filled as `agent add` fills it)."""
    with closing(sqlite3.connect(root / "sessions.db")) as c:
        c.row_factory = sqlite3.Row
        tpl = dict(c.execute("SELECT * FROM sessions WHERE agent_name='tpl'").fetchone())
        cols = list(tpl)
        base = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
        rows = []
        for i, n in enumerate(names):
            r = dict(tpl)
            r.update(id=f"session-b{i:011d}", agent_name=n, state=state,
                     last_activity=(base + dt.timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%S.000Z"))
            rows.append([r[k] for k in cols])
        c.executemany(f"INSERT INTO sessions ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})", rows)
        c.execute("DELETE FROM sessions WHERE agent_name='tpl'")
        c.commit()


def clone_mail(root, names, claimed_by=None):
    with closing(sqlite3.connect(root / "mail.db")) as c:
        c.row_factory = sqlite3.Row
        tpl = dict(c.execute("SELECT * FROM messages WHERE to_agent='tpl'").fetchone())
        cols = list(tpl)
        rows = []
        for i, n in enumerate(names):
            r = dict(tpl)
            r.update(id=f"msg-b{i:011d}", to_agent=n)
            if claimed_by:
                r.update(claimed_by=f"{claimed_by}{i:06d}", claimed_at="2026-01-01T00:00:00.000Z", read=0)
            rows.append([r[k] for k in cols])
        c.executemany(f"INSERT INTO messages ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})", rows)
        c.execute("DELETE FROM messages WHERE to_agent='tpl'")
        c.commit()


def template_root(tag, n, state, command, mail=False, claimed_by=None):
    root = new_root(tag)
    add_agent(root, "tpl", command)
    if mail:
        sh(runner("--root", root, "mail", "send", "--from", "boss", "--to", "tpl", "--subject", "work", "--body", "do it"))
    names = [f"b{i:05d}" for i in range(n)]
    clone_sessions(root, names, state)
    if mail:
        clone_mail(root, names, claimed_by)
    return root


def copy_root(src, tag):
    dst = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=WORK))
    rm(dst)
    shutil.copytree(src, dst)
    return dst


def sweep_json(root):
    t0 = time.perf_counter()
    r = sh(runner("--root", root, "sweep", "--json"))
    return time.perf_counter() - t0, json.loads(r.stdout)


def bench_sweep(runs):
    """`runner sweep` over 10,000 idle agents (between_turns; a pass visits at
    most 1000) and over 1,000 agents each with one orphan claim (claimed_by a
    turn that is not running). Every run sweeps a fresh copy of the root."""
    idle = template_root("sw-idle", SWEEP_IDLE, "between_turns", fake("--lines", 0))
    orph = template_root("sw-orph", SWEEP_ORPHANS, "between_turns", fake("--lines", 0), mail=True,
                         claimed_by="20260101T000000000Z-dead")
    empty = new_root("sw-empty")
    s = {"idle": [], "orphans": [], "orphans_2nd": [], "empty": []}
    reps = {}
    for i in range(runs):
        order = ["empty", "idle", "orphans"] if i % 2 == 0 else ["orphans", "idle", "empty"]
        for k in order:
            root = copy_root({"idle": idle, "orphans": orph, "empty": empty}[k], "sw")
            t, rep = sweep_json(root)
            s[k].append(t)
            reps[k] = rep
            if k == "orphans":
                t2, rep2 = sweep_json(root)  # second pass: nothing left to do
                s["orphans_2nd"].append(t2)
                reps["orphans_2nd"] = rep2
            rm(root)
    RAW["sweep"] = {**{k + "_s": v for k, v in s.items()}, "reports": reps}
    assert reps["orphans"]["claims_retried"] == SWEEP_ORPHANS, reps["orphans"]
    result(f"sweep, {SWEEP_IDLE:,} idle agents", med(s["idle"]), "s",
           f"empty root {med(s['empty'])*1e3:.1f} ms", "< 1 s", med(s["idle"]) < 1.0,
           f"scanned {reps['idle']['scanned']} (cap 1000/pass); {runs} runs")
    result(f"sweep, {SWEEP_ORPHANS:,} agents with orphan claims", med(s["orphans"]), "s",
           f"second pass {med(s['orphans_2nd'])*1e3:.0f} ms; empty root {med(s['empty'])*1e3:.1f} ms", "< 2 s",
           med(s["orphans"]) < 2.0,
           f"claims_retried {reps['orphans']['claims_retried']}; {runs} runs")


def ended_times(root):
    with closing(sqlite3.connect(root / "sessions.db")) as c:
        return [(ts(e), o) for e, o in c.execute("SELECT ended_at, outcome FROM turns WHERE ended_at IS NOT NULL")]


def bench_serve(runs):
    """Turns/min of `runner serve --max-concurrent 8 --poll 50ms` over a fixed
    window (after the first turn + warmup), counted from turns.ended_at.
    Baselines: 8 `runner turn` processes at a time, and the fake agent alone 8
    at a time, over the same window."""
    tpl = template_root("sv", SERVE_AGENTS, "booting", fake("--lines", 0), mail=True)
    s = {"serve": [], "turn_x8": [], "fake_x8": []}
    notes = {}
    for i in range(runs):
        order = ["serve", "turn_x8", "fake_x8"] if i % 2 == 0 else ["fake_x8", "turn_x8", "serve"]
        for k in order:
            if k == "serve":
                root = copy_root(tpl, "sv")
                errf = open(root / "serve.stderr", "wb")
                p = subprocess.Popen([str(a) for a in runner("--root", root, "serve", "--max-concurrent", SERVE_CONC,
                                                             "--poll", "50ms", "--grace", "1s")],
                                     stdout=subprocess.DEVNULL, stderr=errf)
                t_dead = time.time() + 60
                first = None
                while first is None and time.time() < t_dead:
                    time.sleep(0.05)
                    e = ended_times(root)
                    first = min((t for t, _ in e), default=None)
                assert first is not None, "serve finished no turn in 60 s"
                w0 = first + SERVE_WARMUP
                w1 = w0 + SERVE_WINDOW
                time.sleep(max(0.0, w1 - time.time() + 0.3))
                p.send_signal(signal.SIGINT)
                p.wait(timeout=30)
                errf.close()
                e = ended_times(root)
                n = sum(1 for t, o in e if w0 <= t < w1 and o != "interrupted")
                outcomes = {}
                for _, o in e:
                    outcomes[o] = outcomes.get(o, 0) + 1
                notes["serve_outcomes"] = outcomes
                if len(e) >= SERVE_AGENTS:
                    notes["exhausted"] = True
                s[k].append(n / SERVE_WINDOW * 60)
                rm(root)
            elif k == "turn_x8":
                root = copy_root(tpl, "tx")
                s[k].append(pool_rate(lambda j: runner("--root", root, "turn", "--agent", f"b{j:05d}", "--json"),
                                      None))
                rm(root)
            else:
                s[k].append(pool_rate(lambda j: fake("--lines", 0), ENVELOPE))
    RAW["serve"] = {**{k + "_per_min": v for k, v in s.items()}, **notes, "pool_failures_by_exit_code": FAILED}
    v = med(s["serve"])
    result(f"serve, {SERVE_CONC} at once (fake agent --lines 0)", v, "turns/min",
           f"{SERVE_CONC} `runner turn` processes at a time: {med(s['turn_x8']):,.0f}/min; fake agent alone "
           f"{SERVE_CONC} at a time: {med(s['fake_x8']):,.0f}/min", ">= 1000/min", v >= 1000,
           f"{SERVE_WINDOW:.0f} s window after first turn + {SERVE_WARMUP:.0f} s; {runs} runs"
           + ("; BACKLOG EXHAUSTED (lower bound)" if notes.get("exhausted") else "")
           + (f"; baseline processes not exiting 0 (by code): {FAILED}" if FAILED else ""))


def pool_rate(argv_of, stdin_bytes):
    """Runs argv_of(j) for j = 0, 1, ... with SERVE_CONC at a time; completions per minute
    over SERVE_WINDOW after SERVE_WARMUP."""
    slots = {}
    j = 0
    done = []
    t_start = time.time()
    t_end = t_start + SERVE_WARMUP + SERVE_WINDOW
    while True:
        now = time.time()
        while len(slots) < SERVE_CONC and now < t_end and j < SERVE_AGENTS:
            p = subprocess.Popen([str(a) for a in argv_of(j)], stdin=subprocess.PIPE if stdin_bytes else subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if stdin_bytes:
                try:
                    p.stdin.write(stdin_bytes)
                    p.stdin.close()
                except BrokenPipeError:
                    pass
            slots[p.pid] = p
            j += 1
        if not slots:
            break
        pid, status, _ = os.wait4(-1, 0)
        p = slots.pop(pid, None)
        if p is not None:
            p.returncode = os.waitstatus_to_exitcode(status)
            if p.returncode == 0:
                done.append(time.time())
            else:
                FAILED[p.returncode] = FAILED.get(p.returncode, 0) + 1
    w0 = t_start + SERVE_WARMUP
    n = sum(1 for t in done if w0 <= t < w0 + SERVE_WINDOW)
    return n / SERVE_WINDOW * 60


# ---------------------------------------------------------------- main

FIGURES = {
    "overhead": (bench_overhead, 21),
    "ingest": (bench_ingest, 5),
    "memory": (bench_memory, 5),
    "watchdog": (bench_watchdog, 7),
    "sweep": (bench_sweep, 5),
    "serve": (bench_serve, 5),
    "callgrind": (bench_callgrind, 1),
}


def print_table():
    head = ("figure", "median", "baseline (same runs)", "target", "verdict", "notes")
    rows = [(r["figure"], fmt(r["value"], r["unit"]), r["baseline"], r["target"], r["verdict"], r["note"]) for r in RESULTS]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


def main():
    global BIN, BIN_SRC, WORK
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["env", "all", *FIGURES])
    ap.add_argument("--runs", type=int, help="runs per figure (default: per figure, >= 5)")
    ap.add_argument("--bin", help="use this binary instead of building target/release/runner")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release")
    ap.add_argument("--json", help="write raw samples and results here")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    a = ap.parse_args()

    if a.bin is None and not a.no_build:
        log("cargo build --release ...")
        if subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO).returncode != 0:
            raise SystemExit("cargo build --release failed; fix it, or benchmark the last binary with --no-build")
    src = BIN_SRC = (Path(a.bin) if a.bin else REPO / "target" / "release" / "runner").resolve()
    WORK = tempfile.mkdtemp(prefix="runner-bench-")
    BIN = Path(WORK) / "runner"
    shutil.copy2(src, BIN)
    t0 = time.time()
    try:
        bench_env(None)
        todo = list(FIGURES) if a.what == "all" else ([] if a.what == "env" else [a.what])
        for name in todo:
            fn, default_runs = FIGURES[name]
            log(f"{name} ({a.runs or default_runs} runs) ...")
            t = time.time()
            fn(a.runs or default_runs)
            log(f"{name}: {time.time() - t:.0f} s")
        RAW["env"]["loadavg_end"] = open("/proc/loadavg").read().strip()
        RAW["env"]["total_s"] = round(time.time() - t0, 1)
        print(f"\nrunner benchmarks: {RAW['env']['git']}, binary {RAW['env']['binary_mtime']} "
              f"sha256 {RAW['env']['binary_sha256']}, nproc {RAW['env']['nproc']}, "
              f"load {RAW['env']['loadavg']} -> {RAW['env']['loadavg_end']}, {RAW['env']['total_s']} s\n")
        print_table()
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"results": RESULTS, "raw": RAW}, f, indent=1)
    finally:
        if a.keep:
            log(f"kept {WORK}")
        else:
            rm(WORK)


if __name__ == "__main__":
    main()
