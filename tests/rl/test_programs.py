"""`python -m rl.reward` and `python -m rl.dpo` end to end on the session's tiny pretraining run."""

import json
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from data import preferences
from data.tokenizer import SentencePieceTokenizer
from models.checkpoint import load, restore_params
from models.lora import LoraKernel
from rl.reward_model import load_reward_model
from train.lifecycle import RunLog
from train.metrics import read_metrics

from tests.rl.conftest import preference_program as _run



def test_reward_run_logs_evaluates_and_loads_as_a_scorer(rm_run):
    lines = read_metrics(rm_run)
    train = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "eval_loss" in m]
    assert [m["step"] for m in train] == [4, 8] and [m["step"] for m in evals] == [0, 4, 8]
    for m in train:
        assert {"accuracy", "reward_margin", "reward_chosen", "reward_rejected", "grad_norm", "tokens_per_sec",
                "trained_token_fraction", "truncated_pairs", "dropped_pairs"} <= set(m)
    assert {"eval_accuracy", "eval_reward_margin", "eval_reward_chosen", "eval_reward_rejected"} <= set(evals[-1])
    cfg = json.loads((rm_run / "config.json").read_text())
    assert cfg["peft"]["method"] == "lora" and "reward" in cfg
    assert [(r["event"], r["step"]) for r in RunLog(rm_run).read()] == [("start", 0), ("exit", 8)]
    params, step = restore_params(rm_run)
    assert step == 8 and set(params) == {"decoder", "head"}
    with pytest.raises(ValueError, match="reward model run"):
        load(rm_run)  # not a language model
    # the loaded scorer gives the rewards the run evaluated: its held-out accuracy is the last eval line's
    scorer = load_reward_model(rm_run)
    tok = SentencePieceTokenizer.from_file(rm_run / "tokenizer.model")
    specs = preferences.specs_from_config(cfg["data"]["eval_sources"])
    batches = preferences.eval_pair_batches(specs, tok, batch_size=8, num_pairs=16, seq_len=cfg["data"]["seq_len"])
    right = []
    for b in batches:
        seqs = [[b["inputs_BCT"][i, c][b["segment_ids_BCT"][i, c] > 0].tolist() for i in range(8)] for c in (0, 1)]
        right += list(scorer.score(seqs[0]) > scorer.score(seqs[1]))
    assert np.mean(right) == pytest.approx(evals[-1]["eval_accuracy"])
    r = scorer.score_chats([[{"role": "user", "content": "2+2="}]] * 2, ["4", "5"])
    assert r.shape == (2,) and np.isfinite(r).all()


@pytest.fixture(scope="module")
def dpo_run(tiny_run, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dpo")
    _run("rl.dpo", "arith_dpo", workdir, tiny_run, "--config.train.steps=10", "--config.train.eval_examples=4",
         "--config.train.eval_every=5", "--config.train.log_every=5", "--config.train.checkpoint_every=5")
    return workdir


def test_dpo_run_logs_margins_and_its_policy_loads(dpo_run, tiny_run):
    lines = read_metrics(dpo_run)
    train = [m for m in lines if "loss" in m]
    evals = [m for m in lines if "eval_loss" in m]
    assert [m["step"] for m in train] == [5, 10] and [m["step"] for m in evals] == [0, 5, 10]
    keys = {"accuracy", "reward_chosen", "reward_rejected", "reward_margin", "logp_chosen", "logp_rejected",
            "logp_accuracy"}
    assert all(keys <= set(m) for m in train)
    assert all({f"eval_{k}" for k in keys} | {"eval_answer_accuracy"} <= set(m) for m in evals)
    # at step 0 the policy is the reference: implicit rewards are exactly 0 and the loss log 2
    assert evals[0]["eval_reward_margin"] == 0.0 and evals[0]["eval_loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert evals[-1]["eval_reward_margin"] > 0
    model, _ = load(dpo_run)
    base, _ = load(tiny_run)
    assert any(isinstance(m.kernel, LoraKernel) for _, m in nnx.iter_modules(model) if hasattr(m, "kernel"))
    toks = jnp.asarray(np.random.default_rng(0).integers(3, 4000, (2, 12)))
    assert float(jnp.abs(model(toks) - base(toks)).max()) > 1e-4


def test_a_lora_run_is_a_base_with_its_adapters_merged(dpo_run, tiny_run):
    """A LoRA run (this DPO run, or an SFT run) as init.workdir: the base is its model with the
    adapters merged, so a new run can put its own adapters on it (compared in float32)."""
    from models import peft
    from models.checkpoint import load_base

    run = json.loads((dpo_run / "config.json").read_text())
    _, cfg = load(dpo_run)
    cfg = cfg.replace(dtype="float32")
    merged, _ = load_base({"workdir": str(dpo_run)}, cfg)
    assert not any(isinstance(getattr(m, "kernel", None), LoraKernel) for _, m in nnx.iter_modules(merged))
    plain, _ = load_base({"workdir": str(tiny_run)}, cfg)
    graphdef, _, rest = nnx.split(peft.apply(plain, run["peft"]), peft.trainable_filter("lora"), ...)
    adapted = nnx.merge(graphdef, restore_params(dpo_run)[0], rest)
    toks = jnp.asarray(np.random.default_rng(1).integers(3, 4000, (2, 12)))
    np.testing.assert_allclose(merged(toks), adapted(toks), atol=2e-4)
    assert float(jnp.abs(adapted(toks) - plain(toks)).max()) > 1e-3


@pytest.mark.slow
def test_dpo_sigterm_and_resume_equal_the_uninterrupted_run(dpo_run, tiny_run, tmp_path):
    args = ("--config.train.steps=10", "--config.train.eval_examples=4", "--config.train.eval_every=5",
            "--config.train.log_every=5", "--config.train.checkpoint_every=5")
    _run("rl.dpo", "arith_dpo", tmp_path, tiny_run, *args, env={"LOOM_FAULT_SIGNAL_AFTER_STEP": f"7:{int(signal.SIGTERM)}"},
         check=False)
    assert [(r["event"], r["step"]) for r in RunLog(tmp_path).read()] == [("start", 0), ("exit", 7)]
    _run("rl.dpo", "arith_dpo", tmp_path, tiny_run, *args)
    got, _ = restore_params(tmp_path)
    want, _ = restore_params(dpo_run)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), got, want)
    last = lambda w: [m for m in read_metrics(w) if "eval_loss" in m][-1]  # noqa: E731
    assert last(tmp_path)["eval_reward_margin"] == pytest.approx(last(dpo_run)["eval_reward_margin"], rel=1e-4)


@pytest.mark.parametrize("preset", ["arith_dpo_full", pytest.param("arith_simpo", marks=pytest.mark.slow)])
def test_full_fine_tuning_and_simpo_runs(preset, tiny_run, tmp_path):
    """Both skip the update of a step whose loss is NaN (the NaN guard) and go on."""
    _run("rl.dpo", preset, tmp_path, tiny_run, "--config.train.steps=4", "--config.train.eval_examples=0",
         env={"LOOM_FAULT_NAN_AT_STEP": "2"})
    lines = read_metrics(tmp_path)
    evals = [m for m in lines if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 4] and np.isfinite(evals[-1]["eval_loss"])
    train = [m for m in lines if "loss" in m]
    assert train[-1]["skipped_steps"] == 1 and np.isfinite(train[-1]["loss"])
    if preset == "arith_dpo_full":  # the checkpoint is the whole policy; the frozen reference is not in it
        params, _ = restore_params(tmp_path)
        base, _ = restore_params(tiny_run)
        assert jax.tree.structure(params) == jax.tree.structure(base)
        assert evals[0]["eval_reward_margin"] == 0.0


def _ultrafeedback(i):
    q = f"Name a colour number {i}."
    return {"prompt": q, "prompt_id": str(i), "score_chosen": 8.0, "score_rejected": 3.0,
            "chosen": [{"role": "user", "content": q}, {"role": "assistant", "content": "Blue, a calm colour."}],
            "rejected": [{"role": "user", "content": q}, {"role": "assistant", "content": "No."}]}


@pytest.mark.slow  # the formats are tested in tests/data/test_preferences.py; this is the program on them
def test_chat_preset_reads_ultrafeedback_and_hh_jsonl(tiny_run, tmp_path):
    records = [_ultrafeedback(i) for i in range(30)]
    records += [{"chosen": f"\n\nHuman: hello {i}\n\nAssistant: Hi, how can I help?",
                 "rejected": f"\n\nHuman: hello {i}\n\nAssistant: Go away."} for i in range(30)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    _run("rl.dpo", "chat", tmp_path / "run", tiny_run, f"--config.data.sources.chat.path={path}",
         "--config.data.seq_len=64", "--config.data.eval_fraction=0.2", "--config.train.steps=4")
    evals = [m for m in read_metrics(tmp_path / "run") if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 4] and evals[0]["eval_loss"] == pytest.approx(np.log(2), abs=1e-6)
    train = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert train[-1]["truncated_pairs"] == 0 and 0 < train[-1]["trained_token_fraction"] < 0.5


def test_bad_input_and_bad_values_are_one_line(tiny_run, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(_ultrafeedback(0)) + "\n" + json.dumps({"question": "q", "answer": "a"}) + "\n")
    proc = _run("rl.dpo", "chat", tmp_path / "a", tiny_run, f"--config.data.sources.chat.path={path}",
                "--config.data.sources.chat.strict=True", "--config.train.steps=2", check=False)
    assert proc.returncode == 1
    assert f"error: {path}:2: unknown record shape (fields ['answer', 'question'])" in proc.stderr
    proc = _run("rl.dpo", "arith_dpo", tmp_path / "b", tiny_run, "--config.peft.method=prefix", check=False)
    assert proc.returncode == 2 and "peft.method='prefix' cannot train DPO" in proc.stderr
    assert not (tmp_path / "b").exists()
    proc = _run("rl.reward", "chat_rm", tmp_path / "c", tiny_run, check=False)
    assert proc.returncode == 2 and "format 'jsonl' needs a path" in proc.stderr
