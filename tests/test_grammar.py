"""The constraint engine (realm_wasm/grammar.py): GBNF, json_object and JSON Schema grammars accept
and reject hand-picked texts; bad grammars and unsatisfiable schemas are named errors; the token
mask equals a brute-force oracle (advance a copy by every token) on SmolLM2's vocabulary; masked
greedy decoding of random logits always yields JSON that parses and validates; real JSON documents
tokenized by both bundled tokenizers go through token by token."""

from __future__ import annotations

import json

import numpy as np
import pytest

from realm_wasm.gguf import read_gguf
from realm_wasm.grammar import Grammar, GrammarEngine, GrammarError, TokenVocabulary, json_schema_to_gbnf
from realm_wasm.model_files import chat_model_path, default_model_path
from realm_wasm.tokenizer import Tokenizer

BYTES = TokenVocabulary([bytes([b]) for b in range(256)], [])  # one token per byte: masks = next bytes


def matcher(grammar: Grammar):
    return GrammarEngine(grammar, BYTES).matcher()


def accepts(grammar: Grammar, text: bytes | str) -> bool:
    """The whole text is a complete output of grammar."""
    m = matcher(grammar)
    return m.advance(text.encode() if isinstance(text, str) else text) and m.is_accepting()


def viable(grammar: Grammar, text: bytes) -> bool:
    """text can still be continued into an output."""
    return matcher(grammar).advance(text)


# --- GBNF ------------------------------------------------------------------------------------------

TOY = Grammar.from_gbnf(r"""
# a comment line, then rules over several lines
root   ::= greet | count
greet  ::= "hi" ( " " name )?   # trailing comment
name   ::= [A-Z] [a-z_0-9]*
count  ::= "n=" [0-9]{2,3} ("," [0-9]{2,3})*
""")


@pytest.mark.parametrize("text, ok", [
    ("hi", True), ("hi Bob", True), ("hi B", True), ("hi bob", False), ("hi ", False), ("hi Bob!", False),
    ("n=12", True), ("n=123,45", True), ("n=1", False), ("n=1234", False), ("n=12,", False), ("", False),
])
def test_gbnf_rules_alternation_groups_and_quantifiers(text, ok):
    assert accepts(TOY, text) is ok


def test_viable_prefixes_are_not_dead_and_bad_bytes_are():
    assert viable(TOY, b"hi B") and viable(TOY, b"n=12,")
    assert not viable(TOY, b"hx") and not viable(TOY, b"n=a")


def test_escapes_in_literals_and_classes():
    g = Grammar.from_gbnf(r'root ::= "\x41\n\t\"\\" [\]\-a] "\u00e9" [^\x00-\x7f]')
    assert accepts(g, 'A\n\t"\\]é日')
    assert accepts(g, 'A\n\t"\\-éé')
    assert not accepts(g, 'A\n\t"\\]éa')  # a is ASCII: excluded by the negated class


def test_classes_match_whole_utf8_characters_even_split_across_tokens():
    g = Grammar.from_gbnf(r"root ::= [^a]+")
    m = matcher(g)
    assert m.advance("日".encode()[:2]) and not m.is_accepting()  # half a character: not an output yet
    assert m.advance("日".encode()[2:]) and m.is_accepting()
    assert not viable(g, b"\xff") and not viable(g, b"\x80")  # never UTF-8 / a stray continuation byte
    assert not viable(g, b"\xed\xa0\x80")  # a surrogate encoded: not UTF-8
    assert accepts(g, "\U0010ffff") and accepts(g, "\u07ff\u0800\uffff\U00010000")
    # the mask at a character boundary: exactly the valid UTF-8 lead bytes and ASCII other than a
    expected = [b for b in range(256) if b < 0x80 and b != ord("a") or 0xC2 <= b <= 0xF4]
    assert np.nonzero(m.allowed_tokens())[0].tolist() == expected


def test_any_character_dot_and_exact_repetition():
    g = Grammar.from_gbnf('root ::= .{3} "!"')
    assert accepts(g, "aé日!") and not accepts(g, "ab!") and not accepts(g, "abcd!")


@pytest.mark.parametrize("text, message", [
    ('rooot ::= "a"', "no `root` rule"),
    ('root ::= "a" b', "line 1, column 14: rule 'b' is not defined"),
    ('root ::= x\nx ::= "a\n', 'line 2, column 7: unterminated string'),
    ('root ::= "\\q"', "line 1, column 11: unknown escape \\q"),
    ('root ::= "\\x4"', "\\x needs 2 hex digits"),
    ('root ::= [a-', "line 1, column 10: unterminated character class"),
    ('root ::= [z-a]', "range 'z'-'a' is reversed"),
    ('root ::= ("a" | "b"', "line 1, column 10: '(' is never closed"),
    ('root ::= "a")', "')' without a matching '('"),
    ('root ::= * "a"', "line 1, column 10: quantifier '*' follows nothing"),
    ('root ::= "a"{3,2}', "line 1, column 13: repetition {3,2} has its maximum below its minimum"),
    ('root ::= "a"{x}', "bad repetition"),
    ('root ::= "a"\nroot ::= "b"', "line 2, column 1: rule 'root' is defined twice"),
    ('root = "a"', "line 1, column 6: expected '::='"),
    ('root ::= expr\nexpr ::= expr "+" "1" | "1"', "rule 'expr' is left-recursive (expr -> expr)"),
    ('root ::= a\na ::= b? "x" | "y"\nb ::= a', "left-recursive (a -> b -> a)"),
    ('root ::= x\nx ::= ("a"?)*', "rule 'x' repeats (* + or {m,}) something that can match nothing"),
    ("root ::= [^\\x00-\\U0010FFFF]", "never be satisfied"),
    ('root ::= "(" root ")"', "never be satisfied"),
    ("", "grammar is empty"),
])
def test_bad_grammars_are_named_errors(text, message):
    with pytest.raises(GrammarError) as caught:
        Grammar.from_gbnf(text)
    assert message in str(caught.value)


# --- json_object -------------------------------------------------------------------------------

JSON = Grammar.json_object()


@pytest.mark.parametrize("value", [
    {}, {"a": 1}, {"a": [1, -2.5e-3, "x", None, True, False, {"b": []}], "é 日": "\u00e9\\\"\n"},
    {"deep": {"deeper": {"deepest": [[[]]]}}}, {"n": 0, "m": -0.0, "big": 12345678901234567890},
])
@pytest.mark.parametrize("indent", [None, 2])
def test_json_object_accepts_json_texts_of_objects(value, indent):
    assert accepts(JSON, json.dumps(value, indent=indent, ensure_ascii=indent is None))


@pytest.mark.parametrize("text", [
    "[1]", '"s"', "1", '{"a": 01}', '{"a": 1,}', "{'a': 1}", '{"a": "\x01"}', '{"a": "\\x"}', '{"a" 1}',
    '{"a": 1} x', " {}", '{"a":' + " " * 2 + "1}", '{"a":\n' + " " * 21 + "1}", '{"a": tru}',
])
def test_json_object_rejects_other_texts_and_unbounded_whitespace(text):
    assert not accepts(JSON, text)


def test_json_object_ends_right_after_the_closing_brace():
    m = matcher(JSON)
    assert m.advance(b'{"a": [1]}') and m.is_accepting()
    assert not m.allowed_tokens().any()  # only an end token may follow (this vocabulary has none)


# --- JSON Schema -------------------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer"},
        "kind": {"enum": ["cat", "dog", None, 3]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
        "ok": {"type": "boolean"},
        "pos": {"$ref": "#/$defs/point"},
        "note": {"anyOf": [{"type": "null"}, {"type": "number"}, {"const": {"x": [1]}}]},
    },
    "required": ["name", "age", "kind"],
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                        "required": ["x", "y"]}},
}
PERSON_GRAMMAR = Grammar.from_json_schema(PERSON)


@pytest.mark.parametrize("value, ok", [
    ({"name": "Ada", "age": 36, "kind": "cat"}, True),
    ({"name": "日本語", "age": -1, "kind": None, "ok": True}, True),  # lengths count characters
    ({"name": "Ada", "age": 36, "kind": 3, "tags": ["a", "bb"], "pos": {"x": 1.5, "y": -2}}, True),
    ({"name": "Ada", "age": 36, "kind": "dog", "note": {"x": [1]}}, True),
    ({"name": "Ada", "age": 36, "kind": "dog", "note": 2.5e10}, True),
    ({"age": 36, "name": "Ada", "kind": "cat"}, False),  # required keys in declared order
    ({"name": "Ada", "kind": "cat"}, False),  # age is required
    ({"name": "", "age": 1, "kind": "cat"}, False),  # minLength 1
    ({"name": "x" * 13, "age": 1, "kind": "cat"}, False),  # maxLength 12
    ({"name": "Ada", "age": 1.5, "kind": "cat"}, False),  # integer
    ({"name": "Ada", "age": 1, "kind": "cow"}, False),  # enum
    ({"name": "Ada", "age": 1, "kind": "cat", "tags": []}, False),  # minItems 1
    ({"name": "Ada", "age": 1, "kind": "cat", "tags": ["a"] * 4}, False),  # maxItems 3
    ({"name": "Ada", "age": 1, "kind": "cat", "tags": ["abcdef"]}, False),  # items' maxLength
    ({"name": "Ada", "age": 1, "kind": "cat", "ok": True, "tags": ["a"]}, False),  # optional ones in order
    ({"name": "Ada", "age": 1, "kind": "cat", "extra": 1}, False),  # additionalProperties false
    ({"name": "Ada", "age": 1, "kind": "cat", "pos": {"x": 1}}, False),  # pos.y is required
    ({"name": "Ada", "age": 1, "kind": "cat", "note": "s"}, False),  # anyOf
])
def test_schema_accepts_exactly_the_values_it_describes(value, ok):
    assert accepts(PERSON_GRAMMAR, json.dumps(value, ensure_ascii=False)) is ok


def test_schema_without_properties_and_other_tops():
    assert accepts(Grammar.from_json_schema({"type": "object"}), '{"any": [1]}')
    assert accepts(Grammar.from_json_schema({"type": "array", "items": {"type": "integer"}}), "[1, 2]")
    assert accepts(Grammar.from_json_schema({"type": ["string", "null"]}), "null")
    assert not accepts(Grammar.from_json_schema({"type": "object", "additionalProperties": False}), '{"a": 1}')


def test_recursive_refs_are_rules():
    tree = {"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["v"]}}}
    g = Grammar.from_json_schema(tree)
    assert accepts(g, json.dumps({"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": [{"v": 4}]}]}))
    assert not accepts(g, json.dumps({"v": 1, "kids": [{"w": 2}]}))


@pytest.mark.parametrize("schema, message", [
    ({"type": "string", "pattern": "a+"}, "keyword 'pattern' is not supported"),
    ({"type": "string", "format": "date"}, "keyword 'format' is not supported"),
    ({"properties": {"a": {"type": "integer", "minimum": 1}}}, "#/properties/a: keyword 'minimum'"),
    ({"enum": []}, "enum must be a non-empty list"),
    ({"anyOf": []}, "anyOf must be a non-empty list"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems = 3 is above maxItems = 2"),
    ({"type": "string", "minLength": 5, "maxLength": 4}, "minLength = 5 is above maxLength = 4"),
    ({"type": "array", "maxItems": -1}, "maxItems must be a non-negative integer"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"]}, "not in properties: ['b']"),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": True}, "additionalProperties"),
    ({"type": "date"}, "unknown type 'date'"),
    ({"$ref": "#/$defs/missing"}, "names no definition"),
    ({"$ref": "http://example.com/s.json"}, "is not supported"),
    (False, "allows no value"),
    ({"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}},
                                           "required": ["next"]}}}, "never be satisfied"),
])
def test_unsatisfiable_or_unsupported_schemas_are_named_errors(schema, message):
    with pytest.raises(GrammarError) as caught:
        Grammar.from_gbnf(json_schema_to_gbnf(schema))
    assert message in str(caught.value)


# --- masks over a real vocabulary ----------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm() -> Tokenizer:
    return Tokenizer.from_metadata(read_gguf(chat_model_path()).metadata)


@pytest.fixture(scope="module")
def smollm_vocab(smollm) -> TokenVocabulary:
    return TokenVocabulary.from_tokenizer(smollm)


def brute_force_mask(m, vocab: TokenVocabulary) -> np.ndarray:
    """For every token: does a copy of the matcher survive reading it?"""
    return np.array([m.copy().advance_token(i) for i in range(vocab.size)])


DOCUMENT = '{"name": "Zoë 日本", "age": 36, "kind": null, "tags": ["a\\"b", "x"], "pos": {"x": 1.5, "y": -2e3}}'


@pytest.mark.parametrize("grammar", [JSON, PERSON_GRAMMAR], ids=["json_object", "schema"])
def test_mask_equals_brute_force_on_smollm2(grammar, smollm, smollm_vocab):
    engine = GrammarEngine(grammar, smollm_vocab)
    m = engine.matcher()
    text = DOCUMENT.encode()
    # cut points: the start, inside a key, after a colon, inside strings (one mid-character), in a
    # number, inside the nested object, at the end (accepting: end tokens allowed)
    cuts = [0, 3, 8, 13, 16, 27, 70, 84, 92, len(text)]
    done = 0
    for cut in cuts:
        assert m.advance(text[done:cut])
        done = cut
        mask = m.allowed_tokens()
        expected = brute_force_mask(m, smollm_vocab)
        assert np.array_equal(mask, expected), f"at {text[:cut]!r}: {np.nonzero(mask != expected)[0][:10]}"
        assert mask[list(smollm_vocab.end_set)].all() == m.is_accepting()
    assert m.is_accepting()


def test_real_documents_go_through_token_by_token(smollm, smollm_vocab):
    engine = GrammarEngine(PERSON_GRAMMAR, smollm_vocab)
    m = engine.matcher()
    for token in smollm.encode(DOCUMENT, add_bos=False):
        assert m.allowed_tokens()[token], smollm.token_bytes(token)
        assert m.advance_token(token)
    assert m.is_accepting() and m.advance_token(smollm.eos_id) and not m.allowed_tokens().any()


def test_gemma_byte_fallback_vocabulary_forces_a_document_through():
    gemma = Tokenizer.from_metadata(read_gguf(default_model_path()).metadata)
    engine = GrammarEngine(JSON, TokenVocabulary.from_tokenizer(gemma))
    m = engine.matcher()
    text = DOCUMENT.replace("日本", "\U00020000\u0d9e")  # rare characters: byte-fallback tokens
    ids = gemma.encode(text, add_bos=False)
    assert any(gemma.tokens[i].startswith("<0x") for i in ids)
    for token in ids:
        assert m.allowed_tokens()[token], gemma.tokens[token]
        assert m.advance_token(token)
    assert m.is_accepting() and m.allowed_tokens()[gemma.eos_id]


def test_an_end_token_where_the_output_cannot_end_kills_it(smollm_vocab):
    m = GrammarEngine(JSON, smollm_vocab).matcher()
    m.advance(b"{")
    assert not m.allowed_tokens()[2] and not m.copy().advance_token(2)
    assert m.advance_token(smollm_vocab.token_bytes.index(b"}")) and m.allowed_tokens()[2]


# --- greedy decoding of random logits under the mask ---------------------------------------------

def conforms(value, schema, defs) -> bool:
    """A checker for the schema subset grammar.py supports (independent of the grammar)."""
    if "$ref" in schema:
        return conforms(value, defs[schema["$ref"].rsplit("/", 1)[1]], defs)
    if "const" in schema:
        return value == schema["const"]
    if "enum" in schema:
        return any(value == v and type(value) is type(v) for v in schema["enum"])
    if "anyOf" in schema:
        return any(conforms(value, s, defs) for s in schema["anyOf"])
    kind = schema.get("type", "object" if "properties" in schema else None)
    if kind == "object":
        props = schema.get("properties", {})
        keys = list(value) if isinstance(value, dict) else None
        return (keys is not None and all(k in props for k in keys) and keys == [k for k in props if k in value]
                and all(r in value for r in schema.get("required", []))
                and all(conforms(value[k], props[k], defs) for k in keys))
    if kind == "array":
        return (isinstance(value, list) and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1e9)
                and all(conforms(v, schema.get("items", {}), defs) for v in value))
    if kind == "string":
        return isinstance(value, str) and schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", 1e9)
    checks = {"integer": lambda v: type(v) is int, "number": lambda v: type(v) in (int, float),
              "boolean": lambda v: type(v) is bool, "null": lambda v: v is None, None: lambda v: True}
    return checks[kind](value)


def masked_greedy(engine: GrammarEngine, seed: int, tilt: np.ndarray | None, max_steps: int = 400) -> bytes:
    rng = np.random.default_rng(seed)
    m, out = engine.matcher(), []
    for _ in range(max_steps):
        mask = m.allowed_tokens()
        assert mask.any(), f"no token allowed after {b''.join(out)!r}"
        logits = rng.normal(size=engine.vocab.size) + (0 if tilt is None else tilt)
        token = int(np.argmax(np.where(mask, logits, -np.inf)))
        assert m.advance_token(token)
        if token in engine.vocab.end_set:
            return b"".join(out)
        out.append(engine.vocab.token_bytes[token])
    raise AssertionError(f"no end after {max_steps} tokens: {b''.join(out)!r}")


def test_masked_greedy_output_always_validates_against_the_schema(smollm_vocab):
    engine = GrammarEngine(PERSON_GRAMMAR, smollm_vocab)
    for seed in range(40):
        value = json.loads(masked_greedy(engine, seed, None))
        assert conforms(value, PERSON, PERSON["$defs"]), (seed, value)


def test_masked_greedy_output_is_always_a_json_object(smollm_vocab):
    # random logits tilted towards tokens holding a quote or a closing bracket, so that strings and
    # containers end within the step budget (untilted, a string body of random tokens runs on)
    tilt = np.array([2.5 * any(c in t for c in b'"}]') for t in smollm_vocab.token_bytes])
    engine = GrammarEngine(JSON, smollm_vocab)
    for seed in range(40):
        assert isinstance(json.loads(masked_greedy(engine, seed, tilt)), dict)


def test_bounded_strings_longer_than_any_token_keep_exact_masks():
    # ranks of `char{0,12}` above the longest token (4 bytes) share one key walk: masks stay exact
    tokens = [bytes([b]) for b in range(256)] + [b"ab", b"abc", b'c"', b'bc"}', "é".encode(), "éa".encode(), b""]
    vocab = TokenVocabulary(tokens, [len(tokens) - 1])
    engine = GrammarEngine(Grammar.from_json_schema(
        {"type": "object", "properties": {"s": {"type": "string", "maxLength": 12}}, "required": ["s"]}), vocab)
    m = engine.matcher()
    assert m.advance(b'{"s": "')
    for token in [b"abc", "éa".encode(), b"ab", b"abc", "é".encode(), b'c"', b"}"]:  # 12 characters
        assert np.array_equal(m.allowed_tokens(), brute_force_mask(m, vocab))
        assert m.advance_token(tokens.index(token))
    assert m.is_accepting() and m.allowed_tokens()[len(tokens) - 1]
    twelve = Grammar.from_json_schema({"type": "string", "maxLength": 12})
    assert accepts(twelve, '"' + "é" * 12 + '"') and not accepts(twelve, '"' + "é" * 13 + '"')


def test_bounded_repeats_under_a_one_byte_vocabulary_mask_exactly():
    m = matcher(Grammar.from_gbnf('root ::= "<" [^>]{0,5} ">"'))  # a broad class: walked by its key
    for data in [b"<", b"a", "é".encode()[:1], "é".encode()[1:], b"b", b"c", b"d"]:
        assert m.advance(data)
        assert np.array_equal(m.allowed_tokens(), brute_force_mask(m, BYTES))
    assert m.allowed_tokens().nonzero()[0].tolist() == [ord(">")]


def _strict_json_object(text: str) -> bool:
    def no_constants(name):
        raise ValueError(name)
    try:
        return isinstance(json.loads(text, parse_constant=no_constants), dict)
    except ValueError:
        return False


def test_json_object_agrees_with_json_loads_on_mutated_documents():
    # compact documents with one character deleted, replaced or inserted (never whitespace, whose
    # bound json.loads does not have): the grammar accepts exactly what json.loads reads as an object
    rng = np.random.default_rng(7)
    alphabet = list('{}[]":,.-+eE0123456789aflnrstu\\x') + ["é"]
    base = json.dumps({"a": [1, -2.5e3, "x\\y\"z", None, True, False, {"b": {}}], "c": "é", "d": 0},
                      separators=(",", ":"), ensure_ascii=False)
    engine, rejected = GrammarEngine(JSON, BYTES), 0
    for _ in range(400):
        at, kind = int(rng.integers(len(base))), int(rng.integers(3))
        new = str(rng.choice(alphabet))
        text = (base[:at] + base[at + 1:], base[:at] + new + base[at + 1:], base[:at] + new + base[at:])[kind]
        expected, m = _strict_json_object(text), engine.matcher()
        assert (m.advance(text.encode()) and m.is_accepting()) is expected, text
        rejected += not expected
    assert 100 < rejected < 390  # both outcomes were exercised (317 of 400 rejected)
