"""Rollouts for policy-gradient RL: G sampled completions per prompt through `inference.generate`,
and the trainer's batch that scores exactly those tokens.

    rollout = sample_groups(model, prompts, group_size=8, max_new_tokens=32, temperature=1.0,
                            stop_tokens=[eos], seed=step)
    batch = rollout.batch()          # inputs/targets/positions/segment ids/loss mask, numpy
    logp = token_logprobs(apply(graphdef, params, batch), batch["targets_BT"], temperature)

Rows are grouped: rows [i * G, (i + 1) * G) are prompt i's G samples, each drawing its own random
stream (`generate`'s one-seed rule: row r uses fold_in(key(seed), r)), so a group holds distinct
draws. A log-prob is `log_softmax(logits / T)` over the full vocabulary on sampler and trainer
alike (models/logprobs.py); `batch()["sampler_logprobs_BT"]` holds the sampler's, aligned with
`targets_BT`, so the trainer's can be compared token for token (`logprob_gap`).

The trainer's row is the sampler's: the prompt left-padded to the longest prompt (padding has
segment id 0 and position 0; real tokens positions 0..n-1), then the completion at positions
n, n+1, ..., then right padding (segment 0). The loss mask covers the completion's tokens,
including the stop token (EOS) that ended it; a completion cut by `max_new_tokens` has none.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from inference.engine import generate


@dataclasses.dataclass
class Rollout:
    """One rollout batch: P prompts, G completions each (B = P * G rows, grouped by prompt)."""

    prompts: list[list[int]]  # [P]
    completions: list[list[int]]  # [B]
    logprobs: list[list[float]]  # [B]: the sampler's log_softmax(logits / T) of each completion token
    group_size: int
    stop_tokens: tuple[int, ...]
    temperature: float

    @property
    def num_rows(self) -> int:
        return len(self.completions)

    def prompt_of(self, row: int) -> list[int]:
        return self.prompts[row // self.group_size]

    def stopped(self) -> np.ndarray:
        """[B] bool: the completion ended with a stop token (else `max_new_tokens` cut it)."""
        return np.array([bool(c) and c[-1] in self.stop_tokens for c in self.completions])

    def lengths(self) -> np.ndarray:
        """[B] completion lengths in tokens (the stop token included)."""
        return np.array([len(c) for c in self.completions], np.int32)

    def batch(self, prompt_len: int | None = None, completion_len: int | None = None) -> dict[str, np.ndarray]:
        """The trainer's view (see the module docstring), numpy:
        inputs_BT / targets_BT int32 (targets = inputs shifted by one), positions_BT,
        segment_ids_BT (1 real, 0 padding), loss_mask_BT float32 (1 where the target is a
        completion token), sampler_logprobs_BT float32 (the sampler's log-prob of that target, 0
        elsewhere). Sequence length prompt_len + completion_len - 1 (defaults: the longest of each)."""
        lp = max(len(p) for p in self.prompts) if prompt_len is None else int(prompt_len)
        lc = max(max((len(c) for c in self.completions), default=0), 1) if completion_len is None else int(completion_len)
        b, s = self.num_rows, lp + lc
        tokens = np.zeros((b, s), np.int32)
        seg = np.zeros((b, s), np.int32)
        pos = np.zeros((b, s), np.int32)
        comp = np.zeros((b, s), np.float32)
        slp = np.zeros((b, s), np.float32)
        for r in range(b):
            p, c = self.prompt_of(r), self.completions[r]
            if len(p) > lp or len(c) > lc:
                raise ValueError(f"row {r}: prompt {len(p)} / completion {len(c)} tokens exceed the batch's "
                                 f"prompt_len={lp} / completion_len={lc}")
            n = len(p)
            tokens[r, lp - n:lp] = p
            tokens[r, lp:lp + len(c)] = c
            seg[r, lp - n:lp + len(c)] = 1
            pos[r, lp - n:lp + len(c)] = np.arange(n + len(c))
            comp[r, lp:lp + len(c)] = 1.0
            slp[r, lp:lp + len(c)] = self.logprobs[r]
        return {"inputs_BT": tokens[:, :-1], "targets_BT": tokens[:, 1:], "positions_BT": pos[:, :-1],
                "segment_ids_BT": seg[:, :-1], "loss_mask_BT": comp[:, 1:], "sampler_logprobs_BT": slp[:, 1:]}


def sample_groups(model, prompts: Sequence[Sequence[int]], *, group_size: int, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  stop_tokens: Sequence[int] = (), seed: int = 0, decode_layout: bool | None = None) -> Rollout:
    """G = `group_size` completions of each prompt, sampled through `inference.generate` (KV
    cache, the model's own code) with their log-probs; see `Rollout`."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} is not valid; expected an integer >= 1")
    if not temperature or temperature <= 0:
        raise ValueError(f"temperature={temperature!r} is not valid for rollouts; expected > 0 (a group of greedy "
                         "completions would be G copies of one)")
    prompts = [list(map(int, p)) for p in prompts]
    rows = [p for p in prompts for _ in range(group_size)]
    ids, lps = generate(model, rows, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, stop_tokens=stop_tokens, seed=int(seed), return_logprobs=True,
                        decode_layout=decode_layout)
    return Rollout(prompts=prompts, completions=ids, logprobs=lps, group_size=group_size,
                   stop_tokens=tuple(int(t) for t in stop_tokens), temperature=float(temperature))
