"""Typed method registries: one for groupings, one for merges.

Every method declares its name, whether it needs calibration data, and a frozen dataclass of its parameters whose
defaults are the method's standard behaviour (an empty one when it has no knobs). Parameters arrive as typed Python
values or as the text of `--merge-param KEY=VALUE`; both go through `Method.make_params`, which converts text by the
field's type and refuses unknown keys and bad values with one line naming the allowed ones.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

from runtime.errors import BrownoutError


@dataclass(frozen=True)
class NoParams:
    """The parameters of a method that has none."""


_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)  # as it is written on the command line


def _type_name(hint) -> str:
    if typing.get_origin(hint) is Literal:
        return "|".join(map(str, typing.get_args(hint)))
    return getattr(hint, "__name__", str(hint))


def _convert(value: Any, hint) -> Any:
    """`value` as the field type `hint` (int, float, bool, str or a Literal of strings); ValueError if it is not one."""
    if typing.get_origin(hint) is Literal:
        if value not in typing.get_args(hint):
            raise ValueError
        return value
    if isinstance(value, str) and hint is not str:
        text = value.strip().lower()
        if hint is bool:
            if text not in _TRUE | _FALSE:
                raise ValueError
            return text in _TRUE
        return hint(text)  # int("1.5") and float("x") raise ValueError
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError
    return value


@dataclass(frozen=True)
class Method:
    kind: str  # "grouping" or "merge"
    name: str
    fn: Callable
    needs_data: bool  # True when the method reads calibration tokens (the build then runs the calibration walk)
    params: type = NoParams  # frozen dataclass of the method's parameters

    def param_types(self) -> dict[str, Any]:
        return typing.get_type_hints(self.params)

    def param_lines(self, with_help: bool = True) -> list[str]:
        """One 'name=default (type): help' per parameter."""
        hints = self.param_types()
        return [f"{f.name}={_text(f.default)} ({_type_name(hints[f.name])})"
                + (f": {f.metadata['help']}" if with_help and "help" in f.metadata else "")
                for f in dataclasses.fields(self.params)]

    def describe_params(self) -> str:
        """'steps=200 (int), init=activation (activation|average|frequency)', or 'no parameters'."""
        return ", ".join(self.param_lines(with_help=False)) or "no parameters"

    def make_params(self, given: Mapping[str, Any] | Any | None = None) -> Any:
        """The method's parameters: its defaults, updated from `given` (field -> value or its text, or an instance
        of `self.params` as it is)."""
        if given is None:
            return self.params()
        if isinstance(given, self.params):
            return given
        if not isinstance(given, Mapping):
            raise BrownoutError(f"{self.kind} method {self.name!r} takes a mapping of parameters or a "
                                f"{self.params.__name__}, not {type(given).__name__}")
        hints = self.param_types()
        allowed = f"{self.kind} method {self.name!r} takes: {self.describe_params()}"
        values = {}
        for key, value in given.items():
            if key not in hints:
                raise BrownoutError(f"unknown {self.kind} parameter {key!r}; {allowed}")
            try:
                values[key] = _convert(value, hints[key])
            except (TypeError, ValueError):
                raise BrownoutError(f"{self.kind} parameter {key}={value!r}: expected {_type_name(hints[key])}; "
                                    f"{allowed}") from None
        try:
            return self.params(**values)
        except ValueError as e:  # a range check in the dataclass's __post_init__
            raise BrownoutError(f"{self.kind} parameter {e}; {allowed}") from None


class Registry:
    """Name -> Method for one kind of method; the methods register themselves when their module is imported."""

    def __init__(self, kind: str):
        self.kind = kind
        self.methods: dict[str, Method] = {}

    def register(self, name: str, *, needs_data: bool, params: type = NoParams):
        if not isinstance(params, type) or not dataclasses.is_dataclass(params):
            raise TypeError(f"{self.kind} method {name!r}: params must be a dataclass")

        def deco(fn):
            self.methods[name] = Method(self.kind, name, fn, needs_data, params)
            return fn

        return deco

    def get(self, name: str) -> Method:
        if name not in self.methods:
            raise BrownoutError(f"unknown {self.kind} method {name!r}; methods: {', '.join(self.names())}")
        return self.methods[name]

    def names(self) -> list[str]:
        return sorted(self.methods)
