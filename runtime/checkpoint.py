"""The united-expert checkpoint (DESIGN.md section 3): `united.safetensors` (+ shards) and `united.json`.

Writing goes to a hidden temporary directory beside the target that is renamed into place only when everything is
written, so an interrupted or failed build never leaves something that looks like a checkpoint. Never pickle.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .version import __version__
from .errors import BrownoutError

FORMAT_VERSION = 1
SINGLE = "united.safetensors"
INDEX = "united.safetensors.index.json"
META = "united.json"
MAX_SHARD_BYTES = 1024**3  # a shard is flushed once this much is pending (also bounds build memory)
# Config keys that do not change the weights' meaning (dtype, paths, runtime choices, how the model is sharded) stay
# out of the hash, so a checkpoint attaches to the same model loaded in another dtype or under TP / EP.
VOLATILE_CONFIG_KEYS = frozenset({"_name_or_path", "transformers_version", "dtype", "torch_dtype",
                                  "_experts_implementation", "_attn_implementation", "architectures", "use_cache",
                                  "output_router_logits", "distributed_config", "tp_plan", "tp_size"})


def config_hash(config) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in VOLATILE_CONFIG_KEYS and not k.startswith("_")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def weight_probe(tensors: list[torch.Tensor], per_tensor: int = 16) -> list[float]:
    """A few expert weight values at fixed positions: the model's fingerprint. Compared with a tolerance
    (`probe_matches`), so the same model loaded in another dtype (bf16, fp16, fp32) still matches."""
    out = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        idx = (torch.arange(per_tensor, dtype=torch.int64) * (flat.numel() - 1) // max(1, per_tensor - 1)).to(flat.device)
        out += [round(float(v), 7) for v in flat[idx].float().cpu()]
    return out


def probe_matches(a: list[float], b: list[float]) -> bool:
    if len(a) != len(b):
        return False
    ta, tb = torch.tensor(a), torch.tensor(b)
    scale = max(float(ta.abs().max()), 1e-12)
    return bool(((ta - tb).abs() <= 1e-2 * ta.abs() + 1e-3 * scale).all())


def fingerprint_tensors(first_layer_gate_up: torch.Tensor, last_layer_gate_up: torch.Tensor) -> list[torch.Tensor]:
    """What the weight checksum covers: the first and last expert of the first and last MoE layer."""
    return [first_layer_gate_up[0], first_layer_gate_up[-1], last_layer_gate_up[0], last_layer_gate_up[-1]]


def all_finite(t: torch.Tensor) -> bool:
    """NaN/inf check one leading slice at a time (a whole-tensor check allocates a layer-sized mask)."""
    if not t.is_floating_point():
        return True
    return all(bool(torch.isfinite(s).all()) for s in (t if t.dim() > 1 else [t]))


class CheckpointWriter:
    """Collects per-layer united tensors and writes them as shards into a temporary directory; `commit` renames it."""

    def __init__(self, out: str | Path, overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.out = Path(out)
        if self.out.exists() and not overwrite:
            raise BrownoutError(f"output directory {self.out} exists; pass --overwrite to replace it")
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []

    def add_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            t = v.detach().to("cpu").contiguous()
            if not all_finite(t):
                raise BrownoutError(f"layer {layer}: united {k} has NaN or inf values")
            self._pending[f"layers.{layer}.{k}"] = t
            self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        idx = len(self._shards)
        save_file(self._pending, str(self.tmp / f"shard-{idx:05d}.safetensors"), metadata={"format": "pt"})
        self._shards.append(sorted(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def commit(self, meta: dict) -> Path:
        self._flush()
        n = len(self._shards)
        if n == 0:
            raise BrownoutError("no MoE layer was merged: nothing to write")
        if n == 1:
            (self.tmp / "shard-00000.safetensors").rename(self.tmp / SINGLE)
        else:
            weight_map = {}
            for i, keys in enumerate(self._shards):
                name = f"united-{i + 1:05d}-of-{n:05d}.safetensors"
                (self.tmp / f"shard-{i:05d}.safetensors").rename(self.tmp / name)
                weight_map.update({k: name for k in keys})
            (self.tmp / INDEX).write_text(json.dumps({"weight_map": weight_map}, indent=1))
        meta = {"format_version": FORMAT_VERSION, "tool_version": __version__, "command": " ".join(sys.argv), **meta}
        (self.tmp / META).write_text(json.dumps(meta, indent=1))
        if self.out.exists():  # only reachable with overwrite=True
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            self.out.rename(old)
            self.tmp.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class UnitedCheckpoint:
    """Read side: metadata plus lazy access to one layer's tensors. Validates files on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_file = self.path / META
        if not self.path.is_dir():
            raise BrownoutError(f"united checkpoint {self.path} does not exist or is not a directory")
        if not meta_file.is_file():
            raise BrownoutError(f"{self.path} is not a united checkpoint: {META} is missing")
        try:
            self.meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BrownoutError(f"{meta_file} is corrupt: {e}") from None
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise BrownoutError(f"{meta_file}: unsupported format version {self.meta.get('format_version')!r}")
        if (self.path / INDEX).is_file():
            self.weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
        elif (self.path / SINGLE).is_file():
            self.weight_map = None
        else:
            raise BrownoutError(f"{self.path}: {SINGLE} is missing")
        self._keys = self._all_keys()

    def _files(self) -> list[Path]:
        if self.weight_map is None:
            return [self.path / SINGLE]
        return [self.path / f for f in sorted(set(self.weight_map.values()))]

    def _all_keys(self) -> dict[str, Path]:
        keys = {}
        for f in self._files():
            try:
                with safe_open(str(f), "pt") as s:
                    keys.update({k: f for k in s.keys()})
            except (SafetensorError, OSError, Exception) as e:  # truncated or garbage files surface here
                raise BrownoutError(f"{f} is missing or corrupt: {str(e).splitlines()[0][:160]}") from None
        return keys

    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.meta["layers"])

    def layer_meta(self, layer: int) -> dict:
        return self.meta["layers"][str(layer)]

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        prefix = f"layers.{layer}."
        out = {}
        for k, f in self._keys.items():
            if k.startswith(prefix):
                try:
                    with safe_open(str(f), "pt") as s:
                        out[k[len(prefix):]] = s.get_tensor(k)
                except Exception as e:
                    raise BrownoutError(f"{f}: cannot read {k}: {str(e).splitlines()[0][:160]}") from None
        if "expert_to_group" not in out or "gate_up_proj" not in out or "down_proj" not in out:
            raise BrownoutError(f"{self.path}: layer {layer} is incomplete (needs gate_up_proj, down_proj, expert_to_group)")
        return out
