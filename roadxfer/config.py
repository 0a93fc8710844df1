"""Checks on the configuration that its JSON schema cannot express, run before any job starts.

The schema (``schemas/config.schema.yaml``) refuses unknown keys and bad values at every
level it describes. Here: the per-model ``training`` overrides (validated as the merged
settings each model trains with), and rules across fields, each with the fix.
"""

from __future__ import annotations

import copy
import functools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import InputError

SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"
ROLES = ("base", "transfer", "test", "predict", "retention")


@functools.cache
def _read_schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA.read_text())


def _schema() -> dict[str, Any]:
    return copy.deepcopy(_read_schema())


def schema_node(path: str) -> dict[str, Any]:
    """The schema of a dotted config key, e.g. ``classify.batch_size``."""
    node = _read_schema()
    for part in path.split("."):
        try:
            node = node["properties"][part]
        except KeyError:
            raise KeyError(f"{path}: no such key in {SCHEMA.name}") from None
    return node


def default(path: str) -> Any:
    """The default of a config key, from the schema: the one place defaults are written (settings
    classes, the command line and ``config/README.md`` take theirs from here)."""
    node = schema_node(path)
    if "default" not in node:
        raise KeyError(f"{path}: {SCHEMA.name} gives no default")
    return copy.deepcopy(node["default"])


def describe(path: str, *, extra: str = "") -> str:
    """A command-line help text: the key's description in the schema and its default."""
    node = schema_node(path)
    text = " ".join(str(node.get("description", "")).split())
    if "default" in node:
        text += f" (default: {json.dumps(node['default'])}{extra})"
    return text.replace("%", "%%")  # argparse formats help with %


def with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with the schema's defaults filled in at every level (as the workflow's validation does)."""
    return _fill(_read_schema(), copy.deepcopy(dict(config)))


def _fill(node: Mapping[str, Any], value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    for key, sub in node.get("properties", {}).items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if key in value:
            value[key] = _fill(sub, value[key])
    return value


MAX_CONFIG_VALUES = 100_000  # a workflow config holds a few hundred; the demo's pretraining sheet, a few thousand


# Keys that moved, with where they are now: a config written for an earlier version gets the fix, not "unknown key".
MOVED = {("classify", "centrelines"): "vectorise: (its keys one level up, e.g. vectorise.high)",
         ("classify", "min_line_length"): "vectorise.min_line_length", ("classify", "bridge_gaps"): "vectorise.bridge_gaps"}


def check_moved(config: Mapping[str, Any], *, source: str = "config") -> None:
    """Refuse keys of an earlier version's layout, naming where they live now (run before the schema)."""
    for (section, key), now in MOVED.items():
        if isinstance(config.get(section), Mapping) and key in config[section]:
            raise InputError(source, f"{section}.{key} has moved: the road graph is its own step now", f"write it as {now}")


def check_plain(config: Any, *, source: str = "config") -> None:
    """Run before the schema: refuse what would hang or mislead validation.

    YAML anchors and aliases let a few hundred bytes stand for billions of values (an
    "alias bomb"; validation walks them all), so a mapping or list met twice is refused,
    as is a config of more than ``MAX_CONFIG_VALUES`` values. NaN and infinity pass JSON
    schema bounds (every comparison with NaN is false), so they are refused here, by key.
    """
    seen: set[int] = set()
    count = 0
    stack: list[tuple[str, Any]] = [("", config)]
    while stack:
        where, value = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise InputError(source, f"holds more than {MAX_CONFIG_VALUES} values", "a workflow config is far smaller: check the files given with --configfile")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(source, f"{where or 'the config'} is {value}", "give a finite number (NaN and infinity mean no setting)")
        if isinstance(value, (dict, list)):
            if id(value) in seen:
                raise InputError(source, f"{where} repeats another part of the config (a YAML anchor and alias)", "write the values out instead of using YAML aliases (*name)")
            seen.add(id(value))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack.extend((f"{where}.{k}" if where else str(k), v) for k, v in items)


def check_config(config: Mapping[str, Any], *, source: str = "config") -> None:
    """Raise :class:`InputError` naming the key and the fix for the first rule the config breaks."""
    training_schema = _schema()["properties"]["training"]
    models = config.get("models", {})
    for name, model in models.items():
        merged = {**config.get("training", {}), **(model.get("training") or {})}
        errors = sorted(jsonschema.Draft202012Validator(training_schema).iter_errors(merged), key=lambda e: list(e.path))
        if errors:
            err = errors[0]
            where = ".".join(str(p) for p in err.path)
            raise InputError(source, f"models.{name}.training{'.' + where if where else ''}: {err.message}",
                             "use the keys and values of `training:` (config/config.yaml lists them all)")
        if model.get("package"):
            if not Path(model["package"]).exists():
                raise InputError(source, f"models.{name}.package {model['package']!r} does not exist", "give the path of a package folder, .emd or .dlpk")
            continue  # brought as it is: nothing to train
        pretrained = model.get("pretrained")
        if model.get("freeze") and not pretrained and not merged.get("encoder_checkpoint") and not merged.get("encoder_weights"):
            raise InputError(source, f"models.{name} sets freeze: true but has no pretrained model, training.encoder_weights or encoder_checkpoint, so a random encoder would be frozen",
                             f"give models.{name}.pretrained (a model of this list or a package path), set training.encoder_weights: imagenet, or set freeze: false")
        if merged.get("encoder_weights") and merged.get("encoder_checkpoint"):
            raise InputError(source, f"models.{name}: training.encoder_weights and training.encoder_checkpoint are both set", "choose one source of encoder weights")
        if merged.get("encoder_weights") == "imagenet" and not pretrained:
            from .imagenet import SOURCES  # no torch import: the table only

            if merged.get("backbone") not in SOURCES or merged.get("arch") == "linknet34_mtl":
                raise InputError(source, f"models.{name}: training.encoder_weights imagenet has no packaged weights for backbone {merged.get('backbone')!r} (arch {merged.get('arch')})",
                                 f"use arch linknet or unet with backbone {', '.join(SOURCES)}, or training.encoder_checkpoint with weights you staged")
        if merged.get("keep_pretrained") and not pretrained:
            raise InputError(source, f"models.{name} sets training.keep_pretrained but has no pretrained model", f"give models.{name}.pretrained or set keep_pretrained: false")
        unfreeze = merged.get("unfreeze_after")
        if unfreeze is not None and model.get("freeze") and unfreeze >= merged.get("epochs", 30):
            raise InputError(source, f"models.{name}: training.unfreeze_after {unfreeze} is not below its {merged.get('epochs')} epochs, so the encoder would never be unfrozen",
                             "lower unfreeze_after, raise epochs, or drop unfreeze_after to keep the encoder frozen throughout")
        if pretrained and pretrained not in models and not Path(pretrained).exists():
            raise InputError(source, f"models.{name}.pretrained {pretrained!r} is neither a model of `models:` nor an existing path",
                             f"use one of {sorted(models)} or the path of a package folder, .emd or .dlpk")
    for role in config.get("tiles_by_role", {}):
        if role not in ROLES:
            raise InputError(source, f"tiles_by_role.{role}: {role!r} is not a role ({', '.join(ROLES)})", "use a role of the scene sheet")
    _check_classify_geometry(config, source)
    _check_image(config.get("image", {}), source)


def check_model_data(config: Mapping[str, Any], roles_of: Mapping[str, str], *, source: str = "config", sheet: str = "the scene sheet") -> None:
    """Every entry of a model's ``datasets`` and ``rehearsal`` is a role, a scene of the sheet
    with a training role (``roles_of``: scene_id -> role), or an existing Classified Tiles folder.

    A test, retention or predict scene named there would leak into training: refused.
    """
    from .sheet import TRAINING_ROLES

    for name, model in (config.get("models") or {}).items():
        if model.get("package"):
            continue
        for key in ("datasets", "rehearsal"):
            for entry in model.get(key) or []:
                if entry in ROLES:
                    continue
                if entry in roles_of:
                    if roles_of[entry] not in TRAINING_ROLES:
                        raise InputError(sheet, f"models.{name}.{key} names scene {entry!r}, whose role is {roles_of[entry]!r}: a model would train on a scene it is scored on",
                                         f"name scenes of role {' or '.join(TRAINING_ROLES)} there, or give {entry!r} such a role in the sheet")
                elif not Path(entry).exists():
                    raise InputError(source, f"models.{name}.{key} entry {entry!r} is neither a role ({', '.join(ROLES)}), a scene of {sheet}, nor an existing Classified Tiles folder",
                                     "fix the role, the scene_id or the folder path")


def _check_image(image: Mapping[str, Any], source: str) -> None:
    bands, count = image.get("bands"), image.get("band_count", 3)
    if bands and "band_count" in image and len(bands) != count:
        raise InputError(source, f"image.bands {bands} selects {len(bands)} band(s) but image.band_count is {count}", "drop band_count or make it the number of bands listed")
    rescale = image.get("rescale") or {}
    lo, hi = rescale.get("percentiles", [2, 98])
    if not lo < hi:
        raise InputError(source, f"image.rescale.percentiles {[lo, hi]} must rise", "e.g. [2, 98]")
    if rescale.get("method") == "fixed":
        low, high = rescale.get("low"), rescale.get("high")
        if not low or not high:
            raise InputError(source, "image.rescale.method fixed needs image.rescale.low and high", "give the raw values mapped to 0 and 255, e.g. low: [0], high: [2047]")
        if len(low) == len(high) and any(a >= b for a, b in zip(low, high)):
            raise InputError(source, f"image.rescale.low {low} is not below high {high}", "swap them or fix the values")


def _check_classify_geometry(config: Mapping[str, Any], source: str) -> None:
    cls = config.get("classify", {})
    lines = config.get("vectorise") or {}
    low, high = lines.get("low", default("vectorise.low")), lines.get("high", default("vectorise.high"))
    if low > high:
        raise InputError(source, f"vectorise.low {low} is above high {high}: seeds could not grow", "set low at or below high (e.g. low 0.3, high 0.5)")
    tile = cls.get("tile_size") or config.get("tiles", {}).get("tile_size", 256)
    overlap = cls.get("overlap")
    overlap = tile // 4 if overlap is None else overlap
    margin = cls.get("margin")
    margin = overlap // 4 if margin is None else margin
    if overlap >= tile:
        raise InputError(source, f"classify.overlap {overlap} is not smaller than the tile size {tile}", f"use an overlap below {tile} (the default is a quarter of the tile, {tile // 4})")
    if overlap and 2 * margin >= overlap:
        raise InputError(source, f"classify.margin {margin} is not below half the overlap {overlap}, so no pixel between two tiles would get a weight",
                         f"use a margin below {max(overlap // 2, 1)} (the default is a quarter of the overlap)")
