"""Mosaic GPU kernels in interpret mode (CPU) against the float64 reference, in a subprocess.

The GPU interpreter runs each warpgroup as a host thread that blocks inside XLA host callbacks
while waiting on barriers; XLA's CPU thread pool is sized to the core count, so on a 2-core
machine the warpgroups of one CTA can starve each other and hang. The cases therefore run in a
child process started with NPROC=8 (which sizes that pool) and a timeout. Interpret mode costs
~10 s per case with gradients, so the default suite runs a few cases that together touch every
factor value; the pairwise grid and the full product are `slow`.
"""

import json

import pytest

from tests.helpers import run_program
from tests.pallas_kernels.cases import GPU_FACTORS, TOLERANCE, case_id, pairwise, product


def _case(causal, window, segments, softcap, heads, head_dim, lengths, alibi=False):
    return dict(causal=causal, window=window, segments=segments, softcap=softcap, heads=heads, head_dim=head_dim,
                dtype="bfloat16", lengths=lengths, alibi=alibi)


DEFAULT_CASES = [
    _case(True, None, True, None, (2, 1), 64, (200, 200)),  # packed causal rows, GQA, odd length
    _case(True, 33, False, 5.0, (2, 2), 128, (128, 128)),  # sliding window + softcap
    _case(False, 33, True, None, (2, 2), 256, (70, 200)),  # T != S with (q, kv) id pairs, head_dim 256
    _case(False, None, False, 5.0, (2, 1), 64, (70, 200)),  # nothing but padded keys masked
    _case(True, 33, True, None, (2, 1), 64, (200, 200), alibi=True),  # ALiBi on packed, windowed rows
]
PAIRWISE = [c for c in pairwise(GPU_FACTORS) if c not in DEFAULT_CASES]
REST = [c for c in product(GPU_FACTORS) if c not in DEFAULT_CASES and c not in PAIRWISE]


def _run(cases, timeout):
    proc = run_program("tests.pallas_kernels.gpu_interpret_runner", json.dumps(cases), env={"NPROC": "8"},
                       timeout=timeout, check=False)
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r["id"]] = r
    return results, proc


def _check(case, results, proc):
    r = results.get(case_id(case))
    assert r is not None, f"no result for {case_id(case)} (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    assert "error" not in r, r["error"]
    tol = TOLERANCE[case["dtype"]]
    bad = {k: v for k, v in r["errs"].items() if not v <= tol}
    assert not bad, f"relative errors above {tol}: {bad}; all: {r['errs']}"


@pytest.fixture(scope="module")
def default_results():
    return _run(DEFAULT_CASES, timeout=600)


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=case_id)
def test_gpu_kernels_match_reference(case, default_results):
    _check(case, *default_results)


@pytest.mark.slow
@pytest.mark.parametrize("case", PAIRWISE, ids=case_id)
def test_gpu_kernels_pairwise_grid(case):
    _check(case, *_run([case], timeout=600))


@pytest.mark.slow
@pytest.mark.parametrize("head_dim", GPU_FACTORS["head_dim"])
@pytest.mark.parametrize("lengths", GPU_FACTORS["lengths"], ids=str)
def test_gpu_kernels_full_grid(head_dim, lengths):
    cases = [c for c in REST if c["head_dim"] == head_dim and c["lengths"] == lengths]
    results, proc = _run(cases, timeout=40 * 60)
    failures = []
    for case in cases:
        try:
            _check(case, results, proc)
        except AssertionError as e:
            failures.append(f"{case_id(case)}: {str(e)[:500]}")
    assert not failures, "\n".join(failures)
