"""Test setup: 8 fake CPU devices (before anything touches JAX) and absl flags marked parsed
(grain worker processes read them)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

from absl import flags  # noqa: E402

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


import pytest  # noqa: E402


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
