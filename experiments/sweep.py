"""Config sweeps: one Loom program over many overrides, locally or on Cloud TPU VMs, or an Optuna search.

    python -m experiments.sweep --sweep=experiments/sweeps/lr.py                  # runs/sweeps/lr
    python -m experiments.sweep --sweep=lr --parallel=2                           # a name in experiments/sweeps/
    python -m experiments.sweep --sweep=lr --mode=tpu_vm --zone=us-central2-b     # prints the gcloud commands
    python -m experiments.sweep --sweep=lr --search=optuna --trials=20            # Bayesian search with pruning

A sweep file defines `get_sweep()` returning a dict (shared/DESIGN.md "Post-training seams"):

    dict(program="train.pretrain", config="configs/pretrain.py:tiny",
         fixed={"train.steps": 200},                                  # every run
         grid={"optimizer.lr": [1e-3, 3e-3], "model.num_layers": [2, 4]},   # the product: 4 runs
         metric="eval_loss", goal="min")

Instead of `grid`: `zip` (field -> list, equal lengths: run i takes the i-th of each), `random`
(field -> (low, high, "log" | "linear") or a list to choose from, with `num_runs` and `seed`), or
`optuna` (the same shapes, searched by `--search=optuna`). Each run is the program in a process of
its own, `--config=<config> --workdir=<sweep dir>/<run id> --config.<field>=<value> ...`, its run
id spelled from its overrides (`lr-0.001_num_layers-2`). Training programs resume from their
workdir, so a re-run of a sweep skips finished runs (starting no process) and resumes the others.

The sweep dir gets `results.csv` and `results.md` (one row per run: run id, each swept field,
status done | failed | running | pending, the final and best value of the metric, tokens/s, the
error's last line for a failed run), rewritten whole whenever a run ends, and `results.png` (the
metric against each swept field). A failed run is recorded and the others go on.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import math
import os
import pathlib
import random
import re
import shlex
import subprocess
import sys
import threading
import time
from typing import Any, Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
SWEEPS_DIR = REPO / "experiments" / "sweeps"
PROGRAMS = ("train.pretrain", "train.sft", "rl.train", "rl.dpo", "rl.reward")
KINDS = ("grid", "zip", "random", "optuna")
STATUSES = ("done", "failed", "running", "pending")
BUCKET_MOUNT = "runs/bucket"  # tpu_vm: where the bucket is mounted, inside the checkout on each VM


class SweepError(ValueError):
    """A sweep file or flag that cannot work: the message names the bad value and what is valid."""


@dataclasses.dataclass
class Sweep:
    name: str
    program: str
    config: str
    fixed: dict[str, Any]
    kind: str  # grid | zip | random | optuna
    space: dict[str, Any]
    metric: str = "eval_loss"
    goal: str = "min"
    num_runs: int = 0
    seed: int = 0

    @property
    def fields(self) -> list[str]:
        return list(self.space)


# ---- reading a sweep ---------------------------------------------------------------------------

def find_sweep_file(spec: str) -> pathlib.Path:
    """A path, or a name in experiments/sweeps/ (with or without `.py`)."""
    path = pathlib.Path(spec)
    for candidate in (path, SWEEPS_DIR / path, SWEEPS_DIR / f"{spec}.py"):
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in SWEEPS_DIR.glob("*.py") if p.stem != "__init__")
    raise SweepError(f"--sweep={spec!r} is neither a file nor a sweep in {SWEEPS_DIR} (there: {', '.join(names)})")


def load_sweep(spec: str) -> Sweep:
    path = find_sweep_file(spec)
    module_spec = importlib.util.spec_from_file_location(f"loom_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not callable(getattr(module, "get_sweep", None)):
        raise SweepError(f"{path} defines no get_sweep() function")
    return parse_sweep(module.get_sweep(), name=path.stem, where=str(path))


def parse_sweep(d: dict[str, Any], *, name: str, where: str = "the sweep") -> Sweep:
    if not isinstance(d, dict):
        raise SweepError(f"{where}: get_sweep() must return a dict, not {type(d).__name__}")
    known = {"program", "config", "fixed", "metric", "goal", "num_runs", "seed", *KINDS}
    unknown = sorted(set(d) - known)
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {unknown}; valid: {sorted(known)}")
    program = d.get("program")
    if program not in PROGRAMS:
        raise SweepError(f"{where}: program={program!r} is not one of {PROGRAMS}")
    config = d.get("config")
    if not isinstance(config, str) or not (REPO / config.split(":")[0]).is_file():
        raise SweepError(f"{where}: config={config!r} must be 'configs/<program>.py[:<preset>]', a file of the repo")
    kinds = [k for k in KINDS if k in d]
    if len(kinds) != 1:
        raise SweepError(f"{where}: give exactly one of {KINDS}; got {kinds or 'none'}")
    kind, space = kinds[0], d[kinds[0]]
    if not isinstance(space, dict) or not space:
        raise SweepError(f"{where}: {kind} must be a non-empty dict of field -> values")
    if kind in ("grid", "zip"):
        for field, values in space.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise SweepError(f"{where}: {kind}[{field!r}] must be a non-empty list, not {values!r}")
        if kind == "zip" and len({len(v) for v in space.values()}) > 1:
            lengths = {f: len(v) for f, v in space.items()}
            raise SweepError(f"{where}: zip lists must have equal lengths; got {lengths}")
    else:
        for field, dist in space.items():
            _check_distribution(field, dist, where, kind)
    goal = d.get("goal", "min")
    if goal not in ("min", "max"):
        raise SweepError(f"{where}: goal={goal!r} must be 'min' or 'max'")
    num_runs = int(d.get("num_runs", 0))
    if kind == "random" and num_runs < 1:
        raise SweepError(f"{where}: a random sweep needs num_runs >= 1")
    fixed = dict(d.get("fixed") or {})
    overlap = sorted(set(fixed) & set(space))
    if overlap:
        raise SweepError(f"{where}: {overlap} are both fixed and swept")
    return Sweep(name=name, program=program, config=config, fixed=fixed, kind=kind, space=dict(space),
                 metric=d.get("metric", "eval_loss"), goal=goal, num_runs=num_runs, seed=int(d.get("seed", 0)))


def _check_distribution(field, dist, where, kind):
    if isinstance(dist, list) and dist:
        return
    ok = (isinstance(dist, tuple) and len(dist) == 3 and dist[2] in ("log", "linear")
          and all(isinstance(x, (int, float)) for x in dist[:2]) and dist[0] < dist[1]
          and (dist[2] == "linear" or dist[0] > 0))
    if not ok:
        raise SweepError(f"{where}: {kind}[{field!r}]={dist!r} must be (low, high, 'log' | 'linear') with low < high "
                         "(low > 0 for 'log'), or a non-empty list to choose from")


def sample_value(dist, rng: random.Random):
    """One draw of a `random` field: a choice from a list, or uniform in (log-)space; ints stay ints."""
    if isinstance(dist, list):
        return rng.choice(dist)
    low, high, scale = dist
    x = math.exp(rng.uniform(math.log(low), math.log(high))) if scale == "log" else rng.uniform(low, high)
    return int(round(x)) if isinstance(low, int) and isinstance(high, int) else float(f"{x:.4g}")


def expand(sweep: Sweep) -> list[dict[str, Any]]:
    """The runs' swept overrides, in order."""
    fields = sweep.fields
    if sweep.kind == "grid":
        return [dict(zip(fields, values)) for values in itertools.product(*sweep.space.values())]
    if sweep.kind == "zip":
        return [dict(zip(fields, values)) for values in zip(*sweep.space.values())]
    if sweep.kind == "random":
        rng = random.Random(sweep.seed)
        return [{f: sample_value(sweep.space[f], rng) for f in fields} for _ in range(sweep.num_runs)]
    raise SweepError(f"an {sweep.kind} sweep has no fixed list of runs: run it with --search=optuna")


def _format(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def run_id(overrides: dict[str, Any]) -> str:
    """`<last part of each field>-<value>` joined by `_`, filesystem-safe; a hash when too long."""
    parts = [f"{k.split('.')[-1]}-{_format(v)}" for k, v in overrides.items()]
    rid = re.sub(r"[^A-Za-z0-9._=-]+", "", "_".join(parts)) or "run"
    if len(rid) > 100:
        rid = rid[:80] + "_" + hashlib.sha1(json.dumps(overrides, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return rid


def command(sweep: Sweep, workdir: str, overrides: dict[str, Any], python: str = sys.executable) -> list[str]:
    """The run's command line."""
    flags = [f"--config.{k}={_format(v)}" for k, v in {**sweep.fixed, **overrides}.items()]
    return [python, "-m", sweep.program, f"--config={sweep.config}", f"--workdir={workdir}", *flags]


# ---- a run's state from its workdir --------------------------------------------------------------

def _jsonl(path: pathlib.Path) -> list[dict]:
    """The lines of runs.jsonl (a line cut by a kill is skipped)."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill: the rest is still good
            continue
    return out


def run_state(workdir: pathlib.Path, metric: str, goal: str) -> dict[str, Any]:
    """status ("done" | "failed" | "pending"), final / best metric, tokens/s, error, from the run's files."""
    from train.metrics import read_metrics  # the run's current history: lines a resume superseded are dropped

    events = _jsonl(workdir / "runs.jsonl")
    metrics = read_metrics(workdir)
    values = [m[metric] for m in metrics if isinstance(m.get(metric), (int, float))]
    rates = [m["tokens_per_sec"] for m in metrics if isinstance(m.get("tokens_per_sec"), (int, float))]
    start_at = max((i for i, e in enumerate(events) if e.get("event") in ("start", "resume")), default=-1)
    exit_at = max((i for i, e in enumerate(events) if e.get("event") in ("exit", "refused")), default=-1)
    last_exit = events[exit_at] if exit_at >= 0 else None
    status = "pending"  # never started, killed mid-run (-9), or stopped by a signal: resumable
    if last_exit is not None and exit_at > start_at:
        reason = last_exit.get("reason")
        if reason in ("finished", "already complete"):
            status = "done"
        elif reason != "signal":
            status = "failed"
    starts = [e for e in events if e.get("event") in ("start", "resume")]
    pick = min if goal == "min" else max
    return {"status": status, "final": values[-1] if values else None, "best": pick(values) if values else None,
            "tokens_per_sec": sum(rates[-5:]) / len(rates[-5:]) if rates else None,
            "error": (last_exit or {}).get("error") if status == "failed" else None,
            "commit": (starts[-1].get("git_commit") if starts else None)}


# ---- results -----------------------------------------------------------------------------------

class Results:
    """The sweep's table, rewritten whole (results.csv, results.md, results.png) on every change."""

    def __init__(self, sweep: Sweep, sweep_dir: pathlib.Path, runs: list[dict[str, Any]]):
        self.sweep, self.dir = sweep, sweep_dir
        self.rows = {run_id(o): {"run_id": run_id(o), **o, "status": "pending", "final": None, "best": None,
                                 "tokens_per_sec": None, "error": None} for o in runs}
        self.lock = threading.Lock()

    def update(self, rid: str, **fields) -> None:
        with self.lock:
            self.rows[rid].update(fields)
            self.write()

    def columns(self) -> list[str]:
        m = self.sweep.metric
        return ["run_id", *self.sweep.fields, "status", m, f"best_{m}", "tokens_per_sec", "error"]

    def table(self) -> list[list]:
        return [[r["run_id"], *(r.get(f) for f in self.sweep.fields), r["status"], r["final"], r["best"],
                 r["tokens_per_sec"], r["error"] or ""] for r in self.rows.values()]

    def write(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        cols, rows = self.columns(), self.table()
        tmp = self.dir / "results.csv.tmp"
        with tmp.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            w.writerows([["" if v is None else v for v in r] for r in rows])
        tmp.replace(self.dir / "results.csv")
        (self.dir / "results.md").write_text(self.markdown())

    def markdown(self) -> str:
        def cell(v):
            if v is None:
                return ""
            if isinstance(v, float):
                return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
            return str(v).replace("|", "\\|")

        cols = self.columns()
        lines = [f"# Sweep `{self.sweep.name}`", "",
                 f"`{self.sweep.program}` on `{self.sweep.config}`, fixed {json.dumps(self.sweep.fixed)}; "
                 f"{self.sweep.kind} over {', '.join(self.sweep.fields)}; metric `{self.sweep.metric}` ({self.sweep.goal}).",
                 "", "| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
        lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in self.table()]
        best = self.best()
        if best:
            lines += ["", f"Best: `{best['run_id']}` with {self.sweep.metric} = {best['best']:.4g}."]
        return "\n".join(lines) + "\n"

    def best(self) -> dict | None:
        done = [r for r in self.rows.values() if r["best"] is not None]
        if not done:
            return None
        return (min if self.sweep.goal == "min" else max)(done, key=lambda r: r["best"])

    def plot(self) -> pathlib.Path | None:
        """results.png: the final metric against each swept field (log x for a positive field
        spanning more than 10x), one panel per field."""
        pts = [r for r in self.rows.values() if r["final"] is not None]
        if not pts:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fields = self.sweep.fields
        fig, axes = plt.subplots(1, len(fields), figsize=(4.5 * len(fields), 3.6), squeeze=False)
        for ax, f in zip(axes[0], fields):
            xs = [r[f] for r in pts]
            numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
            if numeric:
                ax.scatter(xs, [r["final"] for r in pts])
                if min(xs) > 0 and max(xs) / min(xs) > 10:
                    ax.set_xscale("log")
            else:
                labels = sorted({str(x) for x in xs})
                ax.scatter([labels.index(str(x)) for x in xs], [r["final"] for r in pts])
                ax.set_xticks(range(len(labels)), labels)
            ax.set_xlabel(f)
            ax.set_ylabel(self.sweep.metric)
            ax.grid(alpha=0.3)
        fig.suptitle(f"sweep {self.sweep.name}")
        fig.tight_layout()
        path = self.dir / "results.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


# ---- local mode --------------------------------------------------------------------------------

def run_local(sweep: Sweep, sweep_dir: pathlib.Path, *, parallel: int = 1, log: Callable[[str], None] = print,
              python: str = sys.executable) -> Results:
    """Runs every unfinished run (`parallel` at a time), each in a process of its own."""
    runs = expand(sweep)
    ids = [run_id(o) for o in runs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise SweepError(f"runs {dup} have the same overrides; make the sweep's values distinct")
    results = Results(sweep, sweep_dir, runs)
    todo = []
    for o in runs:
        rid = run_id(o)
        state = run_state(sweep_dir / rid, sweep.metric, sweep.goal)
        results.rows[rid].update({k: state[k] for k in ("status", "final", "best", "tokens_per_sec", "error")})
        if state["status"] != "done":
            todo.append(o)
    results.write()
    (sweep_dir / "sweep.json").write_text(json.dumps(dataclasses.asdict(sweep), indent=2, default=str) + "\n")
    log(f"sweep {sweep.name}: {len(runs)} runs, {len(runs) - len(todo)} already done, {len(todo)} to run "
        f"({parallel} at a time) in {sweep_dir}")
    started = time.time()
    done_count = [0]

    def one(o):
        rid = run_id(o)
        wd = sweep_dir / rid
        wd.mkdir(parents=True, exist_ok=True)
        cmd = command(sweep, str(wd), o, python)
        results.update(rid, status="running")
        with (wd / "sweep.log").open("a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
        state = run_state(wd, sweep.metric, sweep.goal)
        if proc.returncode != 0:
            state["status"] = "failed"
            state["error"] = state["error"] or _last_error_line(wd / "sweep.log") or f"exit code {proc.returncode}"
        elif state["status"] != "done":
            state["status"] = "failed"
            state["error"] = state["error"] or "the program exited 0 without finishing its run"
        results.update(rid, **{k: state[k] for k in ("status", "final", "best", "tokens_per_sec", "error")})
        done_count[0] += 1
        elapsed = time.time() - started
        eta = elapsed / done_count[0] * (len(todo) - done_count[0])
        value = "" if state["final"] is None else f", {sweep.metric} {state['final']:.4g}"
        log(f"[{done_count[0]}/{len(todo)}] {rid}: {state['status']}{value}"
            + (f" ({state['error']})" if state["error"] else "") + f"; elapsed {elapsed:.0f}s, eta {eta:.0f}s")

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        list(pool.map(one, todo))
    results.write()
    results.plot()
    best = results.best()
    if best:
        log(f"best: {best['run_id']} ({sweep.metric} {best['best']:.4g}); table {sweep_dir / 'results.md'}")
    return results


def _last_error_line(log_file: pathlib.Path) -> str | None:
    lines = [ln.strip() for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("error:") or re.match(r"^[A-Za-z_.]*(Error|Exception)\b", ln):
            return ln[:300]
    return lines[-1][:300] if lines else None


# ---- TPU VMs -----------------------------------------------------------------------------------

@dataclasses.dataclass
class TpuOptions:
    zone: str = "us-central2-b"
    accelerator_type: str = "v4-8"
    runtime_version: str = "tpu-ubuntu2204-base"
    bucket: str = "gs://loom-sweeps"
    project: str | None = None
    spot: bool = False
    queued: bool = False
    repo_dir: str = "~/loom"
    archive: str = "/tmp/loom.tar.gz"


def archive_command(options: TpuOptions) -> list[str]:
    """The committed tree (HEAD) as the tarball every TPU VM unpacks: only committed code runs there,
    and the runs' provenance names that commit."""
    return ["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={options.archive}", "HEAD"]


def tpu_commands(sweep: Sweep, options: TpuOptions) -> list[tuple[str, list[list[str]]]]:
    """Per run: (run id, the gcloud commands that create a TPU VM, copy the code (`archive_command`'s
    tarball) to every worker, unpack and set it up, run the program on every worker with the run's
    flags and a bucket workdir, and delete the VM)."""
    out = []
    where = [f"--zone={options.zone}"] + ([f"--project={options.project}"] if options.project else [])
    if not options.bucket.startswith("gs://") or len(options.bucket) <= 5:
        raise SweepError(f"--bucket={options.bucket!r} must be gs://<bucket>[/<folder>]")
    bucket, _, folder = options.bucket[5:].strip("/").partition("/")
    fuse = ["gcsfuse", "--implicit-dirs", *([f"--only-dir={folder}"] if folder else []), bucket, BUCKET_MOUNT]
    mount = f"mkdir -p {BUCKET_MOUNT} && (mountpoint -q {BUCKET_MOUNT} || {shlex.join(fuse)})"
    for o in expand(sweep):
        rid = run_id(o)
        name = re.sub(r"[^a-z0-9-]", "-", f"loom-{sweep.name}-{rid}".lower())[:60].rstrip("-")
        # the bucket mounted with gcsfuse inside the checkout: every worker (and a re-created spot VM)
        # sees one shared workdir, which the program resumes from
        workdir = f"{BUCKET_MOUNT}/sweeps/{sweep.name}/{rid}"
        program = shlex.join(command(sweep, workdir, o, python=".venv/bin/python"))
        remote = (f"mkdir -p {options.repo_dir} && tar xzf ~/loom.tar.gz -C {options.repo_dir} && "
                  f"cd {options.repo_dir} && {mount} && scripts/setup.sh && {program}")
        if options.queued:
            create = ["gcloud", "compute", "tpus", "queued-resources", "create", name, f"--node-id={name}", *where,
                      f"--accelerator-type={options.accelerator_type}", f"--runtime-version={options.runtime_version}"]
        else:
            create = ["gcloud", "compute", "tpus", "tpu-vm", "create", name, *where,
                      f"--accelerator-type={options.accelerator_type}", f"--version={options.runtime_version}"]
        if options.spot:
            create.append("--spot")
        cmds = [create,
                ["gcloud", "compute", "tpus", "tpu-vm", "scp", options.archive, f"{name}:~/loom.tar.gz", *where,
                 "--worker=all"],
                ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, *where, "--worker=all", f"--command={remote}"]]
        if options.queued:
            cmds.append(["gcloud", "compute", "tpus", "queued-resources", "delete", name, *where, "--force", "--quiet"])
        else:
            cmds.append(["gcloud", "compute", "tpus", "tpu-vm", "delete", name, *where, "--quiet"])
        out.append((rid, cmds))
    return out


def launch_tpu(archive: list[str], plan, log=print) -> int:
    import shutil

    if shutil.which("gcloud") is None:
        print("error: --launch needs the gcloud CLI on PATH (https://cloud.google.com/sdk); without --launch the "
              "commands are only printed", file=sys.stderr)
        return 2
    if subprocess.run(archive).returncode != 0:
        print("error: could not archive the repository (git archive HEAD)", file=sys.stderr)
        return 2
    failed = 0
    for rid, cmds in plan:
        for cmd in cmds:
            log(f"$ {shlex.join(cmd)}")
            if subprocess.run(cmd).returncode != 0:
                log(f"run {rid}: the command failed; deleting its VM and going on")
                subprocess.run(cmds[-1])
                failed += 1
                break
    return 1 if failed else 0


# ---- Optuna ------------------------------------------------------------------------------------

def run_optuna(sweep: Sweep, sweep_dir: pathlib.Path, *, trials: int, log=print, python: str = sys.executable,
               poll: float = 1.0):
    """A TPE search over the sweep's `optuna` (or `random`) space, pruning trials whose logged
    metric falls behind the median of earlier trials at the same step (MedianPruner): the trial's
    process is stopped. The study lives in `<sweep dir>/optuna.db` (a re-run continues it).
    Needs intermediate metric lines: `train.eval_every` is set to a quarter of `train.steps`
    unless the sweep fixes it."""
    try:
        import optuna
    except ImportError:
        raise SweepError("--search=optuna needs optuna (pip install optuna, or Loom's [experiments] extra)") from None
    if sweep.kind not in ("optuna", "random"):
        raise SweepError(f"--search=optuna searches an 'optuna' (or 'random') space; this sweep is a {sweep.kind}")
    fixed = dict(sweep.fixed)
    if "train.eval_every" not in fixed:
        steps = int(fixed.get("train.steps", 0) or 0)
        if steps < 4:
            raise SweepError("--search=optuna prunes on intermediate evaluations: fix train.steps (>= 4) or "
                             "train.eval_every in the sweep")
        fixed["train.eval_every"] = max(1, steps // 4)
    sweep = dataclasses.replace(sweep, fixed=fixed)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    from train.metrics import read_metrics

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=sweep.name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}",
                                load_if_exists=True, direction="minimize" if sweep.goal == "min" else "maximize",
                                sampler=optuna.samplers.TPESampler(seed=sweep.seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    rows: list[dict[str, Any]] = []
    for t in range(trials):
        trial = study.ask()
        params = {}
        for f, dist in sweep.space.items():
            if isinstance(dist, list):
                params[f] = trial.suggest_categorical(f, dist)
            elif isinstance(dist[0], int) and isinstance(dist[1], int):
                params[f] = trial.suggest_int(f, dist[0], dist[1], log=dist[2] == "log")
            else:
                params[f] = trial.suggest_float(f, float(dist[0]), float(dist[1]), log=dist[2] == "log")
        rid = f"trial-{trial.number:03d}_" + run_id(params)
        wd = sweep_dir / rid
        wd.mkdir(parents=True, exist_ok=True)
        cmd = command(sweep, str(wd), params, python)
        reported, pruned = set(), False
        with (wd / "sweep.log").open("a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
            while True:
                finished = proc.poll() is not None
                for m in read_metrics(wd):
                    if isinstance(m.get(sweep.metric), (int, float)) and m["step"] not in reported:
                        reported.add(m["step"])
                        trial.report(float(m[sweep.metric]), int(m["step"]))
                        if not pruned and trial.should_prune() and not finished:
                            pruned = True
                            proc.terminate()
                if finished or pruned:
                    break
                time.sleep(poll)
            proc.wait()
        state = run_state(wd, sweep.metric, sweep.goal)
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            status = "pruned"
        elif proc.returncode == 0 and state["final"] is not None:
            study.tell(trial, state["final"])
            status = "done"
        else:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            status = "failed"
        rows.append({"run_id": rid, **params, "status": status, "final": state["final"]})
        log(f"[{t + 1}/{trials}] {rid}: {status}" + ("" if state["final"] is None else f", {sweep.metric} {state['final']:.4g}"))
    _write_trials(sweep, sweep_dir, study)
    try:
        best = study.best_trial
    except ValueError:
        log("no trial finished: no best trial")
        return study, None
    log(f"best trial: #{best.number} {sweep.metric} {best.value:.4g} with {best.params}")
    return study, best


def _write_trials(sweep: Sweep, sweep_dir: pathlib.Path, study) -> None:
    fields = sweep.fields
    cols = ["trial", *fields, "state", sweep.metric]
    with (sweep_dir / "results.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for t in study.trials:
            w.writerow([t.number, *(t.params.get(k, "") for k in fields), t.state.name,
                        "" if t.value is None else t.value])


# ---- the program -------------------------------------------------------------------------------

def main(argv):
    from absl import flags

    F = flags.FLAGS
    if len(argv) > 1:
        raise SweepError(f"unexpected arguments {argv[1:]}")
    if F.mode not in ("local", "tpu_vm"):
        raise SweepError(f"--mode={F.mode!r} is not one of ('local', 'tpu_vm')")
    if F.search not in (None, "", "optuna"):
        raise SweepError(f"--search={F.search!r}: the only search is 'optuna'")
    if F.parallel < 1 or F.trials < 1:
        raise SweepError(f"--parallel={F.parallel} and --trials={F.trials} must be >= 1")
    sweep = load_sweep(F.sweep)
    sweep_dir = pathlib.Path(F.workdir or REPO / "runs" / "sweeps" / sweep.name)
    if F.search == "optuna":
        run_optuna(sweep, sweep_dir, trials=F.trials)
        return 0
    if F.mode == "tpu_vm":
        options = TpuOptions(zone=F.zone, accelerator_type=F.accelerator_type, runtime_version=F.runtime_version,
                             bucket=F.bucket, project=F.project, spot=F.spot, queued=F.queued)
        archive, plan = archive_command(options), tpu_commands(sweep, options)
        print("# the code every VM runs: the committed tree (HEAD)")
        print(shlex.join(archive))
        for rid, cmds in plan:
            print(f"# {rid}")
            for cmd in cmds:
                print(shlex.join(cmd))
        sys.stdout.flush()
        return launch_tpu(archive, plan) if F.launch else 0
    results = run_local(sweep, sweep_dir, parallel=F.parallel)
    return 1 if any(r["status"] == "failed" for r in results.rows.values()) else 0


def _main(argv):
    try:
        sys.exit(main(argv))
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("sweep", None, "A sweep file, or a name in experiments/sweeps/.", required=True)
    flags.DEFINE_string("workdir", None, "The sweep's directory (default runs/sweeps/<name>).")
    flags.DEFINE_string("mode", "local", "local (run here) or tpu_vm (print, with --launch run, gcloud commands).")
    flags.DEFINE_integer("parallel", 1, "Local runs at a time.")
    flags.DEFINE_bool("launch", False, "tpu_vm: run the printed gcloud commands.")
    flags.DEFINE_string("search", None, "optuna: a Bayesian search over the sweep's space instead of its list.")
    flags.DEFINE_integer("trials", 10, "Optuna trials.")
    defaults = TpuOptions()
    flags.DEFINE_string("zone", defaults.zone, "tpu_vm: the zone.")
    flags.DEFINE_string("accelerator_type", defaults.accelerator_type, "tpu_vm: the TPU type (v4-8, v5litepod-8...).")
    flags.DEFINE_string("runtime_version", defaults.runtime_version, "tpu_vm: the TPU VM software version.")
    flags.DEFINE_string("bucket", defaults.bucket, "tpu_vm: the bucket holding every run's workdir.")
    flags.DEFINE_string("project", None, "tpu_vm: the Google Cloud project (default: gcloud's).")
    flags.DEFINE_bool("spot", False, "tpu_vm: spot (preemptible) capacity; runs resume from their workdir.")
    flags.DEFINE_bool("queued", False, "tpu_vm: create through queued resources (waits for capacity).")
    app.run(_main)
