"""Tile config tables of the fused MoE kernel, one JSON file per GPU model, shipped as package data.

A table is named after the device as `torch.cuda.get_device_name` gives it, spaces (and slashes) made underscores as
vLLM names its MoE config files: "NVIDIA H100 80GB HBM3" -> NVIDIA_H100_80GB_HBM3.json. It maps
"H,I,k" -> T bucket -> config (see `runtime.kernels.fused_moe.get_config`); `python -m eval.bench_kernel tune`
writes the table of the GPU it runs on here.

A device without a table of its own runs the FALLBACK_DEVICE table (tiles tuned elsewhere still compute the right
result, only maybe slower), and a warning says so once per device name. A table that is missing or unreadable is an
error, never a silent switch to default tiles.

Only the standard library here: `table_for` answers without a GPU and without triton.
"""
from __future__ import annotations

import functools
import json
import logging
import threading
from pathlib import Path

from ...errors import BrownoutError

CONFIG_DIR = Path(__file__).resolve().parent
# The GPU whose table runs where no table of the device's own exists.
FALLBACK_DEVICE = "NVIDIA H100 80GB HBM3"

log = logging.getLogger(__name__)
_warned: set[str] = set()
_warned_lock = threading.Lock()


def file_name(device_name: str) -> str:
    """The table's file name for a device name: "NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3.json"."""
    return device_name.strip().replace(" ", "_").replace("/", "_") + ".json"


def path_for(device_name: str) -> Path:
    """Where the table of `device_name` lives (or would live) in this package."""
    return CONFIG_DIR / file_name(device_name)


def table_for(device_name: str) -> tuple[Path, bool]:
    """-> (path of the table the kernel uses on `device_name`, whether that is the fallback table).

    The fallback's path is returned even if the file is absent (a broken install); `load` reports that."""
    own = path_for(device_name)
    if own.is_file():
        return own, False
    return path_for(FALLBACK_DEVICE), True


@functools.lru_cache(maxsize=None)
def load(device_name: str) -> dict:
    """The table the kernel uses on `device_name` (cached). Warns once per device name when that is the fallback;
    raises BrownoutError when the table is missing or not a valid table."""
    path, is_fallback = table_for(device_name)
    if is_fallback:
        with _warned_lock:
            first = device_name not in _warned
            _warned.add(device_name)
        if first:
            log.warning("no fused-MoE tile config table for %r in %s; using the table of %r (%s)",
                        device_name, CONFIG_DIR, FALLBACK_DEVICE, path.name)
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        raise BrownoutError(f"tile config table {path} is missing: the package was installed without its data "
                            "files; reinstall brownout") from None
    except (OSError, ValueError) as e:
        raise BrownoutError(f"tile config table {path} is unreadable: {type(e).__name__}: {e}") from None
    if not isinstance(table, dict) or not isinstance(table.get("shapes"), dict):
        raise BrownoutError(f"tile config table {path} has no 'shapes' mapping")
    return table


def reload() -> None:
    """Forget the loaded tables (after a tuner wrote a new one); the once-per-device warnings stay given."""
    load.cache_clear()
