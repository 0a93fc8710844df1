"""APLS, the Average Path Length Similarity of two road networks (Van Etten et al., SpaceNet 3).

For control nodes of one graph, pairs of nodes are joined by shortest paths in both
graphs; each pair scores ``min(1, |L_a - L_b| / L_a)`` (1 when a node has no counterpart
within ``snap`` or no path exists in the other graph). A node's counterpart is its
projection onto the nearest edge of the other graph, injected there as a node (as the
reference implementation injects control points), so node spacing need not line up. ``C(a->b) = 1 - mean``; APLS is the
harmonic mean of ``C(truth->proposal)`` and ``C(proposal->truth)``. Control nodes are the
line ends, junctions and points every ``spacing`` along the lines (in CRS units).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import networkx as nx
import numpy as np
import shapely


def graph_from_lines(lines: Sequence[shapely.LineString], spacing: float) -> nx.Graph:
    """A weighted graph of a line network, noded at crossings and every ``spacing`` along edges."""
    g = nx.Graph()
    if not lines:
        return g
    noded = shapely.get_parts(shapely.line_merge(shapely.union_all(list(lines))))
    for line in noded:
        if line.length == 0:
            continue
        n = max(1, int(np.ceil(line.length / spacing)))
        pts = [line.interpolate(line.length * i / n) for i in range(n + 1)]
        keys = [(round(p.x, 6), round(p.y, 6)) for p in pts]
        step = line.length / n  # length along the line, not the chord
        for a, b in zip(keys[:-1], keys[1:]):
            if a != b:
                g.add_edge(a, b, weight=step)
    return g


def _inject(b: nx.Graph, points: np.ndarray, snap: float) -> tuple[nx.Graph, dict[int, Any]]:
    """Copy of ``b`` with each point's projection onto its nearest edge (within ``snap``) added as a node."""
    g = b.copy()
    match: dict[int, Any] = {}
    edges = list(b.edges(data="weight"))
    if not edges or not len(points):
        return g, match
    segs = shapely.linestrings([[u, v] for u, v, _ in edges])
    pts = shapely.points(points)
    (pi, ei) = shapely.STRtree(segs).query_nearest(pts, max_distance=snap, all_matches=False)
    by_edge: dict[int, list[tuple[float, int]]] = {}
    for i, e in zip(pi.tolist(), ei.tolist()):
        by_edge.setdefault(e, []).append((float(shapely.line_locate_point(segs[e], pts[i], normalized=True)), i))
    for e, hits in by_edge.items():
        u, v, w = edges[e]
        g.remove_edge(u, v)
        prev, prev_s = u, 0.0
        for frac, i in sorted(hits):
            node = ("injected", i)
            g.add_edge(prev, node, weight=max(w * (frac - prev_s), 0.0))
            prev, prev_s = node, frac
            match[i] = node
        g.add_edge(prev, v, weight=max(w * (1.0 - prev_s), 0.0))
    return g, match


def sample_pairs(n: int, max_pairs: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
    """Node pairs as ``{source: targets}``: all of them when there are at most ``max_pairs``.

    Otherwise about ``sqrt(max_pairs)`` random sources with random targets each, drawn
    without listing the ``n (n - 1) / 2`` pairs: memory and shortest-path searches stay
    bounded by ``max_pairs``, not by the square of the graph's size.
    """
    if n * (n - 1) // 2 <= max_pairs:
        return {i: np.arange(i + 1, n) for i in range(n - 1)}
    n_src = min(n, int(np.ceil(np.sqrt(max_pairs))))
    per = min(n - 1, int(np.ceil(max_pairs / n_src)))
    out = {}
    for src in rng.choice(n, n_src, replace=False).tolist():
        targets = rng.choice(n - 1, per, replace=False)
        out[src] = targets + (targets >= src)  # skip the source itself
    return out


def _one_sided(a: nx.Graph, b: nx.Graph, snap: float, max_pairs: int, rng: np.random.Generator) -> float:
    nodes = list(a.nodes)
    if len(nodes) < 2:
        return 0.0
    b_inj, match = _inject(b, np.asarray(nodes, dtype=float), snap)
    by_source = sample_pairs(len(nodes), max_pairs, rng)
    diffs = []
    for i, targets in by_source.items():
        la = nx.single_source_dijkstra_path_length(a, nodes[i], weight="weight")
        lb = nx.single_source_dijkstra_path_length(b_inj, match[i], weight="weight") if i in match else {}
        for j in targets.tolist():
            length_a = la.get(nodes[j])
            if not length_a:
                continue  # no path in this graph: the pair says nothing
            mj = match.get(j)
            if mj is None or mj not in lb:
                diffs.append(1.0)
            else:
                diffs.append(min(1.0, abs(length_a - lb[mj]) / length_a))
    return 1.0 - float(np.mean(diffs)) if diffs else 0.0


def apls(truth: Sequence[shapely.LineString], proposal: Sequence[shapely.LineString], *, spacing: float = 10.0, snap: float = 4.0,
         max_pairs: int = 1000, seed: int = 0) -> dict[str, float]:
    """APLS and its two one-sided terms for two sets of lines in the same projected CRS."""
    g_t, g_p = graph_from_lines(truth, spacing), graph_from_lines(proposal, spacing)
    rng = np.random.default_rng(seed)
    c_tp = _one_sided(g_t, g_p, snap, max_pairs, rng)
    c_pt = _one_sided(g_p, g_t, snap, max_pairs, rng)
    score = 0.0 if c_tp <= 0 or c_pt <= 0 else 2.0 / (1.0 / c_tp + 1.0 / c_pt)
    return {"apls": score, "apls_truth_to_proposal": c_tp, "apls_proposal_to_truth": c_pt}
