"""The sample-size curve, the one-scene target and the across-landscape target, with known answers."""

from __future__ import annotations

import pandas as pd
import pytest

from roadxfer.report import new_road_checks, new_roads_wide, per_scene_new_roads
from roadxfer.sample_curve import curve_figure, curve_of, curve_table, curve_wide, fewest_scene_checks

# model -> (unpaved F1, trail F1, APLS)
RUNS = {
    "transfer_n1": (0.70, 0.60, 0.50), "transfer_n1_s43": (0.80, 0.50, 0.70),
    "transfer": (0.85, 0.80, 0.90), "transfer_s43": (0.87, 0.82, 0.92),
    "scratch_n1": (0.60, 0.58, 0.20), "scratch_n1_s43": (0.70, 0.46, 0.30),
    "scratch": (0.80, 0.70, 0.40), "scratch_s43": (0.82, 0.72, 0.42),
}
REPLICATES = {"transfer_n1": ["transfer_n1_s43"], "transfer": ["transfer_s43"], "scratch_n1": ["scratch_n1_s43"], "scratch": ["scratch_s43"]}
CURVES = {"transfer": ["transfer_n1", "transfer"], "scratch": ["scratch_n1", "scratch"]}
SIZES = {"transfer_n1": 1, "transfer": 3, "scratch_n1": 1, "scratch": 3}


def summary() -> pd.DataFrame:
    rows = []
    for model, (unpaved, trail, apls) in RUNS.items():
        rows += [{"model": model, "road_type": "unpaved", "f1": unpaved}, {"model": model, "road_type": "trail", "f1": trail},
                 {"model": model, "road_type": "all", "f1": 0.5, "apls": apls}]
    return pd.DataFrame(rows)


def test_curve_table_means_each_point_over_its_runs():
    table = curve_table(summary(), CURVES, SIZES, REPLICATES).set_index(["curve", "scenes", "metric"])
    point = table.loc[("transfer", 1, "unpaved F1")]
    assert point["model"] == "transfer_n1" and point["runs"] == 2
    assert (point["mean"], point["min"], point["max"]) == pytest.approx((0.75, 0.70, 0.80))
    assert table.loc[("scratch", 3, "APLS"), "mean"] == pytest.approx(0.41)
    assert len(table) == 2 * 2 * 3  # two curves, two points, three metrics
    assert curve_of(CURVES, "scratch") == "scratch" and curve_of(CURVES, "nobody") is None
    wide = curve_wide(curve_table(summary(), CURVES, SIZES, REPLICATES))
    assert list(wide.columns) == ["curve", "scenes", "runs", "unpaved F1", "trail F1", "APLS"]
    assert wide.iloc[0]["unpaved F1"] == "0.750 (0.700-0.800)"


def test_fewest_scene_check_needs_the_margin_over_the_control():
    table = curve_table(summary(), CURVES, SIZES, REPLICATES)
    out = {r["check"]: r for r in fewest_scene_checks(table, "transfer", "scratch")}
    unpaved, trail = out["unpaved, 1 transfer scene: transfer F1 >= scratch F1 + 0.05"], out["trail, 1 transfer scene: transfer F1 >= scratch F1 + 0.05"]
    assert unpaved["pass"] and unpaved["value"] == "0.750 vs 0.650"  # +0.10
    assert not trail["pass"] and trail["value"] == "0.550 vs 0.520"  # +0.03: short of the margin
    assert not fewest_scene_checks(table, "transfer", "scratch", margin=0.11)[0]["pass"]
    single = curve_table(summary(), {"transfer": ["transfer"], "scratch": ["scratch"]}, SIZES, REPLICATES)
    assert fewest_scene_checks(single, "transfer", "scratch") == []  # no curve, no check


def test_curve_figure_is_a_png():
    png = curve_figure(curve_table(summary(), CURVES, SIZES, REPLICATES))
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def per_scene() -> pd.DataFrame:
    """Counts per scene, model and road type; the new types pooled give known F1s."""
    rows = []
    counts = {  # (scene, model): {type: (tp, fp, fn)}
        ("grassland", "transfer"): {"unpaved": (30, 10, 10), "trail": (10, 0, 30), "paved": (100, 0, 0)},  # pooled 40/10/40: F1 80/130
        ("grassland", "transfer_s43"): {"unpaved": (40, 0, 0), "trail": (40, 0, 0)},  # F1 1
        ("grassland", "scratch"): {"unpaved": (10, 10, 30), "trail": (0, 0, 40)},  # 20/(20+10+70)=0.2
        ("urban", "transfer"): {"unpaved": (5, 50, 35), "trail": (5, 0, 35)},  # 20/(20+50+70)
        ("urban", "transfer_s43"): {"unpaved": (5, 50, 35), "trail": (5, 0, 35)},
        ("urban", "scratch"): {"unpaved": (20, 0, 20), "trail": (20, 0, 20)},  # 0.5
    }
    for (scene, model), by_type in counts.items():
        for road_type, (tp, fp, fn) in by_type.items():
            rows.append({"scene": scene, "model": model, "road_type": road_type, "tp": tp, "fp": fp, "fn": fn})
    return pd.DataFrame(rows)


def test_new_roads_are_pooled_per_scene_and_meaned_over_runs():
    table = per_scene_new_roads(per_scene(), ["transfer", "scratch", "transfer_s43"], {"transfer": ["transfer_s43"]})
    f1 = table.set_index(["scene", "model"])
    assert f1.loc[("grassland", "transfer"), "f1"] == pytest.approx((80 / 130 + 1.0) / 2)  # paved left out
    assert (f1.loc[("grassland", "transfer"), "min"], f1.loc[("grassland", "transfer"), "max"]) == pytest.approx((80 / 130, 1.0))
    assert f1.loc[("grassland", "scratch"), "f1"] == pytest.approx(0.2) and f1.loc[("grassland", "scratch"), "runs"] == 1
    assert "transfer_s43" not in set(table["model"])  # a replicate is part of its model's mean, not a row
    wide = new_roads_wide(table)
    assert list(wide.columns) == ["scene", "transfer", "scratch"] and wide.iloc[0]["scratch"] == "0.200"


def test_across_landscape_check_needs_the_floor_and_the_controls():
    table = per_scene_new_roads(per_scene(), ["transfer", "scratch"], {"transfer": ["transfer_s43"]})
    out = {r["check"].split(":")[0]: r for r in new_road_checks(table, "transfer", {"scratch": "scratch", "ImageNet-only": "imagenet"}, 0.5)}
    assert out["new roads on grassland"]["pass"] and out["new roads on grassland"]["value"] == "0.808 vs 0.200"
    assert not out["new roads on urban"]["pass"]  # 0.143: under the floor and under scratch
    assert "and > scratch" in out["new roads on urban"]["check"] and "ImageNet-only" not in out["new roads on urban"]["check"]  # no such model classified
    assert all(r["pass"] for r in new_road_checks(table[table["scene"] == "grassland"], "transfer", {}, 0.8))
    assert not any(r["pass"] for r in new_road_checks(table[table["scene"] == "grassland"], "transfer", {}, 0.81))
