"""The CPU decode layout: a Decoder's weights laid out for memory-bound decode steps, and the step.

A decode step multiplies a few rows by every weight matrix, so on a CPU its speed is how fast
the weights stream from memory. Two things lose speed in the model's own layout (measured on a
2-core x86, benchmarks/RESULTS.md): the scanned layer loop slices each layer's weights out of
the stacked arrays every step, and XLA:CPU materialises those slices (about a quarter of a
step); and XLA's few-row matmul reads a row-major [K, N] matrix at about half the bandwidth this
machine streams. The layout therefore
  - unrolls the layers: one `Block` per layer (`blocks`, every stack's in layer order: an MoE
    model's dense prefix, then its MoE layers), each with its own cache buffers (`LayerCache`),
    so no step slices a stacked array; and
  - stores every plain kernel whose output features divide by `panel` as column panels
    [N / panel, K, panel] (`PanelKernel`, multiplied by `panel_matmul`), and the output head too.
Everything else is the model's own: the blocks are the model's `Block` modules (whatever
attention / MLP / kernel variants they hold; a wrapper kernel keeps its own parameters and gets
its plain `base` re-laid, see models/projection.py), and the prefill runs the model itself
(stacked layers: prefill is compute-bound, where one large matmul wins). Kernels an attention
reads whole rather than multiplies by (its `DENSE_PROJECTIONS`: latent attention's kv_b, whose
halves the absorbed decode folds into the query and the output, models/mla.py) keep their layout.
The cache's buffers are split per layer whatever their shape (latent attention caches [B, S, R]).

`generate` uses it for float32 models on one CPU device at batch <= `MAX_ROWS` (`applies`),
built once per model and set of weights (`for_model`). It holds one extra copy of the kernels.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref

import jax
import jax.numpy as jnp
from flax import nnx

from models.projection import F32, Einsum, Embedding, Kernel, contracted, map_kernels, map_plain_kernels
from models.transformer import Block, Decoder, KVCache, cache_inputs, layer_stacks, soft_cap

# Column-panel width, and the rows (tokens in a call) up to which `panel_matmul` streams the
# panels; above, the matrix is re-formed and multiplied whole (at 32 rows the plain matmul was
# already as fast, and bfloat16 compute gained nothing: `applies`).
PANEL = 32
MAX_ROWS = 16


def to_panels(w_KN, panel: int):
    """[..., K, N] -> [..., N / panel, K, panel]: each panel's columns contiguous, row after row."""
    *lead, k, n = w_KN.shape
    if n % panel:
        raise ValueError(f"to_panels: {n} output features do not divide into panels of {panel} columns")
    return jnp.swapaxes(w_KN.reshape(*lead, k, n // panel, panel), -3, -2)


def panel_matmul(x, w_PKJ, n_contracted: int, out_features: tuple, dtype, out_dtype):
    """x [..., K...] times a kernel stored as column panels (`to_panels`) -> [..., N...].

    A batch of small matmuls over the panels: each reads its [K, panel] block as one contiguous
    stream, which a memory-bound decode step on a CPU reads ~1.2-1.3x faster than the same
    weights as one row-major [K, N] matrix (benchmarks/RESULTS.md). Float32 accumulation.
    """
    lead = x.shape[:x.ndim - n_contracted]
    p, k, j = w_PKJ.shape
    x_MK = x.reshape(-1, k).astype(dtype)
    if x_MK.shape[0] > MAX_ROWS:
        w_KN = jnp.swapaxes(w_PKJ, 0, 1).reshape(k, p * j)
        y_MN = jnp.einsum("MK,KN->MN", x_MK, w_KN.astype(dtype), preferred_element_type=F32)
    else:
        y_PMJ = jnp.einsum("PMK,PKJ->PMJ", jnp.broadcast_to(x_MK, (p,) + x_MK.shape), w_PKJ.astype(dtype),
                           preferred_element_type=F32)
        y_MN = jnp.swapaxes(y_PMJ, 0, 1).reshape(x_MK.shape[0], p * j)
    return y_MN.reshape(lead + tuple(out_features)).astype(out_dtype)


class PanelKernel(nnx.Module):
    """A kernel (models/projection.py) stored as column panels of its [K, N] matrix."""

    def __init__(self, panels_PKJ, in_features: tuple, out_features: tuple):
        self.panels = nnx.Param(panels_PKJ, axes=(None, None, None))
        self.in_features, self.out_features = tuple(in_features), tuple(out_features)

    @classmethod
    def lay_out(cls, kernel: Kernel, spec: str, panel: int):
        """The kernel as panels, or the kernel itself when its output features do not divide."""
        w = kernel[...]
        nc = len(contracted(spec))
        in_features, out_features = w.shape[:nc], w.shape[nc:]
        n = math.prod(out_features)
        if n % panel:
            return kernel
        return cls(to_panels(w.reshape(math.prod(in_features), n), panel), in_features, out_features)

    def einsum(self, spec: str, x, dtype, out_dtype, rng=None):
        return panel_matmul(x, self.panels[...], len(self.in_features), self.out_features, dtype, out_dtype)

    def dense(self, dtype):
        p, k, j = self.panels.shape
        w_KN = jnp.swapaxes(self.panels[...], 0, 1).reshape(k, p * j)
        return w_KN.reshape(self.in_features + self.out_features).astype(dtype)


class TiedHead(nnx.Module):
    """The tied output head (x times the embedding table's transpose) as its own panel kernel."""

    def __init__(self, kernel, dtype):
        self.kernel, self.dtype = kernel, dtype

    def __call__(self, x_BTD):
        return self.kernel.einsum("BTD,DV->BTV", x_BTD, self.dtype, F32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
    """A `KVCache` as one buffer per layer (what the unrolled blocks carry): [B, K, S, H], or
    latent attention's [B, S, R] and [B, S, Hr]."""

    k: tuple
    v: tuple
    segment_ids: jax.Array  # [B, S] int32
    positions: jax.Array  # [B, S] int32
    index: jax.Array  # [] int32

    @classmethod
    def of(cls, cache: KVCache) -> LayerCache:
        split = lambda a: tuple(a[i] for i in range(a.shape[0]))  # noqa: E731
        return cls(split(cache.k), split(cache.v), cache.segment_ids, cache.positions, cache.index)


class DecodeLayout(nnx.Module):
    """A Decoder (`model`, sharing its arrays) plus its layers unrolled with panel kernels
    (`blocks`) and the output head as panels (`head`, or None for the model's own)."""

    def __init__(self, model: Decoder, blocks: nnx.List, head):
        self.model = model
        self.blocks = blocks
        self.head = head if head is not None else nnx.data(None)

    def __call__(self, inputs_BT, *, positions_BT=None, segment_ids_BT=None, cache: LayerCache):
        """One decode call, as `Decoder.__call__` with a cache: (logits [B, T, V] f32, new cache)."""
        model, cfg = self.model, self.model.config
        t = inputs_BT.shape[1]
        attn_kw = cache_inputs(cache, inputs_BT, positions_BT, segment_ids_BT)
        x_BTD = model.embed_inputs(inputs_BT, attn_kw["positions_BT"])
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            x_BTD, (k_i, v_i) = block(x_BTD, kv_cache=(cache.k[i], cache.v[i], None), window=cfg.window(i) or None,
                                      **attn_kw)
            ks.append(k_i)
            vs.append(v_i)
        if self.head is None:
            logits_BTV = model.output_logits(x_BTD)
        else:
            logits_BTV = soft_cap(self.head(model.final_norm(x_BTD)), cfg.logit_softcap)
        return logits_BTV, LayerCache(tuple(ks), tuple(vs), attn_kw["kv_segment_ids_BS"],
                                      attn_kw["kv_positions_BS"], cache.index + t)


def lay_out(model: Decoder, panel: int = PANEL) -> DecodeLayout:
    """The decode layout of `model` (same parameters; the model itself is not modified)."""
    if isinstance(panel, bool) or not isinstance(panel, int) or panel < 1:
        raise ValueError(f"lay_out: panel={panel!r} must be a positive int (columns per panel, e.g. 32)")
    if not isinstance(model, Decoder):
        raise TypeError(f"lay_out takes a models.transformer.Decoder, not {type(model).__name__}")
    cfg = model.config
    model = _copy(model)  # a module of its own over the same arrays
    # one compiled program slices and re-lays every kernel (eagerly, op by op, it took ~0.5 s);
    # it gets copies of the modules, since nnx.jit writes new arrays back into its inputs
    head = None if model.lm_head is None else _copy(model.lm_head)
    table_VD = model.embed[...] if model.lm_head is None and type(model.embed) is Embedding else None
    by_layer = {}
    for i, (name, layers) in enumerate(layer_stacks(cfg).items()):  # the head is laid out with the first stack
        stack_blocks, stack_head = _lay_out(_copy(getattr(model, name)), head if i == 0 else None,
                                            table_VD if i == 0 else None, panel=panel, num_layers=len(layers),
                                            dtype=cfg.compute_dtype)
        by_layer.update(zip(layers, stack_blocks))  # row r of the stack is global layer layers[r]
        if i == 0:
            head = stack_head
    return DecodeLayout(model, nnx.List([by_layer[i] for i in range(cfg.num_layers)]), head)


def _copy(module):
    """The module over the same arrays, with Variable objects of its own (nnx.split / merge
    alone would share the Variables, and writes into them would reach the original)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, nnx.to_pure_dict(state))


@functools.partial(nnx.jit, static_argnames=("panel", "num_layers", "dtype"))
def _lay_out(stacked: Block, head: Einsum | None, table_VD, *, panel: int, num_layers: int, dtype):
    """(nnx.List of one Block per layer with panel kernels, the head with a panel kernel or None).

    `head` is the model's own output projection (untied), `table_VD` the float embedding table
    whose transpose is the tied head; with neither (a quantized tied table) the model's head
    stays."""

    # projections an attention reads whole (`kernel.dense`, e.g. latent attention's kv_b) stay as they are
    whole = {("attn", name) for name in getattr(stacked.attn, "DENSE_PROJECTIONS", ())}

    def relay(path, proj, kernel):
        if tuple(path[-2:]) in whole:
            return kernel
        return map_plain_kernels(kernel, lambda k: PanelKernel.lay_out(k, proj.spec, panel))

    graphdef, state = nnx.split(stacked)
    blocks = []
    for i in range(num_layers):
        block = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
        for _, var in nnx.iter_graph(block):
            axes = var.get_metadata().get("axes") if isinstance(var, nnx.Variable) else None
            if axes and axes[0] == "layers":
                var.set_metadata(axes=tuple(axes[1:]))
        blocks.append(map_kernels(block, relay))
    if head is not None:  # untied: its kernel re-laid, its bias kept
        kernel = head.kernel
        head = map_kernels(head, relay)
        head = head if head.kernel is not kernel else None
    elif table_VD is not None:
        kernel = PanelKernel.lay_out(Kernel(table_VD.T), "BTD,DV->BTV", panel)
        head = TiedHead(kernel, dtype) if isinstance(kernel, PanelKernel) else None
    return nnx.List(blocks), head


def applies(model, batch: int) -> bool:
    """Whether the layout pays: float32 compute, at most `MAX_ROWS` rows, one CPU device.

    Measured on a 2-core x86 (`small`, benchmarks/RESULTS.md): decode steps 1.2x / 1.3x faster at
    batch 1 / 8; at 32 rows 32-column panels were slower than the plain matrices, and bfloat16
    compute gained nothing. Not for weights on several devices (the panels would lose their
    shardings) nor on GPU/TPU.
    """
    if jax.default_backend() != "cpu" or model.config.compute_dtype != jnp.float32 or batch > MAX_ROWS:
        return False
    return len(model_devices(model)) == 1


def model_devices(model) -> set:
    """The devices holding any of the model's arrays."""
    return {d for x in jax.tree.leaves(nnx.state(model)) if isinstance(x, jax.Array) for d in x.devices()}


# model -> (weak references to its weight arrays, (layout, its graphdef, its params)). jax arrays
# are immutable, so the same leaf objects mean the same weights; new weights (a training step,
# `nnx.update`) rebuild it. The layout holds its own module over the arrays, not `model`, so the
# entry does not keep the model alive.
_MEMO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def for_model(model: Decoder):
    """(layout, graphdef, params) of `model`'s decode layout, built once per set of weights."""
    leaves = jax.tree.leaves(nnx.state(model))
    hit = _MEMO.get(model)
    if hit is not None and len(hit[0]) == len(leaves) and all(r() is x for r, x in zip(hit[0], leaves)):
        return hit[1]
    layout = lay_out(model)
    graphdef, state = nnx.split(layout)
    entry = (layout, graphdef, nnx.to_pure_dict(state))  # splitting the unrolled blocks costs ~10 ms: once
    _MEMO[model] = ([weakref.ref(x) for x in leaves], entry)
    return entry
