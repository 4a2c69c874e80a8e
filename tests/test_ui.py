"""The built-in web page (moeserve/server/ui.py, moeserve/assets/ui/) without a browser: its
routes, their auth rules, --no-ui, and the sliding window of GET /ui/stats."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from moeserve.assets import DEMO_MODEL_NAME, demo_model_path
from moeserve.cli import build_parser
from moeserve.engine.client import EngineClient
from moeserve.server.serve import server_config
from moeserve.server.ui import WINDOW_SECONDS, LiveStats, Snapshot
from tests.server_fixture import RunningServer, serving, start_server, wait_for

KEY = "sesame"
AUTH = {"Authorization": f"Bearer {KEY}"}
ASK = {"messages": [{"role": "user", "content": "47+85"}], "max_tokens": 8, "temperature": 0}


@pytest.fixture(scope="module")
def keyed() -> Iterator[RunningServer]:
    # Offloading (2 of 8 experts per layer on the "device"), so the cache rows are filled.
    engine = {"expert_cache_slots": 2, "offload_mode": "fetch", "enable_prefix_caching": False}
    yield from serving(
        demo_model_path(),
        served_model_name=DEMO_MODEL_NAME,
        max_model_len=256,
        api_key=KEY,
        engine_kwargs=engine,
    )


def test_page_is_public_and_self_contained(keyed: RunningServer) -> None:
    http = keyed.client()
    for path in ("/", "/ui"):
        r = http.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert 'src="ui/ui.js"' in r.text and 'href="ui/ui.css"' in r.text
        # Nothing from outside: no absolute URL anywhere in the page or its assets.
        for text in (r.text, http.get("/ui/ui.js").text, http.get("/ui/ui.css").text):
            assert "http://" not in text and "https://" not in text and "//cdn" not in text
        assert "default-src 'none'" in r.headers["content-security-policy"]
    assert http.get("/ui/ui.js").headers["content-type"].startswith("text/javascript")
    assert http.get("/ui/ui.css").headers["content-type"].startswith("text/css")
    for bad in ("/ui/secret.txt", "/ui/..%2Fapp.py", "/ui/index.html"):
        assert http.get(bad).status_code == 404, bad


def test_stats_need_the_key_and_follow_requests(keyed: RunningServer) -> None:
    http = keyed.client()
    assert http.get("/ui/stats").status_code == 401
    assert http.get("/ui/stats", headers={"Authorization": "Bearer nope"}).status_code == 401
    first = http.get("/ui/stats", headers=AUTH)
    assert first.status_code == 200 and first.headers["cache-control"] == "no-store"
    body = first.json()
    assert body["model"] == DEMO_MODEL_NAME and body["max_model_len"] == 256
    assert body["layers"] == [0, 1, 2, 3] and body["num_experts"] == 8
    assert len(body["expert_tokens"]) == 4 and all(len(r) == 8 for r in body["expert_tokens"])
    assert set(body["serving"]) == {
        "running",
        "waiting",
        "kv_cache_usage",
        "prompt_tokens_per_s",
        "generation_tokens_per_s",
    }
    r = http.post("/v1/chat/completions", headers=AUTH, json=ASK)
    assert r.json()["choices"][0]["message"]["content"] == "132"
    usage = r.json()["usage"]
    wait_for(lambda: keyed.state.inflight == 0, 10)
    after = http.get("/ui/stats", headers=AUTH).json()
    # Every prompt and generated token passes each sparse layer once, top-2: the window holds
    # this request's assignments (less the last token, which is never fed back), no more.
    routed = (usage["prompt_tokens"] + usage["completion_tokens"] - 1) * 2
    assert [sum(row) for row in after["expert_tokens"]] == [routed] * 4
    assert after["window_seconds"] > 0
    assert after["serving"]["generation_tokens_per_s"] > 0
    assert after["serving"]["running"] == 0
    cache = after["expert_cache"]
    assert [row["layer"] for row in cache] == [0, 1, 2, 3]
    for row in cache:
        assert row["slots"] == 2 and 0 < row["resident"] <= 2
        assert row["hit_rate"] is not None and 0.0 <= row["hit_rate"] < 1.0


def test_no_ui_turns_the_page_and_stats_off(tmp_path_factory: pytest.TempPathFactory) -> None:
    assert server_config(build_parser().parse_args(["serve"])).ui is True
    assert server_config(build_parser().parse_args(["serve", "--no-ui"])).ui is False
    for srv in serving(demo_model_path(), max_model_len=64, ui=False):
        http = srv.client()
        for path in ("/", "/ui", "/ui/ui.js", "/ui/stats"):
            assert http.get(path).status_code == 404, path
        assert http.get("/health").status_code == 200


def _snap(t: float, counts: list[list[int]], gen: float = 0.0) -> Snapshot:
    return Snapshot(t, torch.tensor(counts), 0.0, gen, [], [])


def test_live_stats_window() -> None:
    live = LiveStats()
    base, seconds = live.window(_snap(100.0, [[5, 0]]))
    assert seconds == 0 and base.experts_LE.tolist() == [[5, 0]]  # first ask: an empty window
    # Polled every second: the baseline is the oldest snapshot within the window.
    for i in range(1, 31):
        base, seconds = live.window(_snap(100.0 + i, [[5 + i, i]], gen=10.0 * i))
        assert seconds == min(i, WINDOW_SECONDS)
        assert base.generation_tokens == 10.0 * (i - seconds)
    assert len(live._ring) == WINDOW_SECONDS + 1
    # A gap longer than the window: the newest older snapshot is the baseline (not zero).
    base, seconds = live.window(_snap(200.0, [[50, 40]]))
    assert base.time == 130.0 and seconds == 70.0
    # The counts went back (the model restarted): the window restarts, never negative.
    base, seconds = live.window(_snap(201.0, [[1, 0]]))
    assert seconds == 0 and base.experts_LE.tolist() == [[1, 0]]


def test_metrics_and_stats_share_counters(keyed: RunningServer) -> None:
    """The map is computed from the counters /metrics exposes: per expert, the window holds at
    least what the cumulative series grew by over a request, and at most its total."""
    http = keyed.client()

    def cumulative() -> list[float]:
        text = http.get("/metrics").text
        return [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("moeserve_expert_tokens_total{")
        ]

    wait_for(lambda: keyed.state.inflight == 0, 10)
    before = cumulative()
    http.get("/ui/stats", headers=AUTH)
    r = http.post("/v1/chat/completions", headers=AUTH, json={**ASK, "max_tokens": 3})
    assert r.status_code == 200
    window = [n for row in http.get("/ui/stats", headers=AUTH).json()["expert_tokens"] for n in row]
    after = cumulative()
    assert len(window) == len(after) == len(before) == 4 * 8
    assert all(a - b <= w <= a for w, a, b in zip(window, after, before))
    assert sum(after) > sum(before)


def test_stats_before_the_model_loads() -> None:
    release = threading.Event()

    def never_loads() -> EngineClient:
        release.wait(30)
        raise ValueError("not loading in this test")

    srv = start_server(demo_model_path(), engine_factory=never_loads, wait_ready=False)
    try:
        http = srv.client()
        assert http.get("/ui").status_code == 200  # the page itself answers at once
        r = http.get("/ui/stats")
        assert r.status_code == 503 and r.headers["retry-after"]
    finally:
        release.set()
        srv.stop()
