"""Reading ahead and writing behind: same results as in the caller's thread, errors raised, threads stopped."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import rasterio
from conftest import make_raster

from roadxfer.background_io import WriteBehind, read_ahead
from roadxfer.classify import ClassifySettings, classify_scene


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_read_ahead_gives_every_item_in_order(depth):
    assert list(read_ahead(lambda i: i * i, range(10), depth)) == [i * i for i in range(10)]


def test_read_ahead_runs_in_another_thread_and_ahead_of_the_caller():
    started: list[int] = []
    threads = set()

    def read(i: int) -> int:
        threads.add(threading.get_ident())
        started.append(i)
        return i

    it = read_ahead(read, range(10), depth=3)
    assert next(it) == 0
    time.sleep(0.2)
    assert started == [0, 1, 2, 3] and threading.get_ident() not in threads  # three reads in flight behind the one taken
    it.close()


def test_read_ahead_raises_at_the_failed_item_and_stops_when_closed():
    seen = []

    def read(i: int) -> int:
        if i == 3:
            raise OSError("strip 3 unreadable")
        seen.append(i)
        return i

    it = read_ahead(read, range(100), depth=2)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="strip 3"):
        next(it)
    it = read_ahead(lambda i: seen.append(i) or i, range(1000), depth=2)
    next(it)
    it.close()  # an early stop cancels the reads not begun
    assert len(seen) < 20


def test_write_behind_keeps_the_order_and_raises_a_failed_write(tmp_path):
    out = []
    with WriteBehind(2) as write:
        for i in range(20):
            write(out.append, i)
    assert out == list(range(20))
    # A real failure: writing to a dataset that is already closed.
    path = make_raster(tmp_path / "a.tif", size=(8, 8), count=1)
    dst = rasterio.open(path, "r+")
    dst.close()
    with pytest.raises(Exception, match="closed"):
        with WriteBehind(2) as write:
            write(dst.write, np.zeros((8, 8), np.uint8), 1)
    with pytest.raises(Exception, match="closed"):
        WriteBehind(0)(dst.write, np.zeros((8, 8), np.uint8), 1)  # depth 0: at once, in the caller


def test_classification_with_background_io_equals_the_plain_loop(tmp_path, package):  # noqa: F811
    image = make_raster(tmp_path / "img.tif", size=(200, 170), alpha_zero=(slice(0, 30), slice(0, 40)))
    rasters = {}
    for io in (True, False):
        out = tmp_path / str(io)
        classify_scene(image, package, out / "c.tif", out_probability=out / "p.tif", out_direction=out / "d.tif", settings=ClassifySettings(batch_size=3, background_io=io))
        rasters[io] = [rasterio.open(out / n).read() for n in ("c.tif", "p.tif", "d.tif")]
    for a, b in zip(rasters[True], rasters[False]):
        assert np.array_equal(a, b)


def test_every_classify_setting_of_the_config_reaches_the_classifier():
    """A classify.* key of the schema that ClassifySettings knows must be passed on by the workflow's glue."""
    import dataclasses
    from pathlib import Path

    import yaml

    from roadxfer.settings import classify_settings

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml").read_text())
    shared = set(schema["properties"]["classify"]["properties"]) & {f.name for f in dataclasses.fields(ClassifySettings)}
    assert {"direction", "background_io", "tta"} <= shared
    marks = {k: f"value of {k}" for k in shared}
    settings = classify_settings(marks)
    assert {k: getattr(settings, k) for k in shared} == marks
