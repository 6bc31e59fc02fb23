"""One side of benchmarks/decode.py in a process of its own: Loom's `inference.generate` (this
tree's or an earlier commit's) or `transformers` `generate`.

decode.py starts it as `python -c <run this file> SPEC` with the working directory set to the tree
whose packages it should import (with `-c` the current directory comes first on `sys.path`), so
the same file drives the current tree and a `records.checkout(commit)` worktree. It imports
nothing from the project at module level and uses only APIs both trees have (`models.hf.load`,
`inference.generate`).

SPEC (JSON): {"kind": "loom" | "transformers", "path": a Hugging Face model directory (written
once by decode.py with models.hf.save), "dtype": "float32" | "bfloat16"}.
Protocol: the worker answers `{"ready": true, ...facts about itself}` (or `{"error": ...}`), then
reads one JSON request per line on stdin, `{"op": "run", "prompts": [[ids]], "new": n,
"variant": v}`, `{"op": "layout", "variant": v, "rows": b}` (Loom: whether such a call runs the
CPU decode layout) or `{"op": "quit"}`, and answers each with one JSON line on the stdout it was
started with; everything else it prints goes to stderr (decode.py keeps it in a log file).
"""

from __future__ import annotations

import inspect
import json
import os
import pathlib
import sys
import time
import traceback

LOOM_VARIANTS = ("default", "layout_on", "layout_off")
TRANSFORMERS_VARIANTS = ("dynamic", "static", "compile")


def _timed(gen, new: int):
    """(t1, tn, ids): seconds for gen(1) and for gen(new), and gen(new)'s token ids."""
    t = time.perf_counter()
    gen(1)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    ids = gen(new)
    return t1, time.perf_counter() - t, ids


class LoomSide:
    """`inference.generate` of the tree this process imports, on weights read by `models.hf.load`.

    Variants: "default" (generate's own choice of the CPU decode layout), "layout_on" /
    "layout_off" (forced; the current tree's `decode_layout=True/False`; a tree from before the
    keyword can only turn the layout off, through `inference.engine.CPU_DECODE_LAYOUT`).
    """

    def __init__(self, spec):
        import jax
        import models.hf
        from inference import engine

        self.jax, self.engine = jax, engine
        self.generate = engine.generate
        self.model, self.cfg = models.hf.load(spec["path"], dtype=spec["dtype"])
        self.keyword = "decode_layout" in inspect.signature(self.generate).parameters

    def info(self):
        import inference

        return {"package": str(pathlib.Path(inference.__file__).resolve().parents[1]), "jax": self.jax.__version__,
                "backend": self.jax.default_backend(), "dtype": self.cfg.dtype,
                "layout_switch": "generate(decode_layout=...)" if self.keyword
                else "inference.engine.CPU_DECODE_LAYOUT"}

    def layout_used(self, variant: str, rows: int) -> bool:
        """Whether `generate` runs the decode steps on the CPU decode layout for this call."""
        padded = 1 << (rows - 1).bit_length()  # generate pads the batch to a power of two
        if variant == "layout_off":
            return False
        if variant == "layout_on":
            return True
        if self.keyword:
            from inference import decode_layout

            return bool(decode_layout.applies(self.model, padded))
        return bool(self.engine.uses_decode_layout(self.model, padded))

    def run(self, prompts, new: int, variant: str):
        if variant not in LOOM_VARIANTS:
            raise ValueError(f"Loom variant {variant!r}; valid: {LOOM_VARIANTS}")
        kw = {}
        if self.keyword:
            kw["decode_layout"] = {"default": None, "layout_on": True, "layout_off": False}[variant]
        elif variant == "layout_on":
            raise ValueError("this tree's generate has no decode_layout keyword: it cannot force the layout on "
                             "(use 'default', which uses it for float32 at batch <= 16)")
        used = self.layout_used(variant, len(prompts))
        saved = getattr(self.engine, "CPU_DECODE_LAYOUT", None)
        if not self.keyword and variant == "layout_off":
            self.engine.CPU_DECODE_LAYOUT = False
        try:
            t1, tn, ids = _timed(lambda n: self.generate(self.model, prompts, max_new_tokens=n, **kw), new)
        finally:
            if saved is not None:
                self.engine.CPU_DECODE_LAYOUT = saved
        return {"t1": t1, "tn": tn, "ids": ids, "layout": used}


class TransformersSide:
    """`AutoModelForCausalLM.generate`, greedy, exactly `new` tokens (`min_new_tokens`, no EOS).

    Variants: "dynamic" (the default `DynamicCache`), "static" (`cache_implementation="static"`),
    "compile" (static cache and the decode steps' forward compiled by `torch.compile`, through
    generate's own `compile_config`; transformers compiles automatically only on GPU-like devices,
    `_compile_all_devices` is its switch for the CPU). `dynamic=False`: one process serves several
    batch sizes, and dynamo would otherwise turn to a slower dynamic-shape graph at the second.
    """

    def __init__(self, spec):
        import torch
        import transformers

        self.torch, self.transformers = torch, transformers
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
        self.model = transformers.AutoModelForCausalLM.from_pretrained(spec["path"], dtype=dtype).eval()
        self.compile_config = transformers.CompileConfig(fullgraph=True, dynamic=False, mode="default")
        self.compile_config._compile_all_devices = True

    def info(self):
        return {"torch": self.torch.__version__, "transformers": self.transformers.__version__,
                "torch_threads": self.torch.get_num_threads(), "class": type(self.model).__name__,
                "dtype": str(self.model.dtype), "attn_implementation": self.model.config._attn_implementation,
                "compile_config": self.compile_config.to_dict()}

    def run(self, prompts, new: int, variant: str):
        torch = self.torch
        if variant not in TRANSFORMERS_VARIANTS:
            raise ValueError(f"transformers variant {variant!r}; valid: {TRANSFORMERS_VARIANTS}")
        kw = {"dynamic": {"disable_compile": True},
              "static": {"cache_implementation": "static", "disable_compile": True},
              "compile": {"cache_implementation": "static", "compile_config": self.compile_config}}[variant]
        input_ids = torch.as_tensor(prompts, dtype=torch.long)
        mask = torch.ones_like(input_ids)

        def gen(n):
            with torch.inference_mode():
                out = self.model.generate(input_ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                          do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
            return out[:, input_ids.shape[1]:].tolist()

        t1, tn, ids = _timed(gen, new)
        return {"t1": t1, "tn": tn, "ids": ids}


def main():
    spec = json.loads(sys.argv[1])
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed (warnings, progress bars) goes to the log, not the protocol

    def reply(obj):
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    try:
        side = {"loom": LoomSide, "transformers": TransformersSide}[spec["kind"]](spec)
        reply({"ready": True, "pid": os.getpid(), "cwd": os.getcwd(), **side.info()})
    except Exception as e:  # noqa: BLE001 - reported to decode.py, which names the side
        reply({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})
        return
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            break
        try:
            if request["op"] == "layout":  # Loom: whether a call of this many rows uses the decode layout
                reply({"layout": side.layout_used(request["variant"], request["rows"])})
            else:
                reply(side.run(request["prompts"], request["new"], request["variant"]))
        except Exception as e:  # noqa: BLE001
            reply({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()})


if __name__ == "__main__":
    main()
