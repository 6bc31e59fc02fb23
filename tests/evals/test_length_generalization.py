"""evals/length_generalization.py: two schemes trained by `train.pretrain` (a test-sized model on
the embedded corpus) and scored at L, 2L and 4L; NoPE trains."""

import json
import math

import pytest

from configs.cli import ConfigError
from evals.length_generalization import PLOT_FILE, REPORT_FILE, run, run_overrides

SMALL = ["--config.model.hidden_size=32", "--config.model.intermediate_size=64", "--config.model.num_layers=1",
         "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.model.head_dim=16",
         "--config.train.batch_size=4", "--config.train.eval_every=8", "--config.train.log_every=2",
         "--config.train.eval_batches=1", "--config.optimizer.lr=1e-2"]


def test_two_schemes_trained_at_l_and_scored_at_l_2l_4l(tmp_path):
    report = run(tmp_path, schemes=["none", "learned"], train_len=16, steps=16, eval_sequences=2, overrides=SMALL)
    data = json.loads((tmp_path / REPORT_FILE).read_text())
    assert data["lengths"] == [16, 32, 64] and data["max_seq_len"] == 64 and data["pieces"] == 2
    for scheme in ("none", "learned"):
        ppl = data["perplexity"][scheme]
        assert sorted(ppl) == ["16", "32", "64"] and all(math.isfinite(v) and v > 1 for v in ppl.values())
        assert (tmp_path / scheme / "config.json").is_file()
    # NoPE trains on the embedded corpus: no RoPE, no table, the loss still falls
    none = data["runs"]["none"]
    assert none["final_eval_loss"] < none["initial_eval_loss"] - 0.4, none
    assert none["final_loss"] < none["first_loss"], none
    assert "--config.model.max_seq_len=64" in data["runs"]["learned"]["overrides"]  # a 4L table
    assert (tmp_path / PLOT_FILE).stat().st_size > 1000
    assert report.table().splitlines()[0].split() == ["model", "ppl@16", "ppl@32", "ppl@64"]


def test_overrides_and_errors():
    flags_ = run_overrides("sinusoidal", preset="tiny", train_len=128, steps=5, seed=0,
                           overrides=["--config.model.hidden_size=64"])
    assert "--config.model.embed_scale=8.0" in flags_ and "--config.model.max_seq_len=512" in flags_
    assert not any("embed_scale" in f for f in run_overrides("alibi", preset="tiny", train_len=128, steps=5, seed=0))
    with pytest.raises(ConfigError, match=r"schemes \['rotary'\] must be a non-empty list from \('rope', 'learned'"):
        run("unused", schemes=["rotary"])
    with pytest.raises(ConfigError, match="name a scheme twice"):
        run("unused", schemes=["alibi", "alibi"])
