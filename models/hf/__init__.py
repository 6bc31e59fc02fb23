"""Hugging Face checkpoints in and out.

    model, cfg = models.hf.load("checkpoints/Llama-3.2-1B")            # on the default device
    model, cfg = models.hf.load(path, mesh=mesh, dtype="bfloat16")     # sharded per the mesh rules
    logits_BTV = model(inputs_BT)
    models.hf.save(model, "out/")          # transformers.AutoModelForCausalLM.from_pretrained("out/")

`load` reads `config.json` and the safetensors weights (one file or shards with an index) of a
supported architecture (`ARCHITECTURES`: Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3, Gemma, Gemma 2,
GPT-2, Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2). Each parameter is created with
`jax.make_array_from_callback`: every device's shard is read from the memory-mapped files (the
rows that shard needs, one layer at a time for stacked layer parameters, one expert at a time
for experts stored per expert) and converted to the
requested dtype on the host, so no process ever holds the whole model. `save` streams one tensor
at a time from the devices to the files; `hf_tensors` (on `tensor_plan`) yields the same
tensors as numpy arrays without writing them (inference/gguf_io.py converts them to GGUF).

The command line (`python -m models.hf import|export`, see `__main__.py`) converts between a
Hugging Face directory and a Loom workdir; tokenizer files travel beside the weights (read them
with `data.tokenizer.hf`). PEFT LoRA adapter directories, both ways: `models/hf/peft_io.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import shutil
from typing import Any

import jax
import numpy as np

from models.config import DTYPES, ModelConfig
from models.hf.families import (ARCHITECTURES, IGNORED_SUFFIXES, Source, architecture_of, check_representable,
                                from_hf_config, infer_architecture, param_sources, representation_errors,
                                to_hf_config)
from models.hf.safetensors_io import SafetensorsReader, write_safetensors

# Files that travel with the weights: tokenizers (data.tokenizer.hf reads them) and generation defaults.
COMPANION_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt",
                   "generation_config.json")
COMPANION_DIRS = ("additional_chat_templates",)

__all__ = ["ARCHITECTURES", "COMPANION_FILES", "architecture_of", "copy_companion_files", "from_hf_config",
           "hf_tensors", "infer_architecture", "load", "read_hf_config", "representation_errors",
           "resolve_architecture", "save", "save_sentencepiece_tokenizer", "tensor_plan", "to_hf_config"]


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    path = pathlib.Path(path)
    file = path / "config.json" if path.is_dir() or not path.suffix else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: is {path} a Hugging Face model directory?")
    return json.loads(file.read_text())


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; expected one of {DTYPES}")
    return name


def _resolver(reader: SafetensorsReader):
    """Our canonical names -> the checkpoint's (some checkpoints drop the `model.` / `transformer.` prefix)."""
    def resolve(name: str) -> str | None:
        if name in reader:
            return name
        head, _, rest = name.partition(".")
        if head in ("model", "transformer") and rest in reader:
            return rest
        return None
    return resolve


def _stack_layers(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Stacked parameters' first path key -> the global layer of each row (models.transformer.layer_stacks)."""
    from models.transformer import layer_stacks

    return layer_stacks(cfg)


def _rows(path: tuple[str, ...], stacks) -> list[int | None]:
    """The layer of each row of a parameter stacked over layers, or [None] for one that is not."""
    return list(stacks[path[0]]) if path[0] in stacks else [None]


def _check_tensors(reader, sources, cfg: ModelConfig, arch: str, where: str):
    """Every expected tensor present with the expected shape; nothing unexplained left over.

    Returns our path -> per row (layer) the (Source, tensor names) it is read from: the first of
    the source's forms (`Source.forms`) whose tensors are all there."""
    resolve = _resolver(reader)
    stacks = _stack_layers(cfg)
    names: dict[tuple[str, ...], list[tuple[Source, list[str]]]] = {}
    used = set()
    for path, src in sources.items():
        rows = []
        for layer in _rows(path, stacks):
            for form in src.forms():
                found = [resolve(name) for name in form.names(layer)]
                if None not in found:
                    break
            else:
                missing = src.names(layer)[[resolve(n) for n in src.names(layer)].index(None)]
                others = "".join(f" (or {f.names(layer)[0]!r})" for f in src.forms()[1:])
                raise ValueError(f"{where}: tensor {missing!r}{others} (expected shape {src.shape}) is missing for "
                                 f"{arch} ({_shape_summary(cfg)})")
            for name in found:
                if reader.shape(name) != form.shape:
                    raise ValueError(f"{where}: tensor {name!r} has shape {reader.shape(name)}; expected {form.shape} "
                                     f"for {arch} ({_shape_summary(cfg)} from config.json)")
            rows.append((form, found))
            used.update(found)
        names[path] = rows
    unexpected = [k for k in reader.keys() if k not in used and not k.endswith(IGNORED_SUFFIXES)
                  and not (cfg.tie_embeddings and k.endswith("lm_head.weight"))]
    if unexpected:
        raise ValueError(f"{where}: {len(unexpected)} tensors that {arch} ({_shape_summary(cfg)}) does not use, "
                         f"e.g. {sorted(unexpected)[:5]}: a different architecture or an unsupported option")
    return names


def _shape_summary(cfg: ModelConfig) -> str:
    out = (f"vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}, intermediate_size={cfg.intermediate_size}, "
           f"num_layers={cfg.num_layers}, num_heads={cfg.num_heads}, num_kv_heads={cfg.num_kv_heads}, "
           f"head_dim={cfg.head_dim}")
    if cfg.moe.enabled:
        out += (f", num_experts={cfg.moe.num_experts}, expert_intermediate_size={cfg.expert_intermediate_size}, "
                f"shared width {cfg.shared_intermediate_size}, MoE layers "
                f"{[i for i in range(cfg.num_layers) if cfg.is_moe_layer(i)]}")
    return out


def _read_block(reader: SafetensorsReader, name: str, src: Source, idx: tuple[slice, ...]) -> np.ndarray:
    """ours[idx] for one layer, reading only the rows of the Hugging Face tensor that it covers.

    `idx` holds concrete unit-stride slices over our dims. Each Hugging Face dim is a group of
    consecutive `view` dims (a row-major reshape); the outermost dim of a group is sliced in the
    read, the inner ones (e.g. head_dim inside heads) after it. A permuted axis (`src.permute`)
    is read whole, reordered, then sliced.
    """
    if src.permute is not None:
        axis, order = src.permute
        whole = tuple(slice(0, src.ours[axis]) if i == axis else sl for i, sl in enumerate(idx))
        block = np.take(_read_block(reader, name, dataclasses.replace(src, permute=None), whole), order, axis=axis)
        return block[tuple(idx[axis] if i == axis else slice(None) for i in range(block.ndim))]
    view_idx: list[slice] = [slice(None)] * len(src.view)
    for i, p in enumerate(src.perm):
        view_idx[p] = idx[i]
    hf_idx, block_shape, inner_idx = [], [], []
    v = 0
    for j, size in enumerate(src.selected_shape):
        group = [v]
        while int(np.prod([src.view[g] for g in group])) != size:
            v += 1
            group.append(v)
        v += 1
        inner = int(np.prod([src.view[g] for g in group[1:]], dtype=np.int64))
        outer = view_idx[group[0]]
        start, stop = outer.start, outer.stop
        offset = src.select[1] if src.select is not None and src.select[0] == j else 0
        hf_idx.append(slice(offset + start * inner, offset + stop * inner))
        block_shape += [stop - start] + [src.view[g] for g in group[1:]]
        inner_idx += [slice(None)] + [view_idx[g] for g in group[1:]]
    block = reader.read(name, tuple(hf_idx)).reshape(block_shape)[tuple(inner_idx)]
    return block.transpose(src.perm)


def _read_param(reader, rows: list[tuple[Source, list[str]]], stacked: bool, shape, dtype, index) -> np.ndarray:
    """The shard `index` of one of our parameters (make_array_from_callback's callback): per
    layer (row) from that row's form of the source; per expert from that expert's tensor."""
    index = tuple(slice(*sl.indices(n)[:2]) for sl, n in zip(index, shape))
    if not stacked:
        src, names = rows[0]
        return _read_block(reader, names[0], src, index).astype(dtype)
    layers, rest = index[0], index[1:]
    out = np.empty((layers.stop - layers.start,) + tuple(sl.stop - sl.start for sl in rest), dtype)
    for j, layer in enumerate(range(layers.start, layers.stop)):
        src, names = rows[layer]
        if src.experts:  # one tensor per expert: this shard's experts only
            for k, e in enumerate(range(rest[0].start, rest[0].stop)):
                out[j, k] = _read_block(reader, names[e], src, rest[1:])
        else:
            out[j] = _read_block(reader, names[0], src, rest)
    return out


def load(path: str | os.PathLike, *, mesh: jax.sharding.Mesh | None = None, dtype=None, param_dtype=None,
         rules=None) -> tuple[Any, ModelConfig]:
    """(model, model_config) from a Hugging Face model directory.

    Args:
      path: a directory with `config.json` and `model.safetensors` (or shards + index).
      mesh: parameters are sharded over it per the logical-axis `rules` (default
        `models.sharding.DEFAULT_RULES`); None puts them on the first local device. Either way the
        model is callable afterwards with no mesh set.
      dtype: compute dtype, and the parameters' unless `param_dtype` is given ("bfloat16",
        "float32", "float16" or a numpy/JAX dtype); None keeps the checkpoint's dtype for both.
    Returns:
      The `Decoder` (its `.config` is the returned ModelConfig) and the ModelConfig.
    Raises:
      ValueError naming the tensor and the expected shape when the weights do not match the
      config, or the valid architectures when the architecture is not supported.
    """
    from models.transformer import abstract_params_and_shardings, merge_params

    path = pathlib.Path(path)
    where = str(path)
    hf = read_hf_config(path)
    arch = architecture_of(hf, str(path / "config.json"))
    cfg = from_hf_config(hf, where=str(path / "config.json"))
    with SafetensorsReader(path) as reader:
        sources = param_sources(cfg, arch)
        embed = _resolver(reader)(sources[("embed",)].name)
        stored = np.dtype(reader.dtype(embed)).name if embed is not None else "float32"
        if stored not in DTYPES:
            if dtype is None:
                raise ValueError(f"{where} stores weights as {stored}; pass dtype= one of {DTYPES} to convert them")
            stored = "float32"
        dtype = _dtype_name(dtype) or stored
        cfg = cfg.replace(dtype=dtype, param_dtype=_dtype_name(param_dtype) or dtype)
        names = _check_tensors(reader, sources, cfg, arch, where)

        graphdef, abs_params, shardings = abstract_params_and_shardings(cfg, mesh, rules)
        stacks = _stack_layers(cfg)

        def build(key_path, a, sharding):
            p = tuple(str(getattr(k, "key", k)) for k in key_path)
            if p not in sources:
                raise AssertionError(f"no Hugging Face source for parameter {'/'.join(p)} of {arch}")
            cb = functools.partial(_read_param, reader, names[p], p[0] in stacks, a.shape, np.dtype(a.dtype))
            return jax.make_array_from_callback(a.shape, sharding, cb, dtype=a.dtype)

        params = jax.tree_util.tree_map_with_path(build, abs_params, shardings)
        extra = set(sources) - {tuple(str(getattr(k, "key", k)) for k in kp)
                                for kp, _ in jax.tree_util.tree_leaves_with_path(abs_params)}
        if extra:
            raise AssertionError(f"{arch} sources without a parameter: {sorted(extra)}")
    return merge_params(graphdef, params), cfg


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def resolve_architecture(cfg: ModelConfig, architecture: str | None = None,
                         hf_config: dict[str, Any] | None = None) -> str:
    """The architecture a model is written as: `architecture`, else `hf_config`'s (when it still
    expresses the model), else the plainest one that does (`infer_architecture`). Raises
    ValueError when the result cannot express `cfg` exactly."""
    if architecture is None and hf_config is not None:
        architecture = architecture_of(hf_config)
        if representation_errors(cfg, architecture):  # the model changed family (e.g. a new option)
            architecture = None
    architecture = architecture or infer_architecture(cfg)
    check_representable(cfg, architecture)
    return architecture


def tensor_plan(model, architecture: str, *, dtype=None) -> list[tuple[str, tuple[int, ...], np.dtype, Any]]:
    """The Hugging Face tensors of `model` as `architecture`, in checkpoint order, without reading
    them: (name, shape, numpy dtype, produce) where `produce()` returns that tensor as a numpy
    array (read from the devices when called, one tensor at a time).

    `dtype`: the tensors' dtype; None keeps the model's `param_dtype`. The caller checks that the
    architecture expresses the model (`resolve_architecture` / `check_representable`)."""
    from models.transformer import split_params

    cfg: ModelConfig = model.config
    dtype = _dtype_name(dtype) or cfg.param_dtype
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    _, params = split_params(model)
    sources = param_sources(cfg, architecture)

    stacks = _stack_layers(cfg)
    # tensor name -> the (our parameter, its Source, the index of the block: (row,) / (row, expert) / ())
    entries: dict[str, list[tuple[jax.Array, Source, tuple[int, ...]]]] = {}
    order: dict[str, tuple[int, str]] = {}
    for path_, src in sources.items():
        leaf = _get(params, path_)
        for row, layer in enumerate(_rows(path_, stacks)):
            for e, name in enumerate(src.names(layer)):
                idx = () if layer is None else (row, e) if src.experts else (row,)
                entries.setdefault(name, []).append((leaf, src, idx))
                order[name] = (-1 if layer is None else layer, name)

    def produce(name):
        parts = entries[name]
        full = np.empty(parts[0][1].shape, np_dtype)
        for leaf, src, idx in parts:
            x = np.asarray(jax.device_get(leaf[idx] if idx else leaf))
            if src.permute is not None:  # back to the checkpoint's order
                axis, order = src.permute
                x = np.take(x, np.argsort(order), axis=axis)
            block = x.transpose(np.argsort(src.perm)).reshape(src.selected_shape).astype(np_dtype)
            if src.select is None:
                return block
            dim, start, size = src.select
            idx = [slice(None)] * full.ndim
            idx[dim] = slice(start, start + size)
            full[tuple(idx)] = block
        return full

    return [(name, entries[name][0][1].shape, np_dtype, functools.partial(produce, name))
            for name in sorted(entries, key=order.get)]


def hf_tensors(model, architecture: str | None = None, *, dtype=None):
    """Yields (Hugging Face tensor name, numpy array) for every tensor `save` would write, one at
    a time (nothing written to disk): e.g. to convert them to another format. `architecture` as
    in `save` (None: the plainest that expresses the model)."""
    architecture = resolve_architecture(model.config, architecture)
    for name, _, _, produce in tensor_plan(model, architecture, dtype=dtype):
        yield name, produce()


def save(model, path: str | os.PathLike, *, architecture: str | None = None, dtype=None,
         hf_config: dict[str, Any] | None = None, companion_dir: str | os.PathLike | None = None,
         max_shard_bytes: int = 5 * 2**30) -> str:
    """Writes `model` as a Hugging Face directory (`config.json` + safetensors) and returns its architecture.

    Args:
      architecture: e.g. "LlamaForCausalLM"; None takes `hf_config`'s, else the plainest supported
        architecture that expresses the model exactly (ValueError if none does).
      dtype: storage dtype of the written weights; None keeps the model's `param_dtype`.
      hf_config: the config.json the model was imported from: fields we do not model (token ids,
        ...) are kept from it.
      companion_dir: tokenizer / generation-config files (COMPANION_FILES) are copied from here.
      max_shard_bytes: larger models are split into shards with a `model.safetensors.index.json`.
    """
    cfg: ModelConfig = model.config
    architecture = resolve_architecture(cfg, architecture, hf_config)
    dtype = _dtype_name(dtype) or cfg.param_dtype
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, tensor_plan(model, architecture, dtype=dtype), max_shard_bytes=max_shard_bytes)
    config = to_hf_config(cfg.replace(param_dtype=dtype), architecture, base=hf_config)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if companion_dir is not None:
        copy_companion_files(companion_dir, path)
    return architecture


def copy_companion_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies the tokenizer and generation-config files present in `src` to `dst`; returns their names."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in COMPANION_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    for name in COMPANION_DIRS:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name, dirs_exist_ok=True)
            copied.append(name + "/")
    return copied


def save_sentencepiece_tokenizer(model_file: str | os.PathLike, dst: str | os.PathLike, *,
                                 model_max_length: int | None = None) -> dict[str, int]:
    """Writes a sentencepiece model (BPE or unigram) as a Hugging Face tokenizer: `tokenizer.model`,
    an equivalent `tokenizer.json` and a `tokenizer_config.json`, so `transformers.AutoTokenizer`
    gives the ids sentencepiece (and so Loom's training) gives: byte fallback, user-defined pieces
    ("\\n") matched whole, special-token strings in the text tokenized as text
    (`split_special_tokens`), BOS added as Loom's documents start, no EOS.

    Exact for Loom's BPE models (its default). Known differences elsewhere: in a unigram model, or
    one with a dummy prefix, text that spells a control piece ("<s>") can become that piece when
    its characters are not pieces of their own; with a dummy prefix (Llama 2's models; Loom's have
    none), texts that start with whitespace get no extra "▁".

    Returns the special ids for config.json (`bos_token_id`, `eos_token_id`, `pad_token_id`, those
    the model has).
    """
    from sentencepiece import sentencepiece_model_pb2  # read directly: models/ does not import data/

    model_file, dst = pathlib.Path(model_file), pathlib.Path(dst)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    tokenizer, specials = _tokenizers_pipeline(proto, str(model_file))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **{f"{k}_token": p for k, (_, p) in specials.items()},
              "add_bos_token": "bos" in specials, "add_eos_token": False, "split_special_tokens": True,
              "clean_up_tokenization_spaces": False}
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model_file, dst / "tokenizer.model")
    tokenizer.save(str(dst / "tokenizer.json"))
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return {f"{k}_token_id": i for k, (i, _) in specials.items() if k != "unk"}


def _tokenizers_pipeline(proto, where: str):
    """A `tokenizers.Tokenizer` equal to the sentencepiece `proto`, and its specials {kind: (id, piece)}."""
    from sentencepiece.sentencepiece_model_pb2 import ModelProto, TrainerSpec
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kinds = ModelProto.SentencePiece
    pieces = list(proto.pieces)
    spec = proto.trainer_spec
    specials = {k: (i, pieces[i].piece) for k, i in (("bos", spec.bos_id), ("eos", spec.eos_id), ("unk", spec.unk_id),
                                                      ("pad", spec.pad_id)) if 0 <= i < len(pieces)}
    unk = specials["unk"][0]
    if spec.model_type == TrainerSpec.UNIGRAM:
        # control and byte pieces must never win the Viterbi search on text that spells them
        low = min(p.score for p in pieces) - 1000.0
        plain = (kinds.NORMAL, kinds.USER_DEFINED)
        model = models.Unigram([(p.piece, p.score if p.type in plain else low) for p in pieces], unk_id=unk,
                               byte_fallback=spec.byte_fallback)
    elif spec.model_type == TrainerSpec.BPE:
        model = models.BPE({p.piece: i for i, p in enumerate(pieces)}, _bpe_merges(pieces, kinds.NORMAL, where),
                           unk_token=pieces[unk].piece, fuse_unk=True, byte_fallback=spec.byte_fallback)
    else:
        raise ValueError(f"{where}: a sentencepiece {TrainerSpec.ModelType.Name(spec.model_type)} model; "
                         "exportable: BPE, UNIGRAM")
    dummy_prefix = proto.normalizer_spec.add_dummy_prefix
    if dummy_prefix:
        logging.warning("%s adds a dummy prefix: transformers gives other ids than sentencepiece for texts that "
                        "start with whitespace", where)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first" if dummy_prefix
                                                 else "never", split=False)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1, right=0)] if dummy_prefix else []))
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in pieces
                    if p.type == kinds.USER_DEFINED])
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in pieces
                            if p.type in (kinds.CONTROL, kinds.UNKNOWN)])
    if "bos" in specials:
        bos_id, bos = specials["bos"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                           special_tokens=[(bos, bos_id)])
    return tok, specials


def _bpe_merges(pieces, normal, where: str) -> list[tuple[str, str]]:
    """BPE merges of a sentencepiece BPE vocabulary: every split of a piece into two pieces, in the
    order of the merged piece's rank (sentencepiece merges the best-scored pair first)."""
    ids = {p.piece: i for i, p in enumerate(pieces)}
    merges, unreachable = [], 0
    for i, p in enumerate(pieces):
        if p.type != normal or len(p.piece) < 2:
            continue
        splits = [(ids[p.piece[:k]], ids[p.piece[k:]]) for k in range(1, len(p.piece))
                  if p.piece[:k] in ids and p.piece[k:] in ids]
        merges += [(i, left, right) for left, right in splits]
        unreachable += not splits
    if unreachable:
        logging.warning("%s: %d BPE pieces are no merge of two others: transformers never produces them",
                        where, unreachable)
    return [(pieces[left].piece, pieces[right].piece) for _, left, right in sorted(merges)]
