"""models.hf beyond one family's parity: sharded loading on a mesh, sharded files, dtypes, errors, the CLI."""

import json
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import models.hf as hf  # noqa: E402
from models import checkpoint as ckpt  # noqa: E402
from models import transformer as T  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.hf import families  # noqa: E402
from models.hf.safetensors_io import SafetensorsReader, tensors_in  # noqa: E402
from tests.helpers import hf_logits, randomize_hf, run_program  # noqa: E402

CONFIG = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=None,
              eos_token_id=None, pad_token_id=None)






@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    """Gemma 2: tied embeddings, per-layer windows, post norms: the most options in one model."""
    config = transformers.Gemma2Config(**CONFIG, sliding_window=24, query_pre_attn_scalar=16,
                                       attn_logit_softcapping=5.0, final_logit_softcapping=3.0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = randomize_hf(transformers.Gemma2ForCausalLM(config).eval())
    path = tmp_path_factory.mktemp("gemma2")
    model.save_pretrained(path)
    tokens = np.random.default_rng(0).integers(0, 256, (2, 96), dtype=np.int32)
    return model, path, tokens, hf_logits(model, tokens)


def _mesh(fsdp, tensor):
    axes = ("data", "stage", "fsdp", "tensor", "sequence", "expert")
    shape = (8 // (fsdp * tensor), 1, fsdp, tensor, 1, 1)
    return jax.make_mesh(shape, axes, axis_types=(jax.sharding.AxisType.Auto,) * 6)


def test_sharded_loading_reads_only_each_shard(gemma2, monkeypatch):
    model_hf, path, tokens, ref = gemma2
    reads = []
    original = SafetensorsReader.read

    def recording_read(self, name, index=None):
        out = original(self, name, index)
        reads.append((name, out.size, int(np.prod(self.shape(name)))))
        return out

    monkeypatch.setattr(SafetensorsReader, "read", recording_read)
    mesh = _mesh(fsdp=4, tensor=2)
    model, cfg = hf.load(path, mesh=mesh)
    _, params = T.split_params(model)
    q = params["layers"]["attn"]["q"]["kernel"]  # [L, D, N, H]: D over fsdp, N over tensor
    assert q.sharding.spec[:3] == (None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (2, 64 // 4, 4 // 2, 16)
    assert len({s.device for s in q.addressable_shards}) == 8
    assert params["embed"].addressable_shards[0].data.shape == (256 // 2, 64 // 4)  # vocab over tensor
    # every read of a layer's projection is that shard's block, never the whole tensor
    proj = [(n, got, full) for n, got, full in reads if "proj" in n]
    assert proj and all(got * 8 == full for n, got, full in proj if "q_proj" in n or "o_proj" in n)
    assert all(got < full for n, got, full in proj)
    # the same function, called with no mesh set
    np.testing.assert_allclose(np.asarray(model(tokens)), ref, atol=1e-4, rtol=0)
    # and jitted under the mesh, as training would
    graphdef, params = T.split_params(model)
    with jax.set_mesh(mesh):
        jitted = jax.jit(T.apply)(graphdef, params, {"inputs_BT": tokens})
    np.testing.assert_allclose(np.asarray(jitted), ref, atol=1e-4, rtol=0)


def test_sharded_files_both_ways(gemma2, tmp_path):
    model_hf, _, tokens, ref = gemma2
    model_hf.save_pretrained(tmp_path / "hf", max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    model, _ = hf.load(tmp_path / "hf")
    np.testing.assert_allclose(np.asarray(model(tokens)), ref, atol=1e-4, rtol=0)
    hf.save(model, tmp_path / "out", max_shard_bytes=60_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / "out" / "model.safetensors").exists()
    assert set(tensors_in(tmp_path / "out" / f for f in files)) == set(model_hf.state_dict()) - {"lm_head.weight"}
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager")
    np.testing.assert_allclose(hf_logits(back, tokens), ref, atol=1e-6, rtol=0)


def test_bfloat16_checkpoint_keeps_its_dtype_or_converts(tmp_path):
    config = transformers.LlamaConfig(**CONFIG)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model_hf = randomize_hf(transformers.LlamaForCausalLM(config).eval()).to(torch.bfloat16)
    model_hf.save_pretrained(tmp_path / "hf")
    assert {d for d, _ in tensors_in([tmp_path / "hf" / "model.safetensors"]).values()} == {"BF16"}
    tokens = np.random.default_rng(0).integers(0, 256, (1, 64), dtype=np.int32)

    model, cfg = hf.load(tmp_path / "hf")  # dtype=None keeps bfloat16 for params and compute
    assert cfg.dtype == cfg.param_dtype == "bfloat16"
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(T.split_params(model)[1]))
    ours_bf16 = np.asarray(model(tokens))

    model32, cfg32 = hf.load(tmp_path / "hf", dtype="float32")  # exact widening of the same weights
    assert cfg32.dtype == "float32"
    # (a fresh float32 model: .float() on a bfloat16 one keeps RoPE's inv_freq buffer rounded to bfloat16)
    ref32 = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager"), tokens)
    np.testing.assert_allclose(np.asarray(model32(tokens)), ref32, atol=1e-4, rtol=0)
    assert np.abs(ours_bf16 - ref32).max() < 0.25  # bfloat16 compute: close, not equal

    hf.save(model, tmp_path / "out")  # written as it is held: bfloat16
    assert {d for d, _ in tensors_in([tmp_path / "out" / "model.safetensors"]).values()} == {"BF16"}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    hf.save(model32, tmp_path / "out16", dtype="float16")
    assert {d for d, _ in tensors_in([tmp_path / "out16" / "model.safetensors"]).values()} == {"F16"}


def test_unknown_architecture_names_the_valid_ones(gemma2, tmp_path):
    shutil.copytree(gemma2[1], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(architectures=["FalconForCausalLM"], model_type="falcon")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"architecture 'FalconForCausalLM' is not supported; supported "
                                         r"architectures: GPT2LMHeadModel, Gemma2ForCausalLM, GemmaForCausalLM, "
                                         r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        hf.load(tmp_path)


def test_wrong_shape_names_the_tensor_and_the_expected_shape(gemma2, tmp_path):
    shutil.copytree(gemma2[1], tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(128, 64\); "
                                         r"expected \(96, 64\) for Gemma2ForCausalLM"):
        hf.load(tmp_path)


def test_missing_and_unexpected_tensors(tmp_path):
    config = transformers.Qwen2Config(**CONFIG)
    model_hf = transformers.Qwen2ForCausalLM(config)
    model_hf.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    # claiming Llama: Llama has no q/k/v biases, so Qwen2's are left over
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ValueError, match=r"tensors that LlamaForCausalLM .* does not use, e\.g\. "
                                         r"\['model\.layers\.0\.self_attn\.k_proj\.bias'"):
        hf.load(tmp_path / "a")
    # claiming Qwen3: its QK-norm weights are missing
    (tmp_path / "a" / "config.json").write_text(json.dumps({**cfg, "architectures": ["Qwen3ForCausalLM"],
                                                            "model_type": "qwen3", "attention_bias": False}))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.self_attn\.q_norm\.weight' \(expected shape "
                                         r"\(16,\)\) is missing for Qwen3ForCausalLM"):
        hf.load(tmp_path / "a")


def test_unsupported_options_fail_clearly():
    base = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2)
    with pytest.raises(ValueError, match="RoPE scaling 'yarn' is not supported; supported: default, linear, llama3"):
        hf.from_hf_config({**base, "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="activation 'quick_gelu' is not supported"):
        hf.from_hf_config({**base, "hidden_act": "quick_gelu"})
    with pytest.raises(ValueError, match=r"quantized checkpoints \(gptq\) are not supported"):
        hf.from_hf_config({**base, "quantization_config": {"quant_method": "gptq", "bits": 4}})
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        hf.load("/nonexistent/model")
    # a model no architecture expresses (LayerNorm with RoPE) cannot be exported
    cfg = ModelConfig(vocab_size=10, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                      head_dim=4, max_seq_len=16, norm="layernorm")
    with pytest.raises(ValueError, match=r"no supported Hugging Face architecture expresses this model:\n"
                                         r"  LlamaForCausalLM: differs in norm='layernorm' \(it has 'rmsnorm'\)"):
        families.infer_architecture(cfg)
    with pytest.raises(ValueError, match=r"Qwen2ForCausalLM cannot express this model: it differs in "
                                         r"attention_bias=False \(it has True\)"):
        hf.save(T.abstract_model(cfg.replace(norm="rmsnorm")), "/tmp/unused", architecture="Qwen2ForCausalLM")


@pytest.mark.parametrize("spelling", ["transformers5", "transformers4"])
def test_both_config_spellings(spelling):
    hf_cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=10, hidden_size=8, intermediate_size=16,
                  num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=4096)
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=1024)
    if spelling == "transformers5":
        hf_cfg["rope_parameters"] = dict(rope_type="llama3", rope_theta=500000.0, **scaling)
    else:
        hf_cfg.update(rope_theta=500000.0, rope_scaling=dict(type="llama3", **scaling))
    cfg = hf.from_hf_config(hf_cfg)
    assert (cfg.rope_theta, cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rope_original_max_seq_len) == (
        500000.0, "llama3", 8.0, 1024)
    out = hf.to_hf_config(cfg, "LlamaForCausalLM")  # writes both spellings
    assert out["rope_parameters"]["rope_theta"] == out["rope_theta"] == 500000.0
    assert out["rope_scaling"]["rope_type"] == out["rope_parameters"]["rope_type"] == "llama3"
    assert transformers.LlamaConfig(**out).rope_parameters["factor"] == 8.0


def test_cli_import_then_export(gemma2, tmp_path):
    from tokenizers import Tokenizer, models

    model_hf, path, tokens, ref = gemma2
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    # 300 ids for 256 embedding rows: the importer warns
    Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0")).save(str(path / "tokenizer.json"))
    try:
        proc = run_program("models.hf", "import", f"--hf_dir={path}", f"--out={tmp_path / 'run'}")
    finally:
        (path / "tokenizer_config.json").unlink()
        (path / "tokenizer.json").unlink()
    assert "imported Gemma2ForCausalLM (float32)" in proc.stdout
    assert "the tokenizer has 300 ids but the model only 256 embedding rows" in proc.stderr
    run = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run["hf"]["architecture"] == "Gemma2ForCausalLM" and run["model"]["post_norms"] is True
    assert (tmp_path / "run" / "tokenizer" / "tokenizer_config.json").is_file()
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").is_file()
    model, cfg = ckpt.load(tmp_path / "run")  # what our programs start from
    np.testing.assert_allclose(np.asarray(model(tokens)), ref, atol=1e-4, rtol=0)

    proc = run_program("models.hf", "export", f"--checkpoint={tmp_path / 'run'}", f"--out={tmp_path / 'hf'}",
                       "--dtype=bfloat16")
    assert "as Gemma2ForCausalLM" in proc.stdout
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file()
    assert {d for d, _ in tensors_in([tmp_path / "hf" / "model.safetensors"]).values()} == {"BF16"}
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").dtype == torch.bfloat16
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                             attn_implementation="eager")
    ref_bf16_weights = hf_logits(back, tokens)
    assert np.abs(ref_bf16_weights - ref).max() < 0.5  # weights rounded to bfloat16: close, not equal
    model16, _ = hf.load(tmp_path / "hf", dtype="float32")  # and those weights are what transformers reads
    np.testing.assert_allclose(np.asarray(model16(tokens)), ref_bf16_weights, atol=1e-4, rtol=0)

    bad = run_program("models.hf", "import", f"--hf_dir={tmp_path / 'nothing'}", f"--out={tmp_path / 'x'}",
                      check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "config.json not found" in bad.stderr


@pytest.mark.parametrize("overrides", [
    dict(post_norms=True), dict(post_norms=True, norm="layernorm", qk_norm=True, norm_weight_offset=1.0),
    dict(layer_windows=(8, 0, 8), embed_scale=4.0, query_pre_attn_scalar=12.0),
    dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_seq_len=16),
])
def test_new_model_options_count_and_start_as_identity(overrides):
    from models.config import param_count

    cfg = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=3, num_heads=4,
                      num_kv_heads=2, head_dim=4, max_seq_len=32, **overrides)
    params = T.split_params(T.abstract_model(cfg))[1]
    assert sum(x.size for x in jax.tree.leaves(params)) == param_count(cfg)
    model = T.build(cfg)
    # every norm starts as the identity: its multiplier offset + scale is 1
    norms = [model.final_norm.scale[...], model.layers.attn_norm.scale[...], model.layers.mlp_norm.scale[...]]
    np.testing.assert_array_equal(np.concatenate([np.ravel(s) for s in norms]) + cfg.norm_weight_offset, 1.0)
    assert np.isfinite(np.asarray(model(np.arange(20, dtype=np.int32)[None]))).all()
    assert json.loads(json.dumps(cfg.to_dict())) and ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    hash(cfg)  # lists from JSON become tuples: the config stays hashable


def test_new_model_option_validation():
    base = dict(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=4, max_seq_len=32)
    with pytest.raises(ValueError, match=r"model.layer_windows=\(8,\) needs one window >= 0 per layer \(2 layers"):
        ModelConfig(**base, layer_windows=(8,))
    with pytest.raises(ValueError, match="are both set; use one"):
        ModelConfig(**base, layer_windows=(8, 0), sliding_window=8)
    with pytest.raises(ValueError, match="model.rope_scaling='yarn' is not valid"):
        ModelConfig(**base, rope_scaling="yarn")


def test_gpt2_hub_layout_without_prefix_and_with_buffers(tmp_path):
    """The original GPT-2 checkpoints name tensors without `transformer.` and carry attention-mask buffers."""
    from models.hf.safetensors_io import write_safetensors

    config = transformers.GPT2Config(vocab_size=256, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model_hf = randomize_hf(transformers.GPT2LMHeadModel(config).eval())
    model_hf.save_pretrained(tmp_path / "ref")
    state = {k.removeprefix("transformer."): v.numpy() for k, v in model_hf.state_dict().items()
             if k != "lm_head.weight"}
    state.update({f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 128, 128), np.float32)) for i in range(2)})
    write_safetensors(tmp_path / "hub", [(k, v.shape, v.dtype, (lambda v=v: v)) for k, v in state.items()])
    (tmp_path / "hub" / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
    tokens = np.random.default_rng(0).integers(0, 256, (1, 128), dtype=np.int32)
    model, cfg = hf.load(tmp_path / "hub")
    assert cfg.position_embedding == "learned" and cfg.tie_embeddings
    np.testing.assert_allclose(np.asarray(model(tokens)), hf_logits(model_hf, tokens), atol=1e-4, rtol=0)
