"""Lowering the kernels from the CPU for TPU (Mosaic TPU) and CUDA (Mosaic GPU, Hopper).

At the production shape (batch 1, 8k tokens, 32 query heads over 8 kv heads, head_dim 128,
bf16), forward and gradient, so block-shape, layout and dtype errors show without hardware.
CUDA lowering from a CPU-only process needs an abstract mesh of GPU devices (`AbstractMesh` with
an `AbstractDevice` of platform "gpu"): without one, Mosaic GPU has no device to lower for.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels import flash_attention

B, T, N, K = 1, 8192, 32, 8


def _lower(backend, head_dim, grad, **kw):
    """HLO text of the jitted forward (or gradient) lowered for TPU or CUDA."""
    q = jax.ShapeDtypeStruct((B, T, N, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((B, T, K, head_dim), jnp.bfloat16)
    f = lambda q, k, v: flash_attention(q, k, v, backend=backend, interpret=False, **kw)  # noqa: E731
    if grad:
        loss = f
        f = jax.grad(lambda q, k, v: loss(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    if backend == "tpu":
        return jax.jit(f).trace(q, k, k).lower(lowering_platforms=("tpu",)).as_text()
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(f).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()


FEATURES = {  # causal always; the second adds a traced (per-layer) window, softcap and packed rows
    "causal": lambda: dict(),
    "window-softcap-segments": lambda: dict(window=jnp.int32(4096), softcap=30.0,
                                            segment_ids=jnp.ones((B, T), jnp.int32)),
}


def _kw(name):
    return FEATURES[name]()


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
@pytest.mark.parametrize("features", list(FEATURES))
def test_tpu_lowering_at_production_shape(features, grad):
    text = _lower("tpu", 128, grad, **_kw(features))
    assert "tpu_custom_call" in text
    for name in ("loom_flash_fwd",) + (("loom_flash_dq", "loom_flash_dkv") if grad else ()):
        assert name in text


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "grad"])
@pytest.mark.parametrize("features", list(FEATURES))
def test_cuda_lowering_at_production_shape(features, grad):
    text = _lower("gpu", 128, grad, **_kw(features))
    assert text.count("mosaic_gpu") >= (3 if grad else 1)


@pytest.mark.parametrize("head_dim", [64, 256])
def test_cuda_lowering_other_head_dims(head_dim):
    """head_dim 256 takes one compute warpgroup in the backward (shared memory budget)."""
    text = _lower("gpu", head_dim, True)
    assert text.count("mosaic_gpu") >= 3


def test_tpu_lowering_head_dim_64_uses_heads_major_layout():
    text = _lower("tpu", 64, True)
    assert "loom_flash_dkv" in text and "transpose" in text


def test_tpu_lowering_float32_grad():
    """f32 inputs take full-precision MXU passes (Precision.HIGHEST) in every matmul."""
    q = jax.ShapeDtypeStruct((B, T, N, 128), jnp.float32)
    k = jax.ShapeDtypeStruct((B, T, K, 128), jnp.float32)
    f = jax.grad(lambda q, k, v: flash_attention(q, k, v, backend="tpu", interpret=False).sum(), argnums=(0, 1, 2))
    text = jax.jit(f).trace(q, k, k).lower(lowering_platforms=("tpu",)).as_text()
    assert "loom_flash_dkv" in text
