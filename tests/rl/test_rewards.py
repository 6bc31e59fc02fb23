"""Verifiable rewards (rl/rewards.py)."""

import pytest

from rl import rewards


def test_gsm8k_extraction():
    assert rewards.gsm8k_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert rewards.gsm8k_answer("#### $1,234.") == "1234"
    assert rewards.gsm8k_answer("#### 7.0 apples") == "7"
    assert rewards.gsm8k_answer("#### -3.5") == "-3.5"
    assert rewards.gsm8k_answer("#### 1 #### 2") == "2"  # the last one counts
    assert rewards.gsm8k_answer("the answer is 7") is None
    assert rewards.gsm8k_answer("#### seven") is None
    assert rewards.gsm8k("work...\n#### 1,234", "#### 1234") == 1.0
    assert rewards.gsm8k("#### 1235", "1234") == 0.0
    assert rewards.gsm8k("1234", "1234") == 0.0  # no '####': no answer


def test_exact_and_format_rewards():
    exact = rewards.make("exact", task="addition")
    assert exact(" 1399\n", {"answer": "1399"}) == 1.0
    assert exact("13990", {"answer": "1399"}) == 0.0
    fmt = rewards.make("format", pattern=r"^\d+$")
    assert fmt("42", {}) == 1.0 and fmt("42 apples", {}) == 0.0
    with pytest.raises(ValueError, match="kind='bleu' is not valid"):
        rewards.make("bleu")
    with pytest.raises(ValueError, match="unknown synthetic task 'nope'"):
        rewards.make("exact", task="nope")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        rewards.make("format", pattern="(")
