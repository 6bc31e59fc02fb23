"""Clean a corpus into ArrayRecord shards with a report.

    python -m data.prepare --config=configs/data/clean.py \
        --config.source.path='raw/*.jsonl.zst' --config.output_dir=clean/

Reads any source (data/sources.py), runs the enabled steps in order quality -> exact dedup ->
near dedup -> PII scrubbing, and writes
  <output_dir>/part-00000.array_record ...   kept records, each a UTF-8 JSON object with every
                                             input field (an `id` survives; the text field holds
                                             the scrubbed text)
  <output_dir>/report.json, report.md        documents and tokens in / kept / dropped per rule
                                             and per source, PII replacements, bad input records
  <output_dir>/length_histogram.png          token lengths of kept and dropped documents
  <output_dir>/dropped/<rule>.jsonl          up to `keep_dropped` dropped records per rule
The output is written to a temporary directory and renamed when complete, so an interrupted run
leaves no half-written output (re-run the command to start again).
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import shutil
import sys
import time
from typing import Any

from absl import app, logging
from ml_collections import config_flags

from data import cleaning
from data.sources import SourceSpec, read_all

REPORT_JSON, REPORT_MD, HISTOGRAM = "report.json", "report.md", "length_histogram.png"


def _set_field(obj: dict, dotted: str, value) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        obj = obj[p]
    obj[parts[-1]] = value


def _token_counter(tok_cfg):
    """(count(text) -> int, unit name)."""
    if tok_cfg.get("path"):
        from data.tokenizer import from_config

        tok = from_config(tok_cfg)
        return (lambda text: len(tok.encode(text))), "tokens"
    return (lambda text: len(text.split())), "words (no tokenizer configured)"


def _sources(config) -> list[SourceSpec]:
    if config.get("sources") and len(config.sources):
        return [SourceSpec.from_dict(name, {k: v for k, v in s.items()}) for name, s in config.sources.items()]
    s = config.source
    if not s.path and s.format != "embedded":
        raise ValueError("source.path is required (a glob, a file or a directory); e.g. "
                         "--config.source.path='raw/*.jsonl'")
    return [SourceSpec.from_dict("input", s.to_dict())]


class _ShardWriter:
    def __init__(self, directory: pathlib.Path, shard_size: int):
        self.directory, self.shard_size = directory, shard_size
        self.writer, self.in_shard, self.paths, self.records = None, 0, [], 0

    def write(self, record: dict) -> None:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self.writer is None or self.in_shard >= self.shard_size:
            self.close()
            path = self.directory / f"part-{len(self.paths):05d}.array_record"
            self.writer = ArrayRecordWriter(str(path), "group_size:1")
            self.paths.append(path.name)
            self.in_shard = 0
        self.writer.write(json.dumps(record, ensure_ascii=False, default=str).encode("utf-8"))
        self.in_shard += 1
        self.records += 1

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _new_stats():
    return {"documents_in": 0, "tokens_in": 0, "kept": {"documents": 0, "tokens": 0},
            "dropped": collections.defaultdict(lambda: {"documents": 0, "tokens": 0})}


def run(config) -> dict[str, Any]:
    """Cleans the configured source(s) into `config.output_dir`; returns the report."""
    if not config.output_dir:
        raise ValueError("output_dir is required: --config.output_dir=<directory>")
    out = pathlib.Path(config.output_dir).resolve()
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another output_dir or set "
                              f"--config.overwrite=True")
    specs = _sources(config)
    count_tokens, unit = _token_counter(config.tokenizer)
    quality = cleaning.QualityFilter(config.quality.to_dict()) if config.quality.enabled else None
    ed = config.exact_dedup
    exact = cleaning.ExactDedup(ed.method, ed.bloom_capacity, ed.bloom_error_rate, ed.normalize_whitespace) \
        if ed.enabled else None
    pii = cleaning.PiiScrubber(config.pii.email, config.pii.phone, config.pii.ip) if config.pii.enabled else None
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    nd = config.near_dedup
    # kept documents' shingle hashes spill to an unlinked file beside the output, not into RAM
    near = cleaning.NearDedup.from_config(nd, spill_dir=str(tmp)) if nd.enabled else None

    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "dropped").mkdir(parents=True)
    try:
        report = _clean(config, specs, tmp, count_tokens, unit, quality, exact, near, pii)
        _publish(tmp, out)
    except BaseException:  # an interrupted or failed run leaves no partial output behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logging.info("wrote %d records in %d shards to %s (%.1fs)", report["output"]["records"],
                 len(report["output"]["shards"]), out, report["seconds"])
    return report


def _publish(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Renames the finished `tmp` to `out`; a replaced `out` stays whole until the new one is in place."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _clean(config, specs, tmp: pathlib.Path, count_tokens, unit, quality, exact, near, pii) -> dict[str, Any]:
    """Runs the steps over every source, writing kept records, dropped samples and the report into `tmp`."""
    nd = config.near_dedup
    writer = _ShardWriter(tmp, config.shard_size)
    stats = {s.name: _new_stats() for s in specs}
    pii_counts: collections.Counter = collections.Counter()
    dropped_files: dict[str, Any] = {}
    lengths = {"kept": [], "dropped": []}
    t0 = time.perf_counter()
    n_seen = 0
    bad = {}

    def drop(rule, rec, tokens, st):
        st["dropped"][rule]["documents"] += 1
        st["dropped"][rule]["tokens"] += tokens
        lengths["dropped"].append(tokens)
        if st["dropped"][rule]["documents"] <= config.keep_dropped:
            f = dropped_files.get(rule)
            if f is None:
                f = dropped_files[rule] = (tmp / "dropped" / f"{rule.replace(':', '_')}.jsonl").open("w")
            f.write(json.dumps({"source": rec["source"], "file": rec["file"], "line": rec["line"],
                                "record": rec["fields"]}, ensure_ascii=False, default=str) + "\n")

    def survivors():
        """(spec, stats, record, tokens) of every record that passes the quality rules."""
        nonlocal n_seen
        for spec in specs:
            st = stats[spec.name]
            records = read_all(spec, keep_fields=True)
            bad[spec.name] = records.bad  # this run's bad records of the source, counted as they come
            for rec in records:
                n_seen += 1
                text = rec["text"]
                tokens = count_tokens(text)
                st["documents_in"] += 1
                st["tokens_in"] += tokens
                if n_seen % 10_000 == 0:
                    rate = n_seen / (time.perf_counter() - t0)
                    logging.info("%d documents read (%.0f docs/s), %d kept", n_seen, rate, writer.records)
                if quality is not None and (reason := quality.reason(text)) is not None:
                    drop(f"quality:{reason}", rec, tokens, st)
                else:
                    yield spec, st, rec, tokens

    try:
        # dedup verdicts come back in input order (near dedup hashes batches of documents)
        for (spec, st, rec, tokens), verdict in cleaning.deduplicate(
                survivors(), lambda item: item[2]["text"], exact, near, nd.batch_size):
            if verdict is not None:
                drop(verdict, rec, tokens, st)
                continue
            fields = rec["fields"]
            if pii is not None:
                clean, counts = pii.scrub(rec["text"])
                pii_counts.update(counts)
                if clean != rec["text"]:
                    _set_field(fields, spec.text_field if spec.format not in ("text", "embedded") else "text", clean)
            writer.write(fields)
            st["kept"]["documents"] += 1
            st["kept"]["tokens"] += tokens
            lengths["kept"].append(tokens)
    finally:
        writer.close()
        for f in dropped_files.values():
            f.close()
        if near is not None:
            near.close()

    for spec in specs:
        stats[spec.name]["bad_records"] = dict(bad[spec.name].counts)
        stats[spec.name]["bad_examples"] = list(bad[spec.name].examples)
    report = _report(config, specs, stats, pii_counts, writer, unit, time.perf_counter() - t0,
                     near.summary() if near is not None else None)
    (tmp / REPORT_JSON).write_text(json.dumps(report, indent=2))
    (tmp / REPORT_MD).write_text(_markdown(report))
    _histogram(lengths, unit, tmp / HISTOGRAM)
    return report


def _report(config, specs, stats, pii_counts, writer, unit, seconds, near_summary) -> dict[str, Any]:
    total = _new_stats()
    for spec in specs:
        st = stats[spec.name]
        st["dropped"] = dict(st["dropped"])
        for k in ("documents_in", "tokens_in"):
            total[k] += st[k]
        for k in ("documents", "tokens"):
            total["kept"][k] += st["kept"][k]
        for rule, d in st["dropped"].items():
            for k in ("documents", "tokens"):
                total["dropped"][rule][k] += d[k]
    total["dropped"] = dict(total["dropped"])
    total["bad_records"] = dict(sum((collections.Counter(stats[s.name]["bad_records"]) for s in specs),
                                    collections.Counter()))
    dropped = total["dropped"]
    dedup = {"exact_duplicates": dropped.get("exact_duplicate", {}).get("documents", 0),
             "near_duplicates": dropped.get("near_duplicate", {}).get("documents", 0),
             "near": near_summary}
    return {"token_unit": unit, "sources": stats, "total": total, "dedup": dedup, "pii_replacements": dict(pii_counts),
            "output": {"records": writer.records, "shards": writer.paths}, "seconds": round(seconds, 3),
            "documents_per_second": round(total["documents_in"] / max(seconds, 1e-9), 1),
            "config": json.loads(config.to_json_best_effort())}


def _markdown(r) -> str:
    t = r["total"]
    lines = ["# Cleaning report", "", f"{t['documents_in']:,} documents in ({t['tokens_in']:,} {r['token_unit']}); "
             f"{t['kept']['documents']:,} kept ({t['kept']['tokens']:,}); {r['output']['records']:,} records in "
             f"{len(r['output']['shards'])} shards; {r['seconds']:.1f} s ({r['documents_per_second']:,.0f} docs/s).",
             "", "| source | rule | documents | tokens | share of documents |", "| --- | --- | ---: | ---: | ---: |"]
    for name, st in list(r["sources"].items()) + [("all", t)]:
        n = max(st["documents_in"], 1)
        lines.append(f"| {name} | kept | {st['kept']['documents']:,} | {st['kept']['tokens']:,} | "
                     f"{st['kept']['documents'] / n:.1%} |")
        for rule, d in sorted(st["dropped"].items(), key=lambda kv: -kv[1]["documents"]):
            lines.append(f"| {name} | dropped: {rule} | {d['documents']:,} | {d['tokens']:,} | {d['documents'] / n:.1%} |")
    d = r["dedup"]
    line = f"Duplicates removed: {d['exact_duplicates']:,} exact, {d['near_duplicates']:,} near"
    if d["near"] is not None:
        n = d["near"]
        line += (f" (exact Jaccard of word {n['ngram']}-gram sets >= {n['threshold']}; candidates from MinHash LSH, "
                 f"{n['bands']} bands x {n['rows']} rows, which miss a pair at the threshold with probability "
                 f"{n['miss_probability_at_threshold']:.2%}; {n['jaccard_checks']:,} candidate pairs checked)")
    lines += ["", line + "."]
    lines += ["", "PII replacements: " + (", ".join(f"{k} {v:,}" for k, v in sorted(r["pii_replacements"].items()))
                                          or "none")]
    bad = t["bad_records"]
    lines += ["", "Bad input records (skipped): " + (", ".join(f"{k} {v:,}" for k, v in sorted(bad.items())) or "none")]
    for name, st in r["sources"].items():
        for ex in st["bad_examples"]:
            lines.append(f"- `{ex}`")
    return "\n".join(lines) + "\n"


def _histogram(lengths, unit, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    allv = np.asarray(lengths["kept"] + lengths["dropped"], float)
    if allv.size:
        bins = np.logspace(0, np.log10(max(allv.max(), 2)), 40)
        for key in ("kept", "dropped"):
            if lengths[key]:
                ax.hist(np.maximum(lengths[key], 1), bins=bins, alpha=0.6, label=f"{key} ({len(lengths[key]):,})")
        ax.set_xscale("log")
        ax.legend()
    ax.set_xlabel(f"document length ({unit.split(' ')[0]})")
    ax.set_ylabel("documents")
    ax.set_title("document lengths")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv):
    from configs.cli import quiet_library_logs

    quiet_library_logs()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; everything is set through --config.*")
    try:
        report = run(_CONFIG.value)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: one clear line, no traceback
        sys.exit(f"error: {e}")
    t = report["total"]
    print(f"kept {t['kept']['documents']:,} of {t['documents_in']:,} documents -> {_CONFIG.value.output_dir}")


if __name__ == "__main__":
    # flags are defined only when run as a program, so tests and other programs can import run()
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/data/clean.py", "Cleaning config (file:preset).")
    from configs.cli import parse_flags

    app.run(main, flags_parser=parse_flags)
