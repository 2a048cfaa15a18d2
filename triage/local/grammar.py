"""The signature's JSON schema -> a GBNF grammar, and the hints the runtime reads from the schema.

The schema is the one `dspy.JSONAdapter` derives from the signature and sends as the request's
structured-output `response_format` (`request.config.response_format`, shape
``{"type": "json_schema", "schema": {...}}``). It is tightened before it becomes a grammar: at most
one space between JSON tokens, and a `maxLength` on every free string, so a rambling field cannot
eat the token budget and the JSON always closes.

The hints (`free_string_fields`, `object_layout`) tell the runtime where it may skip the grammar's
check or write the JSON's punctuation itself; they must describe the grammar exactly.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from triage.local.runtime import _prepare_openmp

if TYPE_CHECKING:
    from dspy.lm15 import Request

# Longest string (in characters) the grammar lets the model write for one field. Chosen so that the
# two ChainOfThought programs finish in well under max_tokens: see scripts/bench_local_model.py.
DEFAULT_MAX_STRING_CHARS = 100
DEFAULT_FIELD_MAX_CHARS: Mapping[str, int] = {"reasoning": 160}

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
