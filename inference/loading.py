"""Load a model and its tokenizer from a Loom workdir or a Hugging Face model directory.

One loader for every tool that takes `--checkpoint` (inference.sample, evals.run, serving later):
the newest good checkpoint of a run (or a given step), an optional compute-dtype override, the
run's tokenizer, and optional weight-only quantization at load time.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

from configs.cli import ConfigError


def checkpoint_kind(path: str | pathlib.Path) -> str:
    """"loom" (a workdir: config.json with a model section) or "hf" (config.json + safetensors)."""
    path = pathlib.Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} is not a directory (a Loom workdir or a Hugging Face model dir)")
    if cfg_file.is_file():
        try:
            cfg = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file} is not valid JSON ({e})") from None
        if isinstance(cfg.get("model"), dict):
            return "loom"
        if list(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
            return "hf"
    raise FileNotFoundError(f"{path} is neither a Loom workdir (config.json with a model section) nor a Hugging "
                            "Face model directory (config.json and *.safetensors)")


def load_tokenizer(path: str | pathlib.Path):
    """A sentencepiece `.model` file, or a Hugging Face tokenizer (tokenizer.json / its directory)."""
    path = pathlib.Path(path)
    if path.is_file() and path.suffix == ".model" and not (path.parent / "tokenizer_config.json").is_file():
        from data.tokenizer import SentencePieceTokenizer

        return SentencePieceTokenizer.from_file(path)
    from data.tokenizer.hf import load_hf_tokenizer

    return load_hf_tokenizer(path)


def load_checkpoint(path: str | pathlib.Path, *, step: int | None = None, dtype: str | None = None,
                    tokenizer: str | None = None, quantize: str | None = None):
    """(model, tokenizer, info) of a Loom workdir or a Hugging Face model directory.

    `dtype` overrides the compute dtype; `quantize` ("int8" | "int4") quantizes the weights."""
    path = pathlib.Path(path)
    kind = checkpoint_kind(path)
    info: dict[str, Any] = {"checkpoint": str(path), "checkpoint_kind": kind}
    if kind == "loom":
        from models import checkpoint as ckpt
        from models.transformer import abstract_model, merge_params, split_params

        model, cfg, info["step"] = ckpt.load(path, step=step, return_step=True)
        if dtype and dtype != cfg.dtype:  # same params, another compute dtype
            cfg = cfg.replace(dtype=dtype)
            model = merge_params(split_params(abstract_model(cfg))[0], split_params(model)[1])
        tok_path = tokenizer or path / "tokenizer.model"
        if not pathlib.Path(tok_path).exists() and (path / "tokenizer").is_dir():
            tok_path = path / "tokenizer"  # a Hugging Face tokenizer (`models.hf import`, SFT from such a base)
        if not pathlib.Path(tok_path).exists():
            data_cfg = ckpt.read_run_config(path).get("data", {})
            run_tok = data_cfg.get("tokenizer", {})
            if run_tok.get("path"):
                tok_path = run_tok["path"]
            elif run_tok and data_cfg.get("sources"):  # an older run: the tokenizer its config trains (cached)
                from data.sources import specs_from_config
                from data.tokenizer import from_config

                logging.warning("%s has no tokenizer.model: using the tokenizer its config trains on its sources "
                                "(from the cache, or trained now)", path)
                tok = from_config(run_tok, specs_from_config(data_cfg["sources"]))
                tok_path = f"{path}/config.json:data.tokenizer"
            else:
                raise FileNotFoundError(f"{path} has no tokenizer.model and its config names no tokenizer; "
                                        "pass --config.tokenizer=<file>")
    else:
        from models import hf

        if step is not None:
            raise ConfigError(f"step={step} applies to Loom workdirs only; {path} is a Hugging Face directory")
        model, cfg = hf.load(path, dtype=dtype)
        tok_path = tokenizer or path
    if not str(tok_path).endswith(":data.tokenizer"):
        tok = load_tokenizer(tok_path)
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {tok.vocab_size} tokens, more than the model's "
                         f"vocab_size={cfg.vocab_size}")
    if quantize and quantize != "none":
        from models.quant import quantize_model

        model = quantize_model(model, quantize)
        info["quantize"] = quantize
    from models.config import param_count

    info.update(tokenizer=str(tok_path), model={"params": param_count(cfg), "vocab_size": cfg.vocab_size,
                                                "max_seq_len": cfg.max_seq_len, "dtype": cfg.dtype,
                                                "num_layers": cfg.num_layers, "hidden_size": cfg.hidden_size})
    return model, tok, info
