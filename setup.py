import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# Read, not imported: importing runtime needs torch, which the build environment does not have.
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "runtime" / "version.py").read_text(), re.M).group(1)

setup(
    name="brownout",
    version=VERSION,
    description="Brownout: united experts and an SLO-aware brownout knob for Mixture-of-Experts models",
    python_requires=">=3.10",
    # eval/ (benchmark scripts) and tests/ run from the checkout and are not installed.
    packages=find_packages(include=["runtime", "runtime.*", "unify", "unify.*", "recipes", "recipes.*"]),
    # Only the data files named here: what the code reads at run time, nothing of the training runs.
    include_package_data=False,
    package_data={
        "runtime.kernels.configs": ["*.json"],  # fused-MoE tile configs, one table per GPU model
        "recipes": [
            "*.yaml",
            "*.txt",  # the default calibration text
            "reference/calib.txt",
            "reference/README.md",  # what the bundled model is, and the licenses of its training corpus
            "reference/SOURCES.md",
            "reference/model/*",  # the bundled model: weights, config, tokenizer
            "reference/tasks/*.yaml",  # its lm-eval tasks: YAML, data, and the tasks' helper module
            "reference/tasks/*.jsonl",
            "reference/tasks/utils.py",
        ],
    },
    install_requires=[
        # torch is pinned by .ci/run and the README (a CPU build on CPU machines); any 2.8+ works.
        "torch>=2.8",
        "transformers>=5.17",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "datasets>=3.0",
        "scikit-learn>=1.4",
        "scipy>=1.11",
        "pyyaml>=6",
        "tqdm>=4.60",
        "numpy>=1.26",
        "matplotlib>=3.7",
    ],
    extras_require={
        "eval": ["lm-eval>=0.4.8"],
        "kernels": ["triton>=3.2"],
        "test": ["pytest>=8", "lm-eval>=0.4.8", "triton>=3.2"],
    },
    entry_points={"console_scripts": ["unify=unify.cli:main"]},
)
