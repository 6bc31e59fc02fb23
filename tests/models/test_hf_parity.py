"""Forward pass equals Hugging Face `transformers` (PyTorch, CPU) with the same random weights.

The models are built locally from tiny configs (no download); weights are copied here by hand
(the full importer, models.hf, is a later issue). float32, max abs logit error < 1e-4.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models import transformer as T  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from tests.helpers import randomize_hf  # noqa: E402


def _t(x):
    return x.detach().cpu().numpy().astype(np.float32)


def llama_to_loom(hf, cfg: ModelConfig):
    sd = hf.state_dict()
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    L = cfg.num_layers

    def stack(fmt, fn):
        return np.stack([fn(_t(sd[fmt.format(i)])) for i in range(L)])

    p = "model.layers.{}."
    return {
        "embed": _t(sd["model.embed_tokens.weight"]),
        "final_norm": {"scale": _t(sd["model.norm.weight"])},
        "lm_head": {"kernel": _t(sd["lm_head.weight"]).T},
        "layers": {
            "attn_norm": {"scale": stack(p + "input_layernorm.weight", lambda w: w)},
            "mlp_norm": {"scale": stack(p + "post_attention_layernorm.weight", lambda w: w)},
            "attn": {
                "q": {"kernel": stack(p + "self_attn.q_proj.weight", lambda w: w.T.reshape(d, n, h))},
                "k": {"kernel": stack(p + "self_attn.k_proj.weight", lambda w: w.T.reshape(d, k, h))},
                "v": {"kernel": stack(p + "self_attn.v_proj.weight", lambda w: w.T.reshape(d, k, h))},
                "o": {"kernel": stack(p + "self_attn.o_proj.weight", lambda w: w.T.reshape(n, h, d))},
            },
            "mlp": {
                "gate": {"kernel": stack(p + "mlp.gate_proj.weight", lambda w: w.T)},
                "up": {"kernel": stack(p + "mlp.up_proj.weight", lambda w: w.T)},
                "down": {"kernel": stack(p + "mlp.down_proj.weight", lambda w: w.T)},
            },
        },
    }


def gpt2_to_loom(hf, cfg: ModelConfig):
    sd = hf.state_dict()
    d, n, h = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    L = cfg.num_layers
    p = "transformer.h.{}."

    def stack(name, fn=lambda w: w):
        return np.stack([fn(_t(sd[(p + name).format(i)])) for i in range(L)])

    # Conv1D stores [in, out]; c_attn's output is q | k | v
    def qkv(part):
        def f(w):
            return w[:, part * d:(part + 1) * d].reshape(d, n, h)
        return f

    def qkv_bias(part):
        def f(b):
            return b[part * d:(part + 1) * d].reshape(n, h)
        return f

    return {
        "embed": _t(sd["transformer.wte.weight"]),
        "pos_embed": _t(sd["transformer.wpe.weight"]),
        "final_norm": {"scale": _t(sd["transformer.ln_f.weight"]), "bias": _t(sd["transformer.ln_f.bias"])},
        "layers": {
            "attn_norm": {"scale": stack("ln_1.weight"), "bias": stack("ln_1.bias")},
            "mlp_norm": {"scale": stack("ln_2.weight"), "bias": stack("ln_2.bias")},
            "attn": {
                "q": {"kernel": stack("attn.c_attn.weight", qkv(0)), "bias": stack("attn.c_attn.bias", qkv_bias(0))},
                "k": {"kernel": stack("attn.c_attn.weight", qkv(1)), "bias": stack("attn.c_attn.bias", qkv_bias(1))},
                "v": {"kernel": stack("attn.c_attn.weight", qkv(2)), "bias": stack("attn.c_attn.bias", qkv_bias(2))},
                "o": {"kernel": stack("attn.c_proj.weight", lambda w: w.reshape(n, h, d)),
                      "bias": stack("attn.c_proj.bias")},
            },
            "mlp": {
                "up": {"kernel": stack("mlp.c_fc.weight"), "bias": stack("mlp.c_fc.bias")},
                "down": {"kernel": stack("mlp.c_proj.weight"), "bias": stack("mlp.c_proj.bias")},
            },
        },
    }


def _compare(hf, ours_params, cfg, tokens):
    graphdef, params = T.split_params(T.build(cfg))
    assert {*map(str, _paths(params))} == {*map(str, _paths(ours_params))}
    ours = np.asarray(T.apply(graphdef, ours_params, {"inputs_BT": tokens}))
    with torch.no_grad():
        ref = _t(hf(torch.as_tensor(tokens, dtype=torch.long)).logits)
    err = np.abs(ours - ref).max()
    print("max abs logit error", err, "scale", np.abs(ref).max())
    assert err < 1e-4, f"max abs logit error {err}"


def _paths(tree):
    import jax

    return [p for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def test_llama_matches_transformers():
    hf_cfg = transformers.LlamaConfig(vocab_size=311, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                                      num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                                      max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                                      tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = randomize_hf(transformers.LlamaForCausalLM(hf_cfg).eval(), 0)
    cfg = ModelConfig(vocab_size=311, hidden_size=64, intermediate_size=176, num_layers=3, num_heads=8,
                      num_kv_heads=2, head_dim=8, max_seq_len=512, dtype="float32", norm="rmsnorm",
                      norm_eps=1e-5, activation="silu", gated_mlp=True, position_embedding="rope",
                      rope_theta=10000.0, tie_embeddings=False)
    tokens = np.random.default_rng(0).integers(0, 311, (2, 320), dtype=np.int32)  # long: RoPE at far positions
    _compare(hf, llama_to_loom(hf, cfg), cfg, tokens)


def test_gpt2_matches_transformers():
    hf_cfg = transformers.GPT2Config(vocab_size=257, n_positions=128, n_embd=48, n_layer=3, n_head=6,
                                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, layer_norm_epsilon=1e-5)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(1)
    hf = randomize_hf(transformers.GPT2LMHeadModel(hf_cfg).eval(), 1)
    cfg = ModelConfig(vocab_size=257, hidden_size=48, intermediate_size=192, num_layers=3, num_heads=6,
                      num_kv_heads=6, head_dim=8, max_seq_len=128, dtype="float32", norm="layernorm",
                      norm_eps=1e-5, activation="gelu_tanh", gated_mlp=False, position_embedding="learned",
                      tie_embeddings=True, attention_bias=True, attention_out_bias=True, mlp_bias=True)
    tokens = np.random.default_rng(1).integers(0, 257, (2, 128), dtype=np.int32)
    _compare(hf, gpt2_to_loom(hf, cfg), cfg, tokens)
