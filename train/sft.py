"""Supervised fine-tuning: full, LoRA, QLoRA or prefix tuning on chat / instruction data.

    python -m train.sft --config=configs/sft.py:arith_lora --workdir=runs/arith_lora \\
        --config.init.workdir=runs/tiny

The loop is pretraining's (train/loop.py: logging, evaluation, checkpoints, exact resume,
signals, the NaN guard); what differs is the start and the data. Top to bottom: load the base
(`init.workdir`: any Loom workdir; or `init.hf_dir`: a Hugging Face directory) with its
tokenizer, put the PEFT method on it (models/peft.py), split the model into what is trained and
what is frozen (the frozen part is an argument of every step, never differentiated, never in the
optimizer or the checkpoint), then train on chat batches (data/sft.py: the loss on assistant
tokens only). Evaluations give the held-out loss and, for sources with exact answers (the
`synthetic` format), `eval_accuracy`: held-out prompts answered greedily through
`inference.generate` and checked by the task's verifier. Without eval sources the held-out
examples are a split of the training sources (`data.eval_fraction`), whose chats' last answers
samples.txt shows next to the model's; generation stops at EOS and the chat template's end-of-turn
token. A config with a `context` section (the long_context preset, a base's context extended by
RoPE scaling) also reports perplexity at L, 2L, ... before and after (evals/long_context.py).
The workdir keeps what training changed (every parameter for `full`, the adapters or prefixes
otherwise), the resolved config with the base's model section, and the base's tokenizer files;
`models.checkpoint.load(workdir)` gives the fine-tuned model.
"""

from __future__ import annotations

import functools
import json
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from data import pipeline, sft
from data import synthetic
from data.sources import check_paths, read_all, split_heldout, synthetic_seed
from data.tokenizer import SentencePieceTokenizer
from evals.long_context import REPORT_FILE, ContextReport, heldout_pieces, report_lengths
from inference import generate
from inference.loading import checkpoint_kind, load_tokenizer
from models import peft
from models.checkpoint import committed_steps, load_base, read_run_config
from models.config import ModelConfig, flops_per_token, param_count
from models.moe import balance_router_biases
from models.sharding import named_shardings, use_rules
from train import distributed, lifecycle, loop
from train import mesh as mesh_lib
from train.checkpoint import Checkpointer
from train.flops import system_peak_flops
from train.loss import lm_loss_fn
from train.optimizer import make_optimizer, warmup_steps
from train.state import TrainState, make_eval_step, make_train_step

SAMPLES_FILE = "samples.txt"
TOKENIZER_SUBDIR = "tokenizer"
# tokenizer files a Hugging Face base brings (copied into the workdir, so export has them)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                      "tokenizer.model", "generation_config.json")


def base_config(config) -> tuple[ModelConfig, dict[str, Any] | None]:
    """(the base's model config as it is, the base's `hf` section or None)."""
    init = config.init
    if bool(init.workdir) == bool(init.hf_dir):
        raise ValueError("set exactly one of init.workdir and init.hf_dir (the base model); " + init.how
                         if not init.workdir else
                         f"init.workdir={init.workdir!r} and init.hf_dir={init.hf_dir!r} are both set; keep one")
    path = pathlib.Path(init.workdir or init.hf_dir)
    kind = checkpoint_kind(path)  # FileNotFoundError / ValueError name the path
    if init.workdir and kind != "loom":
        raise ValueError(f"init.workdir={init.workdir!r} is a Hugging Face directory; pass it as init.hf_dir")
    if init.hf_dir and kind != "hf":
        raise ValueError(f"init.hf_dir={init.hf_dir!r} is a Loom workdir; pass it as init.workdir")
    if kind == "loom":
        run = read_run_config(path)
        cfg, hf_section = ModelConfig.from_dict(run["model"]), run.get("hf")
    else:
        from models.hf import families, read_hf_config

        hf_config = read_hf_config(path)
        cfg = families.from_hf_config(hf_config, where=str(path / "config.json"))
        hf_section = {"architecture": families.architecture_of(hf_config), "config": hf_config}
    return cfg, hf_section


def base_model_config(config) -> tuple[ModelConfig, dict[str, Any] | None]:
    """(the base's model config with this run's dtype and context overrides, the base's `hf`
    section or None)."""
    cfg, hf_section = base_config(config)
    overrides = {k: v for k, v in (("dtype", config.model.dtype), ("param_dtype", config.model.param_dtype)) if v}
    if config.peft.method == "qlora" and "dtype" not in overrides:
        overrides["dtype"] = "bfloat16"  # QLoRA computes in bf16 over the NF4 base
    overrides.update(context_overrides(config.model, cfg))
    return cfg.replace(**overrides, pipeline_stages=1), hf_section


def resolve_config(config, num_devices: int) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
    """(model config, mesh {'shape','rules'}, resolved config dict for config.json)."""
    peft.check(config.peft.to_dict())
    if config.data.truncation not in sft.TRUNCATIONS:
        raise ValueError(f"data.truncation={config.data.truncation!r} is not valid; expected one of {sft.TRUNCATIONS}")
    model_cfg, hf_section = base_model_config(config)
    seq = config.data.seq_len or model_cfg.max_seq_len
    if seq > model_cfg.max_seq_len:
        logging.warning("data.seq_len=%d is above the base's max_seq_len=%d: using %d", seq, model_cfg.max_seq_len,
                        model_cfg.max_seq_len)
        seq = model_cfg.max_seq_len
    if seq < 2:
        raise ValueError(f"data.seq_len={seq} must be >= 2")
    mesh = mesh_lib.resolve(config.mesh.to_dict(), num_devices, model_cfg, seq)
    if mesh["shape"]["stage"] > 1 or mesh["shape"]["sequence"] > 1:
        raise ValueError(f"mesh {mesh['shape']}: fine-tuning runs on data / fsdp / tensor meshes (no pipeline "
                         "stages or sequence sharding)")
    b, m = config.train.batch_size, config.train.microbatches
    shards = mesh["shape"]["data"] * mesh["shape"]["fsdp"]
    if b % m or (b // m) % shards:
        raise ValueError(f"train.batch_size={b} must split into train.microbatches={m} micro-batches each "
                         f"divisible by the {shards} batch shards (mesh data x fsdp)")
    if config.train.steps < 0:
        raise ValueError(f"train.steps={config.train.steps} must be >= 0")
    resolved = config.to_dict()
    resolved["model"] = model_cfg.to_dict()
    resolved["data"]["seq_len"] = seq
    resolved["mesh"]["shape"] = mesh["shape"]
    resolved["mesh"]["rules"] = [[name, list(axes)] for name, axes in mesh["rules"]]
    resolved["optimizer"]["warmup_steps"] = warmup_steps(config.optimizer, config.train.steps)
    if hf_section:
        resolved["hf"] = hf_section
    return model_cfg, mesh, resolved


def base_tokenizer(config):
    """The base's tokenizer, and the files to copy into the workdir ({relative name: source}):
    a Hugging Face tokenizer's files go to `tokenizer/` (where `models.hf import` puts them and
    `models.hf export` reads them), a Loom sentencepiece model to `tokenizer.model`."""
    if config.init.hf_dir:
        path = pathlib.Path(config.init.hf_dir)
        files = {f"{TOKENIZER_SUBDIR}/{f}": path / f for f in HF_TOKENIZER_FILES if (path / f).is_file()}
        return load_tokenizer(path), files
    base = pathlib.Path(config.init.workdir)
    if (base / TOKENIZER_SUBDIR).is_dir():
        files = {f"{TOKENIZER_SUBDIR}/{f.name}": f for f in (base / TOKENIZER_SUBDIR).iterdir() if f.is_file()}
        return load_tokenizer(base / TOKENIZER_SUBDIR), files
    if (base / "tokenizer.model").is_file():
        return SentencePieceTokenizer.from_file(base / "tokenizer.model"), {"tokenizer.model": base / "tokenizer.model"}
    raise FileNotFoundError(f"init.workdir={str(base)!r} has no tokenizer ({TOKENIZER_SUBDIR}/ or tokenizer.model)")


def _axes_tree(state: nnx.State):
    """Logical axes of each array of an NNX state, as a nested dict like its pure dict."""
    out: dict = {}
    for path, var in nnx.to_flat_state(state):
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        axes = var.get_metadata().get("axes")
        node[path[-1]] = tuple(axes) if axes is not None and len(axes) == np.ndim(var[...]) else (None,) * np.ndim(var[...])
    return out


def exact_match(model, tokenizer, chat, examples: list[dict], task: str, *, max_new_tokens: int,
                stops: list[int]) -> float:
    """Share of `examples` ({"prompt", "answer"}) whose greedy completion the task's verifier accepts."""
    prompts = [chat.prompt_ids([{"role": "user", "content": e["prompt"]}]) for e in examples]
    texts = answers(model, tokenizer, prompts, stops, max_new_tokens=max_new_tokens)
    return float(np.mean([synthetic.verify(task, t, e["answer"]) for t, e in zip(texts, examples)]))


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Fine-tunes per `config` in `workdir`; returns a summary (as train.pretrain.run does)."""
    workdir = pathlib.Path(workdir)
    distributed.initialize(config.distributed)
    is_main = jax.process_index() == 0
    tc = config.train
    with lifecycle.config_errors():
        model_cfg, mesh_spec, resolved = resolve_config(config, jax.device_count())
        seq = resolved["data"]["seq_len"]
        tx, schedule = make_optimizer(config.optimizer, tc.steps)
        guard = lifecycle.NanGuard(tc.nan_policy, tc.nan_max_skips)
        train_specs, eval_specs = data_specs(config.data)
        check_paths(train_specs + eval_specs)
        tokenizer, tokenizer_files = base_tokenizer(config)
        template = sft.chat_template_for(tokenizer, config.data.chat_template)
        context_cfg = config.get("context")  # a perplexity-by-context-length report (the long_context preset)
        if context_cfg is not None and context_cfg.eval_sequences > 0 and all(s.schema != "text" for s in eval_specs):
            raise ValueError("context.eval_sequences > 0 scores held-out text: give data.eval_sources with "
                             "schema='text' (or set context.eval_sequences=0)")
    lifecycle.check_workdir(workdir, resolved, committed_steps(workdir))
    lifecycle.write_run_files(workdir, resolved, tokenizer_files, enabled=is_main)
    runlog = lifecycle.RunLog(workdir, enabled=is_main)
    chat = sft.ChatTokenizer(tokenizer, template)
    stops = generation_stops(chat, tokenizer_files)
    mesh = mesh_lib.make_mesh(mesh_spec["shape"])
    rules = mesh_spec["rules"]
    method = config.peft.method
    flops_tok = flops_per_token(model_cfg, seq)["train"]
    peak = system_peak_flops(model_cfg.dtype)

    with jax.set_mesh(mesh), use_rules(rules):
        base, _ = load_base({"workdir": config.init.workdir, "hf_dir": config.init.hf_dir, "step": config.init.step},
                            model_cfg)
        model = peft.apply(base, config.peft.to_dict(), seed=tc.seed)
        graphdef, trained, frozen = nnx.split(model, peft.trainable_filter(method), ...)
        n_trained = sum(np.size(x) for x in jax.tree.leaves(nnx.to_pure_dict(trained)))
        logging.info("base %s: %s parameters; %s trains %s of them (%.3g%%)", config.init.workdir or config.init.hf_dir,
                     f"{param_count(model_cfg):,}", method, f"{n_trained:,}", 100 * n_trained / param_count(model_cfg))
        trained_sh = named_shardings(_axes_tree(trained), nnx.to_pure_dict(trained), mesh, rules)
        frozen_sh = named_shardings(_axes_tree(frozen), nnx.to_pure_dict(frozen), mesh, rules)
        params = jax.device_put(nnx.to_pure_dict(trained), trained_sh)
        frozen = jax.device_put(nnx.to_pure_dict(frozen), frozen_sh)
        del base, model, trained
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        opt_state = jax.jit(tx.init)(params)
        state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), replicated), params=params,
                           opt_state=opt_state,
                           rng=jax.device_put(jax.random.key_data(jax.random.fold_in(jax.random.key(tc.seed), 1)),
                                              replicated))
        shardings = jax.tree.map(lambda x: x.sharding, state)
        loss_fn = lm_loss_fn(graphdef, z_loss=tc.z_loss)

        ckpt = Checkpointer(workdir, max_to_keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
        dc = config.data
        num_shards = dc.num_shards or jax.process_count()
        shard_ids = pipeline.process_shards(num_shards, jax.process_index(), jax.process_count())
        data_kw = dict(seq_len=seq, chat_template=template, truncation=dc.truncation, packing=dc.packing,
                       num_packing_bins=dc.num_packing_bins)
        data_iter = sft.sharded_sft_batches(train_specs, tokenizer, batch_size=tc.batch_size, num_shards=num_shards,
                                            shard_ids=shard_ids, seed=tc.seed, shuffle_window=dc.shuffle_window,
                                            num_workers=dc.num_workers, **data_kw)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
        restored = ckpt.restore(abstract, data_iter)
        if restored is not None:
            state = restored
        start = int(jax.device_get(state.step))
        writer = lifecycle.open_metrics(workdir, tc.steps, start, restored is not None, runlog, ckpt, enabled=is_main,
                                        peak_flops=peak, trained_parameters=n_trained)
        if writer is None:
            return lifecycle.already_complete(start)

        batch_sharding = lambda tail: mesh_lib.batch_sharding(mesh, (tc.batch_size,) + tail, rules)  # noqa: E731
        batch_sh = {k: batch_sharding((seq,)) for k in pipeline.BATCH_KEYS}
        use_dropout = model_cfg.dropout_rate > 0 or (method in ("lora", "qlora") and config.peft.lora.dropout > 0)
        # MoE bias balancing (models/moe.py) when the router biases are trained here (not frozen under adapters)
        post_update = functools.partial(balance_router_biases, model_cfg) if model_cfg.moe.bias_balancing else None
        train_step = jax.jit(make_train_step(loss_fn, tx, microbatches=tc.microbatches, use_dropout=use_dropout,
                                             post_update=post_update),
                             in_shardings=(shardings, batch_sh, frozen_sh), out_shardings=(shardings, None),
                             donate_argnums=(0,))
        eval_step = jax.jit(make_eval_step(loss_fn), in_shardings=(shardings.params, batch_sh, frozen_sh))

        def global_batch(local):
            return {k: jax.make_array_from_process_local_data(batch_sharding(local[k].shape[1:]), local[k])
                    for k in pipeline.BATCH_KEYS}

        eval_batches = []
        if eval_specs and tc.eval_batches > 0:
            eval_iter = sft.sharded_sft_batches(eval_specs, tokenizer, batch_size=tc.batch_size, num_shards=num_shards,
                                                shard_ids=shard_ids, shuffle=False, drop_remainder=False, **data_kw)
            eval_batches = [next(eval_iter) for _ in range(tc.eval_batches)]
        # held-out questions with exact answers: the synthetic eval sources' first examples
        exact = [(s.task, synthetic.get(s.task).examples(tc.eval_examples, seed=synthetic_seed(s.split), size=s.size))
                 for s in eval_specs if s.format == "synthetic"] if tc.eval_examples > 0 else []

        def current_model(state):
            return nnx.merge(graphdef, state.params, frozen)

        report = None
        if context_cfg is not None and context_cfg.eval_sequences > 0 and jax.process_count() == 1:
            report = context_report(config, model_cfg, tokenizer, eval_specs, workdir if is_main else None)
            if start == 0 and not report.has("base"):  # the base as it was: its own RoPE, this run's dtypes
                raw = base_config(config)[0]
                as_was = model_cfg.replace(**{k: getattr(raw, k) for k in CONTEXT_FIELDS if k != "max_seq_len"})
                base_model, _ = load_base({"workdir": config.init.workdir, "hf_dir": config.init.hf_dir,
                                           "step": config.init.step}, as_was)
                writer.write(0, {f"base_ppl_at_{n}": v for n, v in report.measure("base", base_model, step=0).items()})
                del base_model
            if start == 0 and tc.eval_every <= 0:  # no evaluation at step 0 to measure it
                report.measure("scaled", current_model(state), step=0)

        def evaluate(state) -> dict[str, float]:
            out: dict[str, float] = {}
            if eval_batches:
                tot, n = 0.0, 0.0
                for b in eval_batches:
                    m = jax.device_get(eval_step(state.params, global_batch(b), frozen))
                    tot, n = tot + float(m["loss_sum"]), n + float(m["num_tokens"])
                loss = tot / max(n, 1.0)
                out.update(eval_loss=loss, eval_ppl=math.exp(min(loss, 50.0)))
            if exact and jax.process_count() == 1:
                model = current_model(state)
                accs = [exact_match(model, tokenizer, chat, ex, task, max_new_tokens=tc.sample_tokens, stops=stops)
                        for task, ex in exact]
                out["eval_accuracy"] = float(np.mean(accs))
            if report is not None:
                step = int(jax.device_get(state.step))
                kind = "scaled" if step == 0 else "fine_tuned"
                out.update({f"ppl_at_{n}": v for n, v in report.measure(kind, current_model(state), step=step).items()})
            return out

        num_sources = len(train_specs)

        def next_batch():
            local = next(data_iter)
            batch = global_batch(local)
            src, seg = local["source_BT"], local["segment_ids_BT"]
            trained_tokens = local["loss_mask_BT"]
            counts = np.array([trained_tokens[src == i].sum() for i in range(num_sources)], np.float32)
            stats = {"source_tokens": counts, "padding_fraction": np.float32((seg == 0).mean()),
                     "trained_token_fraction": np.float32(trained_tokens.mean())}
            c = sft.example_counts(local)
            stats.update(truncated_examples=np.float32(c["truncated"]), dropped_examples=np.float32(c["dropped"]))
            return batch, stats

        state, outcome = loop.run_steps(loop.Parts(
            tc=tc, state=state, start=start, train_step=train_step, next_batch=next_batch, ckpt=ckpt,
            data_iter=data_iter, writer=writer, runlog=runlog, guard=guard, schedule=schedule, evaluate=evaluate,
            tokens_per_step=tc.batch_size * seq, flops_per_token=flops_tok, peak_flops=peak,
            source_names=tuple(s.name for s in train_specs), summed=("truncated_examples", "dropped_examples"),
            frozen=frozen, workdir=workdir))
        summary: dict[str, Any] = {"method": method, "trained_parameters": n_trained, **outcome}
        if not outcome["complete"]:
            writer.close()
            return summary
        if is_main and tc.num_samples > 0 and exact and jax.process_count() == 1:
            task, ex = exact[0]
            ex = ex[:tc.num_samples]
            prompts = [chat.prompt_ids([{"role": "user", "content": e["prompt"]}]) for e in ex]
            outs = answers(current_model(state), tokenizer, prompts, stops, max_new_tokens=tc.sample_tokens)
            blocks = [f"=== prompt ===\n{e['prompt']}\n=== greedy answer (expected {e['answer']!r}) ===\n{o}\n"
                      for e, o in zip(ex, outs)]
            (workdir / SAMPLES_FILE).write_text("\n".join(blocks))
        elif is_main and tc.num_samples > 0 and eval_specs and jax.process_count() == 1:
            chats = heldout_chats(eval_specs, chat, tc.num_samples, room=model_cfg.max_seq_len - tc.sample_tokens)
            if chats:
                (workdir / SAMPLES_FILE).write_text(chat_samples(current_model(state), tokenizer, chat, chats, stops,
                                                                 max_new_tokens=tc.sample_tokens))
        if report is not None:
            summary["context_extension"] = report.data
            logging.info("perplexity by context length (%s):\n%s", REPORT_FILE, report.table())
        writer.close()
        runlog.event("exit", reason="finished", step=tc.steps, final_eval_loss=summary.get("final_eval_loss"))
        logging.info("done: %s", summary)
        return summary



# ---------------------------------------------------------------------------------------------
# Held-out data, generation stops, held-out chat samples and context extension


CONTEXT_FIELDS = ("rope_scaling", "rope_scaling_factor", "rope_original_max_seq_len", "max_seq_len")


def context_overrides(model_section, base: ModelConfig) -> dict[str, Any]:
    """The context fields (CONTEXT_FIELDS) a config's `model` section sets, unset ones left to the
    base. Setting a RoPE scaling on a base without one makes the unset ones follow it:
    rope_original_max_seq_len = the base's max_seq_len, max_seq_len = that times the factor."""
    out = {k: model_section.get(k) for k in CONTEXT_FIELDS if model_section.get(k) is not None}
    if not out:
        return out
    if base.position_embedding != "rope":
        raise ValueError(f"model.{next(iter(out))} is set, but only RoPE bases change their context (this base's "
                         f"position_embedding is {base.position_embedding!r})")
    if out.get("rope_scaling", "none") != "none" and base.rope_scaling == "none":
        factor = out.get("rope_scaling_factor", base.rope_scaling_factor)
        out.setdefault("rope_original_max_seq_len", base.max_seq_len)
        out.setdefault("max_seq_len", int(round(out["rope_original_max_seq_len"] * factor)))
    return out


def data_specs(dc) -> tuple[list, list]:
    """(training sources, held-out sources): `data.eval_sources` when it names any, else each
    training source's held-out split (`data.eval_fraction`, data/sources.py `HeldOut`; none at 0)."""
    train = sft.specs_from_config(dc.sources)
    if list(dc.eval_sources.keys()):
        return train, sft.specs_from_config(dc.eval_sources)
    if not dc.get("eval_fraction", 0.0):
        return train, []
    return split_heldout(train, fraction=dc.eval_fraction, min_records=dc.eval_min_records,
                         max_records=dc.eval_max_records)


def generation_stops(chat, tokenizer_files: dict) -> list[int]:
    """The ids generation stops at: EOS and the chat template's end-of-turn token
    (`ChatTokenizer.stop_ids`), and those a Hugging Face base's generation_config.json lists as
    `eos_token_id`."""
    stops = chat.stop_ids()
    path = tokenizer_files.get(f"{TOKENIZER_SUBDIR}/generation_config.json")
    if path is not None:
        eos = json.loads(pathlib.Path(path).read_text()).get("eos_token_id")
        for i in [eos] if isinstance(eos, int) else eos if isinstance(eos, list) else []:
            if isinstance(i, int) and 0 <= i < chat.tokenizer.vocab_size and i not in stops:
                stops.append(i)
    return stops


def answers(model, tokenizer, prompts: list[list[int]], stops: list[int], *, max_new_tokens: int) -> list[str]:
    """Greedy completions of token-id prompts, decoded without the stop token that ended them."""
    outs = generate(model, prompts, max_new_tokens=max_new_tokens, stop_tokens=stops)
    return [tokenizer.decode(o[:-1] if o and o[-1] in stops else o) for o in outs]


def heldout_chats(specs, chat, n: int, *, room: int) -> list[tuple[list[dict], str]]:
    """The first `n` held-out chats of `specs` whose prompt fits in `room` tokens, each as (the
    messages before its last assistant turn, that turn's content)."""
    out = []
    for spec in specs:
        if spec.schema == "text":
            continue
        for rec in read_all(spec):
            msgs = rec["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            try:
                fits = last > 0 and len(chat.prompt_ids(msgs[:last])) <= room
            except sft.ChatRecordError:
                fits = False
            if fits:
                out.append((msgs[:last], msgs[last]["content"]))
                if len(out) == n:
                    return out
    return out


def chat_samples(model, tokenizer, chat, chats: list[tuple[list[dict], str]], stops: list[int], *,
                 max_new_tokens: int) -> str:
    """samples.txt for held-out chats: each conversation up to its last answer, the model's greedy
    answer, and the data's."""
    outs = answers(model, tokenizer, [chat.prompt_ids(p) for p, _ in chats], stops, max_new_tokens=max_new_tokens)
    blocks = []
    for (prompt, reference), out in zip(chats, outs):
        turns = "\n".join(f"[{m['role']}] {m['content']}" for m in prompt)
        blocks.append(f"=== prompt ===\n{turns}\n=== greedy answer ===\n{out}\n=== reference answer ===\n{reference}\n")
    return "\n".join(blocks)


def context_report(config, model_cfg: ModelConfig, tokenizer, eval_specs, workdir) -> ContextReport:
    """Perplexity at L, 2L, ..., max_seq_len (or `context.lengths`) on `context.eval_sequences`
    pieces of the held-out text documents (evals/long_context.py), L being the base's context."""
    cc = config.context
    original = model_cfg.rope_original_max_seq_len or model_cfg.max_seq_len
    lengths = report_lengths(original, model_cfg.max_seq_len, tuple(cc.lengths))
    texts = (rec["text"] for spec in eval_specs if spec.schema == "text" for rec in read_all(spec))
    pieces = heldout_pieces(texts, tokenizer, model_cfg.max_seq_len, cc.eval_sequences)
    if not pieces:
        raise ValueError(f"context: no held-out document has {model_cfg.max_seq_len} tokens to score")
    meta = {"original_max_seq_len": original, "max_seq_len": model_cfg.max_seq_len,
            "rope_scaling": model_cfg.rope_scaling, "rope_scaling_factor": model_cfg.rope_scaling_factor}
    return ContextReport(workdir, tokenizer, pieces, lengths, meta)


if __name__ == "__main__":
    lifecycle.program_main(run, "configs/sft.py")
