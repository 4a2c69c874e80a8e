"""Cost of structured outputs per engine step: llguidance's token mask on the host, and the
mask applied to the logits (moeserve.engine.sampler.apply_grammar) on the device.

Vocabularies: the packaged demo model's (45 word-level tokens) and a byte-level BPE of about
150k tokens (Qwen's size) trained here on the Python sources of the installed packages (no
download; trained once, about a minute, then cached under --cache). For each grammar the
script walks the tokens of a valid document and times the mask of every step: one row through
`Grammars.mask` (what the engine calls), and --batch rows at once (llguidance's thread pool).

    python benchmarks/grammar_mask.py --json grammar_mask.json
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeserve.assets import demo_model_path  # noqa: E402
from moeserve.engine.sampler import apply_grammar  # noqa: E402
from moeserve.engine.structured import Grammars  # noqa: E402
from moeserve.sampling_params import StructuredOutput  # noqa: E402
from moeserve.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string", "pattern": "^[a-z.]+@[a-z]+\\.com$"},
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city"],
        },
    },
    "required": ["name", "age", "tags"],
}
DOC = {
    "name": "Ada Lovelace, Countess of Lovelace",
    "age": 36,
    "email": "ada.lovelace@example.com",
    "tags": ["admin", "user"],
    "address": {"city": "London", "zip": "W1J 7NT"},
}
CASES = {  # name -> (constraint, a document it accepts)
    "json_schema": (
        StructuredOutput("json_schema", json.dumps(SCHEMA)),
        json.dumps(DOC, separators=(", ", ": ")),
    ),
    "json_object": (StructuredOutput("json_object"), json.dumps(DOC, separators=(", ", ": "))),
    "regex": (StructuredOutput("regex", "[a-z]+( [a-z]+)* [0-9]{2,4}"), "the answer is 42"),
}


def train_bpe(path: Path, vocab: int, corpus_bytes: float) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    files = sorted(glob.glob(sysconfig.get_paths()["purelib"] + "/**/*.py", recursive=True))

    def texts() -> Any:
        total = 0
        for f in files:
            try:
                text = Path(f).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            total += len(text)
            yield text
            if total > corpus_bytes:
                return

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=2,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))


def time_case(grammars: Grammars, so: StructuredOutput, doc: str, batch: int) -> dict[str, Any]:
    tok = grammars.tokenizer
    ids = tok.tokenize_str(doc)
    one, many = [], []
    seq = grammars.matcher(so)
    rows = [grammars.matcher(so) for _ in range(batch)]
    for t in ids:
        t0 = time.perf_counter()
        grammars.mask([(0, seq)], pin=False)
        one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        grammars.mask(list(enumerate(rows)), pin=False)
        many.append(time.perf_counter() - t0)
        ended = seq.ends_after(t)
        if ended and t != ids[-1]:
            raise AssertionError(f"the grammar ended before the document: {doc!r}")
        for r in rows:
            r.ends_after(t)
    one.sort()
    return {
        "steps": len(ids),
        "one_row_us_median": 1e6 * statistics.median(one),
        "one_row_us_p99": 1e6 * one[min(len(one) - 1, int(0.99 * len(one)))],
        "batch_us_median": 1e6 * statistics.median(many),
        "batch": batch,
    }


def apply_cost(vocab: int, rows: int, device: str) -> float:
    """Median µs of apply_grammar on `rows` of 64 logits rows (bf16 on CUDA)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    logits = torch.randn(64, vocab, device=device, dtype=dtype)
    from moeserve.engine.sampler import GrammarMask

    bits = torch.randint(-(2**31), 2**31 - 1, (rows, (vocab + 31) // 32), dtype=torch.int32)
    mask = GrammarMask(list(range(rows)), bits.pin_memory() if device == "cuda" else bits)
    times = []
    for _ in range(30):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        apply_grammar(logits, mask)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times[5:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=150_000, help="size of the trained BPE")
    ap.add_argument("--corpus-mb", type=float, default=150.0, help="training text, MB")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/moeserve-bpe"))
    ap.add_argument("--batch", type=int, default=16, help="rows of the batched mask")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()

    bpe = args.cache / f"bpe{args.vocab}"
    if not (bpe / "tokenizer.json").is_file():
        print(f"training a {args.vocab}-token BPE into {bpe} ...", flush=True)
        train_bpe(bpe, args.vocab, args.corpus_mb * 1e6)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, Any] = {"device": device, "batch": args.batch, "vocabularies": {}}
    for label, path in (("demo (45)", demo_model_path()), (f"bpe ({args.vocab})", bpe)):
        tokenizer = Tokenizer.from_dir(path)
        t0 = time.perf_counter()
        grammars = Grammars(tokenizer, tokenizer.vocab_size, [tokenizer.eos_token_id or 0])
        vocab = grammars.tokenizer.vocab_size  # waits for the build
        entry: dict[str, Any] = {"tokenizer_build_s": time.perf_counter() - t0, "cases": {}}
        for name, (so, doc) in CASES.items():
            if label.startswith("demo") and name != "regex":
                continue  # the demo vocabulary has no braces or quotes
            t0 = time.perf_counter()
            grammars.matcher(so)
            compile_ms = 1e3 * (time.perf_counter() - t0)
            entry["cases"][name] = {
                "compile_ms": compile_ms,
                **time_case(grammars, so, doc, args.batch),
            }
        entry["apply_us_1_of_64_rows"] = apply_cost(vocab, 1, device)
        entry["apply_us_64_of_64_rows"] = apply_cost(vocab, 64, device)
        results["vocabularies"][label] = entry

    print(f"device: {device}; mask = llguidance on the host, apply = sampler on {device}")
    print(
        f"{'vocabulary':<14}{'grammar':<13}{'compile ms':>11}{'steps':>7}"
        f"{'1 row µs (p50/p99)':>22}{f'{args.batch} rows µs':>12}"
    )
    for label, entry in results["vocabularies"].items():
        for name, c in entry["cases"].items():
            print(
                f"{label:<14}{name:<13}{c['compile_ms']:>11.1f}{c['steps']:>7}"
                f"{c['one_row_us_median']:>13.0f} / {c['one_row_us_p99']:<7.0f}"
                f"{c['batch_us_median']:>12.0f}"
            )
        print(
            f"{label:<14}tokenizer build {entry['tokenizer_build_s']:.2f} s; apply to 1 / 64 "
            f"of 64 rows: {entry['apply_us_1_of_64_rows']:.0f} / "
            f"{entry['apply_us_64_of_64_rows']:.0f} µs"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
