"""`megalong plot RUN_DIR [RUN_DIR ...] -o out.png`: one figure of one or several runs side by side
(one colour per run): training and held-out loss, learning rate, tokens/s and MFU, gradient norm,
each MoE run's expert load per layer as a heatmap, perplexity and passkey accuracy against
evaluation length (held-out loss of each dataset dotted beside the blended one). A
panel is drawn when some run has its data. matplotlib is imported only here, when a plot is made."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from megalong.plots.runs import PlotError, RunMetrics, read_run, run_labels

COLUMNS = 3
PER_DATASET = re.compile(r"valid/[^/]+/loss")  # megalong/train/run_log.py's per-dataset held-out loss


def _loss(ax: Any, runs: list[RunMetrics], labels: list[str], colors: list[Any]) -> None:
    for run, label, color in zip(runs, labels, colors):
        ax.plot(*run.points("train/loss"), color=color, label=f"{label} train")
        steps, values = run.points("valid/loss")
        if steps:
            ax.plot(steps, values, "o--", color=color, label=f"{label} held-out")
        for key in sorted(k for k in run.series if PER_DATASET.fullmatch(k)):
            ax.plot(*run.points(key), ".:", color=color, label=f"{label} {key.split('/')[1]}")
    ax.set(title="loss", xlabel="step", ylabel="loss (nats/token)")


def _lr(ax: Any, runs: list[RunMetrics], labels: list[str], colors: list[Any]) -> None:
    for run, label, color in zip(runs, labels, colors):
        ax.plot(*run.points("train/lr"), color=color, label=label)
    ax.set(title="learning rate", xlabel="step", ylabel="lr")


def _throughput(ax: Any, runs: list[RunMetrics], labels: list[str], colors: list[Any]) -> None:
    mfu = ax.twinx()
    for run, label, color in zip(runs, labels, colors):
        ax.plot(*run.points("perf/tokens_per_s"), color=color, label=f"{label} tokens/s")
        steps, values = run.points("perf/mfu")
        mfu.plot(steps, [100 * v for v in values], ":", color=color, label=f"{label} MFU")
    ax.set(title="tokens/s (solid) and MFU (dotted)", xlabel="step", ylabel="tokens/s")
    mfu.set_ylabel("MFU %")


def _grad_norm(ax: Any, runs: list[RunMetrics], labels: list[str], colors: list[Any]) -> None:
    for run, label, color in zip(runs, labels, colors):
        ax.plot(*run.points("train/grad_norm"), color=color, label=label)
    ax.set(title="gradient norm (before clipping)", xlabel="step", ylabel="norm")


def _perplexity(ax: Any, runs: list[RunMetrics], labels: list[str], colors: list[Any]) -> None:
    for run, label, color in zip(runs, labels, colors):
        if run.perplexity_by_length:
            lengths, values = zip(*run.perplexity_by_length)
            ax.plot(lengths, values, "o-", color=color, label=label)
    ax.set(title="held-out perplexity by length", xlabel="evaluation length (tokens)",
           ylabel="perplexity", xscale="log")


def _passkey(ax: Any, runs: list[RunMetrics], labels: list[str], colors: list[Any]) -> None:
    styles = ["o-", "s--", "^:", "d-."]
    for run, label, color in zip(runs, labels, colors):
        for i, (depth, points) in enumerate(sorted(run.passkey_by_length.items(), key=lambda kv: float(kv[0]))):
            lengths, values = zip(*points)
            ax.plot(lengths, [100 * v for v in values], styles[i % len(styles)], color=color,
                    label=f"{label} key at {depth}")
    ax.set(title="passkey retrieval by length", xlabel="evaluation length (tokens)",
           ylabel="accuracy %", xscale="log", ylim=(-5, 105))


LinePanel = Callable[[Any, list[RunMetrics], list[str], list[Any]], None]
# panel name -> (whether a run has its data, how to draw it)
LINE_PANELS: dict[str, tuple[Callable[[RunMetrics], bool], LinePanel]] = {
    "loss": (lambda r: "train/loss" in r.series or "valid/loss" in r.series, _loss),
    "lr": (lambda r: "train/lr" in r.series, _lr),
    "throughput": (lambda r: "perf/tokens_per_s" in r.series, _throughput),
    "grad_norm": (lambda r: "train/grad_norm" in r.series, _grad_norm),
    "perplexity_vs_length": (lambda r: bool(r.perplexity_by_length), _perplexity),
    "passkey_vs_length": (lambda r: bool(r.passkey_by_length), _passkey),
}


def _heatmap(fig: Any, ax: Any, run: RunMetrics, label: str) -> None:
    from matplotlib.ticker import MaxNLocator

    layers, shares = run.expert_load()
    image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=f"{label}: expert load (mean share)", xlabel="expert", ylabel="layer",
           yticks=range(len(layers)), yticklabels=[str(layer) for layer in layers])
    fig.colorbar(image, ax=ax)


def plot_runs(run_dirs: list[str | Path], out: str | Path, dpi: int = 80) -> list[str]:
    """Draw the runs' figure into `out` (PNG, or any format matplotlib writes by its suffix);
    returns the names of the panels drawn, in order (`moe_load:<run>` per MoE run)."""
    if not run_dirs:
        raise PlotError("no run directory given")
    runs = [read_run(d) for d in run_dirs]
    labels = run_labels([r.path for r in runs])
    lines = [name for name, (has, _) in LINE_PANELS.items() if any(has(r) for r in runs)]
    heatmaps = [(r, label) for r, label in zip(runs, labels) if r.expert_load()[0]]
    panels = lines + [f"moe_load:{label}" for _, label in heatmaps]
    if not panels:
        raise PlotError(f"{', '.join(str(r.path) for r in runs)}: no metrics to plot in metrics.jsonl")

    try:
        import matplotlib
    except ImportError:
        raise PlotError("megalong plot needs matplotlib (pip install matplotlib, or "
                        "pip install -e '.[plot]')") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = -(-len(panels) // COLUMNS)
    fig, axes = plt.subplots(rows, COLUMNS, figsize=(5.5 * COLUMNS, 3.8 * rows), squeeze=False)
    flat = list(axes.flat)
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(runs))]
    from matplotlib.ticker import MaxNLocator

    for ax, name in zip(flat, lines):
        LINE_PANELS[name][1](ax, runs, labels, colors)
        if not name.endswith("_vs_length"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    for ax, (run, label) in zip(flat[len(lines):], heatmaps):
        _heatmap(fig, ax, run, label)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return panels
