"""Length generalisation of the position schemes: train at L, report perplexity at L, 2L and 4L.

    python -m evals.length_generalization --workdir=runs/length_generalization
    python -m evals.length_generalization --workdir=W --schemes=alibi,rope --train_len=128 --steps=300 \\
        --override=--config.model.num_layers=2

For each `model.position_embedding` scheme (models/positions.py: rope, learned, sinusoidal, alibi,
none) a model of the pretraining preset `--preset` is trained by `python -m train.pretrain` (a
subprocess: evals never import `train`) on rows of L = `--train_len` tokens of the embedded
corpus, every scheme with the same shape, data order, seed and optimizer. `model.max_seq_len` is
4L for all of them, so the learned table has 4L rows, of which training only ever reads the first
L (the others keep their initial values: what a learned table knows past its training length).
The sinusoidal run scales the token embeddings by sqrt(hidden_size), as Vaswani et al. do, so the
fixed table (entries of size 1) does not drown embeddings initialised at std 0.02.

Each trained model is then scored with evals/long_context.py's machinery (the same held-out
pieces of about 4L tokens, each scored in disjoint windows of n tokens, so every length predicts
the same tokens and only the context differs) at n = L, 2L, 4L: a scheme that extrapolates keeps
its perplexity (or improves, having more context) past L; one that does not, explodes.

Outputs in `--workdir`: one run directory per scheme (`<workdir>/<scheme>`, a complete Loom
workdir), `length_generalization.json` (the `ContextReport` format: lengths, the perplexity of
each scheme at each length, plus each run's overrides and final losses), `length_generalization.png`
(perplexity against context length, a line per scheme), and the table on stdout. Rerunning resumes:
finished runs are not retrained and measured schemes are not rescored.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import subprocess
import sys
from typing import Sequence

from configs.cli import ConfigError, quiet_library_logs
from data.sources import SourceSpec, read_all
from evals.long_context import ContextReport, heldout_pieces, report_lengths
from inference.loading import load_checkpoint

SCHEMES = ("rope", "learned", "sinusoidal", "alibi", "none")  # models.config.POSITION_EMBEDDINGS
REPORT_FILE = "length_generalization.json"
PLOT_FILE = "length_generalization.png"
MULTIPLES = 4  # report L, 2L, ..., MULTIPLES x L
REPO = pathlib.Path(__file__).resolve().parents[1]


def run_overrides(scheme: str, *, preset: str, train_len: int, steps: int, seed: int,
                  overrides: Sequence[str] = ()) -> list[str]:
    """The `train.pretrain` flags of one scheme's run (after the preset): the scheme, rows of
    `train_len`, max_seq_len = MULTIPLES x train_len, the sinusoidal embedding scale, no samples;
    `overrides` (e.g. a smaller model) come last and win."""
    flags_ = [f"--config.model.position_embedding={scheme}", f"--config.data.seq_len={train_len}",
              f"--config.model.max_seq_len={MULTIPLES * train_len}", f"--config.train.steps={steps}",
              f"--config.train.seed={seed}", "--config.train.num_samples=0"]
    if scheme == "sinusoidal":
        flags_.append(f"--config.model.embed_scale={math.sqrt(_hidden_size(preset, overrides))!r}")
    return flags_ + list(overrides)


def _hidden_size(preset: str, overrides: Sequence[str]) -> int:
    """The run's hidden size: the last `model.hidden_size` override, or the preset's."""
    for o in reversed(list(overrides)):
        key, _, value = o.lstrip("-").partition("=")
        if key == "config.model.hidden_size":
            return int(value)
    from configs.pretrain import get_config

    return int(get_config(preset).model.hidden_size)


def train_run(run_dir: pathlib.Path, preset: str, flags_: Sequence[str]) -> None:
    """`python -m train.pretrain` into `run_dir` (it resumes, or returns at once when complete)."""
    cmd = [sys.executable, "-m", "train.pretrain", f"--config=configs/pretrain.py:{preset}", f"--workdir={run_dir}",
           *flags_]
    logging.info("training: %s", " ".join(cmd[1:]))
    proc = subprocess.run(cmd, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"training {run_dir.name} failed (exit {proc.returncode}): {' '.join(cmd[1:])}")


def final_losses(run_dir: pathlib.Path) -> dict[str, float]:
    """The run's first and last logged train loss and its first (step 0: the initial model) and
    last held-out loss (metrics.jsonl)."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [m["loss"] for m in lines if m.get("loss") is not None]
    evals = [m["eval_loss"] for m in lines if m.get("eval_loss") is not None]
    out = {}
    if train:
        out.update(first_loss=train[0], final_loss=train[-1])
    if evals:
        out.update(initial_eval_loss=evals[0], final_eval_loss=evals[-1])
    return out


def heldout_texts():
    """The embedded corpus's validation documents (the runs' held-out split)."""
    return (rec["text"] for rec in read_all(SourceSpec("stdlib", "embedded", split="validation")))


def plot(report: ContextReport, path: pathlib.Path, train_len: int) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for kind in report.kinds:
        if report.has(kind):
            ppl = report.data["perplexity"][kind]
            ax.plot(report.lengths, [ppl[str(n)] for n in report.lengths], "o-", label=kind, lw=1.5, ms=4)
    ax.axvline(train_len, color="grey", ls="--", lw=1, label=f"trained length L={train_len}")
    ax.set_xscale("log", base=2)
    values = [v for kind in report.kinds if report.has(kind) for v in report.data["perplexity"][kind].values()]
    if values and max(values) > 3 * min(values):  # an exploding scheme: a log axis keeps the others readable
        ax.set_yscale("log")
    ax.set_xticks(report.lengths, [str(n) for n in report.lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("length generalisation of position schemes")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run(workdir: str | pathlib.Path, *, schemes: Sequence[str] = SCHEMES, preset: str = "tiny", train_len: int = 128,
        steps: int = 300, eval_sequences: int = 16, seed: int = 0, overrides: Sequence[str] = ()) -> ContextReport:
    """Trains one model per scheme at `train_len` and scores each at L, 2L, 4L (the module doc)."""
    bad = [s for s in schemes if s not in SCHEMES]
    if bad or not schemes:
        raise ConfigError(f"schemes {list(schemes)} must be a non-empty list from {SCHEMES}")
    if len(set(schemes)) != len(schemes):
        raise ConfigError(f"schemes {list(schemes)} name a scheme twice")
    if train_len < 8 or steps < 1 or eval_sequences < 1:
        raise ConfigError(f"train_len={train_len} (>= 8), steps={steps} (>= 1) and eval_sequences={eval_sequences} "
                          f"(>= 1) are out of range")
    workdir = pathlib.Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    max_len = MULTIPLES * train_len
    lengths = report_lengths(train_len, max_len)
    runs = {}
    for scheme in schemes:
        flags_ = run_overrides(scheme, preset=preset, train_len=train_len, steps=steps, seed=seed, overrides=overrides)
        train_run(workdir / scheme, preset, flags_)
        runs[scheme] = {"overrides": flags_, **final_losses(workdir / scheme)}

    # a resumed report keeps the perplexities of runs trained with the same flags, on as many pieces
    old_path = workdir / REPORT_FILE
    old = json.loads(old_path.read_text()) if old_path.is_file() else {}
    report = None
    for scheme in schemes:
        model, tokenizer, info = load_checkpoint(workdir / scheme, dtype="float32")
        if report is None:  # the runs share the preset's tokenizer: one set of pieces for all
            pieces = heldout_pieces(heldout_texts(), tokenizer, max_len, eval_sequences)
            if not pieces:
                raise ConfigError(f"no held-out document has {max_len} tokens (4 x train_len) to score")
            meta = {"train_len": train_len, "max_seq_len": max_len, "preset": preset, "train_steps": steps,
                    "scoring": "disjoint windows of n tokens over the same held-out pieces, float32", "runs": runs}
            report = ContextReport(workdir, tokenizer, pieces, lengths, meta, kinds=schemes, filename=REPORT_FILE)
        if (old.get("pieces") != len(report.pieces)
                or old.get("runs", {}).get(scheme, {}).get("overrides") != runs[scheme]["overrides"]):
            report.data["perplexity"].pop(scheme, None)
        if not report.has(scheme):
            logging.info("scoring %s at %s", scheme, lengths)
            report.measure(scheme, model, step=info.get("step"))
        del model
    plot(report, workdir / PLOT_FILE, train_len)
    return report


def main(argv):
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    quiet_library_logs()
    try:
        report = run(_WORKDIR.value, schemes=_SCHEMES.value, preset=_PRESET.value, train_len=_TRAIN_LEN.value,
                     steps=_STEPS.value, eval_sequences=_EVAL_SEQUENCES.value, seed=_SEED.value,
                     overrides=_OVERRIDE.value)
    except (ConfigError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report.table())
    print(f"wrote {report.path} and {report.path.with_name(PLOT_FILE)}")


if __name__ == "__main__":
    # flags are defined only when run as a program, so tests and other programs can import run()
    from absl import app, flags

    from configs.cli import parse_flags

    _WORKDIR = flags.DEFINE_string("workdir", None, "Where the runs, the JSON report and the plot go.", required=True)
    _SCHEMES = flags.DEFINE_list("schemes", list(SCHEMES), f"Position schemes to compare, from {SCHEMES}.")
    _PRESET = flags.DEFINE_string("preset", "tiny", "Pretraining preset (configs/pretrain.py) every run starts from.")
    _TRAIN_LEN = flags.DEFINE_integer("train_len", 128, "L: tokens per training row; perplexity is reported at L, "
                                                        "2L and 4L.")
    _STEPS = flags.DEFINE_integer("steps", 300, "Training steps per scheme.")
    _EVAL_SEQUENCES = flags.DEFINE_integer("eval_sequences", 16, "Held-out pieces of 4L tokens scored at every length.")
    _SEED = flags.DEFINE_integer("seed", 0, "train.seed of every run (initialisation and data order).")
    _OVERRIDE = flags.DEFINE_multi_string("override", [], "Extra train.pretrain flags for every run, e.g. "
                                                          "--override=--config.model.num_layers=2 (repeatable).")
    app.run(main, flags_parser=parse_flags)
