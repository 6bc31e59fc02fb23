"""A reward model: the decoder's final hidden state at a sequence's last token -> a linear head -> a scalar.

    model = RewardModel(decoder)                      # any Decoder: plain, with LoRA / QLoRA adapters, prefixes
    rewards_B = model(tokens_BT, segment_ids_BT=...)  # float32, one per row
    scorer = load_reward_model("runs/arith_rm")       # a trained reward model's workdir (python -m rl.reward)
    scorer.score([[1, 52, 9, 2], [1, 7, 2]])          # np.ndarray [2] float32

The decoder runs as it does for logits (`Decoder.embed_inputs`, `run_layers`, `final_norm`) but its
output head is never applied: the head here is a [D] weight and a bias (`HeadParam`s, trained
whatever the PEFT method trains besides). The reward of a row is read at its last real token: the
last position whose segment id is not 0, so right- and left-padded rows both work (a sampler's
left-padded rollouts pass their positions and segment ids as they decode with them).
"""

from __future__ import annotations

import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import moe, peft
from models.checkpoint import is_reward_model_run, load_base, read_run_config, restore_params
from models.config import ModelConfig
from models.projection import F32, dropout
from models.transformer import default_positions_and_segments


class HeadParam(nnx.Param):
    """The reward head's weights: trained by every PEFT method (`trainable_filter`)."""


class RewardHead(nnx.Module):
    """r = kernel . h + bias, float32 ([D] kernel drawn with the decoder's init_std, bias 0)."""

    def __init__(self, dim: int, *, std: float, seed: int = 0):
        self.kernel = HeadParam(jax.random.normal(jax.random.key(seed), (dim,), F32) * std, axes=("embed",))
        self.bias = HeadParam(jnp.zeros((), F32), axes=())

    def __call__(self, h_BD):
        return h_BD.astype(F32) @ self.kernel[...] + self.bias[...]


class RewardModel(nnx.Module):
    """`decoder` (a models.transformer.Decoder, adapters and all) and `head` (a RewardHead)."""

    def __init__(self, decoder, *, seed: int = 0):
        self.decoder = decoder
        self.head = RewardHead(decoder.config.hidden_size, std=decoder.config.init_std, seed=seed)

    @property
    def config(self) -> ModelConfig:
        return self.decoder.config

    def _stream(self, inputs_BT, positions_BT, segment_ids_BT, dropout_rng, *, with_aux: bool = False):
        """The decoder's last residual stream [B, T, D] (before the final norm); with `with_aux`,
        (stream, the trunk's auxiliary outputs: MoE's `aux_loss` and routing metrics, or {})."""
        dec = self.decoder
        b, t = inputs_BT.shape
        positions_BT, segment_ids_BT = default_positions_and_segments(b, t, positions_BT, segment_ids_BT)
        x_BTD = dec.embed_inputs(inputs_BT, positions_BT)
        if dropout_rng is not None:
            dropout_rng, embed_rng = jax.random.split(dropout_rng)
            x_BTD = dropout(x_BTD, self.config.dropout_rate, embed_rng)
        x_BTD, _, stats = dec.run_layers(x_BTD, {"positions_BT": positions_BT, "segment_ids_BT": segment_ids_BT},
                                         dropout_rng=dropout_rng, collect=with_aux)
        if not with_aux:
            return x_BTD
        return x_BTD, ({} if stats is None else moe.summarize(self.config.moe, stats))

    def hidden_states(self, inputs_BT, *, positions_BT=None, segment_ids_BT=None, dropout_rng=None):
        """The final-norm hidden states [B, T, D] (what `Decoder.output_logits` would project)."""
        return self.decoder.final_norm(self._stream(inputs_BT, positions_BT, segment_ids_BT, dropout_rng))

    def logits_and_values(self, inputs_BT, *, positions_BT=None, segment_ids_BT=None, dropout_rng=None,
                          with_aux: bool = False):
        """PPO's actor and critic from one pass of the trunk: the decoder's logits [B, T, V] and the
        head read at every position [B, T] float32 (the value of the state that predicts the next
        token), and with `with_aux` the trunk's auxiliary outputs third (an MoE policy's losses).
        Used with `decoder` as the policy, this model is a policy with a value head."""
        x_BTD = self._stream(inputs_BT, positions_BT, segment_ids_BT, dropout_rng, with_aux=with_aux)
        if with_aux:
            x_BTD, aux = x_BTD
        out = self.decoder.output_logits(x_BTD), self.head(self.decoder.final_norm(x_BTD))
        return (*out, aux) if with_aux else out

    def __call__(self, inputs_BT, *, positions_BT=None, segment_ids_BT=None, dropout_rng=None):
        """Rewards [B] float32: the head on each row's last real token (the last segment id != 0; the
        last position when no segment ids are given)."""
        h_BTD = self.hidden_states(inputs_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT,
                                   dropout_rng=dropout_rng)
        return self.head(last_token_states(h_BTD, segment_ids_BT))


def last_token_states(h_BTD, segment_ids_BT=None):
    """[B, D]: each row's state at its last position whose segment id is not 0 (the last position
    without segment ids)."""
    if segment_ids_BT is None:
        return h_BTD[:, -1]
    t = h_BTD.shape[1]
    last_B = t - 1 - jnp.argmax((segment_ids_BT > 0)[:, ::-1], axis=-1)
    return jnp.take_along_axis(h_BTD, last_B[:, None, None], axis=1)[:, 0]


def build(base, peft_cfg: dict[str, Any], *, seed: int = 0) -> RewardModel:
    """A reward model on `base` with the PEFT method of `peft_cfg` (models/peft.py) applied first."""
    return RewardModel(peft.apply(base, peft_cfg, seed=seed), seed=seed)


def trainable_filter(method: str):
    """What a reward model trains: the PEFT method's parameters and the head."""
    return nnx.Any(peft.trainable_filter(method), HeadParam)


class RewardScorer:
    """A loaded reward model, callable on token ids (`score`) or on chats (`score_chats`).

    `score_fn(params, inputs_BT, positions_BT, segment_ids_BT) -> rewards_B` with `params` this
    scorer's `params` is the pure, jittable form for a training loop's own step.
    """

    def __init__(self, model: RewardModel, tokenizer=None, chat_template: str | None = None, *, min_bucket: int = 16):
        self.graphdef, self.params = nnx.split(model)
        self.config = model.config
        self.tokenizer, self.min_bucket = tokenizer, min_bucket
        self._chat = None
        self._template = chat_template
        graphdef = self.graphdef

        def score_fn(params, inputs_BT, positions_BT, segment_ids_BT):
            return nnx.merge(graphdef, params)(inputs_BT, positions_BT=positions_BT, segment_ids_BT=segment_ids_BT)

        self.score_fn = score_fn
        self._jitted = jax.jit(score_fn)

    def score(self, token_ids, *, positions=None, segment_ids=None) -> np.ndarray:
        """Rewards [B] float32 of sequences: a list of token-id lists (right-padded here, to bucketed
        shapes), or a [B, T] array with its segment ids (0 = padding, left or right) and positions
        (default: counting from each row's first real token)."""
        from inference.engine import bucket

        if isinstance(token_ids, (list, tuple)) and (not token_ids or not np.isscalar(token_ids[0])):
            seqs = [list(map(int, s)) for s in token_ids]
            if not seqs:
                return np.zeros((0,), np.float32)
            lengths = np.array([len(s) for s in seqs])
            if lengths.min() < 1 or lengths.max() > self.config.max_seq_len:
                raise ValueError(f"sequences of {lengths.min()}..{lengths.max()} tokens; the reward model reads 1.."
                                 f"{self.config.max_seq_len}")
            t = min(bucket(lengths.max(), self.min_bucket), self.config.max_seq_len)
            tokens = np.zeros((len(seqs), t), np.int32)
            segment_ids = np.zeros((len(seqs), t), np.int32)
            for i, s in enumerate(seqs):
                tokens[i, :len(s)], segment_ids[i, :len(s)] = s, 1
            positions = None
        else:
            tokens = np.asarray(token_ids, np.int32)
            if tokens.ndim != 2:
                raise ValueError(f"token_ids of shape {tokens.shape}: expected [B, T] or a list of sequences")
            segment_ids = np.ones_like(tokens) if segment_ids is None else np.asarray(segment_ids, np.int32)
        if positions is None:
            positions = np.maximum(np.cumsum(segment_ids > 0, axis=1) - 1, 0).astype(np.int32)
        b = tokens.shape[0]
        rows = bucket(b, 1)  # a bounded number of batch shapes; padding rows are all padding
        pad = lambda x: np.concatenate([x, np.zeros((rows - b,) + x.shape[1:], x.dtype)])  # noqa: E731
        out = self._jitted(self.params, pad(tokens), pad(np.asarray(positions, np.int32)), pad(segment_ids))
        return np.asarray(jax.device_get(out))[:b]

    def score_chats(self, prompts: Sequence[Sequence[dict]], responses: Sequence[str]) -> np.ndarray:
        """Rewards of each prompt (a list of messages) answered by its response (assistant text),
        rendered with the run's chat template as in training."""
        if self.tokenizer is None:
            raise ValueError("this scorer has no tokenizer: score token ids instead")
        if self._chat is None:
            from data.sft import ChatTokenizer

            self._chat = ChatTokenizer(self.tokenizer, self._template)
        ids = [self._chat.tokenize(list(p) + [{"role": "assistant", "content": r}])[0] for p, r in zip(prompts, responses)]
        return self.score(ids)


def load_reward_model(workdir: str | pathlib.Path, *, step: int | None = None) -> RewardScorer:
    """The reward model a `python -m rl.reward` run trained (its newest readable step, or `step`),
    with the run's tokenizer and chat template, as a `RewardScorer`."""
    from inference.loading import load_tokenizer

    workdir = pathlib.Path(workdir)
    run = read_run_config(workdir)
    if not is_reward_model_run(run):
        raise ValueError(f"{workdir} is no reward model run (its config.json is no `python -m rl.reward` run's); "
                         "train one with `python -m rl.reward`")
    cfg = ModelConfig.from_dict(run["model"]).replace(pipeline_stages=1)
    base, cfg = load_base(run["init"], cfg)
    method = run["peft"]["method"]
    model = build(base, run["peft"], seed=int(run["train"]["seed"]))
    graphdef, trained, rest = nnx.split(model, trainable_filter(method), ...)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), nnx.to_pure_dict(trained))
    params, _ = restore_params(workdir, step=step, target=target)
    model = nnx.merge(graphdef, params, rest)
    tokenizer = None
    if (workdir / "tokenizer").is_dir():
        tokenizer = load_tokenizer(workdir / "tokenizer")
    elif (workdir / "tokenizer.model").is_file():
        tokenizer = load_tokenizer(workdir / "tokenizer.model")
    return RewardScorer(model, tokenizer, (run.get("data") or {}).get("chat_template"))
