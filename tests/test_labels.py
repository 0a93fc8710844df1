"""Step 1: buffered-polyline rasterization."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from conftest import UTM, X0, Y0, make_raster, make_vectors
from shapely.geometry import LineString, Point, Polygon

from roadxfer import IGNORE_VALUE
from roadxfer.errors import InputError
from roadxfer.labels import LabelSettings, rasterize_scene
from roadxfer.orientation import angle_bin

CELL = 0.5


def run(tmp: Path, image: Path, labels: Path, settings: LabelSettings | None = None, **kw):
    out = tmp / "out"
    summary = rasterize_scene(image, labels, out / "label.tif", out / "orient.tif", out / "summary.json", settings or LabelSettings(buffer_radius=2.0), **kw)
    with rasterio.open(out / "label.tif") as l, rasterio.open(out / "orient.tif") as o:
        return summary, l.read(1), o.read(1), l.profile


def hline(row: float) -> LineString:
    """A horizontal line across the whole test raster, through pixel row ``row`` (centre)."""
    y = Y0 - (row + 0.5) * CELL
    return LineString([(X0 - 10, y), (X0 + 200 * CELL + 10, y)])


@pytest.mark.parametrize("radius", [1.0, 2.0, 3.5])
def test_buffer_width_in_pixels(tmp, radius):
    image = make_raster(tmp / "img.tif")
    labels = make_vectors(tmp / "l.gpkg", [hline(100)], Classvalue=[1])
    _, label, _, _ = run(tmp, image, labels, LabelSettings(buffer_radius=radius))
    width = int((label[:, 50] == 1).sum())
    assert abs(width - 2 * radius / CELL) <= 1


def test_output_on_image_grid(tmp):
    image = make_raster(tmp / "img.tif", size=(150, 170))
    labels = make_vectors(tmp / "l.gpkg", [hline(40)], Classvalue=[1])
    _, label, _, lab = run(tmp, image, labels)
    with rasterio.open(image) as src:
        assert (lab["width"], lab["height"], lab["transform"], lab["crs"]) == (src.width, src.height, src.transform, src.crs)
    assert lab["dtype"] == "uint8"
    assert lab["tiled"] and lab["compress"] == "deflate"


def test_labels_in_geographic_crs_land_in_place_and_buffer_in_metres(tmp):
    image = make_raster(tmp / "img.tif")
    line_utm = LineString([(X0 + 5, Y0 - 20), (X0 + 95, Y0 - 80)])
    utm = make_vectors(tmp / "utm.gpkg", [line_utm], Classvalue=[1])
    import geopandas as gpd

    wgs = tmp / "wgs.geojson"
    gpd.read_file(utm).to_crs("EPSG:4326").to_file(wgs)
    _, ref, _, _ = run(tmp / "a", image, utm)
    _, got, _, _ = run(tmp / "b", image, wgs)
    inter = ((ref == 1) & (got == 1)).sum()
    union = ((ref == 1) | (got == 1)).sum()
    assert inter / union > 0.95


@pytest.mark.parametrize(
    ("coords", "expected_angle"),
    [([(0, 0), (100, 0)], 0.0), ([(0, 0), (0, 100)], 90.0), ([(0, 0), (60, 60)], 45.0), ([(0, 60), (60, 0)], 135.0)],
)
def test_orientation_bins_from_true_polylines(tmp, coords, expected_angle):
    image = make_raster(tmp / "img.tif")
    # coords are in metres east/north of a point inside the raster
    line = LineString([(X0 + 20 + x * 0.5, Y0 - 80 + y * 0.5) for x, y in coords])
    labels = make_vectors(tmp / "l.gpkg", [line], Classvalue=[1])
    _, label, orient, _ = run(tmp, image, labels, LabelSettings(buffer_radius=1.5, orientation_bin_size=10))
    road = label == 1
    assert road.any()
    assert set(np.unique(orient[road])) == {int(angle_bin(expected_angle + 1, 10))}
    assert (orient[~road] == 0).all()


def test_nearest_segment_decides_orientation_on_a_bend(tmp):
    image = make_raster(tmp / "img.tif")
    bend = LineString([(X0 + 10, Y0 - 50), (X0 + 50, Y0 - 50), (X0 + 50, Y0 - 90)])
    labels = make_vectors(tmp / "l.gpkg", [bend], Classvalue=[1])
    _, label, orient, _ = run(tmp, image, labels, LabelSettings(buffer_radius=1.0, orientation_bin_size=10))
    row, col = 100, 40  # on the horizontal leg, far from the corner
    assert orient[row, col] == 1
    assert orient[150, 100] == angle_bin(90.5, 10)  # on the vertical leg


def test_alpha_and_nodata_become_ignore(tmp):
    image = make_raster(tmp / "img.tif", alpha_zero=(slice(0, 200), slice(0, 50)))
    labels = make_vectors(tmp / "l.gpkg", [hline(100)], Classvalue=[1])
    _, label, orient, _ = run(tmp, image, labels)
    assert (label[:, :50] == IGNORE_VALUE).all() and (orient[:, :50] == IGNORE_VALUE).all()
    assert (label[100, 60:] == 1).all()
    data = np.full((3, 200, 200), 100, np.uint8)
    data[:, 150:, :] = 0
    image2 = make_raster(tmp / "img2.tif", data=data, nodata=0)
    _, label2, _, _ = run(tmp / "x", image2, labels)
    assert (label2[150:] == IGNORE_VALUE).all() and (label2[:150] != IGNORE_VALUE).all()


def test_polygons_burned_as_they_are_and_points_rejected(tmp):
    image = make_raster(tmp / "img.tif")
    poly = Polygon([(X0 + 10, Y0 - 10), (X0 + 20, Y0 - 10), (X0 + 20, Y0 - 20), (X0 + 10, Y0 - 20)])
    labels = make_vectors(tmp / "p.gpkg", [poly], Classvalue=[1])
    _, label, orient, _ = run(tmp, image, labels)
    assert int((label == 1).sum()) == 20 * 20  # 10 m x 10 m at 0.5 m, no buffer
    assert (orient[label == 1] == IGNORE_VALUE).all()  # a polygon has no direction
    points = make_vectors(tmp / "pt.gpkg", [Point(X0 + 5, Y0 - 5)], Classvalue=[1])
    with pytest.raises(InputError, match=r"pt\.gpkg.*Point"):
        run(tmp / "y", image, points)


def test_class_from_constant_or_attribute_map(tmp):
    image = make_raster(tmp / "img.tif")
    labels = make_vectors(tmp / "l.gpkg", [hline(50), hline(150)], surface=["gravel", "dirt"])
    _, label, _, _ = run(tmp / "a", image, labels, LabelSettings(class_field=None, class_value=3, known_values=frozenset({3})))
    assert label[50, 10] == 3 and label[150, 10] == 3
    cmap = {"field": "surface", "values": {"gravel": 1, "dirt": 2}}
    _, label, _, _ = run(tmp / "b", image, labels, LabelSettings(class_map=cmap))
    assert label[50, 10] == 1 and label[150, 10] == 2
    with pytest.raises(InputError, match="missing from `labels.class_map.values`"):
        run(tmp / "c", image, labels, LabelSettings(class_map={"field": "surface", "values": {"gravel": 1}}))


def test_attribute_filter_and_layer(tmp):
    image = make_raster(tmp / "img.tif")
    labels = make_vectors(tmp / "l.gpkg", [hline(50), hline(150)], Classvalue=[1, 1], road_type=["paved", "trail"])
    _, label, _, _ = run(tmp, image, labels, layer="roads", where="road_type = 'trail'")
    assert label[50, 10] == 0 and label[150, 10] == 1


def test_features_off_raster_are_counted(tmp):
    image = make_raster(tmp / "img.tif")
    far = LineString([(X0 + 5000, Y0), (X0 + 5100, Y0)])
    labels = make_vectors(tmp / "l.gpkg", [hline(50), far], Classvalue=[1, 1])
    summary, *_ = run(tmp, image, labels)
    assert summary["features"] == 2 and summary["features_off_raster"] == 1


def _assert_no_outputs(tmp: Path) -> None:
    out = tmp / "out"
    assert not out.exists() or not any(p.name in ("label.tif", "orient.tif", "summary.json") or p.name.startswith(".") for p in out.iterdir())


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("no_class_field", r"l\.gpkg: has no class value field 'Classvalue'"),
        ("class_zero", r"l\.gpkg: .*class value 0 .*1-254"),
        ("class_255", r"l\.gpkg: .*class value 255"),
        ("class_fraction", r"l\.gpkg: .*non-integer class value"),
        ("class_unknown", r"l\.gpkg: has class value\(s\) \[7\] not listed under `classes`"),
        ("vectors_no_crs", r"l\.gpkg: vector labels have no coordinate reference system"),
        ("vectors_empty", r"l\.gpkg: contains no features"),
        ("vectors_zero_bytes", r"l\.gpkg: vector labels file is empty"),
        ("vectors_no_overlap", r"l\.gpkg: none of its 1 feature\(s\) overlap the raster"),
        ("raster_no_crs", r"img\.tif: raster has no coordinate reference system"),
        ("raster_corrupt", r"img\.tif: cannot be read as a raster"),
        ("raster_16bit", r"img\.tif: has pixel type uint16"),
        ("raster_two_bands", r"img\.tif: has 2 image band\(s\)"),
    ],
)
def test_bad_input_is_named_and_leaves_nothing(tmp, case, pattern):
    image = tmp / "img.tif"
    labels = tmp / "l.gpkg"
    if case == "raster_no_crs":
        make_raster(image, crs=None)
    elif case == "raster_corrupt":
        image.write_bytes(b"II*\x00garbage" * 10)
    elif case == "raster_16bit":
        make_raster(image, dtype="uint16")
    elif case == "raster_two_bands":
        make_raster(image, count=2)
    else:
        make_raster(image)
    line = [hline(100)]
    if case == "no_class_field":
        make_vectors(labels, line, other=[1])
    elif case == "class_zero":
        make_vectors(labels, line, Classvalue=[0])
    elif case == "class_255":
        make_vectors(labels, line, Classvalue=[255])
    elif case == "class_fraction":
        make_vectors(labels, line, Classvalue=[1.5])
    elif case == "class_unknown":
        make_vectors(labels, line, Classvalue=[7])
    elif case == "vectors_no_crs":
        with pytest.warns(UserWarning, match="'crs' was not provided"):  # pyogrio says so: writing one is the point
            make_vectors(labels, line, crs=None, Classvalue=[1])
    elif case == "vectors_empty":
        make_vectors(labels, [], Classvalue=[])
    elif case == "vectors_zero_bytes":
        labels.write_bytes(b"")
    elif case == "vectors_no_overlap":
        make_vectors(labels, [LineString([(X0 + 9000, Y0), (X0 + 9100, Y0)])], Classvalue=[1])
    else:
        make_vectors(labels, line, Classvalue=[1])
    with pytest.raises(InputError, match=pattern) as err:
        run(tmp, image, labels, LabelSettings(known_values=frozenset({1})))
    assert "Fix:" in str(err.value)
    _assert_no_outputs(tmp)


def test_existing_output_survives_a_failed_rerun(tmp):
    image = make_raster(tmp / "img.tif")
    good = make_vectors(tmp / "good.gpkg", [hline(100)], Classvalue=[1])
    run(tmp, image, good)
    before = (tmp / "out" / "label.tif").read_bytes()
    bad = make_vectors(tmp / "bad.gpkg", [hline(100)], Classvalue=[0])
    with pytest.raises(InputError):
        run(tmp, image, bad)
    assert (tmp / "out" / "label.tif").read_bytes() == before
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["label.tif", "orient.tif", "summary.json"]


def test_utm_constant_is_projected():
    assert UTM.startswith("EPSG:326")
