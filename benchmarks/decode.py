"""Decoding speed against `transformers` `generate` at its best and against Loom before the
refactor; speculative decoding; weight-only quantization; the CPU decode layout.

    .venv/bin/python benchmarks/decode.py --sections=decode        # ~15 min on a quiet 2-core CPU
                                                                   # (28 min with other processes running)
    .venv/bin/python benchmarks/decode.py --sections=layout,speculative,quantize
    .venv/bin/python benchmarks/decode.py --sections=decode --batches=1,8 --bf16_batches= \\
        --large=none --rounds=2 --new=16 --no_record               # a quick check

decode       Random weights (seed 0), saved once with `models.hf.save` and read by every side:
             the `small` preset's shape (Llama, d 512, 8 layers, 8 heads / 4 kv, vocab 4096) in
             float32 at batch 1, 8 and 32 and in bfloat16 at batch 8, and a larger Llama
             (`--large`, default `llama_125m`: the `125m` preset's width and depth, d 768,
             12 layers, 12 heads / 4 kv, SwiGLU 2048, vocab 32000, untied, 124.7M parameters) in
             float32 at batch 1 and 8. Prompts of 64 random tokens, 64 new tokens, greedy.
             Sides, each in a process of its own (benchmarks/decode_worker.py): Loom's
             `inference.generate` with and without the CPU decode layout
             (`decode_layout=True/False`); Loom at `--baseline` (default 3451f03, the commit before
             the layout moved out of the model) from a worktree of that commit, with its own
             default; `transformers` `generate` with the dynamic cache, the static cache, and the
             static cache with `torch.compile` (a variant that fails is dropped and the failure
             recorded). Prefill tokens/s = prompt tokens over the time of a 1-token call; decode
             tokens/s = new tokens after the first over the time of a 64-token call beyond the
             1-token call. Every side warms up once, then `--rounds` rounds interleave all sides;
             figures are medians (min-max). Ratios are paired by round. Each side's greedy tokens
             are compared with transformers' (dynamic cache) token for token.
             llama.cpp (batch 1, f32 GGUF) needs a GGUF exporter (a later issue) and
             llama-cpp-python: skipped, and the record says so.
speculative  A trained target (the `tiny` preset run in runs/tiny, trained by this script if
             missing) and a 1-layer draft trained the same way (runs/tiny_draft): acceptance rate,
             tokens per target pass, and wall-clock speed-up over the target alone (interleaved).
quantize     The trained target's held-out perplexity and parameter bytes in float32, int8, int4.
layout       Why the CPU decode layout (inference.decode_layout): the `small` model's 57 weight
             matrices (103 MB, f32, each its own array) multiplied by 1, 8 and 16 rows, as
             row-major [K, N] matrices (`x @ W`) and as 32- and 64-column panels (`panel_matmul`):
             ms per pass over all of them and the weight bytes read per second; and
             `inference.generate`'s decode step with `decode_layout=False` and `True`.
Each section prints its tables and writes benchmarks/records/<decode|decode_speculative|
decode_quantize|decode_layout>.json (unless --no_record); never asserts on time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from benchmarks import records  # noqa: E402

WORKER = REPO / "benchmarks" / "decode_worker.py"
DEFAULT_BASELINE = "3451f03"

# Model shapes (Llama family; `max_seq_len` only bounds RoPE tables and transformers' config).
_LARGER = {"vocab_size": 32000, "hidden_size": 768, "intermediate_size": 2048, "num_layers": 12, "num_heads": 12,
           "num_kv_heads": 4, "head_dim": 64, "max_seq_len": 1024}
MODELS = {
    "tiny": ("tiny", {}),  # for quick checks of the script
    "small": ("small", {}),
    "llama_125m": ("small", _LARGER),  # the 125m preset's width and depth as a Llama (untied, GQA)
}
HF_VARIANTS = ("dynamic", "static", "compile")
HF_LABELS = {"dynamic": "transformers, dynamic cache", "static": "transformers, static cache",
             "compile": "transformers, static cache + torch.compile"}


# --------------------------------------------------------------------------------------------
# Sides in processes of their own


class Worker:
    """One side in a process of its own (benchmarks/decode_worker.py), spoken to over pipes.

    `cwd` is the tree whose packages the process imports (this one or a `records.checkout`);
    its stderr goes to `<log_dir>/<name>.log`, whose tail any error quotes.
    """

    def __init__(self, name: str, spec: dict, cwd: pathlib.Path, log_dir: pathlib.Path):
        self.name, self.cwd = name, pathlib.Path(cwd)
        self.log_path = pathlib.Path(log_dir) / f"{name}.log"
        self._log = open(self.log_path, "w")
        code = f"import runpy; runpy.run_path({str(WORKER)!r}, run_name='__main__')"
        self.proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], cwd=self.cwd,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        self.info: dict = {}

    def ready(self) -> dict:
        """Waits for the worker to load its model; its facts (package path, versions, threads)."""
        self.info = self._read()
        if "error" in self.info:
            raise RuntimeError(f"{self.name} failed to start: {self.info['error']}\n{self._tail()}")
        return self.info

    def request(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self, prompts, new: int, variant: str) -> dict:
        out = self.request(op="run", prompts=prompts, new=new, variant=variant)
        if "error" in out:
            raise RuntimeError(f"{self.name} ({variant}): {out['error']}\n{out.get('traceback', '')}")
        return out

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited (return code {self.proc.wait()}):\n{self._tail()}")
        return json.loads(line)

    def _tail(self, n: int = 30) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def start_workers(specs: dict[str, tuple[dict, pathlib.Path]], log_dir) -> dict[str, Worker]:
    """Starts every worker at once (they load their models in parallel), then waits for each."""
    workers = {name: Worker(name, spec, cwd, log_dir) for name, (spec, cwd) in specs.items()}
    try:
        for name, w in workers.items():
            info = w.ready()
            if "package" in info and pathlib.Path(info["package"]) != w.cwd.resolve():
                raise RuntimeError(f"{name} imported Loom from {info['package']}, not from {w.cwd}")
    except BaseException:
        for w in workers.values():
            w.close()
        raise
    return workers


# --------------------------------------------------------------------------------------------
# The decode section


def model_config(name: str):
    """The ModelConfig of a benchmark shape (MODELS), float32."""
    from configs import pretrain
    from models.config import ModelConfig

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {sorted(MODELS)}")
    preset, overrides = MODELS[name]
    base = pretrain.get_config(preset).model.to_dict()
    return ModelConfig.from_dict({**base, "max_seq_len": max(base["max_seq_len"], 512), **overrides,
                                  "dtype": "float32", "param_dtype": "float32"})


def save_weights(name: str, directory: pathlib.Path) -> dict:
    """Random weights (seed 0) of model `name`, written as a Hugging Face directory; its shape."""
    import jax
    from flax import nnx

    from models.hf import save
    from models.transformer import build

    cfg = model_config(name)
    model = build(cfg, seed=0)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    save(model, directory)
    return {"name": name, "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "tie_embeddings": cfg.tie_embeddings,
            "parameters": int(n_params)}


def describe_shape(s: dict) -> str:
    return (f"`{s['name']}`: Llama, d {s['hidden_size']}, {s['num_layers']} layers, {s['num_heads']} heads / "
            f"{s['num_kv_heads']} kv (head dim {s['head_dim']}), SwiGLU {s['intermediate_size']}, vocab "
            f"{s['vocab_size']}, {'tied' if s['tie_embeddings'] else 'untied'} head, {s['parameters'] / 1e6:.1f}M "
            f"parameters")


def decode_rates(sample: dict, batch: int, prompt_len: int, new: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one timed pair of calls (`_timed` in the worker); the
    decode rate is NaN when the full call took no longer than the 1-token call (a disturbed round)."""
    extra = sample["tn"] - sample["t1"]
    return batch * prompt_len / sample["t1"], batch * (new - 1) / extra if extra > 0 else math.nan


def cell(values, fmt: str = "{:,.1f}") -> str:
    """'median (min–max)' over the valid (finite) values, saying how many rounds were not valid."""
    ok = [v for v in values if math.isfinite(v)]
    if not ok:
        return f"n/a (no valid round of {len(values)})"
    s = records.spread(records.summarize(ok), fmt)
    return s if len(ok) == len(values) else f"{s}; {len(values) - len(ok)} of {len(values)} rounds not valid"


def paired(num: list, den: list) -> list[float]:
    """Per-round ratios num[i] / den[i] (NaN where either is)."""
    if len(num) != len(den):
        raise ValueError(f"paired ratios need equal sample counts, got {len(num)} and {len(den)}")
    return [a / b for a, b in zip(num, den)]


def median(values) -> float:
    ok = [v for v in values if math.isfinite(v)]
    return records.summarize(ok)["median"] if ok else -math.inf


def compare_ids(ids, ref) -> dict:
    """Greedy ids against a reference, token for token: rows equal, and the earliest position where
    any row differs (None if none does)."""
    rows_equal, first = 0, None
    for a, b in zip(ids, ref):
        if a == b:
            rows_equal += 1
            continue
        k = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        first = k if first is None else min(first, k)
    return {"rows_equal": rows_equal, "rows": len(ref), "first_difference": first}


def run_config(workers: dict[str, Worker], sides: dict[str, tuple[str, str]], prompts, new: int, rounds: int,
               pause: float) -> tuple[dict, dict, dict]:
    """One (model, dtype, batch): warm-up, then interleaved rounds over every side.

    `sides` maps a side's key to (worker name, variant). Returns (samples per side: one dict per
    round with t1, tn, ids; warm-up seconds per side; failures: side -> message, for sides
    dropped because their warm-up failed, transformers variants only).
    """
    warm, failures = {}, {}
    for key, (worker, variant) in list(sides.items()):
        t = time.perf_counter()
        try:
            workers[worker].run(prompts, new, variant)
        except RuntimeError as e:
            if worker != "transformers":
                raise
            failures[key] = str(e).splitlines()[0]
            print(f"  {key}: dropped, warm-up failed: {failures[key]}", flush=True)
            continue
        warm[key] = time.perf_counter() - t
    live = {k: v for k, v in sides.items() if k in warm}
    fns = {key: (lambda w=w, v=v: workers[w].run(prompts, new, v)) for key, (w, v) in live.items()}
    return rotated_rounds(fns, rounds, pause), warm, failures


def rotated_rounds(fns: dict, rounds: int, pause: float) -> dict[str, list]:
    """`records.interleaved` (no warm-up) with round r starting at the r-th side: no side always
    runs right after the same one (a peer's threads may still be winding down) or always first."""
    keys = list(fns)
    out = {k: [] for k in keys}
    for r in range(rounds):
        start = r % len(keys)
        for k in keys[start:] + keys[:start]:
            time.sleep(pause)
            out[k].append(fns[k]())
    return out


def decode_groups(args) -> list[tuple[str, str, list[int]]]:
    """(model, dtype, batch sizes) to run, from the command line."""
    groups = [(m, d, [int(b) for b in bs.split(",") if b.strip()])
              for m, d, bs in (("small", "float32", args.batches), ("small", "bfloat16", args.bf16_batches),
                               (args.large, "float32", args.large_batches)) if m != "none"]
    groups = [g for g in groups if g[2]]
    if not groups:
        raise ValueError("decode: no batch sizes to run (--batches, --bf16_batches and --large_batches are all empty)")
    return groups


def hf_variants(spec: str) -> list[str]:
    variants = [v.strip() for v in spec.split(",") if v.strip()]
    bad = [v for v in variants if v not in HF_VARIANTS]
    if bad:
        raise ValueError(f"--hf_variants {bad}: valid are {HF_VARIANTS}")
    return variants


def checkout_baseline(commit: str) -> tuple[pathlib.Path | None, str | None]:
    """(worktree, full sha) of the baseline commit, or (None, None) for 'none'."""
    if commit == "none":
        return None, None
    tree = records.checkout(commit)
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tree, capture_output=True, text=True, check=True)
    return tree, sha.stdout.strip()


def run_group(path: pathlib.Path, model_name: str, dtype: str, batches: list[int], variants: list[str],
              baseline: pathlib.Path | None, args, rng, results: dict) -> list[tuple]:
    """Every batch size of one (model, dtype): the sides' workers live for the whole group.

    Fills `results` (raw samples, warm-up seconds, failures, token checks, layout choices) and
    returns (key, model, dtype, batch, samples with ids, default layouts) per batch size.
    """
    spec = {"path": str(path), "dtype": dtype}
    specs = {"loom": ({"kind": "loom", **spec}, REPO)}
    if baseline is not None:
        specs["baseline"] = ({"kind": "loom", **spec}, baseline)
    if variants:
        specs["transformers"] = ({"kind": "transformers", **spec}, REPO)
    group = f"{model_name}/{dtype}"
    print(f"# {group}: starting {', '.join(specs)} ...", flush=True)
    workers = start_workers(specs, path.parent)
    results["workers"][group] = {name: w.info for name, w in workers.items()}
    sides = {"loom/layout_on": ("loom", "layout_on"), "loom/layout_off": ("loom", "layout_off")}
    if baseline is not None:
        sides["baseline/default"] = ("baseline", "default")
    sides.update({f"transformers/{v}": ("transformers", v) for v in variants})
    out = []
    try:
        for b in batches:
            key = f"{group}/batch{b}"
            prompts = rng.integers(3, results["shapes"][model_name]["vocab_size"], (b, args.prompt)).tolist()
            # what each tree's generate picks by itself at this batch (the before/after rows compare those)
            layout = {name: workers[name].request(op="layout", variant="default", rows=b)["layout"]
                      for name in ("loom", "baseline") if name in workers}
            print(f"# {key}: warm-up, then {args.rounds} rounds over {len(sides)} sides ...", flush=True)
            t, load_before = time.perf_counter(), os.getloadavg()
            samples, warm, failures = run_config(workers, sides, prompts, args.new, args.rounds, args.pause)
            load_after = os.getloadavg()
            print(f"#   {time.perf_counter() - t:.0f}s (load average {load_before[0]:.1f} before, "
                  f"{load_after[0]:.1f} after)", flush=True)
            # other processes on the machine: torch's OpenMP regions stall many-fold when another
            # process holds a core, so a reader needs to know how quiet the machine was
            results["load_average"][key] = {"before": load_before, "after": load_after}
            results["samples"][key] = {k: [{"t1": s["t1"], "tn": s["tn"]} for s in v] for k, v in samples.items()}
            results["warmup_seconds"][key] = warm
            results["failures"][key] = failures
            results["layout"][key] = layout
            results["tokens"][key] = token_check(samples)
            out.append((key, model_name, dtype, b, samples, layout))
    finally:
        for w in workers.values():
            w.close()
    return out


def decode_section(args) -> dict:
    """Runs every (model, dtype, batch) configuration; prints the tables; returns the record."""
    groups = decode_groups(args)
    variants = hf_variants(args.hf_variants)
    baseline, baseline_sha = checkout_baseline(args.baseline)
    llama_cpp = ("llama-cpp-python is not installed" if importlib.util.find_spec("llama_cpp") is None
                 else "llama-cpp-python is installed, but Loom has no GGUF exporter yet")
    rng = np.random.default_rng(0)
    results = {"shapes": {}, "samples": {}, "warmup_seconds": {}, "failures": {}, "tokens": {}, "layout": {},
               "load_average": {}, "workers": {}, "baseline_commit": baseline_sha}
    configs = []
    with tempfile.TemporaryDirectory(prefix="loom_decode_") as tmp:
        for model_name, dtype, batches in groups:
            path = pathlib.Path(tmp) / model_name
            if model_name not in results["shapes"]:
                print(f"# writing random {model_name} weights ...", flush=True)
                results["shapes"][model_name] = save_weights(model_name, path)
            configs += run_group(path, model_name, dtype, batches, variants, baseline, args, rng, results)
    tables = decode_tables(configs, results, args, baseline_sha)
    for t in tables:
        records.print_table(t)
    method = decode_method(args, results, variants, baseline_sha, llama_cpp)
    print(f"\n{method}")
    return {"name": "decode", "title": "Decoding against transformers and before the refactor — "
                                       "`benchmarks/decode.py --sections=decode`",
            "tables": tables, "method": method, "results": results}


def token_check(samples: dict) -> dict:
    """Every side's greedy ids against transformers' dynamic cache (or, without it, Loom with the
    layout), from the first timed round; and whether each side repeated its ids in every round."""
    ref_key = "transformers/dynamic" if "transformers/dynamic" in samples else "loom/layout_on"
    ref = samples[ref_key][0]["ids"]
    out = {"reference": ref_key}
    for key, runs in samples.items():
        c = compare_ids(runs[0]["ids"], ref)
        c["same_every_round"] = all(r["ids"] == runs[0]["ids"] for r in runs[1:])
        out[key] = c
    return out


def _side_label(key: str, layout: dict, baseline_sha: str | None) -> str:
    who, variant = key.split("/")
    if who == "transformers":
        return HF_LABELS[variant]
    if who == "baseline":
        used = "decode layout" if layout.get("baseline") else "no decode layout"
        return f"Loom @ {baseline_sha[:7]} (before the refactor; its default: {used})"
    on = variant == "layout_on"
    default = " (default)" if layout.get("loom") == on else ""
    return f"Loom, {'decode layout' if on else 'no decode layout'}{default}"


def _tokens_cell(check: dict) -> str:
    if check["rows_equal"] == check["rows"]:
        s = "identical"
    else:
        s = f"{check['rows_equal']}/{check['rows']} rows; first difference at token {check['first_difference']}"
    return s if check["same_every_round"] else s + " (varied between rounds)"


def decode_tables(configs: list[tuple], results: dict, args, baseline_sha) -> list[dict]:
    """One table per (model, dtype), the before/after table, and the transformers variants' table."""
    tables, before_after, groups = [], [], {}
    for key, model_name, dtype, b, samples, layout in configs:
        groups.setdefault((model_name, dtype), []).append((key, b, samples, layout))
    for (model_name, dtype), group in groups.items():
        rows = []
        for key, b, samples, layout in group:
            rates = {k: [decode_rates(s, b, args.prompt, args.new) for s in v] for k, v in samples.items()}
            rows += side_rows(b, rates, layout, results["tokens"][key], baseline_sha)
            if "baseline/default" in rates:
                before_after.append(before_after_row(model_name, dtype, b, rates, layout))
        tables.append(records.table(
            f"{describe_shape(results['shapes'][model_name])}; {dtype}; prompt {args.prompt} random tokens, "
            f"{args.new} new, greedy. Tokens/s, median (min–max) of {args.rounds} interleaved rounds; 'vs best "
            f"transformers' is the decode rate over the fastest transformers variant's in the same round; tokens "
            f"compared with {_side_label(results['tokens'][group[0][0]]['reference'], {}, baseline_sha)}",
            ["batch", "implementation", "prefill tok/s", "decode tok/s", "vs best transformers", "greedy tokens"],
            rows))
    if before_after:
        tables.append(records.table(
            f"Before / after the refactor: Loom's `generate` with its default choice of the CPU decode layout, this "
            f"tree against {baseline_sha[:10]} (same weights, prompts and process setup), decode tok/s median "
            f"(min–max) of {args.rounds} interleaved rounds; ratio = current / baseline per round",
            ["model", "dtype", "batch", "decode layout", "current tok/s", "baseline tok/s", "current / baseline"],
            before_after))
    variant_rows = []
    for key, warm in results["warmup_seconds"].items():
        variant_rows += [[key, HF_LABELS[k.split("/")[1]], f"{s:.1f}", "ran"] for k, s in warm.items()
                         if k.startswith("transformers/")]
        variant_rows += [[key, HF_LABELS[k.split("/")[1]], "-", f"failed, dropped: {msg}"]
                         for k, msg in results["failures"][key].items()]
    if variant_rows:
        tables.append(records.table(
            "transformers variants: seconds of the untimed warm-up (a 1-token and a full call; torch.compile "
            "compiles the decode step here) and whether the variant ran",
            ["configuration", "variant", "warm-up s", "status"], variant_rows))
    return tables


def side_rows(b: int, rates: dict, layout: dict, checks: dict, baseline_sha) -> list[list]:
    """Table rows of one batch size: every side's prefill and decode rates, its decode rate over
    the best transformers variant's (per round), and its token check."""
    decode = {k: [r[1] for r in v] for k, v in rates.items()}
    hf = [k for k in decode if k.startswith("transformers/")]
    best = max(hf, key=lambda k: median(decode[k])) if hf else None
    rows = []
    for k, v in rates.items():
        if best is None:
            vs = "-"
        elif k == best:
            vs = "1 (best transformers)"
        else:
            vs = cell(paired(decode[k], decode[best]), "{:.2f}")
        tokens = "(reference)" if k == checks["reference"] else _tokens_cell(checks[k])
        rows.append([b, _side_label(k, layout, baseline_sha), cell([r[0] for r in v], "{:,.0f}"), cell(decode[k]),
                     vs, tokens])
    return rows


def before_after_row(model_name: str, dtype: str, b: int, rates: dict, layout: dict) -> list:
    """This tree's default against the baseline's default: decode rates and their per-round ratio."""
    on, base_on = bool(layout.get("loom")), bool(layout.get("baseline"))
    cur = [r[1] for r in rates["loom/layout_on" if on else "loom/layout_off"]]
    base = [r[1] for r in rates["baseline/default"]]
    which = ("both on" if on and base_on else "both off" if not on and not base_on
             else f"current {'on' if on else 'off'}, baseline {'on' if base_on else 'off'}")
    return [model_name, dtype, b, which, cell(cur), cell(base), cell(paired(cur, base), "{:.3f}")]


def decode_method(args, results, variants, baseline_sha, llama_cpp) -> str:
    shapes = "; ".join(describe_shape(s) for s in results["shapes"].values())
    hf_info = next((w["transformers"] for w in results["workers"].values() if "transformers" in w), {})
    loom_info = next(iter(results["workers"].values()))["loom"]
    parts = [
        f"Random weights (init seed 0, std 0.02) of each shape, written once as float32 safetensors with "
        f"`models.hf.save` and read by every side from that directory: {shapes}. Prompts: {args.prompt} random "
        f"token ids per row (numpy seed 0, ids 3..vocab-1), all rows the same length (no padding); {args.new} new "
        f"tokens, greedy. Each call is timed twice per round, generating 1 token and then {args.new}: prefill "
        f"tok/s = batch x {args.prompt} / (1-token call); decode tok/s = batch x {args.new - 1} / (difference of "
        f"the two calls). Every side runs in a process of its own (benchmarks/decode_worker.py, the same "
        f"interpreter, started with `python -c` in the tree it imports) and holds its model for the whole "
        f"(model, dtype) group; after one untimed warm-up call pair per side (compilation), {args.rounds} "
        f"rounds call every side once in turn (round r starting at the r-th side), {args.pause} s apart, so "
        f"every side has {args.rounds} samples from the same spells of the machine; figures are medians with "
        f"the min–max spread, ratios are per-round ratios. The machine's 1/5/15-minute load averages before "
        f"and after each configuration are in the record's results (`load_average`): other processes slow "
        f"the peers unequally (torch's OpenMP regions stall when another process holds a core).",
        f"Loom: `inference.generate(model, prompts, max_new_tokens=n)` on `models.hf.load(dir, dtype=...)`, with "
        f"`decode_layout=True` and `False` (the CPU decode layout of inference/decode_layout.py; 'default' marks "
        f"what `generate` picks by itself: float32 at batch <= 16 on one CPU device). jax {loom_info.get('jax')}, "
        f"XLA's default CPU threading (all cores).",
    ]
    if baseline_sha:
        parts.append(
            f"Before the refactor: Loom at commit {baseline_sha[:10]} (`--baseline={args.baseline}`), from a worktree "
            f"of that commit (`records.checkout`), its own `inference.generate` with its default (the decode layout "
            f"then lived in models/transformer.py and was on for float32 at batch <= 16), on the same weight files "
            f"and prompts, interleaved with the current tree's worker; each worker checks that it imported Loom from "
            f"its own tree.")
    if variants:
        parts.append(
            f"transformers {hf_info.get('transformers')} (torch {hf_info.get('torch')}, "
            f"{hf_info.get('torch_threads')} threads, attention `{hf_info.get('attn_implementation')}`): "
            f"`{hf_info.get('class')}.from_pretrained(dir, dtype=...)`, `generate(input_ids, attention_mask=ones, "
            f"max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)` under "
            f"`torch.inference_mode()`, variants: {', '.join(HF_LABELS[v] for v in variants)}. The static cache is "
            f"`cache_implementation=\"static\"` (sized prompt + n); torch.compile is generate's own decode-step "
            f"compilation, `compile_config=CompileConfig(fullgraph=True, dynamic=False, mode=\"default\")` "
            f"with `_compile_all_devices=True` (transformers compiles automatically only on GPU-like devices; "
            f"`reduce-overhead` adds CUDA graphs, which do not exist on a CPU), inductor's default CPU settings. "
            f"Ratios are taken against the transformers variant with the highest median decode rate.")
    parts.append(
        "bfloat16 rows: both sides read the float32 files converted to bfloat16 weights. Loom (`dtype=\"bfloat16\"`) "
        "computes matmuls with bfloat16 inputs, float32 accumulation and bfloat16 outputs, attention scores and "
        "softmax in float32, logits in float32; torch (`dtype=torch.bfloat16`) runs every op in bfloat16 (its "
        "CPU matmuls accumulate in float32 internally and round to bfloat16), logits in bfloat16. Their greedy "
        "tokens are compared but need not agree: the roundings differ.")
    parts.append(
        "Greedy tokens: every side's ids from the first timed round are compared token for token with the "
        "reference (transformers, dynamic cache); 'varied between rounds' would flag a side whose ids changed. "
        f"llama.cpp at batch 1 with a float32 GGUF is not measured: {llama_cpp}.")
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------
# Speculative decoding and quantization (a trained tiny model)


def _ensure_run(workdir: pathlib.Path, *overrides):
    if (workdir / "checkpoints").is_dir():
        return
    print(f"training {workdir} ...", flush=True)
    subprocess.run([sys.executable, "-m", "train.pretrain", "--config=configs/pretrain.py:tiny",
                    f"--workdir={workdir}", *overrides], cwd=REPO, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def _held_out(tokenizer, n_batches=4):
    from data import pipeline
    from data.sources import SourceSpec

    it = iter(pipeline.source_batches([SourceSpec("v", "embedded", split="validation")], tokenizer, seq_len=256,
                                      batch_size=8, shuffle=False))
    return [{k: b[k] for k in pipeline.BATCH_KEYS} for b in (next(it) for _ in range(n_batches))]


DRAFT_OVERRIDES = ("--config.model.num_layers=1", "--config.model.hidden_size=128", "--config.model.num_heads=2",
                   "--config.model.num_kv_heads=1", "--config.model.intermediate_size=352")


def speculative_section(args, k_values=(2, 4), new=96) -> dict:
    import jax

    from data.tokenizer import SentencePieceTokenizer
    from inference import generate
    from inference.speculative import speculative_generate
    from models.checkpoint import load

    target_dir, draft_dir = pathlib.Path(args.target), pathlib.Path(args.draft)
    _ensure_run(target_dir)
    _ensure_run(draft_dir, *DRAFT_OVERRIDES)
    target, tcfg = load(target_dir)
    draft, dcfg = load(draft_dir)
    tok = SentencePieceTokenizer.from_file(target_dir / "tokenizer.model")
    prompts = [row[:48].tolist() for row in _held_out(tok, 1)[0]["inputs_BT"][:4]]
    plain = generate(target, prompts, max_new_tokens=new)
    fns, stats = {"target alone": lambda: generate(target, prompts, max_new_tokens=new)}, {}
    for k in k_values:
        out, stats[k] = speculative_generate(target, draft, prompts, max_new_tokens=new, num_draft_tokens=k,
                                             return_stats=True)
        if out != plain:
            raise AssertionError(f"speculative output (k={k}) differs from the target's greedy output")
        fns[f"k={k}"] = lambda k=k: speculative_generate(target, draft, prompts, max_new_tokens=new,
                                                         num_draft_tokens=k)
    timed = {name: (lambda f=f: records.seconds(lambda: jax.block_until_ready(f()))) for name, f in fns.items()}
    samples = records.interleaved(timed, args.rounds, warmup=1)
    n_tokens = len(prompts) * new
    alone = records.summarize([n_tokens / t for t in samples["target alone"]])
    rows = [["target alone", "-", "-", records.spread(alone), "1", "-"]]
    for k in k_values:
        s = samples[f"k={k}"]
        rows.append([f"speculative, k={k}", f"{stats[k].acceptance_rate:.2f}", f"{stats[k].tokens_per_round:.2f}",
                     records.spread(records.summarize([n_tokens / t for t in s])),
                     records.spread(records.ratio_summary(samples["target alone"], s), "{:.2f}"), "identical"])
    table = records.table(
        f"Speculative decoding: target {target_dir.name} ({tcfg.num_layers} layers, d {tcfg.hidden_size}, "
        f"{tcfg.dtype}), draft {draft_dir.name} ({dcfg.num_layers} layer, d {dcfg.hidden_size}); 4 held-out "
        f"prompts of 48 tokens, {new} new, greedy; tok/s median (min–max) of {args.rounds} interleaved rounds",
        ["decoding", "acceptance", "tokens per target pass", "tok/s", "speed-up", "output vs target alone"], rows)
    records.print_table(table)
    method = (f"The `tiny` preset trained by `python -m train.pretrain --config=configs/pretrain.py:tiny` "
              f"({target_dir}) as the target and the same with {' '.join(DRAFT_OVERRIDES)} ({draft_dir}) as the "
              f"draft; prompts: the first 48 tokens of 4 rows of the embedded corpus's validation split. "
              f"`inference.generate` against `inference.speculative.speculative_generate(num_draft_tokens=k)` in "
              f"this process, one untimed round, then {args.rounds} interleaved rounds; speed-up = target-alone "
              f"seconds over speculative seconds in the same round. Outputs checked identical to the target's.")
    return {"name": "decode_speculative", "title": "Speculative decoding — `benchmarks/decode.py "
                                                   "--sections=speculative`",
            "tables": [table], "method": method,
            "results": {"seconds": samples, "acceptance": {k: stats[k].acceptance_rate for k in k_values},
                        "tokens_per_round": {k: stats[k].tokens_per_round for k in k_values}}}


def quantize_section(args) -> dict:
    from data.tokenizer import SentencePieceTokenizer
    from models.checkpoint import load
    from models.quant import param_bytes, quantize_model
    from evals.perplexity import mean_loss

    target_dir = pathlib.Path(args.target)
    _ensure_run(target_dir)
    model, cfg = load(target_dir)
    tok = SentencePieceTokenizer.from_file(target_dir / "tokenizer.model")
    batches = _held_out(tok, 8)

    def ppl(m):
        return float(np.exp(mean_loss(m, batches)))

    base, base_bytes = ppl(model), param_bytes(model)
    rows = [["float32", f"{base:.3f}", "", f"{base_bytes / 2**20:.2f}", ""]]
    results = {"float32": {"perplexity": base, "bytes": base_bytes}}
    for mode in ("int8", "int4"):
        q = quantize_model(model, mode)
        p, qb = ppl(q), param_bytes(q)
        results[mode] = {"perplexity": p, "bytes": qb}
        change, saved = f"{100 * (p / base - 1):+.2f}%", f"{1 - qb / base_bytes:.1%}"
        rows.append([mode, f"{p:.3f}", change, f"{qb / 2**20:.2f}", saved])
    table = records.table(
        f"Weight-only quantization of {target_dir.name} ({cfg.dtype} compute): held-out perplexity on 8 x 8 x 256 "
        f"tokens and parameter memory",
        ["weights", "perplexity", "change", "param MiB", "saved"], rows)
    records.print_table(table)
    method = ("The trained `tiny` run (see decode_speculative); `models.quant.quantize_model(model, mode)`: int8 "
              "per output channel, int4 in groups of 64; perplexity = exp of the mean token loss "
              "(`evals.perplexity.mean_loss`) over 8 batches of 8 x 256 tokens of the embedded corpus's validation split; "
              "bytes = `models.quant.param_bytes`. No timing.")
    return {"name": "decode_quantize", "title": "Weight-only quantization — `benchmarks/decode.py "
                                                "--sections=quantize`",
            "tables": [table], "method": method, "results": results}


# --------------------------------------------------------------------------------------------
# The CPU decode layout


def layout_section(args, rows=(1, 8, 16), panels=(32, 64), passes=5) -> dict:
    import jax
    import jax.numpy as jnp

    from inference import generate
    from inference.decode_layout import panel_matmul, to_panels
    from models.transformer import build

    cfg = model_config("small")
    d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = [(d, n * h), (d, k * h), (d, k * h), (n * h, d), (d, f), (d, f), (f, d)] * cfg.num_layers
    shapes.append((d, cfg.vocab_size))
    r = np.random.default_rng(0)
    mats = [jnp.asarray(r.standard_normal(s, np.float32) * 0.02) for s in shapes]
    nbytes = sum(a.size * 4 for a in mats)
    layouts = {"row-major": (mats, lambda x, w: x @ w)}
    for j in panels:
        layouts[f"{j}-column panels"] = ([to_panels(w, j) for w in mats],
                                         lambda x, w: panel_matmul(x, w, 1, (w.shape[0] * w.shape[2],), jnp.float32,
                                                                   jnp.float32))

    def pass_fn(weights, fn, m):
        xs = {kk: jnp.asarray(r.standard_normal((m, kk), np.float32)) for kk in {s[0] for s in shapes}}

        @jax.jit
        def run(xs, weights):  # `passes` passes over every matrix, each product feeding a carry
            def body(_, acc):
                for w, (kk, _n) in zip(weights, shapes):
                    acc = acc + fn(xs[kk] + acc * 1e-9, w)[:, :1]
                return acc
            return jax.lax.fori_loop(0, passes, body, jnp.zeros((m, 1)))
        return lambda: records.seconds(lambda: jax.block_until_ready(run(xs, weights))) / passes

    bw_rows, bw_samples = [], {}
    for m in rows:
        fns = {name: pass_fn(w, fn, m) for name, (w, fn) in layouts.items()}
        s = records.interleaved(fns, args.rounds, warmup=1)
        bw_samples[m] = s
        for name in layouts:
            ms = records.summarize([t * 1e3 for t in s[name]])
            gbs = records.summarize([nbytes / t / 1e9 for t in s[name]])
            vs = "1" if name == "row-major" else records.spread(records.ratio_summary(s["row-major"], s[name]),
                                                                "{:.2f}")
            bw_rows.append([m, name, records.spread(ms, "{:.2f}"), records.spread(gbs), vs])
    bandwidth = records.table(
        f"The `small` model's {len(mats)} weight matrices ({nbytes / 1e6:.0f} MB f32, each its own array) "
        f"multiplied by a few rows: ms per pass over all of them and weight GB/s, median (min–max) of "
        f"{args.rounds} interleaved rounds of {passes} passes; speed-up over row-major per round",
        ["rows", "layout", "ms/pass", "GB/s", "speed-up"], bw_rows)

    model = build(cfg, seed=0)
    gen_rows, gen_samples = [], {}
    for b in (1, 8):
        prompts = r.integers(3, cfg.vocab_size, (b, 64)).tolist()

        def step_ms(on, prompts=prompts):
            t1 = records.seconds(lambda: generate(model, prompts, max_new_tokens=1, decode_layout=on))
            tn = records.seconds(lambda: generate(model, prompts, max_new_tokens=64, decode_layout=on))
            return (tn - t1) / 63 * 1e3

        s = records.interleaved({"model's layout": lambda: step_ms(False), "decode layout": lambda: step_ms(True)},
                                args.rounds, warmup=1)
        gen_samples[b] = s
        gen_rows.append([b, records.spread(records.summarize(s["model's layout"]), "{:.2f}"),
                         records.spread(records.summarize(s["decode layout"]), "{:.2f}"),
                         records.spread(records.ratio_summary(s["model's layout"], s["decode layout"]), "{:.2f}")])
    gen = records.table(
        f"`inference.generate` on the `small` shape (f32, random weights), prompt 64, 64 new: decode ms per step "
        f"with `decode_layout=False` and `True`, median (min–max) of {args.rounds} interleaved rounds",
        ["batch", "model's layout ms", "decode layout ms", "speed-up"], gen_rows)
    for t in (bandwidth, gen):
        records.print_table(t)
    method = ("Bandwidth: random float32 matrices of the `small` shape's 57 projections (q, k, v, o, gate, up, down "
              "per layer, and the head), each its own array, multiplied by [rows, K] inputs inside one jitted "
              f"`fori_loop` of {passes} passes (each product feeds a carry, so none is skipped); row-major is "
              "`x @ W`, panels are `inference.decode_layout.to_panels(W, j)` multiplied by `panel_matmul`. "
              "generate: decode ms/step = (64-token call - 1-token call) / 63, both layouts in this process, "
              "interleaved after one untimed round.")
    return {"name": "decode_layout", "title": "The CPU decode layout — `benchmarks/decode.py --sections=layout`",
            "tables": [bandwidth, gen], "method": method,
            "results": {"bandwidth_seconds_per_pass": bw_samples, "generate_ms_per_step": gen_samples,
                        "weight_bytes": nbytes}}


# --------------------------------------------------------------------------------------------


SECTIONS = ("decode", "speculative", "quantize", "layout")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {SECTIONS}")
    ap.add_argument("--batches", default="1,8,32", help="decode: batch sizes of `small` in float32")
    ap.add_argument("--bf16_batches", default="8", help="decode: batch sizes of `small` in bfloat16 (empty: none)")
    ap.add_argument("--large", default="llama_125m", help=f"decode: the larger model, one of {sorted(MODELS)} or none")
    ap.add_argument("--large_batches", default="1,8", help="decode: batch sizes of the larger model (float32)")
    ap.add_argument("--hf_variants", default=",".join(HF_VARIANTS), help=f"decode: transformers variants, of "
                                                                         f"{HF_VARIANTS} (empty: no transformers)")
    ap.add_argument("--baseline", default=DEFAULT_BASELINE,
                    help="decode: the commit whose Loom runs beside this tree's (none: skip)")
    ap.add_argument("--prompt", type=int, default=64, help="decode: prompt tokens per row")
    ap.add_argument("--new", type=int, default=64, help="decode: new tokens per call")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds (every section)")
    ap.add_argument("--pause", type=float, default=0.5, help="decode: seconds between calls")
    ap.add_argument("--target", default=str(REPO / "runs" / "tiny"))
    ap.add_argument("--draft", default=str(REPO / "runs" / "tiny_draft"))
    ap.add_argument("--no_record", action="store_true", help="print only; write no benchmarks/records/*.json")
    ap.add_argument("--record_suffix", default="", help="appended to each record's name and title (a focused "
                    "re-run beside the full records, e.g. _ab_batch1)")
    args = ap.parse_args()
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"--sections {bad}: valid are {SECTIONS}")
    if args.rounds < 1:
        ap.error(f"--rounds={args.rounds} must be >= 1")
    if args.new < 2:
        ap.error(f"--new={args.new} must be >= 2 (decode tok/s counts the tokens after the first)")
    if args.large != "none" and args.large not in MODELS:
        ap.error(f"--large={args.large!r}: valid are {sorted(MODELS)} or none")

    t0 = time.perf_counter()
    for name in sections:
        fn = {"decode": decode_section, "speculative": speculative_section, "quantize": quantize_section,
              "layout": layout_section}[name]
        t = time.perf_counter()
        rec = fn(args)
        print(f"# {name}: {time.perf_counter() - t:.0f}s", flush=True)
        if not args.no_record:
            suffix = args.record_suffix
            title = rec["title"] + (f" ({suffix.strip('_').replace('_', ' ')})" if suffix else "")
            records.write_record(rec["name"] + suffix, title=title, tables=rec["tables"], method=rec["method"],
                                 params=vars(args), results=rec["results"])
    print(f"# total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
