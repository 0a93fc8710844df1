"""One source of defaults: the config schema; the command line and the workflow build the same settings from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from roadxfer import cli, config
from roadxfer.centrelines import VectorSettings
from roadxfer.classify import ClassifySettings
from roadxfer.evaluate import EvalSettings
from roadxfer.labels import LabelSettings
from roadxfer.roadmask import MaskSettings
from roadxfer.settings import classify_settings, label_settings, tile_settings
from roadxfer.tiles import TileSettings
from roadxfer.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
# A settings field named differently from its config key.
ALIASES = {(VectorSettings, "min_length"): "vectorise.min_line_length", (VectorSettings, "bridge"): "vectorise.bridge_gaps",
           (TileSettings, "orientation_bin_size"): "labels.orientation_bin_size", (TrainConfig, "orientation_bin_size"): "labels.orientation_bin_size"}
# Where a None field stands for the schema's default of another kind (empty mapping, or "the labels' radius").
SAME_MEANING = {(EvalSettings, "buffer_radius"), (EvalSettings, "ignore_windows")}


def _field_default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@pytest.mark.parametrize(("cls", "section"), [(ClassifySettings, "classify"), (LabelSettings, "labels"), (TileSettings, "tiles"), (TrainConfig, "training"),
                                              (EvalSettings, "evaluation"), (VectorSettings, "vectorise"), (MaskSettings, "vectorise")])
def test_settings_classes_take_their_defaults_from_the_schema(cls, section):
    checked = 0
    for f in dataclasses.fields(cls):
        key = ALIASES.get((cls, f.name), f"{section}.{f.name}")
        try:
            expected = config.default(key)
        except KeyError:
            continue
        if (cls, f.name) in SAME_MEANING:
            continue
        value = _field_default(f)
        assert (list(value) if isinstance(value, tuple) else value) == expected, f"{cls.__name__}.{f.name} defaults to {value!r}, the schema's {key} to {expected!r}"
        checked += 1
    assert checked >= 3


def test_the_default_of_classify_batch_size_is_the_same_everywhere():
    """The drift that was: 32 in the schema and config, 8 in ClassifySettings and on the command line."""
    shipped = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())["classify"]["batch_size"]
    args = cli.parser().parse_args(["classify", "in.tif", "model", "out"])
    assert ClassifySettings().batch_size == args.batch_size == shipped == config.default("classify.batch_size")


def test_config_yaml_repeats_no_default_differently():
    """config/config.yaml shows every default to the user: each value it gives is the schema's."""
    shipped = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())

    def walk(value, path):
        # The user's own (or the demo's, whose scenes config.yaml defines: their paved roads are the retained type), not defaults.
        if path in ("models", "demo", "classify.models", "containers", "resources", "tiles_by_role", "scenes", "evaluation.retained_types"):
            return
        if isinstance(value, dict) and value:
            for k, v in value.items():
                yield from walk(v, f"{path}.{k}" if path else k)
        elif path:
            yield path, value

    differing = []
    for path, value in walk(shipped, ""):
        try:
            expected = config.default(path)
        except KeyError:
            continue
        if value != expected:
            differing.append((path, value, expected))
    assert not differing
    assert len(list(walk(shipped, ""))) > 50


def test_with_defaults_fills_every_level_and_keeps_what_is_given():
    cfg = config.with_defaults({"classify": {"batch_size": 4}, "vectorise": {"high": 0.7}})
    assert cfg["classify"]["batch_size"] == 4 and cfg["vectorise"]["high"] == 0.7
    assert cfg["vectorise"]["low"] == config.default("vectorise.low")
    assert cfg["labels"]["buffer_radius"] == config.default("labels.buffer_radius")
    with pytest.raises(KeyError, match="no such key"):
        config.default("classify.batch_sizes")


@pytest.mark.parametrize("argv", [[], ["--threshold", "0.4", "--tta", "--tile-size", "128", "--batch-size", "5", "--precision", "fp32", "--resample", "off", "--bands", "3,2,1"]])
def test_command_line_and_workflow_build_identical_classify_settings(argv):
    """The same options as a config: the workflow's scripts and the command line get equal settings objects."""
    a = cli.parser().parse_args(["classify", "in.tif", "model", "out", *argv])
    from_cli = classify_settings(cli.classify_config(a), {"bands": a.bands})
    workflow_cfg = config.with_defaults({"classify": cli.classify_config(a), "image": {"bands": a.bands}})  # as Snakemake's validation leaves it
    from_workflow = classify_settings(workflow_cfg["classify"], workflow_cfg["image"])
    assert from_cli == from_workflow
    if argv:
        assert (from_cli.threshold, from_cli.tta, from_cli.tile_size, from_cli.batch_size, from_cli.bands) == (0.4, True, 128, 5, (3, 2, 1))


def test_command_line_and_workflow_build_identical_label_and_tile_settings():
    a = cli.parser().parse_args(["labels", "in.tif", "lines.gpkg", "out", "--buffer", "3.5", "--class-value", "2"])
    wf = config.with_defaults({"labels": cli.labels_config(a)})
    assert label_settings(cli.labels_config(a), None) == label_settings(wf["labels"], None)
    assert label_settings(cli.labels_config(a), None).buffer_radius == 3.5
    e = cli.parser().parse_args(["export", "in.tif", "labels", "out", "--tile-size", "128"])
    classes = config.default("classes")
    wf = config.with_defaults({"tiles": cli.tiles_config(e)})
    assert tile_settings(cli.tiles_config(e), classes, 10) == tile_settings(wf["tiles"], classes, 10)
    assert tile_settings(cli.tiles_config(e), classes, 10).tile_size == 128


def test_every_option_of_every_command_is_described_with_its_default():
    sub = next(a for a in cli.parser()._actions if a.dest == "command")
    for name, p in sub.choices.items():
        for action in p._actions:
            if action.dest == "help":
                continue
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            if action.option_strings:
                assert "default" in action.help, f"{name} {action.option_strings[0]}: the help names no default"
