"""Evaluation suites: `python -m evals.run --config=configs/eval.py:<suite> --checkpoint=<workdir or HF dir>`.

Suites:
  demo (default; alias smoke)  one task of each kind on data it makes itself: perplexity on a few
                               held-out stdlib files, multiple choice and generation on synthetic
                               items, a synthetic task with its verifier. Seconds on a tiny model.
  synthetic                    the built-in synthetic tasks (data/synthetic.py), greedy generation
                               scored by each task's exact verifier.
  ppl                          perplexity and bits per byte on the embedded corpus's validation split.
  mmlu, hellaswag, arc,        one lm-evaluation-harness-style multiple-choice task on local JSONL /
  truthfulqa                   Parquet files: set --config.tasks.<task>.source.path (and for MMLU's
                               5-shot prompts, --config.tasks.mmlu.fewshot_source.path to the dev split).
  generation                   a generation task on a local JSONL file with `prompt` and `answer`
                               fields, scored by exact match, BLEU and ROUGE.

Every task has the same fields (`task()` below), so any of them can be overridden, e.g.
`--config.tasks.addition.num_shots=0 --config.limit=20 --config.tasks.ppl.enabled=False`.
"""

from ml_collections import config_dict
from ml_collections.config_dict import placeholder

PRESETS = ("demo", "smoke", "synthetic", "ppl", "mmlu", "hellaswag", "arc", "truthfulqa", "generation")
SYNTHETIC_TASKS = ("addition", "multiplication", "copy", "reverse", "sort_digits", "count")


def source(**overrides):
    """Where a task's items come from; every key present so each can be overridden."""
    d = dict(
        format="embedded",  # text | jsonl | parquet | hf | array_record | tfds | embedded | synthetic ("" = none)
        path="",  # globs (comma-separated) or a directory; tfds: the dataset name; synthetic: the task name
        split="validation",  # embedded (train | validation), tfds, hf
        text_field="",  # a field every record must have ("" = the task's: text, prompt, question...)
        text_unit="file",  # text: a document is a "file", "line" or "paragraph"
        data_dir="",  # tfds data_dir
        validation_fraction=0.02,  # embedded: the held-out share (must match training's to stay held out)
        strict=False,  # raise on the first bad record instead of skipping it
        num_examples=100,  # synthetic: items generated
        seed=0,  # synthetic: generator seed
        size=0,  # synthetic: digits per operand / characters per string (0 = the task's default)
    )
    d.update(overrides)
    return config_dict.ConfigDict(d)


def task(kind, **overrides):
    """One task; fields a kind does not use are ignored."""
    d = dict(
        kind=kind,  # "perplexity" | "multiple_choice" | "generation"
        enabled=True,  # False skips the task
        limit=0,  # items (documents) evaluated, the first ones read; 0 = all
        add_bos=True,  # start every sequence with the tokenizer's BOS (EOS when it has none)
        source=source(),  # the evaluated items
        # perplexity
        max_length=0,  # window of input tokens; 0 = the model's max_seq_len
        stride=0,  # new tokens scored per window after the first; 0 = max_length (disjoint windows)
        # multiple_choice and generation
        format="plain",  # multiple_choice: mmlu | hellaswag | arc | truthfulqa_mc1 | plain (query, choices, gold)
        num_shots=0,  # few-shot examples before each item
        fewshot_source=source(format=""),  # where shots come from; format "" = the evaluated items minus the current
        sampler="random",  # "random" (seeded per item) | "first_n" (the pool's first k, MMLU's harness default)
        fewshot_seed=1234,  # seed of the "random" sampler (the harness's default seed)
        description=placeholder(str),  # text before the shots; unset = the format's (MMLU: "The following are ...")
        target_delimiter=" ",  # between a prompt and its answer (multiple choice: before every choice)
        fewshot_delimiter="\n\n",  # after each shot
        # generation
        prompt_template="{prompt}",  # the prompt: str.format over the record's fields
        answer_field="answer",  # reference answer(s): a string or a list of strings
        metrics=("exact_match", "bleu", "rouge"),  # any of exact_match, bleu, rouge, verified (synthetic only)
        normalize=("whitespace",),  # exact match: lower, punctuation, articles, whitespace (after strip)
        max_new_tokens=64,  # tokens generated; 0 = the synthetic task's longest answer + 2
        stop=("\n\n",),  # the output is cut at the first of these strings
        temperature=0.0,  # 0 = greedy
    )
    d.update(overrides)
    return config_dict.ConfigDict(d)


def _synthetic_task(name, n=100, **overrides):
    kw = dict(source=source(format="synthetic", path=name, num_examples=n), metrics=("verified", "exact_match"),
              num_shots=3, target_delimiter="", fewshot_delimiter="\n", stop=("\n",), max_new_tokens=0)
    kw.update(overrides)
    return task("generation", **kw)


def _mc_task(fmt, **overrides):
    return task("multiple_choice", format=fmt, source=source(format="jsonl", split="validation"), **overrides)


def _tasks(preset):
    if preset in ("demo", "smoke"):
        return {
            "ppl": task("perplexity", limit=3),
            "addition_mc": task("multiple_choice", source=source(format="synthetic", path="addition", num_examples=20),
                                num_shots=2, target_delimiter="", fewshot_delimiter="\n"),
            "copy_gen": _synthetic_task("copy", 20, metrics=("exact_match", "bleu", "rouge")),
            "addition": _synthetic_task("addition", 20),
        }
    if preset == "synthetic":
        return {name: _synthetic_task(name) for name in SYNTHETIC_TASKS}
    if preset == "ppl":
        return {"stdlib": task("perplexity")}
    if preset == "mmlu":  # 5-shot from the dev split, first 5 of the subject, as the harness
        return {"mmlu": _mc_task("mmlu", num_shots=5, sampler="first_n",
                                 fewshot_source=source(format="jsonl", split="dev"))}
    if preset == "hellaswag":
        return {"hellaswag": _mc_task("hellaswag")}
    if preset == "arc":
        return {"arc": _mc_task("arc")}
    if preset == "truthfulqa":  # the prompt already holds six QA examples
        return {"truthfulqa_mc1": _mc_task("truthfulqa_mc1")}
    if preset == "generation":
        return {"generation": task("generation", source=source(format="jsonl"))}
    raise AssertionError(preset)


def get_config(arg=None):
    preset = arg or "demo"
    if preset not in PRESETS:
        raise ValueError(f"unknown eval suite {preset!r}; valid suites: {PRESETS}")
    c = config_dict.ConfigDict()
    c.suite = preset  # names the default output directory
    c.output_dir = placeholder(str)  # unset: <checkpoint>/evals/<suite>
    c.step = placeholder(int)  # a workdir's checkpoint step; unset = the newest
    c.dtype = placeholder(str)  # compute dtype override ("float32" | "bfloat16"); unset = the checkpoint's
    c.quantize = "none"  # weight-only quantization at load time: "none" | "int8" | "int4"
    c.tokenizer = placeholder(str)  # tokenizer file or directory; unset = the checkpoint's own
    c.limit = 0  # caps every task's items (0 = each task's own limit): quick looks
    c.seed = 0  # sampling seed of generation tasks with temperature > 0
    c.max_tokens_per_batch = 0  # padded tokens per scoring pass (logits: this x vocab x 4 bytes); 0 = ~1 GiB of logits
    c.generation_batch_size = 32  # prompts decoded together
    c.write_samples = True  # per-item inputs and outputs to <output_dir>/samples/<task>.jsonl
    c.progress = True  # progress bar on a terminal, log lines with rate and ETA otherwise
    c.tasks = config_dict.ConfigDict(_tasks(preset), sort_keys=False)  # named tasks, run in this order
    return c
