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
import json
import math
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from data import pipeline
from data.sources import check_paths, read_all, specs_from_config
from data.tokenizer import SentencePieceTokenizer, special, with_specials
from data.tokenizer import from_config as tokenizer_from_config
from inference import generate
from models.config import ModelConfig, flops_per_token, param_count
from models.sharding import use_rules
from models.pipeline import bubble_fraction, num_microbatches
from models.transformer import abstract_model, merge_params, split_params
from models.ring_attention import zigzag_order
from models.checkpoint import committed_steps
from train import distributed, lifecycle
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer, saved_data_shards
from configs.cli import parse_flags, quiet_library_logs
from train.flops import system_peak_flops
from train.loss import lm_loss_fn
from train.metrics import MetricsWriter, batch_stats
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
    shards = mesh["shape"]["data"] * mesh["shape"]["fsdp"]
    if b % m or (b // m) % shards:
        raise ValueError(f"train.batch_size={b} must split into train.microbatches={m} micro-batches each "
                         f"divisible by the {shards} batch shards (mesh data x fsdp)")
    stages = mesh["shape"]["stage"]
    if stages > 1:  # GPipe over the mesh's stage axis (models/pipeline.py); config.json keeps the user's value
        model_cfg = model_cfg.replace(pipeline_stages=stages)
    if model_cfg.pipeline_stages > 1:
        pm = num_microbatches(model_cfg.pipeline_stages, model_cfg.pipeline_microbatches)
        if (b // m) % (pm * shards):
            raise ValueError(f"train.batch_size={b} / train.microbatches={m} = {b // m} sequences per step must "
                             f"split into model.pipeline_microbatches={pm} pipeline micro-batches each divisible "
                             f"by the {shards} batch shards (mesh data x fsdp)")
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
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (workdir / "config.json").write_text(json.dumps(resolved, indent=2, default=str))
        if isinstance(tokenizer, SentencePieceTokenizer) and not (workdir / TOKENIZER_FILE).is_file():
            tokenizer.save(workdir / TOKENIZER_FILE)
    runlog = lifecycle.RunLog(workdir, enabled=is_main)
    mesh = mesh_lib.make_mesh(mesh_spec["shape"])
    rules = mesh_spec["rules"]
    n_params = param_count(model_cfg)
    flops_tok = flops_per_token(model_cfg, seq)["train"]
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
        if start >= tc.steps and restored is not None:
            logging.info("run in %s is already complete (step %d of %d)", workdir, start, tc.steps)
            runlog.event("exit", reason="already complete", step=start)
            ckpt.close()
            return {"step": start, "resumed_from": start, "complete": True, "exit_code": 0}
        writer = MetricsWriter(workdir, total_steps=tc.steps, enabled=is_main, resume_step=start)
        runlog.event("resume" if restored is not None else "start", step=start, steps=tc.steps,
                     command=lifecycle.command_line(), peak_flops=peak)

        batch_sharding = lambda tail: mesh_lib.batch_sharding(mesh, (tc.batch_size,) + tail, rules)  # noqa: E731
        batch_sh = {k: batch_sharding((seq,)) for k in pipeline.BATCH_KEYS}
        source_stats = jax.jit(functools.partial(batch_stats, num_sources=len(train_specs)))
        train_step = jax.jit(make_train_step(loss_fn, tx, microbatches=tc.microbatches,
                                             use_dropout=model_cfg.dropout_rate > 0,
                                             opt_device_shardings=on_device(shardings.opt_state) if offload else None),
                             in_shardings=(shardings, batch_sh), out_shardings=(shardings, None),
                             donate_argnums=(0,))
        eval_step = jax.jit(make_eval_step(loss_fn), in_shardings=(shardings.params, batch_sh))

        eval_iter = pipeline.sharded_source_batches(eval_specs, tokenizer, batch_size=tc.batch_size,
                                                    num_shards=num_shards, shard_ids=shard_ids, shuffle=False,
                                                    num_epochs=None, **packing)
        layout = _sequence_layout(mesh_spec["shape"]["sequence"], seq)
        eval_batches = [layout(_device_keys(next(eval_iter))) for _ in range(tc.eval_batches)]

        def evaluate(params) -> dict[str, float]:
            tot, n = 0.0, 0.0
            for b in eval_batches:
                m = jax.device_get(eval_step(params, _global_batch(b, batch_sharding)))
                tot, n = tot + float(m["loss_sum"]), n + float(m["num_tokens"])
            loss = tot / max(n, 1.0)
            return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

        tokens_per_step = tc.batch_size * seq
        faults = lifecycle.Faults.from_env()
        summary: dict[str, Any] = {"resumed_from": start, "parameters": n_params}

        last_eval = -1
        if start == 0 and tc.eval_every > 0 and eval_batches:
            ev = evaluate(state.params)
            writer.write(0, ev)
            writer.progress(0, ev)
            summary["initial_eval_loss"] = ev["eval_loss"]
            last_eval = 0

        stops = lifecycle.StopRequests(distributed=jax.process_count() > 1)
        last_t, last_step = time.perf_counter(), start
        running, stopped, done = None, None, start

        def log_line(done: int) -> dict[str, float]:
            """Writes the train line of the steps since the previous one."""
            nonlocal running, last_t, last_step
            host = jax.device_get(running)
            running = None
            per_source = host.pop("source_tokens")
            steps, good, skipped = done - last_step, float(host.pop("good_steps")), float(host.pop("nonfinite"))
            # loss, accuracy and grad norm are means over the interval's good steps (None if it has none)
            m = {k: (float(v) / good if good else None) if k in lifecycle.NanGuard.MASKED else float(v) / steps
                 for k, v in host.items()}
            now = time.perf_counter()
            tps = steps * tokens_per_step / (now - last_t)
            last_t, last_step = now, done
            line = {"loss": m["loss"], "lr": float(schedule(done - 1)), "grad_norm": m["grad_norm"],
                    "tokens_per_sec": tps, "mfu": tps * flops_tok / peak, "accuracy": m["accuracy"],
                    "padding_fraction": m["padding_fraction"]}
            if len(train_specs) > 1:  # tokens per source over the interval (summing lines gives totals)
                line.update({f"tokens_{s.name}": float(c) for s, c in zip(train_specs, per_source)})
            if tc.z_loss:
                line["z_loss"] = m["z_loss"]
            if skipped:
                line["skipped_steps"] = skipped
            writer.write(done, line)
            writer.progress(done, line)
            return line

        try:
            for step in range(start, tc.steps):
                local = layout(next(data_iter))
                batch = _global_batch(_device_keys(local), batch_sharding)
                src = _global_batch({"source_BT": local["source_BT"]}, batch_sharding)["source_BT"]
                state, metrics = train_step(state, faults.corrupt(batch, step + 1))
                counts, pad = source_stats(src, batch["loss_mask_BT"])
                metrics = guard.observe(dict(metrics, source_tokens=counts, padding_fraction=pad))
                # sums stay on the device: no host sync between log lines (the `stop` policy syncs)
                running = metrics if running is None else jax.tree.map(jnp.add, running, metrics)
                done = step + 1
                if done % tc.log_every == 0 or done == tc.steps:
                    log_line(done)
                stopped = guard.verdict(done, at_log_line=done % tc.log_every == 0)
                if stopped:
                    break
                if tc.eval_every > 0 and done % tc.eval_every == 0 and done != tc.steps and eval_batches:
                    jax.block_until_ready(state)  # the steps dispatched so far are training time
                    eval_start = time.perf_counter()
                    ev = evaluate(state.params)
                    writer.write(done, ev)
                    writer.progress(done, ev)
                    last_eval = done
                    writer.plot()
                    # the next line's interval keeps its steps but not this time: tokens_per_sec is training throughput
                    last_t += time.perf_counter() - eval_start
                if tc.checkpoint_every > 0 and done % tc.checkpoint_every == 0 and done != tc.steps:
                    ckpt.save(state, data_iter)
                faults.after_step(done, ckpt)
                if stops.should_stop(done):
                    stopped = {"reason": stops.reason, "exit_code": stops.exit_code}
                    break
        finally:
            stops.close()

        if stopped:  # a signal, a preemption notice or the NaN guard: keep every step done so far
            if running is not None:
                log_line(done)
            ckpt.save(state, data_iter, force=True)
            ckpt.close()
            writer.plot()
            writer.close()
            runlog.event("exit", step=done, **{k: v for k, v in stopped.items() if k != "exit_code"})
            logging.warning("stopped at step %d of %d (%s); checkpoint saved in %s: re-run the same command to "
                            "resume", done, tc.steps, stopped.get("message", stopped["reason"]), workdir)
            return {**summary, "step": done, "complete": False, **stopped}

        if eval_batches and last_eval != tc.steps:
            ev = evaluate(state.params)
            writer.write(tc.steps, ev)
            writer.progress(tc.steps, ev)
            summary.update(final_eval_loss=ev["eval_loss"], final_eval_ppl=ev["eval_ppl"])
        ckpt.save(state, data_iter, force=True)
        ckpt.close()
        writer.plot()
        if is_main and tc.num_samples > 0 and jax.process_count() == 1:
            prompts = [_prompt_of(r["text"]) for r, _ in zip(read_all(eval_specs[0]), range(tc.num_samples))]
            # decoding runs unpipelined (the KV cache needs every layer on the device): same parameters
            model = merge_params(split_params(abstract_model(model_cfg.replace(pipeline_stages=1)))[0], state.params)
            _write_samples(workdir / SAMPLES_FILE, model, tokenizer, prompts,
                           max_new_tokens=tc.sample_tokens, seed=tc.seed)
        writer.close()
        summary.update(step=tc.steps, complete=True, exit_code=0)
        if metrics is not None:
            summary["final_train_loss"] = float(jax.device_get(metrics["loss"]))
        runlog.event("exit", reason="finished", step=tc.steps, final_eval_loss=summary.get("final_eval_loss"))
        logging.info("done: %s", summary)
        return summary


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; everything is set through --config.*")
    quiet_library_logs()
    config = _CONFIG.value
    workdir = _WORKDIR.value or os.path.join("runs", config.name)
    sys.exit(lifecycle.run_program(run, config, workdir))


if __name__ == "__main__":
    # flags are defined only when run as a program, so tests and other programs can import run()
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/pretrain.py", "Experiment config (file:preset).")
    _WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<preset>).")
    app.run(main, flags_parser=parse_flags)
