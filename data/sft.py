"""Supervised fine-tuning data: chat records -> token ids with an assistant-only loss mask.

    records of each source (data/sources.py with a chat `schema`): {"messages": [...], "file", "line", ...}
    -> `ChatTokenizer.tokenize`: render the chat with its template, tokenize once, mask
    -> `ChatExamples`: documents {"inputs", "targets", "source", "loss_mask", "truncated", "dropped"}
       (examples longer than `seq_len` truncated or dropped, and counted)
    -> data/pipeline.py: mix, pack (the loss mask packed with the tokens), batch

Record shapes (`SourceSpec.schema`; "auto" detects each record's, in this order):
  messages           {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
  prompt_completion  {"prompt": str, "completion": str} -> user / assistant; or both lists of
                     messages (TRL's conversational form), concatenated
  alpaca             {"instruction": str, "input": str (optional), "output": str} -> user
                     (instruction, then a blank line and the input when there is one) / assistant
The field names are the spec's `messages_field`, `prompt_field`, ... (defaults as above; dots
reach nested keys). Every chat must hold an assistant turn. The `synthetic` format gives
prompt / completion records of a data/synthetic.py task (exact answers, verifiable). A source
with `schema="text"` gives plain documents (`[bos] + tokens + [eos]`, as pretraining) whose every
target is trained: continued pretraining, e.g. on long documents to extend a model's context.

Chat template: `chat_template_for(tokenizer, override)`: the override (template text, a `.jinja`
file, a named template of the tokenizer, or "loom"), else the tokenizer's own (jinja, rendered
as transformers does), else Loom's `DEFAULT_CHAT_TEMPLATE` (which serving shares):

    <s><|system|>\\nBe brief.</s><|user|>\\nHi</s><|assistant|>\\nHello</s>

with the tokenizer's BOS / EOS for <s> / </s>: each turn ends with EOS, so a model stops at EOS.
Other templates end a turn with a token of their own (Llama 3's `<|eot_id|>`, ChatML's
`<|im_end|>`): `ChatTokenizer.stop_ids()` gives EOS and that token, what generation stops at.
For Loom's sentencepiece tokenizers, whose BOS / EOS have no text that encodes to them, the
template's `bos_token` / `eos_token` become those ids (the same strings inside a message stay text).

Loss mask (GOTCHAS "Chat templates"): render the whole chat once; assistant turn i covers the
characters [len(render(m[:i], add_generation_prompt=True)), len(render(m[:i+1]))) -- its content and
what the template writes up to the next turn, end-of-turn token included; both renders must be
prefixes of the whole chat (a template that rewrites earlier turns, as Qwen3 drops old <think>
blocks, raises `TemplatePrefixError`). The whole text is tokenized once with character offsets
(no BOS added: the template writes it), and a token is an assistant token when its first
character lies in an assistant span. Targets are ids[1:], so `loss_mask[t]` is 1 where target t
is an assistant token.

Bad input: a record that is no chat (unknown shape, a missing or non-string field, no assistant
turn) is a bad record of its source (skipped, counted and logged with file and line, or a
`DataError` naming them with `strict=True`); so is a chat the template fails to render. A
template that breaks the prefix property is a `DataError` always. A source that gives no example
at all raises `EmptySourceError`.
"""

from __future__ import annotations

import logging
import pathlib
import re
from typing import Any, Sequence

import grain
import numpy as np

from data import pipeline
from data.sources import CHAT_SCHEMAS, BadRecords, DataError, EmptySourceError, SourceSpec, check_paths, get_field
from data.sources import specs_from_config as _specs_from_config

SCHEMAS = CHAT_SCHEMAS + ("text",)  # "text": plain documents, every target trained
TRUNCATIONS = ("truncate", "drop")
# Per-target document features: the loss mask, and the overlong-example counts that ride in the
# batches (`truncated_BT`, `dropped_BT`), so a trainer counts them exactly with worker processes
# and across a resume.
FEATURES = pipeline.FEATURES + ("loss_mask", "truncated", "dropped")

# Loom's chat template, for tokenizers without one of their own (Loom's sentencepiece models).
# Every turn is "<|role|>\n" + content + EOS; the generation prompt is "<|assistant|>\n".
DEFAULT_CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}\n"
    "{{- raise_exception(\"Loom's default chat template has the roles system, user and assistant, not \" "
    "+ message['role']) -}}\n"
    "{%- endif -%}\n"
    "{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}\n"
)

# Stand-ins for BOS / EOS while rendering for a tokenizer whose specials have no text form:
# Unicode noncharacters, which no text should hold (a message holding one is a bad record).
_BOS_MARK, _EOS_MARK = "\ufdd0", "\ufdd1"

# A source whose first this-many records in a row give no example (all bad, or all too long for
# seq_len) is misconfigured: stop rather than spin.
MAX_SKIPPED_WITHOUT_EXAMPLE = 10_000


class ChatRecordError(ValueError):
    """A record that is no usable chat; `kind` names the reason for the bad-record counts."""

    def __init__(self, reason: str, kind: str):
        super().__init__(reason)
        self.kind = kind


class ChatRenderError(ChatRecordError):
    """The chat template failed on this chat (a jinja error or the template's raise_exception)."""

    def __init__(self, reason: str):
        super().__init__(reason, "template_error")


class TemplatePrefixError(ValueError):
    """The chat template renders a chat's first turns differently when more turns follow, so
    assistant turns cannot be located in the whole chat."""


# --------------------------------------------------------------------------------------------
# Record shapes


def _message_list(value: Any, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else type(value).__name__
        raise ChatRecordError(f"field {field!r} is {what}, not a list of {{role, content}} messages", "bad_message")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise ChatRecordError(f"{field}[{i}] is {type(m).__name__}, not a {{role, content}} dict", "bad_message")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or not role:
            raise ChatRecordError(f"{field}[{i}] has no role string (role={role!r})", "bad_message")
        if not isinstance(content, str):
            raise ChatRecordError(f"{field}[{i}] ({role}) has content of type {type(content).__name__}, "
                                  "not a string", "bad_message")
        out.append(dict(m))
    return out


def _string(obj: Any, field: str, *, optional: bool = False) -> str | None:
    try:
        value = get_field(obj, field)
    except KeyError as e:
        if optional:
            return None
        raise ChatRecordError(f"missing field {field!r} (no {e.args[0]!r})", "missing_field") from None
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise ChatRecordError(f"field {field!r} is {type(value).__name__}, not a string", "not_string")
    return value


def _has(obj: Any, field: str) -> bool:
    try:
        get_field(obj, field)
    except KeyError:
        return False
    return True


def detect_schema(obj: Any, spec: SourceSpec) -> str:
    """The record's shape: "messages", "prompt_completion" or "alpaca" (by the fields it has)."""
    if _has(obj, spec.messages_field):
        return "messages"
    if _has(obj, spec.prompt_field) and _has(obj, spec.completion_field):
        return "prompt_completion"
    if _has(obj, spec.instruction_field) and _has(obj, spec.output_field):
        return "alpaca"
    keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
    raise ChatRecordError(
        f"unknown record shape (fields {keys}): expected {spec.messages_field!r} (a list of messages), "
        f"{spec.prompt_field!r} + {spec.completion_field!r}, or {spec.instruction_field!r} (+ "
        f"{spec.input_field!r}) + {spec.output_field!r}", "unknown_shape")


def record_messages(obj: Any, spec: SourceSpec) -> list[dict]:
    """A record as a chat: a list of {"role", "content", ...} dicts with at least one assistant
    turn, read by `spec.schema` ("auto" detects it) from the spec's fields. Raises
    `ChatRecordError` (with a `kind`) for a record that is no usable chat."""
    schema = spec.schema
    if schema == "auto":
        schema = detect_schema(obj, spec)
    if schema == "messages":
        try:
            value = get_field(obj, spec.messages_field)
        except KeyError as e:
            raise ChatRecordError(f"missing field {spec.messages_field!r} (no {e.args[0]!r})",
                                  "missing_field") from None
        messages = _message_list(value, spec.messages_field)
    elif schema == "prompt_completion":
        try:
            prompt, completion = get_field(obj, spec.prompt_field), get_field(obj, spec.completion_field)
        except KeyError as e:
            raise ChatRecordError(f"missing field {e.args[0]!r} ({spec.prompt_field!r} and "
                                  f"{spec.completion_field!r} are needed)", "missing_field") from None
        if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt / completion
            messages = _message_list(prompt, spec.prompt_field) + _message_list(completion, spec.completion_field)
        else:
            prompt, completion = _string(obj, spec.prompt_field), _string(obj, spec.completion_field)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    elif schema == "alpaca":
        instruction, output = _string(obj, spec.instruction_field), _string(obj, spec.output_field)
        extra = _string(obj, spec.input_field, optional=True)
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        raise ValueError(f"schema={schema!r} is not a chat schema; expected one of {CHAT_SCHEMAS}")
    if not any(m["role"] == "assistant" for m in messages):
        roles = [m["role"] for m in messages]
        raise ChatRecordError(f"chat has no assistant turn (roles {roles}): nothing to train on", "no_assistant")
    return messages


# --------------------------------------------------------------------------------------------
# Templates and tokenization


def chat_template_for(tokenizer, override: str | None = None) -> str:
    """The chat template to use: `override` (jinja text, a path to a template file, a named template
    of the tokenizer, or "loom" for DEFAULT_CHAT_TEMPLATE) if set, else the tokenizer's own, else
    DEFAULT_CHAT_TEMPLATE."""
    own = getattr(tokenizer, "templates", None) or {}
    if not override:
        return own.get("default") or DEFAULT_CHAT_TEMPLATE
    if override == "loom":
        return DEFAULT_CHAT_TEMPLATE
    if override in own:
        return own[override]
    if "{{" in override or "{%" in override:
        return override
    path = pathlib.Path(override).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise ValueError(f"chat_template={override!r} is neither a jinja template, a file, 'loom', nor a template of "
                     f"the tokenizer (it has {sorted(own) or 'none'})")


class ChatTokenizer:
    """A tokenizer with a chat template: renders chats, tokenizes them with an assistant loss mask,
    and encodes prompts for generation. Picklable (grain workers receive it by value).

    The tokenizer needs `encode_with_offsets(text) -> (ids, [(start, end), ...])` (Loom's
    sentencepiece and both Hugging Face tokenizer classes have it). Hugging Face tokenizers render
    with their special tokens by name (`bos_token`, `eos_token`, ...) and tokenize the text as
    transformers does; others (Loom's sentencepiece) render `bos_token` / `eos_token` as their ids.
    """

    def __init__(self, tokenizer, template: str | None = None):
        if not hasattr(tokenizer, "encode_with_offsets"):
            raise TypeError(f"{tokenizer!r} has no encode_with_offsets: SFT needs each token's character "
                            "span to find assistant tokens")
        self.tokenizer = tokenizer
        self.template = chat_template_for(tokenizer, template)
        names = getattr(tokenizer, "special_tokens", None)
        if names is not None:  # Hugging Face: special tokens are text the tokenizer parses
            self.context, self.marks = dict(names), {}
        else:
            bos, eos = tokenizer.bos_id, tokenizer.eos_id
            self.marks = {m: int(i) for m, i in ((_BOS_MARK, bos), (_EOS_MARK, eos)) if i is not None and i >= 0}
            self.context = {"bos_token": _BOS_MARK if _BOS_MARK in self.marks else "",
                            "eos_token": _EOS_MARK if _EOS_MARK in self.marks else ""}
        self._split = re.compile("(" + "|".join(self.marks) + ")") if self.marks else None
        self._compiled()  # a template that does not compile fails here, not on the first record

    def _compiled(self):
        from data.tokenizer.hf import compile_chat_template

        return compile_chat_template(self.template)

    def _render(self, messages: Sequence[dict], add_generation_prompt: bool) -> str:
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return self._compiled().render(messages=messages, add_generation_prompt=add_generation_prompt,
                                           **self.context)
        except Exception as e:  # the template is user code: any error is this chat's
            raise ChatRenderError(f"the chat template failed to render this chat: {type(e).__name__}: {e}") from None

    def render(self, messages: Sequence[dict], *, add_generation_prompt: bool = False) -> str:
        """The chat as text (BOS / EOS shown as their pieces where they have no text of their own)."""
        text = self._render(messages, add_generation_prompt)
        if self.marks and hasattr(self.tokenizer, "id_to_piece"):
            for mark, i in self.marks.items():
                text = text.replace(mark, self.tokenizer.id_to_piece(i))
        return text

    def _check(self, messages: Sequence[dict]) -> None:
        for i, m in enumerate(messages):
            for k, v in m.items():
                if isinstance(v, str) and any(mark in v for mark in self.marks):
                    raise ChatRecordError(f"message {i} ({m.get('role')}) field {k!r} holds U+FDD0 or U+FDD1, "
                                          "which stand for BOS / EOS while rendering", "reserved_character")

    def _encode(self, text: str) -> tuple[list[int], np.ndarray]:
        """Token ids of rendered text and each token's first character."""
        if self._split is None:
            ids, offsets = self.tokenizer.encode_with_offsets(text)
            return list(ids), np.asarray([a for a, _ in offsets], np.int64).reshape(-1)
        ids, starts, pos = [], [], 0
        for j, part in enumerate(self._split.split(text)):
            if j % 2:
                ids.append(self.marks[part])
                starts.append(pos)
            elif part:
                part_ids, offsets = self.tokenizer.encode_with_offsets(part)
                ids.extend(part_ids)
                starts.extend(pos + a for a, _ in offsets)
            pos += len(part)
        return ids, np.asarray(starts, np.int64)

    def assistant_spans(self, messages: Sequence[dict]) -> tuple[str, list[tuple[int, int]]]:
        """(the whole rendered chat, the character span of every assistant turn)."""
        self._check(messages)
        full = self._render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:i], True)
            through = self._render(messages[:i + 1], False)
            for name, part in (("the chat before it, with the generation prompt,", before),
                               ("the chat up to and including it", through)):
                if not full.startswith(part):
                    at = next((k for k, (a, b) in enumerate(zip(part, full)) if a != b), min(len(part), len(full)))
                    raise TemplatePrefixError(
                        f"the chat template breaks the prefix property at message {i} (assistant): {name} renders "
                        f"as {part[max(0, at - 30):at + 30]!r} at character {at}, where the whole chat has "
                        f"{full[max(0, at - 30):at + 30]!r}; assistant tokens cannot be located (templates that "
                        "rewrite earlier turns, e.g. dropping old <think> blocks, cannot be trained on as is)")
            spans.append((len(before), len(through)))
        return full, spans

    def tokenize(self, messages: Sequence[dict], *, from_message: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(ids [L] int32, mask [L] int32): the whole chat's tokens, and 1 on assistant tokens
        (every assistant turn, its end-of-turn token included), 0 elsewhere. With `from_message`
        = k only the assistant turns among messages[k:] are marked (a preference pair's response
        after its prompt, data/preferences.py)."""
        full, spans = self.assistant_spans(messages)
        ids, starts = self._encode(full)
        mask = np.zeros(len(ids), np.int32)
        skip = sum(m["role"] == "assistant" for m in messages[:from_message])
        for k, (a, b) in list(enumerate(spans))[skip:]:
            inside = (starts >= a) & (starts < b)
            if not inside.any():
                raise ChatRenderError(f"assistant turn {k} renders to no token (characters {a}:{b})")
            mask |= inside
        return np.asarray(ids, np.int32), mask

    def stop_ids(self) -> list[int]:
        """Ids that end an assistant answer: EOS, and the special token the template writes right
        after an assistant message's content (Llama 3's `<|eot_id|>`, ChatML's `<|im_end|>`,
        Gemma's `<end_of_turn>`), found by rendering a probe chat. A turn that ends in plain text
        (a blank line) adds nothing: generation would stop at every such text."""
        eos = self.tokenizer.eos_id
        stops = [] if eos is None or eos < 0 else [int(eos)]
        answer = "Hello"
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]
        try:
            full, [(a, b)] = self.assistant_spans(probe)
        except (ChatRecordError, TemplatePrefixError):
            return stops
        at = full.find(answer, a, b)
        if at < 0:  # the template rewrote the content
            return stops
        special = set(self.marks.values()) | set(getattr(self.tokenizer, "special_ids", set)())
        ids, starts = self._encode(full)
        after = [int(i) for i, st in zip(ids, starts) if at + len(answer) <= st < b]
        if after and after[0] in special and after[0] not in stops:
            stops.append(after[0])
        return stops

    def prompt_ids(self, messages: Sequence[dict]) -> list[int]:
        """Token ids of `messages` followed by the generation prompt (what a model completes)."""
        self._check(messages)
        return self._encode(self._render(messages, True))[0]


def tokenize_chat(tokenizer, messages: Sequence[dict], *, template: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, assistant mask) of one chat; see `ChatTokenizer.tokenize`."""
    return ChatTokenizer(tokenizer, template).tokenize(messages)


# --------------------------------------------------------------------------------------------
# Examples: one source's records -> SFT documents


class ChatExamples(grain.IterDataset):
    """One source's chat records -> documents {"inputs", "targets", "source", "loss_mask",
    "truncated", "dropped"} (int32 arrays of one value per target).

    An example with more than `seq_len` targets is cut to its first `seq_len` ("truncate"; dropped
    instead when no assistant token is left) or dropped ("drop"). `truncated` is 1 on the first
    target of a truncated example; `dropped` holds, on the first target of an example, how many
    examples of this source were dropped since the one before it. Both ride through packing into
    the batches (`truncated_BT`, `dropped_BT`; `example_counts`), exactly with worker processes and
    across a resume (the count not yet placed is in the iterator state); drops after the last
    example of a finite read are logged only. Chats the template fails on are bad records of the
    source (skipped and counted, or DataError with `spec.strict`).
    """

    def __init__(self, parent: grain.IterDataset, chat: ChatTokenizer, spec: SourceSpec, *, source_id: int,
                 seq_len: int, truncation: str = "truncate"):
        super().__init__(parent)
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation={truncation!r} is not valid; expected one of {TRUNCATIONS}")
        if seq_len <= 0:
            raise ValueError(f"seq_len={seq_len} must be positive")
        self.chat, self.spec, self.source_id = chat, spec, source_id
        self.seq_len, self.truncation = seq_len, truncation
        self.max_skipped = MAX_SKIPPED_WITHOUT_EXAMPLE

    def __iter__(self):
        return _ChatExamplesIterator(self._parent.__iter__(), self)

    def __str__(self):
        return f"ChatExamples({self.spec.name!r}, seq_len={self.seq_len}, truncation={self.truncation!r})"


class _ChatExamplesIterator(grain.DatasetIterator):
    kind = "SFT"  # in log lines

    def __init__(self, parent, ds: ChatExamples):
        super().__init__(parent)
        self.ds = ds
        self.bad = BadRecords(ds.spec.name, ds.spec.strict)
        self.pending_dropped = 0  # dropped since the last example: rides on the next one (checkpointed)
        self.examples, self.skipped, self.overlong, self.restored = 0, 0, 0, False

    def __next__(self):
        ds = self.ds
        while True:
            try:
                rec = next(self._parent)
            except StopIteration:
                if not self.examples and not self.restored and self.skipped:
                    raise self.no_examples_error() from None
                raise
            doc = self._example(rec)
            if doc is not None:
                self.examples += 1
                self.skipped = 0
                return doc
            self.skipped += 1
            if not self.examples and not self.restored and self.skipped >= ds.max_skipped:
                raise self.no_examples_error(f"; stopped after {self.skipped} records in a row without one")

    def _example(self, rec) -> dict[str, np.ndarray] | None:
        ds = self.ds
        try:
            ids, mask = ds.chat.tokenize(rec["messages"])
        except ChatRecordError as e:
            self.bad.report(rec["file"], rec["line"], str(e), e.kind)
            return None
        except TemplatePrefixError as e:
            raise DataError(rec["file"], rec["line"], str(e)) from None
        n, truncated = len(ids) - 1, 0
        if n > ds.seq_len:
            if self.drop_overlong(rec, n, keep=mask[1:ds.seq_len + 1].any(), what="no assistant token within it"):
                return None
            ids, mask, n, truncated = ids[:ds.seq_len + 1], mask[:ds.seq_len + 1], ds.seq_len, 1
        first = np.zeros(n, np.int32)
        doc = {"inputs": ids[:-1], "targets": ids[1:], "source": np.full(n, ds.source_id, np.int32),
               "loss_mask": mask[1:], "truncated": first.copy(), "dropped": first}
        doc["truncated"][0], doc["dropped"][0] = truncated, self.pending_dropped
        self.pending_dropped = 0
        return doc

    def drop_overlong(self, rec, n: int, *, keep: bool, what: str) -> bool:
        """Counts an example of `n` > seq_len tokens; True (counted as dropped, the first few logged)
        when it is dropped: truncation "drop", or nothing to train on is left (`keep` False: `what`)."""
        ds = self.ds
        self.overlong += 1
        if ds.truncation != "drop" and keep:
            return False
        self.pending_dropped += 1
        if self.overlong <= 5:
            logging.warning("%s source %r: dropped %s:%d (%d tokens > seq_len %d%s)", self.kind, ds.spec.name,
                            rec["file"], rec["line"], n, ds.seq_len, "" if ds.truncation == "drop" else f"; {what}")
        return True

    def no_examples_error(self, why: str = "") -> EmptySourceError:
        ds = self.ds
        where = ds.spec.path or f"{ds.spec.format}:{ds.spec.split}"
        dropped = "dropped" if ds.truncation == "drop" else "no assistant token within seq_len"
        first = f" (first: {self.bad.first})" if self.bad.first else ""
        return EmptySourceError(f"source {ds.spec.name!r} ({where}) yielded 0 SFT examples: {self.pending_dropped} "
                                f"longer than seq_len={ds.seq_len} ({dropped}), {self.bad.total} chats the template "
                                f"failed on{first}{why}")

    def get_state(self):
        return {"parent": self._parent.get_state(), "dropped": self.pending_dropped}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.pending_dropped = int(state["dropped"])
        self.skipped, self.restored = 0, True


def example_counts(batch: dict[str, np.ndarray]) -> dict[str, int]:
    """{"truncated", "dropped"}: the overlong examples a batch (or a sum of batches) accounts for."""
    return {"truncated": int(np.sum(batch["truncated_BT"])), "dropped": int(np.sum(batch["dropped_BT"]))}


# --------------------------------------------------------------------------------------------
# Sources -> batches


def specs_from_config(sources) -> list[SourceSpec]:
    """SourceSpecs of SFT sources from a config mapping {name: {format, path, schema, ...}}; a
    source without a schema gets "auto"."""
    specs = _specs_from_config(with_default_schema(sources, "auto"))
    check_specs(specs)
    return specs


def with_default_schema(sources, schema: str) -> dict[str, dict]:
    """{name: source dict} of a config mapping (or pairs), a source without a schema given `schema`."""
    items = sources.items() if hasattr(sources, "items") else sources
    out = {}
    for name, v in items:
        d = dict(v.to_dict() if hasattr(v, "to_dict") else v)
        if d.get("schema") is None:
            d["schema"] = schema
        out[name] = d
    return out


def check_specs(specs: Sequence[SourceSpec]) -> None:
    """ValueError naming a source whose schema SFT does not read."""
    for s in specs:
        if s.schema not in SCHEMAS:
            raise ValueError(f"source {s.name!r}: SFT reads chats or plain text, but schema={s.schema!r}; set it "
                             f"to one of {SCHEMAS} ('auto' detects each record's chat shape)")


class TextExample:
    """A plain-text record -> a document of FEATURES with every target trained (`schema="text"`)."""

    def __init__(self, tokenizer, source_id: int):
        self.tokenize = pipeline.TokenizeDocument(tokenizer, source_id)

    def __call__(self, rec) -> dict[str, np.ndarray]:
        doc = self.tokenize(rec)
        n = len(doc["targets"])
        return {**doc, "loss_mask": np.ones(n, np.int32), "truncated": np.zeros(n, np.int32),
                "dropped": np.zeros(n, np.int32)}


def _documents(specs, tokenizer, chat_template, seq_len, truncation):
    """The `documents` function of pipeline.mixture_docs for SFT, after checking the arguments."""
    check_specs(specs)
    check_paths(list(specs))
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation={truncation!r} is not valid; expected one of {TRUNCATIONS}")
    chat = ChatTokenizer(tokenizer, chat_template)

    def documents(records, i, spec):
        if spec.schema == "text":
            return records.map(TextExample(tokenizer, i))
        return ChatExamples(records, chat, spec, source_id=i, seq_len=seq_len, truncation=truncation)

    return documents


def sft_docs(specs: Sequence[SourceSpec], tokenizer, *, seq_len: int, chat_template: str | None = None,
             truncation: str = "truncate", seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
             shard_index: int = 0, shard_count: int = 1) -> grain.IterDataset:
    """SFT documents (FEATURES) of a weighted mixture of chat sources, for one data shard."""
    return pipeline.mixture_docs(specs, tokenizer, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                                 shard_index=shard_index, shard_count=shard_count,
                                 documents=_documents(specs, tokenizer, chat_template, seq_len, truncation))


def sft_batches(specs: Sequence[SourceSpec], tokenizer, *, seq_len: int, batch_size: int,
                chat_template: str | None = None, truncation: str = "truncate", packing: str = "best_fit",
                num_packing_bins: int = 64, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
                shard_index: int = 0, shard_count: int = 1, shuffle_window: int = 0, num_workers: int = 0,
                drop_remainder: bool = True) -> grain.IterDataset:
    """Batches of SFT examples for this process: rows of `seq_len` in the batch format, with
    `loss_mask_BT` on assistant tokens only, plus `source_BT`, `truncated_BT` and `dropped_BT`.

    "best_fit" (the default) keeps every example whole in one row, as SFT wants (examples are at
    most `seq_len` after truncation); "concat" would continue an example in the next row as a new
    segment that no longer sees its prompt.
    """
    documents = _documents(specs, tokenizer, chat_template, seq_len, truncation)
    return pipeline.source_batches(specs, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=seed,
                                   shuffle=shuffle, num_epochs=num_epochs, shard_index=shard_index,
                                   shard_count=shard_count, packing=packing, num_packing_bins=num_packing_bins,
                                   shuffle_window=shuffle_window, num_workers=num_workers,
                                   drop_remainder=drop_remainder, documents=documents, features=FEATURES)


def sharded_sft_batches(specs: Sequence[SourceSpec], tokenizer, *, batch_size: int, num_shards: int,
                        shard_ids: Sequence[int], **kw) -> pipeline.ShardedBatches:
    """`sft_batches` cut into `num_shards` data shards, of which this process reads `shard_ids`
    (`batch_size` is the global batch), as `pipeline.sharded_source_batches` does for pretraining;
    its `shard_states()` / `set_shard_states()` go into the checkpoint."""
    if batch_size % num_shards:
        raise ValueError(f"the global batch {batch_size} is not divisible by data.num_shards={num_shards}")
    per_shard = batch_size // num_shards

    def make(s):
        return sft_batches(specs, tokenizer, batch_size=per_shard, shard_index=s, shard_count=num_shards, **kw)

    return pipeline.ShardedBatches(make, shard_ids)
