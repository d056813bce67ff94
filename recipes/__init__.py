"""Model families described as data: one YAML file per family (hub id, layers left alone, defaults, on-disk renames,
and a tiny config for tests and demos). `reference/` holds the bundled small model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def load(name: str) -> dict[str, Any]:
    path = HERE / f"{name}.yaml"
    if not path.is_file():
        from unify.errors import BrownoutError

        raise BrownoutError(f"unknown recipe {name!r}; recipes: {', '.join(names())}")
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("name", name)
    data.setdefault("skip_layers", [])
    data.setdefault("disk_renames", [])
    data.setdefault("defaults", {})
    return data


def tiny_config(name: str, **overrides):
    """A transformers config of the recipe's family at toy size (random weights are built from it)."""
    from transformers import AutoConfig

    r = load(name)
    kw = {**r["tiny"], **overrides}
    return AutoConfig.for_model(r["model_type"], **kw)


def resolve_skip_layers(spec: list[int], num_layers: int) -> set[int]:
    """Negative entries count from the end, like Python indices."""
    return {i % num_layers for i in spec if -num_layers <= i < num_layers}
