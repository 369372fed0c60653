"""Plots (matplotlib, PNG) and the one self-contained HTML page they are embedded in.

PNGs go in as ``data:`` URIs so ``report.html`` is a single file that opens anywhere: from a
downloaded SageMaker output, an e-mail or an S3 console, with no folder of images beside it.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dogbreed.output_data import _pyplot, plot_confusion

STATUS_COLOURS = {"IssuesFound": "#c62828", "NoIssuesFound": "#2e7d32", "Error": "#6d4c41",
                  "NotApplicable": "#757575", "NotEnoughData": "#9e9d24", "NoTensors": "#757575"}


def png(fig: Any) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


# --- plots --------------------------------------------------------------------------------------
def epoch_curves(history: Sequence[Mapping[str, Any]]) -> bytes:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for split in ("train", "valid"):
        loss_ax.plot(epochs, [h[f"{split}_loss"] for h in history], marker="o", label=split)
        acc_ax.plot(epochs, [h[f"{split}_accuracy"] for h in history], marker="o", label=split)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss per epoch")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy per epoch", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
        ax.grid(alpha=0.3)
    return png(fig)


def step_losses(series: Mapping[str, Sequence[tuple[int, float]]]) -> bytes:
    """smdebug's saved loss per global step, one line per mode."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for mode, points in series.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if mode == "TRAIN" else "o", label=mode.lower())
    ax.set(xlabel="global step", ylabel="loss", title="Loss per saved step (smdebug tensors)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    return png(fig)


def confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str]) -> bytes:
    buffer = io.BytesIO()
    plot_confusion(matrix, class_names, buffer)
    return buffer.getvalue()


def step_time_breakdown(steps: Sequence[Mapping[str, float]]) -> bytes:
    """Mean data vs compute time per step, per epoch (stacked), and every step's split."""
    plt = _pyplot()
    epochs = sorted({s["epoch"] for s in steps})
    data_ms = [1000 * np.mean([s["data_s"] for s in steps if s["epoch"] == e]) for e in epochs]
    compute_ms = [1000 * np.mean([s["compute_s"] for s in steps if s["epoch"] == e]) for e in epochs]
    fig, (bar_ax, line_ax) = plt.subplots(1, 2, figsize=(10, 3.4),
                                          gridspec_kw={"width_ratios": [1, 2]})
    bar_ax.bar(epochs, data_ms, label="data (index, copy, augment)", color="#f9a825")
    bar_ax.bar(epochs, compute_ms, bottom=data_ms, label="compute (fwd, bwd, step)", color="#1565c0")
    bar_ax.set(xlabel="epoch", ylabel="ms per step", title="Mean step time")
    bar_ax.legend(fontsize=7)
    index = np.arange(len(steps))
    line_ax.stackplot(index, [1000 * s["data_s"] for s in steps],
                      [1000 * s["compute_s"] for s in steps], colors=["#f9a825", "#1565c0"],
                      labels=["data", "compute"])
    line_ax.set(xlabel="training step", ylabel="ms", title="Every step")
    line_ax.legend(fontsize=7)
    for ax in (bar_ax, line_ax):
        ax.grid(alpha=0.3)
    return png(fig)


def device_samples(samples: Sequence[Mapping[str, float]]) -> bytes:
    plt = _pyplot()
    gpu = any("gpu_percent" in s for s in samples)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    t = [s["t"] for s in samples]
    util_ax, mem_ax = axes
    if gpu:
        util_ax.plot(t, [s.get("gpu_percent", np.nan) for s in samples], color="#2e7d32", label="GPU %")
        mem_ax.plot(t, [s.get("gpu_memory_mb", np.nan) for s in samples], color="#2e7d32",
                    label="GPU memory used")
    util_ax.plot(t, [s.get("cpu_percent", np.nan) for s in samples], color="#6a1b9a",
                 label="process CPU % (100 = one core)")
    mem_ax.plot(t, [s.get("rss_mb", np.nan) for s in samples], color="#6a1b9a", label="process RSS")
    util_ax.set(xlabel="seconds", ylabel="%", title="Utilisation")
    mem_ax.set(xlabel="seconds", ylabel="MiB", title="Memory")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return png(fig)


def verdict_chart(verdicts: Sequence[Mapping[str, Any]]) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(verdicts) + 0.8))
    names = [v["rule"] for v in verdicts][::-1]
    colours = [STATUS_COLOURS.get(v["status"], "#999") for v in verdicts][::-1]
    ax.barh(names, [1] * len(names), color=colours)
    for i, v in enumerate(verdicts[::-1]):
        ax.text(0.02, i, v["status"], va="center", color="white", fontweight="bold")
    ax.set_xticks([])
    ax.set_xlim(0, 1)
    ax.set_title("Rule verdicts")
    return png(fig)


def trial_curves(trials: Sequence[Mapping[str, Any]], metric: str) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    for trial in trials:
        values = [v for v in trial.get("intermediate", []) if v is not None]
        if not values:
            continue
        epochs = list(range(1, len(values) + 1))
        pruned = trial["state"] == "PRUNED"
        line, = ax.plot(epochs, values, linestyle="--" if pruned else "-", marker="o",
                        label=f"trial {trial['number']}" + (" (pruned)" if pruned else ""))
        if pruned:
            ax.plot(epochs[-1], values[-1], marker="X", markersize=12, color=line.get_color())
    ax.set(xlabel="epoch", ylabel=metric, title=f"Every trial's {metric} (pruned: dashed, X)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return png(fig)


# --- HTML -----------------------------------------------------------------------------------------
STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #212121; max-width: 1000px; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
td, th { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
.status { color: white; font-weight: bold; padding: 2px 6px; border-radius: 3px; }
img.plot { display: block; max-width: 100%; margin: 8px 0; }
.note { color: #616161; font-size: 12px; }
"""


def esc(value: Any) -> str:
    return html.escape(str(value))


def image(name: str, data: bytes, alt: str) -> str:
    encoded = base64.b64encode(data).decode("ascii")
    return (f'<img class="plot" id="{esc(name)}" alt="{esc(alt)}" '
            f'src="data:image/png;base64,{encoded}">')


def table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None,
          raw_columns: Sequence[int] = ()) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = [str(c) if i in raw_columns else esc(c) for i, c in enumerate(row)]
        out.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def status_badge(status: str) -> str:
    colour = STATUS_COLOURS.get(status, "#999")
    return f'<span class="status" style="background:{colour}">{esc(status)}</span>'


def document(title: str, sections: Sequence[tuple[str, str]]) -> str:
    body = "\n".join(f"<h2>{esc(heading)}</h2>\n{content}" for heading, content in sections)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head>\n"
            f"<body><h1>{esc(title)}</h1>\n{body}\n</body></html>\n")
