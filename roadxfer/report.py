"""The before/after report: one self-contained HTML file (images inlined), no server needed.

It shows what the transfer bought: metrics per road type for the base, transfer and
control models, bar charts, training curves, side-by-side figures of input / base /
transfer output over windows of the test scenes, an animated GIF switching between
base and transfer, and the provenance a paper needs (config, data, models, code).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import html
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
import yaml
from PIL import Image, ImageDraw
from rasterio.windows import Window

from . import IGNORE_VALUE, __version__
from .atomic import atomic_path
from .provenance import code_version
from .sample_curve import NEW_TYPES, curve_figure, curve_of, curve_table, curve_wide, fewest_scene_checks

os.environ.setdefault("MPLBACKEND", "Agg")

OVERLAY = np.array([230, 30, 30], np.float32)


def _uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def _img_bytes(img: Image.Image, fmt: str = "PNG", **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def bar_charts(summary: pd.DataFrame, models: list[str]) -> bytes:
    """F1 and recall per road type and model, as PNG bytes."""
    import matplotlib.pyplot as plt

    types = [t for t in summary["road_type"].unique() if t != "all"] + ["all"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / max(len(models), 1)
    for ax, metric in zip(axes, ("f1", "recall")):
        for i, m in enumerate(models):
            sub = summary[summary["model"] == m].set_index("road_type")
            vals = [float(sub.loc[t, metric]) if t in sub.index else np.nan for t in types]
            ax.bar(np.arange(len(types)) + (i - (len(models) - 1) / 2) * width, np.nan_to_num(vals), width, label=m)
        ax.set_xticks(range(len(types)), types)
        ax.set_ylim(0, 1)
        ax.set_title(f"pixel {metric.upper() if metric == 'f1' else metric} per road type")
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def pick_window(classified: Mapping[str, str], baseline: str, transfer: str, size: int) -> Window:
    """The window where the transfer model adds the most road over the baseline (the story in one picture)."""
    with rasterio.open(classified[transfer]) as t, rasterio.open(classified[baseline]) as b:
        gain = ((t.read(1) == 1) & (b.read(1) != 1)).astype(np.float32)
        h, w = t.height, t.width
    size = min(size, h, w)
    integral = np.pad(gain, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    step = max(size // 8, 1)
    sub = sums[::step, ::step]
    r, c = np.unravel_index(int(np.argmax(sub)), sub.shape)
    return Window(c * step, r * step, size, size)


def overlay(image: np.ndarray, cls: np.ndarray) -> Image.Image:
    rgb = np.moveaxis(image[:3], 0, -1).astype(np.float32)
    road = (cls > 0) & (cls != IGNORE_VALUE)
    rgb[road] = 0.35 * rgb[road] + 0.65 * OVERLAY
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def _label(img: Image.Image, text: str) -> Image.Image:
    img = img.copy()
    d = ImageDraw.Draw(img)
    d.rectangle([0, 0, 8 * len(text) + 10, 18], fill=(0, 0, 0))
    d.text((5, 3), text, fill=(255, 255, 255))
    return img


def scene_figures(scene: str, image: str, classified: Mapping[str, str], baseline: str, transfer: str, size: int) -> tuple[bytes, bytes, Window]:
    """A side-by-side PNG (input | each model) and a GIF switching baseline <-> transfer (bytes of each)."""
    win = pick_window(classified, baseline, transfer, size)
    with rasterio.open(image) as src:
        img = src.read([1, 2, 3], window=win)
    panels = [_label(Image.fromarray(np.moveaxis(img, 0, -1)), "input")]
    frames = {}
    for model, path in classified.items():
        with rasterio.open(path) as src:
            frames[model] = _label(overlay(img, src.read(1, window=win)), model)
        panels.append(frames[model])
    w, h = panels[0].size
    strip = Image.new("RGB", (w * len(panels) + 6 * (len(panels) - 1), h), (255, 255, 255))
    for i, p in enumerate(panels):
        strip.paste(p, (i * (w + 6), 0))
    gif = _img_bytes(frames[baseline], "GIF", save_all=True, append_images=[frames[transfer]], duration=900, loop=0)
    return _img_bytes(strip), gif, win


def _table(df: pd.DataFrame, cls: str = "") -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="–", classes=cls, border=0)


def targets_html(t: pd.DataFrame) -> str:
    """The checks as an HTML table: every cell escaped (road-type and model names come from the config and sheet), the pass mark styled."""
    marks = ["<span class='pass'>yes</span>" if bool(p) else "<span class='fail'>no</span>" for p in t["pass"]]
    cells = t.astype(object).map(lambda v: html.escape(str(v)))
    cells["pass"] = marks
    return cells.to_html(index=False, escape=False, border=0)


def targets(summary: pd.DataFrame, baseline: str, transfer: str, control: str | None, retention: pd.DataFrame | None = None,
            retained_types: Sequence[str] = (), imagenet: str | None = None) -> pd.DataFrame:
    """The demo's acceptance targets, checked on the summary table (and the retention table).

    Transfer vs scratch is shown on pixel F1, recall (the headline: reference labels may be
    incomplete, so precision needs care) and relaxed F1. Retention: F1 on scenes of the
    pretrained model's own domain, which the transfer should keep, per road type the base
    model was trained on (``retained_types``; when the retention scenes' reference holds
    new road types too, a transfer model that finds them is not scored as making false
    base-type roads); with none given, all their roads as one. ``imagenet``: the
    ImageNet-only control (the same ImageNet encoder, never trained on roads, frozen, its
    decoders trained on the transfer tiles), which separates what general features bought
    from what road pretraining bought.
    """
    table = summary.set_index(["model", "road_type"])
    rows = []

    def get(m: str, t: str, col: str = "f1") -> float:
        return float(table[col].get((m, t), np.nan))

    names = {"f1": "F1", "recall": "recall", "relaxed_f1": "relaxed F1"}
    for t in ("unpaved", "trail"):
        if (baseline, t) in table.index and (transfer, t) in table.index:
            rows.append({"check": f"{t}: transfer F1 >= base F1 + 0.30", "value": f"{get(transfer, t):.3f} vs {get(baseline, t):.3f}", "pass": get(transfer, t) >= get(baseline, t) + 0.30})
            if control and (control, t) in table.index:
                for col, name in names.items():
                    a, b = get(transfer, t, col), get(control, t, col)
                    rows.append({"check": f"{t}: transfer {name} > scratch {name}", "value": f"{a:.3f} vs {b:.3f}", "pass": a > b})
            if imagenet and (imagenet, t) in table.index:
                a, b = get(transfer, t), get(imagenet, t)
                rows.append({"check": f"{t}: transfer F1 > ImageNet-only F1", "value": f"{a:.3f} vs {b:.3f}", "pass": a > b})
    if (baseline, "paved") in table.index:
        rows.append({"check": "paved: transfer F1 >= base F1 - 0.03", "value": f"{get(transfer, 'paved'):.3f} vs {get(baseline, 'paved'):.3f}", "pass": get(transfer, "paved") >= get(baseline, "paved") - 0.03})
    if "apls" in table and (transfer, "all") in table.index:
        others = [m for m in (baseline, control, imagenet) if m and (m, "all") in table.index]
        if others:
            a = get(transfer, "all", "apls")
            rest = {m: get(m, "all", "apls") for m in others}
            label = {baseline: "base", control: "scratch", imagenet: "ImageNet-only"}
            rows.append({"check": "road graph: transfer APLS > " + " and ".join(label[m] for m in others) + " APLS",
                         "value": f"{a:.3f} vs " + " / ".join(f"{v:.3f}" for v in rest.values()), "pass": all(a > v for v in rest.values())})
    if "direction_acc15" in table:
        for t in ("unpaved", "trail"):
            if (transfer, t) in table.index:
                a = get(transfer, t, "direction_acc15")
                rows.append({"check": f"{t}: transfer direction within 15 degrees on >= 70 % of the road", "value": f"{a:.3f}", "pass": a >= 0.7})
    if retention is not None and len(retention):
        kept = retention.set_index(["model", "road_type"])["f1"]
        for t in retained_types or ["all"]:
            check = f"retention{'' if t == 'all' else f' ({t})'}: transfer F1 >= base F1 - 0.03 on the base domain's scenes"
            if (baseline, t) in kept.index and (transfer, t) in kept.index:
                a, b = float(kept[(transfer, t)]), float(kept[(baseline, t)])
                rows.append({"check": check, "value": f"{a:.3f} vs {b:.3f}", "pass": a >= b - 0.03})
            elif t != "all":
                rows.append({"check": check, "value": f"no '{t}' roads in the retention scenes' reference", "pass": False})
    return pd.DataFrame(rows)


SPREAD_COLUMNS = ("f1", "recall", "relaxed_f1", "apls", "direction_acc15")  # what the checks read


def mean_over_replicates(table: pd.DataFrame, replicates: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """``table`` with each repeated model's metrics replaced by their mean over its runs.

    ``replicates`` maps a model to the models that repeat it with other training seeds; a
    (model, road type) row is averaged only where every run has it (else left as it is).
    """
    out = table.copy()
    cols = [c for c in SPREAD_COLUMNS if c in out]
    for head, reps in replicates.items():
        runs = [head, *reps]
        for road_type in table.loc[table["model"] == head, "road_type"]:
            rows = table[table["model"].isin(runs) & (table["road_type"] == road_type)]
            if set(rows["model"]) == set(runs):
                out.loc[(out["model"] == head) & (out["road_type"] == road_type), cols] = rows[cols].mean().to_numpy()
    return out


def spread(table: pd.DataFrame, replicates: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Mean, lowest and highest F1 (and APLS, for all roads) of each repeated model's runs, per road type."""
    rows = []
    for head, reps in replicates.items():
        runs = [head, *reps]
        for road_type, group in table[table["model"].isin(runs)].groupby("road_type", sort=True):
            row = {"model": head, "road_type": road_type, "runs": len(group)}
            for col in ("f1", "apls") if road_type == "all" else ("f1",):
                if col in group:
                    row |= {f"{col} mean": group[col].mean(), f"{col} min": group[col].min(), f"{col} max": group[col].max()}
            rows.append(row)
    return pd.DataFrame(rows)


def retention_per_scene(per_scene: pd.DataFrame, scenes: Sequence[str], baseline: str, transfer: str, retained_types: Sequence[str] = ()) -> pd.DataFrame:
    """Base and transfer F1 on each base-domain scene, side by side, with their false positives.

    A pooled retention figure can hide one landscape where the transfer model adds false
    roads (the demo's urban scenes); this table shows where it is lost.
    """
    types = list(retained_types) or ["all"]
    sub = per_scene[per_scene["scene"].isin(list(scenes)) & per_scene["road_type"].isin(types)]
    cols = ["f1", "precision", "recall", "fp"]
    b = sub[sub["model"] == baseline].set_index(["scene", "road_type"])[cols]
    t = sub[sub["model"] == transfer].set_index(["scene", "road_type"])[cols]
    both = b.merge(t, left_index=True, right_index=True, suffixes=(f" {baseline}", f" {transfer}"))
    if both.empty:
        return pd.DataFrame(columns=["scene", "road_type", f"f1 {baseline}", f"f1 {transfer}", "change", "within 0.03"])
    both["change"] = both[f"f1 {transfer}"] - both[f"f1 {baseline}"]
    both["within 0.03"] = both["change"] >= -0.03
    order = ["f1", "change", "within 0.03", "precision", "recall", "fp"]
    out = both.reset_index()
    keep = ["scene", "road_type"] + [c for k in order for c in ([f"{k} {baseline}", f"{k} {transfer}"] if f"{k} {baseline}" in out else [k])]
    return out[keep].sort_values(["road_type", "scene"], kind="stable").reset_index(drop=True)


def per_scene_new_roads(per_scene: pd.DataFrame, models: Sequence[str], replicates: Mapping[str, Sequence[str]] | None = None,
                        types: Sequence[str] = NEW_TYPES) -> pd.DataFrame:
    """F1 on the new road types pooled, per test scene and model: their counts summed (each
    predicted pixel belongs to the nearest reference's type, so the shares do not overlap).
    A model with replicates gets the mean over its runs, with the lowest and highest."""
    from .evaluate import f1  # the evaluation's F1, its rule for undefined precision or recall included

    replicates = replicates or {}
    sub = per_scene[per_scene["road_type"].isin(list(types))]
    pooled = sub.groupby(["scene", "model"], sort=False)[["tp", "fp", "fn"]].sum()
    precision = pooled["tp"] / (pooled["tp"] + pooled["fp"]).where(lambda n: n > 0)
    recall = pooled["tp"] / (pooled["tp"] + pooled["fn"]).where(lambda n: n > 0)
    pooled["f1"] = [f1(a, b) for a, b in zip(precision, recall)]
    pooled = pooled.reset_index()
    repeats = {r for reps in replicates.values() for r in reps}
    rows = []
    for scene in dict.fromkeys(pooled["scene"]):
        for model in models:
            if model in repeats:
                continue
            runs = [model, *replicates.get(model, [])]
            vals = pooled[(pooled["scene"] == scene) & pooled["model"].isin(runs)]["f1"].dropna()
            if len(vals):
                rows.append({"scene": scene, "model": model, "runs": len(vals), "f1": float(vals.mean()), "min": float(vals.min()), "max": float(vals.max())})
    return pd.DataFrame(rows, columns=["scene", "model", "runs", "f1", "min", "max"])


def new_roads_wide(table: pd.DataFrame) -> pd.DataFrame:
    """Scenes as rows, models as columns, ``mean (min-max)`` where a model has replicates."""
    cells = table.assign(cell=[f"{f:.3f} ({lo:.3f}-{hi:.3f})" if r > 1 else f"{f:.3f}" for f, lo, hi, r in zip(table["f1"], table["min"], table["max"], table["runs"])])
    wide = cells.pivot_table(index="scene", columns="model", values="cell", aggfunc="first", sort=False)
    wide.columns.name = None
    return wide[list(dict.fromkeys(table["model"]))].reset_index().fillna("")


def new_road_checks(table: pd.DataFrame, transfer: str, controls: Mapping[str, str], floor: float) -> list[dict[str, Any]]:
    """The across-landscape target, per test scene: the transfer model's new-road F1 >= ``floor``
    and above every control's there (``controls``: label -> model)."""
    rows = []
    f1 = table.set_index(["scene", "model"])["f1"]
    for scene in dict.fromkeys(table["scene"]):
        if (scene, transfer) not in f1.index:
            continue
        a = float(f1[(scene, transfer)])
        others = {label: float(f1[(scene, m)]) for label, m in controls.items() if (scene, m) in f1.index}
        rows.append({"check": f"new roads on {scene}: transfer F1 (unpaved and trail) >= {floor:g}" + "".join(f" and > {label}" for label in others),
                     "value": f"{a:.3f}" + (" vs " + " / ".join(f"{v:.3f}" for v in others.values()) if others else ""),
                     "pass": a >= floor and all(a > v for v in others.values())})
    return rows


def _provenance(models: Mapping[str, str]) -> pd.DataFrame:
    """How each model was made, from its package's record (ours or the reference tool's; no network is loaded)."""
    rows = []
    from .package_info import package_info

    for name, path in models.items():
        info = package_info(path)
        p = info["provenance"]
        cfg = p.get("training_config", {})
        best = p.get("best", {})
        rows.append({
            "model": name,
            "architecture": info["architecture"],
            "parent": (p.get("parent") or {}).get("name", "—"),
            "parent sha256": ((p.get("parent") or {}).get("weights_sha256") or "—")[:16],
            "encoder frozen": cfg.get("freeze"),
            "side network": info["side_channels"] or "—",
            "keep pretrained": cfg.get("keep_pretrained"),
            "tiles": p.get("training_data", {}).get("tiles"),
            "data sha256": p.get("training_data", {}).get("sha256", "")[:16],
            "epochs": p.get("epochs_run"),
            "best val road IoU": best.get("val_road_iou"),
            "weights sha256": (info["weights_sha256"] or "")[:16],
            "code": p.get("code_version") or ("imported: " + Path(p["imported_from"]).name if p.get("imported_from") else None),
        })
    return pd.DataFrame(rows)


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{padding:3px 9px;border-bottom:1px solid #ddd;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.pass{color:#070}.fail{color:#b00}pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:85%}
figure{margin:1em 0}figcaption{color:#555;font-size:90%}"""


def write_report(
    out_html: str | Path,
    *,
    summary_csv: str | Path,
    scenes_csv: str | Path,
    models: Mapping[str, str],
    test_scenes: Mapping[str, str],
    config: Mapping[str, Any],
    scene_sheet: str | Path,
    items: Mapping[str, str | Path] | None = None,
    retention_csv: str | Path | None = None,
    retention_scenes: Mapping[str, str] | None = None,
    sample_sizes: Mapping[str, int] | None = None,
) -> None:
    """Write the report; every image is inlined, so the single file can be mailed or archived.

    ``retention_scenes`` (scene -> image) also get before/after figures, over the window
    where the transfer model adds the most road there: on the base domain, that is where
    it finds new roads or makes false ones.

    ``sample_sizes`` (model -> number of training scenes) places the models of
    ``evaluation.sample_curve`` on the sample-size curve.

    ``items`` (optional) also writes the report's parts as files for Snakemake's own
    report: ``targets`` (CSV), ``charts`` (PNG), and the folders ``before_after``
    (``<scene>.png``) and ``training`` (``<model>.png``).
    """
    files: dict[str, bytes] = {}  # item path -> content, written with the HTML
    summary = pd.read_csv(summary_csv)
    per_scene = pd.read_csv(scenes_csv)
    retention = pd.read_csv(retention_csv) if retention_csv else None
    retained = sorted(set(per_scene["scene"]) - set(test_scenes)) if retention is not None and len(retention) else []
    all_scenes, per_scene = per_scene, per_scene[per_scene["scene"].isin(list(test_scenes))]
    ev = config.get("evaluation", {})
    baseline, transfer, control = ev.get("baseline", "base"), ev.get("transfer", "transfer"), ev.get("control")
    imagenet = ev.get("imagenet_control")
    names = list(models)
    cols = ["model", "road_type", "precision", "recall", "f1", "iou", "relaxed_precision", "relaxed_recall", "relaxed_f1"] + [c for c in ("apls", "direction_acc15") if c in summary]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>roadxfer report</title><style>{CSS}</style></head><body>",
             "<h1>roadxfer: transfer learning report</h1>",
             f"<p>Generated {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC} by roadxfer {__version__}, code <code>{html.escape(code_version())}</code>. "
             f"Models: {html.escape(', '.join(names))}. Test scenes: {html.escape(', '.join(test_scenes))}.</p>"]
    replicates = {m: list(r) for m, r in (ev.get("replicates") or {}).items() if m in names and set(r) <= set(names)}
    curves = {c: [m for m in ms if m in names] for c, ms in (ev.get("sample_curve") or {}).items()}
    curves = {c: ms for c, ms in curves.items() if len(ms) > 1}
    curve = curve_table(summary, curves, sample_sizes or {}, replicates) if curves else None
    new_roads = per_scene_new_roads(per_scene, names, replicates)
    if baseline in names and transfer in names:
        checked, kept = (summary, retention) if not replicates else (mean_over_replicates(summary, replicates), None if retention is None else mean_over_replicates(retention, replicates))
        t = targets(checked, baseline, transfer, control if control in names else None, kept, ev.get("retained_types") or (),
                    imagenet if imagenet in names else None)
        more = []
        transfer_curve, control_curve = curve_of(curves, transfer), curve_of(curves, control)
        if curve is not None and transfer_curve and control_curve:
            more += fewest_scene_checks(curve, transfer_curve, control_curve, label="scratch")
        if ev.get("new_road_floor") is not None:
            controls = {label: m for label, m in (("scratch", control), ("ImageNet-only", imagenet)) if m and m in names}
            more += new_road_checks(new_roads, transfer, controls, float(ev["new_road_floor"]))
        t = pd.concat([t, pd.DataFrame(more)], ignore_index=True) if more else t
        if len(t):
            files["targets"] = t.to_csv(index=False).encode()
            parts += ["<h2>Did the transfer work?</h2>"]
            if replicates:
                parts.append("<p>Checked on the mean over each repeated model's runs (training seeds): "
                             + ", ".join(f"{html.escape(m)} ({len(r) + 1} runs)" for m, r in replicates.items()) + "; their spread is below the metrics.</p>")
            parts.append(targets_html(t))
    parts += ["<h2>Metrics per model and road type (all test scenes)</h2>",
              "<p>Pixel metrics against the buffered reference lines; each predicted pixel is attributed to the road type whose reference is nearest. "
              f"Relaxed metrics accept a match within {ev.get('relaxed_pixels', 3)} px. APLS compares predicted centrelines with the reference polylines (average over scenes). "
              "direction_acc15: the share of points along the reference lines (one per cell) where the road direction the model predicts "
              "(direction.tif) is within 15 degrees of the line's.</p>",
              _table(summary[[c for c in cols if c in summary]]), f"<img alt='bar charts' src='{_uri(files.setdefault('charts', bar_charts(summary, names)))}'>",
              "<h3>Per scene</h3>", _table(per_scene[[c for c in cols + ['scene'] if c in per_scene]])]
    if len(new_roads):
        parts += ["<h3>New roads per test scene</h3>",
                  f"<p>F1 on the new road types ({', '.join(NEW_TYPES)}) pooled, per test scene: a model that learnt them in one landscape "
                  "should find them in the others too. A repeated model shows the mean over its runs (lowest-highest).</p>",
                  _table(new_roads_wide(new_roads))]
    if curve is not None and len(curve):
        files["sample_curve"] = curve_figure(curve)
        parts += ["<h2>Fewer samples: the sample-size curve</h2>",
                  "<p>Each kind of start trained on fewer of the training scenes (evaluation.sample_curve), scored on the same test scenes: "
                  "pixel F1 of the new road types and APLS, the mean over each point's runs (training seeds), the band and the brackets their range. "
                  "Transfer learning is for few samples: the pretrained start should pay most where samples are fewest.</p>",
                  f"<img alt='sample-size curve' src='{_uri(files['sample_curve'])}'>", _table(curve_wide(curve))]
    if replicates:
        parts += ["<h3>Run-to-run spread</h3>", "<p>Each repeated model and its replicates (the same data and settings, other training seeds): "
                  "mean, lowest and highest F1 per road type over the test scenes, and APLS.</p>", _table(spread(summary, replicates))]
    if retained:
        parts += ["<h2>Retention: the pretrained model's domain</h2>",
                  f"<p>Scenes of the base model's own kind ({', '.join(map(html.escape, retained))}), classified by every model: what the transfer "
                  "model keeps of what the base model found"
                  + (f" (scored on {', '.join(map(html.escape, ev['retained_types']))} roads; each predicted pixel goes to the nearest road type, as on the test scenes)"
                     if ev.get("retained_types") else "") + ".</p>",
                  _table(retention[[c for c in cols if c in retention]])]
        if baseline in names and transfer in names:
            by_scene = retention_per_scene(all_scenes, retained, baseline, transfer, ev.get("retained_types") or ())
            if len(by_scene):
                parts += ["<h3>Per scene</h3>",
                          f"<p>{html.escape(transfer)} against {html.escape(baseline)} on each base-domain scene; fp: predicted road pixels "
                          "outside the reference (in that road type's share of the scene).</p>",
                          _table(by_scene)]
        if replicates:
            parts += ["<h3>Run-to-run spread</h3>", "<p>Mean, lowest and highest F1 of each repeated model's runs on these scenes.</p>", _table(spread(retention, replicates))]
    if baseline in names and transfer in names:
        for title, group in (("Before and after", test_scenes), ("Before and after: the base domain", retention_scenes or {})):
            figures = []
            for scene, image in group.items():
                classified = {m: f"results/classified/{m}/{scene}/classes.tif" for m in names}
                if not all(Path(p).is_file() for p in classified.values()):
                    continue
                strip, gif, win = scene_figures(scene, image, classified, baseline, transfer, int(ev.get("report_window", 384)))
                files[f"before_after/{scene}.png"] = strip
                figures += [f"<figure><img alt='{html.escape(scene)} side by side' src='{_uri(strip)}'><figcaption>{html.escape(scene)}, window rows {win.row_off}-{win.row_off + win.height}, "
                            f"columns {win.col_off}-{win.col_off + win.width}: input and each model's roads (red).</figcaption></figure>",
                            f"<figure><img alt='{html.escape(scene)} base vs transfer' src='{_uri(gif, 'gif')}'><figcaption>The same window, switching between {baseline} and {transfer}.</figcaption></figure>"]
            if figures:
                parts += [f"<h2>{title}</h2>"] + figures
    parts.append("<h2>Training curves</h2>")
    for name, path in models.items():
        png = Path(path) / "ModelCharacteristics" / "loss_graph.png"
        if png.is_file():
            files[f"training/{name}.png"] = png.read_bytes()
            parts.append(f"<figure><img alt='{html.escape(name)} training' src='{_uri(files[f'training/{name}.png'])}'><figcaption>{html.escape(name)}</figcaption></figure>")
    parts += ["<h2>Provenance</h2>", "<h3>Models</h3>", _table(_provenance(models)),
              "<h3>Scenes</h3>", _table(pd.read_csv(scene_sheet, sep="\t", dtype=str, keep_default_na=False)),
              "<h3>Configuration</h3>", f"<pre>{html.escape(yaml.safe_dump(json.loads(json.dumps(dict(config), default=str)), sort_keys=False))}</pre>",
              "<p>Demo imagery is synthetic (roadxfer.demo).</p></body></html>"]
    with contextlib.ExitStack() as outputs:  # the HTML and the items are committed together
        outputs.enter_context(atomic_path(out_html)).write_text("\n".join(parts))
        if items:
            write_items(outputs, items, files)


def write_items(outputs: contextlib.ExitStack, items: Mapping[str, str | Path], files: Mapping[str, bytes]) -> None:
    """The report's parts as files: single items by name, figures in their folders (each folder always exists)."""
    for key in ("targets", "charts"):
        if key in items:
            outputs.enter_context(atomic_path(items[key])).write_bytes(files.get(key, b"check,value,pass\n"))
    for folder in ("before_after", "training"):
        if folder in items:
            tmp = outputs.enter_context(atomic_path(items[folder], directory=True, kind=f"report-{folder}"))
            for rel, data in files.items():
                if rel.startswith(folder + "/"):
                    (tmp / rel.split("/", 1)[1]).write_bytes(data)
