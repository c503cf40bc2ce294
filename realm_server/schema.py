"""What a request may contain: the JSON-schema subset the API validates with, its request schemas,
and the OpenAPI document built from the same tables.

`validate(value, schema, path)` raises ApiError(400) whose `param` is the path of the field at
fault ("messages[0].role"). The keywords it knows are the ones the schemas below use: type (one
or a list), anyOf (each option with a `title` for the message), properties, required, items,
enum and the RULES. Fields a schema does not name are ignored, as OpenAI's API does.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable
from typing import Any

from realm_wasm.speculative import MAX_DRAFT, MAX_NGRAM, METHODS

from .errors import ERROR_TYPES, ApiError

MAX_SEED = 2**64 - 1
# Bounds on what a request may list, checked before anything loops over it (the body's own size,
# ApiSettings.max_body_bytes, bounds the rest)
MAX_PROMPT_TOKENS = 1 << 17  # token ids in one prompt: above any context Realm serves
MAX_MESSAGES = 4096  # turns in one conversation
MAX_CONTENT_PARTS = 256  # text parts in one message
MAX_STOP_CHARS = 256  # characters in one stop string


def _nullable(kind: str, **rules: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **rules}


PROMPT = {"anyOf": [
    {"type": "string", "title": "a string"},
    {"type": "array", "title": "an array of token ids", "minItems": 1,
     "maxItems": MAX_PROMPT_TOKENS, "items": {"type": "integer", "minimum": 0}},
    {"type": "array", "title": "an array of one string", "minItems": 1, "maxItems": 1, "items": {"type": "string"}},
], "description": "the text to continue (or its token ids, BOS included)"}

MESSAGES = {"type": "array", "minItems": 1, "maxItems": MAX_MESSAGES, "description": "the conversation so far",
            "items": {
    "type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"anyOf": [
            {"type": "string", "title": "a string"},
            {"type": "array", "title": "an array of text parts", "maxItems": MAX_CONTENT_PARTS, "items": {
                "type": "object", "required": ["type", "text"],
                "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}},
        ]},
        "name": {"type": "string"},
    }}}

GENERATION_PROPERTIES: dict[str, dict[str, Any]] = {
    "model": {"type": "string", "description": "a name from GET /v1/models"},
    "max_tokens": _nullable("integer", minimum=1, description="tokens to generate at most (default: the "
                            "server's default_max_tokens, cut to what the context has left)"),
    "temperature": _nullable("number", minimum=0, maximum=2, description="0 = greedy; default 1"),
    "top_p": _nullable("number", exclusiveMinimum=0, maximum=1),
    "top_k": _nullable("integer", minimum=0, description="0 = no top-k cut"),
    "seed": _nullable("integer", minimum=-(2**63), maximum=MAX_SEED,
                      description="same seed and parameters give the same tokens; default random"),
    "stop": {"anyOf": [
        {"type": "string", "title": "a string", "minLength": 1, "maxLength": MAX_STOP_CHARS},
        {"type": "array", "title": "an array of up to 4 strings", "maxItems": 4,
         "items": {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}},
        {"type": "null", "title": "null"},
    ], "description": "generation ends before the first of these; they are not returned"},
    "stream": _nullable("boolean"),
    "stream_options": _nullable("object", properties={"include_usage": {"type": "boolean"}}),
    "n": _nullable("integer", minimum=1, maximum=1, description="only 1 choice is supported"),
    "presence_penalty": _nullable("number", minimum=0, maximum=0, description="only 0 is supported"),
    "frequency_penalty": _nullable("number", minimum=0, maximum=0, description="only 0 is supported"),
    "user": {"type": "string"},
    "lora": _nullable("array", maxItems=4, items={
        "type": "object", "required": ["id"], "properties": {
            "id": {"type": "string", "minLength": 1, "description": "an id from GET /v1/adapters"},
            "scale": _nullable("number", minimum=-100, maximum=100, description="default 1")}},
        description="LoRA adapters to apply, each with its scale (y += scale * alpha / rank * B A x); "
                    "omitted: the tenant's default adapters; []: none"),
    "speculation": _nullable("object", required=["method"], properties={
        "method": {"enum": list(METHODS), "description": "lookup: drafts are what followed the text's last "
                   "n-gram earlier in the prompt or output; draft: the server's draft model (realm serve --draft)"},
        "max_draft": {"type": "integer", "minimum": 1, "maximum": MAX_DRAFT,
                      "description": "tokens drafted per step at most (default 8)"},
        "ngram": {"type": "integer", "minimum": 1, "maximum": MAX_NGRAM,
                  "description": "lookup: the longest n-gram matched (default 3)"}},
        description="speculative decoding: drafted tokens the model verifies in one step; the text is the "
                    "same as without, usage counts drafted_tokens and accepted_tokens"),
}

COMPLETION_SCHEMA = {"type": "object", "required": ["model", "prompt"],
                     "properties": {**GENERATION_PROPERTIES, "prompt": PROMPT}}
CHAT_SCHEMA = {"type": "object", "required": ["model", "messages"],
               "properties": {**GENERATION_PROPERTIES, "messages": MESSAGES,
                              "max_completion_tokens": GENERATION_PROPERTIES["max_tokens"]}}
WS_MESSAGE_SCHEMA = {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["auth", "generate", "cancel"]},
    "id": {"type": "string", "minLength": 1, "maxLength": 128},
    "api_key": {"type": "string"},
}}

JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}
# schema keyword -> (fails when, message)
RULES: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "minimum": (lambda v, m: v < m, "must be >= {}"),
    "maximum": (lambda v, m: v > m, "must be <= {}"),
    "exclusiveMinimum": (lambda v, m: v <= m, "must be > {}"),
    "minLength": (lambda v, m: len(v) < m, "must have at least {} characters"),
    "maxLength": (lambda v, m: len(v) > m, "must have at most {} characters"),
    "minItems": (lambda v, m: len(v) < m, "must have at least {} items"),
    "maxItems": (lambda v, m: len(v) > m, "must have at most {} items"),
    "enum": (lambda v, m: v not in m, "must be one of {}"),
}


def _type_ok(value: Any, schema: dict[str, Any]) -> bool:
    kinds = schema.get("type")
    if kinds is None:
        return True
    return any(JSON_TYPES[k](value) for k in ([kinds] if isinstance(kinds, str) else kinds))


def validate(value: Any, schema: dict[str, Any], path: str) -> None:
    """Check a JSON value against the subset of JSON Schema used above; ApiError(400) names the field."""
    if "anyOf" in schema:
        options = schema["anyOf"]
        matching = [o for o in options if _type_ok(value, o)]
        for option in matching:
            with contextlib.suppress(ApiError):
                validate(value, option, path)
                return
        if len(matching) == 1:  # the right kind of value, wrong inside: say what is wrong
            validate(value, matching[0], path)
        raise ApiError(400, f"{path} must be {' or '.join(o['title'] for o in options)}", path)
    if not _type_ok(value, schema):
        kinds = schema["type"]
        expected = " or ".join([kinds] if isinstance(kinds, str) else kinds)
        raise ApiError(400, f"{path} must be {expected}, got {type(value).__name__} {json.dumps(value)[:40]}", path)
    if value is None:
        return
    for rule, (fails, message) in RULES.items():
        if rule in schema and fails(value, schema[rule]):
            raise ApiError(400, f"{path} {message.format(schema[rule])}", path)
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                validate(value[key], sub, _join(path, key))
        for key in schema.get("required", ()):
            if key not in value:
                raise ApiError(400, f"missing required field {_join(path, key)}", _join(path, key))
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{i}]")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def parse_json_object(raw: bytes | str) -> dict[str, Any]:
    """A request body or WebSocket message as a JSON object; ApiError(400) when it is not one: not
    UTF-8 (RFC 8259; a BOM is allowed), not JSON, not an object, or a string (or key) holding an
    unpaired surrogate escape ("\\ud800"), which is no Unicode text and could not be tokenized."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"body is not UTF-8: byte {raw[e.start]:#04x} at offset {e.start}") from e
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise ApiError(400, f"body is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ApiError(400, f"body must be a JSON object, got {type(value).__name__}")
    if _SURROGATE_ESCAPE.search(raw):  # only a \uD800-\uDFFF escape makes one: then walk the value
        where = surrogate_path(value)
        if where is not None:
            raise ApiError(400, f"{where} holds an unpaired UTF-16 surrogate escape: text must be valid Unicode",
                           where)
    return value


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def is_unicode(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def surrogate_path(value: Any) -> str | None:
    """The path of the first string or key that is not valid Unicode ("messages[0].content"), else None.
    Iterative: a value json.loads built can be as deep as its own recursion allowed."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if not is_unicode(item):
                return path
        elif isinstance(item, dict):
            for key, sub in reversed(item.items()):
                if not is_unicode(key):
                    return _join(path, "<key>")
                if isinstance(sub, str | list | dict):
                    stack.append((_join(path, key), sub))
        elif isinstance(item, list):
            stack.extend((f"{path}[{i}]", sub) for i, sub in reversed(list(enumerate(item)))
                         if isinstance(sub, str | list | dict))
    return None


# --- OpenAPI ---------------------------------------------------------------------------------------

def bounded_max_tokens(default_max_tokens: int) -> dict[str, Any]:
    """The max_tokens schema saying the server's own bound."""
    return {**GENERATION_PROPERTIES["max_tokens"], "description": (
        "tokens to generate at most; it must fit the context left after the prompt (400 otherwise). Absent or "
        f"null: {default_max_tokens} (the server's default_max_tokens), cut to the context left. Every "
        "generation is bounded")}


def openapi_document(default_max_tokens: int = 256) -> dict[str, Any]:
    """The API's OpenAPI 3.1 document; `default_max_tokens` is the server's bound for a request without one."""
    bound = bounded_max_tokens(default_max_tokens)
    completion_schema = {**COMPLETION_SCHEMA, "properties": {**COMPLETION_SCHEMA["properties"], "max_tokens": bound}}
    chat_schema = {**CHAT_SCHEMA, "properties": {**CHAT_SCHEMA["properties"], "max_tokens": bound,
                                                 "max_completion_tokens": bound}}
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    errors = {str(status): {**error, "description": ERROR_TYPES[status]}
              for status in (400, 401, 403, 404, 408, 413, 429, 503)}
    counts = ("prompt_tokens", "completion_tokens", "total_tokens", "drafted_tokens", "accepted_tokens")
    usage_schema = {"type": "object", "properties": {
        **{k: {"type": "integer"} for k in counts},
        "completion_tokens_details": {"type": "object", "properties": {
            k: {"type": "integer"} for k in ("accepted_prediction_tokens", "rejected_prediction_tokens")}}},
        "description": "drafted_tokens, accepted_tokens and completion_tokens_details: only when the request "
                       "speculated (rejected_prediction_tokens = drafted - accepted)"}
    applied = {"type": "array", "description": "the LoRA adapters the generation applied (absent: none)", "items": {
        "type": "object", "properties": {"id": {"type": "string"}, "scale": {"type": "number"}}}}

    def generation(summary: str, request_schema: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any]:
        result = {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"},
            "model": {"type": "string"}, "usage": usage_schema, "lora": applied,
            "choices": {"type": "array", "items": {"type": "object", "properties": {
                "index": {"type": "integer"}, "finish_reason": {"enum": ["stop", "length"]}, **choice}}}}}
        return {"post": {
            "summary": summary, "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}},
            "responses": {"200": {"description": "the completion; with \"stream\": true, server-sent events "
                                  "of chunks of the same shape, then `data: [DONE]`",
                                  "content": {"application/json": {"schema": result},
                                              "text/event-stream": {"schema": {"type": "string"}}}},
                          **errors}}}

    adapter = {"type": "object", "properties": {
        "id": {"type": "string"}, "object": {"const": "adapter"}, "model": {"type": "string"},
        "owned_by": {"type": "string", "description": "\"server\" (loaded at start), or the tenant that loaded it"},
        "rank": {"type": "integer"}, "alpha": {"type": "number"}, "tensors": {"type": "integer"}}}
    adapter_errors = {**errors, "409": {**error, "description": ERROR_TYPES[409]}}
    which_model = {"name": "model", "in": "query", "required": False, "schema": {"type": "string"},
                   "description": "the model the adapter is for (needed when the tenant may use several)"}
    adapter_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    model = {"type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                                              "context_length": {"type": "integer"},
                                              "chat_template": {"enum": ["gguf", "plain"]}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Realm inference API", "version": "1.0.0",
                 "description": "OpenAI-compatible completions over Realm. Streaming tokens over a WebSocket "
                                "is at /ws (protocol in realm_server/ws.py). Unknown request fields are ignored. "
                                f"Every generation is bounded by max_tokens (default {default_max_tokens}, cut to "
                                "the context left). A request body must arrive within the server's body timeout "
                                "(408 after). Browsers' cross-origin requests are refused (403) unless the origin "
                                "is listed with realm serve --cors-origin."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                 "param": {"type": ["string", "null"]},
                                                 "code": {"type": ["string", "null"]}}}}}},
        },
        "paths": {
            "/v1/completions": generation("Continue a prompt", completion_schema,
                                          {"text": {"type": "string"}}),
            "/v1/chat/completions": generation("Answer a conversation", chat_schema, {"message": {
                "type": "object", "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}}}),
            "/v1/models": {"get": {"summary": "Models the caller may use", "security": [{"bearer": []}],
                                   "responses": {"200": {"description": "models", "content": {"application/json": {
                                       "schema": {"type": "object", "properties": {
                                           "data": {"type": "array", "items": model}}}}}}, **errors}}},
            "/v1/models/{model}": {"get": {
                "summary": "One model", "security": [{"bearer": []}],
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the model",
                                      "content": {"application/json": {"schema": model}}}, **errors}}},
            "/v1/adapters": {"get": {
                "summary": "LoRA adapters the caller may use: the server's it is allowed, and its own",
                "security": [{"bearer": []}],
                "responses": {"200": {"description": "adapters", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {"data": {"type": "array", "items": adapter}}}}}}, **errors}}},
            "/v1/adapters/{id}": {
                "put": {"summary": "Load a LoRA adapter (llama.cpp's GGUF adapter file as the body) as the "
                                   "caller's own; needs lora_upload in the tenants file",
                        "security": [{"bearer": []}], "parameters": [adapter_id, which_model],
                        "requestBody": {"required": True, "content": {"application/octet-stream": {
                            "schema": {"type": "string", "format": "binary"}}}},
                        "responses": {"200": {"description": "the adapter, loaded",
                                              "content": {"application/json": {"schema": adapter}}},
                                      **adapter_errors}},
                "delete": {"summary": "Unload one of the caller's adapters (generations using it finish with it)",
                           "security": [{"bearer": []}], "parameters": [adapter_id, which_model],
                           "responses": {"200": {"description": "unloaded"}, **errors}}},
            "/health": {"get": {"summary": "Liveness and KV-slot use per model", "responses": {"200": {
                "description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        },
    }
