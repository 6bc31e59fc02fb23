"""SFT data (data/sft.py): record shapes, chat templates, assistant-only loss masks, packing with
masks, truncation, the synthetic source and bad input. Tokenizers are built here (no download)."""

import json
import logging
import random
import re

import grain
import numpy as np
import pytest

from data import pipeline, sft, synthetic
from data.sources import DataError, EmptySourceError, SourceSpec, read_all, synthetic_seed
from tests.helpers import llama3_style_tokenizer

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
          "{% endif %}")
CHATML = ("{%- for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}")
# The end of an assistant turn as each template writes it (what the loss covers after the content).
TURN_END = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>\n"}

_ALPHABET = "abcdefghijklmnopqrstuvwxyz  ABCXYZ0123456789.,;:!?'()-=+*/éüßñ日本語✓"


def _text(r: random.Random, lo=1, hi=60) -> str:
    words = ["".join(r.choice(_ALPHABET) for _ in range(r.randint(1, 9))) for _ in range(r.randint(lo, hi))]
    return " ".join(w.strip() or "x" for w in words)


def _chat(r: random.Random, turns: int, system: bool = True) -> list[dict]:
    msgs = [{"role": "system", "content": _text(r)}] if system else []
    for _ in range(turns):
        msgs += [{"role": "user", "content": _text(r)}, {"role": "assistant", "content": _text(r)}]
    return msgs


def _runs(mask) -> int:
    """Maximal runs of 1s."""
    m = np.asarray(mask)
    return int(((m[1:] == 1) & (m[:-1] == 0)).sum() + (m[0] == 1))


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory):
    """Loom's sentencepiece tokenizer (exact round trip, no chat template), trained on a slice of the
    embedded corpus."""
    from data import corpus
    from data.tokenizer import corpus_tokenizer

    texts = corpus.load("validation").texts[:40]
    return corpus_tokenizer(lambda: texts, fingerprint="sft-test", vocab_size=512,
                            directory=tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A byte-level BPE (Llama 3 style: its post-processor adds BOS) saved by transformers with the
    Llama 3 chat template."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    fast = llama3_style_tokenizer(700, LLAMA3, extra_specials=("<|im_start|>", "<|im_end|>"))
    path = tmp_path_factory.mktemp("hf")
    fast.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------
# Masks


def test_sentencepiece_offsets_tile_the_text(sp_tok):
    r = random.Random(100)
    for _ in range(20):
        text = _text(r) + "\n\t 🙂 </s>"
        ids, offsets = sp_tok.encode_with_offsets(text)
        assert ids == sp_tok.encode(text) and len(offsets) == len(ids)
        # spans are in order and tile the text (a character split into bytes: empty spans, then its span)
        assert "".join(text[a:b] for a, b in offsets) == text
        assert all(b0 <= a1 for (_, b0), (a1, _) in zip(offsets, offsets[1:]))


def test_default_template_with_loom_sentencepiece(sp_tok):
    r = random.Random(101)
    msgs = _chat(r, 3)
    msgs[1]["content"] += " </s> <s>"  # BOS / EOS spelled in a message are text, not specials
    chat = sft.ChatTokenizer(sp_tok)
    assert chat.template == sft.DEFAULT_CHAT_TEMPLATE  # a sentencepiece model has no template of its own
    ids, mask = chat.tokenize(msgs)
    # the expected tokens, built turn by turn: BOS, then "<|role|>\n" + content + EOS per turn
    want_ids, want_mask = [sp_tok.bos_id], [0]
    for m in msgs:
        head, body = sp_tok.encode(f"<|{m['role']}|>\n"), sp_tok.encode(m["content"])
        loss = int(m["role"] == "assistant")
        want_ids += head + body + [sp_tok.eos_id]
        want_mask += [0] * len(head) + [loss] * (len(body) + 1)
    assert ids.tolist() == want_ids and mask.tolist() == want_mask
    assert ids.tolist().count(sp_tok.bos_id) == 1 and ids.tolist().count(sp_tok.eos_id) == len(msgs)
    assert _runs(mask) == 3  # every assistant turn
    assert sp_tok.decode(ids[mask == 1]) == "".join(m["content"] for m in msgs if m["role"] == "assistant")
    assert chat.render(msgs[:2], add_generation_prompt=True) == \
        f"<s><|system|>\n{msgs[0]['content']}</s><|user|>\n{msgs[1]['content']}</s><|assistant|>\n"
    # the generation prompt serving sends is the training chat up to the first assistant token
    first = int(np.argmax(mask))
    assert chat.prompt_ids(msgs[:2]) == ids[:first].tolist()


def _reference_mask(ref, messages, template):
    """The char-span definition, computed with transformers alone: assistant turn i covers
    [len(render(m[:i], generation prompt)), len(render(m[:i+1]))); a token is in when its first
    character is."""
    full = ref.apply_chat_template(messages, tokenize=False, chat_template=template)
    spans = [(len(ref.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True,
                                          chat_template=template)),
              len(ref.apply_chat_template(messages[:i + 1], tokenize=False, chat_template=template)))
             for i, m in enumerate(messages) if m["role"] == "assistant"]
    enc = ref(full, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [int(any(a <= s < b for a, b in spans)) for s, _ in enc["offset_mapping"]]


@pytest.mark.parametrize("name", ["llama3", "chatml"])
def test_hf_tokenizer_matches_transformers(hf_dir, name):
    transformers = pytest.importorskip("transformers")
    from data.tokenizer.hf import load_hf_tokenizer

    ref = transformers.AutoTokenizer.from_pretrained(hf_dir)
    tok = load_hf_tokenizer(hf_dir)
    template = {"llama3": None, "chatml": CHATML}[name]  # llama3: the tokenizer's own
    chat = sft.ChatTokenizer(tok, template)
    r = random.Random(202 if name == "llama3" else 203)
    for turns, system in ((1, False), (3, True)):
        msgs = _chat(r, turns, system)
        ids, mask = chat.tokenize(msgs)
        want = ref.apply_chat_template(msgs, tokenize=True, chat_template=template or LLAMA3)["input_ids"]
        assert ids.tolist() == want
        assert ids.tolist().count(ref.bos_token_id) == (1 if name == "llama3" else 0)  # never a second BOS
        ref_ids, ref_mask = _reference_mask(ref, msgs, template or LLAMA3)
        assert ref_ids == want and mask.tolist() == ref_mask
        assert _runs(mask) == turns
        # the loss covers exactly each assistant reply and its end of turn
        replies = [m["content"].strip() if name == "llama3" else m["content"] for m in msgs if m["role"] == "assistant"]
        assert ref.decode(ids[mask == 1].tolist()) == "".join(c + TURN_END[name] for c in replies)
        assert ref.decode(ids[mask == 0].tolist()).count(TURN_END[name].strip()) == turns + system


def test_chat_template_choice(hf_dir, sp_tok, tmp_path):
    from data.tokenizer.hf import load_hf_tokenizer

    tok = load_hf_tokenizer(hf_dir)
    assert sft.chat_template_for(tok) == LLAMA3 == sft.chat_template_for(tok, "default")
    assert sft.chat_template_for(tok, "loom") == sft.DEFAULT_CHAT_TEMPLATE
    assert sft.chat_template_for(sp_tok, CHATML) == CHATML
    (tmp_path / "t.jinja").write_text(CHATML)
    assert sft.chat_template_for(sp_tok, str(tmp_path / "t.jinja")) == CHATML
    with pytest.raises(ValueError, match=r"chat_template='nope' is neither .* \(it has \['default'\]\)"):
        sft.chat_template_for(tok, "nope")
    # Loom's default with a Hugging Face tokenizer: its BOS / EOS are special tokens by name
    ids, mask = sft.ChatTokenizer(tok, "loom").tokenize([{"role": "user", "content": "hi there"},
                                                          {"role": "assistant", "content": "yes"}])
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and mask[-1] == 1
    assert tok.decode(ids[mask == 1].tolist()) == "yes<|end_of_text|>"
    import jinja2

    with pytest.raises(jinja2.TemplateSyntaxError):  # a broken template fails at once, not per record
        sft.ChatTokenizer(sp_tok, "{% for m in messages %}")


# ---------------------------------------------------------------------------------------------
# Record shapes


def test_schemas_detected_and_forced(tmp_path):
    r = random.Random(303)
    t = [_text(r, 1, 8) for _ in range(12)]
    records = [
        {"messages": [{"role": "system", "content": t[0]}, {"role": "user", "content": t[1]},
                      {"role": "assistant", "content": t[2]}], "id": 7},
        {"prompt": t[3], "completion": t[4]},
        {"prompt": [{"role": "user", "content": t[5]}], "completion": [{"role": "assistant", "content": t[6]}]},
        {"instruction": t[7], "input": t[8], "output": t[9]},
        {"instruction": t[10], "input": "", "output": t[11]},
    ]
    p = _write_jsonl(tmp_path / "mixed.jsonl", records)
    got = [rec["messages"] for rec in read_all(SourceSpec("m", "jsonl", path=str(p), schema="auto"))]
    assert got == [records[0]["messages"],
                   [{"role": "user", "content": t[3]}, {"role": "assistant", "content": t[4]}],
                   [{"role": "user", "content": t[5]}, {"role": "assistant", "content": t[6]}],
                   [{"role": "user", "content": f"{t[7]}\n\n{t[8]}"}, {"role": "assistant", "content": t[9]}],
                   [{"role": "user", "content": t[10]}, {"role": "assistant", "content": t[11]}]]
    spec = SourceSpec("m", "jsonl", path=str(p))
    for i, schema in enumerate(("messages", "prompt_completion", "prompt_completion", "alpaca", "alpaca")):
        assert sft.detect_schema(records[i], spec) == schema
        forced = SourceSpec("m", "jsonl", path=str(p), schema=schema)
        assert sft.record_messages(records[i], forced) == got[i]
    # a forced schema reads only its own fields
    with pytest.raises(sft.ChatRecordError, match="missing field 'instruction'"):
        sft.record_messages(records[1], SourceSpec("m", "jsonl", path=str(p), schema="alpaca"))
    # only format and path: the SFT config gives schema "auto"
    (spec,) = sft.specs_from_config({"chat": {"format": "jsonl", "path": str(p)}})
    assert spec.schema == "auto" and len(list(read_all(spec))) == 5
    with pytest.raises(ValueError, match=r"source 'chat': schema='xml' is not valid"):
        sft.specs_from_config({"chat": {"format": "jsonl", "path": str(p), "schema": "xml"}})


def test_field_overrides(tmp_path):
    r = random.Random(404)
    t = [_text(r, 1, 8) for _ in range(8)]
    cases = [
        (dict(messages_field="conv.turns"),
         {"conv": {"turns": [{"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]}]}},
         [{"role": "user", "content": t[0]}, {"role": "assistant", "content": t[1]}]),
        (dict(prompt_field="q", completion_field="a"), {"q": t[2], "a": t[3]},
         [{"role": "user", "content": t[2]}, {"role": "assistant", "content": t[3]}]),
        (dict(instruction_field="task", input_field="context", output_field="response"),
         {"task": t[4], "context": t[5], "response": t[6], "output": "not this one"},
         [{"role": "user", "content": f"{t[4]}\n\n{t[5]}"}, {"role": "assistant", "content": t[6]}]),
    ]
    for k, (fields, record, want) in enumerate(cases):
        p = _write_jsonl(tmp_path / f"{k}.jsonl", [record])
        (spec,) = sft.specs_from_config({"s": {"format": "jsonl", "path": str(p), **fields}})
        assert [rec["messages"] for rec in read_all(spec)] == [want]
        # with the default field names the same record is not recognised
        default = SourceSpec("s", "jsonl", path=str(p), schema="auto", strict=True)
        with pytest.raises(DataError, match=rf"{p}:1: unknown record shape"):
            list(read_all(default))


# ---------------------------------------------------------------------------------------------
# Packing and truncation


def _chat_records(r: random.Random, n: int, lo=1, hi=12):
    out = []
    for _ in range(n):
        msgs = _chat(r, r.randint(1, 3), system=r.random() < 0.5)
        for m in msgs:
            m["content"] = _text(r, lo, hi)
        out.append({"messages": msgs})
    return out


def _doc_key(targets) -> tuple:
    return tuple(np.asarray(targets).tolist())


@pytest.mark.parametrize("packing", ["concat", "best_fit", "first_fit"])
def test_packing_carries_loss_masks_exactly(tmp_path, sp_tok, packing):
    r = random.Random(505)
    p = _write_jsonl(tmp_path / "chats.jsonl", _chat_records(r, 60, 1, 6))
    spec = SourceSpec("c", "jsonl", path=str(p), schema="auto")
    seq = 256
    docs = list(sft.sft_docs([spec], sp_tok, seq_len=seq, shuffle=False, num_epochs=1))
    assert len(docs) == 60 and all(len(d["targets"]) <= seq for d in docs)
    chat = sft.ChatTokenizer(sp_tok)
    for d, rec in zip(docs, json.loads("[" + ",".join(p.read_text().splitlines()) + "]")):
        ids, mask = chat.tokenize(rec["messages"])  # the unpacked example
        if len(ids) - 1 <= seq:
            assert d["targets"].tolist() == ids[1:].tolist() and d["loss_mask"].tolist() == mask[1:].tolist()
    rows = list(pipeline.pack(grain.MapDataset.source(docs).to_iter_dataset(), seq_len=seq, packing=packing,
                              num_packing_bins=8, features=sft.FEATURES))
    assert set(rows[0]) == set(pipeline.BATCH_KEYS) | {"source_BT", "truncated_BT", "dropped_BT"}
    by_key = {_doc_key(d["targets"]): d for d in docs}
    stream_t, stream_m = [], []
    for row in rows:
        seg, lm = row["segment_ids_BT"], row["loss_mask_BT"]
        assert lm.dtype == np.float32 and set(np.unique(lm)) <= {0.0, 1.0}
        assert (lm[seg == 0] == 0).all()
        for s in np.unique(seg[seg > 0]):
            m = seg == s
            assert np.array_equal(row["positions_BT"][m], np.arange(m.sum()))
            if packing == "concat":  # examples continue across rows: compare the streams below
                stream_t.append(row["targets_BT"][m])
                stream_m.append(lm[m])
            else:  # every example whole in one segment, with its own mask
                d = by_key[_doc_key(row["targets_BT"][m])]
                assert np.array_equal(lm[m], d["loss_mask"]) and np.array_equal(row["inputs_BT"][m], d["inputs"])
    if packing == "concat":
        np.testing.assert_array_equal(np.concatenate(stream_t), np.concatenate([d["targets"] for d in docs]))
        np.testing.assert_array_equal(np.concatenate(stream_m), np.concatenate([d["loss_mask"] for d in docs]))
    else:
        assert sum(int((np.unique(r_["segment_ids_BT"]) > 0).sum()) for r_ in rows) == len(docs)
    total = sum(r_["loss_mask_BT"].sum() for r_ in rows)
    assert total == sum(d["loss_mask"].sum() for d in docs) > 0
    # prompt tokens take room but no loss
    assert total < sum((r_["segment_ids_BT"] > 0).sum() for r_ in rows)


def test_truncate_and_drop_are_counted(tmp_path, sp_tok):
    r = random.Random(606)
    records = _chat_records(r, 40, 1, 30)
    # an example whose only reply lies beyond seq_len: truncation leaves it nothing to learn
    records.insert(20, {"messages": [{"role": "user", "content": _text(r, 200, 200)},
                                     {"role": "assistant", "content": "late"}]})
    records.append({"messages": [{"role": "user", "content": "a short last one"},
                                 {"role": "assistant", "content": "ok"}]})
    p = _write_jsonl(tmp_path / "chats.jsonl", records)
    spec = SourceSpec("c", "jsonl", path=str(p), schema="messages")
    seq = 96
    chat = sft.ChatTokenizer(sp_tok)
    full = [chat.tokenize(rec["messages"]) for rec in records]
    long = [(ids, mask) for ids, mask in full if len(ids) - 1 > seq]
    cut_ok = sum(1 for _, mask in long if mask[1:seq + 1].any())
    assert 5 <= cut_ok < len(long)  # the test covers both kinds of long example
    for truncation, want in (("truncate", (cut_ok, len(long) - cut_ok)), ("drop", (0, len(long)))):
        batches = list(sft.sft_batches([spec], sp_tok, seq_len=seq, batch_size=3, truncation=truncation,
                                       shuffle=False, num_epochs=1, drop_remainder=False))
        counts = sft.example_counts({k: np.concatenate([b[k] for b in batches])
                                     for k in ("truncated_BT", "dropped_BT")})
        seg = np.concatenate([b["segment_ids_BT"] for b in batches])
        examples = sum(int((np.unique(s) > 0).sum()) for s in seg)
        assert (counts["truncated"], counts["dropped"]) == want and examples == len(records) - want[1]
    # a truncated example keeps its first seq_len targets and their mask
    docs = list(sft.sft_docs([spec], sp_tok, seq_len=seq, shuffle=False, num_epochs=1))
    kept = [(ids, mask) for ids, mask in full if len(ids) - 1 <= seq or mask[1:seq + 1].any()]
    assert len(docs) == len(kept)
    for d, (ids, mask) in zip(docs, kept):
        n = min(len(ids) - 1, seq)
        assert d["targets"].tolist() == ids[1:n + 1].tolist() and d["loss_mask"].tolist() == mask[1:n + 1].tolist()
        assert d["truncated"][0] == int(len(ids) - 1 > seq) and d["truncated"][1:].sum() == 0


def test_pretraining_rows_are_unchanged_and_refuse_chats(tmp_path):
    from tests.data.test_pipeline import CharTokenizer

    r = random.Random(707)
    docs = [_text(r) for _ in range(30)]
    rows = list(pipeline.pack(grain.MapDataset.source(docs).map(pipeline.TokenizeDocument(CharTokenizer()))
                              .to_iter_dataset(), seq_len=32, packing="best_fit", num_packing_bins=4))
    assert set(rows[0]) == set(pipeline.BATCH_KEYS) | {"source_BT"}
    assert all((row["loss_mask_BT"] == (row["segment_ids_BT"] > 0)).all() for row in rows)
    p = _write_jsonl(tmp_path / "c.jsonl", _chat_records(r, 2))
    with pytest.raises(ValueError, match=r"source 'c': schema='auto' reads chats, which SFT trains on"):
        pipeline.source_batches([SourceSpec("c", "jsonl", path=str(p), schema="auto")], CharTokenizer(), seq_len=8,
                                batch_size=2)


def test_text_sources_keep_their_tokenizer_fingerprints():
    """The SFT fields of SourceSpec leave a text source's fingerprint (the key of its cached
    tokenizer) as it was before they existed; setting one changes it."""
    from data.tokenizer import sources_fingerprint

    spec = SourceSpec("t", "tfds", path="some_dataset", text_field="body")  # no files: the spec alone
    assert sources_fingerprint([spec]) == "b6edad208da306b2"  # the value before the SFT fields
    assert sources_fingerprint([SourceSpec("t", "tfds", path="some_dataset", text_field="body", schema="auto")]) \
        != "b6edad208da306b2"


# ---------------------------------------------------------------------------------------------
# The synthetic source, sharding and resume


def test_synthetic_source_examples_are_verified(sp_tok):
    n = 40
    spec = SourceSpec("arith", "synthetic", task="addition", size=4, num_examples=n, schema="auto")
    want = synthetic.examples("addition", n, seed=synthetic_seed("train"), size=4)
    docs = list(sft.sft_docs([spec], sp_tok, seq_len=64, shuffle=False, num_epochs=1))
    assert len(docs) == n
    task = synthetic.get("addition")
    for d, ex in zip(docs, want):
        reply = sp_tok.decode(d["targets"][d["loss_mask"] == 1])  # the assistant tokens (EOS decodes to "")
        assert reply == ex["answer"] and task.verify(reply, ex["answer"])
        assert d["targets"][d["loss_mask"] == 1][-1] == sp_tok.eos_id
        prompt = sp_tok.decode(d["inputs"][d["loss_mask"] == 0])
        assert ex["prompt"] in prompt and not task.verify(prompt.split("\n")[-1], ex["answer"])
    # the same source reads as plain text for pretraining, and splits differ
    assert [rec["text"] for rec in read_all(SourceSpec("arith", "synthetic", task="addition", size=4,
                                                       num_examples=n))] == [e["prompt"] + e["answer"] for e in want]
    valid = read_all(SourceSpec("a", "synthetic", task="addition", size=4, num_examples=n, split="validation"))
    assert [rec["text"] for rec in valid] != [e["prompt"] + e["answer"] for e in want]
    # shards are disjoint and cover the epoch
    shards = [[rec["line"] for rec in read_all(spec, shard_index=k, shard_count=3)] for k in range(3)]
    assert sorted(sum(shards, [])) == list(range(1, n + 1)) and all(shards)


@pytest.mark.parametrize("num_workers,packing", [(0, "best_fit"), (2, "concat")])
def test_sft_batches_resume_exactly(tmp_path, sp_tok, num_workers, packing):
    """A mixture of a JSONL chat source and a synthetic one; the state goes through JSON."""
    r = random.Random(808)
    p = _write_jsonl(tmp_path / "chats.jsonl", _chat_records(r, 50, 1, 8))
    specs = [SourceSpec("chat", "jsonl", path=str(p), schema="auto", weight=2.0),
             SourceSpec("arith", "synthetic", task="multiplication", num_examples=100, schema="auto")]
    kw = dict(seq_len=128, batch_size=4, seed=3, packing=packing, shuffle_window=8, num_workers=num_workers)
    it = iter(sft.sft_batches(specs, sp_tok, **kw))
    for _ in range(6):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(4)]
    it2 = iter(sft.sft_batches(specs, sp_tok, **kw))
    it2.set_state(state)
    for a, b in zip(expected, (next(it2) for _ in range(4))):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert {0, 1} <= set(np.unique(np.concatenate([b["source_BT"] for b in expected])))  # both sources
    assert sum(b["loss_mask_BT"].sum() for b in expected) > 0


def test_sharded_sft_batches_are_the_shards_rows(sp_tok):
    specs = [SourceSpec("arith", "synthetic", task="reverse", num_examples=64, schema="auto")]
    kw = dict(seq_len=64, seed=1, shuffle=False)
    sharded = sft.sharded_sft_batches(specs, sp_tok, batch_size=4, num_shards=2, shard_ids=[0, 1], **kw)
    parts = [iter(sft.sft_batches(specs, sp_tok, batch_size=2, shard_index=k, shard_count=2, **kw)) for k in (0, 1)]
    for _ in range(3):
        got, want = next(sharded), [next(it) for it in parts]
        for k in got:
            np.testing.assert_array_equal(got[k], np.concatenate([w[k] for w in want]))
    assert set(sharded.shard_states()) == {0, 1}


# ---------------------------------------------------------------------------------------------
# Bad input


def _bad_source(tmp_path, bad_record, strict):
    r = random.Random(909)
    good = _chat_records(r, 3)
    p = _write_jsonl(tmp_path / "data.jsonl", [good[0], good[1], bad_record, good[2]])
    return p, SourceSpec("s", "jsonl", path=str(p), schema="auto", strict=strict)


@pytest.mark.parametrize("bad_record,reason", [
    ({"question": "q", "answer": "a"}, "unknown record shape"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
     r"chat has no assistant turn \(roles \['system', 'user'\]\)"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": None}]},
     r"messages\[1\] \(assistant\) has content of type NoneType"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "tool", "content": "t"},
                   {"role": "assistant", "content": "a"}]},
     "the chat template failed to render this chat: TemplateError: Loom's default chat template has the roles"),
    ({"messages": [{"role": "user", "content": "u\ufdd1"}, {"role": "assistant", "content": "a"}]},
     r"message 0 \(user\) field 'content' holds U\+FDD0 or U\+FDD1"),
])
def test_bad_records_name_file_and_line_or_are_skipped(tmp_path, sp_tok, caplog, bad_record, reason):
    p, strict = _bad_source(tmp_path, bad_record, True)
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:3: {reason}"):
        list(sft.sft_docs([strict], sp_tok, seq_len=256, shuffle=False, num_epochs=1))
    _, lenient = _bad_source(tmp_path, bad_record, False)
    with caplog.at_level(logging.WARNING):
        docs = list(sft.sft_docs([lenient], sp_tok, seq_len=256, shuffle=False, num_epochs=1))
    assert len(docs) == 3  # the three good chats; the bad one never reaches training
    assert any(f"{p}:3" in rec.getMessage() for rec in caplog.records)


def test_template_breaking_the_prefix_property_is_an_error(tmp_path, sp_tok):
    # renders only the last assistant reply (as Qwen3 drops the <think> of earlier turns)
    template = ("{% for m in messages %}<{{ m['role'] }}>"
                "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}"
                "{{ m['content'] }}{% endif %}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    r = random.Random(1010)
    one, two = _chat(r, 1, False), _chat(r, 2, False)
    assert sft.tokenize_chat(sp_tok, one, template=template)[1].sum() > 0  # one turn is fine
    with pytest.raises(sft.TemplatePrefixError, match="breaks the prefix property at message 1"):
        sft.tokenize_chat(sp_tok, two, template=template)
    p = _write_jsonl(tmp_path / "c.jsonl", [{"messages": one}, {"messages": two}])
    spec = SourceSpec("c", "jsonl", path=str(p), schema="messages")  # not strict: still an error
    with pytest.raises(DataError, match=rf"^{re.escape(str(p))}:2: the chat template breaks the prefix property"):
        list(sft.sft_docs([spec], sp_tok, seq_len=512, chat_template=template, num_epochs=1))


def test_missing_file_and_bad_configs(tmp_path, sp_tok, monkeypatch):
    missing = tmp_path / "nope" / "chats.jsonl"
    with pytest.raises(FileNotFoundError, match=rf"source 'chat': no jsonl files match '{re.escape(str(missing))}'"):
        sft.sft_batches([SourceSpec("chat", "jsonl", path=str(missing), schema="auto")], sp_tok, seq_len=8,
                        batch_size=2)
    with pytest.raises(ValueError, match="format 'text' gives plain text, which holds no chat"):
        SourceSpec("t", "text", path="x.txt", schema="messages")
    with pytest.raises(ValueError, match=r"format 'synthetic' needs a task; task='adition' is not one of"):
        SourceSpec("s", "synthetic", task="adition")
    with pytest.raises(ValueError, match="truncation='left' is not valid"):
        sft.sft_docs([SourceSpec("s", "synthetic", task="copy", schema="auto")], sp_tok, seq_len=8,
                     truncation="left")
    # every example too long: a clear error, not an endless loop
    monkeypatch.setattr(sft, "MAX_SKIPPED_WITHOUT_EXAMPLE", 50)
    spec = SourceSpec("s", "synthetic", task="copy", size=30, num_examples=7, schema="auto")
    with pytest.raises(EmptySourceError, match=r"source 's' \(synthetic:train\) yielded 0 SFT examples: 50 longer "
                                               r"than seq_len=8 \(dropped\).*stopped after 50 records"):
        next(iter(sft.sft_docs([spec], sp_tok, seq_len=8, truncation="drop")))
    with pytest.raises(EmptySourceError, match=r"yielded 0 SFT examples: 7 longer than seq_len=8 \(no assistant"):
        list(sft.sft_docs([spec], sp_tok, seq_len=8, num_epochs=1))


# ---------------------------------------------------------------------------------------------
# Held-out split, plain text, stop tokens, packed logits


def test_heldout_chats_never_reach_training(tmp_path, sp_tok):
    from data.sources import split_heldout

    r = random.Random(1001)
    p = _write_jsonl(tmp_path / "chats.jsonl", _chat_records(r, 80, 1, 6))
    (spec,) = sft.specs_from_config({"chat": {"format": "jsonl", "path": str(p)}})
    (train,), (held,) = split_heldout([spec], fraction=0.1, min_records=5, max_records=100)

    def keys(s, **kw):
        return {_doc_key(d["targets"]) for d in sft.sft_docs([s], sp_tok, seq_len=512, num_epochs=1, **kw)}

    a, b = keys(train), keys(held, shuffle=False)
    assert len(b) == 8 and not a & b and a | b == keys(spec) and len(a) == 72
    # several epochs of shuffled training (as a run reads it) see no held-out example either
    seen = {_doc_key(d["targets"]) for _, d in zip(range(300), sft.sft_docs([train], sp_tok, seq_len=512, seed=4))}
    assert seen == a


def test_text_sources_train_every_token(tmp_path, sp_tok):
    docs = ["def f(x):\n    return x + 1\n", "import os\nprint(os.sep)\n" * 20]
    p = _write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    (spec,) = sft.specs_from_config({"code": {"format": "jsonl", "path": str(p), "schema": "text"}})
    got = list(sft.sft_docs([spec], sp_tok, seq_len=64, shuffle=False, num_epochs=1))
    for d, text in zip(got, docs):  # [bos] + tokens + [eos], every target trained, nothing cut
        ids = [sp_tok.bos_id] + sp_tok.encode(text) + [sp_tok.eos_id]
        assert d["inputs"].tolist() == ids[:-1] and d["targets"].tolist() == ids[1:]
        assert d["loss_mask"].all() and not d["truncated"].any() and not d["dropped"].any()
    rows = list(sft.sft_batches([spec], sp_tok, seq_len=64, batch_size=1, shuffle=False, num_epochs=1,
                                packing="concat", drop_remainder=False))
    assert sum(int(b["loss_mask_BT"].sum()) for b in rows) == sum(len(d["targets"]) for d in got)


def test_stop_ids_include_the_templates_end_of_turn(hf_dir, sp_tok):
    from data.tokenizer.hf import load_hf_tokenizer

    tok = load_hf_tokenizer(hf_dir)
    eos, eot, im_end = tok.eos_id, tok.encode("<|eot_id|>"), tok.encode("<|im_end|>")
    assert len(eot) == 1 and len(im_end) == 1 and eot != [eos]
    assert sft.ChatTokenizer(tok).stop_ids() == [eos] + eot  # Llama 3: <|eot_id|> ends a turn
    assert sft.ChatTokenizer(tok, CHATML).stop_ids() == [eos] + im_end  # ChatML: <|im_end|>
    assert sft.ChatTokenizer(tok, "loom").stop_ids() == [eos]  # Loom's template ends turns with EOS
    assert sft.ChatTokenizer(sp_tok).stop_ids() == [sp_tok.eos_id]
    # a turn ending in plain text (here a blank line) adds no stop token
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n\n' }}{% endfor %}"
    assert sft.ChatTokenizer(tok, plain).stop_ids() == [eos]


def test_packed_logits_equal_each_example_alone(tmp_path, sp_tok):
    """A packed SFT row (several examples, segment ids and restarting positions) gives every
    example the logits it gets run alone (float32, 1e-5)."""
    import jax

    from models import transformer as T
    from tests.helpers import tiny_model_config

    seq = 256
    graphdef, params = T.split_params(T.build(tiny_model_config(vocab_size=sp_tok.vocab_size, max_seq_len=seq), seed=3))
    logits = jax.jit(lambda batch: T.apply(graphdef, params, batch))
    r = random.Random(1101)
    p = _write_jsonl(tmp_path / "chats.jsonl", _chat_records(r, 24, 1, 4))
    spec = SourceSpec("c", "jsonl", path=str(p), schema="auto")
    batch = next(iter(sft.sft_batches([spec], sp_tok, seq_len=seq, batch_size=2, shuffle=False, num_packing_bins=4)))
    seg = batch["segment_ids_BT"]
    packed = np.asarray(logits({k: batch[k] for k in ("inputs_BT", "positions_BT", "segment_ids_BT")}))
    assert packed.dtype == np.float32
    where = [(b, seg[b] == s) for b in range(len(seg)) for s in np.unique(seg[b][seg[b] > 0])]
    assert len(where) >= 6 and all(len(np.unique(s[s > 0])) >= 3 for s in seg)  # several examples per row
    # each example alone in a row of its own: its tokens first, then padding it cannot see
    alone_in = np.zeros((len(where), seq), np.int32)
    alone_seg = np.zeros((len(where), seq), np.int32)
    for i, (b, m) in enumerate(where):
        alone_in[i, :m.sum()], alone_seg[i, :m.sum()] = batch["inputs_BT"][b][m], 1
    alone = np.asarray(logits({"inputs_BT": alone_in, "segment_ids_BT": alone_seg,
                               "positions_BT": np.broadcast_to(np.arange(seq, dtype=np.int32), alone_in.shape)}))
    for i, (b, m) in enumerate(where):
        np.testing.assert_allclose(packed[b][m], alone[i, :m.sum()], atol=1e-5, rtol=0)
