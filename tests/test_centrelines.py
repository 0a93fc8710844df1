"""Road graphs from predictions (known answers): a grid comes back as its edges, noise as (almost) nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely
from conftest import X0, Y0, make_raster

from roadxfer import centrelines as cl
from roadxfer.settings import vectorise_settings

ROAD = [{"value": 1, "name": "road"}]


def _prediction(tmp_path: Path, prob: np.ndarray, cell: float = 1.0) -> tuple[Path, Path]:
    """Class and probability rasters (uint8, 0-250) of a road probability array."""
    p = np.round(prob * 250).astype(np.uint8)
    classes = make_raster(tmp_path / "classes.tif", data=(prob >= 0.5).astype(np.uint8)[None], size=prob.shape, cell=cell, count=1)
    probability = make_raster(tmp_path / "probability.tif", data=p[None], size=prob.shape, cell=cell, count=1)
    return classes, probability


def _grid(rng: np.random.Generator) -> np.ndarray:
    """Three horizontal and three vertical roads, 5 px wide, crossing at 9 junctions; speckle, holes and gaps."""
    prob = np.full((300, 300), 0.05)
    for k in (50, 150, 250):
        prob[k - 2 : k + 3, 20:281] = 0.9
        prob[20:281, k - 2 : k + 3] = 0.9
    holes = (prob > 0.5) & (rng.random(prob.shape) < 0.08)
    prob[holes] = 0.1  # dropped pixels inside the roads
    prob[(prob < 0.5) & (rng.random(prob.shape) < 0.01)] = 0.7  # speckle
    prob[148:153, 98:101] = 0.02  # a 3 m gap across the middle road
    prob[198:201, 248:253] = 0.02  # and one across the right-hand road
    return prob


@pytest.mark.parametrize("block", [2048, 96])
def test_a_noisy_grid_comes_back_as_its_edges(tmp_path, monkeypatch, block):
    monkeypatch.setattr(cl, "BLOCK", block)
    classes, prob = _prediction(tmp_path, _grid(np.random.default_rng(1)))
    n = cl.centrelines_from_raster(classes, tmp_path / "l.gpkg", classes=ROAD, min_length=5, bridge=10, probability=prob)
    lines = gpd.read_file(tmp_path / "l.gpkg", layer="centrelines")
    nodes = gpd.read_file(tmp_path / "l.gpkg", layer="nodes")
    assert n == len(lines) == 24  # 6 roads x 4 edges: 12 dead-end arms of ~30 m, 12 edges of 100 m between junctions
    lengths = np.sort(lines["length_m"].to_numpy())
    assert np.allclose(lengths[:12], 30, atol=4) and np.allclose(lengths[12:], 100, atol=4)
    assert sorted(nodes["degree"]) == [1] * 12 + [4] * 9
    # the lines' end ids are the nodes' ids
    ids = set(nodes["node_id"])
    assert set(lines["from_node"]) | set(lines["to_node"]) == ids and (lines["from_node"] != lines["to_node"]).all()


def test_speckle_only_gives_no_line_and_a_warning(tmp_path, caplog):
    rng = np.random.default_rng(2)
    prob = np.where(rng.random((400, 400)) < 0.05, 0.7, 0.05)
    classes, probability = _prediction(tmp_path, prob, cell=0.45)
    with caplog.at_level(logging.WARNING):
        n = cl.centrelines_from_raster(classes, tmp_path / "l.gpkg", classes=ROAD, min_length=5, bridge=10, probability=probability, scene="speckle.tif")
    assert n == 0
    assert "speckle.tif: the prediction looks like noise" in caplog.text and "not suited to this imagery" in caplog.text


def test_a_blob_far_wider_than_a_road_is_flagged(tmp_path, caplog):
    prob = np.full((300, 300), 0.05)
    prob[20:280, 20:280] = 0.8  # 260 m square of "road"
    classes, probability = _prediction(tmp_path, prob)
    with caplog.at_level(logging.WARNING):
        n = cl.centrelines_from_raster(classes, tmp_path / "l.gpkg", classes=ROAD, min_length=5, bridge=10, probability=probability, scene="blob.tif")
    assert n <= 8 and "blob.tif" in caplog.text and "m wide on average" in caplog.text


def test_a_long_road_across_several_blocks_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(cl, "BLOCK", 128)
    prob = np.full((200, 1000), 0.05)
    cols = np.arange(10, 990)
    rows = (100 + 60 * np.sin(cols / 120.0)).astype(int)
    for r, c in zip(rows, cols):
        prob[r - 2 : r + 3, c] = 0.9
    classes, probability = _prediction(tmp_path, prob)
    n = cl.centrelines_from_raster(classes, tmp_path / "l.gpkg", classes=ROAD, min_length=5, bridge=10, probability=probability)
    lines = gpd.read_file(tmp_path / "l.gpkg", layer="centrelines")
    truth = shapely.LineString(np.stack([cols + 0.5, 100.5 + 60 * np.sin(cols / 120.0)], 1))  # the smooth curve drawn
    assert n == 1 and lines["length_m"].iloc[0] == pytest.approx(truth.length, rel=0.03)


def test_attributes_of_a_small_case(tmp_path):
    prob = np.full((60, 120), 0.05)
    prob[28:33, 10:110] = 0.9  # an east-west road, 100 m
    prob[28:33, 60] = 0.6  # a fainter cross-section
    classes, probability = _prediction(tmp_path, prob)
    cl.centrelines_from_raster(classes, tmp_path / "l.gpkg", classes=[{"value": 1, "name": "track", "color": [1, 2, 3]}], min_length=5, bridge=10, probability=probability)
    lines = gpd.read_file(tmp_path / "l.gpkg", layer="centrelines")
    nodes = gpd.read_file(tmp_path / "l.gpkg", layer="nodes")
    assert len(lines) == 1 and len(nodes) == 2
    row = lines.iloc[0]
    assert (row["class_value"], row["class_name"]) == (1, "track")
    assert row["length_m"] == pytest.approx(98, abs=3) and row["direction_deg"] == pytest.approx(90, abs=1)  # east: 90 degrees from north
    assert row["min_probability"] == pytest.approx(0.6, abs=0.01) and 0.85 < row["mean_probability"] < 0.9
    assert {row["from_node"], row["to_node"]} == set(nodes["node_id"]) and list(nodes["degree"]) == [1, 1]
    start = shapely.Point(lines.geometry.iloc[0].coords[0])
    assert nodes.loc[nodes["node_id"] == row["from_node"]].geometry.iloc[0].distance(start) < 1e-6
    assert lines.crs == nodes.crs and abs(lines.geometry.iloc[0].coords[0][1] - (Y0 - 30.5)) < 1.5 and lines.total_bounds[0] > X0


def test_a_faint_network_is_dropped_by_its_mean_probability(tmp_path):
    prob = np.full((100, 200), 0.05)
    prob[20:25, 10:190] = 0.9  # a confident road
    prob[70:75, 10:190] = 0.32  # a faint one...
    prob[70:75, 100:103] = 0.55  # ...with one seed: grown by hysteresis, but its mean probability is low
    classes, probability = _prediction(tmp_path, prob)
    cl.centrelines_from_raster(classes, tmp_path / "l.gpkg", classes=ROAD, min_length=5, bridge=0, probability=probability)
    lines = gpd.read_file(tmp_path / "l.gpkg", layer="centrelines")
    assert len(lines) == 1 and lines.geometry.iloc[0].centroid.y > Y0 - 30


def test_pure_noise_gives_no_mesh_of_lines_and_a_warning(tmp_path, caplog):
    """Probability noise (a third of the pixels above 0.5) percolates into one big mask; its skeleton is a mesh, dropped."""
    prob = np.random.default_rng(7).random((400, 400)) ** 1.5
    classes, probability = _prediction(tmp_path, prob, cell=0.45)
    with caplog.at_level(logging.WARNING):
        n = cl.centrelines_from_raster(classes, tmp_path / "l.gpkg", classes=ROAD, min_length=5, bridge=10, probability=probability, scene="noise.tif")
    assert n <= 5 and "noise.tif: the prediction looks like noise" in caplog.text and "small loops" in caplog.text


def test_a_city_grid_is_not_taken_for_a_mesh(tmp_path):
    """Blocks of 40 m: twelve loops, each closed by well over 30 m of road, stay."""
    prob = np.full((200, 200), 0.05)
    for k in range(20, 200, 40):
        prob[k - 2 : k + 3, 10:191] = 0.9
        prob[10:191, k - 2 : k + 3] = 0.9
    classes, probability = _prediction(tmp_path, prob)
    cl.centrelines_from_raster(classes, tmp_path / "l.gpkg", classes=ROAD, min_length=5, bridge=10, probability=probability)
    nodes = gpd.read_file(tmp_path / "l.gpkg", layer="nodes")
    assert (nodes["degree"] == 4).sum() == 25 and gpd.read_file(tmp_path / "l.gpkg", layer="centrelines")["length_m"].sum() > 1600


def _field(angle_deg: float):
    """A direction field (:data:`roadxfer.centrelines.DirectionAt`) with one axis everywhere, counter-clockwise from +x on screen."""
    a = np.radians(angle_deg)
    return lambda pts: np.tile([np.cos(a), -np.sin(a)], (len(pts), 1))


def test_direction_guided_bridging_reaches_along_the_predicted_road_only():
    import networkx as nx

    from roadxfer.apls import graph_from_lines

    road = [shapely.LineString([(0, 0), (100, 0)]), shapely.LineString([(125, 0), (225, 0)])]  # a 25 px gap, beyond max_gap 10

    def joined(lines):
        graph = graph_from_lines(cl.clean_network(lines, spur=1, min_length=0), spacing=1000)
        a = min(graph.nodes, key=lambda n: np.hypot(*n))
        b = min(graph.nodes, key=lambda n: np.hypot(n[0] - 225, n[1]))
        return nx.has_path(graph, a, b)

    assert not joined(cl.bridge_gaps(road, max_gap=10))  # the skeleton's direction alone: 25 px is too far
    assert joined(cl.bridge_gaps(road, max_gap=10, direction=_field(0), reach=3))  # the model sees the road run on
    assert not joined(cl.bridge_gaps(road, max_gap=10, direction=_field(0), reach=2))  # 25 px > 2 x 10
    # A predicted axis across the end (another road's, at a junction stub) is not followed: no long reach.
    assert not joined(cl.bridge_gaps(road, max_gap=10, direction=_field(90), reach=3))
    # Nor one that disagrees with itself along the end's last stretch.
    rng = np.random.default_rng(0)
    scattered = lambda pts: np.stack([np.cos(t := rng.uniform(0, np.pi, len(pts))), np.sin(t)], 1)  # noqa: E731
    assert not joined(cl.bridge_gaps(road, max_gap=10, direction=scattered, reach=3))
    # The long reach holds only within reach_angle of the predicted direction: a target 30 degrees off is not joined ...
    off = [road[0], shapely.LineString([(100 + 25 * np.cos(np.radians(30)), 25 * np.sin(np.radians(30))), (225, 60)])]
    assert not joined(cl.bridge_gaps(off, max_gap=10, direction=_field(0), reach=3, reach_angle=25))
    # ... while the plain cone (max_angle) still applies within max_gap.
    near = [road[0], shapely.LineString([(100 + 8 * np.cos(np.radians(30)), 8 * np.sin(np.radians(30))), (225, 0)])]
    assert joined(cl.bridge_gaps(near, max_gap=10, direction=_field(0), reach=3, reach_angle=25))


def test_centrelines_use_the_direction_raster(tmp_path):
    """A road cut by a 20 m gap: bridged along the direction raster (north-south here), not without it."""
    prob = np.full((200, 60), 0.05)
    prob[10:90, 28:33] = 0.9
    prob[110:190, 28:33] = 0.9  # a 20 px gap at 1 m cells; bridge 10 m
    classes, probability = _prediction(tmp_path, prob)
    direction = make_raster(tmp_path / "direction.tif", data=np.zeros((1, 200, 60), np.uint8), size=(200, 60), cell=1.0, count=1)  # 0: north
    for guided, pieces in ((False, 2), (True, 1)):
        out = tmp_path / f"l{guided}.gpkg"
        cl.centrelines_from_raster(classes, out, classes=ROAD, min_length=5, bridge=10, probability=probability, direction=direction,
                                   settings=vectorise_settings({"bridge_direction": guided}))
        merged = shapely.line_merge(shapely.union_all(list(gpd.read_file(out, layer="centrelines").geometry)))
        assert len(getattr(merged, "geoms", [merged])) == pieces


def test_a_join_across_a_gap_does_not_count_against_its_network(tmp_path):
    """Two stretches of a faint road (P 0.55) 35 m apart, bridged along the direction raster: the join's
    own low probability is left out of the network's mean, so the road stays (it would average about 0.35)."""
    prob = np.full((200, 60), 0.0)
    prob[40:80, 28:33] = 0.55
    prob[115:155, 28:33] = 0.55
    classes, probability = _prediction(tmp_path, prob)
    direction = make_raster(tmp_path / "direction.tif", data=np.zeros((1, 200, 60), np.uint8), size=(200, 60), cell=1.0, count=1)
    out = tmp_path / "l.gpkg"
    cl.centrelines_from_raster(classes, out, classes=ROAD, min_length=5, bridge=15, probability=probability, direction=direction,
                               settings=vectorise_settings({"min_probability": 0.4}))
    lines = gpd.read_file(out, layer="centrelines")
    merged = shapely.line_merge(shapely.union_all(list(lines.geometry)))
    assert merged.geom_type == "LineString" and merged.length > 100  # one road across the gap, kept
    assert lines["min_probability"].min() < 0.1  # the join itself is honest about the gap
    # A network that is faint on its own mask is still dropped.
    cl.centrelines_from_raster(classes, out, classes=ROAD, min_length=5, bridge=15, probability=probability, direction=direction,
                               settings=vectorise_settings({"min_probability": 0.6}))
    assert len(gpd.read_file(out, layer="centrelines")) == 0
