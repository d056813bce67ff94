"""What the package must carry to work when installed from a wheel: the kernel's tile config tables (found by device
name, with a logged fallback and loud failures), and the data files setup.py's package_data has to name."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from runtime.errors import BrownoutError
from runtime.kernels import configs

ROOT = Path(__file__).resolve().parents[1]
H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """An empty config folder in place of the package's (load's cache and the once-per-device warnings reset)."""
    monkeypatch.setattr(configs, "CONFIG_DIR", tmp_path)
    monkeypatch.setattr(configs, "_warned", set())
    configs.reload()
    yield tmp_path
    configs.reload()


def test_file_name_follows_the_device_name():
    assert configs.file_name(H100) == "NVIDIA_H100_80GB_HBM3.json"
    assert configs.file_name("NVIDIA A100-SXM4-80GB") == "NVIDIA_A100-SXM4-80GB.json"
    assert configs.file_name("AMD Instinct MI300X/VF") == "AMD_Instinct_MI300X_VF.json"


def test_the_tuned_table_is_found_for_its_own_device():
    path, is_fallback = configs.table_for(H100)
    assert not is_fallback and path.is_file() and path.parent == configs.CONFIG_DIR
    table = json.loads(path.read_text())
    assert table["device"] == H100  # the file holds what it is named after
    assert table["shapes"]


def test_every_shipped_table_is_named_after_the_device_it_was_tuned_on():
    tables = sorted(configs.CONFIG_DIR.glob("*.json"))
    assert tables
    for path in tables:
        assert configs.file_name(json.loads(path.read_text())["device"]) == path.name


def test_an_unknown_gpu_runs_the_fallback_table_and_says_so_once(caplog):
    configs.reload()
    name = "Imaginary GPU 7 (test)"
    path, is_fallback = configs.table_for(name)
    assert is_fallback and path == configs.path_for(configs.FALLBACK_DEVICE) and path.is_file()
    with caplog.at_level(logging.WARNING, logger=configs.__name__):
        first = configs.load(name)
        configs.reload()
        configs.load(name)  # loaded again (cache cleared), yet warned only once for this name
    assert first == configs.load(configs.FALLBACK_DEVICE)
    warnings = [r for r in caplog.records if name in r.getMessage()]
    assert len(warnings) == 1 and configs.FALLBACK_DEVICE in warnings[0].getMessage()


def test_a_known_gpu_loads_without_a_warning(caplog):
    configs.reload()
    with caplog.at_level(logging.WARNING, logger=configs.__name__):
        configs.load(H100)
    assert not caplog.records


def test_a_missing_table_is_an_error_not_default_tiles(config_dir):
    with pytest.raises(BrownoutError, match="missing"):
        configs.load(H100)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"device": "x"}'])
def test_an_unreadable_table_is_an_error(config_dir, text):
    configs.path_for(H100).write_text(text)
    with pytest.raises(BrownoutError, match="tile config table"):
        configs.load(H100)


def test_get_config_reads_the_device_table(config_dir):
    fm = pytest.importorskip("runtime.kernels.fused_moe")
    mine = {"mode": "prefill", "gu": [32, 32, 32, 1, 4, 2], "dn": [32, 32, 32, 1, 4, 2], "sum": "atomic"}
    # off a GPU the lookup name is the device type: "cpu" gets a table of its own here
    configs.path_for("cpu").write_text(json.dumps({"device": "cpu", "shapes": {"64,32,2": {"128": mine}}}))
    assert fm.get_config(100, 64, 32, 2, "cpu") == mine  # T = 100 -> bucket 128
    assert fm.get_config(100, 64, 48, 2, "cpu") != mine  # another shape: a default


def test_setup_ships_the_data_files():
    """setup.py's package_data globs match the files the package reads at run time."""
    import ast
    import glob

    tree = ast.parse((ROOT / "setup.py").read_text())
    data = next(kw.value for node in ast.walk(tree) if isinstance(node, ast.Call)
                for kw in node.keywords if kw.arg == "package_data")
    package_data = ast.literal_eval(data)
    needed = {
        "runtime.kernels.configs": [p.name for p in configs.CONFIG_DIR.glob("*.json")],
        "recipes": ["mixtral.yaml", "reference.yaml", "calib_default.txt", "reference/calib.txt",
                    "reference/model/config.json", "reference/model/tokenizer.json",
                    "reference/model/model.safetensors.index.json", "reference/model/model-00001-of-00003.safetensors",
                    "reference/tasks/brownout_cont.yaml", "reference/tasks/brownout_cont.jsonl",
                    "reference/tasks/utils.py"],
    }
    for package, files in needed.items():
        pkg_dir = ROOT.joinpath(*package.split("."))
        # setuptools expands each pattern with a recursive glob under the package's folder
        shipped = {m for g in package_data.get(package, []) for m in glob.glob(g, root_dir=pkg_dir, recursive=True)}
        for f in files:
            assert (pkg_dir / f).is_file(), f"{package}: {f} is not in the checkout"
            assert f in shipped, f"setup.py package_data[{package!r}] does not name {f}"
