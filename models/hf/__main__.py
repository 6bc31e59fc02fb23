"""Convert between Hugging Face model directories and Loom workdirs.

  python -m models.hf import --hf_dir=path/to/hf_model --out=runs/llama3 [--dtype=bfloat16]
      writes runs/llama3/config.json ({"model": ..., "hf": {"architecture", "config", "source"}}), the params
      as an orbax checkpoint at runs/llama3/checkpoints/0/params (what `models.checkpoint.load`
      and our programs start from) and the tokenizer files in runs/llama3/tokenizer/.
      With --adapter_dir=path/to/peft_adapter (a PEFT LoRA directory: adapter_config.json +
      adapter_model.safetensors, trained on that base), the adapter is merged into the weights
      (W + scale B A) and config.json records it under "adapter"; tokenizer files in the adapter
      directory take the place of the base's.
  python -m models.hf export --checkpoint=runs/llama3 --out=path/to/hf_out [--step=N] [--dtype=...]
      writes a directory `transformers.AutoModelForCausalLM.from_pretrained` loads (an SFT run
      with LoRA / QLoRA adapters is exported merged: W + scale A B), with the
      tokenizer files of the workdir's tokenizer/ (or --tokenizer_dir) beside the weights; a
      pretraining run's own sentencepiece model (<workdir>/tokenizer.model) is written as
      tokenizer.model, tokenizer.json and tokenizer_config.json (`transformers.AutoTokenizer`
      gives the ids Loom trained on).
      With --adapter_only, an SFT run with LoRA / QLoRA adapters or prefixes is written as a PEFT adapter
      directory instead (adapter_config.json, adapter_model.safetensors, the run's tokenizer files)
      for `peft.PeftModel.from_pretrained(<its Hugging Face base>, DIR)`; see models/hf/peft_io.py.

With several local devices the params are sharded over all of them (an fsdp mesh), so a model
larger than one device's memory converts without a gather.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
from absl import app, flags, logging

from models import checkpoint as ckpt
from models import hf

flags.DEFINE_string("hf_dir", None, "import: the Hugging Face model directory (config.json + safetensors)")
flags.DEFINE_string("checkpoint", None, "export: a Loom workdir (or one step's directory)")
flags.DEFINE_string("out", None, "the directory to write: a Loom workdir (import), a Hugging Face directory (export)")
flags.DEFINE_string("dtype", None, "parameter (and compute) dtype: bfloat16 | float32 | float16; default: keep")
flags.DEFINE_integer("step", None, "export: the checkpoint step (default: the latest)")
flags.DEFINE_string("architecture", None, f"export: one of {sorted(hf.ARCHITECTURES)}; default: the imported one, "
                                          "else the plainest that expresses the model")
flags.DEFINE_string("tokenizer_dir", None, "export: copy tokenizer files from here (default: <checkpoint>/tokenizer)")
flags.DEFINE_integer("max_shard_mb", 5 * 1024, "export: safetensors shard size in MiB")
flags.DEFINE_bool("adapter_only", False, "export: write an SFT run's LoRA / QLoRA adapters or prefixes as a PEFT "
                                         "adapter directory (adapter_config.json, adapter_model.safetensors)")
flags.DEFINE_string("adapter_dir", None, "import: a PEFT LoRA adapter directory to merge into the imported weights")
FLAGS = flags.FLAGS

TOKENIZER_SUBDIR = "tokenizer"
RUN_TOKENIZER = "tokenizer.model"  # the sentencepiece model a pretraining run keeps in its workdir


def _mesh():
    """An fsdp mesh over the local devices (None with one device)."""
    n = jax.local_device_count()
    if n == 1:
        return None
    from models.sharding import MESH_AXES

    shape = tuple(n if a == "fsdp" else 1 for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _tokenizer_vocab_size(directory: pathlib.Path) -> int | None:
    """Ids of the tokenizer in `directory`: tokenizer.json (preferred, as transformers does) with its
    added tokens, else tokenizer.model's sentencepiece pieces; None without either. Read with the
    tokenizer libraries themselves: `models` does not import `data`."""
    if (directory / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    if (directory / "tokenizer.model").is_file():
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model")).get_piece_size()
    return None


def import_(hf_dir: str, out: str, dtype: str | None = None, adapter_dir: str | None = None) -> pathlib.Path:
    hf_dir, out = pathlib.Path(hf_dir), pathlib.Path(out)
    model, cfg = hf.load(hf_dir, mesh=_mesh(), dtype=dtype)
    from models.transformer import split_params

    hf_config = hf.read_hf_config(hf_dir)
    architecture = hf.architecture_of(hf_config)
    run_config = {"model": cfg.to_dict(),
                  "hf": {"architecture": architecture, "config": hf_config, "source": str(hf_dir.resolve())}}
    if adapter_dir:
        from models.hf import peft_io
        from models.lora import merge_lora

        if peft_io.adapter_type(adapter_dir) == "PREFIX_TUNING":
            raise ValueError(f"{adapter_dir} is a prefix-tuning adapter: prefixes are attention inputs, not weights, "
                             "so they cannot be merged into a workdir's weights; load them onto the model with "
                             "models.hf.peft_io.load_adapter(model, dir)")
        model = merge_lora(peft_io.load_adapter(model, adapter_dir, architecture=architecture), dtype=cfg.params_dtype)
        run_config["adapter"] = {"source": str(pathlib.Path(adapter_dir).resolve()), "merged": True,
                                 "config": peft_io.read_adapter_config(adapter_dir)}
    _, params = split_params(model)
    out.mkdir(parents=True, exist_ok=True)
    ckpt.save_params(ckpt.checkpoints_dir(out) / "0" / ckpt.PARAMS, params)
    (out / ckpt.CONFIG_FILE).write_text(json.dumps(run_config, indent=2) + "\n")
    copied = hf.copy_companion_files(hf_dir, out / TOKENIZER_SUBDIR)
    if adapter_dir:  # a chat template or tokenizer saved with the adapter is the one it was trained with
        copied = sorted(set(copied) | set(hf.copy_companion_files(adapter_dir, out / TOKENIZER_SUBDIR)))
    vocab = _tokenizer_vocab_size(out / TOKENIZER_SUBDIR)
    if vocab is None:
        logging.warning("no tokenizer.json or tokenizer.model in %s: the workdir has no tokenizer", hf_dir)
    elif vocab > cfg.vocab_size:
        logging.warning("the tokenizer has %d ids but the model only %d embedding rows", vocab, cfg.vocab_size)
    merged = f" with the adapter {adapter_dir} merged" if adapter_dir else ""
    print(f"imported {architecture} ({cfg.param_dtype}) from {hf_dir}{merged} into {out}: "
          f"config.json, checkpoints/0/params, {TOKENIZER_SUBDIR}/ ({', '.join(copied) or 'nothing'})")
    return out


def export(checkpoint: str, out: str, *, step: int | None = None, dtype: str | None = None,
           architecture: str | None = None, tokenizer_dir: str | None = None,
           max_shard_bytes: int = 5 * 2**30) -> str:
    workdir = pathlib.Path(checkpoint)
    model, cfg = ckpt.load(workdir, step=step, mesh=_mesh())
    run_config = ckpt.read_run_config(workdir)
    method = (run_config.get("peft") or {}).get("method", "full")
    if method == "prefix":
        raise ValueError(f"{workdir} is a prefix-tuning run: its prefixes are attention inputs, not weights, so no "
                         "merged transformers model holds them; write them as a PEFT adapter with --adapter_only")
    if method != "full":  # a fine-tuning run's adapters
        from models.lora import merge_lora

        model = merge_lora(model, dtype=cfg.params_dtype)  # W + scale A B (an NF4 base dequantized)
    hf_section = run_config.get("hf") or {}
    tokenizer_dir = pathlib.Path(tokenizer_dir) if tokenizer_dir else workdir / TOKENIZER_SUBDIR
    companion = tokenizer_dir if tokenizer_dir.is_dir() else None
    arch = hf.save(model, out, architecture=architecture, dtype=dtype, hf_config=hf_section.get("config"),
                   companion_dir=companion, max_shard_bytes=max_shard_bytes)
    tokenizer = f"tokenizer files from {companion}" if companion else "no tokenizer"
    if companion is None and (workdir / RUN_TOKENIZER).is_file():
        ids = hf.save_sentencepiece_tokenizer(workdir / RUN_TOKENIZER, out, model_max_length=cfg.max_seq_len)
        config_file = pathlib.Path(out) / "config.json"  # generation stops at the tokenizer's EOS
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **ids}, indent=2, sort_keys=True)
                               + "\n")
        tokenizer = "tokenizer.model, tokenizer.json, tokenizer_config.json"
    elif companion is None:
        logging.warning("%s has no %s/ or %s: the export has no tokenizer (pass --tokenizer_dir)", workdir,
                        TOKENIZER_SUBDIR, RUN_TOKENIZER)
    print(f"exported {workdir} as {arch} to {out} ({tokenizer})")
    return arch


def main(argv):
    from configs.cli import quiet_library_logs
    from models.checkpoint import UnreadableCheckpoint

    quiet_library_logs()
    if len(argv) != 2 or argv[1] not in ("import", "export"):
        print("usage: python -m models.hf import --hf_dir=DIR --out=WORKDIR [--dtype=D] [--adapter_dir=PEFT_DIR]\n"
              "       python -m models.hf export --checkpoint=WORKDIR --out=DIR [--step=N] [--dtype=D] "
              "[--architecture=A] [--adapter_only]", file=sys.stderr)
        sys.exit(2)
    if not FLAGS.out:
        sys.exit("error: --out is required")
    try:
        if argv[1] == "import":
            if not FLAGS.hf_dir:
                sys.exit("error: import needs --hf_dir")
            import_(FLAGS.hf_dir, FLAGS.out, FLAGS.dtype, adapter_dir=FLAGS.adapter_dir)
        else:
            if not FLAGS.checkpoint:
                sys.exit("error: export needs --checkpoint")
            if FLAGS.adapter_only:
                from models.hf import peft_io

                config = peft_io.export_adapter(FLAGS.checkpoint, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype,
                                                tokenizer_dir=FLAGS.tokenizer_dir)
                shown = ("r", "lora_alpha", "target_modules", "num_virtual_tokens")
                fields = ", ".join(f"{k}={config[k]}" for k in shown if k in config)
                print(f"exported the adapters of {FLAGS.checkpoint} to {FLAGS.out} as a PEFT adapter directory "
                      f"({fields}) for the base {config.get('base_model_name_or_path') or '(unknown)'}")
                return
            export(FLAGS.checkpoint, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype, architecture=FLAGS.architecture,
                   tokenizer_dir=FLAGS.tokenizer_dir, max_shard_bytes=FLAGS.max_shard_mb * 2**20)
    except (ValueError, FileNotFoundError, UnreadableCheckpoint) as e:  # bad input: one clear line, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main)
