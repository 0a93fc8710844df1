"""Step 3: the multi-task model, packages, and transfer training with a frozen encoder."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from conftest import ROAD, ROOT
from roadxfer.data import load_tiles
from roadxfer.demo import write_scene
from roadxfer.errors import InputError
from roadxfer.labels import LabelSettings, rasterize_scene
from roadxfer.model import ModelSpec, MultiTaskRoadModel
from roadxfer.package import load_package, write_package
from roadxfer.tiles import TileSettings, export_tiles
from roadxfer.device import cpu_has_bf16
from roadxfer.lr_schedule import find_lr, lr_factor, valley
from roadxfer.step import make_optimizer
from roadxfer.train import train, TrainConfig

FAST = {"backbone": "resnet18", "batch_size": 4, "epochs": 2, "patience": 0, "val_fraction": 0.25, "val_split": "tile"}


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> dict[str, Path]:
    """Two tiny tile datasets from demo scenes: paved roads (base) and unpaved/trails (transfer)."""
    root = tmp_path_factory.mktemp("tiles")
    out = {}
    for name, seed, kind, where in (("base", 1, "mixed", "road_type = 'paved'"), ("transfer", 11, "rural", None)):
        write_scene(seed, root / f"{name}.tif", root / f"{name}.gpkg", size=192, kind=kind)
        rasterize_scene(root / f"{name}.tif", root / f"{name}.gpkg", root / f"{name}_l.tif", root / f"{name}_o.tif", root / f"{name}.json", LabelSettings(buffer_radius=2.0), where=where)
        export_tiles(root / f"{name}.tif", root / f"{name}_l.tif", root / f"{name}_o.tif", root / name, TileSettings(tile_size=64, stride=48, keep="all"), scene_id=name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def base_package(tiles, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "base"
    train([tiles["base"]], out, TrainConfig(**FAST), classes=ROAD, threads=1)
    return out


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_package(path).model.state_dict()


def test_package_round_trip_and_definition(base_package):
    pkg = load_package(base_package)
    emd = json.loads((base_package / "base.emd").read_text())
    assert emd["ModelName"] == "MultiTaskRoadExtractor" and emd["ModelFile"] == "base.pth"
    assert emd["ModelParameters"]["backbone"] == "resnet18" and emd["ImageHeight"] == 64
    assert emd["Classes"] == [{"Value": 1, "Name": "road", "Color": [255, 0, 0]}]
    assert emd["RoadOrientation"]["orient_bin_size"] == 10 and emd["RoadOrientation"]["orient_bins"] == 18
    assert len(emd["Normalization"]["mean"]) == 3 and emd["CellSize"] == pytest.approx(0.3)
    prov = emd["roadxfer"]
    assert prov["parent"] is None and len(prov["training_data"]["sha256"]) == 64
    assert prov["training_config"]["backbone"] == "resnet18" and len(prov["history"]) == 2 and prov["code_version"]
    assert (base_package / "metrics.csv").read_text().startswith("epoch,train_loss")
    assert (base_package / "ModelCharacteristics" / "loss_graph.png").stat().st_size > 1000
    assert pkg.weights_sha256 == prov["weights_sha256"]
    assert prov["precision"] == ("bfloat16" if cpu_has_bf16() else "float32")
    # Trained channels-last, stored in the plain layout other tools expect.
    stored = torch.load(base_package / "base.pth", weights_only=True)
    assert all(t.is_contiguous() for t in stored.values())
    seg, ori = pkg.model(torch.zeros(1, 3, 64, 64))
    assert seg.shape == (1, 2, 64, 64) and ori.shape == (1, 19, 64, 64)


def test_frozen_encoder_is_bit_identical_while_decoder_changes(tiles, base_package, tmp_path):
    out = tmp_path / "transfer"
    train([tiles["transfer"]], out, TrainConfig(**{**FAST, "freeze": True}), classes=ROAD, pretrained=base_package, threads=1)
    before, after = _state(base_package), _state(out)
    enc = [k for k in before if k.startswith("encoder.")]
    assert any("running_mean" in k for k in enc)  # BatchNorm buffers are covered too
    for k in enc:
        assert torch.equal(before[k], after[k]), k
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("seg_decoder."))
    prov = json.loads((out / "transfer.emd").read_text())["roadxfer"]
    assert prov["parent"]["weights_sha256"] == load_package(base_package).weights_sha256


def test_frozen_encoder_is_not_in_the_optimiser():
    model = MultiTaskRoadModel(ModelSpec(backbone="resnet18"))
    model.freeze_encoder(True)
    opt = make_optimizer(model, TrainConfig(freeze=True), encoder_trainable=False)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in model.encoder.parameters()}
    model.train()
    assert not model.encoder.training and model.seg_decoder.training
    opt = make_optimizer(model, TrainConfig(freeze=True, lr=1e-3, unfreeze_lr_factor=0.1), encoder_trainable=True)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4])


def test_train_bn_keeps_the_frozen_encoders_batchnorm_learning(tiles, base_package, tmp_path):
    out = tmp_path / "bn"
    train([tiles["transfer"]], out, TrainConfig(**{**FAST, "freeze": True, "train_bn": True}), classes=ROAD, pretrained=base_package, threads=1)
    before, after = _state(base_package), _state(out)
    enc = [k for k in before if k.startswith("encoder.")]
    bn = {k for k in enc if k.endswith((".running_mean", ".running_var", ".num_batches_tracked")) or k.replace(".weight", ".running_mean") in before and k.endswith(".weight") or k.endswith(".bias") and k.replace(".bias", ".running_mean") in before}
    conv = [k for k in enc if k not in bn]
    assert conv and all(torch.equal(before[k], after[k]) for k in conv)  # convolutions stay frozen
    changed = {k.rsplit(".", 1)[1] for k in bn if not torch.equal(before[k], after[k])}
    assert {"weight", "bias", "running_mean", "running_var"} <= changed
    model = MultiTaskRoadModel(ModelSpec(backbone="resnet18"))
    model.freeze_encoder(True, train_bn=True)
    model.train()
    assert not model.encoder.training and model.encoder.bn1.training
    in_opt = {id(p) for g in make_optimizer(model, TrainConfig(freeze=True, train_bn=True), encoder_trainable=False).param_groups for p in g["params"]}
    assert id(model.encoder.bn1.weight) in in_opt and id(model.encoder.conv1.weight) not in in_opt
    model.eval()
    assert not model.encoder.bn1.training


def test_trainable_stages_learn_while_the_rest_of_the_encoder_stays_frozen():
    model = MultiTaskRoadModel(ModelSpec(backbone="resnet18"))
    model.freeze_encoder(True, trainable=["conv1", "bn1", "layer1"])
    model.train()
    assert model.encoder.layer1.training and model.encoder.bn1.training and not model.encoder.layer2.training
    opt = make_optimizer(model, TrainConfig(freeze=True, trainable_stages=("conv1", "bn1", "layer1")), encoder_trainable=False)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {id(p) for p in model.encoder.layer1.parameters()} <= in_opt and id(model.encoder.conv1.weight) in in_opt
    assert not in_opt & {id(p) for p in model.encoder.layer2.parameters()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 64, 64)
    seg, ori = model(x)
    (seg.mean() + ori.mean()).backward()
    opt.step()
    after = model.state_dict()
    assert not torch.equal(before["encoder.layer1.0.conv1.weight"], after["encoder.layer1.0.conv1.weight"])
    assert torch.equal(before["encoder.layer2.0.conv1.weight"], after["encoder.layer2.0.conv1.weight"])
    assert torch.equal(before["encoder.layer3.0.bn1.running_mean"], after["encoder.layer3.0.bn1.running_mean"])  # frozen stages keep their statistics
    with pytest.raises(InputError, match="layer9"):
        model.freeze_encoder(True, trainable=["layer9"])
    model.freeze_encoder(False)
    assert model.encoder_trainable == () and all(p.requires_grad for p in model.encoder.parameters())


def test_side_network_starts_as_the_pretrained_model_and_learns_beside_the_frozen_encoder(tiles, base_package, tmp_path):
    before = _state(base_package)
    fresh = MultiTaskRoadModel(ModelSpec(backbone="resnet18", side_channels=8))
    missing, unexpected = fresh.load_state_dict(before, strict=False)
    assert not unexpected and missing and all(k.startswith("side.") for k in missing)
    fresh.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # the side's merge convolutions start at zero: the pretrained model's output exactly
        assert torch.equal(fresh(x)[0], load_package(base_package).model(x)[0]) and torch.equal(fresh.segment(x), fresh(x)[0])

    out = tmp_path / "side"
    train([tiles["transfer"]], out, TrainConfig(**{**FAST, "freeze": True, "side_channels": 8}), classes=ROAD, pretrained=base_package, threads=1)
    pkg = load_package(out)  # strict: the package holds the side network and its .emd says so
    assert pkg.spec.side_channels == 8
    after = pkg.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))  # the encoder stays frozen
    assert any(after[k].abs().sum() > 0 for k in after if k.startswith("side.merge.") and k.endswith(".weight"))  # and the side learnt

    # Training on from it without the side network would drop what it learnt: refused, naming the fix.
    with pytest.raises(InputError, match="side_channels: 8"):
        train([tiles["transfer"]], tmp_path / "noside", TrainConfig(**{**FAST, "freeze": True}), classes=ROAD, pretrained=out, threads=1)
    assert not (tmp_path / "noside" / "noside.pth").exists()


def test_side_network_beside_the_reference_architecture(tmp_path, caplog):
    from roadxfer.linknet_mtl import LinkNet34MTL
    from roadxfer.package import build_emd

    plain = LinkNet34MTL(ModelSpec(arch="linknet34_mtl", orientation_bins=36)).eval()
    spec = ModelSpec(arch="linknet34_mtl", orientation_bins=36, side_channels=4)
    side = LinkNet34MTL(spec)
    missing, unexpected = side.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("side.") for k in missing)
    side.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():  # a fresh side network: the reference model's output exactly
        assert torch.equal(side.segment(x), plain.segment(x)) and torch.equal(side(x)[1], plain(x)[1])
        side.side.merge[0].weight.fill_(0.1)
        assert not torch.equal(side.segment(x), plain.segment(x))  # and its features do reach the road mask
    emd = build_emd("ref", spec, tile_size=64, classes=ROAD, bin_size=10, mean=[0.0] * 3, std=[1 / 255] * 3, cell_size=None, provenance={})
    with caplog.at_level(logging.WARNING, logger="roadxfer.package"):
        write_package(tmp_path / "ref", side, emd)
    assert not (tmp_path / "ref" / "arcgis").exists() and "no reference-layout copy" in caplog.text  # the reference tool could not load it
    assert load_package(tmp_path / "ref").spec.side_channels == 4


def test_unfreeze_after_trains_the_encoder_later(tiles, base_package, tmp_path):
    out = tmp_path / "unfrozen"
    train([tiles["transfer"]], out, TrainConfig(**{**FAST, "epochs": 2, "freeze": True, "unfreeze_after": 1}), classes=ROAD, pretrained=base_package, threads=1)
    hist = json.loads((out / "unfrozen.emd").read_text())["roadxfer"]["history"]
    assert [h["encoder_frozen"] for h in hist] == [True, False]


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_loss_decreases_on_a_tiny_dataset(tiles, tmp_path, precision):
    cfg = TrainConfig(**{**FAST, "epochs": 6, "augment": {"flips": False, "rot90": False, "color_jitter": 0.0}, "precision": precision})
    train([tiles["base"]], tmp_path / "m", cfg, classes=ROAD, threads=1)
    prov = json.loads((tmp_path / "m" / "m.emd").read_text())["roadxfer"]
    hist = prov["history"]
    assert hist[-1]["train_loss"] < 0.8 * hist[0]["train_loss"]
    assert prov["precision"] == ("bfloat16" if precision == "auto" and cpu_has_bf16() else "float32")


@pytest.mark.parametrize(("amx", "avx512_bf16", "native"), [(True, False, True), (False, True, True), (False, False, False)])
def test_cpu_bfloat16_is_native_with_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, native):
    from roadxfer.device import cpu_has_bf16

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")  # whatever ISA this run is held to
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    cpu_has_bf16.cache_clear()  # cached: asked once per process
    try:
        assert cpu_has_bf16() is native
    finally:
        cpu_has_bf16.cache_clear()


def test_precision_choices(monkeypatch):
    """auto: bfloat16 on CPUs with AMX or AVX512-BF16 only (emulated elsewhere, slower than float32); fp16 needs CUDA."""
    import roadxfer.device as tr

    cpu = torch.device("cpu")
    assert tr.amp_dtype(cpu, "fp32") is None and tr.amp_dtype(cpu, "bf16") is torch.bfloat16
    monkeypatch.setattr(tr, "cpu_has_bf16", lambda: True)
    assert tr.amp_dtype(cpu, "auto") is torch.bfloat16
    monkeypatch.setattr(tr, "cpu_has_bf16", lambda: False)
    assert tr.amp_dtype(cpu, "auto") is None
    assert tr.amp_dtype(torch.device("meta"), "auto") is None
    with pytest.raises(InputError, match="fp16 needs a CUDA GPU"):
        tr.amp_dtype(cpu, "fp16")
    with pytest.raises(InputError, match="'half' is not one of"):
        tr.amp_dtype(cpu, "half")
    # The config schema offers the same choices as the code (and the CLI, which takes them from roadxfer).
    schema = yaml.safe_load((ROOT / "schemas" / "config.schema.yaml").read_text())
    for section in ("training", "classify"):
        assert tuple(schema["properties"][section]["properties"]["precision"]["enum"]) == tr.PRECISIONS


def _train_cmd(tiles: Path, out: Path, workdir: Path, epochs: int, **options: Any) -> list[str]:
    code = (
        "import logging, sys; sys.path.insert(0, %r)\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "from roadxfer.train import TrainConfig, train\n"
        "train([%r], %r, TrainConfig(**%r), classes=%r, workdir=%r, threads=1)\n"
    ) % (str(ROOT), str(tiles), str(out), {**FAST, "epochs": epochs, **options}, ROAD, str(workdir))
    return [sys.executable, "-c", code]


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_result(tiles, tmp_path):
    """lr auto and one-cycle: a resumed run keeps the rate found before the kill and picks the schedule up at the right step."""
    epochs = 5
    subprocess.run(_train_cmd(tiles["base"], tmp_path / "straight", tmp_path / "w1", epochs, lr_schedule="one_cycle", lr="auto"), check=True)
    ckpt = tmp_path / "w2" / "checkpoint.pt"
    proc = subprocess.Popen(_train_cmd(tiles["base"], tmp_path / "resumed", tmp_path / "w2", epochs, checkpoint_seconds=0, lr_schedule="one_cycle", lr="auto"))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and torch.load(ckpt, weights_only=True)["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)  # as SLURM preemption does
    proc.wait()
    assert not (tmp_path / "resumed").exists()  # nothing that looks like a finished package
    done = torch.load(ckpt, weights_only=True)["epoch"] + 1
    assert 1 < done + 1 <= epochs
    # Resumed with the default checkpoint_seconds: how often checkpoints are written is not a setting that voids them.
    rerun = subprocess.run(_train_cmd(tiles["base"], tmp_path / "resumed", tmp_path / "w2", epochs, lr_schedule="one_cycle", lr="auto"), check=True, capture_output=True, text=True)
    assert "lr auto:" not in rerun.stderr  # the range test ran before the kill only
    # It resumed: only the epochs after the checkpoint ran (a fresh start would log epoch 1 again).
    assert f"resuming from {ckpt} after epoch {done}" in rerun.stderr
    assert [int(e) for e in re.findall(rf"epoch (\d+)/{epochs}  train_loss", rerun.stderr)] == list(range(done + 1, epochs + 1))
    a, b = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)
    hist = json.loads((tmp_path / "resumed" / "resumed.emd").read_text())["roadxfer"]["history"]
    assert [h["epoch"] for h in hist] == list(range(1, epochs + 1))


@pytest.mark.parametrize("total", [1, 2, 3, 40, 400])
def test_one_cycle_is_torchs_one_cycle_lr(total):
    """fastai's fit_one_cycle (the reference tool's schedule) as torch implements it, step for step."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=total, pct_start=0.3, div_factor=25, final_div_factor=1e4, cycle_momentum=False)
    for step in range(total):
        assert lr_factor("one_cycle", step, total) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        opt.step()
        if step < total - 1:
            sched.step()


@pytest.mark.slow
def test_lr_auto_is_the_range_tests_pick_and_leaves_the_training_as_it_was(tiles, tmp_path):
    """The range test restores weights, BatchNorm statistics and random state: training with
    the rate it found gives the same weights as training with that rate given as a number."""
    auto = tmp_path / "auto"
    train([tiles["base"]], auto, TrainConfig(**{**FAST, "lr": "auto"}), classes=ROAD, threads=1)
    ours = json.loads((auto / "auto.emd").read_text())["roadxfer"]
    found = ours["lr_found"]
    assert 1e-7 <= found < 1.0 and ours["training_config"]["lr"] == "auto"
    assert [h["lr"] for h in ours["history"]] == [found, found]
    rows = (auto / "lr_find.csv").read_text().splitlines()
    assert rows[0] == "lr,smoothed_loss" and 5 <= len(rows) - 1 <= 100
    curve = [tuple(map(float, r.split(","))) for r in rows[1:]]
    assert all(a[0] < b[0] for a, b in zip(curve, curve[1:]))  # rates rise
    kept = curve[10:-5]  # as fastai: the first tenth and the last 5 steps left out
    assert found == valley([c[0] for c in kept], [c[1] for c in kept])
    assert (auto / "ModelCharacteristics" / "lr_find.png").stat().st_size > 0
    given = tmp_path / "given"
    train([tiles["base"]], given, TrainConfig(**{**FAST, "lr": found}), classes=ROAD, threads=1)
    a, b = _state(auto), _state(given)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_valley_is_fastais_suggestion():
    """Known answers: fastai's valley (Esri's rule) takes the longest falling run and a point
    half-way through its middle third; a later, shorter dip does not win."""
    assert valley(list(range(10)), [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]) == 3
    losses = [5, 6, 5.5, 5, 4, 3, 2, 1, 0.5, 2, 1.9, 1.8, 3]  # the longest fall: index 1 to 8 (8 points); then a shorter dip
    assert valley([10.0 * i for i in range(len(losses))], losses) == 30.0


def test_a_diverging_range_test_says_to_set_the_rate():
    model, batch, _ = _step_case()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="diverged after [0-4] step.*set training.lr to a number"):
        find_lr(model, iter([batch] * 10), torch.device("cpu"), TrainConfig(**{**FAST, "precision": "fp32"}), encoder_trainable=True, start=1e3, end=1e6, steps=10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored all the same


def test_cosine_and_constant_schedules():
    cos = [lr_factor("cosine", step, 50) for step in range(50)]
    assert cos[0] == 1.0 and all(a > b for a, b in zip(cos, cos[1:])) and cos[-1] > 0  # the last step still learns
    assert {lr_factor("constant", step, 50) for step in range(50)} == {1.0}
    with pytest.raises(ValueError, match="lr_schedule 'step': one of constant, one_cycle, cosine"):
        TrainConfig(lr_schedule="step")
    for bad in ("fast", 0, -1e-3):
        with pytest.raises(ValueError, match=f"lr {bad!r}: a positive number or 'auto'"):
            TrainConfig(lr=bad)
    schema = yaml.safe_load((ROOT / "schemas" / "config.schema.yaml").read_text())
    assert tuple(schema["properties"]["training"]["properties"]["lr_schedule"]["enum"]) == ("constant", "one_cycle", "cosine")


def test_schedule_sets_every_groups_rate_and_the_package_records_it(tiles, base_package, tmp_path):
    """With unfreeze_after the encoder's group follows the schedule at its lower rate; metrics keep each epoch's last rate."""
    cfg = TrainConfig(**{**FAST, "epochs": 3, "lr_schedule": "cosine", "freeze": True, "unfreeze_after": 1, "unfreeze_lr_factor": 0.1})
    rates: list[list[float]] = []
    real_step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        rates.append([g["lr"] for g in self.param_groups])
        return real_step(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "step", spy)
        train([tiles["transfer"]], tmp_path / "m", cfg, classes=ROAD, pretrained=base_package, threads=1)
    total = len(rates)
    assert total % 3 == 0 and [len(r) for r in rates] == [1] * (total // 3) + [2] * (2 * total // 3)  # encoder group from epoch 2
    for step, groups in enumerate(rates):
        f = lr_factor("cosine", step, total)
        assert groups[0] == pytest.approx(1e-3 * f) and groups[1:] in ([], [pytest.approx(1e-4 * f)])
    hist = json.loads((tmp_path / "m" / "m.emd").read_text())["roadxfer"]["history"]
    assert [h["lr"] for h in hist] == pytest.approx([1e-3 * lr_factor("cosine", (e + 1) * total // 3 - 1, total) for e in range(3)])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_keeps_freed_memory_unless_the_user_set_it(monkeypatch):
    import ctypes

    from roadxfer.device import keep_freed_memory

    assert keep_freed_memory.__wrapped__() is (hasattr(ctypes.CDLL(None), "mallopt"))  # glibc: applied
    monkeypatch.setenv("ROADXFER_MALLOC", "default")
    assert keep_freed_memory.__wrapped__() is False  # glibc left as it is (e.g. to compare, bench/bench_train.py)
    monkeypatch.delenv("ROADXFER_MALLOC")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory.__wrapped__() is False  # the user's MALLOC_* variables win


@pytest.mark.slow
def test_checkpoints_are_written_at_most_every_checkpoint_seconds(tiles, tmp_path, caplog):
    """0 writes one after every epoch but the last (whose state is the package); a long interval none on a short run."""
    def written(seconds: float, name: str) -> list[int]:
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="roadxfer.train"):
            train([tiles["base"]], tmp_path / name, TrainConfig(**{**FAST, "epochs": 4, "checkpoint_seconds": seconds}), classes=ROAD, threads=1)
        return [int(e) for e in re.findall(r"checkpoint written after epoch (\d+)", caplog.text)]

    assert written(0, "every") == [1, 2, 3]
    assert written(3600, "hourly") == []
    assert not (tmp_path / ".every.work").exists() and not (tmp_path / ".hourly.work").exists()  # removed once the package is written


def test_early_stop_after_patience_epochs_without_improvement(tiles, tmp_path):
    """A learning rate too small to move anything: validation IoU stays where it was, so patience 1 stops after epoch 2."""
    train([tiles["base"]], tmp_path / "m", TrainConfig(**{**FAST, "epochs": 6, "patience": 1, "lr": 1e-12}), classes=ROAD, threads=1)
    emd = json.loads((tmp_path / "m" / "m.emd").read_text())["roadxfer"]
    assert (emd["epochs_run"], emd["stopped_early"]) == (2, True)
    assert not (tmp_path / ".m.work").exists()


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_checkpoints_the_epoch_and_stops(tiles, tmp_path, processes):
    """SLURM's SIGTERM before a kill: the epoch ends, is checkpointed (however long the interval), the job fails, a rerun resumes.

    SLURM signals every process of the job: with 2 (DDP) processes the whole process group gets it.
    """
    epochs = 6  # the signal lands in epoch 2 or so: room before the last epoch, which would end in a package instead
    cmd = _train_cmd(tiles["base"], tmp_path / "m", tmp_path / "w", epochs, checkpoint_seconds=3600)
    if processes > 1:
        cmd[-1] = cmd[-1].replace("threads=1)", f"threads=1, processes={processes})")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, start_new_session=True)
    seen = []
    for line in proc.stderr:  # the first epoch's log line: training is under way
        seen.append(line)
        if f"epoch 1/{epochs}" in line:
            os.killpg(proc.pid, signal.SIGTERM)
            break
    err = "".join(seen) + proc.stderr.read()
    assert proc.wait(timeout=300) != 0, err
    assert not (tmp_path / "m").exists()  # no package that looks finished
    done = torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=True)["epoch"] + 1
    assert 1 <= done < epochs and f"SIGTERM: stopped after epoch {done} of {epochs}" in err
    assert (f"training on {processes} processes" in err) is (processes > 1)
    rerun = subprocess.run(_train_cmd(tiles["base"], tmp_path / "m", tmp_path / "w", epochs), check=True, capture_output=True, text=True)
    assert f"resuming from {tmp_path / 'w' / 'checkpoint.pt'} after epoch {done}" in rerun.stderr
    assert (tmp_path / "m" / "m.pth").is_file()


@pytest.mark.parametrize("classes", [[{"value": 1, "name": "unpaved road"}], [{"value": 1, "name": "unpaved road"}, {"value": 2, "name": "trail"}]])
def test_changed_classes_reinitialise_heads(tiles, base_package, tmp_path, caplog, classes):
    with caplog.at_level(logging.WARNING):
        train([tiles["transfer"]], tmp_path / "m", TrainConfig(**{**FAST, "epochs": 1, "freeze": True}), classes=classes, pretrained=base_package, threads=1)
    assert "re-initialised the segmentation head" in caplog.text
    before, after = _state(base_package), _state(tmp_path / "m")
    assert after["seg_head.0.weight"].shape[0] == len(classes) + 1
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("encoder."))


def test_training_on_an_arcgis_exported_folder(tiles, tmp_path, caplog):
    """ArcGIS Pro's Classified Tiles: no orientation chips, backslashes in map.txt."""
    arc = tmp_path / "arcgis"
    shutil.copytree(tiles["transfer"], arc)
    shutil.rmtree(arc / "orientation")
    (arc / "map.txt").write_text((arc / "map.txt").read_text().replace("/", "\\"))
    stats = json.loads((arc / "esri_accumulated_stats.json").read_text())
    stats.pop("roadxfer")
    (arc / "esri_accumulated_stats.json").write_text(json.dumps(stats))
    with caplog.at_level(logging.WARNING):
        best = train([arc], tmp_path / "m", TrainConfig(**{**FAST, "epochs": 1}), classes=ROAD, threads=1)
    # No orientation chips: the targets are derived from the road mask, and the log says so.
    assert "orientation targets derived from the road mask" in caplog.text
    assert 0 <= best["val_orient_acc"] <= 1
    drawn = load_tiles([tiles["transfer"]], ROAD)
    derived = load_tiles([arc], ROAD, orientation_bin_size=10)
    road = (drawn.orient > 0) & (drawn.orient != 255)
    assert np.array_equal(derived.orient[drawn.orient == 255], drawn.orient[drawn.orient == 255])
    diff = (derived.orient[road].astype(int) - drawn.orient[road]) % 18
    assert (np.minimum(diff, 18 - diff) <= 1).mean() > 0.8  # within one 10-degree bin of the drawn lines'
    silent = load_tiles([arc], ROAD)  # without a bin size nothing is derived, and the log says that too
    assert (silent.orient == 255).all() and "orientation head is NOT trained" in caplog.text


def test_compatibility_errors(tiles, base_package, tmp_path):
    with pytest.raises(InputError, match=r"base: is a linknet/resnet18 model but the config asks for linknet/resnet34"):
        train([tiles["transfer"]], tmp_path / "a", TrainConfig(**{**FAST, "backbone": "resnet34", "freeze": True}), classes=ROAD, pretrained=base_package)
    four = tmp_path / "four"
    shutil.copytree(base_package, four)
    (four / "base.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"base\.pth: weights do not match the sha256"):
        load_package(four)
    emd = json.loads((four / "base.emd").read_text())
    emd["roadxfer"].pop("weights_sha256")
    (four / "base.emd").write_text(json.dumps(emd))
    with pytest.raises(InputError, match=r"base\.pth: cannot be read as PyTorch weights"):
        load_package(four)
    (four / "base.emd").write_text("{ truncated")
    with pytest.raises(InputError, match=r"base\.emd: model definition is corrupt"):
        load_package(four)
    (four / "base.emd").write_text(json.dumps({"Framework": "PyTorch", "ModelName": "UnetClassifier"}))
    with pytest.raises(InputError, match="not a roadxfer or reference MultiTaskRoadExtractor"):
        load_package(four)
    other = tmp_path / "unet"
    train([tiles["base"]], other, TrainConfig(**{**FAST, "epochs": 1, "arch": "unet"}), classes=ROAD, threads=1)
    (other / "unet.pth").replace(four / "base.pth")
    emd = json.loads((base_package / "base.emd").read_text())
    emd["roadxfer"].pop("weights_sha256")
    (four / "base.emd").write_text(json.dumps(emd))
    with pytest.raises(InputError, match="weights do not fit a linknet/resnet18 model"):
        load_package(four)


def test_band_count_mismatch_with_pretrained(tiles, base_package, tmp_path):
    import rasterio

    two = tmp_path / "two"
    shutil.copytree(tiles["transfer"], two)
    for chip in (two / "images").iterdir():
        with rasterio.open(chip) as src:
            data, prof = src.read([1, 2]), src.profile
        prof.update(count=2)
        with rasterio.open(chip, "w", **prof) as dst:
            dst.write(data)
    with pytest.raises(InputError, match=r"two: has 2-band tiles but the pretrained model .* takes 3 bands"):
        train([two], tmp_path / "m", TrainConfig(**{**FAST, "freeze": True}), classes=ROAD, pretrained=base_package)


def test_bad_training_data(tiles, tmp_path):
    empty = tmp_path / "empty"
    shutil.copytree(tiles["base"], empty)
    (empty / "map.txt").write_text("")
    with pytest.raises(InputError, match="empty: holds no image/label chips"):
        train([empty], tmp_path / "m", TrainConfig(**FAST), classes=ROAD)
    with pytest.raises(InputError, match=r"labels/\d{9}\.tif: label chip has class value\(s\) \[1\] not listed"):
        train([tiles["base"]], tmp_path / "m", TrainConfig(**FAST), classes=[{"value": 2, "name": "x"}])
    small = tmp_path / "small"
    src = tmp_path / "small_src"
    write_scene(5, src.with_suffix(".tif"), src.with_suffix(".gpkg"), size=128)
    rasterize_scene(src.with_suffix(".tif"), src.with_suffix(".gpkg"), tmp_path / "l.tif", tmp_path / "o.tif", tmp_path / "s.json", LabelSettings())
    export_tiles(src.with_suffix(".tif"), tmp_path / "l.tif", tmp_path / "o.tif", small, TileSettings(tile_size=32, stride=32))
    with pytest.raises(InputError, match="small: has 32px tiles but .* has 64px"):
        train([tiles["base"], small], tmp_path / "m", TrainConfig(**FAST), classes=ROAD)
    assert not (tmp_path / "m").exists()


def test_finished_package_is_not_replaced_by_a_failed_write(base_package, tmp_path):
    pkg = tmp_path / "base"
    shutil.copytree(base_package, pkg)
    before = (pkg / "base.pth").read_bytes()
    model = MultiTaskRoadModel(ModelSpec(backbone="resnet18"))
    with pytest.raises(FileNotFoundError):
        write_package(pkg, model, {"roadxfer": {}}, extras={"metrics.csv": tmp_path / "missing.csv"})
    assert (pkg / "base.pth").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]


def test_tiles_can_be_staged_on_node_local_scratch(tiles, tmp_path, monkeypatch, caplog):
    scratch = tmp_path / "node-local"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    with caplog.at_level(logging.INFO):
        train([tiles["base"]], tmp_path / "m", TrainConfig(**{**FAST, "epochs": 1, "stage_tiles": True}), classes=ROAD, threads=1)
    assert f"staged 1 tile folder(s) to {scratch}" in caplog.text
    assert list(scratch.iterdir()) == []  # cleaned up after loading
    sources = json.loads((tmp_path / "m" / "m.emd").read_text())["roadxfer"]["training_data"]["sources"]
    assert sources == [str(tiles["base"])]  # provenance names the real data, not the staged copy


def test_direction_loss_counts_road_pixels_only():
    """Known answers: uniform bins cost ln(k) on road pixels; no-road and ignore pixels cost nothing."""
    from roadxfer.losses import direction_hits, direction_loss, seg_orient_loss

    k = 18
    logp = torch.log_softmax(torch.zeros(1, k + 1, 2, 2), 1)
    ori_t = torch.tensor([[[0, 255], [3, 5]]])
    assert float(direction_loss(logp, ori_t)) == pytest.approx(np.log(k), abs=1e-6)
    assert float(direction_loss(logp, torch.tensor([[[0, 255], [0, 255]]]))) == 0.0
    # The "no road" channel does not dilute the direction term: all mass on "no road", bins uniform.
    logits = torch.zeros(1, k + 1, 2, 2)
    logits[:, 0] = 20.0
    assert float(direction_loss(torch.log_softmax(logits, 1), ori_t)) == pytest.approx(np.log(k), abs=1e-5)
    # A confident right answer costs about nothing.
    logits = torch.full((1, k + 1, 2, 2), -20.0)
    logits[0, 3, 1, 0] = logits[0, 5, 1, 1] = 20.0
    assert float(direction_loss(torch.log_softmax(logits, 1), ori_t)) < 1e-6
    seg = torch.zeros(1, 2, 2, 2)
    seg_t = torch.tensor([[[0, 255], [1, 1]]])
    base = seg_orient_loss(seg, logp, seg_t, ori_t, orientation_weight=1.0, dice_weight=0.0)
    both = seg_orient_loss(seg, logp, seg_t, ori_t, orientation_weight=1.0, dice_weight=0.0, direction_weight=2.0)
    assert float(both - base) == pytest.approx(2 * np.log(k), abs=1e-5)
    # Direction hits wrap around: bin 1 and bin 18 are neighbours (0 and 180 degrees).
    pred = torch.full((1, k + 1, 1, 3), -20.0)
    pred[0, 18, 0, 0] = pred[0, 2, 0, 1] = pred[0, 9, 0, 2] = 20.0
    assert direction_hits(pred, torch.tensor([[[1, 1, 1]]])) == (0, 2, 3)


def test_rehearsal_background_the_model_calls_road_counts_in_no_loss():
    """Known answer: unlabelled background the model calls road (P >= threshold) is ignored; the rest stays background."""
    from roadxfer import IGNORE_VALUE, UNLABELLED_VALUE
    from roadxfer.losses import open_background, seg_orient_loss

    p_road = torch.tensor([[[0.9, 0.5], [0.2, 0.9]]])
    logits = torch.stack([torch.log(1 - p_road), torch.log(p_road)], 1)
    u = UNLABELLED_VALUE
    seg_t = torch.tensor([[[u, u], [u, 1]]])
    ori_t = torch.tensor([[[0, 0], [0, 4]]])
    seg2, ori2 = open_background(logits, seg_t, ori_t, 0.5)
    assert seg2.tolist() == [[[IGNORE_VALUE, IGNORE_VALUE], [0, 1]]]
    assert ori2.tolist() == [[[IGNORE_VALUE, IGNORE_VALUE], [0, 4]]]
    # The loss is the cross-entropy of the two pixels left: -ln(0.8) for the background, -ln(0.9) for the road.
    logp = torch.log_softmax(torch.zeros(1, 19, 2, 2), 1)
    loss = seg_orient_loss(logits, logp, seg2, torch.full_like(ori2, IGNORE_VALUE), orientation_weight=0.0, dice_weight=0.0)
    assert float(loss) == pytest.approx(-(np.log(0.8) + np.log(0.9)) / 2, abs=1e-6)
    # Tiles without the mark (the new samples) are untouched.
    plain = torch.tensor([[[0, 0], [0, 1]]])
    assert open_background(logits, plain, ori_t, 0.5)[0] is plain


def test_validation_split_keeps_a_few_scenes_for_training():
    """Fewer than five scenes: each scene gives a share of its tiles to validation, none is held out whole."""
    from roadxfer.data import split

    fake = type("D", (), {"__len__": lambda self: 35, "scene": np.repeat([0, 1, 2], [10, 20, 5]), "scenes": list("abc"), "sources": list("abc")})()
    train_idx, val_idx = split(fake, val_fraction=0.2, mode="auto", seed=0)
    assert len(train_idx) + len(val_idx) == 35 and not set(train_idx) & set(val_idx)
    assert [int((fake.scene[val_idx] == s).sum()) for s in range(3)] == [2, 4, 1]
    assert set(fake.scene[train_idx]) == {0, 1, 2}
    five = type("D", (), {"__len__": lambda self: 50, "scene": np.repeat(np.arange(5), 10), "scenes": list("abcde"), "sources": list("abcde")})()
    _, val5 = split(five, val_fraction=0.2, mode="auto", seed=0)
    assert len(set(five.scene[val5])) == 1 and len(val5) == 10  # from five scenes up: whole scenes held out
    _, val_scene = split(fake, val_fraction=0.2, mode="scene", seed=0)
    assert len(set(fake.scene[val_scene])) == 1


def test_rehearsal_mixes_a_share_of_old_tiles_into_each_epoch(tiles, base_package, tmp_path, caplog):
    """Each epoch holds every new training tile plus a fresh draw of rehearsal tiles making up the configured share."""
    from roadxfer.rehearsal import epoch_indexes, rehearsal_count

    assert rehearsal_count(30, 100, 0.25) == 10 and rehearsal_count(30, 4, 0.5) == 4 and rehearsal_count(30, 100, 0.0) == 0
    new, old = np.arange(30), np.arange(30, 130)
    e0, e1 = (epoch_indexes(new, old, 0.25, seed=1, epoch=e) for e in (0, 1))
    assert set(new) <= set(e0) and len(e0) == 40 and len(set(e0) - set(new)) == 10
    assert set(e0) != set(e1) and np.array_equal(e0, epoch_indexes(new, old, 0.25, seed=1, epoch=0))
    out = tmp_path / "rehearsed"
    with caplog.at_level(logging.INFO, logger="roadxfer.train"):
        train([tiles["transfer"]], out, TrainConfig(**{**FAST, "epochs": 1, "freeze": True, "rehearsal_fraction": 0.5}), classes=ROAD,
              pretrained=base_package, threads=1, rehearsal=[tiles["base"]])
    lineage = json.loads((out / "rehearsed.emd").read_text())["roadxfer"]
    n_base = len(list((tiles["base"] / "images").iterdir()))
    assert lineage["rehearsal"] == {"sources": [str(tiles["base"])], "scenes": ["base"], "tiles": n_base, "fraction": 0.5}
    assert lineage["training_data"]["scenes"] == ["transfer"]
    assert "rehearsal:" in caplog.text
    # rehearsal_open: the rehearsal tiles' background is marked in memory and opened batch by batch.
    train([tiles["transfer"]], tmp_path / "open", TrainConfig(**{**FAST, "epochs": 1, "freeze": True, "rehearsal_fraction": 0.5, "rehearsal_open": 0.5}),
          classes=ROAD, pretrained=base_package, threads=1, rehearsal=[tiles["base"]])
    assert json.loads((tmp_path / "open" / "open.emd").read_text())["roadxfer"]["training_config"]["rehearsal_open"] == 0.5


def test_shared_package_is_half_the_size_and_predicts_the_same(base_package, tmp_path):
    from roadxfer.cli import main

    out = tmp_path / "shared"
    assert main(["share", str(base_package), str(out)]) == 0
    a, b = load_package(base_package), load_package(out)
    size = lambda p: (Path(p) / f"{Path(p).name}.pth").stat().st_size  # noqa: E731
    assert size(out) < 0.55 * size(base_package)
    assert b.emd["roadxfer"]["shared_from"]["weights_sha256"] == a.weights_sha256 and b.weights_sha256 != a.weights_sha256
    assert b.emd["roadxfer"]["spec"] == a.emd["roadxfer"]["spec"] and b.mean == a.mean
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        pa, pb = (torch.softmax(p.model.segment((x - torch.tensor(p.mean).view(1, -1, 1, 1)) / torch.tensor(p.std).view(1, -1, 1, 1)), 1) for p in (a, b))
    assert float((pa - pb).abs().max()) < 0.02
    (out / "shared.pth").write_bytes((out / "shared.pth").read_bytes()[:-10])
    with pytest.raises(InputError, match="sha256"):
        load_package(out)


def _ddp_step(rank, world, port, out):
    """One optimiser step of DDP on this rank's half of a fixed batch (BatchNorm in eval mode)."""
    import os

    import torch.distributed as dist

    from roadxfer.distributed import global_batches, parallel
    from roadxfer.step import train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, batch, cfg = _step_case()
        half = global_batches(4, 4, torch.Generator().manual_seed(3), drop_last=True, rank=rank, world=world)[0]
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), [t[half] for t in batch], torch.device("cpu"), cfg, forward=parallel(model, world, torch.device("cpu")))
        if rank == 0:
            torch.save(model.state_dict(), out)
    finally:
        dist.destroy_process_group()


def _step_case():
    from roadxfer.step import attach_io

    torch.manual_seed(0)
    model = MultiTaskRoadModel(ModelSpec(arch="linknet", backbone="resnet18", in_channels=3, n_classes=1, orientation_bins=18))
    attach_io(model, [0.5] * 3, [0.25] * 3, 10, torch.device("cpu"))
    model.eval()  # BatchNorm on running statistics: per-process batch statistics are what DDP cannot match on the CPU
    img = torch.rand(4, 3, 64, 64)
    seg = torch.zeros(4, 64, 64, dtype=torch.int64)
    seg[:, 20:30] = 1  # the same pixel counts in every tile: per-process means average to the global mean
    ori = seg * 4
    return model, (img, seg, ori), TrainConfig(dice_weight=0.0, precision="fp32")  # DDP is compared, not rounding


@pytest.mark.slow
def test_ddp_step_equals_one_process_step(tmp_path):
    """Gradients of 2 gloo processes, 2 tiles each, are averaged into the step one process takes on all 4."""
    from roadxfer.distributed import free_port, global_batches
    from roadxfer.step import train_step

    model, batch, cfg = _step_case()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    order = global_batches(4, 4, torch.Generator().manual_seed(3), drop_last=True)[0]
    train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), [t[order] for t in batch], torch.device("cpu"), cfg)
    torch.multiprocessing.spawn(_ddp_step, args=(2, free_port(), str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    moved = max(float((model.state_dict()[k] - before[k]).abs().max()) for k in before if before[k].is_floating_point())
    gap = max(float((model.state_dict()[k] - ddp[k]).abs().max()) for k in before if before[k].is_floating_point())
    assert moved > 1e-3 and gap < 1e-4 * max(1.0, moved), (moved, gap)


@pytest.mark.slow
def test_two_processes_train_end_to_end(tiles, tmp_path):
    """DistributedDataParallel on the CPU (gloo, 2 processes, 2 tiles each) against one process with batches of 4."""
    from roadxfer.distributed import global_batches

    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    whole = global_batches(10, 4, g(), drop_last=True)
    halves = [global_batches(10, 4, g(), drop_last=True, rank=r, world=2) for r in (0, 1)]
    assert [a + b for a, b in zip(*halves)] == whole and len(whole) == 2
    assert whole == [list(b) for b in torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(range(10), generator=g()), 4, True)]
    cfg = TrainConfig(**{**FAST, "epochs": 2})
    one = train([tiles["base"]], tmp_path / "one", cfg, classes=ROAD, threads=1)
    two = train([tiles["base"]], tmp_path / "two", cfg, classes=ROAD, threads=2, processes=2)
    emd = json.loads((tmp_path / "two" / "two.emd").read_text())["roadxfer"]
    assert emd["processes"] == 2 and len(emd["history"]) == 2 and not (tmp_path / ".two.work").exists()
    # Stated tolerance: BatchNorm sees 2 tiles per process instead of 4 (SyncBatchNorm needs CUDA) and
    # the Dice term is per process, so the runs are not bit-equal: validation loss within 2 %.
    assert two["val_loss"] == pytest.approx(one["val_loss"], rel=0.02)
    with pytest.raises(InputError, match="divisible"):
        train([tiles["base"]], tmp_path / "three", TrainConfig(**{**FAST, "batch_size": 3}), classes=ROAD, processes=2)


def test_gpu_process_groups_reduce_cpu_tensors_with_gloo():
    """The epoch's loss sums and the stop flag are CPU tensors: on GPUs the group needs gloo for
    them beside NCCL (NCCL alone fails them at the end of the first epoch). No GPU here to run it."""
    from roadxfer.distributed import process_group_backend

    assert dict(pair.split(":") for pair in process_group_backend(True).split(",")) == {"cpu": "gloo", "cuda": "nccl"}
    assert process_group_backend(False) == "gloo"


@pytest.mark.slow
def test_two_processes_run_one_range_test(tiles, tmp_path):
    """lr: auto under DDP: each step's loss is averaged over the ranks, so they stop the test at the
    same step and train with the same rate (a rank that stopped alone would leave the other waiting)."""
    train([tiles["base"]], tmp_path / "two", TrainConfig(**{**FAST, "epochs": 1, "lr": "auto"}), classes=ROAD, threads=2, processes=2)
    emd = json.loads((tmp_path / "two" / "two.emd").read_text())["roadxfer"]
    assert emd["processes"] == 2 and 1e-7 <= emd["lr_found"] < 10 and emd["history"][0]["lr"] == emd["lr_found"]


def test_eta_of_the_epochs_left():
    from roadxfer.train import eta_text

    assert eta_text([10.0, 20.0, 30.0, 40.0], 3) == "about 1 min 30 s left"  # the mean of the last three epochs (30 s) x 3
    assert eta_text([5.0], 2) == "about 10 s left"
    assert eta_text([5.0], 0) == "last epoch" and eta_text([], 4) == ""


def test_a_cpu_held_to_avx2_does_not_count_as_bfloat16(monkeypatch):
    """ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY below AVX-512 emulate an AVX2-only CPU: `auto` must then train in float32 as there."""
    from roadxfer.device import amp_dtype

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)  # a CPU with AMX...
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # ...held to AVX2 by oneDNN
    cpu_has_bf16.cache_clear()  # cached: asked once per process
    try:
        assert not cpu_has_bf16() and amp_dtype(torch.device("cpu"), "auto") is None
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
        cpu_has_bf16.cache_clear()
        assert cpu_has_bf16()
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # ...or by ATEN_CPU_CAPABILITY
        cpu_has_bf16.cache_clear()
        assert not cpu_has_bf16()
    finally:
        cpu_has_bf16.cache_clear()
