"""Loom's flash-attention kernels on a real GPU/TPU, checked against references (not timed).

    python benchmarks/gpu_kernel_check.py                  # the pairwise grid + production shapes
    python benchmarks/gpu_kernel_check.py --grid=default   # the 5 cases the CPU suite interprets
    python benchmarks/gpu_kernel_check.py --smoke          # those 5, TPU kernel interpreted: checks the script

CI has no accelerator, so the test suite runs these kernels in interpret mode; this script runs
the same cases compiled for the local device. Grid cases (tests/pallas_kernels/cases.py) compare
the forward output, the lse and dq/dk/dv against the float64 definition; production-shape cases
(sequence 2k-8k, GQA, packed documents) compare against the float32 definition on the device.
Errors are max|x - ref| / max|ref|; bf16 inputs are held to the suite's tolerance (2e-2).
Prints one line per case and a summary, writes benchmarks/records/gpu_kernel_check_<platform>.json
(a table of every case's errors); exits 1 when any case is off, 2 on a machine without a GPU/TPU.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import records  # noqa: E402  (stdlib only)
from pallas_kernels import attention_reference, flash_attention  # noqa: E402
from tests.pallas_kernels.cases import (GPU_FACTORS, TOLERANCE, TPU_FACTORS, case_id,  # noqa: E402
                                        pairwise, product, rel_err, run_case)

DEFAULT_GRID = [  # the cases the CPU suite interprets (tests/pallas_kernels/test_gpu_interpret.py)
    dict(causal=True, window=None, segments=True, softcap=None, heads=(2, 1), head_dim=64, lengths=(200, 200), dtype="bfloat16"),
    dict(causal=True, window=33, segments=False, softcap=5.0, heads=(2, 2), head_dim=128, lengths=(128, 128), dtype="bfloat16"),
    dict(causal=False, window=33, segments=True, softcap=None, heads=(2, 2), head_dim=256, lengths=(70, 200), dtype="bfloat16"),
    dict(causal=False, window=None, segments=False, softcap=5.0, heads=(2, 1), head_dim=64, lengths=(70, 200), dtype="bfloat16"),
    dict(causal=True, window=33, segments=True, softcap=None, heads=(2, 1), head_dim=64, lengths=(200, 200), dtype="bfloat16",
         alibi=True),
]
# Production shapes: (batch, seq, heads, kv_heads, head_dim, causal, window, segments).
PRODUCTION = [
    (2, 2048, 32, 8, 64, True, None, True),  # the 1b preset's attention, packed documents
    (1, 8192, 32, 8, 128, True, None, False),  # llama3_8b's
    (2, 4096, 16, 16, 128, False, None, False),
    (2, 4096, 8, 4, 256, True, 1024, True),  # Gemma-like: head_dim 256, sliding window
]


def production_case(b, t, n, kh, h, causal, window, segments, flash_kwargs):
    rng = np.random.default_rng(t * 7 + h)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((b, t, kh, h)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, t, kh, h)), jnp.bfloat16)
    kw = dict(causal=causal, window=window)
    if segments:  # three documents per row, positions restarting in each
        cuts = np.sort(rng.choice(np.arange(64, t - 64), size=2, replace=False))
        seg = np.searchsorted(cuts, np.arange(t), side="right").astype(np.int32) + 1
        pos = np.arange(t) - np.concatenate([[0], cuts])[seg - 1]
        kw.update(segment_ids=jnp.asarray(np.tile(seg, (b, 1))), positions=jnp.asarray(np.tile(pos, (b, 1))))
    w = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v).astype(jnp.float32) * w).sum()

    fa = lambda q, k, v: flash_attention(q, k, v, **kw, **flash_kwargs)  # noqa: E731
    ref = lambda q, k, v: attention_reference(q, k, v, **kw)  # noqa: E731
    out, grads = jax.jit(lambda *a: (fa(*a), jax.grad(loss(fa), argnums=(0, 1, 2))(*a)))(q, k, v)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref_out, ref_grads = jax.jit(lambda *a: (ref(*a), jax.grad(loss(ref), argnums=(0, 1, 2))(*a)))(*f32)
    errs = {"out": rel_err(out, ref_out)}
    errs.update({name: rel_err(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    return errs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", default="pairwise", choices=("none", "default", "pairwise", "full"))
    p.add_argument("--production", type=int, default=1, help="1: also the production-shape cases")
    p.add_argument("--name", default="", help="record name (default: gpu_kernel_check_<platform>)")
    p.add_argument("--records-dir", default=None, help="where the JSON record goes (default benchmarks/records; "
                   "with --smoke a temporary directory)")
    p.add_argument("--smoke", action="store_true", help="the default grid, TPU kernel interpreted, no production "
                   "shapes: checks the script on a CPU")
    a = p.parse_args(argv)

    dev = jax.devices()[0]
    if a.smoke:
        a.grid, a.production = "default", 0
    elif dev.platform == "cpu":
        print("benchmarks/gpu_kernel_check.py needs a GPU or TPU (found only a CPU; the CPU suite checks these "
              "kernels in interpret mode).", file=sys.stderr)
        return 2
    backend = "gpu" if dev.platform == "gpu" else "tpu"
    flash_kwargs = dict(backend=backend, interpret=False)
    if a.smoke:
        backend, flash_kwargs = "tpu", dict(backend="tpu", interpret=True)
    factors = GPU_FACTORS if backend == "gpu" else TPU_FACTORS
    grid = {"none": [], "default": DEFAULT_GRID, "full": product(factors),
            "pairwise": DEFAULT_GRID + [c for c in pairwise(factors) if c not in DEFAULT_GRID]}[a.grid]
    print(f"# flash-attention kernel check: {dev.device_kind} ({dev.platform}), jax {jax.__version__}")
    cases = [("grid (float64 definition)", case_id(c), TOLERANCE[c["dtype"]],
              lambda c=c: run_case(c, flash_kwargs, batch=2)) for c in grid]
    if a.production:
        cases += [("production (float32 definition)",
                   "B{}-T{}-n{}k{}-h{}-{}-w{}-{}".format(*pc[:5], "causal" if pc[5] else "full", pc[6],
                                                         "seg" if pc[7] else "noseg"),
                   TOLERANCE["bfloat16"], lambda pc=pc: production_case(*pc, flash_kwargs)) for pc in PRODUCTION]
    rows, raw, bad = [], {}, 0
    for kind, name, tol, check in cases:
        t0 = time.perf_counter()
        try:
            errs = check()
        except Exception as e:  # report and go on: one broken case should not hide the others
            bad += 1
            raw[name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            rows.append([kind, name, f"ERROR {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}",
                         "", "", "", "", ""])
            print(f"ERROR {name}: {raw[name]['error']}", flush=True)
            continue
        ok = all(v <= tol for v in errs.values())
        bad += not ok
        raw[name] = {"errors": errs, "tolerance": tol, "ok": ok, "seconds": time.perf_counter() - t0}
        rows.append([kind, name, *(f"{errs[k]:.2e}" if k in errs else "-" for k in ("out", "lse", "dq", "dk", "dv")),
                     "ok" if ok else "FAIL"])
        print(f"{'ok   ' if ok else 'FAIL '} {name:55s} " + " ".join(f"{k}={v:.2e}" for k, v in errs.items())
              + f"  ({raw[name]['seconds']:.1f} s)", flush=True)
    total = len(cases)
    print(f"\n{total - bad}/{total} cases within tolerance")
    table = records.table(f"Flash-attention kernels compiled for {dev.device_kind}: {total - bad}/{total} cases within "
                          "tolerance (relative error max|x − ref| / max|ref|; bf16 tolerance "
                          f"{TOLERANCE['bfloat16']:g})", ["kind", "case", "out", "lse", "dq", "dk", "dv", "check"],
                          rows)
    method = ("Not timed. Grid cases (tests/pallas_kernels/cases.py, the CPU suite's default cases plus a pairwise "
              f"grid of {a.grid!r}) compare the forward output, the lse and dq/dk/dv against the float64 definition; "
              "production-shape cases (sequence 2k–8k, GQA, packed documents, a sliding window) compare against "
              "the float32 definition on the device.")
    if a.smoke:
        method += " SMOKE RUN: the TPU kernel interpreted on a CPU, a check of the script only."
    directory = a.records_dir or (tempfile.mkdtemp(prefix="loom_smoke_records_") if a.smoke else records.RECORDS)
    records.write_record(a.name or f"gpu_kernel_check_{dev.platform}{'_smoke' if a.smoke else ''}",
                         title=f"Kernel correctness on {dev.device_kind}", tables=[table], method=method,
                         params=vars(a), results=raw, directory=Path(directory))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
