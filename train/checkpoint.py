"""Checkpoints of the whole train state plus the data iterator (orbax CheckpointManager).

Layout (see models/checkpoint.py): `<workdir>/checkpoints/<step>/{params,train_state,data_iter}`.
Saving is asynchronous (training continues while the files are written) and keeps the newest
`max_to_keep`. Restoring walks back from the newest step: a checkpoint that fails to load is
reported, set aside as `checkpoints/unreadable-<step>` (kept for inspection, no longer counted
towards `max_to_keep`, so it cannot push out a good one) and the previous one is used, so a
crash mid-write never strands a run. When no checkpoint restores, nothing is set aside and the
error names each one (a run whose checkpoints do not fit its config is stopped earlier, by
train/lifecycle.py's workdir check).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from models.checkpoint import PARAMS, checkpoints_dir, restore_newest
from train.state import TrainState

TRAIN_STATE, DATA_ITER = "train_state", "data_iter"
UNREADABLE = "unreadable-"  # prefix of a step directory set aside because it failed to restore


def _data_args(data_iter, *, save: bool):
    if hasattr(data_iter, "shard_states"):  # data.pipeline.ShardedBatches: one state per data shard
        return DataShardsSave(data_iter) if save else DataShardsRestore(data_iter)
    return grain.checkpoint.CheckpointSave(data_iter) if save else grain.checkpoint.CheckpointRestore(data_iter)


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
            items[DATA_ITER] = _data_args(data_iter, save=True)
        if step in self.manager.all_steps():
            logging.warning("a checkpoint of step %d already exists in %s: kept, not overwritten", step, self.directory)
            return False
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, target: TrainState, data_iter=None) -> TrainState | None:
        """The newest readable checkpoint into `target`'s shardings (and `data_iter` in place); None
        when there is no checkpoint; RuntimeError when none of them is readable."""

        def restore_step(step: int) -> TrainState:
            items = {PARAMS: ocp.args.StandardRestore(target.params),
                     TRAIN_STATE: ocp.args.StandardRestore({"step": target.step, "opt_state": target.opt_state,
                                                            "rng": target.rng})}
            if data_iter is not None:
                items[DATA_ITER] = _data_args(data_iter, save=False)
            r = self.manager.restore(step, args=ocp.args.Composite(**items))
            ts = r[TRAIN_STATE]
            if int(jax.device_get(ts["step"])) != step:
                raise ValueError(f"checkpoint directory {step} holds step {int(ts['step'])}")
            return TrainState(step=ts["step"], params=r[PARAMS], opt_state=ts["opt_state"], rng=ts["rng"])

        steps = self.manager.all_steps()
        if not steps:
            return None
        state, step = restore_newest(steps, restore_step, where=self.directory)
        unreadable = [s for s in steps if s > step]
        if unreadable:
            self._set_aside(unreadable)
        logging.info("restored step %d from %s", step, self.directory)
        return state

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unreadable step directories to `unreadable-<step>` (process 0, after every
        process has tried them), so they neither count as checkpoints nor block a new save."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("loom_checkpoint_set_aside")
        if jax.process_index() == 0:
            for step in steps:
                target = self.directory / f"{UNREADABLE}{step}"
                n = 1
                while target.exists():
                    n += 1
                    target = self.directory / f"{UNREADABLE}{step}.{n}"
                (self.directory / str(step)).rename(target)
                logging.warning("set the unreadable checkpoint of step %d aside as %s (not counted towards "
                                "train.keep_checkpoints; delete it once inspected)", step, target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("loom_checkpoint_set_aside_done")
        self.manager.reload()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


# --------------------------------------------------------------------------------------------
# Data iterator state, one file per data shard (restorable onto another number of processes)


class DataShardsHandler(ocp.CheckpointHandler):
    """Saves `ShardedBatches.shard_states()` as `shard_<id>.json`, each process its own shards."""

    def save(self, directory, args):
        directory = pathlib.Path(directory)
        for shard, state in args.item.shard_states().items():
            (directory / f"shard_{shard}.json").write_text(json.dumps(state))

    def restore(self, directory, args):
        directory = pathlib.Path(directory)
        states = {}
        for shard in args.item.shard_ids:
            f = directory / f"shard_{shard}.json"
            if not f.is_file():
                have = sorted(p.name for p in directory.glob("shard_*.json"))
                raise FileNotFoundError(f"{f} is missing (the checkpoint has {have}): data.num_shards must match "
                                        "the run that saved it")
            states[shard] = json.loads(f.read_text())
        args.item.set_shard_states(states)
        return args.item

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataShardsHandler, for_save=True)
@dataclasses.dataclass
class DataShardsSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataShardsHandler, for_restore=True)
@dataclasses.dataclass
class DataShardsRestore(ocp.args.CheckpointArgs):
    item: Any


def saved_data_shards(workdir, step: int) -> int:
    """How many data shards the checkpoint at `step` holds (0 if none)."""
    return len(list((checkpoints_dir(workdir) / str(step) / DATA_ITER).glob("shard_*.json")))
