"""Step 4b: the road graph as a step of its own, from the rasters classification wrote."""

from __future__ import annotations

import geopandas as gpd
import pytest
from conftest import SHIPPED_MODEL

from roadxfer import cli
from roadxfer.classify import ClassifySettings, classify_scene
from roadxfer.config import check_moved
from roadxfer.demo import write_scene
from roadxfer.errors import InputError
from roadxfer.settings import vectorise_settings
from roadxfer.vectorise import scene_classes, vectorise_scene


@pytest.fixture(scope="module")
def classified(tmp_path_factory):
    """A demo scene (paved, unpaved roads and trails), classified by the shipped base model, centrelines traced by classify itself."""
    d = tmp_path_factory.mktemp("vec")
    write_scene(5, d / "scene.tif", d / "roads.gpkg", size=384, kind="mixed")
    out = d / "out"
    classify_scene(d / "scene.tif", SHIPPED_MODEL, out / "classes.tif", out_probability=out / "probability.tif", out_direction=out / "direction.tif",
                   out_centrelines=out / "inline.gpkg", settings=ClassifySettings(tile_size=128), vector=vectorise_settings(None))
    return out


def _lines(path):
    gdf = gpd.read_file(path, layer="centrelines")
    return sorted(zip((g.wkb for g in gdf.geometry), gdf["class_name"], gdf["mean_probability"].round(6)))


def test_the_vectorise_step_gives_the_road_graph_classify_gave(classified):
    summary = vectorise_scene(classified / "classes.tif", classified / "centrelines.gpkg", probability=classified / "probability.tif",
                              direction=classified / "direction.tif", settings=vectorise_settings({}))
    assert summary["centrelines"] > 0
    assert _lines(classified / "centrelines.gpkg") == _lines(classified / "inline.gpkg")
    assert scene_classes(classified / "classes.tif") == [{"value": 1, "name": "road", "color": [255, 0, 0]}]


def test_other_settings_give_another_graph_from_the_same_rasters(classified, tmp_path):
    """The command line re-makes the road graph with other settings; the rasters stay as they were."""
    before = {p.name: p.stat().st_mtime_ns for p in classified.glob("*.tif")}
    assert cli.main(["vectorise", str(classified), "--out", str(tmp_path / "long.gpkg"), "--min-line-length", "60", "--bridge-gaps", "0"]) == 0
    long_only = gpd.read_file(tmp_path / "long.gpkg", layer="centrelines")
    default = gpd.read_file(classified / "inline.gpkg", layer="centrelines")
    assert 0 < len(long_only) < len(default) and long_only["length_m"].min() >= 60 - 1e-6
    assert {p.name: p.stat().st_mtime_ns for p in classified.glob("*.tif")} == before


def test_vectorise_refuses_to_write_over_its_inputs_and_names_a_missing_table(classified, tmp_path, capsys):
    assert cli.main(["vectorise", str(classified), "--out", str(classified / "probability.tif")]) == 2
    assert "probability.tif" in capsys.readouterr().err
    bare = tmp_path / "bare.tif"
    bare.write_bytes((classified / "classes.tif").read_bytes())
    with pytest.raises(InputError, match=r"bare.tif: has no attribute table \(bare.tif.aux.xml\)"):
        vectorise_scene(bare, tmp_path / "x.gpkg")
    assert not (tmp_path / "x.gpkg").exists()


@pytest.mark.parametrize(("section", "key"), [("classify", "centrelines"), ("classify", "min_line_length"), ("classify", "bridge_gaps")])
def test_a_config_of_the_earlier_layout_is_told_where_the_key_went(section, key):
    with pytest.raises(InputError, match=rf"{section}.{key} has moved.*vectorise"):
        check_moved({section: {key: {} if key == "centrelines" else 5.0}}, source="my.yaml")
    check_moved({"classify": {"batch_size": 8}, "vectorise": {"high": 0.6}})  # today's layout passes
