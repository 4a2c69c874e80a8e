"""The `moeserve serve` process: flags and environment, exit codes, SIGTERM under load."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from moeserve.cli import build_parser, main
from moeserve.server.serve import server_config
from tests.server_fixture import assert_envelope, build_checkpoint, wait_for

# Long enough that no machine finishes it inside the 6 s drain: 1,000 tokens alone take
# 1.7 s on a 2-core CPU machine, so a drained 1,000-token request could finish in time.
POSITIONS = 8192
LONG = {"prompt": "Once upon a time", "max_tokens": POSITIONS - 100, "ignore_eos": True}
# Still running when SIGTERM comes (a few hundred ms), finished well inside the drain, also
# on a 2-core machine busy with other work (96 tokens beside four streams took over 3 s).
SHORT = {"prompt": "Hello", "max_tokens": 64, "ignore_eos": True}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory, POSITIONS)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _running(http: httpx.Client) -> float:
    text = http.get("/metrics").text
    return float(re.search(r"^moeserve_num_requests_running (\S+)$", text, re.M).group(1))


@pytest.fixture
def server_proc(ckpt: Path, tmp_path: Path):
    port = _free_port()
    log = (tmp_path / "server.log").open("wb")  # a file, not a pipe: a full one would block
    env = {**os.environ, "MOESERVE_SHUTDOWN_TIMEOUT": "6", "MOESERVE_PORT": str(port)}
    cmd = [
        sys.executable,
        "-m",
        "moeserve",
        "serve",
        "--model",
        str(ckpt),
        "--device",
        "cpu",
        "--max-model-len",
        str(POSITIONS),
        "--block-size",
        "4",
    ]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        try:
            return httpx.get(url + "/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, 60, "server readiness")
        yield proc, url, tmp_path / "server.log"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


def test_sigterm_drains_then_exits_zero(server_proc: Any) -> None:
    proc, url, log_path = server_proc
    http = httpx.Client(base_url=url, timeout=60)
    results: dict[str, Any] = {}
    first_chunk = threading.Barrier(5)  # every stream started + the test thread

    def plain(name: str, body: dict) -> None:
        results[name] = http.post("/v1/completions", json=body)

    def stream(name: str, route: str, body: dict) -> None:
        with http.stream("POST", route, json={**body, "stream": True}) as resp:
            lines = resp.iter_lines()
            first = next(lines)
            first_chunk.wait(30)
            results[name] = [first, *lines]

    chat_long = {
        "messages": [{"role": "user", "content": "Tell me a story"}],
        "max_tokens": LONG["max_tokens"],
        "ignore_eos": True,
    }
    threads = [
        threading.Thread(target=plain, args=("long_plain", LONG)),
        threading.Thread(target=stream, args=("long_stream", "/v1/completions", LONG)),
        threading.Thread(target=stream, args=("long_chat", "/v1/chat/completions", chat_long)),
    ]
    short = [
        threading.Thread(target=stream, args=(f"short{i}", "/v1/completions", SHORT))
        for i in range(2)
    ]
    threads[0].start()
    wait_for(lambda: _running(http) == 1, 10, "the long plain request running")
    for t in threads[1:] + short:
        t.start()
    first_chunk.wait(30)  # all five in flight: the streams have their first chunks
    proc.send_signal(signal.SIGTERM)
    # Draining: not ready, new requests refused with Retry-After, in-flight ones still going.
    wait_for(lambda: http.get("/ready").status_code == 503, 5, "readiness off")
    refused = http.post("/v1/completions", json=SHORT)
    assert_envelope(refused, 503)
    assert int(refused.headers["Retry-After"]) > 0
    for t in threads + short:
        t.join(30)
    assert proc.wait(30) == 0, log_path.read_text()

    for i in range(2):  # short requests finish inside the timeout
        lines = [line for line in results[f"short{i}"] if line]
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][len("data: ") :])
        assert last.get("choices", [{}])[0].get("finish_reason") == "length", lines[-3:]
    err = assert_envelope(results["long_plain"], 503)
    assert err["code"] == "server_shutting_down"
    for name in ("long_stream", "long_chat"):
        lines = [line for line in results[name] if line]
        assert lines[-1] == "data: [DONE]"
        last = json.loads(lines[-2][len("data: ") :])
        assert last["error"]["code"] == "server_shutting_down", last
    log = log_path.read_text()
    assert "received SIGTERM" in log and "draining" in log
    # Both processes took their startup heap out of the collector's scans once loaded.
    for where in ("server", "engine process"):
        assert re.search(rf"{where}: froze [1-9]\d* startup objects", log), log


def test_serve_missing_model_exits_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Without --model the packaged demo model is served (tests/test_demo_model.py); a model
    # named by the flag or the environment that does not exist is still an error.
    missing = str(tmp_path / "no-such-model")
    assert main(["serve", "--model", missing]) == 2
    assert f"--model {missing}: not a directory" in capsys.readouterr().err
    monkeypatch.setenv("MOESERVE_MODEL", missing)
    assert main(["serve"]) == 2
    assert "no-such-model" in capsys.readouterr().err


def test_flags_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOESERVE_MAX_QUEUED_REQUESTS", "7")
    monkeypatch.setenv("MOESERVE_API_KEY", "k")
    monkeypatch.setenv("MOESERVE_LOG_PROMPTS", "1")
    args = build_parser().parse_args(
        ["serve", "--model", str(tmp_path), "--port", "9001", "--max-body-bytes", "1MiB"]
    )
    assert (args.host, args.port, args.max_queued_requests) == ("127.0.0.1", 9001, 7)
    cfg = server_config(args)
    assert cfg.served_model_name == tmp_path.name and cfg.api_key == "k" and cfg.log_prompts
    assert cfg.max_body_bytes == 1 << 20 and cfg.shutdown_timeout == 30.0
    flags = ["--max-queued-requests", "3", "--served-model-name", "m"]
    args = build_parser().parse_args(["serve", "--model", str(tmp_path), *flags])
    assert server_config(args).max_queued_requests == 3
    assert server_config(args).served_model_name == "m"
    assert server_config(args).watchdog_timeout == 30.0
    assert server_config(args).allowed_hosts is None
    flags = ["--watchdog-timeout", "5", "--allowed-hosts", "API.example.com, *.internal,[::1]"]
    cfg = server_config(build_parser().parse_args(["serve", "--model", str(tmp_path), *flags]))
    assert cfg.watchdog_timeout == 5.0
    assert cfg.allowed_hosts == ("api.example.com", "*.internal", "[::1]")
    for bad in (
        ["--allowed-hosts", "a.com:8000"],
        ["--allowed-hosts", "a*.com"],
        ["--watchdog-timeout", "-1"],
    ):
        with pytest.raises(ValueError, match=bad[0]):
            server_config(build_parser().parse_args(["serve", "--model", str(tmp_path), *bad]))
    monkeypatch.setenv("MOESERVE_PORT", "not-a-port")
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["serve"])
    assert exc.value.code == 2


def test_bad_values_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--max-queued-requests", "0"]) == 2
    assert "--max-queued-requests" in capsys.readouterr().err


def test_model_that_fails_to_load_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The server listens first and loads in the background; the failure still ends the process.
    assert main(["serve", "--model", str(tmp_path), "--port", "0"]) == 2
    assert "config.json" in capsys.readouterr().err
