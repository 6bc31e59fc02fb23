"""DeepSeek-V2 (multi-head latent attention, dense MLP layers) from and to Hugging Face
`transformers`: logits equal at 320-token inputs (f32, 1e-4), greedy decoding through the latent
cache equals transformers' `generate`, and an exported model loads back in transformers.

Tiny random models are built with transformers (no download) with `first_k_dense_replace`
covering every layer; DeepSeek-V2 with MoE layers: tests/models/test_hf_moe.py.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import models.hf as hf  # noqa: E402
from models.hf.families import interleaved_to_halves  # noqa: E402
from tests.helpers import hf_logits, randomize_hf  # noqa: E402

VOCAB = 211


def _deepseek(seed, **overrides):
    kw = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
              first_k_dense_replace=2, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
              max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False)
    kw.update(overrides)
    cfg = transformers.DeepseekV2Config(**kw)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomize_hf(transformers.DeepseekV2ForCausalLM(cfg).eval(), seed)


CASES = {
    "q_lora": {},
    # DeepSeek-V2-Lite's queries (one projection), biases, YaRN with both mscales (softmax mscale^2)
    "lite_yarn_bias": dict(q_lora_rank=None, attention_bias=True,
                           rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                                original_max_position_embeddings=128, beta_fast=32, beta_slow=1,
                                                mscale=0.707, mscale_all_dim=0.707)),
}


def test_interleaved_to_halves():
    assert interleaved_to_halves(2, 6) == (0, 1, 2, 4, 6, 3, 5, 7)


@pytest.mark.parametrize("case", CASES)
def test_deepseek_v2_matches_transformers(case, tmp_path):
    model_hf = _deepseek(0, **CASES[case])
    model_hf.save_pretrained(tmp_path)
    model, cfg = hf.load(tmp_path)
    m = cfg.mla
    assert (cfg.head_dim, cfg.num_kv_heads, m.kv_lora_rank, m.qk_nope_head_dim, m.v_head_dim) == (8, 4, 32, 16, 12)
    assert m.q_lora_rank == (CASES[case].get("q_lora_rank", 24) or 0)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 320), dtype=np.int32)
    err = float(np.abs(np.asarray(model(tokens)) - hf_logits(model_hf, tokens)).max())
    print(f"{case}: max abs logit error {err:.2e}")
    assert err < 1e-4


def test_greedy_generate_equals_transformers(tmp_path):
    from inference import generate

    model_hf = _deepseek(1)
    model_hf.save_pretrained(tmp_path)
    model, _ = hf.load(tmp_path)
    prompt = np.random.default_rng(1).integers(0, VOCAB, 300).tolist()  # past YaRN-free short prompts
    ref = model_hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
    for layout in (False, True):
        assert generate(model, [prompt], max_new_tokens=8, decode_layout=layout)[0] == ref


def test_export_loads_back_in_transformers(tmp_path):
    model_hf = _deepseek(2, q_lora_rank=None, attention_bias=True)
    model_hf.save_pretrained(tmp_path / "in")
    model, cfg = hf.load(tmp_path / "in")
    arch = hf.save(model, tmp_path / "out", hf_config=hf.read_hf_config(tmp_path / "in"))
    assert arch == "DeepseekV2ForCausalLM" and hf.infer_architecture(cfg) == arch
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["first_k_dense_replace"] == 2 and written["q_lora_rank"] is None
    back = transformers.DeepseekV2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    for name, p in model_hf.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[name].numpy(), p.numpy(), err_msg=name)


def test_unsupported_moe_routing_is_refused_with_the_reason(tmp_path):
    """MoE layers load (tests/models/test_hf_moe.py); a routing transformers' DeepseekV2 does not
    run (DeepSeek-V3's noaux_tc) or MoE layers without shared experts are refused by name."""
    config = _deepseek(3, first_k_dense_replace=1).config.to_dict()
    with pytest.raises(ValueError, match=r"topk_method='noaux_tc' is not supported by DeepseekV2ForCausalLM"):
        hf.from_hf_config({**config, "topk_method": "noaux_tc"})
    with pytest.raises(ValueError, match=r"n_shared_experts=0 is not supported"):
        hf.from_hf_config({**config, "n_shared_experts": 0})
    assert hf.from_hf_config(config).num_moe_layers == 1


def test_sharded_loading_permutes_each_shard(tmp_path):
    """On a mesh (fsdp 4 x tensor 2) each device reads its block; the permuted rope rows are read
    whole along their axis, reordered, then sliced: the same logits as transformers."""
    import jax

    from models import transformer as T

    model_hf = _deepseek(4, q_lora_rank=None, attention_bias=True)
    model_hf.save_pretrained(tmp_path)
    mesh = jax.make_mesh((1, 1, 4, 2, 1, 1), ("data", "stage", "fsdp", "tensor", "sequence", "expert"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 6)
    model, _ = hf.load(tmp_path, mesh=mesh)
    _, params = T.split_params(model)
    q = params["layers"]["attn"]["q"]["kernel"]  # [L, D, N, Hq]: D over fsdp, heads over tensor, Hq permuted
    assert q.sharding.spec[:3] == (None, "fsdp", "tensor") and q.addressable_shards[0].data.shape == (2, 12, 2, 24)
    tokens = np.random.default_rng(4).integers(0, VOCAB, (2, 64), dtype=np.int32)
    np.testing.assert_allclose(np.asarray(model(tokens)), hf_logits(model_hf, tokens), atol=1e-4, rtol=0)
