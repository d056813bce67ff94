"""Offline half of Brownout: calibrate, group and merge the experts of an MoE model into united experts.

    from unify.build import BuildOptions, build
    build("reference", BuildOptions(out="out/ref-w4"))  # the recipe's way, grouping and merge

`unify build --model reference --out out/ref-w4` (or `python -m unify build ...`) makes the same checkpoint.
"""
from runtime.version import __version__

__all__ = ["__version__"]
