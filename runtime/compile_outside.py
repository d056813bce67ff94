"""Compile the small elementwise work of a step outside the experts, and leave the experts alone.

    done = compile_outside_experts(model)        # every RMSNorm module and the modeling's apply_rotary_pos_emb
    ...                                          # serve / generate / capture CUDA graphs as before
    done.undo()                                  # the model and its modeling module as they were

Why: under CUDA graphs the part of a step that brownout cannot shorten is launch-bound, not byte-bound (150-200 us
a layer of small kernels on an H200, eval/results/README.md "Two GPUs"). A norm is a handful of kernels and the
rotary embedding about ten; compiled, each becomes one or two. Experts, routers and attention matmuls are not
compiled, so every ratio runs the same kernels as without this, and the ratio-0 path stays the model's own.

What it touches, and how it is undone:
- each module whose class name ends in "RMSNorm" gets `module.compile(...)` (PyTorch's in-place form: the module
  object and its parameters stay the same); `undo` clears the compiled call it set;
- the modeling module of each of the model's classes that defines `apply_rotary_pos_emb` gets a compiled wrapper of
  that function; `undo` puts the original back, and only if the attribute is still our wrapper (whatever replaced it
  since is not ours to remove).

Shapes: `dynamic=None` is torch.compile's default: the first call compiles for its shapes, a second shape
recompiles once with dynamic sizes. That suits continuous batching, whose padded token counts vary from step to step
(transformers runs a warm-up forward before each graph capture, so no compile happens inside a capture). Dynamo's
cache limits are raised so that all instances of a norm share the compiled entries instead of falling back to
eager after eight.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import BrownoutError

ROPE_FUNCTION = "apply_rotary_pos_emb"


@dataclass
class CompiledOutside:
    """What `compile_outside_experts` compiled, and how to undo it."""

    backend: str | Callable  # a torch.compile backend: its name or the callable
    model: torch.nn.Module | None = field(default=None, repr=False)
    norms: list = field(default_factory=list)  # the modules compiled in place
    rope: dict = field(default_factory=dict)  # modeling module name -> (original function, our wrapper)

    def summary(self) -> dict:
        return {"backend": self.backend, "norms": len(self.norms), "rope_functions": len(self.rope)}

    def undo(self) -> None:
        for m in self.norms:
            m._compiled_call_impl = None  # what nn.Module.compile set; None is the module's uncompiled state
        self.norms = []
        for name, (orig, wrapper) in self.rope.items():
            mod = sys.modules.get(name)
            if mod is not None and getattr(mod, ROPE_FUNCTION, None) is wrapper:
                setattr(mod, ROPE_FUNCTION, orig)
        self.rope = {}
        if self.model is not None:
            self.model._brownout_compiled_outside = None
            self.model = None


def raise_recompile_limits(per_code: int = 64, total: int = 1024) -> None:
    """Let Dynamo keep `per_code` compiled entries per function (and `total` in all) instead of its default 8: a
    model's instances of one module compile one entry each where Dynamo specialises on an attribute (the norms here;
    transformers 5.24's attention forward guards on `self.layer_idx`), and past the limit a function silently runs
    eagerly. Only ever raises the limits (`recompile_limit`, formerly `cache_size_limit`)."""
    import torch._dynamo

    cfg = torch._dynamo.config
    for name, want in (("recompile_limit", per_code), ("cache_size_limit", per_code),
                       ("accumulated_recompile_limit", total), ("accumulated_cache_size_limit", total)):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), want))


def compiled_outside(model: torch.nn.Module) -> CompiledOutside | None:
    """What `compile_outside_experts` applied to `model` and has not been undone (None: nothing)."""
    return getattr(model, "_brownout_compiled_outside", None)


def compile_outside_experts(model: torch.nn.Module, backend: str | Callable = "inductor", dynamic: bool | None = None
                            ) -> CompiledOutside:
    """Compile `model`'s RMSNorm modules and its modeling's `apply_rotary_pos_emb` with torch.compile (see the
    module docstring). Returns a `CompiledOutside` whose `undo()` restores both. A model with neither is an error:
    nothing would be compiled and the caller would time the uncompiled step believing otherwise."""
    if compiled_outside(model) is not None:
        raise BrownoutError("compile_outside_experts was already applied to this model (undo() it first)")
    raise_recompile_limits()
    done = CompiledOutside(backend, model)
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm") and getattr(m, "_compiled_call_impl", None) is None:
            m.compile(backend=backend, dynamic=dynamic)
            done.norms.append(m)
    for layer in model.modules():  # the modeling modules the model's classes come from
        mod = sys.modules.get(type(layer).__module__)
        fn = getattr(mod, ROPE_FUNCTION, None)
        if fn is not None and mod.__name__ not in done.rope:
            wrapper = torch.compile(fn, backend=backend, dynamic=dynamic)
            setattr(mod, ROPE_FUNCTION, wrapper)
            done.rope[mod.__name__] = (fn, wrapper)
    if not done.norms and not done.rope:
        raise BrownoutError(f"compile_outside_experts found no RMSNorm module and no {ROPE_FUNCTION} in "
                            f"{type(model).__name__}: nothing to compile")
    model._brownout_compiled_outside = done
    return done
