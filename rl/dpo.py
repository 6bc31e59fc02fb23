"""Direct preference optimisation (DPO, IPO, SimPO) of a base model against a frozen reference.

    python -m rl.dpo --config=configs/dpo.py:arith_dpo --workdir=runs/arith_dpo \\
        --config.init.workdir=runs/tiny

Top to bottom: load the base as SFT does (`init.workdir` / `init.hf_dir`, with its tokenizer) and
put the PEFT method on it (full, LoRA or QLoRA); the reference is the base itself, frozen: for
`full` a copy of the base's parameters passed to every step as an argument (never
differentiated, never in the optimizer or the checkpoint), for LoRA / QLoRA the same frozen
weights with the adapters zeroed (scale·A·B = 0 exactly: no second copy of the base), and none
for SimPO. Then `dpo.loss` (rl/preference.py) on batches of chosen / rejected pairs
(data/preferences.py), the reference's log-probs computed once per batch, in pretraining's loop
(train/loop.py). Train lines: `loss`, `accuracy` (pairs whose implicit reward β·(logπ − logπ_ref)
is higher for the chosen response), `reward_chosen`, `reward_rejected`, `reward_margin`,
`logp_chosen`, `logp_rejected` (summed response log-probs), `logp_accuracy` (the policy's own
preference); evaluations the same on held-out pairs, and for synthetic sources
`eval_answer_accuracy` (held-out prompts answered greedily, checked by the task's verifier). The
workdir is an SFT-like run (what was trained, config.json with the base's model section, the
tokenizer): `models.checkpoint.load(workdir)` gives the policy.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from data import sft, synthetic
from data.sources import synthetic_seed
from models import peft
from models.checkpoint import load_base
from models.config import flops_per_token, param_count
from models.sharding import use_rules
from rl import pairwise
from rl.preference import LOSSES, dpo_loss_fn
from train import distributed, lifecycle, loop
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer
from train.flops import system_peak_flops
from train.metrics import MetricsWriter
from train.optimizer import make_optimizer
from train.sft import base_tokenizer, exact_match
from train.state import make_train_step

METHODS = ("full", "lora", "qlora")  # prefixes have no "off" state that leaves the base's function


def check(config) -> None:
    """ValueError naming a bad `dpo` / `peft.method` value and what is valid."""
    d = config.dpo
    if d.loss not in LOSSES:
        raise ValueError(f"dpo.loss={d.loss!r} is not valid; expected one of {LOSSES}")
    if not d.beta > 0:
        raise ValueError(f"dpo.beta={d.beta} must be > 0")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise ValueError(f"dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5)")
    if config.peft.method not in METHODS:
        raise ValueError(f"peft.method={config.peft.method!r} cannot train DPO here; expected one of {METHODS} "
                         "(the reference of a prefix-tuned policy would need the base without prefixes)")


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains a policy per `config` in `workdir`; returns a summary (as train.sft.run does)."""
    workdir = pathlib.Path(workdir)
    distributed.initialize(config.distributed)
    is_main = jax.process_index() == 0
    tc, dc = config.train, config.dpo
    with lifecycle.config_errors():
        check(config)
        model_cfg, mesh_spec, resolved = pairwise.resolve(config, jax.device_count())
        seq = resolved["data"]["seq_len"]
        tx, schedule = make_optimizer(config.optimizer, tc.steps)
        guard = lifecycle.NanGuard(tc.nan_policy, tc.nan_max_skips)
        train_specs, eval_specs, holdout = pairwise.data_specs(config)
        tokenizer, tokenizer_files = base_tokenizer(config)
        template = sft.chat_template_for(tokenizer, config.data.chat_template)
    pairwise.prepare_workdir(workdir, resolved, tokenizer_files, program="rl.dpo")
    runlog = lifecycle.RunLog(workdir, enabled=is_main)
    mesh = mesh_lib.make_mesh(mesh_spec["shape"])
    rules = mesh_spec["rules"]
    method = config.peft.method
    peak = system_peak_flops(model_cfg.dtype)
    with_ref = dc.loss != "simpo"

    with jax.set_mesh(mesh), use_rules(rules):
        base, _ = load_base({"workdir": config.init.workdir, "hf_dir": config.init.hf_dir, "step": config.init.step},
                            model_cfg)
        model = peft.apply(base, config.peft.to_dict(), seed=tc.seed)
        graphdef, params, rest, n_trained = pairwise.split_on_mesh(model, peft.trainable_filter(method), mesh, rules)
        logging.info("policy %s: %s trains %s of %s parameters; %s, beta %g, reference: %s",
                     config.init.workdir or config.init.hf_dir, method, f"{n_trained:,}", f"{param_count(model_cfg):,}",
                     dc.loss, dc.beta, "none" if not with_ref else "a frozen copy of the base" if method == "full"
                     else "the base (adapters zeroed)")
        del base, model
        frozen = {"rest": rest}
        if with_ref and method == "full":  # its own buffers: the step donates the policy's
            frozen["ref"] = jax.tree.map(lambda x: x.copy(), params)
        state = pairwise.new_state(params, tx, tc.seed, mesh)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
        loss_fn = dpo_loss_fn(graphdef, loss=dc.loss, beta=dc.beta, label_smoothing=dc.label_smoothing,
                              gamma=dc.simpo_gamma, reference="frozen" if method == "full" else "zeroed")

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
        evaluate_pairs = pairwise.make_eval(loss_fn, pair_sh, eval_batches, frozen)
        # held-out questions with exact answers: the synthetic held-out sources' first examples
        exact = [(s.task, synthetic.get(s.task).examples(tc.eval_examples, seed=synthetic_seed(s.split), size=s.size))
                 for s in eval_specs if s.format == "synthetic"] if tc.eval_examples > 0 else []
        chat = sft.ChatTokenizer(tokenizer, template) if exact else None

        def evaluate(state) -> dict[str, float]:
            out = evaluate_pairs(state.params)
            if exact and jax.process_count() == 1:
                policy = nnx.merge(graphdef, state.params, rest)
                out["eval_answer_accuracy"] = float(np.mean([
                    exact_match(policy, tokenizer, chat, ex, task, max_new_tokens=tc.sample_tokens) for task, ex in exact]))
            return out

        def next_batch():
            local = next(data_iter)
            return pairwise.global_pairs(local, pair_sh), pairwise.batch_stats(local, len(train_specs))

        # a step is the policy's forward and backward (3 forwards) plus the reference's forward
        flops_tok = flops_per_token(model_cfg, seq)["train"] * (4 / 3 if with_ref else 1)
        state, outcome = loop.run_steps(loop.Parts(
            tc=tc, state=state, start=start, train_step=train_step, next_batch=next_batch, ckpt=ckpt,
            data_iter=data_iter, writer=writer, runlog=runlog, guard=guard, schedule=schedule, evaluate=evaluate,
            tokens_per_step=2 * tc.batch_size * seq, flops_per_token=flops_tok, peak_flops=peak,
            source_names=tuple(s.name for s in train_specs), summed=pairwise.COUNTED, frozen=frozen,
            workdir=workdir))
        writer.close()
        summary: dict[str, Any] = {"method": method, "loss_type": dc.loss, "trained_parameters": n_trained, **outcome}
        if outcome["complete"]:
            runlog.event("exit", reason="finished", step=tc.steps,
                         final_eval_reward_margin=summary.get("final_eval_reward_margin"))
            logging.info("done: %s", summary)
        return summary


if __name__ == "__main__":
    lifecycle.program_main(run, "configs/dpo.py")
