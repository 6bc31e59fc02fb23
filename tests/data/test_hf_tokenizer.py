"""data.tokenizer.hf against transformers.AutoTokenizer on tokenizers built here (no download)."""

import inspect
import io
import json
import os
import pickle

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from data.tokenizer.hf import (HFSentencePieceTokenizer, HFTokenizer, load_hf_tokenizer,  # noqa: E402
                               render_chat_template)

# A ChatML template with the constructs real templates use: a namespace, loop controls,
# raise_exception, tojson on non-ASCII text and the special tokens by name.
CHATML = """{%- set ns = namespace(system=false) -%}
{%- for m in messages -%}
  {%- if m['role'] not in ['system', 'user', 'assistant'] -%}
    {{- raise_exception('unknown role ' + m['role']) -}}
  {%- endif -%}
  {%- if m['role'] == 'system' -%}{%- set ns.system = true -%}{%- endif -%}
  {%- if loop.index0 > 6 -%}{%- break -%}{%- endif -%}
<|im_start|>{{ m['role'] }}
{% if m.get('tool') %}{{ m['tool'] | tojson }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}
{%- if not ns.system %}{{ eos_token }}{% endif -%}"""

TEXTS = ["hello world", "def f(x):\n    return  x + 1\n\n\tdone  ", "ünïcödé — 日本語 ✓ 🙂",
         "special <|im_start|>inside<|im_end|> text", "", " leading and trailing spaces  "]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Wie geht's? ✓"},
            {"role": "assistant", "content": "Gut.", "tool": {"name": "ü", "args": [1, 2]}}]


def _corpus():
    return [open(inspect.getfile(m), encoding="utf-8").read() for m in (os, inspect, json)]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE (GPT-2 / Llama 3 / Qwen style) with a post-processor that adds BOS."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                       special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                                pad_token="<|pad|>")
    fast.chat_template = CHATML
    path = tmp_path_factory.mktemp("bpe")
    fast.save_pretrained(path)
    return path


def test_tokenizer_json_matches_transformers(bpe_dir):
    ref = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    tok = load_hf_tokenizer(bpe_dir)
    assert isinstance(tok, HFTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (ref.bos_token_id, ref.eos_token_id,
                                                                    ref.pad_token_id, len(ref))
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert tok.encode(text, add_special_tokens=True) == ref.encode(text), text
        assert tok.decode(ids) == ref.decode(ids) == text  # byte-level BPE round-trips exactly
        offsets = ref(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert tok.encode_with_offsets(text) == (ids, [tuple(o) for o in offsets]), text
    ids = tok.encode("a <|im_start|>b<|im_end|>", add_special_tokens=True)
    assert tok.decode(ids) == ref.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_chat_template_matches_transformers(bpe_dir):
    assert (bpe_dir / "chat_template.jinja").is_file()  # where transformers 5 saves it
    ref = transformers.AutoTokenizer.from_pretrained(bpe_dir)
    tok = load_hf_tokenizer(bpe_dir)
    for messages in (MESSAGES, MESSAGES[1:2]):
        for gen in (False, True):
            text = tok.apply_chat_template(messages, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            assert tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True) == \
                ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
    assert '{"name": "ü", "args": [1, 2]}' in tok.apply_chat_template(MESSAGES)  # tojson keeps non-ASCII
    assert tok.apply_chat_template(MESSAGES[1:2]).endswith("<|eos|>")  # special tokens by name
    with pytest.raises(Exception, match="unknown role tool"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


def test_legacy_layout_and_pickling(bpe_dir, tmp_path):
    """Older saves keep the template inside tokenizer_config.json and specials in special_tokens_map.json."""
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "default", "template": CHATML}, {"name": "tool_use", "template": "TOOLS{{ messages | length }}"}]}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<|bos|>", "lstrip": False}, "eos_token": "<|eos|>"}))
    tok = load_hf_tokenizer(tmp_path / "tokenizer.json")
    fresh = load_hf_tokenizer(bpe_dir)
    assert (tok.bos_id, tok.eos_id) == (fresh.bos_id, fresh.eos_id)
    assert tok.pad_id == tok.eos_id  # no pad token: EOS stands in
    assert tok.apply_chat_template(MESSAGES) == fresh.apply_chat_template(MESSAGES)
    assert tok.apply_chat_template(MESSAGES, template="tool_use") == "TOOLS3"
    clone = pickle.loads(pickle.dumps(tok))  # grain workers receive tokenizers by value
    assert clone.encode(TEXTS[2]) == tok.encode(TEXTS[2]) and clone.chat_template == tok.chat_template
    assert render_chat_template("{{ messages[0]['content'] }}{{ x }}", [{"role": "user", "content": "a"}], x=1) == "a1"


def test_sentencepiece_model_matches_transformers(tmp_path):
    import sentencepiece as spm

    out = io.BytesIO()
    lines = [line for text in _corpus() for line in text.split("\n") if line.strip()]
    # Gemma's settings: no normalisation, no dummy prefix, whitespace kept, byte fallback
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=out, vocab_size=400, model_type="bpe", byte_fallback=True,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_by_whitespace=False, minloglevel=2,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>")
    (tmp_path / "tokenizer.model").write_bytes(out.getvalue())
    template = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] | trim }}"
                "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
         "unk_token": "<unk>", "add_bos_token": True, "chat_template": template}))
    tok = load_hf_tokenizer(tmp_path)
    assert isinstance(tok, HFSentencePieceTokenizer)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 1, 0, 400)
    assert (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id) == (2, 1, 0)
    sp = spm.SentencePieceProcessor(model_proto=out.getvalue())
    for text in TEXTS[:4]:
        ids = tok.encode(text)
        assert ids == sp.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == text
        assert tok.encode(text, add_special_tokens=True) == ref.encode(text) == [2] + ids
        with_offsets = tok.encode_with_offsets(text)
        assert with_offsets[0] == ids and "".join(text[a:b] for a, b in with_offsets[1]) == text
    text = "<start_of_turn>user\nhello ✓<end_of_turn>"  # added tokens inside the text
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text) and ids[0] == 4
    assert offsets[0] == (0, 15) and offsets[-1] == (len(text) - 13, len(text))
    assert "".join(text[a:b] for a, b in offsets) == text
    for gen in (False, True):
        messages = [{"role": "user", "content": "hello there "}, {"role": "model", "content": "hi"}]
        text = tok.apply_chat_template(messages, add_generation_prompt=gen)
        assert text == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        ids = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
        assert ids == ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
        assert ids[0] == 2 and ids.count(4) == len(messages) + gen  # <bos> and <start_of_turn> as single ids
        assert tok.decode(ids) == text
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode(TEXTS[1]) == tok.encode(TEXTS[1])


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json or tokenizer.model in .*; found \['config.json'\]"):
        load_hf_tokenizer(tmp_path)
