"""What keeps a training run from losing work, shared by every training loop.

  check_workdir   before anything is written: a workdir whose checkpoints belong to another
                  model or data stream stops the run with one line (WorkdirMismatch) instead of
                  being treated as unreadable and overwritten; history without checkpoints is
                  reported, and metrics are appended to, never truncated.
  StopRequests    SIGTERM / SIGINT (and, under jax.distributed, JAX's preemption notice) become a
                  request to stop at the next step boundary, where the loop checkpoints, flushes
                  its metrics and exits 143 / 130; a second signal exits at once.
  NanGuard        the train step never applies a non-finite update (train/state.py); the guard
                  counts skipped steps and stops the run by `train.nan_policy`: "skip" stops
                  after `train.nan_max_skips` in a row, "stop" at the first (naming the quantity),
                  each with a checkpoint of the last good parameters.
  RunLog          `<workdir>/runs.jsonl`: one line per start, resume (from which step; with the
                  command line and `provenance()`: git commit and dirtiness, package versions,
                  device kind) and exit (finished, signal, NaN stop or error with its last line).
  run_program     a training program's main: config and data errors as one line (exit 2 / 1),
                  the exit code of a stopped run, an error's last line in runs.jsonl.
  Faults          test-only fault injection from the environment (SIGKILL, signals, a NaN).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import json
import os
import pathlib
import signal
import socket
import sys
import threading
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from configs.cli import ConfigError

RUNS_FILE = "runs.jsonl"
CONFIG_FILE = "config.json"

# What must match for a workdir's checkpoints to be this run's: the parameters' shapes and the
# data stream. Everything else (steps, learning rate and schedule, logging / eval / checkpoint
# intervals, mesh, compute dtype, remat, attention kernel, worker count) may change on resume.
IDENTITY = {
    "model": ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
              "head_dim", "max_seq_len", "param_dtype", "norm", "gated_mlp", "activation", "tie_embeddings",
              "position_embedding", "attention_bias", "attention_out_bias", "mlp_bias", "qk_norm", "post_norms",
              "moe", "mla", "peft"),
    "data": ("seq_len", "sources", "tokenizer", "packing", "num_packing_bins", "shuffle_window", "schema",
             "chat_template"),
    "train": ("batch_size", "seed"),
    "optimizer": ("name",),
    "init": ("workdir", "hf_dir", "step"),
    "peft": ("method",),
    "rl": ("algorithm",),
}


class WorkdirMismatch(ConfigError):
    """The workdir's checkpoints were written by a run with another model or data stream."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _normalise(v):
    """JSON round trip: tuples become lists, so a config and its config.json compare equal."""
    return json.loads(json.dumps(v, default=str))


def identity_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """[(dotted field, old value, new value)] for the identity fields (IDENTITY) that differ."""
    out = []
    for section, fields in IDENTITY.items():
        for field in fields:
            a = _flatten(_normalise(old.get(section, {}).get(field)), f"{section}.{field}.")
            b = _flatten(_normalise(new.get(section, {}).get(field)), f"{section}.{field}.")
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    out.append((key, a.get(key), b.get(key)))
    return out


def check_workdir(workdir: pathlib.Path, resolved: Mapping[str, Any], checkpoint_steps: list[int],
                  program: str = "train.pretrain") -> dict[str, Any]:
    """Checks a workdir before the run writes anything in it; returns what it found.

    Raises WorkdirMismatch (one line: the workdir, the differing fields, how to proceed) when
    the workdir has checkpoints of a run whose identity fields differ from `resolved`. Returns
    {"checkpoints": steps, "history_step": the last step in metrics.jsonl or None}.
    """
    workdir = pathlib.Path(workdir)
    found: dict[str, Any] = {"checkpoints": list(checkpoint_steps), "history_step": _last_logged_step(workdir)}
    cfg_file = workdir / CONFIG_FILE
    if checkpoint_steps and cfg_file.is_file():
        try:
            old = json.loads(cfg_file.read_text())
        except json.JSONDecodeError:
            old = None
        if old is not None:
            diffs = identity_differences(old, resolved)
            if diffs:
                shown = ", ".join(f"{k}={_short(a)} (now {_short(b)})" for k, a, b in diffs[:6])
                more = f" and {len(diffs) - 6} more" if len(diffs) > 6 else ""
                raise WorkdirMismatch(
                    f"{workdir} holds checkpoints (steps {_steps_text(checkpoint_steps)}) of a run with {shown}{more}: "
                    f"they cannot continue this config. Use a new --workdir, or start from that run on purpose "
                    f"with `python -m train.sft --config.init.workdir={workdir}`; the workdir is left as it is")
    if not checkpoint_steps and found["history_step"] is not None:
        logging.warning("%s has history (metrics.jsonl up to step %d) but no checkpoint: training starts from "
                        "step 0 and appends to metrics.jsonl (runs.jsonl records this start)",
                        workdir, found["history_step"])
    return found


def _short(v) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 40 else s[:37] + "..."


def _steps_text(steps: list[int]) -> str:
    steps = sorted(steps)
    return ", ".join(map(str, steps)) if len(steps) <= 4 else f"{steps[0]}..{steps[-1]}"


def _last_logged_step(workdir: pathlib.Path) -> int | None:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return None
    last = None
    with path.open() as f:
        for line in f:
            try:
                last = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue
    return last


# --------------------------------------------------------------------------------------------
# Stop requests


class StopRequests:
    """Turns SIGTERM / SIGINT into a stop at the next step boundary (`should_stop(step)`).

    One process: a handler sets a flag. Under jax.distributed the preemption service owns
    SIGTERM (a Python handler installed before it never runs): every process polls
    `multihost_utils.reached_preemption_sync_point(step)`, which is true on all of them at the
    same step. SIGINT is installed explicitly (a process started in the background by a
    non-interactive shell ignores it otherwise); a second signal of either kind exits at once.
    """

    def __init__(self, *, distributed: bool = False):
        self.signum: int | None = None
        self.preempted = False
        self.distributed = distributed
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._previous[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second signal: the user means it
            logging.warning("second %s: exiting now without a checkpoint", signal.Signals(signum).name)
            sys.stderr.flush()
            os._exit(128 + signum)
        self.signum = signum
        logging.warning("%s received: stopping at the next step boundary with a checkpoint (send it again to exit "
                        "at once)", signal.Signals(signum).name)

    def should_stop(self, step: int) -> bool:
        if self.signum is not None:
            return True
        if self.distributed:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.preempted = True
                return True
        return False

    @property
    def reason(self) -> str:
        if self.signum is not None:
            return signal.Signals(self.signum).name
        return "preemption" if self.preempted else ""

    @property
    def exit_code(self) -> int:
        """128 + the signal's number (143 for SIGTERM, 130 for SIGINT; preemption counts as SIGTERM)."""
        return 128 + (self.signum or signal.SIGTERM)

    def close(self):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}


# --------------------------------------------------------------------------------------------
# runs.jsonl


class RunLog:
    """Appends one JSON line per event to `<workdir>/runs.jsonl` (process 0 only)."""

    def __init__(self, workdir: pathlib.Path, *, enabled: bool = True):
        self.path = pathlib.Path(workdir) / RUNS_FILE
        self.enabled = enabled

    def event(self, event: str, **fields) -> None:
        if not self.enabled:
            return
        record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "event": event, **fields, "host": socket.gethostname(), "pid": os.getpid()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def command_line() -> str:
    """This process's command as typed: `python -m <module> args...` for a module run with -m."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = f"python -m {spec.name}" if spec is not None and spec.name else f"python {sys.argv[0]}"
    return " ".join([program, *sys.argv[1:]])


PROVENANCE_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "sentencepiece")


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """Where a run's numbers come from, for its runs.jsonl start / resume line: the code's git
    commit and whether the tree had uncommitted changes (None outside a git checkout), the
    package versions, Python, and the devices the run sees."""
    import importlib.metadata
    import platform
    import subprocess

    repo = pathlib.Path(__file__).resolve().parents[1]

    def git(*args):
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    versions = {}
    for name in PROVENANCE_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    devices = jax.devices()
    return {"git_commit": commit, "git_dirty": None if status is None else bool(status), "versions": versions,
            "python": platform.python_version(), "device_kind": devices[0].device_kind,
            "platform": devices[0].platform, "device_count": len(devices), "process_count": jax.process_count()}


def write_run_files(workdir: pathlib.Path, resolved: Mapping[str, Any], files: Mapping[str, Any] | None = None, *,
                    enabled: bool = True) -> None:
    """The run's `config.json` (the resolved config) and the files it carries ({relative name:
    source path}, e.g. the base's tokenizer; copied once), written by process 0 (`enabled`)."""
    import shutil

    workdir.mkdir(parents=True, exist_ok=True)
    if not enabled:
        return
    (workdir / "config.json").write_text(json.dumps(resolved, indent=2, default=str))
    for name, src in (files or {}).items():
        if not (workdir / name).is_file():
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, workdir / name)


def open_metrics(workdir: pathlib.Path, steps: int, start: int, resumed: bool, runlog: RunLog, ckpt, *,
                 enabled: bool = True, **event: Any):
    """The MetricsWriter of a run starting at `start` (logging its start or resume event with
    `event`'s fields), or None when a resumed run is already complete (the exit is logged and the
    checkpointer closed: the program returns `already_complete(start)`)."""
    from train.metrics import MetricsWriter

    if start >= steps and resumed:
        logging.info("run in %s is already complete (step %d of %d)", workdir, start, steps)
        runlog.event("exit", reason="already complete", step=start)
        ckpt.close()
        return None
    writer = MetricsWriter(workdir, total_steps=steps, enabled=enabled, resume_step=start)
    runlog.event("resume" if resumed else "start", step=start, steps=steps, command=command_line(), **event,
                 **provenance())
    return writer


def already_complete(step: int) -> dict[str, Any]:
    """What a program returns for a run that was already complete."""
    return {"step": step, "resumed_from": step, "complete": True, "exit_code": 0}


def last_line(e: BaseException) -> str:
    """An exception as one line: `Type: message` (its first line)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


@contextlib.contextmanager
def config_errors():
    """Validation code inside raises ValueError / TypeError / FileNotFoundError (a configured path
    that is not there): they become ConfigError (one line)."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise ConfigError(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from e


def run_program(run, config, workdir) -> int:
    """Runs `run(config, workdir)` as a training program's main and returns its exit code.

    A ConfigError (bad value, mismatched workdir) is one line on stderr and exit 2; a data error
    (a source with no usable document, a corrupt file under `strict`) one line and exit 1; any
    other exception propagates with its traceback. Whatever ends a started run is recorded in
    runs.jsonl (a refused start too, in a workdir that already holds a run).
    """
    from data.sources import DataError, EmptySourceError

    workdir = pathlib.Path(workdir)
    had_run = (workdir / CONFIG_FILE).is_file()

    def record(event: str, **fields):  # only in a workdir that holds a run (a failed start creates nothing)
        if jax.process_index() == 0 and (workdir / CONFIG_FILE).is_file():
            RunLog(workdir).event(event, **fields)

    try:
        summary = run(config, workdir)
    except ConfigError as e:  # raised before the run writes anything
        print(f"error: {str(e).strip()}", file=sys.stderr)
        if had_run:
            record("refused", reason="config error", error=last_line(e))
        return 2
    except (EmptySourceError, DataError) as e:
        print(f"error: {str(e).strip()}", file=sys.stderr)
        record("exit", reason="data error", error=last_line(e))
        return 1
    except BaseException as e:
        record("exit", reason="error", error=last_line(e))
        raise
    if summary.get("message"):
        print(f"error: {summary['message']}", file=sys.stderr)
    return int(summary.get("exit_code", 0))


# --------------------------------------------------------------------------------------------
# The NaN guard


class NanGuard:
    """Counts the steps whose update the train step refused (non-finite loss or gradient norm;
    `metrics["nonfinite"]`) and decides when the run stops.

    `observe(metrics)` (every step, on device) zeroes the refused steps' loss-like metrics so a
    log line's means cover the good steps only (`good_steps` counts them) and tracks the longest
    run of consecutive refusals. `verdict(step)` is None, or why the run stops: policy "stop"
    reads the step's flag every step (one host sync per step), "skip" checks the run length at
    log lines.
    """

    POLICIES = ("skip", "stop")
    MASKED = ("loss", "grad_norm", "accuracy", "z_loss")  # averaged over the good steps only

    def __init__(self, policy: str, max_skips: int):
        if policy not in self.POLICIES:
            raise ConfigError(f"train.nan_policy={policy!r} is not valid: expected one of {self.POLICIES}")
        if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 1:
            raise ConfigError(f"train.nan_max_skips={max_skips!r} is not valid: expected an integer >= 1")
        self.policy, self.max_skips = policy, max_skips
        self._streak = self._longest = jnp.zeros((), jnp.int32)
        self._last = None

    def observe(self, metrics: dict) -> dict:
        self._last = {k: metrics[k] for k in ("loss", "grad_norm", "nonfinite")}
        out, self._streak, self._longest = _observe(metrics, self._streak, self._longest)
        return out

    def verdict(self, step: int, *, at_log_line: bool) -> dict[str, Any] | None:
        if self.policy == "stop":
            last = jax.device_get(self._last)
            if last["nonfinite"]:
                what = "loss" if not np.isfinite(last["loss"]) else "gradient norm"
                value = last["loss"] if what == "loss" else last["grad_norm"]
                return {"reason": "non-finite", "exit_code": 1, "quantity": what,
                        "message": f"{what} is {value} at step {step} (train.nan_policy=stop): the update was "
                                   f"not applied; stopped with a checkpoint of the last good parameters"}
            return None
        if at_log_line:
            longest = int(jax.device_get(self._longest))
            if longest >= self.max_skips:
                return {"reason": "non-finite", "exit_code": 1, "skipped_in_a_row": longest,
                        "message": f"{longest} steps in a row had a non-finite loss or gradient norm (by step "
                                   f"{step}; train.nan_max_skips={self.max_skips}): stopped with a checkpoint of "
                                   f"the last good parameters; lower optimizer.lr or check the data"}
            self._longest = self._streak
        return None


@jax.jit
def _observe(metrics: dict, streak, longest):
    """One dispatch per step: the masked metrics, `good_steps`, and the run-length counters."""
    bad = metrics["nonfinite"]
    streak = jnp.where(bad > 0, streak + 1, 0)
    out = {k: (jnp.where(bad > 0, 0.0, v) if k in NanGuard.MASKED else v) for k, v in metrics.items()}
    out["good_steps"] = 1.0 - bad
    return out, streak, jnp.maximum(longest, streak)


# --------------------------------------------------------------------------------------------
# Fault injection (tests)


class Faults:
    """Test-only faults from the environment, acting at a step (the update that makes step k):
      LOOM_FAULT_KILL_AFTER_STEP=k      SIGKILL after step k (checkpoints written so far land)
      LOOM_FAULT_SIGNAL_AFTER_STEP=k:N  send this process signal N after step k
      LOOM_FAULT_NAN_AT_STEP=k[,k2..]   step k's batch gets a NaN loss mask (loss and gradients NaN)
    """

    def __init__(self, kill_after: int = -1, signal_after: tuple[int, int] | None = None,
                 nan_at: tuple[int, ...] = ()):
        self.kill_after, self.signal_after, self.nan_at = kill_after, signal_after, set(nan_at)

    @classmethod
    def from_env(cls) -> Faults:
        env = os.environ
        sig = env.get("LOOM_FAULT_SIGNAL_AFTER_STEP")
        return cls(kill_after=int(env.get("LOOM_FAULT_KILL_AFTER_STEP", "-1")),
                   signal_after=tuple(int(x) for x in sig.split(":")) if sig else None,
                   nan_at=tuple(int(x) for x in env.get("LOOM_FAULT_NAN_AT_STEP", "").split(",") if x))

    def corrupt(self, batch: dict, step: int) -> dict:
        if step in self.nan_at:  # the loss mask, whatever its shape suffix (pair batches: loss_mask_BCT)
            batch = {k: v * np.float32("nan") if k.startswith("loss_mask") else v for k, v in batch.items()}
        return batch

    def after_step(self, step: int, ckpt) -> None:
        if step == self.kill_after:
            ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        if self.signal_after and step == self.signal_after[0]:
            os.kill(os.getpid(), self.signal_after[1])


def program_main(run, default_config: str) -> None:
    """The command line of a training program: `python -m train.<program> --config=FILE:PRESET
    [--config.x=y ...] [--workdir=W]` (default workdir runs/<config name>), run through
    `run_program`. Call it under `if __name__ == "__main__":`, so the flags exist only when the
    module runs as a program (tests and other programs import `run` freely)."""
    from absl import app, flags
    from ml_collections import config_flags

    from configs.cli import parse_flags, quiet_library_logs

    config_flag = config_flags.DEFINE_config_file("config", default_config, "Experiment config (file:preset).")
    workdir_flag = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<preset>).")

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; everything is set through --config.*")
        quiet_library_logs()
        config = config_flag.value
        sys.exit(run_program(run, config, workdir_flag.value or os.path.join("runs", config.name)))

    app.run(main, flags_parser=parse_flags)
