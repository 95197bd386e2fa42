#!/usr/bin/env bash
# Regenerates docs/dashboard.png: a small fleet of fake agents under
# `runner serve --http`, a few waves of mail, then headless Chromium takes a
# screenshot of the dashboard while one turn is still running.
#
#   bash bench/dashboard-screenshot.sh            # builds --release first
#   RUNNER_BIN=target/debug/runner bash bench/dashboard-screenshot.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${RUNNER_BIN:-}" ]; then
  cargo build --release --quiet
  RUNNER_BIN=target/release/runner
fi
BIN=$(realpath "$RUNNER_BIN")
CHROMIUM=${RUNNER_CHROMIUM:-$(command -v chromium || command -v chromium-browser)}
ROOT=$(mktemp -d /tmp/runner-dashboard-XXXXXX)
OUT=${1:-docs/dashboard.png}
r() { "$BIN" --root "$ROOT" "$@"; }
cleanup() {
  if [ -n "${SERVE_PID:-}" ]; then kill "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; fi
  rm -rf "$ROOT" 2>/dev/null || { sleep 1; rm -rf "$ROOT"; }
}
trap cleanup EXIT

r init >/dev/null
mkdir -p "$ROOT/wt"
add() { local name=$1 cap=$2; shift 2; r agent add "$name" --capability "$cap" --worktree "$ROOT/wt" --command "$BIN" fake-agent "$@" >/dev/null; }
# A `command` agent that exits cleanly is done (completed), so each agent
# here takes one turn; the waves of mail spread the turns over time.
add builder-long builder --lines 60 --rate 3 --tool-every 4 --line-bytes 80
for i in 1 2 3 4 5 6; do add "builder-$i" builder --lines $((i * 2)) --tool-every 2; done
add builder-7 builder --lines 4 --result error --exit 1 --stderr "npm ERR! build failed"
add scout-1 scout --lines 3 --tool-every 1 --mail worker_done --mail-to lead
add reviewer-1 reviewer --lines 6 --tool-every 2 --stderr "warning: deprecated flag --fast"
send() { r mail send --from lead --to "$1" --type dispatch --subject "$2" --body "$2" >/dev/null; }

r serve --http 127.0.0.1:0 --poll 100ms --max-concurrent 4 2>"$ROOT/serve.log" &
SERVE_PID=$!
for _ in $(seq 100); do grep -q "listening on" "$ROOT/serve.log" && break; sleep 0.1; done
URL=$(grep -o 'http://127.0.0.1:[0-9]*/' "$ROOT/serve.log" | head -1)
[ -n "$URL" ] || { cat "$ROOT/serve.log"; exit 1; }
for wave in "builder-1 builder-2 scout-1" "builder-3 builder-7" "builder-4 reviewer-1" "builder-5 builder-6"; do
  for a in $wave; do send "$a" "task for $a"; done
  sleep 2
done
send builder-7 "try again"
send builder-long "a long task"
sleep 4
"$CHROMIUM" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,860 \
  --timeout=4000 --screenshot="$ROOT/shot.png" "$URL" 2>/dev/null
cp "$ROOT/shot.png" "$OUT"
echo "wrote $OUT ($(stat -c %s "$OUT") bytes)"
