"""Mixture-of-experts families from and to Hugging Face `transformers`: Mixtral, Qwen2-MoE,
Qwen3-MoE, DeepSeek-V2 with MoE layers. Logits equal transformers in float32 (max abs error
<= 1e-4) at 320-token inputs, packed and padded; expert weights read from per-expert tensors
(what `save_pretrained` writes) and from the fused in-memory form (`experts.gate_up_proj`,
`experts.down_proj`); export writes per-expert tensors that transformers loads back bit for bit;
greedy decoding equals transformers' `generate`.

Each family is a tiny random model built locally (no download) with the options its real
checkpoints use: Mixtral's sliding window, Qwen2-MoE's gated shared expert, per-layer windows and
a dense layer between MoE ones (`mlp_only_layers`), Qwen3-MoE's QK-norm and
`decoder_sparse_step`, DeepSeek-V2's latent attention, dense prefix, shared experts,
`routed_scaling_factor` and group-limited routing (with `norm_topk_prob=True` in its config, which
transformers' DeepseekV2 never reads).
"""

import dataclasses
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import models.hf as hf  # noqa: E402
from models import transformer as T  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from tests.helpers import hf_logits, randomize_hf, tiny_model_config  # noqa: E402

T_LEN = 320
TOL = 1e-4
V = 256
_COMMON = dict(vocab_size=V, hidden_size=48, intermediate_size=64, num_attention_heads=4, max_position_embeddings=512,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _moe(**kw):
    return lambda cfg: cfg.replace(moe=dataclasses.replace(cfg.moe, **kw))


# family -> (model class, config, a change of our config that must break parity: proof the option matters)
FAMILIES = {
    "mixtral": (transformers.MixtralForCausalLM, lambda: transformers.MixtralConfig(
        **_COMMON, num_hidden_layers=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=48), _moe(norm_topk_prob=False)),
    "qwen2_moe": (transformers.Qwen2MoeForCausalLM, lambda: transformers.Qwen2MoeConfig(
        **_COMMON, num_hidden_layers=3, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=24, shared_expert_intermediate_size=40, mlp_only_layers=[1], use_sliding_window=True,
        sliding_window=40, max_window_layers=2), _moe(norm_topk_prob=True)),
    "qwen3_moe": (transformers.Qwen3MoeForCausalLM, lambda: transformers.Qwen3MoeConfig(
        **_COMMON, num_hidden_layers=2, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=24, norm_topk_prob=True, decoder_sparse_step=2), _moe(norm_topk_prob=False)),
    "deepseek_v2": (transformers.DeepseekV2ForCausalLM, lambda: transformers.DeepseekV2Config(
        **_COMMON, num_hidden_layers=3, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=2,
        moe_intermediate_size=16, routed_scaling_factor=2.0, topk_method="group_limited_greedy", n_group=4,
        topk_group=2, norm_topk_prob=True), _moe(num_groups=0, topk_groups=0)),  # (k 3 > topk_group: it matters)
}

# what each family's import must give (besides the shapes)
EXPECTED = {
    "mixtral": dict(num_experts=4, experts_per_token=2, norm_topk_prob=True, num_shared_experts=0),
    "qwen2_moe": dict(num_experts=4, expert_intermediate_size=24, num_shared_experts=1, shared_intermediate_size=40,
                      shared_expert_gate=True, norm_topk_prob=False, dense_layers=(1,)),
    "qwen3_moe": dict(num_experts=8, expert_intermediate_size=24, norm_topk_prob=True, dense_layers=(0,)),
    "deepseek_v2": dict(num_experts=8, num_shared_experts=2, expert_intermediate_size=16, first_dense_layers=1,
                        routed_scaling_factor=2.0, norm_topk_prob=False, num_groups=4, topk_groups=2),
}


class Family:
    def __init__(self, name, tmp):
        cls, make_config, self.mutation = FAMILIES[name]
        config = make_config()
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        self.name = name
        self.hf = randomize_hf(cls(config).eval(), seed=len(name))
        self.dir = tmp / "hf"
        self.hf.save_pretrained(self.dir)
        self.model, self.cfg = hf.load(self.dir)
        self.tokens = np.random.default_rng(0).integers(0, V, (2, T_LEN), dtype=np.int32)
        self.ref = hf_logits(self.hf, self.tokens)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def fam(request, tmp_path_factory):
    return Family(request.param, tmp_path_factory.mktemp(request.param))


def _err(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _params(model):
    return {"/".join(map(str, k)): np.asarray(v) for k, v in _flat(T.split_params(model)[1])}


def _flat(tree, prefix=()):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def test_logits_match_transformers(fam):
    assert {k: getattr(fam.cfg.moe, k) for k in EXPECTED[fam.name]} == EXPECTED[fam.name]
    ours = fam.model(fam.tokens)
    err = _err(ours, fam.ref)
    print(f"{fam.name}: max abs logit error {err:.2e}")
    assert err <= TOL
    # the family's routing option matters at this length: without it parity breaks
    graphdef, _ = T.split_params(T.abstract_model(fam.mutation(fam.cfg)))
    mutant = T.merge_params(graphdef, T.split_params(fam.model)[1])
    assert _err(mutant(fam.tokens), fam.ref) > 100 * TOL


def test_packed_and_padded_batch_equals_each_document_alone(fam):
    """Row 0 packs two documents and ends in padding; row 1 is one document."""
    r = np.random.default_rng(1)
    tokens = np.zeros((2, T_LEN), np.int32)
    seg = np.zeros((2, T_LEN), np.int32)
    pos = np.zeros((2, T_LEN), np.int32)
    docs = []
    for row, lens in enumerate([(150, 130), (T_LEN,)]):
        start = 0
        for s, n in enumerate(lens):
            doc = r.integers(0, V, n, dtype=np.int32)
            span = slice(start, start + n)
            tokens[row, span], seg[row, span], pos[row, span] = doc, s + 1, np.arange(n)
            docs.append((row, start, doc))
            start += n
    ours = np.asarray(fam.model(tokens, positions_BT=pos, segment_ids_BT=seg))
    for row, start, doc in docs:
        assert _err(ours[row, start:start + len(doc)], hf_logits(fam.hf, doc[None])[0]) <= TOL


def test_fused_expert_tensors_load_the_same_weights(fam, tmp_path):
    """transformers' in-memory names (experts.gate_up_proj [E, 2F, D], down_proj [E, D, F];
    Mixtral's router under mlp.gate), which its own loader also accepts, give the same model."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in fam.hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    (tmp_path / "config.json").write_text((fam.dir / "config.json").read_text())
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    fused, cfg = hf.load(tmp_path)
    assert cfg == fam.cfg
    a, b = _params(fused), _params(fam.model)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_export_loads_in_transformers_with_the_same_tensors(fam, tmp_path):
    arch = hf.save(fam.model, tmp_path, hf_config=hf.read_hf_config(fam.dir))
    assert arch == type(fam.hf).__name__
    assert hf.infer_architecture(fam.cfg) == arch  # without the source config too
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:  # per-expert tensors, as save_pretrained
        written = set(f.keys())
    with safe_open(str(fam.dir / "model.safetensors"), "np") as f:
        assert written == set(f.keys())
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(back) is type(fam.hf)
    original, exported = fam.hf.state_dict(), back.state_dict()
    assert original.keys() == exported.keys()
    for name, value in original.items():
        assert torch.equal(value, exported[name]), name
    assert _err(hf_logits(back, fam.tokens), fam.ref) <= 1e-6
    assert hf.from_hf_config(json.loads((tmp_path / "config.json").read_text())) == fam.cfg


@pytest.mark.parametrize("name", ["mixtral", "deepseek_v2"])
def test_greedy_generate_equals_transformers(name, tmp_path):
    from inference import generate

    f = Family(name, tmp_path)
    prompts = [np.random.default_rng(2).integers(0, V, n).tolist() for n in (60, 37)]
    refs = []
    for prompt in prompts:
        with torch.no_grad():
            refs.append(f.hf.generate(torch.as_tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, len(prompt):].tolist())
    # one row through the stacked layers' cache; both (the shorter left-padded) through the decode layout
    assert generate(f.model, prompts[:1], max_new_tokens=8, decode_layout=False) == refs[:1]
    assert generate(f.model, prompts, max_new_tokens=8, decode_layout=True) == refs


def test_expert_sharded_loading_reads_each_shard(tmp_path):
    """On a mesh with experts over `expert` (4) and hidden dims over `tensor` (2), each device
    reads its experts' tensors (one per expert) and its rows: the same logits as transformers."""
    import jax

    f = Family("qwen2_moe", tmp_path)
    mesh = jax.make_mesh((1, 1, 1, 2, 1, 4), ("data", "stage", "fsdp", "tensor", "sequence", "expert"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 6)
    model, _ = hf.load(f.dir, mesh=mesh)
    up = T.split_params(model)[1]["layers"]["mlp"]["experts"]["up"]  # [L, E, D, F]
    assert up.sharding.spec[1] == "expert" and up.addressable_shards[0].data.shape[1] == 1
    np.testing.assert_allclose(np.asarray(model(f.tokens[:, :64])), f.ref[:, :64], atol=TOL, rtol=0)


# --------------------------------------------------------------------------------------------
# Loom configs -> the family that reproduces them, or the reason none does


def _cfg(**moe):
    return tiny_model_config(num_layers=3, max_seq_len=128, moe=dict(num_experts=4, **moe))


def test_infer_architecture_picks_the_family_that_reproduces_the_model():
    assert hf.infer_architecture(_cfg()) == "MixtralForCausalLM"
    with pytest.raises(ValueError, match=r"MixtralForCausalLM: differs in moe.norm_topk_prob=False \(it has True\)"):
        hf.infer_architecture(_cfg(norm_topk_prob=False))  # Mixtral always renormalises; Qwen3-MoE has QK-norm
    assert hf.infer_architecture(_cfg(norm_topk_prob=False).replace(qk_norm=True)) == "Qwen3MoeForCausalLM"
    assert hf.infer_architecture(_cfg(num_shared_experts=1, shared_expert_gate=True,
                                      dense_layers=(1,))) == "Qwen2MoeForCausalLM"
    assert hf.infer_architecture(_cfg(first_dense_layers=1).replace(qk_norm=True)) == "Qwen3MoeForCausalLM"
    mla = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    ds = tiny_model_config(num_layers=3, num_kv_heads=4, max_seq_len=128, mla=mla, moe=dict(
        num_experts=8, num_shared_experts=2, first_dense_layers=1, norm_topk_prob=False, routed_scaling_factor=16.0,
        num_groups=4, topk_groups=2))
    assert hf.infer_architecture(ds) == "DeepseekV2ForCausalLM"
    # training-only fields do not matter; the aux-loss weight travels as router_aux_loss_coef
    cfg = _cfg(aux_loss_weight=0.02, z_loss_weight=1e-3, grouped_matmul="ragged_dot")
    written = hf.to_hf_config(cfg, "MixtralForCausalLM")
    assert written["output_router_logits"] and written["router_aux_loss_coef"] == pytest.approx(0.01)
    assert hf.from_hf_config(written).moe.aux_loss_weight == pytest.approx(0.02)


@pytest.mark.parametrize("moe, reason", [
    (dict(router="sigmoid"), r"moe.router='sigmoid' \(it has 'softmax'\)"),
    (dict(bias_balancing=True), r"moe.bias_balancing=True \(it has False\)"),
    (dict(capacity_factor=1.25), r"moe.capacity_factor=1.25 \(it has 0.0\)"),
])
def test_features_no_family_expresses_are_named(moe, reason):
    with pytest.raises(ValueError, match="no supported Hugging Face architecture expresses this model") as e:
        hf.infer_architecture(_cfg(**moe))
    assert all(a in str(e.value) for a in ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "DeepseekV2ForCausalLM"))
    import re
    assert re.search(reason, str(e.value))
    assert re.search(r"LlamaForCausalLM: differs in mixture-of-experts layers \(model.moe.num_experts=4\)",
                     str(e.value))


def test_a_dense_model_is_no_moe_family():
    cfg = tiny_model_config()
    errors = hf.representation_errors(cfg, "MixtralForCausalLM")
    assert errors == ["no mixture-of-experts layers (model.moe.num_experts=0): MixtralForCausalLM has them"]
    assert hf.infer_architecture(cfg) == "LlamaForCausalLM"
    # dense layers anywhere travel as mlp_only_layers
    cfg = _cfg(dense_layers=(0, 2), num_shared_experts=1, shared_expert_gate=True)
    written = hf.to_hf_config(cfg, "Qwen2MoeForCausalLM")
    assert written["mlp_only_layers"] == [0, 2] and written["decoder_sparse_step"] == 1
    back = hf.from_hf_config(written)
    assert isinstance(back, ModelConfig) and back.moe.dense_layers == (0, 2)
    assert hf.representation_errors(cfg, "Qwen2MoeForCausalLM") == []
    assert not hf.from_hf_config({**written, "mlp_only_layers": [0, 1, 2]}).moe.enabled  # no MoE layer left


@pytest.mark.slow
def test_peft_adapter_on_interleaved_dense_and_moe_layers(tmp_path):
    """LoRA on attention (every layer) and the dense / shared-expert MLPs of a Qwen2-MoE model
    whose layer 1 is dense: the PEFT adapter names each module by its global layer (not its row
    in the dense or MoE stack); peft on the transformers base gives Loom's logits."""
    peft = pytest.importorskip("peft")
    from models.hf import peft_io
    from models.lora import apply_lora
    from tests.helpers import randomize_adapters

    f = Family("qwen2_moe", tmp_path)
    adapted = randomize_adapters(apply_lora(f.model, rank=4, alpha=8), seed=1)
    ours = np.asarray(adapted(f.tokens))
    assert _err(ours, f.ref) > 100 * TOL
    peft_io.save_adapter(adapted, tmp_path / "adapter", architecture="Qwen2MoeForCausalLM")
    from models.hf.safetensors_io import tensors_in

    keys = tensors_in([tmp_path / "adapter" / "adapter_model.safetensors"])
    assert "base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight" in keys  # the dense layer
    assert "base_model.model.model.layers.2.mlp.shared_expert.gate_proj.lora_A.weight" in keys  # MoE row 1
    base = transformers.AutoModelForCausalLM.from_pretrained(f.dir, attn_implementation="eager").eval()
    assert _err(hf_logits(peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval(), f.tokens), ours) <= TOL
    back = peft_io.load_adapter(f.model, tmp_path / "adapter")
    assert _err(back(f.tokens), ours) <= 1e-5
