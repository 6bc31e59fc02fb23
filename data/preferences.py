"""Preference data: chosen / rejected pairs -> token ids with a response-only loss mask, in pair batches.

    records of each source (data/sources.py with a preference `schema`): {"pair": {...}, "file", "line", ...}
    -> `PairTokenizer.tokenize`: prompt + chosen and prompt + rejected, rendered with the chat template
       (or kept as text), tokenized; the response tokens marked
    -> `PairExamples`: one document per pair, both sequences padded to `seq_len` (pairs longer than
       seq_len truncated or dropped, and counted)
    -> the sources mixed by weight (data/pipeline.py), a window shuffle, batches of pairs

Record shapes (`SourceSpec.schema`; "preference" detects each record's, in this order):
  explicit_prompt  {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}:
                   UltraFeedback-binarized (HuggingFaceH4's `prompt` string with `chosen` / `rejected`
                   as whole conversations) and TRL's explicit-prompt form (responses only). A chosen
                   or rejected message list that starts with the prompt's messages has them removed.
  implicit_prompt  {"chosen": str | messages, "rejected": str | messages} sharing their prompt:
                   Anthropic HH-RLHF texts ("\\n\\nHuman: ... \\n\\nAssistant: ...": the prompt is their
                   common prefix up to its last "\\n\\nAssistant:"), or message lists (the prompt is
                   their common leading messages).
The field names are the spec's `prompt_field`, `chosen_field`, `rejected_field` (dots reach nested
keys). Each response must hold an assistant turn. The `synthetic` format gives explicit-prompt
pairs of a data/synthetic.py task: chosen = the answer, rejected = a near miss
(`synthetic.distractor`).

Chat or plain text, detected per record: message lists are chats; strings are plain text. With
`render="chat"` (the default) plain text becomes a chat too (HH's Human / Assistant turns; any
other prompt string is one user turn, a response string one assistant turn) and every pair is
rendered with the chat template (data/sft.py `ChatTokenizer`: the response is marked as SFT marks
assistant turns, end-of-turn token included, and only the turns after the prompt). With
`render="text"` strings stay as written: BOS + prompt + response + EOS, prompt and response
tokenized separately, the response and EOS marked (message lists are then bad records).

Documents and batches. Each row holds a whole sequence (not one token less, as pretraining's rows
do): `inputs` are the L <= seq_len ids, `targets[t] = inputs[t + 1]` (the last real position has
no target), `loss_mask[t]` is 1 where target t is a response token, `segment_ids` 1 on the L
tokens and 0 on padding, positions 0..L-1. A batch of P pairs holds arrays
`<key>_BCT` of shape [P, 2, seq_len] (C: 0 = chosen, 1 = rejected) for the five keys of the batch
format (PAIR_KEYS), so any split along the batch (data shards, micro-batches) keeps pairs whole,
and `source_B`, `truncated_B`, `dropped_B` ([P] int32) for the counts. A pair whose sequences are
longer than seq_len is cut to its first seq_len tokens ("truncate"; dropped instead when either
side keeps no response token) or dropped ("drop"). Padding pairs (`pad_pairs`) have no token at all.

Held-out pairs: eval sources of their own, or the held-out split of the training sources
(data/sources.py `split_heldout`, as SFT's).

Bad input: a record of unknown shape, a missing or mistyped field, responses that share no prompt
or are identical, a chat the template fails on: a bad record of its source (skipped, counted and
logged with file and line, or a `DataError` naming them with `strict=True`).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import grain
import numpy as np

from data import pipeline
from data.sft import (ChatExamples, ChatRecordError, ChatTokenizer, TemplatePrefixError, _ChatExamplesIterator, _has,
                      _message_list, with_default_schema)
from data.sources import PREFERENCE_SCHEMAS, DataError, EmptySourceError, SourceSpec, check_paths, get_field
from data.sources import specs_from_config as _specs_from_config
from data.tokenizer import with_specials

SCHEMAS = PREFERENCE_SCHEMAS
RENDERS = ("chat", "text")
TRUNCATIONS = ("truncate", "drop")
PAIR_KEYS = tuple(k[:-2] + "BCT" for k in pipeline.BATCH_KEYS)  # inputs_BCT, targets_BCT, ...
HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"  # HH-RLHF's turn markers
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


# --------------------------------------------------------------------------------------------
# Record shapes


def _value(obj: Any, field: str) -> Any:
    try:
        value = get_field(obj, field)
    except KeyError as e:
        raise ChatRecordError(f"missing field {field!r} (no {e.args[0]!r})", "missing_field") from None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _message_list(value, field)
    raise ChatRecordError(f"field {field!r} is {type(value).__name__}, not a string or a list of messages",
                          "not_string")


def detect_schema(obj: Any, spec: SourceSpec) -> str:
    """The record's shape: "explicit_prompt" or "implicit_prompt" (by the fields it has)."""
    if _has(obj, spec.chosen_field) and _has(obj, spec.rejected_field):
        return "explicit_prompt" if _has(obj, spec.prompt_field) else "implicit_prompt"
    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise ChatRecordError(
        f"unknown record shape (fields {keys}): a preference pair needs {spec.chosen_field!r} and "
        f"{spec.rejected_field!r} (strings or lists of messages), with {spec.prompt_field!r} when the prompt is "
        "separate", "unknown_shape")


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _check_response(messages: list[dict], side: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatRecordError(f"the {side} response has no assistant turn (roles {[m['role'] for m in messages]})",
                              "no_assistant")


def record_pair(obj: Any, spec: SourceSpec) -> dict[str, Any]:
    """A record as a pair {"prompt", "chosen", "rejected"}: three strings (plain text: the prompt and
    the two responses) or three message lists (a chat: the prompt's messages and each response's),
    read by `spec.schema` ("preference" detects it). Raises `ChatRecordError` (with a `kind`) for a
    record that is no usable pair."""
    schema = spec.schema if spec.schema != "preference" else detect_schema(obj, spec)
    if schema not in ("explicit_prompt", "implicit_prompt"):
        raise ValueError(f"schema={spec.schema!r} is not a preference schema; expected one of {SCHEMAS}")
    chosen, rejected = _value(obj, spec.chosen_field), _value(obj, spec.rejected_field)
    if type(chosen) is not type(rejected):
        raise ChatRecordError(f"{spec.chosen_field!r} and {spec.rejected_field!r} must both be strings or both "
                              f"lists of messages (got {type(chosen).__name__} and {type(rejected).__name__})",
                              "mixed_types")
    if schema == "explicit_prompt":
        prompt = _value(obj, spec.prompt_field)
        if isinstance(prompt, list) or isinstance(chosen, list):  # a chat
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            if isinstance(chosen, str):
                chosen = [{"role": "assistant", "content": chosen}]
                rejected = [{"role": "assistant", "content": rejected}]
            # UltraFeedback-binarized repeats the prompt at the start of each conversation
            chosen = chosen[len(prompt):] if chosen[:len(prompt)] == prompt else chosen
            rejected = rejected[len(prompt):] if rejected[:len(prompt)] == prompt else rejected
    elif isinstance(chosen, str):  # HH-RLHF: the prompt ends at the last Assistant marker both share
        n = _common_prefix(chosen, rejected)
        cut = chosen.rfind(ASSISTANT, 0, n)
        if cut < 0 or cut + len(ASSISTANT) > n:
            raise ChatRecordError(f"{spec.chosen_field!r} and {spec.rejected_field!r} share no prompt ending in "
                                  f"{ASSISTANT!r} (implicit-prompt texts in the HH-RLHF shape)", "no_shared_prompt")
        cut += len(ASSISTANT)
        prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
    else:
        n = _common_prefix(chosen, rejected)
        if n == 0:
            raise ChatRecordError(f"{spec.chosen_field!r} and {spec.rejected_field!r} share no leading message "
                                  "(an implicit prompt is their common start)", "no_shared_prompt")
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, list):
        for side, msgs in (("chosen", chosen), ("rejected", rejected)):
            if not msgs:
                raise ChatRecordError(f"the {side} response is empty after its prompt (the two sides are identical "
                                      "or one is the start of the other)", "empty_response")
            _check_response(msgs, side)
    elif not chosen.strip() or not rejected.strip():
        raise ChatRecordError("a response is empty after its prompt", "empty_response")
    if chosen == rejected:
        raise ChatRecordError("chosen and rejected are the same response", "identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def text_to_messages(prompt: str) -> list[dict]:
    """A plain-text prompt as chat turns: HH-RLHF's "\\n\\nHuman: ... \\n\\nAssistant:" turns (the last,
    empty Assistant marker is where the response goes), or one user turn."""
    if HUMAN not in prompt:
        return [{"role": "user", "content": prompt}]
    parts = _HH_TURN.split(prompt)
    lead, turns = parts[0], list(zip(parts[1::2], parts[2::2]))
    messages = [{"role": "system", "content": lead.strip()}] if lead.strip() else []
    for i, (who, text) in enumerate(turns):
        last = i == len(turns) - 1
        if last and who == "Assistant" and not text.strip():
            break  # the generation point
        messages.append({"role": "user" if who == "Human" else "assistant", "content": text.strip()})
    return messages


# --------------------------------------------------------------------------------------------
# Tokenization


class PairTokenizer:
    """Tokenizes pairs (see the module docstring). Picklable (grain workers receive it by value)."""

    def __init__(self, tokenizer, template: str | None = None, render: str = "chat"):
        if render not in RENDERS:
            raise ValueError(f"render={render!r} is not valid; expected one of {RENDERS}")
        self.tokenizer, self.render = tokenizer, render
        self.chat = ChatTokenizer(tokenizer, template) if render == "chat" else None

    def _side(self, prompt, response) -> tuple[np.ndarray, np.ndarray]:
        if self.chat is not None:
            prompt = text_to_messages(prompt) if isinstance(prompt, str) else prompt
            if isinstance(response, str):
                response = [{"role": "assistant", "content": response.lstrip(" ")}]
            return self.chat.tokenize(list(prompt) + list(response), from_message=len(prompt))
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise ChatRecordError("render='text' reads plain-text pairs; this record holds messages (render it "
                                  "with render='chat')", "not_text")
        p = with_specials(self.tokenizer, self.tokenizer.encode(prompt), bos=True)
        r = list(self.tokenizer.encode(response)) + with_specials(self.tokenizer, [], bos=False, eos=True)
        return np.asarray(p + r, np.int32), np.asarray([0] * len(p) + [1] * len(r), np.int32)

    def tokenize(self, pair: dict) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
        """((chosen ids [L] int32, response mask [L]), (rejected ids, mask)): the prompt followed by each
        response, 1 on the response's tokens."""
        return self._side(pair["prompt"], pair["chosen"]), self._side(pair["prompt"], pair["rejected"])


def sequence_row(ids: np.ndarray, mask: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """One whole sequence (len(ids) <= seq_len) as a padded row of the batch format (see the module
    docstring): {"inputs", "targets", "positions", "segment_ids", "loss_mask"} of [seq_len]."""
    n = len(ids)
    row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
    row["loss_mask"] = np.zeros(seq_len, np.float32)
    row["inputs"][:n], row["targets"][:n - 1] = ids, ids[1:]
    row["positions"][:n], row["segment_ids"][:n] = np.arange(n), 1
    row["loss_mask"][:n - 1] = mask[1:]
    return row


# --------------------------------------------------------------------------------------------
# Examples: one source's records -> pair documents


class PairExamples(ChatExamples):
    """One source's pair records -> documents {"<key>_BCT": [2, seq_len] for PAIR_KEYS, "source_B",
    "truncated_B", "dropped_B"} (the batch adds the leading P). Overlong pairs and bad records are
    handled and counted as data/sft.py `ChatExamples` does for chats."""

    def __init__(self, parent: grain.IterDataset, pairs: PairTokenizer, spec: SourceSpec, *, source_id: int,
                 seq_len: int, truncation: str = "truncate"):
        super().__init__(parent, pairs.chat, spec, source_id=source_id, seq_len=seq_len, truncation=truncation)
        self.pairs = pairs

    def __iter__(self):
        return _PairExamplesIterator(self._parent.__iter__(), self)

    def __str__(self):
        return f"PairExamples({self.spec.name!r}, seq_len={self.seq_len})"


class _PairExamplesIterator(_ChatExamplesIterator):
    kind = "preference"
    def _example(self, rec) -> dict[str, np.ndarray] | None:
        ds = self.ds
        try:
            sides = ds.pairs.tokenize(rec["pair"])
        except ChatRecordError as e:
            self.bad.report(rec["file"], rec["line"], str(e), e.kind)
            return None
        except TemplatePrefixError as e:  # the template, not the record
            raise DataError(rec["file"], rec["line"], str(e)) from None
        longest = max(len(ids) for ids, _ in sides)
        truncated = 0
        if longest > ds.seq_len:
            if self.drop_overlong(rec, longest, keep=all(mask[1:ds.seq_len].any() for _, mask in sides),
                                  what="a response has no token within it"):
                return None
            sides, truncated = [(ids[:ds.seq_len], mask[:ds.seq_len]) for ids, mask in sides], 1
        rows = [sequence_row(ids, mask, ds.seq_len) for ids, mask in sides]
        doc = {f"{k}_BCT": np.stack([r[k] for r in rows]) for k in rows[0]}
        doc.update(source_B=np.int32(ds.source_id), truncated_B=np.int32(truncated),
                   dropped_B=np.int32(self.pending_dropped))
        self.pending_dropped = 0
        return doc

    def no_examples_error(self, why: str = "") -> EmptySourceError:
        ds = self.ds
        where = ds.spec.path or f"{ds.spec.format}:{ds.spec.split}"
        held = f" on its {ds.spec.heldout.side} side" if ds.spec.heldout is not None else ""
        first = f" (first: {self.bad.first})" if self.bad.first else ""
        return EmptySourceError(f"source {ds.spec.name!r} ({where}) yielded 0 preference pairs{held}: "
                                f"{self.pending_dropped} longer than seq_len={ds.seq_len}, {self.bad.total} bad "
                                f"records{first}{why}")


def pair_counts(batch: dict[str, np.ndarray]) -> dict[str, int]:
    """{"truncated", "dropped"}: the overlong pairs a batch (or a sum of batches) accounts for."""
    return {"truncated": int(np.sum(batch["truncated_B"])), "dropped": int(np.sum(batch["dropped_B"]))}


def pad_pairs(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """A batch of fewer than `size` pairs filled up with empty pairs (no token, no loss: losses
    count only pairs with response tokens on both sides)."""
    n = len(batch["source_B"])
    if n > size:
        raise ValueError(f"a batch of {n} pairs does not fit in {size}")
    return {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# Sources -> batches


def specs_from_config(sources) -> list[SourceSpec]:
    """SourceSpecs of preference sources from a config mapping {name: {format, path, schema, ...}};
    a source without a schema gets "preference" (detected per record)."""
    out = with_default_schema(sources, "preference")
    specs = _specs_from_config(out) if out else []
    for s in specs:
        if s.schema not in SCHEMAS:
            raise ValueError(f"source {s.name!r}: preference training reads chosen / rejected pairs, but "
                             f"schema={s.schema!r}; set it to one of {SCHEMAS} ('preference' detects each record's)")
    return specs


def preference_batches(specs: Sequence[SourceSpec], tokenizer, *, seq_len: int, batch_size: int,
                       chat_template: str | None = None, render: str = "chat", truncation: str = "truncate",
                       seed: int = 0, shuffle: bool = True,
                       num_epochs: int | None = None, shard_index: int = 0, shard_count: int = 1,
                       shuffle_window: int = 0, num_workers: int = 0, drop_remainder: bool = True) -> grain.IterDataset:
    """Batches of `batch_size` preference pairs for this process (see the module docstring), a
    weighted mixture of `specs`, shuffled (records per source, then pairs in a window) when `shuffle`."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation={truncation!r} is not valid; expected one of {TRUNCATIONS}")
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2")
    specs = list(specs)
    for s in specs:
        if s.schema not in SCHEMAS:
            raise ValueError(f"source {s.name!r}: schema={s.schema!r} is not a preference schema {SCHEMAS}")
    check_paths(specs)
    pairs = PairTokenizer(tokenizer, chat_template, render)

    def documents(records, i, spec):
        return PairExamples(records, pairs, spec, source_id=i, seq_len=seq_len, truncation=truncation)

    docs = pipeline.mixture_docs(specs, tokenizer, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                                 shard_index=shard_index, shard_count=shard_count, documents=documents)
    if shuffle and shuffle_window > 1:
        docs = grain.experimental.WindowShuffleIterDataset(docs, window_size=shuffle_window, seed=seed + 1)
    return pipeline._batched(docs, batch_size, num_workers, drop_remainder)


def sharded_preference_batches(specs: Sequence[SourceSpec], tokenizer, *, batch_size: int, num_shards: int,
                               shard_ids: Sequence[int], **kw) -> pipeline.ShardedBatches:
    """`preference_batches` cut into `num_shards` data shards, of which this process reads `shard_ids`
    (`batch_size` is the global number of pairs), as data/pipeline.py `ShardedBatches` does for
    pretraining; its `shard_states()` / `set_shard_states()` go into the checkpoint."""
    if batch_size % num_shards:
        raise ValueError(f"the global batch of {batch_size} pairs is not divisible by data.num_shards={num_shards}")
    return pipeline.ShardedBatches(
        lambda s: preference_batches(specs, tokenizer, batch_size=batch_size // num_shards, shard_index=s,
                                     shard_count=num_shards, **kw), shard_ids)


def eval_pair_batches(specs: Sequence[SourceSpec], tokenizer, *, batch_size: int, num_pairs: int, num_shards: int = 1,
                      shard_ids: Sequence[int] = (0,), **kw) -> list[dict[str, np.ndarray]]:
    """This process's part of the first ceil(num_pairs / batch_size) batches of held-out pairs (read
    once, in order), the last ones filled up with empty pairs (`pad_pairs`) where the source ends:
    the same number of batches on every process."""
    if num_pairs <= 0:
        return []
    it = sharded_preference_batches(specs, tokenizer, batch_size=batch_size, num_shards=num_shards,
                                    shard_ids=shard_ids, shuffle=False, num_epochs=1, drop_remainder=False, **kw)
    local = batch_size * len(shard_ids) // num_shards
    out = []
    for _ in range(-(-num_pairs // batch_size)):
        batch = next(it, None)
        if batch is None and not out:
            break
        out.append(pad_pairs(batch if batch is not None else {k: v[:0] for k, v in out[-1].items()}, local))
    return out
