#!/usr/bin/env bash
# The README's first quick-start command on a fresh virtual environment: the package's own
# dependencies only (no test extras), `moeserve serve` with the built-in model, one chat
# request answered correctly, then SIGTERM and a clean exit.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q torch==2.13.0
"$venv/bin/python" -m pip install -q .
port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
(cd / && exec "$venv/bin/moeserve" serve --port "$port") >"$log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$(dirname "$venv")"' EXIT
"$venv/bin/python" - "$port" <<'PY' || { cat "$log"; exit 1; }
import json, sys, time, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 180
while True:
    try:
        if urllib.request.urlopen(base + "/ready", timeout=2).status == 200:
            break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("quick start: the server did not become ready in 180 s")
    time.sleep(0.5)
body = {"messages": [{"role": "user", "content": "47+85"}], "max_tokens": 8, "temperature": 0}
req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                             {"Content-Type": "application/json"})
answer = json.load(urllib.request.urlopen(req, timeout=60))["choices"][0]["message"]["content"]
print(f"quick start: 47+85 -> {answer!r}")
sys.exit(0 if answer.strip() == "132" else "quick start: wrong answer")
PY
kill -TERM "$pid"
wait "$pid"
if grep -q "nanobind" "$log"; then
  echo "quick start: nanobind leak report on exit" >&2
  exit 1
fi
echo "quick start: ok"
