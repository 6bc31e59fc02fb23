"""Synthetic tasks with exact verifiers: arithmetic, copying, reversing, sorting, counting.

Each task is a deterministic generator plus a verifier, independent of any model or tokenizer,
so the same examples serve evaluation now and SFT / RL (as a reward) later:

    from data import synthetic
    task = synthetic.get("addition")
    exs = task.examples(100, seed=0)            # [{"prompt": "482+917=", "answer": "1399"}, ...]
    task.verify(" 1399\\n", exs[0]["answer"])   # True: the output starts with the right answer

Prompts are short ASCII strings that end where the answer begins (no trailing space), so
`prompt + answer` is a complete training example (`format_example`). `size` sets the difficulty:
digits per operand for arithmetic, characters per string otherwise (0 = the task's default).

| task           | prompt (size)                | answer    | verifier                 |
| -------------- | ---------------------------- | --------- | ------------------------ |
| addition       | `482+917=` (3 digits)        | `1399`    | number                   |
| multiplication | `48*91=` (2 digits)          | `4368`    | number                   |
| copy           | `copy(qhxbtfzm)=` (8 chars)  | `qhxbtfzm`| word                     |
| reverse        | `reverse(qhxbtfzm)=`         | `mzftbxhq`| word                     |
| sort_digits    | `sort(80531942)=` (8 digits) | `01234589`| word                     |
| count          | `count(b,abcbbac...)=` (12)  | `4`       | number                   |

Verifiers judge the model's raw output text (what follows the prompt), stripped of leading
whitespace and cut at the first newline:
  number  the text starts with the answer as a whole number: `1399`, `1,399` (correct thousands
          grouping), `1399.` and `1399 is it` pass; `13990`, `139`, `01399`, `-1399`, `1399.5`,
          `1,39,9` fail.
  word    the first whitespace-delimited word equals the answer exactly (case-sensitive):
          `mzftbxhq`, `mzftbxhq done` pass; `mzftbxhqz`, `MZFTBXHQ`, `mzftbxhq.` fail.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from typing import Callable

_NUMBER = re.compile(r"([+-]?)(\d{1,3}(?:,\d{3})+|\d+)(?![\d,]|\.\d)")


def verify_number(output: str, answer: str) -> bool:
    """True when `output` starts (after whitespace) with the integer `answer` (see module doc)."""
    text = output.lstrip().split("\n", 1)[0]
    m = _NUMBER.match(text)
    if m is None:
        return False
    sign, digits = m.groups()
    return (sign if sign == "-" else "") + digits.replace(",", "") == answer.strip()


def verify_word(output: str, answer: str) -> bool:
    """True when the first whitespace-delimited word of `output` is exactly `answer`."""
    words = output.lstrip().split("\n", 1)[0].split()
    return bool(words) and words[0] == answer


def _rng(name: str, seed: int, size: int) -> random.Random:
    # string seeds are hashed with SHA-512: stable across runs and Python processes
    return random.Random(f"loom-synthetic:{name}:{seed}:{size}")


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)


def _addition(rng, size):
    a, b = _number(rng, size), _number(rng, size)
    return f"{a}+{b}=", str(a + b)


def _multiplication(rng, size):
    a, b = _number(rng, size), _number(rng, size)
    return f"{a}*{b}=", str(a * b)


def _letters(rng, size):
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(size))


def _copy(rng, size):
    s = _letters(rng, size)
    return f"copy({s})=", s


def _reverse(rng, size):
    s = _letters(rng, size)
    return f"reverse({s})=", s[::-1]


def _sort_digits(rng, size):
    s = "".join(rng.choice(string.digits) for _ in range(size))
    return f"sort({s})=", "".join(sorted(s))


def _count(rng, size):
    s = "".join(rng.choice("abc") for _ in range(size))
    c = rng.choice("abc")
    return f"count({c},{s})=", str(s.count(c))


@dataclasses.dataclass(frozen=True)
class Task:
    """A synthetic task: `examples(n, seed, size=0)` and `verify(output_text, answer)`."""

    name: str
    default_size: int
    make: Callable[[random.Random, int], tuple[str, str]]  # (rng, size) -> (prompt, answer)
    verify: Callable[[str, str], bool]
    numeric: bool  # the answer is an integer (distractors for multiple choice differ by offsets)
    description: str

    def examples(self, n: int, seed: int = 0, size: int = 0) -> list[dict[str, str]]:
        """`n` examples {"prompt", "answer"}, the same for the same (n, seed, size); the first
        k of n are the k examples of `examples(k, seed, size)`."""
        if n < 0:
            raise ValueError(f"synthetic task {self.name!r}: n={n} must be >= 0")
        size = size or self.default_size
        if size < 1:
            raise ValueError(f"synthetic task {self.name!r}: size={size} must be >= 1")
        rng = _rng(self.name, seed, size)
        out = []
        for _ in range(n):
            prompt, answer = self.make(rng, size)
            out.append({"prompt": prompt, "answer": answer})
        return out

    def max_answer_chars(self, size: int = 0) -> int:
        """An upper bound on the answer's length in characters."""
        size = size or self.default_size
        return {"addition": size + 1, "multiplication": 2 * size, "count": len(str(size))}.get(self.name, size)


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("addition", 3, _addition, verify_number, True, "sum of two n-digit numbers"),
    Task("multiplication", 2, _multiplication, verify_number, True, "product of two n-digit numbers"),
    Task("copy", 8, _copy, verify_word, False, "repeat a string of n lowercase letters"),
    Task("reverse", 8, _reverse, verify_word, False, "reverse a string of n lowercase letters"),
    Task("sort_digits", 8, _sort_digits, verify_word, False, "sort n digits ascending"),
    Task("count", 12, _count, verify_number, True, "occurrences of a letter in n letters from 'abc'"),
)}


def get(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown synthetic task {name!r}; valid tasks: {tuple(TASKS)}")
    return TASKS[name]


def examples(name: str, n: int, seed: int = 0, size: int = 0) -> list[dict[str, str]]:
    return get(name).examples(n, seed, size)


def verify(name: str, output_text: str, answer: str) -> bool:
    return get(name).verify(output_text, answer)


def format_example(example: dict[str, str]) -> str:
    """The whole solved example as one text (for SFT or few-shot demonstrations)."""
    return example["prompt"] + example["answer"]


def _distractor(task: Task, rng: random.Random, answer: str) -> str:
    if task.numeric:
        value = int(answer)
        offset = rng.choice([1, 2, 3, 9, 10, 11, 100]) * rng.choice([-1, 1])
        return str(abs(value + offset))
    chars = list(answer)
    if len(chars) > 1 and rng.random() < 0.5:  # swap two positions
        i, j = rng.sample(range(len(chars)), 2)
        chars[i], chars[j] = chars[j], chars[i]
    else:  # change one character
        i = rng.randrange(len(chars))
        pool = string.digits if chars[i].isdigit() else string.ascii_lowercase
        chars[i] = rng.choice([c for c in pool if c != chars[i]])
    return "".join(chars)


def distractor(name: str, answer: str, seed) -> str:
    """A wrong answer near `answer` (a numeric offset, or a changed / swapped character), the same
    for the same (name, answer, seed): the rejected side of synthetic preference pairs."""
    task = get(name)
    rng = random.Random(f"loom-synthetic-distractor:{name}:{seed}:{answer}")
    for _ in range(100):
        d = _distractor(task, rng, answer)
        if d != answer:
            return d
    raise ValueError(f"synthetic task {name!r}: no wrong answer near {answer!r}")


def multiple_choice(name: str, n: int, seed: int = 0, size: int = 0, num_choices: int = 4) -> list[dict]:
    """`n` multiple-choice items {"query", "choices", "gold"} built from the task's examples: the
    right answer and `num_choices - 1` distinct near-miss distractors, in a seeded order."""
    task = get(name)
    if num_choices < 2:
        raise ValueError(f"num_choices={num_choices} must be >= 2")
    rng = random.Random(f"loom-synthetic-mc:{name}:{seed}:{size}:{num_choices}")
    items = []
    for ex in task.examples(n, seed, size):
        choices = [ex["answer"]]
        for _ in range(1000):
            if len(choices) == num_choices:
                break
            d = _distractor(task, rng, ex["answer"])
            if d not in choices:
                choices.append(d)
        else:
            raise ValueError(f"synthetic task {name!r}: could not find {num_choices - 1} distinct distractors "
                             f"for {ex['answer']!r}")
        order = list(range(num_choices))
        rng.shuffle(order)
        items.append({"query": ex["prompt"], "choices": [choices[i] for i in order], "gold": order.index(0)})
    return items
