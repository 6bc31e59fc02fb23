"""Runs that never lose work (train/lifecycle.py): signals, the NaN guard, mismatched workdirs,
history without checkpoints, bad values, runs.jsonl — each as a user meets it, in fresh processes."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from models.checkpoint import committed_steps, restore_params
from tests.helpers import REPO, corrupt_params, run_program
from train import lifecycle
from train.metrics import read_metrics

MICRO = ["--config=configs/pretrain.py:tiny", "--config.model.num_layers=2", "--config.model.hidden_size=64",
         "--config.model.intermediate_size=128", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
         "--config.model.head_dim=32", "--config.data.seq_len=64", "--config.train.batch_size=4",
         "--config.train.steps=10", "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=10",
         "--config.train.async_checkpoint=False", "--config.train.eval_every=5", "--config.train.eval_batches=2",
         "--config.train.num_samples=0", "--config.train.log_every=1"]
NAN = {"LOOM_FAULT_NAN_AT_STEP": "7"}


def _losses(workdir):
    return [(m["step"], m["loss"]) for m in read_metrics(workdir) if "loss" in m]


def _assert_same_losses(a, b):
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, x), (_, y) in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None, step
        else:
            np.testing.assert_allclose(y, x, rtol=1e-6, err_msg=f"step {step}")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference: 10 steps, step 7's batch poisoned (its update skipped)."""
    workdir = tmp_path_factory.mktemp("lifecycle") / "straight"
    run_program("train.pretrain", *MICRO, f"--workdir={workdir}", env=NAN)
    return workdir


def test_sigterm_sigint_and_nan_then_resume_equal_the_uninterrupted_run(straight, tmp_path):
    broken = tmp_path / "broken"
    term = run_program("train.pretrain", *MICRO, f"--workdir={broken}", check=False,
                       env={**NAN, "LOOM_FAULT_SIGNAL_AFTER_STEP": f"3:{int(signal.SIGTERM)}"})
    assert term.returncode == 143, term.stderr[-2000:]
    assert "stopped at step 3 of 10" in term.stderr and committed_steps(broken) == [2, 3]
    interrupted = run_program("train.pretrain", *MICRO, f"--workdir={broken}", check=False,
                              env={**NAN, "LOOM_FAULT_SIGNAL_AFTER_STEP": f"6:{int(signal.SIGINT)}"})
    assert interrupted.returncode == 130, interrupted.stderr[-2000:]
    assert "restored step 3" in interrupted.stderr and 6 in committed_steps(broken)
    run_program("train.pretrain", *MICRO, f"--workdir={broken}", env=NAN)

    _assert_same_losses(_losses(straight), _losses(broken))
    skipped = [m for m in read_metrics(broken) if m.get("skipped_steps")]
    assert [(m["step"], m["skipped_steps"], m["loss"]) for m in skipped] == [(7, 1.0, None)]
    (pa, _), (pb, _) = restore_params(straight), restore_params(broken)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        assert np.isfinite(np.asarray(y)).all()
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=0)
    story = [(e["event"], e["step"], e.get("reason")) for e in lifecycle.RunLog(broken).read()]
    assert story == [("start", 0, None), ("exit", 3, "SIGTERM"), ("resume", 3, None), ("exit", 6, "SIGINT"),
                     ("resume", 6, None), ("exit", 10, "finished")]
    # metrics.jsonl was only appended to: the steps after each stop's last line were never lost
    raw = read_metrics(broken, raw=True)
    assert [m["step"] for m in raw if m.get("event") == "resume"] == [3, 6]


def test_an_external_sigint_stops_a_background_run_with_a_checkpoint(tmp_path):
    """Started the way `cmd &` starts it in a non-interactive shell (SIGINT ignored), signalled
    from outside mid-run: it stops at a step boundary with a checkpoint of that step, exit 130."""
    workdir = tmp_path / "bg"
    args = [a for a in MICRO if not a.startswith("--config.train.steps")] + ["--config.train.steps=100000"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_FLAGS")} | {"JAX_PLATFORMS": "cpu"}
    # `trap "" INT` leaves SIGINT ignored across the exec, as a non-interactive shell's `&` does
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "train.pretrain", *args, f"--workdir={workdir}"])
    proc = subprocess.Popen(["bash", "-c", f'trap "" INT; exec {command}'], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not any(m.get("step", 0) >= 3 for m in read_metrics(workdir) if "loss" in m):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    last = lifecycle.RunLog(workdir).read()[-1]
    assert last["event"] == "exit" and last["reason"] == "SIGINT"
    assert committed_steps(workdir)[-1] == last["step"] >= 3
    assert max(m["step"] for m in read_metrics(workdir) if "loss" in m) == last["step"]  # its metrics flushed


def test_a_second_signal_exits_at_once(monkeypatch):
    stops = lifecycle.StopRequests()
    exits = []
    monkeypatch.setattr(os, "_exit", lambda code: exits.append(code))
    try:
        stops._handle(signal.SIGTERM, None)
        assert stops.should_stop(5) and stops.exit_code == 143 and not exits
        stops._handle(signal.SIGINT, None)
        assert exits == [128 + signal.SIGINT]
    finally:
        stops.close()
    assert signal.getsignal(signal.SIGTERM) is not stops._handle


def test_a_different_model_in_the_workdir_is_refused_and_the_workdir_kept(straight):
    before = {p.relative_to(straight): p.read_bytes() for p in straight.rglob("*") if p.is_file()}
    proc = run_program("train.pretrain", *MICRO, f"--workdir={straight}", "--config.model.num_layers=1",
                       check=False)
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in proc.stderr
    assert "model.num_layers=2 (now 1)" in error[0] and str(straight) in error[0] and "init.workdir" in error[0]
    after = {p.relative_to(straight): p.read_bytes() for p in straight.rglob("*") if p.is_file()}
    assert set(after) - set(before) == set()  # nothing new but the refusal in runs.jsonl
    assert {k: v for k, v in after.items() if k.name != "runs.jsonl"} == \
           {k: v for k, v in before.items() if k.name != "runs.jsonl"}
    assert lifecycle.RunLog(straight).read()[-1]["event"] == "refused"


@pytest.mark.slow
def test_changes_that_keep_the_parameters_and_data_resume(tmp_path, straight):
    workdir = tmp_path / "longer"
    shutil.copytree(straight, workdir)
    proc = run_program("train.pretrain", *MICRO, f"--workdir={workdir}", "--config.train.steps=12",
                       "--config.optimizer.lr=1e-3", "--config.train.log_every=2", env=NAN)
    assert "restored step 10" in proc.stderr
    assert [s for s, _ in _losses(workdir)][-2:] == [10, 12]


@pytest.mark.slow
def test_history_without_checkpoints_is_kept_and_appended_to(tmp_path, straight):
    workdir = tmp_path / "history"
    shutil.copytree(straight, workdir)
    shutil.rmtree(workdir / "checkpoints")
    old = (workdir / "metrics.jsonl").read_text()
    proc = run_program("train.pretrain", *MICRO, f"--workdir={workdir}", "--config.train.steps=2")
    assert "has history (metrics.jsonl up to step 10) but no checkpoint" in proc.stderr
    assert (workdir / "metrics.jsonl").read_text().startswith(old)  # appended, never truncated
    assert [s for s, _ in _losses(workdir)] == [1, 2]  # the current run's history
    np.testing.assert_allclose([x for _, x in _losses(workdir)], [x for _, x in _losses(straight)[:2]], rtol=1e-6)


@pytest.mark.slow
def test_nan_policy_stop_keeps_the_last_good_parameters(tmp_path, straight):
    workdir = tmp_path / "stop"
    proc = run_program("train.pretrain", *MICRO, f"--workdir={workdir}", "--config.train.nan_policy=stop",
                       env={"LOOM_FAULT_NAN_AT_STEP": "3"}, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: loss is nan at step 3 (train.nan_policy=stop)" in proc.stderr
    assert committed_steps(workdir) == [2, 3]
    (good, _), (kept, _) = restore_params(straight, step=2), restore_params(workdir, step=3)
    for x, y in zip(jax.tree.leaves(good), jax.tree.leaves(kept)):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    assert lifecycle.RunLog(workdir).read()[-1] | {"time": 0, "pid": 0, "host": 0} == {
        "time": 0, "pid": 0, "host": 0, "event": "exit", "step": 3, "reason": "non-finite", "quantity": "loss",
        "message": "loss is nan at step 3 (train.nan_policy=stop): the update was not applied; stopped with a "
                   "checkpoint of the last good parameters"}


def test_nan_policy_skip_stops_after_too_many_in_a_row(tmp_path):
    proc = run_program("train.pretrain", *MICRO, f"--workdir={tmp_path / 'skips'}", "--config.train.nan_max_skips=2",
                       env={"LOOM_FAULT_NAN_AT_STEP": "3,4"}, check=False)
    assert proc.returncode == 1 and "2 steps in a row had a non-finite loss" in proc.stderr


@pytest.mark.parametrize("overrides,message", [
    (["--config.train.steps=-1"], "train.steps=-1 must be >= 0"),
    (["--config.data.seq_len=4096"], "data.seq_len=4096 exceeds model.max_seq_len"),
    (["--config.optimizer.name=adamx"], "adamx"),
    (["--config.train.nan_policy=ignore"], "train.nan_policy='ignore' is not valid"),
    (["--config.data.sources.stdlib.format=jsonl", "--config.data.sources.stdlib.path=/nonexistent/*.jsonl"],
     "source 'stdlib': no jsonl files match '/nonexistent/*.jsonl'"),
])
def test_bad_values_are_one_line_and_leave_no_workdir(tmp_path, overrides, message):
    workdir = tmp_path / "new"
    proc = run_program("train.pretrain", *MICRO, f"--workdir={workdir}", *overrides, check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not workdir.exists()


def test_sampling_a_corrupt_checkpoint_is_one_line(tmp_path, straight):
    workdir = tmp_path / "corrupt"
    shutil.copytree(straight, workdir)
    corrupt_params(workdir / "checkpoints" / "10")
    proc = run_program("inference.sample", f"--workdir={workdir}", "--step=10", "--prompt=def ",
                       "--max_new_tokens=2", check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: no readable checkpoint") and "step 10" in lines[-1]
    assert len(lines) <= 3 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # the fall-back path: one warning for the bad step, no asyncio dump, no library INFO chatter
    proc = run_program("inference.sample", f"--workdir={workdir}", "--prompt=def ", "--max_new_tokens=2")
    assert "Task exception was never retrieved" not in proc.stderr and "_NonBlockingMetadataStore" not in proc.stderr
    assert proc.stderr.count("unreadable") == 1, proc.stderr[-3000:]
    assert proc.stdout.startswith("=== 'def '")
