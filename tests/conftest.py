"""Test setup: 8 fake CPU devices (before anything touches JAX) and absl flags marked parsed
(grain worker processes read them)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_executables():
    """Drops JAX's compiled executables after each test module. XLA:CPU maps about 3 memory regions
    per executable and never unmaps them while the executable lives; one process running the whole
    suite reached Linux's default vm.max_map_count (65,530) and crashed inside a later compile
    (a segmentation fault, not an error). Clearing the caches unmaps them."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The default preset, shortened: 30 steps of `tiny` on the embedded corpus (a real run
    directory, made once per test session; tests must not write into it)."""
    from tests.helpers import run_program

    workdir = tmp_path_factory.mktemp("tiny_run")
    run_program("train.pretrain", "--config=configs/pretrain.py:tiny", f"--workdir={workdir}",
                "--config.train.steps=30", "--config.train.eval_every=15", "--config.train.num_samples=2",
                "--config.train.sample_tokens=24")
    return workdir
