"""Run an evaluation suite on a checkpoint.

    python -m evals.run --config=configs/eval.py:demo --checkpoint=runs/tiny
    python -m evals.run --config=configs/eval.py:mmlu --checkpoint=checkpoints/Llama-3.2-1B \\
        --config.tasks.mmlu.source.path=mmlu/test.jsonl --config.tasks.mmlu.fewshot_source.path=mmlu/dev.jsonl

`--checkpoint` is a Loom workdir (its newest checkpoint, or `--config.step`; the tokenizer is
`<workdir>/tokenizer.model`) or a Hugging Face model directory (config.json + safetensors, read
by `models.hf.load`; the tokenizer from the same directory). The suite's tasks run in order;
`<output_dir>/results.json` holds every metric, `<output_dir>/results.md` a table of them, and
`<output_dir>/samples/<task>.jsonl` each item's inputs and outputs. The output directory
defaults to `<checkpoint>/evals/<suite>`.

Every task is validated (kinds, formats, paths, metrics) before the model is loaded, so a typo
fails in a second with one line, not after the checkpoint has been read.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import pathlib
import string
import sys
import time
from typing import Any

import numpy as np

from data import synthetic
from data.sources import get_field
from evals import fewshot, generation, multiple_choice, perplexity
from evals.records import check_source, read_records
from configs.cli import ConfigError
from inference.loading import load_checkpoint

KINDS = ("perplexity", "multiple_choice", "generation")
RESULTS_JSON, RESULTS_MD, SAMPLES_DIR = "results.json", "results.md", "samples"


# --------------------------------------------------------------------------------------------
# Tasks


def enabled_tasks(config) -> list[tuple[str, Any]]:
    """(name, task config) of the enabled tasks, validated (ConfigError names the bad field)."""
    out = []
    for name, t in config.tasks.items():
        where = f"tasks.{name}"
        if not t.enabled:
            continue
        if t.kind not in KINDS:
            raise ConfigError(f"{where}.kind={t.kind!r} is not valid; expected one of {KINDS}")
        try:
            check_source(t.source, f"{where}.source")
            if t.fewshot_source.format:
                check_source(t.fewshot_source, f"{where}.fewshot_source")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if t.kind == "multiple_choice":
            if t.format not in multiple_choice.FORMATS:
                raise ConfigError(f"{where}.format={t.format!r} is not valid; expected one of "
                                  f"{multiple_choice.FORMATS}")
            if t.source.format == "synthetic" and t.format != "plain":
                raise ConfigError(f"{where}: synthetic multiple-choice items are in the 'plain' format, "
                                  f"not {t.format!r}")
        if t.kind in ("multiple_choice", "generation"):
            if t.num_shots < 0:
                raise ConfigError(f"{where}.num_shots={t.num_shots} must be >= 0")
            if t.sampler not in fewshot.SAMPLERS:
                raise ConfigError(f"{where}.sampler={t.sampler!r} is not valid; expected one of {fewshot.SAMPLERS}")
        if t.kind == "generation":
            bad = [m for m in t.metrics if m not in generation.METRICS]
            if bad:
                raise ConfigError(f"{where}.metrics has {bad}; valid metrics: {generation.METRICS}")
            if "verified" in t.metrics and t.source.format != "synthetic":
                raise ConfigError(f"{where}.metrics: 'verified' needs a synthetic source (source.format='synthetic')")
            if t.max_new_tokens < 0 or (t.max_new_tokens == 0 and t.source.format != "synthetic"):
                raise ConfigError(f"{where}.max_new_tokens={t.max_new_tokens} must be >= 1 (0 = automatic, for "
                                  "synthetic sources only)")
            from evals.metrics import NORMALIZATIONS

            bad = [n for n in t.normalize if n not in NORMALIZATIONS]
            if bad:
                raise ConfigError(f"{where}.normalize has {bad}; valid steps: {NORMALIZATIONS}")
        if t.kind == "perplexity" and (t.max_length < 0 or t.stride < 0):
            raise ConfigError(f"{where}: max_length and stride must be >= 0 (0 = automatic)")
        out.append((name, t))
    if not out:
        raise ConfigError("no enabled tasks in the suite")
    return out


def auto_tokens_per_batch(vocab_size: int) -> int:
    """Scoring batch size in tokens: about 1 GiB of float32 logits (2^28 / vocab), in [512, 32768]."""
    return int(min(32768, max(512, 2**28 // vocab_size)))


def _limit(config, t) -> int:
    limits = [x for x in (int(config.limit), int(t.limit)) if x > 0]
    return min(limits) if limits else 0


def _render(template: str, record: dict, where: str) -> str:
    try:
        return template.format_map(record)
    except KeyError as e:
        raise ValueError(f"{where}.prompt_template needs the field {e.args[0]!r}; records have {sorted(record)}") \
            from None


def _answers(record: dict, field: str, where: str) -> list[str]:
    if field not in record:
        raise ValueError(f"{where}.answer_field={field!r} is missing; records have {sorted(record)}")
    value = record[field]
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def _items(t, name: str, limit: int, text_field: str, is_mc: bool):
    """(evaluated records, few-shot pool or None, whether the pool is the evaluated source).

    Shots from the evaluated source come from all of it (minus the current item), even when
    `limit` evaluates only its first items: a limited run sees the prompts of a full one.
    """
    same = t.num_shots > 0 and not t.fewshot_source.format
    recs = read_records(t.source, name=name, default_text_field=text_field, limit=0 if same else limit,
                        multiple_choice=is_mc)
    pool = recs if same else None
    if limit:
        recs = recs[:limit]
    if t.fewshot_source.format:
        pool = read_records(t.fewshot_source, name=f"{name}_fewshot", default_text_field=text_field,
                            multiple_choice=is_mc)
    if not recs:
        raise ValueError(f"tasks.{name}: the source has no items")
    return recs, pool, same


def _perplexity_task(name, t, model, tokenizer, limit, **kw) -> dict:
    recs = read_records(t.source, name=name, default_text_field="text", limit=limit)
    field = t.source.text_field or "text"
    texts = [synthetic.format_example(r) if t.source.format == "synthetic" else get_field(r, field) for r in recs]
    m = perplexity.perplexity(model, tokenizer, texts, max_length=t.max_length, stride=t.stride, add_bos=t.add_bos,
                              **kw)
    return {"kind": t.kind, "metrics": m, "items": []}


def _multiple_choice_task(name, t, model, tokenizer, limit, **kw) -> dict:
    where = f"tasks.{name}"
    recs, pool, same = _items(t, name, limit, multiple_choice.TEXT_FIELDS[t.format], is_mc=True)
    docs = [multiple_choice.to_doc(r, t.format, f"{where} item {i}") for i, r in enumerate(recs)]
    pool_docs = None
    if same:  # docs[i] is pool[i]: convert only the rest
        pool_docs = docs + [multiple_choice.to_doc(r, t.format, f"{where} item {i}")
                            for i, r in enumerate(pool[len(recs):], start=len(recs))]
    elif pool is not None:
        pool_docs = [multiple_choice.to_doc(r, t.format, f"{where}.fewshot_source item {i}")
                     for i, r in enumerate(pool)]
    ctxs = multiple_choice.contexts(docs, t.format, num_shots=t.num_shots, pool=pool_docs, same_pool=same,
                                    sampler=t.sampler, seed=t.fewshot_seed, description=t.description,
                                    target_delimiter=t.target_delimiter, fewshot_delimiter=t.fewshot_delimiter)
    res = multiple_choice.evaluate(model, tokenizer, docs, ctxs, target_delimiter=t.target_delimiter,
                                   add_bos=t.add_bos, **kw)
    for item, doc, ctx in zip(res["items"], docs, ctxs):
        item.update(context=ctx, choices=list(doc.choices))
    return {"kind": t.kind, **res}


def _generation_task(name, t, model, tokenizer, limit, *, seed, batch_size, **kw) -> dict:
    where = f"tasks.{name}"
    # records must hold the template's first field (records without it are skipped as bad)
    fields = [f for _, f, _, _ in string.Formatter().parse(t.prompt_template) if f]
    recs, pool, same = _items(t, name, limit, (fields or [t.answer_field])[0], is_mc=False)
    texts = [_render(t.prompt_template, r, where) for r in recs]
    refs = [_answers(r, t.answer_field, where) for r in recs]
    shots_from = recs if pool is None else pool
    shot_texts = [_render(t.prompt_template, r, where) for r in shots_from] if t.num_shots else []
    shot_refs = [_answers(r, t.answer_field, where) for r in shots_from] if t.num_shots else []
    copies: dict[str, list[int]] = {}  # a separate pool's copies of an evaluated record are never its shots
    if t.num_shots and pool is not None and not same:
        for j, r in enumerate(shots_from):
            copies.setdefault(json.dumps(r, sort_keys=True, default=str), []).append(j)
    prompts = []
    for i, text in enumerate(texts):
        exclude = [i] if pool is None or same else copies.get(json.dumps(recs[i], sort_keys=True, default=str), [])
        picks = fewshot.select(i, range(len(shots_from)), t.num_shots, sampler=t.sampler, seed=t.fewshot_seed,
                               exclude=exclude)
        prompts.append(fewshot.build_context(text, [(shot_texts[j], shot_refs[j][0]) for j in picks],
                                             description=t.description or "", target_delimiter=t.target_delimiter,
                                             fewshot_delimiter=t.fewshot_delimiter))
    verify, max_new = None, int(t.max_new_tokens)
    if t.source.format == "synthetic":
        task = synthetic.get(t.source.path)
        verify = task.verify
        max_new = max_new or task.max_answer_chars(t.source.size) + 2
    res = generation.evaluate(model, tokenizer, prompts, refs, metric_names=tuple(t.metrics), max_new_tokens=max_new,
                              stop=tuple(t.stop), temperature=t.temperature, seed=seed, batch_size=batch_size,
                              add_bos=t.add_bos, normalize=tuple(t.normalize), verify=verify, **kw)
    return {"kind": t.kind, **res}


def run_task(name: str, t, model, tokenizer, config) -> dict:
    """Evaluates one task: {"kind", "metrics", "items" (per-item inputs and outputs)}."""
    kw = dict(desc=name, progress=bool(config.progress))
    budget = config.max_tokens_per_batch or auto_tokens_per_batch(model.config.vocab_size)
    limit = _limit(config, t)
    if t.kind == "perplexity":
        return _perplexity_task(name, t, model, tokenizer, limit, max_tokens_per_batch=budget, **kw)
    if t.kind == "multiple_choice":
        return _multiple_choice_task(name, t, model, tokenizer, limit, max_tokens_per_batch=budget, **kw)
    return _generation_task(name, t, model, tokenizer, limit, seed=config.seed,
                            batch_size=config.generation_batch_size, **kw)


# --------------------------------------------------------------------------------------------
# Results


# (metric, its standard error or None) shown in results.md, per kind
_SHOWN = {
    "perplexity": [("perplexity", None), ("bits_per_byte", None), ("nll_per_token", None)],
    "multiple_choice": [("acc", "acc_stderr"), ("acc_norm", "acc_norm_stderr")],
}


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    if isinstance(x, float):
        return f"{x:.4f}" if abs(x) < 1000 else f"{x:.1f}"
    return str(x)


def markdown(results: dict) -> str:
    """results.md: a header naming the checkpoint and one table row per (task, metric)."""
    model = results.get("model", {})
    lines = [f"# Evaluation: {results['suite']}", "",
             f"- checkpoint: `{results['checkpoint']}` ({results['checkpoint_kind']}"
             + (f", step {results['step']}" if results.get("step") is not None else "") + ")",
             f"- model: {model.get('params', 0):,} parameters, {model.get('num_layers')} layers, "
             f"d {model.get('hidden_size')}, context {model.get('max_seq_len')}, {model.get('dtype')}",
             f"- date: {results['date']}; total {results['seconds']:.1f} s", "",
             "| task | kind | metric | value | ± stderr | n | seconds |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for name, r in results["tasks"].items():
        m = r["metrics"]
        shown = _SHOWN.get(r["kind"]) or [(k, None) for k in m if k not in ("num_examples", "seconds")]
        n = m.get("tokens", m.get("num_examples"))
        n_text = f"{n:,} tok" if r["kind"] == "perplexity" else str(n)
        for j, (k, se) in enumerate(shown):
            lines.append(f"| {name if j == 0 else ''} | {r['kind'] if j == 0 else ''} | {k} | {_fmt(m.get(k))} | "
                         f"{_fmt(m.get(se)) if se else ''} | {n_text if j == 0 else ''} | "
                         f"{_fmt(m.get('seconds')) if j == 0 else ''} |")
    return "\n".join(lines) + "\n"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


def default_output_dir(checkpoint: str | pathlib.Path, suite: str) -> pathlib.Path:
    return pathlib.Path(checkpoint) / "evals" / suite


def run(config, checkpoint: str | pathlib.Path, *, model=None, tokenizer=None, info: dict | None = None) -> dict:
    """Runs the suite and writes results.json / results.md (and samples); returns the results.

    `model` and `tokenizer` may be given (tests, notebooks): the checkpoint is then only named.
    """
    t0 = time.perf_counter()
    tasks = enabled_tasks(config)
    if model is None:
        model, tokenizer, info = load_checkpoint(checkpoint, step=config.step, dtype=config.dtype,
                                                 tokenizer=config.tokenizer, quantize=config.quantize)
    info = dict(info or {"checkpoint": str(checkpoint), "checkpoint_kind": "in-memory"})
    out_dir = pathlib.Path(config.output_dir) if config.output_dir else default_output_dir(checkpoint, config.suite)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"suite": config.suite, **info,
                               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                               "tasks": {}}
    for name, t in tasks:
        logging.info("task %s (%s)", name, t.kind)
        t1 = time.perf_counter()
        r = run_task(name, t, model, tokenizer, config)
        r["metrics"]["seconds"] = time.perf_counter() - t1
        items = r.pop("items")
        r["examples"] = items[:3]
        results["tasks"][name] = r
        if config.write_samples and items:
            (out_dir / SAMPLES_DIR).mkdir(exist_ok=True)
            with open(out_dir / SAMPLES_DIR / f"{name}.jsonl", "w") as f:
                for item in items:
                    f.write(json.dumps(_jsonable(item), ensure_ascii=False) + "\n")
        shown = {k: v for k, v in r["metrics"].items() if isinstance(v, (int, float))}
        logging.info("task %s: %s", name, ", ".join(f"{k}={_fmt(v)}" for k, v in shown.items()))
    results["seconds"] = time.perf_counter() - t0
    results["config"] = config.to_dict()
    (out_dir / RESULTS_JSON).write_text(json.dumps(_jsonable(results), indent=2, ensure_ascii=False) + "\n")
    (out_dir / RESULTS_MD).write_text(markdown(results))
    results["output_dir"] = str(out_dir)
    return results


def main(argv):
    from absl import app

    from configs.cli import quiet_library_logs
    from models.checkpoint import UnreadableCheckpoint

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; everything else is set through --config.*")
    quiet_library_logs()
    try:
        results = run(_CONFIG.value, _CHECKPOINT.value)
    except (ConfigError, FileNotFoundError, UnreadableCheckpoint) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(markdown(results))
    print(f"wrote {results['output_dir']}/{RESULTS_JSON} and {RESULTS_MD}")


if __name__ == "__main__":
    # flags are defined only when run as a program, so tests and other programs can import run()
    from absl import app, flags
    from ml_collections import config_flags

    from configs.cli import parse_flags

    _CONFIG = config_flags.DEFINE_config_file("config", "configs/eval.py", "Eval suite (file:suite).")
    _CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A Loom workdir or a Hugging Face model directory.")
    flags.mark_flag_as_required("checkpoint")
    app.run(main, flags_parser=parse_flags)
