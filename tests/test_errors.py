"""Bad input: one line on stderr, exit code 2, no traceback, nothing left behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAST, make_tiny
from unify.build import BuildOptions, build
from unify.cli import main
from runtime.errors import BrownoutError


def _cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()  # drop what came before (e.g. save_pretrained's progress bar)
    rc = main(list(argv))
    err = capsys.readouterr().err.strip()
    return rc, err


def _one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_partition_errors(tiny_dir, tmp_path, capsys):
    d = tiny_dir("mixtral")
    _one_line_error(*_cli(capsys, "build", "--model", d, "--way", "3", "--out", str(tmp_path / "o")), "1, 2, 4, 8")
    _one_line_error(*_cli(capsys, "build", "--model", d, "--groups", "5", "--out", str(tmp_path / "o")), "--groups")
    _one_line_error(*_cli(capsys, "build", "--model", d, "--way", "2", "--groups", "4", "--out", str(tmp_path / "o")), "exactly one")
    assert not (tmp_path / "o").exists()


def test_method_parameter_errors(tiny_dir, tmp_path, capsys):
    """Unknown keys, bad values and malformed pairs: one line naming what the method takes; nothing written."""
    d, out = tiny_dir("mixtral"), str(tmp_path / "o")
    build_ = ["build", "--model", d, "--way", "2", "--grouping", "consecutive", "--out", out]
    _one_line_error(*_cli(capsys, *build_, "--merge", "distill", "--merge-param", "stepz=3"),
                    "unknown merge parameter 'stepz'", "steps=200 (int), lr=0.001 (float), init=activation")
    _one_line_error(*_cli(capsys, *build_, "--merge", "distill", "--merge-param", "init=median"),
                    "init='median': expected activation|average|frequency", "holdout=0.2 (float)")
    _one_line_error(*_cli(capsys, *build_, "--merge", "distill", "--merge-param", "steps"), "expected KEY=VALUE")
    _one_line_error(*_cli(capsys, *build_, "--merge", "distill", "--steps", "3", "--merge-param", "steps=4"),
                    "--steps and --merge-param steps")
    _one_line_error(*_cli(capsys, *build_, "--merge", "average", "--steps", "3"),
                    "unknown merge parameter 'steps'", "'average' takes: no parameters")
    _one_line_error(*_cli(capsys, "build", "--model", d, "--way", "2", "--grouping", "similarity", "--grouping-param",
                          "sample_rows=many", "--out", out), "sample_rows='many': expected int")
    assert not (tmp_path / "o").exists()


def test_skip_layers_errors(tiny_dir, tmp_path, capsys):
    d, out = tiny_dir("mixtral"), str(tmp_path / "o")
    _one_line_error(*_cli(capsys, "build", "--model", d, "--way", "2", "--skip-layers", "0,3", "--out", out),
                    "--skip-layers 3 is out of range", "valid: -3..2")
    _one_line_error(*_cli(capsys, "build", "--model", d, "--way", "2", "--skip-layers", "0,1,-1", "--out", out),
                    "leaves every MoE layer alone")
    assert not (tmp_path / "o").exists()


def test_unknown_recipe_and_offline_hub(tmp_path, capsys):
    _one_line_error(*_cli(capsys, "build", "--model", "nosuch", "--way", "2", "--out", str(tmp_path / "o")), "mixtral", "qwen2_moe")
    _one_line_error(*_cli(capsys, "build", "--model", "mixtral", "--groups", "2", "--out", str(tmp_path / "o")),
                    "mistralai/Mixtral-8x7B-v0.1", "--model /path/to")


def test_model_without_moe(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=32)).save_pretrained(tmp_path / "llama")
    _one_line_error(*_cli(capsys, "build", "--model", str(tmp_path / "llama"), "--way", "2", "--out", str(tmp_path / "o")), "no MoE")


def _copy_model(src: str, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_and_corrupt_safetensors(tiny_dir, tmp_path, capsys):
    d = _copy_model(tiny_dir("mixtral"), tmp_path / "m")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _one_line_error(*_cli(capsys, "build", "--model", str(d), "--way", "2", "--out", str(tmp_path / "o")), "model.safetensors")
    f.write_bytes(b"\x00garbage" * 100)
    _one_line_error(*_cli(capsys, "build", "--model", str(d), "--way", "2", "--out", str(tmp_path / "o")), "corrupt")
    f.unlink()
    _one_line_error(*_cli(capsys, "build", "--model", str(d), "--way", "2", "--out", str(tmp_path / "o")), "safetensors")
    assert not (tmp_path / "o").exists()


def test_empty_calibration(tiny_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    _one_line_error(*_cli(capsys, "build", "--model", tiny_dir("mixtral"), "--way", "2", "--merge", "activation",
                          "--calib", str(empty), "--skip-layers", "", "--out", str(tmp_path / "o")), "empty")


def test_nan_weights(tmp_path, capsys):
    model = make_tiny("mixtral")
    with torch.no_grad():
        model.model.layers[1].mlp.experts.down_proj[3, 0, 0] = float("nan")
    model.save_pretrained(tmp_path / "m")
    _one_line_error(*_cli(capsys, "build", "--model", str(tmp_path / "m"), "--way", "2", "--skip-layers", "", "--quiet",
                          "--out", str(tmp_path / "o")), "NaN")
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(tiny_dir, tmp_path, capsys):
    """A directory that is not a united checkpoint is never replaced; a previous checkpoint only with --overwrite."""
    build_ = ["build", "--model", tiny_dir("mixtral"), "--way", "2", "--grouping", "consecutive", "--merge", "average",
              "--skip-layers", "", "--quiet"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    _one_line_error(*_cli(capsys, *build_, "--out", str(mine), "--overwrite"), "not a united checkpoint")
    assert (mine / "keep.txt").read_text() == "mine"
    out = tmp_path / "o"
    assert _cli(capsys, *build_, "--out", str(out))[0] == 0
    first = (out / "united.json").read_text()
    _one_line_error(*_cli(capsys, *build_, "--out", str(out)), "--overwrite")
    assert (out / "united.json").read_text() == first
    rc, err = _cli(capsys, *build_, "--out", str(out), "--overwrite", "--seed", "1")
    assert rc == 0 and '"seed": 1' in (out / "united.json").read_text(), err


def test_interrupted_build_leaves_nothing(tiny_dir, tmp_path, monkeypatch):
    import dataclasses

    from unify.merge import MERGES

    def boom(w, ctx):
        raise KeyboardInterrupt

    monkeypatch.setitem(MERGES.methods, "average", dataclasses.replace(MERGES.get("average"), fn=boom))
    with pytest.raises(KeyboardInterrupt):
        build(tiny_dir("mixtral"), BuildOptions(out=str(tmp_path / "o"), way=2, grouping="consecutive", merge="average",
                                                **FAST))
    assert list(tmp_path.iterdir()) == []


def test_killed_build_leaves_no_checkpoint(tiny_dir, tmp_path):
    """SIGKILL mid-build: the target directory never appears (only a hidden temporary one may remain)."""
    code = (
        "import dataclasses, sys, time; from unify.merge import MERGES\n"
        "orig = MERGES.get('activation')\n"
        "def slow(w, ctx):\n    time.sleep(30); return orig.fn(w, ctx)\n"
        "MERGES.methods['activation'] = dataclasses.replace(orig, fn=slow)\n"
        "from unify.cli import main; sys.exit(main(sys.argv[1:]))\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, "build", "--model", tiny_dir("mixtral"), "--way", "2", "--merge",
                          "activation", "--quiet", "--calib-tokens", "256", "--skip-layers", "", "--out", str(tmp_path / "o")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not any(tmp_path.glob(".o.tmp-*")):
        time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "o").exists()


def test_inspect(tiny_dir, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["build", "--model", tiny_dir("qwen2_moe"), "--way", "4", "--grouping", "consecutive", "--merge",
                 "activation", "--merge-param", "refit=no", "--calib-tokens", "1024", "--skip-layers", "", "--quiet",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "qwen2_moe" in text and "way=4" in text and "layer   0: [0,1,2,3] [4,5,6,7]" in text
    assert "parameters : merge align=true, merge refit=false" in text
    _one_line_error(*_cli(capsys, "inspect", str(tmp_path / "missing")), "does not exist")
