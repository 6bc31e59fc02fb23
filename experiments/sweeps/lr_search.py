"""An Optuna search over `tiny`'s learning rate and warmup (pruned on the held-out loss).

    python -m experiments.sweep --sweep=lr_search --search=optuna --trials=12
"""


def get_sweep():
    return dict(program="train.pretrain", config="configs/pretrain.py:tiny",
                fixed={"train.steps": 120},
                optuna={"optimizer.lr": (3e-4, 3e-2, "log"), "optimizer.warmup_fraction": (0.0, 0.2, "linear")},
                metric="eval_loss", goal="min", seed=0)
