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

from data import sft
from models.checkpoint import load_base
from models.config import flops_per_token, param_count
from models.sharding import use_rules
from rl import pairwise, reward_model
from rl.preference import reward_loss_fn
from train import distributed, lifecycle, loop
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer
from train.flops import system_peak_flops
from train.metrics import MetricsWriter
from train.optimizer import make_optimizer
from train.sft import base_tokenizer
from train.state import make_train_step


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains a reward model per `config` in `workdir`; returns a summary (as train.sft.run does)."""
    workdir = pathlib.Path(workdir)
    distributed.initialize(config.distributed)
    is_main = jax.process_index() == 0
    tc = config.train
    with lifecycle.config_errors():
        model_cfg, mesh_spec, resolved = pairwise.resolve(config, jax.device_count())
        seq = resolved["data"]["seq_len"]
        tx, schedule = make_optimizer(config.optimizer, tc.steps)
        guard = lifecycle.NanGuard(tc.nan_policy, tc.nan_max_skips)
        train_specs, eval_specs, holdout = pairwise.data_specs(config)
        tokenizer, tokenizer_files = base_tokenizer(config)
        template = sft.chat_template_for(tokenizer, config.data.chat_template)
    pairwise.prepare_workdir(workdir, resolved, tokenizer_files, program="rl.reward")
    runlog = lifecycle.RunLog(workdir, enabled=is_main)
    mesh = mesh_lib.make_mesh(mesh_spec["shape"])
    rules = mesh_spec["rules"]
    method = config.peft.method
    peak = system_peak_flops(model_cfg.dtype)

    with jax.set_mesh(mesh), use_rules(rules):
        base, _ = load_base({"workdir": config.init.workdir, "hf_dir": config.init.hf_dir, "step": config.init.step},
                            model_cfg)
        model = reward_model.build(base, config.peft.to_dict(), seed=tc.seed)
        graphdef, params, frozen, n_trained = pairwise.split_on_mesh(model, reward_model.trainable_filter(method),
                                                                     mesh, rules)
        logging.info("reward model on %s: %s trains %s parameters of %s (the head included)",
                     config.init.workdir or config.init.hf_dir, method, f"{n_trained:,}", f"{param_count(model_cfg):,}")
        del base, model
        state = pairwise.new_state(params, tx, tc.seed, mesh)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
        loss_fn = reward_loss_fn(graphdef, center=config.reward.center_coeff)

        ckpt = Checkpointer(workdir, max_to_keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
        data_iter, eval_batches = pairwise.pair_data(config, tokenizer, template, seq, train_specs, eval_specs, holdout)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = ckpt.restore(abstract, data_iter)
        state = restored if restored is not None else state
        start = int(jax.device_get(state.step))
        if start >= tc.steps and restored is not None:
            runlog.event("exit", reason="already complete", step=start)
            ckpt.close()
            return {"step": start, "resumed_from": start, "complete": True, "exit_code": 0}
        writer = MetricsWriter(workdir, total_steps=tc.steps, enabled=is_main, resume_step=start)
        runlog.event("resume" if restored is not None else "start", step=start, steps=tc.steps,
                     command=lifecycle.command_line(), peak_flops=peak, trained_parameters=n_trained)

        pair_sh = pairwise.pair_shardings(mesh, rules, tc.batch_size, seq)
        use_dropout = model_cfg.dropout_rate > 0 or (method in ("lora", "qlora") and config.peft.lora.dropout > 0)
        train_step = jax.jit(make_train_step(loss_fn, tx, microbatches=tc.microbatches, use_dropout=use_dropout),
                             in_shardings=(shardings, pair_sh, frozen_sh), out_shardings=(shardings, None),
                             donate_argnums=(0,))
        evaluate = pairwise.make_eval(loss_fn, pair_sh, eval_batches, frozen)

        def next_batch():
            local = next(data_iter)
            return pairwise.global_pairs(local, pair_sh), pairwise.batch_stats(local, len(train_specs))

        state, outcome = loop.run_steps(loop.Parts(
            tc=tc, state=state, start=start, train_step=train_step, next_batch=next_batch, ckpt=ckpt,
            data_iter=data_iter, writer=writer, runlog=runlog, guard=guard, schedule=schedule,
            evaluate=lambda s: evaluate(s.params), tokens_per_step=2 * tc.batch_size * seq,
            flops_per_token=flops_per_token(model_cfg, seq)["train"], peak_flops=peak,
            source_names=tuple(s.name for s in train_specs), summed=pairwise.COUNTED, frozen=frozen,
            workdir=workdir))
        writer.close()
        summary: dict[str, Any] = {"method": method, "trained_parameters": n_trained, **outcome}
        if outcome["complete"]:
            runlog.event("exit", reason="finished", step=tc.steps, final_eval_accuracy=summary.get("final_eval_accuracy"))
            logging.info("done: %s", summary)
        return summary


if __name__ == "__main__":
    lifecycle.program_main(run, "configs/reward.py")
