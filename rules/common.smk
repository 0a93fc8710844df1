import functools
import sys
from pathlib import Path

from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)

from roadxfer.config import ROLES as SHEET_ROLES, check_config, check_model_data, check_moved, check_plain
from roadxfer.errors import InputError
from roadxfer.sheet import check_scene_sizes, check_sheet, read_sheet
from roadxfer.styles import complete_classes

check_plain(config, source="config (merged --configfile files)")  # aliases and NaN, before the schema walks them
check_moved(config, source="config (merged --configfile files)")
validate(config, schema="../schemas/config.schema.yaml")
check_config(config, source="config (merged --configfile files)")
# A class without a name or colour gets a default now (with a warning), not a failure later.
config["classes"] = complete_classes(config["classes"])

DEMO_DIR = config["demo"]["outdir"]
DEMO_FILES = [
    f"{DEMO_DIR}/{scene}.{ext}" for scene in config["demo"]["scenes"] for ext in ("tif", "gpkg")
]

_sheet = read_sheet(config["scenes"])
validate(_sheet, schema="../schemas/scenes.schema.yaml")
scenes = check_sheet(_sheet, config["scenes"], producible=DEMO_FILES)
check_model_data(config, dict(zip(scenes.index, scenes["role"])), source="config (merged --configfile files)", sheet=config["scenes"])
check_scene_sizes(
    _sheet,
    config["scenes"],
    tile_size=config["tiles"]["tile_size"],
    max_nodata_fraction=config["tiles"]["max_nodata_fraction"],
)

ROLES = sorted(set(scenes["role"]))


wildcard_constraints:
    scene="|".join(scenes.index) if len(scenes) else "NO_SCENES",
    model="|".join(config["models"]) or "NO_MODELS",
    shard=r"r\d+c\d+",


# Only the keys a classification reads are its params, so changing another key re-runs none
# (which models to classify and the shard size shape the DAG, not a classification).
CLASSIFY_SETTINGS = {k: v for k, v in config["classify"].items() if k not in ("models", "shard_size")}


def scenes_with_role(*roles):
    return [s for s in scenes.index if scenes.loc[s, "role"] in roles]


def role_tile_settings(wildcards):
    """tiles, with what tiles_by_role sets for the scene's role (which chips to keep)."""
    return {**config["tiles"], **config["tiles_by_role"].get(scenes.loc[wildcards.scene, "role"], {})}


def scene_image(wildcards):
    return scenes.loc[wildcards.scene, "image"]


def scene_labels(wildcards):
    return scenes.loc[wildcards.scene, "labels"]


def scene_row(wildcards):
    return scenes.loc[wildcards.scene]


def res(family, key, default):
    """Portable resource from config['resources'][family]."""
    return config["resources"].get(family, {}).get(key, default)


def container_for(family):
    """The family's image: a URI as given, a relative .sif path from the workflow's folder (any working directory)."""
    image = config["containers"].get(family, f"containers/roadxfer-{family}.sif")
    if "://" in image or Path(image).is_absolute():
        return image
    return str(Path(workflow.basedir) / image)


def all_targets():
    targets = [f"results/models/{m}" for m in config["models"] if not MODELS[m].get("package") and model_datasets(m)]
    targets += expand(
        "results/classified/{model}/{scene}/classes.tif",
        model=CLASSIFY_MODELS,
        scene=scenes_with_role("test", "predict", "retention"),
    )
    if scenes_with_role("test") and CLASSIFY_MODELS:
        targets += ["results/evaluation/summary.csv", "results/report/report.html"]
    return targets


MODELS = config["models"]
CLASSIFY_MODELS = [m for m in config["classify"]["models"] if m in MODELS]
_unknown = sorted(set(config["classify"]["models"]) - set(MODELS))
if _unknown:
    raise InputError(None, f"classify.models names unknown model(s) {_unknown}", f"use names from `models:` ({sorted(MODELS)})")
_replicates = config["evaluation"]["replicates"]
for _key, _groups in (("replicates", {h: [h, *r] for h, r in _replicates.items()}), ("sample_curve", config["evaluation"]["sample_curve"])):
    _unclassified = sorted({m for group in _groups.values() for m in group} - set(CLASSIFY_MODELS))
    if _unclassified:
        raise InputError(None, f"evaluation.{_key} names model(s) {_unclassified} that are not classified", "list them in `models:` and in `classify.models`")


def model_datasets(name, key="datasets"):
    """Tile folders of a model (or of its rehearsal): roles of the scene sheet expand to their
    scenes' tiles, a scene of the sheet to its own (a model trained on some of a role's scenes,
    e.g. a 1-2-3-scene curve), anything else is a Classified Tiles folder."""
    folders = []
    for entry in MODELS[name].get(key, []):
        if entry in SHEET_ROLES:
            folders += [f"results/tiles/{s}" for s in scenes_with_role(entry)]
        elif entry in scenes.index:
            folders.append(f"results/tiles/{entry}")
        else:
            folders.append(entry)
    return folders


def sample_sizes(wildcards):
    """Training scenes (tile folders) of each model on a sample-size curve: the curve's x axis."""
    return {m: len(model_datasets(m)) for curve in config["evaluation"]["sample_curve"].values() for m in curve}


def model_path(name):
    """A trained model's package, or the package a model of `models:` brings (`package:`)."""
    return MODELS[name].get("package") or f"results/models/{name}"


def classify_model(wildcards):
    return model_path(wildcards.model)


def classify_models(wildcards):
    return [model_path(m) for m in CLASSIFY_MODELS]


def model_pretrained(name):
    p = MODELS[name].get("pretrained")
    if not p:
        return []
    return [model_path(p)] if p in MODELS else [p]


def model_inputs(wildcards):
    return {
        "tiles": model_datasets(wildcards.model),
        "pretrained": model_pretrained(wildcards.model),
        "rehearsal": model_datasets(wildcards.model, "rehearsal"),
    }


def model_training(wildcards):
    name = wildcards.model
    merged = {**config["training"], **MODELS[name].get("training", {})}
    merged["freeze"] = bool(MODELS[name].get("freeze", False))
    merged["orientation_bin_size"] = config["labels"]["orientation_bin_size"]
    return merged


@functools.cache
def scene_shards(scene):
    """Shard windows of a scene to classify (empty: one job), from the image header when the DAG is built.

    A scene generated by the workflow itself (the demo) has no header yet: it is classified
    in one job.
    """
    size = config["classify"].get("shard_size")
    image = Path(scenes.loc[scene, "image"])
    if not size or not image.exists():
        return {}
    import rasterio

    from roadxfer.classify import shard_windows

    with rasterio.open(image) as src:
        width, height = src.width, src.height
    windows = shard_windows(width, height, int(size))
    return windows if len(windows) > 1 else {}


def classify_shards(wildcards):
    """The shard outputs the classification of a sharded scene joins (none for a scene classified at once)."""
    return expand(
        "results/classified/{model}/{scene}/shards/{shard}/{kind}.tif",
        model=wildcards.model,
        scene=wildcards.scene,
        shard=sorted(scene_shards(wildcards.scene)),
        kind=["classes", "probability", "direction"],
    )


def shard_window(wildcards):
    win = scene_shards(wildcards.scene)[wildcards.shard]
    return [int(win.col_off), int(win.row_off), int(win.width), int(win.height)]


def classify_gpu(wildcards):
    """A sharded scene's own job only joins the shards: it needs no GPU."""
    return 0 if scene_shards(wildcards.scene) else res("classify", "gpu", 1)


def evaluation_results(wildcards):
    return expand(
        "results/evaluation/{model}/{scene}.json",
        model=CLASSIFY_MODELS,
        scene=scenes_with_role("test", "retention"),
    )


def eval_settings(wildcards):
    ev = config["evaluation"]
    radius = ev["buffer_radius"]
    return {
        "road_type_field": ev["road_type_field"],
        "road_types": ev["road_types"],
        "buffer_radius": config["labels"]["buffer_radius"] if radius is None else radius,
        "relaxed_pixels": ev["relaxed_pixels"],
        "apls_spacing": ev["apls"]["node_spacing"],
        "apls_snap": ev["apls"]["snap_distance"],
        "apls_max_pairs": ev["apls"]["max_pairs"],
        "ignore_windows": ev["ignore_windows"].get(wildcards.scene, []),
    }
