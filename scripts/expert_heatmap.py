"""Draw the demo model's expert load per task: one panel per task, layers x experts.

Runs each task's held-out questions (moeserve/demo_tasks.py) through the chat template and the
moeserve engine, one task at a time, and reads the tokens routed to each expert
(`Engine.expert_token_counts()`, the numbers behind moeserve_expert_tokens_total) before and
after. Each cell is the share of the layer's token assignments that went to that expert
(rows sum to 1; uniform would be 1/8 = 12.5%). Prints the total-variation distance between
every pair of tasks' per-layer distributions, and between the two halves of each task's
questions (the noise floor of the measurement), and writes the PNG for the README:

    python scripts/expert_heatmap.py --out docs/expert_load.png
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

from moeserve import LLM, SamplingParams, demo_tasks
from moeserve.assets import demo_model_path


def expert_loads(model: Path, per_task: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Task -> the [sparse layers, E] share of each layer's assignments per expert, for the
    first and the second half of its `per_task` held-out questions (measured separately, so
    their difference shows the measurement's own noise). Prompt and generated tokens both
    count, as in the server's metrics."""
    llm = LLM(model, device="cpu", progress=False, max_num_seqs=64)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    loads: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for task, examples in demo_tasks.held_out().items():
        ids = [
            llm.tokenizer.encode(
                llm.tokenizer.apply_chat_template([{"role": "user", "content": ex.question}]),
                add_special_tokens=False,
            )
            for ex in examples[:per_task]
        ]
        halves = []
        for part in (ids[: per_task // 2], ids[per_task // 2 :]):
            before = llm.engine.expert_token_counts().double()
            llm.generate(part, params)
            halves.append(llm.engine.expert_token_counts().double() - before)
        loads[task] = (
            halves[0] / halves[0].sum(-1, keepdim=True),
            halves[1] / halves[1].sum(-1, keepdim=True),
        )
    return loads


def tv_distance(p_LE: torch.Tensor, q_LE: torch.Tensor) -> torch.Tensor:
    """Per-layer total-variation distance 0.5 * sum_e |p - q| (0 = same load, 1 = disjoint)."""
    return 0.5 * (p_LE - q_LE).abs().sum(-1)


def draw(loads: dict[str, torch.Tensor], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    tasks = list(loads)
    layers, experts = next(iter(loads.values())).shape
    fig, axes = plt.subplots(
        1,
        len(tasks),
        figsize=(2.6 * len(tasks) + 1, 0.55 * layers + 1.6),
        sharey=True,
        constrained_layout=True,
    )
    vmax = max(v.max().item() for v in loads.values())
    for ax, task in zip(axes, tasks):
        im = ax.imshow(
            loads[task].numpy() * 100, cmap="viridis", vmin=0, vmax=vmax * 100, aspect="auto"
        )
        ax.set_title(task)
        ax.set_xticks(range(experts))
        ax.set_xlabel("expert")
        ax.set_yticks(range(layers))
        for i in range(layers):
            for j in range(experts):
                v = loads[task][i, j].item() * 100
                ax.text(
                    j,
                    i,
                    f"{v:.0f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if v < vmax * 60 else "black",
                )
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=axes, label="% of the layer's token assignments", shrink=0.9)
    fig.suptitle("demo-moe: expert load per task (held-out prompts, greedy answers)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def _report(label: str, tv_L: torch.Tensor) -> None:
    print(
        f"  {label:<18} "
        + " ".join(f"{x:.3f}" for x in tv_L.tolist())
        + f"   max {tv_L.max().item():.3f}"
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=None, help="default: the packaged demo model")
    p.add_argument("--per-task", type=int, default=demo_tasks.HELD_OUT_PER_TASK)
    p.add_argument("--out", type=Path, default=Path("docs/expert_load.png"))
    args = p.parse_args()
    torch.set_num_threads(2)
    halves = expert_loads(args.model or demo_model_path(), args.per_task)
    loads = {task: (a + b) / 2 for task, (a, b) in halves.items()}
    print("total-variation distance between expert-load distributions, per layer:")
    for a, b in itertools.combinations(loads, 2):
        _report(f"{a} vs {b}", tv_distance(loads[a], loads[b]))
    for task, (first, second) in halves.items():
        _report(f"{task} halves", tv_distance(first, second))  # the noise floor
    draw(loads, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
