"""Verifiable rewards for policy-gradient RL: functions of a completion's text and the example it
answers, 1.0 for right and 0.0 for wrong unless said otherwise.

    exact     the synthetic task's own verifier (data/synthetic.py: a number or a word at the start)
    gsm8k     GSM8K's convention: the number after the last "####" equals the reference answer
              (commas, a leading "$" and a trailing "." ignored; "7.0" equals "7")
    format    1.0 when the completion matches a regular expression (re.search), else 0.0

`make(kind, task=..., pattern=...)` returns `reward(text, example) -> float`; `correct` is the
task accuracy the loop logs as `accuracy` (the exact / gsm8k reward without any shaping). The
policy loop has one more kind, "model": a trained reward model's score (rl/train.make_reward).
"""

from __future__ import annotations

import re
from typing import Callable

from data import synthetic

KINDS = ("exact", "gsm8k", "format")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def gsm8k_answer(text: str) -> str | None:
    """The number after the last '####' of `text`, normalised ('1,234' -> '1234', '7.0' -> '7'), or None."""
    if "####" not in text:
        return None
    m = _NUMBER.search(text.rsplit("####", 1)[1])
    if not m:
        return None
    s = m.group(0).replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(s)
    except ValueError:
        return None
    return str(int(v)) if v == int(v) else repr(v)


def gsm8k(text: str, answer: str) -> float:
    """1.0 when the completion's '#### n' equals the reference (itself '#### n' or a bare number)."""
    want = gsm8k_answer(answer) if "####" in answer else gsm8k_answer("####" + answer)
    got = gsm8k_answer(text)
    return float(got is not None and got == want)


def make(kind: str, *, task: str = "", pattern: str = "") -> Callable[[str, dict], float]:
    """reward(text, example) for `kind` (see the module docstring); `example` has the task's
    `answer`. ValueError naming a bad kind, task or pattern."""
    if kind == "exact":
        synthetic.get(task)  # names the valid tasks when unknown
        return lambda text, ex: float(synthetic.verify(task, text, ex["answer"]))
    if kind == "gsm8k":
        return lambda text, ex: gsm8k(text, ex["answer"])
    if kind == "format":
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"reward format pattern {pattern!r} is not a valid regular expression: {e}") from None
        return lambda text, ex: float(rx.search(text) is not None)
    raise ValueError(f"reward kind={kind!r} is not valid; expected one of {KINDS} (or 'model' in rl.train, with "
                     "reward.workdir a reward model's run)")
