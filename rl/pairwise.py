"""What the two preference programs (rl/reward.py, rl/dpo.py) share, as small functions.

Both start like SFT (train/sft.py: the base, its tokenizer, the PEFT method, the resolved config)
and train on batches of chosen / rejected pairs (data/preferences.py) with pretraining's loop
(train/loop.py). Here: the checked config and prepared workdir (`start`), the trained / frozen
split on the mesh, the pair data (training iterator and held-out batches), and the loop's parts
(`loop_parts`: resume, the jitted step, pair batches on the devices, the held-out evaluation).
Each program's `run` reads top to bottom with these.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from data import pipeline, preferences
from data.sft import ChatTokenizer, chat_template_for
from data.sources import check_paths, split_heldout
from models.checkpoint import committed_steps
from models.moe import balance_router_biases
from models.sharding import logical_to_spec, named_shardings
from train import lifecycle, loop
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer
from train.flops import system_peak_flops
from train.optimizer import make_optimizer
from train.sft import _axes_tree, base_tokenizer, generation_stops, resolve_config
from train.state import TrainState, make_train_step

PAIR_KEYS = preferences.PAIR_KEYS
COUNTED = ("truncated_pairs", "dropped_pairs")  # summed over a log interval


def resolve(config, num_devices: int):
    """(model config, mesh, resolved config dict) as SFT resolves them (train/sft.py), after checking
    the preference data fields."""
    dc = config.data
    if dc.render not in preferences.RENDERS:
        raise ValueError(f"data.render={dc.render!r} is not valid; expected one of {preferences.RENDERS}")
    if not 0.0 <= dc.eval_fraction < 1.0:
        raise ValueError(f"data.eval_fraction={dc.eval_fraction} must be in [0, 1)")
    return resolve_config(config, num_devices)


@dataclasses.dataclass
class Start:
    """What a preference program knows once its config is checked and its workdir prepared."""

    model_cfg: Any  # the base's ModelConfig with the run's dtypes
    resolved: dict  # config.json
    seq: int  # data.seq_len, clamped to the base's max_seq_len
    tx: Any  # the optimizer
    schedule: Callable
    guard: lifecycle.NanGuard
    train_specs: list
    eval_specs: list  # eval sources, or the held-out side of the training sources
    tokenizer: Any
    template: str  # the chat template
    stops: list  # token ids generation stops at (EOS, the template's end of turn)
    mesh: Any
    rules: Any
    peak_flops: float


def start(config, workdir: pathlib.Path, *, program: str) -> Start:
    """Checks the config (one-line errors before anything is written, as train/lifecycle.py wants),
    then refuses another run's workdir, writes config.json and the base's tokenizer files, and
    builds the mesh."""
    tc = config.train
    with lifecycle.config_errors():
        model_cfg, mesh_spec, resolved = resolve(config, jax.device_count())
        tx, schedule = make_optimizer(config.optimizer, tc.steps)
        guard = lifecycle.NanGuard(tc.nan_policy, tc.nan_max_skips)
        train_specs, eval_specs = data_specs(config.data)
        tokenizer, tokenizer_files = base_tokenizer(config)
        template = chat_template_for(tokenizer, config.data.chat_template)
    lifecycle.check_workdir(workdir, resolved, committed_steps(workdir), program=program)
    lifecycle.write_run_files(workdir, resolved, tokenizer_files, enabled=jax.process_index() == 0)
    stops = generation_stops(ChatTokenizer(tokenizer, template), tokenizer_files) if config.data.render == "chat" \
        else [tokenizer.eos_id]
    return Start(model_cfg=model_cfg, resolved=resolved, seq=resolved["data"]["seq_len"], tx=tx, schedule=schedule,
                 guard=guard, train_specs=train_specs, eval_specs=eval_specs, tokenizer=tokenizer, template=template,
                 stops=stops, mesh=mesh_lib.make_mesh(mesh_spec["shape"]), rules=mesh_spec["rules"],
                 peak_flops=system_peak_flops(model_cfg.dtype))


def data_specs(dc) -> tuple[list, list]:
    """(training sources, held-out sources): `data.eval_sources` when it names any, else each
    training source's held-out split (`data.eval_fraction`, data/sources.py `split_heldout`, as SFT
    has it; none at 0)."""
    train = preferences.specs_from_config(dc.sources)
    if not train:
        raise ValueError("data.sources is empty: give at least one source of preference pairs")
    if list(dc.eval_sources.keys()):
        specs = (train, preferences.specs_from_config(dc.eval_sources))
    elif dc.eval_fraction:
        specs = split_heldout(train, fraction=dc.eval_fraction, min_records=dc.eval_min_records,
                              max_records=dc.eval_max_records)
    else:
        specs = (train, [])
    check_paths(specs[0] + specs[1])
    return specs


def split_on_mesh(model, trainable, mesh, rules):
    """(graphdef, trained params, frozen rest, their shardings, trained count): `model` split into
    what `trainable` selects and the rest, as pure dicts placed per their logical axes."""
    graphdef, trained, rest = nnx.split(model, trainable, ...)
    trained_sh = named_shardings(_axes_tree(trained), nnx.to_pure_dict(trained), mesh, rules)
    rest_sh = named_shardings(_axes_tree(rest), nnx.to_pure_dict(rest), mesh, rules)
    params = jax.device_put(nnx.to_pure_dict(trained), trained_sh)
    rest = jax.device_put(nnx.to_pure_dict(rest), rest_sh)
    n = sum(np.size(x) for x in jax.tree.leaves(params))
    return graphdef, params, rest, n


def new_state(params, tx, seed: int, mesh) -> TrainState:
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                      opt_state=jax.jit(tx.init)(params),
                      rng=jax.device_put(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)), replicated))


def pair_data(config, s: Start):
    """(training iterator (checkpointable, this process's shards), held-out batches (a list))."""
    dc, tc = config.data, config.train
    num_shards = dc.num_shards or jax.process_count()
    shard_ids = pipeline.process_shards(num_shards, jax.process_index(), jax.process_count())
    kw = dict(seq_len=s.seq, chat_template=s.template, render=dc.render, truncation=dc.truncation)
    data_iter = preferences.sharded_preference_batches(
        s.train_specs, s.tokenizer, batch_size=tc.batch_size, num_shards=num_shards, shard_ids=shard_ids, seed=tc.seed,
        shuffle_window=dc.shuffle_window, num_workers=dc.num_workers, **kw)
    eval_batches = preferences.eval_pair_batches(s.eval_specs, s.tokenizer, batch_size=tc.batch_size,
                                                 num_pairs=tc.eval_pairs if s.eval_specs else 0,
                                                 num_shards=num_shards, shard_ids=shard_ids, **kw)
    return data_iter, eval_batches


def pair_shardings(mesh, rules, batch_size: int, seq: int) -> dict[str, NamedSharding]:
    """Shardings of the PAIR_KEYS arrays [P, 2, T]: pairs over the batch axes, never split."""
    spec = logical_to_spec(("batch", None, "length"), (batch_size, 2, seq), mesh, rules)
    return {k: NamedSharding(mesh, spec) for k in PAIR_KEYS}


def global_pairs(local: dict, shardings: dict) -> dict:
    """This process's pair batch as global arrays."""
    return {k: jax.make_array_from_process_local_data(shardings[k], local[k]) for k in PAIR_KEYS}


def batch_stats(local: dict, num_sources: int) -> dict[str, np.ndarray]:
    """Host statistics of a pair batch for the train lines: response tokens per source, the share of
    positions that are padding / response tokens, overlong pairs truncated or dropped."""
    mask = local["loss_mask_BCT"]
    per_pair = mask.sum(axis=(1, 2))
    counts = np.array([per_pair[local["source_B"] == i].sum() for i in range(num_sources)], np.float32)
    c = preferences.pair_counts(local)
    return {"source_tokens": counts, "padding_fraction": np.float32((local["segment_ids_BCT"] == 0).mean()),
            "trained_token_fraction": np.float32(mask.mean()), "truncated_pairs": np.float32(c["truncated"]),
            "dropped_pairs": np.float32(c["dropped"])}


def loop_parts(config, s: Start, workdir, runlog, state, frozen, loss_fn: Callable, *, trained: int,
               flops_per_token: float, extra_eval: Callable[[Any], dict] | None = None):
    """(everything train/loop.py's `run_steps` needs, the step the run starts at), the run resumed
    from its newest checkpoint (the parts None when it is already complete): the pair data, the step of train/state.py
    jitted with the state's, the pairs' and `frozen`'s shardings (the state donated), the held-out
    pair evaluation (`make_eval`) plus `extra_eval(state)`, and the next pair batch on the devices
    with its statistics."""
    tc = config.train
    ckpt = Checkpointer(workdir, max_to_keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
    data_iter, eval_batches = pair_data(config, s)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = ckpt.restore(abstract, data_iter)
    state = restored if restored is not None else state
    start = int(jax.device_get(state.step))
    writer = lifecycle.open_metrics(workdir, tc.steps, start, restored is not None, runlog, ckpt,
                                    enabled=jax.process_index() == 0, peak_flops=s.peak_flops, trained_parameters=trained)
    if writer is None:
        return None, start
    pair_sh = pair_shardings(s.mesh, s.rules, tc.batch_size, s.seq)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    use_dropout = (s.model_cfg.dropout_rate > 0
                   or (config.peft.method in ("lora", "qlora") and config.peft.lora.dropout > 0))
    post_update = (functools.partial(balance_router_biases, s.model_cfg)
                   if s.model_cfg.moe.enabled and s.model_cfg.moe.bias_balancing else None)
    train_step = jax.jit(make_train_step(loss_fn, s.tx, microbatches=tc.microbatches, use_dropout=use_dropout,
                                         post_update=post_update),
                         in_shardings=(shardings, pair_sh, jax.tree.map(lambda x: x.sharding, frozen)),
                         out_shardings=(shardings, None), donate_argnums=(0,))
    evaluate_pairs = make_eval(loss_fn, pair_sh, eval_batches, frozen)

    def evaluate(state) -> dict[str, float]:
        return {**evaluate_pairs(state.params), **(extra_eval(state) if extra_eval else {})}

    def next_batch():
        local = next(data_iter)
        return global_pairs(local, pair_sh), batch_stats(local, len(s.train_specs))

    return loop.Parts(tc=tc, state=state, start=start, train_step=train_step, next_batch=next_batch, ckpt=ckpt,
                      data_iter=data_iter, writer=writer, runlog=runlog, guard=s.guard, schedule=s.schedule,
                      evaluate=evaluate, tokens_per_step=2 * tc.batch_size * s.seq, flops_per_token=flops_per_token,
                      peak_flops=s.peak_flops, source_names=tuple(sp.name for sp in s.train_specs), summed=COUNTED,
                      frozen=frozen, workdir=workdir), start


def make_eval(loss_fn: Callable, shardings: dict, eval_batches: list, frozen) -> Callable[[Any], dict[str, float]]:
    """evaluate(params) -> {"eval_<metric>": mean over the held-out pairs} of every metric the loss
    reports ({} without held-out pairs)."""
    if not eval_batches:
        return lambda params: {}
    step = jax.jit(lambda params, batch, frozen: loss_fn(params, batch, None, frozen)[1])
    batches = [global_pairs(b, shardings) for b in eval_batches]

    def evaluate(params) -> dict[str, float]:
        sums: dict[str, float] = {}
        total = 0.0
        for b in batches:
            m = jax.device_get(step(params, b, frozen))
            w = float(m.pop("weight"))
            m.pop("z_loss", None)
            total += w
            for k, v in m.items():
                if np.ndim(v) == 0:  # scalars (MoE's per-expert load vectors are training metrics only)
                    sums[k] = sums.get(k, 0.0) + float(v) * w
        return {f"eval_{k}": v / max(total, 1.0) for k, v in sums.items()}

    return evaluate
