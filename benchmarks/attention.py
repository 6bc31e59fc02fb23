"""Flash-attention throughput: Loom's Pallas kernels against cuDNN, XLA and JAX's bundled Pallas ops.

    python benchmarks/attention.py                       # the default sweep on the local GPU/TPU
    python benchmarks/attention.py --seq 4096 --head-dims 128 --causal 1 --iters 50
    python benchmarks/attention.py --smoke               # tiny shapes in interpret mode (CPU): checks the script

On a machine without a GPU or TPU it exits with status 2 (the kernels would only run interpreted).

Reports TFLOP/s of the forward pass and of forward + backward for each implementation, sequence
length (1k-16k), head_dim (64, 128) and causal / non-causal, then the ratios the issue sets
targets for (H100): forward >= 0.9x cuDNN, backward >= 0.85x cuDNN, causal time <= 0.6x
non-causal. It prints measurements and ratios and never passes or fails on time.

FLOP counts (the usual flash-attention convention): forward 4*B*N*T*S*H (QK^T and PV), backward
2.5x that (5 matmuls with the recomputation), halved when causal. For each (head_dim, sequence
length), every implementation x mode x causal is compiled and warmed up (--warmup calls), then
all are timed in interleaved rounds (benchmarks/records.py): a round calls each one --iters times
and keeps the median call; tables give the median (min-max) over --rounds rounds, and the ratios
are per round (paired). Writes benchmarks/records/attention_<platform>.json.

Implementations ("impls"):
  loom    pallas_kernels.flash_attention (Mosaic GPU on NVIDIA, Mosaic TPU on TPU)
  cudnn   jax.nn.dot_product_attention(implementation="cudnn")   (NVIDIA only)
  xla     jax.nn.dot_product_attention(implementation="xla")
  mgpu    jax.experimental.pallas.ops.gpu.attention_mgpu (Hopper; its backward has no causal)
  triton  jax.experimental.pallas.ops.gpu.attention.mha (the deprecated Triton-lowered Pallas op)
  tpu_flash  jax.experimental.pallas.ops.tpu.flash_attention (TPU only)
Only jax and pallas_kernels are imported, so it runs on a GPU host without the data stack.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: `pallas_kernels` importable

from benchmarks import records  # noqa: E402  (stdlib only)
from pallas_kernels import flash_attention  # noqa: E402


# --------------------------------------------------------------------------------------------
# Implementations: fn(q, k, v) -> out, all with q [B, T, N, H], k/v [B, S, K, H].


def _loom(causal, smoke):
    kw = dict(backend="tpu", interpret=True) if smoke else {}
    return lambda q, k, v: flash_attention(q, k, v, causal=causal, **kw)


def _jax_nn(impl):
    def make(causal, smoke):
        del smoke
        return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
    return make


def _mgpu(causal, smoke):
    del smoke
    from jax.experimental.pallas.ops.gpu import attention_mgpu as am

    def fn(q, k, v):
        h = q.shape[-1]
        block_kv = 128 if h <= 128 else 64
        cfg = am.TuningConfig(block_q=64, block_kv=block_kv, max_concurrent_steps=2, causal=causal,
                              block_q_dkv=64, block_kv_dkv=64, block_q_dq=64, block_kv_dq=64)
        return am.attention(q, k, v, cfg)
    return fn


def _triton(causal, smoke):
    del smoke
    from jax.experimental.pallas.ops.gpu import attention as ta

    def fn(q, k, v):
        if k.shape[2] != q.shape[2]:
            raise NotImplementedError("the Triton op takes no grouped K/V")
        return ta.mha(q, k, v, segment_ids=None, causal=causal)
    return fn


def _tpu_flash(causal, smoke):
    del smoke
    from jax.experimental.pallas.ops.tpu import flash_attention as tf

    def fn(q, k, v):  # that op takes [B, N, T, H] and equal head counts
        if k.shape[2] != q.shape[2]:
            raise NotImplementedError("the bundled TPU op takes no grouped K/V")
        t = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
        h = q.shape[-1]
        return t(tf.flash_attention(t(q), t(k), t(v), causal=causal, sm_scale=1.0 / h ** 0.5))
    return fn


IMPLS = {"loom": _loom, "cudnn": _jax_nn("cudnn"), "xla": _jax_nn("xla"), "mgpu": _mgpu, "triton": _triton,
         "tpu_flash": _tpu_flash}
DEFAULT_IMPLS = {"gpu": ("loom", "cudnn", "xla", "mgpu", "triton"), "tpu": ("loom", "xla", "tpu_flash"),
                 "cpu": ("loom", "xla")}


# --------------------------------------------------------------------------------------------
# Timing


def _flops(b, n, t, s, h, causal, mode):
    fwd = 4.0 * b * n * t * s * h * (0.5 if causal else 1.0)
    return fwd if mode == "fwd" else 3.5 * fwd  # forward + backward (2.5x forward)


def build_point(impl, b, t, n, kh, h, causal, dtype, mode, smoke):
    """(jitted fn, its arguments) of one implementation at one point."""
    if impl == "mgpu" and dtype == jnp.bfloat16:
        dtype = jnp.float16  # that op's shared-memory tiles are float16; same tensor-core rate
    keys = jax.random.split(jax.random.key(t * 131 + h), 3)
    q = jax.random.normal(keys[0], (b, t, n, h), dtype)
    k = jax.random.normal(keys[1], (b, t, kh, h), dtype)
    v = jax.random.normal(keys[2], (b, t, kh, h), dtype)
    attn = IMPLS[impl](causal, smoke)
    if mode == "fwd":
        fn = jax.jit(attn)
    else:
        fn = jax.jit(jax.grad(lambda q, k, v: attn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
    return fn, (q, k, v)


def _round_timer(fn, args, iters):
    """A function timing `iters` calls, returning the median call's seconds."""
    def run():
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)
    return run


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"


def bench_group(a, impls, h, t, dtype, causals, modes):
    """Every implementation x mode x causal at one (head_dim, seq), timed in interleaved rounds.
    Returns ({(impl, mode, causal): per-round seconds}, {key: error}, (b, n, kh))."""
    b, n = max(1, a.tokens // t), max(1, a.hidden // h)
    kh = a.kv_heads or n
    fns, errors = {}, {}
    for impl, mode, causal in ((i, m, c) for i in impls for m in modes for c in causals):
        try:
            fn, args = build_point(impl, b, t, n, kh, h, causal, dtype, mode, a.smoke)
            for _ in range(a.warmup):  # compiles; an implementation that does not apply fails here
                jax.block_until_ready(fn(*args))
        except Exception as e:  # report, go on
            errors[(impl, mode, causal)] = _error(e)
            print(f"{impl:>10} {mode:>7} {int(causal):>6} {h:>4} {t:>6}   n/a: {errors[(impl, mode, causal)]}",
                  flush=True)
            continue
        fns[(impl, mode, causal)] = _round_timer(fn, args, a.iters)
    samples = records.interleaved(fns, a.rounds, warmup=0) if fns else {}
    return samples, errors, (b, n, kh)


# --------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", default="1024,2048,4096,8192,16384", help="comma-separated sequence lengths")
    p.add_argument("--head-dims", default="64,128")
    p.add_argument("--causal", default="0,1", help="0, 1 or 0,1")
    p.add_argument("--modes", default="fwd,fwdbwd")
    p.add_argument("--impls", default=None, help=f"comma-separated subset of {sorted(IMPLS)}; default per platform")
    p.add_argument("--tokens", type=int, default=16384, help="batch = max(1, tokens // seq)")
    p.add_argument("--hidden", type=int, default=2048, help="query heads = hidden // head_dim")
    p.add_argument("--kv-heads", type=int, default=0, help="kv heads (0 = as many as query heads)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per implementation (the first compiles)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (>= 5 for a record)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per implementation per round (median kept)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, kernels interpreted: checks the script on CPU")
    p.add_argument("--name", default="", help="record name (default: attention_<platform>)")
    p.add_argument("--records-dir", default=None, help="where the JSON record goes (default benchmarks/records; "
                   "with --smoke a temporary directory)")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.iters < 1 or a.warmup < 1:
        p.error(f"--rounds={a.rounds}, --iters={a.iters} and --warmup={a.warmup} must all be >= 1")

    platform = jax.devices()[0].platform
    device = jax.devices()[0].device_kind
    if a.smoke:
        a.seq, a.head_dims, a.tokens, a.hidden, a.iters, a.warmup = "256", "64", 256, 128, 2, 1
    elif platform == "cpu":
        print("benchmarks/attention.py needs a GPU or TPU (found only a CPU, where the kernels would run "
              "interpreted); use --smoke to check the script here.", file=sys.stderr)
        return 2
    impls = a.impls.split(",") if a.impls else list(DEFAULT_IMPLS[platform])
    for impl in impls:
        if impl not in IMPLS:
            p.error(f"--impls: {impl!r} is not one of {sorted(IMPLS)}")
    seqs = [int(x) for x in a.seq.split(",")]
    head_dims = [int(x) for x in a.head_dims.split(",")]
    causals = [bool(int(x)) for x in a.causal.split(",")]
    modes = a.modes.split(",")
    dtype = jnp.dtype(a.dtype)
    print(f"# attention benchmark: {device} ({platform}), jax {jax.__version__}, {dtype.name}", flush=True)
    rows, groups = [], {}
    for h, t in ((h, t) for h in head_dims for t in seqs):
        samples, errors, (b, n, kh) = bench_group(a, impls, h, t, dtype, causals, modes)
        groups[(h, t)] = (samples, errors, (b, n, kh))
        for impl, mode, causal in ((i, m, c) for i in impls for m in modes for c in causals):
            key = (impl, mode, causal)
            head = [impl, mode, int(causal), h, t, b, n, kh]
            if key in errors:
                rows.append(head + [f"n/a: {errors[key]}", ""])
                continue
            secs = samples[key]
            flops = _flops(b, n, t, t, h, causal, mode)
            rows.append(head + [records.spread(records.summarize([s * 1e3 for s in secs]), "{:.3f}"),
                                records.spread(records.summarize([flops / s / 1e12 for s in secs]),
                                               "{:.2f}" if a.smoke else "{:.1f}")])
            print(" ".join(str(x) for x in rows[-1]), flush=True)
    tables = [records.table(
        f"Attention on {device}, {dtype.name}: {a.tokens} tokens per call (batch = tokens / T), hidden {a.hidden} "
        f"(heads = hidden / H); median (min–max) over {a.rounds} interleaved rounds of the median of {a.iters} calls",
        ["impl", "mode", "causal", "H", "T", "B", "N", "K", "ms", "TFLOP/s"], rows)]
    if "loom" in impls and ("cudnn" in impls or len(causals) == 2):
        tables.append(ratio_table(groups, impls, causals))
    for t in tables:
        records.print_table(t)
    directory = a.records_dir or (tempfile.mkdtemp(prefix="loom_smoke_records_") if a.smoke else records.RECORDS)
    method = (f"q, k, v random normal {dtype.name} of shape [B, T, N, H] (k, v with K heads), T = S; forward = the "
              "attention output, fwdbwd = the gradient of its f32 sum w.r.t. q, k, v. Implementations: "
              + ", ".join(impls) + " (see benchmarks/attention.py). FLOPs: forward 4·B·N·T²·H, halved when causal; "
              "forward + backward 3.5× that. Each implementation × mode × causal at one (H, T) is compiled and "
              f"warmed up ({a.warmup} calls), then all are timed in {a.rounds} interleaved rounds of {a.iters} calls "
              "(the median call per round); ratios are per round."
              + (" SMOKE RUN: tiny shapes, kernels interpreted on a CPU; the figures mean nothing." if a.smoke else ""))
    records.write_record(a.name or f"attention_{platform}{'_smoke' if a.smoke else ''}",
                         title=f"Attention kernels on {device}", tables=tables, method=method, params=vars(a),
                         results={f"{h}/{t}": {"batch_heads_kv": list(bnk),
                                               "seconds": {f"{i}/{m}/{int(c)}": v for (i, m, c), v in s.items()},
                                               "errors": {f"{i}/{m}/{int(c)}": v for (i, m, c), v in e.items()}}
                                  for (h, t), (s, e, bnk) in groups.items()},
                         directory=Path(directory))
    return 0


def ratio_table(groups, impls, causals):
    """Loom vs cuDNN (forward, backward alone) and Loom's causal vs non-causal time, per round."""
    rows = []
    for (h, t), (s, _, _) in groups.items():
        for causal in causals:
            def get(impl, mode, c=causal):
                return s.get((impl, mode, c))

            lf, cf, lb, cb = get("loom", "fwd"), get("cudnn", "fwd"), get("loom", "fwdbwd"), get("cudnn", "fwdbwd")
            fwd = records.spread(records.ratio_summary(cf, lf), "{:.2f}") if lf and cf else "n/a"
            bwd = (records.spread(records.summarize([(c2 - c1) / (l2 - l1) for c1, c2, l1, l2 in zip(cf, cb, lf, lb)]),
                                  "{:.2f}") if lf and cf and lb and cb and all(y > x for x, y in zip(lf, lb))
                   else "n/a")
            cells = []
            for mode in ("fwd", "fwdbwd"):
                c, f = get("loom", mode, True), get("loom", mode, False)
                cells.append(records.spread(records.ratio_summary(c, f), "{:.2f}") if causal and c and f else "-")
            rows.append([h, t, int(causal), fwd, bwd, *cells])
    return records.table("Ratios, per round: Loom / cuDNN throughput (forward; backward alone = fwd+bwd − fwd time) "
                         "and Loom's causal / non-causal time; targets (H100): fwd ≥ 0.90, bwd ≥ 0.85, causal/full "
                         "time ≤ 0.60", ["H", "T", "causal", "fwd ratio", "bwd ratio", "causal/full time fwd",
                                         "causal/full time fwd+bwd"], rows)


if __name__ == "__main__":
    sys.exit(main())
