"""The learning rate of `tiny`: three runs of 200 steps (about 2.5 minutes each on 2 CPU cores).

    python -m experiments.sweep --sweep=lr
"""


def get_sweep():
    return dict(program="train.pretrain", config="configs/pretrain.py:tiny",
                fixed={"train.steps": 200, "train.eval_every": 50},
                grid={"optimizer.lr": [1e-3, 3e-3, 1e-2]},
                metric="eval_loss", goal="min")
