"""Perplexity at several context lengths: what extending a model's context changes.

Held-out documents are cut into consecutive pieces of a little under `max_len` tokens
(`heldout_pieces`); the perplexity at length n scores every piece in disjoint windows of n tokens
(`evals.perplexity.perplexity` with `max_length=n`), so every length scores the same tokens and
only the context each token sees differs (up to n). A model that uses a longer context gets a
lower perplexity at a larger n; one that breaks past the length it was trained at (positions, or
RoPE angles, it never saw) a higher one.

`ContextReport` is what `train.sft` runs for a config with a `context` section (the
`long_context` preset): before training, the base as it was (its own RoPE, max_seq_len raised to
the new length) and the base with the run's RoPE scaling; after training, the fine-tuned model.
metrics.jsonl gets `base_ppl_at_<n>` (step 0) and `ppl_at_<n>` (every evaluation), and
`context_extension.json` the table:

    {"lengths": [256, 512, 1024], "original_max_seq_len": 256, "max_seq_len": 1024,
     "rope_scaling": "yarn", "rope_scaling_factor": 4.0, "pieces": 16, "tokens": ...,
     "perplexity": {"base": {"256": ...}, "scaled": {...}, "fine_tuned": {...}}, "fine_tuned_step": 60}

The same report, with other kinds of model and another file, serves evals/length_generalization.py
(one model per position scheme, trained at L and scored at L, 2L, 4L).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Iterable, Sequence

from evals.perplexity import perplexity

REPORT_FILE = "context_extension.json"
KINDS = ("base", "scaled", "fine_tuned")  # the base as it was, with the new RoPE scaling, after fine-tuning
# tokens a piece leaves free of max_len: room for BOS / EOS and a re-tokenised piece's boundary tokens
_SLACK = 8


def report_lengths(original: int, max_len: int, lengths: Sequence[int] = ()) -> list[int]:
    """`lengths`, or original, 2 x original, 4 x original, ... up to `max_len` (and `max_len`)."""
    if lengths:
        out = sorted({int(n) for n in lengths})
    else:
        out, n = [], original
        while n < max_len:
            out.append(n)
            n *= 2
        out.append(max_len)
    bad = [n for n in out if not 2 <= n <= max_len]
    if bad:
        raise ValueError(f"context.lengths {bad} must be in [2, max_seq_len={max_len}]")
    return out


def heldout_pieces(texts: Iterable[str], tokenizer, max_len: int, count: int) -> list[str]:
    """Up to `count` texts of `max_len` - 8 tokens each: consecutive pieces of the documents in
    order (a document's shorter tail is left out), cut at token boundaries."""
    size = max_len - _SLACK
    if size < 2:
        raise ValueError(f"max_len={max_len} is too short to cut pieces of")
    out: list[str] = []
    for text in texts:
        _, offsets = tokenizer.encode_with_offsets(text)
        for a in range(0, len(offsets) - size + 1, size):
            out.append(text[offsets[a][0]:offsets[a + size - 1][1]])
            if len(out) == count:
                return out
    return out


def perplexities(model, tokenizer, pieces: Sequence[str], lengths: Sequence[int]) -> dict[int, float]:
    """{n: perplexity of `pieces` scored in windows of n tokens}."""
    return {n: perplexity(model, tokenizer, pieces, max_length=n, progress=False, desc=f"perplexity at {n}")
            ["perplexity"] for n in lengths}


class ContextReport:
    """Perplexity at the report lengths of one model after another, kept in `context_extension.json`
    (read back on a resume, so `before` numbers survive it). `kinds` names the models a report may
    hold (KINDS for a context extension) and `filename` its file in the workdir."""

    def __init__(self, workdir: str | os.PathLike | None, tokenizer, pieces: Sequence[str], lengths: Sequence[int],
                 meta: dict, *, kinds: Sequence[str] = KINDS, filename: str = REPORT_FILE):
        self.path = pathlib.Path(workdir) / filename if workdir is not None else None
        self.kinds = tuple(kinds)
        self.tokenizer, self.pieces, self.lengths = tokenizer, list(pieces), list(lengths)
        self.data = {"lengths": self.lengths, **meta, "pieces": len(self.pieces), "perplexity": {}}
        if self.path is not None and self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("lengths") == self.lengths:
                self.data["perplexity"] = old.get("perplexity", {})
                self.data.update({k: v for k, v in old.items() if k.endswith("_step")})

    def has(self, kind: str) -> bool:
        return kind in self.data["perplexity"]

    def measure(self, kind: str, model, *, step: int | None = None) -> dict[int, float]:
        """Scores `model` at every length, records it as `kind` (one of `kinds`) and rewrites the file."""
        if kind not in self.kinds:
            raise ValueError(f"kind={kind!r} is not one of {self.kinds}")
        ppl = perplexities(model, self.tokenizer, self.pieces, self.lengths)
        self.data["perplexity"][kind] = {str(n): v for n, v in ppl.items()}
        if step is not None:
            self.data[f"{kind}_step"] = step
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data, indent=2))
            os.replace(tmp, self.path)
        return ppl

    def table(self) -> str:
        """The perplexities as a text table: a row per model, a column per length."""
        head = "model".ljust(12) + "".join(f"{'ppl@' + str(n):>12}" for n in self.lengths)
        rows = [kind.ljust(12) + "".join(f"{self.data['perplexity'][kind][str(n)]:>12.2f}" for n in self.lengths)
                for kind in self.kinds if self.has(kind)]
        return "\n".join([head] + rows)
