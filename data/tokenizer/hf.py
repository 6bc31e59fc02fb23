"""Hugging Face tokenizers for imported models, behind the common tokenizer interface.

A model directory (or the `tokenizer/` folder `python -m models.hf import` writes) holds
  tokenizer.json          the `tokenizers` library's serialised pipeline   -> `HFTokenizer`
  tokenizer.model         a sentencepiece model (Llama 2, Gemma)          -> `HFSentencePieceTokenizer`
  tokenizer_config.json   special tokens (bos/eos/pad/unk) and, in older saves, the chat template
  chat_template.jinja     the chat template (transformers >= 4.43 saves it here)
`load_hf_tokenizer(path)` picks the class. Both expose `encode(text) -> list[int]` (no special
tokens added unless `add_special_tokens=True`: the data pipeline adds bos/eos itself),
`decode(ids) -> str`, `bos_id`, `eos_id`, `pad_id`, `vocab_size` and
`apply_chat_template(messages, add_generation_prompt=...)`, rendered with jinja2 in the same
sandboxed environment transformers uses (trim_blocks, lstrip_blocks, loop controls, a `tojson`
that keeps non-ASCII, `raise_exception`, `strftime_now`), so prompts match transformers' exactly.

`bos_id` is None when the tokenizer has no BOS token (Qwen); `pad_id` falls back to the EOS id,
then 0 (padding is masked by segment ids, so any valid id works).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import pathlib
import re
from typing import Any, Sequence

CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _content(token) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token


def read_tokenizer_files(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """(tokenizer_config, chat templates by name: "default" and any named ones)."""
    directory = pathlib.Path(directory)
    config: dict[str, Any] = {}
    if (directory / CONFIG_FILE).is_file():
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    legacy_map = directory / "special_tokens_map.json"  # older saves keep special tokens only here
    if legacy_map.is_file():
        for key, value in json.loads(legacy_map.read_text(encoding="utf-8")).items():
            config.setdefault(key, value)
    templates: dict[str, str] = {}
    raw = config.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        templates.update({t["name"]: t["template"] for t in raw})
    if (directory / TEMPLATE_FILE).is_file():
        templates["default"] = (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    if (directory / TEMPLATE_DIR).is_dir():
        for f in sorted((directory / TEMPLATE_DIR).glob("*.jinja")):
            templates[f.stem] = f.read_text(encoding="utf-8")
    return config, templates


_ENV = None


def _environment():
    """transformers' chat-template environment (utils/chat_template_utils.py), built once."""
    global _ENV
    if _ENV is None:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class GenerationTag(jinja2.ext.Extension):
            # `{% generation %}...{% endgeneration %}` marks assistant text for loss masks in
            # transformers; here it renders its body unchanged.
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

            def _render(self, caller):
                return caller()

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[GenerationTag, jinja2.ext.loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        _ENV = env
    return _ENV


@functools.lru_cache(maxsize=64)
def compile_chat_template(template: str):
    """The jinja2 Template of a chat template's source, compiled once per process (a chat is
    rendered several times per SFT example)."""
    return _environment().from_string(template)


def render_chat_template(template: str, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                         special_tokens: dict[str, str] | None = None, **kwargs) -> str:
    """The chat `template` rendered for `messages` (dicts with role / content, ...).

    The template sees `messages`, `add_generation_prompt`, the special tokens by name
    (`bos_token`, `eos_token`, ...) and any extra keyword (`tools`, `documents`,
    `enable_thinking`...), as in transformers' `apply_chat_template(..., tokenize=False)`.
    """
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    context = {**(special_tokens or {}), **kwargs}
    messages = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    return compile_chat_template(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                  **context)


class _ChatMixin:
    """Special tokens and chat templates shared by both tokenizer classes."""

    config: dict[str, Any]
    templates: dict[str, str]

    def _init_specials(self, token_to_id, fallback: dict[str, int | None]):
        self.special_tokens = {k: _content(self.config[k]) for k in SPECIAL_KEYS if _content(self.config.get(k))}

        def id_of(key):
            token = self.special_tokens.get(key)
            i = token_to_id(token) if token is not None else None
            return fallback.get(key) if i is None else i

        self.bos_id = id_of("bos_token")
        self.eos_id = id_of("eos_token")
        pad = id_of("pad_token")
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.unk_id = id_of("unk_token")

    @property
    def chat_template(self) -> str | None:
        return self.templates.get("default")

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = False,
                            tokenize: bool = False, template: str | None = None, **kwargs):
        """The rendered prompt (a string), or its token ids with `tokenize=True` (no special tokens
        added beyond those the template writes, as transformers does). `template` picks a named
        template (e.g. "tool_use") or is a template string itself."""
        source = self.templates.get(template or "default", template)
        if not source:
            raise ValueError(f"{self.name} has no chat template (looked in {CONFIG_FILE} and {TEMPLATE_FILE})")
        text = render_chat_template(source, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=self.special_tokens, **kwargs)
        return self.encode(text) if tokenize else text


class HFTokenizer(_ChatMixin):
    """A `tokenizer.json` (Hugging Face `tokenizers`). Picklable: grain workers receive it by value."""

    def __init__(self, tokenizer_json: str, config: dict[str, Any] | None = None,
                 templates: dict[str, str] | None = None, name: str = "tokenizer.json"):
        from tokenizers import Tokenizer

        self._json, self.name = tokenizer_json, name
        self.config, self.templates = dict(config or {}), dict(templates or {})
        self._tok = Tokenizer.from_str(tokenizer_json)
        # transformers' `split_special_tokens`: special tokens written in the text are plain text
        self._tok.encode_special_tokens = bool(self.config.get("split_special_tokens", False))
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self._init_specials(self._tok.token_to_id, {})

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "HFTokenizer":
        directory = pathlib.Path(directory)
        config, templates = read_tokenizer_files(directory)
        return cls((directory / "tokenizer.json").read_text(encoding="utf-8"), config, templates,
                   name=str(directory / "tokenizer.json"))

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and each token's (start, end) character span in `text`."""
        e = self._tok.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def special_ids(self) -> set[int]:
        """Ids of the added tokens marked special (a chat template's turn markers among them)."""
        return {int(i) for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

    def __getstate__(self):
        return {"json": self._json, "config": self.config, "templates": self.templates, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["json"], state["config"], state["templates"], state["name"])

    def __repr__(self):
        return f"HFTokenizer({self.name!r}, vocab_size={self.vocab_size})"


class HFSentencePieceTokenizer(_ChatMixin):
    """A `tokenizer.model` (sentencepiece) with tokenizer_config.json's special and added tokens.

    Special / added tokens written in the text (e.g. by a chat template) map to their ids, and the
    text between them goes through sentencepiece, as transformers' sentencepiece tokenizers do;
    with `split_special_tokens` in tokenizer_config.json (as `models.hf export` writes for Loom's
    own tokenizers) special tokens in the text are plain text, here and in `HFTokenizer`.
    `encode(..., add_special_tokens=True)` adds BOS / EOS as tokenizer_config.json's
    `add_bos_token` / `add_eos_token` say (both off when absent, as in transformers 5).
    """

    def __init__(self, model_proto: bytes, config: dict[str, Any] | None = None,
                 templates: dict[str, str] | None = None, name: str = "tokenizer.model"):
        import sentencepiece as spm

        self._proto, self.name = bytes(model_proto), name
        self.config, self.templates = dict(config or {}), dict(templates or {})
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        added = {_content(v): int(k) for k, v in self.config.get("added_tokens_decoder", {}).items()}
        self._added = {t: i for t, i in added.items() if t}
        self.vocab_size = max([self._sp.get_piece_size()] + [i + 1 for i in self._added.values()])

        def token_to_id(token):
            if token in self._added:
                return self._added[token]
            i = self._sp.piece_to_id(token)
            return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

        sp_ids = {"bos_token": self._sp.bos_id(), "eos_token": self._sp.eos_id(), "pad_token": self._sp.pad_id(),
                  "unk_token": self._sp.unk_id()}
        self._init_specials(token_to_id, {k: (v if v >= 0 else None) for k, v in sp_ids.items()})
        specials = dict(self._added)
        for token in self.special_tokens.values():
            i = token_to_id(token)
            if i is not None:
                specials[token] = i
        self._specials = specials
        self._special_ids = {i: t for t, i in specials.items()}
        parsed = specials
        if self.config.get("split_special_tokens"):
            special = set(self.special_tokens.values()) | {
                _content(v) for v in self.config.get("added_tokens_decoder", {}).values()
                if isinstance(v, dict) and v.get("special")}
            parsed = {t: i for t, i in specials.items() if t not in special}
        self._split = (re.compile("(" + "|".join(map(re.escape, sorted(parsed, key=len, reverse=True))) + ")")
                       if parsed else None)

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> "HFSentencePieceTokenizer":
        directory = pathlib.Path(directory)
        config, templates = read_tokenizer_files(directory)
        return cls((directory / "tokenizer.model").read_bytes(), config, templates,
                   name=str(directory / "tokenizer.model"))

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        ids: list[int] = []
        parts = self._split.split(text) if self._split is not None else [text]
        for j, part in enumerate(parts):
            if j % 2:
                ids.append(self._specials[part])
            elif part:
                ids.extend(self._sp.encode(part))
        if add_special_tokens:
            if self.config.get("add_bos_token", False) and self.bos_id is not None:
                ids = [self.bos_id] + ids
            if self.config.get("add_eos_token", False) and self.eos_id is not None:
                ids = ids + [self.eos_id]
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode(text)` and each token's (start, end) character span in `text`."""
        ids: list[int] = []
        offsets: list[tuple[int, int]] = []
        pos = 0
        for j, part in enumerate(self._split.split(text) if self._split is not None else [text]):
            if j % 2:
                ids.append(self._specials[part])
                offsets.append((pos, pos + len(part)))
            elif part:
                enc = self._sp.encode(part, return_type="offset_mapping")
                ids.extend(enc["ids"])
                offsets.extend((pos + a, pos + b) for a, b in enc["offsets"])
            pos += len(part)
        return ids, offsets

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        out, run = [], []
        for i in map(int, ids):
            if i in self._special_ids:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                if not skip_special_tokens:
                    out.append(self._special_ids[i])
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        return self._special_ids.get(int(i)) or self._sp.id_to_piece(int(i))

    def special_ids(self) -> set[int]:
        """Ids of the special and added tokens (BOS / EOS and a chat template's turn markers among them)."""
        return set(self._special_ids)

    def __getstate__(self):
        return {"proto": self._proto, "config": self.config, "templates": self.templates, "name": self.name}

    def __setstate__(self, state):
        self.__init__(state["proto"], state["config"], state["templates"], state["name"])

    def __repr__(self):
        return f"HFSentencePieceTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def load_hf_tokenizer(path: str | os.PathLike) -> HFTokenizer | HFSentencePieceTokenizer:
    """The tokenizer in a Hugging Face model directory (or a path to its tokenizer.json /
    tokenizer.model): tokenizer.json is preferred, as transformers' fast tokenizers do."""
    path = pathlib.Path(path)
    if path.is_file():
        if path.name.endswith(".json"):
            config, templates = read_tokenizer_files(path.parent)
            return HFTokenizer(path.read_text(encoding="utf-8"), config, templates, name=str(path))
        config, templates = read_tokenizer_files(path.parent)
        return HFSentencePieceTokenizer(path.read_bytes(), config, templates, name=str(path))
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.from_dir(path)
    if (path / "tokenizer.model").is_file():
        return HFSentencePieceTokenizer.from_dir(path)
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {path}; found {found}")
