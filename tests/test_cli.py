"""`python -m roadxfer`: single-scene steps from the command line, with the workflow's checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import rasterio

from roadxfer.demo import write_scene

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "data" / "arcgis-mtre-linknet34"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "roadxfer", *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_help_of_every_command(tmp_path):
    out = cli("--help", cwd=tmp_path)
    assert out.returncode == 0 and "labels" in out.stdout and "classify" in out.stdout
    for command in ("labels", "export", "classify", "evaluate"):
        sub = cli(command, "--help", cwd=tmp_path)
        assert sub.returncode == 0 and "usage: python -m roadxfer " + command in sub.stdout


def test_one_scene_from_lines_to_metrics(tmp_path):
    write_scene(11, tmp_path / "s.tif", tmp_path / "s.gpkg", size=256, kind="rural")
    steps = [
        ("labels", "s.tif", "s.gpkg", "lab", "--class-value", "1", "--where", "road_type IN ('unpaved', 'trail')"),
        ("export", "s.tif", "lab", "tiles", "--tile-size", "128", "--stride", "64"),
        ("classify", "s.tif", str(MODEL), "out", "--threshold", "0.5"),
        ("evaluate", "s.tif", "out", "s.gpkg", "m.json", "--road-type-field", "road_type", "--ignore", "0,0,10,10"),
    ]
    results = {}
    for step in steps:
        done = cli(*step, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        results[step[0]] = json.loads(done.stdout)
    assert results["labels"]["features"] > 0 and results["export"]["tiles"] > 0
    assert (tmp_path / "tiles" / "map.txt").is_file() and results["classify"]["tiles"] == 9
    with rasterio.open(tmp_path / "out" / "classes.tif") as c, rasterio.open(tmp_path / "s.tif") as img:
        assert (c.transform, c.shape) == (img.transform, img.shape) and c.tags()["ROADXFER_MODEL"] == MODEL.name
    types = {r["road_type"] for r in results["evaluate"]["rows"]}
    assert {"all", "unpaved", "trail"} <= types and json.loads((tmp_path / "m.json").read_text())["rows"]
    assert "tiles 9/9 (100%)" in cli(*steps[2], cwd=tmp_path).stderr  # progress on stderr


def test_errors_name_the_file_and_exit_2(tmp_path):
    write_scene(11, tmp_path / "s.tif", tmp_path / "s.gpkg", size=128, kind="rural")
    out = cli("labels", "s.tif", "s.gpkg", "lab", "--class-field", "surface", cwd=tmp_path)
    assert out.returncode == 2 and "s.gpkg: has no class value field 'surface'" in out.stderr
    assert not (tmp_path / "lab" / "label.tif").exists()
    out = cli("classify", "s.tif", "missing-model", "out", cwd=tmp_path)
    assert out.returncode == 2 and "missing-model: model package does not exist" in out.stderr


@pytest.mark.slow
def test_a_16_bit_4_band_scene_with_band_selection(tmp_path):
    """An 11-bit RGB+NIR product: bands chosen and rescaled on the command line, classified by a 3-band model."""
    from conftest import satellite_scene

    image, labels = satellite_scene(tmp_path, "4band")
    steps = [
        ("labels", image.name, labels.name, "lab", "--bands", "3,2,1"),
        ("export", image.name, "lab", "tiles", "--tile-size", "128", "--bands", "3,2,1", "--rescale", "minmax"),
        ("classify", image.name, str(MODEL), "out", "--bands", "3,2,1"),
    ]
    for step in steps:
        done = cli(*step, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
    stats = json.loads((tmp_path / "tiles" / "esri_accumulated_stats.json").read_text())
    assert stats["NumBands"] == 3 and stats["roadxfer"]["SourceBands"] == [3, 2, 1]
    assert stats["roadxfer"]["Radiometry"]["stretch"]["method"] == "minmax"
    with rasterio.open(tmp_path / "out" / "classes.tif") as c:
        assert c.tags()["ROADXFER_BANDS"] == "3,2,1" and json.loads(c.tags()["ROADXFER_RESCALE"])["method"] == "percentile"  # the reference model's auto
    out = cli("classify", image.name, str(MODEL), "out2", cwd=tmp_path)  # 4 bands for a 3-band model
    assert out.returncode == 2 and "has 4 image band(s)" in out.stderr and "takes 3 band(s)" in out.stderr
