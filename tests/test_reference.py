"""The reference tool's road model: import, transfer, export, and where the two tools disagree.

The fixture in tests/data/arcgis-mtre-linknet34 was saved by the reference library itself
(arcgis.learn 2.4.4) together with its network's outputs: it is the reference's word.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import torchvision
from conftest import ROAD, ROOT, X0, Y0, make_raster, make_vectors
from shapely.geometry import LineString

from roadxfer.classify import ClassifySettings, classify_scene
from roadxfer.data import load_tiles
from roadxfer.demo import write_scene
from roadxfer.errors import InputError
from roadxfer.labels import LabelSettings, rasterize_scene
from roadxfer.model import ModelSpec, build_model, load_encoder_checkpoint, undirected_log_probs
from roadxfer.orientation import target_lut
from roadxfer.package import load_package
from roadxfer.tiles import TileSettings, export_tiles, read_dataset, write_layout
from roadxfer.train import train, TrainConfig

FIX = ROOT / "tests" / "data" / "arcgis-mtre-linknet34"
EMD = FIX / "esri_mtre_linknet34.emd"
PTH = FIX / "esri_mtre_linknet34.pth"
REF_TRAIN = {"arch": "linknet34_mtl", "batch_size": 4, "epochs": 1, "patience": 0, "val_fraction": 0.25, "val_split": "tile"}


@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(FIX / "reference_outputs.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def ref_tiles(tmp_path_factory) -> Path:
    """128 px classified tiles of a small demo scene: unpaved roads and trails as class 1 (road)."""
    root = tmp_path_factory.mktemp("reftiles")
    write_scene(11, root / "s.tif", root / "s.gpkg", size=256, kind="rural")
    rasterize_scene(root / "s.tif", root / "s.gpkg", root / "l.tif", root / "o.tif", root / "s.json", LabelSettings(buffer_radius=2.0, class_value=1))
    export_tiles(root / "s.tif", root / "l.tif", root / "o.tif", root / "tiles", TileSettings(tile_size=128, stride=64, keep="all"), scene_id="s")
    return root / "tiles"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dlpk(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_fixture_loads_strictly_and_reproduces_the_reference_logits(ref):
    pkg = load_package(FIX)
    assert pkg.spec.arch == "linknet34_mtl" and pkg.spec.orientation_bins == 18  # 360 / 20
    assert set(pkg.model.state_dict()) == set(torch.load(PTH, weights_only=True))
    x = torch.from_numpy(ref["input_nchw_float32"])
    with torch.no_grad():
        seg, ori = pkg.model(x)
    assert seg.shape == (4, 2, 128, 128) and ori.shape == (4, 19, 128, 128)
    assert float((seg - torch.from_numpy(ref["seg_logits"])).abs().max()) <= 1e-4
    assert float((ori - torch.from_numpy(ref["orient_logits"])).abs().max()) <= 1e-4
    # What classification feeds it: chips scaled to 0-1, then the package's normalisation.
    mean, std = torch.tensor(pkg.mean).view(1, 3, 1, 1), torch.tensor(pkg.std).view(1, 3, 1, 1)
    assert torch.allclose((x / 255.0 - mean) / std, x, atol=1e-3)  # raw 0-255, whatever the .emd says
    assert pkg.classes == [{"Value": 1, "Name": "1", "Color": [178, 43, 231]}] and pkg.tile_size == 128
    assert pkg.reference_emd["ModelParameters"]["mtl_model"] == "linknet"


def test_emd_and_dlpk_import_the_same_model(tmp_path):
    dlpk = _dlpk(tmp_path / "esri.dlpk", {"ModelCharacteristics/": b"", EMD.name: EMD.read_bytes(), PTH.name: PTH.read_bytes()})
    by_folder, by_emd, by_dlpk = load_package(FIX), load_package(EMD), load_package(dlpk)
    assert by_dlpk.path == dlpk and by_folder.weights_sha256 == by_dlpk.weights_sha256 == _sha256(PTH)
    a, b, c = (p.model.state_dict() for p in (by_folder, by_emd, by_dlpk))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert not any(tmp_path.glob("roadxfer-dlpk-*"))  # unpacked into a temporary folder, then removed
    from roadxfer.package_info import package_info  # the report's torch-free reader: the same weights, the archive as the source

    info = package_info(dlpk)
    assert info["weights_sha256"] == _sha256(PTH) and info["provenance"] == {"imported_from": str(dlpk)}


def test_classification_of_the_fixture_chips_matches_the_reference(ref, tmp_path):
    """Same input scaling and a softmax threshold as the reference's road mask."""
    ours, single_pass = [], []
    for i, chip in enumerate(ref["chips_uint8_nhwc"]):
        img = make_raster(tmp_path / f"chip{i}.tif", size=(128, 128), cell=0.3, data=np.ascontiguousarray(chip.transpose(2, 0, 1)))
        out = tmp_path / f"c{i}" / "classes.tif"
        classify_scene(img, FIX, out, settings=ClassifySettings(threshold=0.5, tile_size=128))
        with rasterio.open(out) as src:
            ours.append(src.read(1))
        p_road = torch.softmax(torch.from_numpy(ref["seg_logits"][i]), 0)[1].numpy()
        single_pass.append((p_road >= 0.5).astype(np.uint8))
    ours, single_pass = np.stack(ours), np.stack(single_pass)
    assert (ours == single_pass).mean() > 0.999  # one tile per chip: the reference network's own forward
    assert 0.01 < ours.mean() < 0.2  # the weak fixture model finds some road, not all
    # The reference's raster inference pads and blends windows, so it is close, not equal.
    assert (ours == ref["detect_roads_mask"]).mean() > 0.9


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ModelParameters": {"backbone": "resnet34", "mtl_model": "hourglass"}}, r"mtl_model 'hourglass'.*imports the MultiTaskRoadExtractor with mtl_model 'linknet' and backbone 'resnet34'"),
        ({"ModelParameters": {"backbone": "resnet50", "mtl_model": "linknet"}}, r"backbone 'resnet50'.*imports the MultiTaskRoadExtractor"),
        ({"IsMultispectral": True, "ExtractBands": [0, 1, 2, 3]}, r"multispectral model \(4 bands"),
        ({"ModelName": "UnetClassifier"}, r"is a 'UnetClassifier' model, not a MultiTaskRoadExtractor"),
        ({"RoadOrientation": {"orient_bin_size": 25}}, r"orient_bin_size 25 does not divide 180"),
    ],
)
def test_unsupported_reference_variants_are_refused_clearly(tmp_path, change, message):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copyfile(PTH, folder / PTH.name)
    (folder / EMD.name).write_text(json.dumps({**json.loads(EMD.read_text()), **change}))
    with pytest.raises(InputError, match=message):
        load_package(folder)


@pytest.mark.parametrize("member", ["../x.emd", "/tmp/roadxfer-abs-x.emd", "sub/../../x.emd", "C:/x.emd"])
def test_dlpk_member_outside_the_folder_is_refused(tmp_path, member):
    (tmp_path / "d").mkdir()
    dlpk = _dlpk(tmp_path / "d" / "bad.dlpk", {EMD.name: EMD.read_bytes(), member: b"{}"})
    with pytest.raises(InputError, match="would be written outside the package folder"):
        load_package(dlpk)
    assert not (tmp_path / "x.emd").exists() and not Path("/tmp/roadxfer-abs-x.emd").exists()


class _RunsCode:
    """A pickled object that would run a shell command when unpickled without weights_only."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_weights_holding_code_are_refused_without_running_it(tmp_path, ref_tiles, caplog):
    marker = tmp_path / "ran"
    payload = {"encoder.0.weight": torch.zeros(1), "evil": _RunsCode(marker)}
    # A reference package whose .pth carries the payload.
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    shutil.copyfile(EMD, pkg / EMD.name)
    torch.save(payload, pkg / PTH.name)
    with pytest.raises(InputError, match="refused, never run"):
        load_package(pkg)
    # An encoder checkpoint.
    torch.save(payload, tmp_path / "encoder.pth")
    with pytest.raises(InputError, match="cannot be read as a PyTorch state dict"):
        load_encoder_checkpoint(build_model(ModelSpec(backbone="resnet18")), tmp_path / "encoder.pth")
    # A training checkpoint in the work folder: set aside, and training starts over.
    work = tmp_path / "work"
    work.mkdir()
    torch.save({"digest": "x", "payload": _RunsCode(marker)}, work / "checkpoint.pt")
    with caplog.at_level(logging.WARNING):
        train([ref_tiles], tmp_path / "m", TrainConfig(backbone="resnet18", batch_size=4, epochs=1, patience=0, val_split="tile"), classes=ROAD, workdir=work)
    assert "set aside as checkpoint.pt.rejected-" in caplog.text and (tmp_path / "m" / "m.pth").is_file()
    assert not marker.exists()


def test_reference_model_round_trip_import_train_export_reimport(ref_tiles, tmp_path):
    out = tmp_path / "xfer"
    train([ref_tiles], out, TrainConfig(**REF_TRAIN, freeze=True, keep_pretrained=True), classes=ROAD, pretrained=FIX, threads=2)
    ours = load_package(out)
    folder, dlpk = out / "arcgis" / "xfer", out / "arcgis" / "xfer.dlpk"
    exported, zipped = load_package(folder), load_package(dlpk)
    a, b, c = (p.model.state_dict() for p in (ours, exported, zipped))
    assert set(a) == set(b) == set(c) and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    start = load_package(FIX).model.state_dict()
    assert all(torch.equal(a[k], start[k]) for k in a if k.startswith("encoder."))  # frozen: bit-identical
    assert not all(torch.equal(a[k], start[k]) for k in a if k.startswith(("decoder", "o_decoder")))
    # The exported .emd has every key of the reference's, with the same meaning.
    theirs, mine = json.loads(EMD.read_text()), json.loads((folder / "xfer.emd").read_text())
    for key, value in theirs.items():
        assert key in mine, key
        if isinstance(value, dict):
            assert set(value) <= set(mine[key]), key
    for key in ("Framework", "InferenceFunction", "ModelConfiguration", "ModelType", "ModelName", "ExtractBands", "ModelFormat",
                "ImageSpaceUsed", "IsImageNetNormalization", "IsMultispectral", "SupportsVariableTileSize", "ImageHeight", "ImageWidth", "resize_to"):
        assert mine[key] == theirs[key], key
    for key in ("backbone", "mtl_model", "loss", "backend"):
        assert mine["ModelParameters"][key] == theirs["ModelParameters"][key]
    assert mine["RoadOrientation"]["orient_bin_size"] == 20 and mine["RoadOrientation"]["class_mapping"] == {"0": 0, "1": 1}
    assert mine["ModelFile"] == "xfer.pth" and mine["Classes"] == [{"Value": 1, "Name": "road", "Color": [255, 0, 0]}]
    with zipfile.ZipFile(dlpk) as zf:
        assert {"xfer.emd", "xfer.pth"} <= set(zf.namelist()) and not any(n.startswith(("/", "..")) for n in zf.namelist())
    # Lineage: the reference package's weights and .emd fields.
    parent = json.loads((out / "xfer.emd").read_text())["roadxfer"]["parent"]
    assert parent["weights_sha256"] == _sha256(PTH)
    assert parent["reference_emd"]["RoadOrientation"]["orient_bin_size"] == 20 and parent["reference_emd"]["ArcGISLearnVersion"] == "2.4.4"
    assert parent["tensors"] == {"loaded": 396, "reinitialised": []}


def test_other_classes_reinitialise_only_the_road_head(tmp_path, caplog):
    root = tmp_path
    write_scene(12, root / "s.tif", root / "s.gpkg", size=256, kind="rural")
    rasterize_scene(root / "s.tif", root / "s.gpkg", root / "l.tif", root / "o.tif", root / "s.json",
                    LabelSettings(buffer_radius=2.0, class_map={"field": "road_type", "values": {"unpaved": 1, "trail": 2}}, known_values=frozenset({1, 2})))
    two = [{"value": 1, "name": "unpaved", "color": [200, 150, 50]}, {"value": 2, "name": "trail", "color": [240, 220, 120]}]
    export_tiles(root / "s.tif", root / "l.tif", root / "o.tif", root / "tiles", TileSettings(tile_size=128, stride=64, keep="all", classes=two))
    with caplog.at_level(logging.WARNING):
        train([root / "tiles"], root / "two", TrainConfig(**REF_TRAIN, freeze=True), classes=two, pretrained=FIX, threads=2)
    parent = json.loads((root / "two" / "two.emd").read_text())["roadxfer"]["parent"]
    assert parent["tensors"] == {"loaded": 394, "reinitialised": ["finalconv3.bias", "finalconv3.weight"]}
    assert load_package(root / "two").model.state_dict()["finalconv3.weight"].shape[0] == 3
    assert not (root / "two" / "arcgis").exists() and "no reference-layout copy is written" in caplog.text


def test_orientation_bins_map_between_the_tools():
    # Our bins: 10 degrees over 180, counter-clockwise. Reference: 20 degrees over 360, clockwise.
    lut = target_lut(10, reference_layout=True, model_bins=18)
    assert lut[0] == 0 and lut[255] == 255
    assert lut[1] == 1 + 8  # centre 5 ccw = 175 cw (mod 180) -> 20-degree bin 8
    assert lut[9] == 1 + 4  # centre 85 ccw = 95 cw -> bin 4
    assert lut[10] == 1 + 4 and lut[18] == 1 + 0  # 95 ccw = 85 cw -> bin 4; 175 ccw = 5 cw -> bin 0
    assert list(target_lut(10, reference_layout=False, model_bins=18)[:19]) == list(range(19))
    # A reference head that says "direction bin 3" or "bin 3 + 180 degrees" means the same road.
    logits = torch.full((2, 19, 1, 1), -20.0)
    logits[0, 3], logits[1, 12] = 20.0, 20.0
    logp = undirected_log_probs(logits, reference_layout=True)
    assert logp.shape == (2, 10, 1, 1)
    assert torch.allclose(logp.exp().sum(1), torch.ones(2, 1, 1))
    assert int(logp[0].argmax()) == int(logp[1].argmax()) == 1 + 3
    no_road = torch.full((1, 19, 1, 1), -20.0)
    no_road[0, 18] = 20.0
    assert int(undirected_log_probs(no_road, reference_layout=True).argmax()) == 0


def test_orientation_loss_ignores_what_it_should():
    from roadxfer.losses import seg_orient_loss

    seg = torch.zeros(1, 2, 2, 2)
    seg_t = torch.zeros(1, 2, 2, dtype=torch.long)
    logits = torch.full((1, 19, 2, 2), -10.0)
    logits[0, 12, :, 0] = 10.0  # the right road direction, the other way round: no loss
    logits[0, 7, :, 1] = 10.0  # a wrong direction, but on ignored pixels: no loss either
    target = torch.tensor([[[1 + 3, 255], [1 + 3, 255]]])
    logp = undirected_log_probs(logits, reference_layout=True)
    loss = seg_orient_loss(seg, logp, seg_t, target, orientation_weight=1.0, dice_weight=0.0)
    base = seg_orient_loss(seg, logp, seg_t, torch.full_like(target, 255), orientation_weight=1.0, dice_weight=0.0)
    assert float(loss - base) < 1e-6
    wrong = seg_orient_loss(seg, logp, seg_t, torch.tensor([[[1 + 7, 255], [1 + 7, 255]]]), orientation_weight=1.0, dice_weight=0.0)
    assert float(wrong - base) > 10


def test_encoder_checkpoint_from_a_torchvision_resnet(tmp_path, ref_tiles):
    torch.manual_seed(3)
    for arch, ctor, backbone in (("linknet", torchvision.models.resnet18, "resnet18"), ("linknet34_mtl", torchvision.models.resnet34, "resnet34")):
        tv = ctor(weights=None).state_dict()
        path = tmp_path / f"{backbone}.pth"
        torch.save(tv, path)
        model = build_model(ModelSpec(arch=arch, backbone=backbone))
        assert load_encoder_checkpoint(model, path) == len(model.encoder.state_dict())
        enc = model.state_dict()
        first = "encoder.conv1.weight" if arch == "linknet" else "encoder.0.weight"
        last = "encoder.layer4.1.bn2.running_var" if arch == "linknet" else "encoder.7.2.bn2.running_var"
        assert torch.equal(enc[first], tv["conv1.weight"]) and torch.equal(enc[last], tv[last.split(".", 1)[1].replace("7.", "layer4.", 1)])
    with pytest.raises(InputError, match="does not match the resnet34 encoder"):
        load_encoder_checkpoint(build_model(ModelSpec(backbone="resnet34")), tmp_path / "resnet18.pth")
    # Through training, as `training.encoder_checkpoint` does it: frozen, the encoder stays the file's.
    out = tmp_path / "enc"
    train([ref_tiles], out, TrainConfig(backbone="resnet18", batch_size=4, epochs=1, patience=0, val_split="tile", freeze=True, encoder_checkpoint=str(tmp_path / "resnet18.pth")), classes=ROAD)
    tv = torch.load(tmp_path / "resnet18.pth", weights_only=True)
    state = load_package(out).model.state_dict()
    assert torch.equal(state["encoder.layer3.0.conv1.weight"], tv["layer3.0.conv1.weight"])


def test_export_for_the_reference_writes_nodata_as_background(tmp_path):
    img = make_raster(tmp_path / "s.tif", size=(128, 128), cell=0.5, alpha_zero=(slice(0, 40), slice(None)))
    lab = make_vectors(tmp_path / "r.gpkg", [LineString([(X0, Y0 - 40), (X0 + 64, Y0 - 40)])], Classvalue=[1])
    rasterize_scene(img, lab, tmp_path / "l.tif", tmp_path / "o.tif", tmp_path / "s.json", LabelSettings(buffer_radius=2.0))
    for nodata in (255, 0):
        out = tmp_path / f"t{nodata}"
        export_tiles(img, tmp_path / "l.tif", tmp_path / "o.tif", out, TileSettings(tile_size=128, stride=128, keep="all", max_nodata_fraction=0.9, label_nodata=nodata))
        with rasterio.open(out / "labels" / "000000000.tif") as src:
            chip = src.read(1)
            assert src.nodata == (255 if nodata == 255 else None)
        assert set(np.unique(chip[:40])) == {nodata} and 1 in chip[40:]


def test_map_txt_paths_with_spaces(ref_tiles, tmp_path):
    spaced = tmp_path / "My Tiles"
    shutil.copytree(ref_tiles, spaced)
    lines = (spaced / "map.txt").read_text().splitlines()
    # As a desktop tool on another machine may write them: absolute, with spaces and backslashes.
    (spaced / "map.txt").write_text("".join(f"C:\\Users\\J Doe\\My Tiles\\{a.replace('/', chr(92))} C:\\Users\\J Doe\\My Tiles\\{b.replace('/', chr(92))}\n"
                                            for a, b in (line.split() for line in lines)))
    ds = read_dataset(spaced)
    assert len(ds.images) == len(lines) and all(p.is_file() for p in ds.images + ds.labels)
    assert len(load_tiles([spaced], ROAD)) == len(lines)
    with pytest.raises(ValueError, match="whitespace"):
        write_layout(tmp_path, lines=["images/a b.tif labels/a b.tif"], tile=128, bands=3, classes=ROAD, pixels={}, tiles_with={}, cell_size=0.3,
                     band_stats={"min": [], "max": [], "mean": [0] * 3, "std": [0] * 3}, extra={})
