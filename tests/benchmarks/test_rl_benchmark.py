"""benchmarks/rl.py on a tiny model: Loom's worker runs rl/train.py's GRPO step with completions of
exactly max_new_tokens, the loss variants map onto TRL's options, and (when TRL is installed) the
peer loads the same weights and runs the same-sized step. No timing is asserted."""

import pytest

from benchmarks import rl as bench
from tests.helpers import tiny_model_config


def _spec(tmp_path, **over):
    spec = dict(model=tiny_model_config(vocab_size=128).to_dict(), optimizer=bench.rl_optimizer(), dtype="float32",
                seed=0, warmup=0, prompts=2, group_size=2, prompt_len=8, max_new_tokens=8, beta=0.0, loss_type="grpo",
                export_dir=str(tmp_path / "weights"), weights_dir=str(tmp_path / "weights"))
    spec.update(over)
    return spec


def test_loss_types_follow_loom_variants():
    from rl.train import VARIANTS

    assert set(bench.LOSS_TYPES) == set(VARIANTS)
    grpo = bench.trl_loss_options("grpo")
    assert grpo == dict(loss_type="grpo", importance_sampling_level="token", scale_rewards="group", epsilon=0.2,
                        epsilon_high=0.2)
    assert bench.trl_loss_options("dr_grpo")["scale_rewards"] == "none"
    assert bench.trl_loss_options("dapo")["epsilon_high"] == pytest.approx(0.28)
    gspo = bench.trl_loss_options("gspo")
    assert gspo["importance_sampling_level"] == "sequence" and gspo["epsilon"] == pytest.approx(3e-4)
    assert bench.reward([2, 3, 4, 5]) == 0.5


def test_loom_worker_runs_one_rl_step(tmp_path):
    runner = bench.LoomRlRunner(_spec(tmp_path, beta=0.04))
    assert (tmp_path / "weights" / "config.json").is_file()
    probe = runner.first_step()  # the probe, then the first (compiling) step
    assert probe < 0 and runner.info["probe_logp"] == probe
    first = runner.info["first_step"]
    assert first["logprob_gap"] < 1e-4  # sampler and trainer score the same tokens alike
    runner.run()
    last = runner.last
    assert last["total_s"] == pytest.approx(last["rollout_s"] + last["update_s"])
    assert 0 < last["score_s"] < last["update_s"]
    assert 0.0 <= last["reward_mean"] <= 1.0 and last["kl"] >= 0.0  # k3 after one update


def test_trl_peer_loads_the_same_model_and_steps(tmp_path):
    pytest.importorskip("trl")
    spec = _spec(tmp_path)
    loom = bench.LoomRlRunner(spec)
    peer = bench.TrlRunner(spec)
    try:
        assert peer.info["eos_token_ids"] == [128]  # outside the vocabulary: no completion ends early
        assert not peer.info["ref_model"]  # beta 0: TRL loads no reference
        assert peer.first_step() == pytest.approx(loom.probe(), rel=1e-5)
        o = peer.info["optimizer"]
        lr = bench.rl_optimizer()["lr"]  # configs/rl.py's grpo_arith learning rate
        assert o["weight_decay"] == [0.0] and o["lr"] == pytest.approx(lr) and o["betas"] == [0.9, 0.99]
        peer.run()  # the reward function and the generation wrapper assert 2 x 2 completions of 8 tokens
        assert 0 < peer.last["rollout_s"] < peer.last["total_s"]
    finally:
        peer.close()
    assert not peer.thread.is_alive()
