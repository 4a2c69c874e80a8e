"""lm-evaluation-harness end to end: its `local-completions` model against a moeserve server.

The harness runs as its own CLI (`python -m lm_eval`, the README's command) on local tasks:
a task YAML per output type over a JSONL file written here (`dataset_path: json`, nothing
from the hub), against the packaged demo model served on 127.0.0.1. The harness scores a
multiple-choice answer by the log-likelihood of each choice after the question, which it
reads from /v1/completions with `echo` and `logprobs` (the prompt's log-probs). The test
recomputes every log-likelihood, both accuracies and every greedy answer with transformers
from the same checkpoint, so the figures the harness reports must be the model's own.

Some distractors are the right answer minus its last character: a prefix always has the
higher summed log-likelihood (each token adds a log-prob <= 0), so `acc` is wrong on those
questions while `acc_norm` (divided by the length) need not be: the two figures differ, and
neither can be right by accident.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from moeserve import demo_tasks
from moeserve.assets import demo_model_path
from tests.checkpoints import load_reference
from tests.server_fixture import RunningServer, serving

# Some 25 s: the harness's own imports (datasets, pandas, ...) take most of it.
pytestmark = pytest.mark.slow

MODEL = "demo"
PER_TASK = 4  # questions of each demo task
TOL = 1e-4  # per token, float32 on both sides
MAX_GEN_TOKS = 8

MC_TASK = """\
task: moeserve_demo_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "[INST] {{{{question}}}} [/INST]"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GEN_TASK = """\
task: moeserve_demo_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "[INST] {{{{question}}}} [/INST]"
doc_to_target: answer
target_delimiter: ""
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: {max_gen}
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
"""

ROLLING_TASK = """\
task: moeserve_demo_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "[INST] {{{{question}}}} [/INST]{{{{answer}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""
TASKS = ("moeserve_demo_mc", "moeserve_demo_gen", "moeserve_demo_rolling")


def _distractors(answer: str, i: int) -> list[str]:
    """Three wrong answers of the right kind; every other question gets the right answer
    without its last character (see the module docstring)."""
    if answer.isdigit() and not (len(answer) > 1 and answer[0] == "0"):
        n = int(answer)
        wrong = [str(n + 1), str(n + 10), str(n + 2)]
    else:  # letters (reverse) or a digit string (sort): near-misses of the same length
        swapped = answer[1] + answer[0] + answer[2:]
        wrong = [swapped, answer[::-1], answer[:-1] + ("z" if answer[-1] != "z" else "y")]
    if i % 2 == 0 and len(answer) > 1:
        wrong[0] = answer[:-1]
    # Distinct and never the answer itself (a palindrome reverses to itself).
    out: list[str] = []
    for w in wrong + [answer + "0", answer + "1", answer + "2"]:
        if w != answer and w not in out:
            out.append(w)
    return out[:3]


def _docs() -> list[dict[str, Any]]:
    docs = []
    for task, examples in demo_tasks.held_out().items():
        for i, ex in enumerate(examples[:PER_TASK]):
            choices = [ex.answer, *_distractors(ex.answer, i)]
            # Rotate so the right answer is not always first (argmax ties pick the first).
            k = (len(docs) * 3) % len(choices)
            choices = choices[k:] + choices[:k]
            docs.append(
                {
                    "task": task,
                    "question": ex.question,
                    "answer": ex.answer,
                    "choices": choices,
                    "label": choices.index(ex.answer),
                }
            )
    return docs


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    yield from serving(demo_model_path(), max_model_len=256, served_model_name=MODEL)


def lm_eval_command(base_url: str, tasks: str, out: Path, tokenizer: Path | None) -> list[str]:
    """The README's command line (with the test's paths): 8 prompts a request. Without
    `tokenizer` the harness finds the server's /tokenize and uses it (it then adds no BOS
    token), and sends one prompt a request."""
    args = f"model={MODEL},base_url={base_url}/v1/completions,max_length=256"
    batch = "1"
    if tokenizer is not None:
        args += f",tokenizer={tokenizer},tokenizer_backend=huggingface,add_bos_token=True"
        batch = "8"
    return [
        *(sys.executable, "-m", "lm_eval", "--model", "local-completions"),
        *("--model_args", args, "--batch_size", batch, "--tasks", tasks),
        *("--output_path", str(out), "--log_samples"),
    ]


def run_lm_eval(
    server: RunningServer, root: Path, tasks: tuple[str, ...], tokenizer: Path | None
) -> dict[str, Any]:
    """One lm_eval run of `tasks` over the demo questions: its results and samples."""
    docs = _docs()
    data = root / "demo.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    task_dir = root / "tasks"
    task_dir.mkdir()
    (task_dir / "mc.yaml").write_text(MC_TASK.format(data=data))
    (task_dir / "gen.yaml").write_text(GEN_TASK.format(data=data, max_gen=MAX_GEN_TOKS))
    (task_dir / "rolling.yaml").write_text(ROLLING_TASK.format(data=data))
    out = root / "out"
    cmd = lm_eval_command(server.url, ",".join(tasks), out, tokenizer)
    cmd += ["--include_path", str(task_dir)]
    # Offline: no hub lookups; the datasets cache under the test's directory.
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(root / "hf"),
        "HF_DATASETS_CACHE": str(root / "hf" / "datasets"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    [results_file] = out.rglob("results_*.json")
    samples = {}
    for name in tasks:
        [f] = out.rglob(f"samples_{name}_*.jsonl")
        rows = [json.loads(line) for line in f.read_text().splitlines()]
        samples[name] = sorted(rows, key=lambda r: r["doc_id"])
    return {"docs": docs, "results": json.loads(results_file.read_text()), "samples": samples}


@pytest.fixture(scope="module")
def harness(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The README's run: the model's tokenizer files on the harness's side."""
    return run_lm_eval(server, tmp_path_factory.mktemp("lm_eval"), TASKS, demo_model_path())


@pytest.fixture(scope="module")
def reference() -> Any:
    return load_reference(demo_model_path())


def _encode_pair(
    tok: Any, context: str, continuation: str, bos: bool = True
) -> tuple[list[int], list[int]]:
    """As the harness splits a request: the whole text encoded once, the continuation is
    what follows the context's own encoding (with a BOS token first when `bos`)."""
    whole = tok(context + continuation, add_special_tokens=bos).input_ids
    ctx = tok(context, add_special_tokens=bos).input_ids
    assert whole[: len(ctx)] == ctx
    return ctx, whole[len(ctx) :]


def _scored(model: Any, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """The continuation's summed log-prob after the context, and whether greedy decoding
    would have produced it (the harness's is_greedy)."""
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)[len(ctx) - 1 : -1]
    rows = range(len(cont))
    greedy = all(int(lp[j].argmax()) == t for j, t in zip(rows, cont))
    return sum(float(lp[j, t]) for j, t in zip(rows, cont)), greedy


def _loglikelihood(model: Any, ctx: list[int], cont: list[int]) -> float:
    return _scored(model, ctx, cont)[0]


def _greedy(model: Any, ids: list[int], eos: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(MAX_GEN_TOKS):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
    return out


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=lambda i: (xs[i], -i))  # numpy's: the first of ties


def test_multiple_choice_accuracy_is_the_models(harness: dict[str, Any], reference: Any) -> None:
    check_multiple_choice(harness, reference, bos=True)
    # The prefix distractors (see the module docstring) make the two figures differ.
    res = harness["results"]["results"]["moeserve_demo_mc"]
    assert res["acc,none"] < res["acc_norm,none"]


def test_without_tokenizer_files_the_servers_tokenizer_is_used(
    server: RunningServer, reference: Any, tmp_path: Path
) -> None:
    """No `tokenizer=`: the harness detects /tokenizer_info and /tokenize and tokenizes
    through the server (its remote backend, which never adds a BOS token)."""
    run = run_lm_eval(server, tmp_path, ("moeserve_demo_mc",), None)
    check_multiple_choice(run, reference, bos=False)


def check_multiple_choice(run: dict[str, Any], reference: Any, bos: bool) -> None:
    """Every log-likelihood and is_greedy of the run, and both accuracies, as transformers
    computes them from the same token ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_path())
    docs, samples = run["docs"], run["samples"]["moeserve_demo_mc"]
    assert len(samples) == len(docs)
    acc, acc_norm = [], []
    for doc, sample in zip(docs, samples, strict=True):
        assert sample["doc"]["question"] == doc["question"]
        context = f"[INST] {doc['question']} [/INST]"
        got = [float(r[0][0]) for r in sample["resps"]]
        want, greedy = [], []
        for choice in doc["choices"]:
            ll, is_greedy = _scored(reference, *_encode_pair(tok, context, choice, bos))
            want.append(ll)
            greedy.append(str(is_greedy))
        assert got == pytest.approx(want, abs=TOL * 8), doc
        assert [r[0][1] for r in sample["resps"]] == greedy, doc
        acc.append(_argmax(want) == doc["label"])
        acc_norm.append(_argmax([w / len(c) for w, c in zip(want, doc["choices"])]) == doc["label"])
        assert sample["acc"] == float(acc[-1]) and sample["acc_norm"] == float(acc_norm[-1])
    res = run["results"]["results"]["moeserve_demo_mc"]
    assert res["acc,none"] == pytest.approx(sum(acc) / len(acc))
    assert res["acc_norm,none"] == pytest.approx(sum(acc_norm) / len(acc_norm))


def test_generate_until_answers_are_the_models(harness: dict[str, Any], reference: Any) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_path())
    docs, samples = harness["docs"], harness["samples"]["moeserve_demo_gen"]
    exact = []
    for doc, sample in zip(docs, samples, strict=True):
        ids = tok(f"[INST] {doc['question']} [/INST]", add_special_tokens=True).input_ids
        text = tok.decode(_greedy(reference, ids, tok.eos_token_id), skip_special_tokens=True)
        assert sample["resps"] == [[text]], doc
        exact.append(text == doc["answer"])
        assert sample["exact_match"] == float(exact[-1])
    res = harness["results"]["results"]["moeserve_demo_gen"]
    assert res["exact_match,none"] == pytest.approx(sum(exact) / len(exact))
    assert res["exact_match,none"] > 0.5  # the demo model knows its tasks


def test_rolling_loglikelihood_is_the_models(harness: dict[str, Any], reference: Any) -> None:
    """Perplexity tasks score a whole text after the BOS token (one window: the texts are
    shorter than max_length); the harness's tokens start with the BOS it adds itself."""
    import math

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model_path())
    docs, samples = harness["docs"], harness["samples"]["moeserve_demo_rolling"]
    lls, nbytes = [], []
    for doc, sample in zip(docs, samples, strict=True):
        text = f"[INST] {doc['question']} [/INST]{doc['answer']}"
        ids = tok(text, add_special_tokens=True).input_ids
        want = _loglikelihood(reference, [tok.bos_token_id], ids)
        got = float(sample["resps"][0][0])
        assert got == pytest.approx(want, abs=TOL * len(ids)), doc
        lls.append(want)
        nbytes.append(len(text.encode()))
    res = harness["results"]["results"]["moeserve_demo_rolling"]
    bits = -sum(lls) / sum(nbytes) / math.log(2)
    assert res["bits_per_byte,none"] == pytest.approx(bits, rel=1e-6)
