"""The llama.cpp runtime: `LlamaRuntime`, the only code that runs the model (through cyllama).

It loads the GGUF file, renders the chat template, reuses the KV cache across prompts and samples
under the grammar, with the shortcuts its docstring lists. Its one entry point is `generate`.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from triage.local.cursor import _JsonCursor, _structure_ahead
from triage.local.errors import LocalContextLengthError, LocalModelError

DEFAULT_N_CTX = 2048
_MAX_DEFAULT_THREADS = 8


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


def _ends_in_repeat(tokens: Sequence[int], n: int) -> bool:
    """True when the last `n` tokens already occurred earlier (overlapping) in `tokens`."""
    if n <= 0 or len(tokens) <= n:
        return False
    tail = list(tokens[-n:])
    return any(list(tokens[j : j + n]) == tail for j in range(len(tokens) - n))


class LlamaRuntime:
    """One GGUF model and one llama context, behind a lock (a llama context is not thread-safe).

    The engine only calls `generate` (and `close`), so another runtime (e.g. llama-cpp-python) can
    replace this class. Every token still goes through the grammar's state, but on a small CPU
    (~20 ms per token, ~8 ms per prompt token) these save most of the time:
      * prompt-prefix reuse: the KV cache keeps the previous prompt, and a few snapshots of
        "everything before the last message" (a program's instructions and demos), so a call only
        evaluates its new tokens. A snapshot is taken the second time a prefix is seen: with
        per-call (nearest) demos no prefix repeats, and taking one on every call cost about a
        second per call (3.9 -> 5.1 s for the triager with one nearest demo, one thread);
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
        self._prefixes_seen: OrderedDict[int, None] = OrderedDict()  # hashes of recent static prefixes
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
        if not restored and key is not None and common < static_len and self._seen_before(key):
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

    def _seen_before(self, prefix: tuple[int, ...]) -> bool:
        """Whether `prefix` came before among the last few calls' static prefixes (and remember it)."""
        if self.prefix_snapshots <= 0:
            return False
        digest = hash(prefix)
        seen = digest in self._prefixes_seen
        self._prefixes_seen[digest] = None
        self._prefixes_seen.move_to_end(digest)
        while len(self._prefixes_seen) > 8 * self.prefix_snapshots:
            self._prefixes_seen.popitem(last=False)
        return seen

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
