"""`moeserve generate --chat`, the defaults --help shows, and a CPU run that never loads Triton."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moeserve.assets import demo_model_path
from moeserve.cli import build_parser, main
from moeserve.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _option_help(text: str, flag: str) -> str:
    """The help of `flag` in an argparse --help text, on one line."""
    blocks = re.split(r"\n(?=  -)", text)
    [block] = [b for b in blocks if re.match(rf"  {flag}(\s|,|$)", b)]
    return " ".join(block.split())


def test_generate_chat_answers_the_demo_task(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--chat", "--prompt", "47+85", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == "132"
    # The prompt is the template's rendering, tokenised without a second BOS.
    argv = ["generate", "--chat", "--prompt", "47+85", "--device", "cpu", "--json"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    tok = Tokenizer.from_dir(demo_model_path())
    text = tok.apply_chat_template([{"role": "user", "content": "47+85"}])
    assert record["prompt_ids"] == tok.encode(text, add_special_tokens=False)
    assert record["prompt_ids"].count(tok.bos_token_id) == 1
    assert record["text"] == "132"


def test_generate_help_says_what_prompt_and_chat_do(capsys: pytest.CaptureFixture[str]) -> None:
    text = _help(["generate"], capsys)
    prompt, chat = _option_help(text, "--prompt"), _option_help(text, "--chat")
    assert "raw text" in prompt and "no chat template" in prompt and "--chat" in prompt
    assert "chat template" in chat and "demo model" in chat
    seed, sample_seed = _option_help(text, "--seed"), _option_help(text, "--sample-seed")
    assert "without a seed of its own" in seed
    assert "this request" in sample_seed and "--seed" in sample_seed


def test_chat_without_a_template_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Tokenizer files only: the missing template is reported before any weights would load.
    shutil.copy(demo_model_path() / "tokenizer.json", tmp_path)
    cfg = json.loads((demo_model_path() / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    argv = ["generate", "--model", str(tmp_path), "--chat", "--prompt", "1+2", "--device", "cpu"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "chat template" in err and str(tmp_path) in err and "without --chat" in err
    (tmp_path / "tokenizer.json").unlink()
    assert main(argv) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    assert main(["generate", "--chat", "--prompt-ids", "1,2"]) == 2  # a message is text
    assert "--prompt-ids" in capsys.readouterr().err


def test_help_shows_every_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in [v for v in os.environ if v.startswith("MOESERVE_")]:
        monkeypatch.delenv(var)
    serve = _help(["serve"], capsys)
    want = {
        "--port": "default: 8000; env MOESERVE_PORT",
        "--host": "default: 127.0.0.1;",
        "--max-queued-requests": "default: 256;",
        "--max-body-bytes": "default: 2000000",
        "--shutdown-timeout": "default: 30.0;",
        "--log-prompts": "default: off;",
        "--device": "default: cuda when available;",
    }
    for flag, default in want.items():
        assert default in _option_help(serve, flag), flag
    for argv in (["serve"], ["generate"]):
        text = _help(argv, capsys)
        flags = re.findall(r"^  (--[a-z-]+)", text, flags=re.M)
        assert len(flags) > 20
        for flag in flags:
            if flag not in ("--help", "--prompt", "--prompt-ids"):  # those two: one is required
                assert "default: " in _option_help(text, flag), (argv, flag)
    # A default from the environment says so; a secret one is not shown.
    monkeypatch.setenv("MOESERVE_PORT", "9001")
    monkeypatch.setenv("MOESERVE_PREFETCH", "yes")
    monkeypatch.setenv("MOESERVE_API_KEY", "s3cr%t")
    serve = _help(["serve"], capsys)
    assert "default: 9001, from MOESERVE_PORT; without it 8000" in _option_help(serve, "--port")
    assert "default: on, from MOESERVE_PREFETCH; without it off" in _option_help(
        serve, "--prefetch"
    )
    assert "s3cr" not in serve and "from MOESERVE_API_KEY" in _option_help(serve, "--api-key")


_CPU_RUN = textwrap.dedent("""
    import json, sys
    import moeserve.server.app  # the server's imports as well
    from moeserve.cli import main
    from moeserve.runtime import freeze_startup_heap

    # Prompt chunks of 4 tokens: later chunks attend to earlier ones (the lower-right mask).
    rc = main(["generate", "--chat", "--prompt", "47+85", "--max-tokens", "4", "--device",
               "cpu", "--max-num-seqs", "1", "--max-num-batched-tokens", "4"])
    # As the server's processes do: whatever Triton leaves alive is reported at exit.
    freeze_startup_heap("test")
    print(json.dumps({"rc": rc, "triton": "triton" in sys.modules}))
""")


def test_a_cpu_run_does_not_import_triton() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOESERVE_", "TRITON_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", _CPU_RUN],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.strip().splitlines()
    assert out[0] == "132"
    assert json.loads(out[-1]) == {"rc": 0, "triton": False}
    assert "nanobind" not in proc.stderr, proc.stderr[-2000:]
