"""The step loop every training program runs (pretraining, SFT, and RL as it lands).

A program builds its parts (state, jitted step, data, evaluation) and calls `run_steps`; the
loop, top to bottom: for each step take a batch, step, accumulate metrics on the device; every
`log_every` steps write a train line; every `eval_every` evaluate; every `checkpoint_every`
save; stop at a step boundary for a signal, a preemption notice or the NaN guard (saving a
checkpoint). At the end: a final evaluation and checkpoint, `loss.png`. The programs differ in
their data, loss and evaluation, not in this.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from train import lifecycle


@dataclasses.dataclass
class Parts:
    """What `run_steps` needs from a program.

    `next_batch()` returns (device batch, device stats): the stats (e.g. tokens per source,
    padding) are summed over a log interval on the device; `summed` names those logged as
    interval totals, the rest are per-step means, and `source_tokens` (an array with one count per
    `source_names` entry) becomes `tokens_<name>` when there are several sources.
    `evaluate(state)` returns the held-out metrics ({} when there is nothing to evaluate).
    `frozen` goes to every step (parameter-efficient fine-tuning's base), or None.
    """

    tc: Any  # the config's `train` section
    state: Any
    start: int
    train_step: Callable
    next_batch: Callable[[], tuple[dict, dict]]
    ckpt: Any
    data_iter: Any
    writer: Any
    runlog: Any
    guard: lifecycle.NanGuard
    schedule: Callable[[int], Any]
    evaluate: Callable[[Any], dict[str, float]]
    tokens_per_step: int
    flops_per_token: float
    peak_flops: float
    source_names: tuple[str, ...] = ()
    summed: tuple[str, ...] = ()
    frozen: Any = None
    workdir: Any = None


def _scaled(v, n):
    """A summed metric over n: a float, or a list for an array metric (e.g. MoE's per-expert load)."""
    a = np.asarray(v, np.float64) / n
    return float(a) if a.ndim == 0 else a.tolist()


def run_steps(p: Parts) -> tuple[Any, dict[str, Any]]:
    """(final state, outcome): outcome has `step`, `complete`, `exit_code`, the evaluations'
    `initial_eval_loss` / `final_eval_loss` / `final_eval_*`, `final_train_loss`, and for a stopped
    run `reason` (and `message`). The last checkpoint is saved and the checkpointer closed."""
    tc, state, writer = p.tc, p.state, p.writer
    faults = lifecycle.Faults.from_env()
    outcome: dict[str, Any] = {"resumed_from": p.start}
    last_eval = -1
    if p.start == 0 and tc.eval_every > 0:
        ev = p.evaluate(state)
        if ev:
            writer.write(0, ev)
            writer.progress(0, ev)
            outcome["initial_eval_loss"] = ev.get("eval_loss")
            last_eval = 0

    stops = lifecycle.StopRequests(distributed=jax.process_count() > 1)
    last_t, last_step = time.perf_counter(), p.start
    running, stopped, done, metrics = None, None, p.start, None

    def log_line(done: int) -> dict[str, float]:
        """Writes the train line of the steps since the previous one."""
        nonlocal running, last_t, last_step
        host = jax.device_get(running)
        running = None
        per_source = host.pop("source_tokens", None)
        steps, good, skipped = done - last_step, float(host.pop("good_steps")), float(host.pop("nonfinite"))
        # loss, accuracy and grad norm are means over the interval's good steps (None if it has none)
        m = {k: (_scaled(v, good) if good else None) if k in lifecycle.NanGuard.MASKED
             else _scaled(v, 1) if k in p.summed else _scaled(v, steps) for k, v in host.items()}
        now = time.perf_counter()
        tps = steps * p.tokens_per_step / (now - last_t)
        last_t, last_step = now, done
        line = {"loss": m.pop("loss"), "lr": float(p.schedule(done - 1)), "grad_norm": m.pop("grad_norm"),
                "tokens_per_sec": tps, "mfu": tps * p.flops_per_token / p.peak_flops,
                "accuracy": m.pop("accuracy")}
        z = m.pop("z_loss", None)
        m.pop("num_tokens", None)
        line.update(m)
        if per_source is not None and len(p.source_names) > 1:  # tokens per source over the interval
            line.update({f"tokens_{name}": float(c) for name, c in zip(p.source_names, per_source)})
        if getattr(tc, "z_loss", 0.0):  # a training config without z-loss (preference programs) has no field
            line["z_loss"] = z
        if skipped:
            line["skipped_steps"] = skipped
        writer.write(done, line)
        writer.progress(done, line)
        return line

    try:
        for step in range(p.start, tc.steps):
            batch, stats = p.next_batch()
            batch = faults.corrupt(batch, step + 1)
            if p.frozen is None:
                state, metrics = p.train_step(state, batch)
            else:
                state, metrics = p.train_step(state, batch, p.frozen)
            metrics = p.guard.observe(dict(metrics, **stats))
            # sums stay on the device: no host sync between log lines (the `stop` policy syncs)
            running = metrics if running is None else jax.tree.map(jnp.add, running, metrics)
            done = step + 1
            if done % tc.log_every == 0 or done == tc.steps:
                log_line(done)
            stopped = p.guard.verdict(done, at_log_line=done % tc.log_every == 0)
            if stopped:
                break
            if tc.eval_every > 0 and done % tc.eval_every == 0 and done != tc.steps:
                jax.block_until_ready(state)  # the steps dispatched so far are training time
                eval_start = time.perf_counter()
                ev = p.evaluate(state)
                if ev:
                    writer.write(done, ev)
                    writer.progress(done, ev)
                    last_eval = done
                    writer.plot()
                # the next line's interval keeps its steps but not this time: tokens_per_sec is training throughput
                last_t += time.perf_counter() - eval_start
            if tc.checkpoint_every > 0 and done % tc.checkpoint_every == 0 and done != tc.steps:
                p.ckpt.save(state, p.data_iter)
            faults.after_step(done, p.ckpt)
            if stops.should_stop(done):
                stopped = {"reason": stops.reason, "exit_code": stops.exit_code}
                break
    finally:
        stops.close()

    if stopped:  # a signal, a preemption notice or the NaN guard: keep every step done so far
        if running is not None:
            log_line(done)
        p.ckpt.save(state, p.data_iter, force=True)
        p.ckpt.close()
        writer.plot()
        p.runlog.event("exit", step=done, **{k: v for k, v in stopped.items() if k != "exit_code"})
        logging.warning("stopped at step %d of %d (%s); checkpoint saved in %s: re-run the same command to "
                        "resume", done, tc.steps, stopped.get("message", stopped["reason"]), p.workdir)
        return state, {**outcome, "step": done, "complete": False, **stopped}

    if last_eval != tc.steps:
        ev = p.evaluate(state)
        if ev:
            writer.write(tc.steps, ev)
            writer.progress(tc.steps, ev)
            outcome.update({f"final_{k}": v for k, v in ev.items()})
    p.ckpt.save(state, p.data_iter, force=True)
    p.ckpt.close()
    writer.plot()
    outcome.update(step=tc.steps, complete=True, exit_code=0)
    if metrics is not None:
        outcome["final_train_loss"] = float(jax.device_get(metrics["loss"]))
    return state, outcome
