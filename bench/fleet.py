#!/usr/bin/env python3
"""SQLite vs PostgreSQL, side by side in the same run (issue 14, fleet mode).

    python3 bench/fleet.py all                       # cargo build --release, every figure
    python3 bench/fleet.py overhead --runs 21        # one figure: overhead ingest serve
    python3 bench/fleet.py serve --messages 4000 --hosts 4
    python3 bench/fleet.py all --url postgres://postgres@127.0.0.1:5432/test --no-build

Figures (each on SQLite and on PostgreSQL, interleaved run by run):

- overhead: a `--lines 0` fake-agent turn minus the same fake agent alone,
  median of paired runs; first turn (fresh root) and a later turn.
- ingest: the 144,002-line Claude-like NDJSON of bench/run.py replayed by
  `cat` as the agent; lines / turn wall time; every line must be in `events`
  exactly once (line_no 1..N, no duplicate).
- serve: a backlog of one message per agent (fake agent --lines 1), drained
  by `runner serve`: SQLite with 1 host, PostgreSQL with 1 host and with
  --hosts hosts (each its own root and RUNNER_HOST_ID, one schema). Turns/min
  = delivering turns / (last turns.ended_at - first turns.started_at).
  Then "self-mailing" agents (`lead`, the fake agent mails its own agent
  every turn), SQLite x1 and PostgreSQL x --hosts, for --chain-window s: many
  turns per agent, each next message due while the agent's lease is held.
  Checks: every message in exactly one delivering turn's `mail_ids`, every
  read message in one, no two turns of one agent overlapping, no error or
  warning lines from serve, every serve exits 0.

Each PostgreSQL root gets a fresh schema (RUNNER_STORE_URL + RUNNER_STORE_SCHEMA),
dropped with `psql` afterwards (also on Ctrl-C). Helpers (timing, medians, the
NDJSON generator) come from bench/run.py. Results: a markdown table on stdout,
raw samples in bench/results/fleet-<UTC date-time>.json (or --json PATH).
"""

import argparse
import collections
import datetime as dt
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as base  # noqa: E402  (bench/run.py: timed, med, gen_stream, ...)

from run import ENVELOPE, INGEST_LINES, REPO, log, med, rm, timed, ts  # noqa: E402

DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/test"
DELIVERING = {"done", "exited", "waiting"}  # outcomes whose claimed mail is delivered (SPEC §6.3)
SQLITE_DB = {"sessions": "sessions.db", "turns": "sessions.db", "messages": "mail.db", "events": "events.db"}

URL = DEFAULT_URL
SCHEMAS = set()  # PostgreSQL schemas created by this run, dropped at the end
SCHEMA_SEQ = 0
RESULTS, RAW, NOTES = base.RESULTS, base.RAW, []
HOST_FLAG = None  # None: not probed; True/False: `agent add --host '*'` accepted


# ---------------------------------------------------------------- stores


class Root:
    """A root directory, on SQLite or on its own fresh PostgreSQL schema
    (several roots may share one schema: the hosts of a fleet)."""

    def __init__(self, backend, tag, schema=None, host=None, init=True):
        global SCHEMA_SEQ
        self.backend, self.host = backend, host
        self.path = Path(tempfile.mkdtemp(prefix=f"{tag}-", dir=base.WORK))
        self.schema = None
        self.owns_schema = False
        if backend == "postgres":
            if schema is None:
                SCHEMA_SEQ += 1
                schema = f"bench_fleet_{os.getpid()}_{SCHEMA_SEQ}"
                SCHEMAS.add(schema)
                self.owns_schema = True
            self.schema = schema
        if init:
            base.sh(self.cmd("init"), env=self.env())

    def env(self, **extra):
        e = dict(os.environ)
        for k in ("RUNNER_STORE_URL", "RUNNER_STORE_SCHEMA", "RUNNER_HOST_ID"):
            e.pop(k, None)
        if self.backend == "postgres":
            e.update(RUNNER_STORE_URL=URL, RUNNER_STORE_SCHEMA=self.schema)
        if self.host:
            e["RUNNER_HOST_ID"] = self.host
        e.update(extra)
        return e

    def cmd(self, *args):
        return [base.BIN, "--root", self.path, *args]

    def run(self, *args, check=True):
        return base.sh(self.cmd(*args), check=check, env=self.env())

    def query(self, table, sql):
        """Rows of `sql` as tuples of strings ('' for NULL). `table` picks the
        SQLite file; on PostgreSQL the schema is the search_path."""
        if self.backend == "sqlite":
            with closing(sqlite3.connect(self.path / SQLITE_DB[table])) as c:
                return [tuple("" if v is None else str(v) for v in r) for r in c.execute(sql)]
        out = psql(sql, schema=self.schema).rstrip("\n")
        return [tuple(line.split("\x1f")) for line in out.split("\x1e") if line != ""]

    def execute(self, table, sql):
        if self.backend == "sqlite":
            with closing(sqlite3.connect(self.path / SQLITE_DB[table])) as c:
                c.executescript(sql)
                c.commit()
        else:
            psql(sql, schema=self.schema)

    def drop(self):
        rm(self.path)
        if self.owns_schema:
            drop_schema(self.schema)


def psql(sql, schema=None):
    env = dict(os.environ)
    if schema:
        env["PGOPTIONS"] = f"-c search_path={schema}"
    r = subprocess.run(["psql", URL, "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-F", "\x1f", "-R", "\x1e",
                        "-c", sql], capture_output=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"psql failed ({r.returncode}): {sql[:200]}\n{r.stderr.decode(errors='replace')}")
    return r.stdout.decode()


def drop_schema(schema):
    if schema in SCHEMAS:
        psql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        SCHEMAS.discard(schema)


def q1(root, table, sql):
    rows = root.query(table, sql)
    return rows[0] if rows else ()


def fake(*args):
    return [base.BIN, "fake-agent", *map(str, args)]


def add_agent(root, name, command, capability="builder", floating=False, worktree=None):
    """`agent add`; with floating=True passes `--host '*'` (SPEC §12.2) on
    PostgreSQL when this binary knows the flag, else registers without it
    (noted once). SQLite is one host: every agent floats there."""
    global HOST_FLAG
    argv = ["agent", "add", name, "--capability", capability, "--worktree", worktree or root.path]
    if floating and root.backend == "postgres" and HOST_FLAG is not False:
        r = root.run(*argv, "--host", "*", "--command", *command, check=False)
        if r.returncode == 0:
            HOST_FLAG = True
            return
        if b"--host" not in r.stderr:
            raise SystemExit(f"agent add failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
        HOST_FLAG = False
        NOTES.append("`agent add --host '*'` is not known to this binary: agents registered without it "
                     "(serve runs every agent on every host: no host pinning yet)")
        log(NOTES[-1])
    root.run(*argv, "--command", *command)


def turn_argv(root, agent="a1"):
    return root.cmd("turn", "--agent", agent, "--message", "go", "--stall", "60s", "--json")


def last_turn(root, agent="a1"):
    return q1(root, "turns", f"SELECT turn_id, lines, outcome FROM turns WHERE agent_name='{agent}' "
                             "ORDER BY started_at DESC, turn_id DESC LIMIT 1")


BACKENDS = ("sqlite", "postgres")


def orders(i):
    return BACKENDS if i % 2 == 0 else BACKENDS[::-1]


# ---------------------------------------------------------------- figures


def bench_overhead(runs):
    """Per run and backend: a fresh root's first turn (builder), the fake agent
    alone (same stdin), and a later turn of a lead agent (after an untimed
    first one); the order flips on odd runs, and so does the backend order."""
    s = {b: {k: [] for k in ("first", "later", "alone")} for b in BACKENDS}
    for i in range(runs):
        for b in orders(i):
            fresh = Root(b, "ovh")
            add_agent(fresh, "a1", fake("--lines", 0))
            warm = Root(b, "ovw")
            add_agent(warm, "a1", fake("--lines", 0), capability="lead")
            assert timed(turn_argv(warm), env=warm.env())["rc"] == 0, "untimed first turn failed"

            def first():
                r = timed(turn_argv(fresh), env=fresh.env())
                assert r["rc"] == 0, f"{b} first turn rc {r['rc']}"
                s[b]["first"].append(r["wall"])

            def later():
                r = timed(turn_argv(warm), env=warm.env())
                assert r["rc"] == 0, f"{b} later turn rc {r['rc']}"
                s[b]["later"].append(r["wall"])

            def alone():
                s[b]["alone"].append(timed(fake("--lines", 0), stdin_bytes=ENVELOPE)["wall"])

            seq = (first, alone, later)
            for f in (seq if i % 2 == 0 else seq[::-1]):
                f()
            for r in (fresh, warm):
                r.drop()
    raw = {}
    for b in BACKENDS:
        d = {k: [t - a for t, a in zip(s[b][k], s[b]["alone"])] for k in ("first", "later")}
        raw[b] = {**{k + "_s": v for k, v in s[b].items()}, **{k + "_diff_s": v for k, v in d.items()}}
    RAW["overhead"] = raw
    ms = lambda xs: f"{med(xs) * 1e3:.1f} ms"
    for k, label in (("first", "first turn, fresh root"), ("later", "later turn")):
        for b in BACKENDS:
            d = raw[b][k + "_diff_s"]
            other = "postgres" if b == "sqlite" else "sqlite"
            result(f"turn overhead, {label}, {b.replace('postgres', 'PostgreSQL').replace('sqlite', 'SQLite')}",
                   med(d) * 1e3, "ms",
                   f"turn {ms(s[b][k])}; fake agent alone {ms(s[b]['alone'])}; "
                   f"{label_of(other)} in the same runs: {med(raw[other][k + '_diff_s']) * 1e3:.1f} ms",
                   "<= 5 ms (issue 8)", med(d) * 1e3 <= 5.0,
                   f"median of {runs} paired differences (range {min(d) * 1e3:.1f}..{max(d) * 1e3:.1f})")


def label_of(b):
    return "PostgreSQL" if b == "postgres" else "SQLite"


def bench_ingest(runs):
    """`cat` of the pre-generated 144,002-line NDJSON as the agent, into
    SQLite and into PostgreSQL; lines/s = turns.lines / turn wall time.
    Checks every line is in `events` exactly once. Baseline: cat | cat."""
    stream = base.gen_stream(INGEST_LINES)
    nlines = sum(1 for _ in open(stream, "rb"))
    nbytes = stream.stat().st_size
    s = {b: [] for b in BACKENDS}
    s["cat_pipe"] = []
    checks = {}
    for i in range(runs):
        for b in orders(i):
            root = Root(b, "ing")
            add_agent(root, "a1", ["cat", stream])
            r = timed(turn_argv(root), env=root.env())
            turn_id, lines, outcome = last_turn(root)
            ev = q1(root, "events", "SELECT COUNT(*), COUNT(line_no), COUNT(DISTINCT line_no), MIN(line_no), "
                                    f"MAX(line_no) FROM events WHERE turn_id='{turn_id}'")
            total, with_line, distinct, lo, hi = map(int, ev)
            ok = (r["rc"] == 0 and int(lines) == nlines and with_line == nlines and distinct == nlines
                  and lo == 1 and hi == nlines)
            c = {"rc": r["rc"], "outcome": outcome, "turn_lines": int(lines), "event_rows": total,
                 "rows_with_line_no": with_line, "distinct_line_no": distinct, "min_line_no": lo,
                 "max_line_no": hi, "ok": ok}
            if b == "postgres":
                c["events_bytes"] = int(psql(f"SELECT pg_total_relation_size('{root.schema}.events')").strip("\x1e"))
            else:
                c["events_bytes"] = sum(f.stat().st_size for f in root.path.glob("events.db*"))
            checks.setdefault(b, []).append(c)
            if not ok:
                log(f"ingest {b}: CHECK FAILED: {c}")
            s[b].append(r["wall"])
            root.drop()
        s["cat_pipe"].append(base.timed_pipe(["cat", stream], ["cat"]))
    RAW["ingest"] = {"lines": nlines, "bytes": nbytes, "checks": checks, **{k + "_s": v for k, v in s.items()}}
    lps = {k: nlines / med(v) for k, v in s.items()}
    for b in BACKENDS:
        bad = [c for c in checks[b] if not c["ok"]]
        rng = f"range {nlines / max(s[b]):,.0f}..{nlines / min(s[b]):,.0f}"
        other = "postgres" if b == "sqlite" else "sqlite"
        c0 = checks[b][0]
        result(f"ingest, `cat` of the Claude-like NDJSON as the agent, into {label_of(b)}", lps[b], "lines/s",
               f"{label_of(other)} in the same runs: {lps[other]:,.0f} lines/s; `cat \\| cat`: {lps['cat_pipe']:,.0f} lines/s",
               ">= 150,000 lines/s (issue 14)" if b == "postgres" else ">= 400,000 lines/s (issue 8)",
               lps[b] >= (150_000 if b == "postgres" else 400_000),
               f"{nlines:,} lines, {nbytes / 1e6:.1f} MB; {runs} runs, {rng}; events rows {c0['event_rows']:,} "
               f"({c0['events_bytes'] / 1e6:.0f} MB on disk); "
               + ("every line in events exactly once" if not bad else f"**CHECK FAILED in {len(bad)} run(s)**: {bad[0]}"))


# ---------------------------------------------------------------- serve


def clone_sql(root, table, tpl_where, subst, n, skip=()):
    # tpl_where selects the template row; it is deleted afterwards, so it must
    # not match the copies (use its id, or a name no copy gets).
    """INSERT n copies of the template row (tpl_where) with columns replaced by
    the expressions in subst (over g.i = 0..n-1), then DELETE the template;
    one statement on either store, every other column copied as it is."""
    if root.backend == "sqlite":
        cols = [r[1] for r in root.query(table, f"PRAGMA table_info({table})")]
    else:
        cols = [r[0] for r in root.query(table, "SELECT column_name FROM information_schema.columns WHERE "
                                                f"table_schema='{root.schema}' AND table_name='{table}' "
                                                "ORDER BY ordinal_position")]
    cols = [c for c in cols if c not in skip]
    exprs = [subst.get(c, f"t.{c}") for c in cols]
    root.execute(table, f"WITH RECURSIVE g(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM g WHERE i < {n - 1}) "
                        f"INSERT INTO {table} ({', '.join(cols)}) SELECT {', '.join(exprs)} FROM {table} t, g "
                        f"WHERE t.{tpl_where} ORDER BY g.i; DELETE FROM {table} WHERE {tpl_where};")


def pad(root, prefix, width):
    if root.backend == "sqlite":
        return f"printf('{prefix}%0{width}d', g.i)"
    return f"'{prefix}' || lpad(g.i::text, {width}, '0')"


def fleet_setup(backend, nhosts, nagents, tag):
    """nhosts roots (h1..hN) on one store (SQLite: one root only), a template
    floating agent and its message registered with the CLI, copied to nagents
    agents b00000.. with one message each."""
    first = Root(backend, tag, host="h1" if nhosts > 1 else None)
    roots = [first] + [Root(backend, tag, schema=first.schema, host=f"h{k}") for k in range(2, nhosts + 1)]
    wt = Path(base.WORK) / "wt"  # the agents' worktree: one path, valid for every host
    wt.mkdir(exist_ok=True)
    add_agent(first, "tpl", fake("--lines", 1), floating=True, worktree=wt)
    first.run("mail", "send", "--from", "boss", "--to", "tpl", "--subject", "work", "--body", "do it")
    clone_sql(first, "sessions", "agent_name = 'tpl'",
              {"id": pad(first, "session-b", 11), "agent_name": pad(first, "b", 5)}, nagents)
    clone_sql(first, "messages", "to_agent = 'tpl'",
              {"id": pad(first, "msg-b", 11), "to_agent": pad(first, "b", 5)}, nagents, skip=("rowid",))
    n = int(q1(first, "messages", "SELECT COUNT(*) FROM messages WHERE read = 0")[0])
    assert n == nagents, f"{n} messages pending, {nagents} expected"
    return roots


def chain_setup(backend, nhosts, nagents, tag):
    """nagents `lead` agents c00000.. registered with the CLI (floating), each
    running the fake agent `--lines 1 --mail status --mail-to <itself>`: every
    turn mails its own agent, so the next message arrives while the agent's
    turn still holds its lease, and every host sees it due. One seed message
    each (one `mail send`, copied)."""
    first = Root(backend, tag, host="h1" if nhosts > 1 else None)
    roots = [first] + [Root(backend, tag, schema=first.schema, host=f"h{k}") for k in range(2, nhosts + 1)]
    wt = Path(base.WORK) / "wt"
    wt.mkdir(exist_ok=True)
    names = [f"c{i:05d}" for i in range(nagents)]
    for n in names:
        add_agent(first, n, fake("--lines", 1, "--mail", "status", "--mail-to", n), capability="lead",
                  floating=True, worktree=wt)
    mid = first.run("mail", "send", "--from", "boss", "--to", names[0], "--subject", "work", "--body", "go on").stdout
    mid = mid.decode().strip().split()[-1]
    clone_sql(first, "messages", f"id = '{mid}'",
              {"id": pad(first, "msg-c", 11), "to_agent": pad(first, "c", 5)}, nagents, skip=("rowid",))
    return roots


def serve_once(backend, nhosts, nagents, conc, poll, tag, chain_window=None):
    """Backlog mode (chain_window None): drain one message per agent. Chain
    mode: agents that mail themselves every turn, run for chain_window s
    after the first turn ends, then SIGINT."""
    roots = (chain_setup if chain_window else fleet_setup)(backend, nhosts, nagents, tag)
    first = roots[0]
    procs, errs = [], []
    deadline = time.time() + 60 + (chain_window or nagents * 60 / 300)  # backlog: gives up below 300 turns/min
    t_first = None
    try:
        for r in roots:
            ef = open(r.path / "serve.stderr", "wb")
            errs.append(ef)
            procs.append(subprocess.Popen([str(a) for a in r.cmd("serve", "--max-concurrent", conc, "--poll", poll,
                                                                  "--grace", "1s")],
                                          stdout=subprocess.DEVNULL, stderr=ef, env=r.env()))
        timed_out = False
        while True:
            time.sleep(0.5)
            if chain_window:
                if t_first is None and q1(first, "turns", "SELECT COUNT(*) FROM turns WHERE ended_at IS NOT NULL")[0] != "0":
                    t_first = time.time()
                if t_first is not None and time.time() >= t_first + chain_window:
                    break
            else:
                pending = int(q1(first, "messages", "SELECT COUNT(*) FROM messages WHERE read = 0 AND dead_at IS NULL")[0])
                if pending == 0:
                    break
            if any(p.poll() is not None for p in procs):
                log(f"serve {tag}: a serve process exited early: {[p.poll() for p in procs]}")
                break
            if time.time() > deadline:
                timed_out = True
                log(f"serve {tag}: deadline passed" + ("" if chain_window else f"; {pending} messages still pending"))
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        rcs = []
        for p in procs:
            try:
                rcs.append(p.wait(timeout=30))
            except subprocess.TimeoutExpired:
                p.kill()
                rcs.append(p.wait())
        for ef in errs:
            ef.close()
    host_col = ", host" if backend == "postgres" else ", ''"
    rows = first.query("turns", f"SELECT turn_id, agent_name, started_at, ended_at, outcome, mail_ids{host_col} "
                                "FROM turns")
    stderr_lines = []
    host_of = {}  # turn id -> host, from the turn log directories each host's root holds
    attempts = {}  # host -> serve's own per-turn lines by outcome ("nothing": another host got there first)
    for r in roots:
        h = r.host or "h1"
        for d in (r.path / "logs").glob("*/*"):
            host_of[d.name] = h
        c = collections.Counter()
        for line in (r.path / "serve.stderr").read_text(errors="replace").splitlines():
            low = line.lower()
            if " error" in low or "warn" in low or "panick" in low:
                stderr_lines.append(f"{h}: {line}")
            f = line.split()
            if len(f) >= 5 and f[4].startswith("mail="):
                c[f[2]] += 1
        attempts[h] = dict(c)
    rows = [(*row[:6], row[6] or host_of.get(row[0], "?")) for row in rows]
    out = analyse(rows, None if chain_window else nagents)
    # Turns that neither delivered nor were interrupted by the final SIGINT: why.
    odd = first.query("turns", "SELECT turn_id, agent_name, outcome, reason, exit_code, signal, stderr_tail FROM turns "
                               "WHERE outcome IS NULL OR outcome NOT IN ('done', 'exited', 'waiting', 'interrupted')")
    out["odd_turns"] = [dict(zip(("turn_id", "agent", "outcome", "reason", "exit_code", "signal", "stderr_tail"), r),
                             host=host_of.get(r[0], "?")) for r in odd[:20]]
    out["odd_turn_count"] = len(odd)
    out["serve_lines_by_host"] = attempts
    out["nothing_attempts"] = sum(c.get("nothing", 0) for c in attempts.values())
    # Every message marked read must be in exactly one delivering turn's mail_ids.
    read_ids = {r[0] for r in first.query("messages", "SELECT id FROM messages WHERE read = 1")}
    out["read_not_in_a_delivering_turn"] = len(read_ids - out.pop("_delivered_ids"))
    kinds = collections.Counter(problem_kind(line) for line in stderr_lines)
    out.update(rcs=rcs, timed_out=timed_out, stderr_problems=stderr_lines[:50],
               stderr_problem_count=len(stderr_lines), stderr_problem_kinds=dict(kinds.most_common(10)))
    undelivered = int(q1(first, "messages", "SELECT COUNT(*) FROM messages WHERE read = 0")[0])
    out["messages_unread_after"] = undelivered
    for r in roots[1:]:
        r.drop()
    first.drop()
    return out


def problem_kind(line):
    """A serve stderr line with its host, stamps, colours, agent and turn
    names taken out, so that lines of one kind count together."""
    line = re.sub(r"\x1b\[[0-9;]*m", "", line.split(": ", 1)[-1])
    line = re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z", "", line)
    line = re.sub(r"\b[bc]\d{5}\b", "<agent>", line)
    return re.sub(r"\b\d{8}T\d{9}Z-\w+", "<turn>", line).strip()


def analyse(rows, nagents):
    """Rate, double deliveries and overlaps from the turn rows."""
    turns = []
    for turn_id, agent, start, end, outcome, mail_ids, host in rows:
        turns.append({"id": turn_id, "agent": agent, "start": ts(start), "end": ts(end) if end else None,
                      "outcome": outcome or "(unfinished)", "mail": json.loads(mail_ids or "[]"), "host": host})
    by_outcome = collections.Counter(t["outcome"] for t in turns)
    by_host = collections.Counter(t["host"] for t in turns if t["outcome"] in DELIVERING)
    delivering = [t for t in turns if t["outcome"] in DELIVERING]
    seen = collections.defaultdict(list)
    for t in turns:
        for m in t["mail"]:
            seen[m].append(t)
    doubles = {m: [(t["id"], t["host"], t["outcome"]) for t in ts_]
               for m, ts_ in seen.items() if sum(t["outcome"] in DELIVERING for t in ts_) > 1}
    delivered_ids = {m for m, ts_ in seen.items() if any(t["outcome"] in DELIVERING for t in ts_)}
    never = None if nagents is None else nagents - len(delivered_ids)
    overlaps = []
    per_agent = collections.defaultdict(list)
    for t in turns:
        per_agent[t["agent"]].append(t)
    for agent, ts_ in per_agent.items():
        ts_.sort(key=lambda t: t["start"])
        for a, b in zip(ts_, ts_[1:]):
            if a["end"] is None or b["start"] < a["end"]:
                overlaps.append((agent, a["id"], a["host"], b["id"], b["host"]))
    finished = [t for t in delivering if t["end"] is not None]
    span = (max(t["end"] for t in finished) - min(t["start"] for t in finished)) if finished else float("nan")
    return {"turns": len(turns), "delivering_turns": len(delivering), "span_s": span,
            "per_min": len(finished) / span * 60 if finished and span > 0 else 0.0,
            "by_outcome": dict(by_outcome), "by_host": dict(by_host),
            "_delivered_ids": delivered_ids, "double_deliveries": len(doubles), "double_examples": dict(list(doubles.items())[:10]),
            "messages_never_delivered": never, "agents_with_several_turns": sum(len(v) > 1 for v in per_agent.values()),
            "overlaps": len(overlaps), "overlap_examples": overlaps[:10]}


def bench_serve(runs, nagents, nhosts, conc, poll, chain_agents, chain_window):
    """Backlog: SQLite x1 host, PostgreSQL x1 and x nhosts, each draining
    nagents agents with one message each. Chain: agents mailing themselves
    every turn (several turns per agent, the next message due while the lease
    is held), SQLite x1 and PostgreSQL x nhosts, for chain_window s."""
    split = max(1, conc // nhosts)  # the same turns at once in all as one host
    variants = [("sqlite", 1, conc, None), ("postgres", 1, conc, None), ("postgres", nhosts, conc, None)]
    if split != conc and nhosts > 1:
        variants.append(("postgres", nhosts, split, None))
    if chain_agents:
        variants += [("sqlite", 1, conc, chain_window), ("postgres", nhosts, conc, chain_window)]
    key = lambda b, h, c, w: f"{b}x{h}x{c}" + ("-chain" if w else "")
    s = {key(*v): [] for v in variants}
    for i in range(runs):
        for b, h, c, w in (variants if i % 2 == 0 else variants[::-1]):
            k = key(b, h, c, w)
            n = chain_agents if w else nagents
            log(f"serve {k} run {i + 1}: {n} agents" + (f", mailing themselves, {w:g} s" if w else ", one message each")
                + " ...")
            r = serve_once(b, h, n, c, poll, f"sv-{k}", chain_window=w)
            log(f"serve {k} run {i + 1}: {r['per_min']:,.0f} turns/min; outcomes {r['by_outcome']}; "
                f"turns by host {r['by_host']}; attempts that found nothing {r['nothing_attempts']}; "
                f"doubles {r['double_deliveries']}, overlaps {r['overlaps']}, never delivered "
                f"{r['messages_never_delivered']}, read but in no turn {r['read_not_in_a_delivering_turn']}, "
                f"serve error/warn lines {r['stderr_problem_count']}, odd turns {r['odd_turn_count']} "
                f"{r['odd_turns'][:2] if r['odd_turns'] else ''}")
            s[k].append(r)
    RAW["serve"] = {"agents": nagents, "hosts": nhosts, "max_concurrent_per_host": conc, "poll": poll,
                    "chain_agents": chain_agents, "chain_window_s": chain_window, "runs": s}
    rate = {k: med([r["per_min"] for r in v]) for k, v in s.items()}
    for b, h, c, w in variants:
        k = key(b, h, c, w)
        v = s[k]
        bad = {"double deliveries": sum(r["double_deliveries"] for r in v),
               "overlapping turns of one agent": sum(r["overlaps"] for r in v),
               "messages never delivered": sum(r["messages_never_delivered"] or 0 for r in v),
               "messages read but in no delivering turn": sum(r["read_not_in_a_delivering_turn"] for r in v),
               "serve error/warn lines": sum(r["stderr_problem_count"] for r in v),
               "runs timed out": sum(r["timed_out"] for r in v),
               "turns neither delivering nor interrupted": sum(r["odd_turn_count"] for r in v),
               "serve exits not 0": sum(any(rc != 0 for rc in r["rcs"]) for r in v)}
        problems = "; ".join(f"**{n} {what}**" for what, n in bad.items() if n)
        kinds = collections.Counter()
        for r in v:
            kinds.update(r["stderr_problem_kinds"])
        if kinds:
            problems += " (" + "; ".join(f"{n} x `{k}`" for k, n in kinds.most_common(3)) + ")"
        odd = collections.Counter(f"{t['outcome']}: {t['reason']}" for r in v for t in r["odd_turns"])
        if odd:
            problems += " (" + "; ".join(f"{n} x `{k}`" for k, n in odd.most_common(3)) + ")"
        others = "; ".join(f"{label_of(b2)} {h2}x{c2}: {rate[key(b2, h2, c2, w2)]:,.0f}/min"
                           for b2, h2, c2, w2 in variants if (w2 is None) == (w is None) and (b2, h2, c2) != (b, h, c))
        is_target = b == "postgres" and h == nhosts and h > 1 and w is None and c == conc
        multi = h > 1
        several = med([r["agents_with_several_turns"] for r in v])
        what = (f"{nagents:,} agents, one message each, drained; first start to last end" if w is None else
                f"{chain_agents} `lead` agents whose fake agent mails itself every turn, {w:g} s after the first "
                f"turn, then SIGINT; median {several:.0f} agents with several turns; interrupted turns not counted")
        result(f"serve, {label_of(b)}, {h} host{'s' if multi else ''} x {c} at once, "
               + ("backlog" if w is None else "self-mailing agents") + " (fake agent --lines 1)",
               rate[k], "turns/min", others or "-", ">= 2,000 turns/min (issue 14)" if is_target else "-",
               (rate[k] >= 2000 and not problems) if is_target else None,
               f"{what}; {runs} runs ({', '.join(format(r['per_min'], ',.0f') for r in v)})"
               + (f"; turns per host (last run) {v[-1]['by_host']}; attempts that found the mail already claimed "
                  f"by another host: median {med([r['nothing_attempts'] for r in v]):.0f}" if multi else "")
               + ("; no double delivery, no overlap" if not problems else f"; {problems}"))


def result(figure, value, unit, baseline, target, ok, note=""):
    base.result(figure, value, unit, baseline, target, ok, note)


# ---------------------------------------------------------------- main


def main():
    global URL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["all", "overhead", "ingest", "serve"])
    ap.add_argument("--runs", type=int, help="runs per figure (default: overhead 21, ingest 5, serve 3)")
    ap.add_argument("--url", default=os.environ.get("RUNNER_BENCH_PG", DEFAULT_URL), help=f"PostgreSQL (default {DEFAULT_URL})")
    ap.add_argument("--messages", type=int, default=2000, help="serve: agents, one message each (default 2000)")
    ap.add_argument("--hosts", type=int, default=4, help="serve: hosts on one database (default 4)")
    ap.add_argument("--conc", type=int, default=8, help="serve: --max-concurrent per host (default 8)")
    ap.add_argument("--poll", default="100ms", help="serve: --poll (default 100ms)")
    ap.add_argument("--chain-agents", type=int, default=40,
                    help="serve: agents that mail themselves every turn (default 40; 0 = skip that variant)")
    ap.add_argument("--chain-window", type=float, default=15.0, help="serve: seconds of the self-mailing run (default 15)")
    ap.add_argument("--bin", help="use this binary instead of building target/release/runner")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release")
    ap.add_argument("--json", help="write raw samples and results here (default bench/results/fleet-<date>.json)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (schemas are dropped anyway)")
    a = ap.parse_args()
    URL = a.url
    if shutil.which("psql") is None:
        raise SystemExit("psql not found: it creates and drops the benchmark's schemas")
    try:
        psql("SELECT 1")
    except SystemExit as e:
        raise SystemExit(f"PostgreSQL at {URL} is not reachable: {e}")

    if a.bin is None and not a.no_build:
        log("cargo build --release ...")
        if subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=REPO).returncode != 0:
            raise SystemExit("cargo build --release failed; fix it, or benchmark the last binary with --no-build")
    src = base.BIN_SRC = (Path(a.bin) if a.bin else REPO / "target" / "release" / "runner").resolve()
    base.WORK = tempfile.mkdtemp(prefix="runner-fleet-")
    base.BIN = Path(base.WORK) / "runner"
    shutil.copy2(src, base.BIN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t0 = time.time()
    try:
        base.bench_env(None)
        RAW["env"]["postgres"] = psql("SELECT version()").strip("\x1e")
        RAW["env"]["url"] = URL.split("@")[-1]
        todo = ["overhead", "ingest", "serve"] if a.what == "all" else [a.what]
        for name in todo:
            runs = a.runs or {"overhead": 21, "ingest": 5, "serve": 3}[name]
            log(f"{name} ({runs} runs) ...")
            t = time.time()
            if name == "overhead":
                bench_overhead(runs)
            elif name == "ingest":
                bench_ingest(runs)
            else:
                bench_serve(runs, a.messages, a.hosts, a.conc, a.poll, a.chain_agents, a.chain_window)
            RAW.setdefault("seconds", {})[name] = round(time.time() - t, 1)
            log(f"{name}: {time.time() - t:.0f} s")
        env = RAW["env"]
        env["loadavg_end"] = open("/proc/loadavg").read().strip()
        env["total_s"] = round(time.time() - t0, 1)
        print(f"\nrunner fleet benchmarks (SQLite vs PostgreSQL): {env['git']}, binary {env['binary_mtime']} "
              f"sha256 {env['binary_sha256']}, nproc {env['nproc']}, load {env['loadavg']} -> {env['loadavg_end']}, "
              f"{env['total_s']} s; {env['postgres'].split(' on ')[0]} at {env['url']}\n")
        base.print_table()
        for n in NOTES:
            print(f"\nNote: {n}")
        path = Path(a.json) if a.json else REPO / "bench" / "results" / \
            f"fleet-{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%dT%H%M')}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"results": RESULTS, "raw": RAW, "notes": NOTES}, f, indent=1)
        log(f"raw samples: {path}")
    finally:
        for sch in list(SCHEMAS):
            try:
                drop_schema(sch)
            except SystemExit as e:
                log(f"could not drop schema {sch}: {e}")
        if a.keep:
            log(f"kept {base.WORK}")
        else:
            rm(base.WORK)


if __name__ == "__main__":
    main()
