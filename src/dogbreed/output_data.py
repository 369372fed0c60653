"""Reports written to /opt/ml/output/data: metrics.json, training curves, confusion matrix."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dogbreed.artifacts import breed_name

METRICS_FILE = "metrics.json"
CURVES_FILE = "training_curves.png"
CONFUSION_FILE = "confusion_matrix.png"
PER_CLASS_FILE = "per_class_test_accuracy.json"


def classification_report(labels: torch.Tensor, predictions: torch.Tensor,
                          class_names: Sequence[str]) -> dict[str, Any]:
    n = len(class_names)
    matrix = torch.zeros(n, n, dtype=torch.int64)
    matrix.index_put_((labels.long(), predictions.long()), torch.ones_like(labels, dtype=torch.int64),
                      accumulate=True)
    support = matrix.sum(1)
    per_class = {
        name: {"accuracy": (matrix[i, i].item() / support[i].item()) if support[i] else None,
               "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    return {"confusion_matrix": matrix.tolist(), "per_class": per_class}


def _pyplot():
    # Optional (not in the serve extra) and slow to import; pyplot only after choosing Agg.
    import matplotlib

    matplotlib.use("Agg")  # headless: containers and CI have no display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[dict[str, Any]], path: Path) -> None:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    loss_ax.plot(epochs, [h["valid_loss"] for h in history], marker="o", label="valid")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    acc_ax.plot(epochs, [h["train_accuracy"] for h in history], marker="o", label="train")
    acc_ax.plot(epochs, [h["valid_accuracy"] for h in history], marker="o", label="valid")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0, 1))
    for ax in (loss_ax, acc_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path) -> None:
    plt = _pyplot()
    n = len(class_names)
    size = min(4 + n * 0.35, 40)  # 133 breeds stay legible without a gigantic file
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(matrix, cmap="Blues")
    labels = [breed_name(c) for c in class_names]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title="Test confusion matrix")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i][j]), ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(output_dir: Path, history: Sequence[dict[str, Any]], metrics: dict[str, Any],
                  test_report: dict[str, Any] | None, class_names: Sequence[str]) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    written = [output_dir / METRICS_FILE, output_dir / CURVES_FILE]
    summary = {"metrics": metrics, "history": list(history), "class_names": list(class_names)}
    if test_report is not None:
        summary["per_class_test_accuracy"] = test_report["per_class"]
        summary["test_confusion_matrix"] = test_report["confusion_matrix"]  # for `dogbreed report`
        (output_dir / PER_CLASS_FILE).write_text(json.dumps(test_report["per_class"], indent=2))
        plot_confusion(test_report["confusion_matrix"], class_names, output_dir / CONFUSION_FILE)
        written += [output_dir / PER_CLASS_FILE, output_dir / CONFUSION_FILE]
    (output_dir / METRICS_FILE).write_text(json.dumps(summary, indent=2))
    plot_curves(history, output_dir / CURVES_FILE)
    return written
