"""models.hf against transformers, family by family: import, packed batches, export, greedy decoding.

Each family is a tiny random model built locally with transformers (no download) whose options
are the ones that family's real checkpoints use, with windows and RoPE-scaling lengths shorter
than the 320-token inputs so they matter. Logits are compared in float32 (max abs error <= 1e-4);
each comparison also checks that dropping the family's special option breaks parity, so the test
would catch a converter that ignored it.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import models.hf as hf  # noqa: E402
from inference import generate  # noqa: E402
from models import transformer as T  # noqa: E402
from tests.helpers import hf_logits, randomize_hf  # noqa: E402

T_LEN = 320
TOL = 1e-4
_SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)

# family -> (model class, config, a change of our config that must break parity: proof the option matters)
FAMILIES = {
    "llama3.1": (transformers.LlamaForCausalLM, lambda: transformers.LlamaConfig(
        **_SMALL, rms_norm_eps=1e-5, rope_parameters=dict(rope_type="llama3", rope_theta=50000.0, factor=8.0,
                                                          low_freq_factor=1.0, high_freq_factor=4.0,
                                                          original_max_position_embeddings=64)),
                 dict(rope_scaling="none")),
    "mistral": (transformers.MistralForCausalLM, lambda: transformers.MistralConfig(**_SMALL, sliding_window=48),
                dict(sliding_window=0)),
    "qwen2": (transformers.Qwen2ForCausalLM, lambda: transformers.Qwen2Config(
        **_SMALL, use_sliding_window=True, sliding_window=40, max_window_layers=1, tie_word_embeddings=True),
              dict(layer_windows=())),
    "qwen3": (transformers.Qwen3ForCausalLM, lambda: transformers.Qwen3Config(**{**_SMALL, "head_dim": 24}),
              None),  # QK-norm has weights: an importer that skipped them fails on unused tensors
    "gemma": (transformers.GemmaForCausalLM, lambda: transformers.GemmaConfig(**{**_SMALL, "head_dim": 32}),
              dict(embed_scale=1.0)),
    "gemma2": (transformers.Gemma2ForCausalLM, lambda: transformers.Gemma2Config(
        **_SMALL, sliding_window=40, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0), dict(layer_windows=(), attn_logit_softcap=0.0)),
    "gpt2": (transformers.GPT2LMHeadModel, lambda: transformers.GPT2Config(
        vocab_size=256, n_positions=384, n_embd=64, n_layer=3, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None), None),
}






class Family:
    def __init__(self, name, tmp):
        cls, make_config, self.mutation = FAMILIES[name]
        config = make_config()
        config._attn_implementation = "eager"
        torch.manual_seed(0)
        self.hf = randomize_hf(cls(config).eval(), seed=len(name))
        self.dir = tmp / "hf"
        self.hf.save_pretrained(self.dir)
        self.model, self.cfg = hf.load(self.dir)
        self.tokens = np.random.default_rng(0).integers(0, 256, (2, T_LEN), dtype=np.int32)
        self.ref = hf_logits(self.hf, self.tokens)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def fam(request, tmp_path_factory):
    return Family(request.param, tmp_path_factory.mktemp(request.param))


def _err(a, b):
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def test_logits_match_transformers(fam):
    assert fam.cfg.dtype == fam.cfg.param_dtype == "float32"  # a float32 checkpoint stays float32
    ours = fam.model(fam.tokens)
    assert ours.dtype == np.float32 and ours.shape == (2, T_LEN, 256)
    err = _err(ours, fam.ref)
    print(f"{fam.cfg.num_layers}-layer {type(fam.hf).__name__}: max abs logit error {err:.2e}")
    assert err <= TOL
    # the family's special option matters at this length: without it parity breaks
    if fam.mutation:
        graphdef, params = T.split_params(T.abstract_model(fam.cfg.replace(**fam.mutation)))
        mutant = T.merge_params(graphdef, T.split_params(fam.model)[1])
        assert _err(mutant(fam.tokens), fam.ref) > 100 * TOL, fam.mutation


def test_packed_and_padded_batch_equals_each_document_alone(fam):
    """Row 0 packs two documents and ends in padding; row 1 is one document."""
    r = np.random.default_rng(1)
    lengths = [(150, 130), (T_LEN,)]
    tokens = np.zeros((2, T_LEN), np.int32)
    seg = np.zeros((2, T_LEN), np.int32)
    pos = np.zeros((2, T_LEN), np.int32)
    docs = []
    for row, lens in enumerate(lengths):
        start = 0
        for s, n in enumerate(lens):
            doc = r.integers(0, 256, n, dtype=np.int32)
            span = slice(start, start + n)
            tokens[row, span], seg[row, span], pos[row, span] = doc, s + 1, np.arange(n)
            docs.append((row, start, doc))
            start += n
    ours = np.asarray(fam.model(tokens, positions_BT=pos, segment_ids_BT=seg))
    for row, start, doc in docs:
        ref = hf_logits(fam.hf, doc[None])[0]
        assert _err(ours[row, start:start + len(doc)], ref) <= TOL


def test_export_loads_in_transformers_with_the_samehf_logits(fam, tmp_path):
    arch = hf.save(fam.model, tmp_path, hf_config=hf.read_hf_config(fam.dir))
    assert arch == type(fam.hf).__name__
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(back) is type(fam.hf)
    assert _err(hf_logits(back, fam.tokens), fam.ref) <= 1e-6
    # the same tensors, bit for bit, and a config that re-imports to the same ModelConfig
    original, exported = fam.hf.state_dict(), back.state_dict()
    for name, value in original.items():
        assert torch.equal(value, exported[name]), name
    assert hf.from_hf_config(json.loads((tmp_path / "config.json").read_text())) == fam.cfg
    # without the source config the architecture is inferred from the model config alone
    assert hf.save(fam.model, tmp_path / "inferred") == arch


def test_greedy_generation_equals_transformers(fam):
    r = np.random.default_rng(2)
    prompts = [r.integers(0, 256, n).tolist() for n in (60, 37)]  # ragged: the shorter row is left-padded
    new = 24
    ours = generate(fam.model, prompts, max_new_tokens=new)
    for prompt, got in zip(prompts, ours):
        with torch.no_grad():
            out = fam.hf.generate(torch.as_tensor([prompt]), max_new_tokens=new, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist()
