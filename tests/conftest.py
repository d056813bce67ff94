"""Shared fixtures: tiny random models of every recipe family, saved with save_pretrained (per-expert on-disk layout)."""
from __future__ import annotations

import os
import warnings

# Triton reads this when it is first imported, and other modules (torch's optimizers, transformers) may import it
# before tests/test_kernels.py does: the kernels run under the interpreter on these CPU-only machines.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")
torch.set_num_threads(1)  # tiny tensors: threads only add contention (and spin badly on a shared 2-core machine)

import recipes  # noqa: E402

FAMILIES = recipes.names()  # every family recipe (the bundled reference model has its own tests)
FAMILIES = [f for f in FAMILIES if recipes.load(f).tiny]


def make_tiny(family: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(recipes.tiny_config(family, **overrides)).eval()
    # random init leaves some families' routers near-uniform; scale them so routing is skewed like a trained model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and p.dim() == 2:
                p.mul_(20.0)
    return model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """family -> directory of a saved tiny model (built once per session)."""
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            d = tmp_path_factory.mktemp(family)
            make_tiny(family).save_pretrained(d)
            cache[family] = str(d)
        return cache[family]

    return get


def load(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


# small calibration, no progress bars, every MoE layer united; the methods are each test's own choice
FAST = dict(calib_tokens=1024, seq_len=64, samples_per_layer=512, progress=False, skip_layers=[])
