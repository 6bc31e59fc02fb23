"""GGUF export for llama.cpp and Ollama (through the `gguf` package that llama.cpp publishes).

    summary = export_gguf(model, tokenizer, "model.gguf", type="q8_0")   # tokenizer + chat template inside
    write_modelfile("model.gguf", tokenizer)                              # Ollama's Modelfile beside it

Weights go through the Hugging Face export (`models.hf.tensor_plan`: the same tensors and
layouts `models.hf.save` writes), renamed as llama.cpp's `convert_hf_to_gguf.py` names them
(`gguf.TensorNameMap`: token_embd, blk.N.attn_q ..., output_norm, output) and streamed to the
file one tensor at a time. Architectures (`GGUF_ARCHITECTURES`): a Hugging Face family that
expresses the model exactly (`models.hf.representation_errors` is the judge) and that llama.cpp
computes exactly as Loom does:
  llama   LlamaForCausalLM: RMSNorm, gated SiLU MLP, RoPE (none / linear / llama3 scaling), GQA,
          tied or untied head, no biases. llama.cpp's llama rotates adjacent pairs (x[2i],
          x[2i+1]) where Loom and Hugging Face rotate halves (x[i], x[i + H/2]): the rows of
          q and k are permuted within each head as the converter does (without it logits differ
          by ~3.7, GOTCHAS "GGUF"). Llama 3 scaling is a `rope_freqs.weight` tensor of per-dim
          frequency divisors, computed as the converter does.
  qwen2   Qwen2ForCausalLM: llama plus q/k/v biases; RoPE on halves (NEOX), so no permutation;
          llama.cpp's qwen2 sizes q as hidden_size, so num_heads x head_dim must equal it.
  qwen3   Qwen3ForCausalLM: llama plus RMS QK-norm over head_dim; NEOX RoPE.
Everything else (MoE, latent attention, ALiBi / learned / sinusoidal / no positions, soft-caps,
sliding windows, LayerNorm, non-gated or non-SiLU MLPs, other biases, Gemma's norm offset and
embedding scale, YaRN / dynamic RoPE) raises a ValueError naming each feature.

Types (`TYPES`): "f32"; "f16" (2-D weights f16, norms and other 1-D tensors f32); "q8_0" (2-D
weights whose rows divide by 32 in Q8_0 blocks, the others f16, 1-D f32), as the converter
chooses for `--outtype`.

Tokenizers:
  sentencepiece   BPE models (Loom's, Hugging Face `tokenizer.model`, preferred when a Hugging
                  Face directory has both, as the converter does) -> `tokenizer.ggml.model =
                  "llama"`: pieces, scores, types (normal / unknown / control / user-defined /
                  byte) and the proto's `add_dummy_prefix` (Loom's: none) as `add_space_prefix`.
                  Unigram models are refused: llama.cpp tokenizes them differently.
  BPE             Hugging Face byte-level `tokenizer.json` -> "gpt2": tokens, merges, types
                  and a `tokenizer.ggml.pre` chosen by the pre-tokenizer's regex (the ones
                  llama.cpp implements: `BPE_PRE_TOKENIZERS`), else a ValueError.
The token list is padded to the embedding's rows with unused `[PAD{i}]` tokens (llama.cpp
refuses a list shorter than the embedding). BOS is added (`add_bos_token`) when the tokenizer
has one: Loom's documents and prompts start with it (`data.tokenizer.start_ids`). The chat
template is the tokenizer's own or Loom's DEFAULT_CHAT_TEMPLATE (`data.sft.chat_template_for`);
a turn-ending special token other than EOS (Llama 3's <|eot_id|>) becomes `eot_token_id`.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import pathlib
from typing import Any, Callable

import numpy as np

TYPES = ("f32", "f16", "q8_0")
# Hugging Face architecture -> llama.cpp architecture that computes the same function
GGUF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
SUPPORTED = ("llama (RMSNorm, gated SiLU MLP, RoPE with no / linear / llama3 scaling, grouped-query attention, "
             "tied or untied head, no biases), qwen2 (the same plus q/k/v biases, num_heads x head_dim = "
             "hidden_size) and qwen3 (the same plus RMS QK-norm)")

# tokenizer.json pre-tokenizer regexes that llama.cpp implements -> (tokenizer.ggml.pre, ignore_merges it assumes)
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
BPE_PRE_TOKENIZERS = {
    GPT2_REGEX: ("gpt-2", False),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": ("llama-bpe", True),
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": ("qwen2", False),
}
PAD_SCORE = -10000.0  # score of the unused tokens that pad the list to the embedding's rows (the converter's)


# --------------------------------------------------------------------------------------------
# What llama.cpp can run


def unsupported_features(cfg) -> list[str]:
    """The features of a ModelConfig that no architecture of GGUF_ARCHITECTURES expresses ([] = exportable)."""
    from models.positions import describe

    out = []
    if cfg.moe.enabled:
        out.append(f"mixture-of-experts layers (model.moe.num_experts={cfg.moe.num_experts})")
    if cfg.mla.enabled:
        out.append(f"multi-head latent attention (model.mla.kv_lora_rank={cfg.mla.kv_lora_rank})")
    if cfg.position_embedding != "rope":
        out.append(f"position_embedding={cfg.position_embedding!r} ({describe(cfg.position_embedding)})")
    elif cfg.rope_scaling not in ("none", "linear", "llama3"):
        out.append(f"rope_scaling={cfg.rope_scaling!r} (exportable: none, linear, llama3)")
    if cfg.norm != "rmsnorm":
        out.append(f"norm={cfg.norm!r} (RMSNorm only)")
    if not cfg.gated_mlp:
        out.append("a non-gated MLP (gated_mlp=False)")
    if cfg.activation != "silu":
        out.append(f"activation={cfg.activation!r} (SiLU only)")
    if cfg.logit_softcap:
        out.append(f"a final logit soft-cap (logit_softcap={cfg.logit_softcap})")
    if cfg.attn_logit_softcap:
        out.append(f"an attention logit soft-cap (attn_logit_softcap={cfg.attn_logit_softcap})")
    if cfg.sliding_window or any(cfg.layer_windows):
        windows = cfg.sliding_window or sorted(set(cfg.layer_windows))
        out.append(f"sliding-window attention (window {windows})")
    if cfg.mlp_bias:
        out.append("MLP biases (mlp_bias=True)")
    if cfg.attention_out_bias:
        out.append("an attention output bias (attention_out_bias=True)")
    if cfg.attention_bias and cfg.qk_norm:
        out.append("q/k/v biases together with QK-norm (qwen2 has the biases, qwen3 the norm)")
    if cfg.post_norms:
        out.append("post-attention / post-MLP norms (post_norms=True)")
    if cfg.norm_weight_offset:
        out.append(f"norm_weight_offset={cfg.norm_weight_offset} (Gemma's 1 + w)")
    if cfg.embed_scale != 1.0:
        out.append(f"embed_scale={cfg.embed_scale}")
    if cfg.query_pre_attn_scalar and cfg.query_pre_attn_scalar != cfg.head_dim:
        out.append(f"query_pre_attn_scalar={cfg.query_pre_attn_scalar} (scores scaled by 1/sqrt(head_dim) only)")
    return out


def gguf_architecture(cfg) -> tuple[str, str]:
    """(Hugging Face architecture, llama.cpp architecture) of a model, or a ValueError naming every
    feature that llama.cpp cannot run and what is supported."""
    from models.hf import representation_errors

    features = unsupported_features(cfg)
    if features:
        raise ValueError(f"GGUF export cannot express this model: it has {'; '.join(features)}. Supported: "
                         f"{SUPPORTED}")
    hf_arch = ("Qwen3ForCausalLM" if cfg.qk_norm else "Qwen2ForCausalLM" if cfg.attention_bias
               else "LlamaForCausalLM")
    errors = representation_errors(cfg, hf_arch)
    if errors:  # a feature the list above does not know yet: the Hugging Face mapping is the judge
        raise ValueError(f"GGUF export cannot express this model as {GGUF_ARCHITECTURES[hf_arch]} ({hf_arch}): "
                         f"it differs in {', '.join(errors)}. Supported: {SUPPORTED}")
    if hf_arch == "Qwen2ForCausalLM" and cfg.num_heads * cfg.head_dim != cfg.hidden_size:
        raise ValueError(f"GGUF export cannot express this model as qwen2 (q/k/v biases): llama.cpp's qwen2 needs "
                         f"num_heads x head_dim = hidden_size; this model has {cfg.num_heads} x {cfg.head_dim} != "
                         f"{cfg.hidden_size}")
    return hf_arch, GGUF_ARCHITECTURES[hf_arch]


def check_type(type: str) -> str:
    if type not in TYPES:
        raise ValueError(f"GGUF type {type!r} is not supported; expected one of {', '.join(TYPES)}")
    return type


# --------------------------------------------------------------------------------------------
# Tensors


def permute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q or k projection [heads * H, ...] from rotate-half order (x[i], x[i + H/2]) to
    llama.cpp's adjacent pairs: within each head, new row 2i is old row i and 2i + 1 is i + H/2."""
    h = w.shape[0] // heads
    return w.reshape(heads, 2, h // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of `permute_rope_rows`."""
    h = w.shape[0] // heads
    return w.reshape(heads, h // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg) -> np.ndarray:
    """`rope_freqs.weight` for Llama 3 RoPE scaling: the per-dim divisor of the plain frequency
    1 / theta^(2i/H) (llama.cpp divides by it), float32 [head_dim / 2], as the converter computes it."""
    h = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float32) / h))
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_seq_len or cfg.max_seq_len
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def tensor_type(name: str, shape: tuple[int, ...], type: str):
    """The GGML type of one tensor for the file type `type` (the converter's choice)."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) <= 1 or name.endswith("_norm.weight") or name.startswith("rope_freqs"):
        return Q.F32
    if type == "f32":
        return Q.F32
    if type == "q8_0" and shape[-1] % 32 == 0:  # Q8_0 blocks run along rows (numpy's last dim)
        return Q.Q8_0
    return Q.F16


def _encode(array: np.ndarray, qtype) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if qtype == Q.F32:
        return np.ascontiguousarray(array, np.float32)
    if qtype == Q.F16:
        return np.ascontiguousarray(array, np.float16)
    return quants.quantize(np.ascontiguousarray(array, np.float32), qtype)


def gguf_tensors(model, hf_arch: str, arch: str) -> list[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(GGUF name, shape, produce() -> float32 array) for every tensor of the file, nothing read yet."""
    import gguf

    from models.hf import tensor_plan

    cfg = model.config
    names = gguf.get_tensor_name_map(_model_arch(arch), cfg.num_layers)
    out = []
    if cfg.rope_scaling == "llama3":
        factors = llama3_rope_factors(cfg)
        out.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.shape, lambda: factors))
    for name, shape, _, produce in tensor_plan(model, hf_arch, dtype="float32"):
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise AssertionError(f"no GGUF name for the Hugging Face tensor {name} of {arch}")
        if arch == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            heads = cfg.num_heads if ".q_proj." in name else cfg.num_kv_heads
            produce = (lambda p, n: lambda: permute_rope_rows(p(), n))(produce, heads)
        out.append((gname, tuple(shape), produce))
    return out


def _model_arch(arch: str):
    import gguf

    return next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)


# --------------------------------------------------------------------------------------------
# Tokenizers


def _state(tokenizer) -> dict[str, Any]:
    # the pickled state (what grain workers receive) holds the serialized tokenizer: the proto / tokenizer.json
    return tokenizer.__getstate__() if hasattr(tokenizer, "__getstate__") else {}


def _sentencepiece_proto(tokenizer) -> bytes | None:
    """The sentencepiece model behind a tokenizer (Loom's, a Hugging Face tokenizer.model, or a
    tokenizer.json with a tokenizer.model beside it, which the converter prefers), or None."""
    state = _state(tokenizer) or {}
    if isinstance(state.get("proto"), (bytes, bytearray)):
        return bytes(state["proto"])
    name = pathlib.Path(str(getattr(tokenizer, "name", "")))
    if name.name == "tokenizer.json" and (name.parent / "tokenizer.model").is_file():
        return (name.parent / "tokenizer.model").read_bytes()
    return None


def _added_tokens(tokenizer) -> dict[int, tuple[str, bool]]:
    """Hugging Face added tokens: id -> (content, special)."""
    config = getattr(tokenizer, "config", None) or {}
    out = {}
    for i, t in (config.get("added_tokens_decoder") or {}).items():
        content = t.get("content") if isinstance(t, dict) else t
        if content:
            out[int(i)] = (content, bool(t.get("special", True)) if isinstance(t, dict) else True)
    return out


def _sentencepiece_vocab(proto_bytes: bytes, added: dict[int, tuple[str, bool]]) -> dict[str, Any]:
    from gguf import TokenType
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(proto_bytes)
    model_type = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
    if model_type != "BPE":
        # llama.cpp's "llama" tokenizer merges by score, as sentencepiece BPE does; on a unigram model it
        # (and its "t5" Viterbi tokenizer, without the normalizer) gave other tokens on 84% (2%) of the lines tried
        raise ValueError(f"a sentencepiece {model_type} tokenizer: llama.cpp reproduces sentencepiece BPE models only "
                         "(train the tokenizer with model_type='bpe')")
    kinds = sentencepiece_model_pb2.ModelProto.SentencePiece
    types = {kinds.NORMAL: TokenType.NORMAL, kinds.UNKNOWN: TokenType.UNKNOWN, kinds.CONTROL: TokenType.CONTROL,
             kinds.USER_DEFINED: TokenType.USER_DEFINED, kinds.BYTE: TokenType.BYTE, kinds.UNUSED: TokenType.UNUSED}
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    toktypes = [types[p.type] for p in proto.pieces]
    for i in sorted(added):  # Hugging Face tokens added after the sentencepiece model's
        if i < len(tokens):
            continue
        while len(tokens) < i:
            _pad_tokens(tokens, scores, toktypes, len(tokens) + 1)
        content, special = added[i]
        tokens.append(content)
        scores.append(-1000.0)
        toktypes.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
    norm = proto.normalizer_spec
    if norm.name not in ("identity", "") and norm.precompiled_charsmap:
        logging.warning("the sentencepiece model normalizes text (%s), which llama.cpp does not: texts it changes "
                        "tokenize differently there", norm.name)
    spec = proto.trainer_spec
    return dict(model="llama", pre="default", tokens=tokens, scores=scores, types=toktypes,
                add_space_prefix=bool(norm.add_dummy_prefix),
                remove_extra_whitespaces=bool(norm.remove_extra_whitespaces),
                unk=spec.unk_id if 0 <= spec.unk_id < len(proto.pieces) else None,
                pad=spec.pad_id if 0 <= spec.pad_id < len(proto.pieces) else None)


def _bpe_pre(spec: dict[str, Any], where: str) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a byte-level BPE tokenizer.json: its split regex must be
    one llama.cpp implements (BPE_PRE_TOKENIZERS), with the merge rule llama.cpp assumes for it."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regex = None
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(byte_level) != 1 or byte_level[0].get("add_prefix_space"):
        raise ValueError(f"{where}: the pre-tokenizer {json.dumps(pre)[:200]} is not byte-level BPE without a prefix "
                         "space; GGUF export supports sentencepiece models and byte-level BPE tokenizers")
    if byte_level[0].get("use_regex", True):
        regex = GPT2_REGEX
        others = [s for s in steps if s is not byte_level[0]]
    else:
        splits = [s for s in steps if s.get("type") == "Split"]
        others = [s for s in steps if s.get("type") not in ("Split", "ByteLevel")]
        if len(splits) == 1 and not splits[0].get("invert") and splits[0].get("behavior") == "Isolated":
            regex = (splits[0].get("pattern") or {}).get("Regex")
    if regex not in BPE_PRE_TOKENIZERS or others:
        raise ValueError(f"{where}: llama.cpp knows no pre-tokenizer for {json.dumps(pre)[:300]}; GGUF export "
                         f"recognizes the split regexes of {', '.join(n for n, _ in BPE_PRE_TOKENIZERS.values())}")
    name, ignore_merges = BPE_PRE_TOKENIZERS[regex]
    if bool(spec.get("model", {}).get("ignore_merges", False)) != ignore_merges:
        raise ValueError(f"{where}: ignore_merges={spec['model'].get('ignore_merges', False)} differs from llama.cpp's "
                         f"{name!r} pre-tokenizer ({ignore_merges}): tokens would differ")
    return name


def _bpe_vocab(spec: dict[str, Any], where: str) -> dict[str, Any]:
    from gguf import TokenType

    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{where}: a {model.get('type')!r} tokenizer.json model; GGUF export supports sentencepiece "
                         "models and byte-level BPE tokenizer.json")
    normalizer = spec.get("normalizer")
    if normalizer and normalizer.get("type") != "NFC":
        raise ValueError(f"{where}: the tokenizer normalizes text ({normalizer.get('type')}), which llama.cpp's BPE "
                         "tokenizer does not")
    if normalizer:
        logging.warning("%s: NFC normalization is not applied by llama.cpp (texts in NFC tokenize the same)", where)
    pre = _bpe_pre(spec, where)
    by_id: dict[int, tuple[str, int]] = {int(i): (t, TokenType.NORMAL) for t, i in model.get("vocab", {}).items()}
    for t in spec.get("added_tokens") or []:
        by_id[int(t["id"])] = (t["content"], TokenType.CONTROL if t.get("special") else TokenType.USER_DEFINED)
    n = max(by_id) + 1 if by_id else 0
    tokens = [by_id[i][0] if i in by_id else f"[PAD{i}]" for i in range(n)]
    types = [by_id[i][1] if i in by_id else TokenType.UNUSED for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return dict(model="gpt2", pre=pre, tokens=tokens, scores=None, types=types, merges=merges)


def tokenizer_vocab(tokenizer) -> dict[str, Any]:
    """The GGUF vocabulary of a Loom tokenizer: model ("llama" | "gpt2"), pre, tokens, scores, types,
    merges, and the special ids (bos, eos, unk, pad; None when absent)."""
    where = getattr(tokenizer, "name", type(tokenizer).__name__)
    proto = _sentencepiece_proto(tokenizer)
    if proto is not None:
        vocab = _sentencepiece_vocab(proto, _added_tokens(tokenizer))
    else:
        spec = _state(tokenizer).get("json")
        if not isinstance(spec, str):
            raise ValueError(f"tokenizer {tokenizer!r} is neither sentencepiece nor a Hugging Face tokenizer.json; "
                             "GGUF export supports those two")
        vocab = _bpe_vocab(json.loads(spec), where)
    named = getattr(tokenizer, "special_tokens", None)

    def special_id(i):
        return None if i is None or i < 0 else int(i)

    vocab.update(bos=special_id(tokenizer.bos_id), eos=special_id(tokenizer.eos_id))
    if named is not None:  # Hugging Face: the ids it names (pad falls back to EOS there: not a pad token)
        vocab["unk"] = special_id(getattr(tokenizer, "unk_id", None)) if "unk_token" in named else vocab.get("unk")
        vocab["pad"] = special_id(tokenizer.pad_id) if "pad_token" in named else vocab.get("pad")
    return vocab


def _pad_tokens(tokens: list, scores: list | None, types: list, n: int) -> int:
    """Pads the lists to n entries with unused tokens; returns how many were added."""
    from gguf import TokenType

    added = max(0, n - len(tokens))
    for i in range(len(tokens), n):
        tokens.append(f"[PAD{i}]")
        types.append(TokenType.UNUSED)
        if scores is not None:
            scores.append(PAD_SCORE)
    return added


# --------------------------------------------------------------------------------------------
# The file


def export_gguf(model, tokenizer, out: str | os.PathLike, *, type: str = "f32", chat_template: str | None = None,
                name: str | None = None) -> dict[str, Any]:
    """Writes `model` (a Loom `Decoder`) and `tokenizer` as one GGUF file; returns a summary.

    Args:
      type: "f32", "f16" or "q8_0" (TYPES).
      chat_template: `data.sft.chat_template_for`'s override (jinja text, a file, a named template
        of the tokenizer, or "loom"); None: the tokenizer's own, else Loom's default.
      name: `general.name`; None: the output file's stem.
    Returns:
      {"path", "architecture", "hf_architecture", "type", "file_type", "tensors", "tensor_types"
      (GGML type -> count), "bytes", "parameters", "tokenizer", "pre", "tokens" (the list's length
      = embedding rows), "padded_tokens", "bos", "eos", "add_bos", "eot", "chat_template" (its text)}.
    Raises:
      ValueError naming the bad type, each model feature llama.cpp cannot run, or a tokenizer it
      cannot reproduce.
    """
    import gguf

    from data.sft import ChatTokenizer, chat_template_for

    check_type(type)
    cfg = model.config
    hf_arch, arch = gguf_architecture(cfg)
    vocab = tokenizer_vocab(tokenizer)
    if len(vocab["tokens"]) > cfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(vocab['tokens'])} tokens, more than the model's "
                         f"vocab_size={cfg.vocab_size}")
    padded = _pad_tokens(vocab["tokens"], vocab["scores"], vocab["types"], cfg.vocab_size)
    template = chat_template_for(tokenizer, chat_template)
    try:
        stops = ChatTokenizer(tokenizer, template).stop_ids()
    except Exception as e:  # jinja's own errors (a template that does not compile) are no ValueError
        raise ValueError(f"the chat template does not compile: {e.__class__.__name__}: {e}") from None
    eot = next((i for i in stops if i != vocab["eos"]), None)
    tensors = gguf_tensors(model, hf_arch, arch)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[type]

    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(tmp, arch)
    w.add_type("model")
    w.add_name(name or out.stem)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_theta))
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(float(cfg.norm_eps))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(file_type)
    if cfg.rope_scaling == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling_factor))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    if vocab["scores"] is not None:
        w.add_token_scores(vocab["scores"])
    w.add_token_types([int(t) for t in vocab["types"]])
    if vocab["model"] == "gpt2":
        w.add_token_merges(vocab["merges"])
    else:
        w.add_add_space_prefix(vocab["add_space_prefix"])
        w.add_remove_extra_whitespaces(vocab["remove_extra_whitespaces"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if vocab.get(key) is not None:
            add(vocab[key])
    if eot is not None:
        w.add_eot_token_id(eot)
    add_bos = vocab["bos"] is not None  # Loom's documents and prompts start with BOS (data.tokenizer.start_ids)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(False)
    w.add_chat_template(template)

    counts: collections.Counter = collections.Counter()
    for gname, shape, _ in tensors:
        qtype = tensor_type(gname, shape, type)
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        w.add_tensor_info(gname, shape, np.dtype(np.float32), math.prod(shape) // block * size, raw_dtype=qtype)
        counts[qtype.name] += 1
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for gname, shape, produce in tensors:  # one tensor in memory at a time
            w.write_tensor_data(_encode(produce(), tensor_type(gname, shape, type)))
        w.close()
        os.replace(tmp, out)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    return dict(path=str(out), architecture=arch, hf_architecture=hf_arch, type=type, file_type=int(file_type),
                tensors=len(tensors), tensor_types=dict(counts), bytes=out.stat().st_size,
                parameters=sum(math.prod(s) for n, s, _ in tensors if not n.startswith("rope_freqs")),
                tokenizer=vocab["model"], pre=vocab["pre"], tokens=len(vocab["tokens"]), padded_tokens=padded,
                bos=vocab["bos"], eos=vocab["eos"], add_bos=add_bos, eot=eot, chat_template=template)


# --------------------------------------------------------------------------------------------
# Ollama


def loom_ollama_template(eos_text: str) -> str:
    """Loom's DEFAULT_CHAT_TEMPLATE as an Ollama (Go) template, written out by hand: every turn
    "<|role|>\\n" + content + EOS, then the generation prompt "<|assistant|>\\n". The leading BOS
    is not written: Ollama adds it (`add_bos_token`)."""
    return "{{ range .Messages }}<|{{ .Role }}|>\n{{ .Content }}" + eos_text + "{{ end }}<|assistant|>\n"


def go_template(chat, add_bos: bool) -> str | None:
    """An Ollama (Go) template equal to a simple chat template, or None.

    `chat` is a `data.sft.ChatTokenizer`. A template is simple when every chat of system / user /
    assistant turns renders as an optional header, then per turn a role's prefix + content + the
    role's suffix, then the generation prompt: found by rendering one-turn chats and checked on
    longer ones (contents with newlines and edge spaces, so templates that trim or rewrite content
    are not simple). A header that is the BOS token's text is left to Ollama (it adds BOS)."""
    mark, first, second = "\ue000", "\ue001", "\ue002"
    roles = ("system", "user", "assistant")
    tok = chat.tokenizer
    bos = tok.id_to_piece(tok.bos_id) if tok.bos_id is not None and tok.bos_id >= 0 else None

    def render(messages, gen):
        return chat.render(messages, add_generation_prompt=gen)

    try:
        one = {r: render([{"role": r, "content": mark}], False).split(mark) for r in roles}
        two = render([{"role": "user", "content": first}, {"role": "assistant", "content": second}], False)
        s0, rest = two.split(first)
        s1, s2 = rest.split(second)
        if any(len(one[r]) != 2 for r in roles) or s0 != one["user"][0] or not s1.startswith(one["user"][1]):
            return None
        assistant_pre = s1[len(one["user"][1]):]  # what the assistant's turn starts with after another turn
        if not one["assistant"][0].endswith(assistant_pre):
            return None
        header = one["assistant"][0][:len(one["assistant"][0]) - len(assistant_pre)]
        if not all(one[r][0].startswith(header) for r in roles):
            return None
        pre = {r: one[r][0][len(header):] for r in roles}
        post = {r: one[r][1] for r in roles}
        ended = render([{"role": "user", "content": mark}], False)
        prompted = render([{"role": "user", "content": mark}], True)
        if not prompted.startswith(ended):
            return None
        gen = prompted[len(ended):]
        probes = [
            [{"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "Hi\n there "},
             {"role": "assistant", "content": "\nHello! "}, {"role": "user", "content": "2+2?"}],
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
             {"role": "assistant", "content": " d"}],
        ]
        for probe in probes:
            want = header + "".join(pre[m["role"]] + m["content"] + post[m["role"]] for m in probe) + gen
            if render(probe, True) != want:
                return None
    except Exception:  # the template refuses a probe chat (role order, a missing role): not simple
        return None
    if any("{{" in x or "}}" in x or '"""' in x for x in [header, gen, *pre.values(), *post.values()]):
        return None
    if add_bos and bos and header.startswith(bos):
        header = header[len(bos):]
    branches = "".join(f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{r}" }}}}{pre[r]}{{{{ .Content }}}}{post[r]}'
                       for i, r in enumerate(roles))
    return f"{header}{{{{ range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{gen}"


def modelfile_text(gguf_file: str, tokenizer, *, chat_template: str | None = None) -> str:
    """An Ollama Modelfile for `gguf_file` (a path relative to the Modelfile's folder, or absolute)."""
    from data.sft import DEFAULT_CHAT_TEMPLATE, ChatTokenizer, chat_template_for

    template = chat_template_for(tokenizer, chat_template)
    chat = ChatTokenizer(tokenizer, template)
    add_bos = tokenizer.bos_id is not None and tokenizer.bos_id >= 0
    lines = ["# Ollama Modelfile written by `python -m inference.export` (Loom): ollama create NAME -f Modelfile",
             f"FROM {gguf_file}"]
    eos = tokenizer.id_to_piece(tokenizer.eos_id) if tokenizer.eos_id is not None and tokenizer.eos_id >= 0 else ""
    go = loom_ollama_template(eos) if template == DEFAULT_CHAT_TEMPLATE else go_template(chat, add_bos)
    if go is not None:
        lines.append(f'TEMPLATE """{go}"""')
    else:
        lines.append("# No TEMPLATE: the chat template is not simple enough to translate to Go; Ollama picks one from "
                     "the GGUF's tokenizer.chat_template")
    for i in chat.stop_ids():
        text = tokenizer.id_to_piece(i)
        if text and '"' not in text and "\n" not in text:
            lines.append(f'PARAMETER stop "{text}"')
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | os.PathLike, tokenizer, *, chat_template: str | None = None,
                    out: str | os.PathLike | None = None) -> pathlib.Path:
    """Writes an Ollama `Modelfile` (default: beside the .gguf) that points at it; returns its path."""
    gguf_path = pathlib.Path(gguf_path)
    out = pathlib.Path(out) if out is not None else gguf_path.with_name("Modelfile")
    rel = f"./{gguf_path.name}" if out.parent.resolve() == gguf_path.parent.resolve() else str(gguf_path.resolve())
    out.write_text(modelfile_text(rel, tokenizer, chat_template=chat_template), encoding="utf-8")
    return out

