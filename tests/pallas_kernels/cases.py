"""Attention test cases for the Pallas kernels: inputs, the pairwise grid, and the comparison.

Every case draws fresh random q, k, v (never zeros), random packed segments and per-document
positions, and compares `flash_attention` with `attention_reference` evaluated in float64 on the
same (dtype-rounded) inputs: the forward output, the lse, and dq/dk/dv of an objective that
uses both the output and the lse (as ring attention will). Errors are relative to the largest
reference magnitude: max|x - ref| / max|ref|.
"""

from __future__ import annotations

import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np

# Factors of the grid. lengths: (q_len, kv_len): block-aligned, odd, and T != S (the queries
# are the last T keys; with segments that is a (q, kv) pair of ids and positions).
TPU_FACTORS = dict(
    causal=(True, False),
    window=(None, 33),
    segments=(False, True),
    softcap=(None, 5.0),
    heads=((4, 4), (4, 2), (4, 1)),  # (query heads, kv heads): MHA, GQA, MQA
    head_dim=(64, 128),
    dtype=("float32", "bfloat16"),
    lengths=((256, 256), (200, 200), (70, 200)),
    alibi=(False, True),  # ALiBi's bias -slope * |dpos| on the scores (the paper's slopes for the heads)
)
# Mosaic GPU (WGMMA) has no exact f32 path, so its grid is bf16; it adds head_dim 256.
GPU_FACTORS = dict(TPU_FACTORS, heads=((2, 2), (2, 1)), head_dim=(64, 128, 256), dtype=("bfloat16",),
                   lengths=((128, 128), (200, 200), (70, 200)))
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}
TPU_BLOCKS = dict(block_q=128, block_kv=128)  # several blocks per sequence at test lengths


def pairwise(factors: dict) -> list[dict]:
    """A deterministic greedy set of cases covering every pair of factor values at least once."""
    names = list(factors)
    uncovered = {(a, i, b, j) for a, b in itertools.combinations(range(len(names)), 2)
                 for i in range(len(factors[names[a]])) for j in range(len(factors[names[b]]))}
    candidates = list(itertools.product(*(range(len(factors[n])) for n in names)))
    chosen = []
    while uncovered:
        def gain(cand):
            return sum((a, cand[a], b, cand[b]) in uncovered for a, b in itertools.combinations(range(len(names)), 2))
        best = max(candidates, key=gain)
        uncovered -= {(a, best[a], b, best[b]) for a, b in itertools.combinations(range(len(names)), 2)}
        chosen.append(best)
    return [{n: factors[n][i] for n, i in zip(names, c)} for c in chosen]


def product(factors: dict) -> list[dict]:
    names = list(factors)
    return [dict(zip(names, vals)) for vals in itertools.product(*factors.values())]


def case_id(case: dict) -> str:
    n, kh = case["heads"]
    t, s = case["lengths"]
    return (f"{'causal' if case['causal'] else 'full'}-w{case['window']}-{'seg' if case['segments'] else 'noseg'}"
            f"-cap{case['softcap']}-n{n}k{kh}-h{case['head_dim']}-{case['dtype']}-t{t}s{s}"
            + ("-alibi" if case.get("alibi") else ""))


def _packed(rng, b, s):
    """Segment ids [b, s] (2-3 documents per row, trailing padding in row 0) and per-document positions."""
    seg = np.zeros((b, s), np.int32)
    pos = np.zeros((b, s), np.int32)
    for r in range(b):
        cuts = np.sort(rng.choice(np.arange(8, s - 8), size=rng.integers(1, 3), replace=False))
        bounds = [0, *cuts, s]
        for d, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg[r, lo:hi] = d + 1
            pos[r, lo:hi] = np.arange(hi - lo)
        if r == 0:
            seg[r, s - 5:] = 0  # padding sees only padding
    return seg, pos


def make_inputs(case: dict, seed: int | None = None, batch: int = 2):
    """(q, k, v) float32 numpy, the attention keywords, and the objective's random weights."""
    seed = zlib.crc32(case_id(case).encode()) if seed is None else seed
    rng = np.random.default_rng(seed)
    n, kh = case["heads"]
    t, s = case["lengths"]
    h = case["head_dim"]
    q = rng.standard_normal((batch, t, n, h)).astype(np.float32)
    k = rng.standard_normal((batch, s, kh, h)).astype(np.float32)
    v = rng.standard_normal((batch, s, kh, h)).astype(np.float32)
    kw = dict(causal=case["causal"], window=case["window"], softcap=case["softcap"])
    if case.get("alibi"):
        kw["alibi_slopes"] = 2.0 ** (-8.0 * np.arange(1, n + 1) / n)  # Press et al.'s, n a power of two
    if case["segments"]:
        seg, pos = _packed(rng, batch, s)
        if t == s:
            kw.update(segment_ids=seg, positions=pos)
        else:  # the last t tokens query the whole row
            kw.update(segment_ids=(seg[:, s - t:], seg), positions=(pos[:, s - t:], pos))
    w_out = rng.standard_normal((batch, t, n, h)).astype(np.float32)
    w_lse = rng.standard_normal((batch, n, t)).astype(np.float32)
    return (q, k, v), kw, (w_out, w_lse)


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(x - ref).max() / max(np.abs(ref).max(), 1e-30))


def run_case(case: dict, flash_kwargs: dict, seed: int | None = None, batch: int = 2) -> dict[str, float]:
    """Relative errors of out, lse, dq, dk, dv against the float64 reference."""
    from pallas_kernels import attention_reference, flash_attention

    (q, k, v), kw, (w_out, w_lse) = make_inputs(case, seed, batch)
    dtype = jnp.dtype(case["dtype"])
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    fa = lambda q, k, v: flash_attention(q, k, v, return_lse=True, **kw, **flash_kwargs)  # noqa: E731

    def forward_and_grads(q, k, v):
        # The vjp with cotangents (w_out, w_lse) is the gradient of sum(out*w_out) + sum(lse*w_lse).
        (out, lse), vjp = jax.vjp(fa, q, k, v)
        return (out, lse), vjp((jnp.asarray(w_out, out.dtype), jnp.asarray(w_lse)))

    (out, lse), grads = jax.jit(forward_and_grads)(q, k, v)
    assert out.dtype == dtype and lse.dtype == jnp.float32
    with jax.enable_x64():
        x64 = [np.asarray(np.asarray(x, np.float32), np.float64) for x in (q, k, v)]
        ref = lambda q, k, v: attention_reference(q, k, v, return_lse=True, **kw)  # noqa: E731

        def ref_forward_and_grads(q, k, v):
            (out, lse), vjp = jax.vjp(ref, q, k, v)
            return (out, lse), vjp((jnp.asarray(w_out, jnp.float64), jnp.asarray(w_lse, jnp.float64)))

        (ref_out, ref_lse), ref_grads = jax.tree.map(np.asarray, jax.jit(ref_forward_and_grads)(*x64))
    errs = {"out": rel_err(out, ref_out), "lse": rel_err(lse, ref_lse)}
    errs.update({name: rel_err(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    for name, x in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads)):
        if not np.isfinite(np.asarray(x, np.float32)).all():
            errs[name] = float("inf")
    return errs
