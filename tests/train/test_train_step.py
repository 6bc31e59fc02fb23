"""Train-step equivalences (accumulation, meshes) and checkpoint restore with fallback."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.sharding import use_rules
from tests.helpers import corrupt_params, random_tokens, tiny_model_config
from models.checkpoint import UnreadableCheckpoint
from train import mesh as M
from train.checkpoint import Checkpointer
from train.loss import lm_loss_fn
from train.optimizer import make_optimizer
from train.state import abstract_state, create_state, make_train_step, on_device, state_shardings

OPT = dict(name="adamw", lr=1e-2, schedule="cosine", warmup_steps=1, weight_decay=0.1, clip_norm=1.0)


def _batch(seed, b=8, t=16, vocab=97, packed=True):
    r = np.random.default_rng(seed)
    inputs = random_tokens(r, (b, t), vocab)
    seg = np.ones((b, t), np.int32)
    pos = np.tile(np.arange(t, dtype=np.int32), (b, 1))
    if packed:  # two documents in each row and some padding at the end of odd rows
        cut = r.integers(3, t - 3, b)
        for i, c in enumerate(cut):
            seg[i, c:] = 2
            pos[i, c:] = np.arange(t - c)
            if i % 2:
                seg[i, -2:] = 0
    targets = (inputs * 7 + 3) % vocab  # learnable: the loss must fall within a few steps
    return {"inputs_BT": inputs, "targets_BT": targets, "positions_BT": pos,
            "segment_ids_BT": seg, "loss_mask_BT": (seg > 0).astype(np.float32)}


def _train(shape, *, microbatches=1, steps=5, devices=None, cfg=None, offload=False, layout=None, hlo=None):
    cfg = cfg or tiny_model_config()
    mesh = M.make_mesh(M.resolve_shape(shape, len(devices or jax.devices())), devices=devices)
    tx, _ = make_optimizer(OPT, steps)
    with jax.set_mesh(mesh), use_rules(None):
        graphdef, state = create_state(cfg, tx, seed=0, mesh=mesh, offload_optimizer=offload)
        shardings = state_shardings(cfg, tx, mesh, offload_optimizer=offload)
        step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx, microbatches=microbatches,
                                       opt_device_shardings=on_device(shardings.opt_state) if offload else None),
                       in_shardings=(shardings, None), out_shardings=(shardings, None))
        losses, norms = [], []
        for i in range(steps):
            columns = layout if layout is not None else slice(None)
            batch = {k: jax.device_put(v[:, columns], M.batch_sharding(mesh, v.shape)) for k, v in _batch(i).items()}
            if hlo is not None and i == 0:
                hlo.append(step.lower(state, batch).compile().as_text())
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
            norms.append(float(m["grad_norm"]))
        return np.array(losses), np.array(norms), jax.device_get(state.params), state


def test_gradient_accumulation_equals_one_big_batch():
    one = jax.devices()[:1]
    l1, g1, p1, _ = _train({}, microbatches=1, devices=one, steps=3)
    l4, g4, p4, _ = _train({}, microbatches=4, devices=one, steps=3)
    np.testing.assert_allclose(l1, l4, rtol=1e-6)
    np.testing.assert_allclose(g1, g4, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("microbatches", [1, 2])
def test_a_non_finite_update_is_not_applied(microbatches):
    """A NaN loss (here: a NaN in the loss mask) leaves parameters and optimizer state as they
    were, advances the step, and says so; the next finite batch trains as if it never happened."""
    cfg = tiny_model_config()
    mesh = M.make_mesh(M.resolve_shape({}, 1), devices=jax.devices()[:1])
    tx, _ = make_optimizer(OPT, 10)
    with jax.set_mesh(mesh):
        graphdef, state = create_state(cfg, tx, seed=0, mesh=mesh)
        step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx, microbatches=microbatches))
        state, m = step(state, _batch(0))
        before = jax.device_get((state.params, state.opt_state))
        poisoned = dict(_batch(1), loss_mask_BT=_batch(1)["loss_mask_BT"] * np.float32("nan"))
        bad_state, m_bad = step(state, poisoned)
        assert float(m["nonfinite"]) == 0 and float(m_bad["nonfinite"]) == 1 and int(bad_state.step) == 2
        for a, b in zip(jax.tree.leaves(jax.device_get((bad_state.params, bad_state.opt_state))),
                        jax.tree.leaves(before)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        after_bad, _ = step(bad_state, _batch(2))
        clean, _ = step(state, _batch(2))
        for a, b in zip(jax.tree.leaves(after_bad.params), jax.tree.leaves(clean.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_data_fsdp_tensor_mesh_equals_one_device(one_device_run):
    """8 fake devices as data=2, fsdp=2, tensor=2: the same loss trajectory as 1 device."""
    ref_l, ref_g, _, _ = one_device_run
    l, g, _, state = _train({"data": 2, "fsdp": 2, "tensor": 2})
    q = state.params["layers"]["attn"]["q"]["kernel"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)  # really sharded
    mu = state.opt_state[1][0].mu["layers"]["attn"]["q"]["kernel"]  # adam moment follows its param
    assert mu.sharding.spec == q.sharding.spec
    np.testing.assert_allclose(l, ref_l, rtol=1e-4)
    np.testing.assert_allclose(g, ref_g, rtol=1e-4)
    assert ref_l[-1] < ref_l[0]  # the runs are training, not just agreeing


def _save_states(tmp_path, steps=(2, 4)):
    cfg = tiny_model_config()
    mesh = M.make_mesh(M.resolve_shape({}, 1), devices=jax.devices()[:1])
    tx, _ = make_optimizer(OPT, 10)
    with jax.set_mesh(mesh):
        graphdef, state = create_state(cfg, tx, seed=0, mesh=mesh)
        shardings = state_shardings(cfg, tx, mesh)
        step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx))
        ckpt = Checkpointer(tmp_path, max_to_keep=5, async_save=True)
        saved = {}
        for i in range(max(steps)):
            state, _ = step(state, _batch(i))
            if i + 1 in steps:
                ckpt.save(state)
                saved[i + 1] = jax.device_get(state.params)
        ckpt.close()
        return cfg, tx, shardings, saved


def test_checkpoint_round_trip_and_fallback_to_previous(tmp_path):
    cfg, tx, shardings, saved = _save_states(tmp_path)
    target = abstract_state(cfg, tx, shardings)
    restored = Checkpointer(tmp_path).restore(target)
    assert int(restored.step) == 4
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(saved[4])):
        np.testing.assert_array_equal(a, b)
    # corrupt the newest checkpoint: its array data disappears -> step 2 is used, and step 4 is
    # set aside (kept for inspection, no longer a checkpoint)
    corrupt_params(tmp_path / "checkpoints" / "4")
    shutil.rmtree(tmp_path / "checkpoints" / "4" / "train_state")
    ckpt = Checkpointer(tmp_path)
    restored = ckpt.restore(target)
    assert int(restored.step) == 2
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(saved[2])):
        np.testing.assert_array_equal(a, b)
    assert ckpt.steps() == [2] and (tmp_path / "checkpoints" / "unreadable-4" / "params").is_dir()
    ckpt.close()
    # none readable: an error naming each step, not a silent fresh start, and nothing set aside
    corrupt_params(tmp_path / "checkpoints" / "2")
    with pytest.raises(UnreadableCheckpoint, match=r"no readable checkpoint.*step 2: "):
        Checkpointer(tmp_path).restore(target)
    assert (tmp_path / "checkpoints" / "2").is_dir()


def test_an_unreadable_checkpoint_never_pushes_out_a_good_one(tmp_path):
    """keep 2: steps 2 (good) and 4 (corrupt). After the fallback to 2, saving 6 and 8 keeps the
    newest good ones (6, 8; 2 goes as the oldest good one), and a new save at step 4, the
    corrupt step, is written rather than skipped."""
    cfg, tx, shardings, saved = _save_states(tmp_path)
    corrupt_params(tmp_path / "checkpoints" / "4")
    target = abstract_state(cfg, tx, shardings)
    ckpt = Checkpointer(tmp_path, max_to_keep=2, async_save=False)
    state = ckpt.restore(target)
    assert int(state.step) == 2 and ckpt.steps() == [2]
    state = dataclasses.replace(state, step=state.step + 2)  # the run redoes steps 3 and 4
    assert ckpt.save(state)
    assert ckpt.steps() == [2, 4]
    assert not ckpt.save(state)  # the same step again: kept, not overwritten (and said so)
    for s_ in (6, 8):
        assert ckpt.save(dataclasses.replace(state, step=jnp.asarray(s_, jnp.int32)))
    assert ckpt.steps() == [6, 8]
    assert (tmp_path / "checkpoints" / "unreadable-4").is_dir()
    ckpt.close()


def test_models_checkpoint_reads_params_without_train(tmp_path):
    from models.checkpoint import restore_params

    _, _, _, saved = _save_states(tmp_path)
    params, step = restore_params(tmp_path)
    assert step == 4
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved[4])):
        np.testing.assert_array_equal(np.asarray(a), b)
    params2, step2 = restore_params(tmp_path, step=2)
    assert step2 == 2
    for a, b in zip(jax.tree.leaves(params2), jax.tree.leaves(saved[2])):
        np.testing.assert_array_equal(np.asarray(a), b)
    assert restore_params(tmp_path / "checkpoints" / "2")[1] == 2  # one step's directory
    assert restore_params(tmp_path / "checkpoints" / "2" / "params")[1] == 2  # its params item
    with pytest.raises(FileNotFoundError, match="step 3"):
        restore_params(tmp_path, step=3)
    # the newest is unreadable: the previous step's params, and that step, come back
    corrupt_params(tmp_path / "checkpoints" / "4")
    params, step = restore_params(tmp_path)
    assert step == 2
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved[2])):
        np.testing.assert_array_equal(np.asarray(a), b)


@pytest.mark.parametrize("opt", ["adafactor", "lion", "sgd", "lamb"])
def test_other_optimizers_shard_and_train_on_a_mesh(opt):
    cfg = tiny_model_config()
    mesh = M.make_mesh(M.resolve_shape({"fsdp": 4, "tensor": 2}, 8))
    tx, _ = make_optimizer({**OPT, "name": opt, "lr": 3e-3}, 5)
    with jax.set_mesh(mesh):
        graphdef, state = create_state(cfg, tx, seed=0, mesh=mesh)
        shardings = state_shardings(cfg, tx, mesh)
        step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx), in_shardings=(shardings, None),
                       out_shardings=(shardings, None))
        batch = _batch(0, packed=False)
        losses = []
        for _ in range(5):
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] and np.isfinite(losses).all()


@pytest.fixture(scope="module")
def one_device_run():
    return _train({}, devices=jax.devices()[:1])


@pytest.mark.parametrize("strategy", ["dp", "fsdp", "fsdp_tp", "tp", "fsdp_sp", "pp_fsdp"])
def test_every_strategy_matches_one_device(strategy, one_device_run):
    """8 fake devices, the strategy's mesh: the same losses and gradient norms as 1 device (1e-4);
    the compiled step holds the collectives the strategy implies."""
    from models.ring_attention import zigzag_order

    ref_l, ref_g, _, _ = one_device_run
    shape = M.strategy_shape(strategy, 8, tiny_model_config(), seq_len=16)
    layout = zigzag_order(16, shape["sequence"]) if shape["sequence"] > 1 else None  # ring load balance
    hlo = []
    # pp_fsdp: GPipe over the stage axis, 2 pipeline micro-batches of 4 rows (one per fsdp shard)
    cfg = tiny_model_config(pipeline_stages=shape["stage"], pipeline_microbatches=2) if shape["stage"] > 1 else None
    l, g, _, state = _train(shape, layout=layout, hlo=hlo, cfg=cfg)
    np.testing.assert_allclose(l, ref_l, rtol=1e-4)
    np.testing.assert_allclose(g, ref_g, rtol=1e-4)
    text = hlo[0]
    if strategy in ("fsdp", "fsdp_tp", "fsdp_sp", "pp_fsdp"):
        assert "all-gather" in text  # parameters gathered for use
        assert "reduce-scatter" in text or "all-reduce" in text  # gradients reduced (CPU: all-reduce)
        q = state.params["layers"]["attn"]["q"]["kernel"]
        assert "fsdp" in str(q.sharding.spec)
    if strategy in ("tp", "fsdp_tp"):
        assert "all-reduce" in text  # Megatron: row-parallel outputs summed
        assert "tensor" in str(state.params["layers"]["mlp"]["up"]["kernel"].sharding.spec)
    if strategy == "fsdp_sp":
        assert "collective-permute" in text  # the ring
    if strategy == "pp_fsdp":
        assert shape["stage"] == 2 and "collective-permute" in text  # stage i hands its micro-batch to i+1
        assert state.params["layers"]["attn"]["q"]["kernel"].sharding.spec[0] == "stage"  # layers split
    if strategy == "dp":
        assert all(all(axis is None for axis in p.sharding.spec) for p in jax.tree.leaves(state.params))


def test_optimizer_state_offloaded_to_host_memory(one_device_run):
    ref_l, _, _, _ = one_device_run
    l, _, _, state = _train({"fsdp": 8}, offload=True)
    np.testing.assert_allclose(l, ref_l, rtol=1e-4)
    mu = state.opt_state[1][0].mu["layers"]["attn"]["q"]["kernel"]
    assert mu.sharding.memory_kind == "pinned_host"
    assert state.params["layers"]["attn"]["q"]["kernel"].sharding.memory_kind == "device"


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    """Saved on fsdp=8, restored on data=2 x tensor=4: the same parameters, and two more steps give
    the same losses as two more steps on the original mesh."""
    cfg = tiny_model_config()
    tx, _ = make_optimizer(OPT, 10)

    def setup(shape):
        mesh = M.make_mesh(M.resolve_shape(shape, 8))
        with jax.set_mesh(mesh):
            graphdef, state = create_state(cfg, tx, seed=0, mesh=mesh)
            sh = state_shardings(cfg, tx, mesh)
            step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx), in_shardings=(sh, None), out_shardings=(sh, None))
        return mesh, state, sh, step

    def run(mesh, step, state, steps):
        losses = []
        with jax.set_mesh(mesh):
            for i in steps:
                batch = {k: jax.device_put(v, M.batch_sharding(mesh, v.shape)) for k, v in _batch(i).items()}
                state, m = step(state, batch)
                losses.append(float(m["loss"]))
        return state, losses

    mesh_a, state, sh_a, step_a = setup({"fsdp": 8})
    state, _ = run(mesh_a, step_a, state, range(3))
    ckpt = Checkpointer(tmp_path, async_save=False)
    ckpt.save(state)
    ckpt.close()
    _, cont_a = run(mesh_a, step_a, state, range(3, 5))

    mesh_b, _, sh_b, step_b = setup({"data": 2, "tensor": 4})
    with jax.set_mesh(mesh_b):
        restored = Checkpointer(tmp_path).restore(abstract_state(cfg, tx, sh_b))
    up = restored.params["layers"]["mlp"]["up"]["kernel"]
    assert "tensor" in str(up.sharding.spec) and "fsdp" not in str(up.sharding.spec)
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(restored.params))):
        np.testing.assert_array_equal(a, b)
    _, cont_b = run(mesh_b, step_b, restored, range(3, 5))
    np.testing.assert_allclose(cont_b, cont_a, rtol=1e-5)
