"""Continuous batching: one engine loop decodes every running request together.

    engine = Engine(model, tokenizer, max_slots=32)
    engine.start()                      # compiles, then serves from a thread of its own
    engine.submit(Request(prompt_ids, SamplingParams(max_tokens=64), on_output))
    engine.stop()                       # finishes the running requests first (drain)

The KV cache has `max_slots` rows of W columns, used as a ring: every decode step writes each
row's new key and value at one shared column (an in-place `dynamic_update_slice`; a column per
row would be a scatter, which XLA:CPU does not run in place) and moves on by one,
wrapping around. Attention finds a row's tokens by their positions and segment ids, not their
columns, so a row's tokens may sit anywhere: a request is prefilled alone (its prompt padded to
a bucketed length, so a handful of programs serve every prompt), its row laid into the ring so
its prompt ends just before the shared column, and it joins the next step. Requests join and
leave between any two steps. Since every row's tokens are the most recent columns, the ring
needs only as many columns as the longest running request has tokens: W is the smallest width
(64, 128, ... `max_len`) that holds it, grown (and shrunk when the long requests are gone) by
re-laying the ring, so a step's attention reads what is there, not `max_len` columns. A step
runs on the smallest block of rows (1, 4, 16, ... `max_slots`) that holds every occupied row
(free rows are handed out lowest first), so one request does not pay for 32.

Each request samples with its own settings (temperature, top-k, top-p, min-p, OpenAI's presence
and frequency penalties) and its own PRNG key: token j of a request with key k is drawn with
`fold_in(k, j)` from that row's logits, exactly as `inference.generate` draws row i of a batch
(`seed=[s]` gives key(s); choice i of a seeded request uses `fold_in(key(s), i)`, as
`generate(..., seed=s)` does for row i), so a seed gives the same text whatever the batch or slot.

Text leaves the engine incrementally (`Detokenizer`): a token whose bytes end in the middle of a
UTF-8 character is held back until the character completes, and text that could be the start of
a stop string is held back until it is not (it is cut before the stop string when it is).

A prefix cache (`prefix_cache_size` > 0) keeps the cache rows of recent prompts: a prompt that
starts with a cached prompt's first `block`-multiple tokens copies those rows and prefills only
the rest (a chat's system prompt, few-shot examples).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import queue
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from inference.sampling import check_sampling, sample_rows
from models.transformer import KVCache, init_cache, split_params

TOP_LOGPROBS = 20  # the most alternatives a request may ask for (OpenAI's limit for chat)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings (OpenAI's names; None / 0 turns a filter off)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one found
    stop_token_ids: tuple[int, ...] = ()  # stop tokens (EOS, end of turn): not part of the text
    logprobs: int | None = None  # None: no log-probs; k: the chosen token's and the k most likely

    def check(self) -> None:
        """ValueError naming the first setting outside its range."""
        check_sampling(temperature=self.temperature, top_k=self.top_k or None, top_p=self.top_p, min_p=self.min_p)
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} is not valid: expected an integer >= 1")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise ValueError(f"{name}={value!r} is not valid: expected a number in [-2, 2]")
        if self.logprobs is not None and not 0 <= self.logprobs <= TOP_LOGPROBS:
            raise ValueError(f"logprobs={self.logprobs!r} is not valid: expected 0..{TOP_LOGPROBS} alternatives")


@dataclasses.dataclass
class TokenInfo:
    """One generated token: its id, log-prob log_softmax(logits / T) (T = 1 when greedy) and the
    most likely alternatives as (id, log-prob), when the request asked for log-probs."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Output:
    """What a request receives after a step: new text (possibly "" while text is held back), the
    tokens that produced it, and once it has finished, why ("stop" | "length" | "abort" | "error")."""

    text: str
    tokens: list[TokenInfo]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class Request:
    """A prompt (token ids) to continue, its settings, its PRNG key and where its output goes.

    `on_output(Output)` is called from the engine's thread after every step that touched the
    request; the last call has `finish_reason` set. `cancel()` (e.g. the client went away) frees
    its row before the next step."""

    def __init__(self, prompt_ids: Sequence[int], params: SamplingParams, on_output: Callable[[Output], None], *,
                 seed: int | None = None, choice: int | None = None):
        self.prompt_ids = [int(t) for t in prompt_ids]
        self.params = params
        self.on_output = on_output
        self.seed = int.from_bytes(os.urandom(4), "little") if seed is None else int(seed)
        self.choice = choice  # None: key(seed); i: fold_in(key(seed), i), generate's row i of one seed
        self.cancelled = False
        self.ids: list[int] = []
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled = True

    def key_data(self) -> np.ndarray:
        key = jax.random.key(self.seed)
        if self.choice is not None:
            key = jax.random.fold_in(key, self.choice)
        return np.asarray(jax.random.key_data(key))


class Detokenizer:
    """Incremental text of a growing list of token ids, whose concatenated pieces equal
    `tokenizer.decode(ids)` for the tokenizers here.

    Each call decodes a short window: the tokens from a few before the last emitted text to the
    newest, minus the window's already-emitted part. A window whose text ends in U+FFFD (the
    newest token stopped inside a UTF-8 character; byte-fallback pieces) waits for more tokens.
    Stop strings: text that ends with the beginning of one is held back; the first one found ends
    the text before it (`stopped`)."""

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start
        self.read_offset = 0  # tokens whose text has been taken
        self.held = ""  # text taken but not emitted (a possible stop-string start)
        self.stopped = False

    def add(self, token: int) -> str:
        """The new text that `token` completes ("" while it is held back)."""
        self.ids.append(int(token))
        if self.stopped:
            return ""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(full[len(prefix):])

    def flush(self) -> str:
        """The rest, once no token follows (a trailing incomplete character included, as decode gives it)."""
        if self.stopped:
            return ""
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        text = self._release(full[len(prefix):]) if len(full) > len(prefix) else self._release("")
        if self.stopped:
            return text
        text, self.held = text + self.held, ""
        return text

    def _release(self, new: str) -> str:
        text = self.held + new
        if not self.stop:
            self.held = ""
            return text
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.held = True, ""
            return text[:min(hits)]
        keep = 0  # the longest tail that begins some stop string
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]


@dataclasses.dataclass
class _Slot:
    request: Request
    detok: Detokenizer

    @property
    def length(self) -> int:
        """Tokens of the request so far: prompt and output (the newest is written by the next step)."""
        return len(self.request.prompt_ids) + len(self.request.ids)


class Engine:
    """Continuous batching over one model (see the module docstring).

    Args:
      model: a `models.transformer.Decoder`.
      tokenizer: encodes nothing here; decodes outputs (`decode(ids)`).
      max_slots: requests decoded together (cache rows).
      max_len: positions per row (prompt + output); default the model's `max_seq_len`.
      prefix_cache_size: prompts whose cache rows are kept for reuse (0 = off).
      prefix_block: a reused prefix is a multiple of this many tokens.
    """

    def __init__(self, model, tokenizer, *, max_slots: int = 32, max_len: int | None = None,
                 prefix_cache_size: int = 0, prefix_block: int = 16):
        cfg = model.config
        if max_slots < 1:
            raise ValueError(f"max_slots={max_slots} must be >= 1")
        self.model, self.tokenizer, self.config = model, tokenizer, cfg
        self.max_len = int(max_len or cfg.max_seq_len)
        if cfg.position_embedding == "learned" and self.max_len > cfg.max_seq_len:
            raise ValueError(f"max_len={self.max_len} exceeds the model's learned positions ({cfg.max_seq_len})")
        self.max_slots = int(max_slots)
        self.graphdef, self.params = split_params(model)
        self.prefix_cache_size, self.prefix_block = int(prefix_cache_size), int(prefix_block)
        self._prefixes: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
        self._slots: list[_Slot | None] = [None] * self.max_slots
        self._waiting: queue.SimpleQueue[Request] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()
        self.stats = collections.Counter()
        b, s = self.max_slots, self.max_len
        self.widths = sorted({min(w, s) for w in (64 << i for i in range(max(s.bit_length() - 6, 1)))} | {s})
        self.row_blocks = sorted({min(r, b) for r in (4 ** i for i in range(max(b.bit_length(), 1)))} | {b})
        self._cache = init_cache(cfg, b, self.widths[0])
        self._column = 0  # the ring's shared write column: the next decode step writes here
        self._counts = jnp.zeros((b, cfg.vocab_size), jnp.int32)
        self._empty_row = _row_of(init_cache(cfg, 1, s), jnp.asarray(0, jnp.int32))  # prefill's "nothing reused"
        self._tokens = np.zeros(b, np.int32)  # each row's newest token (the next step's input)
        self._keys = np.zeros((b,) + jax.random.key_data(jax.random.key(0)).shape, np.uint32)
        self._settings = {name: np.zeros(b, dt) for name, dt in (
            ("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32), ("min_p", np.float32),
            ("presence", np.float32), ("frequency", np.float32))}

    # ---- the public side (any thread) ----------------------------------------------------------

    def prompt_bucket(self, n: int) -> int:
        """The padded length of an n-token prompt: a power of two >= 16, or `max_len` (powers of
        two all the way, so a long context compiles a few prefill programs, not one per 256)."""
        return min(max(16, 1 << (max(n, 1) - 1).bit_length()), self.max_len)

    def prompt_buckets(self) -> list[int]:
        """The padded prompt lengths prefill compiles for."""
        return sorted({self.prompt_bucket(1 << i) for i in range(self.max_len.bit_length() + 1)})

    def start(self, warmup: bool = True) -> None:
        """Compiles (every prompt bucket and every decode block size) and starts the loop thread;
        `ready` is set once it serves."""
        if warmup:
            t = time.perf_counter()
            self._warmup()
            logging.info("engine compiled in %.1fs (%d prompt buckets, %d slots, %d positions per slot)",
                         time.perf_counter() - t, len(self.prompt_buckets()), self.max_slots, self.max_len)
        self._thread = threading.Thread(target=self._loop, name="loom-engine", daemon=True)
        self._thread.start()
        self.ready.set()

    def submit(self, request: Request) -> None:
        """Queues a request (ValueError for a prompt that cannot fit, or bad settings)."""
        self.check(len(request.prompt_ids), request.params)
        if any(not 0 <= t < self.config.vocab_size for t in request.prompt_ids):
            raise ValueError(f"prompt token ids must lie in [0, {self.config.vocab_size})")
        if self._stopping:
            raise RuntimeError("the engine is shutting down")
        self._waiting.put(request)
        self._wake.set()

    def check(self, prompt_len: int, params: SamplingParams) -> None:
        params.check()
        if prompt_len < 1:
            raise ValueError("the prompt is empty: at least one token is needed")
        if prompt_len + params.max_tokens > self.max_len:
            raise ValueError(f"the prompt ({prompt_len} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                             f"context of {self.max_len} tokens")

    def stop(self, timeout: float | None = None) -> None:
        """Stops taking requests, finishes the queued and running ones, and ends the loop."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> int:
        return sum(s is not None for s in self._slots)

    # ---- the loop (engine thread) --------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._admit()
            for i, slot in enumerate(self._slots):
                if slot is not None and slot.request.cancelled:
                    self._finish(i, "abort")
            if self.running:
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001 - fail the running requests, keep serving
                    logging.exception("decode step failed")
                    for i, slot in enumerate(self._slots):
                        if slot is not None:
                            self._finish(i, "error", error=f"{type(e).__name__}: {e}")
                continue
            if self._stopping and self._waiting.empty():
                return
            self._wake.wait(0.05)
            self._wake.clear()

    def _admit(self) -> None:
        while not self._waiting.empty() and None in self._slots:
            request = self._waiting.get()
            if request.cancelled:  # gone before it started
                self._emit_finished(request, "abort", None)
                continue
            i = self._slots.index(None)
            try:
                self._prefill(i, request)
            except Exception as e:  # noqa: BLE001 - one request's failure is its own
                logging.exception("prefill failed")
                self._slots[i] = None
                request.on_output(Output("", [], "error", len(request.prompt_ids), 0, f"{type(e).__name__}: {e}"))

    def _set_row(self, i: int, request: Request) -> None:
        p = request.params
        greedy = p.temperature == 0
        values = dict(temperature=p.temperature, top_k=0 if greedy else p.top_k, top_p=1.0 if greedy else p.top_p,
                      min_p=0.0 if greedy else p.min_p, presence=p.presence_penalty, frequency=p.frequency_penalty)
        for name, v in values.items():
            self._settings[name][i] = v
        self._keys[i] = request.key_data()

    def _row_settings(self, rows: slice | int):
        return {name: jnp.asarray(v[rows]) for name, v in self._settings.items()}

    def _prefill(self, i: int, request: Request) -> None:
        ids = request.prompt_ids
        n = len(ids)
        self._set_row(i, request)
        start, reused = self._lookup_prefix(ids)
        while True:  # a compiled prompt bucket that fits after the reused prefix
            rest = ids[start:]
            p_len = self.prompt_bucket(len(rest))
            if start + p_len <= self.max_len:
                break
            start = max(0, start - self.prefix_block) // self.prefix_block * self.prefix_block
            reused = reused if start else self._empty_row
        tokens = np.zeros((1, p_len), np.int32)
        tokens[0, :len(rest)] = rest
        settings = {k: v[None] for k, v in self._row_settings(i).items()}
        self._counts, out, row = _prefill(
            self.graphdef, self.params, self._counts, jnp.asarray(i, jnp.int32), jnp.asarray(tokens),
            jnp.asarray(start, jnp.int32), jnp.asarray(len(rest), jnp.int32), reused, jnp.asarray(self._keys[i:i + 1]),
            settings, max_len=self.max_len)
        self._fit_ring(n + 1)  # the prompt and the token the next step writes
        self._cache = _insert(self._cache, jnp.asarray(i, jnp.int32), row, jnp.asarray(n, jnp.int32),
                              jnp.asarray(self._column, jnp.int32))
        self.stats["prefill_tokens"] += len(rest)
        self.stats["prefix_reused_tokens"] += start
        self._remember_prefix(ids, row)
        self._slots[i] = _Slot(request, Detokenizer(self.tokenizer, request.params.stop))
        self._deliver({i: 0}, out)

    def _fit_ring(self, needed: int = 0) -> None:
        """Re-lays the ring to the smallest width that holds every running row's tokens (and
        `needed` columns) when it is narrower, or when it is 4x wider than that (long requests gone)."""
        needed = max([needed] + [s.length for s in self._slots if s is not None])
        width = self._cache.segment_ids.shape[1]
        fit = next(w for w in self.widths if w >= needed)
        if fit > width or fit * 4 <= width:
            self._cache, column = _relayout(self._cache, jnp.asarray(self._column, jnp.int32), width=fit)
            self._column = int(column)
            self.stats["relayouts"] += 1

    def _step(self) -> None:
        occupied = [i for i, s in enumerate(self._slots) if s is not None]
        rows = next(r for r in self.row_blocks if r > max(occupied))
        self._fit_ring()
        active = np.zeros(rows, bool)
        active[occupied] = True
        steps, positions = np.zeros(rows, np.int32), np.zeros(rows, np.int32)
        for i in occupied:
            steps[i] = len(self._slots[i].request.ids)
            positions[i] = self._slots[i].length - 1  # the newest token's position
        self._cache, self._counts, out = _decode(
            self.graphdef, self.params, self._cache, self._counts, jnp.asarray(self._tokens[:rows]),
            jnp.asarray(positions), jnp.asarray(active), jnp.asarray(self._column, jnp.int32),
            jnp.asarray(self._keys[:rows]), jnp.asarray(steps), self._row_settings(slice(0, rows)), rows=rows)
        self._column = (self._column + 1) % self._cache.segment_ids.shape[1]
        self.stats["steps"] += 1
        self.stats["step_rows"] += len(occupied)
        self._deliver({i: i for i in occupied}, out)

    def _deliver(self, rows: dict[int, int], out) -> None:
        """Hands each slot its new token (`rows`: slot -> its row in `out`) and finishes those done."""
        tok, lp, top_ids, top_lps = map(np.asarray, jax.device_get(out))
        for i, r in rows.items():
            slot = self._slots[i]
            req, p = slot.request, slot.request.params
            t = int(tok[r])
            self._tokens[i] = t
            req.ids.append(t)
            info = TokenInfo(t, float(lp[r]), [(int(a), float(b)) for a, b in
                                               zip(top_ids[r, :p.logprobs or 0], top_lps[r, :p.logprobs or 0])])
            finish = None
            if t in p.stop_token_ids:
                text, finish = slot.detok.flush(), "stop"
            else:
                text = slot.detok.add(t)
                if slot.detok.stopped:
                    finish = "stop"
                elif len(req.ids) >= p.max_tokens or slot.length >= self.max_len:
                    text, finish = text + slot.detok.flush(), "length"
            self._emit(i, Output(text, [info], finish))
            if finish:
                self._slots[i] = None

    def _emit(self, i: int, output: Output) -> None:
        req = self._slots[i].request
        output.prompt_tokens, output.completion_tokens = len(req.prompt_ids), len(req.ids)
        if output.finish_reason:
            self.stats["finished"] += 1
            self.stats["generated_tokens"] += len(req.ids)
        try:
            req.on_output(output)
        except Exception:  # noqa: BLE001 - a broken consumer must not stop the loop
            logging.exception("a request's output callback failed; cancelling it")
            req.cancel()

    def _finish(self, i: int, reason: str, error: str | None = None) -> None:
        slot = self._slots[i]
        self._slots[i] = None
        self._emit_finished(slot.request, reason, error)

    def _emit_finished(self, req: Request, reason: str, error: str | None) -> None:
        self.stats["aborted" if reason == "abort" else "failed"] += 1
        try:
            req.on_output(Output("", [], reason, len(req.prompt_ids), len(req.ids), error))
        except Exception:  # noqa: BLE001
            logging.exception("a request's output callback failed")

    # ---- prefix cache --------------------------------------------------------------------------

    def _lookup_prefix(self, ids: list[int]):
        """(tokens reused, the (k, v, segment ids, positions) row they come from: an empty row when none)."""
        if not self.prefix_cache_size:
            return 0, self._empty_row
        best, found = 0, None
        for key, rows in self._prefixes.items():
            n = _common_prefix(key, ids)
            n = min(n, len(ids) - 1) // self.prefix_block * self.prefix_block  # leave one token to prefill
            if n > best:
                best, found = n, (key, rows)
        if found is None:
            return 0, self._empty_row
        self._prefixes.move_to_end(found[0])
        return best, found[1]

    def _remember_prefix(self, ids: list[int], row) -> None:
        """Keeps `row` (the prompt's cache row before its rotation: position j in column j)."""
        if not self.prefix_cache_size or len(ids) < self.prefix_block:
            return
        key = tuple(ids)
        self._prefixes[key] = row
        self._prefixes.move_to_end(key)
        while len(self._prefixes) > self.prefix_cache_size:
            self._prefixes.popitem(last=False)

    def _warmup(self) -> None:
        """Compiles prefill for every prompt bucket and the decode step for every block size."""
        dummy = Request([1], SamplingParams(max_tokens=1, temperature=0.0), lambda o: None, seed=0)
        self._set_row(0, dummy)
        settings = {k: v[None] for k, v in self._row_settings(0).items()}
        row = None
        for p_len in self.prompt_buckets():
            self._counts, _, row = _prefill(
                self.graphdef, self.params, self._counts, jnp.asarray(0, jnp.int32), jnp.zeros((1, p_len), jnp.int32),
                jnp.asarray(0, jnp.int32), jnp.asarray(1, jnp.int32), self._empty_row, jnp.asarray(self._keys[:1]),
                settings, max_len=self.max_len)
        for width in self.widths:
            for other in self.widths:  # every re-layout from this width
                if other != width:
                    _relayout(init_cache(self.config, self.max_slots, width), jnp.asarray(0, jnp.int32), width=other)
            self._cache = init_cache(self.config, self.max_slots, width)
            self._cache = _insert(self._cache, jnp.asarray(0, jnp.int32), row, jnp.asarray(1, jnp.int32),
                                  jnp.asarray(0, jnp.int32))
            for rows in self.row_blocks:
                out = _decode(self.graphdef, self.params, self._cache, self._counts, jnp.zeros(rows, jnp.int32),
                              jnp.zeros(rows, jnp.int32), jnp.zeros(rows, bool), jnp.asarray(0, jnp.int32),
                              jnp.asarray(self._keys[:rows]), jnp.zeros(rows, jnp.int32),
                              self._row_settings(slice(0, rows)), rows=rows)
                self._cache, self._counts = out[0], out[1]
                jax.block_until_ready(out[2])
        self._cache = init_cache(self.config, self.max_slots, self.widths[0])  # every row empty
        self._column = 0


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@jax.jit
def _row_of(cache: KVCache, i):
    """Row i of the cache: (k, v, segment ids, positions)."""
    take = lambda a, axis: jax.lax.dynamic_index_in_dim(a, i, axis, keepdims=True)  # noqa: E731
    return take(cache.k, 1), take(cache.v, 1), take(cache.segment_ids, 0), take(cache.positions, 0)


def _columns(x, idx, cache_like: KVCache, which: str):
    """`x` (a cache buffer) at columns `idx` along its column axis."""
    axis = {"k": cache_like.k.ndim - 2, "v": cache_like.v.ndim - 2, "segment_ids": 1, "positions": 1}[which]
    return jnp.take(x, idx, axis=axis)


@functools.partial(jax.jit, donate_argnums=(0,))
def _insert(cache: KVCache, slot, row, n, column) -> KVCache:
    """Cache row `slot` := the prefilled `row` (k, v, segment ids, positions; token j in column j,
    n tokens) laid into the ring: token j in column (column - n + j) mod W."""
    width = cache.segment_ids.shape[1]
    idx = (jnp.arange(width) - column + n) % width  # the row's column for each ring column
    rk, rv, rseg, rpos = row
    pick = lambda x, which: _columns(x, idx, cache, which)  # noqa: E731
    seg = jnp.where(idx < n, pick(rseg, "segment_ids"), 0)  # a long fresh row's columns >= n are not the prompt's
    put = lambda a, r, axis: jax.lax.dynamic_update_index_in_dim(a, r.astype(a.dtype), slot, axis)  # noqa: E731
    return KVCache(k=put(cache.k, pick(rk, "k"), 1), v=put(cache.v, pick(rv, "v"), 1),
                   segment_ids=put(cache.segment_ids, seg, 0), positions=put(cache.positions, pick(rpos, "positions"), 0),
                   index=cache.index)


@functools.partial(jax.jit, static_argnames=("width",))
def _relayout(cache: KVCache, column, *, width: int):
    """The ring at another width: the min(old, new) columns before `column` (every row's most
    recent tokens) become columns 0.. of the new ring. Returns (cache, the new write column)."""
    old = cache.segment_ids.shape[1]
    m = min(old, width)
    idx = (column - m + jnp.arange(m)) % old
    grow = width - m

    def moved(x, which):
        x = _columns(x, idx, cache, which)
        axis = {"k": cache.k.ndim - 2, "v": cache.v.ndim - 2, "segment_ids": 1, "positions": 1}[which]
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, grow)
        return jnp.pad(x, pad)

    new = KVCache(k=moved(cache.k, "k"), v=moved(cache.v, "v"), segment_ids=moved(cache.segment_ids, "segment_ids"),
                  positions=moved(cache.positions, "positions"), index=cache.index)
    return new, jnp.asarray(m % width, jnp.int32)


def _choose(logits_BV, counts_BV, keys_B, steps_B, s):
    """Each row's next token, its log-prob and the TOP_LOGPROBS most likely (id, log-prob)."""
    x = logits_BV - s["frequency"][:, None] * counts_BV - s["presence"][:, None] * (counts_BV > 0)
    keys = jax.vmap(lambda k, j: jax.random.fold_in(jax.random.wrap_key_data(k), j))(keys_B, steps_B)
    tok = sample_rows(x, keys, s["temperature"], s["top_k"], s["top_p"], s["min_p"])
    # the log-prob models/logprobs.py pins: log_softmax(logits / T), T = 1 when greedy, no filter
    t = jnp.where(s["temperature"] > 0, s["temperature"], 1.0)
    lp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32) / t[:, None], axis=-1)
    chosen = jnp.take_along_axis(lp_BV, tok[:, None], axis=-1)[:, 0]
    k = min(TOP_LOGPROBS, lp_BV.shape[-1])
    top_lps, top_ids = jax.lax.top_k(lp_BV, k)
    return tok, chosen, top_ids, top_lps


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len"), donate_argnums=(2,))
def _prefill(graphdef, params, counts, slot, tokens_1P, start, length, reused, keys_1, settings, *, max_len):
    """Prefills a prompt into a fresh row and draws its first token: (counts, the token's (id,
    log-prob, top ids, top log-probs), the row as (k, v, segment ids, positions), token j in
    column j: what `_insert` lays into the ring and the prefix cache keeps).

    tokens_1P holds the prompt's tokens from `start` on (`length` of them, then padding); the
    first `start` positions come from the `reused` row (a cached prefix, `Engine._lookup_prefix`;
    start 0 with nothing reused: one program serves both)."""
    model = nnx.merge(graphdef, params)
    k, v, seg, pos = reused
    keep = jnp.arange(max_len)[None] < start
    row = KVCache(k=k, v=v, segment_ids=jnp.where(keep, seg, 0), positions=jnp.where(keep, pos, 0), index=start)
    p = tokens_1P.shape[1]
    seg = (jnp.arange(p)[None] < length).astype(jnp.int32)
    positions = start + jnp.arange(p, dtype=jnp.int32)[None]
    logits, row = model(tokens_1P, positions_BT=positions, segment_ids_BT=seg, cache=row)
    counts = jax.lax.dynamic_update_index_in_dim(counts, jnp.zeros_like(counts[0]), slot, 0)
    last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, 0, keepdims=True)  # [1, V]
    out = _choose(last, counts[slot][None], keys_1, jnp.zeros(1, jnp.int32), settings)
    counts = counts.at[slot, out[0][0]].add(1)
    return counts, out, (row.k, row.v, row.segment_ids, row.positions)


@functools.partial(jax.jit, static_argnames=("graphdef", "rows"), donate_argnums=(2, 3))
def _decode(graphdef, params, cache, counts, tokens_B, positions_B, active_B, column, keys_B, steps_B, settings, *,
            rows):
    """One decode step for the first `rows` cache rows: each active row reads its newest token
    (at its position) and draws the next; every row writes at the shared `column`, inactive rows
    with segment id 0 (nothing attends to it)."""
    model = nnx.merge(graphdef, params)
    whole = rows == cache.segment_ids.shape[0]  # every row: no slicing, the buffers update in place
    part = cache if whole else KVCache(k=cache.k[:, :rows], v=cache.v[:, :rows], segment_ids=cache.segment_ids[:rows],
                                       positions=cache.positions[:rows], index=cache.index)
    part = dataclasses.replace(part, index=column)
    logits, new = model(tokens_B[:, None], positions_BT=positions_B[:, None],
                        segment_ids_BT=active_B[:, None].astype(jnp.int32), cache=part)
    if whole:
        cache = new
    else:
        cache = KVCache(k=cache.k.at[:, :rows].set(new.k), v=cache.v.at[:, :rows].set(new.v),
                        segment_ids=cache.segment_ids.at[:rows].set(new.segment_ids),
                        positions=cache.positions.at[:rows].set(new.positions), index=new.index)
    c = counts[:rows]
    out = _choose(logits[:, -1], c, keys_B, steps_B, settings)
    counts = counts.at[:rows].set(c.at[jnp.arange(rows), out[0]].add(active_B.astype(jnp.int32)))
    return cache, counts, out
