"""`moeserve serve | generate | bench serve | bench throughput`: the command line.

Every serve/generate option can also come from the environment as MOESERVE_<OPTION> (dashes
as underscores, e.g. MOESERVE_MAX_NUM_SEQS=32); a flag on the command line wins. The load
tester's flags live in moeserve/bench/cli.py; `bench throughput` takes the engine's flags too.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from moeserve.assets import model_or_demo
from moeserve.bench.cli import add_bench_parser
from moeserve.cli_options import EnvDefaults, add_engine_args, add_serve_args, engine_config

__all__ = ["build_parser", "engine_config", "main"]


def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--prompt-ids must be comma-separated ints: {e}") from e
    return ids


def _chat_prompt_ids(model: str, text: str) -> list[int]:
    """`text` as one user message, rendered with the model's chat template and tokenised
    without adding special tokens again (the template writes BOS), as /v1/chat/completions
    does. Only the tokenizer loads: a model without a template fails before its weights do."""
    from moeserve.tokenizer import Tokenizer

    if not (Path(model) / "tokenizer.json").is_file():
        raise ValueError(f"--chat needs a chat template: {model} has no tokenizer.json")
    tokenizer = Tokenizer.from_dir(model)
    if tokenizer.chat_template is None:
        raise ValueError(
            f"--chat needs a chat template and {model} has none; without --chat, "
            "--prompt is completed as raw text"
        )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True
    )
    ids = tokenizer.encode(rendered, add_special_tokens=False)
    if not ids:
        raise ValueError("the chat template rendered an empty prompt")
    return ids


def _generate(args: argparse.Namespace) -> int:
    from moeserve import LLM, SamplingParams

    model = model_or_demo(args.model)
    prompt: str | list[int] = args.prompt if args.prompt is not None else args.prompt_ids
    if args.chat:
        if args.prompt is None:
            raise ValueError("--chat sends --prompt as a chat message; it takes no --prompt-ids")
        prompt = _chat_prompt_ids(model, args.prompt)
    llm = LLM(config=engine_config(args), progress=not args.json)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.sample_seed,
        logprobs=5 if args.json else None,
        ignore_eos=args.ignore_eos,
    )
    [out] = llm.generate([prompt], params)
    result = out.outputs[0]
    if not args.json:
        print(result.text)
        return 0
    record = {
        "prompt_ids": out.prompt_token_ids,
        "generated_ids": result.token_ids,
        "text": result.text,
        "finish_reason": result.finish_reason,
        "top_logprobs": [{str(t): lp for t, lp in entry.top} for entry in result.logprobs or []],
    }
    print(json.dumps(record))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from moeserve.server.serve import run

    return run(args, engine_config(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moeserve", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-level",
        default=os.environ.get("MOESERVE_LOG_LEVEL"),
        help="default: INFO for serve, WARNING otherwise; env MOESERVE_LOG_LEVEL",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=EnvDefaults)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible HTTP server")
    assert isinstance(serve, EnvDefaults)
    add_engine_args(serve)
    add_serve_args(serve)
    serve.set_defaults(func=_serve, default_log_level="INFO")
    gen = sub.add_parser(
        "generate",
        help="complete one prompt and print the result",
        description="Complete one prompt and print the result. --prompt is raw text "
        "completion; --chat sends it as a chat message, as chat models (the demo model too) "
        "expect.",
    )
    assert isinstance(gen, EnvDefaults)
    add_engine_args(gen)
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--prompt",
        help="prompt text, completed as raw text (the tokenizer adds BOS; no chat template): "
        "for a chat or instruction model add --chat",
    )
    src.add_argument("--prompt-ids", type=_prompt_ids, help="prompt token ids, e.g. 1,2,3")
    gen.add_argument(
        "--chat",
        action="store_true",
        help="send --prompt as one user chat message rendered with the model's chat "
        "template, as /v1/chat/completions does; the demo model answers its tasks "
        "(47+85, reverse kqzd, ...) only this way (default: off)",
    )
    gen.add_option("--max-tokens", type=int, default=32, help="tokens to generate at most")
    gen.add_option("--temperature", type=float, default=0.0, help="0 for greedy")
    gen.add_option("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    gen.add_option(
        "--sample-seed",
        type=int,
        default_text="unseeded: drawn from --seed's generator",
        help="seed of this request alone (SamplingParams.seed, the API's `seed`): the same "
        "seed, prompt and options sample the same tokens; --seed then plays no part",
    )
    gen.add_option("--ignore-eos", action="store_true", default=False, help="do not stop at EOS")
    gen.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with ids, text and top-5 logprobs per position (default: off)",
    )
    gen.set_defaults(func=_generate, default_log_level="WARNING")
    add_bench_parser(sub, engine_args=add_engine_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = (args.log_level or args.default_log_level).upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as e:  # bad checkpoint, bad option, bad prompt: a message, not a trace
        print(f"moeserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
