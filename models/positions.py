"""Position schemes besides RoPE: ALiBi slopes and the sinusoidal table (`model.position_embedding`).

  "rope"        rotary embedding of q and k (Su et al., 2021; models/transformer.py `rope`, with
                its long-context scalings);
  "learned"     a trained [max_seq_len, D] table added to the token embeddings (GPT-2);
  "sinusoidal"  the fixed table of Vaswani et al. (2017, arXiv 1706.03762) added to the token
                embeddings, computed from the positions at each call (no parameters, no length
                limit): PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(p / 10000^(2i/D));
  "alibi"       no embedding; each head's attention scores get -m_n * |pos_q - pos_k| (Press et
                al., 2021, arXiv 2108.12409, "Attention with Linear Biases"), see `alibi_slopes`
                and `models.attention.dot_product_attention`;
  "none"        no position information at all (NoPE: a causal decoder can still infer order
                from the mask; Haviv et al., 2022, arXiv 2203.16634; Kazemnejad et al., 2023).

Every scheme reads the same `positions_BT` the batch carries, so packed rows (positions
restarting at each document) and KV-cache decoding (explicit positions) need nothing special.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SINUSOIDAL_BASE = 10000.0


def alibi_slopes(num_heads: int) -> tuple[float, ...]:
    """ALiBi's per-head slopes m_1..m_N, as Python floats (static, hashable).

    For N a power of two the paper's geometric sequence: ratio and first term 2^(-8/N), so m_n =
    2^(-8n/N) (N = 8: 1/2, 1/4, ..., 1/256). Otherwise (the paper's rule, as BLOOM and Hugging
    Face compute it): the slopes of the largest power of two P below N, followed by every other
    slope of the 2P sequence (its odd terms 2^(-4k/P), k = 1, 3, 5, ...) until there are N.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) or num_heads < 1:
        raise ValueError(f"alibi_slopes: num_heads={num_heads!r} must be a positive integer")
    n = int(num_heads)

    def geometric(p: int) -> list[float]:
        return [2.0 ** (-8.0 * k / p) for k in range(1, p + 1)]

    p = 1 << (n.bit_length() - 1)  # largest power of two <= n
    slopes = geometric(p)
    if p < n:
        slopes += geometric(2 * p)[0::2][: n - p]
    return tuple(slopes)


def sinusoidal_frequencies(dim: int) -> np.ndarray:
    """The table's D / 2 angular frequencies 1 / 10000^(2i/D), float64."""
    if dim < 2 or dim % 2:
        raise ValueError(f"sinusoidal positions need an even width >= 2; got {dim}")
    return 1.0 / SINUSOIDAL_BASE ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def sinusoidal_embedding(positions_BT, dim: int) -> jax.Array:
    """The sinusoidal table's rows for `positions_BT` [B, T]: float32 [B, T, dim], sin in the even
    features and cos in the odd ones (the paper's interleaving). Angles are float32 products
    position x frequency, so their error grows like position x 6e-8 radians."""
    inv_freq = jnp.asarray(sinusoidal_frequencies(dim), jnp.float32)
    angle_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    table = jnp.stack([jnp.sin(angle_BTh), jnp.cos(angle_BTh)], axis=-1)  # [B, T, D/2, 2]
    return table.reshape(*positions_BT.shape, dim)


def describe(scheme: str) -> str:
    """One line on what a `position_embedding` value does (reports and errors)."""
    return {
        "rope": "rotary embedding of q and k (relative by construction)",
        "learned": "a trained table of max_seq_len rows added to the embeddings",
        "sinusoidal": "the fixed sin/cos table of Vaswani et al. added to the embeddings",
        "alibi": "a linear distance penalty per head on the attention scores (Press et al.)",
        "none": "no position information (NoPE): only the causal mask orders tokens",
    }[scheme]

