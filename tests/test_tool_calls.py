"""Tool calling: tools told to the chat template, calls generated under their grammar, read back out
of the text (whole and streamed) as OpenAI's tool_calls, through the API with the bundled SmolLM2
served with Realm's chatml-tools template, on numpy.

Oracles: jsonschema validates every call's arguments against its tool's schema; the official
`openai` client reads the answers (whole and streamed); a regular expression written here splits
Hermes-format text into content and calls for the parser; masks after a lazy grammar's trigger are
the plain grammar's own from the trigger on.
"""

from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import numpy as np
import openai
import pytest
from test_server_api import LiveServer

from realm_server.app import create_app
from realm_server.service import load_model
from realm_server.tenants import hash_key, load_tenants
from realm_wasm.chat_template import CHATML_TOOLS, ChatTemplate
from realm_wasm.grammar import Grammar, GrammarEngine, LazyGrammar, TokenVocabulary
from realm_wasm.model_files import chat_model_path
from realm_wasm.tool_calls import HERMES, CallArguments, CallStart, Content, ToolCallParser, ToolChoice, ToolError

MODEL = "smol"
KEY = "acme-secret-key"
WEATHER = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city"]}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}}, "required": ["zone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city now",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a time zone",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
# greedy SmolLM2 opens a call on its own here, told of get_weather alone (tool_choice auto)
ASKS_FOR_A_CALL = {"messages": [{"role": "user", "content": "Call the get_weather function with city Paris. "
                                                            "Answer with a <tool_call> only."}], "tools": TOOLS[:1]}


def valid_call(call) -> bool:
    """An openai ToolCall or its dict: a known tool's name, arguments valid by its schema."""
    function = call["function"] if isinstance(call, dict) else call.function
    name, arguments = (function["name"], function["arguments"]) if isinstance(function, dict) else (
        function.name, function.arguments)
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])
    return True


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tenants = tmp_path_factory.mktemp("cfg") / "tenants.toml"
    tenants.write_text(f'[[tenant]]\nid = "acme"\nkey_sha256 = "{hash_key(KEY)}"\n')
    models = [load_model(chat_model_path(), name=MODEL, backend="numpy", n_ctx=512, n_slots=4,
                         chat_template="chatml-tools"),
              load_model(chat_model_path(), name="smol-own", backend="numpy", n_ctx=512, n_slots=1)]
    with LiveServer(create_app(models, load_tenants(tenants))) as server:
        yield server


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)


def ask(client, **fields):
    return client.chat.completions.create(model=MODEL, **{"messages": ASK, "tools": TOOLS, "max_tokens": 48, **fields})


# --- through the API --------------------------------------------------------------------------------

def test_models_say_which_template_supports_tools(client):
    cards = {m.id: m.model_dump() for m in client.models.list()}
    assert (cards[MODEL]["chat_template"], cards[MODEL]["tool_calls"]) == ("chatml-tools", "hermes")
    assert (cards["smol-own"]["chat_template"], cards["smol-own"]["tool_calls"]) == ("gguf", None)


@pytest.mark.parametrize("seed", range(3))
def test_required_gives_one_valid_call_for_any_seed(client, seed):
    choice = ask(client, tool_choice="required", temperature=1.0, seed=seed).choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and valid_call(call)


def test_a_named_function_is_the_one_called(client):
    choice = ask(client, tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0).choices[0]
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time" and valid_call(call) and choice.finish_reason == "tool_calls"


def test_parallel_calls_are_each_valid(client):
    choice = ask(client, tool_choice="required", parallel_tool_calls=True, temperature=1.0, seed=3,
                 max_tokens=80).choices[0]
    calls = choice.message.tool_calls
    assert len({c.id for c in calls}) == len(calls)
    # the model may go on calling until max_tokens: then the last call is cut short
    whole = calls[:-1] if choice.finish_reason == "length" else calls
    assert whole and all(valid_call(c) for c in whole), calls
    assert choice.finish_reason in ("tool_calls", "length")


def test_auto_calls_when_the_model_opens_a_call(client):
    choice = ask(client, **ASKS_FOR_A_CALL, temperature=0).choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}


def test_auto_without_a_call_is_the_text_tool_choice_none_gives(client):
    auto = ask(client, temperature=0, max_tokens=24).choices[0]
    none = ask(client, tool_choice="none", temperature=0, max_tokens=24).choices[0]
    assert auto.message.tool_calls is None and auto.message.content == none.message.content
    assert "<tool_call>" not in auto.message.content and auto.finish_reason == none.finish_reason == "length"


@pytest.mark.parametrize("fields", [ASKS_FOR_A_CALL, {"tool_choice": "required"}], ids=["auto", "required"])
def test_a_streamed_answer_joins_to_the_whole_one(client, fields):
    whole = ask(client, temperature=0, **fields).choices[0]
    calls: dict[int, dict] = {}
    content, finish, pieces = "", None, 0
    for chunk in ask(client, temperature=0, stream=True, **fields):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or ():
            call = calls.setdefault(d.index, {"id": d.id, "name": d.function.name, "arguments": ""})
            call["arguments"] += d.function.arguments or ""
            pieces += 1
        finish = chunk.choices[0].finish_reason or finish
    assert finish == whole.finish_reason == "tool_calls"
    assert content == (whole.message.content or "")
    assert [(c["name"], c["arguments"]) for c in calls.values()] == [
        (c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert pieces > 3  # the arguments stream as they are written, not in one piece


def test_a_conversation_with_calls_and_their_results_goes_on(client):
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    choice = ask(client, messages=history, tool_choice="none", temperature=0, max_tokens=12).choices[0]
    assert choice.message.content and choice.message.tool_calls is None


@pytest.mark.parametrize("fields,param", [
    ({"model": "smol-own", "tools": TOOLS}, "tools"),
    ({"model": "smol-own", "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, *ASK]},
     "messages[0].tool_calls"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"parallel_tool_calls": True}, "parallel_tool_calls"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "a+"}}}}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters.type"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "speculation": {"method": "lookup"}}, "speculation"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
])
def test_unusable_tools_are_400s_naming_the_field(live, fields, param):
    import httpx

    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **fields}
    r = httpx.post(live.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


# --- the pieces ---------------------------------------------------------------------------------------

CALL_TEXT = re.compile(r'<tool_call>\n\{"name": "([^"]*)", "arguments": (.*?)\}\n</tool_call>', re.S)


def oracle_split(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The content (all before the first call: nothing follows calls) and each call's (name, arguments)."""
    first = CALL_TEXT.search(text)
    return (text[:first.start()] if first else text), CALL_TEXT.findall(text)


@pytest.mark.parametrize("text", [
    "Just text, no call at all <tool but not a call",
    'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "}\\n"}}\n</tool_call>\n<tool_call>\n'
    '{"name": "get_weather", "arguments": {\n  "city": "Rome"\n}}\n</tool_call>',
])
def test_the_parser_splits_any_stream_of_the_text_like_the_oracle(text):
    content, calls = oracle_split(text)
    rng = np.random.default_rng(0)
    for trial in range(40):
        cuts = sorted(rng.choice(len(text), size=min(trial, len(text) - 1), replace=False)) if trial else []
        parser, deltas, start = ToolCallParser(HERMES), [], 0
        for cut in [*cuts, len(text)]:
            deltas += parser.feed(text[start:cut])
            start = cut
        deltas += parser.finish()
        assert "".join(d.text for d in deltas if isinstance(d, Content)) == content
        starts = [d for d in deltas if isinstance(d, CallStart)]
        arguments = ["".join(d.text for d in deltas if isinstance(d, CallArguments) and d.index == s.index)
                     for s in starts]
        assert [(s.name, a) for s, a in zip(starts, arguments, strict=True)] == calls
        assert parser.closed == len(calls)


def test_a_lazy_grammar_is_free_until_its_trigger_then_the_grammars_own():
    tools = ToolChoice.from_request(TOOLS, "auto", None)
    vocab = TokenVocabulary([bytes([b]) for b in range(1, 128)] + [b"<tool", b"_call>\n{", b""], [129])
    engine = GrammarEngine(Grammar.from_gbnf(tools.gbnf(HERMES)), vocab)
    lazy = LazyGrammar(engine, HERMES.trigger.encode()).matcher()
    before = b"I will call <tool it. "
    for byte in before:
        assert lazy.allowed_tokens().all()
        assert lazy.advance_token(byte - 1)
    written = b'<tool_call>\n{"name": "get_'
    plain = engine.matcher()
    for i, piece in enumerate([b"<tool", b"_call>\n{", *(bytes([b]) for b in written[len(b"<tool_call>\n{"):])]):
        token = {b"<tool": 127, b"_call>\n{": 128}.get(piece, piece[0] - 1)
        assert lazy.advance_token(token)
        if i == 0:
            assert lazy.allowed_tokens().all()  # "<tool" alone does not trigger it
            continue
        if i == 1:
            plain.advance(b"<tool_call>\n{")
        else:
            plain.advance(piece)
        assert np.array_equal(lazy.allowed_tokens(), plain.allowed_tokens())
    assert not lazy.advance(b"x") and lazy.is_dead()  # "get_x..." names no tool


def test_tool_choice_errors_name_their_field():
    for tools, choice, param in [
        ([TOOLS[0], TOOLS[0]], None, "tools[1].function.name"),
        ([{"type": "function", "function": {"name": "a.b"}}], None, "tools[0].function.name"),
        (TOOLS, {"type": "function", "function": {"name": "other"}}, "tool_choice.function.name"),
    ]:
        with pytest.raises(ToolError) as e:
            ToolChoice.from_request(tools, choice, None)
        assert e.value.param == param
    bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": {"not": {}}}}}}]
    with pytest.raises(ToolError) as e:
        ToolChoice.from_request(bad_schema, None, None).gbnf(HERMES)
    assert e.value.param == "tools[0].function.parameters" and "'not'" in str(e.value)


def test_chatml_tools_renders_tools_calls_and_results():
    from realm_wasm.engine import Engine

    tokenizer = Engine.load(chat_model_path(), backend="numpy", n_ctx=64, n_slots=1).tokenizer
    template = ChatTemplate(tokenizer, CHATML_TOOLS, "chatml-tools")
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    text = template.render([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Go"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"}], [tool]).text
    assert text.startswith("<|im_start|>system\nBe brief.\n\nYou may call functions")
    assert '<tools>\n{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}\n</tools>' \
        in text
    assert text.endswith('<|im_start|>user\nGo<|im_end|>\n<|im_start|>assistant\n<tool_call>\n'
                         '{"name": "f", "arguments": {"a": 1}}\n</tool_call><|im_end|>\n'
                         '<|im_start|>tool\n<tool_response>\ndone\n</tool_response><|im_end|>\n'
                         '<|im_start|>assistant\n')
    plain = template.render([{"role": "user", "content": "Hi"}]).text
    assert plain == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert template.tool_format is HERMES
    assert ChatTemplate(tokenizer, "{{ messages[0].content }}").tool_format is None  # takes no tools
    assert ChatTemplate(tokenizer, "{{ tools }}{{ messages[0].content }}").tool_format is None  # no known format


# --- the SDKs -------------------------------------------------------------------------------------------

def test_python_sdk_returns_and_streams_tool_calls(live):
    from realm_client import RealmClient, join_tool_calls

    with RealmClient(live.url, api_key=KEY) as client:
        assert {m.id: m.tool_calls for m in client.models()} == {MODEL: "hermes", "smol-own": None}
        asked = {"model": MODEL, "tools": TOOLS, "tool_choice": "required", "max_tokens": 48, "temperature": 0}
        done = client.chat(ASK, **asked)
        (call,) = done.tool_calls
        assert done.finish_reason == "tool_calls" and valid_call(call.message())
        chunks = list(client.chat_stream(ASK, **asked))
        assert join_tool_calls([d for c in chunks for d in c.tool_calls]) == (
            dataclasses.replace(call, id=chunks[0].tool_calls[0].id),)  # ids are each answer's own
        assert chunks[-1].finish_reason == "tool_calls"
        again = client.chat(ASK, **asked)  # its prompt (the tools' system turn) is in a slot's KV cache
        assert again.usage.cached_tokens == again.usage.prompt_tokens - 1 and again.tool_calls[0].name == call.name


JS_SCRIPT = """
import { RealmClient, joinToolCalls } from %(sdk)s;
const [url, key] = process.argv.slice(2);
const client = new RealmClient({ baseURL: url, apiKey: key });
const asked = { model: %(model)s, tools: %(tools)s, tool_choice: "required", max_tokens: 48, temperature: 0 };
const done = await client.chat(%(ask)s, asked);
const chunks = [];
for await (const chunk of client.chatStream(%(ask)s, asked)) chunks.push(chunk);
console.log(JSON.stringify({ done: { finishReason: done.finishReason, toolCalls: done.toolCalls, text: done.text },
                             streamed: joinToolCalls(chunks), last: chunks.at(-1).finishReason }));
"""


def test_js_sdk_returns_and_streams_tool_calls(live, tmp_path):
    import shutil
    import subprocess

    from test_sdk import JS_SDK

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = tmp_path / "tools.mjs"
    script.write_text(JS_SCRIPT % {"sdk": json.dumps(JS_SDK.as_uri()), "model": json.dumps(MODEL),
                                   "tools": json.dumps(TOOLS), "ask": json.dumps(ASK)})
    r = subprocess.run([node, str(script), live.url, KEY], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (call,) = out["done"]["toolCalls"]
    assert out["done"]["finishReason"] == out["last"] == "tool_calls" and out["done"]["text"] == ""
    assert valid_call({"function": call})
    assert [(c["name"], c["arguments"]) for c in out["streamed"]] == [(call["name"], call["arguments"])]
