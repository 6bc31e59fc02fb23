"""Decoding speed against full recomputation and Hugging Face `generate`; speculative decoding;
weight-only quantization.

    .venv/bin/python benchmarks/decode.py                      # all sections (several minutes)
    .venv/bin/python benchmarks/decode.py --sections=decode --batches=1,8

decode        Random weights of the `small` preset's shape (Llama, d 512, 8 layers, vocab 4096), f32.
              Prompt 64 tokens, 64 new tokens, greedy. Prefill tokens/s (prompt tokens over the
              time to the first token) and decode tokens/s (new tokens after the first over the
              rest of the time), at batch 1, 8 and 32, for: Loom `inference.generate` (KV cache);
              Loom decoding by full recomputation (a jitted forward over the whole padded sequence
              per token); `transformers` `LlamaForCausalLM.generate` on the same weights (exported
              with models.hf) in a worker process of its own, each after a warm-up call;
              `--rounds` rounds interleave Loom and transformers and each figure is the median
              over them (the recomputation runs once).
speculative   A trained target (the `tiny` preset run in runs/tiny, trained by this script if
              missing) and a 1-layer draft trained the same way (runs/tiny_draft): acceptance
              rate, tokens per target pass, and wall-clock speed-up over the target alone.
quantize      The trained target's held-out perplexity and parameter bytes in bf16, int8 and int4.
layout        Why the CPU decode layout (models.transformer.decode_layout): the `small` model's
              57 weight matrices (103 MB, f32, each its own array) multiplied by 1, 8 and 16 rows,
              as row-major [K, N] matrices (`x @ W`) and as 32- and 64-column panels
              (`panel_matmul`): ms per pass over all of them and the weight bytes read per second;
              and `inference.generate`'s decode step with the model's own layout and the decode
              layout, interleaved.
Prints figures; never asserts on time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import pathlib
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _timed(f, repeats=2):
    f()  # warm-up (compilation)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def decode_section(batches, prompt_len=64, new=64, rounds=3):
    from configs import pretrain
    from inference import generate
    from models.config import ModelConfig
    from models.transformer import apply, build, split_params

    c = pretrain.get_config("small")
    cfg = ModelConfig.from_dict({**c.model.to_dict(), "dtype": "float32", "max_seq_len": 512})
    model = build(cfg, seed=0)
    graphdef, params = split_params(model)
    r = np.random.default_rng(0)
    total = prompt_len + new

    @jax.jit
    def recompute_step(params, tokens, length):
        logits = apply(graphdef, params, {"inputs_BT": tokens})
        return jnp.argmax(jax.lax.dynamic_index_in_dim(logits, length - 1, axis=1, keepdims=False), -1)

    def recompute(prompts, n):
        tokens = jnp.zeros((len(prompts), total), jnp.int32).at[:, :prompt_len].set(jnp.asarray(prompts))
        for i in range(n):
            nxt = recompute_step(params, tokens, prompt_len + i)
            tokens = tokens.at[:, prompt_len + i].set(nxt)
        return jax.block_until_ready(tokens)

    hf = None
    try:
        import models.hf

        tmp = tempfile.mkdtemp()
        models.hf.save(model, tmp)
        # transformers runs in its own process: torch's and XLA's thread pools in one process
        # disturb each other (Loom measured up to 40% slower right after a torch `generate`)
        hf = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                    initializer=_hf_worker_init, initargs=(tmp,))
        hf.submit(_hf_worker_time, [[1, 2]], 1).result()
    except Exception as e:  # noqa: BLE001
        print(f"(transformers baseline unavailable: {e})")
        hf = None

    print(f"decode: small-preset shape (Llama d 512, 8 layers, vocab 4096), f32, prompt {prompt_len}, "
          f"{new} new tokens, greedy; medians of {rounds} interleaved rounds")
    print(f"{'batch':>5s} {'impl':18s} {'prefill tok/s':>13s} {'decode tok/s':>12s} {'vs transformers':>15s}")

    def timed(fn):
        return _first_and_all(fn, new)

    for b in batches:
        prompts = r.integers(3, cfg.vocab_size, (b, prompt_len)).tolist()
        impls = {"loom (KV cache)": lambda: timed(lambda n: generate(model, prompts, max_new_tokens=n)),
                 "loom (recompute)": lambda: timed(lambda n: recompute(prompts, n))}
        if hf is not None:
            impls["transformers"] = lambda: hf.submit(_hf_worker_time, prompts, new).result()
        for name, fn in impls.items():  # compile / warm up
            fn()
        # rounds interleave the implementations, so a slow spell of this shared machine hits all
        # of them; each figure is the median over the rounds (full recomputation, far slower
        # and only a reference point, runs in the first round only)
        runs = {name: [] for name in impls}
        for rnd in range(rounds):
            for name, fn in impls.items():
                if rnd and "recompute" in name:
                    continue
                time.sleep(1.0)  # let the other side's worker threads stop spinning
                t1, tn = fn()
                runs[name].append((b * prompt_len / t1, b * (new - 1) / max(tn - t1, 1e-9)))
        rows = {name: tuple(float(np.median(col)) for col in zip(*r_)) for name, r_ in runs.items()}
        for name, (pre, dec) in rows.items():
            ratio = f"{dec / rows['transformers'][1]:14.2f}x" if "transformers" in rows else "-"
            print(f"{b:5d} {name:18s} {pre:13.0f} {dec:12.1f} {ratio:>15s}", flush=True)
    if hf is not None:
        hf.shutdown()


_HF_MODEL = None


def _hf_worker_init(path):
    import torch
    import transformers

    global _HF_MODEL
    _HF_MODEL = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_worker_time(prompts, new):
    """In the worker process: (t1, tn) of transformers `generate` for 1 and `new` greedy tokens."""
    import torch

    def gen(n):
        with torch.no_grad():
            _HF_MODEL.generate(torch.as_tensor(np.asarray(prompts)), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, eos_token_id=None, pad_token_id=0)

    return _first_and_all(gen, new)


def _first_and_all(gen, new):
    """(t1, tn): seconds for gen(1) and gen(new), generating 1 and `new` tokens."""
    t = time.perf_counter()
    gen(1)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    gen(new)
    return t1, time.perf_counter() - t


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


def speculative_section(target_dir, draft_dir, k_values=(2, 4)):
    from data.tokenizer import SentencePieceTokenizer
    from inference import generate
    from inference.speculative import speculative_generate
    from models.checkpoint import load

    _ensure_run(target_dir)
    _ensure_run(draft_dir, "--config.model.num_layers=1", "--config.model.hidden_size=128",
                "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.model.intermediate_size=352")
    target, _ = load(target_dir)
    draft, _ = load(draft_dir)
    tok = SentencePieceTokenizer.from_file(target_dir / "tokenizer.model")
    prompts = [row[:48].tolist() for row in _held_out(tok, 1)[0]["inputs_BT"][:4]]
    new = 96
    t_plain = _timed(lambda: generate(target, prompts, max_new_tokens=new))
    print(f"speculative: target {target_dir.name} ({target.config.num_layers} layers, d {target.config.hidden_size}), "
          f"draft {draft_dir.name} ({draft.config.num_layers} layer, d {draft.config.hidden_size}); "
          f"4 held-out prompts of 48 tokens, {new} new, greedy")
    print(f"  target alone: {4 * new / t_plain:.1f} tokens/s")
    for k in k_values:
        out, stats = speculative_generate(target, draft, prompts, max_new_tokens=new, num_draft_tokens=k,
                                          return_stats=True)
        assert out == generate(target, prompts, max_new_tokens=new), "speculative output differs"
        t = _timed(lambda: speculative_generate(target, draft, prompts, max_new_tokens=new, num_draft_tokens=k))
        print(f"  k={k}: acceptance {stats.acceptance_rate:.2f}, {stats.tokens_per_round:.2f} tokens per target "
              f"pass, {4 * new / t:.1f} tokens/s, speed-up {t_plain / t:.2f}x (output identical)")


def quantize_section(target_dir):
    from data.tokenizer import SentencePieceTokenizer
    from models.checkpoint import load
    from models.quant import param_bytes, quantize_model
    from evals.perplexity import mean_loss

    _ensure_run(target_dir)
    model, cfg = load(target_dir)
    tok = SentencePieceTokenizer.from_file(target_dir / "tokenizer.model")
    batches = _held_out(tok, 8)

    def ppl(m):
        return float(np.exp(mean_loss(m, batches)))

    base, base_bytes = ppl(model), param_bytes(model)
    print(f"quantize: {target_dir.name} ({cfg.dtype} compute), held-out perplexity on 8 x 8 x 256 tokens")
    print(f"  {'weights':8s} {'perplexity':>10s} {'change':>8s} {'param MiB':>9s} {'saved':>6s}")
    print(f"  {'float32':8s} {base:10.3f} {'':>8s} {base_bytes / 2**20:9.2f}")
    for mode in ("int8", "int4"):
        q = quantize_model(model, mode)
        p, qb = ppl(q), param_bytes(q)
        print(f"  {mode:8s} {p:10.3f} {100 * (p / base - 1):+7.2f}% {qb / 2**20:9.2f} {1 - qb / base_bytes:6.1%}")


def layout_section(rows=(1, 8, 16), rounds=4):
    from configs import pretrain
    from inference import engine, generate
    from models.config import ModelConfig
    from models.transformer import build, panel_matmul, to_panels

    c = pretrain.get_config("small")
    cfg = ModelConfig.from_dict({**c.model.to_dict(), "dtype": "float32", "max_seq_len": 512})
    d, f, n, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = [(d, n * h), (d, k * h), (d, k * h), (n * h, d), (d, f), (d, f), (f, d)] * cfg.num_layers
    shapes.append((d, cfg.vocab_size))
    r = np.random.default_rng(0)
    mats = [jnp.asarray(r.standard_normal(s, np.float32) * 0.02) for s in shapes]
    nbytes = sum(a.size * 4 for a in mats)

    def per_pass(weights, fn, m):
        xs = {kk: jnp.asarray(r.standard_normal((m, kk), np.float32)) for kk in {s[0] for s in shapes}}

        @jax.jit
        def passes(xs, weights):  # 5 passes over every matrix, each product feeding a carry
            def body(_, acc):
                for w, (kk, _n) in zip(weights, shapes):
                    acc = acc + fn(xs[kk] + acc * 1e-9, w)[:, :1]
                return acc
            return jax.lax.fori_loop(0, 5, body, jnp.zeros((m, 1)))
        return _timed(lambda: jax.block_until_ready(passes(xs, weights)), repeats=5) / 5

    print(f"\nlayout: the `small` model's {len(mats)} weight matrices ({nbytes / 1e6:.0f} MB f32), "
          f"best of 5 timings of 5 passes")
    print(f"{'rows':>5} {'layout':>14} {'ms/pass':>8} {'GB/s':>6}")
    for m in rows:
        ref = per_pass(mats, lambda x, w: x @ w, m)
        print(f"{m:5d} {'row-major':>14} {ref * 1e3:8.2f} {nbytes / ref / 1e9:6.1f}")
        for j in (32, 64):
            panels = [to_panels(w, j) for w in mats]
            t = per_pass(panels, lambda x, w: panel_matmul(x, w, 1, (w.shape[0] * w.shape[2],), jnp.float32,
                                                           jnp.float32), m)
            print(f"{m:5d} {f'{j}-col panels':>14} {t * 1e3:8.2f} {nbytes / t / 1e9:6.1f}   {ref / t:.2f}x")

    model = build(cfg, seed=0)
    plain = lambda *a, **kw: None  # noqa: E731
    auto = engine._decode_layout_split
    print(f"\ngenerate, decode ms/step (median of {rounds} interleaved rounds; prompt 64, 64 new)")
    for b in (1, 8):
        prompts = r.integers(3, cfg.vocab_size, (b, 64)).tolist()
        steps = {"model's layout": [], "decode layout": []}
        try:
            for rnd in range(rounds + 1):
                for name, split in (("model's layout", plain), ("decode layout", auto)):
                    engine._decode_layout_split = split
                    t1 = _timed(lambda: generate(model, prompts, max_new_tokens=1), repeats=1)
                    tn = _timed(lambda: generate(model, prompts, max_new_tokens=64), repeats=1)
                    if rnd:  # round 0 warms up
                        steps[name].append((tn - t1) / 63)
        finally:
            engine._decode_layout_split = auto
        a, bb = (float(np.median(v)) for v in steps.values())
        print(f"  batch {b}: model's layout {a * 1e3:.2f} ms, decode layout {bb * 1e3:.2f} ms ({a / bb:.2f}x)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="decode,speculative,quantize,layout")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=3, help="decode: interleaved rounds per batch size (medians)")
    ap.add_argument("--target", default=str(REPO / "runs" / "tiny"))
    ap.add_argument("--draft", default=str(REPO / "runs" / "tiny_draft"))
    args = ap.parse_args()
    import platform

    print(f"# {platform.machine()} | {os.cpu_count()} cores | jax {jax.__version__}")
    sections = args.sections.split(",")
    if "decode" in sections:
        decode_section([int(b) for b in args.batches.split(",")], rounds=args.rounds)
    if "speculative" in sections:
        speculative_section(pathlib.Path(args.target), pathlib.Path(args.draft))
    if "quantize" in sections:
        quantize_section(pathlib.Path(args.target))
    if "layout" in sections:
        layout_section()


if __name__ == "__main__":
    main()
