"""Imagery as satellites deliver it: 16-bit, 4-band and 1-band panchromatic scenes, band selection and rescale."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from conftest import ROAD, make_raster, satellite_scene

from roadxfer.classify import ClassifySettings, classify_scene
from roadxfer.errors import InputError
from roadxfer.evaluate import EvalSettings, evaluate_scene
from roadxfer.labels import LabelSettings, rasterize_scene
from roadxfer.package import load_package
from roadxfer.radiometry import Radiometry, Stretch
from roadxfer.raster import image_info, read_window
from roadxfer.tiles import TileSettings, export_tiles, read_dataset
from roadxfer.train import train, TrainConfig



@pytest.fixture(scope="module", params=["4band", "pan"])
def pipeline(request, tmp_path_factory):
    """labels -> tiles -> a tiny model -> classification -> evaluation, on a 16-bit scene."""
    out = tmp_path_factory.mktemp(request.param)
    image, labels = satellite_scene(out, request.param)
    n = 4 if request.param == "4band" else 1
    kwargs = {"allowed_band_counts": (n,), "allowed_dtypes": ("uint8", "uint16")}
    rasterize_scene(image, labels, out / "label.tif", out / "orientation.tif", out / "summary.json", LabelSettings(buffer_radius=2.0), image_kwargs=kwargs)
    stats = export_tiles(image, out / "label.tif", out / "orientation.tif", out / "tiles", TileSettings(tile_size=128, stride=64), scene_id="s", image_kwargs=kwargs)
    train([out / "tiles"], out / "model", TrainConfig(backbone="resnet18", epochs=1, batch_size=4, patience=0, val_split="tile"), classes=ROAD, threads=2)
    summary = classify_scene(image, out / "model", out / "c" / "classes.tif", out_probability=out / "c" / "probability.tif",
                             out_centrelines=out / "c" / "centrelines.gpkg", settings=ClassifySettings(tile_size=128))
    ev = evaluate_scene(image, out / "c" / "classes.tif", out / "c" / "centrelines.gpkg", labels, out / "m.json", EvalSettings(), scene_id="s", model="m",
                        image_kwargs=kwargs)
    return {"out": out, "image": image, "bands": n, "stats": stats, "classify": summary, "eval": ev}


def test_16_bit_scenes_run_end_to_end(pipeline):
    out, n = pipeline["out"], pipeline["bands"]
    ds = read_dataset(out / "tiles")
    assert ds.bands == n and ds.source_bands == tuple(range(1, n + 1))
    with rasterio.open(ds.images[0]) as chip:
        assert chip.dtypes[0] == "uint8" and chip.count == n
        assert chip.read().max() > 200  # stretched onto 0-255, not clipped 16-bit values
    stretch = ds.radiometry["stretch"]
    assert stretch["method"] == "percentile" and stretch["source_dtype"] == "uint16" and len(stretch["low"]) == n
    assert all(hi > lo > 255 or hi > 255 for lo, hi in zip(stretch["low"], stretch["high"]))  # 11-bit values, not 8-bit
    pkg = load_package(out / "model")
    assert pkg.spec.in_channels == n
    rec = pkg.emd["roadxfer"]["radiometry"]
    assert rec["settings"]["method"] == "auto" and rec["source_bands"] == list(range(1, n + 1))
    assert list(rec["stretches"].values()) == [stretch]
    with rasterio.open(out / "c" / "classes.tif") as c, rasterio.open(pipeline["image"]) as img:
        assert (c.transform, c.shape) == (img.transform, img.shape)
        applied = json.loads(c.tags()["ROADXFER_RESCALE"])
    # Classification computed the same scene's stretch by the package's method: the same numbers as the export's.
    assert applied["method"] == "percentile" and applied["low"] == pytest.approx(stretch["low"]) and applied["high"] == pytest.approx(stretch["high"])
    rows = {r["road_type"]: r for r in pipeline["eval"]["rows"]}
    assert rows["all"]["n_ref"] > 0 and 0 <= rows["all"]["f1"] <= 1


def test_stretch_maps_percentiles_to_the_8_bit_range(tmp_path):
    data = np.arange(10_000, dtype=np.uint16).reshape(1, 100, 100) + 1000  # 1000..10999
    image = make_raster(tmp_path / "img.tif", size=(100, 100), data=data, dtype="uint16")
    info = image_info(image, allowed_band_counts=(1,), allowed_dtypes=("uint16",), radiometry=Radiometry("percentile", (1.0, 99.0)))
    s = info.stretch
    assert s.low[0] == pytest.approx(1000 + 0.01 * 9999) and s.high[0] == pytest.approx(1000 + 0.99 * 9999)
    assert s.clipped == pytest.approx(0.02, abs=0.001)
    with rasterio.open(image) as src:
        px, valid = read_window(src, info, rasterio.windows.Window(0, 0, 100, 100))
    assert px.dtype == np.uint8 and valid.all()
    assert px[0, 0, 0] == 0 and px[0, -1, -1] == 255 and px[0, 50, 0] == round((6000 - s.low[0]) / (s.high[0] - s.low[0]) * 255)
    # minmax covers the whole range, fixed takes the user's numbers
    mm = image_info(image, allowed_band_counts=(1,), allowed_dtypes=None, radiometry=Radiometry("minmax")).stretch
    assert (mm.low, mm.high, mm.clipped) == ((1000.0,), (10999.0,), 0.0)
    fixed = image_info(image, allowed_band_counts=(1,), allowed_dtypes=None, radiometry=Radiometry("fixed", low=(0.0,), high=(20000.0,))).stretch
    assert fixed.high == (20000.0,)
    assert Stretch.from_dict(fixed.to_dict()) == fixed


def test_a_rescale_that_clips_most_pixels_is_refused_naming_the_file(tmp_path):
    data = np.full((1, 50, 50), 3000, np.uint16)
    image = make_raster(tmp_path / "img.tif", size=(50, 50), data=data, dtype="uint16")
    with pytest.raises(InputError, match=r"img\.tif: the fixed rescale from \[0\.0\] to \[255\.0\] clips 100% of the valid pixels.*Fix: widen"):
        image_info(image, allowed_band_counts=(1,), allowed_dtypes=None, radiometry=Radiometry("fixed", low=(0.0,), high=(255.0,)))
    with pytest.raises(InputError, match=r"img\.tif: has pixel type uint16 and image.rescale.method is none"):
        image_info(image, allowed_band_counts=(1,), allowed_dtypes=None, radiometry=Radiometry("none"))
    # Export refuses it before anything is written.
    make_raster(tmp_path / "label.tif", size=(50, 50), count=1, data=np.ones((1, 50, 50), np.uint8))
    with pytest.raises(InputError, match="clips"):
        export_tiles(image, tmp_path / "label.tif", tmp_path / "label.tif", tmp_path / "tiles", TileSettings(tile_size=32, stride=32),
                     image_kwargs={"allowed_band_counts": (1,), "allowed_dtypes": None}, radiometry=Radiometry("fixed", low=(0.0,), high=(255.0,)))
    assert not (tmp_path / "tiles").exists()


def test_band_selection_reorders_and_skips_bands(tmp_path):
    data = np.stack([np.full((40, 40), v, np.uint8) for v in (10, 20, 30, 40, 50)])
    image = make_raster(tmp_path / "img.tif", size=(40, 40), data=data)
    info = image_info(image, allowed_band_counts=(3,), bands=[5, 3, 1], radiometry=Radiometry())
    with rasterio.open(image) as src:
        px, _ = read_window(src, info, rasterio.windows.Window(0, 0, 40, 40))
    assert px[:, 0, 0].tolist() == [50, 30, 10]
    with pytest.raises(InputError, match=r"has bands 1-5; image.bands asks for \[6\]"):
        image_info(image, allowed_band_counts=(1,), bands=[6])
