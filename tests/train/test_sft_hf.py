"""SFT from a Hugging Face base (init.hf_dir), and the merged export `transformers` loads."""

import json
import random

import numpy as np
import pytest
from flax import nnx

from models.checkpoint import load
from models.lora import LoraKernel
from models.projection import Einsum
from tests.data.test_sft_data import LLAMA3
from tests.helpers import hf_logits, random_llama_hf_dir, run_program
from train.metrics import read_metrics

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A random Llama-shaped transformers model with a byte-level BPE tokenizer and the Llama 3
    chat template, as a Hugging Face directory."""
    return random_llama_hf_dir(tmp_path_factory.mktemp("llama_hf"), LLAMA3)


def test_lora_from_a_hugging_face_base_exports_merged(llama_dir, tmp_path):
    run = tmp_path / "run"
    run_program("train.sft", "--config=configs/sft.py:arith_lora", f"--workdir={run}", f"--config.init.hf_dir={llama_dir}",
                "--config.train.steps=4", "--config.train.batch_size=4", "--config.train.eval_every=4",
                "--config.train.eval_batches=1", "--config.train.eval_examples=2", "--config.train.num_samples=1",
                "--config.train.sample_tokens=4", "--config.train.async_checkpoint=False",
                "--config.optimizer.lr=3e-2", "--config.model.dtype=float32")
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["hf"]["architecture"] == "LlamaForCausalLM" and cfg["model"]["hidden_size"] == 64
    assert (run / "tokenizer" / "tokenizer.json").is_file() and (run / "tokenizer" / "tokenizer_config.json").is_file()
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == [4]
    model, _ = load(run)
    kernels = [m.kernel for _, m in nnx.iter_modules(model.layers) if isinstance(m, Einsum)]
    assert len(kernels) == 7 and all(isinstance(k, LoraKernel) for k in kernels)  # stacked over the layers
    assert max(float(np.abs(np.asarray(k.b[...])).max()) for k in kernels) > 1e-4  # trained, not the zero init

    out = tmp_path / "hf"
    proc = run_program("models.hf", "export", f"--checkpoint={run}", f"--out={out}")
    assert "as LlamaForCausalLM" in proc.stdout
    back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    tokens = np.random.default_rng(7).integers(3, 500, (2, 24))
    np.testing.assert_allclose(hf_logits(back, tokens), np.asarray(model(tokens)), atol=1e-4, rtol=0)
    base = transformers.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, attn_implementation="eager")
    assert np.abs(hf_logits(base, tokens) - hf_logits(back, tokens)).max() > 1e-3  # the adapters are in it
    # the exported tokenizer is the base's, with its chat template
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == LLAMA3


@pytest.mark.slow
def test_lora_from_an_imported_workdir(llama_dir, tmp_path):
    """`python -m models.hf import` output as init.workdir: its tokenizer/ comes along."""
    run_program("models.hf", "import", f"--hf_dir={llama_dir}", f"--out={tmp_path / 'base'}")
    run = tmp_path / "run"
    run_program("train.sft", "--config=configs/sft.py:arith_lora", f"--workdir={run}",
                f"--config.init.workdir={tmp_path / 'base'}", "--config.train.steps=2", "--config.train.batch_size=4",
                "--config.train.eval_every=0", "--config.train.eval_batches=0", "--config.train.num_samples=0",
                "--config.train.log_every=2", "--config.train.async_checkpoint=False")
    assert (run / "tokenizer" / "tokenizer.json").read_bytes() == (llama_dir / "tokenizer.json").read_bytes()
    assert json.loads((run / "config.json").read_text())["hf"]["architecture"] == "LlamaForCausalLM"
    assert [m["step"] for m in read_metrics(run) if "loss" in m] == [2]
    # inference loads the run with the base's tokenizer (from the workdir's tokenizer/)
    from inference.loading import load_checkpoint

    _, tok, info = load_checkpoint(run)
    assert info["tokenizer"] == str(run / "tokenizer") and tok.vocab_size == 500


def _chat_jsonl(path, n=40):
    """Multi-turn chats (1 to 3 exchanges) whose every answer is "ok": a random base learns to say
    it and end the turn within a few LoRA steps."""
    r = random.Random(19)
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "cloud", "seven", "green", "quiet"]
    records = []
    for i in range(n):
        msgs = [{"role": "system", "content": "Answer briefly."}] if i % 4 == 0 else []
        for _ in range(1 + i % 3):
            msgs += [{"role": "user", "content": " ".join(r.choice(words) for _ in range(r.randint(2, 6)))},
                     {"role": "assistant", "content": "ok"}]
        records.append({"messages": msgs, "id": i})
    path.write_text("".join(json.dumps(rec) + "\n" for rec in records))
    return path


def test_chat_lora_on_a_chat_jsonl_with_a_held_out_split(llama_dir, tmp_path):
    """The chat_lora preset on a Hugging Face base and a chat JSONL without eval sources: the loss
    is evaluated on the held-out split, whose prompts are answered into samples.txt, and answers
    stop at the template's end of turn (<|eot_id|>, not the tokenizer's EOS)."""
    from data.sources import SourceSpec, read_all, split_heldout

    data = _chat_jsonl(tmp_path / "chat.jsonl")
    run = tmp_path / "run"
    run_program("train.sft", "--config=configs/sft.py:chat_lora", f"--workdir={run}",
                f"--config.init.hf_dir={llama_dir}", f"--config.data.sources.chat.path={data}",
                "--config.data.eval_min_records=6", "--config.train.steps=12", "--config.train.batch_size=4",
                "--config.train.log_every=6", "--config.train.eval_every=12", "--config.train.eval_batches=1",
                "--config.train.num_samples=3", "--config.train.sample_tokens=8",
                "--config.train.async_checkpoint=False", "--config.optimizer.lr=3e-2", "--config.model.dtype=float32")
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["seq_len"] == 128 and cfg["peft"]["lora"]["rank"] == 16 and cfg["data"]["eval_sources"] == {}
    assert cfg["peft"]["lora"]["targets"] == ["q", "k", "v", "o", "gate", "up", "down"]
    evals = [m for m in read_metrics(run) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [0, 12] and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    # the samples are the held-out chats (6 of 40), answered with "ok" and stopped at <|eot_id|>
    spec = SourceSpec("chat", "jsonl", path=str(data), schema="messages")
    (_,), (held,) = split_heldout([spec], fraction=0.02, min_records=6)
    held_users = [rec["messages"][-2]["content"] for rec in read_all(held)]
    blocks = (run / "samples.txt").read_text().split("=== prompt ===\n")[1:]
    assert len(held_users) == 6 and len(blocks) == 3
    for block, user in zip(blocks, held_users):
        prompt, answer = block.split("=== greedy answer ===\n")
        assert prompt.rstrip().endswith(f"[user] {user}")
        assert [a.strip() for a in answer.split("=== reference answer ===\n")] == ["ok", "ok"]
