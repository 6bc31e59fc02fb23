"""Pipeline parallelism (models/pipeline.py): the pipelined model is the same function as the
scanned one (forward and gradients), trains identically on stage meshes with its layers stored
stage-sharded, and reports GPipe's bubble."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import pipeline
from models import transformer as T
from models.config import ModelConfig
from models.sharding import use_rules
from tests.helpers import random_tokens, tiny_model_config
from tests.train.test_train_step import OPT, _batch
from train import mesh as M
from train.loss import lm_loss_fn
from train.optimizer import make_optimizer
from train.state import create_state, make_train_step, state_shardings

# four layers with different windows (0 = global), so a stage's layers must get their own windows
CFG = tiny_model_config(num_layers=4, layer_windows=(0, 5, 0, 3))


def _loss_logits_grads(cfg, params, batch):
    graphdef, _ = T.split_params(T.abstract_model(cfg))
    loss_fn = lm_loss_fn(graphdef)

    def f(p):
        loss, _ = loss_fn(p, batch, None)
        return loss, T.apply(graphdef, p, batch)

    (loss, logits), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return float(loss), np.asarray(logits), jax.tree.map(np.asarray, grads)


def _assert_tree_close(a, b, rtol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        scale = np.abs(y).max()
        assert np.abs(x - y).max() <= rtol * scale, (jax.tree_util.keystr(path), np.abs(x - y).max() / scale)


@pytest.fixture(scope="module")
def reference():
    _, params = T.split_params(T.build(CFG, seed=1))
    batch = _batch(0)  # packed: two documents per row, padding at the end of odd rows
    return params, batch, _loss_logits_grads(CFG, params, batch)


# (the mesh tests below add S=2, M=2 and S=4, M=4 with remat "full")
@pytest.mark.parametrize("stages,microbatches,remat", [(2, 4, "full"), (4, 8, "save_dots"), (4, 2, "none")])
def test_pipelined_forward_and_gradients_equal_the_scan(reference, stages, microbatches, remat):
    params, batch, (ref_loss, ref_logits, ref_grads) = reference
    cfg = CFG.replace(pipeline_stages=stages, pipeline_microbatches=microbatches, remat=remat)
    loss, logits, grads = _loss_logits_grads(cfg, params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    _assert_tree_close(grads, ref_grads, rtol=1e-5)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(grads["layers"]))  # every layer is trained


def test_pipeline_in_bfloat16_matches_the_scan():
    cfg = tiny_model_config(num_layers=4, dtype="bfloat16")
    _, params = T.split_params(T.build(cfg, seed=2))
    batch = _batch(1)
    ref_loss, ref_logits, ref_grads = _loss_logits_grads(cfg, params, batch)
    loss, logits, grads = _loss_logits_grads(cfg.replace(pipeline_stages=2), params, batch)  # M = 2 x 2
    assert logits.dtype == np.float32
    # the same bf16 roundings per row: only the float32 sums over micro-batches differ
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5 * np.abs(ref_logits).max())
    _assert_tree_close(grads, ref_grads, rtol=1e-3)


def test_pipelined_dropout_is_per_microbatch_and_deterministic(reference):
    params, batch, _ = reference
    cfg = CFG.replace(pipeline_stages=2, pipeline_microbatches=4, dropout_rate=0.3)
    graphdef, _ = T.split_params(T.abstract_model(cfg))
    f = jax.jit(lambda p, b, key: T.apply(graphdef, p, b, dropout_rng=key))
    a, b, c = (np.asarray(f(params, batch, jax.random.key(k))) for k in (0, 0, 1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    # identical rows in different micro-batches get different masks (rows 0 and 1 are in
    # micro-batches 0 and 1, at the same place in each)
    same = {k: np.broadcast_to(v[:1], v.shape).copy() for k, v in batch.items()}
    d = np.asarray(f(params, same, jax.random.key(0)))
    assert np.abs(d[0] - d[1]).max() > 1e-3


def _train(shape, cfg, steps=3, devices=None):
    """Losses of `steps` train steps on a mesh, the final state, and the compiled step's HLO."""
    devices = devices or jax.devices()
    mesh = M.make_mesh(M.resolve_shape({**M.DEFAULT_SHAPE, "data": 1, **shape}, len(devices)), devices=devices)
    tx, _ = make_optimizer(OPT, steps)
    with jax.set_mesh(mesh), use_rules(None):
        graphdef, state = create_state(cfg, tx, seed=0, mesh=mesh)
        shardings = state_shardings(cfg, tx, mesh)
        step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx), in_shardings=(shardings, None),
                       out_shardings=(shardings, None))
        losses, compiled = [], None
        for i in range(steps):
            batch = {k: jax.device_put(v, M.batch_sharding(mesh, v.shape)) for k, v in _batch(i).items()}
            compiled = compiled or step.lower(state, batch).compile()
            state, m = compiled(state, batch)
            losses.append(float(m["loss"]))
    return np.array(losses), state, compiled.as_text()


@pytest.fixture(scope="module")
def one_device_losses():
    return _train({}, CFG, devices=jax.devices()[:1])[0]


@pytest.mark.parametrize("shape,microbatches,remat,spec", [
    ({"stage": 2, "fsdp": 4}, 2, "none", ("stage", "fsdp", None, None)),
    ({"stage": 4, "data": 2}, 4, "full", ("stage", None, None, None)),
])
def test_train_step_on_a_stage_mesh_equals_one_device(one_device_losses, shape, microbatches, remat, spec):
    cfg = CFG.replace(pipeline_stages=shape["stage"], pipeline_microbatches=microbatches, remat=remat)
    losses, state, hlo = _train(shape, cfg)
    np.testing.assert_allclose(losses, one_device_losses, rtol=1e-4)
    assert losses[-1] < losses[0]
    # layers stored stage-sharded (stage s holds layers s*L/S...), the Adam moments alike
    q = state.params["layers"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(*spec)
    assert state.opt_state[1][0].mu["layers"]["attn"]["q"]["kernel"].sharding.spec == q.sharding.spec
    assert state.params["layers"]["mlp"]["down"]["kernel"].sharding.spec[0] == "stage"
    # stages hand activations to their neighbours; no layer parameter is gathered across stages
    assert "collective-permute" in hlo
    gathered_over_stage = [ln for ln in hlo.splitlines() if " all-gather(" in ln and "{'stage'}" in ln]
    assert not gathered_over_stage, gathered_over_stage[:2]


def test_bubble_fraction():
    assert pipeline.bubble_fraction(1, 4) == 0.0
    assert pipeline.bubble_fraction(2, 4) == pytest.approx(1 / 5)
    assert pipeline.bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert pipeline.bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert pipeline.num_microbatches(4, 0) == 8 and pipeline.num_microbatches(4, 6) == 6
    with pytest.raises(ValueError, match="microbatches >= 1"):
        pipeline.bubble_fraction(2, 0)


def test_pipeline_errors(reference):
    with pytest.raises(ValueError, match=r"pipeline_stages=3 must divide model.num_layers=4.*\[1, 2, 4\]"):
        CFG.replace(pipeline_stages=3)
    with pytest.raises(ValueError, match="pipeline_microbatches=-1"):
        CFG.replace(pipeline_microbatches=-1)
    params, _, _ = reference
    model = T.merge_params(T.split_params(T.abstract_model(CFG.replace(pipeline_stages=2)))[0], params)
    x = random_tokens(np.random.default_rng(0), (6, 8), CFG.vocab_size)
    with pytest.raises(ValueError, match="batch size 6 is not divisible by 4 pipeline micro-batches"):
        model(x)
    with pytest.raises(ValueError, match="KV-cache decoding is not supported with model.pipeline_stages=2"):
        model(x[:, :4], cache=T.init_cache(CFG, 6, 16))
    mesh = M.make_mesh({**M.DEFAULT_SHAPE, "data": 2, "stage": 4})
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="multiple of the mesh's stage axis"):
        jax.eval_shape(lambda p: model(jnp.asarray(x[:4])), params)


def test_config_fields_default_to_no_pipeline():
    cfg = ModelConfig.from_dict(tiny_model_config().to_dict())
    assert cfg.pipeline_stages == 1 and cfg.pipeline_microbatches == 0
