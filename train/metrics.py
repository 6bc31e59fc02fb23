"""Run outputs: metrics.jsonl, TensorBoard events, a progress line with rate and ETA, loss.png.

Only process 0 writes. metrics.jsonl is only ever appended to: a run that resumes at step s (or
starts again from 0 over an earlier history) first writes a marker line `{"step": s, "event":
"resume"}`, and `read_metrics` reads the file as the current run's history: lines of earlier
attempts past a later marker's step are superseded, nothing is deleted from the file.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import time
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from configs.cli import format_duration

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.1f}"


def batch_stats(source_BT, loss_mask_BT, num_sources: int):
    """(real tokens per source [num_sources] float32, padding fraction) of a batch, for the train lines.

    `source_BT` holds each position's source index in the data mixture (-1 on padding; see
    data/pipeline.py) and `loss_mask_BT` is 1.0 where a position has a target: a source's count
    is its loss-bearing tokens; the padding fraction is the share of positions without a target.
    jit it with `num_sources` fixed; given global arrays it counts the global batch.
    """
    idx = jnp.where(source_BT >= 0, source_BT, num_sources).reshape(-1)
    counts = jnp.zeros((num_sources,), jnp.float32).at[idx].add(loss_mask_BT.reshape(-1), mode="drop")
    return counts, 1.0 - loss_mask_BT.mean()


def read_metrics(workdir: str | pathlib.Path, *, raw: bool = False) -> list[dict[str, Any]]:
    """The run's metrics lines in order: its current history (see the module doc), or with
    `raw=True` every line of the file, markers and superseded attempts included."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:  # a line cut by a crash mid-write
            continue
    if raw:
        return lines
    current: list[dict[str, Any]] = []
    for m in lines:
        if m.get("event") == "resume":
            current = [c for c in current if c.get("step", 0) < m["step"]
                       or (c.get("step", 0) == m["step"] and m["step"] > 0)]
        else:
            current.append(m)
    return current


def _json_value(v):
    """A metric as JSON: a float, a (nested) list for an array metric, or None."""
    if v is None:
        return None
    a = np.asarray(v, np.float64)
    return float(a) if a.ndim == 0 else a.tolist()


def _rows(name: str, a: np.ndarray):
    """A 1-D array metric as itself; each row of a 2-D one as `name/i` (e.g. per-layer expert load)."""
    if a.ndim == 1:
        return [(name, a)]
    return [(f"{name}/{i}", row) for i, row in enumerate(a.reshape(a.shape[0], -1))]


def _write_bins(tb, name: str, values: np.ndarray, step: int) -> None:
    """A TensorBoard histogram whose bin i (covering [i - 0.5, i + 0.5)) has height values[i]:
    a per-index quantity drawn over its index, e.g. the share of tokens each expert receives."""
    idx = np.arange(len(values), dtype=np.float64)
    total = float(values.sum())
    tb.add_histogram_raw(name, min=0.0, max=float(len(values) - 1), num=total, sum=float((idx * values).sum()),
                         sum_squares=float((idx * idx * values).sum()), bucket_limits=(idx + 0.5).tolist(),
                         bucket_counts=values.tolist(), global_step=step)


class MetricsWriter:
    def __init__(self, workdir: str | pathlib.Path, *, total_steps: int, enabled: bool = True,
                 resume_step: int = 0, tensorboard: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.total_steps = total_steps
        self.enabled = enabled
        self.path = self.workdir / METRICS_FILE
        self._tb = None
        self._last_time, self._last_step = time.perf_counter(), resume_step
        self._rate = float("nan")
        if not enabled:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size:  # earlier attempts' lines stay; later ones supersede
            with self.path.open("a") as f:
                f.write(json.dumps({"step": int(resume_step), "event": "resume"}) + "\n")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self.workdir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step)}
        record.update({k: _json_value(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if v is None:
                    continue
                a = np.asarray(v, np.float64)
                if a.ndim == 0:
                    if np.isfinite(a):
                        self._tb.add_scalar(k, float(a), int(step))
                elif np.isfinite(a).all():
                    for name, row in _rows(k, a):
                        _write_bins(self._tb, name, row, int(step))

    def progress(self, step: int, metrics: Mapping[str, float]) -> str:
        """One log line: step, loss, throughput, MFU, rate and ETA."""
        now = time.perf_counter()
        if step > self._last_step:  # steps/s over the latest interval (compilation shows only at first)
            self._rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
            self._last_time, self._last_step = now, step
        rate = self._rate
        eta = (self.total_steps - step) / rate if rate > 0 else float("nan")
        parts = [f"step {step}/{self.total_steps}"]
        for key, fmt in (("loss", "loss {:.4f}"), ("eval_loss", "eval_loss {:.4f}"), ("eval_ppl", "eval_ppl {:.2f}"),
                         ("grad_norm", "|g| {:.3f}"), ("lr", "lr {:.2e}")):
            if metrics.get(key) is not None:
                parts.append(fmt.format(metrics[key]))
        if metrics.get("tokens_per_sec") is not None:
            parts.append(f"{_si(metrics['tokens_per_sec'])} tok/s")
        if metrics.get("mfu") is not None:
            parts.append(f"MFU {100 * metrics['mfu']:.1f}%")
        parts.append(f"{rate:.2f} step/s" if math.isfinite(rate) else "- step/s")
        parts.append(f"ETA {format_duration(eta)}")
        line = " | ".join(parts)
        if self.enabled:
            logging.info("%s", line)
        return line

    def plot(self) -> pathlib.Path | None:
        """loss.png: training loss and held-out loss against step."""
        if not self.enabled:
            return None
        return plot_losses(self.workdir)

    def close(self):
        if self._tb is not None:
            self._tb.close()


def plot_losses(workdir: str | pathlib.Path) -> pathlib.Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    train = [(m["step"], m["loss"]) for m in records if m.get("loss") is not None]
    evals = [(m["step"], m["eval_loss"]) for m in records if m.get("eval_loss") is not None]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss", lw=1.5, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(pathlib.Path(workdir).resolve().name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = pathlib.Path(workdir) / LOSS_PLOT
    fig.savefig(out)
    plt.close(fig)
    return out
