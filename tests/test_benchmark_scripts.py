"""The benchmark scripts cannot rot unseen: each answers --help (most need a GPU to run),
gpu_check.sh names only scripts that exist, and http_vs_offline's py-spy summary reads a
raw profile."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SCRIPTS = sorted(BENCH.glob("*.py"))
_NEEDS_TRITON = {"kernel_bench.py", "l2_prefetch_probe.py", "mxfp4_dot_probe.py", "pdl_probe.py"}


def test_every_benchmark_script_answers_help() -> None:
    env = os.environ | {"PYTHONPATH": str(REPO)}
    runs = {}
    for script in SCRIPTS:
        if script.name in _NEEDS_TRITON and importlib.util.find_spec("triton") is None:
            continue  # the Triton kernels it times are imported at its top
        cmd = [sys.executable, str(script), "--help"]
        runs[script.name] = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE)
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, name
        assert out.decode().startswith("usage:"), name
    assert {"gpu_speed.py", "http_vs_offline.py", "offload_bench.py", "loadtest.py"} <= set(runs)


def test_gpu_check_names_its_stages_and_only_scripts_that_exist() -> None:
    script = BENCH / "gpu_check.sh"
    usage = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0
    text = script.read_text()
    stages = re.findall(r"^    (\w+)\)", text, flags=re.M)
    [default] = re.findall(r'^all="([^"]+)"', text, flags=re.M)
    [extra] = re.findall(r'^extra="([^"]+)"', text, flags=re.M)
    assert set(default.split()) | set(extra.split()) == set(stages)
    for stage in stages:  # each documented in the usage lines
        assert re.search(rf"^    {stage}\s", usage.stdout, flags=re.M), stage
    for name in set(re.findall(r"benchmarks/(\w+\.py)", text)):
        assert (BENCH / name).is_file(), name


def test_pyspy_summary_splits_each_thread_by_what_it_waits_for(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.http_vs_offline import pyspy_summary

    step = "step (moeserve/engine/core.py:217)"
    profile = tmp_path / "engine-process.txt"
    profile.write_text(
        f"process 1:python;thread (0x1);main (x.py:1);{step};cudaStreamSynchronize 30\n"
        f"process 1:python;thread (0x1);main (x.py:1);{step} 60\n"
        f"process 1:python;thread (0x1);main (x.py:1);{step};take_gil 10\n"
        "process 1:python;thread (0x2);run (loop.py:9);recv (libc.so) 50\n"
    )
    text = pyspy_summary(profile)
    assert "thread (0x1): 100 samples (running 60%, device wait 30%, GIL wait 10%)" in text
    assert "thread (0x2): 50 samples (blocked 100%)" in text
    assert "60.0%      running  step (core.py:217)" in text


def test_prefix_ttft_runs_on_the_demo_model(tmp_path: Path) -> None:
    """benchmarks/prefix_ttft.py end to end on the CPU: the second request of each round
    finds the shared system prompt's full blocks cached; with caching off, nothing."""
    from moeserve.assets import demo_model_path

    out = tmp_path / "ttft.json"
    cmd = [sys.executable, str(BENCH / "prefix_ttft.py"), "--model", str(demo_model_path())]
    cmd += ["--device", "cpu", "--system-len", "40", "--user-len", "5", "--rounds", "2"]
    cmd += ["--block-size", "8", "--compare-off", "--json", str(out)]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    runs = json.loads(out.read_text())["runs"]
    for r in runs["on"]["rounds"]:
        assert (r["first_cached_tokens"], r["second_cached_tokens"]) == (0, 40)
        assert r["first_ttft_s"] > 0 and r["second_ttft_s"] > 0
    assert all(r["second_cached_tokens"] == 0 for r in runs["off"]["rounds"])
    assert "second TTFT ms" in res.stdout


def test_device_timeline_measures_busy_share_and_gaps() -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.gpu_speed import device_timeline

    def kernel(ts: float, dur: float) -> dict[str, object]:
        return {"cat": "kernel", "name": "k", "ts": ts, "dur": dur}

    events = [
        {"cat": "cpu_op", "name": "aten::mm", "ts": 0.0, "dur": 5000.0},  # not a kernel
        kernel(100.0, 10.0),
        kernel(105.0, 10.0),  # overlaps the first (PDL): 100-115 busy
        kernel(118.0, 2.0),  # 3 us gap
        kernel(150.0, 50.0),  # 30 us gap
        kernel(1400.0, 100.0),  # 1200 us gap (host-paced)
    ]
    t = device_timeline(events)
    assert t["kernels"] == 5 and t["span_us"] == 1400.0
    assert t["idle_us"] == 3.0 + 30.0 + 1200.0
    assert abs(t["busy_fraction"] - (15 + 2 + 50 + 100) / 1400) < 1e-12
    assert t["gaps"] == [("<5", 1, 3.0), ("20-100", 1, 30.0), (">=1000", 1, 1200.0)]
    assert device_timeline(events[:1])["kernels"] == 0


def test_offload_host_profile_reports_per_step_own_time() -> None:
    import cProfile
    import time

    sys.path.insert(0, str(REPO))
    from benchmarks.offload_bench import host_profile_table

    def wait_for_device() -> None:  # stands in for a routing read blocked on the GPU
        time.sleep(0.01)

    def step() -> None:
        wait_for_device()
        sum(range(1000))

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(4):
        step()
    profiler.disable()
    text = host_profile_table(profiler, steps=4, top=2)
    head, first, second = text.splitlines()
    assert head.startswith("host profile: ") and "over 4 steps" in head
    # time.sleep's own time leads: about 10 ms a step, one call a step
    own, calls = (float(v) for v in first.split()[:2])
    assert "sleep" in first and 9e3 < own < 5e4 and calls == 1.0
    assert float(second.split()[0]) <= own


def test_gpu_speed_sets_kernel_constants(monkeypatch: pytest.MonkeyPatch) -> None:
    """--set MODULE.NAME=INT changes the constant the kernels read at launch; anything else
    (no such module, a non-integer constant, a bad value) stops the run with its name."""
    sys.path.insert(0, str(REPO))
    pytest.importorskip("triton")
    import moeserve.kernels.paged_attention as pa
    from benchmarks.gpu_speed import set_kernel_constants

    monkeypatch.setattr(pa, "SMALL_PARTITION", pa.SMALL_PARTITION)  # restored after the test
    was = pa.SMALL_PARTITION
    assert set_kernel_constants(["paged_attention.SMALL_PARTITION=32"]) == [
        f"set paged_attention.SMALL_PARTITION = 32 (was {was})"
    ]
    assert pa.SMALL_PARTITION == 32
    for bad, why in [
        ("nowhere.X=1", "no module"),
        ("paged_attention.torch=1", "not an integer constant"),
        ("paged_attention.SMALL_PARTITION=big", "not an integer"),
        ("SMALL_PARTITION", "expected MODULE.NAME=INT"),
    ]:
        with pytest.raises(SystemExit, match=why):
            set_kernel_constants([bad])
    assert pa.SMALL_PARTITION == 32
