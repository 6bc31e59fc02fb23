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
from train.sft import exact_match

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
    if d.loss == "ipo" and d.label_smoothing:
        raise ValueError(f"dpo.label_smoothing={d.label_smoothing} applies to the dpo and simpo losses, not ipo")
    if config.peft.method not in METHODS:
        raise ValueError(f"peft.method={config.peft.method!r} cannot train DPO here; expected one of {METHODS} "
                         "(the reference of a prefix-tuned policy would need the base without prefixes)")


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains a policy per `config` in `workdir`; returns a summary (as train.sft.run does)."""
    workdir = pathlib.Path(workdir)
    distributed.initialize(config.distributed)
    tc, dc, method = config.train, config.dpo, config.peft.method
    with lifecycle.config_errors():
        check(config)
    s = pairwise.start(config, workdir, program="rl.dpo")
    runlog = lifecycle.RunLog(workdir, enabled=jax.process_index() == 0)
    with_ref = dc.loss != "simpo"

    with jax.set_mesh(s.mesh), use_rules(s.rules):
        base, _ = load_base({"workdir": config.init.workdir, "hf_dir": config.init.hf_dir, "step": config.init.step},
                            s.model_cfg)
        model = peft.apply(base, config.peft.to_dict(), seed=tc.seed)
        graphdef, params, rest, n_trained = pairwise.split_on_mesh(model, peft.trainable_filter(method), s.mesh,
                                                                   s.rules)
        logging.info("policy %s: %s trains %s of %s parameters; %s, beta %g, reference: %s",
                     config.init.workdir or config.init.hf_dir, method, f"{n_trained:,}",
                     f"{param_count(s.model_cfg):,}", dc.loss, dc.beta, "none" if not with_ref
                     else "a frozen copy of the base" if method == "full" else "the base (adapters zeroed)")
        del base, model
        frozen = {"rest": rest}
        if with_ref and method == "full":  # its own buffers: the step donates the policy's
            frozen["ref"] = jax.tree.map(lambda x: x.copy(), params)
        state = pairwise.new_state(params, s.tx, tc.seed, s.mesh)
        loss_fn = dpo_loss_fn(graphdef, loss=dc.loss, beta=dc.beta, label_smoothing=dc.label_smoothing,
                              gamma=dc.simpo_gamma, reference="frozen" if method == "full" else "zeroed")

        # held-out questions with exact answers: the synthetic held-out sources' first examples
        exact = [(sp.task, synthetic.get(sp.task).examples(tc.eval_examples, seed=synthetic_seed(sp.split),
                                                           size=sp.size))
                 for sp in s.eval_specs if sp.format == "synthetic"] if tc.eval_examples > 0 else []
        chat = sft.ChatTokenizer(s.tokenizer, s.template) if exact else None

        def answer_accuracy(state) -> dict[str, float]:
            if not exact or jax.process_count() > 1:
                return {}
            policy = nnx.merge(graphdef, state.params, rest)
            return {"eval_answer_accuracy": float(np.mean([
                exact_match(policy, s.tokenizer, chat, ex, task, max_new_tokens=tc.sample_tokens, stops=s.stops)
                for task, ex in exact]))}

        # a step is the policy's forward and backward (3 forwards) plus the reference's forward
        flops_tok = flops_per_token(s.model_cfg, s.seq)["train"] * (4 / 3 if with_ref else 1)
        parts, start = pairwise.loop_parts(config, s, workdir, runlog, state, frozen, loss_fn, trained=n_trained,
                                    flops_per_token=flops_tok, extra_eval=answer_accuracy)
        if parts is None:
            return lifecycle.already_complete(start)
        state, outcome = loop.run_steps(parts)
        parts.writer.close()
        summary: dict[str, Any] = {"method": method, "loss_type": dc.loss, "trained_parameters": n_trained, **outcome}
        if outcome["complete"]:
            runlog.event("exit", reason="finished", step=tc.steps,
                         final_eval_reward_margin=summary.get("final_eval_reward_margin"))
            logging.info("done: %s", summary)
        return summary


if __name__ == "__main__":
    lifecycle.program_main(run, "configs/dpo.py")
