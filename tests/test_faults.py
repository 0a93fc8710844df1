"""Fault injection: killed jobs, full disks, corrupt or damaged inputs, and stale temporaries.

Each test checks what the user sees (the message) and that no partial output is left
under a final name or trusted by a later step; a re-run after a kill equals a run that
was never interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from conftest import ROAD, ROOT, make_raster, random_package

from roadxfer.classify import ClassifySettings, classify_scene
from roadxfer.demo import write_scene
from roadxfer.errors import InputError
from roadxfer.labels import LabelSettings, rasterize_scene
from roadxfer.tiles import TileSettings, export_tiles
from roadxfer.train import train, TrainConfig

FAST = {"backbone": "resnet18", "batch_size": 4, "epochs": 2, "patience": 0, "val_fraction": 0.25, "val_split": "tile"}


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict[str, Path]:
    """A 1024 px demo scene with its labels: big enough that each step can be caught mid-way."""
    root = tmp_path_factory.mktemp("scene")
    write_scene(11, root / "s.tif", root / "s.gpkg", size=1024, kind="mixed")
    rasterize_scene(root / "s.tif", root / "s.gpkg", root / "l.tif", root / "o.tif", root / "s.json", LabelSettings(buffer_radius=2.0))
    return {"image": root / "s.tif", "labels": root / "s.gpkg", "label": root / "l.tif", "orient": root / "o.tif"}


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> Path:
    return random_package(tmp_path_factory.mktemp("pkg") / "m")


# --- steps run in a child process, so that they can be killed like a preempted job --------


def _step_code(step: str, out: Path, scene: dict[str, Path], package: Path) -> str:
    calls = {
        "labels": f"from roadxfer.labels import LabelSettings, rasterize_scene\n"
                  f"rasterize_scene({str(scene['image'])!r}, {str(scene['labels'])!r}, {str(out / 'label.tif')!r}, {str(out / 'orientation.tif')!r}, {str(out / 'summary.json')!r}, LabelSettings(buffer_radius=2.0))",
        "tiles": f"from roadxfer.tiles import TileSettings, export_tiles\n"
                 f"export_tiles({str(scene['image'])!r}, {str(scene['label'])!r}, {str(scene['orient'])!r}, {str(out / 'tiles')!r}, TileSettings(tile_size=64, stride=32, keep='all'))",
        "classify": f"from roadxfer.classify import ClassifySettings, classify_scene\n"
                    f"classify_scene({str(scene['image'])!r}, {str(package)!r}, {str(out / 'classes.tif')!r}, out_probability={str(out / 'probability.tif')!r}, "
                    f"out_centrelines={str(out / 'centrelines.gpkg')!r}, settings=ClassifySettings(tile_size=128))",
    }
    return f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{calls[step]}\n"


FINAL = {"labels": ["label.tif", "orientation.tif", "summary.json"], "tiles": ["tiles"], "classify": ["classes.tif", "probability.tif", "centrelines.gpkg"]}


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp-" in p.name or ".scratch-" in p.name] if folder.exists() else []


def _outputs(step: str, out: Path) -> dict[str, bytes | np.ndarray]:
    """What a step produced, in a form two runs can be compared by."""
    got: dict[str, bytes | np.ndarray] = {}
    if step == "tiles":
        for p in sorted((out / "tiles").rglob("*")):
            if p.is_file() and p.name != "esri_accumulated_stats.json":
                got[str(p.relative_to(out))] = p.read_bytes()
        return got
    for name in FINAL[step]:
        p = out / name
        if p.suffix == ".tif":
            with rasterio.open(p) as src:
                got[name] = src.read()
        elif p.suffix == ".json":
            got[name] = p.read_bytes()
        else:
            import geopandas as gpd

            got[name] = np.asarray(sorted(g.wkb for g in gpd.read_file(p, layer="centrelines").geometry))
    return got


def _kill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300) -> bool:
    """SIGKILL ``proc`` once ``ready()``; False if it finished first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _timed_run(code: list[str], out: Path) -> tuple[float, float]:
    """Run a step to the end; seconds until its first temporary appeared, and until it ended."""
    t0, first = time.time(), None
    proc = subprocess.Popen(code, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        if first is None and _temporaries(out):
            first = time.time() - t0
        time.sleep(0.005)
    assert proc.returncode == 0
    end = time.time() - t0
    return (first if first is not None else end), end


def _temporaries_for(out: Path, seconds: float) -> Callable[[], bool]:
    """Ready once the step's temporaries have existed for ``seconds`` (0: as soon as they appear)."""
    seen: list[float] = []

    def ready() -> bool:
        if not seen and _temporaries(out):
            seen.append(time.time())
        return bool(seen) and time.time() - seen[0] >= seconds

    return ready


@pytest.mark.slow
@pytest.mark.parametrize("step", ["labels", "tiles", "classify"])
def test_sigkill_at_several_points_then_rerun_equals_an_uninterrupted_run(tmp_path, scene, package, step):
    straight = tmp_path / "straight"
    first, end = _timed_run([sys.executable, "-c", _step_code(step, straight, scene, package)], straight)
    expected = _outputs(step, straight)
    out = tmp_path / "killed"
    code = [sys.executable, "-c", _step_code(step, out, scene, package)]
    # Killed as soon as its temporaries appear, then part-way through writing them (a run can be
    # faster than the measured one on a busy machine: then it is killed earlier in the next try).
    assert _kill_when(subprocess.Popen(code, stderr=subprocess.DEVNULL), _temporaries_for(out, 0))
    assert not any((out / name).exists() for name in FINAL[step])  # nothing under a final name
    for fraction in (0.5, 0.25, 0.1, 0.02):
        if _kill_when(subprocess.Popen(code, stderr=subprocess.DEVNULL), _temporaries_for(out, (end - first) * fraction)):
            break
        shutil.rmtree(out)  # it finished: start clean for the next, earlier kill
        assert _kill_when(subprocess.Popen(code, stderr=subprocess.DEVNULL), _temporaries_for(out, 0))
    else:
        pytest.fail("the step always finished before it could be killed")
    assert not any((out / name).exists() for name in FINAL[step])
    assert _temporaries(out)  # a killed job leaves its temporaries...
    subprocess.run(code, check=True)
    assert not _temporaries(out)  # ...which the next run removes
    got = _outputs(step, out)
    assert got.keys() == expected.keys()
    for k in expected:
        assert np.array_equal(got[k], expected[k]) if isinstance(expected[k], np.ndarray) else got[k] == expected[k], k


def test_a_failed_rerun_keeps_the_previous_outputs_whole(tmp_path, scene):
    out = tmp_path / "labels"
    rasterize_scene(scene["image"], scene["labels"], out / "label.tif", out / "orientation.tif", out / "summary.json", LabelSettings(buffer_radius=2.0))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    nodata = make_raster(tmp_path / "nodata.tif", size=(1024, 1024), cell=0.3, origin=(500_000.0, 4_000_000.0), data=np.zeros((3, 1024, 1024), np.uint8), nodata=0)
    with rasterio.open(scene["image"]) as src, rasterio.open(nodata, "r+") as dst:
        dst.crs, dst.transform = src.crs, src.transform
    with pytest.raises(InputError, match="labelled no pixel"):
        rasterize_scene(nodata, scene["labels"], out / "label.tif", out / "orientation.tif", out / "summary.json", LabelSettings(buffer_radius=2.0))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # not one of the three replaced


def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a small tmpfs needs root (CI runs as root)")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    yield from _tmpfs(tmp_path / "disk", "400k")


def test_full_disk_during_export_is_named_and_leaves_nothing(small_disk, scene):
    with pytest.raises(InputError, match=rf"no space left on {small_disk}.*free at least \d+ MB on {small_disk}"):
        export_tiles(scene["image"], scene["label"], scene["orient"], small_disk / "tiles", TileSettings(tile_size=64, stride=32, keep="all"))
    assert list(small_disk.iterdir()) == []


def test_full_disk_during_classification_is_named_and_leaves_nothing(small_disk, scene, package):
    out = small_disk / "c"
    with pytest.raises(InputError, match=rf"no space left on {small_disk}"):
        classify_scene(scene["image"], package, out / "classes.tif", out_probability=out / "probability.tif", out_centrelines=out / "centrelines.gpkg",
                       settings=ClassifySettings(tile_size=128, probability_dtype="float32"))
    assert not out.exists() or list(out.iterdir()) == []


@pytest.fixture(scope="module")
def tiles(tmp_path_factory, scene) -> Path:
    out = tmp_path_factory.mktemp("tiles") / "t"
    with rasterio.open(scene["image"]) as src:
        small = tmp_path_factory.mktemp("small") / "s.tif"
        make_raster(small, size=(256, 256), cell=0.3, data=src.read(window=rasterio.windows.Window(0, 0, 256, 256)))
    with rasterio.open(small, "r+") as dst, rasterio.open(scene["image"]) as src:
        dst.crs, dst.transform = src.crs, src.transform
    labels = tmp_path_factory.mktemp("lab")
    rasterize_scene(small, scene["labels"], labels / "l.tif", labels / "o.tif", labels / "s.json", LabelSettings(buffer_radius=2.0))
    export_tiles(small, labels / "l.tif", labels / "o.tif", out, TileSettings(tile_size=64, stride=64, keep="all"))
    return out


@pytest.mark.slow
def test_truncated_checkpoint_is_set_aside_and_training_starts_over(tmp_path, tiles, caplog):
    cfg = TrainConfig(**FAST)
    train([tiles], tmp_path / "fresh", cfg, classes=ROAD, workdir=tmp_path / "w0")
    blob = _checkpoint_bytes(tiles, tmp_path)
    work = tmp_path / "w1"
    work.mkdir()
    (work / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])  # cut short, as a copy interrupted by a full disk
    with caplog.at_level(logging.WARNING):
        train([tiles], tmp_path / "after", cfg, classes=ROAD, workdir=work)
    assert f"{work / 'checkpoint.pt'} cannot be used" in caplog.text and "set aside as checkpoint.pt.rejected-" in caplog.text
    assert "training starts over" in caplog.text
    from roadxfer.package import load_package

    a, b = load_package(tmp_path / "fresh").model.state_dict(), load_package(tmp_path / "after").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same as a run that never saw the broken file


def _checkpoint_bytes(tiles: Path, tmp_path: Path) -> bytes:
    """The checkpoint of a real training run, taken while that run is between epochs."""
    work = tmp_path / "wc"
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\nfrom roadxfer.train import TrainConfig, train\n"
            f"train([{str(tiles)!r}], {str(tmp_path / 'c')!r}, TrainConfig(**{ {**FAST, 'epochs': 50, 'checkpoint_seconds': 0}!r}), classes={ROAD!r}, workdir={str(work)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    assert _kill_when(proc, lambda: (work / "checkpoint.pt").is_file())
    return (work / "checkpoint.pt").read_bytes()


def test_a_chip_deleted_or_emptied_after_export_is_not_trusted(tmp_path, tiles):
    damaged = tmp_path / "t"
    shutil.copytree(tiles, damaged)
    (damaged / "images" / "000000002.tif").unlink()
    with pytest.raises(InputError, match=r"000000002\.tif: is listed in line 3 of .*map\.txt but missing: the tile folder is damaged\. Fix: delete"):
        train([damaged], tmp_path / "m", TrainConfig(**FAST), classes=ROAD)
    shutil.copyfile(tiles / "images" / "000000002.tif", damaged / "images" / "000000002.tif")
    (damaged / "labels" / "000000001.tif").write_bytes(b"")
    with pytest.raises(InputError, match=r"000000001\.tif: chip is empty \(0 bytes\)"):
        train([damaged], tmp_path / "m", TrainConfig(**FAST), classes=ROAD)
    shutil.copyfile(tiles / "labels" / "000000001.tif", damaged / "labels" / "000000001.tif")
    lines = (damaged / "map.txt").read_text().splitlines()
    (damaged / "map.txt").write_text("\n".join(lines[:-2]) + "\n")  # cut short
    with pytest.raises(InputError, match=rf"map\.txt: lists {len(lines) - 2} chip\(s\) but the export wrote {len(lines)}"):
        train([damaged], tmp_path / "m", TrainConfig(**FAST), classes=ROAD)
    assert not (tmp_path / "m").exists()


def test_a_scene_smaller_than_a_tile_fails_before_anything_is_committed(tmp_path, scene):
    small = make_raster(tmp_path / "small.tif", size=(40, 40), cell=0.3)
    with rasterio.open(small, "r+") as dst, rasterio.open(scene["image"]) as src:
        dst.crs, dst.transform = src.crs, src.transform
    rasterize_scene(small, scene["labels"], tmp_path / "l.tif", tmp_path / "o.tif", tmp_path / "s.json", LabelSettings(buffer_radius=2.0), training=False)
    with pytest.raises(InputError, match=r"small\.tif: gave no tile: 1 window\(s\) of 256 px were mostly nodata.*use a smaller tiles\.tile_size \(the scene is 40x40 px\)"):
        export_tiles(small, tmp_path / "l.tif", tmp_path / "o.tif", tmp_path / "tiles", TileSettings(tile_size=256))
    assert not (tmp_path / "tiles").exists() and not _temporaries(tmp_path)


def test_stale_temporaries_of_a_step_are_removed_on_the_next_run(tmp_path, scene, package):
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / ".label.tmp-999999-deadbeef.tif", out / ".summary.tmp-999999-deadbeef.json", out / ".classify.scratch-999999-deadbeef"]
    for p in stale[:2]:
        p.write_bytes(b"half")
    stale[2].mkdir()
    (stale[2] / "class.tif").write_bytes(b"half")
    rasterize_scene(scene["image"], scene["labels"], out / "label.tif", out / "orientation.tif", out / "summary.json", LabelSettings(buffer_radius=2.0))
    assert not stale[0].exists() and not stale[1].exists()
    img = make_raster(tmp_path / "img.tif", size=(128, 128), cell=0.3)
    classify_scene(img, package, out / "classes.tif", settings=ClassifySettings(tile_size=128))
    assert not stale[2].exists()
    assert sorted(p.name for p in out.iterdir()) == ["classes.qml", "classes.tif", "classes.tif.aux.xml", "label.tif", "orientation.tif", "summary.json"]


def test_a_corrupt_json_layout_file_is_named(tmp_path, tiles):
    damaged = tmp_path / "t"
    shutil.copytree(tiles, damaged)
    (damaged / "esri_accumulated_stats.json").write_text(json.dumps({"MetaDataMode": "Classified_Tiles"})[:-3])
    with pytest.raises(InputError, match="has a corrupt JSON layout file"):
        train([damaged], tmp_path / "m", TrainConfig(**FAST), classes=ROAD)
