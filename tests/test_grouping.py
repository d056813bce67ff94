"""Grouping methods: equal partitions, determinism, near-duplicate recovery, and the --way/--groups checks."""
import pytest
import torch

from unify import grouping
from runtime.errors import BrownoutError
from test_merge import E, N, glu, make_calib, make_canon

METHODS = ["consecutive", "frequency", "similarity"]


def test_registry():
    assert grouping.names() == sorted(METHODS)
    assert {n for n in METHODS if grouping.get(n).needs_data} == {"frequency", "similarity"}
    with pytest.raises(BrownoutError, match="methods: consecutive, frequency, similarity"):
        grouping.get("nope")
    assert grouping.get("consecutive").describe_params() == "no parameters"
    with pytest.raises(BrownoutError, match="unknown grouping parameter 'sample_rows'; .*no parameters"):
        grouping.get("consecutive").make_params({"sample_rows": "8"})
    with pytest.raises(BrownoutError, match=r"sample_rows=0 must be >= 1; .*sample_rows=512 \(int\)"):
        grouping.get("similarity").make_params({"sample_rows": "0"})


@pytest.mark.parametrize("method", ["frequency", "similarity"])
def test_sample_rows_param(method, monkeypatch):
    """sample_rows bounds the tokens the experts are compared on, and a small sample still finds the pairs."""
    seen = []
    real = grouping.output

    def spy(w, x, glu):
        seen.append(x.shape[0])
        return real(w, x, glu)

    monkeypatch.setattr(grouping, "output", spy)
    entry = grouping.get(method)
    calib = make_calib(probs=[8, 7, 6, 1, 5, 1, 1, 1])
    assert entry.fn(near_duplicate_pairs(), calib, glu, 4, 0, entry.make_params({"sample_rows": "64"})) == PAIRS
    assert set(seen) == {64}
    seen.clear()
    entry.fn(near_duplicate_pairs(), calib, glu, 4, 0)  # the default, 512, is more than the 256 tokens there are
    assert set(seen) == {N}


def test_partition_sizes():
    assert grouping.partition_sizes(8) == [1, 2, 4, 8]
    assert grouping.partition_sizes(12) == [1, 2, 3, 4, 6, 12]
    assert grouping.partition_sizes(1) == [1]


def test_check_partition():
    assert grouping.check_partition(8, way=2) == 4
    assert grouping.check_partition(8, groups=2) == 2
    assert grouping.check_partition(60, way=60) == 1
    with pytest.raises(BrownoutError) as e:
        grouping.check_partition(8, way=3)
    assert str(e.value) == "--way 3 does not partition 8 experts; valid --way values: 1, 2, 4, 8"
    msg = r"^--groups 0 does not partition 6 experts; valid --groups values: 1, 2, 3, 6$"
    with pytest.raises(BrownoutError, match=msg):
        grouping.check_partition(6, groups=0)
    for kw in ({}, {"way": 2, "groups": 4}):
        with pytest.raises(BrownoutError, match="exactly one of --way") as e:
            grouping.check_partition(8, **kw)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("method", METHODS)
def test_equal_partitions_deterministic(method, bias):
    canon, calib = make_canon(bias), make_calib()
    fn = grouping.get(method).fn
    for num_groups in grouping.partition_sizes(E):
        groups = fn(canon, calib, glu, num_groups, 0)
        assert len(groups) == num_groups and all(len(g) == E // num_groups for g in groups)
        assert sorted(i for g in groups for i in g) == list(range(E))
        assert all(g == sorted(g) for g in groups) and groups == sorted(groups)
        assert fn(canon, calib, glu, num_groups, 0) == groups
        assert fn(canon, make_calib(), glu, num_groups, 0) == groups  # same data, same seed: same answer


def test_consecutive():
    assert grouping.get("consecutive").fn(make_canon(False), None, glu, 2, 0) == [[0, 1, 2, 3], [4, 5, 6, 7]]


PAIRS = [[0, 5], [1, 3], [2, 7], [4, 6]]


def near_duplicate_pairs(noise=1e-2):
    base = make_canon(True, seed=9, n=4)
    g = torch.Generator().manual_seed(10)
    canon = {k: torch.empty(E, *v.shape[1:]) for k, v in base.items()}
    for p, pair in enumerate(PAIRS):
        for j in pair:
            for k, v in base.items():
                canon[k][j] = v[p] + noise * v[p].std() * torch.randn(v[p].shape, generator=g)
    return canon


@pytest.mark.parametrize("seed", [0, 1])
def test_similarity_recovers_near_duplicates(seed):
    canon = near_duplicate_pairs()
    assert grouping.get("similarity").fn(canon, make_calib(), glu, 4, seed) == PAIRS
    # and with larger groups, pairs stay together
    halves = grouping.get("similarity").fn(canon, make_calib(), glu, 2, seed)
    assert all(any(set(p) <= set(g) for g in halves) for p in PAIRS)


def test_frequency_recovers_near_duplicates():
    canon = near_duplicate_pairs()
    # the first member of every pair is the most used, so the centres are 0, 1, 2, 4
    calib = make_calib(probs=[8, 7, 6, 1, 5, 1, 1, 1])
    assert sorted(torch.argsort(-calib.freq)[:4].tolist()) == [0, 1, 2, 4]
    assert grouping.get("frequency").fn(canon, calib, glu, 4, 0) == PAIRS


@pytest.mark.parametrize("method", ["frequency", "similarity"])
def test_data_methods_need_calibration(method):
    with pytest.raises(BrownoutError, match="needs calibration"):
        grouping.get(method).fn(make_canon(False), None, glu, 4, 0)
