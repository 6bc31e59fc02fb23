"""The kernel path's compiled temporary memory grows linearly with sequence length.

Measured on CPU with `memory_analysis()` of the jitted forward + backward: the kernels run in
Pallas' interpret mode, where XLA holds only the operands, outputs and per-row statistics
(O(T)); the score blocks live in the kernel. The XLA reference (`masked_attention`, the
definition) materialises [B, N, T, S] scores and probabilities: O(T^2).
"""

import jax
import jax.numpy as jnp

from pallas_kernels import flash_attention
from pallas_kernels.reference import default_positions, masked_attention


def _temp_bytes(fn, t, n=2, h=64):
    q = jax.ShapeDtypeStruct((1, t, n, h), jnp.float32)
    step = jax.jit(jax.value_and_grad(lambda q, k, v: fn(q, k, v).sum(), argnums=(0, 1, 2)))
    return step.lower(q, q, q).compile().memory_analysis().temp_size_in_bytes


def _flash(q, k, v):
    return flash_attention(q, k, v, causal=True, backend="tpu", interpret=True)


def _reference(q, k, v):
    b, t = q.shape[:2]
    q_pos, k_pos = default_positions(b, t, t)
    return masked_attention(q, k, v, q_pos=q_pos, k_pos=k_pos, q_seg=None, k_seg=None, causal=True, window=None,
                            softcap=None, scale=0.125, return_lse=False)


def test_kernel_temp_memory_is_linear_reference_quadratic():
    short, long = 1024, 4096  # 4x the tokens
    flash = {t: _temp_bytes(_flash, t) for t in (short, long)}
    ref = {t: _temp_bytes(_reference, t) for t in (short, long)}
    flash_growth, ref_growth = flash[long] / flash[short], ref[long] / ref[short]
    print(f"temp bytes: flash {flash} (x{flash_growth:.1f}), reference {ref} (x{ref_growth:.1f})")
    assert flash_growth <= 4.5, flash  # linear: <= 4x (plus slack); quadratic would be 16x
    assert ref_growth >= 12, ref
    assert flash[long] * 20 < ref[long]
