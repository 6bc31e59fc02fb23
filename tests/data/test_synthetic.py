"""Synthetic tasks: deterministic generators, exact verifiers."""

import pytest

from data import synthetic


@pytest.mark.parametrize("name", list(synthetic.TASKS))
def test_deterministic_per_seed_and_verifiable(name):
    task = synthetic.get(name)
    a = task.examples(50, seed=3)
    assert a == task.examples(50, seed=3) == synthetic.examples(name, 50, 3)
    assert a != task.examples(50, seed=4)
    assert task.examples(10, seed=3) == a[:10]  # a prefix of a longer run
    assert len({e["prompt"] for e in a}) > 40
    for e in a:
        assert set(e) == {"prompt", "answer"} and e["prompt"].isascii() and not e["prompt"].endswith(" ")
        assert task.verify(e["answer"], e["answer"]) and task.verify(f" {e['answer']}\nnext", e["answer"])
        assert len(e["answer"]) <= task.max_answer_chars()
    assert all(len(e["answer"]) <= task.max_answer_chars(5) for e in task.examples(20, 0, size=5))


def test_answers_are_right():
    for e in synthetic.examples("addition", 20, size=4):
        a, b = e["prompt"].rstrip("=").split("+")
        assert len(a) == len(b) == 4 and int(a) + int(b) == int(e["answer"])
    for e in synthetic.examples("multiplication", 20):
        a, b = e["prompt"].rstrip("=").split("*")
        assert int(a) * int(b) == int(e["answer"])
    for e in synthetic.examples("reverse", 5):
        assert e["prompt"] == f"reverse({e['answer'][::-1]})="
    for e in synthetic.examples("sort_digits", 5):
        assert e["answer"] == "".join(sorted(e["prompt"][5:-2]))
    for e in synthetic.examples("count", 5):
        c, s = e["prompt"][6:-2].split(",")
        assert int(e["answer"]) == s.count(c)
    assert synthetic.format_example({"prompt": "1+2=", "answer": "3"}) == "1+2=3"


@pytest.mark.parametrize("output,ok", [
    ("1399", True), (" 1399\n", True), ("1399.", True), ("1399 is the sum", True), ("1,399", True),
    ("+1399", True), ("1399\n42", True),
    ("13990", False), ("139", False), ("01399", False), ("-1399", False), ("1399.5", False),
    ("1,39,9", False), ("13,99", False), ("", False), ("sum: 1399", False), ("\n1399", True),
])
def test_number_verifier(output, ok):
    assert synthetic.verify("addition", output, "1399") is ok


def test_number_verifier_negative_and_zero():
    assert synthetic.verify_number("-12", "-12") and not synthetic.verify_number("12", "-12")
    assert synthetic.verify_number("0", "0") and not synthetic.verify_number("00", "0")


@pytest.mark.parametrize("output,ok", [
    ("mzftbxhq", True), ("  mzftbxhq\n", True), ("mzftbxhq done", True),
    ("mzftbxhqz", False), ("MZFTBXHQ", False), ("mzftbxhq.", False), ("mzft bxhq", False), ("", False),
])
def test_word_verifier(output, ok):
    assert synthetic.verify("reverse", output, "mzftbxhq") is ok


def test_multiple_choice_items():
    items = synthetic.multiple_choice("addition", 30, seed=1)
    assert items == synthetic.multiple_choice("addition", 30, seed=1)
    golds = set()
    for it, ex in zip(items, synthetic.examples("addition", 30, seed=1)):
        assert it["query"] == ex["prompt"] and it["choices"][it["gold"]] == ex["answer"]
        assert len(set(it["choices"])) == 4
        golds.add(it["gold"])
    assert golds == {0, 1, 2, 3}  # the right answer is not always in the same place
    for it in synthetic.multiple_choice("copy", 10, num_choices=3):
        assert len(set(it["choices"])) == 3


def test_errors():
    with pytest.raises(ValueError, match="valid tasks"):
        synthetic.get("division")
    with pytest.raises(ValueError, match="size=-1"):
        synthetic.examples("copy", 3, size=-1)
