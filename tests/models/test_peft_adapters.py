"""PEFT LoRA adapter directories (models/hf/peft_io.py) against peft itself.

Tiny random transformers models built here (a Llama with GQA and an untied lm_head, a Qwen2 with
attention biases and tied embeddings), imported into Loom; adapters with non-zero weights on
both sides: Loom's logits equal `peft.PeftModel.from_pretrained(base, DIR)`'s to 1e-4 in f32,
and the adapters move the logits by far more than that (PEFT silently loads nothing from keys
with a wrong prefix: GOTCHAS, Post-training).
"""

import json
import re

import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import models.hf as hf  # noqa: E402
from models.hf import peft_io  # noqa: E402
from models.hf.safetensors_io import tensors_in  # noqa: E402
from models.lora import PROJECTIONS, LoraKernel, apply_lora, merge_lora  # noqa: E402
from models.projection import Einsum  # noqa: E402
from tests.helpers import hf_logits, randomize_adapters, randomize_hf, run_program  # noqa: E402

TOL = 1e-4
_SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
FAMILIES = {
    "llama": (transformers.LlamaForCausalLM, lambda: transformers.LlamaConfig(**_SMALL, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2ForCausalLM, lambda: transformers.Qwen2Config(**_SMALL, tie_word_embeddings=True)),
}
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 24), dtype=np.int32)


class Base:
    """A random transformers model saved as a Hugging Face directory, and its Loom import."""

    def __init__(self, name, tmp):
        cls, make_config = FAMILIES[name]
        self.cls, self.dir = cls, tmp / "hf"
        torch.manual_seed(0)
        randomize_hf(cls(make_config()).eval(), seed=len(name)).save_pretrained(self.dir)
        self.model, self.cfg = hf.load(self.dir)
        self.logits = hf_logits(self.fresh(), TOKENS)

    def fresh(self):
        return self.cls.from_pretrained(self.dir, dtype=torch.float32, attn_implementation="eager").eval()

    def peft_logits(self, adapter_dir):
        return hf_logits(peft.PeftModel.from_pretrained(self.fresh(), adapter_dir).eval(), TOKENS)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def base(request, tmp_path_factory):
    return Base(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return Base("llama", tmp_path_factory.mktemp("llama"))


def _err(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _adapters(model):
    return {tuple(map(str, p)): m.kernel for p, m in nnx.iter_modules(model)
            if isinstance(m, Einsum) and isinstance(m.kernel, LoraKernel)}


def test_saved_adapter_gives_loom_logits_in_peft(base, tmp_path):
    """Every projection adapted (lm_head too where it is untied; rsLoRA on one family), exported,
    loaded by peft onto the transformers base: the logits are Loom's; loaded back: the same adapters."""
    rslora = base.cfg.attention_bias
    adapted = randomize_adapters(apply_lora(base.model, rank=4, alpha=8, targets=PROJECTIONS, rslora=rslora), seed=1)
    ours = np.asarray(adapted(TOKENS))
    assert _err(ours, base.logits) > 100 * TOL  # the adapters matter
    config = peft_io.save_adapter(adapted, tmp_path, architecture=base.cls.__name__, rslora=rslora,
                                  base_model_name_or_path=str(base.dir))
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written == config and written["r"] == 4 and written["lora_alpha"] == 8 and written["use_rslora"] == rslora
    untied = not base.cfg.tie_embeddings
    assert written["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"] + ["lm_head"] * untied)
    keys = tensors_in([tmp_path / "adapter_model.safetensors"])
    assert keys["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"] == ("F32", (2 * 16, 4))  # GQA
    assert keys["base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight"] == ("F32", (4, 4 * 16))
    assert ("base_model.model.lm_head.lora_A.weight" in keys) == untied
    assert len(keys) == 2 * (2 * 7 + untied)
    assert _err(base.peft_logits(tmp_path), ours) <= TOL

    back = peft_io.load_adapter(base.model, tmp_path)
    assert _err(back(TOKENS), ours) <= 1e-5
    theirs, mine = _adapters(back), _adapters(adapted)
    assert sorted(theirs) == sorted(mine)
    for path, k in mine.items():
        assert theirs[path].scale == k.scale
        np.testing.assert_array_equal(np.asarray(theirs[path].a[...]), np.asarray(k.a[...]))
        np.testing.assert_array_equal(np.asarray(theirs[path].b[...]), np.asarray(k.b[...]))


def test_qlora_adapters_are_plain_lora_adapters(llama, tmp_path):
    """Adapters over an NF4 base (QLoRA) write the same directory as over the float base, and load
    back onto an NF4 base."""
    from models.quant import quantize_base

    kw = dict(rank=2, alpha=4, targets=("q", "down"))
    plain = randomize_adapters(apply_lora(llama.model, **kw), seed=2)
    qlora = randomize_adapters(apply_lora(quantize_base(llama.model, block_size=32), **kw), seed=2)
    for name, model in (("plain", plain), ("qlora", qlora)):
        peft_io.save_adapter(model, tmp_path / name, architecture="LlamaForCausalLM")
    assert ((tmp_path / "plain" / "adapter_model.safetensors").read_bytes()
            == (tmp_path / "qlora" / "adapter_model.safetensors").read_bytes())
    back = _adapters(peft_io.load_adapter(quantize_base(llama.model, block_size=32), tmp_path / "qlora"))
    assert sorted(back) == [("layers", "attn", "q"), ("layers", "mlp", "down")]
    for path, k in _adapters(qlora).items():
        assert type(back[path].base) is type(k.base)
        np.testing.assert_array_equal(np.asarray(back[path].b[...]), np.asarray(k.b[...]))


def _peft_adapter(base, path, seed=0, **lora):
    """A LoRA adapter made and saved by peft, both sides random (B starts at zero otherwise)."""
    model = peft.get_peft_model(base.fresh(), peft.LoraConfig(task_type="CAUSAL_LM", **lora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    expected = hf_logits(model, TOKENS)
    model.save_pretrained(path)
    return expected


@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=16, target_modules="all-linear"),
    dict(r=2, lora_alpha=3, use_rslora=True, target_modules=["k_proj", "gate_proj", "up_proj"],
         layers_to_transform=[1]),
    dict(r=3, lora_alpha=6, target_modules=r".*\.0\.self_attn\.(k|o)_proj", lora_dropout=0.1),
], ids=["all-linear", "list-layer1-rslora", "regex-layer0"])
def test_peft_saved_adapter_loads(base, tmp_path, lora, request):
    expected = _peft_adapter(base, tmp_path, **lora)
    assert _err(expected, base.logits) > 100 * TOL
    model = peft_io.load_adapter(base.model, tmp_path)
    assert _err(model(TOKENS), expected) <= TOL
    kernels = _adapters(model)
    assert all(k.dropout_rate == lora.get("lora_dropout", 0.0) for k in kernels.values())
    if "layer" in request.node.callspec.id:  # the other layer's adapters are zeros
        other = 0 if lora.get("layers_to_transform") else 1
        assert all(not np.asarray(k.b[...])[other].any() and np.asarray(k.b[...])[1 - other].any()
                   for k in kernels.values())
    # merged, as `python -m models.hf import --adapter_dir` writes it
    assert _err(merge_lora(model)(TOKENS), expected) <= TOL


def test_peft_adapter_on_an_untied_lm_head(llama, tmp_path):
    """peft saves an adapted lm_head's own weight (base_layer) beside its adapter: it is checked
    against the base's, not loaded."""
    expected = _peft_adapter(llama, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    with open(tmp_path / "adapter_model.safetensors", "rb") as f:
        assert b"base_model.model.lm_head.base_layer.weight" in f.read(4096)
    model = peft_io.load_adapter(llama.model, tmp_path)
    assert _err(model(TOKENS), expected) <= TOL
    assert ("lm_head",) in _adapters(model)
    key = "base_model.model.lm_head.base_layer.weight"
    other = _rewrite(tmp_path, tmp_path / "other_head", tensors=lambda t: {**t, key: 2 * t[key]})
    with pytest.raises(ValueError, match="trained with another output layer"):
        peft_io.load_adapter(llama.model, other)


def _rewrite(src, dst, config=None, tensors=None):
    """A copy of the adapter directory `src` with config changes / tensors replaced."""
    from safetensors.numpy import load_file, save_file

    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **(config or {})}))
    t = load_file(src / "adapter_model.safetensors")
    t = tensors(t) if tensors else t
    save_file(t, dst / "adapter_model.safetensors")
    return dst


def test_unsupported_adapters_fail_clearly(llama, tmp_path):
    good = tmp_path / "good"
    _peft_adapter(llama, good, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    cases = {
        "DoRA": dict(config=dict(use_dora=True)),
        "modules_to_save": dict(config=dict(modules_to_save=["lm_head"])),
        "rank_pattern": dict(config=dict(rank_pattern={"q_proj": 8})),
        "init_lora_weights='pissa' is not supported (PiSSA": dict(config=dict(init_lora_weights="pissa")),
        "bias='all'": dict(config=dict(bias="all")),
        "only LoRA": dict(config=dict(peft_type="IA3")),
        "no LoRA adapter of a": dict(tensors=lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A":
                                                        np.zeros((4, 128), np.float32)}),
        "are missing": dict(tensors=lambda t: {n: v for n, v in t.items() if n != k}),
        "expected (4, 64)": dict(tensors=lambda t: {**t, k: np.zeros((4, 32), np.float32)}),
        "does not select": dict(config=dict(target_modules=["q_proj"])),
    }
    for i, (message, change) in enumerate(cases.items()):
        bad = _rewrite(good, tmp_path / f"bad{i}", **change)
        with pytest.raises(ValueError, match=re.escape(message)):
            peft_io.load_adapter(llama.model, bad)
    # keys without PEFT's prefix (which peft itself loads as nothing): named, not ignored
    bad = _rewrite(good, tmp_path / "noprefix", tensors=lambda t: {n.removeprefix("base_model.model."): v
                                                                  for n, v in t.items()})
    with pytest.raises(ValueError, match="no LoRA adapter of a LlamaForCausalLM projection"):
        peft_io.load_adapter(llama.model, bad)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        peft_io.load_adapter(llama.model, tmp_path)
    # GPT-2's Conv1D / fused c_attn projections have no per-projection Linear modules
    gpt2 = hf.from_hf_config(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64).to_dict())
    with pytest.raises(ValueError, match="not a torch Linear"):
        peft_io.adapter_modules(gpt2, "GPT2LMHeadModel")


def test_adapter_only_export_refuses_runs_without_hf_adapters(tmp_path):
    def run(name, **config):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
        return tmp_path / name

    hf_section = {"architecture": "LlamaForCausalLM", "config": {}}
    with pytest.raises(ValueError, match="has no adapters.*drop it to export the whole model"):
        peft_io.export_adapter(run("full", peft={"method": "full"}, hf=hf_section), tmp_path / "o1")
    with pytest.raises(ValueError, match="Loom-trained model.*no `hf` section.*drop --adapter_only"):
        peft_io.export_adapter(run("loom", peft={"method": "lora"}, init={"workdir": "x"}), tmp_path / "o2")
    trained = run("trained_base", model={}, hf=hf_section, train={}, peft={"method": "full"})
    with pytest.raises(ValueError, match="trained Loom workdir, not a Hugging Face model as published"):
        peft_io.export_adapter(run("on_trained", peft={"method": "lora"}, hf=hf_section,
                                   init={"workdir": str(trained)}), tmp_path / "o3")
    with pytest.raises(ValueError, match="peft.method='ia3' has no PEFT adapter export"):
        peft_io.export_adapter(run("ia3", peft={"method": "ia3"}, hf=hf_section, init={"hf_dir": "base"}),
                               tmp_path / "o4")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_sft_run_adapter_only_export_and_import(tmp_path):
    """The real programs: `train.sft` (LoRA on a random Llama directory, 2 steps), `python -m
    models.hf export --adapter_only`, peft on the transformers base; the adapter imported back
    merged (`models.hf import --adapter_dir`, in-process) gives the run's logits."""
    from models.checkpoint import load
    from models.hf.__main__ import import_
    from tests.data.test_sft_data import LLAMA3
    from tests.helpers import random_llama_hf_dir

    base_dir = random_llama_hf_dir(tmp_path / "base", LLAMA3)
    run = tmp_path / "run"
    run_program("train.sft", "--config=configs/sft.py:arith_lora", f"--workdir={run}",
                f"--config.init.hf_dir={base_dir}", "--config.train.steps=2", "--config.train.batch_size=4",
                "--config.train.eval_every=0", "--config.train.eval_batches=0", "--config.train.eval_examples=0",
                "--config.train.num_samples=0", "--config.train.log_every=2", "--config.train.async_checkpoint=False",
                "--config.optimizer.lr=3e-2", "--config.model.dtype=float32",
                "--config.peft.lora.targets=('q','v','down','lm_head')")
    out = tmp_path / "adapter"
    proc = run_program("models.hf", "export", f"--checkpoint={run}", f"--out={out}", "--adapter_only")
    assert "as a PEFT adapter directory" in proc.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "lm_head", "q_proj", "v_proj"]
    run_cfg = json.loads((run / "config.json").read_text())
    lora = run_cfg["peft"]["lora"]
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (lora["rank"], lora["alpha"], lora["rslora"])
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    assert (out / "tokenizer.json").is_file()  # the run's tokenizer files travel with the adapter

    model, _ = load(run)
    tokens = np.random.default_rng(7).integers(3, 500, (2, 24))
    ours = np.asarray(model(tokens))
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    assert _err(hf_logits(base, tokens), ours) > 1e-3  # the trained adapters move the logits
    with_adapter = peft.PeftModel.from_pretrained(base, out).eval()
    assert _err(hf_logits(with_adapter, tokens), ours) <= TOL

    workdir = import_(str(base_dir), str(tmp_path / "imported"), adapter_dir=str(out))
    merged, _ = load(workdir)
    assert _err(merged(tokens), ours) <= TOL
    assert json.loads((workdir / "config.json").read_text())["adapter"]["config"]["r"] == lora["rank"]


# --------------------------------------------------------------------------------------------
# Prefix tuning (PEFT's PREFIX_TUNING directories)


def test_prefix_adapter_gives_loom_logits_in_peft(base, tmp_path):
    """Loom's prefixes (no RoPE on them, real tokens at 0..T-1) written with the keys rotated to
    PEFT's positions (real tokens at P..P+T-1): peft on transformers gives Loom's logits; loaded
    back, the same prefixes."""
    from models.prefix import apply_prefix

    model = apply_prefix(base.model, length=3, seed=1, std=0.5)
    ours = np.asarray(model(TOKENS))
    assert _err(ours, base.logits) > 100 * TOL
    config = peft_io.save_prefix_adapter(model, tmp_path, base_model_name_or_path=str(base.dir))
    assert config["peft_type"] == "PREFIX_TUNING" and config["num_virtual_tokens"] == 3
    assert tensors_in([tmp_path / "adapter_model.safetensors"]) == {"prompt_embeddings": ("F32", (3, 2 * 2 * 2 * 16))}
    assert _err(base.peft_logits(tmp_path), ours) <= TOL
    back = peft_io.load_adapter(base.model, tmp_path)
    for name in ("prefix_k", "prefix_v"):
        np.testing.assert_allclose(np.asarray(getattr(back.layers.attn, name)[...]),
                                   np.asarray(getattr(model.layers.attn, name)[...]), atol=1e-6)
    assert _err(back(TOKENS), ours) <= 1e-5


def test_peft_saved_prefix_adapter_loads(llama, tmp_path):
    """A prefix-tuning adapter made and saved by peft itself (random prefixes): Loom's logits with it
    equal peft's."""
    torch.manual_seed(3)
    pm = peft.get_peft_model(llama.fresh(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    with torch.no_grad():
        emb = pm.prompt_encoder["default"].embedding.weight
        emb.copy_(torch.randn_like(emb) * 0.7)
    pm.save_pretrained(tmp_path)
    want = llama.peft_logits(tmp_path)
    assert _err(want, llama.logits) > 100 * TOL
    got = peft_io.load_adapter(llama.model, tmp_path)
    assert got.layers.attn.prefix_k[...].shape == (2, 5, 2, 16)
    assert _err(got(TOKENS), want) <= TOL
    from models.hf.__main__ import import_  # prefixes are no weights: nothing to merge into a workdir

    with pytest.raises(ValueError, match="prefix-tuning adapter"):
        import_(str(llama.dir), str(tmp_path / "imported"), adapter_dir=str(tmp_path))


def test_prefixes_peft_cannot_express_are_refused(tmp_path):
    from models import transformer as T
    from models.prefix import apply_prefix
    from tests.helpers import tiny_model_config

    model = apply_prefix(T.build(tiny_model_config(position_embedding="learned")), length=2)
    with pytest.raises(ValueError, match="position_embedding='learned'"):
        peft_io.save_prefix_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="no prefixes"):
        peft_io.save_prefix_adapter(T.build(tiny_model_config()), tmp_path)
