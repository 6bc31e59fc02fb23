"""experiments.sweep: expansion and run ids, local sweeps of real `train.pretrain` runs (table,
plot, re-runs that start nothing, a failing run recorded while the others finish, --parallel=2
giving the same numbers), the TPU VM commands as golden text, an Optuna search, and provenance
in each run's runs.jsonl."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import sweep as S

REPO = pathlib.Path(__file__).resolve().parents[2]
# a short tiny run: 4 steps of 4 x 64 tokens, an evaluation every 2 steps, no samples
FIXED = {"train.steps": 4, "train.batch_size": 4, "data.seq_len": 64, "train.eval_every": 2, "train.eval_batches": 1,
         "train.log_every": 1, "train.num_samples": 0, "train.async_checkpoint": False}


def _write_sweep(path: pathlib.Path, body: str) -> pathlib.Path:
    path.write_text("def get_sweep():\n    return " + body + "\n")
    return path


def _rows(sweep_dir: pathlib.Path) -> dict[str, dict]:
    with (sweep_dir / "results.csv").open() as f:
        return {r["run_id"]: r for r in csv.DictReader(f)}


def test_expansion_run_ids_and_bad_sweeps():
    base = dict(program="train.pretrain", config="configs/pretrain.py:tiny")
    grid = S.parse_sweep({**base, "grid": {"optimizer.lr": [1e-3, 3e-3], "model.num_layers": [2, 4]}}, name="g")
    runs = S.expand(grid)
    assert runs == [{"optimizer.lr": a, "model.num_layers": b} for a in (1e-3, 3e-3) for b in (2, 4)]
    assert [S.run_id(r) for r in runs][:2] == ["lr-0.001_num_layers-2", "lr-0.001_num_layers-4"]
    z = S.expand(S.parse_sweep({**base, "zip": {"optimizer.lr": [1e-3, 2e-3], "train.seed": [0, 1]}}, name="z"))
    assert z == [{"optimizer.lr": 1e-3, "train.seed": 0}, {"optimizer.lr": 2e-3, "train.seed": 1}]
    rnd = S.parse_sweep({**base, "random": {"optimizer.lr": (1e-4, 1e-2, "log"), "model.num_layers": [2, 4],
                                            "train.batch_size": (4, 16, "linear")}, "num_runs": 50, "seed": 3},
                        name="r")
    a, b = S.expand(rnd), S.expand(rnd)
    assert a == b and len(a) == 50  # the seed fixes the draws
    assert all(1e-4 <= r["optimizer.lr"] <= 1e-2 and r["model.num_layers"] in (2, 4) and
               isinstance(r["train.batch_size"], int) and 4 <= r["train.batch_size"] <= 16 for r in a)
    lrs = sorted(r["optimizer.lr"] for r in a)  # log-uniform: about half below the geometric middle
    assert 15 <= sum(x < 1e-3 for x in lrs) <= 35
    for bad, match in [({**base, "grid": {"x": [1]}, "zip": {"y": [1]}}, "exactly one"),
                       ({**base, "program": "train.nope", "grid": {"x": [1]}}, "train.nope"),
                       ({**base, "config": "configs/none.py:tiny", "grid": {"x": [1]}}, "configs/none.py"),
                       ({**base, "zip": {"a": [1, 2], "b": [1]}}, "equal lengths"),
                       ({**base, "random": {"a": (1, 0, "log")}, "num_runs": 2}, "low < high"),
                       ({**base, "grid": {"a": [1]}, "goal": "up"}, "goal"),
                       ({**base, "grid": {"a": [1]}, "fixed": {"a": 2}}, "both fixed and swept"),
                       ({**base, "grid": {"a": [1]}, "colour": 1}, "unknown key")]:
        with pytest.raises(S.SweepError, match=match):
            S.parse_sweep(bad, name="bad")


def test_local_sweep_table_plot_rerun_failure_and_parallel(tmp_path):
    fixed = repr(FIXED)
    good = _write_sweep(tmp_path / "sched.py", f'dict(program="train.pretrain", config="configs/pretrain.py:tiny", '
                        f'fixed={fixed}, grid={{"optimizer.schedule": ["cosine", "linear", "constant"]}})')
    sweep = S.load_sweep(str(good))
    logs = []
    results = S.run_local(sweep, tmp_path / "a", log=logs.append)
    rows = _rows(tmp_path / "a")
    assert list(rows) == ["schedule-cosine", "schedule-linear", "schedule-constant"]
    for rid, r in rows.items():
        assert r["status"] == "done" and float(r["eval_loss"]) > 0 and float(r["tokens_per_sec"]) > 0
        metrics = [json.loads(x) for x in (tmp_path / "a" / rid / "metrics.jsonl").read_text().splitlines()]
        evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
        assert float(r["eval_loss"]) == pytest.approx(evals[-1]) and float(r["best_eval_loss"]) == min(evals)
        start = json.loads((tmp_path / "a" / rid / "runs.jsonl").read_text().splitlines()[0])
        assert len(start["git_commit"]) == 40 and start["git_dirty"] in (True, False)  # provenance
        assert start["device_kind"] and start["versions"]["jax"] and "--config.optimizer.schedule=" in start["command"]
    assert (tmp_path / "a" / "results.png").stat().st_size > 1000
    md = (tmp_path / "a" / "results.md").read_text()
    assert "schedule-linear" in md and "Best:" in md
    assert results.best()["run_id"] in rows
    # a re-run finds every run done and starts no process
    before = {rid: (tmp_path / "a" / rid / "runs.jsonl").read_text() for rid in rows}
    logs.clear()
    S.run_local(sweep, tmp_path / "a", log=logs.append)
    assert "3 already done, 0 to run" in logs[0]
    assert {rid: (tmp_path / "a" / rid / "runs.jsonl").read_text() for rid in rows} == before
    assert _rows(tmp_path / "a") == rows
    # a run with a bad value fails alone; --parallel=2 gives the same numbers for the others
    bad = _write_sweep(tmp_path / "sched_bad.py", f'dict(program="train.pretrain", config="configs/pretrain.py:tiny", '
                       f'fixed={fixed}, grid={{"optimizer.schedule": ["cosine", "bogus", "constant"]}})')
    S.run_local(S.load_sweep(str(bad)), tmp_path / "b", parallel=2, log=logs.append)
    rows_b = _rows(tmp_path / "b")
    assert rows_b["schedule-bogus"]["status"] == "failed" and "bogus" in rows_b["schedule-bogus"]["error"]
    for rid, r in rows.items():
        if rid not in rows_b:
            continue
        assert rows_b[rid]["status"] == "done"
        assert float(rows_b[rid]["eval_loss"]) == pytest.approx(float(r["eval_loss"]), abs=1e-5)


GOLDEN = """\
# the code every VM runs: the committed tree (HEAD)
git -C {repo} archive --format=tar.gz --output=/tmp/loom.tar.gz HEAD
# lr-0.001
gcloud compute tpus tpu-vm create loom-two-lr-0-001 --zone=europe-west4-a --accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite --spot
gcloud compute tpus tpu-vm scp /tmp/loom.tar.gz 'loom-two-lr-0-001:~/loom.tar.gz' --zone=europe-west4-a --worker=all
gcloud compute tpus tpu-vm ssh loom-two-lr-0-001 --zone=europe-west4-a --worker=all '--command=mkdir -p ~/loom && tar xzf ~/loom.tar.gz -C ~/loom && cd ~/loom && mkdir -p runs/bucket && (mountpoint -q runs/bucket || gcsfuse --implicit-dirs --only-dir=sweeps-2026 my-bucket runs/bucket) && scripts/setup.sh && .venv/bin/python -m train.pretrain --config=configs/pretrain.py:small --workdir=runs/bucket/sweeps/two/lr-0.001 --config.train.steps=100 --config.optimizer.lr=0.001'
gcloud compute tpus tpu-vm delete loom-two-lr-0-001 --zone=europe-west4-a --quiet
# lr-0.003
gcloud compute tpus tpu-vm create loom-two-lr-0-003 --zone=europe-west4-a --accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite --spot
gcloud compute tpus tpu-vm scp /tmp/loom.tar.gz 'loom-two-lr-0-003:~/loom.tar.gz' --zone=europe-west4-a --worker=all
gcloud compute tpus tpu-vm ssh loom-two-lr-0-003 --zone=europe-west4-a --worker=all '--command=mkdir -p ~/loom && tar xzf ~/loom.tar.gz -C ~/loom && cd ~/loom && mkdir -p runs/bucket && (mountpoint -q runs/bucket || gcsfuse --implicit-dirs --only-dir=sweeps-2026 my-bucket runs/bucket) && scripts/setup.sh && .venv/bin/python -m train.pretrain --config=configs/pretrain.py:small --workdir=runs/bucket/sweeps/two/lr-0.003 --config.train.steps=100 --config.optimizer.lr=0.003'
gcloud compute tpus tpu-vm delete loom-two-lr-0-003 --zone=europe-west4-a --quiet
"""


def test_tpu_vm_mode_prints_the_commands_and_launch_needs_gcloud(tmp_path):
    path = _write_sweep(tmp_path / "two.py", 'dict(program="train.pretrain", config="configs/pretrain.py:small", '
                        'fixed={"train.steps": 100}, grid={"optimizer.lr": [1e-3, 3e-3]})')
    args = [sys.executable, "-m", "experiments.sweep", f"--sweep={path}", "--mode=tpu_vm", "--zone=europe-west4-a",
            "--accelerator_type=v5litepod-8", "--runtime_version=v2-alpha-tpuv5-lite", "--bucket=gs://my-bucket/sweeps-2026",
            "--spot"]
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # no gcloud here
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == GOLDEN.format(repo=REPO)
    queued = S.tpu_commands(S.load_sweep(str(path)), S.TpuOptions(queued=True))[0][1]
    assert queued[0][:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert "--node-id=loom-two-lr-0-001" in queued[0] and "--runtime-version=tpu-ubuntu2204-base" in queued[0]
    out = subprocess.run(args + ["--launch"], cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "gcloud" in out.stderr  # after the printed commands, one line


@pytest.mark.slow  # four 20-step training runs: about 60 s on 2 cores
def test_optuna_search_finishes_and_names_its_best_trial(tmp_path):
    pytest.importorskip("optuna", reason="the [experiments] extra")
    fixed = repr({**{k: v for k, v in FIXED.items() if k != "train.eval_every"}, "train.steps": 20})
    path = _write_sweep(tmp_path / "search.py", f'dict(program="train.pretrain", config="configs/pretrain.py:tiny", '
                        f'fixed={fixed}, optuna={{"optimizer.lr": (1e-4, 3e-2, "log")}}, seed=1)')
    logs = []
    study, best = S.run_optuna(S.load_sweep(str(path)), tmp_path / "opt", trials=4, log=logs.append, poll=0.2)
    assert len(study.trials) == 4 and best is not None
    assert any(line.startswith("best trial: #") for line in logs)
    states = {t.state.name for t in study.trials}
    assert states <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states
    assert best.value == min(t.value for t in study.trials if t.state.name == "COMPLETE")
    # pruning saw intermediate evaluations: eval_every was set to a quarter of the 20 steps
    first = next((tmp_path / "opt").glob("trial-000_*"))
    evals = [json.loads(x) for x in (first / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in evals if "eval_loss" in m][:3] == [0, 5, 10]
    assert (tmp_path / "opt" / "optuna.db").is_file() and (tmp_path / "opt" / "results.csv").is_file()
