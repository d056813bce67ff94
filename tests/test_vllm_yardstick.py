"""eval/vllm_yardstick.py: the extraction from a wheel, vLLM's alignment and config choice restated in PyTorch, and
(where a vLLM kernel has been extracted to .vendor/vllm, or BROWNOUT_VLLM_VENDOR names a folder) its call under the
Triton interpreter against the slab reference."""
import json
import os
import zipfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from eval import vllm_yardstick as vy

FAKE_SRC = '''import triton
import triton.language as tl


def not_taken():
    pass


@triton.jit
def write_zeros_to_output(c_ptr, n):
    pass


@triton.jit
def fused_moe_kernel(
    a_ptr,
):
    write_zeros_to_output(a_ptr, 0)
'''


def fake_wheel(tmp_path, src=FAKE_SRC):
    whl = tmp_path / "vllm-0.0.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        if src is not None:
            z.writestr(vy.KERNEL_SRC, src)
        z.writestr(vy.CONFIG_DIR + "E=8,N=64,device_name=NVIDIA_H200.json", json.dumps({"1": {"BLOCK_SIZE_M": 16}}))
        z.writestr(vy.CONFIG_DIR + "E=8,N=64,device_name=NVIDIA_H200,dtype=fp8_w8a8.json", "{}")
        z.writestr(vy.CONFIG_DIR + "E=8,N=64,device_name=AMD_Instinct_MI300X.json", "{}")
    return whl


def test_extract_writes_the_two_jit_functions_and_the_bf16_nvidia_configs(tmp_path):
    src = vy.extract(fake_wheel(tmp_path), tmp_path / "v")
    text = (tmp_path / "v" / vy.KERNEL_FILE).read_text()
    assert "not_taken" not in text
    assert text.index("def write_zeros_to_output") < text.index("def fused_moe_kernel")
    assert text.count("@triton.jit") == 2
    compile(text, "k.py", "exec")  # a module that parses
    assert sorted(p.name for p in (tmp_path / "v" / "configs").iterdir()) == ["E=8,N=64,device_name=NVIDIA_H200.json"]
    assert src["configs"] == 1 and json.loads((tmp_path / "v" / "SOURCE.json").read_text())["sha256"] == src["sha256"]
    assert not (tmp_path / "v.part").exists()


def test_extract_refuses_a_folder_with_files_and_leaves_nothing_on_a_bad_wheel(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        vy.extract(fake_wheel(tmp_path), tmp_path / "full")
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="no vllm/"):
        vy.extract(fake_wheel(tmp_path, src=None), tmp_path / "new")
    with pytest.raises(ValueError, match="fused_moe_kernel"):
        vy.extract(fake_wheel(tmp_path, src="def other():\n    pass\n"), tmp_path / "new")
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.part").exists()


def test_extract_cli_gives_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        vy.main(["extract", str(tmp_path / "missing.whl"), str(tmp_path / "v")])
    assert "no wheel at" in capsys.readouterr().err


def loop_align(ids, block_m, E):
    """The alignment by a plain loop: per expert its slots in slot order, padded with the sentinel."""
    flat = ids.reshape(-1).tolist()
    out, experts = [], []
    for e in range(E):
        slots = [s for s, v in enumerate(flat) if v == e]
        slots += [len(flat)] * (-len(slots) % block_m)
        out += slots
        experts += [e] * (len(slots) // block_m)
    return out, experts


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_align_matches_a_loop_and_leaves_skipped_slots_out(block_m):
    g = torch.Generator().manual_seed(block_m)
    E = 7
    ids = torch.randint(0, E + 1, (9, 3), generator=g)  # E = a skipped slot
    sorted_ids, expert_ids, npp = vy.align(ids, block_m, E)
    want, want_experts = loop_align(ids, block_m, E)
    n = int(npp)
    assert n == len(want) and sorted_ids[:n].tolist() == want
    assert (sorted_ids[n:] == ids.numel()).all()
    assert sorted_ids.numel() == ids.numel() + E * (block_m - 1)
    assert expert_ids[:n // block_m].tolist() == want_experts
    assert expert_ids.numel() == -(-sorted_ids.numel() // block_m)


def test_pick_config_takes_the_nearest_key_else_the_default(tmp_path):
    (tmp_path / "configs").mkdir()
    table = {"1": {"BLOCK_SIZE_M": 16}, "64": {"BLOCK_SIZE_M": 64}, "256": {"BLOCK_SIZE_M": 128},
             "triton_version": "3.4"}
    (tmp_path / "configs" / vy.config_file_name(8, 64, "NVIDIA H200")).write_text(json.dumps(table))
    assert vy.pick_config(tmp_path, 8, 64, 100, "NVIDIA H200") == ({"BLOCK_SIZE_M": 64},
                                                                   "E=8,N=64,device_name=NVIDIA_H200.json[64]")
    assert vy.pick_config(tmp_path, 8, 64, 4096, "NVIDIA H200")[0] == {"BLOCK_SIZE_M": 128}
    cfg, where = vy.pick_config(tmp_path, 60, 64, 32, "NVIDIA H200")
    assert where == "default" and cfg["BLOCK_SIZE_M"] == 16  # M <= E
    assert vy.pick_config(tmp_path, 60, 64, 512, "NVIDIA H200")[0]["BLOCK_SIZE_M"] == 64


VENDOR = Path(os.environ.get("BROWNOUT_VLLM_VENDOR", Path(__file__).parents[1] / ".vendor" / "vllm"))


@pytest.mark.skipif(not (VENDOR / vy.KERNEL_FILE).is_file(), reason="no extracted vLLM kernel (see the module doc)")
@pytest.mark.parametrize("ratio", [0.0, 1.0])
@pytest.mark.parametrize("block_m", [4, 16])
def test_vllm_call_matches_the_slab_reference(ratio, block_m):
    pytest.importorskip("triton")
    from eval.bench_kernel import relerr, slab_reference
    from runtime import policy

    g = torch.Generator().manual_seed(0)
    E, k, H, I, T, G = 6, 2, 64, 32, 5, 3
    dt = torch.float16  # bf16 is garbage under the interpreter
    gu = (torch.randn(E + G, 2 * I, H, generator=g) * 0.1).to(dt)
    dn = (torch.randn(E + G, H, I, generator=g) * 0.1).to(dt)
    x = torch.randn(T, H, generator=g).to(dt)
    w, idx = torch.randn(T, E, generator=g).softmax(-1).topk(k, -1)
    a = policy.remap(idx, (w / w.sum(-1, keepdim=True)).to(dt), torch.arange(E) // 2, G, ratio)
    ref = slab_reference(gu, dn, x, a.ids, a.weights)
    cfg = {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 32, "GROUP_SIZE_M": 2}
    call = vy.VllmCall(vy.load_kernel(VENDOR), x, gu, dn, a.ids, a.weights, E + G, cfg)
    assert relerr(call.full(), ref) < 2e-3


def test_extract_removes_its_own_half_written_folder_on_failure(tmp_path, monkeypatch):
    real = Path.write_bytes

    def fail(self, data):
        if self.suffix == ".json":
            raise OSError("disk full")
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", fail)
    with pytest.raises(OSError, match="disk full"):
        vy.extract(fake_wheel(tmp_path), tmp_path / "v")
    assert not (tmp_path / "v").exists() and not (tmp_path / "v.part").exists()


def test_the_table_names_where_vllm_is_faster(tmp_path):
    def row(T, ratio, ours, vllm, noremap=None):
        r = {"shape": "olmoe-1b-7b", "tokens": T, "way": 2, "ratio": ratio, "limit_ms": 0.05, "ours_ms": ours,
             "ours_pct": 5 / ours, "vllm_ms": vllm, "vllm_pct": 5 / vllm, "vllm_config_from": "default",
             "ours_relerr": 1e-3, "vllm_relerr": 1e-3}
        if noremap:
            r.update(ours_noremap_ms=noremap, ours_noremap_pct=5 / noremap)
        return r

    res = {"device": "GPU", "torch": "t", "triton": "tr", "vllm": {"wheel": "vllm.whl"}, "routing_seed": 0,
           "flush": "read", "copy_bw_TBps": 4.0, "bf16_TFLOPs": 800.0,
           "rows": [row(8, 0.0, 0.10, 0.12), row(8, 1.0, 0.10, 0.09, noremap=0.08)]}
    vy.write_md(res, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "| olmoe-1b-7b | 8 | 2 | 1 | 0.0500 | 0.1000 (50) | 0.0900 (56) | 0.90 | 0.0800 (62) |" in text
    assert "vLLM faster at 1: olmoe-1b-7b T=8 w2 r1 (0.90)." in text
    assert "against ours without the remap (1 calls): vLLM faster at 0." in text
    pytest.importorskip("matplotlib")
    vy.plot(dict(res, rows=res["rows"] + [dict(res["rows"][0], way=4, ratio=1.0)]), tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000
