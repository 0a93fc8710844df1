"""Imagery nobody here made: the SpaceNet Las Vegas scene through labels, tiles, classification and evaluation.

Geographic CRS (EPSG:4326, about 0.3 m cells), an alpha band, real road centrelines without a
class field, and a burned-in logo and credit line masked out with ``ignore_windows``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio

from conftest import ROAD, ROOT
from roadxfer.classify import ClassifySettings, classify_scene
from roadxfer.evaluate import EvalSettings, evaluate_scene
from roadxfer.labels import LabelSettings, rasterize_scene
from roadxfer.tiles import TileSettings, export_tiles, read_dataset
from roadxfer.train import train, TrainConfig

DATA = ROOT / "tests" / "data" / "spacenet-vegas"
IMAGE = DATA / "RGB-PanSharpen_AOI_2_Vegas_img0.tif"
ROADS = DATA / "AOI_2_Vegas_img0.geojson"
LOGOS = [[1255, 0, 45, 300], [1170, 1020, 70, 270]]  # credit line and SpaceNet logo: row, column, height, width


pytestmark = pytest.mark.slow  # a real scene labelled, tiled, trained on and classified: about a minute


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, object]:
    out = tmp_path_factory.mktemp("vegas")
    labels = rasterize_scene(IMAGE, ROADS, out / "label.tif", out / "orientation.tif", out / "summary.json", LabelSettings(buffer_radius=2.0, class_value=1))
    tiles = export_tiles(IMAGE, out / "label.tif", out / "orientation.tif", out / "tiles", TileSettings(tile_size=128, stride=128), scene_id="vegas")
    # A tiny model trained on the scene's own tiles: this checks the plumbing on real data, not accuracy.
    best = train([out / "tiles"], out / "tiny", TrainConfig(backbone="resnet18", epochs=2, batch_size=8, patience=0, val_split="tile"), classes=ROAD, threads=2)
    summary = classify_scene(IMAGE, out / "tiny", out / "c" / "classes.tif", out_probability=out / "c" / "probability.tif", out_centrelines=out / "c" / "centrelines.gpkg",
                             settings=ClassifySettings(tile_size=128))
    settings = dict(buffer_radius=2.0, road_type_field=None, apls_spacing=10.0, apls_snap=4.0, apls_max_pairs=300)
    masked = evaluate_scene(IMAGE, out / "c" / "classes.tif", out / "c" / "centrelines.gpkg", ROADS, out / "m.json", EvalSettings(**settings, ignore_windows=LOGOS), scene_id="vegas", model="ref")
    whole = evaluate_scene(IMAGE, out / "c" / "classes.tif", None, ROADS, out / "w.json", EvalSettings(**settings), scene_id="vegas", model="ref")
    return {"out": out, "labels": labels, "tiles": tiles, "classify": summary, "masked": masked, "whole": whole, "best": best}


def test_labels_and_tiles_of_a_real_geographic_scene(run):
    out = run["out"]
    assert run["labels"]["features"] == 38 and run["labels"]["pixels_per_class"]["1"] > 50_000  # 4.46 km, 4 m wide, 0.3 m cells
    with rasterio.open(IMAGE) as img, rasterio.open(out / "label.tif") as lab:
        assert (lab.crs, lab.transform, lab.shape) == (img.crs, img.transform, img.shape)
    ds = read_dataset(out / "tiles")
    assert ds.bands == 3 and ds.tile_size == 128 and ds.cell_size == pytest.approx(0.30, abs=0.01)  # metres, not degrees
    assert len(ds.images) == run["tiles"]["NumTiles"] > 20


def test_classification_and_evaluation_of_a_real_scene(run):
    out = run["out"]
    with rasterio.open(IMAGE) as img, rasterio.open(out / "c" / "classes.tif") as c:
        assert (c.crs, c.transform, c.shape) == (img.crs, img.transform, img.shape)
        assert set(np.unique(c.read(1)).tolist()) <= {0, 1}  # the alpha band is all 255: no nodata
    rows = {r["road_type"]: r for r in run["masked"]["rows"]}
    allr = rows["all"]
    for key in ("precision", "recall", "f1"):
        assert 0 <= allr[key] <= 1
    assert 0 <= run["masked"]["apls"]["apls"] <= 1 and 0 <= run["best"]["val_road_iou"] <= 1
    whole = {r["road_type"]: r for r in run["whole"]["rows"]}["all"]
    assert allr["n_pred"] <= whole["n_pred"] and allr["n_ref"] < whole["n_ref"]  # pixels under the logos do not count
    assert json.loads((out / "m.json").read_text())["scene"] == "vegas"


def test_logo_windows_are_left_out_of_the_evaluation(run, tmp_path):
    """Road pixels painted over the logo and the credit line are false positives only when not masked."""
    with rasterio.open(run["out"] / "label.tif") as src:
        pred, profile = src.read(1), src.profile
    painted = 0
    for r0, c0, h, w in LOGOS:
        block = pred[r0 + 10 : r0 + 30, c0 + 10 : c0 + 200]
        painted += int((block == 0).sum())  # new road pixels where there is no reference road
        block[:] = 1
    with rasterio.open(tmp_path / "pred.tif", "w", **profile) as dst:
        dst.write(pred, 1)
    settings = dict(buffer_radius=2.0, road_type_field=None, apls_spacing=10.0, apls_snap=4.0, apls_max_pairs=100)
    masked = evaluate_scene(IMAGE, tmp_path / "pred.tif", None, ROADS, tmp_path / "m.json", EvalSettings(**settings, ignore_windows=LOGOS), scene_id="vegas", model="p")
    whole = evaluate_scene(IMAGE, tmp_path / "pred.tif", None, ROADS, tmp_path / "w.json", EvalSettings(**settings), scene_id="vegas", model="p")
    m, w = ({r["road_type"]: r for r in res["rows"]}["all"] for res in (masked, whole))
    assert painted > 5000 and w["fp"] - m["fp"] == painted and m["fp"] == 0
