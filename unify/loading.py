"""Where a model comes from (recipe name, local directory or hub id), and how its weights reach memory.

`ShardSource` streams one module at a time from the safetensors shards: the model skeleton lives on the meta device
(`accelerate.init_empty_weights`), a decoder layer is materialised from disk when it is needed and sent back to meta
afterwards, so peak memory is about one layer plus the calibration activations, whatever the model's size.
On-disk names differ from transformers 5's in-memory names (per-expert tensors, family renames); the mapping here is
generic (per-expert stacking) plus the recipe's `disk_renames` data; anything left unmapped is a clear error.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

import recipes

from runtime.errors import BrownoutError
from runtime.layout import Layout

_EXPERT_KEY = re.compile(r"^(?P<prefix>.*)\.experts\.(?P<j>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_PROJ = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


@dataclass
class ModelRef:
    path: Path  # local directory holding config.json and safetensors
    recipe: recipes.Recipe | None
    name: str  # what the user passed


def looks_like_path(text: str) -> bool:
    """Whether `text` can only mean a local path, never a recipe name or a hub id ("namespace/name"): it starts with
    '/', '.' or '~', uses a separator a hub id does not (a backslash, a second '/', a trailing '/'), or its parent
    exists."""
    if not text or text.startswith(("/", ".", "~")) or text.endswith("/"):
        return True
    if any(sep in text for sep in {os.sep, os.altsep} - {None, "/"}):  # Windows' backslash
        return True
    return text.count("/") > 1 or ("/" in text and os.path.lexists(Path(text).parent))


def missing_path_reason(path: str | Path, kind: str = "directory") -> str:
    """'no such directory', naming the first part of `path` that is missing, for a one-line error."""
    full = Path(os.path.abspath(Path(path).expanduser()))
    for parent in full.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"no such {kind} ({parent} is a file)"
            return f"no such {kind} ({full.relative_to(parent).parts[0]!r} is not in {parent})"
    return f"no such {kind}"


def resolve(model: str) -> ModelRef:
    """Recipe name, local directory or hub id -> local directory (no downloads without a network), with its recipe:
    the named one, else the family recipe of the directory's model_type (None when there is none). Text that can
    only be a path is never looked up on the hub: a missing one is reported as missing."""
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise BrownoutError(f"{p} has no config.json: not a transformers model directory")
        return ModelRef(p, recipe_for_model_type(_model_type_of(p)), model)
    if p.exists():
        raise BrownoutError(f"--model {model} is a file; give the model's directory (the one holding config.json)")
    if looks_like_path(model):
        raise BrownoutError(f"--model {model}: {missing_path_reason(p)}")
    recipe = None
    if "/" not in model:
        try:
            recipe = recipes.load(model)
        except recipes.RecipeError as e:  # unknown name: the message lists the recipes
            raise BrownoutError(str(e)) from None
        if recipe.path is not None:
            return ModelRef(recipe.path, recipe, model)
        hub_id = recipe.hub_id
    else:
        hub_id = model
    path = _from_hub(hub_id)
    return ModelRef(path, recipe or recipe_for_model_type(_model_type_of(path)), model)


def _from_hub(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
        os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as e:
        reason = type(e).__name__
        raise BrownoutError(
            f"cannot fetch {hub_id} from the Hugging Face hub ({reason}: no network or no access); "
            f"download it elsewhere and pass the local directory: --model /path/to/{hub_id.split('/')[-1]}"
        ) from None


def _model_type_of(p: Path) -> str | None:
    try:
        return json.loads((p / "config.json").read_text()).get("model_type")
    except (json.JSONDecodeError, OSError) as e:
        raise BrownoutError(f"{p / 'config.json'} is corrupt: {e}") from None


def recipe_for_model_type(model_type: str | None) -> recipes.Recipe | None:
    """The family recipe of a model_type (not a bundled model's own recipe), or None when there is none."""
    for n in recipes.names():
        try:
            r = recipes.load(n)
        except recipes.RecipeError as e:
            raise BrownoutError(str(e)) from None
        if r.model_type == model_type and r.path is None:
            return r
    return None


def load_config(ref: ModelRef):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(ref.path)
    except Exception as e:
        raise BrownoutError(f"cannot read the config of {ref.path}: {str(e).splitlines()[0][:200]}") from None


class InMemorySource:
    """A model that is already loaded: materialise/release are no-ops."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype the parameter `name` is held in (the united tier is written in it)."""
        return self.model.get_parameter(name).dtype

    def materialize(self, prefix: str) -> None:
        pass

    def release(self, prefix: str) -> None:
        pass


class ShardSource:
    """Streams modules of a model skeleton (on meta) from the safetensors files of `ref.path`."""

    def __init__(self, ref: ModelRef, config, dtype: torch.dtype | None = torch.float32):
        # Layers are materialised in float32 (the CPU computes bf16 ~5x slower than fp32), one at a time; the united
        # tier is written in the checkpoint's own dtype. dtype=None keeps the on-disk dtype (half the memory).
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        self.ref, self.dtype = ref, dtype
        self.renames = list(ref.recipe.disk_renames) if ref.recipe else []
        self.key_file = self._index(ref.path)
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(config)
        self.model.eval()
        # calibration runs on the CPU, where transformers' grouped_mm falls back to a slow loop: use the eager experts
        self.model.config._experts_implementation = "eager"
        self._mem_of_disk = self._map_names()
        self._stored: dict[str, torch.dtype] = {}  # in-memory parameter name -> its dtype on disk

    def stored_dtype(self, name: str) -> torch.dtype:
        """The on-disk dtype of the parameter `name`, once materialised (the united tier is written in it, whatever
        dtype the layers are computed in)."""
        if name not in self._stored:
            raise BrownoutError(f"{name} has not been read from {self.ref.path} yet")
        return self._stored[name]

    @staticmethod
    def _index(path: Path) -> dict[str, Path]:
        from safetensors import safe_open

        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise BrownoutError(f"{path} has no .safetensors files (only safetensors checkpoints are supported)")
        keys: dict[str, Path] = {}
        for f in files:
            try:
                with safe_open(str(f), "pt") as s:
                    keys.update({k: f for k in s.keys()})
            except Exception as e:
                raise BrownoutError(f"{f} is truncated or corrupt: {str(e).splitlines()[0][:160]}") from None
        return keys

    def _rename(self, key: str) -> str:
        k = "." + key
        for a, b in self.renames:
            k = k.replace(a, b)
        return k[1:]

    def _map_names(self) -> dict[str, list[tuple[str, str, int]]]:
        """memory param name -> [(disk key, role, expert j)]; role is 'copy' or 'gate'/'up'/'down' for stacking."""
        out: dict[str, list] = defaultdict(list)
        for key in self.key_file:
            k = self._rename(key)
            m = _EXPERT_KEY.match(k)
            if m:
                proj = _PROJ[m["proj"]]
                target = f"{m['prefix']}.experts.{'down_proj' if proj == 'down' else 'gate_up_proj'}"
                out[target].append((key, proj, int(m["j"])))
            else:
                out[k].append((key, "copy", -1))
        return out

    def _read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        try:
            with safe_open(str(self.key_file[key]), "pt") as s:
                return s.get_tensor(key)
        except Exception as e:
            raise BrownoutError(f"{self.key_file[key]}: cannot read {key}: {str(e).splitlines()[0][:160]}") from None

    def _tensor_for(self, name: str, like: torch.Tensor, owner: torch.nn.Module) -> torch.Tensor:
        entries = self._mem_of_disk.get(name)
        if not entries:
            raise BrownoutError(
                f"{self.ref.path}: no on-disk tensor maps to {name}; add a rename to the recipe's disk_renames"
            )
        if entries[0][1] == "copy":
            t = self._read(entries[0][0])
            self._stored[name] = t.dtype
            if self.dtype is not None and t.is_floating_point():
                t = t.to(self.dtype)
        else:  # per-expert tensors on disk -> one fused tensor, filled one expert at a time (no extra layer copies)
            n = like.shape[0]
            if len({j for _, _, j in entries}) != n or max(j for _, _, j in entries) >= n:
                raise BrownoutError(f"{name}: the checkpoint's experts do not match the config's {n}")
            layout = Layout.of(owner)
            first = self._read(entries[0][0])
            self._stored[name] = first.dtype
            t = torch.empty(like.shape, dtype=self.dtype or first.dtype)
            if name.endswith("down_proj"):
                views = {"down": t.transpose(1, 2) if layout.is_transposed else t}
            else:  # writable canonical views into the fused tensor
                views = layout.to_canonical({"gate_up_proj": t, "down_proj": t.new_empty(0, 0, 0)})
            for key, role, j in entries:
                src = self._read(key)
                if tuple(src.shape) != tuple(views[role][j].shape):
                    raise BrownoutError(f"{key}: on-disk shape {tuple(src.shape)} does not match the config's "
                                        f"{tuple(views[role][j].shape)}")
                views[role][j].copy_(src)
        if tuple(t.shape) != tuple(like.shape):
            raise BrownoutError(f"{name}: on-disk shape {tuple(t.shape)} does not match the config's {tuple(like.shape)}")
        return t

    def materialize(self, prefix: str) -> None:
        from accelerate.utils import set_module_tensor_to_device

        module = self.model.get_submodule(prefix) if prefix else self.model
        owners = dict(module.named_modules())
        for name, p in list(module.named_parameters(recurse=True)):
            if p.device.type != "meta":
                continue
            full = f"{prefix}.{name}" if prefix else name
            owner = owners[name.rsplit(".", 1)[0]] if "." in name else module
            if full not in self._mem_of_disk and self._tied(full):
                continue
            value = self._tensor_for(full, p, owner)
            set_module_tensor_to_device(self.model, full, "cpu", value=value)
        if not prefix or prefix.endswith("embed_tokens"):
            self.model.tie_weights()

    def _tied(self, full: str) -> bool:
        return full == "lm_head.weight" and getattr(self.model.config, "tie_word_embeddings", False)

    def release(self, prefix: str) -> None:
        module = self.model.get_submodule(prefix)
        module.to("meta")
