"""PNG plots of a load-test run: latency distributions, throughput over time, expert load.

matplotlib is optional (the `bench` extra); it is imported only when plots are asked for, and
with the Agg backend, so no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeserve.bench.records import RequestResult


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "plots need matplotlib: pip install 'moeserve[bench]' (or leave out --plot-dir)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _latency_plot(plt: Any, rep: dict[str, Any], results: list[RequestResult], path: Path) -> None:
    ok = [r for r in results if r.success]
    series = {
        "ttft": ("Time to first token", [r.ttft * 1e3 for r in ok if r.ttft is not None]),
        "tpot": ("Time per output token", [r.tpot * 1e3 for r in ok if r.tpot is not None]),
        "itl": ("Inter-token latency", [x * 1e3 for r in ok for x in r.itl]),
        "e2el": ("End-to-end latency", [r.latency * 1e3 for r in ok if r.latency is not None]),
    }
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, (title, values)) in zip(axes.flat, series.items()):
        ax.set_title(title)
        ax.set_xlabel("ms")
        if not values:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(values, bins=min(50, max(5, len(values) // 4)), color="#4c72b0")
        stats = rep[f"{key}_ms"]
        for stat, style in (("median", "-"), ("p90", "--"), ("p99", ":")):
            ax.axvline(
                stats[stat], color="#c44e52", linestyle=style, label=f"{stat} {stats[stat]:.1f} ms"
            )
        ax.legend(fontsize=8)
    fig.suptitle(f"{rep['model']} - {rep['workload']}: {rep['completed']} requests")
    _save(plt, fig, path)


def _throughput_plot(plt: Any, rep: dict[str, Any], path: Path) -> None:
    tl = rep["timeline"]
    n = len(tl["in_flight"])
    edges = [min(i * tl["bin_s"], rep["duration_s"]) for i in range(n + 1)]
    panels = (
        ("output_tokens_per_s", "output tokens/s", "#4c72b0"),
        ("completed_per_s", "completed requests/s", "#dd8452"),
        ("in_flight", "requests in flight (mean)", "#55a868"),
    )
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 7), sharex=True)
    for ax, (key, label, color) in zip(axes, panels):
        # stairs(): one flat step per bin, the last (maybe partial) one included.
        ax.stairs(tl[key], edges, color=color, fill=True, alpha=0.8)
        ax.set_ylabel(label)
    axes[-1].set_xlabel(f"seconds since start ({tl['bin_s']:g} s bins)")
    fig.suptitle(f"Throughput over time: {rep['model']} - {rep['workload']}")
    _save(plt, fig, path)


def _expert_plot(plt: Any, load: dict[str, Any], path: Path) -> None:
    rows = load["tokens"]
    share = [[x / sum(row) if sum(row) else 0.0 for x in row] for row in rows]
    fig, ax = plt.subplots(
        figsize=(max(6, 0.35 * load["num_experts"] + 3), max(3, 0.35 * len(rows) + 2))
    )
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(load["layers"])), [str(x) for x in load["layers"]])
    fig.colorbar(im, ax=ax, label="share of the layer's tokens in this run")
    ax.set_title(
        f"Expert load (imbalance max/mean: mean {load['imbalance_mean'] or 0:.2f}, "
        f"worst {load['imbalance_max'] or 0:.2f})"
    )
    _save(plt, fig, path)


def write_plots(rep: dict[str, Any], results: list[RequestResult], out_dir: Path) -> list[Path]:
    """Write latency.png, throughput.png and (for moeserve) expert_load.png; their paths."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "latency.png", out_dir / "throughput.png"]
    _latency_plot(plt, rep, results, written[0])
    _throughput_plot(plt, rep, written[1])
    load = rep["server"].get("expert_load")
    if load:
        written.append(out_dir / "expert_load.png")
        _expert_plot(plt, load, written[-1])
    return written
