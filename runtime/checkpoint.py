"""The united-expert checkpoint (docs/design.md §3): `united.safetensors` (+ shards) and `united.json`. Never pickle.

Writing (`CheckpointWriter`) goes to a hidden temporary directory `.<name>.tmp-<pid>` beside the target, put in place
only when everything is written, so an interrupted or failed build never leaves something that looks like a checkpoint.

- One writer per target: a lock file `.<name>.lock` beside it, held from the writer's creation to commit/abort, locked
  with flock(2) and holding the writer's PID (for the message). A lock rather than an exclusive rename alone: the
  rename settles only the last step, so two builds would both do the whole work and, with overwrite, both pass their
  checks and replace each other; with the lock the second build is refused at once, before any work, and the
  check-then-replace at commit runs under it. flock rather than O_CREAT|O_EXCL: the kernel drops it when the holder
  dies, even by SIGKILL, so a stale lock is taken over without guessing from a PID (PIDs are reused) and without a
  race between two processes taking over the same stale file. The file is removed while still locked; a process that
  locked a file already removed sees that its inode is no longer at the path and tries again. Without fcntl
  (Windows), O_CREAT|O_EXCL with a dead-PID takeover stands in.
- Placement: renameat2(RENAME_NOREPLACE) puts the new checkpoint in place only if nothing appeared there meanwhile;
  with overwrite, renameat2(RENAME_EXCHANGE) swaps the previous checkpoint out in one step, so a reader sees the old
  one or the new one, never a mix and never nothing. Where renameat2 is missing (not Linux, some file systems) a
  check then a rename (two renames for a swap) stand in; the lock still excludes our own builds.
- Overwrite replaces only a previous united checkpoint: a directory holding a readable united.json and nothing but
  our own files. Anything else (other files, a regular file, a symbolic link) is refused and left untouched.
- SIGTERM / SIGHUP while a writer is open remove its temporary directory and lock, then go on to the previous handler
  (by default the process dies of the signal: exit status 143 for SIGTERM). The handler is installed from the main
  thread only and the previous one is restored when the last open writer closes. SIGKILL cannot be caught: the next
  writer to the same target removes `.<name>.tmp-<pid>` and `.<name>.old-<pid>` whose PID is dead.

Reading (`UnitedCheckpoint`) checks the manifest against the tensors on open: every layer on both sides, group lists
against expert_to_group, num_groups and way against the tensors' leading dimensions and the expert count, the same
shapes in every layer. That needs only the file headers and expert_to_group (a few bytes per layer). With
`verify=True` (the default) it also recomputes the sha256 of every tensor file, recorded in the manifest at commit:
this reads every byte once, about 0.5 s per GB on one core (sha256 runs near 2 GB/s), so ~10 s for a 20 GB
checkpoint, more when the files are not in the page cache and the disk is slower. `verify=False` skips only that.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import BrownoutError
from .exclusive_dir import (RENAME_EXCHANGE, RENAME_NOREPLACE, acquire_lock, deliver_deferred, nearest_existing,
                            os_reason, register_writer, release_lock, remove_stale, renameat2, signals_deferred,
                            unregister_writer)
from .version import __version__

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


def file_sha256(path: str | Path, chunk: int = 8 << 20) -> str:
    """sha256 of a file, read in chunks (a checkpoint file can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _is_own_file(name: str) -> bool:
    """A name a united checkpoint may hold: the manifest, the shard index and the tensor files."""
    return name in (META, INDEX) or fnmatch.fnmatchcase(name, "united*.safetensors")


def _not_a_checkpoint(path: Path) -> str | None:
    """Why the directory `path` is not a previous united checkpoint (None when it is one and holds nothing else)."""
    try:
        names = sorted(os.listdir(path))
    except OSError as e:
        return os_reason(e)
    if META not in names:
        return f"no {META}"
    try:
        manifest = json.loads((path / META).read_text())
    except (OSError, ValueError):
        return f"its {META} is unreadable"
    if not isinstance(manifest, dict) or "format_version" not in manifest:
        return f"its {META} is not a united-checkpoint manifest"
    for n in names:
        if not _is_own_file(n):
            return f"it also holds {n!r}"
        try:
            if not stat.S_ISREG(os.lstat(path / n).st_mode):
                return f"its {n} is not a regular file"
        except OSError as e:
            return f"{n}: {os_reason(e)}"
    return None


def check_output(out: str | Path, overwrite: bool) -> None:
    """Refuse, in one line and touching nothing, an output path this build may not write: a symbolic link, a file, a
    directory that is not a previous united checkpoint, or (without `overwrite`) a previous checkpoint."""
    path = Path(out)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except NotADirectoryError:
        raise BrownoutError(f"cannot write {out}: {nearest_existing(path)} is a file, not a directory") from None
    except OSError as e:
        raise BrownoutError(f"cannot write {out}: {os_reason(e)}") from None
    if stat.S_ISLNK(st.st_mode):
        raise BrownoutError(f"{out} is a symbolic link; give the directory itself (nothing was replaced)")
    if not stat.S_ISDIR(st.st_mode):
        raise BrownoutError(f"{out} is an existing file, not a united checkpoint; choose another path (nothing was replaced)")
    problem = _not_a_checkpoint(path)
    if problem:
        raise BrownoutError(f"output directory {out} exists and is not a united checkpoint ({problem}); choose another "
                            "path (--overwrite replaces only a previous united checkpoint)")
    if not overwrite:
        raise BrownoutError(f"output directory {out} holds a united checkpoint; pass --overwrite to replace it")


class CheckpointWriter:
    """Collects per-layer united tensors, writes them as shards into a temporary directory and puts it in place at
    `commit`. Holds the target's lock from its creation to `commit` / `abort`; also a context manager (aborts unless
    committed)."""

    def __init__(self, out: str | Path, overwrite: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.out = Path(out)
        self.overwrite = overwrite
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._closed = True  # until the lock is ours
        self._pid = os.getpid()  # a forked child inherits this object, not its files: it must not remove them
        target = self._target = Path(os.path.abspath(out))
        if target.parent == target:
            raise BrownoutError(f"cannot write a checkpoint at {out}")
        self.tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        self.lock_path = target.parent / f".{target.name}.lock"
        check_output(out, overwrite)  # the common refusals, before touching anything
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            self._lock = acquire_lock(self.lock_path, out)
        except NotADirectoryError:
            raise BrownoutError(f"cannot write {out}: {nearest_existing(target)} is a file, not a directory") from None
        except OSError as e:
            raise BrownoutError(f"cannot write {out}: {os_reason(e)}") from None
        self._closed = False
        try:
            check_output(out, overwrite)  # again, now that no other build of ours can change it
            self.removed_stale = remove_stale(target)
            if os.path.lexists(self.tmp):  # left by an earlier process that had our PID
                shutil.rmtree(self.tmp)
            self.tmp.mkdir()
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise BrownoutError(f"cannot write {out}: {os_reason(e)}") from None
            raise
        register_writer(self)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, *exc) -> bool:
        self.abort()
        return False

    def _check_open(self) -> None:
        if self._closed:
            raise BrownoutError(f"the checkpoint writer for {self.out} is closed (committed or aborted)")

    def add_layer(self, layer: int, tensors: dict[str, torch.Tensor]) -> None:
        self._check_open()
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
        try:
            save_file(self._pending, str(self.tmp / f"shard-{idx:05d}.safetensors"), metadata={"format": "pt"})
        except OSError as e:
            raise BrownoutError(f"cannot write {self.out}: {os_reason(e)}") from None
        self._shards.append(sorted(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def _name_files(self) -> list[str]:
        """Rename the shards to their final names (and write the index); returns the files to checksum."""
        n = len(self._shards)
        if n == 0:
            raise BrownoutError("no MoE layer was merged: nothing to write")
        if n == 1:
            (self.tmp / "shard-00000.safetensors").rename(self.tmp / SINGLE)
            return [SINGLE]
        weight_map = {}
        for i, keys in enumerate(self._shards):
            name = f"united-{i + 1:05d}-of-{n:05d}.safetensors"
            (self.tmp / f"shard-{i:05d}.safetensors").rename(self.tmp / name)
            weight_map.update({k: name for k in keys})
        (self.tmp / INDEX).write_text(json.dumps({"weight_map": weight_map}, indent=1))
        return sorted(set(weight_map.values())) + [INDEX]

    def commit(self, meta: dict) -> Path:
        """Write the manifest (with a sha256 per file) and put the checkpoint in place; on any failure nothing is
        left behind and a previous checkpoint stays as it was."""
        self._check_open()
        try:
            self._flush()
            files = {n: {"sha256": file_sha256(self.tmp / n), "bytes": (self.tmp / n).stat().st_size}
                     for n in self._name_files()}
            meta = {"format_version": FORMAT_VERSION, "tool_version": __version__, "command": " ".join(sys.argv),
                    **meta, "files": files}
            (self.tmp / META).write_text(json.dumps(meta, indent=1))
            with signals_deferred():
                self._place()
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError):
                raise BrownoutError(f"cannot write {self.out}: {os_reason(e)}") from None
            raise
        self._close()
        deliver_deferred()
        return self.out

    def _place(self) -> None:
        target, appeared = self._target, f"{self.out} appeared while this build ran; nothing was replaced"
        if os.path.lexists(target):
            if not self.overwrite:
                raise BrownoutError(appeared)
            check_output(self.out, overwrite=True)  # still a previous checkpoint and nothing else
            if renameat2(self.tmp, target, RENAME_EXCHANGE):
                shutil.rmtree(self.tmp, ignore_errors=True)  # it now holds the previous checkpoint
                return
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.rename(target, old)
            try:
                os.rename(self.tmp, target)
            except OSError:
                os.rename(old, target)  # put the previous checkpoint back
                raise
            shutil.rmtree(old, ignore_errors=True)
            return
        try:
            done = renameat2(self.tmp, target, RENAME_NOREPLACE)
        except FileExistsError:
            raise BrownoutError(appeared) from None
        if not done:
            if os.path.lexists(target):
                raise BrownoutError(appeared)
            os.rename(self.tmp, target)

    def abort(self) -> None:
        """Remove the temporary directory and release the lock (idempotent)."""
        if self._closed:
            return
        if os.getpid() == self._pid:
            shutil.rmtree(self.tmp, ignore_errors=True)
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        unregister_writer(self)
        if os.getpid() == self._pid:
            release_lock(self.lock_path, self._lock)


def _layers_text(layers: list[int]) -> str:
    return ", ".join(map(str, layers))


class UnitedCheckpoint:
    """Read side: metadata plus lazy access to one layer's tensors. On open, checks the files, the manifest against
    the tensors and (with `verify`) each file's sha256 against the manifest; see the module docstring for the cost."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        meta_file = self._meta_file = self.path / META
        if not self.path.is_dir():
            raise BrownoutError(f"united checkpoint {self.path} does not exist or is not a directory")
        if not meta_file.is_file():
            raise BrownoutError(f"{self.path} is not a united checkpoint: {META} is missing")
        try:
            self.meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BrownoutError(f"{meta_file} is corrupt: {e}") from None
        if not isinstance(self.meta, dict):
            raise BrownoutError(f"{meta_file} is corrupt: not a JSON object")
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise BrownoutError(f"{meta_file}: unsupported format version {self.meta.get('format_version')!r}")
        if (self.path / INDEX).is_file():
            try:
                self.weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
                assert isinstance(self.weight_map, dict)
            except (ValueError, KeyError, TypeError, AssertionError):
                raise BrownoutError(f"{self.path / INDEX} is corrupt") from None
        elif (self.path / SINGLE).is_file():
            self.weight_map = None
        else:
            raise BrownoutError(f"{self.path}: {SINGLE} is missing")
        self._keys, self._shapes = self._read_headers()
        if verify:
            self._verify_checksums()
        self._check_against_tensors()

    def _files(self) -> list[Path]:
        if self.weight_map is None:
            return [self.path / SINGLE]
        return [self.path / f for f in sorted(set(self.weight_map.values()))]

    def _read_headers(self) -> tuple[dict[str, Path], dict[str, tuple[int, ...]]]:
        keys, shapes = {}, {}
        for f in self._files():
            try:
                with safe_open(str(f), "pt") as s:
                    for k in s.keys():
                        keys[k], shapes[k] = f, tuple(s.get_slice(k).get_shape())
            except Exception as e:  # missing, truncated or garbage files surface here
                raise BrownoutError(f"{f} is missing or corrupt: {str(e).splitlines()[0][:160]}") from None
        if self.weight_map is not None:
            wrong = sorted(k for k in set(keys) | set(self.weight_map) if k not in keys or keys[k].name != self.weight_map.get(k))
            if wrong:
                raise BrownoutError(f"{self.path / INDEX} does not match the shard files (first: {wrong[0]})")
        return keys, shapes

    def _verify_checksums(self) -> None:
        files = self.meta.get("files")
        if not isinstance(files, dict) or not files:
            raise BrownoutError(f"{self._meta_file} records no checksums of its tensor files (written by an older "
                                "brownout); rebuild it, or open it with verify=False")
        used = {f.name for f in self._files()} | ({INDEX} if self.weight_map is not None else set())
        for name in sorted(used | set(files)):
            f = self.path / name
            entry = files.get(name)
            want = entry.get("sha256") if isinstance(entry, dict) else None
            if not _is_own_file(name) or want is None:
                raise BrownoutError(f"{self._meta_file} records no checksum for {name}")
            if not f.is_file():
                raise BrownoutError(f"{f} is missing")
            if file_sha256(f) != want:
                raise BrownoutError(f"{f} does not match the sha256 in {META}: the file was changed or replaced after "
                                    "the build")

    def _check_against_tensors(self) -> None:
        """Each mismatch between manifest and tensors named in one line (summary() and `unify inspect` read the
        manifest; the runtime runs the tensors: they must describe the same checkpoint)."""
        mf, m = self._meta_file, self.meta
        try:
            listed = {int(k): v for k, v in m["layers"].items()}
            way, G, E = int(m["way"]), int(m["num_groups"]), int(m["base_model"]["num_experts"])
            groups = {i: [sorted(int(e) for e in g) for g in v["groups"]] for i, v in listed.items()}
            skip = {int(i) for i in m.get("skip_layers") or []}
            moe_layers = m["base_model"].get("moe_layers")
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BrownoutError(f"{mf} is malformed ({type(e).__name__}: {e})") from None
        held: dict[int, dict[str, tuple[int, ...]]] = {}
        for k, shape in self._shapes.items():
            parts = k.split(".")
            if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit():
                raise BrownoutError(f"{self._keys[k]} holds {k!r}, which is not a united-expert tensor")
            held.setdefault(int(parts[1]), {})[parts[2]] = shape
        extra, missing = sorted(set(held) - set(listed)), sorted(set(listed) - set(held))
        if extra:
            raise BrownoutError(f"{mf} lists no layer {_layers_text(extra)}, but the tensor files hold united experts "
                                f"for {'it' if len(extra) == 1 else 'them'}")
        if missing:
            raise BrownoutError(f"{mf} lists layer {_layers_text(missing)}, but the tensor files hold no tensors for "
                                f"{'it' if len(missing) == 1 else 'them'}")
        if not listed:
            raise BrownoutError(f"{mf} lists no layers")
        if way * G != E:
            raise BrownoutError(f"{mf} says way {way} with {G} groups, but {E} experts ({way} x {G} != {E})")
        if skip & set(listed):
            raise BrownoutError(f"{mf} lists layer {_layers_text(sorted(skip & set(listed)))} both as united and in skip_layers")
        if moe_layers is not None and set(listed) - set(moe_layers):
            raise BrownoutError(f"{mf} lists layer {_layers_text(sorted(set(listed) - set(moe_layers)))}, which is not "
                                "among base_model.moe_layers")
        first = min(held)
        for i in sorted(held):
            shapes = held[i]
            lacking = [k for k in ("gate_up_proj", "down_proj", "expert_to_group") if k not in shapes]
            if lacking:
                raise BrownoutError(f"{self.path}: layer {i} is incomplete (no {', '.join(lacking)})")
            for k in sorted(set(shapes) | set(held[first])):
                if shapes.get(k) != held[first].get(k):
                    raise BrownoutError(f"{self.path}: layer {i} {k} has shape {shapes.get(k)}, but layer {first} has "
                                        f"{held[first].get(k)}")
            for k, s in sorted(shapes.items()):
                if k != "expert_to_group" and (not s or s[0] != G):
                    raise BrownoutError(f"{mf} says {G} groups, but layer {i} {k} holds {s[0] if s else 0}")
            if shapes["expert_to_group"] != (E,):
                raise BrownoutError(f"{mf} says {E} experts, but layer {i} expert_to_group has shape {shapes['expert_to_group']}")
            if len(groups[i]) != G:
                raise BrownoutError(f"{mf} says {G} groups, but lists {len(groups[i])} for layer {i}")
            if sorted(e for g in groups[i] for e in g) != list(range(E)):
                raise BrownoutError(f"{mf}: the groups of layer {i} are not a partition of its {E} experts")
            e2g = self._read(i, "expert_to_group")
            if e2g.is_floating_point():
                raise BrownoutError(f"{self.path}: layer {i} expert_to_group is not an integer tensor")
            e2g = e2g.tolist()
            for g, members in enumerate(groups[i]):
                actual = [e for e in range(E) if e2g[e] == g]
                if members != actual:
                    raise BrownoutError(f"{mf}: layer {i} group {g} lists experts {members}, but the tensors' "
                                        f"expert_to_group puts {actual} in it")

    @property
    def layers(self) -> list[int]:
        return sorted(int(k) for k in self.meta["layers"])

    def layer_meta(self, layer: int) -> dict:
        return self.meta["layers"][str(layer)]

    def _read(self, layer: int, name: str) -> torch.Tensor:
        k = f"layers.{layer}.{name}"
        f = self._keys[k]
        try:
            with safe_open(str(f), "pt") as s:
                return s.get_tensor(k)
        except Exception as e:
            raise BrownoutError(f"{f}: cannot read {k}: {str(e).splitlines()[0][:160]}") from None

    def tensors(self, layer: int) -> dict[str, torch.Tensor]:
        prefix = f"layers.{layer}."
        out = {k[len(prefix):]: self._read(layer, k[len(prefix):]) for k in self._keys if k.startswith(prefix)}
        if "expert_to_group" not in out or "gate_up_proj" not in out or "down_proj" not in out:
            raise BrownoutError(f"{self.path}: layer {layer} is incomplete (needs gate_up_proj, down_proj, expert_to_group)")
        return out
