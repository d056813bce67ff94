"""Name -> method, plus which methods need calibration data: one registry each for groupings and merges."""
from __future__ import annotations

from typing import Callable

from runtime.errors import BrownoutError


class Registry:
    def __init__(self, kind: str, load: Callable[[], None] | None = None):
        self.kind = kind  # for the error message: "grouping", "merge"
        self.methods: dict[str, Callable] = {}
        self.needs_data: set[str] = set()
        self._load = load  # imports the modules that register themselves, on first lookup

    def register(self, name: str, needs_data: bool = True):
        def deco(fn):
            self.methods[name] = fn
            if needs_data:
                self.needs_data.add(name)
            return fn

        return deco

    def get(self, name: str) -> Callable:
        self.names()
        if name not in self.methods:
            raise BrownoutError(f"unknown {self.kind} method {name!r}; methods: {', '.join(sorted(self.methods))}")
        return self.methods[name]

    def names(self) -> list[str]:
        if self._load is not None:
            self._load()
        return sorted(self.methods)
