"""What every benchmark shares: interleaved timing rounds, their summaries, and the JSON record.

A benchmark measures its implementations in interleaved rounds (`interleaved`: round 1 runs
every implementation once, then round 2, ...), so a slow spell of a shared machine hits all of
them alike, and reports each figure as the median with the min-max spread over the rounds
(`summarize`, `spread`). Peers run in processes of their own (`run_isolated` scripts or a
worker pool); each returns plain numbers.

`write_record(name, ...)` writes `benchmarks/records/<name>.json`: the tables it printed plus
everything needed to trust or repeat them (commit and whether the tree was dirty, package
versions, CPU model / GPU name and driver, thread settings, the exact command, the date).
`python benchmarks/report.py` regenerates `benchmarks/RESULTS.md` from the records alone; no
figure in it is typed by hand.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
RECORDS = REPO / "benchmarks" / "records"

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "torch", "transformers",
            "datasketch", "peft", "trl", "llama-cpp-python")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL",
               "CUDA_VISIBLE_DEVICES")


# --------------------------------------------------------------------------------------------
# Timing


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, *, warmup: int = 1,
                pause: float = 0.0) -> dict[str, list]:
    """Calls every function once per round, `rounds` times, after `warmup` untimed rounds.

    Each function returns its own measurement (seconds, a rate, or a tuple of them); the
    result maps each name to its `rounds` measurements, equal counts for all. `pause` seconds
    between calls let a peer's worker threads go idle before the next one starts.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be >= 1")
    out: dict[str, list] = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            if pause:
                time.sleep(pause)
            value = fn()
            if r >= warmup:
                out[name].append(value)
    return out


def seconds(fn: Callable[[], Any]) -> float:
    """Wall-clock seconds of one call (the caller blocks on any asynchronous result inside)."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def summarize(values) -> dict[str, float]:
    """{"median", "min", "max", "n"} of a list of numbers."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize needs at least one value")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def spread(summary: dict, fmt: str = "{:,.1f}") -> str:
    """'median (min–max)' for a `summarize` result."""
    m, lo, hi = (fmt.format(summary[k]) for k in ("median", "min", "max"))
    return f"{m} ({lo}–{hi})"


def ratio_summary(num: list, den: list) -> dict[str, float]:
    """Summary of per-round ratios num[i] / den[i] (the rounds are paired: same spell)."""
    if len(num) != len(den):
        raise ValueError(f"paired ratios need equal sample counts, got {len(num)} and {len(den)}")
    return summarize([a / b for a, b in zip(num, den)])


def comma_list(ap, flag: str, value: str, valid) -> list[str]:
    """The items of a comma-separated argument; argparse's error (exit 2) names one not in `valid`."""
    items = value.split(",")
    for item in items:
        if item not in valid:
            ap.error(f"{flag}: {item!r} is not one of {tuple(valid)}")
    return items


# --------------------------------------------------------------------------------------------
# Compiled memory


def xla_bytes(m) -> int:
    """Per-device bytes a compiled step needs, from its `memory_analysis()`: arguments + temporaries +
    outputs not aliased to an argument (the donated state's new value reuses the old one's buffers)."""
    return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes


# --------------------------------------------------------------------------------------------
# Provenance


def git_state() -> dict[str, Any]:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None,
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def versions(packages=PACKAGES) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[dict[str, str]]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.stdout.strip().splitlines():
        name, driver, mem = (s.strip() for s in line.split(","))
        gpus.append({"name": name, "driver": driver, "memory": mem})
    return gpus


def machine() -> dict[str, Any]:
    """CPU model, cores this process may use, memory, accelerators, thread settings."""
    info: dict[str, Any] = {"cpu": _cpu_model(), "arch": platform.machine(), "cpu_count": os.cpu_count(),
                            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                            else os.cpu_count(),
                            "threads_env": {k: os.environ[k] for k in THREAD_VARS if k in os.environ}}
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    gpus = _gpus()
    if gpus:
        info["gpus"] = gpus
    if "jax" in sys.modules:
        import jax

        dev = jax.devices()[0]
        info["jax_backend"] = jax.default_backend()
        info["jax_device"] = f"{dev.device_kind} x{jax.device_count()}"
    if "torch" in sys.modules:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    return info


def describe_machine(m: dict[str, Any]) -> str:
    """One line for a table caption: 'AMD EPYC 9B14, 2 cores, 24 GiB; NVIDIA H200 (driver 580)'."""
    s = f"{m.get('cpu', '?')}, {m.get('usable_cores', '?')} cores"
    if "memory_gib" in m:
        s += f", {m['memory_gib']:g} GiB"
    for g in m.get("gpus", []):
        s += f"; {g['name']} (driver {g['driver']})"
    if m.get("threads_env"):
        s += "; " + ", ".join(f"{k}={v}" for k, v in m["threads_env"].items())
    return s


def command_line() -> str:
    """The command that ran this benchmark, from the repo root."""
    script = pathlib.Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    python = pathlib.Path(sys.executable)
    py = ".venv/bin/python" if (REPO / ".venv") in python.parents or python.parent == REPO / ".venv" / "bin" \
        else "python"
    return " ".join([py, shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def checkout(commit: str) -> pathlib.Path:
    """A worktree of an earlier `commit` (`.cache/worktrees/<sha>`, reused) for before/after runs.

    Run code there in a process of its own with the same interpreter and `cwd=` the worktree:
    the current directory comes first on `sys.path`, so that tree's packages are the ones
    imported (the editable install's finder comes after it).
    """
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{commit}^{{commit}}"], cwd=REPO, capture_output=True,
                         text=True)
    if sha.returncode:
        raise ValueError(f"--baseline {commit!r} is not a commit of {REPO} ({sha.stderr.strip()})")
    sha = sha.stdout.strip()
    path = REPO / ".cache" / "worktrees" / sha[:12]
    if not (path / ".git").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "worktree", "add", "--detach", "-f", str(path), sha], cwd=REPO, check=True,
                       capture_output=True)
    return path


# --------------------------------------------------------------------------------------------
# Tables and records


def table(caption: str, columns: list[str], rows: list[list]) -> dict[str, Any]:
    """A table of a record: cells are strings or numbers (numbers printed as they are)."""
    for r in rows:
        if len(r) != len(columns):
            raise ValueError(f"table {caption!r}: row {r} has {len(r)} cells for {len(columns)} columns")
    return {"caption": caption, "columns": list(columns), "rows": [list(r) for r in rows]}


def markdown_table(t: dict[str, Any]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    cols = t["columns"]
    align = ["---" if i == 0 else "---:" for i in range(len(cols))]
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in t["rows"]]
    return "\n".join(lines)


def print_table(t: dict[str, Any]) -> None:
    print(f"\n{t['caption']}\n{markdown_table(t)}", flush=True)


def write_record(name: str, *, title: str, tables: list[dict[str, Any]], method: str = "",
                 params: dict[str, Any] | None = None, results: dict[str, Any] | None = None,
                 directory: pathlib.Path | None = None) -> pathlib.Path:
    """Writes benchmarks/records/<name>.json and returns its path.

    `method` says in prose what was measured and how (shapes, settings, peers' settings);
    `params` the script's arguments; `results` raw numbers (every round's samples) behind the
    tables, so a reader can recompute any summary.
    """
    directory = directory or RECORDS
    directory.mkdir(parents=True, exist_ok=True)
    record = {"name": name, "title": title, "script": pathlib.Path(sys.argv[0]).name,
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": command_line(), **git_state(), "versions": versions(), "machine": machine(),
              "params": params or {}, "method": method, "tables": tables, "results": results or {}}
    path = directory / f"{name}.json"
    path.write_text(json.dumps(record, indent=1, default=float) + "\n")
    print(f"\nrecord: {path.relative_to(REPO) if REPO in path.parents else path}", flush=True)
    return path
