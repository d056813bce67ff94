"""Bad input to `unify`, case by case: refused with exit status 2 and exactly one line on stderr, before any model is
loaded or any text is read when the request alone shows the problem, leaving the directory around --out as it was.
Calibration text is read only as far as the token budget; a reader that closes the pipe early ends `unify` quietly."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import unify.build
from unify.cli import main

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` -> (size, mtime in ns): what a refused command must leave unchanged."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_size if not p.is_dir() else 0, st.st_mtime_ns)
    return out


def run_cli(capsys, argv: list[str]) -> tuple[int, str]:
    """`unify ARGV` in this process: (exit status, stderr); argparse's own errors exit through SystemExit."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def assert_refused(rc: int, err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working directory holding an unrelated file and a sub-directory, as the parent of --out."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "data.csv").write_text("a,b\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _model_work_forbidden(monkeypatch, stage: str) -> None:
    """Make model work a test failure: from the model's resolution on ("request"), or from the model skeleton and the
    calibration text on ("config": reading config.json is allowed)."""
    def forbidden(*a, **k):
        raise AssertionError(f"model work started before the input was refused ({stage} stage)")

    if stage == "request":
        monkeypatch.setattr(unify.build, "resolve", forbidden)
    monkeypatch.setattr(unify.build, "ShardSource", forbidden)
    monkeypatch.setattr(unify.build, "iter_texts", forbidden, raising=False)
    monkeypatch.setattr(unify.build, "tokenize", forbidden)


BAD_REQUESTS = [
    # id, extra flags, words the one line must hold, the stage it is refused at
    ("calib-tokens-0", ["--calib-tokens", "0"], ["--calib-tokens 0", ">= 64"], "request"),
    ("calib-tokens-negative", ["--calib-tokens", "-5"], ["--calib-tokens -5", ">= 64"], "request"),
    ("calib-tokens-1", ["--calib-tokens", "1"], ["--calib-tokens 1", ">= 64"], "request"),
    ("calib-tokens-not-a-number", ["--calib-tokens", "abc"], ["--calib-tokens", "invalid int value"], "request"),
    ("seq-len-0", ["--seq-len", "0"], ["--seq-len 0", ">= 1"], "request"),
    ("seq-len-beyond-the-model", ["--seq-len", "100000"], ["--seq-len 100000", "at most 256 positions"], "config"),
    ("samples-per-layer-0", ["--samples-per-layer", "0"], ["--samples-per-layer 0", ">= 1"], "request"),
    ("way-0", ["--way", "0"], ["--way 0", ">= 1"], "request"),
    ("lr-negative", ["--merge", "distill", "--lr", "-1"], ["lr=-1.0", "must be > 0"], "request"),
    ("lr-0", ["--merge", "distill", "--lr", "0"], ["lr=0.0", "must be > 0"], "request"),
    ("lr-infinite", ["--merge", "distill", "--lr", "inf"], ["lr=inf", "finite"], "request"),
    ("merge-param-lr-negative", ["--merge", "distill", "--merge-param", "lr=-1"], ["lr=-1.0", "must be > 0"], "request"),
    ("steps-0", ["--merge", "distill", "--steps", "0"], ["steps=0", ">= 1"], "request"),
    ("device-bogus", ["--device", "bogus"], ["--device 'bogus' is not a device"], "request"),
    ("skip-layers-out-of-range", ["--skip-layers", "99"], ["--skip-layers 99 is out of range", "valid: -3..2"], "config"),
]


@pytest.mark.parametrize("extra,words,stage", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_refused_before_model_work(tiny_dir, work, monkeypatch, capsys, extra, words, stage):
    model = tiny_dir("mixtral")
    _model_work_forbidden(monkeypatch, stage)
    before = snapshot(work)
    argv = ["build", "--model", model, "--way", "2", "--merge", "activation", "--skip-layers", "", "--quiet",
            "--out", "o"]
    # later flags win in argparse: the case's own --way, --merge or --skip-layers replaces the defaults above
    assert_refused(*run_cli(capsys, argv + extra), *words)
    assert snapshot(work) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has CUDA")
def test_cuda_device_on_a_cpu_only_torch(tiny_dir, work, monkeypatch, capsys):
    _model_work_forbidden(monkeypatch, "request")
    before = snapshot(work)
    t0 = time.time()
    rc, err = run_cli(capsys, ["build", "--model", tiny_dir("mixtral"), "--way", "2", "--device", "cuda", "--out", "o"])
    assert_refused(rc, err, "--device cuda", "use --device cpu")
    assert time.time() - t0 < 5  # up front, not after the calibration (the issue saw 12 s of work first)
    assert snapshot(work) == before


# -- the output path --------------------------------------------------------------------------------------------------
def test_out_under_a_regular_file(tiny_dir, work, monkeypatch, capsys):
    _model_work_forbidden(monkeypatch, "request")
    before = snapshot(work)
    assert_refused(*run_cli(capsys, ["build", "--model", tiny_dir("mixtral"), "--way", "2", "--out", "notes.txt/o"]),
                   "cannot write notes.txt/o", "notes.txt is a file, not a directory")
    assert snapshot(work) == before


def test_out_is_an_existing_file(tiny_dir, work, monkeypatch, capsys):
    _model_work_forbidden(monkeypatch, "request")
    before = snapshot(work)
    for flags in ([], ["--overwrite"]):
        assert_refused(*run_cli(capsys, ["build", "--model", tiny_dir("mixtral"), "--way", "2", "--out", "notes.txt",
                                         *flags]), "notes.txt is an existing file", "nothing was replaced")
    assert snapshot(work) == before and (work / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only directories")
def test_out_in_a_read_only_directory(tiny_dir, work, monkeypatch, capsys):
    _model_work_forbidden(monkeypatch, "request")
    locked = work / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        before = snapshot(work)
        assert_refused(*run_cli(capsys, ["build", "--model", tiny_dir("mixtral"), "--way", "2", "--out",
                                         "locked/o"]), "cannot write locked/o", "not writable")
        assert snapshot(work) == before
    finally:
        locked.chmod(0o755)


@pytest.mark.skipif(not os.path.isdir("/proc/sys") or os.access("/proc/sys", os.W_OK),
                    reason="needs /proc/sys, a directory that not even root may create files in")
def test_out_in_a_directory_nobody_may_write(tiny_dir, monkeypatch, capsys):
    """The same refusal where it also holds for root (CI containers often run as root)."""
    _model_work_forbidden(monkeypatch, "request")
    before = sorted(os.listdir("/proc/sys"))
    assert_refused(*run_cli(capsys, ["build", "--model", tiny_dir("mixtral"), "--way", "2", "--out",
                                     "/proc/sys/brownout-out"]), "cannot write /proc/sys/brownout-out", "not writable")
    assert sorted(os.listdir("/proc/sys")) == before


# -- the model path ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("typo", ["./mixtrall", "models/mixtral/", "sub/mixtral"])
def test_mistyped_local_model_path_is_not_a_hub_failure(work, monkeypatch, capsys, typo):
    def no_hub(*a, **k):
        raise AssertionError("a local path was looked up on the hub")

    monkeypatch.setattr("unify.loading._from_hub", no_hub)
    before = snapshot(work)
    rc, err = run_cli(capsys, ["build", "--model", typo, "--way", "2", "--out", "o"])
    assert_refused(rc, err, f"--model {typo}", "no such directory")
    assert "hub" not in err and "network" not in err
    assert snapshot(work) == before


# -- calibration data -------------------------------------------------------------------------------------------------
def _binary(kind: str) -> bytes:
    if kind == "nul":  # e.g. a tensor file
        return bytes(range(256)) * 512
    return bytes(0x80 + (i * 37) % 0x80 for i in range(1 << 17))  # no NUL, but no valid UTF-8 either


@pytest.mark.parametrize("name,kind,words", [("calib.bin", "nul", ["NUL bytes"]),
                                             ("calib.txt", "utf8", ["not valid UTF-8"]),
                                             ("calib", "nul", ["NUL bytes"])])
def test_binary_calibration_file_refused_before_model_work(tiny_dir, work, monkeypatch, capsys, name, kind, words):
    (work / name).write_bytes(_binary(kind))
    _model_work_forbidden(monkeypatch, "request")
    before = snapshot(work)
    rc, err = run_cli(capsys, ["build", "--model", tiny_dir("mixtral"), "--way", "2", "--merge", "activation",
                               "--calib", name, "--out", "o"])
    assert_refused(rc, err, f"calibration file {name} is not text", *words, ".json/.jsonl/.csv/.parquet")
    assert snapshot(work) == before


def test_missing_calibration_path_is_not_a_dataset_name(tiny_dir, work, monkeypatch, capsys):
    _model_work_forbidden(monkeypatch, "request")
    before = snapshot(work)
    assert_refused(*run_cli(capsys, ["build", "--model", tiny_dir("mixtral"), "--way", "2", "--merge", "activation",
                                     "--calib", "./calib.txt", "--out", "o"]), "--calib ./calib.txt", "no such file")
    assert snapshot(work) == before


def test_text_calibration_file_named_bin_is_read_locally(tiny_dir, work, monkeypatch, capsys):
    """A .bin name says nothing: a text file is read as text, never looked up as a hub dataset."""
    import datasets

    def no_datasets(*a, **k):
        raise AssertionError("a local text file went to `datasets`")

    monkeypatch.setattr(datasets, "load_dataset", no_datasets)
    (work / "calib.bin").write_text("the quick brown fox jumps over the lazy dog. " * 100)
    rc, err = run_cli(capsys, ["build", "--model", tiny_dir("mixtral"), "--way", "2", "--merge", "activation",
                               "--calib", "calib.bin", "--calib-tokens", "1024", "--skip-layers", "", "--quiet",
                               "--out", "o"])
    assert rc == 0, err
    assert (work / "o" / "united.json").is_file()


@pytest.mark.parametrize("content,words", [('{"text": "fine"}\n{not json\n', ["cannot read calibration data",
                                                                            "JSON parse error"]),
                                           ('{"body": "fine"}\n', ["has no column 'text'", "body"])],
                         ids=["malformed", "no-text-column"])
def test_bad_jsonl_calibration_file(tiny_dir, work, capsys, content, words):
    """A local data file goes to `datasets`' own loader (never the hub); its failure is one line, not a log + error."""
    (work / "calib.jsonl").write_text(content)
    before = snapshot(work)
    assert_refused(*run_cli(capsys, ["build", "--model", tiny_dir("mixtral"), "--way", "2", "--merge", "activation",
                                     "--calib", "calib.jsonl", "--skip-layers", "", "--quiet", "--out", "o"]), *words)
    assert snapshot(work) == before


def test_too_few_tokens_after_tokenisation(tiny_dir, work, capsys):
    (work / "calib.txt").write_text("hi there")
    before = snapshot(work)
    assert_refused(*run_cli(capsys, ["build", "--model", tiny_dir("mixtral"), "--way", "2", "--merge", "activation",
                                     "--calib", "calib.txt", "--skip-layers", "", "--quiet", "--out", "o"]),
                   "gives only 8 tokens after tokenisation", "at least 64")
    assert snapshot(work) == before


BIG_MB = 100


def test_huge_single_line_calibration_file_is_read_only_as_far_as_the_budget(tiny_dir, work):
    """A 100 MB file of one line with --calib-tokens 1024: the build reads a few chunks of it, in bounded time and
    memory (reading and tokenising it whole took minutes and GBs). Peak memory is measured in the build's process."""
    big = work / "big.txt"
    line = "the quick brown fox jumps over the lazy dog " * 1000
    with open(big, "w") as f:
        for _ in range(BIG_MB * 10**6 // len(line) + 1):
            f.write(line)
    code = (
        "import resource, sys\n"
        "from unify.cli import main\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "rc = main(sys.argv[1:])\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "unit = 1 if sys.platform == 'darwin' else 1024\n"
        "print('peak-growth-MB', (after - before) * unit / 2**20, file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", code, "build", "--model", tiny_dir("mixtral"), "--way", "2", "--merge",
                        "activation", "--calib", str(big), "--calib-tokens", "1024", "--skip-layers", "", "--quiet",
                        "--out", "o"], capture_output=True, text=True, timeout=300, cwd=work, env=ENV)
    seconds = time.time() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    growth = float(p.stderr.split("peak-growth-MB")[1].split()[0])
    assert seconds < 60, seconds
    assert growth < 300, f"peak memory grew by {growth:.0f} MB for a {BIG_MB} MB calibration file"


# -- exits: pipes, Ctrl-C, bugs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tiny_dir, tmp_path_factory):
    from unify.build import BuildOptions, build

    return str(build(tiny_dir("mixtral"), BuildOptions(out=str(tmp_path_factory.mktemp("ck") / "mixtral-w2"), way=2,
                                                       grouping="consecutive", merge="average", progress=False)))


def _pipe(argv: list[str], reader: list[str]) -> tuple[int, str, str]:
    """`python -m unify ARGV | READER` through a real pipe: (unify's exit status, its stderr, the reader's stdout)."""
    u = subprocess.Popen([sys.executable, "-m", "unify", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=ENV)
    r = subprocess.Popen(reader, stdin=u.stdout, stdout=subprocess.PIPE)
    u.stdout.close()  # only the reader holds the read end now: when it exits, unify's writes fail with EPIPE
    shown = r.communicate(timeout=120)[0].decode()
    err = u.stderr.read().decode()
    return u.wait(timeout=120), err, shown


@pytest.mark.parametrize("what", ["recipes", "checkpoint"])
@pytest.mark.parametrize("reader", [["head", "-1"], ["true"]], ids=["head-1", "reader-gone"])
def test_inspect_into_a_closed_pipe_exits_quietly(checkpoint, what, reader):
    """`unify inspect ... | head -1`; `true` reads nothing and exits at once, so unify always meets the broken pipe."""
    argv = ["inspect", "--recipes"] if what == "recipes" else ["inspect", checkpoint]
    rc, err, shown = _pipe(argv, reader)
    assert err == "", err  # no traceback, no "Exception ignored ... BrokenPipeError"
    if reader == ["true"]:
        assert rc == 2
    else:
        assert rc in (0, 2) and len(shown.splitlines()) == 1
        assert shown.startswith("deepseek_v2" if what == "recipes" else "base model")


def test_interrupt_is_one_line_and_130(tiny_dir, work, monkeypatch, capsys):
    import dataclasses

    from unify.merge import MERGES

    def interrupted(w, ctx):
        raise KeyboardInterrupt

    monkeypatch.setitem(MERGES.methods, "average", dataclasses.replace(MERGES.get("average"), fn=interrupted))
    before = snapshot(work)
    rc, err = run_cli(capsys, ["build", "--model", tiny_dir("mixtral"), "--way", "2", "--merge", "average",
                               "--skip-layers", "", "--quiet", "--out", "o"])
    assert rc == 130 and err.strip() == "unify: interrupted; nothing was written", err
    assert snapshot(work) == before


def test_a_bug_keeps_its_traceback(tiny_dir, work, monkeypatch):
    """Only user-facing errors become one line: anything else is a bug and must show where it happened."""
    import dataclasses

    from unify.merge import MERGES

    def buggy(w, ctx):
        raise RuntimeError("a bug in a merge")

    monkeypatch.setitem(MERGES.methods, "average", dataclasses.replace(MERGES.get("average"), fn=buggy))
    with pytest.raises(RuntimeError, match="a bug in a merge"):
        main(["build", "--model", tiny_dir("mixtral"), "--way", "2", "--merge", "average", "--skip-layers", "",
              "--quiet", "--out", "o"])


# -- unify eval -------------------------------------------------------------------------------------------------------
def _eval_other_model(checkpoint, work, monkeypatch, capsys) -> tuple[int, str]:
    from unify.evaluate import Evaluator

    def must_not_run(self):
        raise AssertionError("the base evaluation ran before the checkpoint was checked against the model")

    monkeypatch.setattr(Evaluator, "run", must_not_run)
    return run_cli(capsys, ["eval", "--model", "reference", "--united", checkpoint, "--tasks", "brownout_cont",
                            "--limit", "2", "--out", "report"])


def test_eval_refuses_a_checkpoint_of_another_model_before_evaluating(checkpoint, work, monkeypatch, capsys):
    before = snapshot(work)
    rc, err = _eval_other_model(checkpoint, work, monkeypatch, capsys)
    errors = [line for line in err.splitlines() if line.startswith("unify: error:")]
    assert rc == 2 and len(errors) == 1 and "mixtral-w2 was built from another model" in errors[0], err
    assert "Traceback" not in err
    assert snapshot(work) == before


@pytest.mark.parametrize("flags, words", [
    (["--limit", "-1"], "--limit -1 is out of range"),
    (["--batch-size", "0"], "--batch-size 0 is out of range"),
    (["--num-fewshot", "-2"], "--num-fewshot -2 is out of range"),
    (["--device", "bogus"], "--device 'bogus' is not a device"),
    (["--dtype", "float8"], "invalid choice: 'float8'"),
])
def test_eval_bad_values_refused_before_the_model_loads(work, monkeypatch, capsys, flags, words):
    from unify import evaluate

    def must_not_load(*a, **k):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(evaluate, "Evaluator", must_not_load)
    before = snapshot(work)
    rc, err = run_cli(capsys, ["eval", "--model", "reference", "--tasks", "brownout_cont", "--out", "report", *flags])
    assert_refused(rc, err, words)
    assert snapshot(work) == before


def test_eval_refuses_a_checkpoint_of_another_model_in_one_line(checkpoint, work, monkeypatch, capsys):
    rc, err = _eval_other_model(checkpoint, work, monkeypatch, capsys)
    assert_refused(rc, err, "mixtral-w2 was built from another model")


def test_eval_schedule_needs_one_checkpoint_and_an_existing_file(work, capsys):
    rc, err = run_cli(capsys, ["eval", "--model", "reference", "--united", "a", "b", "--schedule", "s.json",
                               "--tasks", "brownout_cont", "--out", "report"])
    assert_refused(rc, err, "--schedule needs exactly one --united checkpoint")
    rc, err = run_cli(capsys, ["eval", "--model", "reference", "--united", "a", "--schedule", "missing.json",
                               "--tasks", "brownout_cont", "--out", "report"])
    assert_refused(rc, err, "--schedule missing.json: no such file")
