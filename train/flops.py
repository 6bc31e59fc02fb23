"""The measured matmul peak that MFU is reported against: the best this machine has shown.

MFU = model FLOPs per second / peak, with the peak measured for the run's compute dtype:
float32 x float32, or bfloat16 inputs with float32 accumulation (what the model's matmuls do).
The peak is per device; on CPU every (fake) device shares the same cores, so the CPU peak is
one measurement for the whole machine, while on GPU/TPU it is multiplied by the device count.

Another process on the same cores can only make a measurement lower, never higher, so one
measurement cached for good can be far below the machine (seen here: a peak taken while a
benchmark ran was a quarter of the quiet figure, and a run's MFU came out above 1). Every call
therefore measures again (a fraction of a second on CPU) and keeps the best of this measurement
and all earlier ones on the machine: `$LOOM_CACHE/peak_flops.json`, keyed by platform, device
kind, core count, dtype and shape.
"""

from __future__ import annotations

import json
import os
import re
import time

import jax
import jax.numpy as jnp

from configs.cli import cache_dir

# 1024^3 on CPU reaches the same FLOP/s as 2048^3 (measured on 2 cores) in an eighth of the time
DEFAULT_SHAPE = {"cpu": (1024, 1024, 1024), "gpu": (8192, 8192, 8192), "tpu": (8192, 8192, 8192)}


def measure_matmul_flops(dtype: str, shape=None, *, repeats: int = 10, device=None) -> float:
    """Best FLOP/s of an [m,k] x [k,n] matmul in `dtype` with float32 accumulation."""
    return max(matmul_flops_samples(dtype, shape, warmup=2, repeats=repeats, device=device))


def matmul_flops_samples(dtype: str, shape=None, *, warmup: int = 5, repeats: int = 10, device=None) -> list[float]:
    """FLOP/s of each of `repeats` timed [m,k] x [k,n] matmuls (`dtype` in, float32 accumulation),
    after `warmup` untimed ones.

    Several warm-up products matter on a GPU or TPU, whose clocks ramp up under load (a single
    one leaves the first timed products slow); a benchmark reports the median of the samples.
    """
    if warmup < 1 or repeats < 1:
        raise ValueError(f"warmup={warmup} and repeats={repeats} must both be >= 1 (the first call compiles)")
    device = device or jax.devices()[0]
    m, k, n = shape or DEFAULT_SHAPE.get(device.platform, (4096, 4096, 4096))
    dt = jnp.dtype(dtype)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(ka, (m, k), jnp.float32).astype(dt), device)
    b = jax.device_put(jax.random.normal(kb, (k, n), jnp.float32).astype(dt), device)
    f = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    for _ in range(warmup):
        f(a, b).block_until_ready()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        samples.append(2.0 * m * k * n / (time.perf_counter() - t))
    return samples


def _key(device, dtype, shape) -> str:
    return f"{device.platform}|{device.device_kind}|{os.cpu_count()}|{jnp.dtype(dtype).name}|{shape}"


def matmul_peak_flops(dtype: str, *, device=None) -> float:
    """Per-device matmul peak (FLOP/s) for `dtype`: measured now, and the best of that and every
    earlier measurement on this machine (the cache), which it updates."""
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
    measured = measure_matmul_flops(dtype, shape, device=device)
    best = max(measured, float(cache.get(key, 0.0)))
    if best != cache.get(key):
        cache[key] = best
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    return best


def system_peak_flops(dtype: str) -> float:
    """Peak of all devices the run uses (see the module docstring for CPU)."""
    dev = jax.devices()[0]
    per_device = matmul_peak_flops(dtype, device=dev)
    return per_device if dev.platform == "cpu" else per_device * jax.device_count()


# Dense (no structured sparsity) bf16 / fp16 tensor throughput per device, TFLOP/s, from the vendors'
# spec sheets: the peak a GPU/TPU MFU is quoted against. First matching pattern wins (the more
# specific names first). NVIDIA's sheets print the sparse figure, twice the dense one.
SPEC_PEAK_TFLOPS: tuple[tuple[str, float, str], ...] = (
    # (regex on jax's device_kind, dense bf16 TFLOP/s, source)
    (r"\bH100\b.*\bPCIe\b", 756.0, "NVIDIA H100 datasheet: H100 PCIe BF16 Tensor Core 1,513 TFLOPS with sparsity"),
    (r"\bH100 NVL\b", 835.0, "NVIDIA H100 datasheet: H100 NVL BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    (r"\bH100\b", 989.0, "NVIDIA H100 datasheet: H100 SXM BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    (r"\bGH200\b", 989.0, "NVIDIA GH200 datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    (r"\bH200 NVL\b", 835.0, "NVIDIA H200 datasheet: H200 NVL BF16 Tensor Core 1,671 TFLOPS with sparsity"),
    (r"\bH200\b", 989.0, "NVIDIA H200 datasheet: H200 SXM BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    (r"\bA100\b", 312.0, "NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity), SXM and PCIe"),
    (r"^TPU v4$", 275.0, "Google Cloud TPU v4 docs: 275 peak bf16 TFLOPS per chip"),
    (r"^TPU v5 ?(lite|e)$", 197.0, "Google Cloud TPU v5e docs: 197 peak bf16 TFLOPS per chip"),
    (r"^TPU v5p?$", 459.0, "Google Cloud TPU v5p docs: 459 peak bf16 TFLOPS per chip"),
    (r"^TPU v6 ?(lite|e)$", 918.0, "Google Cloud TPU v6e (Trillium) docs: 918 peak bf16 TFLOPS per chip"),
)
SPEC_DTYPES = ("bfloat16", "float16")


def spec_peak(device_kind: str, dtype: str = "bfloat16") -> tuple[float, str] | None:
    """(dense peak FLOP/s per device, its source) from the spec sheet of `device_kind` (a jax
    `Device.device_kind`, e.g. "NVIDIA H100 80GB HBM3", "TPU v5 lite"), or None when the table
    has no figure for it: an unlisted chip, a CPU, or a dtype other than bf16 / fp16 (the sheets'
    fp32 figures do not say what XLA runs: TF32 tensor cores or not, by precision setting).
    """
    if jnp.dtype(dtype).name not in SPEC_DTYPES:
        return None
    for pattern, tflops, source in SPEC_PEAK_TFLOPS:
        if re.search(pattern, device_kind.strip(), flags=re.IGNORECASE):
            return tflops * 1e12, source
    return None
