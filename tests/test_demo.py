"""The bundled synthetic demo scenes."""

from __future__ import annotations

import numpy as np
import pyogrio
import pytest
import rasterio

from roadxfer.demo import CELL, CRS, render_scene, write_scene


def test_same_seed_same_bytes_other_seed_other_scene(tmp_path):
    a = write_scene(7, tmp_path / "a.tif", tmp_path / "a.gpkg", size=256)
    write_scene(7, tmp_path / "b.tif", tmp_path / "b.gpkg", size=256)
    write_scene(8, tmp_path / "c.tif", tmp_path / "c.gpkg", size=256)
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()
    assert (tmp_path / "a.gpkg").read_bytes() == (tmp_path / "b.gpkg").read_bytes()
    assert (tmp_path / "a.tif").read_bytes() != (tmp_path / "c.tif").read_bytes()
    assert a


def test_scene_format_and_labels(tmp_path):
    write_scene(3, tmp_path / "s.tif", tmp_path / "s.gpkg", size=512, kind="mixed")
    with rasterio.open(tmp_path / "s.tif") as src:
        assert (src.count, src.dtypes[0], src.res) == (3, "uint8", (CELL, CELL))
        assert src.crs.to_string() == CRS and src.crs.is_projected
    gdf = pyogrio.read_dataframe(tmp_path / "s.gpkg", layer="roads")
    assert set(gdf.geom_type) == {"LineString"}
    assert (gdf["Classvalue"] == 1).all()
    assert set(gdf["road_type"]) == {"paved", "unpaved", "trail"}
    widths = gdf.groupby("road_type")["width_m"]
    assert widths.min()["paved"] >= 6 and widths.max()["paved"] <= 10
    assert widths.min()["unpaved"] >= 3 and widths.max()["unpaved"] <= 5
    assert widths.max()["trail"] <= 2


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_road_types_look_different(seed):
    """Paved roads are dark; unpaved roads and trails are lighter than the ground around them."""
    from shapely import affinity  # noqa: F401  (geometry already in pixel space)
    from roadxfer.demo import _distance

    img, roads = render_scene(seed, 512, "mixed")
    grey = img.mean(0)
    for road in roads:
        d = _distance(road.line, grey.shape)
        core = grey[d < max(road.width_m / CELL / 2 - 1, 0.8)]
        ring = grey[(d > road.width_m / CELL / 2 + 6) & (d < road.width_m / CELL / 2 + 12)]
        if core.size < 50 or ring.size < 50:
            continue
        if road.kind == "paved":
            assert np.median(core) < np.median(ring) - 60
        else:
            assert np.median(core) > np.median(ring)


def test_rural_scenes_have_no_paved_roads():
    _, roads = render_scene(11, 256, "rural")
    assert roads and {r.kind for r in roads} <= {"unpaved", "trail"}
    with pytest.raises(ValueError, match="unknown demo scene kind"):
        render_scene(1, 64, "urban")


def test_landscapes_vary_the_look_and_scale(tmp_path):
    """Other landscapes: light concrete roads occur (paved is not always the dark band), cell size is honoured."""
    from roadxfer.demo import LANDSCAPES, _distance

    means = set()
    lighter_paved = 0
    for i, land in enumerate(sorted(set(LANDSCAPES) - {"desert"})):
        for seed in (21, 22, 23):
            img, roads = render_scene(seed, 384, "mixed", landscape=land, cell=0.5)
            means.add(tuple(np.round(img.reshape(3, -1).mean(1) / 20)))
            grey = img.mean(0)
            for road in roads:
                if road.kind != "paved":
                    continue
                d = _distance(road.line, grey.shape)
                core, ring = grey[d < road.width_m / 0.5 / 2 - 1], grey[(d > road.width_m / 0.5 / 2 + 6) & (d < road.width_m / 0.5 / 2 + 12)]
                if core.size > 50 and ring.size > 50 and np.median(core) > np.median(ring):
                    lighter_paved += 1
    assert len(means) >= 4  # the landscapes' colours differ
    assert lighter_paved >= 1
    write_scene(5, tmp_path / "g.tif", tmp_path / "g.gpkg", size=256, landscape="forest", cell=0.45)
    with rasterio.open(tmp_path / "g.tif") as src:
        assert src.res == pytest.approx((0.45, 0.45))
    a, _ = render_scene(5, 256, "mixed", landscape="urban", cell=0.4)
    b, _ = render_scene(5, 256, "mixed", landscape="urban", cell=0.4)
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="landscape"):
        render_scene(5, 64, "mixed", landscape="moon")


def test_lanes_are_narrow_paved_roads_and_optional():
    """``lanes`` adds paved roads as narrow as unpaved ones, drawn faint but visible, and leaves the scene's other roads as they were."""
    from roadxfer.demo import LANE_MAX, LANDSCAPES, _distance

    for land in sorted(LANDSCAPES):
        _, plain_roads = render_scene(21, 384, "mixed", landscape=land, cell=0.5)
        assert all(r.width_m >= 6 for r in plain_roads if r.kind == "paved")
        img, roads = render_scene(21, 384, "mixed", landscape=land, cell=0.5, lanes=3)
        lanes = [r for r in roads if r.kind == "paved" and r.width_m < LANE_MAX]
        assert [(r.kind, r.width_m) for r in roads if r not in lanes] == [(r.kind, r.width_m) for r in plain_roads]
        assert len(lanes) >= 1 and all(2.0 <= r.width_m <= 4.5 for r in lanes)
        grey = img.astype(float).mean(0)
        seen = 0
        for lane in lanes:  # the lane's core differs from the ground beside it
            d = _distance(lane.line, grey.shape)
            core, ring = grey[d < 1], grey[(d > lane.width_m / 0.5 / 2 + 4) & (d < lane.width_m / 0.5 / 2 + 8)]
            seen += core.size > 30 and abs(np.median(core) - np.median(ring)) > 8
        assert seen >= 1, land
    assert not [r for r in render_scene(21, 256, "rural", lanes=3)[1] if r.kind == "paved"]
    with pytest.raises(ValueError, match="lanes"):
        render_scene(21, 64, "mixed", lanes=-1)
