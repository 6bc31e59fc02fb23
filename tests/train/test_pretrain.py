"""`python -m train.pretrain` end to end, as a user runs it (fresh processes, one CPU device)."""

import json

import jax
import numpy as np
import pytest

from models.checkpoint import restore_params
from models.config import ModelConfig, flops_per_token
from tests.helpers import run_program
from train.lifecycle import RunLog
from train.metrics import read_metrics

MICRO = ["--config=configs/pretrain.py:tiny", "--config.model.num_layers=2", "--config.model.hidden_size=64",
         "--config.model.intermediate_size=128", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
         "--config.model.head_dim=32", "--config.model.dropout_rate=0.1", "--config.data.seq_len=64",
         "--config.train.batch_size=4", "--config.train.steps=12", "--config.train.checkpoint_every=4",
         "--config.train.async_checkpoint=False", "--config.train.eval_every=6", "--config.train.eval_batches=2",
         "--config.train.num_samples=0", "--config.train.log_every=1"]


def test_tiny_lowers_the_validation_loss_clearly(tiny_run):
    evals = [m for m in read_metrics(tiny_run) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 15, 30]
    first, last = evals[0]["eval_loss"], evals[-1]["eval_loss"]
    assert abs(first - np.log(4096)) < 0.3  # an untrained model is near-uniform over the vocabulary
    assert last < first - 1.5, (first, last)
    assert abs(evals[-1]["eval_ppl"] - np.exp(last)) < 1e-6 * np.exp(last)


def test_run_outputs(tiny_run):
    train = [m for m in read_metrics(tiny_run) if "loss" in m]
    assert [m["step"] for m in train] == [10, 20, 30]  # the tiny preset logs every 10 steps
    cfg = json.loads((tiny_run / "config.json").read_text())
    # MFU = model FLOPs per second / the matmul peak of the compute dtype the run measured (its
    # runs.jsonl start line). Both are wall-clock figures, so nothing is asserted of their ratio
    # beyond being positive: a peak measured while another process held the cores is low.
    flops_tok = flops_per_token(ModelConfig.from_dict(cfg["model"]), cfg["data"]["seq_len"])["train"]
    start = [r for r in RunLog(tiny_run).read() if r["event"] == "start"]
    assert len(start) == 1
    peak = start[0]["peak_flops"]
    for m in train:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(m)
        assert m["mfu"] == pytest.approx(m["tokens_per_sec"] * flops_tok / peak, rel=1e-6)
        assert m["tokens_per_sec"] > 0 and m["mfu"] > 0
    assert (tiny_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    samples = (tiny_run / "samples.txt").read_text()
    assert samples.count("=== prompt ===") == 2 and "continuation" in samples
    assert cfg["model"]["hidden_size"] == 256 and cfg["train"]["steps"] == 30
    assert cfg["mesh"]["shape"] == {"data": 1, "stage": 1, "fsdp": 1, "tensor": 1, "sequence": 1, "expert": 1}
    assert cfg["optimizer"]["warmup_steps"] == 2  # derived from train.steps at run time
    assert (tiny_run / "tokenizer.model").is_file()
    assert list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))
    assert (tiny_run / "checkpoints" / "30" / "params").is_dir()


MIXTURE_CONFIG = """
from ml_collections import config_dict

from configs.pretrain import get_config as pretrain_config, source


def get_config(arg=None):
    c = pretrain_config("tiny")
    c.data.sources = config_dict.ConfigDict({{"a": source(format="jsonl", path="{a}", weight=3.0),
                                              "b": source(format="jsonl", path="{b}", weight=1.0)}})
    return c
"""


@pytest.fixture(scope="module")
def mixture_run(tmp_path_factory):
    """A micro model on two JSONL sources mixed 3:1, 40 steps logged every 10, evaluated at step 29
    (not a multiple of log_every) on 150 held-out batches, so evaluation takes longer than 10 steps."""
    tmp = tmp_path_factory.mktemp("mixture")
    r = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"])
    for name, n in (("a", 1500), ("b", 500)):
        docs = (" ".join(r.choice(words, r.integers(20, 60))) for _ in range(n))
        (tmp / f"{name}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    config = tmp / "mixture.py"
    config.write_text(MIXTURE_CONFIG.format(a=tmp / "a.jsonl", b=tmp / "b.jsonl"))
    micro_model = [a for a in MICRO[1:] if a.startswith(("--config.model", "--config.data")) and "dropout" not in a]
    run_program("train.pretrain", f"--config={config}", *micro_model, "--config.model.dropout_rate=0.0",
                "--config.data.tokenizer.vocab_size=512", "--config.train.batch_size=16",
                "--config.train.steps=40", "--config.train.log_every=10", "--config.train.eval_every=29",
                "--config.train.eval_batches=150", "--config.train.checkpoint_every=0",
                "--config.train.num_samples=0", f"--workdir={tmp / 'run'}")
    return tmp / "run"


def test_tokens_per_sec_counts_training_not_evaluation(mixture_run):
    """tokens_per_sec is tokens over the training time of the steps since the previous line: the
    line at 30 (steps 21-30, an evaluation after step 29) agrees with the line at 40 (no evaluation).
    Counting all 10 steps' tokens over the time after the evaluation gives ~10x; counting the
    evaluation's time as training gives a fraction. (The lines at 10 and 20 carry compilation and
    first-call costs, so they are not the comparison.)"""
    lines = {m["step"]: m for m in read_metrics(mixture_run) if "loss" in m}
    assert sorted(lines) == [10, 20, 30, 40]
    assert [m["step"] for m in read_metrics(mixture_run) if "eval_loss" in m] == [0, 29, 40]
    ratio = lines[30]["tokens_per_sec"] / lines[40]["tokens_per_sec"]
    assert 0.4 < ratio < 2.5, ratio


def test_train_lines_count_real_tokens_per_source(mixture_run):
    """Concat packing has no padding: each line's per-source tokens add up to every position of its
    10 steps (batch 16 x 64), and over the run source a (weight 3) has about 3/4 of them."""
    train = [m for m in read_metrics(mixture_run) if "loss" in m]
    for m in train:
        assert m["padding_fraction"] == 0.0
        assert m["tokens_a"] > 0 and m["tokens_b"] > 0
        assert m["tokens_a"] + m["tokens_b"] == 10 * 16 * 64
    share_a = sum(m["tokens_a"] for m in train) / sum(m["tokens_a"] + m["tokens_b"] for m in train)
    assert 0.65 < share_a < 0.85, share_a


def test_rerunning_a_complete_run_does_nothing(tiny_run):
    before = (tiny_run / "metrics.jsonl").read_text()
    proc = run_program("train.pretrain", "--config=configs/pretrain.py:tiny", f"--workdir={tiny_run}",
                       "--config.train.steps=30")
    assert "already complete" in proc.stderr
    assert (tiny_run / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    run_program("train.pretrain", *MICRO, f"--workdir={straight}")
    killed = run_program("train.pretrain", *MICRO, f"--workdir={broken}",
                         env={"LOOM_FAULT_KILL_AFTER_STEP": "10"}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: no clean shutdown
    assert not (broken / "checkpoints" / "12").exists()
    resumed = run_program("train.pretrain", *MICRO, f"--workdir={broken}")
    assert "restored step 8" in resumed.stderr

    a, b = read_metrics(straight), read_metrics(broken)
    assert [m["step"] for m in b] == [m["step"] for m in a]  # no duplicated or missing lines
    la = [m["loss"] for m in a if "loss" in m]
    lb = [m["loss"] for m in b if "loss" in m]
    np.testing.assert_allclose(lb, la, rtol=1e-6)
    ea = [m["eval_loss"] for m in a if "eval_loss" in m]
    eb = [m["eval_loss"] for m in b if "eval_loss" in m]
    np.testing.assert_allclose(eb, ea, rtol=1e-6)
    (pa, _), (pb, _) = restore_params(straight), restore_params(broken)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-6, rtol=0)


@pytest.mark.slow
def test_pipeline_parallel_run_matches_one_device(tmp_path):
    """`mesh.strategy=pp_fsdp` on 4 fake devices (stage=2 x fsdp=2, GPipe with 2 micro-batches):
    the same losses as the unpipelined run on 1 device, samples decoded unpipelined at the end,
    and a checkpoint the loader reads as an ordinary model."""
    from models.checkpoint import load

    args = [a for a in MICRO if not a.startswith(("--config.train.steps", "--config.model.dropout_rate",
                                                   "--config.train.num_samples", "--config.train.batch_size"))]
    args += ["--config.train.steps=4", "--config.model.dropout_rate=0.0", "--config.train.batch_size=8"]
    one, pp = tmp_path / "one", tmp_path / "pp"
    run_program("train.pretrain", *args, f"--workdir={one}", "--config.train.num_samples=0")
    proc = run_program("train.pretrain", *args, f"--workdir={pp}", "--config.mesh.strategy=pp_fsdp",
                       "--config.model.pipeline_microbatches=2", "--config.train.num_samples=1",
                       "--config.train.sample_tokens=8", env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert "bubble fraction 0.333" in proc.stderr  # (S-1)/(M+S-1) with S = M = 2
    cfg = json.loads((pp / "config.json").read_text())
    assert cfg["mesh"]["shape"]["stage"] == 2 and cfg["mesh"]["shape"]["fsdp"] == 2
    la = [m["loss"] for m in read_metrics(one) if "loss" in m]
    lb = [m["loss"] for m in read_metrics(pp) if "loss" in m]
    np.testing.assert_allclose(lb, la, rtol=1e-4)
    assert (pp / "samples.txt").read_text().count("=== prompt ===") == 1
    model, model_cfg = load(pp)
    assert model_cfg.pipeline_stages == 1 and model_cfg.num_layers == 2


def _tensorboard_histograms(workdir) -> dict[str, list]:
    """{tag: [bucket heights of each step's histogram]} from a run's TensorBoard event files."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, list] = {}
    for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        data, i = path.read_bytes(), 0
        while i < len(data):
            n = struct.unpack("<Q", data[i:i + 8])[0]
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("histo"):
                    out.setdefault(v.tag, []).append(list(v.histo.bucket))
    return out


def test_moe_tiny_trains_and_logs_its_auxiliary_losses(tmp_path):
    """moe_tiny (16 experts, top-2, a shared expert, dropless) through `python -m train.pretrain`:
    the loss falls; `loss` stays the LM loss and the MoE terms have keys of their own, with the
    per-expert load as a list in metrics.jsonl and a histogram in TensorBoard; samples decode."""
    run_program("train.pretrain", "--config=configs/pretrain.py:moe_tiny", f"--workdir={tmp_path}",
                "--config.train.steps=20", "--config.train.batch_size=8", "--config.data.seq_len=128",
                "--config.train.log_every=5", "--config.train.eval_every=20",
                "--config.train.eval_batches=2", "--config.train.checkpoint_every=0", "--config.train.num_samples=1",
                "--config.train.sample_tokens=8")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"]["moe"]["num_experts"] == 16 and cfg["model"]["moe"]["capacity_factor"] == 0.0
    train = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert [m["step"] for m in train] == [5, 10, 15, 20]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, [m["loss"] for m in train]
    for m in train:
        assert {"moe_aux_loss", "moe_z_loss", "moe_balance", "moe_dropped_fraction", "moe_router_entropy",
                "moe_load_max", "moe_expert_load"} <= set(m)
        assert m["moe_aux_loss"] == pytest.approx(0.01 * m["moe_balance"], rel=1e-4)
        assert m["moe_balance"] >= 1.0 - 1e-4 and m["moe_dropped_fraction"] == 0.0  # dropless
        assert len(m["moe_expert_load"]) == 16 and sum(m["moe_expert_load"]) == pytest.approx(1.0, rel=1e-4)
        assert 0 < m["moe_router_entropy"] <= np.log(16) + 1e-4
    histograms = _tensorboard_histograms(tmp_path)
    assert len(histograms["moe_expert_load"]) == 4 and len(histograms["moe_expert_load"][0]) == 16
    evals = [m for m in read_metrics(tmp_path) if "eval_loss" in m]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert (tmp_path / "samples.txt").read_text().count("=== prompt ===") == 1
