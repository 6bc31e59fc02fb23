"""Runs the RL tests share: a reward model trained on the session's tiny pretraining run."""

import pytest

from tests.helpers import run_program

SHORT = ["--config.train.batch_size=8", "--config.train.log_every=4", "--config.train.eval_every=4",
         "--config.train.eval_pairs=16", "--config.train.checkpoint_every=4", "--config.train.async_checkpoint=False"]


def preference_program(program, preset, workdir, base, *extra, env=None, check=True):
    """`python -m rl.reward` / `rl.dpo` with `preset` on `base`, shortened (SHORT) for tests."""
    config = {"rl.reward": "configs/reward.py", "rl.dpo": "configs/dpo.py"}[program]
    return run_program(program, f"--config={config}:{preset}", f"--workdir={workdir}",
                       f"--config.init.workdir={base}", *SHORT, *extra, env=env, check=check)


@pytest.fixture(scope="session")
def rm_run(tiny_run, tmp_path_factory):
    """arith_rm_lora for 8 steps: a reward model (LoRA + head) the reward and policy tests read."""
    workdir = tmp_path_factory.mktemp("rm")
    preference_program("rl.reward", "arith_rm_lora", workdir, tiny_run, "--config.train.steps=8")
    return workdir
