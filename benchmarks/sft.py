"""Fine-tuning methods: what each trains, what it needs in memory, and its step time against peft.

    .venv/bin/python benchmarks/sft.py                           # both sections; writes the record
    .venv/bin/python benchmarks/sft.py --sections=memory         # the `1b` memory tables only (~1 min)
    .venv/bin/python benchmarks/sft.py --sections=step --rounds=2 --warmup=1   # a quick check of the timing

Every method is built as `python -m train.sft` builds it (train/sft.py's `run`): the base,
`models.peft.apply(model, peft, seed)`, `nnx.split(model, models.peft.trainable_filter(method),
...)` into the trained state and the frozen rest, the optimizer of train/optimizer.py over the
trained state only (configs/sft.py's `arith_<method>` hyper-parameters at a constant learning
rate), and the jitted step of train/state.py with the frozen part an undifferentiated argument
and the state donated. Methods (`METHODS`): full; lora (rank 16, alpha 32, no dropout, on q k v o
gate up down); qlora (the same adapters over an NF4 base, blocks of 64, computed in bf16 as
train/sft.py does unless model.dtype is set); prefix (16 key/value positions per layer, no
reparameterisation), skipped with a note while models.peft has no such method.

Section `memory` (`--memory_preset`, default `1b`, Llama-3.2-1B's shape; abstract: `nnx.eval_shape`
and `jax.jit(...).lower(shapes).compile()`, no weight is allocated): per method, the trained
parameters and their share of the base, their bytes and the optimizer state's, the frozen part's
bytes, and XLA's compiled per-device memory of the step on one device (`memory_analysis()`:
arguments, temporaries, outputs not aliased to the donated state) for a micro-batch of
`--memory_batch` sequences of the preset's length, with the preset's remat policy; then the frozen
base stored in bf16 against NF4 and NF4 with double quantization (models/quant.py), by part.

Section `step` (`--step_preset`, default `small`, 4 sequences of 256 tokens: about a second a step
on 2 cores): each method's step time in Loom, and the peer, a peft LoRA model over
`transformers.LlamaForCausalLM` with the same targets, rank and alpha, doing the same LoRA step
(forward, backward, clip, AdamW with the same hyper-parameters) on the same batch in the same
dtype (bf16 autocast over float32 weights, as Loom's bf16 compute over float32 parameters), eager
and `torch.compile`d. Each implementation runs in a process of its own (benchmarks/train_step.py's
workers) and all are timed in interleaved rounds. The peer starts from Loom's weights: the base
written by `models.hf.save` and Loom's initial adapters written by `models.hf.peft_io.save_adapter`
(what `python -m models.hf export --adapter_only` writes), loaded with
`peft.PeftModel.from_pretrained(base, dir, is_trainable=True)`; so the two compute the same
function, and the loss of the first step (the base: B starts at zero) and of the second (after one
AdamW update of the adapters) are checked against Loom's LoRA. The headline ratio is the best
peft variant's step time over Loom LoRA's, paired per round (> 1: Loom faster; the direction of
benchmarks/train_step.py's "vs best PyTorch"). Writes benchmarks/records/sft_<platform>.json;
never asserts on time.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import records  # noqa: E402  (stdlib only: the spawned workers import this module too)
from benchmarks import train_step as ts  # noqa: E402

LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.0, "targets": ("q", "k", "v", "o", "gate", "up", "down"),
        "rslora": False}
# name -> the SFT config's `peft` section (models.peft.apply); "method" is models.peft's method
METHODS = {
    "full": {"method": "full"},
    "lora": {"method": "lora", "lora": LORA},
    "qlora": {"method": "qlora", "lora": LORA, "qlora": {"block_size": 64, "double_quant": False}},
    "prefix": {"method": "prefix", "prefix": {"length": 16, "reparam": 0}},
}
# Loom's projection names -> transformers' Llama module names (peft's target_modules)
HF_PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                  "down": "down_proj"}
ADAPTER_SUBDIR = "adapter"  # in the exported base's directory: Loom's initial adapters as a PEFT adapter directory
# Relative difference allowed between the peer's loss after one update and Loom's (same weights,
# same batch). AdamW's first update is about lr * sign(gradient) per adapter weight, so rounding
# differences in the gradient move a few signs; bf16 autocast rounds more than f32.
UPDATE_RTOL = {"float32": 1e-5, "bfloat16": 1e-3}
MIB = 2 ** 20
GIB = 2 ** 30


def available(names: list[str]) -> list[str]:
    """The methods of `names` that this tree's models.peft has (a note for each it lacks)."""
    from models import peft

    out = []
    for name in names:
        if METHODS[name]["method"] in peft.METHODS:
            out.append(name)
        else:
            print(f"  {name}: skipped: models.peft has no {METHODS[name]['method']!r} method in this tree "
                  f"(it has {', '.join(peft.METHODS)})", flush=True)
    return out


def method_config(model: dict, name: str, *, dtype: str = "", param_dtype: str = ""):
    """The ModelConfig a method runs with, as train/sft.py resolves it: `dtype` / `param_dtype`
    override the base's, and QLoRA computes in bf16 unless `dtype` is given."""
    from models.config import ModelConfig

    over = {"pipeline_stages": 1}
    if dtype:
        over["dtype"] = dtype
    elif METHODS[name]["method"] == "qlora":
        over["dtype"] = "bfloat16"
    if param_dtype:
        over["param_dtype"] = param_dtype
    return ModelConfig.from_dict({**model, **over})


def optimizer_config(name: str) -> dict:
    """configs/sft.py's optimizer for the method's `arith_<method>` preset (`arith_lora`'s if it has
    none), at a constant learning rate without warmup: the update the peer's AdamW repeats."""
    from configs import sft

    preset = f"arith_{METHODS[name]['method']}"
    opt = sft.get_config(preset if preset in sft.PRESETS else "arith_lora").optimizer.to_dict()
    opt.update(schedule="constant", warmup_steps=0)
    return opt


def sft_split(model, name: str):
    """(graphdef, trained params, frozen) of a method's model, as train/sft.py splits it (pure dicts)."""
    from flax import nnx

    from models import peft

    graphdef, trained, frozen = nnx.split(model, peft.trainable_filter(METHODS[name]["method"]), ...)
    return graphdef, nnx.to_pure_dict(trained), nnx.to_pure_dict(frozen)


def sft_step(graphdef, tx):
    """train/sft.py's step: the frozen part an argument, the state donated (one device: no shardings)."""
    import jax

    from train.loss import lm_loss_fn
    from train.state import make_train_step

    return jax.jit(make_train_step(lm_loss_fn(graphdef), tx), donate_argnums=(0,))


def tree_size(tree) -> int:
    import jax

    return int(sum(x.size for x in jax.tree.leaves(tree)))


def tree_bytes(tree) -> int:
    import jax
    import numpy as np

    return int(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------------------------
# Section `memory`: abstract models, compiled steps


def abstract_split(cfg, peft_dict: dict, name: str, seed: int = 0):
    """`sft_split` of the method's model built from shapes alone (`nnx.eval_shape`: nothing allocated)."""
    from flax import nnx

    from models import peft
    from models.transformer import Decoder

    model = nnx.eval_shape(lambda: peft.apply(Decoder(cfg, rngs=nnx.Rngs(params=seed)), peft_dict, seed=seed))
    return sft_split(model, name)


def memory_case(model: dict, name: str, batch: int, seq: int, *, param_dtype: str = "") -> dict:
    """Trained / optimizer / frozen bytes and XLA's memory of one method's step, from shapes."""
    import jax
    import jax.numpy as jnp

    from models.config import param_count
    from train.memory import BATCH_KEYS
    from train.optimizer import make_optimizer
    from train.state import TrainState

    cfg = method_config(model, name, param_dtype=param_dtype)
    tx, _ = make_optimizer(optimizer_config(name), 1000)
    graphdef, params, frozen = abstract_split(cfg, METHODS[name], name)
    opt_state = jax.eval_shape(tx.init, params)
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params, opt_state=opt_state,
                       rng=jax.ShapeDtypeStruct((2,), jnp.uint32))
    data = {k: jax.ShapeDtypeStruct((batch, seq), jnp.float32 if k == "loss_mask_BT" else jnp.int32)
            for k in BATCH_KEYS}
    m = sft_step(graphdef, tx).lower(state, data, frozen).compile().memory_analysis()
    return {"dtype": cfg.dtype, "param_dtype": cfg.param_dtype, "base_parameters": param_count(cfg),
            "trained_parameters": tree_size(params), "trained_bytes": tree_bytes(params),
            "opt_state_bytes": tree_bytes(opt_state), "frozen_bytes": tree_bytes(frozen),
            "xla": {k: getattr(m, k) for k in ("argument_size_in_bytes", "temp_size_in_bytes",
                                               "output_size_in_bytes", "alias_size_in_bytes")},
            "xla_bytes": records.xla_bytes(m)}


def _projection_bytes(frozen: dict) -> tuple[int, int]:
    """(bytes of the stacked layers' projection weights, bytes of the rest) of a frozen state."""
    import jax

    proj = rest = 0
    for path, x in jax.tree_util.tree_leaves_with_path(frozen):
        keys = [str(getattr(k, "key", k)) for k in path]
        n = tree_bytes([x])
        if keys[0] == "layers" and "kernel" in keys:
            proj += n
        else:
            rest += n
    return proj, rest


def frozen_base_case(model: dict, storage: str) -> dict:
    """The frozen base under LoRA ("bf16") or QLoRA ("nf4", "nf4_dq") with bf16 parameter storage:
    bytes of the layers' projections (what NF4 quantizes) and of the rest (embedding, norms)."""
    name = "lora" if storage == "bf16" else "qlora"
    peft_dict = dict(METHODS[name])
    if storage == "nf4_dq":
        peft_dict["qlora"] = {**peft_dict["qlora"], "double_quant": True}
    cfg = method_config(model, name, param_dtype="bfloat16")
    _, _, frozen = abstract_split(cfg, peft_dict, name)
    proj, rest = _projection_bytes(frozen)
    return {"projection_bytes": proj, "rest_bytes": rest, "bytes": proj + rest}


def memory_section(args, methods: list[str]) -> tuple[list[dict], dict]:
    from configs import pretrain

    config = pretrain.get_config(args.memory_preset)
    model = config.model.to_dict()
    seq = config.data.seq_len
    print(f"\n## memory: {args.memory_preset}, one device, {args.memory_batch} x {seq} tokens", flush=True)
    cases = {}
    for name in methods:
        cases[name] = memory_case(model, name, args.memory_batch, seq, param_dtype=args.param_dtype)
        print(f"  {name}: {cases[name]['xla_bytes'] / GIB:.2f} GiB compiled", flush=True)
    rows = []
    full = cases.get("full")
    for name, c in cases.items():
        x = c["xla"]
        rows.append([name, f"{c['trained_parameters']:,} ({c['trained_parameters'] / c['base_parameters']:.3%})",
                     f"{c['trained_bytes'] / MIB:,.1f}", f"{c['opt_state_bytes'] / MIB:,.1f}",
                     f"{c['frozen_bytes'] / MIB:,.1f}", f"{x['argument_size_in_bytes'] / MIB:,.1f}",
                     f"{x['temp_size_in_bytes'] / MIB:,.1f}",
                     f"{(x['output_size_in_bytes'] - x['alias_size_in_bytes']) / MIB:,.1f}",
                     f"{c['xla_bytes'] / MIB:,.1f}", f"{c['xla_bytes'] / full['xla_bytes']:.2f}" if full else "-"])
    some = next(iter(cases.values()))
    m = config.model
    caption = (f"{args.memory_preset} ({m.num_layers} layers, d {m.hidden_size}, ffn {m.intermediate_size}, vocab "
               f"{m.vocab_size}, {some['base_parameters']:,} parameters), one device, {args.memory_batch} x {seq} tokens "
               f"per step, remat `{m.remat}`, parameters in {some['param_dtype']}; compute in "
               + ", ".join(f"{dt} ({', '.join(n for n, c in cases.items() if c['dtype'] == dt)})"
                           for dt in dict.fromkeys(c["dtype"] for c in cases.values()))
               + "; MiB per device; compiled = arguments + temporaries + outputs not aliased to the donated state")
    tables = [records.table(caption, ["method", "trained parameters (share of base)", "trained MiB",
                                      "optimizer state MiB", "frozen MiB", "compiled: arguments", "temporaries",
                                      "outputs (unaliased)", "total", "total / full's"], rows)]
    bases = {s: frozen_base_case(model, s) for s in ("bf16", "nf4", "nf4_dq")}
    n_proj = bases["bf16"]["projection_bytes"] // 2  # bf16: 2 bytes per projection weight
    labels = {"bf16": "bf16 (LoRA's frozen base)", "nf4": "NF4, blocks of 64 (QLoRA)",
              "nf4_dq": "NF4, blocks of 64, double quantization"}
    rows = [[labels[s], f"{b['projection_bytes'] / MIB:,.1f}", f"{8 * b['projection_bytes'] / n_proj:.3f}",
             f"{b['rest_bytes'] / MIB:,.1f}", f"{b['bytes'] / MIB:,.1f}", f"{b['bytes'] / bases['bf16']['bytes']:.3f}"]
            for s, b in bases.items()]
    tables.append(records.table(
        f"The frozen base of {args.memory_preset} by storage (from the abstract models: each array's exact bytes): "
        f"the stacked layers' projections ({n_proj:,} weights), which NF4 quantizes, and the rest (embedding, "
        "norms: bf16 throughout); MiB",
        ["storage", "projections MiB", "bits per projection weight", "rest MiB", "frozen base MiB", "vs bf16"], rows))
    return tables, {"preset": args.memory_preset, "batch": args.memory_batch, "seq": seq, "methods": cases,
                    "frozen_base": bases}


# --------------------------------------------------------------------------------------------
# Section `step`: worker processes (benchmarks/train_step.py's Worker runs these)


class SftRunner:
    """One method's SFT step in Loom on one device, compiled and warmed up (spec: `step_specs`). No
    mesh is set: on one device train/sft.py's sharding constraints change nothing."""

    def __init__(self, spec: dict):
        import jax
        import jax.numpy as jnp

        from models import peft
        from models import transformer as T
        from models.config import param_count
        from train.optimizer import make_optimizer
        from train.state import TrainState

        self.jax = jax
        name = spec["method"]
        cfg = method_config(spec["model"], name, dtype=spec["dtype_override"])
        tx, _ = make_optimizer(spec["optimizer"], 1000)
        base = T.build(cfg, seed=spec["seed"])
        model = peft.apply(base, spec["peft"], seed=spec["seed"])
        graphdef, params, self.frozen = sft_split(model, name)
        self.info = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
                     "jax": jax.__version__, "dtype": cfg.dtype, "trained_parameters": tree_size(params),
                     "base_parameters": param_count(cfg)}
        if spec.get("export_dir"):  # the weights the peer starts from
            try:
                export_for_peer(base, model, spec["peft"], spec["export_dir"])
            except Exception as e:  # the peer then starts from its own init and the loss check is skipped
                self.info["export_error"] = ts._first_line(e)
        seed_key = jax.random.fold_in(jax.random.key(spec["seed"]), 1)
        self.state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.jit(tx.init)(params),
                                rng=jax.random.key_data(seed_key))
        self.step = sft_step(graphdef, tx)
        self.batch = {k: jnp.asarray(v)
                      for k, v in ts.synthetic_batch(spec["batch"], spec["seq"], cfg.vocab_size).items()}

    def first_step(self) -> float:
        self.state, m = self.step(self.state, self.batch, self.frozen)
        return float(m["loss"])

    def run(self) -> None:
        self.state, m = self.step(self.state, self.batch, self.frozen)
        self.jax.block_until_ready(m)
        self.info.setdefault("loss1", float(m["loss"]))  # the first warm-up step: the loss after one update


def export_for_peer(base, model, peft_dict: dict, directory: str) -> None:
    """The base as a Hugging Face directory (`models.hf.save`) and the LoRA model's adapters in its
    `ADAPTER_SUBDIR` as a PEFT adapter directory (`models.hf.peft_io.save_adapter`, what
    `python -m models.hf export --adapter_only` writes)."""
    import models.hf
    from models.hf import peft_io

    models.hf.save(base, directory, architecture="LlamaForCausalLM")
    lora = peft_dict["lora"]
    peft_io.save_adapter(model, pathlib.Path(directory) / ADAPTER_SUBDIR, architecture="LlamaForCausalLM",
                         lora_alpha=float(lora["alpha"]), rslora=bool(lora["rslora"]), dropout=float(lora["dropout"]))


class PeftRunner(ts.TorchRunner):
    """`peft.get_peft_model(LlamaForCausalLM, LoraConfig(...))` + AdamW over the adapters, in one of
    train_step's TORCH_MODES (the loaded model, dtype, compile and optimizer as TorchRunner's)."""

    def __init__(self, spec: dict):
        import peft

        super().__init__(spec)
        params = list(self.model.parameters())
        self.info.update(peft=peft.__version__,
                         trained_parameters=sum(p.numel() for p in params if p.requires_grad),
                         base_parameters=sum(p.numel() for p in params if not p.requires_grad))

    def prepare(self, model, spec: dict):
        import warnings

        import peft

        # peft asks transformers 5 for `is_gradient_checkpointing`, which warns that it is deprecated
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

        if spec.get("weights_dir"):  # Loom's initial adapters, as a user loads an exported adapter to train on
            return peft.PeftModel.from_pretrained(model, pathlib.Path(spec["weights_dir"]) / ADAPTER_SUBDIR,
                                                  is_trainable=True)
        lora = spec["peft"]["lora"]  # no shared weights: peft's own initialisation of the same adapters
        config = peft.LoraConfig(r=int(lora["rank"]), lora_alpha=float(lora["alpha"]),
                                 lora_dropout=float(lora["dropout"]), use_rslora=bool(lora["rslora"]),
                                 target_modules=[HF_PROJECTIONS[t] for t in lora["targets"]], bias="none",
                                 task_type="CAUSAL_LM")
        return peft.get_peft_model(model, config)

    def run(self) -> None:
        loss = self._gradients()
        self.opt.step()
        self._sync()
        self.info.setdefault("loss1", float(loss.detach()))  # the first warm-up step: the loss after one update


def step_specs(args, cfg: dict, methods: list[str], export_dir: str) -> dict[str, dict]:
    """name -> worker spec; Loom's LoRA first (it writes the weights the peer loads)."""
    model = dict(cfg["model"])
    common = dict(model=model, batch=cfg["batch"], seq=cfg["seq"], seed=0, warmup=args.warmup)
    specs = {}
    for name in sorted(methods, key=lambda n: n != "lora"):
        specs[f"loom {name}"] = dict(common, runner="benchmarks.sft:SftRunner", impl="loom", method=name,
                                     peft=METHODS[name], optimizer=optimizer_config(name),
                                     dtype_override=args.dtype, export_dir=export_dir if name == "lora" else None)
    if "lora" in methods and not args.no_peer:
        dtype = method_config(model, "lora", dtype=args.dtype).dtype
        for mode in args.torch_modes.split(","):
            specs[f"peft lora {mode}"] = dict(common, runner="benchmarks.sft:PeftRunner", impl="torch",
                                              peft=METHODS["lora"], optimizer=optimizer_config("lora"), dtype=dtype,
                                              remat=model["remat"], mode=mode, compile_mode=args.compile_mode,
                                              weights_dir=export_dir)
    return specs


def step_section(args, methods: list[str]) -> dict:
    cfg = ts.preset_config(args.step_preset, args.batch, args.seq)
    tmp = tempfile.mkdtemp(prefix="loom_sft_bench_")
    try:
        print(f"\n## step: {args.step_preset}, batch {cfg['batch']} x {cfg['seq']} tokens", flush=True)
        workers = ts._start(step_specs(args, cfg, methods, tmp))
        if all(w.error for w in workers.values()):
            raise SystemExit("no implementation started: " + "; ".join(f"{n}: {w.error}" for n, w in workers.items()))
        return ts.timed_rounds(cfg, workers, args)
    finally:
        for w in locals().get("workers", {}).values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)


def step_table(res: dict) -> dict:
    """Every implementation's step time, throughput, and the paired ratio to the best peft variant."""
    cfg = res["config"]
    tokens = cfg["batch"] * cfg["seq"]
    per_round = {n: [sum(r) / len(r) for r in rounds] for n, rounds in res["samples"].items()}
    peers = [n for n, w in res["workers"].items() if w["spec"]["impl"] == "torch" and n in per_round]
    best = min(peers, key=lambda n: records.summarize(per_round[n])["median"]) if peers else None
    cols = ["impl", "compute", "trained parameters (share)", "step ms", "tokens/s",
            f"vs peft LoRA ({best}): its time / this" if best else "vs peft LoRA", "first-step loss",
            "loss after one update"]
    rows = []
    for name, w in res["workers"].items():
        if w["error"]:
            rows.append([name, f"failed: {w['error']}"] + [""] * (len(cols) - 2))
            continue
        i, secs = w["info"], per_round[name]
        compute = i.get("dtype") or ("bf16 autocast" if i.get("autocast") else "float32")
        share = i["trained_parameters"] / i["base_parameters"] if "base_parameters" in i else None
        rows.append([name, compute, f"{i['trained_parameters']:,}" + (f" ({share:.2%})" if share else ""),
                     records.spread(records.summarize([s * 1e3 for s in secs])),
                     records.spread(records.summarize([tokens / s for s in secs]), "{:,.0f}"),
                     records.spread(records.ratio_summary(per_round[best], secs), "{:.2f}x") if best else "-",
                     f"{i['loss0']:.6f}", f"{i['loss1']:.6f}" if "loss1" in i else "-"])
    first = next(iter(per_round.values()))
    m = cfg["model"]
    caption = (f"{cfg.get('preset', '')}: {m['num_layers']} layers, d {m['hidden_size']}, vocab {m['vocab_size']}; "
               f"{cfg['batch']} x {cfg['seq']} tokens per step, one device; median (min–max) over {len(first)} "
               f"interleaved rounds of {res['steps_per_round']} step(s); ratio > 1: faster than peft")
    return records.table(caption, cols, rows)


def loss_check_rows(res: dict) -> list[list]:
    """Each peft variant's loss at the first step and after one update against Loom's LoRA."""
    ws = res["workers"]
    loom = ws.get("loom lora")
    if not loom or loom["error"]:
        return []
    kind = "cpu" if loom["info"]["platform"] == "cpu" else "accelerator"
    dtype = loom["info"]["dtype"]
    rows = []
    for name, w in ws.items():
        if w["spec"]["impl"] != "torch" or w["error"]:
            continue
        for label, key, tol in (("first step", "loss0", ts.LOSS_RTOL.get((kind, dtype), 1e-3)),
                                ("after one update", "loss1", UPDATE_RTOL.get(dtype, 1e-3))):
            got, ref = w["info"].get(key), loom["info"].get(key)
            if got is None or ref is None or not w["info"]["same_init"]:
                rows.append([name, label, "-" if got is None else f"{got:.6f}", "-", "-", "-",
                             "n/a (no shared weights or no such step)"])
                continue
            rel = abs(got - ref) / abs(ref)
            rows.append([name, label, f"{got:.6f}", f"{ref:.6f}", f"{rel:.1e}", f"{tol:.0e}",
                         "ok" if rel <= tol else "MISMATCH"])
    return rows


def describe(name: str) -> str:
    """A method's `peft` section in words."""
    p = METHODS[name]
    if p["method"] == "full":
        return "every parameter"
    if p["method"] == "prefix":
        reparam = p["prefix"].get("reparam", 0)
        return (f"{p['prefix']['length']} trained key/value positions per layer, "
                + (f"reparameterised through an MLP of width {reparam}" if reparam else "no reparameterisation"))
    lora = p["lora"]
    text = (f"rank {lora['rank']}, alpha {lora['alpha']:g}, dropout {lora['dropout']:g}"
            f"{', rsLoRA' if lora['rslora'] else ''}, on {' '.join(lora['targets'])}")
    if p["method"] == "qlora":
        q = p["qlora"]
        text += (f", over an NF4 base (blocks of {q['block_size']}"
                 f"{', double quantization' if q['double_quant'] else ''})")
    return text


def method_text(args, memory: dict | None, step: dict | None) -> str:
    lora = METHODS["lora"]["lora"]
    text = ("Every method is built as `python -m train.sft` builds it: `models.peft.apply(base, peft, seed)`, "
            "`nnx.split(model, models.peft.trainable_filter(method), ...)` into the trained state and the frozen "
            "rest, train/optimizer.py's AdamW over the trained state only (configs/sft.py's `arith_<method>` "
            "hyper-parameters, constant learning rate), and train/state.py's jitted step with the frozen part an "
            "undifferentiated argument and the state donated. Methods: "
            + "; ".join(f"{n} ({describe(n)})" for n in METHODS) + " (a method this tree's models.peft lacks is "
            "absent from the tables). ")
    if memory:
        text += ("Memory: the models are built from shapes (`nnx.eval_shape`) and each step is lowered and compiled "
                 "for one device from abstract arguments; nothing is allocated. XLA's `memory_analysis()` gives "
                 "the arguments (trained parameters, optimizer state, frozen part, batch), temporaries, and outputs "
                 "not aliased to the donated state. QLoRA computes in bf16 (train/sft.py's default for it), the "
                 "others in the preset's dtype. ")
    if step:
        text += (f"Step time: each implementation in a spawned process of its own; after its first (compiling) step "
                 f"and {args.warmup} warm-up step(s), all are timed in interleaved rounds with a {args.pause:g} s "
                 "pause between implementations, the same number of steps each; a round's figure is the mean step "
                 "time of its steps, each cell the median (min–max) over the rounds, ratios paired per round. The "
                 "batch is random tokens with every position in the loss. The peer: a peft LoRA model (r "
                 f"{lora['rank']}, lora_alpha {lora['alpha']:g}, lora_dropout {lora['dropout']:g}, target_modules "
                 f"{[HF_PROJECTIONS[t] for t in lora['targets']]}) over `transformers.LlamaForCausalLM`, SDPA "
                 "attention, bf16 autocast over float32 weights when Loom computes in bf16 (else float32), eager "
                 "or `torch.compile` of the forward and loss, `torch.optim.AdamW` over the adapters with the same "
                 "hyper-parameters (fused where this torch supports it) and the same global-norm clip. It loads "
                 "Loom's base (`models.hf.save`) and Loom's initial adapters (`models.hf.peft_io.save_adapter`, "
                 "through `peft.PeftModel.from_pretrained(..., is_trainable=True)`), so both compute the same "
                 "function; its loss at the first step and after one update is checked against Loom's LoRA "
                 "(AdamW's first update is about lr x sign(gradient), so the second loss checks the adapters' "
                 "gradients).")
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="memory,step", help="memory, step or both")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {tuple(METHODS)}")
    ap.add_argument("--memory_preset", default="1b", help="pretraining preset of the memory section")
    ap.add_argument("--memory_batch", type=int, default=4, help="sequences per step in the memory section")
    ap.add_argument("--param_dtype", default="", help="memory section: parameter storage dtype (default: the preset's)")
    ap.add_argument("--step_preset", default="small", help="pretraining preset of the step section")
    ap.add_argument("--batch", type=int, default=4, help="step section: sequences per step")
    ap.add_argument("--seq", type=int, default=256, help="step section: tokens per sequence")
    ap.add_argument("--dtype", default="", help="step section: compute dtype of every method (default: the "
                    "preset's, and bf16 for QLoRA)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (>= 5 for a record)")
    ap.add_argument("--steps", type=int, default=0,
                    help="steps per implementation per round (0: as many as fit --round-seconds, 1-10)")
    ap.add_argument("--round-seconds", type=float, default=4.0, help="with --steps=0: seconds per implementation "
                    "per round, judged from the slowest implementation's warm-up")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one (>= 1: the "
                    "first gives the loss after one update)")
    ap.add_argument("--pause", type=float, default=1.0, help="seconds between implementations (idle thread pools)")
    ap.add_argument("--no-peer", action="store_true", help="no peft + transformers run")
    ap.add_argument("--torch-modes", default=",".join(ts.TORCH_MODES), help=f"subset of {ts.TORCH_MODES}")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode")
    ap.add_argument("--name", default="", help="record name (default: sft_<platform>)")
    ap.add_argument("--records-dir", default=str(records.RECORDS), help="where the JSON record goes")
    args = ap.parse_args(argv)
    sections = records.comma_list(ap, "--sections", args.sections, ("memory", "step"))
    names = records.comma_list(ap, "--methods", args.methods, METHODS)
    records.comma_list(ap, "--torch-modes", args.torch_modes, ts.TORCH_MODES)
    if args.rounds < 1 or args.warmup < 1:
        ap.error("--rounds and --warmup must be >= 1")
    if args.dtype and args.dtype not in ts.SHORT:
        ap.error(f"--dtype: {args.dtype!r} is not one of {tuple(ts.SHORT)}")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # workers share an accelerator

    import jax

    methods = available(names)
    tables, results, memory, step, mismatches = [], {}, None, None, []
    if "memory" in sections:
        memory_tables, memory = memory_section(args, methods)
        tables += memory_tables
        results["memory"] = memory
        jax.clear_caches()
    if "step" in sections:
        step = step_section(args, methods)
        step["config"]["preset"] = args.step_preset
        results["step"] = step
        tables.append(step_table(step))
        check = records.table("Loss of the peer against Loom's LoRA from the same weights and batch",
                              ["peft variant", "step", "loss", "Loom LoRA loss", "relative difference", "tolerance",
                               "check"], loss_check_rows(step))
        if check["rows"]:
            tables += [check, ts.settings_table({args.step_preset: step})]
        mismatches = [r for r in check["rows"] if r[-1] == "MISMATCH"]
    for t in tables:
        records.print_table(t)
    platform = jax.default_backend()
    records.write_record(args.name or f"sft_{platform}",
                         title=f"Fine-tuning methods: memory and step time, Loom vs peft + transformers ({platform})",
                         tables=tables, method=method_text(args, memory, step), params=vars(args), results=results,
                         directory=pathlib.Path(args.records_dir))
    if mismatches:
        print(f"\nLOSS MISMATCH for {sorted({r[0] for r in mismatches})}: peft and Loom do not compute the same "
              "step; the timings compare different work.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
