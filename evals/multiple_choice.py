"""Multiple-choice log-likelihood tasks, scored as lm-evaluation-harness scores them.

Each item becomes a query text, a list of choices and the gold index (formats below). Every
choice is scored as the continuation `target_delimiter + choice` (a leading space by default)
of the context `description + few-shot examples + query text`:

    ll_i     = sum of log p(continuation tokens | context)        (nats)
    acc      = [argmax_i ll_i is gold]
    acc_norm = [argmax_i ll_i / len(choice_i in characters) is gold]   (the choice without the delimiter)

Ties go to the first choice (NumPy's argmax). Tokenization follows the harness: trailing
whitespace of the context moves to the front of the continuation, the continuation's tokens
are `encode(context + continuation)[len(encode(context)):]`, and a sequence longer than the
model's window loses tokens on the left. Unlike the harness's Hugging Face default, the
context starts with BOS (`add_bos`, as Loom's pretraining data does; the harness adds its
prefix token only when the context is empty).

Formats (the field names of the Hugging Face datasets, read from local JSONL / Parquet):
  mmlu            question, choices (4), answer (index or letter), subject (optional):
                  "{question.strip()}\\nA. {choices[0]}\\nB. {choices[1]}\\nC. ...\\nAnswer:", choices
                  " A" / " B" / ...; description "The following are multiple choice questions (with
                  answers) about {subject}.\\n\\n"; few-shot examples from the same subject.
  hellaswag       activity_label, ctx_a, ctx_b, endings, label:
                  preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), choices
                  preprocess(ending), where preprocess strips, turns " [title]" into ". ", drops
                  "[...]" and replaces double spaces.
  arc             question, choices {text, label}, answerKey: "Question: {question}\\nAnswer:",
                  choices = choices.text, gold = choices.label.index(answerKey).
  truthfulqa_mc1  question, mc1_targets {choices, labels}: the harness's fixed six-example QA
                  primer + "\\n\\nQ: {question}\\nA:", gold = the choice labelled 1.
  plain           query, choices, gold (index or list of indices): the query text as is.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from typing import Any, Sequence

import numpy as np

from data.tokenizer import start_ids
from evals import fewshot
from evals.scoring import token_logprobs

FORMATS = ("mmlu", "hellaswag", "arc", "truthfulqa_mc1", "plain")
TEXT_FIELDS = {"mmlu": "question", "hellaswag": "activity_label", "arc": "question", "truthfulqa_mc1": "question",
               "plain": "query"}
MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}.\n\n"

TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)


@dataclasses.dataclass(frozen=True)
class Doc:
    text: str  # the query as the prompt shows it (the harness's doc_to_text)
    choices: tuple[str, ...]  # the continuations, without the target delimiter
    gold: tuple[int, ...]  # index (or indices) of the right choice(s)
    group: str = ""  # MMLU subject: shots come from the same group; accuracy is also reported per group


def _index(value, n: int, where: str) -> int:
    if isinstance(value, str):
        v = value.strip()
        if v.isdigit():
            value = int(v)
        elif len(v) == 1 and v.isalpha():
            value = ord(v.upper()) - ord("A")
        else:
            raise ValueError(f"{where}: answer {value!r} is neither an index nor a letter")
    value = int(value)
    if not 0 <= value < n:
        raise ValueError(f"{where}: answer index {value} is outside the {n} choices")
    return value


def hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # bracketed tags are WikiHow artefacts
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def to_doc(record: dict[str, Any], fmt: str, where: str = "record") -> Doc:
    """One record of `fmt` as a Doc (see the module doc for each format's template)."""
    try:
        if fmt == "mmlu":
            choices = [str(c) for c in record["choices"]]
            letters = tuple(chr(ord("A") + i) for i in range(len(choices)))
            text = record["question"].strip() + "".join(f"\n{l}. {c}" for l, c in zip(letters, choices)) + "\nAnswer:"
            gold = _index(record["answer"], len(choices), where)
            return Doc(text, letters, (gold,), str(record.get("subject") or ""))
        if fmt == "hellaswag":
            ctx = record["ctx_a"] + " " + record["ctx_b"].capitalize()
            choices = tuple(hellaswag_preprocess(e) for e in record["endings"])
            return Doc(hellaswag_preprocess(record["activity_label"] + ": " + ctx), choices,
                       (_index(record["label"], len(choices), where),))
        if fmt == "arc":
            labels = [str(x) for x in record["choices"]["label"]]
            key = str(record["answerKey"])
            if key not in labels:
                raise ValueError(f"{where}: answerKey {key!r} is not among the labels {labels}")
            return Doc(f"Question: {record['question']}\nAnswer:", tuple(str(c) for c in record["choices"]["text"]),
                       (labels.index(key),))
        if fmt == "truthfulqa_mc1":
            targets = record["mc1_targets"]
            gold = tuple(i for i, l in enumerate(targets["labels"]) if int(l) == 1)
            if not gold:
                raise ValueError(f"{where}: mc1_targets.labels has no 1")
            return Doc(TRUTHFULQA_PRIMER + "\n\nQ: " + record["question"] + "\nA:",
                       tuple(str(c) for c in targets["choices"]), gold)
        if fmt == "plain":
            choices = tuple(str(c) for c in record["choices"])
            gold = record["gold"]
            gold = tuple(gold) if isinstance(gold, (list, tuple)) else (gold,)
            return Doc(str(record["query"]), choices, tuple(_index(g, len(choices), where) for g in gold),
                       str(record.get("group") or ""))
    except KeyError as e:
        raise ValueError(f"{where}: a {fmt} record needs the field {e.args[0]!r}; it has {sorted(record)}") from None
    raise ValueError(f"multiple-choice format={fmt!r} is not valid; expected one of {FORMATS}")


def description_for(doc: Doc, fmt: str, description: str | None) -> str:
    """The task description before the shots: `description` (with `{subject}` filled in), or the
    format's default (MMLU's sentence when the item has a subject)."""
    subject = doc.group.replace("_", " ")
    if description is None:
        description = MMLU_DESCRIPTION if fmt == "mmlu" and subject else ""
    return description.replace("{subject}", subject)


def contexts(docs: Sequence[Doc], fmt: str, *, num_shots: int = 0, pool: Sequence[Doc] | None = None,
             same_pool: bool | None = None, sampler: str = "random", seed: int = 1234,
             description: str | None = None, target_delimiter: str = " ", fewshot_delimiter: str = "\n\n") -> list[str]:
    """The context string of every doc; with groups (MMLU subjects) shots come from the same group.

    Shots come from `pool`: None means the docs themselves. `same_pool=True` says docs[i] is
    pool[i] (the docs are the first items of the pool, e.g. a limited run drawing shots from the
    whole set), so item i is excluded by index; with a separate pool, items equal to the
    evaluated doc are excluded instead.
    """
    same = pool is None if same_pool is None else same_pool
    pool = docs if pool is None else pool
    by_group: dict[str, list[int]] = {}
    copies: dict[Doc, list[int]] = {}  # where each distinct item sits in the pool
    for j, d in enumerate(pool):
        by_group.setdefault(d.group, []).append(j)
        copies.setdefault(d, []).append(j)
    everything = range(len(pool))
    out = []
    for i, doc in enumerate(docs):
        shots = []
        if num_shots:
            candidates = by_group.get(doc.group, []) if doc.group else everything
            exclude = [i] if same else copies.get(doc, [])
            shots = [(pool[j].text, pool[j].choices[pool[j].gold[0]])
                     for j in fewshot.select(i, candidates, num_shots, sampler=sampler, seed=seed, exclude=exclude)]
        out.append(fewshot.build_context(doc.text, shots, description=description_for(doc, fmt, description),
                                         target_delimiter=target_delimiter, fewshot_delimiter=fewshot_delimiter))
    return out


def encode_pair(tokenizer, context: str, continuation: str, *, add_bos: bool = True) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) the harness's way (see the module doc); the context starts
    with BOS when `add_bos` (or EOS without a BOS id), and with it anyway when it is empty."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = list(tokenizer.encode(context + continuation))
    ctx = list(tokenizer.encode(context)) if context else []
    prefix = start_ids(tokenizer) if add_bos or not ctx else []
    return prefix + ctx, whole[len(ctx):]


def predictions(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(argmax of the log-likelihoods, argmax of log-likelihood per character of the choice)."""
    lls = np.asarray(lls, np.float64)
    lengths = np.array([float(len(c)) for c in choices])
    return int(np.argmax(lls)), int(np.argmax(lls / lengths))


def _mean_stderr(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def evaluate(model, tokenizer, docs: Sequence[Doc], ctxs: Sequence[str], *, target_delimiter: str = " ",
             add_bos: bool = True, max_tokens_per_batch: int = 16384, desc: str = "multiple_choice",
             progress: bool = True) -> dict:
    """acc / acc_norm (and their standard errors) of `model` on `docs` with contexts `ctxs`.

    Returns {"metrics": {...}, "items": [per-doc dict: lls, pred, pred_norm, gold]}.
    """
    t0 = time.perf_counter()
    max_len = int(model.config.max_seq_len)
    seqs, spans, owners = [], [], []
    truncated = 0
    for d, (doc, ctx) in enumerate(zip(docs, ctxs)):
        for choice in doc.choices:
            c_ids, k_ids = encode_pair(tokenizer, ctx, target_delimiter + choice, add_bos=add_bos)
            if not k_ids:
                raise ValueError(f"item {d}: choice {choice!r} encodes to no tokens after its context")
            if len(k_ids) > max_len:
                raise ValueError(f"item {d}: choice {choice!r} has {len(k_ids)} tokens, more than the model's "
                                 f"window ({max_len})")
            seq = c_ids + k_ids
            if len(seq) > max_len + 1:
                seq = seq[-(max_len + 1):]
                truncated += 1
            seqs.append(seq)
            spans.append(len(k_ids))
            owners.append(d)
    if truncated:
        logging.warning("%s: %d of %d sequences were longer than the window (%d) and lost context on the left",
                        desc, truncated, len(seqs), max_len)
    lps = token_logprobs(model, seqs, max_tokens_per_batch=max_tokens_per_batch, desc=desc, progress=progress)
    lls: list[list[float]] = [[] for _ in docs]
    for lp, k, d in zip(lps, spans, owners):
        lls[d].append(float(np.sum(lp[-k:], dtype=np.float64)))
    acc, acc_norm, items = [], [], []
    for doc, ll in zip(docs, lls):
        pred, pred_norm = predictions(ll, doc.choices)
        acc.append(float(pred in doc.gold))
        acc_norm.append(float(pred_norm in doc.gold))
        items.append({"lls": ll, "pred": pred, "pred_norm": pred_norm, "gold": list(doc.gold), "group": doc.group})
    acc_a, norm_a = np.asarray(acc), np.asarray(acc_norm)
    metrics = {"acc": float(acc_a.mean()), "acc_stderr": _mean_stderr(acc_a),
               "acc_norm": float(norm_a.mean()), "acc_norm_stderr": _mean_stderr(norm_a),
               "num_examples": len(docs), "num_sequences": len(seqs), "truncated": truncated,
               "seconds": time.perf_counter() - t0}
    groups = sorted({d.group for d in docs if d.group})
    if len(groups) > 1:
        metrics["acc_by_group"] = {g: float(np.mean([a for a, d in zip(acc, docs) if d.group == g])) for g in groups}
    return {"metrics": metrics, "items": items}
