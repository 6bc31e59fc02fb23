"""Multi-host through jax.distributed: 2 local processes x 2 devices against 1 process x 4, and a
checkpoint saved by 2 processes restored by 1."""

import importlib.util
import os

import numpy as np

from tests.helpers import REPO, run_program
from train import distributed
from train.metrics import read_metrics

MICRO = ["--config=configs/pretrain.py:tiny", "--config.model.num_layers=2", "--config.model.hidden_size=64",
         "--config.model.intermediate_size=128", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
         "--config.model.head_dim=32", "--config.model.dtype=float32", "--config.data.seq_len=64",
         "--config.train.batch_size=8", "--config.train.steps=6", "--config.train.checkpoint_every=3",
         "--config.train.async_checkpoint=False", "--config.train.eval_every=3", "--config.train.eval_batches=2",
         "--config.train.num_samples=0", "--config.train.log_every=1", "--config.mesh.strategy=fsdp"]


def _launcher():
    spec = importlib.util.spec_from_file_location("launch_local", REPO / "scripts" / "launch_local.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _losses(workdir):
    return [(m["step"], m.get("loss", m.get("eval_loss"))) for m in read_metrics(workdir)]


def test_two_processes_equal_one_and_restore_in_one(tmp_path):
    launch = _launcher().launch
    cmd = [os.environ.get("PYTHON", __import__("sys").executable), "-m", "train.pretrain", *MICRO]
    # 2 processes x 2 devices, stopped (SIGKILL) right after the step-3 checkpoint
    rc = launch(cmd + [f"--workdir={tmp_path / 'multi'}"], 2, 2, cwd=str(REPO), timeout=600,
                env={"LOOM_FAULT_KILL_AFTER_STEP": "3"})
    assert rc != 0 and (tmp_path / "multi" / "checkpoints" / "3" / "data_iter" / "shard_1.json").is_file()
    # ... resumed by 1 process x 4 devices (it reads both data shards)
    resumed = run_program("train.pretrain", *MICRO, f"--workdir={tmp_path / 'multi'}",
                          env={"JAX_NUM_CPU_DEVICES": "4"})
    assert "restored step 3" in resumed.stderr
    # the reference: 1 process x 4 devices from the start, the same 2 data shards
    run_program("train.pretrain", *MICRO, "--config.data.num_shards=2", f"--workdir={tmp_path / 'single'}",
                env={"JAX_NUM_CPU_DEVICES": "4"})
    # and an uninterrupted 2-process run
    assert launch(cmd + [f"--workdir={tmp_path / 'multi2'}"], 2, 2, cwd=str(REPO), timeout=600) == 0
    ref = _losses(tmp_path / "single")
    assert [s for s, _ in ref] == [0, 1, 2, 3, 3, 4, 5, 6, 6]
    for other in ("multi", "multi2"):
        got = _losses(tmp_path / other)
        assert [s for s, _ in got] == [s for s, _ in ref]
        np.testing.assert_allclose([v for _, v in got], [v for _, v in ref], rtol=1e-5)


def test_cluster_detection(monkeypatch):
    for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.cluster_environment() is None
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed.cluster_environment() is None  # one task: nothing to join
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.cluster_environment() == "slurm"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1,t2,t3,t4")
    assert distributed.cluster_environment() == "tpu"
