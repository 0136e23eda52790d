"""Reports of evaluation results: markdown tables and matplotlib plots.

    print(accuracy_table(results))                  # one table per length, accuracy in %
    plot_accuracy(results, "docs/accuracy.png")     # accuracy vs kept fraction, line per method
    plot_loss("runs/lm_tiny/metrics.jsonl", "runs/lm_tiny/loss.png")

`results` is what `kvjax.eval.runner.sweep` returns (or its JSON file, loaded).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Mapping
from typing import Any


def _rows(results: Mapping[str, Any]) -> dict[int, dict[tuple[str, Any], dict[str, Any]]]:
    """{length: {(method, ratio): {task: cell}}}."""
    out: dict[int, dict[tuple[str, Any], dict[str, Any]]] = defaultdict(lambda: defaultdict(dict))
    for cell in results["cells"].values():
        out[cell["length"]][(cell["method"], cell["ratio"])][cell["task"]] = cell
    return out


def _order(key: tuple[str, Any]) -> tuple:
    method, ratio = key
    return (method not in ("full", "identity"), method, -1.0 if ratio is None else ratio)


def summary(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (length, method, ratio): kept fraction, per-task and average accuracy."""
    rows = []
    for length, by_method in sorted(_rows(results).items()):
        for key in sorted(by_method, key=_order):
            cells = by_method[key]
            scores = {t: c["score"] for t, c in cells.items()}
            rows.append({"length": length, "method": key[0], "ratio": key[1],
                         "kept_fraction": next(iter(cells.values()))["kept_fraction"],
                         "scores": scores, "average": sum(scores.values()) / len(scores)})
    return rows


def accuracy_table(results: Mapping[str, Any]) -> str:
    """Markdown: per length, rows (method, ratio, kept), columns tasks + average, in %."""
    lines: list[str] = []
    by_length: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for row in summary(results):
        by_length[row["length"]].append(row)
    for length, rows in by_length.items():
        tasks = sorted({t for r in rows for t in r["scores"]})
        lines.append(f"Length {length} tokens (accuracy %, n = "
                     f"{next(iter(results['cells'].values()))['n']} per task)")
        lines.append("")
        lines.append("| method | ratio | kept | " + " | ".join(tasks) + " | avg |")
        lines.append("|---|---:|---:|" + "---:|" * (len(tasks) + 1))
        for r in rows:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:g}"
            vals = [f"{100 * r['scores'][t]:.1f}" if t in r["scores"] else "" for t in tasks]
            lines.append(f"| {r['method']} | {ratio} | {r['kept_fraction']:.2f} | "
                         + " | ".join(vals) + f" | {100 * r['average']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def plot_accuracy(results: Mapping[str, Any], path: str, title: str | None = None) -> str:
    """Average accuracy vs kept fraction (measured cache bytes), one line per method and a
    subplot per length. Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(results)
    lengths = sorted({r["length"] for r in rows})
    n_methods = len({r["method"] for r in rows})
    height = max(4.5, 0.19 * n_methods + 0.8)  # room for a legend entry per method
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths) + 3.5, height),
                             squeeze=False)
    x_max = max([1.0] + [r["kept_fraction"] for r in rows]) * 1.05
    styles = [(m, ls) for ls in ("-", "--", ":") for m in "osD^v<>"]
    for ax, length in zip(axes[0], lengths):
        lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for r in rows:
            if r["length"] == length:
                lines[r["method"]].append((r["kept_fraction"], 100 * r["average"]))
        for i, (method, pts) in enumerate(sorted(lines.items())):
            pts.sort()
            xs, ys = zip(*pts)
            if method in ("full", "identity"):
                ax.axhline(ys[0], color="black", linestyle="--", label=f"{method} cache")
            else:
                marker, style = styles[i % len(styles)]
                ax.plot(xs, ys, marker=marker, linestyle=style, label=method)
        ax.set_xlabel("kept fraction of cache bytes")
        ax.set_ylabel("accuracy (%)")
        ax.set_xlim(0, x_max)
        ax.set_ylim(0, 102)
        ax.grid(alpha=0.3)
        ax.set_title(title or f"{length} tokens")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss(metrics_jsonl: str, path: str) -> str:
    """Training loss (and target-token accuracy when logged) vs step. Returns `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_jsonl) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("weighted cross-entropy")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if rows and "target_token_acc" in rows[0]:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in rows], [r["target_token_acc"] for r in rows], color="C1",
                 label="answer-token accuracy")
        ax2.set_ylabel("answer-token accuracy")
        ax2.set_ylim(0, 1)
        ax2.legend(loc="center right", fontsize=8)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
