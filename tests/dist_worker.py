"""The 2-process worker of tests/test_distributed.py, in a module of its own: a spawned process imports only this
module before `worker` puts `paths` first on sys.path, so it can run on another transformers than the parent's (the
oldest supported one, from a --target folder). Nothing here may import transformers at module level."""
from __future__ import annotations

import contextlib
import json
import os
import sys

import torch

CASES = [("ratio", 1.0), ("ratio", 0.5), ("drop", 0.5)]


@contextlib.contextmanager
def counting_backend_runs(bm):
    """Count the calls of the united layers' backend `run` (one per layer and forward) inside the block."""
    cls = type(next(iter(bm.layers.values())).backend)
    orig, calls = cls.run, [0]

    def counted(self, *a, **k):
        calls[0] += 1
        return orig(self, *a, **k)

    cls.run = counted
    try:
        yield calls
    finally:
        cls.run = orig


def worker(rank: int, world: int, port: int, work: str, paths: list[str], modes: list[str]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    sys.path[:0] = paths
    import warnings

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    from runtime import BrownoutMoE, expert_parallel_config
    from runtime.errors import BrownoutError

    dist.init_process_group("gloo", rank=rank, world_size=world)
    ref = torch.load(os.path.join(work, "ref.pt"))
    x, udir = ref["x"], os.path.join(work, "united")
    report = {}
    try:
        report["transformers"] = sys.modules["transformers"].__version__
        for mode in modes:
            if mode == "tp":
                model = AutoModelForCausalLM.from_pretrained(os.path.join(work, "model"), tp_plan="auto")
            else:  # ep: AutoEP -> all-reduce dispatch at inference; a2a: the all-to-all token exchange
                impl = "auto" if mode == "ep" else "all_to_all"
                cfg = expert_parallel_config(2, impl)
                model = AutoModelForCausalLM.from_pretrained(os.path.join(work, "model"), distributed_config=cfg)
            model.eval()
            if mode == "tp":  # the by-hand gather (torch 2.11 cannot full_tensor a lone _StridedShard) equals torch's
                from runtime.placement.base import gather_by_index, is_dtensor

                ex = model.model.layers[0].mlp.experts
                report["gather_by_index"] = {
                    k: [str(p.placements), bool(torch.equal(gather_by_index(p), p.full_tensor()))]
                    for k, p in ex.named_parameters() if is_dtensor(p)}
            with torch.no_grad():
                base = model(x).logits
                for replicate in {"tp": ("auto",), "ep": ("none", "all"), "a2a": ("none", "all")}[mode]:
                    tag = f"{mode}/{replicate}"
                    bm = BrownoutMoE.attach(model, udir, replicate=replicate)
                    r = {"kind": type(bm).__name__, "mode": sorted(set(bm.mode.values())), "backend": bm.backend,
                         "united_layers": len(bm.layers)}
                    out = model(x).logits
                    r["ratio0_equal_sharded"] = bool(torch.equal(out, base))
                    r["ratio0_err_single"] = float((out - ref["ref0"]).abs().max())
                    for policy, ratio in CASES:
                        bm.set_policy("drop" if policy == "drop" else "hot-cold")
                        bm.set_ratio(ratio)
                        out = model(x).logits
                        want = ref[f"{policy}{ratio}"]
                        r[f"{policy}{ratio}_err"] = float((out - want).abs().max())
                        r[f"{policy}{ratio}_differs_from_base"] = not torch.equal(out, base)
                    bm.set_policy("hot-cold")
                    bm.set_ratio(1.0)
                    bm.set_backend("grouped")  # transformers' grouped_mm over the local slabs
                    r["grouped1.0_err"] = float((model(x).logits - ref["ratio1.0"]).abs().max())
                    try:  # the fused kernel over this rank's slabs (Triton's interpreter on the CPU: conftest)
                        bm.set_backend("triton")
                        r["triton"] = "accepted"
                    except BrownoutError as e:
                        r["triton"] = str(e)
                    if r["triton"] == "accepted":
                        for policy, ratio in CASES:
                            bm.set_policy("drop" if policy == "drop" else "hot-cold")
                            bm.set_ratio(ratio)
                            r[f"triton_{policy}{ratio}_err"] = float((model(x).logits - ref[f"{policy}{ratio}"])
                                                                   .abs().max())
                        # graph-safe: ratio 0 runs the kernel too (not the model's own forward), same result
                        bm.set_policy("hot-cold")
                        bm.set_ratio(0.0)
                        bm.set_graph_safe(True)
                        with counting_backend_runs(bm) as calls:
                            out = model(x).logits
                        r["triton_graph_safe0_kernel_calls"] = calls[0]
                        r["triton_graph_safe0_err"] = float((out - ref["ref0"]).abs().max())
                        bm.set_ratio(1.0)  # the same mode follows the ratio
                        r["triton_graph_safe1_err"] = float((model(x).logits - ref["ratio1.0"]).abs().max())
                        bm.set_graph_safe(False)
                    bm.set_backend("auto")
                    if mode != "tp":
                        r["owner"] = {i: p.owner for i, p in bm.placement.items()}
                    bm.set_policy("hot-cold")
                    bm.set_ratio(0.0)
                    bm.detach()
                    r["detach_equal_sharded"] = bool(torch.equal(model(x).logits, base))
                    report[tag] = r
            del model
    except Exception as e:  # report it to the parent instead of hanging the other rank
        import traceback

        report["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
    with open(os.path.join(work, f"report{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
