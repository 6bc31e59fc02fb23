"""Loom: a JAX-native research codebase for the whole life of a language model."""

from setuptools import find_packages, setup

PACKAGES = ["configs", "models", "data", "train", "inference", "pallas_kernels", "evals", "rl"]

setup(
    name="loom",
    version="0.1.0",
    description="JAX-native LLM research codebase: pretraining, post-training, inference, evaluation.",
    python_requires=">=3.12",
    packages=find_packages(include=[p for pkg in PACKAGES for p in (pkg, f"{pkg}.*")]),
    install_requires=[
        "jax>=0.11.2",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # needed by tensorflow-datasets (etils.epath) without TensorFlow, undeclared
        "sentencepiece>=0.2.3",  # encode(return_type="offset_mapping")
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "safetensors>=0.4",
        "tensorboardX>=2.6",
        "tqdm>=4.60",
        "matplotlib>=3.7",
        "numpy>=1.26",
        "pyarrow>=14",
        "array-record>=0.5",
        "zstandard>=0.22",
        "datasketch>=1.6",
        "rbloom>=1.5",
        "tokenizers>=0.19",
        "jinja2>=3.1",
        "sacrebleu>=2.3",
        "rouge-score>=0.1.2",
        "fastapi>=0.110",  # inference.serve: the OpenAI-compatible HTTP API
        "uvicorn>=0.29",
        "gguf>=0.19",  # inference.export: GGUF files for llama.cpp / Ollama
    ],
    extras_require={
        # Tests only, never imported by the library: reference implementations (torch, transformers,
        # peft), the `openai` client and llama.cpp the server and GGUF tests talk to, optuna and papermill.
        "test": ["pytest>=8", "pytest-xdist>=3", "torch==2.13.0", "transformers>=4.50", "datasets>=3", "peft>=0.21", "openai>=1.40",
                 "llama-cpp-python>=0.3", "optuna>=3", "papermill>=2.5", "ipykernel>=6"],
        # experiments/: Optuna searches (`python -m experiments.sweep --search=optuna`), the notebooks
        "experiments": ["optuna>=3", "papermill>=2.5", "ipykernel>=6"],
    },
)
