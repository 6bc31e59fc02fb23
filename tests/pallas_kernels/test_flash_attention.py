"""TPU flash-attention kernels (interpret mode on CPU) against the float64 reference, and the API.

The default suite runs a pairwise-covering grid (every pair of factor values at least once);
the full product is `slow` (`pytest -m slow tests/pallas_kernels`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import BlockSizes, attention_reference, flash_attention
from pallas_kernels.common import KernelConfig, block_info, block_ranges
from pallas_kernels.reference import masked_attention
from tests.pallas_kernels.cases import (TOLERANCE, TPU_BLOCKS, TPU_FACTORS, case_id, pairwise, product, rel_err,
                                        run_case)

TPU_CASES = pairwise(TPU_FACTORS)


def _check(errs, dtype):
    bad = {k: v for k, v in errs.items() if not v <= TOLERANCE[dtype]}
    assert not bad, f"relative errors above {TOLERANCE[dtype]} ({dtype}): {bad}; all: {errs}"


def _tpu(case, **extra):
    with pltpu.force_tpu_interpret_mode():
        return run_case(case, dict(backend="tpu", interpret=False, block_sizes=TPU_BLOCKS, **extra))


@pytest.mark.parametrize("case", TPU_CASES, ids=case_id)
def test_tpu_kernels_match_reference(case):
    _check(_tpu(case), case["dtype"])


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in product(TPU_FACTORS) if c not in TPU_CASES], ids=case_id)
def test_tpu_kernels_full_grid(case):
    _check(_tpu(case), case["dtype"])


def _case(**kw):
    base = dict(causal=True, window=None, segments=False, softcap=None, heads=(4, 2), head_dim=64,
                dtype="float32", lengths=(200, 200))
    base.update(kw)
    return base


@pytest.mark.parametrize("case,blocks", [
    # head_dim 256 (lane-aligned "flat" layout) and 32 (heads-major layout); bf16 256 as on TPUs
    (_case(head_dim=256, dtype="bfloat16", window=40), TPU_BLOCKS),
    (_case(head_dim=32, segments=True, softcap=2.0), TPU_BLOCKS),
    # different tiles per kernel; a tile larger than the sequence
    (_case(lengths=(200, 200), segments=True), dict(block_q=128, block_kv=256, block_q_dkv=256,
                                                     block_kv_dkv=128, block_q_dq=128, block_kv_dq=128)),
    (_case(lengths=(300, 300)), dict(block_q=512, block_kv=512)),
    # nothing can be masked: the mask-free kernel bodies only
    (_case(causal=False, lengths=(256, 256)), TPU_BLOCKS),
    # a short decode-like chunk: 3 queries against 130 keys
    (_case(lengths=(3, 130), segments=True, window=17), TPU_BLOCKS),
], ids=["h256-bf16", "h32-seg-cap", "mixed-tiles", "tile>len", "no-mask", "decode-chunk"])
def test_tpu_shapes_and_tiles(case, blocks):
    # Pallas' HLO interpreter (the CPU default): the same kernels, faster than the TPU simulator.
    _check(run_case(case, dict(backend="tpu", block_sizes=blocks)), case["dtype"])


def _qkv(seed, b=2, t=40, s=40, n=4, kh=2, h=32, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.standard_normal(shape), dtype) for shape in ((b, t, n, h), (b, s, kh, h), (b, s, kh, h)))


def test_default_backend_on_cpu_runs_interpreted_kernels():
    """backend=None, interpret=None on CPU: the TPU kernels in interpret mode, jit and grad included."""
    assert jax.default_backend() == "cpu"
    q, k, v = _qkv(0)
    out = flash_attention(q, k, v, window=9)
    with jax.enable_x64():
        ref = attention_reference(*(np.asarray(x, np.float64) for x in (q, k, v)), window=9)
    assert rel_err(out, ref) < 1e-5
    loss = lambda q, k, v: (flash_attention(q, k, v) ** 2).sum()  # noqa: E731
    ref_loss = lambda q, k, v: (attention_reference(q, k, v) ** 2).sum()  # noqa: E731
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    with jax.enable_x64():
        ref_grads = jax.grad(ref_loss, argnums=(0, 1, 2))(*(np.asarray(x, np.float64) for x in (q, k, v)))
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


def test_traced_window_scanned_over_layers():
    """A per-layer window array (0 = global) scanned like the model's layers, with gradients."""
    q, k, v = _qkv(1, t=150, s=150)
    windows = jnp.array([0, 5, 40], jnp.int32)
    seg = np.ones((2, 150), np.int32)
    seg[1, 90:] = 2

    def layers(fn):
        def f(q, k, v):
            def body(carry, w):
                out = fn(q, k, v, w)
                return carry + (out * jnp.cos(out)).sum(), out
            total, outs = jax.lax.scan(body, 0.0, windows)
            return total, outs
        return f

    flash = lambda q, k, v, w: flash_attention(q, k, v, window=w, segment_ids=seg,  # noqa: E731
                                               block_sizes=TPU_BLOCKS)
    pos = np.broadcast_to(np.arange(150, dtype=np.int32), (2, 150))
    ref = lambda q, k, v, w: masked_attention(  # noqa: E731  (the definition; it takes a traced window)
        q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=True, window=w, softcap=None,
        scale=1 / np.sqrt(32), return_lse=False)
    (_, outs), grads = jax.jit(jax.value_and_grad(layers(flash), argnums=(0, 1, 2), has_aux=True))(q, k, v)
    with jax.enable_x64():
        x64 = [np.asarray(x, np.float64) for x in (q, k, v)]
        (_, ref_outs), ref_grads = jax.value_and_grad(layers(ref), argnums=(0, 1, 2), has_aux=True)(*x64)
    assert rel_err(outs, ref_outs) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-5


def test_fully_masked_rows_give_zero_output_and_no_gradient():
    """Queries whose segment has no key: out 0, lse about -3.4e38, finite and zero gradients."""
    q, k, v = _qkv(2, t=40, s=40)
    q_seg = np.ones((2, 40), np.int32)
    q_seg[:, 30:] = 3  # no key has segment 3
    k_seg = np.ones((2, 40), np.int32)
    kw = dict(segment_ids=(q_seg, k_seg), causal=False, return_lse=True)
    out, lse = flash_attention(q, k, v, **kw)
    ref_out, ref_lse = attention_reference(q, k, v, **kw)
    assert np.all(np.asarray(out)[:, 30:] == 0) and np.all(np.asarray(lse)[:, :, 30:] < -1e30)
    np.testing.assert_allclose(np.asarray(lse)[:, :, 30:], np.asarray(ref_lse)[:, :, 30:], rtol=1e-6)
    assert rel_err(np.asarray(out)[:, :30], np.asarray(ref_out)[:, :30]) < 1e-5
    dq, dk, dv = jax.grad(lambda q, k, v: flash_attention(q, k, v, **kw)[0].sum(), argnums=(0, 1, 2))(q, k, v)
    assert np.isfinite(np.asarray(dk)).all() and np.isfinite(np.asarray(dv)).all()
    assert np.all(np.asarray(dq)[:, 30:] == 0)


def test_block_ranges_skip_what_the_mask_hides():
    """Per query block, the visible key-block range: causal, windowed and packed rows."""
    t, block = 512, 128
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (1, t))

    def ranges(seg=None, window=0, causal=True):
        c = KernelConfig(backend="tpu", interpret=True, causal=causal, has_window=window > 0,
                         has_segments=seg is not None, softcap=None, scale=1.0, q_len=t, kv_len=t, q_pad=t,
                         kv_pad=t, block_q=block, block_kv=block, block_q_dkv=block, block_kv_dkv=block,
                         block_q_dq=block, block_kv_dq=block)
        info = block_info(pos, seg, block)
        kv_range, q_range = block_ranges(info, info, jnp.int32(window), c)
        return np.asarray(kv_range[0]).tolist(), np.asarray(q_range[0]).tolist()

    assert ranges(causal=False) == ([[0, 3]] * 4, [[0, 3]] * 4)
    assert ranges() == ([[0, 0], [0, 1], [0, 2], [0, 3]], [[0, 3], [1, 3], [2, 3], [3, 3]])
    assert ranges(window=100)[0] == [[0, 0], [0, 1], [1, 2], [2, 3]]  # keys [i*128-99, i*128+127]
    seg = jnp.asarray(np.repeat([[1, 2]], t // 2, axis=1))  # two documents of 256 tokens
    assert ranges(seg, causal=False)[0] == [[0, 1], [0, 1], [2, 3], [2, 3]]


def test_scale_and_sm_scale_are_one_argument():
    q, k, v = _qkv(3)
    a = flash_attention(q, k, v, scale=0.3)
    b = flash_attention(q, k, v, sm_scale=0.3)
    np.testing.assert_array_equal(a, b)
    assert rel_err(a, attention_reference(q, k, v, scale=0.3)) < 1e-5
    with pytest.raises(ValueError, match="scale=0.3 and sm_scale=0.5 are the same argument"):
        flash_attention(q, k, v, scale=0.3, sm_scale=0.5)


@pytest.mark.parametrize("change,match", [
    (dict(dtype=jnp.float16), r"supports q, k, v of one dtype in \('float32', 'bfloat16'\); got q float16"),
    (dict(backend="cuda"), r"backend='cuda' is not valid; expected one of \('tpu', 'gpu'\)"),
    (dict(backend="gpu"), r"backend='gpu' supports head_dim in \(64, 128, 256\); got head_dim=32"),
    (dict(block_sizes=dict(block_q=100)), r"block_sizes.block_q=100 is not valid for backend='tpu': expected a "
                                          r"positive multiple of 128"),
    (dict(block_sizes=dict(block_x=128)), r"block_sizes has unknown keys \['block_x'\]"),
    (dict(kv_heads=3), "q has 4 heads, not a multiple of k's 3 kv heads"),
    (dict(segment_ids=np.ones((2, 39), np.int32)), r"segment_ids for q must be an integer \[B=2, 40\] array"),
    (dict(window=2.5), r"window must be None, an int or an integer scalar array; got float32\[\]"),
    (dict(softcap=-1.0), r"softcap=-1.0 must be positive"),
    (dict(alibi_slopes=np.ones(2, np.float32)), r"alibi_slopes must be a float \[N=4\] array \(one slope per query "
                                                r"head\) or None; got float32\[2\]"),
])
def test_errors_name_the_value_and_the_valid_set(change, match):
    dtype = change.pop("dtype", jnp.float32)
    kh = change.pop("kv_heads", 2)
    q, k, v = _qkv(4, kh=kh, dtype=dtype)
    if "window" in change:
        change["window"] = jnp.float32(change["window"])
    with pytest.raises(ValueError, match=match):
        flash_attention(q, k, v, **change)


def test_gpu_backend_rejects_float32():
    q, k, v = _qkv(5, h=64, t=128, s=128)
    with pytest.raises(ValueError, match=r"backend='gpu' supports q, k, v in \('bfloat16',\).*got float32"):
        jax.eval_shape(lambda q, k, v: flash_attention(q, k, v, backend="gpu", interpret=True), q, k, v)


def test_alibi_slopes_get_no_gradient_and_change_the_output():
    """ALiBi's slopes are constants (zero gradient, as in the XLA path), and they do bias the scores."""
    q, k, v = _qkv(7, t=48, s=48)
    slopes = jnp.asarray([0.5, 0.25, 0.125, 0.0625], jnp.float32)
    f = lambda sl: (flash_attention(q, k, v, alibi_slopes=sl) ** 2).sum()  # noqa: E731
    np.testing.assert_array_equal(jax.grad(f)(slopes), np.zeros(4, np.float32))
    assert rel_err(flash_attention(q, k, v, alibi_slopes=slopes), flash_attention(q, k, v)) > 1e-2


def test_block_sizes_dataclass_and_dict_agree():
    q, k, v = _qkv(6, t=200, s=200)
    a = flash_attention(q, k, v, block_sizes=BlockSizes(block_q=128, block_kv=128))
    b = flash_attention(q, k, v, block_sizes=dict(block_q=128, block_kv=128))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("hv", [12, 48])
def test_values_with_their_own_head_dim(hv):
    """v's head dim differs from q/k's (32): the kernels run zero-padded to the larger one; out,
    lse and gradients equal the float64 reference."""
    q, k, _ = _qkv(3 + hv, t=40, s=40)
    v = jnp.asarray(np.random.default_rng(hv).standard_normal(k.shape[:3] + (hv,)), jnp.float32)
    kw = dict(causal=True, window=17, return_lse=True)
    out, lse = flash_attention(q, k, v, **kw)
    assert out.shape == q.shape[:3] + (hv,)
    x64 = [np.asarray(x, np.float64) for x in (q, k, v)]
    with jax.enable_x64():
        ref_out, ref_lse = attention_reference(*x64, **kw)
    assert rel_err(out, ref_out) < 1e-5 and rel_err(lse, ref_lse) < 1e-5

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v, **kw)[0] ** 2).sum()

    grads = jax.grad(loss(flash_attention), argnums=(0, 1, 2))(q, k, v)
    with jax.enable_x64():
        ref = jax.grad(loss(attention_reference), argnums=(0, 1, 2))(*x64)
    for g, r in zip(grads, ref):
        assert g.shape == r.shape and rel_err(g, r) < 1e-5
