"""The measured matmul peak that MFU is reported against, measured once per machine and cached.

MFU = model FLOPs per second / peak, with the peak measured for the run's compute dtype:
float32 x float32, or bfloat16 inputs with float32 accumulation (what the model's matmuls do).
The peak is per device; on CPU every (fake) device shares the same cores, so the CPU peak is
one measurement for the whole machine, while on GPU/TPU it is multiplied by the device count.
Cache: `$LOOM_CACHE/peak_flops.json` keyed by platform, device kind, core count, dtype and shape.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp

from configs.cli import cache_dir

DEFAULT_SHAPE = {"cpu": (2048, 2048, 2048), "gpu": (8192, 8192, 8192), "tpu": (8192, 8192, 8192)}


def measure_matmul_flops(dtype: str, shape=None, *, repeats: int = 5, device=None) -> float:
    """Best FLOP/s of an [m,k] x [k,n] matmul in `dtype` with float32 accumulation."""
    device = device or jax.devices()[0]
    m, k, n = shape or DEFAULT_SHAPE.get(device.platform, (4096, 4096, 4096))
    dt = jnp.dtype(dtype)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(ka, (m, k), jnp.float32).astype(dt), device)
    b = jax.device_put(jax.random.normal(kb, (k, n), jnp.float32).astype(dt), device)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * k * n / best


def _key(device, dtype, shape) -> str:
    return f"{device.platform}|{device.device_kind}|{os.cpu_count()}|{jnp.dtype(dtype).name}|{shape}"


def matmul_peak_flops(dtype: str, *, device=None, refresh: bool = False) -> float:
    """Per-device matmul peak (FLOP/s) for `dtype`, from the cache or measured now (a few seconds)."""
    device = device or jax.devices()[0]
    shape = DEFAULT_SHAPE.get(device.platform, (4096, 4096, 4096))
    path = cache_dir() / "peak_flops.json"
    key = _key(device, dtype, shape)
    cache = {}
    if path.is_file():
        try:
            cache = json.loads(path.read_text())
        except ValueError:
            cache = {}
    if key in cache and not refresh:
        return float(cache[key])
    value = measure_matmul_flops(dtype, shape, device=device)
    cache[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    os.replace(tmp, path)
    return value


def system_peak_flops(dtype: str) -> float:
    """Peak of all devices the run uses (see the module docstring for CPU)."""
    dev = jax.devices()[0]
    per_device = matmul_peak_flops(dtype, device=dev)
    return per_device if dev.platform == "cpu" else per_device * jax.device_count()
