"""The multiple-choice harness on planted preferences; formats and few-shot prompts exactly."""

import math

import numpy as np
import pytest

from evals import fewshot
from evals import multiple_choice as mc
from tests.evals.stubs import Bigram, CharTokenizer, bigram_table

# After "Q", " " is likely; after " ", "a" has log-prob -3 and "b" -1; after "b", "b" has -0.5.
PLANTED = {("Q", " "): -0.1, (" ", "a"): -3.0, (" ", "b"): -1.0, ("b", "b"): -0.5}


@pytest.fixture(scope="module")
def model():
    return Bigram(bigram_table(PLANTED))


def _ll(table, context, continuation):
    ids = [1] + list((context + continuation).encode())
    k = len(continuation)
    return sum(table[ids[i - 1], ids[i]] for i in range(len(ids) - k, len(ids)))


def test_planted_preferences_acc_and_acc_norm(model):
    table = bigram_table(PLANTED)
    docs = [mc.Doc("Q", ("a", "bbbbbbbb"), (1,)),  # acc picks "a" (-3.1 vs -4.6); per char "b"s win
            mc.Doc("Q", ("a", "c"), (0,)),  # "a" wins both ways
            mc.Doc("Q", ("a", "bbbbbbbb"), (0,))]  # same as the first, the other gold
    res = mc.evaluate(model, CharTokenizer(), docs, [d.text for d in docs], progress=False)
    expect = [[_ll(table, "Q", " " + c) for c in d.choices] for d in docs]
    assert expect[0] == pytest.approx([-0.1 - 3.0, -0.1 - 1.0 - 7 * 0.5])
    for item, e in zip(res["items"], expect):
        np.testing.assert_allclose(item["lls"], e, atol=1e-5)
    assert [(i["pred"], i["pred_norm"]) for i in res["items"]] == [(0, 1), (0, 0), (0, 1)]
    m = res["metrics"]
    assert (m["acc"], m["acc_norm"]) == pytest.approx((2 / 3, 2 / 3))
    assert m["acc_stderr"] == pytest.approx(np.std([0, 1, 1], ddof=1) / math.sqrt(3))


def test_acc_norm_divides_by_characters_of_the_choice_and_ties_go_first():
    assert mc.predictions([-4.0, -6.0], ["ab", "abcdef"]) == (0, 1)  # -2/char vs -1/char
    assert mc.predictions([-2.0, -2.0], ["x", "y"]) == (0, 0)
    assert mc.predictions([-2.0, -1.0], ["x", "y"]) == (1, 1)
    assert mc.predictions([-2.0, -1.0], ["xxxx", "y"]) == (1, 0)  # -0.5 vs -1 per character


def test_encode_pair_moves_trailing_space_and_adds_bos():
    tok = CharTokenizer()
    ctx, cont = mc.encode_pair(tok, "Answer: ", "yes")
    assert ctx == [1] + list(b"Answer:") and cont == list(b" yes")
    ctx, cont = mc.encode_pair(tok, "", " yes", add_bos=False)  # an empty context still gets a prefix token
    assert ctx == [1] and cont == list(b" yes")
    ctx, cont = mc.encode_pair(tok, "Q:", " no", add_bos=False)
    assert ctx == list(b"Q:")


MMLU = [
    {"question": " What is 2+2? ", "choices": ["3", "4", "5", "6"], "answer": 1, "subject": "elementary_mathematics"},
    {"question": "Sky colour?", "choices": ["red", "blue", "green", "grey"], "answer": "B", "subject": "astronomy"},
]
DEV = [
    {"question": "1+1?", "choices": ["2", "3", "4", "5"], "answer": 0, "subject": "elementary_mathematics"},
    {"question": "Sun is a?", "choices": ["star", "moon", "rock", "gas"], "answer": 0, "subject": "astronomy"},
    {"question": "3*3?", "choices": ["6", "9", "12", "3"], "answer": 1, "subject": "elementary_mathematics"},
    {"question": "2-1?", "choices": ["1", "0", "2", "3"], "answer": 0, "subject": "elementary_mathematics"},
]


def test_mmlu_first_n_shots_from_the_same_subject_exact_string():
    docs = [mc.to_doc(r, "mmlu") for r in MMLU]
    pool = [mc.to_doc(r, "mmlu") for r in DEV]
    assert docs[1].gold == (1,) and docs[1].choices == ("A", "B", "C", "D")
    ctxs = mc.contexts(docs[:1], "mmlu", num_shots=2, pool=pool, sampler="first_n")
    assert ctxs[0] == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "1+1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer: A\n\n"
        "3*3?\nA. 6\nB. 9\nC. 12\nD. 3\nAnswer: B\n\n"
        "What is 2+2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    with pytest.raises(ValueError, match="2-shot prompts need 2 examples"):  # astronomy has one dev item
        mc.contexts(docs[1:], "mmlu", num_shots=2, pool=pool, sampler="first_n")


def test_random_shots_are_seeded_and_never_the_current_item():
    docs = [mc.Doc(f"q{i}:", (f"a{i}", "z"), (0,)) for i in range(6)]
    two = docs[:2]
    assert mc.contexts(two, "plain", num_shots=1) == ["q1: a1\n\nq0:", "q0: a0\n\nq1:"]
    a = mc.contexts(docs, "plain", num_shots=5, seed=7)
    assert a == mc.contexts(docs, "plain", num_shots=5, seed=7)
    assert a != mc.contexts(docs, "plain", num_shots=5, seed=8)
    for i, ctx in enumerate(a):  # all five others, in a seeded order, then the item itself
        shots = ctx.split("\n\n")
        assert shots[-1] == f"q{i}:" and sorted(shots[:-1]) == [f"q{j}: a{j}" for j in range(6) if j != i]
    # limited runs: the first 2 items drawing shots from all 6 get the prompts of a full run
    assert mc.contexts(docs[:2], "plain", num_shots=5, seed=7, pool=docs, same_pool=True) == a[:2]
    # a separate pool holding a copy of the evaluated item: the copy is never a shot
    ctx = mc.contexts([docs[0]], "plain", num_shots=2, pool=docs[:3], sampler="first_n")[0]
    assert ctx == "q1: a1\n\nq2: a2\n\nq0:"
    assert fewshot.select(3, range(10), 0) == []


def test_formats():
    hs = mc.to_doc({"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.",
                    "ctx_b": "he STARTS",
                    "endings": ["is using wrap [title] to wrap.", "  starts  pulling up roofing. "],
                    "label": "1"}, "hellaswag")
    assert hs.text == "Roof shingle removal: A man is sitting on a roof. He starts"
    assert hs.choices == ("is using wrap. to wrap.", "starts pulling up roofing.") and hs.gold == (1,)
    arc = mc.to_doc({"question": "Which is a gas?", "choices": {"text": ["ice", "steam"], "label": ["1", "2"]},
                     "answerKey": "2"}, "arc")
    assert (arc.text, arc.choices, arc.gold) == ("Question: Which is a gas?\nAnswer:", ("ice", "steam"), (1,))
    tqa = mc.to_doc({"question": "Is the sky blue?",
                     "mc1_targets": {"choices": ["Yes.", "No."], "labels": [1, 0]}}, "truthfulqa_mc1")
    assert tqa.text.startswith("Q: What is human life expectancy in the United States?\nA: Human life")
    assert tqa.text.endswith("held in Barcelona, Spain.\n\nQ: Is the sky blue?\nA:") and tqa.gold == (0,)
    plain = mc.to_doc({"query": "2+2=", "choices": ["4", "5"], "gold": [0, 1]}, "plain")
    assert plain.gold == (0, 1)
    with pytest.raises(ValueError, match="needs the field 'endings'"):
        mc.to_doc({"activity_label": "x", "ctx_a": "y", "ctx_b": "z", "label": 0}, "hellaswag")
    with pytest.raises(ValueError, match="outside the 2 choices"):
        mc.to_doc({"query": "q", "choices": ["a", "b"], "gold": 2}, "plain")


def test_long_contexts_lose_tokens_on_the_left(model):
    doc = mc.Doc("Q" * 200, ("a", "bbbbbbbb"), (1,))
    res = mc.evaluate(model, CharTokenizer(), [doc], [doc.text], progress=False)
    assert res["metrics"]["truncated"] == 2
    # the bigram model only sees the previous token: the scores are those of the short context
    short = mc.evaluate(model, CharTokenizer(), [doc], ["Q"], progress=False)
    np.testing.assert_allclose(res["items"][0]["lls"], short["items"][0]["lls"], atol=1e-5)
