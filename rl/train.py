"""Policy-gradient RL: REINFORCE, RLOO, GRPO with its variants, and PPO.

    python -m rl.train --config=configs/rl.py:grpo_arith --workdir=runs/grpo_arith

One step: P prompts (a deterministic function of the seed and the step, so a resumed run draws
the same ones), G completions each sampled by `inference.generate` from the current policy
(rl/rollout.py), rewards from the task's verifier (rl/rewards.py) or a reward model
(`make_reward`), then the `Learner`: the reference's log-probs (for the KL), advantages
(`update_inputs`: per prompt group, or GAE with PPO's value head), and `rl.epochs` updates on
that batch with the clipped surrogate of the chosen variant (rl/losses.py). The trainer scores
the sampled tokens itself before the first update: those log-probs are the importance ratios'
`old` side, and their gap to the sampler's is logged as `logprob_gap` (the same model code on
both sides: ~1e-7 in float32); at one update per batch without PPO or a KL reward, the update's
own forward is that scoring pass (`Learner.fused`). The reference for the KL is the start point:
under LoRA the same frozen base with the adapters' B set to zero (no second copy of the weights),
under full fine-tuning a frozen copy of the start. PPO's policy is wrapped in
`reward_model.RewardModel`, the value head read at every position of the same trunk; its
checkpoint holds the policy under `decoder` (models/checkpoint.py reads it back as a language
model).

The loop is every Loom program's (train/loop.py): metrics.jsonl / TensorBoard / progress with ETA,
checkpoints, exact resume, SIGTERM checkpoints, the NaN guard, runs.jsonl. Train lines carry
`reward_mean`, `accuracy`, `kl`, `logprob_gap`, `rollout_fraction` (and the reward, scoring and
update shares), `entropy`, `clip_fraction`, `response_length`, advantage statistics, PPO's value
metrics; held-out greedy accuracy is `eval_accuracy` at step 0, every `train.eval_every` steps
and at the end; `reward.png` plots the reward and accuracy curves.
"""

from __future__ import annotations

import functools
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
from models.moe import balance_router_biases
from models.sharding import logical_to_spec, named_shardings, use_rules
from models.transformer import apply, apply_with_aux
from rl import losses, reward_model, rewards
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
    # PPO as RLHF runs it (Ouyang et al. 2022, arXiv 2203.02155; TRL's PPOTrainer): per-token
    # rewards (the score on the last token, the KL penalty on every token), GAE over the
    # completion with a value head, token-level ratio and token-mean loss
    "ppo": dict(advantage="gae", aggregation="token_mean", level="token", clip_low=0.2, clip_high=0.2,
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
    if (s["advantage"] == "gae") != (rl.algorithm == "ppo"):
        raise ValueError(f"rl.advantage={s['advantage']!r} with rl.algorithm={rl.algorithm!r}: GAE needs PPO's value "
                         "head, and PPO's advantages are GAE's")
    if s["advantage"] == "gae" and s["dynamic_sampling"]:
        raise ValueError("rl.dynamic_sampling=True with PPO: dynamic sampling drops groups whose rewards are all "
                         "equal, which GAE's per-token advantages do not have; use it with grpo / rloo")
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
    pretraining run beside it, then arith_lora for 120 steps into it (each its own program)."""
    target = pathlib.Path(init.workdir)
    if committed_steps(target) or init.build != "arith":
        return
    base = target.parent / "tiny"
    logging.info("init.workdir=%s is missing: building it (tiny pretraining in %s, then arith_lora for 120 steps)",
                 target, base)
    py = [sys.executable, "-m"]
    env = dict(os.environ)
    for cmd in ([*py, "train.pretrain", "--config=configs/pretrain.py:tiny", f"--workdir={base}",
                 "--config.train.num_samples=0"],
                [*py, "train.sft", "--config=configs/sft.py:arith_lora", f"--workdir={target}",
                 f"--config.init.workdir={base}", "--config.train.steps=120", "--config.train.eval_every=120",
                 "--config.train.checkpoint_every=120", "--config.train.num_samples=0"]):
        subprocess.run(cmd, check=True, env=env)


def resolve(config, num_devices: int):
    peft.check(config.peft.to_dict())
    if config.peft.method == "prefix":
        raise ValueError("peft.method='prefix' is not supported for RL policies; use full, lora or qlora")
    settings = loss_settings(config.rl)
    if config.reward.kind != "model":
        rewards.make(config.reward.kind, task=config.data.task, pattern=config.reward.pattern)
    elif not config.reward.workdir:
        raise ValueError("reward.kind='model' needs reward.workdir, a reward model's workdir (python -m rl.reward)")
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


def forward(graphdef, params, batch, *, with_aux: bool = False):
    """(logits [B, T, V], values [B, T] or None) of a batch: a policy with a value head (PPO's
    `reward_model.RewardModel` around the decoder) gives both from one pass, a decoder logits only.
    `with_aux` adds a third: the model's auxiliary outputs (MoE's `aux_loss` and routing metrics,
    `Decoder.forward_with_aux`; {} for a dense model)."""
    model = nnx.merge(graphdef, *params) if isinstance(params, tuple) else nnx.merge(graphdef, params)
    if isinstance(model, reward_model.RewardModel):
        return model.logits_and_values(batch["inputs_BT"], positions_BT=batch.get("positions_BT"),
                                       segment_ids_BT=batch.get("segment_ids_BT"), with_aux=with_aux)
    if with_aux:
        logits, aux = apply_with_aux(graphdef, params, batch)
        return logits, None, aux
    return apply(graphdef, params, batch), None


def policy_of(model):
    """The decoder that samples: the model itself, or PPO's policy inside its value-head wrapper."""
    return model.decoder if isinstance(model, reward_model.RewardModel) else model


def make_loss_fn(graphdef, settings, *, temperature: float, max_len: int, beta: float, kl_estimator: str,
                 kl_in_loss: bool, value_coef: float = 0.0, value_clip: float | None = 0.2):
    """loss_fn(params, batch, rng, frozen) for train/state.make_train_step: the variant's
    (numerator / weight) with `weight` stated, so micro-batches equal one batch. With a value head
    (PPO) the clipped value loss of the batch's `old_values_BT` / `returns_BT` is added times
    `value_coef`, aggregated as the policy term so both share the weight. An MoE policy's auxiliary
    losses (load balancing, router z-loss) are added as in pretraining, and its routing metrics
    (`moe_*`) reported (models/moe.py)."""

    def loss_fn(params, batch, rng, frozen=None):
        logits, values, aux = forward(graphdef, params if frozen is None else (params, frozen), batch, with_aux=True)
        aux = dict(aux)
        model_aux = aux.pop("aux_loss", jnp.zeros((), jnp.float32))
        mask = batch["loss_mask_BT"]
        logp = losses.token_logprobs(logits, batch["targets_BT"], temperature)
        kl = losses.kl_penalty(logp, batch["ref_logp_BT"], kl_estimator)
        num, w, m = losses.policy_loss(
            logp, batch.get("old_logp_BT"), batch["advantages_BT"], mask, clip_low=settings["clip_low"],
            clip_high=settings["clip_high"], level=settings["level"], aggregation=settings["aggregation"],
            max_len=max_len, kl_BT=kl if kl_in_loss else None, beta=beta if kl_in_loss else 0.0)
        out = {}
        if "sampler_logp_BT" in batch:  # the update's forward is the scoring pass (Learner.fused)
            sg = jax.lax.stop_gradient
            n = jnp.maximum(mask.sum(), 1.0)
            out["logprob_gap"] = (jnp.abs(sg(logp) - batch["sampler_logp_BT"]) * mask).sum() / n
            out["entropy"] = losses.entropy_from_logits(sg(logits), mask, temperature).sum() / n
            out["kl"] = (sg(kl) * mask).sum() / n
        if values is not None and "returns_BT" in batch:
            v_num, _, vm = losses.value_loss(values, batch["old_values_BT"], batch["returns_BT"], mask, value_clip,
                                             aggregation=settings["aggregation"], max_len=max_len)
            num = num + value_coef * v_num
            m = {**m, **vm}
            out["value_loss"] = v_num / jnp.maximum(w, 1e-9)
        fin = losses.finalize(m)
        loss = num / jnp.maximum(w, 1e-9)
        out.update({k: fin[k] for k in ("clip_fraction", "ratio_mean", "value_clip_fraction", "value_error") if k in fin})
        return loss + model_aux, {"loss": loss, "weight": w, **out, **aux}

    return loss_fn


def make_scorer(graphdef, temperature: float, *, with_values: bool = False):
    """score(params, frozen, batch) -> (log-probs [B, T], entropy [B, T]) of the batch's targets,
    and the value head's [B, T] third when `with_values` (PPO)."""

    @jax.jit
    def score(params, frozen, batch):
        logits, values = forward(graphdef, params if frozen is None else (params, frozen), batch)
        out = (losses.token_logprobs(logits, batch["targets_BT"], temperature),
               losses.entropy_from_logits(logits, batch["loss_mask_BT"], temperature))
        return (*out, values) if with_values else out

    return score


def update_inputs(batch, scores_B, old_logp_BT, ref_logp_BT, values_BT, settings, *, group_size: int, kl,
                  ppo=None):
    """What the update reads besides the rollout batch (numpy [B, T] `loss_mask_BT` in `batch`):
    `(inputs, advantage_values, loss_mask)`.

    PPO (settings["advantage"] == "gae"): per-token rewards, the score on each row's last token and
    -beta * k1 (old - ref) on every token when `kl.mode` is "reward" (`losses.token_rewards`);
    GAE(`ppo.gamma`, `ppo.lam`) against `values_BT`; advantages whitened over the batch's tokens
    when `ppo.whiten`; the inputs carry `old_values_BT` and `returns_BT` for the value loss.
    Otherwise the group estimator on the scores (minus beta * sum k1 per row when `kl.mode` is
    "reward"), one advantage per row; with dynamic sampling (DAPO) rows of groups whose scores
    are all equal leave the loss mask. `advantage_values` are the advantages the statistics
    describe (per mask token for PPO, per row otherwise). `old_logp_BT` None (a fused step: the
    update scores the batch itself) leaves the ratios on-policy; PPO and a KL in the reward need it."""
    mask = np.asarray(batch["loss_mask_BT"], np.float32)
    in_reward = kl.mode == "reward" and kl.beta
    k1 = None if old_logp_BT is None else (np.asarray(old_logp_BT) - np.asarray(ref_logp_BT)) * mask
    scores = jnp.asarray(scores_B, jnp.float32)
    loss_mask = mask
    if settings["advantage"] == "gae":
        token_r = losses.token_rewards(scores, mask, k1 if in_reward else None, float(kl.beta) if in_reward else 0.0)
        adv, returns = losses.gae(token_r, values_BT, mask, float(ppo.gamma), float(ppo.lam))
        if ppo.whiten:
            adv = losses.whiten(adv, mask)
        out = {"advantages_BT": adv, "old_values_BT": jnp.asarray(values_BT), "returns_BT": returns}
        stats = np.asarray(adv)[mask > 0]
    else:
        if in_reward:
            scores = scores - float(kl.beta) * jnp.asarray(k1.sum(-1))
        adv = np.asarray(losses.advantages(scores, group_size, settings["advantage"]))
        if settings["dynamic_sampling"]:
            keep = losses.varied_groups(jnp.asarray(scores_B, jnp.float32), group_size)  # the task's scores
            loss_mask = mask * np.asarray(keep)[:, None]
        out = {"advantages_BT": jnp.asarray(np.broadcast_to(adv[:, None], mask.shape).copy())}
        stats = adv
    out.update(loss_mask_BT=jnp.asarray(loss_mask), ref_logp_BT=jnp.asarray(ref_logp_BT))
    if old_logp_BT is not None:
        out["old_logp_BT"] = jnp.asarray(old_logp_BT)
    return out, (stats if stats.size else np.zeros(1, np.float32)), loss_mask


class Learner:
    """The update half of an RL step: score a rollout batch, compute the update's inputs
    (`update_inputs`), run `rl.epochs` updates. `learn(state, host, scores) -> (state, metrics)`.

    Before the first update the trainer scores the sampled tokens itself (old log-probs, entropy,
    PPO's values) and the reference's; `logprob_gap` compares the first to the sampler's. With one
    update per rollout batch, no value head and no KL in the reward, nothing needs the old
    log-probs before the update, so the update's own forward is the scoring pass (`fused`: ratio
    1, gap and entropy from that forward): one forward fewer per step, same numbers. The reference
    is scored whatever beta is (the `kl` metric is logged at beta 0 too)."""

    def __init__(self, graphdef, frozen, tx, settings, rl, *, temperature: float, ref_params=None, mesh=None,
                 rules=None, post_update=None):
        self.frozen, self.settings, self.rl, self.mesh, self.rules = frozen, settings, rl, mesh, rules
        self.ref_params = ref_params  # None: LoRA, the reference is the policy with every B zero
        self.ppo = rl.algorithm == "ppo"
        self.fused = rl.epochs == 1 and not self.ppo and not (rl.kl.mode == "reward" and rl.kl.beta)
        loss_fn = make_loss_fn(graphdef, settings, temperature=temperature, max_len=rl.max_new_tokens,
                               beta=float(rl.kl.beta), kl_estimator=rl.kl.estimator, kl_in_loss=rl.kl.mode == "loss",
                               value_coef=float(rl.ppo.value_coef), value_clip=rl.ppo.value_clip or None)
        self.update = jax.jit(make_train_step(loss_fn, tx, microbatches=rl.microbatches, post_update=post_update),
                              donate_argnums=(0,))
        self.score = make_scorer(graphdef, temperature, with_values=self.ppo)

    def _place(self, arrays: dict) -> dict:
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in arrays.items()}
        return place_rows(arrays, self.mesh, self.rules)

    def learn(self, state, host: dict, scores) -> tuple[Any, dict]:
        """`host`: a rollout's `Rollout.batch` (numpy, with `sampler_logprobs_BT`); `scores`: [B]
        rewards. Returns the new state and the step's metrics (the update's, averaged over epochs,
        with `kl`, `logprob_gap`, `entropy`, advantage statistics, `trained_rows`, `score_seconds`)."""
        rl, frozen = self.rl, self.frozen
        t0 = time.perf_counter()
        dev = self._place({k: v for k, v in host.items() if k != "sampler_logprobs_BT"})
        ref = self.ref_params if self.ref_params is not None else lora_reference(state.params)
        ref_logp = jax.block_until_ready(self.score(ref, frozen, dev)[0])  # score_seconds counts the work
        mask = host["loss_mask_BT"]
        n_tok = max(float(mask.sum()), 1.0)
        old_logp = values = None
        stats: dict[str, float] = {}
        if not self.fused:
            old_logp, entropy, *vals = self.score(state.params, frozen, dev)
            values = vals[0] if vals else None
            old_np = np.asarray(old_logp)
            stats["logprob_gap"] = float(np.abs(old_np - host["sampler_logprobs_BT"])[mask > 0].sum() / n_tok)
            stats["entropy"] = float((np.asarray(entropy) * mask).sum() / n_tok)
            kl_tok = np.asarray(losses.kl_penalty(old_logp, ref_logp, rl.kl.estimator))
            stats["kl"] = float((kl_tok * mask).sum() / n_tok)
        extra, adv, loss_mask = update_inputs(host, scores, old_logp, ref_logp, values, self.settings,
                                              group_size=rl.group_size, kl=rl.kl, ppo=rl.ppo)
        if self.fused:
            extra["sampler_logp_BT"] = host["sampler_logprobs_BT"]
        dev.update(self._place(extra))
        t_score = time.perf_counter() - t0
        ms = []
        for _ in range(rl.epochs):
            state, m = self.update(state, dev, frozen)
            ms.append(m)
        m = {k: float(v) if np.ndim(v) == 0 else np.asarray(v)  # MoE's per-expert loads stay vectors
             for k, v in jax.device_get(jax.tree.map(lambda *xs: sum(xs) / len(xs), *ms)).items()}
        m.update(stats)
        m.update({"advantage_mean": float(adv.mean()), "advantage_std": float(adv.std()),
                  "advantage_min": float(adv.min()), "advantage_max": float(adv.max()),
                  "trained_rows": float((loss_mask.sum(-1) > 0).sum()), "score_seconds": t_score})
        return state, m


def router_bias_update(model_cfg, *, ppo: bool = False):
    """The train step's `post_update` for an MoE policy with bias balancing (DeepSeek-V3's router
    biases moved after each update from the step's load, `models.moe.balance_router_biases`), on
    the decoder inside PPO's value-head wrapper; None otherwise. A bias not trained (LoRA) stays."""
    if not (model_cfg.moe.enabled and model_cfg.moe.bias_balancing):
        return None
    if not ppo:
        return functools.partial(balance_router_biases, model_cfg)

    def update(old, new, metrics):
        if "decoder" not in new:
            return new
        return {**new, "decoder": balance_router_biases(model_cfg, old["decoder"], new["decoder"], metrics)}

    return update


def place_rows(arrays: dict, mesh, rules) -> dict:
    """[B, T] rollout arrays placed as pretraining's batches are: rows over the batch mesh axes."""
    out = {}
    for k, v in arrays.items():
        spec = logical_to_spec(("batch", "length"), np.shape(v), mesh, rules)
        out[k] = jax.device_put(v, jax.sharding.NamedSharding(mesh, spec))
    return out


def make_reward(reward, task: str):
    """score(texts, examples) -> rewards [B] float32 for `reward` (the config section): a verifier of
    rl/rewards.py (`kind` exact / gsm8k / format), or a reward model (`kind` "model": the
    `python -m rl.reward` run in `reward.workdir`, scoring each prompt and completion as a chat in
    its own tokenizer and template), plus `format_weight` times the format reward."""
    if reward.kind == "model":
        scorer = reward_model.load_reward_model(reward.workdir)

        def base(texts, examples):
            return scorer.score_chats([[{"role": "user", "content": e["prompt"]}] for e in examples], texts)
    else:
        verify = rewards.make(reward.kind, task=task, pattern=reward.pattern)

        def base(texts, examples):
            return [verify(t, e) for t, e in zip(texts, examples)]
    fmt = rewards.make("format", pattern=reward.pattern) if reward.format_weight and reward.kind != "format" else None

    def score(texts, examples) -> np.ndarray:
        r = np.asarray(base(texts, examples), np.float32)
        if fmt is not None:
            r = r + np.float32(reward.format_weight) * np.array([fmt(t, e) for t, e in zip(texts, examples)], np.float32)
        return r

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
        reward_fn = make_reward(config.reward, config.data.task)
        correct_fn = rewards.make("gsm8k" if config.reward.kind == "gsm8k" else "exact", task=config.data.task)
    lifecycle.check_workdir(workdir, resolved, committed_steps(workdir), program="rl.train")
    lifecycle.write_run_files(workdir, resolved, tokenizer_files, enabled=is_main)
    runlog = lifecycle.RunLog(workdir, enabled=is_main)
    chat = sft_data.ChatTokenizer(tokenizer, template)
    mesh = mesh_lib.make_mesh(mesh_spec["shape"])
    rules = mesh_spec["rules"]
    method = config.peft.method
    is_ppo = rl.algorithm == "ppo"
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
        trainable = peft.trainable_filter(method)
        if is_ppo:  # the policy with a value head on its trunk (trained with the policy's parameters)
            model = reward_model.RewardModel(model, seed=tc.seed)
            trainable = reward_model.trainable_filter(method)
        graphdef, trained, frozen = nnx.split(model, trainable, ...)
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
        learner = Learner(graphdef, frozen, tx, settings, rl, temperature=temperature,
                          ref_params=ref_params if method == "full" else None, mesh=mesh, rules=rules,
                          post_update=router_bias_update(model_cfg, ppo=rl.algorithm == "ppo"))

        def current_model(state):
            return policy_of(nnx.merge(graphdef, state.params, frozen))

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
            t1 = time.perf_counter()
            examples = [pool[i] for i in idx for _ in range(rl.group_size)]
            texts = [tokenizer.decode(c[:-1] if c and c[-1] in stop_tokens else c) for c in ro.completions]
            r = reward_fn(texts, examples)
            correct = np.array([correct_fn(t, e) for t, e in zip(texts, examples)], np.float32)
            if rl.overlong_cache:
                r = r + np.asarray(losses.overlong_penalty(jnp.asarray(ro.lengths()), rl.max_new_tokens,
                                                           rl.overlong_cache))
            host = ro.batch(prompt_len=prompt_len, completion_len=rl.max_new_tokens)
            t_reward = time.perf_counter() - t1
            state, m = learner.learn(state, host, r)
            # state.step counts rollout steps (what a resume starts from), not the rl.epochs updates
            state = TrainState(step=jax.device_put(jnp.asarray(step + 1, jnp.int32), state.step.sharding),
                               params=state.params, opt_state=state.opt_state, rng=state.rng)
            total = time.perf_counter() - t0
            lengths = ro.lengths()
            stats = {"reward_mean": float(r.mean()), "reward_std": float(r.std()), "accuracy": float(correct.mean()),
                     "rollout_fraction": t_roll / total, "reward_fraction": t_reward / total,
                     "score_fraction": m.pop("score_seconds") / total,
                     "update_fraction": (total - t_roll - t_reward) / total,
                     "response_length": float(lengths.mean()), "stopped_fraction": float(ro.stopped().mean())}
            return state, {k: jnp.float32(v) for k, v in {**m, **stats}.items()}

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
