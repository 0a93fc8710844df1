"""Step 4: whole-scene classification."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import rasterio.warp
import shapely
import torch
import torch.nn.functional as F
from conftest import SHIPPED_MODEL, make_raster, make_vectors
from shapely.geometry import LineString

from roadxfer import IGNORE_VALUE
from roadxfer import centrelines as cl
from roadxfer.classify import ClassifySettings, classify_scene, count_tiles, edge_weights, merge_shards, resampled_strips, shard_windows, starts, stitch
from roadxfer.errors import InputError
from roadxfer.raster import image_info, resampled_grid

KERNEL = torch.arange(1, 26, dtype=torch.float32).view(1, 1, 5, 5) / 325.0  # asymmetric: catches flips/shifts


def conv_model(x: torch.Tensor) -> torch.Tensor:
    """A model whose exact answer is known: a fixed 5x5 convolution (zero padding) of each band."""
    y = F.conv2d(x.reshape(-1, 1, *x.shape[-2:]), KERNEL, padding=2).reshape(x.shape)
    return torch.cat([y, 1 - y[:, :1]], 1)  # 4 output channels


@pytest.mark.parametrize(("size", "tile", "overlap", "margin"), [((100, 75), 32, 16, 4), ((64, 64), 64, 16, 4), ((20, 25), 32, 8, 2), ((97, 131), 32, 8, 2), ((70, 70), 32, 12, 3)])
def test_stitching_equals_whole_image(tmp_path, size, tile, overlap, margin):
    image = make_raster(tmp_path / "img.tif", size=size)
    info = image_info(image)
    with rasterio.open(image) as src:
        whole = conv_model(torch.from_numpy(src.read()).float()[None] / 255.0)[0].numpy()
        got = np.full(whole.shape, np.nan, np.float32)
        for y, probs, valid in stitch(src, info, conv_model, 4, tile=tile, overlap=overlap, margin=margin, batch_size=3, device=torch.device("cpu")):
            got[:, y : y + probs.shape[1]] = probs.numpy()
            assert valid.all()
    assert not np.isnan(got).any()  # every row and column written, including the last ones
    np.testing.assert_allclose(got, whole, atol=1e-5)


def test_blend_weights_cover_every_pixel():
    for n, tile, overlap, margin in ((1000, 256, 64, 16), (300, 128, 32, 8), (129, 128, 40, 10)):
        cover = np.zeros(n)
        s = starts(n, tile, tile - overlap)
        for i, x in enumerate(s):
            cover[x : x + tile] += edge_weights(tile, overlap, margin, i > 0, i < len(s) - 1)
        assert (cover > 0).all() and s[-1] + tile == n
    w = edge_weights(64, 16, 4, True, True)
    assert (w[:4] == 0).all() and (w[-4:] == 0).all() and (w[16:48] == 1).all()


def test_outputs_on_input_grid_with_nodata(tmp_path, package):
    image = make_raster(tmp_path / "img.tif", size=(90, 130), alpha_zero=(slice(0, 90), slice(0, 20)))
    out = tmp_path / "out"
    summary = classify_scene(image, package, out / "c.tif", out_probability=out / "p.tif", out_centrelines=out / "l.gpkg", settings=ClassifySettings(batch_size=4))
    with rasterio.open(image) as src, rasterio.open(out / "c.tif") as c, rasterio.open(out / "p.tif") as p:
        for ds in (c, p):
            assert (ds.transform, ds.crs, ds.shape) == (src.transform, src.crs, src.shape)
            assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            assert ds.nodata == IGNORE_VALUE
        cls, prob = c.read(1), p.read(1)
    assert (cls[:, :20] == IGNORE_VALUE).all() and (prob[:, :20] == IGNORE_VALUE).all()
    assert set(np.unique(cls[:, 20:]).tolist()) <= {0, 1}
    assert prob[:, 20:].max() <= 250
    assert summary["tiles"] == len(starts(90, 64, 48)) * len(starts(130, 64, 48))
    assert (out / "l.gpkg").is_file()
    # The outputs with their attribute table and styles, and no temporaries left.
    assert sorted(p.name for p in out.iterdir()) == ["c.qml", "c.tif", "c.tif.aux.xml", "l.gpkg", "p.qml", "p.tif"]


def test_outputs_describe_themselves(tmp_path, package):
    """Colour table, attribute table, band descriptions, tags, QGIS styles; still valid COGs."""
    import sqlite3
    import xml.etree.ElementTree as ET

    from rio_cogeo.cogeo import cog_validate

    image = make_raster(tmp_path / "img.tif", size=(90, 130))
    out = tmp_path / "out"
    classify_scene(image, package, out / "classes.tif", out_probability=out / "probability.tif", out_centrelines=out / "centrelines.gpkg",
                   settings=ClassifySettings(threshold=0.4))
    with rasterio.open(out / "classes.tif") as c, rasterio.open(out / "probability.tif") as p:
        assert c.colormap(1)[1] == (255, 0, 0, 255) and c.colormap(1)[0][:3] == (0, 0, 0)  # TIFF palettes hold no alpha: the QGIS style hides the background
        assert c.descriptions[0].startswith("road class (1 road") and p.descriptions[0].startswith("road probability")
        for ds in (c, p):
            tags = ds.tags()
            assert tags["ROADXFER_MODEL"] == "m" and len(tags["ROADXFER_MODEL_WEIGHTS_SHA256"]) == 64
            assert tags["ROADXFER_THRESHOLD"] == "0.4" and tags["ROADXFER_TTA"] == "false" and tags["ROADXFER_INPUT_SCENE"] == str(image)
            assert tags["ROADXFER_VERSION"] and tags["ROADXFER_CREATED"].endswith("Z")
    for raster in ("classes.tif", "probability.tif"):
        valid, errors, _ = cog_validate(str(out / raster))
        assert valid, errors
    rat = ET.parse(out / "classes.tif.aux.xml").getroot().find("PAMRasterBand/GDALRasterAttributeTable")
    assert [f.findtext("Name") for f in rat.findall("FieldDefn")] == ["Value", "Class_Name", "Red", "Green", "Blue"]
    assert [[v.text for v in row.findall("F")] for row in rat.findall("Row")] == [["0", "background", "0", "0", "0"], ["1", "road", "255", "0", "0"]]
    palette = ET.parse(out / "classes.qml").getroot().find("pipe/rasterrenderer")
    assert palette.get("type") == "paletted" and palette.find("colorPalette/paletteEntry[@value='1']").get("label") == "road"
    assert ET.parse(out / "probability.qml").getroot().find("pipe/rasterrenderer").get("type") == "singlebandpseudocolor"
    with sqlite3.connect(out / "centrelines.gpkg") as con:
        (qml, default), = con.execute("SELECT styleQML, useAsDefault FROM layer_styles WHERE f_table_name = 'centrelines'").fetchall()
    assert default == 1 and ET.fromstring(qml.split("\n", 1)[1]).find("renderer-v2").get("attr") == "class_value"
    lines = gpd.read_file(out / "centrelines.gpkg", layer="centrelines")
    assert {"class_value", "class_name", "length_m", "mean_probability", "min_probability"} <= set(lines.columns)
    if len(lines):
        assert (lines["min_probability"] <= lines["mean_probability"]).all() and lines["mean_probability"].between(0, 1).all()


def test_gdal_reads_the_attribute_table(tmp_path, package):
    """What GDAL itself makes of classes.tif (needs GDAL's command-line tools: gdal-bin)."""
    import json
    import shutil
    import subprocess

    if not shutil.which("gdalinfo"):
        pytest.skip("gdalinfo not installed (apt-get install gdal-bin)")
    image = make_raster(tmp_path / "img.tif", size=(64, 64))
    classify_scene(image, package, tmp_path / "classes.tif")
    info = json.loads(subprocess.run(["gdalinfo", "-json", str(tmp_path / "classes.tif")], capture_output=True, text=True, check=True).stdout)
    band = info["bands"][0]
    assert band["colorInterpretation"] == "Palette" and band["description"].startswith("road class")
    rows = {r["f"][0]: r["f"][1] for r in info["rat"]["row"]}
    assert rows == {0: "background", 1: "road"} and info["metadata"][""]["ROADXFER_MODEL"] == "m"


def test_tta_and_float32_probability(tmp_path, package):
    image = make_raster(tmp_path / "img.tif", size=(64, 64))  # one tile: no blending
    classify_scene(image, package, tmp_path / "c.tif", out_probability=tmp_path / "p.tif", settings=ClassifySettings(tta=True, probability_dtype="float32", threshold=0.5, precision="fp32"))
    with rasterio.open(tmp_path / "p.tif") as p:
        prob = p.read(1)
        assert p.dtypes[0] == "float32" and np.isfinite(prob).all() and 0 <= prob.min() and prob.max() <= 1
    with rasterio.open(tmp_path / "c.tif") as c:
        np.testing.assert_array_equal(c.read(1), (prob >= 0.5).astype(np.uint8))
    # The expected answer, computed here: P(road) averaged over the 8 flips/rotations, each mapped back.
    from roadxfer.package import load_package

    pkg = load_package(package)
    with rasterio.open(image) as src:
        x = src.read().astype(np.float32) / 255.0
    mean, std = np.array(pkg.mean, np.float32)[:, None, None], np.array(pkg.std, np.float32)[:, None, None]
    views = []
    for flip in (False, True):
        xf = x[:, :, ::-1] if flip else x
        for k in range(4):
            xv = np.ascontiguousarray(np.rot90(xf, k, (1, 2)))
            with torch.no_grad():
                p_road = 1 - torch.softmax(pkg.model.segment(torch.from_numpy((xv - mean) / std)[None]), 1)[0, 0].numpy()
            back = np.rot90(p_road, -k)
            views.append(back[:, ::-1] if flip else back)
    np.testing.assert_allclose(prob, np.mean(views, 0), atol=1e-5)
    assert np.abs(views[0] - np.mean(views, 0)).max() > 1e-3  # the views differ: TTA is not a no-op here


@pytest.mark.parametrize(("kw", "settings", "pattern"), [
    ({"count": 2}, {}, r"img\.tif: has 2 image band\(s\).*takes 3 band"),
    ({"count": 5}, {}, r"img\.tif: has 5 image band\(s\)"),
    ({"dtype": "uint16"}, {"rescale": {"method": "none"}}, r"img\.tif: has pixel type uint16 and image.rescale.method is none"),
    ({"count": 3}, {"bands": (1, 2, 4)}, r"img\.tif: has bands 1-3; image.bands asks for \[1, 2, 4\]"),
])
def test_band_and_dtype_mismatch(tmp_path, package, kw, settings, pattern):
    image = make_raster(tmp_path / "img.tif", size=(64, 64), **kw)
    with pytest.raises(InputError, match=pattern):
        classify_scene(image, package, tmp_path / "c.tif", settings=ClassifySettings(**settings))
    assert not (tmp_path / "c.tif").exists()


def test_cell_size_mismatch_warns_with_resampling_off(tmp_path, package, caplog):
    image = make_raster(tmp_path / "img.tif", size=(64, 64), cell=2.0)
    summary = classify_scene(image, package, tmp_path / "c.tif", settings=ClassifySettings(resample="off"))
    assert "the model was trained at 0.5 m" in caplog.text and summary["resampled_to_m"] is None


def _smooth_image(path: Path, size: tuple[int, int], cell: float) -> Path:
    """Low-frequency content (periods of 24-40 m), so that resampling it loses little."""
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]] * cell
    data = np.stack([128 + 100 * np.sin(xx / 6.0 + k) * np.cos(yy / 4.0 - k) for k in range(3)]).astype(np.uint8)
    return make_raster(path, size=size, cell=cell, data=data)


def test_resampling_to_the_same_grid_changes_nothing(tmp_path):
    """The model-grid path with the scene's own grid gives the direct result (no half-pixel shift), up to the 1/250 quantisation."""
    image = _smooth_image(tmp_path / "img.tif", (90, 110), 0.5)
    info = image_info(image)
    geometry = {"tile": 32, "overlap": 8, "margin": 2, "batch_size": 4, "device": torch.device("cpu")}
    with rasterio.open(image) as src:
        direct = np.concatenate([p.numpy() for _, p, _ in stitch(src, info, conv_model, 4, **geometry)], 1)
        strips = list(resampled_strips(src, info, (info.transform, info.width, info.height), conv_model, 4, tmp_path / "grid.tif", rows=40, **geometry))
    assert [y for y, _, _ in strips] == [0, 40, 80] and all(v.all() for _, _, v in strips)
    via = np.concatenate([p.numpy() for _, p, _ in strips], 1)
    assert via.shape == direct.shape
    assert np.abs(via - direct).max() <= 0.5 / 250 + 1e-6


def test_a_coarse_scene_is_classified_on_the_model_grid_and_written_on_its_own(tmp_path, package):
    """A 1 m scene with a 0.5 m model: classified on a grid twice as fine, outputs on the scene's grid."""
    image = _smooth_image(tmp_path / "img.tif", (60, 70), 1.0)
    info = image_info(image)
    grid = resampled_grid(info, 0.5)
    assert (grid[1], grid[2], grid[0].a) == (140, 120, 0.5) and (grid[0].c, grid[0].f) == (info.transform.c, info.transform.f)
    geometry = {"tile": 32, "overlap": 8, "margin": 2, "batch_size": 4, "device": torch.device("cpu")}
    with rasterio.open(image) as src:
        direct = np.concatenate([p.numpy() for _, p, _ in stitch(src, info, conv_model, 4, **geometry)], 1)
        via = np.concatenate([p.numpy() for _, p, _ in resampled_strips(src, info, grid, conv_model, 4, tmp_path / "grid.tif", **geometry)], 1)
    assert via.shape == direct.shape
    # Expected: the model run on the scene warped to 0.5 m (bilinear), then averaged back to 1 m cells.
    fine = tmp_path / "fine.tif"
    with rasterio.open(image) as src:
        data = np.zeros((3, 120, 140), np.uint8)
        rasterio.warp.reproject(src.read(), data, src_transform=src.transform, src_crs=src.crs, dst_transform=grid[0], dst_crs=src.crs,
                                resampling=rasterio.enums.Resampling.bilinear)
    make_raster(fine, size=(120, 140), cell=0.5, data=data)
    with rasterio.open(fine) as src:
        on_fine = np.concatenate([p.numpy() for _, p, _ in stitch(src, image_info(fine), conv_model, 4, **geometry)], 1)
    expected = on_fine.reshape(4, 60, 2, 70, 2).mean((2, 4))
    inner = (slice(None), slice(3, -3), slice(3, -3))
    assert np.abs(via - expected)[inner].mean() < 0.004 < np.abs(direct - expected)[inner].mean()  # not simply the 1 m result
    out = tmp_path / "out"
    summary = classify_scene(image, package, out / "c.tif", out_probability=out / "p.tif", settings=ClassifySettings())
    assert summary["resampled_to_m"] == 0.5 and summary["tiles"] == len(starts(120, 64, 48)) * len(starts(140, 64, 48))
    with rasterio.open(image) as src, rasterio.open(out / "c.tif") as c, rasterio.open(out / "p.tif") as p:
        assert (c.transform, c.shape) == (src.transform, src.shape) == (p.transform, p.shape)
        assert (p.read(1) != IGNORE_VALUE).all()


def _mask_raster(path: Path, mask: np.ndarray, cell: float = 1.0) -> Path:
    return make_raster(path, data=mask[None].astype(np.uint8), size=mask.shape, cell=cell, count=1)


def _network() -> np.ndarray:
    m = np.zeros((300, 300), np.uint8)
    m[98:103, 20:221] = 1  # horizontal bar of a cross, 200 px
    m[20:181, 118:123] = 1  # vertical bar, 160 px, crossing at (100, 120)
    m[250:255, 30:131] = 1  # an L: 100 px east...
    m[150:255, 126:131] = 1  # ...and 100 px north
    return m


@pytest.mark.parametrize("block", [2048, 64])
def test_centrelines_of_a_known_network(tmp_path, monkeypatch, block):
    monkeypatch.setattr(cl, "BLOCK", block)
    monkeypatch.setattr(cl, "HALO", 16)
    raster = _mask_raster(tmp_path / "m.tif", _network())
    n = cl.centrelines_from_raster(raster, tmp_path / "l.gpkg", classes=[{"Value": 1, "Name": "road"}], min_length=5, bridge=0)
    gdf = gpd.read_file(tmp_path / "l.gpkg", layer="centrelines")
    assert n == len(gdf) == 5  # four arms of the cross, one L
    arms = sorted(gdf.length.round())
    assert arms[-1] == pytest.approx(200, abs=8)  # the L: 100 + 100
    assert sum(arms[:-1]) == pytest.approx(200 + 160, abs=12)
    assert set(gdf["class_value"]) == {1} and np.allclose(gdf["length_m"], gdf.length)


def test_clean_network_drops_spurs_and_specks_but_never_cuts_a_road():
    from shapely import LineString

    # A road through a junction "cluster": two short pieces between two junction points,
    # each junction with a short spur; a long side road; and a speck far away.
    lines = [
        LineString([(0, 0), (100, 0)]),
        LineString([(100, 0), (102, 0)]),  # 2 px between junctions: must stay
        LineString([(102, 0), (200, 0)]),
        LineString([(100, 0), (100, 3)]),  # spur, 3 px
        LineString([(102, 0), (102, -4)]),  # spur, 4 px
        LineString([(150, 0), (150, 80)]),  # real side road, 80 px
        LineString([(300, 300), (303, 300)]),  # speck
    ]
    out = cl.clean_network(lines, spur=5, min_length=5)
    g = shapely.union_all(out)
    assert g.length == pytest.approx(200 + 80)
    assert g.covers(LineString([(0, 0), (200, 0)]))  # the road is whole, junction pieces included
    assert not g.intersects(shapely.box(299, 299, 304, 301))


def test_clean_network_drops_tiny_loops_but_keeps_a_loop_road():
    from shapely import LineString

    # A junction's pixel ring (two junctions snapped into one leave such a closed piece)
    # splits the road at its node; a 60 px loop road (a cul-de-sac) is a real road.
    lines = [
        LineString([(0, 0), (50, 0)]),
        LineString([(50, 0), (100, 0)]),
        LineString([(50, 0), (51, 1), (50, 2), (49, 1), (50, 0)]),  # closed, 5.7 px
        LineString([(100, 0), (100, 20), (120, 20), (120, 0), (100, 0)]),  # closed, 80 px at the road's end
    ]
    out = cl.clean_network(lines, spur=10, min_length=10)
    assert not any(ln.is_closed and ln.length < 10 for ln in out)
    open_lines = [ln for ln in out if not ln.is_closed]
    assert len(open_lines) == 1 and open_lines[0].length == pytest.approx(100)  # one road through the former ring's node
    assert shapely.union_all(out).length == pytest.approx(100 + 80)


def test_centrelines_of_a_ragged_road_stay_connected(tmp_path):
    rng = np.random.default_rng(0)
    m = np.zeros((80, 400), np.uint8)
    m[35:46, 10:390] = 1
    for c in rng.choice(np.arange(20, 380), 40, replace=False):  # bumps grow skeleton spurs
        side = rng.choice([-1, 1])
        r = 34 if side < 0 else 46
        m[r - 2 * (side < 0): r + 2 * (side > 0) + (side > 0), c: c + 3] = 1
    raster = _mask_raster(tmp_path / "m.tif", m, cell=0.3)
    cl.centrelines_from_raster(raster, tmp_path / "l.gpkg", classes=[{"Value": 1, "Name": "road"}], min_length=5, bridge=0)
    gdf = gpd.read_file(tmp_path / "l.gpkg", layer="centrelines")
    merged = shapely.line_merge(shapely.union_all(list(gdf.geometry)))
    assert merged.geom_type == "LineString"  # one piece from end to end, no spur left
    assert 0.9 * 380 * 0.3 < merged.length <= 380 * 0.3  # the skeleton stops short of the square ends


def test_bridge_gaps_joins_a_road_across_a_gap_but_not_a_side_line():
    from shapely import LineString

    road = [LineString([(0, 0), (100, 0)]), LineString([(108, 0.5), (200, 0.5)])]  # an 8 px gap
    parallel = LineString([(0, 30), (100, 30)])  # 30 px beside the road: no join
    t_end = LineString([(150, 20), (150, 6)])  # a side road stopping 5.5 px short of the road
    out = cl.clean_network(cl.bridge_gaps(road + [parallel, t_end], max_gap=10), spur=1, min_length=0)
    import networkx as nx

    from roadxfer.apls import graph_from_lines

    graph = graph_from_lines(out, spacing=1000)
    ends = {n: n for n in graph.nodes}
    a = min(ends, key=lambda n: np.hypot(n[0] - 0, n[1] - 0))
    b = min(ends, key=lambda n: np.hypot(n[0] - 200, n[1] - 0.5))
    c = min(ends, key=lambda n: np.hypot(n[0] - 150, n[1] - 20))
    d = min(ends, key=lambda n: np.hypot(n[0] - 0, n[1] - 30))
    assert nx.has_path(graph, a, b) and nx.has_path(graph, c, a)  # gap and T-junction bridged
    assert not nx.has_path(graph, a, d)  # the parallel line stays apart
    # Nothing to bridge within the limit: unchanged.
    assert cl.bridge_gaps(road, max_gap=5) == road


def test_cell_size_is_recorded_and_compared_in_metres(tmp_path):
    """A model trained on geographic imagery records metres, and the same imagery raises no warning."""
    import logging

    from roadxfer.labels import LabelSettings, rasterize_scene
    from roadxfer.package import load_package
    from roadxfer.tiles import TileSettings, export_tiles, read_dataset
    from roadxfer.train import train, TrainConfig

    deg = 0.3 / 111_320.0  # 0.3 m along a meridian
    image = make_raster(tmp_path / "geo.tif", size=(128, 128), cell=deg, crs="EPSG:4326", origin=(-115.0, 36.0))
    lab = make_vectors(tmp_path / "r.gpkg", [LineString([(-115.0, 36.0 - 60 * deg), (-115.0 + 128 * deg, 36.0 - 60 * deg)])], crs="EPSG:4326", Classvalue=[1])
    rasterize_scene(image, lab, tmp_path / "l.tif", tmp_path / "o.tif", tmp_path / "s.json", LabelSettings(buffer_radius=2.0))
    export_tiles(image, tmp_path / "l.tif", tmp_path / "o.tif", tmp_path / "t", TileSettings(tile_size=64, stride=64, keep="all"))
    assert read_dataset(tmp_path / "t").cell_size == pytest.approx(0.3)
    train([tmp_path / "t"], tmp_path / "m", TrainConfig(backbone="resnet18", epochs=1, batch_size=4, patience=0, val_split="tile"), classes=[{"value": 1, "name": "road"}])
    pkg = load_package(tmp_path / "m")
    assert pkg.emd["CellSize"] == pytest.approx(0.3) and pkg.emd["CellSizeUnit"] == "metre"
    logger = logging.getLogger("roadxfer.classify")
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())
    logger.addHandler(handler)
    try:
        classify_scene(image, pkg, tmp_path / "c.tif")
    finally:
        logger.removeHandler(handler)
    assert not any("was trained at" in m for m in records)


@pytest.mark.parametrize("shard", [100, 67])  # 4 and 9 shards of a 190 x 200 px scene
def test_a_scene_classified_in_shards_equals_the_scene_at_once(tmp_path, package, shard):
    image = _smooth_image(tmp_path / "img.tif", (190, 200), 0.5)
    settings = ClassifySettings(batch_size=3)
    whole = tmp_path / "whole"
    classify_scene(image, package, whole / "c.tif", out_probability=whole / "p.tif", out_centrelines=whole / "l.gpkg", out_direction=whole / "d.tif", settings=settings)
    windows = shard_windows(200, 190, shard)
    assert len(windows) == (4 if shard == 100 else 9)
    parts = []
    for name, win in windows.items():
        out = tmp_path / "shards" / name
        s = classify_scene(image, package, out / "c.tif", out_probability=out / "p.tif", out_direction=out / "d.tif", settings=settings, window=win)
        assert s["tiles"] < count_tiles(190, 200, 64, 16)  # only the tiles that touch the shard
        parts.append((out / "c.tif", out / "p.tif", out / "d.tif"))
    merged = tmp_path / "merged"
    with pytest.raises(InputError, match=r"cover .* pixels.*a merge never runs on a partial set"):
        merge_shards(image, parts[:-1], package, merged / "c.tif", out_probability=merged / "p.tif", settings=settings)
    with pytest.raises(InputError, match="no direction raster"):
        merge_shards(image, [p[:2] for p in parts], package, merged / "c.tif", out_probability=merged / "p.tif", out_direction=merged / "d.tif", settings=settings)
    assert not (merged / "c.tif").exists()
    merge_shards(image, parts, package, merged / "c.tif", out_probability=merged / "p.tif", out_centrelines=merged / "l.gpkg", out_direction=merged / "d.tif",
                 settings=settings)
    with rasterio.open(whole / "d.tif") as a, rasterio.open(merged / "d.tif") as b:
        da, db = a.read(1).astype(int), b.read(1).astype(int)
    turn = np.abs(np.mod(da - db + 90, 180) - 90)  # 0 and 179 degrees are one degree apart
    assert turn.max() <= 1 and (turn == 0).mean() > 0.999
    with rasterio.open(whole / "c.tif") as a, rasterio.open(merged / "c.tif") as b:
        assert (a.transform, a.shape) == (b.transform, b.shape) and a.colormap(1) == b.colormap(1)
        np.testing.assert_array_equal(a.read(1), b.read(1))
    with rasterio.open(whole / "p.tif") as a, rasterio.open(merged / "p.tif") as b:
        pa, pb = a.read(1).astype(int), b.read(1).astype(int)
    assert np.abs(pa - pb).max() <= 1 and (pa == pb).mean() > 0.999  # batch composition moves outputs by ~1e-7
    la, lb = gpd.read_file(whole / "l.gpkg", layer="centrelines"), gpd.read_file(merged / "l.gpkg", layer="centrelines")
    assert len(la) == len(lb) and la.length.sum() == pytest.approx(lb.length.sum())


def test_plane_argmax_equals_torch_argmax_ties_included():
    from roadxfer.classify import argmax0

    g = torch.Generator().manual_seed(0)
    for k in (1, 2, 4):
        probs = torch.rand((k, 37, 53), generator=g)
        probs[:, :5] = 0.5  # ties: the first class wins, as with argmax
        assert torch.equal(argmax0(probs), probs.argmax(0).to(torch.uint8))


def test_direction_channels_known_answers():
    """All mass on one bin gives its centre angle at full certainty; the reference's bins run clockwise."""
    from roadxfer.classify import direction_channels, direction_degrees

    def angle(channels: torch.Tensor) -> list[np.ndarray]:  # (degrees, certainty) in float64
        return [t.numpy() for t in direction_degrees(channels.double())]

    k = 18  # 10-degree bins over 180 degrees
    logits = torch.full((1, k + 1, 1, 1), -30.0)
    logits[0, 1 + 4] = 30.0  # our bin 4: 40-50 degrees counter-clockwise from +x (east) on screen
    deg, certainty = angle(direction_channels(logits, reference_layout=False)[0])
    assert deg[0, 0] == pytest.approx(45.0, abs=1e-3) and certainty[0, 0] == pytest.approx(1.0, abs=1e-4)  # 45 ccw from east = 45 clockwise from north
    logits[0, 1 + 4], logits[0, 1 + 0] = -30.0, 30.0  # bin 0: 0-10 degrees ccw -> 85 degrees clockwise from north
    assert angle(direction_channels(logits, reference_layout=False)[0])[0][0, 0] == pytest.approx(85.0, abs=1e-3)
    # The reference layout: 2k directed bins clockwise from east over 360 degrees, "no road" last.
    ref = torch.full((1, 2 * k + 1, 1, 1), -30.0)
    ref[0, 4] = ref[0, 4 + k] = 30.0  # 40-50 degrees clockwise from east, either sense: 135 clockwise from north
    assert angle(direction_channels(ref, reference_layout=True)[0])[0][0, 0] == pytest.approx(135.0, abs=1e-3)
    # Two opposite axes with equal mass: no direction.
    logits = torch.full((1, k + 1, 1, 1), -30.0)
    logits[0, 1 + 0] = logits[0, 1 + 9] = 30.0
    assert angle(direction_channels(logits, reference_layout=False)[0])[1][0, 0] < 1e-3


@pytest.fixture(scope="module")
def demo_scene(tmp_path_factory) -> tuple[Path, Path]:
    from roadxfer.demo import write_scene

    d = tmp_path_factory.mktemp("demo")
    write_scene(977, d / "s.tif", d / "s.gpkg", size=384)
    return d / "s.tif", d / "s.gpkg"


def _direction_errors(direction: Path, labels: Path, road_type: str) -> np.ndarray:
    """Angle between the raster's direction and the labelled centreline's, every 2 m along the roads of a type."""
    with rasterio.open(direction) as ds:
        arr, t = ds.read(1), ds.transform
    errors = []
    for line in gpd.read_file(labels).query("road_type == @road_type").geometry:
        d = np.arange(1.0, line.length - 1, 2.0)
        p = shapely.get_coordinates(shapely.line_interpolate_point(line, d))
        q = shapely.get_coordinates(shapely.line_interpolate_point(line, d + 0.5))
        truth = np.mod(np.degrees(np.arctan2(q[:, 0] - p[:, 0], q[:, 1] - p[:, 1])), 180)  # clockwise from north
        col, row = ~t * (p[:, 0], p[:, 1])
        pred = arr[row.astype(int), col.astype(int)].astype(float)
        errors.append(np.abs(np.mod(pred - truth + 90, 180) - 90))
    return np.concatenate(errors)


@pytest.mark.parametrize("tta", [False, True])
def test_the_direction_raster_follows_the_roads(tmp_path, demo_scene, tta):
    """The shipped model's predicted direction, written as degrees clockwise from north, runs along the paved roads
    of a scene it never saw, with and without TTA (whose views turn the direction channels back)."""
    image, labels = demo_scene
    classify_scene(image, SHIPPED_MODEL, tmp_path / "c.tif", out_direction=tmp_path / "d.tif", settings=ClassifySettings(tta=tta))
    with rasterio.open(tmp_path / "d.tif") as ds:
        assert ds.dtypes[0] == "uint8" and ds.nodata == 255 and "clockwise from grid north" in ds.descriptions[0]
        assert ds.read(1).max() < 180
    errors = _direction_errors(tmp_path / "d.tif", labels, "paved")
    assert len(errors) > 50 and np.median(errors) < 10 and (errors < 20).mean() > 0.8


def test_direction_off_skips_the_orientation_decoder_and_writes_nodata(tmp_path, package):
    """classify.direction: false gives the same classes and probability, and an all-nodata direction raster."""
    image = _smooth_image(tmp_path / "img.tif", (100, 90), 0.5)
    on, off = tmp_path / "on", tmp_path / "off"
    classify_scene(image, package, on / "c.tif", out_probability=on / "p.tif", out_direction=on / "d.tif")
    classify_scene(image, package, off / "c.tif", out_probability=off / "p.tif", out_direction=off / "d.tif", settings=ClassifySettings(direction=False))
    for name in ("c.tif", "p.tif"):
        with rasterio.open(on / name) as a, rasterio.open(off / name) as b:
            np.testing.assert_array_equal(a.read(), b.read())
    with rasterio.open(on / "d.tif") as a, rasterio.open(off / "d.tif") as b:
        assert a.read(1).max() < 180 and (b.read(1) == 255).all()


def test_mixed_precision_classifies_as_float32_does(tmp_path, demo_scene):
    """precision auto (bfloat16 on a CPU with AMX or AVX512-BF16) gives the shipped model's float32 classes on all but a sliver of pixels."""
    from roadxfer.device import cpu_has_bf16

    image, _ = demo_scene
    out = {}
    for precision in ("fp32", "auto"):
        d = tmp_path / precision
        classify_scene(image, SHIPPED_MODEL, d / "c.tif", out_probability=d / "p.tif", settings=ClassifySettings(precision=precision, probability_dtype="float32", direction=False))
        with rasterio.open(d / "c.tif") as c, rasterio.open(d / "p.tif") as p:
            out[precision] = c.read(1), p.read(1)
    (c32, p32), (cmx, pmx) = out["fp32"], out["auto"]
    assert (c32 == 1).mean() > 0.01  # roads found: the comparison is not one of empty rasters
    assert (c32 != cmx).mean() < 0.005 and np.quantile(np.abs(p32 - pmx), 0.99) < 0.05
    assert (np.abs(p32 - pmx).max() > 0) == cpu_has_bf16()  # auto is float32 itself where the CPU has neither
    with pytest.raises(InputError, match="fp16 needs a CUDA GPU"):
        classify_scene(image, SHIPPED_MODEL, tmp_path / "x" / "c.tif", settings=ClassifySettings(precision="fp16"))
    assert not (tmp_path / "x" / "c.tif").exists()


def test_scratch_rasters_compress_fast_on_the_jobs_threads(tmp_path):
    """Scratch rasters (copied to COGs, then deleted) use ZSTD with the pinned GDAL, and GDAL's threads."""
    from roadxfer.raster import scratch_profile

    prof = scratch_profile(3)
    assert prof["num_threads"] == 3 and scratch_profile(0)["num_threads"] == 1
    with rasterio.open(tmp_path / "s.tif", "w", **prof, width=300, height=200, count=1, dtype="uint8") as dst:
        dst.write(np.arange(60000, dtype=np.uint8).reshape(1, 200, 300))
    with rasterio.open(tmp_path / "s.tif") as src:
        assert src.compression.name == "zstd"
        assert src.read(1)[199, 299] == 59999 % 256
