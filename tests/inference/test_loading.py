"""inference.loading: a Loom workdir reports the step it really loaded."""

import jax
import numpy as np

from inference.loading import load_checkpoint
from models import transformer as T
from models.checkpoint import read_run_config, save_params
from models.config import ModelConfig
from tests.evals.stubs import make_workdir
from tests.helpers import corrupt_params


def test_reported_step_is_the_one_loaded_when_the_newest_is_unreadable(tmp_path):
    workdir = make_workdir(tmp_path / "run", seed=0)  # step 5
    cfg = ModelConfig.from_dict(read_run_config(workdir)["model"])
    newer = T.split_params(T.build(cfg, seed=1))[1]
    save_params(workdir / "checkpoints" / "9" / "params", newer)

    model, _, info = load_checkpoint(workdir)
    assert info["step"] == 9
    np.testing.assert_array_equal(np.asarray(T.split_params(model)[1]["embed"]), np.asarray(newer["embed"]))

    corrupt_params(workdir / "checkpoints" / "9")
    model, _, info = load_checkpoint(workdir)
    assert info["step"] == 5  # fell back, and says so
    older = T.split_params(T.build(cfg, seed=0))[1]
    for a, b in zip(jax.tree.leaves(T.split_params(model)[1]), jax.tree.leaves(older)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert load_checkpoint(workdir, step=5)[2]["step"] == 5
