"""Every source format round-trips its documents; bad input is counted, located, or raised."""

import gzip
import json

import numpy as np
import pytest

from data.sources import DataError, SourceSpec, StreamingSource, read_all, source_dataset


def _docs(n, seed=0):
    r = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "é", "漢字", "x=1;", "\t", "end."]
    return [" ".join(r.choice(words, r.integers(1, 30))) + f" #{i}" for i in range(n)]


def _texts(spec, **kw):
    return [r["text"] for r in read_all(spec, **kw)]


def _zst(path, data: bytes):
    import zstandard

    path.write_bytes(zstandard.ZstdCompressor().compress(data))


@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
def test_jsonl_round_trip_nested_field(tmp_path, compression):
    docs = _docs(40)
    lines = "".join(json.dumps({"id": i, "meta": {"body": d}}) + "\n" for i, d in enumerate(docs)).encode()
    half = len(lines) // 2
    cut = lines.index(b"\n", half) + 1
    for name, part in (("a", lines[:cut]), ("b", lines[cut:])):
        p = tmp_path / f"{name}.jsonl{compression}"
        if compression == ".gz":
            p.write_bytes(gzip.compress(part))
        elif compression == ".zst":
            _zst(p, part)
        else:
            p.write_bytes(part)
    spec = SourceSpec("j", "jsonl", path=str(tmp_path / "*.jsonl*"), text_field="meta.body")
    recs = list(read_all(spec, keep_fields=True))
    assert [r["text"] for r in recs] == docs
    assert [r["fields"]["id"] for r in recs] == list(range(40))
    assert recs[0]["line"] == 1 and recs[0]["file"].endswith(f"a.jsonl{compression}")


@pytest.mark.parametrize("unit", ["file", "line", "paragraph"])
def test_text_round_trip_units_globs_dirs_compression(tmp_path, unit):
    docs = [d.replace("\n", " ") for d in _docs(12, seed=1)]
    sub = tmp_path / "dir"
    sub.mkdir()
    if unit == "file":
        for i, d in enumerate(docs):
            (sub / f"{i:02d}.txt").write_text(d)
        (sub / "12.txt.gz").write_bytes(gzip.compress("compressed doc".encode()))
        docs = docs + ["compressed doc"]
        spec = SourceSpec("t", "text", path=str(sub), text_unit=unit)
    else:
        sep = "\n" if unit == "line" else "\n\n\n"
        (sub / "all.txt").write_text(sep.join(docs) + "\n")
        _zst(sub / "more.txt.zst", (sep.join(["zst one", "zst two"]) + "\n").encode())
        docs = docs + ["zst one", "zst two"]
        spec = SourceSpec("t", "text", path=f"{sub}/*.txt,{sub}/*.zst", text_unit=unit)
    assert _texts(spec) == docs


def test_parquet_round_trip_nested_column_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = _docs(50, seed=2)
    table = pa.table({"id": list(range(50)), "doc": [{"content": d, "lang": "en"} for d in docs]})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=7)
    spec = SourceSpec("p", "parquet", path=str(tmp_path / "x.parquet"), text_field="doc.content")
    recs = list(read_all(spec, keep_fields=True))
    assert [r["text"] for r in recs] == docs and recs[9]["fields"]["id"] == 9 and recs[9]["line"] == 10


def test_hf_datasets_saved_to_disk_and_parquet_shards(tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = _docs(30, seed=3)
    ds = datasets.Dataset.from_dict({"text": docs, "n": list(range(30))})
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=3)
    assert _texts(SourceSpec("h", "hf", path=str(tmp_path / "saved"))) == docs
    datasets.DatasetDict({"train": ds, "test": ds.select(range(5))}).save_to_disk(str(tmp_path / "dd"))
    assert _texts(SourceSpec("h", "hf", path=str(tmp_path / "dd"), split="test")) == docs[:5]
    (tmp_path / "pq").mkdir()
    for i in range(2):
        ds.shard(2, i, contiguous=True).to_parquet(str(tmp_path / "pq" / f"train-{i:05d}-of-00002.parquet"))
    assert _texts(SourceSpec("h", "hf", path=str(tmp_path / "pq"))) == docs


def test_array_record_round_trip(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    docs = _docs(25, seed=4)
    for shard in range(2):
        w = ArrayRecordWriter(str(tmp_path / f"part-{shard}.array_record"), "group_size:1")
        for i in range(shard, 25, 2):
            w.write(json.dumps({"id": i, "text": docs[i]}).encode())
        w.close()
    spec = SourceSpec("a", "array_record", path=str(tmp_path / "*.array_record"))
    recs = list(read_all(spec, keep_fields=True))
    assert sorted(r["fields"]["id"] for r in recs) == list(range(25))
    assert {r["fields"]["id"]: r["text"] for r in recs} == dict(enumerate(docs))


def test_tfds_array_record_without_tensorflow(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    docs = _docs(12, seed=5)

    class LoomTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"text": tfds.features.Text(), "id": np.int64}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, d in enumerate(docs):
                yield i, {"text": d, "id": i}

    LoomTinyText(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    spec = SourceSpec("tf", "tfds", path="loom_tiny_text", split="train", data_dir=str(tmp_path))
    recs = list(read_all(spec, keep_fields=True))
    assert sorted(r["text"] for r in recs) == sorted(docs)
    assert all(docs[r["fields"]["id"]] == r["text"] for r in recs)


def test_embedded_source():
    recs = list(read_all(SourceSpec("py", "embedded", split="validation")))
    assert len(recs) > 5 and all(r["file"].endswith(".py") for r in recs)


# ---------------------------------------------------------------------------------------------
# Bad input

def _bad_jsonl(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "good one"}\n'
                  b'{"text": "broken\n'  # line 2: malformed JSON
                  b'{"text": "caf\xe9"}\n'  # line 3: not UTF-8
                  b'{"body": "no text field"}\n'  # line 4: missing field
                  b'{"text": "   "}\n'  # line 5: empty document
                  b'{"text": 17}\n'  # line 6: not a string
                  b'[1, 2]\n'  # line 7: not an object
                  b'{"text": "good two"}\n')
    return p


def test_bad_records_are_skipped_counted_and_located(tmp_path, caplog):
    p = _bad_jsonl(tmp_path)
    it = iter(StreamingSource(SourceSpec("b", "jsonl", path=str(p))))
    assert [r["text"] for r in it] == ["good one", "good two"]
    assert it.get_state()["bad"] == {"malformed_json": 2, "not_utf8": 1, "missing_field": 1, "empty": 1,
                                     "not_string": 1}
    log = caplog.text
    for line in (2, 3, 4, 5, 6, 7):
        assert f"bad.jsonl:{line} " in log


@pytest.mark.parametrize("line,reason", [(2, "malformed JSON"), (3, "not UTF-8"), (4, "missing field 'text'"),
                                         (5, "empty document")])
def test_strict_raises_on_the_first_bad_record(tmp_path, line, reason):
    p = _bad_jsonl(tmp_path)
    lines = p.read_bytes().splitlines(keepends=True)
    p.write_bytes(lines[0] + lines[line - 1] + lines[-1])
    with pytest.raises(DataError, match=f"bad.jsonl:2: {reason}"):
        list(read_all(SourceSpec("b", "jsonl", path=str(p), strict=True)))


def test_bad_array_record_and_text_records(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    w = ArrayRecordWriter(str(tmp_path / "x.array_record"), "group_size:1")
    for raw in (b'{"text": "ok"}', b"not json", b'{"text": ""}', b'{"text": "ok2"}'):
        w.write(raw)
    w.close()
    assert _texts(SourceSpec("a", "array_record", path=str(tmp_path / "x.array_record"))) == ["ok", "ok2"]
    with pytest.raises(DataError, match=r"x.array_record:2: malformed JSON"):
        list(read_all(SourceSpec("a", "array_record", path=str(tmp_path / "x.array_record"), strict=True)))
    (tmp_path / "t.txt").write_bytes(b"fine\nbad \xff\xfe\n")
    with pytest.raises(DataError, match=r"t.txt:2: not UTF-8"):
        list(read_all(SourceSpec("t", "text", path=str(tmp_path / "t.txt"), text_unit="line", strict=True)))


def test_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="format='csv' is not valid"):
        SourceSpec("x", "csv", path="a")
    with pytest.raises(ValueError, match="needs a path"):
        SourceSpec("x", "jsonl")
    with pytest.raises(FileNotFoundError, match="no jsonl files match"):
        list(read_all(SourceSpec("x", "jsonl", path=str(tmp_path / "nothing*.jsonl"))))
    with pytest.raises(ValueError, match="unknown keys \\['txt_field'\\]"):
        SourceSpec.from_dict("x", {"format": "jsonl", "path": "a", "txt_field": "t"})


# ---------------------------------------------------------------------------------------------
# Sharding and resume of streaming sources

@pytest.mark.parametrize("num_files", [1, 5])
def test_shards_are_disjoint_and_cover(tmp_path, num_files):
    docs = _docs(60, seed=6)
    for f in range(num_files):
        (tmp_path / f"{f}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[f::num_files]))
    spec = SourceSpec("s", "jsonl", path=str(tmp_path / "*.jsonl"))
    seen = [_texts(spec, shard_index=i, shard_count=3) for i in range(3)]
    assert sorted(sum(seen, [])) == sorted(docs)
    assert sum(map(len, seen)) == len(docs)


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "parquet", "paragraph"])
def test_streaming_resume_mid_file(tmp_path, fmt):
    import json as _json

    docs = _docs(40, seed=7)
    if fmt.startswith("jsonl"):
        data = "".join(_json.dumps({"text": d}) + "\n" for d in docs).encode()
        (tmp_path / f"x.{fmt}").write_bytes(gzip.compress(data) if fmt.endswith("gz") else data)
        spec = SourceSpec("s", "jsonl", path=str(tmp_path / f"x.{fmt}"))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": docs}), tmp_path / "x.parquet", row_group_size=6)
        spec = SourceSpec("s", "parquet", path=str(tmp_path / "x.parquet"))
    else:
        (tmp_path / "x.txt").write_text("\n\n".join(docs))
        spec = SourceSpec("s", "text", path=str(tmp_path / "x.txt"), text_unit="paragraph")
    ds = source_dataset(spec, num_epochs=2, shuffle=True, seed=3)
    it = iter(ds)
    head = [next(it)["text"] for _ in range(13)]
    state = _json.loads(_json.dumps(it.get_state()))
    rest = [r["text"] for r in it]
    it2 = iter(source_dataset(spec, num_epochs=2, shuffle=True, seed=3))
    it2.set_state(state)
    assert [r["text"] for r in it2] == rest
    assert sorted(head + rest) == sorted(docs * 2)


# ---------------------------------------------------------------------------------------------
# Held-out splits

def _heldout_files(tmp_path, fmt):
    """A source of 3 files (jsonl: one gzipped, with a blank line and a bad record; or parquet) and
    its documents."""
    docs = _docs(230, seed=11)
    if fmt == "jsonl":
        lines = [json.dumps({"text": d}) for d in docs]
        (tmp_path / "a.jsonl").write_text("\n".join(lines[:90]) + "\n\n{bad json\n")
        (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(("\n".join(lines[90:200]) + "\n").encode()))
        (tmp_path / "c.jsonl").write_text("\n".join(lines[200:]))  # no final newline
        return SourceSpec("h", "jsonl", path=str(tmp_path / "*.jsonl*")), docs, 92 + 110 + 30
    import pyarrow as pa
    import pyarrow.parquet as pq

    for name, part in (("a", docs[:100]), ("b", docs[100:101]), ("c", docs[101:])):
        pq.write_table(pa.table({"text": part}), tmp_path / f"{name}.parquet", row_group_size=17)
    return SourceSpec("h", "parquet", path=str(tmp_path / "*.parquet")), docs, len(docs)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_heldout_split_is_disjoint_covers_and_is_deterministic(tmp_path, fmt):
    from data import sources

    spec, docs, units = _heldout_files(tmp_path, fmt)
    (train,), (held,) = sources.split_heldout([spec], fraction=0.1, min_records=4, max_records=1000)
    a, b = _texts(train), _texts(held)
    assert len(b) >= round(0.1 * units) - 2 and not set(a) & set(b)  # (a held-out unit may be the blank / bad line)
    assert sorted(a + b) == sorted(docs) and len(a) + len(b) == len(docs)
    # a fresh computation (another process), every data shard, a resumed reader: the same split
    sources._heldout_units.cache_clear()
    assert _texts(held) == b and _texts(train) == a
    for side, want in ((train, a), (held, b)):
        shards = [_texts(side, shard_index=i, shard_count=4) for i in range(4)]
        assert sorted(sum(shards, [])) == sorted(want) and sum(map(len, shards)) == len(want)
    it = iter(source_dataset(train, num_epochs=1))
    head = [next(it)["text"] for _ in range(50)]
    state = json.loads(json.dumps(it.get_state()))
    it2 = iter(source_dataset(train, num_epochs=1))
    it2.set_state(state)
    assert head + [r["text"] for r in it2] == a
    # another seed holds out other records; the sizes: fraction, at least min, at most max and half
    (_,), (other,) = sources.split_heldout([spec], fraction=0.1, min_records=4, max_records=1000, seed=1)
    assert set(_texts(other)) != set(b)
    count = sources.HeldOut("eval", 0.02, 16, 1000).count
    assert [count(n) for n in (10, 40, 1000, 10_000, 100_000)] == [5, 16, 20, 200, 1000]


def test_heldout_split_refuses_what_it_cannot_split(tmp_path):
    from data import sources

    with pytest.raises(ValueError, match="source 'e' .*cannot be split"):
        sources.split_heldout([SourceSpec("e", "embedded")], fraction=0.1)
    with pytest.raises(ValueError, match="text_unit='paragraph'"):
        SourceSpec("p", "text", path="x", text_unit="paragraph", heldout=sources.HeldOut("eval"))
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": "only"}) + "\n")
    (_,), (held,) = sources.split_heldout([SourceSpec("o", "jsonl", path=str(tmp_path / "one.jsonl"))], fraction=0.5)
    with pytest.raises(sources.EmptySourceError, match="has 1 records: too few to hold any out"):
        _texts(held)
