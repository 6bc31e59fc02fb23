"""Presets build abstractly with the published sizes; overrides and typos behave."""

import dataclasses

import pytest

from configs import pretrain
from models.config import ModelConfig, flops_per_token
from tests.helpers import run_program
from train.plan import summarize

PUBLISHED = {"125m": 124_439_808, "llama3_8b": 8_030_261_248, "1b": 1_235_814_400}


@pytest.mark.parametrize("preset", pretrain.PRESETS)
def test_every_preset_builds_abstractly(preset):
    config = pretrain.get_config(preset)
    model_cfg = ModelConfig.from_dict(config.model.to_dict())
    s = summarize(model_cfg, config.data.seq_len)  # eval_shape; asserts built count == closed form
    assert s["parameters"] > 0 and s["train_flops_per_token"] == 3 * s["forward_flops_per_token"]
    if preset in PUBLISHED:
        assert s["parameters"] == PUBLISHED[preset]
    assert config.data.seq_len <= model_cfg.max_seq_len
    assert config.data.tokenizer.vocab_size <= model_cfg.vocab_size


def test_small_is_about_25m():
    s = summarize(ModelConfig.from_dict(pretrain.get_config("small").model.to_dict()))
    assert 20e6 < s["parameters"] < 32e6


def test_model_section_is_exactly_the_model_config_fields():
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for preset in pretrain.PRESETS:
        assert set(pretrain.get_config(preset).model.keys()) == fields


def test_flops_per_token_closed_form():
    # GPT-2 small at 1024 tokens: 2 * (85M matmul params + 38.6M head) + 4 * L * d * T
    cfg = ModelConfig.from_dict(pretrain.get_config("125m").model.to_dict())
    matmul = 12 * (768 * 3 * 768 + 768 * 768 + 2 * 768 * 3072) + 768 * 50257
    assert flops_per_token(cfg, 1024)["forward"] == 2 * matmul + 4 * 12 * 768 * 1024


def test_pinned_config_names_exist():
    c = pretrain.get_config()
    for key in ("model.vocab_size", "model.hidden_size", "model.intermediate_size", "model.num_layers",
                "model.num_heads", "model.num_kv_heads", "model.head_dim", "model.max_seq_len", "model.dtype",
                "model.param_dtype", "data.seq_len", "train.steps", "train.batch_size", "train.log_every",
                "train.eval_every", "train.checkpoint_every", "train.seed", "optimizer.name", "optimizer.lr",
                "optimizer.weight_decay", "optimizer.warmup_steps", "optimizer.schedule", "mesh.shape",
                "mesh.strategy", "mesh.rules"):
        node = c
        for part in key.split("."):
            node = node[part]
    assert set(c.mesh.shape.keys()) == {"data", "stage", "fsdp", "tensor", "sequence", "expert"}
    assert c.train.log_every <= 10


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown pretrain preset 'huge'"):
        pretrain.get_config("huge")


def test_command_line_overrides_and_typos():
    ok = run_program("train.plan", "--config=configs/pretrain.py:tiny", "--config.model.num_layers=2")
    assert "parameters" in ok.stdout
    assert "3,572,992" in ok.stdout  # tiny with 2 of its 4 layers
    bad = run_program("train.plan", "--config=configs/pretrain.py:tiny", "--config.optimizer.lrr=3e-4", check=False)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert 'error: --config.optimizer.lrr: no such config field. Did you mean "lr"' in bad.stderr
    bad_type = run_program("train.plan", "--config=configs/pretrain.py:tiny", "--config.train.steps=1e3",
                           check=False)
    assert bad_type.returncode == 2 and "Traceback" not in bad_type.stderr and "1e3" in bad_type.stderr
