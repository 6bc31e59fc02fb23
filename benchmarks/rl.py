"""GRPO step throughput: Loom's RL loop against TRL's `GRPOTrainer` on the same model and batch.

    .venv/bin/python benchmarks/rl.py                                  # tiny and small; writes the record
    .venv/bin/python benchmarks/rl.py --presets=tiny --rounds=2        # a quick check of the script
    .venv/bin/python benchmarks/rl.py --beta=0.04 --loss_type=dr_grpo  # KL in the loss, another variant

One RL step = one rollout batch (P prompts x G completions, each exactly `--max_new_tokens`
tokens), its rewards and group advantages, then one optimizer update on it (one update per
rollout batch: TRL's num_iterations=1, Loom's rl.epochs=1). Per step the benchmark measures the
rollout (generation) seconds, the rest of the step ("update": rewards, advantages, any scoring
forward passes, the forward/backward and AdamW), and the total; it reports rollout tokens/s
(P*G*max_new_tokens generated tokens / rollout s), update tokens/s (P*G*(prompt_len +
max_new_tokens) tokens / update s), the share of the step's wall time spent generating, and
steps/s. The headline is Loom's steps/s over TRL's, paired per round (> 1: Loom faster).

The two sides (each in a spawned process of its own: benchmarks/train_step.py's workers):

- Loom, rl/train.py's step, full fine-tuning: `rl.rollout.sample_groups` over `nnx.merge` of
  the current parameters (inference.generate: KV cache, the CPU decode layout re-laid for each
  new set of weights, no stop tokens); the trainer's batch (`Rollout.batch`); then
  `rl.train.Learner.learn`, what rl/train.py runs after its rollout: the reference's scoring
  (the frozen start copy's log-probs, for the logged `kl`), `update_inputs` (group
  advantages), and one update jitted from `make_loss_fn` + `train.state.make_train_step` (the
  state donated); at one update per batch the update's forward is the policy's scoring pass
  (`Learner.fused`: `logprob_gap` and entropy come from it).
- TRL 1.16, `GRPOTrainer.train()` run as a user runs it (one call, in a thread of the worker that
  a callback pauses at each step end so rounds can interleave): its generation is
  `transformers` `generate` on the training model (eager, SDPA attention, dynamic KV cache);
  its rollout time is the wall time of `GRPOTrainer._generate_single_turn` (padding the token
  ids, generate, cutting at EOS), the step time the wall time from releasing a step to its
  `on_step_end` (data, generation, rewards, advantages, scoring, forward/backward, AdamW).

Same model: Loom's `tiny` / `small` preset (configs/pretrain.py) at random init, computed in
float32 on both sides by default (--dtype), written with `models.hf.save` and loaded by
`transformers.LlamaForCausalLM`; a probe (the mean log-prob of a fixed completion) is checked to
agree before the first step. Same data: `--prompts` fixed prompts of `--prompt_len` random token
ids (TRL gets them as text through a word-level tokenizer whose token i is "t<i>", so they
tokenize back to the same ids), sampled at temperature 1 with no top-k / top-p on both sides;
the reward is the fraction of a completion's tokens with an even id, computed identically on both
sides, so rewards vary within a group. Neither side can stop early: Loom passes no stop tokens;
TRL's EOS is an extra tokenizer token outside the model's vocabulary (never sampled; the
tokenizer's pad token too) and its generation config has no EOS; both sides assert every
completion has exactly --max_new_tokens tokens.

TRL options, all set explicitly (its defaults differ from Loom's and from each other's papers):
num_generations=G; per_device_train_batch_size=P*G (TRL counts completions);
generation_batch_size=P*G (so steps_per_generation=1); gradient_accumulation_steps=1;
num_iterations=1; max_completion_length=max_new_tokens (TRL 1.16 has no max_prompt_length: every
prompt is exactly prompt_len tokens, nothing is truncated on either side); temperature=1, top_p=1,
top_k=0 (off), min_p=None, repetition_penalty=1; beta (--beta, 0.0 by default, which is also
TRL's default and Loom's configs/rl.py's; with beta > 0 the KL term is k3 on both sides and TRL's
use_bias_correction_kl is off, since Loom's KL term carries no importance ratio); loss_type,
scale_rewards, importance_sampling_level, epsilon and epsilon_high from `LOSS_TYPES` (below);
mask_truncated_completions=False (every completion here is cut by the length: masking them would
train on nothing); use_vllm=False, use_transformers_continuous_batching=False; use_cpu=True,
bf16=False (TRL's default is True; True only with --dtype=bfloat16, bf16 autocast over float32
weights), fp16=False, gradient_checkpointing=False (TRL's default is True; Loom's presets do not
rematerialise); AdamW as configs/rl.py's grpo_arith (lr 1e-3, betas 0.9 / 0.99, eps 1e-8, weight
decay 0, global-norm clip 1.0, constant schedule, no warmup), `optim="adamw_torch_fused"`;
logging, saving and evaluation off, report_to none, shuffle_dataset=False, disable_dropout=True.

Loss types (--loss_type): Loom's `rl.train.VARIANTS[name]` and TRL's equivalent:
  grpo     per-sequence mean of token terms, (r - mean) / (std + 1e-4) group advantages, clip 0.2
           = TRL loss_type="grpo", scale_rewards="group" (both: mean over sequences of the mean
           over each sequence's tokens; TRL's "grpo" is not its default, "dapo" is).
  dr_grpo  sum of token terms / (rows x max_completion_length), r - mean = TRL "dr_grpo",
           scale_rewards="none".
  dapo     token mean, clip 0.2 / 0.28 = TRL "dapo" (its token count is the global batch's, the
           same here). Loom's DAPO variant also zeroes the loss mask of groups whose rewards are
           all equal (dynamic sampling); TRL keeps them (their advantages are 0): the same work,
           a different normaliser when such a group occurs.
  gspo     sequence-level ratio, clip 3e-4 / 4e-4, per-sequence mean = TRL loss_type="grpo",
           importance_sampling_level="sequence".

Differences left in the work (the figures include them): at beta=0 TRL loads no reference model,
while Loom scores the reference every step (the issue asks for `kl` logged at beta 0 too): one
forward pass over the batch that TRL does not do at beta=0 (at beta > 0 both do it). Its time
is in Loom's update time and shown on its own ("scoring s"). (The record of 2026-12-05 before
`Learner.fused` had a second pass, the policy's own scoring, also in Loom's time.)
Loom's sampler is one compiled program (prefill + a while loop of decode steps); TRL's is
eager PyTorch. Compilation (Loom's first step) and --warmup steps are excluded from the timing.

Defaults: P 4 x G 4 = 16 rows (the largest batch the CPU decode layout takes,
inference/decode_layout.MAX_ROWS: the regime of Loom's CPU rollouts at this size), 32 prompt + 32
new tokens, 7 interleaved rounds of 2 steps after 1 warm-up step: about 4-5 minutes for `tiny` and
`small` on 2 cores, most of it `small`.

Writes benchmarks/records/rl_<platform>.json (with the load average before and after each
preset: on a shared machine a busy spell hits both sides, but not always equally); never asserts
on time.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import records  # noqa: E402  (stdlib only: the spawned workers import this module too)
from benchmarks import train_step as ts  # noqa: E402

# Loom variant (rl.train.VARIANTS) -> TRL 1.16 GRPOConfig options with the same loss; the clip
# epsilons are taken from the Loom variant (`trl_loss_options`), so the two cannot drift apart.
LOSS_TYPES = {
    "grpo": dict(loss_type="grpo", importance_sampling_level="token"),
    "dr_grpo": dict(loss_type="dr_grpo", importance_sampling_level="token"),
    "dapo": dict(loss_type="dapo", importance_sampling_level="token"),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence"),
}
# Relative difference allowed between the two sides' probe log-prob (same weights, same tokens,
# float32): a layout bug (q/k RoPE pairs, gate/up) moves it far more.
PROBE_RTOL = {"float32": 1e-5, "bfloat16": 2e-2}
EOS_TEXT = "<eos>"  # TRL's EOS and pad token: id vocab_size, outside the model's vocabulary


def _word(i: int) -> str:
    return f"t{int(i)}"


def fixed_prompts(num: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """`num` prompts of `length` random token ids, the same in every process."""
    import numpy as np

    return np.random.default_rng([seed, 0x9E37]).integers(0, vocab, (num, length)).tolist()


def probe_tokens(prompt: list[int], length: int, vocab: int, seed: int = 0) -> list[int]:
    """A fixed completion of `prompt` (random ids) whose log-prob both sides compute before training."""
    import numpy as np

    return list(prompt) + np.random.default_rng([seed, 0x7F4A]).integers(0, vocab, length).tolist()


def reward(completion) -> float:
    """The task: the fraction of the completion's tokens with an even id (cheap, deterministic, and
    varied within a group of samples from a random model)."""
    return sum(1 for t in completion if int(t) % 2 == 0) / max(len(completion), 1)


def loom_settings(loss_type: str) -> dict:
    """Loom's loss settings for a variant: rl/train.py's `loss_settings` of `rl.algorithm="grpo"`."""
    from rl.train import VARIANTS

    return dict(VARIANTS[loss_type])


def trl_loss_options(loss_type: str) -> dict:
    """TRL's GRPOConfig options for Loom's variant (see LOSS_TYPES and the module docstring)."""
    s = loom_settings(loss_type)
    scale = {"grpo": "group", "dr_grpo": "none"}[s["advantage"]]
    return dict(LOSS_TYPES[loss_type], scale_rewards=scale, epsilon=float(s["clip_low"]),
                epsilon_high=float(s["clip_high"]))


def rl_optimizer() -> dict:
    """configs/rl.py's grpo_arith optimizer (AdamW, constant learning rate, no weight decay) as plain data."""
    from configs import rl

    return rl.get_config("grpo_arith").optimizer.to_dict()


def _check_lengths(completions, rows: int, length: int, side: str) -> None:
    got = sorted({len(c) for c in completions})
    if len(completions) != rows or got != [length]:
        raise RuntimeError(f"{side}: expected {rows} completions of exactly {length} tokens, got {len(completions)} "
                           f"with lengths {got}: the two sides would not generate the same number of tokens")


# --------------------------------------------------------------------------------------------
# Worker processes (benchmarks/train_step.py's Worker and _setup run these): each runner has
# first_step() -> probe log-prob (then runs the first, compiling, step), run() (one timed step,
# its phases in `last`), info.


class LoomRlRunner:
    """rl/train.py's GRPO step in Loom, full fine-tuning on one device (spec: `specs`). No mesh is
    set: on one device rl/train.py's shardings change nothing."""

    def __init__(self, spec: dict):
        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx
        from ml_collections import config_dict

        from models import peft
        from models import transformer as T
        from models.config import ModelConfig
        from rl import losses
        from rl.rollout import sample_groups
        from rl.train import Learner, make_scorer
        from train.optimizer import make_optimizer
        from train.state import TrainState

        self.jax, self.jnp, self.np, self.nnx, self.losses = jax, jnp, np, nnx, losses
        self.sample_groups, self.TrainState = sample_groups, TrainState
        self.spec = spec
        cfg = ModelConfig.from_dict({**spec["model"], "dtype": spec["dtype"]})
        base = T.build(cfg, seed=spec["seed"])
        self.info = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
                     "jax": jax.__version__, "dtype": cfg.dtype}
        if spec.get("export_dir"):  # the weights TRL loads
            import models.hf

            try:
                models.hf.save(base, spec["export_dir"], architecture="LlamaForCausalLM")
            except Exception as e:  # TRL then refuses to start: the comparison needs the same model
                self.info["export_error"] = ts._first_line(e)
        model = peft.apply(base, {"method": "full"}, seed=spec["seed"])
        self.graphdef, trained, frozen = nnx.split(model, peft.trainable_filter("full"), ...)
        params = nnx.to_pure_dict(trained)
        self.frozen = nnx.to_pure_dict(frozen)
        self.ref_params = jax.tree.map(jnp.copy, params)  # rl/train.py's reference under full fine-tuning
        tx, _ = make_optimizer(spec["optimizer"], 1000)
        self.state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params),
                                rng=jax.random.key_data(jax.random.key(spec["seed"])))
        self.settings = loom_settings(spec["loss_type"])
        rl = config_dict.ConfigDict(dict(  # configs/rl.py's rl section, as this benchmark sets it
            algorithm="grpo", group_size=spec["group_size"], max_new_tokens=spec["max_new_tokens"], epochs=1,
            microbatches=1, kl=dict(beta=float(spec["beta"]), estimator="k3", mode="loss"),
            ppo=dict(gamma=1.0, lam=0.95, whiten=True, value_coef=0.1, value_clip=0.2)))
        self.learner = Learner(self.graphdef, self.frozen, tx, self.settings, rl, temperature=1.0,
                               ref_params=self.ref_params)
        self.score = make_scorer(self.graphdef, 1.0)  # the probe only
        self.prompts = fixed_prompts(spec["prompts"], spec["prompt_len"], cfg.vocab_size, spec["seed"])
        self.vocab = cfg.vocab_size
        self.step_index = 0
        self.last: dict = {}

    def probe(self) -> float:
        """Mean log-prob of `probe_tokens`' completion under the current parameters (T = 1)."""
        np = self.np
        n = self.spec["max_new_tokens"]
        ids = np.asarray(probe_tokens(self.prompts[0], n, self.vocab, self.spec["seed"]), np.int32)[None]
        t = ids.shape[1] - 1
        batch = {"inputs_BT": ids[:, :-1], "targets_BT": ids[:, 1:],
                 "positions_BT": np.arange(t, dtype=np.int32)[None], "segment_ids_BT": np.ones((1, t), np.int32),
                 "loss_mask_BT": np.ones((1, t), np.float32)}
        logp, _ = self.score(self.state.params, self.frozen, {k: self.jnp.asarray(v) for k, v in batch.items()})
        return float(np.asarray(logp)[0, -n:].mean())

    def first_step(self) -> float:
        probe = self.probe()
        self.info["probe_logp"] = probe
        self.run()
        return probe

    def run(self) -> None:
        np, spec = self.np, self.spec
        g, n, state = spec["group_size"], spec["max_new_tokens"], self.state
        t0 = time.perf_counter()
        ro = self.sample_groups(self.nnx.merge(self.graphdef, state.params, self.frozen), self.prompts,
                                group_size=g, max_new_tokens=n, temperature=1.0,
                                seed=spec["seed"] * 1_000_003 + self.step_index)
        t_roll = time.perf_counter()
        _check_lengths(ro.completions, len(self.prompts) * g, n, "Loom")
        r = np.array([reward(c) for c in ro.completions], np.float32)
        self.state, m = self.learner.learn(state, ro.batch(prompt_len=spec["prompt_len"], completion_len=n), r)
        t_end = time.perf_counter()  # learn returns host floats: the update has finished
        self.step_index += 1
        self.last = {"rollout_s": t_roll - t0, "score_s": m["score_seconds"], "update_s": t_end - t_roll,
                     "total_s": t_end - t0, "reward_mean": float(r.mean()), "logprob_gap": m["logprob_gap"],
                     "kl": m["kl"], "loss": m["loss"], "entropy": m["entropy"]}
        self.info.setdefault("first_step", dict(self.last))


def word_tokenizer(vocab: int):
    """A `transformers` tokenizer whose token i is the word "t<i>" (i < vocab) and whose EOS / pad is
    one more token, id `vocab`, outside the model's vocabulary: prompts given as text tokenize to
    the intended ids, and no sampled token ends a completion."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {_word(i): i for i in range(vocab)}
    words[EOS_TEXT] = vocab
    tok = Tokenizer(models.WordLevel(words, unk_token=EOS_TEXT))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TEXT, pad_token=EOS_TEXT,
                                                padding_side="left")


def trl_config(spec: dict, output_dir: str):
    """The GRPOConfig of the peer, every option that matters set explicitly (module docstring)."""
    from trl import GRPOConfig

    opt = spec["optimizer"]
    if opt["name"] != "adamw" or opt["schedule"] != "constant" or opt.get("warmup_steps"):
        raise ValueError(f"the TRL peer repeats AdamW at a constant learning rate without warmup; got {opt}")
    rows = spec["prompts"] * spec["group_size"]
    return GRPOConfig(
        output_dir=output_dir, seed=spec["seed"], use_cpu=True, bf16=spec["dtype"] == "bfloat16", fp16=False,
        gradient_checkpointing=False, num_generations=spec["group_size"], per_device_train_batch_size=rows,
        generation_batch_size=rows, gradient_accumulation_steps=1, num_iterations=1,
        max_completion_length=spec["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0, min_p=None,
        repetition_penalty=1.0, generation_kwargs={"eos_token_id": None}, beta=float(spec["beta"]),
        use_bias_correction_kl=False, **trl_loss_options(spec["loss_type"]), mask_truncated_completions=False,
        use_vllm=False, use_transformers_continuous_batching=False, pad_to_multiple_of=None,
        learning_rate=float(opt["lr"]), adam_beta1=float(opt["b1"]), adam_beta2=float(opt["b2"]),
        adam_epsilon=float(opt["eps"]), weight_decay=float(opt["weight_decay"]), max_grad_norm=float(opt["clip_norm"]),
        lr_scheduler_type="constant", warmup_steps=0, optim="adamw_torch_fused", max_steps=10 ** 6,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        log_completions=False, shuffle_dataset=False, disable_dropout=True, dataloader_num_workers=0,
        dataloader_pin_memory=False)


class TrlRunner:
    """TRL 1.16's GRPOTrainer on Loom's exported weights (spec: `specs`). `train()` runs in a daemon
    thread; a callback hands each finished step's timings to `run()` and waits there for the next."""

    def __init__(self, spec: dict):
        import queue
        import threading
        import warnings

        import numpy as np
        import torch
        import transformers
        import trl
        from datasets import Dataset

        warnings.filterwarnings("ignore")
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        if not spec.get("weights_dir"):
            raise RuntimeError("the TRL peer needs Loom's exported weights (the Loom worker could not write them)")
        self.torch, self.np, self.spec = torch, np, spec
        # float32 weights in both dtypes: bfloat16 is TRL's bf16 autocast over them (GRPOConfig.bf16)
        model = transformers.LlamaForCausalLM.from_pretrained(spec["weights_dir"], dtype=torch.float32,
                                                              attn_implementation="sdpa")
        model.generation_config.eos_token_id = None  # config.json has no token ids: nothing of Llama's 2
        model.generation_config.bos_token_id = None
        vocab = model.config.vocab_size
        self.model, self.vocab = model, vocab
        self.prompts = fixed_prompts(spec["prompts"], spec["prompt_len"], vocab, spec["seed"])
        tokenizer = word_tokenizer(vocab)
        texts = [" ".join(map(_word, p)) for p in self.prompts]
        if tokenizer(texts)["input_ids"] != self.prompts:
            raise RuntimeError("the word tokenizer does not give back the prompts' token ids")
        rows, n = len(self.prompts) * spec["group_size"], spec["max_new_tokens"]

        def reward_fn(prompts, completions, completion_ids, **_):
            _check_lengths(completion_ids, rows, n, "TRL")
            return [reward(c) for c in completion_ids]

        self.out_dir = tempfile.mkdtemp(prefix="loom_rl_trl_")
        self.go, self.done = queue.Queue(), queue.Queue()
        self.rollout_s = 0.0
        self.stop = False
        runner = self

        class Gate(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                runner.done.put({"rollout_s": runner.rollout_s, "end": time.perf_counter()})
                runner.rollout_s = 0.0
                runner.go.get()
                if runner.stop:
                    control.should_training_stop = True
                return control

        self.trainer = trl.GRPOTrainer(model=model, reward_funcs=[reward_fn], args=trl_config(spec, self.out_dir),
                                       train_dataset=Dataset.from_dict({"prompt": texts}),
                                       processing_class=tokenizer, callbacks=[Gate()])
        generate = self.trainer._generate_single_turn

        def timed_generate(*a, **k):  # the rollout: token ids in, completions' token ids out
            t = time.perf_counter()
            out = generate(*a, **k)
            runner.rollout_s += time.perf_counter() - t
            _check_lengths(out[0], rows, n, "TRL")
            return out

        self.trainer._generate_single_turn = timed_generate
        self.thread = threading.Thread(target=self._train, daemon=True)
        cfg = self.trainer.args
        self.info = {"device": "cpu", "platform": "cpu", "torch": torch.__version__, "trl": trl.__version__,
                     "transformers": transformers.__version__, "threads": torch.get_num_threads(),
                     "attention": model.config._attn_implementation, "dtype": spec["dtype"],
                     "steps_per_generation": cfg.steps_per_generation,
                     "generation_batch_size": cfg.generation_batch_size,
                     "eos_token_ids": list(self.trainer.eos_token_ids), "ref_model": self.trainer.ref_model is not None}
        self.last: dict = {}

    def _train(self):
        try:
            self.trainer.train()
            self.done.put(RuntimeError("GRPOTrainer.train() returned before the benchmark ended"))
        except BaseException as e:  # noqa: BLE001  (handed to the waiting run())
            self.done.put(e)

    def probe(self) -> float:
        torch, n = self.torch, self.spec["max_new_tokens"]
        ids = torch.tensor([probe_tokens(self.prompts[0], n, self.vocab, self.spec["seed"])])
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[0, :, 0]
        return float(logp[-n:].mean())

    def first_step(self) -> float:
        probe = self.probe()
        self.info["probe_logp"] = probe
        t = time.perf_counter()
        self.thread.start()
        self._finish(t)
        opt = self.trainer.optimizer
        self.info["optimizer"] = {"class": type(getattr(opt, "optimizer", opt)).__name__,
                                  "fused": bool(opt.defaults.get("fused")),
                                  "weight_decay": sorted({g["weight_decay"] for g in opt.param_groups}),
                                  "lr": opt.param_groups[0]["lr"], "betas": list(opt.defaults["betas"])}
        self.info["first_step"] = dict(self.last)
        return probe

    def run(self) -> None:
        t = time.perf_counter()
        self.go.put(True)
        self._finish(t)

    def _finish(self, t0: float) -> None:
        got = self.done.get()
        if isinstance(got, BaseException):
            raise RuntimeError(f"GRPOTrainer failed: {ts._first_line(got)}") from got
        total = got["end"] - t0
        self.last = {"rollout_s": got["rollout_s"], "update_s": total - got["rollout_s"], "total_s": total}

    def close(self) -> None:
        """Ends train() at the next step boundary (the thread is a daemon: process exit ends it anyway)."""
        if self.thread.is_alive():
            self.stop = True
            self.go.put(True)
            self.thread.join(timeout=60)
        shutil.rmtree(self.out_dir, ignore_errors=True)


def _rl_steps(n: int) -> list[dict]:
    """In a worker: `n` timed RL steps, each step's phases (seconds) as the runner measured them."""
    out = []
    for _ in range(n):
        ts._RUNNER.run()
        out.append(dict(ts._RUNNER.last))
    return out


# --------------------------------------------------------------------------------------------
# The benchmark


def specs(args, preset: str, export_dir: str) -> dict[str, dict]:
    """name -> worker spec; Loom first (it writes the weights TRL loads)."""
    cfg = ts.preset_config(preset)
    model = dict(cfg["model"])
    need = args.prompt_len + args.max_new_tokens
    if need > model["max_seq_len"]:
        raise SystemExit(f"--prompt_len={args.prompt_len} + --max_new_tokens={args.max_new_tokens} = {need} exceeds "
                         f"{preset}'s max_seq_len={model['max_seq_len']}")
    common = dict(model=model, optimizer=rl_optimizer(), dtype=args.dtype, seed=0, warmup=args.warmup,
                  prompts=args.prompts, group_size=args.group_size, prompt_len=args.prompt_len,
                  max_new_tokens=args.max_new_tokens, beta=args.beta, loss_type=args.loss_type)
    out = {"loom": dict(common, runner="benchmarks.rl:LoomRlRunner", impl="loom", export_dir=export_dir)}
    if not args.no_trl:
        out["trl"] = dict(common, runner="benchmarks.rl:TrlRunner", impl="trl", weights_dir=export_dir)
    return out


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


def run_preset(args, preset: str) -> dict:
    tmp = tempfile.mkdtemp(prefix="loom_rl_bench_")
    load_before = _load()
    t0 = time.perf_counter()
    try:
        print(f"\n## {preset}: {args.prompts} prompts x {args.group_size} completions, {args.prompt_len} prompt + "
              f"{args.max_new_tokens} new tokens (load average {load_before})", flush=True)
        workers = ts._start(specs(args, preset, tmp))
        live = {n: w for n, w in workers.items() if not w.error}
        if "loom" not in live:
            raise SystemExit(f"the Loom worker of {preset} did not start: {workers['loom'].error}")
        print(f"  {args.rounds} interleaved rounds x {args.steps} step(s) per implementation", flush=True)
        samples = records.interleaved({n: (lambda w=w: w.call(_rl_steps, args.steps)) for n, w in live.items()},
                                      args.rounds, warmup=0, pause=args.pause)
        return {"config": {"preset": preset, "model": specs(args, preset, tmp)["loom"]["model"]},
                "samples": samples, "load_before": load_before, "load_after": _load(),
                "wall_s": time.perf_counter() - t0,
                "workers": {n: {"spec": {k: v for k, v in w.spec.items() if k not in ("model", "optimizer")},
                                "info": w.info, "error": w.error} for n, w in workers.items()}}
    finally:
        for w in locals().get("workers", {}).values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)


def per_round(res: dict, name: str, key: str) -> list[float]:
    """Each round's mean of a per-step figure (seconds)."""
    return [sum(s[key] for s in r) / len(r) for r in res["samples"][name]]


def tokens(args) -> tuple[int, int]:
    """(generated tokens, prompt + completion tokens) per step."""
    rows = args.prompts * args.group_size
    return rows * args.max_new_tokens, rows * (args.prompt_len + args.max_new_tokens)


def preset_table(args, res: dict) -> dict:
    gen, seq = tokens(args)
    names = list(res["samples"])
    cols = ["impl", "step s", "steps/s", "rollout s", "rollout tokens/s", "update s", "of which scoring s",
            "update tokens/s", "share of wall time generating", "vs TRL (steps/s)"]
    rows = []
    for name, w in res["workers"].items():
        if w["error"]:
            rows.append([name, f"failed: {w['error']}"] + [""] * (len(cols) - 2))
            continue
        total, roll, upd = (per_round(res, name, k) for k in ("total_s", "rollout_s", "update_s"))
        has_score = "score_s" in res["samples"][name][0][0]
        rows.append([name, records.spread(records.summarize(total), "{:.2f}"),
                     records.spread(records.summarize([1 / s for s in total]), "{:.3f}"),
                     records.spread(records.summarize(roll), "{:.2f}"),
                     records.spread(records.summarize([gen / s for s in roll]), "{:,.0f}"),
                     records.spread(records.summarize(upd), "{:.2f}"),
                     records.spread(records.summarize(per_round(res, name, "score_s")), "{:.2f}") if has_score else "-",
                     records.spread(records.summarize([seq / s for s in upd]), "{:,.0f}"),
                     records.spread(records.summarize([r / t for r, t in zip(roll, total)]), "{:.0%}"),
                     records.spread(records.ratio_summary(per_round(res, "trl", "total_s"), total), "{:.2f}x")
                     if "trl" in names else "-"])
    m = res["config"]["model"]
    n_rounds = len(res["samples"]["loom"])
    caption = (f"{res['config']['preset']} ({m['num_layers']} layers, d {m['hidden_size']}, vocab {m['vocab_size']}), "
               f"{args.dtype}: {args.prompts} prompts x G {args.group_size}, {args.prompt_len} prompt + "
               f"{args.max_new_tokens} new tokens, loss {args.loss_type}, beta {args.beta:g}; median (min–max) over "
               f"{n_rounds} interleaved rounds of {args.steps} step(s); load average {res['load_before']} before, "
               f"{res['load_after']} after; vs TRL > 1: Loom faster")
    return records.table(caption, cols, rows)


def headline_table(args, results: dict) -> dict:
    """Per preset: the paired ratios Loom / TRL of steps/s, rollout tokens/s and update tokens/s."""
    rows = []
    for preset, res in results.items():
        if "trl" not in res["samples"]:
            continue
        ratio = {k: records.ratio_summary(per_round(res, "trl", k), per_round(res, "loom", k))
                 for k in ("total_s", "rollout_s", "update_s")}
        rows.append([preset] + [records.spread(ratio[k], "{:.2f}x") for k in ("total_s", "rollout_s", "update_s")])
    return records.table("Loom over TRL GRPOTrainer, paired per round (> 1: Loom faster)",
                         ["preset", "steps/s", "rollout tokens/s", "update tokens/s"], rows)


def check_rows(args, results: dict) -> list[list]:
    """The probe log-prob of both sides from the same weights, and the first step's figures."""
    rows = []
    tol = PROBE_RTOL.get(args.dtype, 1e-3)
    for preset, res in results.items():
        ws = {n: w for n, w in res["workers"].items() if not w["error"]}
        if "loom" not in ws or "trl" not in ws:
            continue
        a, b = ws["loom"]["info"]["probe_logp"], ws["trl"]["info"]["probe_logp"]
        rel = abs(a - b) / abs(a)
        first = ws["loom"]["info"]["first_step"]
        rows.append([preset, f"{a:.6f}", f"{b:.6f}", f"{rel:.1e}", f"{tol:.0e}", "ok" if rel <= tol else "MISMATCH",
                     f"{first['logprob_gap']:.1e}", f"{first['reward_mean']:.3f}"])
    return rows


def settings_rows(results: dict) -> list[list]:
    rows = []
    for preset, res in results.items():
        w = res["workers"].get("trl")
        if not w or w["error"]:
            continue
        i = w["info"]
        o = i["optimizer"]
        rows.append([preset, f"{o['class']} ({'fused' if o['fused'] else 'not fused'}), lr {o['lr']:g}, betas "
                     f"{tuple(o['betas'])}, weight decay {o['weight_decay']}", i["attention"], i["threads"],
                     i["generation_batch_size"], i["steps_per_generation"], str(i["eos_token_ids"]),
                     "yes" if i["ref_model"] else "no", f"{i['first_step_s']:.1f}",
                     f"{res['workers']['loom']['info']['first_step_s']:.1f}"])
    return rows


def method_text(args, results: dict) -> str:
    opts = trl_loss_options(args.loss_type)
    s = loom_settings(args.loss_type)
    return (
        f"One GRPO step each side: {args.prompts} fixed prompts of {args.prompt_len} random token ids, G = "
        f"{args.group_size} completions each of exactly {args.max_new_tokens} tokens (no stop token on either side: "
        "asserted) sampled at temperature 1 without top-k / top-p, reward = the fraction of a completion's tokens "
        "with an even id, group advantages, one AdamW update (configs/rl.py's grpo_arith: lr 1e-3, betas 0.9 / "
        f"0.99, no weight decay, clip 1.0, constant). Model: Loom's preset at random init in {args.dtype}, exported "
        "with `models.hf.save` and loaded by `transformers.LlamaForCausalLM` (a probe log-prob is checked to agree). "
        f"Loss `{args.loss_type}`: Loom `rl.train.VARIANTS['{args.loss_type}']` ({s['advantage']} advantage, "
        f"{s['aggregation']} aggregation, {s['level']}-level ratio, clip {s['clip_low']:g} / {s['clip_high']:g}), TRL "
        f"loss_type={opts['loss_type']!r}, scale_rewards={opts['scale_rewards']!r}, importance_sampling_level="
        f"{opts['importance_sampling_level']!r}, epsilon={opts['epsilon']:g}, epsilon_high={opts['epsilon_high']:g}; "
        f"beta = {args.beta:g} on both sides (k3 in the loss; TRL use_bias_correction_kl=False). Loom: rl/train.py's "
        "pieces (`rl.rollout.sample_groups` = `inference.generate` with its CPU decode layout re-laid for each new "
        "set of weights; `rl.train.make_scorer` for the policy's and the reference's log-probs; one update jitted "
        "from `rl.train.make_loss_fn` + `train.state.make_train_step`). TRL 1.16: `GRPOTrainer.train()` with "
        f"num_generations={args.group_size}, per_device_train_batch_size = generation_batch_size = "
        f"{args.prompts * args.group_size} (completions), gradient_accumulation_steps=1, num_iterations=1, "
        f"max_completion_length={args.max_new_tokens}, temperature 1, top_p 1, top_k 0, use_cpu, no bf16 unless the "
        "dtype is bf16, no gradient checkpointing, no vLLM, optim adamw_torch_fused, logging / saving / evaluation "
        "off; its rollout is `_generate_single_turn` (transformers `generate`, eager, SDPA, dynamic cache), its step "
        "the wall time to the step's `on_step_end`. Rollout tokens/s = generated tokens / rollout s; update tokens/s "
        "= prompt + completion tokens / (step − rollout) s; both sides' update time includes rewards and advantages. "
        "Work that differs: at num_iterations=1 and beta 0 TRL runs no scoring pass (its old log-probs come from "
        "the training forward, and it loads no reference), while Loom's loop scores the batch twice before the "
        "update (policy and reference, for the importance ratio, `logprob_gap` and the logged `kl`): that time is "
        "in Loom's update and shown as `scoring s`. Each side runs in a spawned process of its own; after Loom's "
        f"compiling first step and {args.warmup} warm-up step(s) each, they are timed in {args.rounds} interleaved "
        f"rounds of {args.steps} step(s) with a {args.pause:g} s pause between sides; a round's figure is the mean "
        "of its steps; cells are the median (min–max) over rounds; ratios are paired per round. The load average "
        "(1, 5, 15 min) before and after each preset is in its caption: this machine may be shared.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small", help="pretraining presets (configs/pretrain.py)")
    ap.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (>= 5 for a record)")
    ap.add_argument("--steps", type=int, default=2, help="RL steps per implementation per round")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (compiling) one")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between implementations (idle thread pools)")
    ap.add_argument("--prompts", type=int, default=4, help="P: prompts per rollout batch")
    ap.add_argument("--group_size", type=int, default=4, help="G: completions per prompt (>= 2)")
    ap.add_argument("--prompt_len", type=int, default=32, help="tokens per prompt")
    ap.add_argument("--max_new_tokens", type=int, default=32, help="tokens per completion (every completion has "
                    "exactly this many)")
    ap.add_argument("--beta", type=float, default=0.0, help="KL coefficient (k3 in the loss) on both sides")
    ap.add_argument("--loss_type", default="grpo", help=f"one of {tuple(LOSS_TYPES)} (Loom's variant names)")
    ap.add_argument("--dtype", default="float32", help="compute dtype of both sides: float32, or bfloat16 (TRL: "
                    "bf16 autocast over float32 weights)")
    ap.add_argument("--no-trl", dest="no_trl", action="store_true", help="Loom only")
    ap.add_argument("--name", default="", help="record name (default: rl_<platform>)")
    ap.add_argument("--records-dir", default=str(records.RECORDS), help="where the JSON record goes")
    args = ap.parse_args(argv)
    presets = args.presets.split(",")
    if args.loss_type not in LOSS_TYPES:
        ap.error(f"--loss_type: {args.loss_type!r} is not one of {tuple(LOSS_TYPES)}")
    if args.dtype not in ts.SHORT:
        ap.error(f"--dtype: {args.dtype!r} is not one of {tuple(ts.SHORT)}")
    for flag in ("rounds", "steps", "prompts", "prompt_len", "max_new_tokens"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag}={getattr(args, flag)} must be >= 1")
    if args.group_size < 2:
        ap.error(f"--group_size={args.group_size}: group advantages need G >= 2")
    if args.beta < 0:
        ap.error(f"--beta={args.beta} must be >= 0")
    if not args.no_trl:
        try:
            import trl  # noqa: F401
        except ImportError as e:
            raise SystemExit(f"TRL is not importable ({e}): `pip install trl` (1.16 was measured), or --no-trl")

    t0 = time.perf_counter()
    results = {p: run_preset(args, p) for p in presets}
    tables = [preset_table(args, res) for res in results.values()]
    if any("trl" in res["samples"] for res in results.values()):
        tables.insert(0, headline_table(args, results))
    check = records.table(f"The same model on both sides (probe: mean log-prob of a fixed {args.max_new_tokens}-token "
                          "completion before training), and Loom's first step",
                          ["preset", "Loom probe log-prob", "TRL probe log-prob", "relative difference", "tolerance",
                           "check", "Loom logprob_gap", "Loom reward_mean"], check_rows(args, results))
    settings = records.table("TRL as run: optimizer after its first step, attention, torch threads, generation "
                             "batch, EOS ids (outside the vocabulary), reference model; first step s (Loom: incl. "
                             "compilation)",
                             ["preset", "optimizer", "attention", "threads", "generation_batch_size",
                              "steps_per_generation", "eos_token_ids", "reference model", "TRL first step s",
                              "Loom first step s"], settings_rows(results))
    tables += [t for t in (check, settings) if t["rows"]]
    for t in tables:
        records.print_table(t)
    wall = time.perf_counter() - t0
    print(f"\nwall time {wall:.0f} s", flush=True)
    import jax

    platform = jax.default_backend()
    records.write_record(args.name or f"rl_{platform}", title=f"GRPO step: Loom vs TRL GRPOTrainer ({platform})",
                         tables=tables, method=method_text(args, results), params=vars(args),
                         results={"wall_s": wall, "presets": results}, directory=pathlib.Path(args.records_dir))
    mismatches = [r[0] for r in check["rows"] if r[5] == "MISMATCH"]
    if mismatches:
        print(f"\nPROBE MISMATCH for {mismatches}: TRL and Loom do not run the same model; the timings compare "
              "different work.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
