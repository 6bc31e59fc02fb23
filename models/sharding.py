"""Logical axis names -> mesh axes.

Parameters carry logical names in their `axes` metadata (`("embed", "mlp")`), activations are
constrained with logical names at a few points of the forward pass. A rules table maps each
logical name to zero, one or several mesh axes; changing the parallelism strategy changes the
table or the mesh shape, never the model.

Rules are read at trace time from a context (`use_rules`), so jitted code traced under a mesh
picks them up; with no mesh set every constraint is a no-op and the model runs eagerly.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterable, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MESH_AXES = ("data", "stage", "fsdp", "tensor", "sequence", "expert")

# The one default table. Mesh axes of size 1 make a rule harmless, so every strategy can share
# it: the strategy only picks the mesh shape (see train/mesh.py).
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # activations
    ("batch", ("data", "fsdp")),  # ZeRO-3: fsdp shards the batch as well as the parameters
    ("length", ("sequence",)),
    # parameters (and activations with a heads / mlp / vocab dimension)
    ("embed", ("fsdp",)),
    ("vocab", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("head_dim", ()),
    ("layers", ("stage",)),  # pipeline stages hold consecutive layers (models/pipeline.py)
    ("experts", ("expert",)),
)

Rules = Sequence[tuple[str, Sequence[str] | str | None]]

_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("loom_axis_rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def use_rules(rules: Rules | None):
    """Makes `rules` the logical-axis table for code traced inside the block."""
    token = _RULES.set(DEFAULT_RULES if rules is None else normalize_rules(rules))
    try:
        yield
    finally:
        _RULES.reset(token)


def current_rules() -> Rules:
    return _RULES.get()


def normalize_rules(rules: Rules) -> tuple[tuple[str, tuple[str, ...]], ...]:
    out = []
    for entry in rules:
        if len(entry) != 2:
            raise ValueError(f"a rule is (logical_name, mesh_axes); got {entry!r}")
        name, axes = entry
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        axes = tuple(axes)
        for a in axes:
            if a not in MESH_AXES:
                raise ValueError(f"rule {name!r} -> {a!r}: unknown mesh axis; valid axes are {MESH_AXES}")
        out.append((name, axes))
    return tuple(out)


def logical_to_spec(names: Iterable[str | None], shape: Sequence[int] | None = None,
                    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
                    rules: Rules | None = None) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have logical `names`.

    Mesh axes that do not divide the dimension (given `shape` and `mesh`) are dropped rather than
    failing, and a mesh axis is used at most once per array, so any preset runs on any mesh
    (sharding less where the shapes do not allow it).
    """
    table = dict(normalize_rules(rules if rules is not None else current_rules()))
    names = tuple(names)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        axes = table.get(name, ()) if name is not None else ()
        kept = []
        size = 1
        for a in axes:
            if a in used:
                continue
            if mesh is not None:
                if a not in mesh.axis_names:
                    continue
                n = mesh.shape[a]
                if n == 1:
                    continue
                if shape is not None and shape[i] % (size * n):
                    continue
                size *= n
            kept.append(a)
            used.add(a)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def _current_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return mesh


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """`with_sharding_constraint` by logical names; a no-op when no mesh is set."""
    mesh = _current_mesh()
    if mesh is None:
        return x
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of shape {x.shape}")
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh))


def named_shardings(axes_tree, shapes_tree, mesh: jax.sharding.Mesh, rules: Rules | None = None):
    """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) given their logical axes."""
    return jax.tree.map(
        lambda names, x: NamedSharding(mesh, logical_to_spec(names, np.shape(x), mesh, rules)),
        axes_tree, shapes_tree, is_leaf=lambda t: isinstance(t, tuple))
