"""Merge methods on synthetic experts: exactness on easy groups, that data-driven methods earn their cost, and the
typed parameters every method declares."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from unify import merge
from unify.calib_data import LayerCalibration
from runtime.errors import BrownoutError
from runtime.layout import expert, output
from unify.merge import MergeContext

E, H, I, N, TOPK = 8, 16, 12, 256, 2


def glu(g, u):
    return F.silu(g) * u


def make_canon(bias: bool, seed: int = 0, n: int = E) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {"gate": torch.randn(n, I, H, generator=g) / H**0.5, "up": torch.randn(n, I, H, generator=g) / H**0.5,
         "down": torch.randn(n, H, I, generator=g) / I**0.5}
    if bias:
        w.update(gate_bias=0.1 * torch.randn(n, I, generator=g), up_bias=0.1 * torch.randn(n, I, generator=g),
                 down_bias=0.1 * torch.randn(n, H, generator=g))
    return w


def make_calib(seed: int = 1, n_rows: int = N, probs=None) -> LayerCalibration:
    """Random tokens routed top-k by a random linear router (so routing depends on x, as in a model), skewed by a
    prior `probs` over experts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_rows, H, generator=g)
    probs = torch.linspace(2.0, 1.0, E) if probs is None else torch.as_tensor(probs, dtype=torch.float)
    logits = x @ torch.randn(H, E, generator=g) / H**0.5 + probs.log()
    top, idx = logits.topk(TOPK, -1)
    wts = torch.softmax(top, -1)
    freq = torch.bincount(idx.flatten(), minlength=E).float()
    score = torch.zeros(E).index_add_(0, idx.flatten(), wts.flatten())
    return LayerCalibration(freq=freq, score_sum=score, x=x, topk_idx=idx, topk_w=wts, tokens=n_rows)


def stack(canon, members):
    return {k: v[members].clone() for k, v in canon.items()}


def ctx_for(members, calib, method: str | None = None, **params):
    """A context for `method` with these parameters (the method's defaults for the rest)."""
    typed = merge.get(method).make_params(params) if method else None
    return MergeContext(members=list(members), glu=glu, calib=calib, params=typed)


def run(method, w, members, calib, **params):
    """(united, the context's report) of `method` on the stacked group w."""
    ctx = ctx_for(members, calib, method, **params)
    return merge.get(method).fn(w, ctx), ctx.report


def short(method: str) -> dict:
    """Few steps for the training merges, nothing for the others."""
    return {"steps": 20} if "steps" in merge.get(method).param_types() else {}


def routed_error(united, w, members, calib) -> float:
    """The routing-weight-free error a united expert makes on the calibration tokens routed to its members."""
    err, count = 0.0, 0
    for k, m in enumerate(members):
        xm, _ = calib.routed(m)
        err += float((output(united, xm, glu) - output(expert(w, k), xm, glu)).square().sum())
        count += xm.shape[0]
    return err / count


def assert_expert_close(a, b, atol=1e-4):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == torch.float32, k
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


BIAS = pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])


def test_registry():
    assert set(merge.names()) >= {"average", "frequency", "activation", "distill", "distill-routed"}
    assert {n for n in merge.names() if merge.get(n).needs_data} >= {"frequency", "activation", "distill",
                                                                     "distill-routed"}
    assert not merge.get("average").needs_data
    with pytest.raises(BrownoutError, match="methods: .*average"):
        merge.get("nope")


def test_params_are_typed_and_checked():
    from unify.merge.distill import DistillParams

    distill = merge.get("distill")
    assert distill.make_params(None) == DistillParams(steps=200, lr=1e-3, init="activation", holdout=0.2)
    # text from the command line and Python values give the same parameters
    text = distill.make_params({"steps": "300", "lr": "1e-2", "init": "average", "holdout": "0"})
    assert text == distill.make_params({"steps": 300, "lr": 0.01, "init": "average", "holdout": 0})
    assert text.steps == 300 and text.holdout == 0.0 and isinstance(text.holdout, float)
    assert merge.get("activation").make_params({"align": "false"}).align is False
    bad = [({"stepz": "3"}, "unknown merge parameter 'stepz'"), ({"steps": "1.5"}, "steps='1.5': expected int"),
           ({"init": "median"}, "expected activation|average|frequency"), ({"lr": "-1"}, "lr=-1.0 must be > 0"),
           ({"holdout": 1}, "holdout=1.0 must be in [0, 1)"), ({"steps": True}, "expected int")]
    for given, needle in bad:
        with pytest.raises(BrownoutError) as e:
            distill.make_params(given)
        msg = str(e.value)
        assert needle in msg and "\n" not in msg, msg
        assert "steps=200 (int), lr=0.001 (float), init=activation (activation|average|frequency)" in msg, msg
    with pytest.raises(BrownoutError, match="takes: no parameters"):
        merge.get("average").make_params({"steps": 3})
    assert merge.get("average").make_params({}) == merge.get("average").params()
    for name in merge.names():  # every method's parameters are frozen: a build's request cannot change under it
        p = merge.get(name).make_params(None)
        for f in dataclasses.fields(p):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(p, f.name, getattr(p, f.name))


@BIAS
def test_consecutive_average_is_exact_mean(bias):
    from unify.grouping import consecutive

    canon = make_canon(bias)
    groups = consecutive(canon, None, glu, 4, 0)
    assert groups == [[0, 1], [2, 3], [4, 5], [6, 7]]
    for g in groups:
        united, _ = run("average", stack(canon, g), g, None)
        assert_expert_close(united, {k: (v[g[0]] + v[g[1]]) / 2 for k, v in canon.items()}, atol=1e-6)


@BIAS
@pytest.mark.parametrize("method", ["average", "frequency", "activation", "distill", "distill-routed"])
def test_identical_experts_merge_back(method, bias):
    canon, calib = make_canon(bias), make_calib()
    members = [0, 2, 5, 7]
    w = {k: v[3].expand(len(members), *v.shape[1:]).clone() for k, v in canon.items()}
    united, _ = run(method, w, members, calib, **short(method))
    assert_expert_close(united, expert(canon, 3))


def permuted_copies(canon, j, k, seed=5):
    """k copies of expert j, each with its hidden neurons in another random order (the same function)."""
    g = torch.Generator().manual_seed(seed)
    w = {key: [] for key in canon}
    for c in range(k):
        p = torch.arange(I) if c == 0 else torch.randperm(I, generator=g)
        for key, v in canon.items():
            t = v[j]
            w[key].append(t[:, p] if key == "down" else t if key == "down_bias" else t[p])
    return {key: torch.stack(v) for key, v in w.items()}


@BIAS
def test_activation_recovers_neuron_permutations(bias):
    canon, calib = make_canon(bias), make_calib()
    members = [4, 1, 6, 3]
    centre = int(calib.freq[members].argmax())  # the most used member: the one the others are aligned to
    w = permuted_copies(canon, 2, len(members))
    order = [centre] + [k for k in range(len(members)) if k != centre]
    w = {k: v[torch.argsort(torch.tensor(order))] for k, v in w.items()}  # the unpermuted copy sits at the centre
    united, _ = run("activation", w, members, calib)
    assert_expert_close(united, expert(canon, 2))
    # while plain averaging of the same function blurs it
    avg, _ = run("average", w, members, calib)
    assert routed_error(avg, w, members, calib) > 1e-3


def test_activation_params_switch_its_steps_off():
    canon, calib = make_canon(True, seed=3), make_calib()
    members = [2, 5, 6, 7]
    w = stack(canon, members)
    plain, report = run("activation", w, members, calib, align=False, refit=False)
    assert_expert_close(plain, run("frequency", w, members, calib)[0], atol=1e-6)  # no alignment, no refit
    assert "ridge" not in report
    full, report = run("activation", w, members, calib)
    assert "ridge" in report and routed_error(full, w, members, calib) < routed_error(plain, w, members, calib)


@BIAS
def test_activation_beats_average_on_calibration_error(bias):
    canon, calib = make_canon(bias, seed=3), make_calib()
    for members in ([0, 1], [2, 5, 6, 7]):
        w = stack(canon, members)
        err = {m: routed_error(run(m, w, members, calib)[0], w, members, calib)
               for m in ("average", "frequency", "activation")}
        assert err["activation"] < 0.9 * min(err["average"], err["frequency"]), err


@BIAS
@pytest.mark.parametrize("method", ["distill", "distill-routed"])
@pytest.mark.parametrize("init", ["activation", "average", "frequency"])
def test_distill_lowers_its_loss(method, init, bias):
    # related members (one expert plus noise), as grouping makes them: something a student can learn and generalise
    base, noise, calib = make_canon(bias, seed=4, n=1), make_canon(bias, seed=5), make_calib(n_rows=1024)
    members = [1, 2, 6, 7]
    w = {k: base[k] + 0.5 * noise[k][members] for k in base}
    united, p = run(method, w, members, calib, steps=60, lr=1e-2, init=init)
    assert ("ridge" in p) == (init == "activation") and p["val_rows"] > 0 and not p["all_rows"]
    assert p["loss_final"] < p["loss_init"] and p["val_final"] < p["val_init"] and p["best_step"] > 0, p
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in united.values())
    again, _ = run(method, w, members, calib, steps=60, lr=1e-2, init=init)
    assert_expert_close(united, again, atol=0)  # deterministic for a seed


def test_distill_routed_favours_the_used_member():
    canon = make_canon(False, seed=6)
    calib = make_calib(probs=[50, 1, 1, 1, 1, 1, 1, 1])  # expert 0 takes nearly all of the group's tokens
    members = [0, 1]
    w = stack(canon, members)
    errs = {}
    for method in ("distill", "distill-routed"):
        u, _ = run(method, w, members, calib, steps=100, lr=1e-2)
        xm, _ = calib.routed(0)
        errs[method] = float((output(u, xm, glu) - output(expert(w, 0), xm, glu)).square().mean())
    assert errs["distill-routed"] < errs["distill"], errs


@BIAS
def test_few_routed_rows_fall_back_to_all_rows(bias):
    canon = make_canon(bias)
    calib = make_calib(probs=[1, 1, 1, 1, 1, 1, 1e-9, 1e-9])  # experts 6 and 7 (almost) never chosen
    members = [6, 7]
    w = stack(canon, members)
    for method in ("frequency", "activation", "distill", "distill-routed"):
        united, report = run(method, w, members, calib, **short(method))
        assert all(torch.isfinite(v).all() for v in united.values()), method
    assert report["all_rows"] and report["rows"] == N


@pytest.mark.parametrize("method", ["frequency", "activation", "distill", "distill-routed"])
def test_data_methods_need_calibration(method):
    canon = make_canon(False)
    with pytest.raises(BrownoutError, match="calibration"):
        run(method, stack(canon, [0, 1]), [0, 1], None)


def test_frequency_weights():
    canon, calib = make_canon(True), make_calib()
    members = [0, 7]
    f = calib.freq[members] / calib.freq[members].sum()
    united, _ = run("frequency", stack(canon, members), members, calib)
    assert_expert_close(united, {k: f[0] * v[0] + f[1] * v[7] for k, v in canon.items()}, atol=1e-6)


def test_refit_down_does_not_interpolate_few_tokens(monkeypatch):
    from unify.merge import activation as act

    united = expert(make_canon(True, seed=7), 0)
    g = torch.Generator().manual_seed(8)
    teacher = dict(united, down=united["down"] + 0.1 * torch.randn(united["down"].shape, generator=g))

    def data(n):  # the teacher's outputs, plus noise no expert could predict
        x = torch.randn(n, H, generator=g)
        return x, output(teacher, x, glu) + 0.5 * torch.randn(n, H, generator=g)

    (x, y), (xt, yt) = data(2 * I), data(2000)  # barely more tokens than the I + 1 unknowns per output

    def heldout():
        fit, rel = act.refit_down(united, x, y, torch.ones(len(x)), glu)
        return float((output(fit, xt, glu) - yt).square().mean()), rel

    err, rel = heldout()
    monkeypatch.setattr(act, "RIDGE_GRID", [1e-8])
    err_tiny, _ = heldout()
    assert rel > 1e-3 and err < err_tiny, (err, err_tiny, rel)
