"""Static checks of per-rule software deployment: conda envs, Apptainer definitions, the driver lock.

No conda channel or Apptainer binary is reachable here, so these files are checked as
text: they parse, pin every package exactly, and agree with requirements.lock.
"""

from __future__ import annotations

import re

import pytest
import yaml
from spython.main.parse.parsers import SingularityParser

from conftest import ROOT, SHIPPED_MODEL
ENVS = sorted((ROOT / "envs").glob("*.yaml"))
DEFS = sorted((ROOT / "containers").glob("*.def"))
PIN = re.compile(r"^([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)$")
CONDA_PIN = re.compile(r"^([A-Za-z0-9_.\-]+)=([A-Za-z0-9_.+\-]+)$")
SAME_NAME = {"python": None, "pip": None}  # not in the lock: the interpreter and installer themselves


def lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        m = PIN.match(line.strip())
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_lock_pins_a_coherent_torch_pair():
    pins = lock()
    assert pins["torch"].split("+")[0] == "2.15.0" and pins["torchvision"].split("+")[0] == "0.29.2"
    for line in (ROOT / "requirements.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = PIN.match(line.strip()).groups()
            assert pins[name.lower()] == version, f"requirements.in pins {name}=={version}, the lock has {pins.get(name.lower())}"


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.name)
def test_conda_env_pins_exactly_and_matches_the_lock(env):
    spec = yaml.safe_load(env.read_text())
    assert spec["channels"][0] == "conda-forge"
    pins = lock()
    deps = spec["dependencies"]
    assert deps
    for dep in deps:
        if isinstance(dep, dict):
            assert dep["pip"][-1] == "-e ..", f"{env.name}: roadxfer itself (-e ..) is not installed last"
            for pip_dep in dep["pip"][:-1]:
                m = PIN.match(pip_dep)
                assert m, f"{env.name}: pip dependency {pip_dep!r} is not pinned with =="
                name, version = m.groups()
                assert pins[name.lower()] == version, f"{env.name}: {name} {version} != lock {pins.get(name.lower())}"
            continue
        m = CONDA_PIN.match(dep)
        assert m, f"{env.name}: {dep!r} is not pinned exactly (name=version)"
        name, version = m.groups()
        if name in SAME_NAME:
            continue
        assert pins[name.lower()] == version, f"{env.name}: {name} {version} != lock {pins.get(name.lower())}"


def test_the_envs_install_roadxfer_from_this_checkout(tmp_path):
    """conda runs pip in the env file's folder, so ``-e ..`` is the repository root: it must build roadxfer.

    Built as conda's pip would see it (cwd envs/), without dependencies (the env pins them).
    """
    import subprocess
    import sys

    import shutil

    # A copy of what the build reads (setuptools writes build/ and *.egg-info into the tree it builds).
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "roadxfer", repo / "roadxfer", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "envs", repo / "envs")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, repo / name)
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path), ".."],
                         cwd=repo / "envs", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    wheel = next(tmp_path.glob("roadxfer-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert "roadxfer/classify.py" in names and "roadxfer/glue.py" in names
    meta = next(n for n in names if n.endswith("METADATA"))
    assert "Requires-Dist" not in zipfile.ZipFile(wheel).read(meta).decode()  # pulls nothing past the env's pins


def test_gpu_env_has_cuda_torch():
    spec = yaml.safe_load((ROOT / "envs" / "torch.yaml").read_text())
    pip = next(d["pip"] for d in spec["dependencies"] if isinstance(d, dict))
    assert "torch==2.15.0" in pip  # the PyPI wheel: CUDA-enabled, runs on CPU nodes too


@pytest.mark.parametrize("definition", DEFS, ids=lambda p: p.name)
def test_apptainer_definition(definition):
    recipe = SingularityParser(str(definition)).recipe["spython-base"]
    text = definition.read_text()
    assert re.search(r"^Bootstrap: docker$", text, re.M)
    # The base image pinned by tag and digest (a tag may move; containers/pin-digest.sh re-resolves it).
    assert re.fullmatch(r"python:3\.11\.7-slim-bookworm@sha256:[0-9a-f]{64}", recipe.fromHeader), recipe.fromHeader
    # roadxfer itself goes in, from the repository root (where the build runs), installed without dependencies.
    files = dict(line.split() for line in recipe.files)
    assert files == {"pyproject.toml": "/opt/roadxfer/pyproject.toml", "README.md": "/opt/roadxfer/README.md", "roadxfer": "/opt/roadxfer/roadxfer"}
    assert all((ROOT / src).exists() for src in files)
    assert "python -m pip install --no-cache-dir --no-deps /opt/roadxfer" in recipe.install
    assert re.search(r"^%test\n\s+python -c \"import .*roadxfer\.", text, re.M)
    install = " ".join(line.rstrip("\\ ").strip() for line in recipe.install)
    pins = lock()
    packages = re.findall(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.+\-]+)", install)
    assert packages, f"{definition.name}: %post installs no pinned package"
    for name, version in packages:
        assert pins[name.lower()] == version, f"{definition.name}: {name} {version} != lock {pins.get(name.lower())}"
    assert "%test" in text and re.search(r"^%test\n\s+python -c \"import ", text, re.M)
    assert any("org.opencontainers.image.title" in label for label in recipe.labels)


def test_every_rule_names_a_conda_env_and_a_container():
    rules = {}
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        for block in re.split(r"^rule ", smk.read_text(), flags=re.M)[1:]:
            name = block.split(":", 1)[0]
            rules[name] = block
    assert {"demo_scene", "rasterize_labels", "export_tiles", "train_model", "classify_scene"} <= set(rules)
    for name, block in rules.items():
        env = re.search(r'conda:\s*\n\s*"\.\./(envs/[^"]+)"', block)
        assert env and (ROOT / env.group(1)).is_file(), f"rule {name} names no existing conda env"
        assert re.search(r"container:\s*\n\s*container_for\(\"(geo|torch)\"\)", block), f"rule {name} names no container"
        family = re.search(r'container_for\("(\w+)"\)', block).group(1)
        assert (ROOT / "containers" / f"roadxfer-{family}.def").is_file()
        assert env.group(1) == f"envs/{'torch' if family == 'torch' else 'geo'}.yaml", f"rule {name}: env and container families differ"


def test_gpu_rules_request_a_gpu_and_cpu_rules_do_not():
    text = "".join(p.read_text() for p in (ROOT / "rules").glob("*.smk"))
    for rule in ("train_model", "classify_shard", "classify_scene"):
        block = text.split(f"rule {rule}:")[1].split("\nrule ")[0]
        assert re.search(r"gpu=res\(" if rule != "classify_scene" else r"gpu=classify_gpu", block), rule  # a sharded scene's join needs none
    for rule in ("demo_scene", "rasterize_labels", "export_tiles", "evaluate_scene", "report"):
        block = text.split(f"rule {rule}:")[1].split("\nrule ")[0]
        assert "gpu=" not in block, rule


def test_slurm_profile_keeps_cluster_specifics_out_of_default_resources():
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    assert profile["executor"] == "slurm"
    assert not {"cpus_per_task", "tasks", "threads"} & set(profile["default-resources"])  # they would override every rule
    assert profile["default-resources"]["slurm_partition"].startswith("CHANGE-ME")
    for rule in ("train_model", "classify_scene"):
        assert profile["set-resources"][rule]["slurm_partition"].startswith("CHANGE-ME-gpu")
    assert profile["slurm-requeue"] is True


def test_geo_rules_do_not_need_torch():
    """Rules on envs/geo.yaml (no torch there) must import only torch-free modules."""
    import subprocess
    import sys

    # The report describes every model from its package record (ours and the reference tool's) without loading a network.
    code = ("import sys; import roadxfer.glue, roadxfer.settings, roadxfer.report, roadxfer.vectorise, roadxfer.centrelines, roadxfer.demo, roadxfer.labels, "
            "roadxfer.tiles, roadxfer.evaluate; "
            f"rows = roadxfer.report._provenance({{'base': {str(SHIPPED_MODEL)!r}, 'ref': 'tests/data/arcgis-mtre-linknet34'}}); "
            "assert list(rows['architecture']) == ['linknet/timm-tf_efficientnet_lite0', 'linknet34_mtl/resnet34'], rows; "
            "assert all(len(w) == 16 for w in rows['weights sha256']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_config_readme_is_generated_from_the_schemas():
    """config/README.md describes every key and sheet column; regenerate it when a schema changes."""
    from roadxfer.schema_docs import README, render

    text = render()
    assert README.read_text() == text, "config/README.md is stale: run `python -m roadxfer.schema_docs --write`"
    import yaml

    schema = yaml.safe_load((ROOT / "schemas" / "config.schema.yaml").read_text())
    for section in ("tiles", "training", "classify", "evaluation"):
        for key in schema["properties"][section]["properties"]:
            assert f"`{section}.{key}`" in text
    assert "`scene_id` (required)" in text and "`filter`" in text


def test_rule_logs_are_appended_with_a_header_per_try(tmp_path):
    """A retried or requeued job must not wipe the log of the try that failed."""
    import logging
    from types import SimpleNamespace

    from roadxfer.glue import run_logged

    log = tmp_path / "rule.log"
    for attempt, fails in ((1, True), (2, False)):
        sm = SimpleNamespace(log=[str(log)], rule="train_model", attempt=attempt)

        def main(fails: bool = fails) -> None:
            logging.getLogger("roadxfer.train").info("working")
            if fails:
                raise RuntimeError("node lost")

        try:
            run_logged(sm, main)
        except RuntimeError:
            pass
    text = log.read_text()
    assert "==== rule train_model, try 1 ====" in text and "node lost" in text and "==== rule train_model, try 2 ====" in text
    assert text.index("try 1") < text.index("node lost") < text.index("try 2")
    logging.getLogger().handlers.clear()


def test_the_package_has_no_import_cycle_and_inference_and_report_do_not_import_the_trainer():
    """Module-level imports between roadxfer's modules form no cycle (a lazy import would hide one), and
    classification and the report do not depend on the trainer."""
    import ast

    graph = {}
    for path in sorted((ROOT / "roadxfer").glob("*.py")):
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:  # module level only; TYPE_CHECKING blocks hold type names, not imports at run time
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
        graph[path.stem] = {d.split(".")[0] for d in deps} - {"__init__"}
    seen, stack = set(), []

    def visit(mod):
        assert mod not in stack, f"import cycle: {' -> '.join(stack[stack.index(mod):] + [mod])}"
        if mod in seen or mod not in graph:
            return
        stack.append(mod)
        for dep in graph[mod]:
            visit(dep)
        stack.pop()
        seen.add(mod)

    for mod in graph:
        visit(mod)

    def reach(mod, acc=None):
        acc = set() if acc is None else acc
        for dep in graph.get(mod, ()):
            if dep not in acc:
                acc.add(dep)
                reach(dep, acc)
        return acc

    assert len(graph) > 30 and "train" not in reach("classify") | reach("report") | reach("vectorise")
    assert {"step", "device", "linknet_mtl", "blocks"} <= reach("train")  # the walk sees real edges
