from setuptools import find_packages, setup

setup(
    name="brownout",
    version="0.1.0",
    description="Brownout: united experts and an SLO-aware brownout knob for Mixture-of-Experts models",
    python_requires=">=3.10",
    packages=find_packages(include=["unify", "unify.*", "runtime", "runtime.*", "recipes", "recipes.*", "eval", "eval.*"]),
    include_package_data=True,
    package_data={"recipes": ["*.yaml", "reference/*", "reference/**/*"], "eval": ["tasks/*", "tasks/**/*"]},
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
