"""PEFT adapter directories in and out (LoRA, and prefix tuning at the end of this module): what
`peft.PeftModel.from_pretrained(base, DIR)` loads and `PeftModel.save_pretrained(DIR)` writes.

    save_adapter(model, "adapter/", architecture="LlamaForCausalLM", rslora=False)   # its LoraKernels
    model = load_adapter(base_model, "adapter/")    # a copy of a Loom model with the adapter's LoraKernels
    export_adapter("runs/sft", "adapter/")           # a LoRA / QLoRA SFT run (models.hf export --adapter_only)

A directory holds `adapter_config.json` (peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha,
use_rslora, lora_dropout, target_modules, ...) and `adapter_model.safetensors` with, per adapted
`torch.nn.Linear` of the transformers model, `base_model.model.<module>.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r] (the module "model.layers.3.self_attn.q_proj", "lm_head"); the
module adds scale * B A x, scale = lora_alpha / r (/ sqrt(r) with rsLoRA), as Loom's LoraKernel
does with A: [in..., r], B: [r, out...]. Which Loom projection is which module, and how its
dims flatten (heads head-major, N*H), comes from the Hugging Face mapping (`families.param_sources`):
the adapter of a projection is laid out as that projection's weight is, with the rank in place of
the other side. No RoPE permutation is involved: Loom uses transformers' rotate-half layout.

Supported: the families whose projections are `nn.Linear` (Llama, Mistral, Qwen2, Qwen3, Gemma,
Gemma 2), adapters on any of q, k, v, o, gate, up, down and an untied lm_head, on all layers or
some (`layers_to_transform`, or a `target_modules` regex that names layers: the other layers get
zero adapters). Refused with a message naming the option: DoRA, `modules_to_save`, per-module
ranks (`rank_pattern` / `alpha_pattern`), adapter biases, initialisations that change the base
weights (PiSSA, OLoRA, CorDA, LoftQ), embedding adapters and any tensor not named above.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import re
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.hf.families import ARCHITECTURES, infer_architecture, param_sources
from models.hf.safetensors_io import SafetensorsReader, write_safetensors
from models.lora import LoraKernel, apply_lora, scaling
from models.projection import F32, Einsum

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."  # PeftModel's own prefix; keys without it load as nothing (with a warning)
_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|base_layer\.weight)")

# adapter_config.json fields whose non-empty values change what the adapter computes and that we do not read
_REFUSED = {
    "use_dora": "DoRA (use_dora) is not supported",
    "modules_to_save": "modules_to_save (fully trained extra modules) is not supported",
    "rank_pattern": "per-module ranks (rank_pattern) are not supported",
    "alpha_pattern": "per-module alphas (alpha_pattern) are not supported",
    "lora_bias": "adapter biases (lora_bias) are not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D weights, GPT-2) is not supported",
    "layer_replication": "layer_replication is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "target_parameters": "target_parameters (adapters on raw parameters, MoE experts) are not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "megatron_config": "Megatron-sharded adapters (megatron_config) are not supported",
}
# initialisations that leave the base weights as they are (the others rewrite them: the adapter fits
# only the rewritten base, unless peft converted it on save with path_initial_model_for_weight_conversion)
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


# --------------------------------------------------------------------------------------------
# Loom projection <-> transformers Linear module


def adapter_modules(cfg, architecture: str) -> dict[tuple[str, ...], tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """Loom projection path ("layers", "attn", "q") -> (the transformers module name, "{i}" for
    the layer: "model.layers.{i}.self_attn.q_proj"; its input dims; its output dims), in Loom's
    order (the weight is [*in, *out], transformers' [prod(out), prod(in)])."""
    out = {}
    for path, src in param_sources(cfg, architecture).items():
        if path[-1] != "kernel" or src.permute is not None:
            continue  # rows reordered on import (DeepSeek's RoPE): a PEFT adapter would need them reordered too
        o = src.perm[-1] + 1  # a torch Linear: view (*out, *in), ours (*in, *out)
        i = len(src.view) - o
        in_dims, out_dims = src.view[o:], src.view[:o]
        linear = (i >= 1 and src.select is None and src.perm == tuple(range(o, o + i)) + tuple(range(o))
                  and src.shape == (math.prod(out_dims), math.prod(in_dims)))
        if not linear:
            raise ValueError(f"{architecture}: {src.name} is not a torch Linear weight [out, in] (GPT-2's Conv1D "
                             f"and fused c_attn): PEFT LoRA adapters are supported for "
                             f"{', '.join(a for a in ARCHITECTURES if a != 'GPT2LMHeadModel')}")
        out[path[:-1]] = (src.name.removesuffix(".weight"), tuple(in_dims), tuple(out_dims))
    return out


def _stacks(cfg) -> dict[str, tuple[int, ...]]:
    """Stacked parameters' first path key -> the global layer of each row (an MoE model stacks
    its dense-MLP and MoE layers apart: models.transformer.layer_stacks)."""
    from models.transformer import layer_stacks

    return layer_stacks(cfg)


def _module_names(modules, cfg) -> dict[str, tuple[tuple[str, ...], int | None]]:
    """Concrete transformers module name -> (Loom projection path, row of its stack or None)."""
    names = {}
    stacks = _stacks(cfg)
    for path, (name, _, _) in modules.items():
        if path[0] in stacks:
            names.update({name.format(i=layer): (path, row) for row, layer in enumerate(stacks[path[0]])})
        else:
            names[name] = (path, None)
    return names


# --------------------------------------------------------------------------------------------
# Writing


def save_adapter(model, out: str | os.PathLike, *, architecture: str, lora_alpha: float | None = None,
                 rslora: bool = False, dropout: float = 0.0, base_model_name_or_path: str | None = None,
                 dtype=None) -> dict[str, Any]:
    """Writes the LoRA adapters of `model` (its LoraKernels) as a PEFT adapter directory for the
    transformers `architecture` and returns the adapter config written.

    Every adapted projection must share one rank and one scale. `lora_alpha` (default: the one
    the scale implies, scale * r, or scale * sqrt(r) with `rslora`) must give that scale. `dtype`:
    the stored dtype (default: the adapters' own). ValueError when the model has no adapters, or
    adapters PEFT's LoRA format cannot express.
    """
    cfg = model.config
    modules = adapter_modules(cfg, architecture)
    kernels = {tuple(map(str, p)): m.kernel for p, m in nnx.iter_modules(model)
               if isinstance(m, Einsum) and isinstance(m.kernel, LoraKernel)}
    if not kernels:
        raise ValueError("the model has no LoRA adapters to write (models.lora.apply_lora adds them)")
    unknown = sorted("/".join(p) for p in kernels if p not in modules)
    if unknown:
        raise ValueError(f"adapted projections {unknown} have no {architecture} module a PEFT adapter can hold "
                         f"(those whose rows the importer reorders, DeepSeek's q / q_b / kv_a, are not exported); "
                         f"adaptable: {sorted('/'.join(p) for p in modules)}")
    ranks = {int(k.a[...].shape[-1]) for k in kernels.values()}
    scales = {k.scale for k in kernels.values()}
    if len(ranks) > 1 or len(scales) > 1:
        raise ValueError(f"the adapters have ranks {sorted(ranks)} and scales {sorted(scales)}: a PEFT adapter "
                         "directory here holds one rank and one alpha")
    (rank,), (scale,) = ranks, scales
    alpha = scale * (math.sqrt(rank) if rslora else rank) if lora_alpha is None else float(lora_alpha)
    if not math.isclose(scaling(rank, alpha, rslora), scale, rel_tol=1e-6):
        raise ValueError(f"lora_alpha={alpha} with r={rank}{' and rsLoRA' if rslora else ''} gives the scale "
                         f"{scaling(rank, alpha, rslora)}, but the adapters' scale is {scale}")
    alpha = int(alpha) if float(alpha).is_integer() else alpha

    tensors = []
    stacks = _stacks(cfg)
    for path, kernel in kernels.items():
        name, in_dims, out_dims = modules[path]
        a, b = np.asarray(kernel.a[...]), np.asarray(kernel.b[...])
        np_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else a.dtype
        stack = stacks.get(path[0])
        layers = [(name.format(i=stack[i]), a[i], b[i]) for i in range(a.shape[0])] if stack else [(name, a, b)]
        for module, a_i, b_i in layers:
            lora_a = a_i.reshape(math.prod(in_dims), rank).T  # [r, in]
            lora_b = b_i.reshape(rank, math.prod(out_dims)).T  # [out, r]
            for part, x in (("lora_A", lora_a), ("lora_B", lora_b)):
                tensors.append((f"{KEY_PREFIX}{module}.{part}.weight", x.shape, np_dtype,
                                lambda x=x, d=np_dtype: x.astype(d)))
    tensors.sort(key=lambda t: (_layer_of(t[0]), t[0]))  # layer by layer, as peft writes them
    target_modules = sorted({modules[p][0].rsplit(".", 1)[-1] for p in kernels})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "use_rslora": bool(rslora), "lora_dropout": float(dropout),
        "target_modules": target_modules, "bias": "none", "fan_in_fan_out": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True, "revision": None,
    }
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, tensors, max_shard_bytes=2**62, single_file=ADAPTER_WEIGHTS)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def _layer_of(key: str) -> int:
    m = re.search(r"\.layers\.(\d+)\.", key)
    return int(m.group(1)) if m else 1 << 30


# --------------------------------------------------------------------------------------------
# Reading


def adapter_type(adapter_dir: str | os.PathLike) -> str | None:
    """The `peft_type` of a PEFT adapter directory ("LORA", "PREFIX_TUNING", ...)."""
    file = pathlib.Path(adapter_dir) / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: is {adapter_dir} a PEFT adapter directory?")
    return json.loads(file.read_text()).get("peft_type")


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """adapter_config.json of a PEFT LoRA adapter directory, checked: ValueError naming an
    option this module does not read (see the module docstring)."""
    adapter_dir = pathlib.Path(adapter_dir)
    file = adapter_dir / ADAPTER_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: is {adapter_dir} a PEFT adapter directory?")
    config = json.loads(file.read_text())
    where = str(file)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type={config.get('peft_type')!r}; only LoRA adapters (\"LORA\") are supported "
                         "here (prefix-tuning ones load through load_adapter)")
    if config.get("task_type") not in ("CAUSAL_LM", None):
        raise ValueError(f"{where}: task_type={config['task_type']!r}; expected \"CAUSAL_LM\" (a decoder's LM head)")
    refused = [why for field, why in _REFUSED.items() if config.get(field)]
    if config.get("bias", "none") != "none":
        refused.append(f"bias={config['bias']!r} (trained biases) is not supported")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        refused.append(f"init_lora_weights={init!r} is not supported (PiSSA, OLoRA, CorDA and LoftQ rewrite the base "
                       "weights, so the adapter fits only the rewritten base: save it with peft's "
                       "path_initial_model_for_weight_conversion to get a plain LoRA)")
    if refused:
        raise ValueError(f"{where}: " + "; ".join(refused))
    if not int(config.get("r") or 0) >= 1:
        raise ValueError(f"{where}: r={config.get('r')!r}; expected an integer >= 1")
    if not config.get("target_modules"):
        raise ValueError(f"{where}: target_modules is empty")
    return config


def _targeted(config: dict[str, Any], name: str) -> bool:
    """Whether PEFT puts an adapter on the module `name` (peft's check_target_module_exists)."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str) and re.fullmatch(exclude, name):
            return False
        if not isinstance(exclude, str) and (name in exclude or any(name.endswith("." + e) for e in exclude)):
            return False
    targets = config["target_modules"]
    if targets == "all-linear":  # every Linear but the output layer
        return name != "lm_head"
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:
        return True
    if not any(name.endswith("." + t) for t in targets):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern") or []
    patterns = [patterns] if isinstance(patterns, str) else patterns
    match = None
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    for p in patterns:
        match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
        if match:
            break
    if not match:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def load_adapter(model, adapter_dir: str | os.PathLike, *, architecture: str | None = None, dtype=None):
    """A copy of the Loom `model` (the adapter's base, e.g. from `models.hf.load`) carrying the
    PEFT LoRA adapter in `adapter_dir` as LoraKernels: rank, alpha, rsLoRA and dropout from its
    config, the weights from `adapter_model.safetensors`. Projections adapted on some layers only
    get zero adapters on the others. A PREFIX_TUNING directory gives the model with its prefixes
    (`load_prefix_adapter`).

    `architecture`: the transformers architecture whose module names the adapter uses (default:
    the one `models.hf.save` would write for the model). `dtype`: the adapters' storage dtype
    (default: the base kernels'). Merge them with `models.lora.merge_lora`.

    Raises ValueError naming what does not fit: an unsupported option, a key that is no adapter
    of this model, a missing or misshapen tensor, or a module `target_modules` selects without
    its tensors.
    """
    adapter_dir = pathlib.Path(adapter_dir)
    if adapter_type(adapter_dir) == "PREFIX_TUNING":
        return load_prefix_adapter(model, adapter_dir)
    config = read_adapter_config(adapter_dir)
    file = adapter_dir / ADAPTER_WEIGHTS
    if not file.is_file():
        bin_hint = " (adapter_model.bin: re-save it with safe_serialization=True)" if (
            adapter_dir / "adapter_model.bin").is_file() else ""
        raise FileNotFoundError(f"{file} not found{bin_hint}")
    cfg = model.config
    architecture = architecture or infer_architecture(cfg)
    modules = adapter_modules(cfg, architecture)
    names = _module_names(modules, cfg)
    stacks = _stacks(cfg)
    rank = int(config["r"])
    where = str(file)

    expected = {n for n in names if _targeted(config, n)}
    weights: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    base_layers = {}
    unknown, found = [], set()
    with SafetensorsReader(file) as reader:
        for key in reader.keys():
            m = _KEY.fullmatch(key)
            if not m or m.group("module") not in names:
                unknown.append(key)
                continue
            module, part = m.group("module"), m.group("part")
            path, layer = names[module]
            if part == "base_layer.weight":  # peft saves an adapted lm_head's weight beside its adapter
                if layer is not None:
                    unknown.append(key)
                else:
                    base_layers[path] = reader.read(key)
                continue
            _, in_dims, out_dims = modules[path]
            want = (rank, math.prod(in_dims)) if part == "lora_A.weight" else (math.prod(out_dims), rank)
            if reader.shape(key) != want:
                raise ValueError(f"{where}: {key} has shape {reader.shape(key)}; expected {want} for r={rank} "
                                 f"on this {architecture} (a different base model?)")
            x = reader.read(key).astype(np.float32).T  # [in, r] or [r, out]
            x = x.reshape(in_dims + (rank,)) if part == "lora_A.weight" else x.reshape((rank,) + out_dims)
            stacked = weights.setdefault(path, {})
            side = part[5]  # "A" / "B"
            if layer is None:
                stacked[side] = x
            else:
                full = stacked.setdefault(side, np.zeros((len(stacks[path[0]]),) + x.shape, np.float32))
                full[layer] = x
            found.add((module, side))
    if unknown:
        raise ValueError(f"{where}: {len(unknown)} tensors are no LoRA adapter of a {architecture} projection "
                         f"(q/k/v/o_proj, gate/up/down_proj, an untied lm_head), e.g. {sorted(unknown)[:4]}")
    missing = sorted(f"{KEY_PREFIX}{n}.lora_{s}.weight" for n in expected for s in "AB" if (n, s) not in found)
    if missing:
        raise ValueError(f"{where}: {len(missing)} adapter tensors that target_modules selects are missing, "
                         f"e.g. {missing[:4]}")
    stray = sorted({n for n, _ in found} - expected)
    if stray:
        raise ValueError(f"{where}: adapters for modules that target_modules={config['target_modules']!r} does not "
                         f"select: {stray[:4]}")
    if not weights:
        raise ValueError(f"{where}: no LoRA adapter tensors")

    out = apply_lora(model, rank=rank, alpha=float(config["lora_alpha"]),
                     targets=["/".join(p) for p in sorted(weights)],
                     dropout_rate=float(config.get("lora_dropout") or 0.0), rslora=bool(config.get("use_rslora")),
                     param_dtype=dtype)
    for path, m in nnx.iter_modules(out):
        path = tuple(map(str, path))
        if path in base_layers:
            _check_base_layer(where, base_layers[path], m.kernel, modules[path])
        if path in weights:
            kernel = m.kernel
            kernel.a[...] = jnp.asarray(weights[path]["A"], kernel.a[...].dtype)
            kernel.b[...] = jnp.asarray(weights[path]["B"], kernel.b[...].dtype)
    logging.info("loaded the LoRA adapter in %s (r=%d, alpha=%s) on %s", adapter_dir, rank, config["lora_alpha"],
                 ", ".join("/".join(p) for p in sorted(weights)))
    return out


def _check_base_layer(where, saved, kernel, layout):
    """peft stores an adapted lm_head's own weight too: it must be the base's (else the adapter
    comes with a resized or retrained output layer, which Loom's LoRA cannot carry)."""
    module, in_dims, out_dims = layout
    kernel = kernel.base if isinstance(kernel, LoraKernel) else kernel
    ours = np.asarray(kernel.dense(F32)).reshape(math.prod(in_dims), math.prod(out_dims)).T
    saved = np.asarray(saved, np.float32)
    if saved.shape != ours.shape or not np.allclose(saved, ours, rtol=1e-2, atol=1e-2 * float(np.abs(ours).max())):
        raise ValueError(f"{where}: {KEY_PREFIX}{module}.base_layer.weight {saved.shape} differs from the base's "
                         f"{module} weight {ours.shape}: the adapter was trained with another output layer "
                         "(a resized vocabulary?), which a LoRA adapter here cannot carry")


# --------------------------------------------------------------------------------------------
# An SFT run's adapters


PREFIX_KEY = "prompt_embeddings"  # PEFT's one tensor of a prefix-tuning adapter


def _rotate_prefix_keys(cfg, k_LPKH, by: int):
    """Prefix keys rotated by RoPE at position `by` (its inverse for negative `by`): PEFT's convention
    (real tokens at positions P..P+T-1, prefix keys used as they are) scores q at P + t against
    k' = R_P k exactly as Loom scores q at t against k (R_{P+t}^T R_P = R_t^T)."""
    from models.transformer import rope, rope_frequencies

    pos = jnp.full(k_LPKH.shape[:2], by, jnp.int32)
    return rope(jnp.asarray(k_LPKH, F32), pos, inv_freq=rope_frequencies(cfg))


def save_prefix_adapter(model, out: str | os.PathLike, *, base_model_name_or_path: str | None = None,
                        dtype=None) -> dict[str, Any]:
    """Writes the prefixes of a prefix-tuned `model` (models/prefix.py) as a PEFT PREFIX_TUNING
    directory and returns its adapter config: `prompt_embeddings` [P, L * 2 * K * H], per virtual
    token the layers' (key, value) pairs over the kv heads, keys rotated to PEFT's positions (see
    `_rotate_prefix_keys`); a reparameterisation MLP is folded first. ValueError when the model has
    no prefixes or its prefixes mean something else under PEFT's positions (`peft_compatible`)."""
    from models.prefix import PrefixAttention, fold_prefixes, peft_compatible

    cfg = model.config
    if not isinstance(model.layers.attn, PrefixAttention):
        raise ValueError("the model has no prefixes to write (models.prefix.apply_prefix adds them)")
    reasons = peft_compatible(cfg)
    if reasons:
        raise ValueError("these prefixes cannot be written for PEFT, whose prefix tuning shifts the real tokens' "
                         "positions by the prefix length: " + "; ".join(reasons))
    attn = fold_prefixes(model).layers.attn
    k, v = attn.prefix_k[...], attn.prefix_v[...]  # [L, P, K, H]
    n_layers, length, kv_heads, head_dim = k.shape
    k = _rotate_prefix_keys(cfg, k, length)
    emb = np.stack([np.asarray(k, np.float32), np.asarray(v, np.float32)], axis=2)  # [L, P, 2, K, H]
    emb = emb.transpose(1, 0, 2, 3, 4).reshape(length, n_layers * 2 * kv_heads * head_dim)
    np_dtype = np.dtype(jnp.dtype(dtype)) if dtype is not None else np.dtype(jnp.dtype(attn.prefix_v[...].dtype))
    config = {
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "num_virtual_tokens": int(length), "num_layers": int(n_layers), "num_attention_heads": int(kv_heads),
        "token_dim": int(kv_heads * head_dim), "encoder_hidden_size": int(kv_heads * head_dim),
        "prefix_projection": False, "num_transformer_submodules": 1, "inference_mode": True, "revision": None,
        "modules_to_save": None,
    }
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, [(PREFIX_KEY, emb.shape, np_dtype, lambda: emb.astype(np_dtype))], max_shard_bytes=2**62,
                      single_file=ADAPTER_WEIGHTS)
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def load_prefix_adapter(model, adapter_dir: str | os.PathLike):
    """A copy of the Loom `model` with the prefixes of a PEFT PREFIX_TUNING directory (the inverse of
    `save_prefix_adapter`); ValueError naming what does not fit this model."""
    from models.prefix import apply_prefix, peft_compatible

    adapter_dir = pathlib.Path(adapter_dir)
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    file = adapter_dir / ADAPTER_WEIGHTS
    where = str(file)
    if config.get("task_type") not in ("CAUSAL_LM", None):
        raise ValueError(f"{where}: task_type={config['task_type']!r}; expected \"CAUSAL_LM\"")
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found")
    cfg = model.config
    reasons = peft_compatible(cfg)
    if reasons:
        raise ValueError(f"{where}: PEFT's prefixes cannot be carried over to this model: " + "; ".join(reasons))
    if config.get("num_transformer_submodules", 1) != 1:
        raise ValueError(f"{where}: num_transformer_submodules={config['num_transformer_submodules']}; a decoder has 1")
    length = config.get("num_virtual_tokens")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"{where}: num_virtual_tokens={length!r}; expected an integer >= 1")
    with SafetensorsReader(file) as reader:
        keys = list(reader.keys())
        if keys != [PREFIX_KEY]:
            raise ValueError(f"{where}: expected the one tensor {PREFIX_KEY!r} of a prefix-tuning adapter, "
                             f"found {keys}")
        emb = reader.read(PREFIX_KEY).astype(np.float32)
    want = (length, cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim)
    if emb.shape != want:
        hint = (" (saved in training mode with prefix_projection: only the MLP's inputs were saved; re-save it with "
                "inference_mode)" if config.get("prefix_projection") and not config.get("inference_mode", True) else
                " (a different base model?)")
        raise ValueError(f"{where}: {PREFIX_KEY} has shape {emb.shape}; expected {want} = (num_virtual_tokens, "
                         f"layers x 2 x kv heads x head_dim) for this model{hint}")
    kv = emb.reshape(length, cfg.num_layers, 2, cfg.num_kv_heads, cfg.head_dim).transpose(1, 0, 2, 3, 4)
    out = apply_prefix(model, length=length)
    attn = out.layers.attn
    k = _rotate_prefix_keys(cfg, kv[:, :, 0], -length)
    attn.prefix_k[...] = jnp.asarray(k, attn.prefix_k[...].dtype)
    attn.prefix_v[...] = jnp.asarray(kv[:, :, 1], attn.prefix_v[...].dtype)
    logging.info("loaded the prefix-tuning adapter in %s (%d virtual tokens)", adapter_dir, length)
    return out


def export_prefix_adapter(workdir: pathlib.Path, run_config: dict[str, Any], out: pathlib.Path, *,
                          step: int | None = None, dtype=None, base: str | None = None) -> dict[str, Any]:
    """A prefix-tuning run (peft.method "prefix") as a PEFT PREFIX_TUNING directory; returns its
    adapter config (as `export_adapter` does)."""
    from models import checkpoint as ckpt

    model, _ = ckpt.load(workdir, step=step)
    return save_prefix_adapter(model, out, base_model_name_or_path=base, dtype=dtype)


def _hf_base_of(workdir: pathlib.Path, run_config: dict[str, Any]) -> str | None:
    """The transformers base of a fine-tuning run (its init.hf_dir, or the source of the
    `models.hf import` workdir it started from), or a ValueError when its base is no
    Hugging Face model as published; returns the base's path or name (None when unknown)."""
    from models import checkpoint as ckpt

    hf_section = run_config.get("hf")
    init = run_config.get("init") or {}
    how = ("export the merged model instead (drop --adapter_only), or export the base with `python -m models.hf "
           "export`, fine-tune from that directory (init.hf_dir) and export that run's adapters")
    if not hf_section:
        raise ValueError(f"{workdir}'s base is a Loom-trained model (its config.json has no `hf` section), but a PEFT "
                         f"adapter is a difference to a transformers model: {how}")
    if init.get("hf_dir"):
        return str(pathlib.Path(init["hf_dir"]).resolve())
    base = ckpt.read_run_config(init["workdir"]) if init.get("workdir") else {}
    if set(base) - {"model", "hf"}:  # trained, fine-tuned, or an import with an adapter merged into it
        raise ValueError(f"{workdir}'s base {init['workdir']} is a trained Loom workdir, not a Hugging Face model "
                         f"as published, so no transformers base matches the adapters: {how}")
    base_hf = base.get("hf") or hf_section
    return base_hf.get("source") or (base_hf.get("config") or {}).get("_name_or_path") or None


def export_adapter(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None, dtype=None,
                   tokenizer_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Writes a LoRA / QLoRA / prefix fine-tuning run's adapters as a PEFT adapter directory (with the
    run's tokenizer files) and returns the adapter config. ValueError for a run without adapters
    (full fine-tuning) or whose base is no Hugging Face model."""
    from models import checkpoint as ckpt
    from models.hf import copy_companion_files

    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    run = ckpt.read_run_config(workdir)
    peft = run.get("peft") or {}
    method = peft.get("method", "full")
    if method == "full":
        raise ValueError(f"{workdir} has no adapters (peft.method={method!r}: every weight was trained): "
                         "--adapter_only needs a LoRA / QLoRA / prefix run; drop it to export the whole model")
    base = _hf_base_of(workdir, run)
    if method == "prefix":
        config = export_prefix_adapter(workdir, run, out, step=step, dtype=dtype, base=base)
    elif method in ("lora", "qlora"):
        model, _ = ckpt.load(workdir, step=step)
        lora = peft.get("lora") or {}
        config = save_adapter(model, out, architecture=run["hf"]["architecture"], lora_alpha=lora.get("alpha"),
                              rslora=bool(lora.get("rslora", False)), dropout=float(lora.get("dropout", 0.0)),
                              base_model_name_or_path=base, dtype=dtype)
    else:
        raise ValueError(f"{workdir}: peft.method={method!r} has no PEFT adapter export (lora, qlora, prefix do)")
    tokenizer_dir = pathlib.Path(tokenizer_dir) if tokenizer_dir else workdir / "tokenizer"
    if tokenizer_dir.is_dir():
        copy_companion_files(tokenizer_dir, out)
    return config
