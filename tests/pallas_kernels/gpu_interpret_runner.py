"""Runs GPU-kernel cases in Mosaic GPU interpret mode and prints one JSON line per case.

`python -m tests.pallas_kernels.gpu_interpret_runner '<json list of cases>'`

A separate process because the interpreter runs each warpgroup as a host thread that blocks
inside XLA host callbacks while it waits on a barrier: with XLA's CPU thread pool sized to the
core count (2 here) the warpgroups of one CTA can starve each other and hang. The parent test
sets NPROC (which sizes that pool) before JAX starts in this process.
"""

import json
import sys
import traceback


def main(argv):
    from tests.pallas_kernels.cases import case_id, run_case

    for case in json.loads(argv[1]):
        case = {k: tuple(v) if isinstance(v, list) else v for k, v in case.items()}
        try:
            errs = run_case(case, dict(backend="gpu", interpret=True), batch=1)
            print(json.dumps({"id": case_id(case), "errs": errs}), flush=True)
        except Exception:  # reported per case by the parent test
            print(json.dumps({"id": case_id(case), "error": traceback.format_exc()[-3000:]}), flush=True)


if __name__ == "__main__":
    main(sys.argv)
