"""The modules' import direction: cli -> {train, evaluation, sample_folder} -> plan -> checkpoint -> {data, models,
objective, sampling, metrics, tracking, hub, environment} -> step_graph -> {config, sharding, progress, version,
cpu_threads, accelerate_configs, signals}.
Modules of one layer do not import each other; within the data layer, cache.py sits under data.py and streaming.py
on top of it; remote.py (the Hub clients' noise and errors) sits under the modules that load from the Hub, and
manifest.py (a checkpoint's sizes and SHA-256s) under checkpoint.py and sampling.py, which reads checkpoints too.
train's loop stands on the modules it was split into: monitoring (previews, evaluations) -> outputs (exports,
card) -> parts (the Run) -> stopping."""

from __future__ import annotations

import ast
from pathlib import Path

import uncond

LAYERS = {"accelerate_configs": 0, "config": 0, "sharding": 0, "progress": 0, "version": 0, "signals": 0, "start": 0,
          "step_graph": 0.5, "cache": 0.5, "remote": 0.5, "manifest": 0.5,
          "sources": 0.7, "decoding": 0.8,
          "data": 1, "streaming": 1.5, "models": 1, "objective": 1, "sampling": 1, "metrics": 1, "tracking": 1,
          "hub": 1, "environment": 1, "cpu_threads": 0, "checkpoint": 2, "run_folder": 2.2, "plan": 2.5,
          "stopping": 2.6, "parts": 2.7,
          "outputs": 2.8, "monitoring": 2.9, "train": 3, "evaluation": 3, "sample_folder": 3, "cache_upkeep": 3,
          "checkpoint_export": 3, "cli": 4, "__main__": 5,
          "__init__": 5}


def package_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update([node.module] if node.module else [alias.name for alias in node.names])
    return names


def test_modules_import_only_lower_layers():
    for path in Path(uncond.__file__).parent.glob("*.py"):
        assert path.stem in LAYERS, f"{path.name}: add it to a layer"
        for name in package_imports(path):
            assert LAYERS[name] < LAYERS[path.stem], f"{path.stem} imports {name}"


def test_the_installed_package_carries_its_license_and_one_version():
    """A wheel had no license text (Apache-2.0 asks that users get a copy), and its version was written twice."""
    import importlib.metadata

    distribution = importlib.metadata.distribution("uncond")
    assert distribution.version == uncond.__version__
    assert distribution.metadata.get_all("License-File") == ["LICENSE"]
    license_file = next(path for path in distribution.files if path.name == "LICENSE")
    assert "Apache License" in license_file.read_text() and "Version 2.0" in license_file.read_text()
