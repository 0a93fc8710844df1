"""Training curves written into a model package (ModelCharacteristics/), as the reference tool shows them."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any


def write_lr_curve(workdir: Path, curve: list[tuple[float, float]], chosen: float) -> dict[str, Path]:
    """The range test's curve as the reference tool shows ``lr_find``: loss against a log rate."""
    csv_path = workdir / "lr_find.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lr", "smoothed_loss"])
        w.writerows(curve)
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([c[0] for c in curve], [c[1] for c in curve])
    ax.axvline(chosen, color="tab:red", linestyle="--", label=f"chosen {chosen:.2g}")
    ax.set_xscale("log"), ax.set_xlabel("learning rate"), ax.set_ylabel("loss (smoothed)"), ax.legend()
    fig.tight_layout()
    png = workdir / "lr_find.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return {"lr_find.csv": csv_path, "ModelCharacteristics/lr_find.png": png}


def write_curves(workdir: Path, history: list[dict[str, Any]]) -> dict[str, Path]:
    csv_path = workdir / "metrics.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(history[0]))
        w.writeheader()
        w.writerows(history)
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    ep = [m["epoch"] for m in history]
    a.plot(ep, [m["train_loss"] for m in history], label="train")
    a.plot(ep, [m["val_loss"] for m in history], label="validation")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.legend()
    b.plot(ep, [m["val_road_iou"] for m in history], label="road IoU")
    b.plot(ep, [m["val_orient_acc"] for m in history], label="orientation acc.")
    b.plot(ep, [m.get("val_orient_acc1", float("nan")) for m in history], label="orientation acc. (within one bin)")
    b.set_xlabel("epoch"), b.set_ylim(0, 1), b.legend()
    fig.tight_layout()
    png = workdir / "loss_graph.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return {"metrics.csv": csv_path, "ModelCharacteristics/loss_graph.png": png}

