"""What the programs share (here because every package may import `configs`): flag parsing with
one-line errors, `ConfigError`, quiet library logs, the duration format of progress lines, the
cache directory."""

from __future__ import annotations

import math
import os
import pathlib
import sys

from absl import flags


class ConfigError(ValueError):
    """A config value that cannot work; programs print it as one line."""


def cache_dir() -> pathlib.Path:
    """Where derived artefacts (trained tokenizers, the measured matmul peak) are cached:
    $LOOM_CACHE, or ~/.cache/loom."""
    return pathlib.Path(os.environ.get("LOOM_CACHE") or pathlib.Path.home() / ".cache" / "loom")


def format_duration(seconds: float) -> str:
    """A duration for progress lines: "1h02m03s", "2m03s", "45s"; "?" when unknown (not finite)."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _one_line(e: BaseException) -> str:
    text = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    text = text.strip().strip("'\"").replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
    return text


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run(main, flags_parser=parse_flags)`: a bad flag or a misspelled `--config.*` key ends
    the program with one clear line (and exit status 2) instead of a long traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        text = str(e)
        if "Traceback" in text:  # a config file that raised: keep the flag and the exception's last line
            lines = [ln for ln in text.splitlines() if ln.strip()]
            cause = lines[-1].split(": ", 1)[-1]
            text = f"{lines[0].split(': Error whilst')[0]}: {cause}"
        print(f"error: {text}", file=sys.stderr)
    except (AttributeError, KeyError, ValueError, TypeError) as e:
        overrides = [a for a in argv[1:] if a.startswith("--config")]
        bad = next((a for a in overrides if any(part and part in _one_line(e) for part in
                                               a.split("=")[0].split(".")[1:])), None)
        where = f"{bad.split('=')[0]}: " if bad else ""
        text = _one_line(e)
        if isinstance(e, (AttributeError, KeyError)):
            hint = text[text.find("Did you mean"):] if "Did you mean" in text else ""
            text = f"no such config field. {hint}".strip()
        print(f"error: {where}{text}", file=sys.stderr)
    sys.exit(2)


class _LibraryFilter:
    """Drops the INFO chatter of the checkpointing, data and JAX-backend libraries (their warnings
    still show), and asyncio's "Task exception was never retrieved" dumps of an orbax restore that
    failed (the failure itself is reported in one line by whoever tried it)."""

    NOISY = ("/orbax/", "/grain/", "/tensorstore/", "/etils/", "/rouge_score/", "xla_bridge.py")

    def filter(self, record) -> bool:
        import logging as py_logging

        if record.name == "asyncio" and "never retrieved" in record.getMessage():
            return False
        return record.levelno >= py_logging.WARNING or not any(n in record.pathname for n in self.NOISY)


def quiet_library_logs() -> None:
    """Installs `_LibraryFilter` on absl's logger and on every handler of the root logger (records
    of other libraries' loggers reach absl's handler through the root)."""
    import logging as py_logging

    from absl import logging as absl_logging

    for target in (absl_logging.get_absl_logger(), *py_logging.getLogger().handlers):
        if not any(isinstance(f, _LibraryFilter) for f in target.filters):
            target.addFilter(_LibraryFilter())
    if not getattr(sys.unraisablehook, "_loom", False):
        sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)


def _quiet_unraisable(previous):
    """orbax's background event loop may be closed before its last callback at interpreter exit
    ("Exception ignored ... RuntimeError: Event loop is closed"): a shutdown-order artefact, not
    an error of the program; everything else goes to the previous hook."""

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._loom = True
    return hook
