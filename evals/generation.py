"""Generation tasks: decode a continuation of each prompt, cut it at the stop strings, score it.

Prompts are `[bos] + encode(context)` where the context is built like the multiple-choice ones
(`evals.fewshot`: description, shots "prompt + target_delimiter + answer + fewshot_delimiter",
then the prompt). Decoding is `inference.generate` (greedy by default) with the tokenizer's EOS
as the stop token; the decoded text is cut at the first of the task's stop strings (the stop
string itself is dropped) and, for the metrics, stripped of surrounding whitespace.
Prompts longer than `max_seq_len - max_new_tokens` lose tokens on the left, as the harness does.

Metrics (`metrics` of a task): exact_match, bleu, rouge (rouge1 / rouge2 / rougeL), and
"verified" for synthetic tasks (`data.synthetic`'s exact verifier applied to the raw output).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import numpy as np

from evals import metrics as M
from data.tokenizer import start_ids
from evals.progress import Progress

METRICS = ("exact_match", "bleu", "rouge", "verified")


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i >= 0:
                cut = min(cut, i)
    return text[:cut]


def generate_texts(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, stop: Sequence[str] = (),
                   temperature: float = 0.0, seed: int = 0, batch_size: int = 32, add_bos: bool = True,
                   desc: str = "generation", progress: bool = True) -> list[str]:
    """The decoded continuation of each prompt, cut at the first stop string."""
    from inference import generate

    max_len = int(model.config.max_seq_len)
    if max_new_tokens >= max_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in max_seq_len={max_len}")
    prefix = start_ids(tokenizer) if add_bos else []
    room = max_len - max_new_tokens
    ids, cut = [], 0
    for p in prompts:
        x = prefix + list(tokenizer.encode(p))
        if not x:
            raise ValueError("an empty prompt with no BOS token cannot be continued")
        if len(x) > room:
            x, cut = x[-room:], cut + 1
        ids.append(x)
    if cut:
        logging.warning("%s: %d prompts were longer than %d tokens and lost context on the left", desc, cut, room)
    eos = tokenizer.eos_id
    stops = () if eos is None else (int(eos),)
    order = np.argsort([-len(x) for x in ids], kind="stable")  # similar lengths share a batch: less padding
    out: list[str] = [""] * len(ids)
    with Progress(len(ids), desc, unit="prompt", enabled=progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = [int(i) for i in order[start:start + batch_size]]
            new = generate(model, [ids[i] for i in idx], max_new_tokens=max_new_tokens, temperature=temperature,
                           stop_tokens=stops, seed=seed)
            for i, toks in zip(idx, new):
                if stops and toks and toks[-1] == stops[0]:
                    toks = toks[:-1]
                out[i] = truncate_at_stop(tokenizer.decode(toks), stop)
            bar.update(len(idx))
    return out


def score(outputs: Sequence[str], references: Sequence[Sequence[str]], names: Sequence[str], *,
          normalize: Sequence[str] = ("whitespace",), verify: Callable[[str, str], bool] | None = None) -> dict:
    """The named metrics of `outputs` (raw, as cut at the stop strings) against `references`."""
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"generation metrics {unknown} are not valid; expected some of {METRICS}")
    stripped = [o.strip() for o in outputs]
    out: dict = {}
    for name in names:
        if name == "exact_match":
            out["exact_match"] = M.exact_match(stripped, references, normalize)
        elif name == "bleu":
            out["bleu"] = M.bleu(stripped, references)
        elif name == "rouge":
            out.update(M.rouge(stripped, references))
        elif name == "verified":
            if verify is None:
                raise ValueError("the 'verified' metric needs a synthetic source (a task with a verifier)")
            out["verified"] = float(np.mean([verify(o, r[0]) for o, r in zip(outputs, references)]))
    return out


def evaluate(model, tokenizer, prompts: Sequence[str], references: Sequence[Sequence[str]], *,
             metric_names: Sequence[str], max_new_tokens: int, stop: Sequence[str] = (), temperature: float = 0.0,
             seed: int = 0, batch_size: int = 32, add_bos: bool = True, normalize: Sequence[str] = ("whitespace",),
             verify: Callable[[str, str], bool] | None = None, desc: str = "generation",
             progress: bool = True) -> dict:
    """Generates for every prompt and scores: {"metrics": {...}, "items": [{prompt, output, references}]}."""
    t0 = time.perf_counter()
    outputs = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=stop,
                             temperature=temperature, seed=seed, batch_size=batch_size, add_bos=add_bos, desc=desc,
                             progress=progress)
    m = score(outputs, references, metric_names, normalize=normalize, verify=verify)
    m.update(num_examples=len(prompts), seconds=time.perf_counter() - t0)
    items = [{"prompt": p, "output": o, "references": list(r)} for p, o, r in zip(prompts, outputs, references)]
    return {"metrics": m, "items": items}
