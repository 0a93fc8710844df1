"""Step 2: classified-tile export in the reference layout, and reading such folders back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import make_raster, make_vectors
from rasterio.windows import Window
from shapely.geometry import LineString

from roadxfer import IGNORE_VALUE
from roadxfer.errors import InputError
from roadxfer.labels import LabelSettings, rasterize_scene
from roadxfer.tiles import TileSettings, export_tiles, read_dataset, tile_windows
from conftest import X0, Y0


def scene(tmp: Path, size=(300, 300), **raster_kw) -> tuple[Path, Path, Path]:
    image = make_raster(tmp / "img.tif", size=size, **raster_kw)
    y = Y0 - 40.25
    labels = make_vectors(tmp / "l.gpkg", [LineString([(X0, y), (X0 + 150, y)])], Classvalue=[1])  # row 80
    rasterize_scene(image, labels, tmp / "label.tif", tmp / "orient.tif", tmp / "summary.json", LabelSettings(buffer_radius=2.0))
    return image, tmp / "label.tif", tmp / "orient.tif"


def test_tile_windows_cover_the_scene_and_align_to_its_edge():
    wins = list(tile_windows(300, 200, 128, 64))
    cols = sorted({w.col_off for w in wins})
    rows = sorted({w.row_off for w in wins})
    assert cols == [0, 64, 128, 172] and rows == [0, 64, 72]
    assert all(w.width == 128 and w.height == 128 for w in wins)
    assert [(w.col_off, w.row_off) for w in tile_windows(50, 40, 128, 64)] == [(0, 0)]


def test_layout_files_and_chip_georeferencing(tmp):
    image, label, orient = scene(tmp)
    stats = export_tiles(image, label, orient, tmp / "tiles", TileSettings(tile_size=128, stride=64), scene_id="s1")
    root = tmp / "tiles"
    for name in ("map.txt", "stats.txt", "esri_accumulated_stats.json", "esri_model_definition.emd"):
        assert (root / name).is_file()
    lines = (root / "map.txt").read_text().splitlines()
    assert len(lines) == stats["NumTiles"] > 0
    for line in lines:
        img, lbl = line.split()
        assert img.startswith("images/") and lbl.startswith("labels/") and Path(img).stem == Path(lbl).stem
        assert (root / "orientation" / Path(lbl).name).is_file()
    acc = json.loads((root / "esri_accumulated_stats.json").read_text())
    assert acc["MetaDataMode"] == "Classified_Tiles" and acc["TileSizeX"] == 128 and acc["NumBands"] == 3
    assert acc["Classes"] == [{"ClassValue": 1, "ClassName": "road"}]
    assert acc["ClassPixelStats"]["NumPixelsPerClass"][0] > 0 and acc["MinCellSize"] == 0.5
    emd = json.loads((root / "esri_model_definition.emd").read_text())
    assert emd["Classes"][0] == {"Value": 1, "Name": "road", "Color": [255, 0, 0]}
    # Every chip is a georeferenced copy of its window of the scene.
    with rasterio.open(image) as src:
        for line in lines:
            img_rel, lbl_rel = line.split()
            with rasterio.open(root / img_rel) as chip, rasterio.open(root / lbl_rel) as lab:
                assert chip.crs == src.crs and chip.res == src.res
                col, row = ~src.transform * (chip.transform.c, chip.transform.f)
                window = Window(round(col), round(row), 128, 128)
                np.testing.assert_array_equal(chip.read(), src.read(window=window))
                assert lab.transform == chip.transform and (lab.read(1) == 1).any()


def test_only_tiles_with_features_by_default_or_all(tmp):
    image, label, orient = scene(tmp)
    some = export_tiles(image, label, orient, tmp / "a", TileSettings(tile_size=128, stride=128))
    every = export_tiles(image, label, orient, tmp / "b", TileSettings(tile_size=128, stride=128, keep="all"))
    assert every["NumTiles"] == len(list(tile_windows(300, 300, 128, 128))) == 9
    assert 0 < some["NumTiles"] < 9


def test_mostly_nodata_tiles_are_skipped(tmp):
    image, label, orient = scene(tmp, alpha_zero=(slice(0, 300), slice(0, 200)))
    stats = export_tiles(image, label, orient, tmp / "t", TileSettings(tile_size=128, stride=128, keep="all"))
    assert stats["NumTiles"] == 3  # only the right column of tiles is mostly valid
    with rasterio.open(next((tmp / "t" / "labels").iterdir())) as lab:
        assert lab.nodata == IGNORE_VALUE


def test_rotation_augmentation_rotates_orientation_bins(tmp):
    image, label, orient = scene(tmp)
    stats = export_tiles(image, label, orient, tmp / "t", TileSettings(tile_size=128, stride=128, rotations=(1,), orientation_bin_size=10))
    names = sorted((tmp / "t" / "orientation").iterdir())
    assert stats["NumTiles"] == len(names) and len(names) % 2 == 0
    with rasterio.open(names[0]) as a, rasterio.open(names[1]) as b:
        first, rotated = a.read(1), b.read(1)
    assert set(np.unique(first[(first > 0) & (first < 255)])) == {1}  # horizontal road
    assert set(np.unique(rotated[(rotated > 0) & (rotated < 255)])) == {10}  # now vertical
    np.testing.assert_array_equal(np.rot90(first) > 0, rotated > 0)


def test_png_chips(tmp):
    image, label, orient = scene(tmp)
    export_tiles(image, label, orient, tmp / "t", TileSettings(tile_size=128, stride=128, chip_format="png"))
    first = (tmp / "t" / "map.txt").read_text().split()[0]
    assert first.endswith(".png")
    assert read_dataset(tmp / "t").tile_size == 128


def test_read_arcgis_exported_folder(tmp):
    """A folder as ArcGIS Pro writes it: PNG chips, backslashes, ClassValue keys, no orientation."""
    root = tmp / "arcgis"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(3):
        make_raster(root / "images" / f"{i:09d}.tif", size=(64, 64))
        lab = np.zeros((1, 64, 64), np.uint8)
        lab[0, 30:34] = 1
        make_raster(root / "labels" / f"{i:09d}.tif", size=(64, 64), data=lab)
    (root / "map.txt").write_text("".join(f"images\\{i:09d}.tif labels\\{i:09d}.tif\n" for i in range(3)) + "images\\missing.tif labels\\missing.tif\n")
    (root / "esri_accumulated_stats.json").write_text(json.dumps({"MetaDataMode": "Classified_Tiles", "TileSizeX": 64, "TileSizeY": 64, "NumBands": 3}))
    (root / "esri_model_definition.emd").write_text(json.dumps({"Classes": [{"ClassValue": 1, "ClassName": "unpaved"}]}))
    ds = read_dataset(root)
    assert len(ds.images) == 3 and ds.tile_size == 64 and ds.bands == 3
    assert ds.classes == ({"value": 1, "name": "unpaved", "color": [255, 0, 0]},)
    assert ds.orientation == (None, None, None)


@pytest.mark.parametrize("missing", ["map.txt", "esri_accumulated_stats.json", "esri_model_definition.emd"])
def test_incomplete_folder_is_refused(tmp, missing):
    image, label, orient = scene(tmp)
    export_tiles(image, label, orient, tmp / "t", TileSettings(tile_size=128, stride=128))
    (tmp / "t" / missing).unlink()
    with pytest.raises(InputError, match=f"{missing} is missing"):
        read_dataset(tmp / "t")


def test_failed_export_leaves_no_folder(tmp):
    image, label, orient = scene(tmp)
    other = make_raster(tmp / "other.tif", size=(100, 100))
    with pytest.raises(InputError, match="not on the grid"):
        export_tiles(other, label, orient, tmp / "t", TileSettings(tile_size=64, stride=64))
    assert list(tmp.glob("t*")) == [] and list(tmp.glob(".t*")) == []


def test_bad_tile_size(tmp):
    image, label, orient = scene(tmp)
    with pytest.raises(InputError, match="multiple of 32"):
        export_tiles(image, label, orient, tmp / "t", TileSettings(tile_size=100, stride=50))


@pytest.mark.parametrize("cell", [1.0, 0.25])
def test_tiles_at_a_chosen_cell_size(tmp, cell):
    """tiles.cell_size resamples the scene on the fly: chips at that cell size, label still on the road."""
    data = np.full((3, 300, 300), 40, np.uint8)
    data[:, 76:85, :] = 220  # a bright road 4.5 m wide at y = Y0 - 38 .. -42.5 (0.5 m cells), under the label of rows 76-84
    image, label, orient = scene(tmp, data=data)
    stats = export_tiles(image, label, orient, tmp / "t", TileSettings(tile_size=64, stride=64, cell_size=cell))
    ds = read_dataset(tmp / "t")
    assert ds.cell_size == pytest.approx(cell) and stats["roadxfer"]["CellSizeMetres"] == pytest.approx(cell)
    agree = total = 0
    for img_p, lbl_p in zip(ds.images, ds.labels):
        with rasterio.open(img_p) as i, rasterio.open(lbl_p) as lab:
            assert i.transform.a == pytest.approx(cell) and (i.transform, i.crs) == (lab.transform, lab.crs)
            bright, road = i.read(1) > 130, lab.read(1) == 1
            agree += int((bright == road).sum())
            total += bright.size
    assert agree / total > 0.97  # labels and image resampled onto the same grid
    n_rows = 150 / cell  # the scene's 150 m at the new cell size
    with rasterio.open(ds.images[-1]) as last:
        assert last.bounds.bottom == pytest.approx(Y0 - n_rows * cell) or last.bounds.right == pytest.approx(X0 + n_rows * cell)
