"""Serve a model over an OpenAI-compatible HTTP API, with continuous batching.

    python -m inference.serve --checkpoint=runs/tiny                    # a Loom run (newest good step)
    python -m inference.serve --checkpoint=path/to/hf_model --port=8000 --max_slots=64
    curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]}'

The model id (`/v1/models`) is the checkpoint directory's name. The port opens at once; `/health`
answers 503 while the engine compiles (a few seconds for `tiny` on a CPU) and 200 when it serves.
SIGTERM or Ctrl-C stops taking connections, finishes the requests in flight, then exits.
See inference/server.py (the API) and inference/batching.py (the engine).
"""

from __future__ import annotations

import logging
import pathlib
import sys

from absl import app, flags


def build(checkpoint: str, *, step=None, dtype=None, quantize=None, max_slots=32, max_len=None, prefix_cache=0,
          chat_template=None, max_n=None, model_id=None):
    """(app, engine) for a checkpoint: the model loaded, the engine built (it compiles when the
    app starts)."""
    from inference.batching import Engine
    from inference.loading import load_checkpoint
    from inference.server import MAX_N, create_app

    model, tok, info = load_checkpoint(checkpoint, step=step, dtype=dtype, quantize=quantize)
    engine = Engine(model, tok, max_slots=max_slots, max_len=max_len, prefix_cache_size=prefix_cache)
    model_id = model_id or pathlib.Path(checkpoint).resolve().name
    logging.info("serving %s as %r: %s parameters, %d slots x %d positions", checkpoint, model_id,
                 f"{info['model']['params']:,}", engine.max_slots, engine.max_len)
    return create_app(engine, tok, model_id=model_id, chat_template=chat_template, max_n=max_n or MAX_N), engine


def main(argv):
    del argv
    import uvicorn

    from configs.cli import quiet_library_logs
    from models.checkpoint import UnreadableCheckpoint

    quiet_library_logs()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    F = flags.FLAGS
    try:
        api, _ = build(F.checkpoint, step=F.step, dtype=F.dtype, quantize=None if F.quantize == "none" else F.quantize,
                       max_slots=F.max_slots, max_len=F.max_len, prefix_cache=F.prefix_cache,
                       chat_template=F.chat_template, max_n=F.max_n, model_id=F.model_id)
    except (ValueError, FileNotFoundError, UnreadableCheckpoint) as e:
        print(f"error: {str(e).strip()}", file=sys.stderr)
        sys.exit(2)
    # uvicorn's own SIGTERM / SIGINT handling: stop accepting, let in-flight responses finish
    # (streams included), then run the app's shutdown, which drains the engine
    uvicorn.run(api, host=F.host, port=F.port, log_level="info", timeout_graceful_shutdown=F.drain_timeout)


if __name__ == "__main__":
    flags.DEFINE_string("checkpoint", None, "A Loom run directory or a Hugging Face model directory.", required=True)
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0 for every interface).")
    flags.DEFINE_integer("port", 8000, "Port to listen on.")
    flags.DEFINE_integer("step", None, "Checkpoint step of a Loom run (default: the newest good one).")
    flags.DEFINE_string("dtype", None, "Compute dtype override (e.g. float32).")
    flags.DEFINE_enum("quantize", "none", ["none", "int8", "int4"], "Weight-only quantization at load time.")
    flags.DEFINE_integer("max_slots", 32, "Requests decoded together (KV-cache rows).")
    flags.DEFINE_integer("max_len", None, "Positions per request, prompt + output (default: the model's max_seq_len).")
    flags.DEFINE_integer("prefix_cache", 16, "Prompts whose KV cache is kept to reuse shared prefixes (0 = off).")
    flags.DEFINE_string("chat_template", None, "Chat template override (jinja text, a file, or 'loom').")
    flags.DEFINE_integer("max_n", None, "The most choices (n) one request may ask for (default 16).")
    flags.DEFINE_string("model_id", None, "The model's id in the API (default: the checkpoint directory's name).")
    flags.DEFINE_float("drain_timeout", 120.0, "Seconds to let in-flight requests finish on SIGTERM.")
    app.run(main)
