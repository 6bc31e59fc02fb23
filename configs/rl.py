"""Policy-gradient RL presets: `python -m rl.train --config=configs/rl.py:<preset> --workdir=W`.

Presets:
  grpo_arith   GRPO (arXiv 2402.03300) on 1-digit addition from a briefly fine-tuned `tiny` model
               (the SFT run arith_lora stopped at 120 steps): the policy answers some sums and
               learns the rest from its own samples' exact-match rewards. With `init.workdir`
               missing and `init.build` = "arith", the run first builds that start point in
               `init.workdir` (a `tiny` pretraining run beside it, then the short SFT run).
  ppo_arith    the same task with PPO (arXiv 1707.06347, as RLHF runs it: 2203.02155): a value
               head on the policy's trunk, GAE, clipped policy and value losses, KL as a
               per-token reward penalty.

`rl.algorithm` picks the advantage estimator and the defaults of the loss: reinforce (r - batch
mean), rloo (leave-one-out baseline, 2402.14740), grpo (group-normalised, 2402.03300), ppo (GAE
with a value head, `rl.ppo`); `rl.loss`
names a GRPO variant: grpo (sequence mean), dr_grpo (2503.20783: no std or length
normalisation), dapo (2503.14476: clip-higher 0.2 / 0.28, token mean), gspo (2507.18071:
sequence-level ratio, clip 3e-4 / 4e-4). Every field below overrides the variant's choice when
set. KL to the reference (the start point; the base without adapters under LoRA): `rl.kl.beta`,
`rl.kl.estimator` (k1 / k2 / k3), `rl.kl.mode` ("loss": a loss term; "reward": -beta * sum k1
per sequence in the reward); with beta 0 the KL is still logged.
"""

from ml_collections import config_dict
from ml_collections.config_dict import placeholder

from configs import pretrain, sft

PRESETS = ("grpo_arith", "ppo_arith")
ALGORITHMS = ("reinforce", "rloo", "grpo", "ppo")
LOSSES = ("grpo", "dr_grpo", "dapo", "gspo")


def get_config(arg=None):
    preset = arg or "grpo_arith"
    if preset not in PRESETS:
        raise ValueError(f"unknown rl preset {preset!r}; valid presets: {PRESETS}")
    c = config_dict.ConfigDict()
    c.name = preset

    c.init = config_dict.ConfigDict(dict(
        workdir="runs/grpo_arith_start/sft",  # the policy's start: an SFT run (any Loom workdir)
        hf_dir="",
        step=placeholder(int),
        build="arith",  # "arith": build a missing init.workdir (tiny pretraining, then arith_lora for 120 steps)
        how=("grpo_arith starts from a short arith_lora run; with init.build='arith' it builds one in "
             "init.workdir; or pass --config.init.workdir=<an SFT workdir>"),
    ))
    c.peft = sft.get_config("arith_lora").peft  # method full | lora | qlora (the trained part of the policy)
    c.peft.lora.dropout = 0.0  # the trainer must score exactly what the sampler sampled
    c.model = config_dict.ConfigDict(dict(dtype="float32", param_dtype=placeholder(str)))

    c.data = config_dict.ConfigDict(dict(
        task="addition",  # a data/synthetic.py task: prompts and exact answers
        size=1,
        num_examples=1000,  # training prompts drawn: 1-digit addition has 100, and 1000 draws hold all of them
        eval_examples=200,  # held-out prompts answered greedily at step 0 and at the end (eval_accuracy)
    ))

    c.rl = config_dict.ConfigDict(dict(
        algorithm="grpo" if preset == "grpo_arith" else "ppo",  # reinforce | rloo | grpo | ppo
        loss="grpo",  # grpo | dr_grpo | dapo | gspo (the GRPO variants; rloo / reinforce set their own)
        group_size=8,  # G samples per prompt
        prompts_per_step=8,  # P prompts per rollout batch (P * G rows)
        max_new_tokens=6,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        epochs=1,  # optimisation epochs (updates) per rollout batch
        microbatches=1,
        # the variant's choices, overridable one by one (unset: the variant's)
        advantage=placeholder(str),  # grpo | dr_grpo | rloo | reinforce
        aggregation=placeholder(str),  # sequence_mean | token_mean | constant | sequence_sum
        level=placeholder(str),  # token | sequence | sequence_token | trajectory
        clip_low=placeholder(float),
        clip_high=placeholder(float),
        dynamic_sampling=placeholder(bool),  # DAPO: groups whose rewards are all equal get no loss
        overlong_cache=0,  # DAPO's soft overlong penalty over the last N of max_new_tokens (0: off)
        kl=config_dict.ConfigDict(dict(beta=0.0, estimator="k3", mode="loss")),
        # PPO (rl.algorithm="ppo"): a value head on the policy's trunk, GAE over the completion tokens
        ppo=config_dict.ConfigDict(dict(
            gamma=1.0,  # discount per token (RLHF's usual 1: the score arrives at the last token)
            lam=0.95,  # GAE's lambda
            value_coef=0.1,  # weight of the value loss beside the policy loss (TRL's vf_coef)
            value_clip=0.2,  # clip of V - V_old in the value loss (TRL's cliprange_value); 0: unclipped
            whiten=True,  # advantages whitened over the rollout batch's tokens
        )),
    ))
    if preset == "ppo_arith":  # PPO's KL: a per-token reward penalty (InstructGPT), k1 on the sampled tokens
        c.rl.kl.update(beta=0.0, mode="reward", estimator="k1")
    # kind exact | gsm8k | format | model (a reward model: `python -m rl.reward`'s run in reward.workdir)
    c.reward = config_dict.ConfigDict(dict(kind="exact", pattern="", format_weight=0.0, workdir=""))

    c.train = config_dict.ConfigDict(dict(
        steps=200,
        seed=0,
        log_every=10,
        eval_every=50,  # eval_accuracy at step 0, every 50 steps and at the end
        checkpoint_every=20,
        keep_checkpoints=2,
        async_checkpoint=True,
        nan_policy="skip",
        nan_max_skips=10,
        z_loss=0.0,
    ))
    shared = pretrain.get_config("tiny")
    c.optimizer = shared.optimizer
    # measured on grpo_arith (150 steps from the 120-step SFT start, greedy 0.355): 5e-4 climbs
    # steadily (0.36, 0.395, 0.47 at steps 50 / 100 / 150), 1e-3 as far but noisier (0.315, 0.355,
    # 0.47); 2e-3 and 3e-3 collapse the sample accuracy from a weaker start
    c.optimizer.lr = 5e-4
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 0.0
    c.optimizer.b2 = 0.99
    c.mesh = shared.mesh
    c.distributed = shared.distributed
    return c
