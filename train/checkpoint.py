"""Checkpoints of the whole train state plus the data iterator (orbax CheckpointManager).

Layout (see models/checkpoint.py): `<workdir>/checkpoints/<step>/{params,train_state,data_iter}`.
Saving is asynchronous (training continues while the files are written) and keeps the newest
`max_to_keep`. Restoring walks back from the newest step: a checkpoint that fails to load is
reported and the previous one is used, so a crash mid-write never strands a run.
"""

from __future__ import annotations

import logging
import pathlib

import grain
import jax
import orbax.checkpoint as ocp

from models.checkpoint import PARAMS, checkpoints_dir
from train.state import TrainState

TRAIN_STATE, DATA_ITER = "train_state", "data_iter"


class Checkpointer:
    def __init__(self, workdir: str | pathlib.Path, *, max_to_keep: int = 3, async_save: bool = True):
        self.directory = checkpoints_dir(workdir)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, state: TrainState, data_iter=None, *, force: bool = False) -> bool:
        step = int(jax.device_get(state.step))
        items = {PARAMS: ocp.args.StandardSave(state.params),
                 TRAIN_STATE: ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state,
                                                     "rng": state.rng})}
        if data_iter is not None:
            items[DATA_ITER] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, target: TrainState, data_iter=None) -> TrainState | None:
        """The newest readable checkpoint into `target`'s shardings (and `data_iter` in place), or None."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            items = {PARAMS: ocp.args.StandardRestore(target.params),
                     TRAIN_STATE: ocp.args.StandardRestore({"step": target.step, "opt_state": target.opt_state,
                                                            "rng": target.rng})}
            if data_iter is not None:
                items[DATA_ITER] = grain.checkpoint.CheckpointRestore(data_iter)
            try:
                r = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001  (any failure: fall back to the previous step)
                logging.warning("checkpoint at step %d in %s is unreadable (%s: %s); trying the previous one",
                                step, self.directory, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                continue
            ts = r[TRAIN_STATE]
            if int(jax.device_get(ts["step"])) != step:
                logging.warning("checkpoint directory %d holds step %d; skipping it", step, int(ts["step"]))
                continue
            logging.info("restored step %d from %s", step, self.directory)
            return TrainState(step=ts["step"], params=r[PARAMS], opt_state=ts["opt_state"], rng=ts["rng"])
        return None

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
