"""Following the JSON text as the model writes it, for the runtime's shortcuts (pure Python, no llama.cpp).

`_JsonCursor` says when the model is inside a free string value and how much room it has left;
`_structure_ahead` says what the grammar still requires between two values of a flat object.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Mapping, Sequence


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
