"""Preference data (data/preferences.py): the HH-RLHF and UltraFeedback shapes, chat or text,
response-only masks, pair batches, held-out splits, overlong pairs and bad input."""

import json
import random

import numpy as np
import pytest

from data import preferences, synthetic
from data.sources import DataError, EmptySourceError, SourceSpec, read_all
from tests.data.test_sft_data import LLAMA3, _text


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    from data import corpus
    from data.tokenizer import corpus_tokenizer

    texts = corpus.load("validation").texts[:40]
    return corpus_tokenizer(lambda: texts, fingerprint="pref-test", vocab_size=512,
                            directory=tmp_path_factory.mktemp("sp"))


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _msgs(*pairs):
    return [{"role": role, "content": content} for role, content in pairs]


def _hh(r):
    prompt = f"\n\nHuman: {_text(r, 1, 8)}\n\nAssistant: {_text(r, 1, 8)}\n\nHuman: {_text(r, 1, 8)}\n\nAssistant:"
    return prompt, " " + _text(r, 1, 10), " " + _text(r, 1, 10)


def test_record_shapes_are_detected_and_split_into_prompt_and_responses():
    r = random.Random(0)
    spec = SourceSpec(name="p", format="jsonl", path="x", schema="preference")
    prompt, c, j = _hh(r)
    # HH-RLHF: the prompt is the common prefix up to the last shared Assistant marker, even when the
    # responses share their first characters
    got = preferences.record_pair({"chosen": prompt + " Sure, 4", "rejected": prompt + " Sure, 5"}, spec)
    assert got == {"prompt": prompt, "chosen": " Sure, 4", "rejected": " Sure, 5"}
    assert preferences.record_pair({"chosen": prompt + c, "rejected": prompt + j}, spec)["prompt"] == prompt
    # UltraFeedback-binarized: a prompt string and whole conversations, whose prompt turn is removed
    q = _text(r)
    uf = {"prompt": q, "chosen": _msgs(("user", q), ("assistant", "yes")), "rejected": _msgs(("user", q), ("assistant", "no")),
          "score_chosen": 8.0}
    assert preferences.record_pair(uf, spec) == {"prompt": _msgs(("user", q)), "chosen": _msgs(("assistant", "yes")),
                                                 "rejected": _msgs(("assistant", "no"))}
    # TRL's explicit form with responses only, and its implicit form (message lists sharing the prompt)
    trl = {"prompt": _msgs(("system", "s"), ("user", q)), "chosen": _msgs(("assistant", "a")),
           "rejected": _msgs(("assistant", "b"))}
    assert preferences.record_pair(trl, spec)["prompt"] == trl["prompt"]
    implicit = {"chosen": trl["prompt"] + trl["chosen"], "rejected": trl["prompt"] + trl["rejected"]}
    assert preferences.record_pair(implicit, spec) == trl
    # plain strings, field names overridden (dots reach nested keys)
    spec2 = SourceSpec(name="p", format="jsonl", path="x", schema="explicit_prompt", prompt_field="q",
                       chosen_field="a.good", rejected_field="a.bad")
    assert preferences.record_pair({"q": "2+2=", "a": {"good": "4", "bad": "5"}}, spec2) == {
        "prompt": "2+2=", "chosen": "4", "rejected": "5"}


@pytest.mark.parametrize("record,kind", [
    ({"text": "x"}, "unknown_shape"),
    ({"chosen": "a", "rejected": ["b"]}, "bad_message"),
    ({"chosen": "a", "rejected": _msgs(("assistant", "b"))}, "mixed_types"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}, "no_shared_prompt"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant:"}, "empty_response"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: a\n\nAssistant: b"}, "identical"),
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "p", "chosen": _msgs(("user", "more")), "rejected": _msgs(("assistant", "b"))}, "no_assistant"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "not_string"),
])
def test_bad_records_name_their_reason(record, kind):
    from data.sft import ChatRecordError

    with pytest.raises(ChatRecordError) as e:
        preferences.record_pair(record, SourceSpec(name="p", format="jsonl", path="x", schema="preference"))
    assert e.value.kind == kind


def _decode_masked(tok, row_ids, row_targets, row_mask):
    ids = [int(t) for t, m in zip(row_targets, row_mask) if m]
    return ids, tok.decode(ids)


@pytest.mark.parametrize("render", ["chat", "text"])
def test_masks_cover_the_response_only_and_rows_hold_whole_sequences(sp_tok, tmp_path, render):
    r = random.Random(1)
    recs = [dict(zip(("prompt", "chosen", "rejected"), _hh(r))) for _ in range(3)]
    recs = [{"chosen": x["prompt"] + x["chosen"], "rejected": x["prompt"] + x["rejected"]} for x in recs]
    recs += [{"prompt": _text(r, 1, 8), "chosen": _text(r, 1, 8), "rejected": _text(r, 1, 8)} for _ in range(3)]
    path = _jsonl(tmp_path / "p.jsonl", recs)
    spec = SourceSpec(name="p", format="jsonl", path=str(path), schema="preference")
    pairs = [rec["pair"] for rec in read_all(spec)]
    b = next(iter(preferences.preference_batches([spec], sp_tok, seq_len=256, batch_size=6, shuffle=False,
                                                 num_epochs=1, render=render)))
    assert {k: v.shape for k, v in b.items() if k.endswith("BCT")} == {k: (6, 2, 256) for k in preferences.PAIR_KEYS}
    pt = preferences.PairTokenizer(sp_tok, render=render)
    for i, pair in enumerate(pairs):
        sides = pt.tokenize(pair)
        for c, side in enumerate(("chosen", "rejected")):
            ids, mask = sides[c]
            n = len(ids)
            row = {k: b[k][i, c] for k in preferences.PAIR_KEYS}
            np.testing.assert_array_equal(row["inputs_BCT"][:n], ids)
            np.testing.assert_array_equal(row["targets_BCT"][:n - 1], ids[1:])
            assert (row["segment_ids_BCT"][:n] == 1).all() and (row["segment_ids_BCT"][n:] == 0).all()
            np.testing.assert_array_equal(row["positions_BCT"][:n], np.arange(n))
            assert row["loss_mask_BCT"][n - 1:].sum() == 0
            got_ids, text = _decode_masked(sp_tok, row["inputs_BCT"], row["targets_BCT"], row["loss_mask_BCT"])
            assert got_ids[-1] == sp_tok.eos_id  # the response ends with its end of turn / EOS
            want = pair[side].lstrip(" ") if render == "chat" else pair[side]
            assert text.strip() == want.strip()
        # the two sides share their prompt tokens exactly
        (ci, cm), (ri, rm) = sides
        p = int(np.argmax(cm))
        assert p == int(np.argmax(rm)) and (ci[:p] == ri[:p]).all()


def test_chat_pairs_use_the_template_and_mask_only_turns_after_the_prompt(tmp_path):
    pytest.importorskip("transformers")
    from data.tokenizer.hf import load_hf_tokenizer
    from tests.helpers import llama3_style_tokenizer

    fast = llama3_style_tokenizer(700, LLAMA3)
    fast.save_pretrained(tmp_path / "tok")
    tok = load_hf_tokenizer(tmp_path / "tok")
    prompt = _msgs(("user", "hi"), ("assistant", "earlier answer"), ("user", "and now?"))
    pair = {"prompt": prompt, "chosen": _msgs(("assistant", "good one")), "rejected": _msgs(("assistant", "bad"))}
    (ids, mask), _ = preferences.PairTokenizer(tok).tokenize(pair)
    text = tok.decode([int(i) for i, m in zip(ids, mask) if m])
    assert text == "good one<|eot_id|>"  # the earlier assistant turn is prompt: not marked
    assert ids.tolist() == fast.apply_chat_template(prompt + pair["chosen"], tokenize=True)["input_ids"]


def test_synthetic_pairs_prefer_the_answer_over_a_near_miss(sp_tok):
    spec = SourceSpec(name="a", format="synthetic", task="addition", size=1, schema="preference", num_examples=50)
    recs = list(read_all(spec))
    assert len(recs) == 50
    for rec in recs:
        p = rec["pair"]
        a, b = map(int, p["prompt"].rstrip("=").split("+"))
        assert p["chosen"] == str(a + b) and p["rejected"] != p["chosen"] and p["rejected"].isdigit()
    assert recs[3]["pair"] == list(read_all(spec))[3]["pair"]  # deterministic
    assert synthetic.distractor("reverse", "abcd", 1) != "abcd"


def test_held_out_split_of_a_pair_source_is_disjoint(sp_tok, tmp_path):
    """The training sources' held-out split (data/sources.py `split_heldout`, as SFT's) on pairs."""
    from data.sources import split_heldout

    r = random.Random(2)
    recs = [{"prompt": f"q{i} " + _text(r, 1, 3), "chosen": "yes", "rejected": "no"} for i in range(200)]
    spec = SourceSpec(name="p", format="jsonl", path=str(_jsonl(tmp_path / "p.jsonl", recs)), schema="preference")
    (train,), (held,) = split_heldout([spec], fraction=0.1, min_records=4, max_records=100)

    def prompts(s):
        it = preferences.preference_batches([s], sp_tok, seq_len=64, batch_size=1, shuffle=False, num_epochs=1,
                                            render="text")
        return {sp_tok.decode([int(t) for t in b["inputs_BCT"][0, 0] if t]).split(" ")[0] for b in it}

    t, h = prompts(train), prompts(held)
    assert not t & h and len(t | h) == 200 and len(h) == 20


def test_overlong_pairs_are_truncated_or_dropped_and_counted(sp_tok, tmp_path):
    long = " ".join(["word"] * 200)
    recs = [{"prompt": "p", "chosen": "short", "rejected": long}, {"prompt": long, "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "ok", "rejected": "fine"}]
    spec = SourceSpec(name="p", format="jsonl", path=str(_jsonl(tmp_path / "p.jsonl", recs)), schema="preference")
    for truncation, want in (("truncate", (1, 1, 2)), ("drop", (0, 2, 1))):
        it = preferences.preference_batches([spec], sp_tok, seq_len=32, batch_size=1, shuffle=False, num_epochs=1,
                                            truncation=truncation, render="text")
        batches = list(it)
        counts = preferences.pair_counts({k: np.concatenate([b[k] for b in batches]) for k in batches[0]})
        assert (counts["truncated"], counts["dropped"], len(batches)) == want
        assert all((b["segment_ids_BCT"].sum(-1) <= 32).all() for b in batches)


def test_bad_input_names_file_and_line(sp_tok, tmp_path, caplog):
    recs = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"question": "x", "answer": "y"},
            {"prompt": "p", "chosen": "c", "rejected": "d"}]
    path = _jsonl(tmp_path / "p.jsonl", recs)
    strict = SourceSpec(name="p", format="jsonl", path=str(path), schema="preference", strict=True)
    with pytest.raises(DataError, match=r"p\.jsonl:2: unknown record shape \(fields \['answer', 'question'\]\)"):
        list(preferences.preference_batches([strict], sp_tok, seq_len=32, batch_size=1, shuffle=False, num_epochs=1))
    lenient = SourceSpec(name="p", format="jsonl", path=str(path), schema="preference")
    with caplog.at_level("WARNING"):
        got = list(preferences.preference_batches([lenient], sp_tok, seq_len=32, batch_size=1, shuffle=False,
                                                  num_epochs=1))
    assert len(got) == 2 and "p.jsonl:2 (unknown record shape" in caplog.text
    empty = _jsonl(tmp_path / "e.jsonl", [{"question": "x"}] * 3)
    spec = SourceSpec(name="e", format="jsonl", path=str(empty), schema="preference")
    with pytest.raises(EmptySourceError, match="yielded 0"):
        next(iter(preferences.preference_batches([spec], sp_tok, seq_len=32, batch_size=1, num_epochs=None)))
    with pytest.raises(ValueError, match="schema='auto'"):
        preferences.specs_from_config({"x": {"format": "jsonl", "path": str(path), "schema": "auto"}})


def test_parquet_and_hf_datasets_sources(sp_tok, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"prompt": f"question {i}", "chosen": _msgs(("user", f"question {i}"), ("assistant", "right")),
             "rejected": _msgs(("user", f"question {i}"), ("assistant", "wrong"))} for i in range(8)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "uf.parquet")
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    for fmt, path in (("parquet", tmp_path / "uf.parquet"), ("hf", tmp_path / "hf")):
        spec = SourceSpec(name=fmt, format=fmt, path=str(path), schema="preference")
        got = [rec["pair"] for rec in read_all(spec)]
        assert len(got) == 8 and got[5] == {"prompt": _msgs(("user", "question 5")),
                                             "chosen": _msgs(("assistant", "right")),
                                             "rejected": _msgs(("assistant", "wrong"))}


def test_eval_batches_are_padded_with_empty_pairs(sp_tok):
    spec = SourceSpec(name="a", format="synthetic", task="addition", size=1, schema="preference", num_examples=10)
    batches = preferences.eval_pair_batches([spec], sp_tok, batch_size=4, num_pairs=16, seq_len=32)
    assert len(batches) == 4 and all(len(b["source_B"]) == 4 for b in batches)
    real = [int((b["loss_mask_BCT"].sum(-1) > 0).all(-1).sum()) for b in batches]
    assert real == [4, 4, 2, 0]
