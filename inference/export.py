"""Export a Loom run (or a Hugging Face model directory) as GGUF for llama.cpp and Ollama.

    python -m inference.export --checkpoint=runs/tiny --out=tiny.gguf               # f32
    python -m inference.export --checkpoint=runs/tiny --out=tiny-q8.gguf --type=q8_0
    llama-cli -m tiny.gguf -p 'def main('        # or: ollama create tiny -f Modelfile

The file holds the weights, the tokenizer and the chat template (inference/gguf_io.py says
what is supported). `--modelfile` (on by default) writes an Ollama `Modelfile` beside it.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags


def main(argv):
    from configs.cli import quiet_library_logs
    from models.checkpoint import UnreadableCheckpoint

    quiet_library_logs()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    try:
        _export()
    except (ValueError, FileNotFoundError, UnreadableCheckpoint) as e:  # bad input: one clear line, no traceback
        print(f"error: {str(e).strip()}", file=sys.stderr)
        sys.exit(2)


def _export():
    import pathlib

    from inference import gguf_io
    from inference.loading import load_checkpoint

    F = flags.FLAGS
    if not F.checkpoint or not F.out:
        raise app.UsageError("give --checkpoint (a Loom run or a Hugging Face directory) and --out (the .gguf file)")
    gguf_io.check_type(F.type)  # before the (slow) load
    if not pathlib.Path(F.checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {F.checkpoint} does not exist (a Loom workdir or a Hugging Face "
                                "model directory)")
    model, tok, info = load_checkpoint(F.checkpoint, step=F.step)
    name = F.name or pathlib.Path(F.checkpoint).resolve().name
    summary = gguf_io.export_gguf(model, tok, F.out, type=F.type, chat_template=F.chat_template, name=name)
    where = f"{info['checkpoint']}" + (f" step {info['step']}" if info.get("step") is not None else "")
    types = ", ".join(f"{n} {k}" for k, n in sorted(summary["tensor_types"].items()))
    logging.info("wrote %s: %s (%s) as %s, %d tensors (%s), %.1f MB, %d parameters; tokenizer %s (%s, %d tokens, "
                 "%d padding), BOS %s, EOS %s", summary["path"], where, summary["hf_architecture"],
                 summary["architecture"], summary["tensors"], types, summary["bytes"] / 1e6, summary["parameters"],
                 summary["tokenizer"], summary["pre"], summary["tokens"], summary["padded_tokens"], summary["bos"],
                 summary["eos"])
    print(f"exported {where} to {summary['path']}: {summary['architecture']} {summary['type']} "
          f"({summary['bytes'] / 1e6:.1f} MB, {summary['tensors']} tensors: {types}), tokenizer {summary['tokenizer']} "
          f"with {summary['tokens']} tokens")
    if F.modelfile:
        path = gguf_io.write_modelfile(F.out, tok, chat_template=F.chat_template)
        print(f"wrote {path}: ollama create {name} -f {path}")


if __name__ == "__main__":
    flags.DEFINE_string("checkpoint", None, "A Loom workdir or a Hugging Face model directory.")
    flags.DEFINE_string("out", None, "The .gguf file to write.")
    flags.DEFINE_string("type", "f32", "Weight type: f32, f16 or q8_0.")
    flags.DEFINE_integer("step", None, "Checkpoint step of a Loom workdir (default: the newest good one).")
    flags.DEFINE_bool("modelfile", True, "Also write an Ollama Modelfile beside the .gguf.")
    flags.DEFINE_string("chat_template", None, "Chat template override: jinja text, a file, a named template of "
                        "the tokenizer, or 'loom' (default: the tokenizer's own, else Loom's).")
    flags.DEFINE_string("name", None, "general.name in the file (default: the checkpoint directory's name).")
    app.run(main)
