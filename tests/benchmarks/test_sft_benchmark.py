"""benchmarks/sft.py on a tiny model: the abstract memory section's figures are consistent with the
methods (what trains, what is frozen, NF4's bits per weight), and the peer starts from Loom's
weights so both compute the same LoRA step. No timing."""

import types

import pytest

from benchmarks import sft
from tests.helpers import tiny_model_config

# head_dim 16 and widths of 64 / 128: every projection's input splits into NF4 blocks of 64
MODEL = tiny_model_config(hidden_size=64, intermediate_size=128, head_dim=16, dtype="bfloat16").to_dict()


def test_memory_figures_follow_the_methods():
    from models.config import param_count

    cases = {name: sft.memory_case(MODEL, name, batch=2, seq=16) for name in ("full", "lora", "qlora", "prefix")}
    full, lora, qlora, prefix = cases["full"], cases["lora"], cases["qlora"], cases["prefix"]
    n = param_count(sft.method_config(MODEL, "full"))
    assert full["trained_parameters"] == full["base_parameters"] == n and full["frozen_bytes"] == 0
    # LoRA r=16 on q k v o gate up down of 2 layers: r * (in + out) per projection
    d, f, nh, kv, hd = 64, 128, 4, 2, 16
    per_layer = 16 * ((d + nh * hd) + 2 * (d + kv * hd) + (nh * hd + d) + 2 * (d + f) + (f + d))
    assert lora["trained_parameters"] == qlora["trained_parameters"] == 2 * per_layer
    assert lora["frozen_bytes"] == prefix["frozen_bytes"] == 4 * n  # the whole base, float32
    length = sft.METHODS["prefix"]["prefix"]["length"]
    assert prefix["trained_parameters"] == 2 * length * 2 * kv * hd  # keys and values per layer
    for c in cases.values():  # AdamW: two float32 moments per trained weight (+ a count per transform)
        assert 2 * c["trained_bytes"] <= c["opt_state_bytes"] <= 2 * c["trained_bytes"] + 64
        x = c["xla"]
        assert x["argument_size_in_bytes"] >= c["trained_bytes"] + c["opt_state_bytes"] + c["frozen_bytes"]
        assert c["xla_bytes"] > 0
    assert qlora["dtype"] == "bfloat16" and qlora["frozen_bytes"] < lora["frozen_bytes"] / 2
    assert full["xla_bytes"] > lora["xla_bytes"]

    bf16, nf4, dq = (sft.frozen_base_case(MODEL, s) for s in ("bf16", "nf4", "nf4_dq"))
    weights = bf16["projection_bytes"] / 2
    assert bf16["rest_bytes"] == nf4["rest_bytes"] == dq["rest_bytes"]
    assert 8 * nf4["projection_bytes"] / weights == pytest.approx(4.5)  # 4 bits + a float32 absmax per 64
    assert 4.125 < 8 * dq["projection_bytes"] / weights < 4.5  # 8-bit absmaxes (+ their scales and means)


@pytest.mark.slow  # spawns the torch peer; the benchmark itself checks the same losses every run
def test_the_peer_starts_from_loom_weights_and_computes_the_same_step(tmp_path):
    pytest.importorskip("peft")
    args = types.SimpleNamespace(warmup=1, dtype="float32", no_peer=False, torch_modes="eager",
                                 compile_mode="default")
    cfg = {"model": tiny_model_config(vocab_size=128).to_dict(), "batch": 2, "seq": 16}
    specs = sft.step_specs(args, cfg, ["lora"], str(tmp_path))
    assert list(specs) == ["loom lora", "peft lora eager"]
    loom = sft.SftRunner(specs["loom lora"])
    peer = sft.PeftRunner(specs["peft lora eager"])
    assert peer.info["same_init"]  # the base and Loom's adapters, exported and loaded by peft
    assert peer.info["trained_parameters"] == loom.info["trained_parameters"]
    for r in (loom, peer):
        r.info["loss0"] = r.first_step()
        r.run()  # its loss is the loss after one AdamW update of the adapters
    for key in ("loss0", "loss1"):
        assert peer.info[key] == pytest.approx(loom.info[key], rel=1e-5), key
    assert loom.info["loss1"] < loom.info["loss0"] - 1e-3  # the update changed the function
