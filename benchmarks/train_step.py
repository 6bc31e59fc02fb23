"""Train-step throughput and MFU: Loom against PyTorch + transformers on the same shape.

    .venv/bin/python benchmarks/train_step.py                         # tiny and small, f32 and bf16, + PyTorch
    .venv/bin/python benchmarks/train_step.py --presets=tiny --rounds=2   # a quick check of the script
    .venv/bin/python benchmarks/train_step.py --presets=small --no-torch
    python benchmarks/train_step.py --presets=1b --dtypes=bfloat16 --batch=8 --remat=full \
        --attention=pallas,xla                                       # one GPU (benchmarks/gpu_session.sh)

Every implementation runs in a process of its own, started from the same initial weights: Loom's
jitted train step (one device, AdamW, the state donated as train/pretrain.py does) in the
preset's compute dtype(s), and the peer, PyTorch with `transformers.LlamaForCausalLM` of the same
shape, as someone who knows it would run it: float32 and bf16 autocast, eager and
`torch.compile`, `torch.optim.AdamW(fused=True)` where this torch supports it (else foreach; the
record says which), SDPA attention, gradient checkpointing when Loom rematerialises. Loom's
initial parameters are written with `models.hf.save` and loaded by every PyTorch process, and the
first step's loss of each PyTorch variant is checked against Loom's in the same dtype.

After compilation and warm-up, the implementations are timed in interleaved rounds (round 1 runs
every implementation for --steps steps, then round 2, ...; `benchmarks/records.py`), so a slow
spell of a shared machine hits all of them alike. Each row reports the median and min-max over
the rounds of the mean step time, tokens/s, model FLOP/s, MFU, and the paired per-round ratio of
the best PyTorch variant's step time to this row's (> 1: faster than PyTorch at its best).

MFU = model FLOPs (6N + attention, no remat recompute; `models.config.flops_per_token`) per
second over a peak. On a CPU the peak is the measured matmul peak of the same dtype (f32, and
bf16 inputs with f32 accumulation), as training's `mfu` metric is. On a GPU/TPU the MFU is
against the chip's spec-sheet peak (`train.flops.SPEC_PEAK_TFLOPS`), with the measured peak (after
a warm-up) as a second column. Writes benchmarks/records/train_step_<platform>.json; never
asserts on time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib
import multiprocessing
import os
import pathlib
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import records  # noqa: E402  (stdlib only: spawned workers import this module too)

TORCH_MODES = ("eager", "compile")
# Relative first-step loss difference allowed between Loom and PyTorch from the same weights, by
# (platform kind, dtype). A random-init loss sits near ln(vocab), so layout bugs move it little:
# on `tiny`, q/k RoPE pairs in the wrong order or gate/up swapped in one layer moved it by
# 2e-5-5e-5, while correct f32 runs agree to ~2e-7 and bf16 autocast to ~1e-5 on a CPU. The f32
# check is the decisive one; accelerators run f32 matmuls as TF32, hence their looser bounds.
LOSS_RTOL = {("cpu", "float32"): 5e-6, ("cpu", "bfloat16"): 1e-4,
             ("accelerator", "float32"): 1e-3, ("accelerator", "bfloat16"): 1e-3}
SHORT = {"float32": "f32", "bfloat16": "bf16"}


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:limit] if text else ''}"


def synthetic_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """One fixed batch of random tokens (numpy), the same in every process."""
    import numpy as np

    x = np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1), dtype=np.int32)
    return {"inputs_BT": x[:, :-1], "targets_BT": x[:, 1:],
            "positions_BT": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "segment_ids_BT": np.ones((batch, seq), np.int32), "loss_mask_BT": np.ones((batch, seq), np.float32)}


# --------------------------------------------------------------------------------------------
# Worker processes. Each implementation lives in a spawned single-process pool; the functions
# below run there, on the module-global runner.

_RUNNER = None


class LoomRunner:
    """Loom's train step on one device, compiled and warmed up."""

    def __init__(self, spec: dict):
        if spec.get("repo"):  # an earlier commit's tree (--baseline): its packages first on the path
            sys.path.insert(0, spec["repo"])
        import jax
        import jax.numpy as jnp

        import models
        from models.config import ModelConfig
        from train import mesh as mesh_lib
        from train.loss import lm_loss_fn
        from train.optimizer import make_optimizer
        from train.state import create_state, make_train_step, state_shardings

        self.jax = jax
        cfg = ModelConfig.from_dict({**spec["model"], "dtype": spec["dtype"], "remat": spec["remat"],
                                     "attention_impl": spec["attention"]})
        mesh = mesh_lib.make_mesh(mesh_lib.resolve_shape({}, 1), devices=jax.devices()[:1])
        jax.set_mesh(mesh)  # for the life of this worker process
        tx, _ = make_optimizer(spec["optimizer"], 1000)
        graphdef, self.state = create_state(cfg, tx, seed=spec["seed"], mesh=mesh)
        self.info = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
                     "jax": jax.__version__, "loom_tree": str(pathlib.Path(models.__file__).parents[1])}
        if spec.get("export_dir"):  # the initial weights every PyTorch process loads
            import models.hf
            from models.transformer import merge_params

            t = time.perf_counter()
            try:
                self.info["architecture"] = models.hf.save(merge_params(graphdef, self.state.params),
                                                           spec["export_dir"], architecture="LlamaForCausalLM")
                self.info["export_s"] = time.perf_counter() - t
            except Exception as e:  # e.g. a shape Llama cannot express: PyTorch then starts from its own init
                self.info["export_error"] = _first_line(e)
        sh = state_shardings(cfg, tx, mesh)
        self.step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx), in_shardings=(sh, None),
                            out_shardings=(sh, None), donate_argnums=(0,))
        self.batch = {k: jnp.asarray(v) for k, v in synthetic_batch(spec["batch"], spec["seq"], cfg.vocab_size).items()}

    def first_step(self) -> float:
        self.state, m = self.step(self.state, self.batch)
        return float(m["loss"])

    def run(self) -> None:
        self.state, m = self.step(self.state, self.batch)
        self.jax.block_until_ready(m)


class TorchRunner:
    """`transformers.LlamaForCausalLM` + AdamW on the same shape, in one of TORCH_MODES."""

    def __init__(self, spec: dict):
        import torch
        import transformers

        self.torch = torch
        transformers.utils.logging.disable_progress_bar()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":  # what XLA does with f32 matmuls on a GPU by default: TF32
            torch.set_float32_matmul_precision("high")
        m = spec["model"]
        if spec.get("weights_dir"):
            model = transformers.LlamaForCausalLM.from_pretrained(spec["weights_dir"], dtype=torch.float32,
                                                                  attn_implementation="sdpa")
        else:  # Loom's weights could not be exported: same shape, its own random init
            cfg = transformers.LlamaConfig(
                vocab_size=m["vocab_size"], hidden_size=m["hidden_size"], intermediate_size=m["intermediate_size"],
                num_hidden_layers=m["num_layers"], num_attention_heads=m["num_heads"],
                num_key_value_heads=m["num_kv_heads"], head_dim=m["head_dim"], max_position_embeddings=m["max_seq_len"],
                tie_word_embeddings=m["tie_embeddings"], rms_norm_eps=m["norm_eps"], rope_theta=m["rope_theta"])
            torch.manual_seed(spec["seed"])
            model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
        model = self.prepare(model.to(self.device).train(), spec)
        model.config.use_cache = False
        if spec["remat"] != "none":  # the same memory trade as Loom's remat (every layer, recomputed)
            if hasattr(model, "activation_checkpointing_enable"):  # its name since transformers 5.2x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = model
        self.autocast = spec["dtype"] == "bfloat16"
        b = synthetic_batch(spec["batch"], spec["seq"], m["vocab_size"])
        self.x = torch.as_tensor(b["inputs_BT"], dtype=torch.long, device=self.device)
        self.y = torch.as_tensor(b["targets_BT"], dtype=torch.long, device=self.device)
        self.forward_loss = torch.compile(self._forward_loss, mode=spec["compile_mode"]) \
            if spec["mode"] == "compile" else self._forward_loss
        self.opt_cfg = spec["optimizer"]
        self.opt, self.optimizer_kind = self._adamw()
        self.info = {"device": torch.cuda.get_device_name() if self.device == "cuda" else "cpu",
                     "torch": torch.__version__, "transformers": transformers.__version__,
                     "attention": model.config._attn_implementation, "same_init": bool(spec.get("weights_dir")),
                     "autocast": "bfloat16" if self.autocast else None, "mode": spec["mode"],
                     "compile_mode": spec["compile_mode"] if spec["mode"] == "compile" else None,
                     "gradient_checkpointing": spec["remat"] != "none", "threads": torch.get_num_threads()}
        self.clip = float(spec["optimizer"].get("clip_norm", 0.0))

    def prepare(self, model, spec: dict):
        """The module to train, from the loaded `LlamaForCausalLM` (a subclass wraps it, e.g. in adapters)."""
        return model

    def _adamw(self, fused: bool = True):
        """(AdamW with Loom's hyper-parameters, "fused" | "foreach (why)"): weight decay on matrices
        but not on embeddings or norms, as Loom's mask; the fused kernel unless this torch refuses it."""
        opt = self.opt_cfg
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:  # a frozen base under adapters
                continue
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": float(opt["weight_decay"])},
                  {"params": no_decay, "weight_decay": 0.0}]
        kw = dict(lr=float(opt["lr"]), betas=(float(opt["b1"]), float(opt["b2"])), eps=float(opt["eps"]))
        if fused:
            try:
                return self.torch.optim.AdamW(groups, fused=True, **kw), "fused"
            except (RuntimeError, ValueError) as e:  # e.g. a device without the fused kernel
                return self.torch.optim.AdamW(groups, foreach=True, **kw), f"foreach (fused refused: {_first_line(e)})"
        return self.torch.optim.AdamW(groups, foreach=True, **kw), "foreach"

    def _forward_loss(self, x, y):
        with self.torch.autocast(self.device, dtype=self.torch.bfloat16, enabled=self.autocast):
            logits = self.model(input_ids=x).logits
        return self.torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    def _gradients(self):
        """The loss, with the clipped gradients in the parameters' .grad."""
        self.opt.zero_grad(set_to_none=True)
        loss = self.forward_loss(self.x, self.y)
        loss.backward()
        if self.clip:
            self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        return loss

    def first_step(self) -> float:
        loss = self._gradients()
        try:
            self.opt.step()
        except (RuntimeError, NotImplementedError) as e:  # accepted, but no fused kernel for this case
            if self.optimizer_kind != "fused":
                raise
            self.opt, _ = self._adamw(fused=False)
            self.optimizer_kind = f"foreach (fused failed: {_first_line(e)})"
            self.opt.step()
        self._sync()
        return float(loss.detach())

    def run(self) -> None:
        self._gradients()
        self.opt.step()
        self._sync()

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()


def _runner_class(spec: dict):
    """LoomRunner or TorchRunner by `impl`, or another benchmark's runner: `runner` = "module:Class"
    (it has first_step() -> loss, run(), info, and optimizer_kind when `impl` is "torch")."""
    if spec.get("runner"):
        module, name = spec["runner"].split(":")
        return getattr(importlib.import_module(module), name)
    return LoomRunner if spec["impl"] == "loom" else TorchRunner


def _setup(spec: dict) -> dict:
    """In the worker: build the implementation, run its first step (compilation) and warm-up steps."""
    global _RUNNER
    t = time.perf_counter()
    _RUNNER = _runner_class(spec)(spec)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    loss0 = _RUNNER.first_step()
    first_s = time.perf_counter() - t
    warm = [_time_one() for _ in range(spec["warmup"])]
    info = dict(_RUNNER.info, loss0=loss0, build_s=build_s, first_step_s=first_s, warmup_s=warm)
    if spec["impl"] == "torch":
        info["optimizer"] = _RUNNER.optimizer_kind
    return info


def _time_one() -> float:
    t = time.perf_counter()
    _RUNNER.run()
    return time.perf_counter() - t


def _steps(n: int) -> list[float]:
    """Seconds of each of `n` train steps (each waits for its result)."""
    return [_time_one() for _ in range(n)]


def _peak(dtype: str, warmup: int, repeats: int) -> list[float]:
    """Matmul FLOP/s samples (train.flops.DEFAULT_SHAPE for the platform) in this worker's device."""
    from train.flops import matmul_flops_samples

    return matmul_flops_samples(dtype, warmup=warmup, repeats=repeats)


class Worker:
    """One implementation in a spawned process of its own."""

    def __init__(self, name: str, spec: dict):
        self.name, self.spec = name, spec
        self.pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        self.info: dict | None = None
        self.error: str | None = None

    def start(self) -> concurrent.futures.Future:
        return self.pool.submit(_setup, self.spec)

    def finish_start(self, future) -> None:
        try:
            self.info = future.result()
        except Exception as e:  # a variant that does not work here is reported, not fatal
            self.error = _first_line(e)
            print(f"  {self.name}: failed: {self.error}", flush=True)
            self.close()

    def steps(self, n: int) -> list[float]:
        return self.pool.submit(_steps, n).result()

    def call(self, fn, *args):
        return self.pool.submit(fn, *args).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# The benchmark


def preset_config(preset: str, batch: int = 0, seq: int = 0) -> dict:
    """The preset's model, optimizer, batch and sequence length (0: the preset's) as plain data."""
    try:
        from configs import pretrain
    except ImportError as e:
        raise SystemExit(f"benchmarks/train_step.py needs the configs' dependencies ({e}); on a GPU host "
                         "without them see benchmarks/gpu_session.sh (it installs ml_collections from .whl/)")
    config = pretrain.get_config(preset)
    model = config.model.to_dict()
    model["layer_windows"] = list(model.get("layer_windows", ()))
    return {"model": model, "optimizer": config.optimizer.to_dict(), "batch": batch or config.train.batch_size,
            "seq": seq or config.data.seq_len}


def loom_spec(cfg: dict, dtype: str, *, remat: str | None = None, attention: str | None = None, warmup: int = 1,
              export_dir: str | None = None) -> dict:
    """A worker spec for Loom's train step on `preset_config` data (remat / attention: the preset's)."""
    return dict(model=cfg["model"], optimizer=cfg["optimizer"], batch=cfg["batch"], seq=cfg["seq"], seed=0,
                warmup=warmup, impl="loom", dtype=dtype, remat=remat or cfg["model"]["remat"],
                attention=attention or cfg["model"]["attention_impl"], export_dir=export_dir)


def _specs(preset: str, cfg: dict, args, export_dir: str | None) -> dict[str, dict]:
    """name -> worker spec of every implementation to run for this preset."""
    dtypes = args.dtypes.split(",")
    remats = args.remat.split(",") if args.remat else [cfg["model"]["remat"]]
    impls = args.attention.split(",") if args.attention else [cfg["model"]["attention_impl"]]
    specs = {}
    for dt in dtypes:
        for remat in remats:
            for impl in impls:
                name = f"loom {SHORT.get(dt, dt)}" + ("" if len(remats) == len(impls) == 1 else f" {remat}/{impl}")
                specs[name] = loom_spec(cfg, dt, remat=remat, attention=impl, warmup=args.warmup)
                if args.baseline:  # the same step from an earlier commit's tree, in a process of its own
                    specs[f"{name} @ {args.baseline}"] = dict(specs[name], repo=str(records.checkout(args.baseline)))
    common = dict(model=cfg["model"], optimizer=cfg["optimizer"], batch=cfg["batch"], seq=cfg["seq"], seed=0,
                  warmup=args.warmup)
    if not args.no_torch:
        next(iter(specs.values()))["export_dir"] = export_dir
        for dt in dtypes:
            for mode in args.torch_modes.split(","):
                name = f"torch {'bf16 autocast' if dt == 'bfloat16' else SHORT.get(dt, dt)} {mode}"
                specs[name] = dict(common, impl="torch", dtype=dt, remat=remats[0], mode=mode,
                                   compile_mode=args.compile_mode, weights_dir=export_dir)
    return specs


def _start(specs: dict[str, dict]) -> dict[str, Worker]:
    """Starts every worker; the first Loom worker exports the weights before the others load them."""
    workers = {name: Worker(name, spec) for name, spec in specs.items()}
    names = list(workers)
    first = workers[names[0]]
    print(f"  starting {names[0]} (exports the initial weights)", flush=True)
    first.finish_start(first.start())
    if first.spec.get("export_dir") and (first.error or first.info.get("export_error")):
        print(f"  no shared initial weights ({first.error or first.info['export_error']}): PyTorch starts from "
              "its own random init and the first-step loss check is skipped", flush=True)
        for name in names[1:]:
            workers[name].spec["weights_dir"] = None
    if first.info and first.info["platform"] == "cpu":  # one at a time: their first-step times stay honest
        for name in names[1:]:
            print(f"  starting {name}", flush=True)
            workers[name].finish_start(workers[name].start())
    else:  # compile side by side on the host's many cores; nothing is timed until all are up
        print(f"  starting {', '.join(names[1:])}", flush=True)
        futures = {name: workers[name].start() for name in names[1:]}
        for name, future in futures.items():
            workers[name].finish_start(future)
    return workers


def _measure_peaks(worker: Worker, dtypes: list[str], accelerator: bool) -> dict[str, list[float]]:
    # a GPU's clocks ramp up under load: many more warm-up products there (each ~1 ms) than on a CPU
    warmup, repeats = (200, 50) if accelerator else (5, 10)
    return {dt: worker.call(_peak, dt, warmup, repeats) for dt in dtypes}


def run_preset(preset: str, args, peaks: dict) -> dict:
    cfg = preset_config(preset, args.batch, args.seq)
    tmp = tempfile.mkdtemp(prefix="loom_train_step_")
    try:
        print(f"\n## {preset}: batch {cfg['batch']} x {cfg['seq']} tokens", flush=True)
        workers = _start(_specs(preset, cfg, args, tmp))
        live = {n: w for n, w in workers.items() if not w.error}
        if not any(w.spec["impl"] == "loom" for w in live.values()):
            raise SystemExit(f"no Loom variant of {preset} started: " +
                             "; ".join(f"{n}: {w.error}" for n, w in workers.items()))
        loom0 = next(w for w in live.values() if w.spec["impl"] == "loom")
        platform = loom0.info["platform"]
        if not peaks:  # once per run, on a warm device, while no other implementation runs
            peaks.update(_measure_peaks(loom0, args.dtypes.split(","), platform != "cpu"))
            peaks["_device"], peaks["_platform"] = loom0.info["device"], platform
        return timed_rounds(cfg, workers, args)
    finally:
        for w in locals().get("workers", {}).values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)


def timed_rounds(cfg: dict, workers: dict[str, Worker], args) -> dict:
    """Times the started workers in `args.rounds` interleaved rounds of the same number of steps each
    (`args.steps`, or as many as fit `args.round_seconds` by the slowest warm-up); the result a
    record keeps: config, steps per round, every round's step times, each worker's spec and info."""
    live = {n: w for n, w in workers.items() if not w.error}
    slowest = max(max(w.info["warmup_s"] or [w.info["first_step_s"]]) for w in live.values())
    steps = args.steps or max(1, min(10, int(args.round_seconds / slowest)))
    print(f"  {args.rounds} interleaved rounds x {steps} steps per implementation", flush=True)
    samples = records.interleaved({n: (lambda w=w: w.steps(steps)) for n, w in live.items()}, args.rounds,
                                  warmup=0, pause=args.pause)
    return {"config": cfg, "steps_per_round": steps, "samples": samples,
            "workers": {n: {"spec": {k: v for k, v in w.spec.items() if k not in ("model", "optimizer")},
                            "info": w.info, "error": w.error} for n, w in workers.items()}}


def _model_flops_per_token(cfg: dict) -> float:
    from models.config import ModelConfig, flops_per_token

    return flops_per_token(ModelConfig.from_dict(cfg["model"]), cfg["seq"])["train"]


def preset_table(preset: str, res: dict, peaks: dict) -> dict:
    """The preset's table: every implementation's step time, throughput, MFU and ratio."""
    from train.flops import spec_peak

    cfg = res["config"]
    tokens = cfg["batch"] * cfg["seq"]
    fpt = _model_flops_per_token(cfg)
    accel = peaks["_platform"] != "cpu"
    unit, scale = ("TFLOP/s", 1e12) if accel else ("GFLOP/s", 1e9)
    per_round = {n: [sum(r) / len(r) for r in rounds] for n, rounds in res["samples"].items()}
    torch_names = [n for n in per_round if n.startswith("torch")]
    best = min(torch_names, key=lambda n: records.summarize(per_round[n])["median"]) if torch_names else None
    cols = ["impl", "step ms", "tokens/s", f"model {unit}", "MFU (measured peak)"]
    if accel:
        cols.append("MFU (spec peak)")
    cols += [f"vs best PyTorch ({best})" if best else "vs best PyTorch", "first-step loss"]
    baseline = {n.split(" @ ")[0]: n for n in per_round if " @ " in n}  # this tree's row -> the baseline's
    if baseline:
        cols.append("vs baseline commit")
    rows = []
    for name, w in res["workers"].items():
        dt = w["spec"]["dtype"]
        if w["error"]:
            rows.append([name, f"failed: {w['error']}"] + [""] * (len(cols) - 2))
            continue
        secs = per_round[name]
        tps = records.summarize([tokens / s for s in secs])
        row = [name, records.spread(records.summarize([s * 1e3 for s in secs])), records.spread(tps, "{:,.0f}"),
               records.spread({k: tps[k] * fpt / scale for k in ("median", "min", "max")})]
        measured = records.summarize(peaks[dt])["median"]
        row.append(records.spread({k: tps[k] * fpt / measured for k in ("median", "min", "max")}, "{:.2f}"))
        if accel:
            spec = spec_peak(peaks["_device"], dt)
            row.append(records.spread({k: tps[k] * fpt / spec[0] for k in ("median", "min", "max")}, "{:.2f}")
                       if spec else "n/a")
        row.append(records.spread(records.ratio_summary(per_round[best], secs), "{:.2f}x") if best else "-")
        row.append(f"{w['info']['loss0']:.6f}")
        if baseline:  # > 1: this tree's step is faster than the baseline commit's (paired per round)
            twin = baseline.get(name)
            row.append(records.spread(records.ratio_summary(per_round[twin], secs), "{:.2f}x")
                       if twin and twin in per_round else "-")
        rows.append(row)
    caption = (f"{preset}: {cfg['batch']} x {cfg['seq']} tokens per step, one {peaks['_device']} device; "
               f"median (min–max) over {len(next(iter(per_round.values())))} interleaved rounds of "
               f"{res['steps_per_round']} step(s)")
    return records.table(caption, cols, rows)


def loss_check_rows(preset: str, res: dict) -> list[list]:
    """Each PyTorch variant's first-step loss against Loom's in the same dtype (same weights, same batch)."""
    ws = res["workers"]
    kind = "cpu" if all(w["info"]["platform"] == "cpu" for w in ws.values()
                        if w["spec"]["impl"] == "loom" and not w["error"]) else "accelerator"
    loom = {}
    for n, w in ws.items():
        if w["spec"]["impl"] == "loom" and not w["error"]:
            loom.setdefault(w["spec"]["dtype"], (n, w["info"]["loss0"]))
    rows = []
    for n, w in ws.items():
        if w["spec"]["impl"] != "torch" or w["error"]:
            continue
        dt = w["spec"]["dtype"]
        if dt not in loom or not w["info"]["same_init"]:
            rows.append([preset, n, f"{w['info']['loss0']:.6f}", "-", "-", "-",
                         "n/a (no Loom row or no shared weights)"])
            continue
        ref_name, ref = loom[dt]
        got = w["info"]["loss0"]
        rel = abs(got - ref) / abs(ref)
        tol = LOSS_RTOL.get((kind, dt), 1e-3)
        rows.append([preset, n, f"{got:.6f}", f"{ref:.6f} ({ref_name})", f"{rel:.1e}", f"{tol:.0e}",
                     "ok" if rel <= tol else "MISMATCH"])
    return rows


def settings_table(results: dict) -> dict:
    rows = []
    for preset, res in results.items():
        for n, w in res["workers"].items():
            if w["spec"]["impl"] != "torch" or w["error"]:
                continue
            i = w["info"]
            rows.append([preset, n, i["optimizer"], i["attention"], "yes" if i["gradient_checkpointing"] else "no",
                         i["compile_mode"] or "-", f"{i['first_step_s']:.1f}", i["threads"]])
    return records.table("PyTorch variants as run (AdamW kind: fused where this torch supports it)",
                         ["preset", "variant", "AdamW", "attention", "grad. checkpointing", "compile mode",
                          "first step s (incl. compile)", "threads"], rows)


def peak_table(peaks: dict, dtypes: list[str]) -> dict:
    from train.flops import DEFAULT_SHAPE, spec_peak

    accel = peaks["_platform"] != "cpu"
    unit, scale = ("TFLOP/s", 1e12) if accel else ("GFLOP/s", 1e9)
    shape = "x".join(map(str, DEFAULT_SHAPE.get(peaks["_platform"], (4096,) * 3)))
    rows = []
    for dt in dtypes:
        s = records.summarize([v / scale for v in peaks[dt]])
        spec = spec_peak(peaks["_device"], dt)
        rows.append([dt, records.spread(s), f"{spec[0] / scale:,.0f} ({spec[1]})" if spec else "n/a"])
    return records.table(f"Matmul peak of {peaks['_device']} ({shape}, f32 accumulation; median (min–max) of the "
                         "timed products after the warm-up) and the spec sheet's dense peak",
                         ["dtype", f"measured {unit}", f"spec {unit}"], rows)


def method_text(args, results: dict, peaks: dict) -> str:
    shapes = []
    for preset, res in results.items():
        m, cfg = res["config"]["model"], res["config"]
        shapes.append(f"`{preset}` ({m['num_layers']} layers, d {m['hidden_size']}, ffn {m['intermediate_size']}, "
                      f"{m['num_heads']} heads / {m['num_kv_heads']} kv heads of {m['head_dim']}, vocab "
                      f"{m['vocab_size']}, {'tied' if m['tie_embeddings'] else 'untied'} embeddings; batch "
                      f"{cfg['batch']} x {cfg['seq']} tokens)")
    accel = peaks["_platform"] != "cpu"
    return (
        f"Shapes: {'; '.join(shapes)}. Loom: the jitted train step of train/state.py on one device (optax AdamW "
        "b1 0.9, b2 0.95, weight decay 0.1 on matrices, global-norm clip 1.0, float32 parameters and moments, "
        "the state donated), compute dtype per row. PyTorch: `transformers.LlamaForCausalLM` loaded from Loom's "
        "initial weights (`models.hf.save`), SDPA attention, float32 or bf16 autocast over float32 weights, "
        "eager or `torch.compile` of the forward and loss, AdamW with the same hyper-parameters (fused kernel "
        "where supported, else foreach: see the settings table), the same clip, gradient checkpointing when "
        "Loom rematerialises. Every implementation runs in its own spawned process; after its first "
        f"(compiling) step and {args.warmup} warm-up step(s), all are timed in interleaved rounds with a "
        f"{args.pause:g} s pause between implementations, the same number of steps each; a round's figure is the "
        "mean step time of its steps, and each cell is the median (min–max) over the rounds. Ratios are "
        "per-round (paired) best-PyTorch time / this row's time. Model FLOPs: 6N + attention (no remat "
        "recompute). MFU is against the measured matmul peak of the row's dtype"
        + (" and, in its own column, against the chip's dense bf16 spec peak (`train.flops.SPEC_PEAK_TFLOPS`)."
           if accel else " (a CPU has no spec figure), as training's `mfu` metric is.")
        + " The first-step loss of each PyTorch variant (same weights, same batch) is checked against Loom's in "
        "the same dtype.")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (>= 5 for a record)")
    ap.add_argument("--steps", type=int, default=0,
                    help="train steps per implementation per round (0: as many as fit --round-seconds, 1-10)")
    ap.add_argument("--round-seconds", type=float, default=4.0, help="with --steps=0: seconds per implementation "
                    "per round, judged from the slowest implementation's warm-up")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between implementations (idle thread pools)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--torch-modes", default=",".join(TORCH_MODES), help=f"subset of {TORCH_MODES}")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode (default, max-autotune, ...)")
    ap.add_argument("--batch", type=int, default=0, help="override the preset's batch size (0: keep)")
    ap.add_argument("--seq", type=int, default=0, help="override the preset's sequence length (0: keep)")
    ap.add_argument("--remat", default="", help="comma-separated remat policies (default: the preset's)")
    ap.add_argument("--attention", default="", help="comma-separated attention impls (default: the preset's)")
    ap.add_argument("--baseline", default="", help="also time Loom's step from this earlier commit's tree "
                    "(records.checkout), e.g. 3451f03, the commit before the one-model-path refactor")
    ap.add_argument("--name", default="", help="record name (default: train_step_<platform>)")
    ap.add_argument("--records-dir", default=str(records.RECORDS), help="where the JSON record goes")
    args = ap.parse_args(argv)
    records.comma_list(ap, "--dtypes", args.dtypes, SHORT)
    records.comma_list(ap, "--torch-modes", args.torch_modes, TORCH_MODES)
    if args.rounds < 1:
        ap.error(f"--rounds={args.rounds} must be >= 1")
    # several processes share one GPU: none may take most of its memory up front
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

    dtypes = args.dtypes.split(",")
    peaks: dict = {}
    results = {p: run_preset(p, args, peaks) for p in args.presets.split(",")}
    tables = [peak_table(peaks, dtypes)] + [preset_table(p, res, peaks) for p, res in results.items()]
    check = records.table("First-step loss from the same initial weights and batch",
                          ["preset", "PyTorch variant", "loss", "Loom loss", "relative difference", "tolerance",
                           "check"], [r for p, res in results.items() for r in loss_check_rows(p, res)])
    if check["rows"]:
        tables += [check, settings_table(results)]
    for t in tables:
        records.print_table(t)
    mismatches = [r for r in check["rows"] if r[-1] == "MISMATCH"]
    name = args.name or f"train_step_{peaks['_platform']}"
    records.write_record(name, title=f"Train step: Loom vs PyTorch + transformers ({peaks['_device']})",
                         tables=tables, method=method_text(args, results, peaks), params=vars(args),
                         results={"peaks_flops": {k: v for k, v in peaks.items()}, "presets": results},
                         directory=pathlib.Path(args.records_dir))
    if mismatches:
        print(f"\nFIRST-STEP LOSS MISMATCH for {[r[1] for r in mismatches]}: the two sides do not compute the "
              "same function; the timings compare different work.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
