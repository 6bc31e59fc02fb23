"""Reward model training: a scalar head on a base model, Bradley-Terry loss on preference pairs.

    python -m rl.reward --config=configs/reward.py:arith_rm --workdir=runs/arith_rm \\
        --config.init.workdir=runs/tiny

Top to bottom: load the base as SFT does (`init.workdir` / `init.hf_dir`, with its tokenizer), put
the PEFT method on it, wrap it in a `RewardModel` (rl/reward_model.py: the last token's final
hidden state -> a linear head), train the PEFT method's parameters and the head on batches of
chosen / rejected pairs (data/preferences.py) with the loss -log σ(r_chosen - r_rejected)
(rl/preference.py) in pretraining's loop (train/loop.py: logging, evaluation, checkpoints, exact
resume, signals, the NaN guard). Train lines: `loss`, `accuracy` (pairs ranked right),
`reward_margin`, `reward_chosen`, `reward_rejected`; evaluations the same on held-out pairs
(`eval_accuracy` is the held-out pairwise accuracy). The workdir keeps what was trained (the
whole model for `full`, the adapters otherwise, and the head), config.json with a `reward`
section and the base's tokenizer files; `rl.reward_model.load_reward_model(workdir)` gives a
scorer the policy loop can call.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
from absl import logging

from models.checkpoint import load_base
from models.config import flops_per_token, param_count
from models.sharding import use_rules
from rl import pairwise, reward_model
from rl.preference import reward_loss_fn
from train import distributed, lifecycle, loop


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains a reward model per `config` in `workdir`; returns a summary (as train.sft.run does)."""
    workdir = pathlib.Path(workdir)
    distributed.initialize(config.distributed)
    tc, method = config.train, config.peft.method
    s = pairwise.start(config, workdir, program="rl.reward")
    runlog = lifecycle.RunLog(workdir, enabled=jax.process_index() == 0)

    with jax.set_mesh(s.mesh), use_rules(s.rules):
        base, _ = load_base({"workdir": config.init.workdir, "hf_dir": config.init.hf_dir, "step": config.init.step},
                            s.model_cfg)
        model = reward_model.build(base, config.peft.to_dict(), seed=tc.seed)
        graphdef, params, frozen, n_trained = pairwise.split_on_mesh(model, reward_model.trainable_filter(method),
                                                                     s.mesh, s.rules)
        logging.info("reward model on %s: %s trains %s parameters of %s (the head included)",
                     config.init.workdir or config.init.hf_dir, method, f"{n_trained:,}", f"{param_count(s.model_cfg):,}")
        del base, model
        state = pairwise.new_state(params, s.tx, tc.seed, s.mesh)
        loss_fn = reward_loss_fn(graphdef, center=config.reward.center_coeff)

        parts, start = pairwise.loop_parts(config, s, workdir, runlog, state, frozen, loss_fn, trained=n_trained,
                                    flops_per_token=flops_per_token(s.model_cfg, s.seq)["train"])
        if parts is None:
            return lifecycle.already_complete(start)
        state, outcome = loop.run_steps(parts)
        parts.writer.close()
        summary: dict[str, Any] = {"method": method, "trained_parameters": n_trained, **outcome}
        if outcome["complete"]:
            runlog.event("exit", reason="finished", step=tc.steps, final_eval_accuracy=summary.get("final_eval_accuracy"))
            logging.info("done: %s", summary)
        return summary


if __name__ == "__main__":
    lifecycle.program_main(run, "configs/reward.py")
