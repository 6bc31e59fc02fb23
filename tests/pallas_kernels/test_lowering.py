"""Lowering the kernels from the CPU for TPU (Mosaic TPU) and CUDA (Mosaic GPU, Hopper).

At the production shape (batch 1, 8k tokens, 32 query heads over 8 kv heads, head_dim 128,
bf16), forward and gradient, so block-shape, layout and dtype errors show without hardware.
CUDA lowering from a CPU-only process needs an abstract mesh of GPU devices (`AbstractMesh` with
an `AbstractDevice` of platform "gpu"): without one, Mosaic GPU has no device to lower for.
"""

import re

import jax
import jax.extend
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh

from pallas_kernels import flash_attention

B, T, N, K = 1, 8192, 32, 8


def _lower(backend, head_dim, grad, v_head_dim=None, **kw):
    """HLO text of the jitted forward (or gradient) lowered for TPU or CUDA."""
    q = jax.ShapeDtypeStruct((B, T, N, head_dim), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((B, T, K, head_dim), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((B, T, K, v_head_dim or head_dim), jnp.bfloat16)
    f = lambda q, k, v: flash_attention(q, k, v, backend=backend, interpret=False, **kw)  # noqa: E731
    if grad:
        loss = f
        f = jax.grad(lambda q, k, v: loss(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    if backend == "tpu":
        return jax.jit(f).trace(q, k, v).lower(lowering_platforms=("tpu",)).as_text()
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(f).trace(q, k, v).lower(lowering_platforms=("cuda",)).as_text()


FEATURES = {  # causal always; the second adds a traced (per-layer) window, softcap and packed rows
    "causal": lambda: dict(),
    "window-softcap-segments": lambda: dict(window=jnp.int32(4096), softcap=30.0,
                                            segment_ids=jnp.ones((B, T), jnp.int32)),
    # ALiBi's slopes: SMEM scalars in the TPU kernels, a per-row [N, W] array in the GPU ones
    "alibi-window-segments": lambda: dict(alibi_slopes=2.0 ** (-8.0 * jnp.arange(1, N + 1) / N),
                                          window=jnp.int32(4096), segment_ids=jnp.ones((B, T), jnp.int32)),
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


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_lowering_with_values_of_their_own_head_dim(backend):
    """DeepSeek-V2's latent attention: q/k head dim 192, values 128 (the GPU kernels run at 256)."""
    text = _lower(backend, 192, True, v_head_dim=128)
    if backend == "gpu":
        assert text.count("mosaic_gpu") >= 3 and "256xbf16" in text
    else:
        assert text.count("tpu_custom_call") >= 3


def _kernel_operands(text: str) -> list[str]:
    """The operand types of each Mosaic TPU kernel call in lowered StableHLO, one string per call."""
    lines = [line for line in text.splitlines() if "stablehlo.custom_call @tpu_custom_call(" in line]
    return [re.search(r"\} : \((tensor<[^()]*)\) ->", line).group(1) for line in lines]


@pytest.mark.parametrize("head_dim,q_type,kv_type", [
    (64, f"tensor<{B}x{N}x{T}x64xbf16>", f"tensor<{B}x{K}x{T}x64xbf16>"),  # [B, N, T, H]: heads major
    (128, f"tensor<{B}x{T}x{N * 128}xbf16>", f"tensor<{B}x{T}x{K * 128}xbf16>"),  # [B, T, N*H]: a free reshape
], ids=["64-heads-major", "128-flat-contrast"])
def test_tpu_lowering_head_dim_64_uses_heads_major_layout(head_dim, q_type, kv_type):
    """A head_dim that is not a multiple of 128 cannot be a (1, H) block of [B, T, N, H]: the
    kernels (forward, dQ, dK/dV) take q, k and v transposed to [B, N, T, H]; head_dim 128 keeps
    the flat [B, T, N*H] view."""
    calls = _kernel_operands(_lower("tpu", head_dim, True))
    assert len(calls) == 3
    for operands in calls:
        assert operands.count(q_type) >= 1 and operands.count(kv_type) == 2, operands
        assert f"tensor<{B}x{T}x{N}x{head_dim}xbf16>" not in operands  # never the model's [B, T, N, H]


def _dot_precisions(jaxpr) -> dict[str, list]:
    """kernel name -> the precision of every dot_general in that Pallas kernel's body."""
    out: dict[str, list] = {}

    def walk(j, kernel):
        for e in j.eqns:
            if e.primitive.name == "pallas_call":
                walk(e.params["jaxpr"], e.params["name"])
                continue
            if e.primitive.name == "dot_general" and kernel is not None:
                out.setdefault(kernel, []).append(e.params["precision"])
            for p in e.params.values():
                for sub in p if isinstance(p, (list, tuple)) else (p,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr, kernel)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub, kernel)

    walk(jaxpr.jaxpr, None)
    return out


def test_tpu_lowering_float32_grad():
    """f32 inputs take full-precision MXU passes (Precision.HIGHEST) in every matmul of the
    forward, dQ and dK/dV kernels; bf16 inputs take the default single pass."""
    highest = (jax.lax.Precision.HIGHEST,) * 2
    for dtype, expected in ((jnp.float32, highest), (jnp.bfloat16, (jax.lax.Precision.DEFAULT,) * 2)):
        q = jax.ShapeDtypeStruct((B, T, N, 128), dtype)
        k = jax.ShapeDtypeStruct((B, T, K, 128), dtype)
        f = jax.grad(lambda q, k, v: flash_attention(q, k, v, backend="tpu", interpret=False)
                     .astype(jnp.float32).sum(), argnums=(0, 1, 2))
        if dtype == jnp.float32:  # it lowers for TPU
            text = jax.jit(f).trace(q, k, k).lower(lowering_platforms=("tpu",)).as_text()
            assert len(_kernel_operands(text)) == 3
        precisions = _dot_precisions(jax.make_jaxpr(f)(q, k, k))
        assert sorted(precisions) == ["loom_flash_dkv", "loom_flash_dq", "loom_flash_fwd"]
        for kernel, ps in precisions.items():
            assert ps and all(p == expected for p in ps), (dtype, kernel, ps)
