"""Sample from a trained model.

    python -m inference.sample --workdir=runs/tiny --prompt='def main(' --max_new_tokens=80
    python -m inference.sample --checkpoint=path/to/hf_model --prompt='The capital of France' --stream
    python -m inference.sample --workdir=runs/tiny --prompt='import os' --temperature=0.8 --top_p=0.95 \
        --num_samples=3 --quantize=int8

`--workdir` (or `--checkpoint`) is a Loom run directory (its newest good checkpoint and its
`tokenizer.model`) or a Hugging Face model directory (config.json + safetensors + tokenizer).
"""

from __future__ import annotations

import sys
import time

from absl import app, flags


def _printer(tok, prompt: str):
    """A stream callback that prints the prompt, then each token's text as it arrives."""
    sys.stdout.write(prompt)
    shown: list[int] = []

    def on_token(row, token):
        shown.append(token)
        sys.stdout.write(tok.decode(shown)[len(tok.decode(shown[:-1])):])
        sys.stdout.flush()

    return on_token


def main(argv):
    from configs.cli import quiet_library_logs
    from models.checkpoint import UnreadableCheckpoint

    quiet_library_logs()
    try:
        _sample(argv)
    except (ValueError, FileNotFoundError, UnreadableCheckpoint) as e:  # bad values, missing / corrupt checkpoints
        print(f"error: {str(e).strip()}", file=sys.stderr)
        sys.exit(2)


def _sample(argv):
    del argv
    from data.tokenizer import special, with_specials
    from inference import generate
    from inference.loading import load_checkpoint

    F = flags.FLAGS
    path = F.workdir or F.checkpoint
    if not path:
        raise app.UsageError("give --workdir (a Loom run) or --checkpoint (a Loom run or a Hugging Face directory)")
    if not F.prompt:
        raise app.UsageError("give at least one --prompt")
    model, tok, _ = load_checkpoint(path, step=F.step, quantize=F.quantize)
    prompts = [p.encode().decode("unicode_escape") for p in F.prompt]  # allow \n in prompts
    ids = [with_specials(tok, tok.encode(p)) for p in prompts for _ in range(F.num_samples)]
    labels = [(p, s) for p in prompts for s in range(F.num_samples)]
    if F.stream and len(ids) != 1:
        raise app.UsageError("--stream shows one continuation: use one --prompt and --num_samples=1")
    on_token = _printer(tok, prompts[0]) if F.stream else None
    t = time.perf_counter()
    outs = generate(model, ids, max_new_tokens=F.max_new_tokens, temperature=F.temperature, top_k=F.top_k or None,
                    top_p=F.top_p or None, min_p=F.min_p or None, repetition_penalty=F.repetition_penalty,
                    stop_tokens=special(tok.eos_id),
                    stop_strings=tuple(F.stop), tokenizer=tok, stream=on_token,
                    seed=[F.seed + i for i in range(len(ids))])
    dt = time.perf_counter() - t
    if F.stream:
        print()
    else:
        for (prompt, s), o in zip(labels, outs):
            print(f"=== {prompt!r} (sample {s}) ===\n{prompt}{tok.decode(o)}\n")
    n = sum(map(len, outs))
    print(f"[{n} tokens in {dt:.2f}s, {n / dt:.1f} tokens/s including compilation]", file=sys.stderr)


if __name__ == "__main__":
    flags.DEFINE_string("workdir", None, "A Loom run directory.")
    flags.DEFINE_string("checkpoint", None, "A Loom run directory or a Hugging Face model directory.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest good one).")
    flags.DEFINE_multi_string("prompt", [], "Prompt text (repeatable; \\n allowed).")
    flags.DEFINE_integer("max_new_tokens", 100, "New tokens per sample.")
    flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off).")
    flags.DEFINE_float("top_p", 0.95, "Nucleus sampling mass (0 or 1 = off).")
    flags.DEFINE_float("min_p", 0.0, "Drop tokens below min_p * the top probability (0 = off).")
    flags.DEFINE_float("repetition_penalty", 1.0, "> 1 discourages repeating tokens.")
    flags.DEFINE_multi_string("stop", [], "Stop strings (repeatable).")
    flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
    flags.DEFINE_integer("seed", 0, "Sampling seed (sample i uses seed + i).")
    flags.DEFINE_bool("stream", False, "Print tokens as they are generated.")
    flags.DEFINE_enum("quantize", "none", ["none", "int8", "int4"], "Weight-only quantization at load time.")
    app.run(main)
