"""The continuous-batching engine (inference/batching.py) against `inference.generate` and
full recomputation: requests of different lengths queued, joining and leaving mid-flight (their
rows rotated around the ring), seeds, penalties, the prefix cache, cancellation, and incremental
detokenization."""

import threading

import numpy as np
import pytest

from inference import generate
from inference.batching import Detokenizer, Engine, Request, SamplingParams
from models import transformer as T
from tests.helpers import random_tokens, tiny_model_config


class _Chars:
    """A stand-in tokenizer: token i is the character chr(65 + i % 50)."""

    vocab_size = 97

    def decode(self, ids):
        return "".join(chr(65 + i % 50) for i in ids)


@pytest.fixture(scope="module")
def model():
    return T.build(tiny_model_config(max_seq_len=64), seed=5)


class _Collect:
    def __init__(self):
        self.outputs, self.done = [], threading.Event()

    def __call__(self, out):
        self.outputs.append(out)
        if out.finish_reason:
            self.done.set()

    @property
    def ids(self):
        return [t.id for o in self.outputs for t in o.tokens]

    @property
    def finish(self):
        return self.outputs[-1].finish_reason


def _run(engine, prompts, params, **kw):
    sinks = [_Collect() for _ in prompts]
    for p, sp, s in zip(prompts, params, sinks):
        engine.submit(Request(p, sp, s, **kw))
    for s in sinks:
        assert s.done.wait(120)
    return sinks


@pytest.fixture(scope="module")
def engine(model):
    e = Engine(model, _Chars(), max_slots=4, max_len=64, prefix_cache_size=4, prefix_block=8)
    e.start()
    yield e
    e.stop()


def test_greedy_equals_generate_with_requests_queued_and_joining(engine, model):
    """Six requests for four rows, of different lengths and budgets: rows fill, free and refill
    between steps; each request's tokens are `generate`'s for its prompt alone."""
    r = np.random.default_rng(1)
    prompts = [random_tokens(r, (n,), 97).tolist() for n in (3, 17, 9, 1, 30, 6)]
    budgets = [12, 5, 20, 9, 7, 14]
    refs = [generate(model, [p], max_new_tokens=b)[0] for p, b in zip(prompts, budgets)]
    for _ in range(4):  # 4 x ~21 steps: the shared write column wraps around the 64-column ring
        sinks = _run(engine, prompts, [SamplingParams(max_tokens=b, temperature=0.0) for b in budgets])
        for p, b, s, ref in zip(prompts, budgets, sinks, refs):
            assert s.ids == ref
            assert s.finish == "length" and s.outputs[-1].completion_tokens == b
            assert s.outputs[-1].prompt_tokens == len(p)
    assert engine.stats["steps"] > 64


def test_seeded_samples_do_not_depend_on_batch_mates_or_slot(engine, model):
    r = np.random.default_rng(2)
    prompt = random_tokens(r, (7,), 97).tolist()
    sp = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=40)
    alone = _run(engine, [prompt], [sp], seed=123)[0].ids
    others = [random_tokens(r, (n,), 97).tolist() for n in (4, 12, 9)]
    mixed = _run(engine, others + [prompt], [SamplingParams(max_tokens=15, temperature=1.0)] * 3 + [sp], seed=123)
    assert mixed[-1].ids == alone
    assert alone == generate(model, [prompt], max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=40, seed=[123])[0]
    # choice i of one seed: generate's row i of `seed=s`
    sinks = [_Collect() for _ in range(3)]
    for i, s in enumerate(sinks):
        engine.submit(Request(prompt, sp, s, seed=7, choice=i))
    for s in sinks:
        assert s.done.wait(60)
    ref = generate(model, [prompt] * 3, max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=40, seed=7)
    assert [s.ids for s in sinks] == ref
    assert len({tuple(x) for x in ref}) == 3


def test_penalties_and_stop_tokens(engine, model):
    r = np.random.default_rng(3)
    prompt = random_tokens(r, (5,), 97).tolist()
    plain = _run(engine, [prompt], [SamplingParams(max_tokens=16, temperature=0.0)])[0].ids
    stop = plain[6]
    first = plain.index(stop)
    s = _run(engine, [prompt], [SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=(stop,))])[0]
    assert s.ids == plain[:first + 1] and s.finish == "stop"
    # a frequency penalty of 2 changes greedy output where the plain output repeats a token
    pen = _run(engine, [prompt], [SamplingParams(max_tokens=16, temperature=0.0, frequency_penalty=2.0)])[0].ids
    assert len(set(pen)) >= len(set(plain))
    counts = np.zeros(97)
    for t in pen[:8]:
        counts[t] += 1
    seq = list(prompt) + pen[:8]
    logits = np.asarray(model(np.asarray([seq], np.int32)))[0, -1] - 2.0 * counts
    assert pen[8] == int(np.argmax(logits))


def test_prefix_cache_reuses_a_shared_prefix_and_changes_nothing(model):
    r = np.random.default_rng(4)
    shared = random_tokens(r, (21,), 97).tolist()
    prompts = [shared + random_tokens(r, (n,), 97).tolist() for n in (3, 6)]
    e = Engine(model, _Chars(), max_slots=2, max_len=64, prefix_cache_size=2, prefix_block=8)
    e.start()
    try:
        a = _run(e, prompts[:1], [SamplingParams(max_tokens=8, temperature=0.0)])[0]
        b = _run(e, prompts[1:], [SamplingParams(max_tokens=8, temperature=0.0)])[0]
    finally:
        e.stop()
    assert e.stats["prefix_reused_tokens"] == 16  # the 21 shared tokens, in blocks of 8
    for p, s in zip(prompts, (a, b)):
        assert s.ids == generate(model, [p], max_new_tokens=8)[0]


def test_cancel_frees_the_row_and_bad_requests_are_refused(engine):
    r = np.random.default_rng(5)
    s = _Collect()
    req = Request(random_tokens(r, (4,), 97).tolist(), SamplingParams(max_tokens=50, temperature=0.0), s)
    engine.submit(req)
    req.cancel()
    assert s.done.wait(30) and s.finish == "abort"
    assert len(s.ids) < 50 and engine.running == 0
    with pytest.raises(ValueError, match="exceeds the context of 64"):
        engine.submit(Request([1] * 60, SamplingParams(max_tokens=5), s))
    with pytest.raises(ValueError, match="top_p"):
        engine.submit(Request([1], SamplingParams(max_tokens=5, top_p=0.0), s))
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        engine.submit(Request([1, 400], SamplingParams(max_tokens=5), s))


def test_detokenizer_holds_back_partial_characters_and_stop_strings(tiny_run):
    """Byte-fallback pieces: a character split over several tokens appears once whole, never as
    U+FFFD; the pieces concatenate to decode(ids); text that may begin a stop string waits."""
    from data.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer.from_file(tiny_run / "tokenizer.model")
    text = "Caf\u00e9 \u6f22\u5b57 ok \U0001f600 done. Next line\nend"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # byte pieces among them
    d = Detokenizer(tok)
    parts = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(parts) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in parts)
    d = Detokenizer(tok, stop=["Next l", "zzz"])
    parts = []
    for i in ids:
        parts.append(d.add(i))
        if d.stopped:
            break
    assert d.stopped and "".join(parts) == text[:text.index("Next l")]
    d = Detokenizer(tok, stop=["done!"])  # a prefix that does not complete is released later
    parts = [d.add(i) for i in ids] + [d.flush()]
    assert "".join(parts) == text and not d.stopped


def test_ring_grows_and_shrinks_with_the_longest_request(model):
    """A request that outgrows 64 and then 128 columns re-lays the ring wider while others run;
    once it is gone the ring narrows again. Every output is `generate`'s."""
    r = np.random.default_rng(6)
    e = Engine(model, _Chars(), max_slots=4, max_len=256)
    assert e.widths == [64, 128, 256] and e.row_blocks == [1, 4]
    e.start()
    try:
        long = random_tokens(r, (40,), 97).tolist()
        shorts = [random_tokens(r, (n,), 97).tolist() for n in (5, 11, 3)]
        sinks = _run(e, [long] + shorts, [SamplingParams(max_tokens=120, temperature=0.0)] +
                     [SamplingParams(max_tokens=30, temperature=0.0)] * 3)
        grown = e.stats["relayouts"]
        after = _run(e, shorts, [SamplingParams(max_tokens=20, temperature=0.0)] * 3)
    finally:
        e.stop()
    assert grown >= 2 and e.stats["relayouts"] > grown  # 64 -> 128 -> 256, then narrower
    for p, n, s in zip([long] + shorts, (120, 30, 30, 30), sinks):
        assert s.ids == generate(model, [p], max_new_tokens=n)[0]
    for p, s in zip(shorts, after):
        assert s.ids == generate(model, [p], max_new_tokens=20)[0]
