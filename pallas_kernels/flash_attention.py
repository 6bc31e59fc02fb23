"""`flash_attention`: the public entry point of the Pallas attention kernels.

The wrapper validates the call, fills in defaults (positions, scale, block sizes), pads the
sequence lengths to whole blocks (padded keys are masked inside the kernels, padded query rows
are sliced off), and runs the backend's kernels under a `jax.custom_vjp`:

  forward   out_BTNH, lse_BNT        = backend.forward(q, k, v, ...)
  backward  dq, dk, dv                = backend.backward(q, k, v, dO, lse, delta, ...)
            delta_BNT = rowsum(dO * O) - dlse (the softmax backward's per-row term, computed here)

Backends: "tpu" (Mosaic TPU, `pallas_kernels/tpu.py`) and "gpu" (Mosaic GPU, Hopper warpgroup
kernels, `pallas_kernels/gpu.py`). `backend=None` picks the platform's kernel; on CPU it runs the
TPU kernels in interpret mode, so models and tests use the same code path everywhere.

Masks follow `pallas_kernels.reference` exactly (positions, segment ids, causal, window, softcap),
and so does ALiBi's bias (`alibi_slopes` [N]): -slope * |q_pos - k_pos| added to every score tile
after the soft-cap, in the forward and both backward kernels, from the positions the kernels
already read (a bias costs no block skipping). The slopes are constants: no gradient.
A query whose keys are all masked gets output 0 and lse = MASK_VALUE (about -3.4e38), and
contributes no gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.common import KernelConfig
from pallas_kernels.reference import check_alibi_slopes, check_qkv, default_positions, split_pair

BACKENDS = ("tpu", "gpu")
DTYPES = ("float32", "bfloat16")
GPU_HEAD_DIMS = (64, 128, 256)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes in tokens. None takes the backend default; the backward ones default to the forward's.

    TPU: block_q/block_kv are the forward tiles, *_dkv the dK/dV kernel's, *_dq the dQ kernel's;
    each a multiple of 128 (a tile that covers the whole padded length may be any multiple of 8).
    GPU: block_q is one warpgroup's query rows (a CTA holds two warpgroups: 2 * block_q rows);
    block_kv the key tile; all multiples of 64.
    """

    block_q: int | None = None
    block_kv: int | None = None
    block_q_dkv: int | None = None
    block_kv_dkv: int | None = None
    block_q_dq: int | None = None
    block_kv_dq: int | None = None


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _lcm(*xs: int) -> int:
    return functools.reduce(lambda a, b: a * b // math.gcd(a, b), xs)


def _resolve_blocks(backend: str, h: int, t: int, s: int, bs: BlockSizes | dict | None):
    """(q_pad, kv_pad, six block sizes) for one call; errors name the bad size."""
    if bs is None:
        bs = BlockSizes()
    elif isinstance(bs, dict):
        unknown = set(bs) - {f.name for f in dataclasses.fields(BlockSizes)}
        if unknown:
            raise ValueError(f"block_sizes has unknown keys {sorted(unknown)}; valid keys: "
                             f"{[f.name for f in dataclasses.fields(BlockSizes)]}")
        bs = BlockSizes(**bs)
    elif not isinstance(bs, BlockSizes):
        raise ValueError(f"block_sizes must be a BlockSizes, a dict or None; got {type(bs).__name__}")
    if backend == "tpu":
        bq = bs.block_q or 512
        bk = bs.block_kv or 512
        unit = 128
    else:
        bq = bs.block_q or 64
        bk = bs.block_kv or (128 if h <= 128 else 64)
        unit = 64
    sizes = dict(block_q=bq, block_kv=bk, block_q_dkv=bs.block_q_dkv or (bq if backend == "tpu" else 64),
                 block_kv_dkv=bs.block_kv_dkv or (bk if backend == "tpu" else 64),
                 block_q_dq=bs.block_q_dq or bq, block_kv_dq=bs.block_kv_dq or (bk if backend == "tpu" else 64))
    for name, v in sizes.items():
        if not isinstance(v, int) or v <= 0 or v % unit:
            raise ValueError(f"block_sizes.{name}={v!r} is not valid for backend={backend!r}: "
                             f"expected a positive multiple of {unit}")
    if backend == "tpu":
        q_blocks = (sizes["block_q"], sizes["block_q_dkv"], sizes["block_q_dq"])
        kv_blocks = (sizes["block_kv"], sizes["block_kv_dkv"], sizes["block_kv_dq"])

        def pad(length, blocks):
            # One tile covering a short sequence only needs the sublane multiple (it equals the
            # full array dim, which Mosaic accepts); otherwise whole tiles of every kernel.
            return _round_up(length, 8) if length <= min(blocks) else _round_up(length, _lcm(*blocks))

        q_pad, kv_pad = pad(t, q_blocks), pad(s, kv_blocks)
        sizes = {k: min(v, q_pad if k.startswith("block_q") else kv_pad) for k, v in sizes.items()}
    else:
        # A forward/dQ CTA holds two warpgroups of block_q rows; a dK/dV CTA two of block_kv_dkv.
        q_pad = _round_up(t, _lcm(2 * sizes["block_q"], sizes["block_q_dkv"], 2 * sizes["block_q_dq"]))
        kv_pad = _round_up(s, _lcm(sizes["block_kv"], 2 * sizes["block_kv_dkv"], sizes["block_kv_dq"]))
    return q_pad, kv_pad, sizes


def _backend_module(name: str):
    if name == "tpu":
        from pallas_kernels import tpu
        return tpu
    from pallas_kernels import gpu
    return gpu


# --------------------------------------------------------------------------------------------
# custom_vjp over padded arrays (padding and slicing outside it are differentiated by JAX).


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(c: KernelConfig, q, k, v, q_pos, k_pos, q_seg, k_seg, window, slopes):
    return _backend_module(c.backend).forward(q, k, v, q_pos, k_pos, q_seg, k_seg, window, c, slopes)


def _attention_fwd(c, q, k, v, q_pos, k_pos, q_seg, k_seg, window, slopes):
    out, lse = _backend_module(c.backend).forward(q, k, v, q_pos, k_pos, q_seg, k_seg, window, c, slopes)
    return (out, lse), (q, k, v, q_pos, k_pos, q_seg, k_seg, window, slopes, out, lse)


def _attention_bwd(c, res, cts):
    q, k, v, q_pos, k_pos, q_seg, k_seg, window, slopes, out, lse = res
    d_out, d_lse = cts
    delta = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta = delta - d_lse.astype(jnp.float32)
    dq, dk, dv = _backend_module(c.backend).backward(q, k, v, d_out.astype(q.dtype), lse, delta, q_pos, k_pos,
                                                     q_seg, k_seg, window, c, slopes)
    zero = lambda x: None if x is None else np.zeros(x.shape, jax.dtypes.float0)  # noqa: E731
    d_slopes = None if slopes is None else jnp.zeros_like(slopes)  # constants (stopped in `flash_attention`)
    return dq, dk, dv, zero(q_pos), zero(k_pos), zero(q_seg), zero(k_seg), zero(window), d_slopes


_attention.defvjp(_attention_fwd, _attention_bwd)


# --------------------------------------------------------------------------------------------
# Public API


def _static_float(x, name):
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(f"flash_attention needs {name} as a static Python number; got {x!r}") from e


def _check_ids(x, name, b, length, which):
    if x is None:
        return None
    x = jnp.asarray(x)
    if x.shape != (b, length) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} for {which} must be an integer [B={b}, {length}] array; got {x.dtype}{list(x.shape)}")
    return x.astype(jnp.int32)


def _pad_to(x, length, axis, mode="constant"):
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, mode=mode)


def flash_attention(q_BTNH, k_BSKH, v_BSKV, *, causal=True, segment_ids=None, positions=None, window=None,
                    softcap=None, scale=None, sm_scale=None, return_lse=False, block_sizes=None, backend=None,
                    interpret=None, alibi_slopes=None):
    """Flash attention with Pallas kernels; `dot_product_attention`'s keywords and meanings.

    Supported: float32 and bfloat16 on TPU (any head_dim; lane-aligned 128/256 avoid transposes),
    bfloat16 with head_dim 64/128/256 on GPU (Hopper); any lengths (padded to whole tiles here).
    Values whose head dim differs from q/k's (multi-head latent attention) run the kernels at the
    larger of the two (on GPU, the next head dim the kernels take): zero columns added to q and k
    leave the scores as they are, zero columns added to v give output columns that are sliced off
    (the kernels do that work too).

    Args:
      q_BTNH: queries [batch, q_len, heads, head_dim], float32 or bfloat16.
      k_BSKH, v_BSKV: keys [batch, kv_len, kv_heads, head_dim], values [batch, kv_len, kv_heads,
        v_head_dim], q's dtype; heads % kv_heads == 0 (query head n reads kv head n // (heads //
        kv_heads); K/V are never repeated in memory).
      causal: keys at later positions are masked.
      segment_ids: int [B, T] shared by q and kv, or a (q_BT, kv_BS) pair; a query sees only keys
        with its id (0 marks padding, which sees only padding).
      positions: int [B, T] or a (q_BT, kv_BS) pair; default: the queries are the last T of S keys.
      window: W > 0 keeps each query's W most recent keys, itself included (|dpos| < W when not
        causal); None or 0 = global. May be a traced int32 scalar (a per-layer window in a scan).
      softcap: scores -> softcap * tanh(scores / softcap) before masking.
      scale, sm_scale: score scale (the same keyword under two names); default 1/sqrt(head_dim).
      return_lse: also return the log-sum-exp of the scaled scores, [B, N, T] float32.
      block_sizes: a `BlockSizes` (or dict of its fields) overriding the backend's tiles.
      backend: "tpu" | "gpu" | None (the default platform's kernel; on CPU the TPU kernel, interpreted).
      interpret: run the kernels in interpret mode; None = only when the default platform is CPU.
        TPU kernels then run in Pallas' HLO interpreter (`pltpu.force_tpu_interpret_mode()` selects
        the TPU simulator instead); GPU kernels in the Mosaic GPU simulator.
      alibi_slopes: ALiBi slopes, a float [N] array (one per query head), or None: scores get
        -slope * |q_pos - k_pos| after the soft-cap. Constants: no gradient flows to them.
    Returns:
      out_BTNV (V = v_head_dim) in q's dtype, and lse_BNT (float32) when `return_lse`.
    """
    q, k, v = q_BTNH, k_BSKH, v_BSKV
    b, t, n, h, s, kh = check_qkv(q, k, v, "flash_attention")
    dtypes = {jnp.dtype(x.dtype).name for x in (q, k, v)}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPES:
        raise ValueError(f"flash_attention supports q, k, v of one dtype in {DTYPES}; got "
                         f"q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if (scale is not None and sm_scale is not None
            and _static_float(scale, "scale") != _static_float(sm_scale, "sm_scale")):
        raise ValueError(f"scale={scale} and sm_scale={sm_scale} are the same argument; pass one")
    scale = _static_float(scale if scale is not None else sm_scale, "scale")
    scale = 1.0 / math.sqrt(h) if scale is None else scale
    softcap = _static_float(softcap, "softcap") or None
    if softcap is not None and softcap < 0:
        raise ValueError(f"softcap={softcap} must be positive (or None/0 for no capping)")
    slopes = check_alibi_slopes(alibi_slopes, n, "flash_attention")
    if slopes is not None:
        slopes = jax.lax.stop_gradient(slopes.astype(jnp.float32))

    hv = v.shape[-1]
    if hv != h:  # one head dim for the kernels: the larger, zero-padded (see the docstring)
        width = max(h, hv)
        if (backend or ("gpu" if jax.default_backend() == "gpu" else "tpu")) == "gpu":
            # the Hopper kernels take a few head dims: DeepSeek-V2's 192 / 128 run at 256
            width = min((d for d in GPU_HEAD_DIMS if d >= width), default=width)
        pad = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])])  # noqa: E731
        res = flash_attention(pad(q), pad(k), pad(v), causal=causal, segment_ids=segment_ids, positions=positions,
                              window=window, softcap=softcap, scale=scale, return_lse=return_lse,
                              block_sizes=block_sizes, backend=backend, interpret=interpret)
        out, lse = res if return_lse else (res, None)
        return (out[..., :hv], lse) if return_lse else out[..., :hv]

    platform = jax.default_backend()
    if backend is None:
        backend = "gpu" if platform == "gpu" else "tpu"
    if backend not in BACKENDS:
        raise ValueError(f"flash_attention backend={backend!r} is not valid; expected one of {BACKENDS} or None")
    if interpret is None:
        interpret = platform == "cpu"
    if backend == "gpu" and h not in GPU_HEAD_DIMS:
        raise ValueError(f"flash_attention backend='gpu' supports head_dim in {GPU_HEAD_DIMS}; got head_dim={h}")

    has_window = window is not None
    if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
        has_window = window > 0
    elif has_window:
        w = jnp.asarray(window)
        if w.ndim != 0 or not jnp.issubdtype(w.dtype, jnp.integer):
            raise ValueError(f"window must be None, an int or an integer scalar array; got {w.dtype}{list(w.shape)}")
    window_arr = (jnp.asarray(window, jnp.int32) if has_window else jnp.int32(0)).reshape(1)

    q_seg, k_seg = split_pair(segment_ids, "segment_ids")
    q_pos, k_pos = split_pair(positions, "positions")
    q_seg, k_seg = _check_ids(q_seg, "segment_ids", b, t, "q"), _check_ids(k_seg, "segment_ids", b, s, "kv")
    q_pos, k_pos = _check_ids(q_pos, "positions", b, t, "q"), _check_ids(k_pos, "positions", b, s, "kv")
    if q_pos is None:
        q_pos, k_pos = default_positions(b, t, s)

    q_pad, kv_pad, sizes = _resolve_blocks(backend, h, t, s, block_sizes)
    c = KernelConfig(backend=backend, interpret=bool(interpret), causal=bool(causal), has_window=bool(has_window),
                     has_segments=q_seg is not None, softcap=softcap, scale=scale, q_len=t, kv_len=s,
                     q_pad=q_pad, kv_pad=kv_pad, alibi=slopes is not None, **sizes)
    # Padded keys are masked by index inside the kernels; edge-padding their positions and ids
    # keeps every block's (min, max) ranges, hence the block skipping, as tight as unpadded.
    args = (_pad_to(q, q_pad, 1), _pad_to(k, kv_pad, 1), _pad_to(v, kv_pad, 1),
            _pad_to(q_pos, q_pad, 1, "edge"), _pad_to(k_pos, kv_pad, 1, "edge"),
            None if q_seg is None else _pad_to(q_seg, q_pad, 1, "edge"),
            None if k_seg is None else _pad_to(k_seg, kv_pad, 1, "edge"), window_arr)
    out, lse = _attention(c, *args, slopes)
    out, lse = out[:, :t], lse[:, :, :t]
    return (out, lse) if return_lse else out
