#!/usr/bin/env python3
"""Start N local JAX processes of a Loom program, as a multi-host job would run them.

    .venv/bin/python scripts/launch_local.py --processes=2 --devices_per_process=2 -- \
        python -m train.pretrain --config=configs/pretrain.py:tiny --workdir=runs/tiny_mp

Each process gets its own CPU devices (`JAX_NUM_CPU_DEVICES`), the coordinator on 127.0.0.1 and
its `--config.distributed.*` fields; output lines are prefixed with the process index. Exits
with the first non-zero status (and stops the others) so a failing job fails loudly.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix, sink):
    for line in iter(stream.readline, ""):
        sink.write(f"[{prefix}] {line}")
        sink.flush()


def launch(command: list[str], processes: int, devices_per_process: int, env: dict | None = None,
           cwd: str | None = None, timeout: float | None = None) -> int:
    coordinator = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(processes):
        e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        e.update(env or {})
        e.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices_per_process))
        args = command + [f"--config.distributed.coordinator_address={coordinator}",
                          f"--config.distributed.num_processes={processes}", f"--config.distributed.process_id={i}"]
        p = subprocess.Popen(args, env=e, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=_pump, args=(p.stdout, i, sys.stdout), daemon=True).start()
        procs.append(p)
    status = 0
    try:
        for p in procs:
            rc = p.wait(timeout=timeout)
            if rc != 0 and status == 0:
                status = rc
                for q in procs:
                    if q.poll() is None:
                        q.terminate()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return status


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--devices_per_process", type=int, default=1)
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- program and its flags")
    args = ap.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        ap.error("give the program after --, e.g. -- python -m train.pretrain --config=...")
    if command[0] == "python":
        command[0] = sys.executable
    sys.exit(launch(command, args.processes, args.devices_per_process))


if __name__ == "__main__":
    main()
