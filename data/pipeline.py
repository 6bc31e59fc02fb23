"""grain pipelines from documents to packed, batched language-modelling rows.

    records of each source (data/sources.py), this process's shard
    -> tokenize: [bos] + tokens + [eos]; inputs = ids[:-1], targets = ids[1:] per document,
       so no target ever crosses a document boundary
    -> mix the sources by weight (deterministic interleave in exact proportions)
    -> pack into rows of `seq_len`:
         "concat"    concatenate and split: no padding; a long document continues in the next
                     row as a new segment
         "best_fit"  documents cut into pieces of at most `seq_len`, each piece placed in the
                     open row it fills most tightly (grain's best-fit over `num_packing_bins`
                     rows): documents stay whole where they fit, at the price of some padding
         "first_fit" the same with the first open row that fits (more padding; a baseline)
       either way nothing is dropped
    -> window shuffle of rows -> batches -> optional worker processes (grain `mp_prefetch`).

Rows carry the batch format of DESIGN.md: `inputs_BT`, `targets_BT`, `positions_BT`
(restarting at 0 for each segment), `segment_ids_BT` (1, 2, ... per segment; 0 = padding) and
`loss_mask_BT` (1.0 on real targets; where documents carry a `loss_mask` feature, as SFT's do
(data/sft.py), only on the targets it marks), plus `source_BT` (the mixture index of each
token's source, -1 on padding) for per-source token counts, and any further per-target feature
packed with `features=` as `<feature>_BT` (int32, 0 on padding); only the `*_BT` keys of
BATCH_KEYS go to the device.

Each JAX process reads only its shard of every source and yields its local part of the global
batch; the iterators are grain `DatasetIterator`s whose state is checkpointed with the train
state, so a resumed run repeats and skips nothing, with or without worker processes.
"""

from __future__ import annotations

from typing import Callable, Sequence

import grain
import numpy as np

from data.sources import SourceSpec, source_dataset
from data.tokenizer import Tokenizer, with_specials

BATCH_KEYS = ("inputs_BT", "targets_BT", "positions_BT", "segment_ids_BT", "loss_mask_BT")
PACKINGS = ("concat", "best_fit", "first_fit")
FEATURES = ("inputs", "targets", "source")  # what a tokenized document holds, one value per target


class TokenizeDocument:
    """text (or a record with "text") -> {"inputs", "targets", "source"} with bos/eos added. Picklable."""

    def __init__(self, tokenizer: Tokenizer, source_id: int = 0):
        self.tokenizer = tokenizer
        self.source_id = source_id

    def __call__(self, doc) -> dict[str, np.ndarray]:
        text = doc["text"] if isinstance(doc, dict) else doc
        ids = np.asarray(with_specials(self.tokenizer, self.tokenizer.encode(text), eos=True), np.int32)
        return {"inputs": ids[:-1], "targets": ids[1:], "source": np.full(len(ids) - 1, self.source_id, np.int32)}


class _ChunkDocument(grain.experimental.FlatMapTransform):
    """A tokenized document -> pieces of at most `seq_len` tokens (for best-fit packing)."""

    max_fan_out = 1 << 20

    def __init__(self, seq_len: int):
        self.seq_len = seq_len

    def flat_map(self, doc):
        n = len(doc["inputs"])
        return [{k: v[i:i + self.seq_len] for k, v in doc.items()} for i in range(0, n, self.seq_len)]


def to_batch_format(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """grain packer output (`inputs`, `inputs_segment_ids`, ...) -> the `*_BT` batch keys."""
    seg = row["inputs_segment_ids"].astype(np.int32)
    real = row["targets_segment_ids"] != 0
    out = {
        "inputs_BT": row["inputs"].astype(np.int32),
        "targets_BT": row["targets"].astype(np.int32),
        "positions_BT": row["inputs_positions"].astype(np.int32),
        "segment_ids_BT": seg,
        "loss_mask_BT": (real & (row["loss_mask"] != 0) if "loss_mask" in row else real).astype(np.float32),
    }
    if "source" in row:
        out["source_BT"] = np.where(seg != 0, row["source"], -1).astype(np.int32)
    for k, v in row.items():
        if k not in FEATURES and k != "loss_mask" and not k.endswith(("_segment_ids", "_positions")):
            out[f"{k}_BT"] = np.where(real, v, 0).astype(np.int32)
    return out


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


def pack(docs: grain.IterDataset, *, seq_len: int, packing: str = "concat", num_packing_bins: int = 64,
         seed: int = 0, shuffle_window: int = 0, features: Sequence[str] = FEATURES) -> grain.IterDataset:
    """Tokenized documents -> packed rows in batch format. `features` names the per-target arrays
    every document holds (FEATURES, plus e.g. "loss_mask" for SFT); all are packed alike."""
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    if packing not in PACKINGS:
        raise ValueError(f"packing={packing!r} is not valid; expected one of {PACKINGS}")
    lengths = {k: seq_len for k in features}
    if packing == "concat":
        rows = _JsonSafeConcatState(grain.experimental.ConcatThenSplitIterDataset(docs, length_struct=lengths))
    else:
        if num_packing_bins < 1:
            raise ValueError(f"num_packing_bins={num_packing_bins} must be >= 1")
        pieces = grain.experimental.FlatMapIterDataset(docs, _ChunkDocument(seq_len))
        packer = (grain.experimental.BestFitPackIterDataset if packing == "best_fit"
                  else grain.experimental.FirstFitPackIterDataset)
        rows = packer(pieces, length_struct=lengths, num_packing_bins=num_packing_bins, seed=seed,
                      shuffle_bins=False)
    if shuffle_window > 1:
        rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=shuffle_window, seed=seed + 1)
    return rows.map(to_batch_format)


def _batched(rows: grain.IterDataset, batch_size: int, num_workers: int, drop_remainder: bool):
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    it = rows.batch(batch_size, drop_remainder=drop_remainder)
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl program
            flags.FLAGS.mark_as_parsed()  # (a notebook, a script) nobody has parsed them
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


def mixture_docs(specs: Sequence[SourceSpec], tokenizer: Tokenizer, *, seed: int = 0, shuffle: bool = True,
                 num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
                 documents: Callable[[grain.IterDataset, int, SourceSpec], grain.IterDataset] | None = None
                 ) -> grain.IterDataset:
    """Tokenized documents of several sources, interleaved in proportion to their weights.

    `documents(records, source_index, spec)` turns one source's records into documents; the
    default is pretraining's `TokenizeDocument` (SFT passes data/sft.py's chat examples)."""
    if not specs:
        raise ValueError("a data mixture needs at least one source")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    if documents is None:
        for s in specs:
            if s.schema != "text":
                raise ValueError(f"source {s.name!r}: schema={s.schema!r} reads chats, which SFT trains on "
                                 "(data.sft); pretraining reads the text at text_field (schema='text')")

        def documents(records, i, spec):
            return records.map(TokenizeDocument(tokenizer, i))

    parts = [documents(source_dataset(s, shard_index=shard_index, shard_count=shard_count, num_epochs=num_epochs,
                                      seed=seed + 7919 * i, shuffle=shuffle), i, s)
             for i, s in enumerate(specs)]
    if len(parts) == 1:
        return parts[0]
    return grain.IterDataset.mix(parts, [s.weight for s in specs])


def source_batches(specs: Sequence[SourceSpec], tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                   seed: int = 0, shuffle: bool = True, num_epochs: int | None = None, shard_index: int = 0,
                   shard_count: int = 1, packing: str = "concat", num_packing_bins: int = 64,
                   shuffle_window: int = 0, num_workers: int = 0, drop_remainder: bool = True,
                   documents=None, features: Sequence[str] = FEATURES) -> grain.IterDataset:
    """Batches of a weighted mixture of sources for this process (the training data path);
    `documents` and `features` as in `mixture_docs` and `pack` (SFT sets both)."""
    docs = mixture_docs(specs, tokenizer, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                        shard_index=shard_index, shard_count=shard_count, documents=documents)
    rows = pack(docs, seq_len=seq_len, packing=packing, num_packing_bins=num_packing_bins, seed=seed,
                shuffle_window=shuffle_window if shuffle else 0, features=features)
    return _batched(rows, batch_size, num_workers, drop_remainder)


def process_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
    """The data shards a process reads: a contiguous block, so its rows are its block of the batch."""
    if num_shards < 1 or num_shards % process_count:
        raise ValueError(f"data.num_shards={num_shards} must be a positive multiple of the {process_count} "
                         "processes")
    k = num_shards // process_count
    return list(range(process_index * k, (process_index + 1) * k))


class ShardedBatches:
    """This process's rows of every global batch, drawn from a fixed number of data shards.

    The data is cut into `num_shards` shards (each its own grain pipeline over 1/num_shards of
    every source); shard s supplies rows [s*b, (s+1)*b) of each global batch, b = batch_size /
    num_shards. A process reads the shards of its block of rows, so the global batches are the
    same whatever the number of processes, and a checkpoint (one state per shard,
    `shard_states()`) restores onto any process count that divides `num_shards`.
    """

    def __init__(self, make_shard, shard_ids: Sequence[int]):
        self.shard_ids = list(shard_ids)
        self.iterators = [iter(make_shard(s)) for s in self.shard_ids]

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def shard_states(self) -> dict[int, dict]:
        return {s: it.get_state() for s, it in zip(self.shard_ids, self.iterators)}

    def set_shard_states(self, states: dict) -> None:
        for s, it in zip(self.shard_ids, self.iterators):
            if s not in states and str(s) not in states:
                raise ValueError(f"the checkpoint has no state for data shard {s}; it has shards {sorted(states)}")
            it.set_state(states[s] if s in states else states[str(s)])
            if hasattr(it, "start_prefetch"):
                it.start_prefetch()


def sharded_source_batches(specs: Sequence[SourceSpec], tokenizer: Tokenizer, *, batch_size: int, num_shards: int,
                           shard_ids: Sequence[int], **kw) -> ShardedBatches:
    """`source_batches` cut into `num_shards` data shards, of which this process reads `shard_ids`;
    `batch_size` is the global batch."""
    if batch_size % num_shards:
        raise ValueError(f"the global batch {batch_size} is not divisible by data.num_shards={num_shards}")
    per_shard = batch_size // num_shards

    def make(s):
        return source_batches(specs, tokenizer, batch_size=per_shard, shard_index=s, shard_count=num_shards, **kw)

    return ShardedBatches(make, shard_ids)
