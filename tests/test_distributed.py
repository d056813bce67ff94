"""Brownout under transformers' tensor and expert parallelism: 2 gloo processes on CPU.

The sharded models are transformers' own: `from_pretrained(tp_plan="auto")` (experts sharded on I, moe_tp_experts
all-reduce) and `DistributedConfig(tp_size=2, ep_size=2)` (experts sharded by expert; dispatch by AutoEP -> all-reduce,
and by `ep_implementation="all_to_all"`, the token exchange). EP runs with owner placement and all-replicated. Each
worker checks, against the single-process model and single-process BrownoutMoE computed here:
  ratio 0  -> bit for bit the sharded model without brownout, and allclose to the single-process model (the sharded
              model itself differs from one process by the order of its all-reduce sums, ~1e-7);
  ratio 1, 0.5, drop -> allclose to the single-process brownout result at the same ratio/policy;
  detach   -> bit for bit the sharded model again.
  triton   -> the fused kernel (Triton's interpreter) over this rank's slabs, TP slices and EP local slabs alike:
              allclose at every case; in graph-safe mode ratio 0 runs it on every united layer too.
With BROWNOUT_OLD_TRANSFORMERS set (.ci/run sets it), the same checks also run on transformers 5.17, whose expert
parallelism is `enable_expert_parallel` with an `ep_router` (runtime.placement.expert_parallel's "ep-router" mode; no
all-to-all).
"""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch

from conftest import FAST, make_tiny
from dist_worker import CASES, worker
from runtime.placement import EPPlacement, ep_ids, place_united, token_ranks

FAMILY = "qwen3_moe"
# the oldest transformers we support, installed with `pip install --target` (.ci/run does): its expert parallelism
# predates `ep_size` and dispatch rules (`enable_expert_parallel`, an `ep_router` slicing the routing)
OLD_TRANSFORMERS = os.environ.get("BROWNOUT_OLD_TRANSFORMERS")
MODES = {"installed": ["tp", "ep", "a2a"], "old": ["tp", "ep"]}


# -- placement logic (no processes) ------------------------------------------------------------------------------------
def test_place_united_majority_owner_balance_and_replicas():
    # 8 experts on 2 ranks (0-3 | 4-7); groups: {0,1} {2,5} {4,6} {3,7}
    e2g = [0, 0, 1, 3, 2, 1, 2, 3]
    pl = place_united(e2g, 2, replicate="none")
    assert pl.owner[0] == 0 and pl.owner[2] == 1  # majority rank
    assert sorted(pl.owner[g] for g in (1, 3)) == [0, 1]  # tied groups go to the least-loaded rank
    assert [len(l) for l in pl.local] == [2, 2] and pl.local_slabs == 6
    pl = place_united(e2g, 2, replicate=0.5)  # 0.5 * 4 local experts = 2 replica slots: both tied groups
    assert pl.owner == [0, -1, 1, -1] and pl.local == [[0, 1, 3], [1, 2, 3]] and pl.members_on_owner() == 1.0
    pl = place_united(e2g, 2, replicate="all")
    assert pl.owner == [-1] * 4 and pl.local_slabs == 8
    with pytest.raises(ValueError, match="split evenly"):
        place_united([0, 0, 1], 2)
    with pytest.raises(ValueError, match="replicate"):
        place_united(e2g, 2, replicate="some")


def test_ep_ids_translate_every_slab_to_its_rank():
    e2g = [0, 0, 1, 3, 2, 1, 2, 3]
    pl = place_united(e2g, 2, replicate=0.5)
    rank_of, pos = pl.tables("cpu")
    E, G, L = 8, 4, pl.local_slabs
    ids = torch.tensor([[0, 5], [E + 0, E + 2], [E + 1, E + G], [7, E + 3]])
    w = torch.ones(4, 2)
    out, w2 = ep_ids(ids, w, rank_of, pos, L, E + G, token_ranks(4, 2, None, "cpu"))
    # original 5 = rank 1 local 1; united 0 on rank 0 at local 4; united 2 on rank 1 at local 4 + index in [1, 2, 3]
    assert out[0].tolist() == [0, L + 1]
    assert out[1].tolist() == [4, L + 4 + 1]
    # token 2 is in rank 1's row chunk: replicated united 1 and the skipped slot (weight 0) stay on rank 1
    assert out[2].tolist() == [L + 4 + 0, L + 0] and w2[2].tolist() == [1.0, 0.0]
    assert out[3].tolist() == [L + 3, L + 4 + 2]
    assert isinstance(pl, EPPlacement)


# -- 2 gloo processes --------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=["installed", "old"])
def distributed_reports(request, tmp_path_factory):
    if request.param == "old" and not OLD_TRANSFORMERS:
        pytest.skip("BROWNOUT_OLD_TRANSFORMERS (a folder with transformers 5.17 installed by pip --target) is not set")
    from runtime import BrownoutMoE
    from unify.build import BuildOptions, build

    work = tmp_path_factory.mktemp("dist")
    model = make_tiny(FAMILY)
    model.save_pretrained(work / "model")
    from conftest import load

    model = load(str(work / "model"))
    build(str(work / "model"), BuildOptions(out=str(work / "united"), **{**FAST, "way": 2, "grouping": "similarity",
                                                                          "merge": "activation"}))
    x = torch.randint(0, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    ref = {"x": x}
    with torch.no_grad():
        ref["ref0"] = model(x).logits
        bm = BrownoutMoE.attach(model, str(work / "united"))
        for policy, ratio in CASES:
            bm.set_policy("drop" if policy == "drop" else "hot-cold")
            bm.set_ratio(ratio)
            ref[f"{policy}{ratio}"] = model(x).logits
    torch.save(ref, work / "ref.pt")

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = [root, os.path.join(root, "tests")]
    if request.param == "old":
        paths.insert(0, OLD_TRANSFORMERS)
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(r, 2, port, str(work), paths, MODES[request.param])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    reports = [json.loads((work / f"report{r}.json").read_text()) for r in range(2)]
    for rep in reports:
        assert "error" not in rep, rep.get("error")
    if request.param == "old":
        assert reports[0]["transformers"].startswith("5.17"), reports[0]["transformers"]
    return request.param, reports


@pytest.mark.parametrize("tag", ["tp/auto", "ep/none", "ep/all", "a2a/none", "a2a/all"])
def test_sharded_brownout_matches_single_process(distributed_reports, tag):
    which, reports = distributed_reports
    if tag.split("/")[0] not in MODES[which]:
        pytest.skip(f"transformers {reports[0]['transformers']} has no all-to-all expert parallelism")
    mode = tag.split("/")[0].replace("a2a", "ep")
    if which == "old" and mode == "ep":
        mode = "ep-router"
    for rank, rep in enumerate(reports):
        r = rep[tag]
        assert r["kind"] == "BrownoutMoE" and r["mode"] == [mode], r
        assert r["backend"] == "reference", r  # "auto" on CPU (the interpreter only when asked for by name)
        assert r["triton"] == "accepted", r  # the fused kernel over this rank's slabs: TP slices, EP local slabs
        for policy, ratio in CASES:
            assert r[f"triton_{policy}{ratio}_err"] < 2e-5, (rank, tag, policy, ratio, r)
        # graph-safe ratio 0 runs the kernel on every united layer, and matches the model; then follows set_ratio
        assert r["triton_graph_safe0_kernel_calls"] == r["united_layers"], r
        assert r["triton_graph_safe0_err"] < 2e-5 and r["triton_graph_safe1_err"] < 2e-5, r
        assert r["ratio0_equal_sharded"], f"rank {rank}: ratio 0 is not the sharded model bit for bit"
        assert r["ratio0_err_single"] < 1e-5, r
        for policy, ratio in CASES:
            assert r[f"{policy}{ratio}_err"] < 2e-5, (rank, tag, policy, ratio, r)
        assert r["grouped1.0_err"] < 2e-5, r
        assert r["ratio1.0_differs_from_base"], r
        assert r["detach_equal_sharded"], r
    if tag.startswith("tp") and which == "installed":  # 5.24+ shard the experts (gate_up: _StridedShard)
        for rep in reports:
            assert rep["gather_by_index"] and all(same for _, same in rep["gather_by_index"].values()), rep
    if not tag.startswith("tp"):
        assert reports[0][tag]["owner"] == reports[1][tag]["owner"]
