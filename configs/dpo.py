"""Direct preference optimisation presets: `python -m rl.dpo --config=configs/dpo.py:<preset> --workdir=W`.

Presets: arith_dpo (LoRA, the sigmoid loss), arith_ipo, arith_simpo and arith_dpo_full (full
fine-tuning against a frozen copy of the base) teach a base to prefer the right answer of 1-digit
additions over a near miss (synthetic preference pairs, data/preferences.py; a base pretrained on
code has no preference between them). chat reads one JSONL source of pairs in the UltraFeedback
(`prompt`, `chosen`, `rejected` message lists) or HH-RLHF shape
(`--config.data.sources.chat.path=pairs.jsonl`) and holds out 5% of it. A base comes from
`--config.init.workdir` (a Loom workdir: pretraining, SFT, `models.hf import` output) or
`--config.init.hf_dir`; the data fields are configs/reward.py's. Override any field from the
command line.
"""

from ml_collections import config_dict

from configs import reward

PRESETS = ("arith_dpo", "arith_ipo", "arith_simpo", "arith_dpo_full", "chat")


def get_config(arg=None):
    preset = arg or "arith_dpo"
    if preset not in PRESETS:
        raise ValueError(f"unknown dpo preset {preset!r}; valid presets: {PRESETS}")
    method = "full" if preset == "arith_dpo_full" else "lora"
    loss = {"arith_ipo": "ipo", "arith_simpo": "simpo"}.get(preset, "dpo")
    c = config_dict.ConfigDict()
    c.name = preset  # the default workdir is runs/<name>
    # LoRA on every projection and the output head (a briefly pretrained base's head separates the
    # answer tokens poorly, as for SFT); with tied embeddings "lm_head" selects nothing
    reward.base_sections(c, method, lr=1e-4 if method == "full" else 1e-3,
                         targets=("q", "k", "v", "o", "gate", "up", "down", "lm_head"))
    c.peft.lora.dropout = 0.0  # dropout would make the policy differ from the reference at the first step
    c.data = reward.preference_data(chat=preset == "chat")
    c.dpo = config_dict.ConfigDict(dict(
        loss=loss,  # "dpo" (sigmoid, Rafailov et al. 2023) | "ipo" (Azar et al. 2023) | "simpo" (Meng et al. 2024)
        beta={"simpo": 2.0}.get(loss, 0.1),  # β: inverse temperature of the implicit reward (IPO: target 1 / (2β))
        label_smoothing=0.0,  # dpo / simpo: ε, the share of labels assumed flipped (cDPO); 0 = off
        simpo_gamma=1.0,  # simpo: the target reward margin γ
    ))
    c.train = reward.train_section(
        eval_examples=64,  # synthetic held-out prompts answered greedily (eval_answer_accuracy); 0 = off
        sample_tokens=8,  # tokens generated for each of them
    )
    if preset == "chat":
        c.train.eval_examples = 0
        c.train.sample_tokens = 64
    return c
