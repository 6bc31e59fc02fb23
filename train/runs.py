"""The start of a fine-tuning program's run, shared by the preference programs (rl/reward.py,
rl/dpo.py) and written so train/sft.py can use it as well: prepare the workdir (refuse another
run's, write config.json and the base's tokenizer files), then resume from the newest checkpoint
or start, opening metrics.jsonl and recording the start in runs.jsonl.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import jax

from models.checkpoint import committed_steps
from train import lifecycle
from train.metrics import MetricsWriter


def prepare_workdir(workdir: pathlib.Path, resolved: dict, tokenizer_files: dict, *, program: str) -> None:
    """Refuses a workdir holding another run's checkpoints (train/lifecycle.py), then writes
    config.json and the files of `tokenizer_files` ({name in the workdir: source}) not there yet
    (process 0)."""
    lifecycle.check_workdir(workdir, resolved, committed_steps(workdir), program=program)
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(json.dumps(resolved, indent=2, default=str))
        for name, src in tokenizer_files.items():
            if not (workdir / name).is_file():
                (workdir / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, workdir / name)


def resume(ckpt, state, data_iter, runlog: lifecycle.RunLog, *, workdir, steps: int, **start_fields: Any):
    """(state, start step, MetricsWriter): the newest readable checkpoint's state (the data
    iterator restored in place) or `state` itself, with a `start` / `resume` line in runs.jsonl
    (`start_fields` added); None, the checkpointer closed, when the workdir's run is already
    complete."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored = ckpt.restore(abstract, data_iter)
    state = restored if restored is not None else state
    start = int(jax.device_get(state.step))
    if start >= steps and restored is not None:
        runlog.event("exit", reason="already complete", step=start)
        ckpt.close()
        return None
    writer = MetricsWriter(workdir, total_steps=steps, enabled=jax.process_index() == 0, resume_step=start)
    runlog.event("resume" if restored is not None else "start", step=start, steps=steps,
                 command=lifecycle.command_line(), **start_fields)
    return state, start, writer
