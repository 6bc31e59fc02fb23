"""The device mesh and sharding rules, resolved from the config for the devices present.

`mesh.shape` names all six axes (data, stage, fsdp, tensor, sequence, expert) with at most one
-1, which is resolved from the device count. `mesh.strategy`, when set, picks the shape instead
(on 1 device every strategy is the 1-device mesh):
  dp       data = n                       parameters replicated
  fsdp     fsdp = n                       parameters, gradients and optimizer state sharded (ZeRO-3)
  fsdp_tp  fsdp = n / t, tensor = t       t: largest power of two <= min(8, sqrt(n)) the heads,
                                          kv heads, mlp and vocab sizes allow
  tp       data = n / t, tensor = t       t: largest divisor of n those sizes allow
  fsdp_sp  fsdp = n / s, sequence = s     s: largest power of two <= min(8, sqrt(n)) with the
                                          sequence length divisible by 2 s (ring attention, zig-zag)
  pp_fsdp  fsdp = n / p, stage = p        p: largest power of two <= min(8, sqrt(n)) dividing the
                                          number of layers (pipeline stages)
  fsdp_ep  fsdp = n / e, expert = e       e: largest power of two dividing n and the number of
                                          experts (1 for a dense model); the batch is sharded
                                          over data x fsdp x expert and the other parameters
                                          over fsdp x expert, so the expert axis is data and
                                          ZeRO parallel outside the MoE layers and expert
                                          parallel inside them (all-to-all dispatch, models/moe.py)
A strategy may bring rules of its own (`STRATEGY_RULES`); `mesh.rules` entries override the
default logical-axis table (models/sharding.py), and those, by name.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from models.config import ModelConfig
from models.sharding import DEFAULT_RULES, MESH_AXES, logical_to_spec, normalize_rules

STRATEGIES = ("dp", "fsdp", "fsdp_tp", "tp", "fsdp_sp", "pp_fsdp", "fsdp_ep")
# rules a strategy needs beyond the default table (models/sharding.py DEFAULT_RULES)
STRATEGY_RULES = {
    "fsdp_ep": (("batch", ("data", "fsdp", "expert")), ("embed", ("fsdp", "expert"))),
}
DEFAULT_SHAPE = {"data": -1, "stage": 1, "fsdp": 1, "tensor": 1, "sequence": 1, "expert": 1}


def resolve_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fills in the one -1 axis; checks the product equals the device count. Axes not given take
    their defaults (data -1, the others 1)."""
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh.shape has unknown axes {unknown}; valid axes are {MESH_AXES}")
    sizes = {a: int(shape.get(a, DEFAULT_SHAPE[a])) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
    if bad:
        raise ValueError(f"mesh.shape sizes must be positive or -1; got {bad}")
    if len(free) > 1:
        raise ValueError(f"mesh.shape may have at most one -1; got {free}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(f"mesh.shape {sizes}: the fixed axes need a multiple of {fixed} devices; "
                             f"found {num_devices}")
        sizes[free[0]] = num_devices // fixed
    if math.prod(sizes.values()) != num_devices:
        raise ValueError(f"mesh shape {tuple(sizes.values())} {MESH_AXES} needs {math.prod(sizes.values())} "
                         f"devices; found {num_devices}")
    return sizes


def _tensor_divisor_ok(t: int, model: ModelConfig | None) -> bool:
    if model is None:
        return True
    return all(x % t == 0 for x in (model.num_heads, model.num_kv_heads, model.intermediate_size))


def _power_of_two_split(n: int, ok) -> int:
    """Largest power of two t <= min(8, sqrt(n)) dividing n with ok(t)."""
    cap = min(8, int(math.isqrt(n)))
    return max(2 ** i for i in range(4) if 2 ** i <= cap and n % 2 ** i == 0 and ok(2 ** i))


def strategy_shape(strategy: str, num_devices: int, model: ModelConfig | None = None,
                   seq_len: int | None = None) -> dict[str, int]:
    if strategy not in STRATEGIES:
        raise ValueError(f"mesh.strategy={strategy!r} is not valid; expected one of {STRATEGIES}")
    n = num_devices
    shape = {a: 1 for a in MESH_AXES}
    if strategy == "dp":
        shape["data"] = n
    elif strategy == "fsdp":
        shape["fsdp"] = n
    elif strategy == "fsdp_tp":
        t = _power_of_two_split(n, lambda t: _tensor_divisor_ok(t, model))
        shape["tensor"], shape["fsdp"] = t, n // t
    elif strategy == "fsdp_sp":
        s = _power_of_two_split(n, lambda s: seq_len is None or seq_len % (2 * s) == 0)
        shape["sequence"], shape["fsdp"] = s, n // s
    elif strategy == "pp_fsdp":
        p = _power_of_two_split(n, lambda p: model is None or model.num_layers % p == 0)
        shape["stage"], shape["fsdp"] = p, n // p
    elif strategy == "fsdp_ep":
        experts = n if model is None else model.moe.num_experts or 1  # a dense model: no expert axis
        e = max(2 ** i for i in range(n.bit_length()) if n % 2 ** i == 0 and experts % 2 ** i == 0)
        shape["expert"], shape["fsdp"] = e, n // e
    elif strategy == "tp":
        t = max(d for d in range(1, n + 1) if n % d == 0 and _tensor_divisor_ok(d, model))
        shape["tensor"], shape["data"] = t, n // t
    return shape


def resolve(mesh_cfg: Mapping[str, Any], num_devices: int, model: ModelConfig | None = None,
            seq_len: int | None = None) -> dict[str, Any]:
    """{'shape': {axis: size}, 'rules': ((logical, mesh_axes), ...)} for `num_devices`."""
    shape = dict(mesh_cfg.get("shape") or DEFAULT_SHAPE)
    strategy = mesh_cfg.get("strategy") or ""
    if strategy:
        if {a: int(shape.get(a, 1)) for a in MESH_AXES} != DEFAULT_SHAPE:
            raise ValueError(f"set mesh.strategy={strategy!r} or mesh.shape={shape}, not both")
        shape = strategy_shape(strategy, num_devices, model, seq_len)
    overrides = tuple(STRATEGY_RULES.get(strategy, ())) + tuple(mesh_cfg.get("rules") or ())
    return {"shape": resolve_shape(shape, num_devices), "rules": merge_rules(overrides)}


def merge_rules(overrides: Sequence) -> tuple[tuple[str, tuple[str, ...]], ...]:
    table = dict(DEFAULT_RULES)
    for name, axes in normalize_rules(overrides):
        table[name] = axes
    return tuple(table.items())


def batch_shards(shape: Mapping[str, int], rules) -> int:
    """How many shards the batch dimension is split into: the product of the sizes of the mesh
    axes the `batch` rule names (data x fsdp by default; x expert under fsdp_ep)."""
    axes = dict(normalize_rules(rules)).get("batch", ())
    return math.prod(int(shape.get(a, 1)) for a in axes)


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    sizes = tuple(int(shape[a]) for a in MESH_AXES)
    devices = list(devices) if devices is not None else jax.devices()
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh shape {sizes} {MESH_AXES} needs {math.prod(sizes)} devices; found {len(devices)}")
    if len(devices) == len(jax.devices()):
        return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(sizes), devices=devices)
    return Mesh(np.asarray(devices, dtype=object).reshape(sizes), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(sizes))


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules=None) -> NamedSharding:
    """Sharding of a [B, T, ...] batch array: batch over data x fsdp, length over sequence."""
    names = ("batch", "length") + (None,) * (len(shape) - 2)
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())
