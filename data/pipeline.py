"""grain pipelines from documents to packed, batched language-modelling rows.

document text -> [bos] + tokens + [eos] -> (inputs = ids[:-1], targets = ids[1:]) per document
-> concatenate and split into rows of `seq_len` (a document longer than a row continues in the
next row as a new segment; nothing is dropped) -> optional window shuffle of rows -> batches.

Every row carries the batch format of DESIGN.md: `inputs_BT`, `targets_BT`, `positions_BT`
(restarting at 0 for each segment), `segment_ids_BT` (1, 2, ... per segment; 0 = padding) and
`loss_mask_BT` (1.0 on real targets). Targets never cross a document boundary, because the
shift happens per document before packing.

Each JAX process reads only its slice of the documents (`shard_index::shard_count`) and yields
its local part of the global batch; iterators are grain `DatasetIterator`s whose state is
checkpointed with the train state, so a resumed run repeats and skips nothing.
"""

from __future__ import annotations

from typing import Sequence

import grain
import numpy as np

from data.tokenizer import Tokenizer

BATCH_KEYS = ("inputs_BT", "targets_BT", "positions_BT", "segment_ids_BT", "loss_mask_BT")


class TokenizeDocument:
    """text -> {"inputs": ids[:-1], "targets": ids[1:]} with bos/eos added. Picklable."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        ids = np.asarray([self.tokenizer.bos_id] + self.tokenizer.encode(text) + [self.tokenizer.eos_id],
                         np.int32)
        return {"inputs": ids[:-1], "targets": ids[1:]}


def to_batch_format(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain packer output (`inputs`, `inputs_segment_ids`, ...) -> the `*_BT` batch keys."""
    seg = row["inputs_segment_ids"].astype(np.int32)
    return {
        "inputs_BT": row["inputs"].astype(np.int32),
        "targets_BT": row["targets"].astype(np.int32),
        "positions_BT": row["inputs_positions"].astype(np.int32),
        "segment_ids_BT": seg,
        "loss_mask_BT": (row["targets_segment_ids"] != 0).astype(np.float32),
    }


class _JsonSafeConcatState(grain.IterDataset):
    """Makes a ConcatThenSplit iterator restorable from a state that went through JSON.

    grain (0.2.18) compares the remainder slices of its concat-then-split state with the tuple
    (-1, -1); a checkpoint stores JSON, which gives back lists, so a state taken before the
    first split (e.g. at the start of the first shuffle window) restored the wrong rows. This
    converts the slices back to tuples before handing the state to grain.
    """

    def __iter__(self):
        return _JsonSafeConcatIterator(self._parent.__iter__())


class _JsonSafeConcatIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        state = dict(state)
        if "remainder_slices" in state:
            state["remainder_slices"] = {k: tuple(v) for k, v in state["remainder_slices"].items()}
        self._parent.set_state(state)


def packed_rows(texts: Sequence[str], tokenizer: Tokenizer, *, seq_len: int, seed: int = 0,
                shuffle: bool = True, repeat: bool = True, shard_index: int = 0, shard_count: int = 1,
                shuffle_window: int = 0) -> grain.IterDataset:
    """An IterDataset of packed rows (dicts of [seq_len] arrays) for this shard."""
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if len(texts) < shard_count:
        raise ValueError(f"{len(texts)} documents cannot be split over {shard_count} shards")
    ds = grain.MapDataset.source(list(texts))[shard_index::shard_count]
    if shuffle:
        ds = ds.shuffle(seed=seed)  # before repeat: a fresh order every epoch
    if repeat:
        ds = ds.repeat(None)
    it = ds.map(TokenizeDocument(tokenizer)).to_iter_dataset()
    it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"inputs": seq_len, "targets": seq_len})
    it = _JsonSafeConcatState(it)
    if shuffle and shuffle_window > 1:
        it = grain.experimental.WindowShuffleIterDataset(it, window_size=shuffle_window, seed=seed + 1)
    return it.map(to_batch_format)


def batches(texts: Sequence[str], tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
            shuffle: bool = True, repeat: bool = True, shard_index: int = 0, shard_count: int = 1,
            shuffle_window: int = 0, num_workers: int = 0, drop_remainder: bool = True) -> grain.IterDataset:
    """Batches of `batch_size` rows (this process's part of the global batch)."""
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    it = packed_rows(texts, tokenizer, seq_len=seq_len, seed=seed, shuffle=shuffle, repeat=repeat,
                     shard_index=shard_index, shard_count=shard_count, shuffle_window=shuffle_window)
    it = it.batch(batch_size, drop_remainder=drop_remainder)
    if num_workers > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


def padding_fraction(batch: dict[str, np.ndarray]) -> float:
    return float(1.0 - np.mean(batch["loss_mask_BT"]))
