#!/usr/bin/env python3
"""Server CPU per row of the events writer's COPYs, by table variant (issue 14).

    python3 bench/pg_copy.py --runs 5                  # builds nothing: uses target/release/runner
    python3 bench/pg_copy.py --runs 5 --bin PATH --variants v2,noturnidx

One `cat` turn of bench/run.py's 144,002-line Claude-like NDJSON is ingested
into a scratch schema and its rows are read back (COPY TO, binary). Then, per
variant and run (variants interleaved run by run), the same rows are COPYed
in 512-row transactions, each as the writer sends them (BEGIN + SET LOCAL x2
+ the fence check; a binary COPY; COMMIT), into a fresh `events` table of
that shape, and the CPU the server's backend spent is read from
/proc/<pid>/schedstat (pid from BackendKeyData). CPU time, unlike wall time,
holds up on a loaded machine; the variants still differ by less than its noise
unless the medians differ by more than ~5%.

The client speaks the wire protocol itself (trust auth; no psycopg needed).
Schemas are dropped at the end.
"""

import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as base  # noqa: E402
import fleet  # noqa: E402


class PG:
    """A minimal PostgreSQL connection: startup (trust), simple queries, COPY."""

    def __init__(self, host, port, user, db):
        self.s = socket.create_connection((host, port))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        p = b"user\0" + user.encode() + b"\0database\0" + db.encode() + b"\0\0"
        self.s.sendall(struct.pack("!ii", 8 + len(p), 196608) + p)
        self.buf, self.pid = bytearray(), None
        while True:
            t, body = self.read()
            if t == b"R" and struct.unpack("!i", body[:4])[0] != 0:
                raise SystemExit("pg_copy.py needs trust authentication")
            if t == b"K":
                self.pid = struct.unpack("!i", body[:4])[0]
            if t == b"E":
                raise SystemExit(body.decode(errors="replace"))
            if t == b"Z":
                return

    def read(self):
        while True:
            if len(self.buf) >= 5:
                n = struct.unpack("!i", self.buf[1:5])[0]
                if len(self.buf) >= 1 + n:
                    t, body = bytes(self.buf[:1]), bytes(self.buf[5:1 + n])
                    del self.buf[:1 + n]
                    return t, body
            d = self.s.recv(1 << 16)
            if not d:
                raise SystemExit("connection closed")
            self.buf += d

    @staticmethod
    def msg(t, body):
        return t + struct.pack("!i", 4 + len(body)) + body

    def send(self, *parts):
        self.s.sendall(b"".join(parts))

    def ready(self):
        """Reads to ReadyForQuery; returns the rows (lists of str/None); fails on an error."""
        rows, err = [], None
        while True:
            t, body = self.read()
            if t == b"E":
                err = body.decode(errors="replace")
            elif t == b"D":
                k, o, vals = struct.unpack("!h", body[:2])[0], 2, []
                for _ in range(k):
                    n = struct.unpack("!i", body[o:o + 4])[0]
                    o += 4
                    vals.append(None if n < 0 else body[o:o + n].decode())
                    o += max(n, 0)
                rows.append(vals)
            elif t == b"Z":
                if err:
                    raise SystemExit(err)
                return rows

    def q(self, sql):
        self.send(self.msg(b"Q", sql.encode() + b"\0"))
        return self.ready()

    def copy_in(self, sql, data):
        self.send(self.msg(b"Q", sql.encode() + b"\0"), self.msg(b"d", data), self.msg(b"c", b""))
        return self.ready()


HDR = b"PGCOPY\n\xff\r\n\0" + struct.pack("!ii", 0, 0)
COLS = ("run_id, agent_name, turn_id, session_id, created_at, event_type, tool_name, tool_args, "
        "tool_duration_ms, level, data, line_no")
TABLE = """CREATE TABLE events (
  id {id} PRIMARY KEY, run_id TEXT, agent_name TEXT NOT NULL, session_id TEXT, event_type TEXT NOT NULL,
  tool_name TEXT, tool_args TEXT, tool_duration_ms BIGINT,
  level TEXT NOT NULL DEFAULT 'info' CHECK(level IN ('debug','info','warn','error')), data TEXT,
  created_at TEXT NOT NULL, turn_id TEXT {coll}, line_no BIGINT);
{idx}
CREATE TABLE leases (agent_name TEXT PRIMARY KEY, token BIGINT NOT NULL, expires_at timestamptz NOT NULL);
INSERT INTO leases VALUES ('a1', 7, now() + interval '1 hour');"""
ERR = "CREATE INDEX idx_events_level_error ON events(level) WHERE level = 'error';"
TURN = "CREATE INDEX idx_events_turn ON events(turn_id, line_no){w};"
VARIANTS = {  # name: (id, turn_id collation, indexes), v2 = the schema runner creates
    "v2": ("BIGSERIAL", "", ERR + TURN.format(w="")),
    "collate_c": ("BIGSERIAL", 'COLLATE "C"', ERR + TURN.format(w="")),
    "dedup_off": ("BIGSERIAL", "", ERR + TURN.format(w=" WITH (deduplicate_items = off)")),
    "ff100": ("BIGSERIAL", "", ERR + TURN.format(w=" WITH (fillfactor = 100)")),
    "identity": ("BIGINT GENERATED BY DEFAULT AS IDENTITY", "", ERR + TURN.format(w="")),
    "noturnidx": ("BIGSERIAL", "", ERR),
    "pk_only": ("BIGSERIAL", "", ""),
}
FENCE = "SELECT 1 FROM leases WHERE agent_name = 'a1' AND token = 7 AND expires_at > now() FOR KEY SHARE"


def rows_of(data):
    """The tuples of a binary COPY, each as its bytes."""
    off = 19 + struct.unpack("!i", data[15:19])[0]
    out = []
    while True:
        n = struct.unpack("!h", data[off:off + 2])[0]
        if n == -1:
            return out
        start = off
        off += 2
        for _ in range(n):
            k = struct.unpack("!i", data[off:off + 4])[0]
            off += 4 + max(k, 0)
        out.append(data[start:off])


def backend_cpu(pid):
    return int(open(f"/proc/{pid}/schedstat").read().split()[0]) / 1e9


def one(conn_args, variant, rows, per_commit):
    schema = f"bench_pgcopy_{os.getpid()}"
    adm = PG(*conn_args)
    idt, coll, idx = VARIANTS[variant]
    adm.q(f"DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}; SET search_path TO {schema}; "
          + TABLE.format(id=idt, coll=coll, idx=idx))
    c = PG(*conn_args)
    c.q(f"SET search_path TO {schema}")
    copy = f"COPY events ({COLS}) FROM STDIN (FORMAT binary)"
    cpu0 = backend_cpu(c.pid)
    for i in range(0, len(rows), per_commit):
        c.q(f"BEGIN; SET LOCAL synchronous_commit = off; SET LOCAL statement_timeout = 10000; {FENCE}")
        c.copy_in(copy, HDR + b"".join(rows[i:i + per_commit]) + struct.pack("!h", -1))
        c.q("COMMIT")
    us = (backend_cpu(c.pid) - cpu0) * 1e6 / len(rows)
    n = int(adm.q(f"SELECT count(*) FROM {schema}.events")[0][0])
    assert n == len(rows), (n, len(rows))
    adm.q(f"DROP SCHEMA {schema} CASCADE")
    return us


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rows-per-commit", type=int, default=512)
    ap.add_argument("--bin", default=str(base.REPO / "target" / "release" / "runner"))
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5432)
    ap.add_argument("--user", default="postgres")
    ap.add_argument("--db", default="test")
    a = ap.parse_args()
    fleet.URL = f"postgres://{a.user}@{a.host}:{a.port}/{a.db}"
    base.WORK = tempfile.mkdtemp(prefix="runner-pgcopy-")
    base.BIN = a.bin
    try:
        stream = base.gen_stream(base.INGEST_LINES)
        root = fleet.Root("postgres", "rows")
        fleet.add_agent(root, "a1", ["cat", str(stream)])
        base.sh(fleet.turn_argv(root), env=root.env())
        env = dict(os.environ, PGOPTIONS=f"-c search_path={root.schema}")
        data = subprocess.run(["psql", fleet.URL, "-X", "-c", f"COPY (SELECT {COLS} FROM events ORDER BY id) "
                               "TO STDOUT (FORMAT binary)"], env=env, capture_output=True, check=True).stdout
        root.drop()
    finally:
        for s in list(fleet.SCHEMAS):
            fleet.drop_schema(s)
        base.rm(base.WORK)
    rows = rows_of(data)
    variants = a.variants.split(",")
    got = {v: [] for v in variants}
    conn_args = (a.host, a.port, a.user, a.db)
    for r in range(a.runs):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            got[v].append(one(conn_args, v, rows, a.rows_per_commit))
            base.log(f"run {r + 1}: {v} {got[v][-1]:.2f} us/row")
    print(f"\n{len(rows):,} rows, {a.rows_per_commit} per commit, {a.runs} runs, load {open('/proc/loadavg').read().split()[0]}\n")
    print("| variant | server CPU per row (median) | min | max |\n|---|---|---|---|")
    for v in variants:
        print(f"| {v} | {statistics.median(got[v]):.2f} µs | {min(got[v]):.2f} | {max(got[v]):.2f} |")


if __name__ == "__main__":
    main()
