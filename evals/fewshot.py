"""Few-shot prompt construction, the lm-evaluation-harness way.

    context = description + (shot_text + target_delimiter + shot_target + fewshot_delimiter) * k + query_text

with the harness's defaults `target_delimiter=" "` and `fewshot_delimiter="\\n\\n"`. Shots come from
a separate pool (a few-shot file or split) or from the evaluated items themselves, never the
item being evaluated:
  "first_n"  the first k candidates in order (the harness's sampler for MMLU's dev split);
  "random"   k candidates drawn with `random.Random(f"{seed}:{index}")`: fixed per item, so an
             item's prompt does not depend on which other items are evaluated (the harness
             draws from one generator shared across items in order; same idea, other draws).
From the same pool, k + 1 are drawn and the current item is dropped (the harness's rule).
"""

from __future__ import annotations

import random
from typing import Sequence

SAMPLERS = ("random", "first_n")


def select(index: int, candidates: Sequence[int], k: int, *, sampler: str = "random", seed: int = 1234,
           exclude: Sequence[int] = ()) -> list[int]:
    """k entries of `candidates` (pool indices: a range or a list) for item `index`, none in `exclude`."""
    if sampler not in SAMPLERS:
        raise ValueError(f"few-shot sampler={sampler!r} is not valid; expected one of {SAMPLERS}")
    if k <= 0:
        return []
    excluded = set(exclude)
    # one extra draw per excluded candidate (the harness draws k + 1 from the evaluated split)
    n = min(len(candidates), k + sum(1 for e in excluded if e in candidates))
    if sampler == "first_n":
        drawn = list(candidates[:n])
    else:  # sampling a range or list directly: O(k) per item, not O(pool)
        drawn = random.Random(f"{seed}:{index}").sample(candidates, n)
    picked = [c for c in drawn if c not in excluded][:k]
    if len(picked) < k:
        raise ValueError(f"{k}-shot prompts need {k} examples besides the evaluated one; only {len(picked)} "
                         "are available (lower num_shots or give a larger few-shot source)")
    return picked


def build_context(query_text: str, shots: Sequence[tuple[str, str]] = (), *, description: str = "",
                  target_delimiter: str = " ", fewshot_delimiter: str = "\n\n") -> str:
    """The prompt: description, then each (text, target) shot, then the query's text."""
    parts = [description]
    for text, target in shots:
        parts.append(text + target_delimiter + target + fewshot_delimiter)
    parts.append(query_text)
    return "".join(parts)
