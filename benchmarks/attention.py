"""Flash-attention throughput: Loom's Pallas kernels against cuDNN, XLA and JAX's bundled Pallas ops.

    python benchmarks/attention.py                       # the default sweep on the local GPU/TPU
    python benchmarks/attention.py --seq 4096 --head-dims 128 --causal 1 --iters 50
    python benchmarks/attention.py --smoke               # tiny shapes in interpret mode (CPU): checks the script

Reports TFLOP/s of the forward pass and of forward + backward for each implementation, sequence
length (1k-16k), head_dim (64, 128) and causal / non-causal, then the ratios the issue sets
targets for (H100): forward >= 0.9x cuDNN, backward >= 0.85x cuDNN, causal time <= 0.6x
non-causal. It prints measurements and ratios and never passes or fails on time.

FLOP counts (the usual flash-attention convention): forward 4*B*N*T*S*H (QK^T and PV), backward
2.5x that (5 matmuls with the recomputation), halved when causal. Each point runs
--warmup + --iters calls of a jitted function and reports the median wall time.

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
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: `pallas_kernels` importable

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


def _median_seconds(fn, args, warmup, iters):
    out = fn(*args)
    jax.block_until_ready(out)
    for _ in range(warmup - 1):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _flops(b, n, t, s, h, causal, mode):
    fwd = 4.0 * b * n * t * s * h * (0.5 if causal else 1.0)
    return fwd if mode == "fwd" else 3.5 * fwd  # forward + backward (2.5x forward)


def bench_point(impl, b, t, n, kh, h, causal, dtype, mode, warmup, iters, smoke):
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
    seconds = _median_seconds(fn, (q, k, v), warmup, iters)
    return seconds, _flops(b, n, t, t, h, causal, mode) / seconds / 1e12


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
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--json", default=None, help="also append one JSON line per point to this file")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, kernels interpreted: checks the script on CPU")
    a = p.parse_args(argv)

    platform = jax.devices()[0].platform
    device = jax.devices()[0].device_kind
    if a.smoke:
        a.seq, a.head_dims, a.tokens, a.hidden, a.iters, a.warmup = "256", "64", 256, 128, 3, 2
    elif platform == "cpu":
        print("No GPU or TPU: the kernels would run interpreted. Use --smoke to check the script.")
        return 0
    impls = a.impls.split(",") if a.impls else list(DEFAULT_IMPLS[platform])
    seqs = [int(x) for x in a.seq.split(",")]
    head_dims = [int(x) for x in a.head_dims.split(",")]
    causals = [bool(int(x)) for x in a.causal.split(",")]
    modes = a.modes.split(",")
    dtype = jnp.dtype(a.dtype)
    print(f"# attention benchmark: {device} ({platform}), jax {jax.__version__}, {dtype.name}, "
          f"{datetime.date.today().isoformat()}")
    print(f"{'impl':>10} {'mode':>7} {'causal':>6} {'H':>4} {'T':>6} {'B':>3} {'N':>3} {'K':>3} {'ms':>9} "
          f"{'TFLOP/s':>8}")
    results = {}
    for h, t, causal, mode, impl in ((h, t, c, m, i) for h in head_dims for t in seqs for c in causals
                                     for m in modes for i in impls):
        b, n = max(1, a.tokens // t), max(1, a.hidden // h)
        kh = a.kv_heads or n
        try:
            seconds, tflops = bench_point(impl, b, t, n, kh, h, causal, dtype, mode, a.warmup, a.iters, a.smoke)
        except Exception as e:  # an implementation that does not apply: report, go on
            print(f"{impl:>10} {mode:>7} {int(causal):>6} {h:>4} {t:>6} {b:>3} {n:>3} {kh:>3}   n/a: "
                  f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
            continue
        results[(impl, mode, causal, h, t)] = seconds
        print(f"{impl:>10} {mode:>7} {int(causal):>6} {h:>4} {t:>6} {b:>3} {n:>3} {kh:>3} {seconds * 1e3:>9.3f} "
              f"{tflops:>8.1f}", flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(dict(impl=impl, mode=mode, causal=causal, head_dim=h, seq=t, batch=b, heads=n,
                                        kv_heads=kh, seconds=seconds, tflops=tflops, device=device,
                                        dtype=dtype.name, jax=jax.__version__,
                                        date=datetime.date.today().isoformat())) + "\n")
    _ratios(results, head_dims, seqs)
    return 0


def _ratios(results, head_dims, seqs):
    """Loom vs cuDNN (forward, backward-only) and causal vs non-causal time, per point."""
    print("\n# ratios (loom / cudnn throughput; loom causal time / non-causal time)")
    print(f"{'H':>4} {'T':>6} {'causal':>6} {'fwd':>6} {'bwd':>6}   causal/full time (fwd, fwd+bwd)")
    get = results.get
    for h, t in ((h, t) for h in head_dims for t in seqs):
        for causal in (False, True):
            lf, cf = get(("loom", "fwd", causal, h, t)), get(("cudnn", "fwd", causal, h, t))
            lb, cb = get(("loom", "fwdbwd", causal, h, t)), get(("cudnn", "fwdbwd", causal, h, t))
            fwd = f"{cf / lf:6.2f}" if lf and cf else "   n/a"
            bwd = f"{(cb - cf) / (lb - lf):6.2f}" if lf and cf and lb and cb and lb > lf else "   n/a"
            line = f"{h:>4} {t:>6} {int(causal):>6} {fwd} {bwd}"
            if causal:
                tf = [get(("loom", m, True, h, t)) and get(("loom", m, False, h, t))
                      and get(("loom", m, True, h, t)) / get(("loom", m, False, h, t)) for m in ("fwd", "fwdbwd")]
                line += "   " + ", ".join(f"{x:.2f}" if x else "n/a" for x in tf)
            print(line)
    print("targets (H100): fwd >= 0.90, bwd >= 0.85, causal/full time <= 0.60")


if __name__ == "__main__":
    sys.exit(main())

