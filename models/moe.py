"""Mixture-of-experts feed-forward layers: routing, dispatch, expert parallelism, balancing.

An MoE block replaces a layer's dense MLP with E routed experts (small MLPs), of which each
token goes to k chosen by a learned router, plus optional shared experts every token goes to:

    y(x) = s * sum_{i in topk(x)} g_i(x) FFN_i(x)  +  [sigmoid(x . w)] * Shared(x)

Routing (`route`), per token, in float32: router logits l = x W_r [E]; scores p = softmax(l)
(Mixtral, Qwen-MoE, DeepSeek-V2) or sigmoid(l) (DeepSeek-V3); the k experts with the highest
p + b are chosen, where b is a per-expert bias used only for this choice (DeepSeek-V3's
auxiliary-loss-free balancing, `bias_balancing`; 0 otherwise), among the experts of the
`topk_groups` best of `num_groups` groups when routing is group-limited (`limit_to_groups`,
DeepSeek-V2's group_limited_greedy: a group scores its best expert); the gates are their scores
p_i, divided by their sum when `norm_topk_prob` (Mixtral always renormalises), times
`routed_scaling_factor` s (DeepSeek-V2/V3).

Capacity (GShard, arXiv 2006.16668; Switch Transformer, arXiv 2101.03961): with
`capacity_factor` cf > 0, each sequence (batch row) gives each expert C = ceil(cf T k / E)
slots. The row's assignments claim slots in priority order - every token's first choice by
position, then every token's second choice by position, and so on - and the assignments past
an expert's C-th are dropped (their gate becomes 0; the token keeps its other experts, the
shared experts and the residual). Capacity is per row, so which assignments drop does not
depend on how the batch is sharded. `capacity_factor=0` is dropless: every assignment runs.

Dispatch (`dispatch`): the (token, expert) assignments are sorted by expert and each expert
multiplies its contiguous rows, a grouped matmul: `jax.lax.ragged_dot`, or (`padded`) the
rows of each expert padded to whole blocks of b rows and one batched einsum over the blocks,
each block against its expert's weights (MegaBlocks' block-sparse idea, arXiv 2211.15841, on
dense hardware). On XLA:CPU ragged_dot lowers to a dense masked matmul, about E times the
work, so "auto" picks "padded" on CPU (benchmarks/moe.py: the block about 7x faster there) and ragged_dot
on GPU / TPU, where it is a native grouped GEMM. Dropped assignments take no row (their output
is 0), but the static shapes are the dropless worst case, so on the padded path capacity saves
no work; it bounds what each expert receives.

Expert parallelism: under a mesh, dispatch runs inside `jax.shard_map` over the token shards
(the batch / length axes of the logical rules). The expert dimension of the weights sits on
the mesh axis the `experts` rule names (`expert`, strategy `fsdp_ep`), each device holding
E / ep experts. When the tokens are sharded over that axis too (fsdp_ep), each device sends
every assignment to the device of its expert and gets the results back with
`jax.lax.all_to_all` over fixed-size buffers (XLA:CPU has no ragged all-to-all): ep buffers of
N k_l rows (k_l = min(k, E / ep), the most one device can receive from N tokens), so no
assignment is ever dropped for lack of room. When the tokens are replicated over it, each
device runs its own experts on the assignments that reach them and the outputs are summed
(psum). Expert hidden dims sharded over other axes (tensor) give partial outputs, summed too.
Routing and its statistics run outside the shard_map, on the global arrays, so every
statistic is global and an expert-parallel run equals one device.

Auxiliary losses and statistics (`summarize`), each averaged over the MoE layers:
  balance      Switch's load-balancing loss E sum_i f_i P_i, f_i the fraction of assignments
               to expert i (no gradient), P_i the mean router probability of i (softmax
               scores; sigmoid scores normalised per token): 1 when routing is uniform, E when
               every token goes to one expert; times `aux_loss_weight`.
  router_z     ST-MoE's router z-loss (arXiv 2202.08906) mean(logsumexp(l)^2); times `z_loss_weight`.
  load         f, per expert; `moe_load_max` = E max_i f_i (1 = balanced).
  dropped      the fraction of assignments over capacity.
  entropy      the mean entropy (nats) of each token's router distribution.
The layers report them through `collect_stats` (a context the decoder's layer scan opens), so
the model call keeps its signature; `models.transformer.apply_with_aux` returns them and the
loss adds them (train/loss.py). Bias balancing (`balance_router_biases`) moves each layer's
bias by `bias_update_rate` x sign(mean load - load) after every optimizer step, from the
step's global load, outside the gradient (DeepSeek-V3, arXiv 2412.19437).

Fine-grained and shared experts follow DeepSeekMoE (arXiv 2401.06066); the shared experts are
one MLP of their summed width (as Hugging Face stores DeepSeek's), gated by a sigmoid of a
learned projection with `shared_expert_gate` (Qwen2-MoE). Mixtral (arXiv 2401.04088) is 8
experts, top-2, softmax renormalised, no shared experts.

Shapes: B batch, T length, D hidden, E experts (E_l per device), K experts per token, F expert
hidden, N tokens (B T), A assignments (N K), R rows of a grouped matmul, G its groups.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from models.config import ModelConfig, MoeConfig
from models.projection import F32, Einsum
from models.sharding import logical_to_spec

# --------------------------------------------------------------------------------------------
# Statistics: how MoE layers report them without changing the block's signature

_SINK: contextvars.ContextVar[list | None] = contextvars.ContextVar("loom_moe_stats", default=None)


@contextlib.contextmanager
def collect_stats():
    """Collects the routing statistics of the MoE layers called inside the block (in call order).

    The decoder's layer scan opens it around each block (models/transformer.py); outside one, MoE
    layers compute no statistics (decoding, direct calls)."""
    found: list[dict[str, jax.Array]] = []
    token = _SINK.set(found)
    try:
        yield found
    finally:
        _SINK.reset(token)


# --------------------------------------------------------------------------------------------
# Routing


def router_scores(logits_BTE, router: str):
    """Gate scores from router logits (float32): softmax over experts, or a sigmoid per expert."""
    logits_BTE = logits_BTE.astype(F32)
    return jax.nn.softmax(logits_BTE, -1) if router == "softmax" else jax.nn.sigmoid(logits_BTE)


def capacity(m: MoeConfig, seq_len: int) -> int:
    """Slots per expert per sequence of `seq_len` tokens: ceil(cf T k / E) (0 = dropless)."""
    if not m.capacity_factor:
        return 0
    return max(1, math.ceil(m.capacity_factor * seq_len * m.experts_per_token / m.num_experts))


def rank_in_group(group_M, num_groups: int):
    """(rank [M], counts [num_groups]): each item's index among the items of its group, in
    order, and the group sizes. `group_M` holds ids in [0, num_groups)."""
    m = group_M.shape[0]
    order = jnp.argsort(group_M, stable=True)
    counts = jnp.zeros((num_groups,), jnp.int32).at[group_M].add(1)
    starts = jnp.cumsum(counts) - counts
    position = jnp.zeros((m,), jnp.int32).at[order].set(jnp.arange(m, dtype=jnp.int32))
    return position - starts[group_M], counts


def within_capacity(expert_BTK, num_experts: int, slots: int):
    """keep [B, T, K] bool: whether each assignment gets one of its expert's `slots` slots in
    its row, claimed in priority order (choice rank first, then position)."""
    b, t, k = expert_BTK.shape
    e_BM = jnp.swapaxes(expert_BTK, 1, 2).reshape(b, k * t)  # item j * T + t: choice j of token t
    rank_BM = jax.vmap(lambda e: rank_in_group(e, num_experts)[0])(e_BM)
    return jnp.swapaxes((rank_BM < slots).reshape(b, k, t), 1, 2)


def limit_to_groups(select_BTE, num_groups: int, topk_groups: int):
    """`select_BTE` with the experts outside each token's `topk_groups` best groups set to -inf:
    the E experts form `num_groups` consecutive equal groups, a group's score is its best
    expert's (DeepSeek-V2's group_limited_greedy), and the best groups are kept."""
    *lead, e = select_BTE.shape
    grouped = select_BTE.reshape(*lead, num_groups, e // num_groups)
    _, best_BTG = jax.lax.top_k(grouped.max(-1), topk_groups)
    keep_BTG = jnp.zeros(grouped.shape[:-1], bool)
    keep_BTG = jnp.put_along_axis(keep_BTG, best_BTG, True, axis=-1, inplace=False)
    return jnp.where(keep_BTG[..., None], grouped, -jnp.inf).reshape(select_BTE.shape)


def route(logits_BTE, bias_E, m: MoeConfig):
    """(expert_BTK int32, gate_BTK float32, probs_BTE float32, keep_BTK bool).

    `expert` is each token's k chosen experts (highest score + bias first; the bias, if any,
    only chooses); `gate` their weights (0 where dropped); `probs` the router's distribution per
    token (softmax scores, or sigmoid scores normalised to sum 1) for the statistics; `keep`
    False for assignments dropped over capacity (they keep their expert id here, for the load
    statistics; `dispatch` never computes them)."""
    scores_BTE = router_scores(logits_BTE, m.router)
    select_BTE = scores_BTE if bias_E is None else scores_BTE + jax.lax.stop_gradient(bias_E.astype(F32))
    if m.group_limited:
        select_BTE = limit_to_groups(select_BTE, m.num_groups, m.topk_groups)
    _, expert_BTK = jax.lax.top_k(select_BTE, m.experts_per_token)
    gate_BTK = jnp.take_along_axis(scores_BTE, expert_BTK, axis=-1)
    if m.norm_topk_prob:
        gate_BTK = gate_BTK / (gate_BTK.sum(-1, keepdims=True) + 1e-20)
    gate_BTK = gate_BTK * jnp.float32(m.routed_scaling_factor)
    slots = capacity(m, logits_BTE.shape[1])
    keep_BTK = (within_capacity(expert_BTK, m.num_experts, slots) if slots
                else jnp.ones(expert_BTK.shape, bool))
    probs_BTE = scores_BTE if m.router == "softmax" else scores_BTE / (scores_BTE.sum(-1, keepdims=True) + 1e-20)
    return expert_BTK.astype(jnp.int32), jnp.where(keep_BTK, gate_BTK, 0.0), probs_BTE, keep_BTK


def balance_loss(load_E, probs_E):
    """Switch Transformer's load-balancing loss E sum_i f_i P_i: `load_E` the fraction of
    assignments per expert (f, summing to 1; no gradient flows through it), `probs_E` the mean
    router probability per expert (P, summing to 1). For a consistent router (f = P) it is
    E sum_i f_i^2 >= 1 (Cauchy-Schwarz), with equality exactly when both are uniform."""
    e = load_E.shape[-1]
    return e * jnp.sum(jax.lax.stop_gradient(load_E) * probs_E, axis=-1)


def routing_stats(logits_BTE, probs_BTE, expert_BTK, keep_BTK, num_experts: int) -> dict[str, jax.Array]:
    """One layer's statistics over the whole (global) batch: scalars `balance`, `router_z`,
    `dropped`, `entropy` and the per-expert `load` [E] (fraction of assignments, summing to 1)."""
    k = expert_BTK.shape[-1]
    n = expert_BTK.shape[0] * expert_BTK.shape[1]
    counts_E = jnp.zeros((num_experts,), F32).at[expert_BTK.reshape(-1)].add(1.0)
    load_E = counts_E / (n * k)
    probs_E = probs_BTE.reshape(n, num_experts).mean(0)
    log_z = jax.nn.logsumexp(logits_BTE.astype(F32), axis=-1)
    entropy = -jnp.sum(probs_BTE * jnp.log(jnp.maximum(probs_BTE, 1e-30)), axis=-1)
    return {"balance": balance_loss(load_E, probs_E), "router_z": jnp.mean(jnp.square(log_z)),
            "dropped": 1.0 - jnp.mean(keep_BTK.astype(F32)), "entropy": jnp.mean(entropy),
            "load": load_E}


def summarize(m: MoeConfig, stats: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The model's auxiliary outputs from per-layer statistics (each with a leading MoE-layer
    axis): `aux_loss` (what the loss adds: aux_loss_weight x balance + z_loss_weight x
    router_z, each averaged over layers) and the metrics `moe_aux_loss`, `moe_z_loss` (the two
    weighted terms), `moe_balance` (unweighted; 1 = uniform), `moe_dropped_fraction`,
    `moe_router_entropy`, `moe_load_max` (E max load, averaged over layers; 1 = balanced),
    `moe_expert_load` [E] (averaged over layers), and with bias balancing `moe_layer_load`
    [L_moe, E] (what `balance_router_biases` reads)."""
    balance, router_z = stats["balance"].mean(), stats["router_z"].mean()
    aux = jnp.float32(m.aux_loss_weight) * balance
    z = jnp.float32(m.z_loss_weight) * router_z
    load_LE = stats["load"]
    out = {"aux_loss": aux + z, "moe_aux_loss": aux, "moe_z_loss": z, "moe_balance": balance,
           "moe_dropped_fraction": stats["dropped"].mean(), "moe_router_entropy": stats["entropy"].mean(),
           "moe_load_max": (load_LE.max(-1) * load_LE.shape[-1]).mean(), "moe_expert_load": load_LE.mean(0)}
    if m.bias_balancing:
        out["moe_layer_load"] = load_LE
    return out


def bias_update(bias_E, load_E, rate: float):
    """DeepSeek-V3's auxiliary-loss-free step: b_i + rate x sign(mean load - load_i) (an
    overloaded expert becomes less likely to be chosen, an idle one more)."""
    return bias_E + jnp.float32(rate) * jnp.sign(load_E.mean(-1, keepdims=True) - load_E)


def balance_router_biases(cfg: ModelConfig, old_params, params, metrics):
    """`params` with every MoE layer's router bias set to its value before the step moved by
    `bias_update` from the step's per-layer load (`metrics["moe_layer_load"]`, global over the
    batch); `params` unchanged when the model has no bias balancing. The train step calls it
    after the optimizer update (train/state.py `post_update`): the bias has no gradient, and
    whatever the optimizer did to it (nothing, or weight decay) is replaced."""
    if not (cfg.moe.enabled and cfg.moe.bias_balancing):
        return params
    router_old = old_params.get("layers", {}).get("mlp", {}).get("router", {})
    if "bias" not in router_old:  # the bias is not trained here (e.g. frozen under LoRA): it stays
        return params
    old_LE = router_old["bias"]
    new_LE = bias_update(old_LE.astype(F32), metrics["moe_layer_load"].astype(F32), cfg.moe.bias_update_rate)
    router = {**params["layers"]["mlp"]["router"], "bias": new_LE.astype(old_LE.dtype)}
    return {**params, "layers": {**params["layers"], "mlp": {**params["layers"]["mlp"], "router": router}}}


# --------------------------------------------------------------------------------------------
# Grouped matmul: rows sorted by group, each group against its own weights


def resolve_grouped_matmul(name: str) -> str:
    """"auto" -> "padded" on CPU (ragged_dot lowers to a dense masked matmul there), else
    "ragged_dot"."""
    if name != "auto":
        return name
    return "padded" if jax.default_backend() == "cpu" else "ragged_dot"


def auto_block_size(rows: int, groups: int) -> int:
    """Rows per block of the padded grouped matmul: the largest power of two <= a quarter of a
    group's mean rows, within [1, 256] (decoding a few tokens gives blocks of one row, which
    read only the weights of the experts used)."""
    target = max(1, rows // (4 * groups))
    return min(256, 1 << (target.bit_length() - 1))


def _grouped(x_RD, group_R, num_groups: int, impl: str, block_size: int):
    """(multiply(x_rows, w_GIO) -> y_rows, to_rows(x_RD), from_rows(y) -> y_RD) for rows with
    group ids in [0, num_groups]; id num_groups marks a row that takes no part (its output is 0).

    "ragged_dot": rows permuted so each group's are contiguous, the skipped ones last.
    "padded": each group's rows start at a block boundary of a [n_blocks * b] buffer (n_blocks
    bounds the worst case: ceil(R / b) + min(G, R) blocks), and each block multiplies its
    group's weights in one batched einsum."""
    r = x_RD.shape[0]
    rank_R, counts = rank_in_group(group_R, num_groups + 1)
    sizes_G = counts[:num_groups]
    valid_R = group_R < num_groups
    if impl == "ragged_dot":
        starts = jnp.cumsum(counts) - counts
        slot_R = starts[group_R] + rank_R  # a permutation of 0..R-1, skipped rows last

        def multiply(xs, w_GIO):
            return jax.lax.ragged_dot(xs, w_GIO, sizes_G, preferred_element_type=F32)

        to_rows = lambda x: jnp.zeros(x.shape, x.dtype).at[slot_R].set(x, unique_indices=True)  # noqa: E731
        from_rows = lambda y: y[slot_R]  # noqa: E731
        return multiply, to_rows, from_rows
    if impl != "padded":
        raise ValueError(f"model.moe.grouped_matmul={impl!r} is not valid; expected 'ragged_dot' or 'padded' "
                         f"(or 'auto')")
    b = block_size or auto_block_size(r, num_groups)
    n_blocks = -(-r // b) + min(num_groups, r)
    blocks_G = -(-sizes_G // b)
    block_end_G = jnp.cumsum(blocks_G)
    block_start_G = block_end_G - blocks_G
    slot_R = jnp.where(valid_R, block_start_G[jnp.minimum(group_R, num_groups - 1)] * b + rank_R, n_blocks * b)
    # each block's group; blocks past the last group's hold no rows (they take the last group's weights)
    block_group = jnp.minimum(jnp.searchsorted(block_end_G, jnp.arange(n_blocks), side="right"), num_groups - 1)

    def multiply(xs, w_GIO):
        x_nbI = xs.reshape(n_blocks, b, xs.shape[-1])
        y = jnp.einsum("nbi,nio->nbo", x_nbI, w_GIO[block_group], preferred_element_type=F32)
        return y.reshape(n_blocks * b, -1)

    def to_rows(x):
        return jnp.zeros((n_blocks * b,) + x.shape[1:], x.dtype).at[slot_R].set(x, mode="drop", unique_indices=True)

    def from_rows(y):
        return y.at[slot_R].get(mode="fill", fill_value=0)

    return multiply, to_rows, from_rows


def expert_ffn(x_RD, group_R, gate_GDF, up_GDF, down_GFD, *, activation, dtype, impl: str, block_size: int = 0):
    """Each row through the MLP of its group (expert): y_r = down_g(act(x_r gate_g) * (x_r up_g)),
    or down_g(act(x_r up_g)) without a gate; rows whose id is G (the number of experts here)
    give 0. Matmul inputs in `dtype`, float32 accumulation; y [R, D] float32."""
    num_groups = up_GDF.shape[0]
    multiply, to_rows, from_rows = _grouped(x_RD, group_R, num_groups, impl, block_size)
    xs = to_rows(x_RD.astype(dtype))
    up = checkpoint_name(multiply(xs, up_GDF.astype(dtype)), "proj")
    if gate_GDF is None:
        h = activation(up)
    else:
        h = activation(checkpoint_name(multiply(xs, gate_GDF.astype(dtype)), "proj")) * up
    ys = checkpoint_name(multiply(h.astype(dtype), down_GFD.astype(dtype)), "proj")
    return from_rows(ys)


# --------------------------------------------------------------------------------------------
# Dispatch: local, or expert-parallel inside shard_map


def _axes_of(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _axis_arg(axes: tuple[str, ...]):
    return axes[0] if len(axes) == 1 else axes


def _local_dispatch(x_BTD, expert_BTK, gate_BTK, keep_BTK, gate_w, up_w, down_w, *, activation, dtype, impl,
                    block_size, ep: int, ep_axes: tuple, all_to_all: bool, sum_axes: tuple):
    """One shard's dispatch and combine: x [b, t, D] its tokens, expert / gate / keep [b, t, K]
    their assignments, the weights its E_l experts (hidden dims possibly split over `sum_axes`).
    Returns [b, t, D] in `dtype` (summed over `sum_axes`)."""
    b, t, d = x_BTD.shape
    k = expert_BTK.shape[-1]
    n = b * t
    e_local = up_w.shape[0]
    x_ND = x_BTD.reshape(n, d)
    token_A = jnp.arange(n * k, dtype=jnp.int32) // k
    e_A = jnp.where(keep_BTK.reshape(-1), expert_BTK.reshape(-1), e_local * ep)  # dropped: no expert
    ffn = lambda x, g: expert_ffn(x, g, gate_w, up_w, down_w, activation=activation, dtype=dtype,  # noqa: E731
                                  impl=impl, block_size=block_size)
    if ep == 1:
        y_AD = ffn(x_ND[token_A], e_A)
    elif all_to_all:
        # each assignment to the device of its expert: buffer [ep, S, D] with S = n min(k, E_l) slots
        # per destination (the most n tokens can send one device), assignments in order per destination
        s = n * min(k, e_local)
        dest_A = e_A // e_local  # dropped assignments: dest = ep, sent nowhere
        rank_A, _ = rank_in_group(dest_A, ep + 1)
        slot_A = jnp.where(dest_A < ep, dest_A * s + rank_A, ep * s)
        send_x = jnp.zeros((ep * s, d), dtype).at[slot_A].set(x_ND[token_A].astype(dtype), mode="drop")
        send_e = jnp.full((ep * s,), e_local, jnp.int32).at[slot_A].set(e_A - dest_A * e_local, mode="drop")
        axis = _axis_arg(ep_axes)
        recv_x = jax.lax.all_to_all(send_x.reshape(ep, s, d), axis, 0, 0, tiled=True)
        recv_e = jax.lax.all_to_all(send_e.reshape(ep, s), axis, 0, 0, tiled=True)
        y_recv = ffn(recv_x.reshape(ep * s, d), recv_e.reshape(ep * s))
        back = jax.lax.all_to_all(y_recv.reshape(ep, s, d), axis, 0, 0, tiled=True)
        y_AD = back.reshape(ep * s, d).at[slot_A].get(mode="fill", fill_value=0)
    else:  # tokens replicated over the expert axes: this device's experts only, summed below
        first = jax.lax.axis_index(_axis_arg(ep_axes)) * e_local
        own_A = (e_A >= first) & (e_A < first + e_local)
        y_AD = ffn(x_ND[token_A], jnp.where(own_A, e_A - first, e_local))
    out_ND = jnp.einsum("nk,nkd->nd", gate_BTK.reshape(n, k).astype(F32), y_AD.reshape(n, k, d))
    if sum_axes:
        out_ND = jax.lax.psum(out_ND, _axis_arg(sum_axes))
    return out_ND.reshape(b, t, d).astype(dtype)


def _current_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def dispatch(x_BTD, expert_BTK, gate_BTK, keep_BTK, gate_w, up_w, down_w, *, activation, dtype,
             grouped_matmul: str = "auto", block_size: int = 0):
    """Routed output [B, T, D] (in `dtype`): sum_k gate_k FFN_{expert_k}(x) over the kept
    assignments. Weights [E, D, F] / [E, F, D] (`gate_w` None for plain MLP experts).

    Without a mesh, one local grouped matmul. Under a mesh, a `jax.shard_map` over the token
    shards (see the module doc for the expert-parallel cases)."""
    impl = resolve_grouped_matmul(grouped_matmul)
    kw = dict(activation=activation, dtype=dtype, impl=impl, block_size=block_size)
    mesh = _current_mesh()
    if mesh is None:
        return _local_dispatch(x_BTD, expert_BTK, gate_BTK, keep_BTK, gate_w, up_w, down_w, ep=1, ep_axes=(),
                               all_to_all=False, sum_axes=(), **kw)
    token_spec = logical_to_spec(("batch", "length", None), x_BTD.shape, mesh)
    token_axes = {a for entry in token_spec for a in _axes_of(entry)}
    up_spec = logical_to_spec(("experts", "embed", "mlp"), up_w.shape, mesh)
    ep_axes = _axes_of(up_spec[0])
    hidden_axes = tuple(a for a in _axes_of(up_spec[2]) if a not in token_axes and a not in ep_axes)
    ep = math.prod(mesh.shape[a] for a in ep_axes)
    sharded = [a in token_axes for a in ep_axes]
    if any(sharded) and not all(sharded):
        raise ValueError(f"expert parallelism over mesh axes {ep_axes} needs the tokens sharded over all of them "
                         f"or none (tokens are sharded over {sorted(token_axes)}); check mesh.rules for "
                         f"'batch' and 'experts'")
    all_to_all = bool(ep_axes) and all(sharded)
    sum_axes = hidden_axes + (() if all_to_all else ep_axes)
    w_in = P(_axis_arg(ep_axes) if ep_axes else None, None, _axis_arg(hidden_axes) if hidden_axes else None)
    w_out = P(w_in[0], w_in[2], None)
    fn = lambda x, e, g, keep, wg, wu, wd: _local_dispatch(  # noqa: E731
        x, e, g, keep, wg, wu, wd, ep=ep, ep_axes=ep_axes, all_to_all=all_to_all, sum_axes=sum_axes, **kw)
    in_specs = (token_spec,) * 4 + (None if gate_w is None else w_in, w_in, w_out)
    return jax.shard_map(fn, in_specs=in_specs, out_specs=token_spec, check_vma=True)(
        x_BTD, expert_BTK, gate_BTK, keep_BTK, gate_w, up_w, down_w)


# --------------------------------------------------------------------------------------------
# Modules


class RouterBias(nnx.Variable):
    """A per-expert bias that only chooses experts (DeepSeek-V3's `e_score_correction_bias`): set
    by `balance_router_biases` after each step, never by the gradient (it has none)."""


class Router(nnx.Module):
    """Router logits x W [.., E] in float32; `bias` (with bias balancing) for the choice only."""

    def __init__(self, dim: int, num_experts: int, *, std: float, param_dtype, bias: bool, rngs: nnx.Rngs):
        w = jax.random.normal(rngs.params(), (dim, num_experts), F32) * std
        self.kernel = nnx.Param(w.astype(param_dtype), axes=("embed", None))
        self.bias = RouterBias(jnp.zeros((num_experts,), F32), axes=(None,)) if bias else nnx.data(None)

    def __call__(self, x_BTD):
        return jnp.einsum("btd,de->bte", x_BTD.astype(F32), self.kernel[...].astype(F32))


class Experts(nnx.Module):
    """E expert MLPs' weights stacked on a leading `experts` axis: gate, up [E, D, F], down [E, F, D]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        e, d, f = cfg.moe.num_experts, cfg.hidden_size, cfg.expert_intermediate_size
        pdt = cfg.params_dtype

        def normal(shape, std):
            return (jax.random.normal(rngs.params(), shape, F32) * std).astype(pdt)

        self.gate = nnx.data(None)
        if cfg.gated_mlp:
            self.gate = nnx.Param(normal((e, d, f), cfg.init_std), axes=("experts", "embed", "mlp"))
        self.up = nnx.Param(normal((e, d, f), cfg.init_std), axes=("experts", "embed", "mlp"))
        self.down = nnx.Param(normal((e, f, d), cfg.init_std / math.sqrt(2 * cfg.num_layers)),
                              axes=("experts", "mlp", "embed"))


class MoeMlp(nnx.Module):
    """The MoE feed-forward block, a drop-in for `models.transformer.Mlp` (same call)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        from models.transformer import Mlp  # transformer.py imports this module: import at call time

        m = cfg.moe
        self.moe = m
        self.activation = cfg.activation
        self.dtype = cfg.compute_dtype
        self.router = Router(cfg.hidden_size, m.num_experts, std=cfg.init_std, param_dtype=cfg.params_dtype,
                             bias=m.bias_balancing, rngs=rngs)
        self.experts = Experts(cfg, rngs=rngs)
        self.shared = self.shared_gate = nnx.data(None)
        if m.num_shared_experts:
            self.shared = Mlp(cfg.replace(intermediate_size=cfg.shared_intermediate_size), rngs=rngs)
            if m.shared_expert_gate:
                self.shared_gate = Einsum("BTD,DO->BTO", (cfg.hidden_size, 1), ("embed", None), std=cfg.init_std,
                                          dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, rngs=rngs)

    def __call__(self, x_BTD, *, dropout_rng=None):
        from models.transformer import _activation

        m = self.moe
        logits_BTE = self.router(x_BTD)
        bias = None if self.router.bias is None else self.router.bias[...]
        expert_BTK, gate_BTK, probs_BTE, keep_BTK = route(logits_BTE, bias, m)
        sink = _SINK.get()
        if sink is not None:
            sink.append(routing_stats(logits_BTE, probs_BTE, expert_BTK, keep_BTK, m.num_experts))
        ex = self.experts
        y_BTD = dispatch(x_BTD, expert_BTK, gate_BTK, keep_BTK, None if ex.gate is None else ex.gate[...],
                         ex.up[...], ex.down[...], activation=_activation(self.activation), dtype=self.dtype,
                         grouped_matmul=m.grouped_matmul, block_size=m.block_size)
        if self.shared is not None:
            s_BTD = self.shared(x_BTD, dropout_rng=dropout_rng)
            if self.shared_gate is not None:
                s_BTD = (s_BTD.astype(F32) * jax.nn.sigmoid(self.shared_gate(x_BTD).astype(F32))).astype(s_BTD.dtype)
            y_BTD = y_BTD + s_BTD
        return y_BTD
