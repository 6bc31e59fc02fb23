"""The embedded corpus (deterministic, split by path hash, exclusions) and the tokenizer round trip."""

import pathlib
import random

import pytest

from data import corpus
from data.tokenizer import SentencePieceTokenizer, corpus_tokenizer, train_sentencepiece


@pytest.fixture(scope="module")
def train_corpus():
    return corpus.load("train")


def test_corpus_is_the_stdlib_without_tests_or_site_packages(train_corpus):
    files = corpus.corpus_files()
    assert files == sorted(files) and len(files) > 100
    assert "os.py" in files and "json/decoder.py" in files
    for f in files:
        parts = pathlib.PurePosixPath(f).parts[:-1]
        assert not {"site-packages", "dist-packages", "test", "tests"} & set(parts), f
    assert train_corpus.num_bytes > 1_000_000


def test_split_is_by_path_hash_and_disjoint(train_corpus):
    valid = corpus.load("validation")
    assert set(train_corpus.paths).isdisjoint(valid.paths)
    frac = len(valid.paths) / (len(valid.paths) + len(train_corpus.paths))
    assert 0.005 < frac < 0.06
    assert all(corpus.split_of(p, 0.02) == "validation" for p in valid.paths)
    assert corpus.load("train").paths == train_corpus.paths  # deterministic


def test_undecodable_files_are_skipped_and_counted(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "b.py").write_bytes(b"y = '\xff\xfe'\n")
    (tmp_path / "tests" / "c.py").write_text("z = 3\n")
    loaded = corpus.load("train", validation_fraction=1e-9, root=tmp_path)
    assert loaded.paths == ("a.py",) and loaded.skipped == ("pkg/b.py",)
    with pytest.raises(ValueError, match="split 'dev'"):
        corpus.load("dev")


def _random_text(r: random.Random, n: int) -> str:
    alphabet = "abc xyz\n\t  ()[]{}:=+-*/#'\"\\_0123456789éü漢字😀\r\x00"
    return "".join(r.choice(alphabet) for _ in range(n))


def test_exact_round_trip_on_code_and_random_strings(tmp_path, train_corpus):
    tok = corpus_tokenizer(train_corpus.texts, fingerprint=train_corpus.fingerprint(), vocab_size=4096)
    assert tok.vocab_size == 4096 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for text in train_corpus.texts[:50]:
        assert tok.decode(tok.encode(text)) == text
    r = random.Random(0)
    for _ in range(50):
        s = _random_text(r, r.randint(0, 200))
        assert tok.decode(tok.encode(s)) == s
    # code compresses: more than 2.5 bytes per token on the corpus
    sample = "".join(train_corpus.texts[:20])
    assert len(sample.encode()) / len(tok.encode(sample)) > 2.5


def test_training_caching_and_pickling(tmp_path):
    import pickle

    texts = [f"def f{i}(x):\n    return x * {i} + 1\n" for i in range(300)]
    a = corpus_tokenizer(texts, fingerprint="t", vocab_size=300, directory=tmp_path)
    cached = list(tmp_path.glob("*.model"))
    assert len(cached) == 1
    b = corpus_tokenizer(texts, fingerprint="t", vocab_size=300, directory=tmp_path)  # from the cache
    assert a.encode(texts[7]) == b.encode(texts[7])
    c = pickle.loads(pickle.dumps(a))
    assert c.encode(texts[3]) == a.encode(texts[3]) and c.decode(c.encode(texts[3])) == texts[3]
    cached[0].write_bytes(b"garbage")  # a broken cache file is retrained, not fatal
    d = corpus_tokenizer(texts, fingerprint="t", vocab_size=300, directory=tmp_path)
    assert d.decode(d.encode(texts[1])) == texts[1]
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_sentencepiece(texts, vocab_size=100)
    with pytest.raises(FileNotFoundError):
        SentencePieceTokenizer.from_file(tmp_path / "nope.model")


def test_tokenizer_cli_trains_from_any_source(tmp_path):
    import json

    from tests.helpers import run_program

    r = random.Random(1)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    lines = [json.dumps({"doc": {"body": " ".join(r.choice(words) for _ in range(40))}}) for _ in range(400)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "u.model"
    proc = run_program("data.tokenizer", "train", "--format=jsonl", f"--path={tmp_path / 'c.jsonl'}",
                       "--text_field=doc.body", "--vocab_size=320", "--model_type=unigram", f"--output={out}")
    assert "exact round trip" in proc.stdout
    tok = SentencePieceTokenizer.from_file(out)
    assert tok.decode(tok.encode("gamma delta\n  zeta")) == "gamma delta\n  zeta"
    assert len(tok.encode("alpha beta gamma")) <= 6  # whole words learned, not bytes
    enc = run_program("data.tokenizer", "encode", f"--model={out}", "--text=alpha beta")
    assert "alpha" in enc.stdout


def test_tokenizer_from_config_trains_once_on_sources(tmp_path, monkeypatch):
    import json

    from data.sources import SourceSpec
    from data.tokenizer import from_config

    monkeypatch.setenv("LOOM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"def f{i}(x): return x + {i}"}) + "\n"
                                              for i in range(300)))
    spec = SourceSpec("a", "jsonl", path=str(tmp_path / "a.jsonl"))
    cfg = {"kind": "sentencepiece", "path": None, "vocab_size": 300, "model_type": "bpe", "train_documents": 100}
    tok = from_config(cfg, [spec])
    assert len(list((tmp_path / "cache" / "tokenizers").glob("*.model"))) == 1
    assert from_config(cfg, [spec]).encode("def f7(x)") == tok.encode("def f7(x)")
    with pytest.raises(ValueError, match="kind='bpe' is not valid"):
        from_config({**cfg, "kind": "bpe"}, [spec])
