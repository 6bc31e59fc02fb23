"""Train-step throughput and MFU, with PyTorch + transformers on the same shape as the baseline.

    .venv/bin/python benchmarks/train_step.py                 # tiny and small, f32 and bf16, + PyTorch
    .venv/bin/python benchmarks/train_step.py --presets=small --steps=20 --no-torch
    python benchmarks/train_step.py --presets=1b --dtypes=bfloat16 --batch=8 --remat=none,full \
        --attention=pallas,cudnn                                   # one GPU (benchmarks/gpu_session.sh)

For each preset and compute dtype: a jitted Loom train step (AdamW, the preset's batch and
sequence length) on one device, timed after warm-up, reported as tokens/s, model FLOP/s and
MFU against the matmul peak measured first on this machine (f32, and bf16 inputs with f32
accumulation). The baseline is PyTorch eager with `transformers.LlamaForCausalLM` of the same
shape (f32, and bf16 autocast; on CUDA when torch sees a GPU, with its default SDPA attention),
AdamW, same batch; the ratio column is best PyTorch time / Loom time. --batch, --seq, --remat and
--attention override the preset (the last two take comma-separated lists, one Loom row each).
Prints figures; never asserts on time.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import pretrain  # noqa: E402
from models.config import ModelConfig, flops_per_token  # noqa: E402
from train import mesh as mesh_lib  # noqa: E402
from train.flops import measure_matmul_flops  # noqa: E402
from train.loss import lm_loss_fn  # noqa: E402
from train.optimizer import make_optimizer  # noqa: E402
from train.state import create_state, make_train_step, state_shardings  # noqa: E402


def _batch(rng, b, t, vocab):
    x = rng.integers(0, vocab, (b, t + 1), dtype=np.int32)
    return {"inputs_BT": x[:, :-1], "targets_BT": x[:, 1:], "positions_BT": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            "segment_ids_BT": np.ones((b, t), np.int32), "loss_mask_BT": np.ones((b, t), np.float32)}


def time_loom(config, dtype: str, steps: int, warmup: int = 2, **model_overrides) -> float:
    """Seconds per train step (median of `steps`)."""
    model_cfg = ModelConfig.from_dict({**config.model.to_dict(), "dtype": dtype, **model_overrides})
    mesh = mesh_lib.make_mesh(mesh_lib.resolve_shape({}, 1), devices=jax.devices()[:1])
    tx, _ = make_optimizer(config.optimizer, 1000)
    with jax.set_mesh(mesh):
        graphdef, state = create_state(model_cfg, tx, seed=0, mesh=mesh)
        sh = state_shardings(model_cfg, tx, mesh)
        step = jax.jit(make_train_step(lm_loss_fn(graphdef), tx), in_shardings=(sh, None), out_shardings=(sh, None),
                       donate_argnums=(0,))
        batch = {k: jnp.asarray(v) for k, v in _batch(np.random.default_rng(0), config.train.batch_size,
                                                      config.data.seq_len, model_cfg.vocab_size).items()}
        for _ in range(warmup):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def time_torch(config, dtype: str, steps: int, warmup: int = 2) -> float | None:
    try:
        import torch
        import transformers
    except ImportError:
        return None
    m = config.model
    hf_cfg = transformers.LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.hidden_size,
                                      intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
                                      num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                                      head_dim=m.head_dim, max_position_embeddings=m.max_seq_len,
                                      tie_word_embeddings=m.tie_embeddings)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf_cfg).to(device)
    model.train()
    model.config.use_cache = False
    if m.remat != "none":  # the same memory trade as Loom's remat
        model.gradient_checkpointing_enable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    b = _batch(np.random.default_rng(0), config.train.batch_size, config.data.seq_len, m.vocab_size)
    x = torch.as_tensor(b["inputs_BT"], dtype=torch.long, device=device)
    y = torch.as_tensor(b["targets_BT"], dtype=torch.long, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sync()

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    if device == "cuda":  # give the memory back before Loom's runs
        model = opt = step = None
        gc.collect()
        torch.cuda.empty_cache()
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--batch", type=int, default=0, help="override the preset's batch size (0: keep)")
    ap.add_argument("--seq", type=int, default=0, help="override the preset's sequence length (0: keep)")
    ap.add_argument("--remat", default="", help="comma-separated remat policies (default: the preset's)")
    ap.add_argument("--attention", default="", help="comma-separated attention impls (default: the preset's)")
    args = ap.parse_args()

    dev = jax.devices()[0]
    print(f"# {platform.processor() or platform.machine()} | {os.cpu_count()} cores | jax {jax.__version__} | "
          f"{dev.platform}:{dev.device_kind}")
    peaks = {}
    for dt in args.dtypes.split(","):
        peaks[dt] = measure_matmul_flops(dt)
        print(f"matmul peak {dt:9s} (f32 accumulation): {peaks[dt] / 1e9:8.1f} GFLOP/s")
    print()
    print(f"{'preset':8s} {'dtype':9s} {'impl':18s} {'step ms':>9s} {'tok/s':>9s} {'GFLOP/s':>9s} "
          f"{'MFU':>6s} {'MFU/f32pk':>9s} {'vs torch':>8s}")
    for preset in args.presets.split(","):
        config = pretrain.get_config(preset)
        if args.batch:
            config.train.batch_size = args.batch
        if args.seq:
            config.data.seq_len = args.seq
        remats = args.remat.split(",") if args.remat else [config.model.remat]
        impls = args.attention.split(",") if args.attention else [config.model.attention_impl]
        config.model.remat = remats[0]  # what the PyTorch baseline mirrors
        tokens = config.train.batch_size * config.data.seq_len
        model_cfg = ModelConfig.from_dict(config.model.to_dict())
        fpt = flops_per_token(model_cfg, config.data.seq_len)["train"]
        torch_times = {}
        if not args.no_torch:
            for dt in args.dtypes.split(","):
                torch_times[dt] = time_torch(config, dt, max(3, args.steps // 2))
        best_torch = min((t for t in torch_times.values() if t), default=None)
        for dt, t in torch_times.items():
            if t:
                tps = tokens / t
                print(f"{preset:8s} {dt:9s} {'torch':18s} {t * 1e3:9.1f} {tps:9.0f} {tps * fpt / 1e9:9.1f} "
                      f"{tps * fpt / peaks[dt]:6.2f} {tps * fpt / peaks.get('float32', peaks[dt]):9.2f}")
        for dt, remat, impl in ((d, r, i) for d in args.dtypes.split(",") for r in remats for i in impls):
            t = time_loom(config, dt, args.steps, remat=remat, attention_impl=impl)
            tps = tokens / t
            ratio = f"{best_torch / t:7.2f}x" if best_torch else "      -"
            name = "loom" if len(remats) == len(impls) == 1 else f"loom/{remat}/{impl}"
            print(f"{preset:8s} {dt:9s} {name:18s} {t * 1e3:9.1f} {tps:9.0f} {tps * fpt / 1e9:9.1f} "
                  f"{tps * fpt / peaks[dt]:6.2f} {tps * fpt / peaks.get('float32', peaks[dt]):9.2f} {ratio}",
                  flush=True)
    print("\nMFU: model FLOPs (6N + attention, no remat) per second over the matmul peak of the same dtype.")


if __name__ == "__main__":
    main()
