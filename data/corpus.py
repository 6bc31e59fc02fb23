"""The embedded default corpus: the running Python's standard library source.

Real, human-written text present on every machine, with nothing to download. Files are the
stdlib's `.py` files, excluding `site-packages`, `dist-packages` and `test`/`tests` folders
(distributions strip them, so the corpus would differ between machines); sorted by their path
relative to the stdlib root; assigned to train or validation by a hash of that relative path,
so the split is stable when files are added or removed. Undecodable files are skipped and
counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sysconfig

SPLITS = ("train", "validation")
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests"})


def stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()


def corpus_files(root: pathlib.Path | None = None) -> list[str]:
    """Relative paths (POSIX) of every corpus file, sorted."""
    root = root or stdlib_root()
    rel = []
    for p in root.rglob("*.py"):
        r = p.relative_to(root)
        if EXCLUDED_DIRS.isdisjoint(r.parts[:-1]) and p.is_file():
            rel.append(r.as_posix())
    return sorted(rel)


def split_of(relpath: str, validation_fraction: float) -> str:
    """'validation' for a stable `validation_fraction` of paths, by SHA-256 of the path."""
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big") / 2.0**64
    return "validation" if h < validation_fraction else "train"


@dataclasses.dataclass(frozen=True)
class Corpus:
    paths: tuple[str, ...]  # relative to the stdlib root
    texts: tuple[str, ...]
    skipped: tuple[str, ...]  # undecodable (not UTF-8) files
    root: str

    @property
    def num_bytes(self) -> int:
        return sum(len(t.encode()) for t in self.texts)

    def fingerprint(self) -> str:
        """Identifies the file list (Python version and distribution), for caches."""
        h = hashlib.sha256()
        for p in self.paths:
            h.update(p.encode() + b"\0")
        return h.hexdigest()[:16]


def load(split: str, *, validation_fraction: float = 0.02, root: pathlib.Path | None = None) -> Corpus:
    if split not in SPLITS:
        raise ValueError(f"corpus split {split!r} is not valid; expected one of {SPLITS}")
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction={validation_fraction} must be in (0, 1)")
    root = root or stdlib_root()
    paths, texts, skipped = [], [], []
    for rel in corpus_files(root):
        if split_of(rel, validation_fraction) != split:
            continue
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(rel)
            continue
        if text.strip():
            paths.append(rel)
            texts.append(text)
    if not texts:
        raise RuntimeError(f"the embedded corpus under {root} has no readable {split!r} files")
    return Corpus(tuple(paths), tuple(texts), tuple(skipped), str(root))
