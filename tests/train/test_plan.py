"""The memory planner (train/memory.py, `python -m train.plan`): against XLA's compiled memory
analysis, against real sharded arrays, and its command line."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from models.sharding import use_rules
from models.transformer import abstract_model, split_params
from tests.helpers import random_tokens, run_program, tiny_model_config
from train import memory
from train import mesh as M
from train.loss import lm_loss_fn
from train.optimizer import make_optimizer
from train.state import abstract_state, make_train_step, state_shardings

OPT = dict(name="adamw", lr=1e-3, weight_decay=0.1, clip_norm=1.0)
# small enough to compile in seconds; T = 256 takes the blockwise attention path, T = 128 the
# masked path that keeps full [B, N, T, S] scores
SHAPE = dict(vocab_size=1024, hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4, num_kv_heads=2,
             head_dim=32, max_seq_len=256)


def _mesh(shape):
    n = 1
    for v in shape.values():
        n *= v
    return M.make_mesh(M.resolve_shape(shape, n), devices=jax.devices()[:n])


def _compiled_memory(cfg, tx, mesh, batch, seq_len):
    """XLA's per-device bytes of the real train step (state donated, as train/pretrain.py does)."""
    with jax.set_mesh(mesh), use_rules(None):
        sh = state_shardings(cfg, tx, mesh)
        graphdef, _ = split_params(abstract_model(cfg))
        bsh = M.batch_sharding(mesh, (batch, seq_len))
        abs_batch = {k: jax.ShapeDtypeStruct((batch, seq_len), jnp.float32 if k == "loss_mask_BT" else jnp.int32,
                                             sharding=bsh) for k in memory.BATCH_KEYS}
        step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx), in_shardings=(sh, bsh), out_shardings=(sh, None),
                       donate_argnums=(0,))
        return step.lower(abstract_state(cfg, tx, sh), abs_batch).compile().memory_analysis()


@pytest.mark.parametrize("overrides,mesh_shape,batch,seq_len", [
    (dict(dtype="bfloat16", remat="none"), {}, 4, 256),  # 1 device, everything saved
    (dict(dtype="float32", remat="full"), {}, 4, 128),  # 1 device, full scores recomputed per layer
    (dict(dtype="bfloat16", remat="save_dots"), {"fsdp": 8}, 16, 256),  # FSDP: gathered weights, sharded state
    # GPipe, 2 stages x 4 micro-batches: half the layers per device, residuals of every tick
    (dict(dtype="bfloat16", remat="none", num_layers=4, pipeline_stages=2, pipeline_microbatches=4), {"stage": 2},
     8, 256),
])
def test_plan_matches_compiled_memory(overrides, mesh_shape, batch, seq_len):
    cfg = tiny_model_config(**{**SHAPE, **overrides})
    tx, _ = make_optimizer(OPT, 100)
    mesh = _mesh(mesh_shape or {"data": 1})
    shape = M.resolve_shape(mesh_shape, mesh.devices.size)
    plan = memory.plan_step(cfg, tx, mesh_shape=shape, rules=M.merge_rules(()), seq_len=seq_len,
                            micro_batch=batch // (shape["data"] * shape["fsdp"]))
    m = _compiled_memory(cfg, tx, mesh, batch, seq_len)
    # arguments are the state and the batch: exact up to the step counter and rng (12 bytes)
    assert 0 <= m.argument_size_in_bytes - (plan.params + plan.opt_state + plan.batch) <= 16
    xla = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    assert abs(plan.total / xla - 1) < 0.10, (plan.as_dict(), xla)


@pytest.mark.parametrize("mesh_shape,opt,check_grads", [
    ({"data": 2, "fsdp": 2, "tensor": 2}, "adamw", True),  # vocab 97 does not split in 2: replicated
    ({"fsdp": 8}, "adafactor", False),  # factored moments (dims >= 128) are replicated
])
def test_state_bytes_are_exact(mesh_shape, opt, check_grads):
    """Per-device bytes against real arrays laid out by `train.state.state_shardings` (the
    shardings `create_state` initialises into)."""
    cfg = tiny_model_config(hidden_size=128, intermediate_size=256, dtype="float32")
    tx, _ = make_optimizer({**OPT, "name": opt}, 10)
    mesh = _mesh(mesh_shape)
    plan = memory.plan_step(cfg, tx, mesh_shape=M.resolve_shape(mesh_shape, 8), rules=M.merge_rules(()),
                            seq_len=16, micro_batch=1)

    def per_device(tree):
        return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))

    with jax.set_mesh(mesh), use_rules(None):
        shardings = state_shardings(cfg, tx, mesh)
        state = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding),
                             abstract_state(cfg, tx, shardings))
        assert plan.params == per_device(state.params)
        assert plan.opt_state == per_device(state.opt_state)
        assert plan.params < sum(x.nbytes for x in jax.tree.leaves(state.params)) / 2  # really sharded
        if check_grads:  # the gradient, computed, in the layout the optimizer update consumes it
            graphdef, _ = split_params(abstract_model(cfg))
            tokens = random_tokens(np.random.default_rng(0), (8, 16), cfg.vocab_size)
            batch = {"inputs_BT": tokens, "targets_BT": tokens, "loss_mask_BT": np.ones((8, 16), np.float32)}
            batch = {k: jax.device_put(v, M.batch_sharding(mesh, v.shape)) for k, v in batch.items()}
            grad_fn = jax.grad(lambda p, b: lm_loss_fn(graphdef)(p, b, None)[0])
            grads = jax.jit(grad_fn, out_shardings=shardings.params)(state.params, batch)
            assert plan.grads == per_device(grads)


def test_cli_llama3_8b_on_64_devices():
    out = run_program("train.plan", "--config=configs/pretrain.py:llama3_8b", "--mesh=fsdp=64", "--hbm_gib=95")
    text = out.stdout
    assert "8,030,261,248" in text and "fsdp=64 (64 devices)" in text
    assert re.search(r"parameters\s+0\.47\b", text)  # 8.03e9 x 4 bytes / 64
    assert re.search(r"optimizer state\s+0\.9[34]\b", text)  # AdamW: two moments
    verdict = re.search(r"verdict\s+(fits|does not fit) in 95 GiB at micro-batch (\d+); max micro-batch (\d+)", text)
    assert verdict, text
    fits, mb, best = verdict.group(1) == "fits", int(verdict.group(2)), int(verdict.group(3))
    assert best >= 1 and fits == (best >= mb)
    assert all(re.search(rf"^\s+{r}\b", text, re.M) for r in ("none", "full", "save_dots"))


def test_cli_deepseek_v2_lite_expert_parallel():
    """The planner on an MLA + MoE shape: exact counts, the MoE note, experts split over 64 devices."""
    out = run_program("train.plan", "--config=configs/pretrain.py:deepseek_v2_lite", "--config.mesh.strategy=fsdp_ep",
                      "--devices=64", "--hbm_gib=95")
    text = out.stdout
    assert "15,706,484,224" in text and "2,661,150,208" in text and "6 of 64 experts in 26 of 27 layers" in text
    assert "expert=64 (64 devices)" in text and "8 sequences x 4096 tokens per device" in text
    assert re.search(r"parameters\s+0\.9\d\b", text)  # 15.7e9 x 4 bytes / 64 = 0.91 GiB: every large weight split
    assert re.search(r"verdict\s+fits in 95 GiB", text), text


def test_cli_bad_mesh_is_one_line():
    bad = run_program("train.plan", "--config=configs/pretrain.py:tiny", "--mesh=fsdp=8,tensr=4", check=False)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    errors = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "'tensr=4' is not axis=size" in errors[0], bad.stderr
    # a mesh that does not match the device count (the program prints it as one `error:` line too)
    with pytest.raises(ValueError, match="needs 6 devices; found 8"):
        memory.resolve_mesh(pretrain.get_config("tiny"), 8, {"data": 2, "fsdp": 3})


def test_moe_state_bytes_exact_and_one_device_total():
    """An MoE model (a dense first layer, 8 experts, a shared expert): parameter and optimizer
    bytes exact on fsdp_ep's expert 4 x fsdp 2 (experts split over `expert`, everything else over
    fsdp x expert); on one device the planned total within 10% of XLA's compiled memory (the dense
    and MoE layers traced apart)."""
    moe = dict(num_experts=8, experts_per_token=2, num_shared_experts=1, first_dense_layers=1, aux_loss_weight=0.01)
    cfg = tiny_model_config(**{**SHAPE, "num_layers": 3, "dtype": "bfloat16", "moe": moe})
    tx, _ = make_optimizer(OPT, 100)
    shape, rules = M.resolve_shape({"expert": 4, "fsdp": 2}, 8), M.merge_rules(M.STRATEGY_RULES["fsdp_ep"])
    planner = memory.make_planner(cfg, tx, mesh_shape=shape, rules=rules, seq_len=256)
    assert planner.batch_shards == 8
    plan = planner(1)
    with jax.set_mesh(_mesh({"expert": 4, "fsdp": 2})), use_rules(rules):
        shardings = state_shardings(cfg, tx, _mesh({"expert": 4, "fsdp": 2}), rules)
        state = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding),
                             abstract_state(cfg, tx, shardings))
    per_device = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert plan.params == per_device(state.params) and plan.opt_state == per_device(state.opt_state)
    assert state.params["layers"]["mlp"]["experts"]["up"].sharding.spec[1] == "expert"

    one = memory.plan_step(cfg, tx, mesh_shape=M.resolve_shape({}, 1), rules=M.merge_rules(()), seq_len=256,
                           micro_batch=4)
    m = _compiled_memory(cfg, tx, _mesh({"data": 1}), 4, 256)
    assert abs(one.total / xla_total(m) - 1) < 0.10, (one.as_dict(), xla_total(m))


def xla_total(m) -> int:
    return m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
