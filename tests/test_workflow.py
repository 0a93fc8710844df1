"""The Snakemake workflow itself: lint, dry run, scene sheet checks, a small real run."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import rasterio

from conftest import ROOT, SNAKEMAKE, job_counts, smk, tiny_workflow
def test_lint_is_clean():
    out = smk("--lint")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Congratulations, your workflow is in a good condition!" in out.stdout + out.stderr


def test_dry_run_of_the_whole_demo_workflow():
    out = smk("--dry-run", "--forceall", "--cores", "2")
    assert out.returncode == 0, out.stderr
    # 12 demo scenes; labels and tiles of the 8 training scenes (5 base, 3 transfer; none for test scenes); base, transfer and
    # scratch trained (config.yaml brings no package); 3 models x 4 scenes classified, traced and evaluated.
    assert job_counts(out.stdout) == {"demo_scene": 12, "rasterize_labels": 8, "export_tiles": 8, "train_model": 3, "classify_scene": 12,
                                      "vectorise_scene": 12, "evaluate_scene": 12, "aggregate_metrics": 1, "report": 1}


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ("x9\tnowhere/x9.tif\tresources/demo/b1.gpkg\t\t\ttest", "row 4 (scene 'x9'): image file 'nowhere/x9.tif' does not exist"),
        ("x9\tresources/demo/b1.tif\tresources/demo/b1.gpkg\t\t\ttraining", "Error validating row 3 of data frame"),
        ("b1\tresources/demo/b1.tif\tresources/demo/b1.gpkg\t\t\ttest", "scene_id 'b1' appears more than once"),
        ("x9\tresources/demo/b1.tif\t\t\t\ttest", "row 4 (scene 'x9') has role 'test' but no labels"),
    ],
)
def test_bad_scene_sheet_fails_at_parse_time(tmp_path, row, message):
    wf = tiny_workflow(tmp_path)
    with open(wf / "scenes.tsv", "a") as f:
        f.write(row + "\n")
    out = smk("--configfile", "cfg.yaml", "--dry-run", cwd=wf)
    assert out.returncode != 0
    assert message in out.stdout + out.stderr


def test_replicates_must_be_classified(tmp_path):
    wf = tiny_workflow(tmp_path, extra="evaluation: {replicates: {transfer: [transfer_s43]}}\n")
    out = smk("--configfile", "cfg.yaml", "--dry-run", cwd=wf)
    assert out.returncode != 0 and "evaluation.replicates names model(s) ['transfer_s43'] that are not classified" in out.stdout + out.stderr


def test_a_model_trains_on_scenes_named_by_id_but_never_on_a_test_scene(tmp_path):
    wf = tiny_workflow(tmp_path, extra="models: {one: {datasets: [t1], rehearsal: [b1]}}\nclassify: {models: [base, transfer, scratch, one]}\n")
    out = smk("--configfile", "cfg.yaml", "--dry-run", "--forceall", cwd=wf)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    job = out.stdout.split("output: results/models/one\n")[0].rsplit("rule train_model:", 1)[1]
    assert "input: results/tiles/t1, results/tiles/b1\n" in job
    (wf / "leak.yaml").write_text("models: {one: {datasets: [t1, x1]}}\n")
    out = smk("--configfile", "cfg.yaml", "leak.yaml", "--dry-run", cwd=wf)
    assert out.returncode != 0 and "models.one.datasets names scene 'x1', whose role is 'test'" in out.stdout + out.stderr
    (wf / "typo.yaml").write_text("models: {one: {datasets: [t2]}}\n")
    out = smk("--configfile", "cfg.yaml", "typo.yaml", "--dry-run", cwd=wf)
    assert out.returncode != 0 and "models.one.datasets entry 't2' is neither a role" in out.stdout + out.stderr


def test_invalid_config_value_is_refused(tmp_path):
    wf = tiny_workflow(tmp_path, extra="tiles: {tile_size: 100}\n")
    out = smk("--configfile", "cfg.yaml", "--dry-run", cwd=wf)
    assert out.returncode != 0 and "multiple of 32" in out.stdout + out.stderr


MODELS = "base, transfer, scratch, transfer_r2, transfer_2, scratch_2"


@pytest.mark.workflow
def test_small_demo_runs_end_to_end(tmp_path):
    # As the demo: a side network beside the frozen encoder, and a scene of the base domain for retention.
    # A repeat of the transfer model with another training seed: the checks read the mean of the two.
    # A sample-size curve: transfer and scratch on one scene (t1) and on two (t1 and the base scene b1, named by scene_id).
    wf = tiny_workflow(tmp_path, retention=True, extra=(
        "models: {transfer: {training: {side_channels: 4}}, transfer_r2: {datasets: [transfer], pretrained: base, freeze: true, training: {side_channels: 4, seed: 43}},"
        " scratch: {training: {lr: auto}}, transfer_2: {datasets: [t1, b1], pretrained: base, freeze: true}, scratch_2: {datasets: [t1, b1]}}\n"
        f"classify: {{models: [{MODELS}]}}\n"
        "evaluation: {replicates: {transfer: [transfer_r2]}, sample_curve: {transfer: [transfer, transfer_2], scratch: [scratch, scratch_2]}, new_road_floor: 0.0}\n"))
    out = smk("--configfile", "cfg.yaml", "--cores", "2", cwd=wf)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with rasterio.open(wf / "resources/demo/t1.tif") as img, rasterio.open(wf / "results/labels/t1/label.tif") as lab:
        assert (lab.transform, lab.shape, lab.crs) == (img.transform, img.shape, img.crs)
    assert not (wf / "results/labels/x1").exists()  # a test scene is scored against its lines: no label raster made
    assert (wf / "logs/labels/b1.log").read_text()
    assert (wf / "benchmarks/labels/b1.tsv").is_file()
    assert (wf / "results/tiles/t1/images").is_dir()
    for model in ("base", "transfer", "scratch"):
        assert (wf / f"results/models/{model}/{model}.emd").is_file()
        out = wf / f"results/classified/{model}/x1"
        with rasterio.open(out / "classes.tif") as c, rasterio.open(wf / "resources/demo/x1.tif") as img:
            assert (c.transform, c.shape, c.crs) == (img.transform, img.shape, img.crs)
        assert (out / "probability.tif").is_file() and (out / "centrelines.gpkg").is_file()
        with rasterio.open(out / "direction.tif") as d:
            assert d.shape == c.shape and d.read(1).max() < 180  # degrees, every pixel of the scene valid
    record = json.loads((wf / "results/models/transfer/transfer.emd").read_text())["roadxfer"]
    assert record["parent"]["name"] == "base" and record["spec"]["side_channels"] == 4
    summary = (wf / "results/evaluation/summary.csv").read_text().splitlines()
    assert summary[0].startswith("model,road_type,tp,fp,fn") and {"apls", "direction_acc15"} <= set(summary[0].split(","))
    assert {line.split(",")[0] for line in summary[1:]} == set(MODELS.split(", "))
    assert json.loads((wf / "results/models/transfer_2/transfer_2.emd").read_text())["roadxfer"]["training_data"]["tiles"] > record["training_data"]["tiles"]
    report = (wf / "results/report/report.html").read_text()
    assert "direction_acc15" in report
    assert "transfer (2 runs)" in report and report.count("Run-to-run spread") == 2  # test scenes and retention scenes
    assert report.count("<table") >= 4 and "data:image/png;base64," in report and "data:image/gif;base64," in report
    assert "Did the transfer work?" in report and "weights sha256" in report and "side network" in report
    # The curve: its section and figure, the fewest-scene check (one scene) and the per-scene new-road check.
    assert "the sample-size curve" in report and "alt='sample-size curve'" in report and "New roads per test scene" in report
    checks = (wf / "results/report/targets.csv").read_text()
    assert "1 transfer scene: transfer F1 >= scratch F1 + 0.05" in checks and "new roads on x1: transfer F1 (unpaved and trail) >= 0 and > scratch" in checks
    # Retention: pooled and per scene, and a before/after figure of the base-domain scene.
    assert "retention (paved)" in report and "within 0.03" in report  # the per-scene table
    assert "Before and after: the base domain" in report and "r1 side by side" in report
    assert {line.split(",")[0] for line in (wf / "results/evaluation/retention.csv").read_text().splitlines()[1:]} == set(MODELS.split(", "))
    # A vectorising setting changed: only the road graphs (and what reads them) are made again, no model runs.
    (wf / "vec.yaml").write_text("vectorise: {min_line_length: 7.5}\n")
    dry = smk("--configfile", "cfg.yaml", "vec.yaml", "--dry-run", cwd=wf)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    jobs = job_counts(dry.stdout)
    assert jobs.get("vectorise_scene") == 12 and "classify_scene" not in jobs and "train_model" not in jobs, jobs
    assert {"evaluate_scene", "report"} <= set(jobs)
    # And a classification setting that vectorising does not read re-runs classification, not training.
    (wf / "cls.yaml").write_text(f"classify: {{models: [{MODELS}], tta: true}}\n")
    jobs = job_counts(smk("--configfile", "cfg.yaml", "cls.yaml", "--dry-run", cwd=wf).stdout)
    assert jobs.get("classify_scene") == 12 and "train_model" not in jobs, jobs
    scratch = json.loads((wf / "results/models/scratch/scratch.emd").read_text())["roadxfer"]  # lr: auto through the workflow
    assert scratch["training_config"]["lr"] == "auto" and 1e-7 <= scratch["lr_found"] < 10
    assert (wf / "results/models/scratch/ModelCharacteristics/lr_find.png").is_file()
    # Snakemake's own report holds our results beside its provenance.
    rep = smk("--configfile", "cfg.yaml", "--report", "report.zip", cwd=wf)
    assert rep.returncode == 0, rep.stderr[-3000:]
    import zipfile

    with zipfile.ZipFile(wf / "report.zip") as zf:
        names = zf.namelist()
        html = " ".join(zf.read(n).decode(errors="ignore") for n in names if n.endswith((".html", ".js")))
    stored = {Path(n).name for n in names if "/data/raw/" in n}
    assert {"summary.csv", "metrics_per_scene.csv", "targets.csv", "bar_charts.png", "x1.png", "r1.png", "base.png", "transfer.png", "scratch.png"} <= stored
    for category in ("Did the transfer work?", "Before and after", "Training curves", "Metrics"):
        assert category in html, category
    assert "re-purposes a pretrained road-extraction model" in html  # the workflow description


@pytest.mark.workflow
def test_a_base_from_the_users_own_imagery_with_the_frozen_imagenet_encoder(tmp_path):
    """The recipe the README recommends when no model is brought (config/base_from_imagenet.yaml),
    with the ImageNet-only control in the report."""
    wf = tiny_workflow(tmp_path, extra=(
        "models: {imagenet: {datasets: [transfer], pretrained: null, freeze: true, training: {encoder_weights: imagenet}}}\n"
        "classify: {models: [base, transfer, scratch, imagenet]}\n"
        "evaluation: {imagenet_control: imagenet}\n"))
    out = smk("--configfile", "cfg.yaml", str(ROOT / "config" / "base_from_imagenet.yaml"), "--cores", "2", cwd=wf)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    emd = {m: json.loads((wf / f"results/models/{m}/{m}.emd").read_text()) for m in ("base", "transfer", "imagenet", "scratch")}
    for m in ("base", "transfer", "imagenet"):
        assert emd[m]["roadxfer"]["encoder_init"]["source"] == "imagenet-1k" and emd[m]["ModelParameters"]["backbone"] == "timm-tf_efficientnet_lite0"
        assert emd[m]["Normalization"]["mean"][0] == pytest.approx(127.5 / 255)
    assert emd["base"]["roadxfer"]["training_config"]["freeze"] and emd["transfer"]["roadxfer"]["parent"]["name"] == "base"
    assert emd["scratch"]["roadxfer"]["encoder_init"] is None
    report = (wf / "results/report/report.html").read_text()
    assert "ImageNet-only" in report and "road graph: transfer APLS &gt; base and scratch and ImageNet-only APLS" in report


@pytest.mark.workflow
def test_workflow_transfers_from_a_reference_tool_package(tmp_path):
    """A model brought as it is (the reference tool's package) is the baseline: classified and evaluated, not trained;
    the transfer model starts from it, and is exported back in the reference layout."""
    fixture = ROOT / "tests" / "data" / "arcgis-mtre-linknet34"
    wf = tiny_workflow(tmp_path, extra=(
        f"models: {{base: {{package: '{fixture}'}}, transfer: {{training: {{arch: linknet34_mtl, epochs: 1}}}}}}\n"
        "classify: {models: [base, transfer]}\n"
        "evaluation: {control: null}\n"
    ))
    out = smk("--configfile", "cfg.yaml", "--cores", "2", "results/report/report.html", cwd=wf)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert not (wf / "results/models/base").exists()  # brought, not trained
    emd = json.loads((wf / "results/models/transfer/transfer.emd").read_text())
    assert emd["ModelParameters"]["mtl_model"] == "linknet34_mtl" and emd["roadxfer"]["parent"]["reference_emd"]["ArcGISLearnVersion"] == "2.4.4"
    exported = json.loads((wf / "results/models/transfer/arcgis/transfer/transfer.emd").read_text())
    assert exported["Framework"] == "arcgis.learn.models._inferencing" and exported["ImageHeight"] == 64
    assert (wf / "results/models/transfer/arcgis/transfer.dlpk").is_file()
    with rasterio.open(wf / "results/classified/base/x1/classes.tif") as c, rasterio.open(wf / "resources/demo/x1.tif") as img:
        assert (c.transform, c.shape) == (img.transform, img.shape) and c.tags()["ROADXFER_MODEL"] == fixture.name
    summary = (wf / "results/evaluation/summary.csv").read_text().splitlines()
    assert {line.split(",")[0] for line in summary[1:]} == {"base", "transfer"}
    report = (wf / "results/report/report.html").read_text()
    assert "imported: esri_mtre_linknet34.emd" in report and "Did the transfer work?" in report
    assert "imported the reference model" in (wf / "logs/models/transfer.log").read_text()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("trainin: {epochs: 3}\n", "Additional properties are not allowed ('trainin' was unexpected)"),
        ("models: {transfer: {training: {epoch: 3}}}\n", "models.transfer.training: Additional properties are not allowed ('epoch' was unexpected)"),
        ("models: {transfer: {training: {lr: -1}}}\n", "models.transfer.training.lr: -1 is less than or equal to the minimum of 0"),
        ("models: {transfer: {training: {lr: fast}}}\n", "models.transfer.training.lr: 'fast' does not match '^auto$'"),
        ("classify: {overlap: 64}\n", "classify.overlap 64 is not smaller than the tile size 64"),
        ("classify: {overlap: 16, margin: 8}\n", "classify.margin 8 is not below half the overlap 16"),
        ("models: {scratch: {freeze: true}}\n", "models.scratch sets freeze: true but has no pretrained model"),
        ("models: {transfer: {training: {unfreeze_after: 5}}}\n", "training.unfreeze_after 5 is not below its 1 epochs"),
        ("models: {transfer: {datasets: [trasfer]}}\n", "models.transfer.datasets entry 'trasfer' is neither a role"),
        ("models: {base: {package: nowhere.dlpk}}\n", "models.base.package 'nowhere.dlpk' does not exist"),
        ("classify: {threshold: .nan}\n", "classify.threshold is nan"),
        ("image: &i {band_count: 3}\nx_copy: [*i, *i]\n", "repeats another part of the config (a YAML anchor and alias)"),
    ],
)
def test_config_mistakes_fail_at_parse_time(tmp_path, extra, message):
    wf = tiny_workflow(tmp_path, extra=extra)
    out = smk("--configfile", "cfg.yaml", "--dry-run", cwd=wf)
    assert out.returncode != 0 and message in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr[-2000:]


def test_a_training_scene_too_small_for_a_tile_fails_at_dag_time(tmp_path):
    wf = tiny_workflow(tmp_path, extra="tiles: {tile_size: 512}\n")
    ok = smk("--configfile", "cfg.yaml", "--cores", "1", "resources/demo/t1.tif", cwd=wf)  # the scene exists once made
    assert ok.returncode == 0, ok.stderr[-2000:]
    out = smk("--configfile", "cfg.yaml", "--dry-run", cwd=wf)
    assert out.returncode != 0
    assert "t1.tif: scene 't1' is 256x256 px, too small for one 512 px tile" in out.stdout + out.stderr


def test_tiles_by_role_keeps_chips_by_the_scene_role(tmp_path):
    """tiles_by_role: the transfer scene keeps every chip, the base scene only chips with a labelled road."""
    wf = tiny_workflow(tmp_path, extra="tiles_by_role: {transfer: {keep: all}}\n")
    out = smk("--configfile", "cfg.yaml", "--cores", "2", "results/tiles/b1", "results/tiles/t1", cwd=wf)
    assert out.returncode == 0, out.stderr[-3000:]
    count = {s: len(list((wf / "results/tiles" / s / "images").iterdir())) for s in ("b1", "t1")}
    assert count["t1"] == 16  # 256 px scene, 64 px chips: all of them
    assert 0 < count["b1"] < 16  # the base scene's paved roads do not cross every chip
    bad = smk("--configfile", "cfg.yaml", "--dry-run", "--config", "tiles_by_role={'bse': {'keep': 'all'}}", cwd=wf)
    assert bad.returncode != 0 and "bse" in bad.stdout + bad.stderr


@pytest.mark.workflow
def test_usable_as_a_module_of_another_workflow(tmp_path):
    """An outer workflow imports roadxfer from a local path with its own config and scene sheet."""
    wf = tiny_workflow(tmp_path)  # the scene sheet; the config goes under the outer workflow's own key
    (wf / "outer.yaml").write_text(
        "roadxfer:\n"
        "  scenes: scenes.tsv\n"
        "  demo: {size: 256, scenes: {b1: {seed: 1}, t1: {seed: 11, kind: rural}, x1: {seed: 101}}}\n"
        "  tiles: {tile_size: 64, stride: 64}\n"
        "  training: {backbone: resnet18, epochs: 1, batch_size: 4, patience: 0}\n"
        "  models: {base: {datasets: [base]}, transfer: {datasets: [transfer], pretrained: base, freeze: true}}\n"
        "  classify: {models: [base, transfer]}\n"
        "  evaluation: {control: null}\n"
        "  resources: {train: {threads: 1, gpu: 0}, classify: {threads: 1, gpu: 0}}\n"
    )
    (wf / "Snakefile").write_text(
        'configfile: "outer.yaml"\n\n\n'
        f'module roadxfer:\n    snakefile:\n        "{ROOT / "Snakefile"}"\n    config:\n        config["roadxfer"]\n\n\n'
        "use rule * from roadxfer as roadxfer_*\n\n\n"
        "rule all:\n    input:\n        rules.roadxfer_all.input,\n    default_target: True\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the module finds its own code
    dry = subprocess.run([*SNAKEMAKE, "--dry-run", "--cores", "1"], cwd=wf, capture_output=True, text=True, env=env)
    assert dry.returncode == 0, dry.stderr[-3000:]
    for rule in ("roadxfer_train_model", "roadxfer_classify_scene", "roadxfer_report"):
        assert rule in dry.stdout
    run = subprocess.run([*SNAKEMAKE, "--cores", "2"], cwd=wf, capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (wf / "results/report/report.html").is_file() and (wf / "results/models/transfer/transfer.emd").is_file()
    assert not (wf / "results/models/scratch").exists()  # the outer config's models, not roadxfer's defaults


def test_a_class_without_name_or_colour_gets_defaults_with_a_warning(tmp_path):
    wf = tiny_workflow(tmp_path, extra="classes: [{value: 1}]\n")
    out = smk("--configfile", "cfg.yaml", "--dry-run", cwd=wf)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "class value 1 has no name: it is called 'class 1'" in text and "class 'class 1' has no colour: [255, 0, 0] is used" in text


@pytest.mark.workflow
def test_a_big_scene_is_classified_in_shard_jobs(tmp_path):
    """classify.shard_size: the scene's header gives 4 shard jobs; joined, they equal one job's classification."""
    from roadxfer.classify import ClassifySettings, classify_scene
    from roadxfer.demo import write_scene

    wf = tiny_workflow(tmp_path, extra="classify: {models: [base], shard_size: 256}\n")
    (wf / "resources/demo").mkdir(parents=True)
    write_scene(101, wf / "resources/demo/x1.tif", wf / "resources/demo/x1.gpkg", size=400)  # there when the DAG is built
    dry = smk("--configfile", "cfg.yaml", "--cores", "2", "--dry-run", "results/classified/base/x1/classes.tif", cwd=wf)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert "classify_shard" in dry.stdout and dry.stdout.count("shard=r") == 4
    out = smk("--configfile", "cfg.yaml", "--cores", "2", "results/classified/base/x1/centrelines.gpkg", cwd=wf)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert sorted(p.stem for p in (wf / "logs/classified/base/x1/shards").glob("*.log")) == ["r0c0", "r0c1", "r1c0", "r1c1"]
    assert not list((wf / "results/classified/base/x1/shards").rglob("*.tif"))  # temporary: removed once joined
    once = tmp_path / "once"
    classify_scene(wf / "resources/demo/x1.tif", wf / "results/models/base", once / "c.tif", settings=ClassifySettings())
    with rasterio.open(once / "c.tif") as a, rasterio.open(wf / "results/classified/base/x1/classes.tif") as b:
        assert (a.transform, a.shape) == (b.transform, b.shape) and (a.read(1) == b.read(1)).all()


@pytest.mark.workflow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_job_that_asks_for_a_gpu_it_does_not_get_fails_saying_so(tmp_path):
    fixture = ROOT / "tests" / "data" / "arcgis-mtre-linknet34"
    extra = f"models: {{base: {{package: '{fixture}'}}}}\nclassify: {{models: [base]}}\n"
    wf = tiny_workflow(tmp_path, extra=extra + "resources: {classify: {threads: 1, gpu: 1}}\n")
    target = "results/classified/base/x1/classes.tif"
    out = smk("--configfile", "cfg.yaml", "--cores", "2", target, cwd=wf)
    assert out.returncode != 0 and not (wf / target).exists()
    log = (wf / "logs/classified/base/x1.log").read_text()
    assert "rule classify_scene asks for 1 GPU(s) but this machine has 0 usable by torch" in log and "cpu_fallback" in log
    (wf / "cfg.yaml").write_text((wf / "cfg.yaml").read_text() + "resources: {classify: {threads: 1, gpu: 1}, cpu_fallback: true}\n")
    out = smk("--configfile", "cfg.yaml", "--cores", "2", target, cwd=wf)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "running on the CPU (resources.cpu_fallback is on)" in (wf / "logs/classified/base/x1.log").read_text()
