"""GGUF export (inference/gguf_io.py, `python -m inference.export`): the file read back with
gguf's own reader against the model's parameters and the sentencepiece model, and, when
llama-cpp-python is installed, llama.cpp's logits, greedy tokens and tokenizer against Loom's."""

from __future__ import annotations

import json
import math
import pathlib

import jax
import numpy as np
import pytest

from tests.helpers import run_program, tiny_model_config

gguf = pytest.importorskip("gguf", reason="the gguf package (llama.cpp's gguf-py) is not installed")

from data.tokenizer import start_ids, train_sentencepiece  # noqa: E402
from inference import gguf_io  # noqa: E402
from models import transformer as T  # noqa: E402

Q = gguf.GGMLQuantizationType
TOK_VOCAB, MODEL_VOCAB = 320, 384  # the token list is padded to the embedding's 384 rows
TEXTS = ["Hello world", "  two leading spaces and  double", "line one\nline two\n\n    indented(x)\n",
         "unicode: café naïve 日本語 🙂", "def f(x):\n    return x + 1\n", "<s> is text here </s>"]
LLAMA_CPP_REASON = ("llama-cpp-python is not installed (CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python "
                    "builds it from source in a few minutes)")


def random_model(cfg, seed: int = 0):
    """A model of `cfg` with every parameter drawn (in numpy: no initializer to compile) at a scale
    that gives peaked logits, so greedy tokens do not hinge on rounding: norms 1 + 0.1 N, the
    embedding N(0, 1), kernels N(0, 1 / fan_in), biases 0.1 N."""
    graphdef, shapes = T.split_params(T.abstract_model(cfg))
    rng = np.random.default_rng(seed)

    def draw(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        noise = rng.standard_normal(x.shape).astype(np.float32)
        if names[-1] == "scale":
            return 1.0 + 0.1 * noise
        if names[-1] == "bias":
            return 0.1 * noise
        if names == ["embed"]:
            return noise
        fan_in = {"o": cfg.num_heads * cfg.head_dim, "down": cfg.intermediate_size}.get(names[-2], cfg.hidden_size)
        return noise / np.float32(math.sqrt(fan_in))

    params = jax.tree_util.tree_map_with_path(lambda p, x: jax.numpy.asarray(draw(p, x), x.dtype), shapes)
    return T.merge_params(graphdef, params)


def tiny_config(**overrides):
    base = dict(vocab_size=MODEL_VOCAB, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, head_dim=32, max_seq_len=128)  # head_dim x heads != hidden: key_length matters
    return tiny_model_config(**{**base, **overrides})


def write_workdir(path: pathlib.Path, model, tokenizer) -> pathlib.Path:
    from models.checkpoint import save_params

    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(path / "tokenizer.model")
    save_params(path / "checkpoints" / "5" / "params", T.split_params(model)[1])
    (path / "config.json").write_text(json.dumps({"model": model.config.to_dict()}))
    return path


@pytest.fixture(scope="module")
def tokenizer():
    from data import synthetic

    texts = [synthetic.format_example(e) for name in synthetic.TASKS for e in synthetic.examples(name, 40)]
    texts += ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x + 1\n"] * 10
    return train_sentencepiece(texts, vocab_size=TOK_VOCAB, num_threads=1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer):
    """A random untied llama-shaped model, its workdir, and its f32 / f16 / q8_0 exports."""
    model = random_model(tiny_config(), seed=0)
    root = tmp_path_factory.mktemp("gguf")
    files = {t: root / f"model-{t}.gguf" for t in gguf_io.TYPES}
    summaries = {t: gguf_io.export_gguf(model, tokenizer, f, type=t) for t, f in files.items()}
    return dict(model=model, tokenizer=tokenizer, files=files, summaries=summaries, root=root,
                workdir=write_workdir(root / "run", model, tokenizer))


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def tensor_values(t) -> np.ndarray:
    """A tensor of a GGUFReader as float32 in numpy order (rows last-dim contiguous)."""
    if t.tensor_type == Q.Q8_0:
        return gguf.quants.dequantize(t.data, Q.Q8_0)
    return np.asarray(t.data, np.float32)


def expected_tensors(model) -> dict[str, np.ndarray]:
    """What each GGUF tensor holds, in Hugging Face's [out, in] row layout, from the Loom parameters
    directly (not through models.hf): q / k still in Loom's rotate-half row order."""
    cfg = model.config
    p = jax.tree.map(np.asarray, T.split_params(model)[1])
    d = cfg.hidden_size
    out = {"token_embd.weight": p["embed"], "output_norm.weight": p["final_norm"]["scale"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = p["lm_head"]["kernel"].T
    for i in range(cfg.num_layers):
        a, m, b = p["layers"]["attn"], p["layers"]["mlp"], f"blk.{i}."
        out.update({
            b + "attn_norm.weight": p["layers"]["attn_norm"]["scale"][i],
            b + "ffn_norm.weight": p["layers"]["mlp_norm"]["scale"][i],
            b + "attn_q.weight": a["q"]["kernel"][i].reshape(d, -1).T,
            b + "attn_k.weight": a["k"]["kernel"][i].reshape(d, -1).T,
            b + "attn_v.weight": a["v"]["kernel"][i].reshape(d, -1).T,
            b + "attn_output.weight": a["o"]["kernel"][i].reshape(-1, d).T,
            b + "ffn_gate.weight": m["gate"]["kernel"][i].T,
            b + "ffn_up.weight": m["up"]["kernel"][i].T,
            b + "ffn_down.weight": m["down"]["kernel"][i].T,
        })
        if cfg.attention_bias:
            out.update({b + f"attn_{x}.bias": a[x]["bias"][i].reshape(-1) for x in "qkv"})
        if cfg.qk_norm:
            out.update({b + f"attn_{x}_norm.weight": a[f"{x}_norm"]["scale"][i] for x in "qk"})
    return out


def reference_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's row order, spelled out: in each head, row 2i takes row i and 2i + 1 takes i + H/2."""
    h = w.shape[0] // heads
    out = np.empty_like(w)
    for n in range(heads):
        for i in range(h // 2):
            out[n * h + 2 * i] = w[n * h + i]
            out[n * h + 2 * i + 1] = w[n * h + h // 2 + i]
    return out


# --------------------------------------------------------------------------------------------
# The file, read back


def test_tensors_names_shapes_types_and_values(exported):
    model, cfg = exported["model"], exported["model"].config
    want = expected_tensors(model)
    for qk, heads in (("attn_q", cfg.num_heads), ("attn_k", cfg.num_kv_heads)):
        for i in range(cfg.num_layers):
            want[f"blk.{i}.{qk}.weight"] = reference_permute(want[f"blk.{i}.{qk}.weight"], heads)
    for type_, path in exported["files"].items():
        reader = gguf.GGUFReader(path)
        got = {t.name: t for t in reader.tensors}
        assert sorted(got) == sorted(want), type_
        for name, t in got.items():
            w = want[name]
            assert tuple(int(n) for n in t.shape) == w.shape[::-1], name  # ggml's ne: row length first
            one_d = w.ndim == 1
            expected_type = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}[type_] if not one_d else Q.F32
            assert t.tensor_type == expected_type, (type_, name, t.tensor_type)
            x = tensor_values(t).reshape(w.shape)
            if t.tensor_type == Q.F32:
                np.testing.assert_array_equal(x, w.astype(np.float32), err_msg=name)
            elif t.tensor_type == Q.F16:  # round to nearest: half an f16 ulp
                assert np.all(np.abs(x - w) <= np.abs(w) * 2.0 ** -11 + 2.0 ** -25), name
            else:  # Q8_0, per block of 32: q = round(x / d), d = amax / 127 stored as f16, so
                # |q d16 - x| <= d / 2 + 127 |d16 - d| <= d (1/2 + 127 x 2^-11)
                blocks, err = w.reshape(-1, 32), np.abs(x - w).reshape(-1, 32)
                bound = np.abs(blocks).max(axis=1, keepdims=True) / 127 * (0.5 + 127 * 2.0 ** -11) + 1e-7
                assert np.all(err <= bound), name
        assert exported["summaries"][type_]["tensors"] == len(want)


def test_q8_0_keeps_rows_that_do_not_divide_by_32_in_f16(tokenizer, tmp_path):
    model = random_model(tiny_config(hidden_size=48, head_dim=16, intermediate_size=96, num_heads=3,
                                          num_kv_heads=1), seed=4)
    reader = gguf.GGUFReader(gguf_io.export_gguf(model, tokenizer, tmp_path / "m.gguf", type="q8_0")["path"])
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_gate.weight"] == Q.F16  # rows of 48
    assert types["blk.0.ffn_down.weight"] == Q.Q8_0  # rows of 96 = 3 blocks
    assert types["blk.0.attn_norm.weight"] == Q.F32


def test_qk_permutation_undone_is_the_kernel(exported):
    cfg = exported["model"].config
    p = T.split_params(exported["model"])[1]["layers"]["attn"]
    reader = gguf.GGUFReader(exported["files"]["f32"])
    got = {t.name: tensor_values(t) for t in reader.tensors}
    for i in range(cfg.num_layers):
        for x, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
            kernel = np.asarray(p[x]["kernel"][i])  # [D, heads, H]
            rows = got[f"blk.{i}.attn_{x}.weight"].reshape(heads * cfg.head_dim, cfg.hidden_size)
            assert not np.array_equal(rows, kernel.reshape(cfg.hidden_size, -1).T)  # it is permuted
            back = gguf_io.unpermute_rope_rows(rows, heads)
            np.testing.assert_array_equal(back.T.reshape(kernel.shape), kernel)


def test_hyperparameters_and_tokenizer_metadata(exported, tokenizer):
    from data.sft import DEFAULT_CHAT_TEMPLATE

    import sentencepiece as spm

    cfg = exported["model"].config
    sp = spm.SentencePieceProcessor(model_file=str(exported["workdir"] / "tokenizer.model"))
    for type_, path in exported["files"].items():
        f = fields(gguf.GGUFReader(path))
        assert f["general.architecture"] == "llama"
        assert f["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[type_]
        want = {"context_length": cfg.max_seq_len, "embedding_length": cfg.hidden_size,
                "block_count": cfg.num_layers, "feed_forward_length": cfg.intermediate_size,
                "attention.head_count": cfg.num_heads, "attention.head_count_kv": cfg.num_kv_heads,
                "attention.key_length": cfg.head_dim, "attention.value_length": cfg.head_dim,
                "rope.dimension_count": cfg.head_dim, "vocab_size": cfg.vocab_size}
        for k, v in want.items():
            assert f[f"llama.{k}"] == v, k
        assert f["llama.rope.freq_base"] == pytest.approx(cfg.rope_theta)
        assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.norm_eps)
        assert "llama.rope.scaling.type" not in f
    f = fields(gguf.GGUFReader(exported["files"]["q8_0"]))
    tokens, types, scores = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], f["tokenizer.ggml.scores"]
    assert len(tokens) == len(types) == len(scores) == MODEL_VOCAB  # = the embedding's rows
    assert tokens[:TOK_VOCAB] == [sp.id_to_piece(i) for i in range(TOK_VOCAB)]
    assert tokens[TOK_VOCAB:] == [f"[PAD{i}]" for i in range(TOK_VOCAB, MODEL_VOCAB)]
    np.testing.assert_allclose(scores[:TOK_VOCAB], [sp.get_score(i) for i in range(TOK_VOCAB)])
    kind = {"<unk>": 2, "<s>": 3, "</s>": 3, "<pad>": 3, "\n": 4, "<0x41>": 6, "\u2581": 1}
    for piece, t in kind.items():
        assert types[sp.piece_to_id(piece)] == t, piece
    assert set(types[TOK_VOCAB:]) == {5}
    assert f["tokenizer.ggml.model"] == "llama"
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (tokenizer.bos_id, tokenizer.eos_id)
    assert f["tokenizer.ggml.unknown_token_id"] == sp.unk_id()
    assert f["tokenizer.ggml.add_space_prefix"] is False
    assert f["tokenizer.ggml.add_bos_token"] is True and start_ids(tokenizer) == [tokenizer.bos_id]
    assert f["tokenizer.chat_template"] == DEFAULT_CHAT_TEMPLATE
    assert exported["summaries"]["q8_0"]["padded_tokens"] == MODEL_VOCAB - TOK_VOCAB


def test_rope_scaling(tokenizer, tmp_path):
    from models.transformer import rope_frequencies

    cfg = tiny_config(rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                      rope_high_freq_factor=4.0, rope_original_max_seq_len=32, rope_theta=500000.0)
    reader = gguf.GGUFReader(gguf_io.export_gguf(random_model(cfg), tokenizer, tmp_path / "l3.gguf")["path"])
    factors = {t.name: tensor_values(t) for t in reader.tensors}["rope_freqs.weight"]
    plain = rope_frequencies(cfg.replace(rope_scaling="none"))
    # llama.cpp divides the plain frequencies by these: Loom's scaled frequencies are the reference
    np.testing.assert_allclose(np.asarray(plain) / factors, rope_frequencies(cfg), rtol=1e-6)
    assert factors.min() == 1.0 and factors.max() == 8.0 and len(factors) == cfg.head_dim // 2

    cfg = tiny_config(rope_scaling="linear", rope_scaling_factor=2.0)
    f = fields(gguf.GGUFReader(gguf_io.export_gguf(random_model(cfg), tokenizer, tmp_path / "lin.gguf")["path"]))
    assert f["llama.rope.scaling.type"] == "linear" and f["llama.rope.scaling.factor"] == 2.0

    with pytest.raises(ValueError, match=r"rope_scaling='yarn' \(exportable: none, linear, llama3\)"):
        gguf_io.export_gguf(T.abstract_model(tiny_config(rope_scaling="yarn", rope_scaling_factor=4.0)), tokenizer,
                            tmp_path / "yarn.gguf")


def test_qwen2_and_qwen3_architectures(tokenizer, tmp_path):
    for overrides, arch, extra in ((dict(attention_bias=True, head_dim=16), "qwen2", "blk.0.attn_q.bias"),
                                   (dict(qk_norm=True, tie_embeddings=True), "qwen3", "blk.0.attn_q_norm.weight")):
        model = random_model(tiny_config(**overrides), seed=2)
        s = gguf_io.export_gguf(model, tokenizer, tmp_path / f"{arch}.gguf")
        reader = gguf.GGUFReader(s["path"])
        got = {t.name: tensor_values(t) for t in reader.tensors}
        want = expected_tensors(model)
        assert s["architecture"] == arch and fields(reader)["general.architecture"] == arch
        assert extra in got and sorted(got) == sorted(want)
        for name, w in want.items():  # NEOX RoPE: q and k rows stay in Loom's order
            np.testing.assert_array_equal(got[name].reshape(w.shape), w, err_msg=name)
    with pytest.raises(ValueError, match=r"llama.cpp's qwen2 needs num_heads x head_dim = hidden_size; this model "
                                         r"has 4 x 32 != 64"):
        gguf_io.export_gguf(T.abstract_model(tiny_config(attention_bias=True)), tokenizer, tmp_path / "x.gguf")


def test_unsupported_models_and_types_are_refused(tokenizer, tmp_path):
    cases = [
        (dict(moe=dict(num_experts=4, experts_per_token=2)), ["mixture-of-experts layers (model.moe.num_experts=4)"]),
        (dict(position_embedding="alibi"), ["position_embedding='alibi'"]),
        (dict(position_embedding="learned", norm="layernorm", logit_softcap=30.0, sliding_window=16, mlp_bias=True),
         ["position_embedding='learned'", "norm='layernorm'", "final logit soft-cap", "sliding-window attention",
          "MLP biases"]),
        (dict(gated_mlp=False, activation="gelu"), ["non-gated MLP", "activation='gelu'"]),
    ]
    for overrides, named in cases:
        with pytest.raises(ValueError) as e:
            gguf_io.export_gguf(T.abstract_model(tiny_config(**overrides)), tokenizer, tmp_path / "x.gguf")
        message = str(e.value)
        assert all(n in message for n in named), message
        assert "Supported: llama (" in message and "qwen2" in message
        assert not (tmp_path / "x.gguf").exists()
    model = T.abstract_model(tiny_config())
    with pytest.raises(ValueError, match=r"GGUF type 'q4_0' is not supported; expected one of f32, f16, q8_0"):
        gguf_io.export_gguf(model, tokenizer, tmp_path / "x.gguf", type="q4_0")
    with pytest.raises(ValueError, match="more than the model's vocab_size=256"):
        gguf_io.export_gguf(T.abstract_model(tiny_config(vocab_size=256)), tokenizer, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="the chat template does not compile: TemplateSyntaxError"):
        gguf_io.export_gguf(model, tokenizer, tmp_path / "x.gguf", chat_template="{% for m in messages %}")
    unigram = train_sentencepiece(["The quick brown fox jumps over the lazy dog."] * 50, vocab_size=300,
                                  model_type="unigram", num_threads=1)
    with pytest.raises(ValueError, match="a sentencepiece UNIGRAM tokenizer: llama.cpp reproduces sentencepiece BPE "
                                         "models only"):
        gguf_io.export_gguf(model, unigram, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_modelfile(exported, tmp_path):
    from data.sft import ChatTokenizer

    tok = exported["tokenizer"]
    path = gguf_io.write_modelfile(exported["files"]["f32"], tok)
    text = path.read_text()
    assert path == exported["files"]["f32"].with_name("Modelfile")
    assert "FROM ./model-f32.gguf\n" in text
    # Loom's default template written by hand: no BOS (Ollama adds it), EOS after every turn
    assert ('TEMPLATE """{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}</s>{{ end }}<|assistant|>\n"""'
            in text)
    assert 'PARAMETER stop "</s>"' in text

    chatml = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    turn = '{{ if eq .Role "@" }}<|im_start|>@\n{{ .Content }}<|im_end|>\n'
    want = ("{{ range .Messages }}" + turn.replace("@", "system")
            + turn.replace("@", "user").replace("{{ if", "{{ else if")
            + turn.replace("@", "assistant").replace("{{ if", "{{ else if")
            + "{{ end }}{{ end }}<|im_start|>assistant\n")
    assert gguf_io.go_template(ChatTokenizer(tok, chatml), add_bos=True) == want
    trimmed = chatml.replace("m['content']", "m['content'] | trim")  # rewrites content: not simple
    assert gguf_io.go_template(ChatTokenizer(tok, trimmed), add_bos=True) is None
    text = gguf_io.modelfile_text("m.gguf", tok, chat_template=trimmed)
    assert "TEMPLATE" not in text.replace("# No TEMPLATE", "") and "tokenizer.chat_template" in text


# --------------------------------------------------------------------------------------------
# The program


def test_program_end_to_end(exported, tmp_path):
    out = tmp_path / "out" / "tiny.gguf"
    proc = run_program("inference.export", f"--checkpoint={exported['workdir']}", f"--out={out}", "--type=q8_0")
    assert "exported" in proc.stdout and "llama q8_0" in proc.stdout
    reader = gguf.GGUFReader(out)
    assert fields(reader)["general.name"] == "run" and fields(reader)["general.file_type"] == 7
    ref = {t.name: t for t in gguf.GGUFReader(exported["files"]["q8_0"]).tensors}
    for t in reader.tensors:  # the workdir's checkpoint is the fixture's model
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(ref[t.name].data), err_msg=t.name)
    assert (out.parent / "Modelfile").read_text().startswith("# Ollama Modelfile")

    bad = run_program("inference.export", f"--checkpoint={exported['workdir']}", f"--out={out}", "--type=q4_k",
                      check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == ("error: GGUF type 'q4_k' is not supported; expected one of f32, "
                                                   "f16, q8_0")
    missing = run_program("inference.export", f"--checkpoint={tmp_path / 'nope'}", f"--out={out}", check=False)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {tmp_path / 'nope'} does not exist")


# --------------------------------------------------------------------------------------------
# llama.cpp


def llama(path, **kw):
    """llama.cpp on `path`, with a float32 KV cache (its default f16 cache alone moves logits by ~1e-3)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=LLAMA_CPP_REASON)
    kw = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32, **kw}
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, logits_all=True, verbose=False, **kw)


def llama_cpp_run(path, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """llama.cpp's greedy continuation of `prompt` (n tokens) and its logits at every position."""
    llm = llama(path)
    llm.eval(prompt)
    new = []
    for _ in range(n):
        new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([new[-1]])
    return new, np.array(llm.scores[:llm.n_tokens], np.float32)


def loom_logits(model, ids: list[int]) -> np.ndarray:
    return np.asarray(model(jax.numpy.asarray([ids], jax.numpy.int32)))[0]


def test_llama_cpp_matches_loom(exported):
    from inference import generate

    pytest.importorskip("llama_cpp", reason=LLAMA_CPP_REASON)
    model, tok = exported["model"], exported["tokenizer"]
    prompt = start_ids(tok) + tok.encode("def f(x):\n    return")
    n = 24
    [loom_new] = generate(model, [prompt], max_new_tokens=n)
    ids = prompt + list(loom_new)
    ref = loom_logits(model, ids)[:-1]
    cpp_new, cpp_logits = llama_cpp_run(exported["files"]["f32"], prompt, n)
    assert cpp_new == list(loom_new)
    diff = {"f32": np.abs(cpp_logits[:len(ids) - 1] - ref).max()}
    assert diff["f32"] < 1e-3, diff
    for type_ in ("f16", "q8_0"):
        new, logits = llama_cpp_run(exported["files"][type_], prompt, n)
        forced = llama_cpp_run_forced(exported["files"][type_], ids[:-1])
        diff[type_] = np.abs(forced - ref).max()
        agree = np.mean(forced.argmax(-1) == ref.argmax(-1))  # teacher-forced: same prefix at every position
        free = np.mean(np.asarray(new) == np.asarray(loom_new))
        print(f"{type_}: max |logit diff| {diff[type_]:.4f}, argmax agreement {agree:.3f}, greedy tokens {free:.3f}")
        assert agree >= 0.9, (type_, agree)
    print(f"f32: max |logit diff| {diff['f32']:.2e}, greedy tokens equal ({n})")
    assert diff["f16"] < 0.05 and diff["q8_0"] < 0.5, diff


def llama_cpp_run_forced(path, ids: list[int]) -> np.ndarray:
    llm = llama(path)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], np.float32)


def test_llama_cpp_tokenizer_matches_loom(exported):
    from data.sft import ChatTokenizer

    tok = exported["tokenizer"]
    llm = llama(exported["files"]["q8_0"], vocab_only=True)
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == start_ids(tok) + tok.encode(text), text
    # the chat template inside the file, rendered with its BOS / EOS text and parsed as llama.cpp does
    chat = ChatTokenizer(tok)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\n there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}]
    rendered = chat.render(messages, add_generation_prompt=True)
    assert rendered.startswith("<s><|system|>\nBe brief.</s>")
    assert llm.tokenize(rendered.encode(), add_bos=False, special=True) == chat.prompt_ids(messages)


def test_llama_cpp_other_architectures(tokenizer, tmp_path):
    """qwen2 (biases, NEOX RoPE, linear scaling), qwen3 (QK-norm, tied) and llama with Llama 3
    RoPE scaling (rope_freqs) and a tied head: llama.cpp's logits equal Loom's."""
    pytest.importorskip("llama_cpp", reason=LLAMA_CPP_REASON)
    prompt = start_ids(tokenizer) + tokenizer.encode("The quick brown fox jumps over the lazy dog. 12+34=46")
    variants = {"qwen2": dict(attention_bias=True, head_dim=16, rope_scaling="linear", rope_scaling_factor=2.0),
                "qwen3": dict(qk_norm=True, tie_embeddings=True),
                "llama": dict(tie_embeddings=True, rope_scaling="llama3", rope_scaling_factor=8.0,
                              rope_original_max_seq_len=16, rope_theta=500000.0)}
    for arch, overrides in variants.items():
        model = random_model(tiny_config(**overrides), seed=5)
        s = gguf_io.export_gguf(model, tokenizer, tmp_path / f"{arch}.gguf")
        assert s["architecture"] == arch
        diff = np.abs(llama_cpp_run_forced(s["path"], prompt) - loom_logits(model, prompt)).max()
        print(f"{arch} {overrides}: max |logit diff| {diff:.2e}")
        assert diff < 1e-3, (arch, diff)


def test_llama_cpp_hugging_face_bpe(tmp_path):
    """A Hugging Face Llama directory with a byte-level BPE tokenizer (tokenizer.ggml.model gpt2):
    llama.cpp tokenizes as the tokenizer does and computes Loom's logits."""
    pytest.importorskip("llama_cpp", reason=LLAMA_CPP_REASON)
    from inference.loading import load_checkpoint
    from tests.helpers import random_llama_hf_dir

    template = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
                " + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
    model, tok, _ = load_checkpoint(random_llama_hf_dir(tmp_path / "hf", template))
    s = gguf_io.export_gguf(model, tok, tmp_path / "bpe.gguf")
    assert (s["tokenizer"], s["pre"], s["tokens"]) == ("gpt2", "gpt-2", 512)
    assert s["eot"] == tok.encode("<|eot_id|>", add_special_tokens=False)[0]
    f = fields(gguf.GGUFReader(s["path"]))
    assert f["tokenizer.chat_template"] == template and len(f["tokenizer.ggml.merges"]) > 0
    llm = llama(s["path"])
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    assert llm.tokenize(b"<|eot_id|>", add_bos=False, special=True) == tok.encode("<|eot_id|>")
    prompt = start_ids(tok) + tok.encode("import os\nprint(os.getcwd())")
    diff = np.abs(llama_cpp_run_forced(s["path"], prompt) - loom_logits(model, prompt)).max()
    print(f"Hugging Face Llama + byte-level BPE: max |logit diff| {diff:.2e}")
    assert diff < 1e-3
    go = gguf_io.modelfile_text("bpe.gguf", tok)
    assert '{{ else if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>' in go
    assert 'PARAMETER stop "<|end_of_text|>"' in go and 'PARAMETER stop "<|eot_id|>"' in go


LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_llama_cpp_bpe_pre_tokenizers(pre, tmp_path):
    """Byte-level BPE with Llama 3's / Qwen2's split regex (Qwen2 splits digits one by one):
    llama.cpp's tokens equal the tokenizer's on code, digits, contractions and unicode."""
    pytest.importorskip("llama_cpp", reason=LLAMA_CPP_REASON)
    import inspect
    import os

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from data.tokenizer.hf import HFTokenizer

    regex = LLAMA3_REGEX if pre == "llama-bpe" else LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [open(inspect.getfile(m), encoding="utf-8").read() for m in (os, inspect)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|bos|>", "<|eos|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())
    spec["model"]["ignore_merges"] = pre == "llama-bpe"  # as Llama 3's tokenizer.json (llama.cpp assumes it)
    hf = HFTokenizer(json.dumps(spec), {"bos_token": "<|bos|>", "eos_token": "<|eos|>"}, name=pre)
    s = gguf_io.export_gguf(random_model(tiny_config(vocab_size=640)), hf, tmp_path / "m.gguf")
    assert (s["tokenizer"], s["pre"], s["tokens"]) == ("gpt2", pre, 640)
    llm = llama(s["path"], vocab_only=True)
    lines = TEXTS + ["x = 1234567 + 89", "it's They'RE we'll", "\t\ttabs\r\nand CRLF\n\n\n"]
    lines += open(inspect.getfile(json), encoding="utf-8").read().split("\n")[:300]
    for text in lines:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf.encode(text), text
    spec["model"]["ignore_merges"] = pre != "llama-bpe"
    with pytest.raises(ValueError, match=f"ignore_merges=.* differs from llama.cpp's '{pre}' pre-tokenizer"):
        gguf_io.export_gguf(random_model(tiny_config(vocab_size=640)), HFTokenizer(json.dumps(spec), name=pre),
                            tmp_path / "x.gguf")


@pytest.mark.slow
def test_llama_cpp_on_a_trained_tiny_run(tiny_run, tmp_path):
    """The program on the `tiny` preset after 30 steps (its corpus tokenizer, 4096 tokens): llama.cpp's
    greedy tokens and logits equal Loom's (float32 compute), and its tokens on standard-library source."""
    pytest.importorskip("llama_cpp", reason=LLAMA_CPP_REASON)
    import inspect

    from inference import generate
    from inference.loading import load_checkpoint

    files = {}
    for type_ in ("f32", "q8_0"):
        files[type_] = tmp_path / f"tiny-{type_}.gguf"
        run_program("inference.export", f"--checkpoint={tiny_run}", f"--out={files[type_]}", f"--type={type_}")
    model, tok, _ = load_checkpoint(tiny_run, dtype="float32")
    prompt = start_ids(tok) + tok.encode("def main(argv):\n    ")
    [loom_new] = generate(model, [prompt], max_new_tokens=32)
    ids = prompt + list(loom_new)
    ref = loom_logits(model, ids)[:-1]
    cpp_new, _ = llama_cpp_run(files["f32"], prompt, 32)
    assert cpp_new == list(loom_new)
    diff = {t: np.abs(llama_cpp_run_forced(f, ids[:-1]) - ref).max() for t, f in files.items()}
    q8 = llama_cpp_run_forced(files["q8_0"], ids[:-1])
    agree = np.mean(q8.argmax(-1) == ref.argmax(-1))
    print(f"trained tiny: max |logit diff| {diff}, q8_0 argmax agreement {agree:.3f}")
    assert diff["f32"] < 1e-3 and agree >= 0.9
    llm = llama(files["q8_0"], vocab_only=True)
    text = open(inspect.getfile(inspect), encoding="utf-8").read()
    lines = text.split("\n")[:500] + TEXTS
    assert [llm.tokenize(x.encode(), add_bos=False, special=False) for x in lines] == [tok.encode(x) for x in lines]
