"""Checkpoint safety: --overwrite replaces only a previous checkpoint, one of concurrent builds wins, no temporary
directory outlives its build, and a checkpoint whose manifest and tensors disagree is refused. Every case checks the
exit code or exception, the one-line message, and that nothing outside the output path changed."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from runtime.checkpoint import CheckpointWriter, UnitedCheckpoint, file_sha256
from runtime.errors import BrownoutError
from unify.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def snapshot(parent: Path, leave_out: tuple[Path, ...] = ()) -> dict[str, tuple]:
    """Every entry under `parent` but `leave_out` and what they hold: kind and content hash (or link target)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(parent):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if any(p == x or x in p.parents for x in leave_out):
                continue
            mode = os.lstat(p).st_mode
            if stat.S_ISLNK(mode):
                found[str(p.relative_to(parent))] = ("link", os.readlink(p))
            elif stat.S_ISREG(mode):
                found[str(p.relative_to(parent))] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                found[str(p.relative_to(parent))] = ("dir",)
    return found


def build_args(model: str, out: Path, *extra: str, way: int = 2) -> list[str]:
    return ["build", "--model", model, "--way", str(way), "--grouping", "consecutive", "--merge", "average",
            "--skip-layers", "", "--out", str(out), *extra]


def cli(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err.strip()


def one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# -- a synthetic checkpoint, for the writer on its own (no model) ------------------------------------------------------
def open_synthetic(out: Path, overwrite: bool = False, scale: float = 1.0, E: int = 4, G: int = 2):
    w = CheckpointWriter(out, overwrite=overwrite)
    e2g = torch.arange(E) // (E // G)
    layers = {}
    for i in (0, 1):
        w.add_layer(i, {"gate_up_proj": torch.full((G, 4, 2), scale), "down_proj": torch.full((G, 2, 2), scale),
                        "expert_to_group": e2g.clone()})
        layers[str(i)] = {"groups": [[e for e in range(E) if e2g[e] == g] for g in range(G)]}
    meta = {"base_model": {"num_experts": E, "moe_layers": [0, 1]}, "way": E // G, "num_groups": G,
            "skip_layers": [], "layers": layers}
    return w, meta


def write_synthetic(out: Path, **kw) -> Path:
    w, meta = open_synthetic(out, **kw)
    return w.commit(meta)


# -- overwrite --------------------------------------------------------------------------------------------------------
def test_overwrite_refuses_a_directory_of_other_files(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "data.csv").write_text("a,b\n")
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        one_line_error(*cli(capsys, *build_args(tiny_dir("mixtral"), out, *extra)), "not a united checkpoint")
        assert snapshot(tmp_path) == before
    # a checkpoint someone kept notes in is not ours to delete either
    shutil.rmtree(out / "sub")
    write_synthetic(tmp_path / "ck")
    for f in (tmp_path / "ck").iterdir():
        shutil.copy(f, out / f.name)
    before = snapshot(tmp_path)
    one_line_error(*cli(capsys, *build_args(tiny_dir("mixtral"), out, "--overwrite")), "also holds 'notes.txt'")
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_file_and_a_symlink(tiny_dir, tmp_path, capsys):
    target = tmp_path / "elsewhere"
    write_synthetic(target)
    (tmp_path / "file").write_text("mine")
    (tmp_path / "link").symlink_to(target)
    before = snapshot(tmp_path)
    for extra in ([], ["--overwrite"]):
        rc, err = cli(capsys, *build_args(tiny_dir("mixtral"), tmp_path / "file", *extra))
        one_line_error(rc, err, "is an existing file")
        assert "output directory" not in err
        one_line_error(*cli(capsys, *build_args(tiny_dir("mixtral"), tmp_path / "link", *extra)), "symbolic link")
        one_line_error(*cli(capsys, *build_args(tiny_dir("mixtral"), tmp_path / "file" / "sub", *extra)),
                       "is a file, not a directory")
        assert snapshot(tmp_path) == before


def test_overwrite_replaces_a_previous_checkpoint(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "neighbour.txt").write_text("keep")
    assert cli(capsys, *build_args(tiny_dir("mixtral"), out, "--quiet"))[0] == 0
    before = snapshot(tmp_path, leave_out=(out,))
    first = snapshot(out)
    one_line_error(*cli(capsys, *build_args(tiny_dir("mixtral"), out)), "holds a united checkpoint", "--overwrite")
    assert snapshot(out) == first
    assert cli(capsys, *build_args(tiny_dir("mixtral"), out, "--quiet", "--overwrite", way=4))[0] == 0
    ck = UnitedCheckpoint(out)
    assert ck.meta["way"] == 4 and ck.tensors(0)["gate_up_proj"].shape[0] == 2
    assert snapshot(tmp_path, leave_out=(out,)) == before  # no lock, temporary or old directory left


# -- one writer per target --------------------------------------------------------------------------------------------
def test_a_second_writer_is_refused_while_the_first_is_open(tmp_path):
    out = tmp_path / "out"
    w, meta = open_synthetic(out)
    assert (tmp_path / ".out.lock").read_text().strip() == str(os.getpid())
    for overwrite in (False, True):
        with pytest.raises(BrownoutError, match=rf"another build \(pid {os.getpid()}\) is writing") as e:
            CheckpointWriter(out, overwrite=overwrite)
        assert len(str(e.value).splitlines()) == 1
    assert w.commit(meta) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    UnitedCheckpoint(out)


@pytest.mark.parametrize("rename", ["renameat2", "fallback"])
def test_an_output_that_appears_meanwhile(tmp_path, monkeypatch, rename):
    import runtime.exclusive_dir as exclusive_dir

    if rename == "fallback":  # as where renameat2 is missing: check, then rename (two renames for a swap)
        monkeypatch.setattr(exclusive_dir, "_renameat2_fn", lambda: None)
    elif sys.platform.startswith("linux"):
        assert exclusive_dir._renameat2_fn() is not None
    out = tmp_path / "out"
    w, meta = open_synthetic(out)
    out.mkdir()
    (out / "theirs.txt").write_text("theirs")
    before = snapshot(tmp_path, leave_out=(tmp_path / f".out.tmp-{os.getpid()}", tmp_path / ".out.lock"))
    with pytest.raises(BrownoutError, match="appeared while this build ran; nothing was replaced"):
        w.commit(meta)
    assert snapshot(tmp_path) == before  # temporary directory and lock gone, theirs untouched
    # with overwrite: a foreign directory is still refused, a previous checkpoint is swapped out whole
    w, meta = open_synthetic(tmp_path / "o2", overwrite=True, scale=2.0)
    (tmp_path / "o2").mkdir()
    (tmp_path / "o2" / "theirs.txt").write_text("theirs")
    with pytest.raises(BrownoutError, match="not a united checkpoint"):
        w.commit(meta)
    assert snapshot(tmp_path) == {**before, "o2": ("dir",), "o2/theirs.txt": before["out/theirs.txt"]}
    shutil.rmtree(tmp_path / "o2")
    w, meta = open_synthetic(tmp_path / "o2", overwrite=True, scale=2.0)
    write_synthetic(tmp_path / "o3")
    (tmp_path / "o3").rename(tmp_path / "o2")
    w.commit(meta)
    assert UnitedCheckpoint(tmp_path / "o2").tensors(0)["gate_up_proj"].eq(2.0).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o2", "out"]


# -- temporary directories --------------------------------------------------------------------------------------------
def test_stale_temporary_directories_are_removed(tmp_path):
    out, dead = tmp_path / "out", dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f".out.tmp-{dead}", f".out.old-{dead}", f".out.tmp-{live.pid}", f".other.tmp-{dead}"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "shard-00000.safetensors").write_bytes(b"x" * 100)
        (tmp_path / f".out.tmp-{dead}x").mkdir()  # not one of our names
        (tmp_path / ".out.lock").write_text(f"{dead}\n")  # a lock its dead writer never removed
        stale = (tmp_path / f".out.tmp-{dead}", tmp_path / f".out.old-{dead}", tmp_path / ".out.lock")
        before = snapshot(tmp_path, leave_out=stale)
        w, meta = open_synthetic(out)
        assert sorted(w.removed_stale) == sorted(stale[:2])
        w.commit(meta)
        assert snapshot(tmp_path, leave_out=(out,)) == before  # live writer's and other names' directories kept
    finally:
        live.kill()
        live.wait()


SIGTERM_CHILD = """
import signal, sys, time, torch
from runtime.checkpoint import CheckpointWriter
if sys.argv[2] == "chained":
    signal.signal(signal.SIGTERM, lambda s, f: sys.exit(7))
w = CheckpointWriter(sys.argv[1])
w.add_layer(0, {"gate_up_proj": torch.zeros(2, 4, 2), "down_proj": torch.zeros(2, 2, 2),
                "expert_to_group": torch.tensor([0, 0, 1, 1])})
w._flush()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("previous", ["default", "chained"])
def test_sigterm_mid_write_leaves_nothing(tmp_path, previous):
    """SIGTERM while the writer is open removes its temporary directory and lock, then acts as it would have without
    the writer: the default handler kills the process with SIGTERM, a program's own handler runs."""
    (tmp_path / "neighbour.txt").write_text("keep")
    before = snapshot(tmp_path)
    p = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD, str(tmp_path / "out"), previous], cwd=ROOT, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        assert (tmp_path / f".out.tmp-{p.pid}" / "shard-00000.safetensors").is_file()
        assert (tmp_path / ".out.lock").is_file()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=30)
    finally:
        p.kill()
    assert rc == (-signal.SIGTERM if previous == "default" else 7), p.stderr.read()
    assert snapshot(tmp_path) == before


# -- manifest against tensors -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tiny_dir, tmp_path_factory):
    """way-2 and way-4 checkpoints of the tiny Mixtral (8 experts, 3 MoE layers)."""
    d = tmp_path_factory.mktemp("built")
    for way in (2, 4):
        assert main(build_args(tiny_dir("mixtral"), d / f"w{way}", "--quiet", way=way)) == 0
    return d


def edit_manifest(ck: Path, change) -> None:
    meta = json.loads((ck / "united.json").read_text())
    change(meta)
    (ck / "united.json").write_text(json.dumps(meta))


def _way_and_groups(m):
    m["way"], m["num_groups"] = 4, 2


def _groups_replaced(m):
    m["layers"]["0"]["groups"] = [[0, 2], [1, 3], [4, 5], [6, 7]]


def _layer_removed(m):
    del m["layers"]["1"]


def _no_checksums(m):
    del m["files"]


def _swap_tensor_file(ck: Path) -> None:
    t = load_file(str(ck / "united.safetensors"))
    t["layers.1.down_proj"] = t["layers.1.down_proj"] * 2  # same layout, other values
    save_file(t, str(ck / "united.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("edit, message", [
    (lambda ck: edit_manifest(ck, _way_and_groups), "says 2 groups, but layer 0 down_proj holds 4"),
    (lambda ck: edit_manifest(ck, _groups_replaced),
     "layer 0 group 0 lists experts [0, 2], but the tensors' expert_to_group puts [0, 1] in it"),
    (lambda ck: edit_manifest(ck, _layer_removed), "lists no layer 1, but the tensor files hold united experts for it"),
    (lambda ck: edit_manifest(ck, _no_checksums), "records no checksums"),
    (_swap_tensor_file, "united.safetensors does not match the sha256 in united.json"),
], ids=["way-and-groups", "groups-replaced", "layer-removed", "no-checksums", "swapped-tensor-file"])
def test_manifest_and_tensors_must_agree(built, tmp_path, capsys, edit, message):
    ck = tmp_path / "ck"
    shutil.copytree(built / "w2", ck)
    UnitedCheckpoint(ck)  # the copy itself is valid
    edit(ck)
    before = snapshot(tmp_path)
    with pytest.raises(BrownoutError) as e:
        UnitedCheckpoint(ck)
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1, e.value
    one_line_error(*cli(capsys, "inspect", str(ck)), message)
    assert snapshot(tmp_path) == before


def test_tensor_file_of_another_way_is_refused_without_checksums(built, tmp_path):
    """The structural checks stand on their own: a way-4 tensor file under a way-2 manifest, checksums off."""
    ck = tmp_path / "ck"
    shutil.copytree(built / "w2", ck)
    shutil.copy(built / "w4" / "united.safetensors", ck / "united.safetensors")
    UnitedCheckpoint(built / "w2", verify=False)
    with pytest.raises(BrownoutError, match="united.json says 4 groups, but layer 0 down_proj holds 2"):
        UnitedCheckpoint(ck, verify=False)
    with pytest.raises(BrownoutError, match="does not match the sha256"):
        UnitedCheckpoint(ck)


def test_checksums_are_those_of_the_files(built):
    ck = UnitedCheckpoint(built / "w2")
    assert ck.meta["files"] == {"united.safetensors": {"sha256": file_sha256(built / "w2" / "united.safetensors"),
                                                       "bytes": (built / "w2" / "united.safetensors").stat().st_size}}


# -- concurrent builds through the real CLI ---------------------------------------------------------------------------
def test_concurrent_builds(tiny_dir, tmp_path):
    """4 builds to one new --out: exactly one succeeds, the others exit 2 in one line. 4 builds with --overwrite onto a
    previous checkpoint (alternating way 2 / 4, so a mix would show): every success leaves a complete checkpoint, the
    others exit 2 in one line. Both groups run at the same time; no lock or temporary directory is left."""
    model, fresh, again = tiny_dir("mixtral"), tmp_path / "fresh", tmp_path / "again"
    assert main(build_args(model, again, "--quiet")) == 0
    runs = [(fresh, 2, [])] * 4 + [(again, 2 + 2 * (k % 2), ["--overwrite"]) for k in range(4)]
    procs = [subprocess.Popen([sys.executable, "-m", "unify.cli", *build_args(model, out, "--quiet", *extra, way=way)],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for out, way, extra in runs]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append((p.returncode, out, err))
    for rc, out, err in results:
        assert rc in (0, 2), err
        if rc == 2:
            assert len(err.strip().splitlines()) == 1 and err.startswith("unify: error: "), err
            assert "another build" in err or "holds a united checkpoint" in err, err
        else:
            assert out.startswith("wrote "), out
    assert [rc for rc, _, _ in results[:4]].count(0) == 1, results[:4]
    assert [rc for rc, _, _ in results[4:]].count(0) >= 1, results[4:]
    for out in (fresh, again):
        ck = UnitedCheckpoint(out)  # checksums and manifest against tensors: one build's files, whole
        assert ck.tensors(0)["gate_up_proj"].shape[0] == 8 // ck.meta["way"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "fresh"]
