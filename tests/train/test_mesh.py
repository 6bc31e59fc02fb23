"""Mesh shapes from config: -1 resolution, strategies, rules, errors."""

import jax
import pytest

from tests.helpers import tiny_model_config
from train import mesh as M


def test_minus_one_is_resolved():
    shape = M.resolve_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8)
    assert shape == {"data": 2, "stage": 1, "fsdp": 2, "tensor": 2, "sequence": 1, "expert": 1}


@pytest.mark.parametrize("shape,match", [
    ({"data": 3, "fsdp": 4}, r"needs 12 devices; found 8"),
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"data": -1, "fsdp": 3}, "multiple of 3"),
    ({"data": 8, "tensr": 1}, "unknown axes"),
])
def test_shape_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        M.resolve_shape(shape, 8)


@pytest.mark.parametrize("strategy,expected", [
    ("dp", {"data": 8}), ("fsdp", {"fsdp": 8}), ("fsdp_tp", {"fsdp": 4, "tensor": 2}), ("tp", {"data": 4, "tensor": 2}),
    ("fsdp_sp", {"fsdp": 4, "sequence": 2}), ("pp_fsdp", {"fsdp": 4, "stage": 2}),
])
def test_strategies_on_8_devices(strategy, expected):
    cfg = tiny_model_config()  # 4 heads, 2 kv heads: tensor parallelism is capped at 2
    shape = M.resolve({"shape": M.DEFAULT_SHAPE, "strategy": strategy}, 8, cfg, seq_len=64)["shape"]
    assert {k: v for k, v in shape.items() if v > 1} == expected


def test_every_strategy_is_one_device_on_one_device():
    for s in M.STRATEGIES:
        shape = M.resolve({"shape": M.DEFAULT_SHAPE, "strategy": s}, 1, tiny_model_config())["shape"]
        assert set(shape.values()) == {1}


def test_strategy_and_shape_conflict_and_unknown():
    with pytest.raises(ValueError, match="not both"):
        M.resolve({"shape": {**M.DEFAULT_SHAPE, "data": 4, "tensor": 2}, "strategy": "fsdp"}, 8)
    with pytest.raises(ValueError, match="not valid"):
        M.resolve({"shape": M.DEFAULT_SHAPE, "strategy": "zero"}, 8)


def test_rule_overrides_and_mesh():
    rules = M.merge_rules((("embed", None), ("mlp", ("tensor",))))
    assert dict(rules)["embed"] == () and dict(rules)["heads"] == ("tensor",)
    with pytest.raises(ValueError, match="unknown mesh axis"):
        M.merge_rules((("embed", "fsdpp"),))
    mesh = M.make_mesh(M.resolve_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8))
    assert mesh.axis_names == M.MESH_AXES and mesh.devices.size == 8
    one = M.make_mesh(M.resolve_shape({}, 1), devices=jax.devices()[:1])
    assert one.devices.size == 1


def test_pipeline_batch_errors_name_the_values():
    """pp_fsdp on 8 devices (stage 2 x fsdp 4, 4 pipeline micro-batches by default): a step of 8
    sequences cannot give each micro-batch a row per fsdp shard; 16 can. The planner refuses a
    micro-batch the pipeline cannot split, naming the multiple it needs."""
    from configs import pretrain
    from train import memory
    from train.pretrain import resolve_config

    config = pretrain.get_config("tiny")
    config.mesh.strategy = "pp_fsdp"
    config.train.batch_size = 8
    with pytest.raises(ValueError, match=r"train.batch_size=8 .* model.pipeline_microbatches=4 .* 4 batch shards"):
        resolve_config(config, 8)
    config.train.batch_size = 16
    model_cfg, mesh, resolved = resolve_config(config, 8)
    assert model_cfg.pipeline_stages == 2 and mesh["shape"]["stage"] == 2
    assert resolved["model"]["pipeline_stages"] == 1  # config.json keeps the user's (unpipelined) model
    plan = memory.config_planner(config, num_devices=8)
    assert plan.granularity == 4 and plan(8).micro_batch == 8
    with pytest.raises(ValueError, match="micro_batch=6 .* 4 pipeline micro-batches .* multiple of 4"):
        plan(6)
