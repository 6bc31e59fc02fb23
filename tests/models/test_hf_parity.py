"""Forward pass equals Hugging Face `transformers` (PyTorch, CPU) with the same random weights.

Tiny Llama and GPT-2 models are built with transformers (no download), written with
`save_pretrained` and read by `models.hf.load`, the importer every program uses; the config it
derives is checked against one written here by hand. float32, max abs logit error < 1e-4.
(tests/models/test_hf_families.py covers the other families and their options.)
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import models.hf as hf  # noqa: E402
from tests.helpers import hf_logits, randomize_hf  # noqa: E402


def _import_and_compare(model_hf, tmp_path, expected: dict, tokens):
    model_hf.save_pretrained(tmp_path)
    model, cfg = hf.load(tmp_path)
    assert {k: getattr(cfg, k) for k in expected} == expected
    ours = np.asarray(model(tokens))
    ref = hf_logits(model_hf, tokens)
    err = np.abs(ours - ref).max()
    print("max abs logit error", err, "scale", np.abs(ref).max())
    assert err < 1e-4, f"max abs logit error {err}"


def test_llama_matches_transformers(tmp_path):
    hf_cfg = transformers.LlamaConfig(vocab_size=311, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                                      num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                                      tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model_hf = randomize_hf(transformers.LlamaForCausalLM(hf_cfg).eval(), 0)
    expected = dict(vocab_size=311, hidden_size=64, intermediate_size=176, num_layers=3, num_heads=8,
                    num_kv_heads=2, head_dim=8, max_seq_len=512, dtype="float32", norm="rmsnorm",
                    norm_eps=1e-5, activation="silu", gated_mlp=True, position_embedding="rope",
                    rope_theta=10000.0, tie_embeddings=False, attention_bias=False, mlp_bias=False)
    tokens = np.random.default_rng(0).integers(0, 311, (2, 320), dtype=np.int32)  # long: RoPE at far positions
    _import_and_compare(model_hf, tmp_path, expected, tokens)


def test_gpt2_matches_transformers(tmp_path):
    hf_cfg = transformers.GPT2Config(vocab_size=257, n_positions=128, n_embd=48, n_layer=3, n_head=6,
                                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, layer_norm_epsilon=1e-5)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    model_hf = randomize_hf(transformers.GPT2LMHeadModel(hf_cfg).eval(), 1)
    expected = dict(vocab_size=257, hidden_size=48, intermediate_size=192, num_layers=3, num_heads=6,
                    num_kv_heads=6, head_dim=8, max_seq_len=128, dtype="float32", norm="layernorm",
                    norm_eps=1e-5, activation="gelu_tanh", gated_mlp=False, position_embedding="learned",
                    tie_embeddings=True, attention_bias=True, attention_out_bias=True, mlp_bias=True)
    tokens = np.random.default_rng(1).integers(0, 257, (2, 128), dtype=np.int32)
    _import_and_compare(model_hf, tmp_path, expected, tokens)
