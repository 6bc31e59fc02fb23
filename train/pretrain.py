"""Pretrain a decoder-only language model.

    python -m train.pretrain --config=configs/pretrain.py:tiny --workdir=runs/tiny

The loop, top to bottom: resolve the config for the devices present, build the mesh, load
the corpus and tokenizer, create (or restore) the train state and data iterator, then step;
every `log_every` steps write metrics, every `eval_every` measure the held-out loss, every
`checkpoint_every` save. Re-running the same command resumes from the newest good checkpoint
exactly (parameters, optimizer, RNG and data position). At the end: a final evaluation and
checkpoint, `loss.png`, and `samples.txt`.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
from typing import Any

import jax
import numpy as np
from absl import logging

from data import pipeline
from data.sources import check_paths, read_all, specs_from_config
from data.tokenizer import SentencePieceTokenizer, special, with_specials
from data.tokenizer import from_config as tokenizer_from_config
from inference import generate
from models.config import ModelConfig, active_param_count, flops_per_token, param_count
from models.moe import balance_router_biases
from models.sharding import use_rules
from models.pipeline import bubble_fraction, num_microbatches
from models.transformer import abstract_model, merge_params, split_params
from models.ring_attention import zigzag_order
from models.checkpoint import committed_steps
from train import distributed, lifecycle, loop
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer, saved_data_shards
from train.flops import system_peak_flops
from train.loss import lm_loss_fn
from train.metrics import batch_stats
from train.optimizer import make_optimizer, warmup_steps
from train.state import (abstract_state, create_state, make_eval_step, make_train_step, on_device,
                         state_shardings)

TOKENIZER_FILE = "tokenizer.model"
SAMPLES_FILE = "samples.txt"


def resolve_config(config, num_devices: int) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """(model config, mesh {'shape','rules'}, resolved config dict to write as config.json)."""
    model_cfg = ModelConfig.from_dict(config.model.to_dict())
    mesh = mesh_lib.resolve(config.mesh.to_dict(), num_devices, model_cfg, config.data.seq_len)
    if config.data.seq_len > model_cfg.max_seq_len:
        raise ValueError(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    if not config.data.tokenizer.path and config.data.tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"data.tokenizer.vocab_size={config.data.tokenizer.vocab_size} exceeds "
                         f"model.vocab_size={model_cfg.vocab_size}")
    b, m = config.train.batch_size, config.train.microbatches
    shards = mesh_lib.batch_shards(mesh["shape"], mesh["rules"])
    batch_axes = " x ".join(dict(mesh["rules"]).get("batch", ())) or "none"
    if b % m or (b // m) % shards:
        raise ValueError(f"train.batch_size={b} must split into train.microbatches={m} micro-batches each "
                         f"divisible by the {shards} batch shards (mesh {batch_axes})")
    stages = mesh["shape"]["stage"]
    if stages > 1:  # GPipe over the mesh's stage axis (models/pipeline.py); config.json keeps the user's value
        model_cfg = model_cfg.replace(pipeline_stages=stages)
    if model_cfg.pipeline_stages > 1:
        pm = num_microbatches(model_cfg.pipeline_stages, model_cfg.pipeline_microbatches)
        if (b // m) % (pm * shards):
            raise ValueError(f"train.batch_size={b} / train.microbatches={m} = {b // m} sequences per step must "
                             f"split into model.pipeline_microbatches={pm} pipeline micro-batches each divisible "
                             f"by the {shards} batch shards (mesh {batch_axes})")
    if b % jax.process_count():
        raise ValueError(f"train.batch_size={b} is not divisible by the {jax.process_count()} processes")
    if config.train.steps < 0:
        raise ValueError(f"train.steps={config.train.steps} must be >= 0")
    resolved = config.to_dict()
    resolved["mesh"]["shape"] = mesh["shape"]
    resolved["mesh"]["rules"] = [[name, list(axes)] for name, axes in mesh["rules"]]
    resolved["optimizer"]["warmup_steps"] = warmup_steps(config.optimizer, config.train.steps)
    return model_cfg, mesh, resolved


def load_data(config, workdir: pathlib.Path):
    """(tokenizer, train source specs, eval source specs) from the config's `data` section.

    A sentencepiece run keeps its own copy of the tokenizer (`<workdir>/tokenizer.model`, written
    by `run` once the start is valid), so a resumed or sampled run always uses the tokenizer it
    was trained with.
    """
    train_specs = specs_from_config(config.data.sources)
    eval_specs = specs_from_config(config.data.eval_sources)
    own = workdir / TOKENIZER_FILE
    tok_cfg = config.data.tokenizer
    if own.is_file() and tok_cfg.kind == "sentencepiece":
        tokenizer = SentencePieceTokenizer.from_file(own)
    else:
        tokenizer = tokenizer_from_config(tok_cfg, train_specs)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than model.vocab_size="
                         f"{config.model.vocab_size}")
    logging.info("data: train %s; eval %s; tokenizer %s",
                 ", ".join(f"{s.name} ({s.format}, weight {s.weight:g})" for s in train_specs),
                 ", ".join(s.name for s in eval_specs), tokenizer)
    return tokenizer, train_specs, eval_specs


def _data_shards(configured: int, ckpt: Checkpointer, workdir: pathlib.Path) -> int:
    """data.num_shards, or (0 = auto) what the newest checkpoint was saved with, else the process count."""
    steps = ckpt.steps()
    saved = saved_data_shards(workdir, steps[-1]) if steps else 0
    if configured:
        if saved and saved != configured:
            raise ValueError(f"data.num_shards={configured}, but the checkpoint at step {steps[-1]} holds {saved} "
                             f"data shards; resume with --config.data.num_shards={saved} (or 0 = automatic)")
        return configured
    return saved or jax.process_count()


def _sequence_layout(shards: int, seq_len: int):
    """Column order of every batch: zig-zag chunks when the sequence is sharded (ring attention's
    causal load balance; masks use positions, and losses sum over tokens, so nothing else changes)."""
    if shards <= 1:
        return lambda batch: batch
    order = zigzag_order(seq_len, shards)
    return lambda batch: {k: v[:, order] for k, v in batch.items()}


def _device_keys(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: batch[k] for k in pipeline.BATCH_KEYS}


def _global_batch(local: dict[str, np.ndarray], sharding_for) -> dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(sharding_for(v.shape[1:]), v) for k, v in local.items()}


def _prompt_of(text: str, min_chars: int = 40, max_chars: int = 200) -> str:
    """The first lines of a document, at least `min_chars` long (a sampling prompt)."""
    end = text.find("\n", min_chars)
    return text[: end + 1 if 0 < end < max_chars else max_chars]


def _write_samples(path: pathlib.Path, model, tokenizer, prompts: list[str], *, max_new_tokens: int, seed: int):
    ids = [with_specials(tokenizer, tokenizer.encode(p)) for p in prompts]
    outs = generate(model, ids, max_new_tokens=max_new_tokens, temperature=0.8, top_p=0.95,
                    stop_tokens=special(tokenizer.eos_id), seed=seed)
    blocks = []
    for p, o in zip(prompts, outs):
        blocks.append(f"=== prompt ===\n{p}\n=== continuation (T=0.8, top-p 0.95) ===\n{tokenizer.decode(o)}\n")
    path.write_text("\n".join(blocks))
    return blocks


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains per `config` in `workdir`; returns a summary (final losses, steps, throughput, and
    `exit_code`: 0, or 128 + the signal that stopped it).

    Nothing is written before the config is validated (ConfigError), the workdir checked against
    it (lifecycle.WorkdirMismatch) and the tokenizer built: a failed start leaves a new workdir
    empty and an old one as it was.
    """
    workdir = pathlib.Path(workdir)
    distributed.initialize(config.distributed)
    is_main = jax.process_index() == 0
    tc, seq = config.train, config.data.seq_len
    with lifecycle.config_errors():
        model_cfg, mesh_spec, resolved = resolve_config(config, jax.device_count())
        tx, schedule = make_optimizer(config.optimizer, tc.steps)
        guard = lifecycle.NanGuard(tc.nan_policy, tc.nan_max_skips)
        check_paths(specs_from_config(config.data.sources) + specs_from_config(config.data.eval_sources))
        if config.data.tokenizer.path and not pathlib.Path(config.data.tokenizer.path).exists():
            raise FileNotFoundError(f"data.tokenizer.path={config.data.tokenizer.path!r} does not exist")
    lifecycle.check_workdir(workdir, resolved, committed_steps(workdir))
    tokenizer, train_specs, eval_specs = load_data(config, workdir)
    lifecycle.write_run_files(workdir, resolved, enabled=is_main)
    if is_main and isinstance(tokenizer, SentencePieceTokenizer) and not (workdir / TOKENIZER_FILE).is_file():
        tokenizer.save(workdir / TOKENIZER_FILE)
    runlog = lifecycle.RunLog(workdir, enabled=is_main)
    mesh = mesh_lib.make_mesh(mesh_spec["shape"])
    rules = mesh_spec["rules"]
    n_params = param_count(model_cfg)
    flops_tok = flops_per_token(model_cfg, seq)["train"]
    if model_cfg.moe.enabled:
        logging.info("mixture of experts: %d of %d experts per token in %d of %d layers; %s parameters active per "
                     "token", model_cfg.moe.experts_per_token, model_cfg.moe.num_experts, model_cfg.num_moe_layers,
                     model_cfg.num_layers, f"{active_param_count(model_cfg):,}")
    logging.info("model %s: %s parameters, %.3g train FLOPs/token; mesh %s", config.name, f"{n_params:,}",
                 flops_tok, {k: v for k, v in mesh_spec["shape"].items() if v > 1} or "1 device")
    if model_cfg.pipeline_stages > 1:
        s_, m_ = model_cfg.pipeline_stages, num_microbatches(model_cfg.pipeline_stages, model_cfg.pipeline_microbatches)
        logging.info("pipeline: GPipe, %d stages x %d layers, %d micro-batches, bubble fraction %.3f", s_,
                     model_cfg.num_layers // s_, m_, bubble_fraction(s_, m_))
    dc = config.data
    # before the mesh is set: the peak is one device's matmul, which a multi-process mesh would not let run
    peak = system_peak_flops(model_cfg.dtype)

    with jax.set_mesh(mesh), use_rules(rules):
        offload = tc.offload_optimizer
        shardings = state_shardings(model_cfg, tx, mesh, rules, offload_optimizer=offload)
        graphdef, state = create_state(model_cfg, tx, seed=tc.seed, mesh=mesh, rules=rules, offload_optimizer=offload)
        loss_fn = lm_loss_fn(graphdef, z_loss=tc.z_loss)

        ckpt = Checkpointer(workdir, max_to_keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
        num_shards = _data_shards(dc.num_shards, ckpt, workdir)
        shard_ids = pipeline.process_shards(num_shards, jax.process_index(), jax.process_count())
        packing = dict(seq_len=seq, packing=dc.packing, num_packing_bins=dc.num_packing_bins)
        data_iter = pipeline.sharded_source_batches(
            train_specs, tokenizer, batch_size=tc.batch_size, num_shards=num_shards, shard_ids=shard_ids,
            seed=tc.seed, num_epochs=None, shuffle_window=dc.shuffle_window, num_workers=dc.num_workers, **packing)

        restored = ckpt.restore(abstract_state(model_cfg, tx, shardings), data_iter)
        if restored is not None:
            state = restored
        start = int(jax.device_get(state.step))
        writer = lifecycle.open_metrics(workdir, tc.steps, start, restored is not None, runlog, ckpt, enabled=is_main,
                                        peak_flops=peak)
        if writer is None:
            return lifecycle.already_complete(start)

        batch_sharding = lambda tail: mesh_lib.batch_sharding(mesh, (tc.batch_size,) + tail, rules)  # noqa: E731
        batch_sh = {k: batch_sharding((seq,)) for k in pipeline.BATCH_KEYS}
        source_stats = jax.jit(functools.partial(batch_stats, num_sources=len(train_specs)))
        train_step = jax.jit(make_train_step(loss_fn, tx, microbatches=tc.microbatches,
                                             use_dropout=model_cfg.dropout_rate > 0,
                                             opt_device_shardings=on_device(shardings.opt_state) if offload else None,
                                             post_update=functools.partial(balance_router_biases, model_cfg)
                                             if model_cfg.moe.bias_balancing else None),
                             in_shardings=(shardings, batch_sh), out_shardings=(shardings, None),
                             donate_argnums=(0,))
        eval_step = jax.jit(make_eval_step(loss_fn), in_shardings=(shardings.params, batch_sh))

        eval_iter = pipeline.sharded_source_batches(eval_specs, tokenizer, batch_size=tc.batch_size,
                                                    num_shards=num_shards, shard_ids=shard_ids, shuffle=False,
                                                    num_epochs=None, **packing)
        layout = _sequence_layout(mesh_spec["shape"]["sequence"], seq)
        eval_batches = [layout(_device_keys(next(eval_iter))) for _ in range(tc.eval_batches)]

        def evaluate(state) -> dict[str, float]:
            if not eval_batches:
                return {}
            tot, n = 0.0, 0.0
            for b in eval_batches:
                m = jax.device_get(eval_step(state.params, _global_batch(b, batch_sharding)))
                tot, n = tot + float(m["loss_sum"]), n + float(m["num_tokens"])
            loss = tot / max(n, 1.0)
            return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

        def next_batch():
            local = layout(next(data_iter))
            batch = _global_batch(_device_keys(local), batch_sharding)
            src = _global_batch({"source_BT": local["source_BT"]}, batch_sharding)["source_BT"]
            counts, pad = source_stats(src, batch["loss_mask_BT"])
            return batch, {"source_tokens": counts, "padding_fraction": pad}

        state, outcome = loop.run_steps(loop.Parts(
            tc=tc, state=state, start=start, train_step=train_step, next_batch=next_batch, ckpt=ckpt,
            data_iter=data_iter, writer=writer, runlog=runlog, guard=guard, schedule=schedule, evaluate=evaluate,
            tokens_per_step=tc.batch_size * seq, flops_per_token=flops_tok, peak_flops=peak,
            source_names=tuple(s.name for s in train_specs), workdir=workdir))
        summary: dict[str, Any] = {"parameters": n_params, **outcome}
        if not outcome["complete"]:
            writer.close()
            return summary

        if is_main and tc.num_samples > 0 and jax.process_count() == 1:
            prompts = [_prompt_of(r["text"]) for r, _ in zip(read_all(eval_specs[0]), range(tc.num_samples))]
            # decoding runs unpipelined (the KV cache needs every layer on the device): same parameters
            model = merge_params(split_params(abstract_model(model_cfg.replace(pipeline_stages=1)))[0], state.params)
            _write_samples(workdir / SAMPLES_FILE, model, tokenizer, prompts,
                           max_new_tokens=tc.sample_tokens, seed=tc.seed)
        writer.close()
        runlog.event("exit", reason="finished", step=tc.steps, final_eval_loss=summary.get("final_eval_loss"))
        logging.info("done: %s", summary)
        return summary



if __name__ == "__main__":
    lifecycle.program_main(run, "configs/pretrain.py")
