"""Step 5: metrics with known answers, APLS on small graphs, aggregation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import X0, Y0, make_raster, make_vectors
from shapely.geometry import LineString

from roadxfer.apls import apls
from roadxfer.evaluate import EvalSettings, aggregate, counts, evaluate_scene, mask_metrics, ratios

INF = np.full((10, 10), np.inf)


def test_counts_and_ratios_known_answer():
    ref = np.zeros((10, 10), bool)
    ref[2:4, :] = True  # 20 px
    pred = np.zeros((10, 10), bool)
    pred[3:5, :] = True  # 20 px, 10 overlap
    c = counts(pred, ref, np.ones((10, 10), bool), 0, INF, INF)
    assert (c["tp"], c["fp"], c["fn"]) == (10, 10, 10)
    r = ratios(c)
    assert r["precision"] == r["recall"] == r["f1"] == 0.5 and r["iou"] == pytest.approx(1 / 3)
    assert ratios({**c, "tp": 0})["f1"] == 0.0
    assert np.isnan(ratios({k: 0 for k in c})["precision"])
    assert np.isnan(ratios({k: 0 for k in c})["f1"])  # nothing predicted, nothing to find


def test_a_model_that_finds_nothing_scores_zero_not_nan():
    ref = np.zeros((10, 10), bool)
    ref[4, :] = True
    r = ratios(mask_metrics(np.zeros((10, 10), bool), {"trail": ref}, np.ones((10, 10), bool), rho=3)["trail"])
    assert np.isnan(r["precision"]) and r["recall"] == 0
    assert r["f1"] == 0 and r["relaxed_f1"] == 0
    # Predictions where there is no reference: precision 0, recall undefined, F1 0.
    pred = np.zeros((10, 10), bool)
    pred[2, :] = True
    r = ratios(counts(pred, np.zeros((10, 10), bool), np.ones((10, 10), bool), 3, INF, INF))
    assert r["precision"] == 0 and np.isnan(r["recall"]) and r["f1"] == 0


def test_relaxed_metrics_tolerate_a_small_shift():
    ref = np.zeros((20, 20), bool)
    ref[5, :] = True
    pred = np.zeros((20, 20), bool)
    pred[7, :] = True  # 2 px off
    out = mask_metrics(pred, {"road": ref}, np.ones((20, 20), bool), rho=3)
    r = ratios(out["road"])
    assert r["f1"] == 0 and r["relaxed_precision"] == 1 and r["relaxed_recall"] == 1
    r1 = ratios(mask_metrics(pred, {"road": ref}, np.ones((20, 20), bool), rho=1)["road"])
    assert r1["relaxed_f1"] == 0


def test_predictions_are_attributed_to_the_nearest_road_type():
    paved = np.zeros((40, 40), bool)
    paved[5:8, :] = True
    trail = np.zeros((40, 40), bool)
    trail[30:32, :] = True
    pred = paved.copy()
    pred[25, :] = True  # a false positive next to the trail
    out = mask_metrics(pred, {"paved": paved, "trail": trail}, np.ones((40, 40), bool), rho=0)
    assert ratios(out["paved"])["f1"] == 1.0
    assert out["trail"]["tp"] == 0 and out["trail"]["fn"] == 80 and out["trail"]["fp"] == 40
    assert out["all"]["tp"] == 120 and out["all"]["fn"] == 80


def test_evaluate_scene_on_real_files(tmp_path):
    image = make_raster(tmp_path / "img.tif", size=(200, 200), alpha_zero=(slice(0, 200), slice(190, 200)))
    lines = [LineString([(X0, Y0 - 25), (X0 + 100, Y0 - 25)]), LineString([(X0, Y0 - 75), (X0 + 100, Y0 - 75)])]
    labels = make_vectors(tmp_path / "ref.gpkg", lines, Classvalue=[1, 1], road_type=["paved", "trail"])
    # A "prediction" drawn by hand, not with the buffering code evaluation uses: the paved
    # road at y = Y0 - 25 m is row 50 (0.5 m cells); 2 m either side are rows 46-53.
    pred = np.zeros((1, 200, 200), np.uint8)
    pred[0, 46:54, :] = 1
    make_raster(tmp_path / "pred.tif", size=(200, 200), count=1, data=pred)
    result = evaluate_scene(image, tmp_path / "pred.tif", None, labels, tmp_path / "m.json", EvalSettings(buffer_radius=2.0, ignore_windows=[[0, 0, 10, 10]]), scene_id="s", model="m")
    rows = {r["road_type"]: r for r in result["rows"]}
    assert rows["paved"]["f1"] == 1.0 and rows["trail"]["recall"] == 0.0
    assert rows["paved"]["n_ref"] == 8 * 190  # 4 m wide at 0.5 m, minus the alpha-0 columns
    assert json.loads((tmp_path / "m.json").read_text())["model"] == "m"


def test_aggregate_sums_counts_over_scenes(tmp_path):
    def write(name, tp, fp, fn):
        row = {"scene": name, "model": "m", "road_type": "all", "tp": tp, "fp": fp, "fn": fn, "relaxed_tp_pred": tp, "n_pred": tp + fp, "relaxed_tp_ref": tp, "n_ref": tp + fn}
        (tmp_path / f"{name}.json").write_text(json.dumps({"scene": name, "model": "m", "rows": [row], "apls": {"apls": 0.5 if name == "a" else 1.0}}))
        return tmp_path / f"{name}.json"

    summary = aggregate([write("a", 10, 0, 10), write("b", 90, 10, 0)], tmp_path / "s.csv", tmp_path / "sum.csv")
    row = summary.iloc[0]
    assert row["precision"] == pytest.approx(100 / 110) and row["recall"] == pytest.approx(100 / 110)  # micro, not mean of ratios
    assert row["apls"] == pytest.approx(0.75)
    assert len(pd.read_csv(tmp_path / "s.csv")) == 2


def test_apls_known_answers():
    line = [LineString([(0, 0), (100, 0)])]
    assert apls(line, line)["apls"] == pytest.approx(1.0)
    assert apls(line, [LineString([(0, 1.5), (100, 1.5)])])["apls"] == pytest.approx(1.0)  # within the snap distance
    assert apls(line, [])["apls"] == 0.0
    # A detour: truth A-B is 100 m, the proposal goes A-C-B, 2 x 86.02 m. Only line ends are nodes (spacing 1000):
    # one pair each way, scored against the other graph's path length.
    detour = apls(line, [LineString([(0, 0), (50, 70), (100, 0)])], spacing=1000, snap=4)
    lp = 2 * np.hypot(50, 70)
    c_tp = 1 - (lp - 100) / 100
    c_pt = 1 - (lp - 100) / lp
    assert detour["apls_truth_to_proposal"] == pytest.approx(c_tp)
    assert detour["apls_proposal_to_truth"] == pytest.approx(c_pt)
    assert detour["apls"] == pytest.approx(2 / (1 / c_tp + 1 / c_pt))


def test_apls_penalises_a_gap():
    truth = [LineString([(0, 0), (100, 0)])]
    gap = apls(truth, [LineString([(0, 0), (40, 0)]), LineString([(60, 0), (100, 0)])], spacing=10, snap=4)
    assert gap["apls_proposal_to_truth"] == pytest.approx(1.0)  # every proposed path exists in the truth
    # truth nodes 0..100 every 10 m; 50 is unmatched; pairs crossing the gap fail.
    nodes = list(range(0, 101, 10))
    pairs = [(a, b) for i, a in enumerate(nodes) for b in nodes[i + 1 :]]
    ok = sum(1 for a, b in pairs if a != 50 and b != 50 and ((a <= 40 and b <= 40) or (a >= 60 and b >= 60)))
    assert gap["apls_truth_to_proposal"] == pytest.approx(ok / len(pairs))


def test_report_targets_known_answers():
    import pandas as pd

    from roadxfer.report import targets

    rows = []
    for model, vals in {"base": (0.94, 0.01, 0.02), "transfer": (0.92, 0.83, 0.77), "scratch": (0.0, 0.84, 0.75)}.items():
        for t, f in zip(("paved", "unpaved", "trail"), vals):
            rows.append({"model": model, "road_type": t, "f1": f, "recall": f + (0.05 if model == "transfer" else 0), "relaxed_f1": f})
    out = targets(pd.DataFrame(rows), "base", "transfer", "scratch").set_index("check")["pass"]
    assert out["unpaved: transfer F1 >= base F1 + 0.30"] and out["trail: transfer F1 >= base F1 + 0.30"]
    assert not out["unpaved: transfer F1 > scratch F1"] and out["trail: transfer F1 > scratch F1"]
    assert out["unpaved: transfer recall > scratch recall"]
    assert out["paved: transfer F1 >= base F1 - 0.03"]
    rows[3]["f1"] = 0.90  # transfer paved now 0.04 below base
    assert not targets(pd.DataFrame(rows), "base", "transfer", "scratch").set_index("check")["pass"]["paved: transfer F1 >= base F1 - 0.03"]
    # The road graph and the direction, where the summary has them.
    apls = {"base": 0.17, "transfer": 0.53, "scratch": 0.45}
    direction = {("transfer", "unpaved"): 0.80, ("transfer", "trail"): 0.65}
    more = [{**r, "direction_acc15": direction.get((r["model"], r["road_type"]), 0.5)} for r in rows]
    more += [{"model": m, "road_type": "all", "f1": 0.5, "recall": 0.5, "relaxed_f1": 0.5, "apls": a, "direction_acc15": 0.5} for m, a in apls.items()]
    out = targets(pd.DataFrame(more), "base", "transfer", "scratch").set_index("check")
    assert out.loc["road graph: transfer APLS > base and scratch APLS", "pass"] and out.loc["road graph: transfer APLS > base and scratch APLS", "value"] == "0.530 vs 0.170 / 0.450"
    assert out.loc["unpaved: transfer direction within 15 degrees on >= 70 % of the road", "pass"]
    assert not out.loc["trail: transfer direction within 15 degrees on >= 70 % of the road", "pass"]
    more[-2]["apls"] = 0.40  # transfer's graph now below scratch's
    assert not targets(pd.DataFrame(more), "base", "transfer", "scratch").set_index("check").loc["road graph: transfer APLS > base and scratch APLS", "pass"]
    # The ImageNet-only control joins the new-road and road-graph checks when there is one.
    more[-2]["apls"] = 0.53
    more += [{"model": "imagenet", "road_type": t, "f1": f, "recall": f, "relaxed_f1": f, "direction_acc15": 0.5, **({"apls": 0.60} if t == "all" else {})}
             for t, f in (("paved", 0.0), ("unpaved", 0.70), ("trail", 0.80), ("all", 0.5))]
    out = targets(pd.DataFrame(more), "base", "transfer", "scratch", imagenet="imagenet").set_index("check")
    assert out.loc["unpaved: transfer F1 > ImageNet-only F1", "pass"] and not out.loc["trail: transfer F1 > ImageNet-only F1", "pass"]
    graph = "road graph: transfer APLS > base and scratch and ImageNet-only APLS"
    assert not out.loc[graph, "pass"] and out.loc[graph, "value"] == "0.530 vs 0.170 / 0.450 / 0.600"


def test_apls_pairs_are_sampled_without_listing_them():
    from roadxfer.apls import sample_pairs

    rng = np.random.default_rng(0)
    small = sample_pairs(10, 1000, rng)
    assert sum(len(t) for t in small.values()) == 45  # every pair when there are few
    big = sample_pairs(2_000_000, 1000, rng)  # 2e12 pairs: listing them would need terabytes
    assert len(big) == 32 and 1000 <= sum(len(t) for t in big.values()) <= 1100
    for src, targets in big.items():
        assert src not in targets and targets.min() >= 0 and targets.max() < 2_000_000 and len(set(targets.tolist())) == len(targets)


def test_evaluation_uses_only_the_lines_of_the_scene_filter(tmp_path):
    """The sheet's filter applies to evaluation as to labelling: other lines are not the reference."""
    image = make_raster(tmp_path / "img.tif", size=(200, 200))
    lines = [LineString([(X0, Y0 - 25), (X0 + 100, Y0 - 25)]), LineString([(X0, Y0 - 75), (X0 + 100, Y0 - 75)])]
    labels = make_vectors(tmp_path / "ref.gpkg", lines, Classvalue=[1, 1], road_type=["paved", "trail"])
    pred = np.zeros((1, 200, 200), np.uint8)
    pred[0, 46:54, :] = 1  # the paved road only
    make_raster(tmp_path / "pred.tif", size=(200, 200), count=1, data=pred)
    args = (image, tmp_path / "pred.tif", None, labels, tmp_path / "m.json", EvalSettings(buffer_radius=2.0))
    everything = {r["road_type"]: r for r in evaluate_scene(*args, scene_id="s", model="m")["rows"]}
    paved_only = {r["road_type"]: r for r in evaluate_scene(*args, scene_id="s", model="m", where="road_type = 'paved'")["rows"]}
    assert "trail" in everything and everything["all"]["recall"] < 0.6
    assert "trail" not in paved_only and paved_only["all"]["recall"] == 1.0 and paved_only["all"]["precision"] == 1.0


def test_apls_compares_the_networks_on_the_scene_only(tmp_path):
    """Lines of the label file off the scene, or under an ignore window, are not part of the reference network."""
    image = make_raster(tmp_path / "img.tif", size=(200, 200))
    road = LineString([(X0, Y0 - 25), (X0 + 100, Y0 - 25)])
    far = LineString([(X0 + 5000, Y0 - 25), (X0 + 5300, Y0 - 25)])  # another scene's road in the same file
    labels = make_vectors(tmp_path / "ref.gpkg", [road, far], Classvalue=[1, 1])
    lines = make_vectors(tmp_path / "prop.gpkg", [road], layer="centrelines", class_value=[1])
    pred = np.zeros((1, 200, 200), np.uint8)
    pred[0, 46:54, :] = 1
    make_raster(tmp_path / "pred.tif", size=(200, 200), count=1, data=pred)
    res = evaluate_scene(image, tmp_path / "pred.tif", lines, labels, tmp_path / "m.json", EvalSettings(buffer_radius=2.0, road_type_field=None), scene_id="s", model="m")
    assert res["apls"]["apls"] == pytest.approx(1.0)  # the far road would leave unmatched paths
    # An ignore window over half the road: both networks are cut there, and still agree.
    res = evaluate_scene(image, tmp_path / "pred.tif", lines, labels, tmp_path / "m.json",
                         EvalSettings(buffer_radius=2.0, road_type_field=None, ignore_windows=[[0, 100, 200, 100]]), scene_id="s", model="m")
    assert res["apls"]["apls"] == pytest.approx(1.0)


def _network_scene(tmp_path: Path, size: int = 300) -> tuple[Path, Path, Path]:
    """Roads of three types every 60-90 px, and a prediction: shifted roads, a gap and speckle."""
    image = make_raster(tmp_path / "img.tif", size=(size, size), alpha_zero=(slice(0, 40), slice(250, 300)))
    lines, types = [], []
    for i, y in enumerate(range(20, size // 2, 70)):  # horizontal roads (0.5 m cells)
        lines.append(LineString([(X0, Y0 - y), (X0 + size / 2, Y0 - y - 7)]))
        types.append(("paved", "unpaved", "trail")[i % 3])
    for i, x in enumerate(range(15, size // 2, 45)):  # vertical ones
        lines.append(LineString([(X0 + x, Y0), (X0 + x + 5, Y0 - size / 2)]))
        types.append(("trail", "paved", "unpaved")[i % 3])
    labels = make_vectors(tmp_path / "ref.gpkg", lines, Classvalue=[1] * len(lines), road_type=types)
    rng = np.random.default_rng(3)
    pred = np.zeros((1, size, size), np.uint8)
    for y in range(40, size, 140):
        pred[0, y : y + 6, 10:] = 1
    pred[0, :, 28:33] = 1
    pred[0, :, 150:160] = 0  # a gap across everything
    pred[0][rng.random((size, size)) < 0.01] = 1  # speckle
    pred[0, 290:, 290:] = 255  # classified as nodata
    make_raster(tmp_path / "pred.tif", size=(size, size), count=1, data=pred)
    return image, labels, tmp_path / "pred.tif"


def test_windowed_evaluation_equals_the_whole_scene_at_once(tmp_path):
    """Windows of 64 px (halo included) count exactly what one window over the whole scene counts."""
    image, labels, pred = _network_scene(tmp_path)
    settings = EvalSettings(buffer_radius=2.0, ignore_windows=[[100, 100, 30, 50]])
    whole = evaluate_scene(image, pred, None, labels, tmp_path / "a.json", settings, scene_id="s", model="m", block=10_000)
    tiled = evaluate_scene(image, pred, None, labels, tmp_path / "b.json", settings, scene_id="s", model="m", block=64)
    assert {r["road_type"] for r in whole["rows"]} == {"all", "paved", "unpaved", "trail"}
    key = lambda res: {r["road_type"]: {k: r[k] for k in ("tp", "fp", "fn", "relaxed_tp_pred", "n_pred", "relaxed_tp_ref", "n_ref")} for r in res["rows"]}  # noqa: E731
    assert key(tiled) == key(whole)
    assert key(whole)["all"]["fp"] > 0 and key(whole)["all"]["fn"] > 0  # the case is not trivial


def test_pixels_far_from_every_road_take_their_type_from_the_coarse_split(tmp_path, monkeypatch):
    """With a halo of 4 px most pixels fall back to the coarse nearest-type map: strict counts of
    each road's own pixels stay exact and every false positive is still given to exactly one type."""
    import roadxfer.evaluate as ev

    image, labels, pred = _network_scene(tmp_path)
    settings = EvalSettings(buffer_radius=2.0, relaxed_pixels=3)
    exact = {r["road_type"]: r for r in evaluate_scene(image, pred, None, labels, tmp_path / "a.json", settings, scene_id="s", model="m", block=10_000)["rows"]}
    monkeypatch.setattr(ev, "HALO", 4)
    coarse = {r["road_type"]: r for r in evaluate_scene(image, pred, None, labels, tmp_path / "b.json", settings, scene_id="s", model="m", block=64)["rows"]}
    types = ("paved", "unpaved", "trail")
    for t in types:
        assert (coarse[t]["tp"], coarse[t]["fn"], coarse[t]["n_ref"]) == (exact[t]["tp"], exact[t]["fn"], exact[t]["n_ref"])
    assert coarse["all"] == exact["all"]
    assert sum(coarse[t]["fp"] for t in types) == exact["all"]["fp"]


def test_reference_lines_that_miss_the_scene_are_named_in_a_warning(tmp_path, caplog):
    image = make_raster(tmp_path / "img.tif", size=(100, 100))
    far = LineString([(X0 + 5000, Y0 - 25), (X0 + 5300, Y0 - 25)])
    labels = make_vectors(tmp_path / "ref.gpkg", [far], Classvalue=[1])
    lines = make_vectors(tmp_path / "prop.gpkg", [LineString([(X0, Y0 - 25), (X0 + 40, Y0 - 25)])], layer="centrelines", class_value=[1])
    make_raster(tmp_path / "pred.tif", size=(100, 100), count=1, data=np.zeros((1, 100, 100), np.uint8))
    evaluate_scene(image, tmp_path / "pred.tif", lines, labels, tmp_path / "m.json", EvalSettings(road_type_field=None), scene_id="s", model="m")
    assert "none of the 1 reference line(s) of" in caplog.text and "ref.gpkg" in caplog.text and "check the labels' layer and filter" in caplog.text


def test_retention_scenes_are_summed_apart(tmp_path):
    """Scenes of the base domain go to their own table, not into the test summary; the report checks what was kept."""
    import pandas as pd

    from roadxfer.report import targets

    def write(name, model, tp, fp, fn):
        row = {"scene": name, "model": model, "road_type": "all", "tp": tp, "fp": fp, "fn": fn, "relaxed_tp_pred": tp, "n_pred": tp + fp, "relaxed_tp_ref": tp, "n_ref": tp + fn}
        path = tmp_path / f"{model}-{name}.json"
        path.write_text(json.dumps({"scene": name, "model": model, "rows": [row], "apls": {"apls": 0.5}}))
        return path

    files = [write("test1", "base", 10, 0, 10), write("old1", "base", 90, 10, 0), write("old1", "transfer", 50, 50, 40), write("test1", "transfer", 20, 0, 0)]
    summary = aggregate(files, tmp_path / "s.csv", tmp_path / "sum.csv", out_retention=tmp_path / "ret.csv", retention_scenes=["old1"])
    assert summary.set_index("model").loc["base", "tp"] == 10  # old1 left out of the test summary
    retention = pd.read_csv(tmp_path / "ret.csv").set_index("model")
    assert retention.loc["base", "f1"] == pytest.approx(180 / 190, abs=1e-4) and retention.loc["transfer", "f1"] == pytest.approx(100 / 190, abs=1e-4)
    check = targets(summary, "base", "transfer", None, pd.read_csv(tmp_path / "ret.csv")).set_index("check")
    assert not check.loc["retention: transfer F1 >= base F1 - 0.03 on the base domain's scenes", "pass"]
    # Scored per road type the base model knew: a transfer model that also finds the new roads
    # in the retention scenes keeps its paved F1 (the same pixels as one "all" row fail).
    per_type = pd.DataFrame([{"model": m, "road_type": t, "f1": f} for m, t, f in
                             [("base", "paved", 0.90), ("base", "unpaved", 0.0), ("base", "all", 0.60),
                              ("transfer", "paved", 0.89), ("transfer", "unpaved", 0.70), ("transfer", "all", 0.50)]])
    check = targets(summary, "base", "transfer", None, per_type, ["paved"]).set_index("check")
    assert check.loc["retention (paved): transfer F1 >= base F1 - 0.03 on the base domain's scenes", "pass"]
    assert not any(c.startswith("retention: ") for c in check.index)
    assert not targets(summary, "base", "transfer", None, per_type).set_index("check").loc[
        "retention: transfer F1 >= base F1 - 0.03 on the base domain's scenes", "pass"]
    missing = targets(summary, "base", "transfer", None, per_type, ["gravel"]).set_index("check")
    assert not missing.loc["retention (gravel): transfer F1 >= base F1 - 0.03 on the base domain's scenes", "pass"]  # named, not skipped
    # No retention scene: an empty table with the summary's columns, and no retention check.
    aggregate(files[:1], tmp_path / "s.csv", tmp_path / "sum.csv", out_retention=tmp_path / "ret.csv")
    empty = pd.read_csv(tmp_path / "ret.csv")
    assert empty.empty and "f1" in empty.columns
    checks = targets(summary, "base", "transfer", None, empty)["check"].tolist()
    assert checks == ["road graph: transfer APLS > base APLS"]  # no per-type rows here, and no retention check


def test_retention_per_scene_shows_where_it_is_lost():
    """A pooled retention that passes can hide one landscape that fails: the per-scene table names it."""
    import pandas as pd

    from roadxfer.report import retention_per_scene

    rows = [("rural", "base", "paved", 0.90, 100), ("rural", "transfer", "paved", 0.95, 80),
            ("urban", "base", "paved", 0.85, 200), ("urban", "transfer", "paved", 0.75, 900),
            ("urban", "transfer", "trail", 0.40, 50), ("test1", "base", "paved", 0.5, 1), ("test1", "transfer", "paved", 0.1, 1)]
    df = pd.DataFrame([{"scene": s, "model": m, "road_type": t, "f1": f, "precision": f, "recall": f, "fp": fp} for s, m, t, f, fp in rows])
    table = retention_per_scene(df, ["rural", "urban"], "base", "transfer", ["paved"]).set_index("scene")
    assert list(table.index) == ["rural", "urban"]  # test scenes and other road types left out
    assert table.loc["rural", "within 0.03"] and not table.loc["urban", "within 0.03"]
    assert table.loc["urban", "change"] == pytest.approx(-0.10)
    assert (table.loc["urban", "fp base"], table.loc["urban", "fp transfer"]) == (200, 900)
    # Without retained types, the "all" rows; none here, so an empty table (no error).
    assert retention_per_scene(df, ["rural", "urban"], "base", "transfer").empty


def test_direction_accuracy_along_the_reference_lines(tmp_path):
    """A direction raster that says east-west everywhere is right on the east-west road, wrong on the north-south one;
    counted every cell along the lines, on the valid area only, and summed per type and over scenes."""
    image = make_raster(tmp_path / "img.tif", size=(200, 200), alpha_zero=(slice(0, 200), slice(190, 200)))
    lines = [LineString([(X0 + 5, Y0 - 25), (X0 + 100, Y0 - 25)]), LineString([(X0 + 50, Y0 - 40), (X0 + 50, Y0 - 90)])]
    labels = make_vectors(tmp_path / "ref.gpkg", lines, Classvalue=[1, 1], road_type=["paved", "trail"])
    make_raster(tmp_path / "pred.tif", size=(200, 200), count=1, data=np.zeros((1, 200, 200), np.uint8))
    direction = np.full((1, 200, 200), 90, np.uint8)  # degrees clockwise from north: east-west
    direction[0, :, 30:40] = 255  # nodata: counted, never right
    make_raster(tmp_path / "dir.tif", size=(200, 200), count=1, data=direction)
    result = evaluate_scene(image, tmp_path / "pred.tif", None, labels, tmp_path / "m.json", EvalSettings(), scene_id="s", model="m", direction=tmp_path / "dir.tif")
    rows = {r["road_type"]: r for r in result["rows"]}
    # paved: 95 m at 0.5 m cells, cut at the alpha-0 columns (x >= 95 m): 180 points, 10 of them on nodata.
    assert rows["paved"]["direction_n"] == pytest.approx(180, abs=2)
    assert rows["paved"]["direction_within_15"] == rows["paved"]["direction_n"] - 10
    assert rows["trail"]["direction_n"] == pytest.approx(100, abs=2) and rows["trail"]["direction_within_15"] == 0
    assert rows["all"]["direction_n"] == rows["paved"]["direction_n"] + rows["trail"]["direction_n"]
    summary = aggregate([tmp_path / "m.json"], tmp_path / "s.csv", tmp_path / "sum.csv").set_index("road_type")
    assert summary.loc["trail", "direction_acc15"] == 0 and summary.loc["paved", "direction_acc15"] == pytest.approx(170 / 180, abs=0.01)
    # North-south everywhere: the other way round.
    make_raster(tmp_path / "dir.tif", size=(200, 200), count=1, data=np.zeros((1, 200, 200), np.uint8))
    rows = {r["road_type"]: r for r in evaluate_scene(image, tmp_path / "pred.tif", None, labels, tmp_path / "m.json", EvalSettings(), scene_id="s", model="m",
                                                       direction=tmp_path / "dir.tif")["rows"]}
    assert rows["paved"]["direction_acc15"] == 0 and rows["trail"]["direction_acc15"] == 1


def test_checks_use_the_mean_over_replicate_runs():
    """With replicates, one lucky or unlucky run does not decide a check: the mean over the runs does."""
    import pandas as pd

    from roadxfer.report import mean_over_replicates, spread, targets

    rows = [("base", "trail", 0.0), ("transfer", "trail", 0.80), ("t2", "trail", 0.70), ("t3", "trail", 0.75),
            ("scratch", "trail", 0.60), ("s2", "trail", 0.90), ("s3", "trail", 0.90), ("t2", "unpaved", 0.5)]
    summary = pd.DataFrame([{"model": m, "road_type": t, "f1": f, "recall": f, "relaxed_f1": f} for m, t, f in rows])
    check = "trail: transfer F1 > scratch F1"
    single = targets(summary, "base", "transfer", "scratch").set_index("check")
    assert single.loc[check, "pass"]  # one run each: 0.80 > 0.60
    reps = {"transfer": ["t2", "t3"], "scratch": ["s2", "s3"]}
    means = mean_over_replicates(summary, reps)
    assert means.set_index(["model", "road_type"]).loc[("transfer", "trail"), "f1"] == pytest.approx(0.75)
    assert means.set_index(["model", "road_type"]).loc[("scratch", "trail"), "f1"] == pytest.approx(0.80)
    assert not targets(means, "base", "transfer", "scratch").set_index("check").loc[check, "pass"]  # 0.75 < 0.80
    assert summary.set_index(["model", "road_type"]).loc[("transfer", "trail"), "f1"] == 0.80  # the input is left alone
    table = spread(summary, reps).set_index(["model", "road_type"])
    assert table.loc[("scratch", "trail"), "runs"] == 3 and table.loc[("scratch", "trail"), "f1 min"] == 0.60
    assert table.loc[("transfer", "unpaved"), "runs"] == 1  # only one run has unpaved rows: shown, not averaged
    assert "unpaved" not in set(means.loc[means["model"] == "transfer", "road_type"])
