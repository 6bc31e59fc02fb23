"""Policy-gradient RL with verifiable rewards: REINFORCE, RLOO and GRPO with its variants.

    python -m rl.train --config=configs/rl.py:grpo_arith --workdir=runs/grpo_arith

One step: P prompts (a deterministic function of the seed and the step, so a resumed run draws
the same ones), G completions each sampled by `inference.generate` from the current policy
(rl/rollout.py), rewards from the task's verifier (rl/rewards.py), advantages per prompt group,
then `rl.epochs` updates on that batch with the clipped surrogate of the chosen variant
(rl/losses.py). Before the first update the trainer scores the sampled tokens itself: those
log-probs are the importance ratios' `old` side, and their gap to the sampler's is logged as
`logprob_gap` (the same model code on both sides: ~1e-6 in float32). The reference for the KL is
the start point: under LoRA the same frozen base with the adapters' B set to zero (no second copy
of the weights), under full fine-tuning a frozen copy of the start.

The loop is every Loom program's (train/loop.py): metrics.jsonl / TensorBoard / progress with ETA,
checkpoints, exact resume, SIGTERM checkpoints, the NaN guard, runs.jsonl. Train lines carry
`reward_mean`, `accuracy`, `kl`, `logprob_gap`, `rollout_fraction`, `entropy`, `clip_fraction`,
`response_length`, advantage statistics; held-out greedy accuracy is `eval_accuracy` at step 0 and
at the end; `reward.png` plots the reward and accuracy curves.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from configs.rl import ALGORITHMS, LOSSES
from data import sft as sft_data
from data import synthetic
from data.sources import synthetic_seed
from models import peft
from models.checkpoint import committed_steps, load_base
from models.config import flops_per_token
from models.sharding import named_shardings, use_rules
from models.transformer import apply
from rl import losses, rewards
from rl.rollout import sample_groups
from train import distributed, lifecycle, loop
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer
from train.flops import system_peak_flops
from train.metrics import read_metrics
from train.optimizer import make_optimizer
from train.sft import _axes_tree, base_model_config, base_tokenizer, exact_match, generation_stops
from train.state import TrainState, make_train_step

REWARD_PLOT = "reward.png"

# the GRPO variants' choices (rl.loss), and what reinforce / rloo use
VARIANTS = {
    "grpo": dict(advantage="grpo", aggregation="sequence_mean", level="token", clip_low=0.2, clip_high=0.2,
                 dynamic_sampling=False),
    "dr_grpo": dict(advantage="dr_grpo", aggregation="constant", level="token", clip_low=0.2, clip_high=0.2,
                    dynamic_sampling=False),
    "dapo": dict(advantage="grpo", aggregation="token_mean", level="token", clip_low=0.2, clip_high=0.28,
                 dynamic_sampling=True),
    "gspo": dict(advantage="grpo", aggregation="sequence_mean", level="sequence", clip_low=3e-4, clip_high=4e-4,
                 dynamic_sampling=False),
}
ALGORITHM_DEFAULTS = {
    "reinforce": dict(advantage="reinforce", aggregation="sequence_sum", level="token", clip_low=None,
                      clip_high=None, dynamic_sampling=False),
    "rloo": dict(advantage="rloo", aggregation="sequence_mean", level="trajectory", clip_low=0.2, clip_high=0.2,
                 dynamic_sampling=False),
}


def loss_settings(rl) -> dict[str, Any]:
    """The advantage estimator and loss settings of `rl` (algorithm, variant, then each override)."""
    if rl.algorithm not in ALGORITHMS:
        raise ValueError(f"rl.algorithm={rl.algorithm!r} is not valid; expected one of {ALGORITHMS}")
    if rl.algorithm == "grpo" and rl.loss not in LOSSES:
        raise ValueError(f"rl.loss={rl.loss!r} is not valid; expected one of {LOSSES}")
    s = dict(ALGORITHM_DEFAULTS.get(rl.algorithm) or VARIANTS[rl.loss])
    for k in ("advantage", "aggregation", "level", "clip_low", "clip_high", "dynamic_sampling"):
        v = rl.get(k)
        if v is not None:
            s[k] = v
    if rl.kl.estimator not in ("k1", "k2", "k3"):
        raise ValueError(f"rl.kl.estimator={rl.kl.estimator!r} is not valid; expected k1, k2 or k3")
    if rl.kl.mode not in ("loss", "reward"):
        raise ValueError(f"rl.kl.mode={rl.kl.mode!r} is not valid; expected 'loss' or 'reward'")
    if rl.group_size < 2 and s["advantage"] in ("grpo", "dr_grpo", "rloo"):
        raise ValueError(f"rl.group_size={rl.group_size}: the {s['advantage']} advantage compares the samples of a "
                         "group; use group_size >= 2")
    return s


def prompts_for_step(pool_size: int, per_step: int, seed: int, step: int) -> np.ndarray:
    """The training prompts' indices for `step`: a function of (seed, step) alone, so a resumed run
    draws what the uninterrupted one drew (no iterator state)."""
    rng = np.random.default_rng([int(seed), int(step), 0x5EED])
    return rng.choice(pool_size, size=per_step, replace=per_step > pool_size)


def build_start(init) -> None:
    """grpo_arith's start point when `init.workdir` is missing and `init.build` = "arith": a `tiny`
    pretraining run beside it, then arith_lora for 80 steps into it (each its own program)."""
    target = pathlib.Path(init.workdir)
    if committed_steps(target) or init.build != "arith":
        return
    base = target.parent / "tiny"
    logging.info("init.workdir=%s is missing: building it (tiny pretraining in %s, then arith_lora for 80 steps)",
                 target, base)
    py = [sys.executable, "-m"]
    env = dict(os.environ)
    for cmd in ([*py, "train.pretrain", "--config=configs/pretrain.py:tiny", f"--workdir={base}",
                 "--config.train.num_samples=0"],
                [*py, "train.sft", "--config=configs/sft.py:arith_lora", f"--workdir={target}",
                 f"--config.init.workdir={base}", "--config.train.steps=80", "--config.train.eval_every=80",
                 "--config.train.checkpoint_every=80", "--config.train.num_samples=0"]):
        subprocess.run(cmd, check=True, env=env)


def resolve(config, num_devices: int):
    peft.check(config.peft.to_dict())
    if config.peft.method == "prefix":
        raise ValueError("peft.method='prefix' is not supported for RL policies; use full, lora or qlora")
    settings = loss_settings(config.rl)
    rewards.make(config.reward.kind, task=config.data.task, pattern=config.reward.pattern)
    model_cfg, hf_section = base_model_config(config)
    task = synthetic.get(config.data.task)
    rl = config.rl
    seq = 64 + rl.max_new_tokens  # prompt tokens bucketed below; checked against the model
    mesh = mesh_lib.resolve(config.mesh.to_dict(), num_devices, model_cfg, seq)
    rows = rl.group_size * rl.prompts_per_step
    shards = mesh["shape"]["data"] * mesh["shape"]["fsdp"]
    if rows % rl.microbatches or (rows // rl.microbatches) % shards:
        raise ValueError(f"rl.group_size x rl.prompts_per_step = {rows} rows must split into rl.microbatches="
                         f"{rl.microbatches} micro-batches each divisible by the {shards} batch shards")
    resolved = config.to_dict()
    resolved["model"] = model_cfg.to_dict()
    resolved["rl"]["resolved_loss"] = settings
    resolved["mesh"]["shape"] = mesh["shape"]
    resolved["mesh"]["rules"] = [[n, list(a)] for n, a in mesh["rules"]]
    if hf_section:
        resolved["hf"] = hf_section
    return model_cfg, mesh, resolved, settings, task


def make_loss_fn(graphdef, settings, *, temperature: float, max_len: int, beta: float, kl_estimator: str,
                 kl_in_loss: bool):
    """loss_fn(params, batch, rng, frozen) for train/state.make_train_step: the variant's
    (numerator / weight) with `weight` stated, so micro-batches equal one batch."""

    def loss_fn(params, batch, rng, frozen=None):
        logits = apply(graphdef, params if frozen is None else (params, frozen), batch)
        mask = batch["loss_mask_BT"]
        logp = losses.token_logprobs(logits, batch["targets_BT"], temperature)
        kl = losses.kl_penalty(logp, batch["ref_logp_BT"], kl_estimator)
        num, w, m = losses.policy_loss(
            logp, batch["old_logp_BT"], batch["advantages_BT"], mask, clip_low=settings["clip_low"],
            clip_high=settings["clip_high"], level=settings["level"], aggregation=settings["aggregation"],
            max_len=max_len, kl_BT=kl if kl_in_loss else None, beta=beta if kl_in_loss else 0.0)
        fin = losses.finalize(m)
        loss = num / jnp.maximum(w, 1e-9)
        return loss, {"loss": loss, "weight": w, "clip_fraction": fin["clip_fraction"],
                      "ratio_mean": fin["ratio_mean"]}

    return loss_fn


def make_scorer(graphdef, temperature: float):
    """score(params, frozen, batch) -> (log-probs [B, T], entropy [B, T]) of the batch's targets."""

    @jax.jit
    def score(params, frozen, batch):
        logits = apply(graphdef, params if frozen is None else (params, frozen), batch)
        return (losses.token_logprobs(logits, batch["targets_BT"], temperature),
                losses.entropy_from_logits(logits, batch["loss_mask_BT"], temperature))

    return score


def lora_reference(params):
    """The base without adapters: the trained LoRA state with every B zero (A B = 0 exactly)."""
    def zero_b(path, x):
        return jnp.zeros_like(x) if getattr(path[-1], "key", None) == "b" else x

    return jax.tree_util.tree_map_with_path(zero_b, params)


def plot_rewards(workdir: pathlib.Path) -> None:
    """reward.png: reward_mean and accuracy per train line, eval_accuracy points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(workdir)
    train = [r for r in rows if "reward_mean" in r]
    evals = [r for r in rows if "eval_accuracy" in r]
    if not train:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train], [r["reward_mean"] for r in train], label="reward_mean")
    ax.plot([r["step"] for r in train], [r["accuracy"] for r in train], label="accuracy (samples)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="eval_accuracy (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(workdir / REWARD_PLOT, dpi=100)
    plt.close(fig)


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
    workdir = pathlib.Path(workdir)
    distributed.initialize(config.distributed)
    is_main = jax.process_index() == 0
    tc, rl = config.train, config.rl
    with lifecycle.config_errors():
        if config.init.workdir and config.init.build:
            build_start(config.init)
        model_cfg, mesh_spec, resolved, settings, task = resolve(config, jax.device_count())
        tx, schedule = make_optimizer(config.optimizer, tc.steps * rl.epochs)
        guard = lifecycle.NanGuard(tc.nan_policy, tc.nan_max_skips)
        tokenizer, tokenizer_files = base_tokenizer(config)
        template = sft_data.chat_template_for(tokenizer, None)
        reward_fn = rewards.make(config.reward.kind, task=config.data.task, pattern=config.reward.pattern)
        correct_fn = rewards.make("exact", task=config.data.task) if config.reward.kind != "gsm8k" else reward_fn
    lifecycle.check_workdir(workdir, resolved, committed_steps(workdir), program="rl.train")
    lifecycle.write_run_files(workdir, resolved, tokenizer_files, enabled=is_main)
    runlog = lifecycle.RunLog(workdir, enabled=is_main)
    chat = sft_data.ChatTokenizer(tokenizer, template)
    mesh = mesh_lib.make_mesh(mesh_spec["shape"])
    rules = mesh_spec["rules"]
    method = config.peft.method
    stop_tokens = generation_stops(chat, tokenizer_files)  # EOS and the template's end of turn

    pool = task.examples(config.data.num_examples, seed=synthetic_seed("train"), size=config.data.size)
    held_out = task.examples(config.data.eval_examples, seed=synthetic_seed("validation"), size=config.data.size)
    pool_ids = [chat.prompt_ids([{"role": "user", "content": e["prompt"]}]) for e in pool]
    prompt_len = max(len(p) for p in pool_ids)
    if prompt_len + rl.max_new_tokens > model_cfg.max_seq_len:
        raise lifecycle.ConfigError(f"prompts of {prompt_len} tokens + rl.max_new_tokens={rl.max_new_tokens} exceed "
                                    f"the model's max_seq_len={model_cfg.max_seq_len}")

    with jax.set_mesh(mesh), use_rules(rules):
        base, _ = load_base({"workdir": config.init.workdir, "hf_dir": config.init.hf_dir, "step": config.init.step},
                            model_cfg)
        model = peft.apply(base, config.peft.to_dict(), seed=tc.seed)
        graphdef, trained, frozen = nnx.split(model, peft.trainable_filter(method), ...)
        if method == "full":  # the reference: a frozen copy of the start
            ref_params = jax.tree.map(jnp.copy, nnx.to_pure_dict(trained))
        trained_sh = named_shardings(_axes_tree(trained), nnx.to_pure_dict(trained), mesh, rules)
        frozen_sh = named_shardings(_axes_tree(frozen), nnx.to_pure_dict(frozen), mesh, rules)
        params = jax.device_put(nnx.to_pure_dict(trained), trained_sh)
        frozen = jax.device_put(nnx.to_pure_dict(frozen), frozen_sh)
        n_trained = sum(np.size(x) for x in jax.tree.leaves(params))
        if method == "full":
            ref_params = jax.device_put(ref_params, trained_sh)
        del base, model, trained
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                           opt_state=jax.jit(tx.init)(params),
                           rng=jax.device_put(jax.random.key_data(jax.random.key(tc.seed)), replicated))
        ckpt = Checkpointer(workdir, max_to_keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = ckpt.restore(abstract)
        if restored is not None:
            state = restored
        start = int(jax.device_get(state.step))
        writer = lifecycle.open_metrics(workdir, tc.steps, start, restored is not None, runlog, ckpt, enabled=is_main,
                                        trained_parameters=n_trained)
        if writer is None:
            return lifecycle.already_complete(start)

        temperature = float(rl.temperature)
        kl_in_loss = rl.kl.mode == "loss"
        loss_fn = make_loss_fn(graphdef, settings, temperature=temperature, max_len=rl.max_new_tokens,
                               beta=float(rl.kl.beta), kl_estimator=rl.kl.estimator, kl_in_loss=kl_in_loss)
        update = jax.jit(make_train_step(loss_fn, tx, microbatches=rl.microbatches), donate_argnums=(0,))
        score = make_scorer(graphdef, temperature)

        def current_model(state):
            return nnx.merge(graphdef, state.params, frozen)

        def evaluate(state) -> dict[str, float]:
            if not held_out or jax.process_count() > 1:
                return {}
            acc = exact_match(current_model(state), tokenizer, chat, held_out, config.data.task,
                              max_new_tokens=rl.max_new_tokens, stops=stop_tokens)
            return {"eval_accuracy": acc}

        def rl_step(state, batch, frozen_arg=None):
            """Rollout, rewards, advantages, then rl.epochs updates: (state, metrics)."""
            step = int(batch["step"])
            t0 = time.perf_counter()
            idx = prompts_for_step(len(pool), rl.prompts_per_step, tc.seed, step)
            ro = sample_groups(current_model(state), [pool_ids[i] for i in idx], group_size=rl.group_size,
                               max_new_tokens=rl.max_new_tokens, temperature=temperature,
                               top_p=rl.top_p if rl.top_p < 1.0 else None, top_k=rl.top_k or None,
                               stop_tokens=stop_tokens, seed=tc.seed * 1_000_003 + step)
            t_roll = time.perf_counter() - t0
            examples = [pool[i] for i in idx for _ in range(rl.group_size)]
            texts = [tokenizer.decode(c[:-1] if c and c[-1] in stop_tokens else c) for c in ro.completions]
            r = np.array([reward_fn(t, e) for t, e in zip(texts, examples)], np.float32)
            correct = np.array([correct_fn(t, e) for t, e in zip(texts, examples)], np.float32)
            if config.reward.format_weight and config.reward.kind != "format":
                fmt = rewards.make("format", pattern=config.reward.pattern)
                r = r + config.reward.format_weight * np.array([fmt(t, e) for t, e in zip(texts, examples)], np.float32)
            if rl.overlong_cache:
                r = r + np.asarray(losses.overlong_penalty(jnp.asarray(ro.lengths()), rl.max_new_tokens,
                                                           rl.overlong_cache))
            host = ro.batch(prompt_len=prompt_len, completion_len=rl.max_new_tokens)
            dev = {k: jnp.asarray(v) for k, v in host.items() if k != "sampler_logprobs_BT"}
            old_logp, entropy = score(state.params, frozen, dev)
            if method == "full":
                ref_logp = score(ref_params, frozen, dev)[0]
            else:
                ref_logp = score(lora_reference(state.params), frozen, dev)[0]
            mask = host["loss_mask_BT"]
            old_np, ref_np = np.asarray(old_logp), np.asarray(ref_logp)
            n_tok = max(mask.sum(), 1.0)
            gap = float(np.abs(old_np - host["sampler_logprobs_BT"])[mask > 0].sum() / n_tok)
            kl_tok = np.asarray(losses.kl_penalty(old_logp, ref_logp, rl.kl.estimator))
            kl = float((kl_tok * mask).sum() / n_tok)
            if not kl_in_loss and rl.kl.beta:
                r = r - rl.kl.beta * ((old_np - ref_np) * mask).sum(-1)  # k1 summed per sequence
            adv = np.asarray(losses.advantages(jnp.asarray(r), rl.group_size, settings["advantage"]))
            loss_mask = mask
            if settings["dynamic_sampling"]:
                keep = np.asarray(losses.varied_groups(jnp.asarray(r), rl.group_size))
                loss_mask = mask * keep[:, None]
            dev.update(loss_mask_BT=jnp.asarray(loss_mask), old_logp_BT=old_logp, ref_logp_BT=ref_logp,
                       advantages_BT=jnp.asarray(np.broadcast_to(adv[:, None], mask.shape).copy()))
            ms = []
            for _ in range(rl.epochs):
                state, m = update(state, dev, frozen)
                ms.append(m)
            # state.step counts rollout steps (what a resume starts from), not the rl.epochs updates
            state = TrainState(step=jax.device_put(jnp.asarray(step + 1, jnp.int32), state.step.sharding),
                               params=state.params, opt_state=state.opt_state, rng=state.rng)
            m = jax.tree.map(lambda *xs: sum(xs) / len(xs), *ms)
            total = time.perf_counter() - t0
            lengths = ro.lengths()
            stats = {"reward_mean": float(r.mean()), "reward_std": float(r.std()), "accuracy": float(correct.mean()),
                     "kl": kl, "logprob_gap": gap, "rollout_fraction": t_roll / total,
                     "entropy": float((np.asarray(entropy) * mask).sum() / n_tok),
                     "response_length": float(lengths.mean()), "stopped_fraction": float(ro.stopped().mean()),
                     "advantage_mean": float(adv.mean()), "advantage_std": float(adv.std()),
                     "advantage_min": float(adv.min()), "advantage_max": float(adv.max()),
                     "trained_rows": float((loss_mask.sum(-1) > 0).sum())}
            return state, {**m, **{k: jnp.float32(v) for k, v in stats.items()}}

        step_counter = {"next": start}

        def next_batch():
            b = {"step": step_counter["next"]}
            step_counter["next"] += 1
            return b, {}

        tokens_per_step = rl.group_size * rl.prompts_per_step * (prompt_len + rl.max_new_tokens)
        state, outcome = loop.run_steps(loop.Parts(
            tc=tc, state=state, start=start, train_step=rl_step, next_batch=next_batch, ckpt=ckpt, data_iter=None,
            writer=writer, runlog=runlog, guard=guard, schedule=lambda s: schedule(s * rl.epochs),
            evaluate=evaluate, tokens_per_step=tokens_per_step,
            flops_per_token=flops_per_token(model_cfg, prompt_len + rl.max_new_tokens)["train"],
            peak_flops=system_peak_flops(model_cfg.dtype), frozen=frozen, workdir=workdir))
        summary: dict[str, Any] = {"method": method, "algorithm": rl.algorithm, "trained_parameters": n_trained,
                                   **outcome}
        writer.close()
        if is_main:
            plot_rewards(workdir)
        if outcome["complete"]:
            runlog.event("exit", reason="finished", step=tc.steps, final_eval_accuracy=summary.get("final_eval_accuracy"))
        logging.info("done: %s", summary)
        return summary


if __name__ == "__main__":
    lifecycle.program_main(run, "configs/rl.py")
