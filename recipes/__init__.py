"""Model families described as data: one YAML file per family, loaded into a typed `Recipe`.

A recipe names where the model comes from (hub id or a path inside this package), the decoder layers the paper's
rule leaves alone, the build defaults (`way`, `grouping`, `merge`) that `unify.build.build` (and so `unify build`)
applies when the request gives none, on-disk renames for shard streaming, evaluation tasks, and a tiny config for
tests and demos. `reference/`
holds the bundled small model. This package is data plus its loader: it imports nothing else of ours.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


class RecipeError(ValueError):
    """An unknown recipe name or a malformed recipe file."""


@dataclass(frozen=True)
class BuildDefaults:
    way: int | None = None
    grouping: str | None = None
    merge: str | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    model_type: str
    hub_id: str | None = None
    path: Path | None = None  # a model bundled inside this package (absolute once loaded)
    skip_layers: tuple[int, ...] = ()  # decoder layers left alone on a full-size model; negative = from the end
    defaults: BuildDefaults = field(default_factory=BuildDefaults)
    disk_renames: tuple[tuple[str, str], ...] = ()  # (on-disk substring, in-memory substring)
    calib: Path | None = None  # the recipe's own calibration text (absolute once loaded)
    tasks: tuple[str, ...] = ()  # lm-eval tasks `unify eval` runs by default
    tasks_path: Path | None = None  # folder of local lm-eval task YAML (absolute once loaded)
    tiny: dict[str, Any] = field(default_factory=dict)  # config overrides for a toy-sized model of the family


_FIELDS = {"name", "model_type", "hub_id", "path", "skip_layers", "defaults", "disk_renames", "calib", "tasks",
           "tasks_path", "tiny"}


def names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def load(name: str) -> Recipe:
    path = HERE / f"{name}.yaml"
    if not path.is_file():
        raise RecipeError(f"unknown recipe {name!r}; recipes: {', '.join(names())}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise RecipeError(f"{path}: unknown keys {unknown}; allowed: {', '.join(sorted(_FIELDS))}")
    if "model_type" not in data:
        raise RecipeError(f"{path}: model_type is missing")
    here = lambda p: (HERE / p).resolve() if p else None  # noqa: E731  (paths in a recipe are relative to this folder)
    defaults = data.get("defaults") or {}
    bad = sorted(set(defaults) - {"way", "grouping", "merge"})
    if bad:
        raise RecipeError(f"{path}: unknown defaults {bad}; allowed: way, grouping, merge")
    way = defaults.get("way")
    if way is not None and (not isinstance(way, int) or isinstance(way, bool) or way < 1):
        raise RecipeError(f"{path}: defaults.way must be a positive integer, not {way!r}")
    for key in ("grouping", "merge"):
        if defaults.get(key) is not None and not isinstance(defaults[key], str):
            raise RecipeError(f"{path}: defaults.{key} must be a method name, not {defaults[key]!r}")
    return Recipe(
        name=data.get("name", name), model_type=data["model_type"], hub_id=data.get("hub_id"), path=here(data.get("path")),
        skip_layers=tuple(int(i) for i in data.get("skip_layers") or ()), defaults=BuildDefaults(**defaults),
        disk_renames=tuple((str(a), str(b)) for a, b in data.get("disk_renames") or ()), calib=here(data.get("calib")),
        tasks=tuple(data.get("tasks") or ()), tasks_path=here(data.get("tasks_path")), tiny=dict(data.get("tiny") or {}),
    )


def tiny_config(name: str, **overrides):
    """A transformers config of the recipe's family at toy size (random weights are built from it)."""
    from transformers import AutoConfig

    r = load(name)
    return AutoConfig.for_model(r.model_type, **{**r.tiny, **overrides})
