"""The on-disk layout of a run's parameters, readable without importing `train/`.

A workdir holds `config.json` (the resolved config) and `checkpoints/<step>/` written by orbax's
CheckpointManager with the items
  params       the model parameters (nested dict of arrays)       <- this module reads it
  train_state  step, optimizer state and RNG                      <- train/checkpoint.py
  data_iter    the grain iterator state                           <- train/checkpoint.py
so inference, evals and the Hugging Face converter load a run with `load(workdir)`.

A fine-tuning run with adapters (`peft.method` lora / qlora / prefix in its config.json) saves only
the adapters (or prefixes) as `params`; `load` rebuilds its model from the run's base
(`init.workdir`, itself any workdir, or `init.hf_dir`), the same adapters and the saved weights.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any, Callable, Iterable, TypeVar

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from models.config import ModelConfig

CHECKPOINTS = "checkpoints"
PARAMS = "params"
CONFIG_FILE = "config.json"
T = TypeVar("T")


def checkpoints_dir(workdir: str | pathlib.Path) -> pathlib.Path:
    return pathlib.Path(workdir).resolve() / CHECKPOINTS


def read_run_config(workdir: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(workdir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {workdir} a Loom workdir?")
    return json.loads(path.read_text())


def _steps(ckpt_dir: pathlib.Path) -> list[int]:
    """Committed steps, newest first (orbax writes to a temporary name and renames on commit)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


def committed_steps(workdir: str | pathlib.Path) -> list[int]:
    """A workdir's committed checkpoint steps, oldest first (read without creating anything)."""
    return sorted(_steps(checkpoints_dir(workdir)))


class UnreadableCheckpoint(RuntimeError):
    """No checkpoint asked for could be restored; the message names each one and why (one line each)."""


def restore_newest(steps: Iterable[int], restore: Callable[[int], T], *, where) -> tuple[T, int]:
    """(restore(step), step) for the newest of `steps` that restores.

    The one fall-back loop of Loom's checkpoints (params here, the whole train state in
    train/checkpoint.py): a step that fails to restore (a truncated or corrupted checkpoint; any
    exception) is reported and the previous one is tried; RuntimeError naming every failure
    when none restores.
    """
    errors = []
    ordered = sorted(steps, reverse=True)
    for i, step in enumerate(ordered):
        try:
            return restore(step), step
        except Exception as e:  # noqa: BLE001  (any failure: fall back to the previous step)
            reason = failure_reason(e)
            if i + 1 < len(ordered):
                logging.warning("checkpoint at step %d in %s is unreadable (%s); trying the previous one",
                                step, where, reason)
            errors.append(f"step {step}: {reason}")
    raise UnreadableCheckpoint(f"no readable checkpoint in {where} (delete the unreadable ones to start afresh): "
                               + "; ".join(errors or ["no committed steps"]))


def failure_reason(e: BaseException, limit: int = 240) -> str:
    """`Type: first line` of an exception, without TensorStore's JSON spec dump, at most `limit` chars."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" [tensorstore_spec", 1)[0]
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _restore_item(path: pathlib.Path, target):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target) if target is not None else ckptr.restore(path)


def _step_of(step_dir: pathlib.Path) -> int | None:
    return int(step_dir.name) if step_dir.name.isdigit() else None


def restore_params(workdir_or_path: str | pathlib.Path, *, step: int | None = None, target=None):
    """(params, step) from a workdir (its newest readable step, or `step`), a step directory or a
    params directory; `step` is the one loaded (None for a params directory outside a step's).

    `target` is a pytree of `jax.ShapeDtypeStruct`s with shardings (arrays land on those devices);
    None restores onto the default device. In a workdir, a step whose params fail to load (a
    truncated or corrupted checkpoint) is reported and the previous one is used (`restore_newest`).
    """
    path = pathlib.Path(workdir_or_path).resolve()
    if (path / CHECKPOINTS).is_dir():
        path = path / CHECKPOINTS
    steps = _steps(path)
    if not steps and path.name == CHECKPOINTS:
        raise FileNotFoundError(f"no committed checkpoints in {path}")
    if steps or step is not None:
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no checkpoint for step {step} in {path}; found steps {sorted(steps)}")
            steps = [step]
        return restore_newest(steps, lambda s: _restore_item(path / str(s) / PARAMS, target), where=path)
    if (path / PARAMS).is_dir():  # one step's directory
        return _restore_item(path / PARAMS, target), _step_of(path)
    if path.is_dir():  # a params item itself
        return _restore_item(path, target), _step_of(path.parent)
    raise FileNotFoundError(f"{path} is neither a workdir, a checkpoints directory nor a params checkpoint")


def save_params(path: str | pathlib.Path, params) -> None:
    """Writes params alone (e.g. an imported Hugging Face model) in the layout `restore_params` reads."""
    path = pathlib.Path(path).resolve()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params, force=True)


def is_reward_model_run(run: dict[str, Any]) -> bool:
    """Whether a run's config is a `python -m rl.reward` run's: a `reward` section and no `rl` one
    (the policy loop's config has both: its `reward` names the policy's reward)."""
    return "reward" in run and "rl" not in run


def load(workdir: str | pathlib.Path, *, step: int | None = None, mesh=None, rules=None,
         return_step: bool = False):
    """(model, model_config) of a run: its `config.json` model section and the params of its newest
    readable step (or `step`); with `return_step=True`, (model, model_config, the step loaded)."""
    from models.transformer import abstract_params_and_shardings, merge_params

    run = read_run_config(workdir)
    if is_reward_model_run(run):  # a scalar head on the decoder, not a language model
        raise ValueError(f"{workdir} is a reward model run (python -m rl.reward): load it with "
                         "rl.reward_model.load_reward_model")
    if (run.get("peft") or {}).get("method", "full") != "full":
        return _load_adapted(workdir, run, step=step, return_step=return_step)
    # a pipelined run's model is the same model: loaded for evaluation or decoding, it runs unpipelined
    cfg = ModelConfig.from_dict(run["model"]).replace(pipeline_stages=1)
    graphdef, abs_params, shardings = abstract_params_and_shardings(cfg, mesh, rules)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abs_params, shardings)
    target, policy = _policy_target(run, target, cfg, mesh)
    params, loaded = restore_params(workdir, step=step, target=target)
    model = merge_params(graphdef, policy(params))
    return (model, cfg, loaded) if return_step else (model, cfg)


def load_base(init: dict[str, Any], cfg: ModelConfig | None = None):
    """(model, config) of a fine-tuning run's base: `init.workdir` (any Loom workdir, at
    `init.step` or its newest; a LoRA / QLoRA run's adapters merged into its weights) or
    `init.hf_dir` (a Hugging Face directory). With `cfg` (the run's
    model config: the base's shape with its own dtypes), the parameters are cast to
    `cfg.param_dtype` and the model computes in `cfg.dtype`."""
    from models.transformer import abstract_model, merge_params, split_params

    if init.get("workdir"):
        model, base_cfg = load(init["workdir"], step=init.get("step"))
    elif init.get("hf_dir"):
        from models import hf

        model, base_cfg = hf.load(init["hf_dir"])
    else:
        raise ValueError("init.workdir and init.hf_dir are both unset: name the base model to fine-tune")
    model = _merged(model, init)
    if cfg is None:
        return model, base_cfg
    cfg = cfg.replace(pipeline_stages=1)
    graphdef, _ = split_params(abstract_model(cfg))
    params = jax.tree.map(lambda x: x.astype(cfg.params_dtype), split_params(model)[1])
    return merge_params(graphdef, params), cfg


def _merged(model, init: dict[str, Any]):
    """A base that is itself a fine-tuning run, as plain weights: LoRA / QLoRA adapters merged
    (W + scale A B); a prefix-tuned run is refused (its prefixes are attention inputs, no weights)."""
    from models.lora import merge_lora
    from models.prefix import PrefixAttention

    if isinstance(model.layers.attn, PrefixAttention):
        raise ValueError(f"init.workdir={init.get('workdir')!r} is a prefix-tuning run: its prefixes cannot be merged "
                         "into weights, so it cannot be a base; start from its own base (its init.workdir)")
    from flax import nnx

    from models.lora import LoraParam

    return merge_lora(model) if nnx.state(model, LoraParam) else model


def _load_adapted(workdir, run: dict[str, Any], *, step, return_step: bool):
    from flax import nnx

    from models import peft

    cfg = ModelConfig.from_dict(run["model"]).replace(pipeline_stages=1)
    base, cfg = load_base(run["init"], cfg)
    model = peft.apply(base, run["peft"], seed=int((run.get("train") or {}).get("seed", 0)))
    graphdef, trained, frozen = nnx.split(model, peft.trainable_filter(run["peft"]["method"]), ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nnx.to_pure_dict(trained))
    target, policy = _policy_target(run, target, cfg, None)
    params, loaded = restore_params(workdir, step=step, target=target)
    model = nnx.merge(graphdef, policy(params), frozen)
    return (model, cfg, loaded) if return_step else (model, cfg)


def _policy_target(run: dict[str, Any], target, cfg: ModelConfig, mesh):
    """(restore target, params -> the policy's params). A PPO run (`python -m rl.train` with
    rl.algorithm='ppo') checkpoints its policy under `decoder` beside its value head's `head` (a
    float32 [D] kernel and a bias); loaded as a language model, the policy is read and the head
    left behind. Other runs: the target as it is."""
    if (run.get("rl") or {}).get("algorithm") != "ppo":
        return target, lambda params: params
    sharding = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()) if mesh is not None
                else jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    head = {"kernel": jax.ShapeDtypeStruct((cfg.hidden_size,), jnp.float32, sharding=sharding),
            "bias": jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding)}
    return {"decoder": target, "head": head}, lambda params: params["decoder"]
