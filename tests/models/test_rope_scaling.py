"""RoPE scaling by config ("linear", "llama3", "dynamic", "yarn") against transformers' own
implementations (modeling_rope_utils + LlamaRotaryEmbedding), tiny and float32.

transformers' dynamic NTK module is stateful (it keeps the frequencies of the longest sequence
it has seen), so a comparison of one call uses a fresh module or model; decoding compares a
growing sequence, call by call, which is what its state follows.
"""

import json
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding  # noqa: E402

import models.hf as hf  # noqa: E402
from inference import generate  # noqa: E402
from models import transformer as T  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.hf import families  # noqa: E402
from tests.helpers import hf_logits, random_tokens, randomize_hf  # noqa: E402

TOL = 1e-4  # max abs logit error, as the other parity tests
H = 16
_HF = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, head_dim=H, rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=None,
           pad_token_id=None)
_OURS = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=H, norm_eps=1e-5)

# name -> (max_position_embeddings, transformers' rope_parameters, our config's fields, max position + 1 in the call)
CASES = {
    "linear": (64, dict(rope_type="linear", factor=2.5), dict(rope_scaling="linear", rope_scaling_factor=2.5), 100),
    "llama3": (64, dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=16),
               dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_seq_len=16), 100),
    "yarn": (64, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
             dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_seq_len=16), 100),
    "yarn_attention_factor": (
        64, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, attention_factor=0.8,
                 beta_fast=8.0, beta_slow=2.0, truncate=False),
        dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_seq_len=16, rope_attention_factor=0.8,
             rope_beta_fast=8.0, rope_beta_slow=2.0, rope_truncate=False), 100),
    "yarn_mscale": (
        64, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16, mscale=1.0, mscale_all_dim=0.5),
        dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_seq_len=16, rope_mscale=1.0,
             rope_mscale_all_dim=0.5), 100),
    "dynamic_below": (32, dict(rope_type="dynamic", factor=2.0), dict(rope_scaling="dynamic", rope_scaling_factor=2.0),
                      24),
    "dynamic_above": (32, dict(rope_type="dynamic", factor=2.0), dict(rope_scaling="dynamic", rope_scaling_factor=2.0),
                      90),
}


def _hf_config(max_pos, params, theta=10000.0):
    config = transformers.LlamaConfig(**_HF, max_position_embeddings=max_pos,
                                      rope_parameters=dict(rope_theta=theta, **params))
    config._attn_implementation = "eager"
    return config


def _plain(cfg):
    return np.asarray(T.rope_frequencies(cfg.replace(rope_scaling="none")), np.float32)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rotation_equals_transformers(name):
    """Loom's inverse frequencies, attention factor and rotated q, k equal a fresh
    LlamaRotaryEmbedding's for the same config (one forward at positions whose max is L - 1)."""
    max_pos, params, fields, length = CASES[name]
    cfg = ModelConfig(**_OURS, max_seq_len=max_pos, **fields)
    module = LlamaRotaryEmbedding(_hf_config(max_pos, params))
    r = np.random.default_rng(zlib.crc32(name.encode()))
    pos = r.integers(0, length, (2, 12)).astype(np.int32)
    pos[1, r.integers(12)] = length - 1
    q = r.standard_normal((2, 12, 4, H)).astype(np.float32)
    k = r.standard_normal((2, 12, 2, H)).astype(np.float32)
    cos, sin = module(torch.from_numpy(q), torch.from_numpy(pos).long())
    q_ref, k_ref = apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), cos, sin, unsqueeze_dim=2)

    inv = np.asarray(T.rope_inverse_frequencies(cfg, jnp.asarray(pos)))
    ref_inv = module.inv_freq.numpy()  # after the call: dynamic NTK has updated it
    if name == "dynamic_above":  # traced float32 powers: within a few ulps of PyTorch's
        np.testing.assert_allclose(inv, ref_inv, rtol=1e-6, atol=0)
        assert inv[-1] < 0.75 * _plain(cfg)[-1]  # the base grew
    else:  # computed as PyTorch does, to the last bit
        np.testing.assert_array_equal(inv, ref_inv)
    if name == "dynamic_below":
        np.testing.assert_array_equal(inv, _plain(cfg))
    factor = T.rope_attention_factor(cfg)
    assert factor == module.attention_scaling
    assert (factor != 1.0) == name.startswith("yarn")
    if name == "yarn":  # transformers' default: 0.1 ln(factor) + 1
        assert factor == pytest.approx(0.1 * np.log(4.0) + 1)
    for x, ref in ((q, q_ref), (k, k_ref)):
        ours = np.asarray(T.rope(jnp.asarray(x), jnp.asarray(pos), inv_freq=inv, attention_factor=factor))
        np.testing.assert_allclose(ours, ref.numpy(), atol=2e-6, rtol=0)


# --------------------------------------------------------------------------------------------
# Whole models: a tiny random Llama with each scaling, imported through models.hf


class Pair:
    """A transformers LlamaForCausalLM with random weights and the Loom model `models.hf.load` makes of it."""

    def __init__(self, max_pos, params, tmp, seed):
        torch.manual_seed(seed)
        self.hf = randomize_hf(transformers.LlamaForCausalLM(_hf_config(max_pos, params, theta=500.0)).eval(),
                               seed=seed)
        self.dir = tmp / "hf"
        self.hf.save_pretrained(self.dir)
        self.model, self.cfg = hf.load(self.dir)


@pytest.fixture(scope="module")
def yarn(tmp_path_factory):
    return Pair(64, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16),
                tmp_path_factory.mktemp("yarn"), seed=1)


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory):
    return Pair(32, dict(rope_type="dynamic", factor=3.0), tmp_path_factory.mktemp("dynamic"), seed=2)


def _err(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _fresh_hf_logits(pair, tokens):
    """transformers' logits from a fresh copy of the model (its dynamic rotary module is stateful)."""
    fresh = transformers.LlamaForCausalLM.from_pretrained(pair.dir, attn_implementation="eager").eval()
    return hf_logits(fresh, tokens)


@pytest.mark.parametrize("kind", ["yarn", "dynamic"])
def test_logits_equal_transformers(kind, request):
    pair = request.getfixturevalue(kind)
    assert pair.cfg.rope_scaling == kind and pair.cfg.rope_theta == 500.0
    tokens = random_tokens(np.random.default_rng(10), (2, 48), 128)  # past the original length (yarn 16, dynamic 32)
    ref = _fresh_hf_logits(pair, tokens)
    err = _err(pair.model(tokens), ref)
    print(f"{kind}: max abs logit error {err:.2e}")
    assert err <= TOL
    # the scaling matters at this length: the same weights without it break parity
    graphdef, _ = T.split_params(T.abstract_model(pair.cfg.replace(rope_scaling="none")))
    plain = T.merge_params(graphdef, T.split_params(pair.model)[1])
    assert _err(plain(tokens), ref) > 100 * TOL
    if kind == "dynamic":  # below the original length it is plain RoPE, as transformers'
        short = tokens[:, :32]
        np.testing.assert_allclose(np.asarray(pair.model(short)), np.asarray(plain(short)), atol=1e-6, rtol=0)
        assert _err(pair.model(short), _fresh_hf_logits(pair, short)) <= TOL


def _decode(model, tokens, bounds, max_len):
    """Logits of `tokens` fed to `model` with a KV cache, chunk bounds[i]:bounds[i + 1] per call."""
    graphdef, params = T.split_params(model)
    step = jax.jit(lambda p, x, c: T.merge_params(graphdef, p)(x, cache=c))
    cache = T.init_cache(model.config, tokens.shape[0], max_len)
    outs = []
    for lo, hi in zip(bounds, bounds[1:]):
        logits, cache = step(params, tokens[:, lo:hi], cache)
        outs.append(np.asarray(logits))
    return np.concatenate(outs, 1)


def test_yarn_kv_cache_decode_equals_full_forward(yarn):
    """Prefill, single tokens and chunks, past the original length (16), give the full forward's logits."""
    tokens = random_tokens(np.random.default_rng(11), (2, 30), 128)
    ours = _decode(yarn.model, tokens, [0, 9, 10, 11, 19, 20, 28, 29, 30], max_len=32)
    np.testing.assert_allclose(ours, np.asarray(yarn.model(tokens)), atol=1e-5, rtol=1e-5)


def test_dynamic_decode_equals_transformers_growing_cache(dynamic):
    """Dynamic NTK with a KV cache: a prefill below the original length (32), then one token per
    call past it. Each call uses the frequencies of its own max position, and cached keys keep
    those they were written with: what transformers' stateful module does for a growing sequence."""
    tokens = random_tokens(np.random.default_rng(12), (2, 44), 128)
    fresh = transformers.LlamaForCausalLM.from_pretrained(dynamic.dir, attn_implementation="eager").eval()
    with torch.no_grad():
        out = fresh(torch.as_tensor(tokens[:, :20], dtype=torch.long), use_cache=True)
        ref = [out.logits.numpy()]
        for i in range(20, 44):
            out = fresh(torch.as_tensor(tokens[:, i:i + 1], dtype=torch.long), cache=out.cache, use_cache=True)
            ref.append(out.logits.numpy())
    ours, ref = _decode(dynamic.model, tokens, [0, *range(20, 45)], max_len=48), np.concatenate(ref, 1)
    assert _err(ours, ref) <= TOL
    # past the original length this is not one forward over the whole sequence (which gives every
    # token length 44's frequencies): the comparison above tests the per-call semantics
    assert _err(ours[:, 32:], np.asarray(dynamic.model(tokens))[:, 32:]) > 100 * TOL


def test_cpu_decode_layout_decodes_as_the_model(dynamic):
    """inference.generate on the CPU decode layout (unrolled blocks, re-laid kernels, the same
    Attention modules) gives the plain layout's tokens and log-probs, past the original length,
    with the call-dependent dynamic frequencies."""
    r = np.random.default_rng(13)
    prompts = [random_tokens(r, (n,), 128).tolist() for n in (26, 19)]
    ids, lps = generate(dynamic.model, prompts, max_new_tokens=12, return_logprobs=True, decode_layout=True)
    ref_ids, ref_lps = generate(dynamic.model, prompts, max_new_tokens=12, return_logprobs=True, decode_layout=False)
    assert ids == ref_ids
    np.testing.assert_allclose(np.concatenate(lps), np.concatenate(ref_lps), atol=1e-5)


def test_yarn_export_loads_in_transformers(yarn, tmp_path):
    arch = hf.save(yarn.model, tmp_path)  # the architecture inferred from the config alone
    assert arch == "LlamaForCausalLM"
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["rope_parameters"]["rope_type"] == written["rope_scaling"]["rope_type"] == "yarn"
    assert hf.from_hf_config(written) == yarn.cfg
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = random_tokens(np.random.default_rng(14), (1, 40), 128)
    assert _err(hf_logits(back, tokens), hf_logits(yarn.hf, tokens)) <= 1e-6


# --------------------------------------------------------------------------------------------
# Config: Hugging Face round trip and validation


@pytest.mark.parametrize("spelling", ["transformers5", "transformers4"])
def test_qwen2_yarn_config_round_trips(spelling):
    """Qwen2.5's published YaRN recipe (transformers 4 spelling: top-level rope_theta, `type`)
    and the same in transformers 5's rope_parameters: imported, exported, imported again."""
    hf_cfg = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=128, hidden_size=64,
                  intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=32768)
    scaling = dict(factor=4.0, original_max_position_embeddings=32768)
    if spelling == "transformers5":
        hf_cfg["rope_parameters"] = dict(rope_type="yarn", rope_theta=1e6, **scaling, beta_fast=16, truncate=False,
                                         attention_factor=1.25)
    else:
        hf_cfg.update(rope_theta=1e6, rope_scaling=dict(type="yarn", **scaling))
    cfg = hf.from_hf_config(hf_cfg)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_max_seq_len) == (
        1e6, "yarn", 4.0, 32768)
    if spelling == "transformers5":
        assert (cfg.rope_beta_fast, cfg.rope_beta_slow, cfg.rope_truncate, cfg.rope_attention_factor) == (
            16.0, 1.0, False, 1.25)
    else:
        assert (cfg.rope_beta_fast, cfg.rope_beta_slow, cfg.rope_truncate, cfg.rope_attention_factor) == (
            32.0, 1.0, True, 0.0)
    assert families.representation_errors(cfg, "Qwen2ForCausalLM") == []
    out = hf.to_hf_config(cfg, "Qwen2ForCausalLM", base=hf_cfg)
    assert hf.from_hf_config(out) == cfg
    # transformers reads the same numbers from what we wrote
    module = Qwen2RotaryEmbedding(transformers.Qwen2Config.from_dict(out))
    np.testing.assert_array_equal(np.asarray(T.rope_frequencies(cfg), np.float32), module.inv_freq.numpy())
    assert module.attention_scaling == T.rope_attention_factor(cfg)


def test_dynamic_and_mscale_configs_round_trip():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=4096)
    cfg = hf.from_hf_config({**base, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "rope_theta": 5e5})
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_theta, cfg.max_seq_len) == ("dynamic", 2.0, 5e5, 4096)
    out = hf.to_hf_config(cfg, "LlamaForCausalLM")
    assert out["rope_parameters"] == {"rope_type": "dynamic", "rope_theta": 5e5, "factor": 2.0}
    assert hf.from_hf_config(out) == cfg
    # transformers' dynamic NTK grows past max_position_embeddings: another original length is not expressible
    with pytest.raises(ValueError, match=r"rope_original_max_seq_len=1024 \(it has 4096\)"):
        families.check_representable(cfg.replace(rope_original_max_seq_len=1024), "LlamaForCausalLM")

    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}  # DeepSeek's shape of config
    cfg = hf.from_hf_config({**base, "max_position_embeddings": 163840, "rope_parameters": yarn})
    assert (cfg.rope_mscale, cfg.rope_mscale_all_dim, cfg.rope_attention_factor) == (1.0, 0.8, 0.0)
    assert hf.from_hf_config(hf.to_hf_config(cfg, "LlamaForCausalLM")) == cfg
    # no factor: transformers takes the ratio of the two lengths
    del yarn["factor"]
    assert hf.from_hf_config({**base, "max_position_embeddings": 163840, "rope_parameters": yarn}
                             ).rope_scaling_factor == 40.0


def test_bad_values_are_rejected_by_name():
    def make(**kw):
        return ModelConfig(**_OURS, max_seq_len=64, **kw)

    with pytest.raises(ValueError, match=r"model.rope_scaling='longrope' is not valid; expected one of "
                                         r"\('none', 'linear', 'llama3', 'dynamic', 'yarn'\)"):
        make(rope_scaling="longrope")
    with pytest.raises(ValueError, match=r"model.rope_beta_slow=40.0 and model.rope_beta_fast=32.0 must satisfy "
                                         r"0 < beta_slow <= beta_fast"):
        make(rope_scaling="yarn", rope_scaling_factor=4.0, rope_beta_slow=40.0)
    with pytest.raises(ValueError, match=r"model.rope_beta_slow=0.0 and model.rope_beta_fast=32.0"):
        make(rope_scaling="yarn", rope_scaling_factor=4.0, rope_beta_slow=0.0)
    for name in ("rope_attention_factor", "rope_mscale", "rope_mscale_all_dim"):
        with pytest.raises(ValueError, match=rf"model.{name}=-0.5 must be >= 0 \(0 = unset\)"):
            make(rope_scaling="yarn", rope_scaling_factor=4.0, **{name: -0.5})
    with pytest.raises(ValueError, match=r"model.rope_scaling_factor=0.0 must be positive"):
        make(rope_scaling="dynamic", rope_scaling_factor=0.0)
    with pytest.raises(ValueError, match=r"model.rope_original_max_seq_len=-8 must be >= 0"):
        make(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_seq_len=-8)
    with pytest.raises(ValueError, match=r"model.head_dim=2 is too small for dynamic RoPE scaling"):
        ModelConfig(**{**_OURS, "head_dim": 2}, max_seq_len=64, rope_scaling="dynamic", rope_scaling_factor=2.0)
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match=r"YaRN attention_factor=0.0 is not supported \(it must be > 0\)"):
        hf.from_hf_config({**base, "rope_scaling": {"type": "yarn", "factor": 4.0, "attention_factor": 0.0}})
