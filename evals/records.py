"""Records for evaluation tasks: every input field of local files (`data.sources`), or synthetic
examples made on the spot (`data.synthetic`).

A task's `source` config is a `data.sources.SourceSpec` (format, path, split, text_field, ...)
plus the synthetic format: `format="synthetic"`, `path=<task name>` (e.g. "addition"),
`num_examples`, `seed`, `size`.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping

from data import synthetic
from data.sources import FORMATS, SourceSpec, read_all

SOURCE_FORMATS = FORMATS  # "synthetic" among them; read here with path=<task name> (SourceSpec calls it task)
_SPEC_KEYS = ("format", "path", "split", "text_field", "text_unit", "data_dir", "validation_fraction", "strict")


def _get(cfg: Mapping[str, Any], key: str, default=None):
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def check_source(src: Mapping[str, Any], where: str) -> None:
    """Raises ValueError naming `where` (e.g. "tasks.mmlu.source") for a source that cannot be read."""
    fmt = _get(src, "format", "")
    if fmt not in SOURCE_FORMATS:
        raise ValueError(f"{where}.format={fmt!r} is not valid; expected one of {SOURCE_FORMATS}")
    if fmt == "synthetic":
        if _get(src, "path", "") not in synthetic.TASKS:
            raise ValueError(f"{where}.path={_get(src, 'path', '')!r} is not a synthetic task; valid tasks: "
                             f"{tuple(synthetic.TASKS)}")
        if int(_get(src, "num_examples", 0)) < 1:
            raise ValueError(f"{where}.num_examples={_get(src, 'num_examples', 0)} must be >= 1 for synthetic data")
    elif fmt != "embedded" and not _get(src, "path", ""):
        raise ValueError(f"{where}.path is empty: point it at local {fmt} files (globs, comma-separated)")


def source_spec(src: Mapping[str, Any], *, name: str, default_text_field: str) -> SourceSpec:
    d = {k: _get(src, k) for k in _SPEC_KEYS if _get(src, k) is not None}
    d["text_field"] = d.get("text_field") or default_text_field
    return SourceSpec.from_dict(name, d)


def read_records(src: Mapping[str, Any], *, name: str, default_text_field: str = "text", limit: int = 0,
                 multiple_choice: bool = False) -> list[dict]:
    """Up to `limit` (0 = all) records, each a dict of the record's fields.

    Synthetic sources give {"prompt", "answer"} examples, or with `multiple_choice`
    {"query", "choices", "gold"} items (the "plain" multiple-choice format). File records keep
    every field; records whose `text_field` is missing or empty are skipped (and counted, as
    `data.sources` does).
    """
    if _get(src, "format") == "synthetic":
        task, n = _get(src, "path"), int(_get(src, "num_examples", 0))
        n = min(n, limit) if limit else n
        seed, size = int(_get(src, "seed", 0)), int(_get(src, "size", 0))
        if multiple_choice:
            return synthetic.multiple_choice(task, n, seed, size)
        return synthetic.examples(task, n, seed, size)
    spec = source_spec(src, name=name, default_text_field=default_text_field)
    recs = read_all(spec, keep_fields=True)
    if limit:
        recs = itertools.islice(recs, limit)
    return [dict(r["fields"]) for r in recs]
