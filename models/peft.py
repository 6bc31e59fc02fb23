"""Parameter-efficient fine-tuning methods on a base model, by the SFT config's `peft` section.

    full    every parameter trained (the model as it is)
    lora    LoRA adapters on the projections `peft.lora.targets` select (models/lora.py)
    qlora   the base's layer projections in NF4 (models/quant.py) with LoRA adapters on top
    prefix  trained key/value prefixes in every attention layer (models/prefix.py), the base frozen

`apply(model, peft)` returns the model the run trains; `trainable_filter(method)` the NNX filter
of what it trains (`nnx.split(model, filter, ...)`: trained state first, frozen second).
"""

from __future__ import annotations

from typing import Any

from flax import nnx

METHODS = ("full", "lora", "qlora", "prefix")


def check(peft: dict[str, Any]) -> None:
    """ValueError naming a bad `peft` value and what is valid."""
    method = peft.get("method")
    if method not in METHODS:
        raise ValueError(f"peft.method={method!r} is not valid; expected one of {METHODS}")
    if method in ("lora", "qlora"):
        lora = peft.get("lora") or {}
        if int(lora.get("rank", 0)) < 1:
            raise ValueError(f"peft.lora.rank={lora.get('rank')} is not valid; expected an integer >= 1")
        if not 0.0 <= float(lora.get("dropout", 0.0)) < 1.0:
            raise ValueError(f"peft.lora.dropout={lora.get('dropout')} is not valid; expected 0 <= dropout < 1")
        if not lora.get("targets"):
            raise ValueError("peft.lora.targets is empty; name projections, e.g. ('q', 'k', 'v', 'o')")
    if method == "qlora":
        bs = int((peft.get("qlora") or {}).get("block_size", 64))
        if bs < 2 or bs % 2:
            raise ValueError(f"peft.qlora.block_size={bs} is not valid; expected an even integer >= 2")
    if method == "prefix":
        prefix = peft.get("prefix") or {}
        length, reparam = prefix.get("length"), prefix.get("reparam", 0)
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"peft.prefix.length={length!r} is not valid; expected an integer >= 1 (virtual tokens "
                             "per layer)")
        if isinstance(reparam, bool) or not isinstance(reparam, int) or reparam < 0:
            raise ValueError(f"peft.prefix.reparam={reparam!r} is not valid; expected 0 (plain prefixes) or the "
                             "width of the reparameterisation MLP")


def apply(model, peft: dict[str, Any], *, seed: int = 0):
    """The model to train: `model` itself (full), or a copy with adapters (lora, qlora) or prefixes."""
    from models.lora import apply_lora
    from models.prefix import apply_prefix
    from models.quant import quantize_base

    check(peft)
    method = peft["method"]
    if method == "full":
        return model
    if method == "prefix":
        return apply_prefix(model, length=int(peft["prefix"]["length"]), reparam=int(peft["prefix"].get("reparam", 0)),
                            seed=seed)
    if method == "qlora":
        q = peft.get("qlora") or {}
        model = quantize_base(model, block_size=int(q.get("block_size", 64)),
                              double_quant=bool(q.get("double_quant", False)))
    lora = peft["lora"]
    targets = lora["targets"]
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    return apply_lora(model, rank=int(lora["rank"]), alpha=float(lora["alpha"]), targets=targets,
                      dropout_rate=float(lora.get("dropout", 0.0)), rslora=bool(lora.get("rslora", False)),
                      seed=seed)


def trainable_filter(method: str):
    """What a method trains, as an NNX filter: every Param (full), the adapters (lora, qlora) or the
    prefixes (prefix)."""
    from models.lora import LoraParam
    from models.prefix import PrefixParam

    return {"full": nnx.Param, "prefix": PrefixParam}.get(method, LoraParam)
