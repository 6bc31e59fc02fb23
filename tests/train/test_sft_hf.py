"""SFT from a Hugging Face base (init.hf_dir), and the merged export `transformers` loads."""

import json

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
