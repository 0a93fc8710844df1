"""The sample-size curve: what each kind of start (transfer, scratch, ImageNet-only) reaches
with one, two, three... training scenes, as the mean over its training seeds with their range.

Transfer learning is for few samples: the curve shows whether the pretrained start pays
most where samples are fewest, and the check holds the fewest-scene point to a margin over
the control. Everything here reads the evaluation's summary table (no rasters, no torch).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

NEW_TYPES = ("unpaved", "trail")  # the road types the transfer samples teach
COLUMNS = ["curve", "scenes", "model", "runs", "metric", "mean", "min", "max"]


def curve_table(summary: pd.DataFrame, curves: Mapping[str, Sequence[str]], sizes: Mapping[str, int],
                replicates: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:
    """One row per curve, point and metric: F1 per road type (``<type> F1``) and APLS over all
    roads, the mean, lowest and highest over the point's model and its replicates.

    ``curves``: curve name -> its models from fewest to most scenes; ``sizes``: model ->
    number of training scenes (the x axis).
    """
    replicates = replicates or {}
    rows: list[dict[str, Any]] = []
    for curve, models in curves.items():
        for model in models:
            runs = [model, *replicates.get(model, [])]
            sub = summary[summary["model"].isin(runs)]
            for road_type, group in sub.groupby("road_type", sort=True):
                col, metric = ("apls", "APLS") if road_type == "all" else ("f1", f"{road_type} F1")
                vals = group[col].dropna() if col in group else pd.Series(dtype=float)
                if vals.empty:
                    continue
                rows.append({"curve": curve, "scenes": sizes.get(model), "model": model, "runs": len(vals), "metric": metric,
                             "mean": float(vals.mean()), "min": float(vals.min()), "max": float(vals.max())})
    return pd.DataFrame(rows, columns=COLUMNS)


def curve_of(curves: Mapping[str, Sequence[str]], model: str | None) -> str | None:
    """The curve a model is a point of (the transfer model's, the control's), or None."""
    return next((name for name, models in curves.items() if model in models), None)


def fewest_scene_checks(table: pd.DataFrame, transfer_curve: str, control_curve: str, *, label: str = "scratch",
                        margin: float = 0.05, types: Sequence[str] = NEW_TYPES) -> list[dict[str, Any]]:
    """Issue 37's sample-efficiency target: at the transfer curve's fewest scenes, transfer F1 >=
    the control's F1 at the same number of scenes + ``margin``, per new road type (mean of the runs).

    No rows when the transfer curve has one point only or the control has none at that size.
    """
    tc = table[table["curve"] == transfer_curve]
    if tc["scenes"].nunique() < 2:
        return []
    n = int(tc["scenes"].min())
    cc = table[(table["curve"] == control_curve) & (table["scenes"] == n)]
    rows = []
    for road_type in types:
        a = tc[(tc["scenes"] == n) & (tc["metric"] == f"{road_type} F1")]["mean"]
        b = cc[cc["metric"] == f"{road_type} F1"]["mean"]
        if a.empty or b.empty:
            continue
        a_, b_ = float(a.iloc[0]), float(b.iloc[0])
        rows.append({"check": f"{road_type}, {n} transfer scene{'s' if n > 1 else ''}: transfer F1 >= {label} F1 + {margin:.2f}",
                     "value": f"{a_:.3f} vs {b_:.3f}", "pass": a_ >= b_ + margin})
    return rows


def curve_figure(table: pd.DataFrame) -> bytes:
    """F1 of each new road type and APLS against the number of training scenes, one line per
    curve (the mean over its runs, the band from lowest to highest), as PNG bytes."""
    import matplotlib.pyplot as plt

    metrics = [f"{t} F1" for t in NEW_TYPES if f"{t} F1" in set(table["metric"])] + (["APLS"] if "APLS" in set(table["metric"]) else [])
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(3.8 * max(len(metrics), 1), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for curve, group in table[table["metric"] == metric].groupby("curve", sort=False):
            g = group.sort_values("scenes")
            x = g["scenes"].to_numpy(float)
            line, = ax.plot(x, g["mean"], marker="o", label=curve)
            ax.fill_between(x, g["min"], g["max"], color=line.get_color(), alpha=0.18, linewidth=0)
        xs = sorted(set(table["scenes"].dropna().astype(int)))
        ax.set_xticks(xs)
        ax.set_xlabel("training scenes")
        ax.set_ylim(0, 1)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def curve_wide(table: pd.DataFrame) -> pd.DataFrame:
    """The table as the report and README show it: a row per curve and size, a cell per metric
    ``mean (min-max)``."""
    if table.empty:
        return pd.DataFrame(columns=["curve", "scenes", "runs"])
    cells = table.assign(cell=[f"{m:.3f} ({lo:.3f}-{hi:.3f})" if r > 1 else f"{m:.3f}"
                               for m, lo, hi, r in zip(table["mean"], table["min"], table["max"], table["runs"])])
    wide = cells.pivot_table(index=["curve", "scenes"], columns="metric", values="cell", aggfunc="first", sort=False)
    wide.columns.name = None
    runs = table.groupby(["curve", "scenes"], sort=False)["runs"].max()
    order = [c for c in [f"{t} F1" for t in NEW_TYPES] + ["APLS"] if c in wide] + sorted(c for c in wide if c not in [f"{t} F1" for t in NEW_TYPES] + ["APLS"])
    out = wide[order].join(runs).reset_index()
    out["scenes"] = out["scenes"].astype(int)
    return out[["curve", "scenes", "runs", *order]].fillna("")
