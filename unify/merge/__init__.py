"""Merge methods: how a group of experts becomes one united expert. One module per method, one typed registry.

`MERGES.get(name)` gives the method (`fn`, `needs_data`, `params`); see `unify.merge.base` for the call contract.
"""
from __future__ import annotations

from .base import MERGES, MergeContext, MergeFn
from . import average, frequency, activation, distill  # noqa: F401,E402  (each registers its methods)

get, names = MERGES.get, MERGES.names

__all__ = ["MERGES", "MergeContext", "MergeFn", "get", "names"]
