"""Constrained sampling: which tokens can continue a valid output of a grammar.

Hand-written in pure Python + numpy, so that it runs unchanged inside Pyodide in the page (no Rust
or C grammar library can go there). Three ways to make a `Grammar`:

    Grammar.from_gbnf(text)          the GBNF subset llama-server's `grammar` field takes (below)
    Grammar.json_object()            any JSON value whose top level is an object (`json_object`)
    Grammar.from_json_schema(schema) a JSON Schema subset (`json_schema`), converted to GBNF

and two objects to run one against a vocabulary:

    engine = GrammarEngine(grammar, TokenVocabulary.from_tokenizer(tokenizer))  # share per (grammar, vocab)
    m = engine.matcher()             # one output's position; m.copy() forks it
    m.allowed_tokens()               # numpy bool mask over the vocabulary (end tokens when accepting)
    m.advance_token(token_id)        # or m.advance(b"raw bytes"); False once the output is invalid
    m.is_accepting(), m.is_dead()

GBNF subset: `name ::= body` rules (a body runs until the next `name ::=`; `#` comments), `root`
is the start; alternation `|`, sequences, grouping `( )`, quantifiers `* + ? {m} {m,} {m,n}`,
string literals `"..."` and character classes `[a-z0-9_]`, `[^"\\\\]` with the escapes
`\\n \\r \\t \\\\ \\" \\[ \\] \\- \\xHH \\uHHHH \\UHHHHHHHH`, `.` (any character), rule references.
Classes and `.` are over Unicode code points and match their UTF-8 bytes. Left-recursive rules are
an error (as in llama.cpp), and so is a grammar whose root can derive no finite text.

How it works. The grammar is compiled to flat rules of byte terminals (a code-point class becomes a
small rule of UTF-8 byte-range sequences), recognized by a pushdown automaton whose configuration
is a set of stacks of grammar positions (the top of each stack is the byte terminal it expects
next; llama.cpp's grammar sampler uses the same idea over code points). The recognizer works on
BYTES, so a token holding half a UTF-8 character is judged like any other. Each distinct set of
stacks is interned as a small integer state, and `(state, byte) -> state` transitions go into a
numpy table as they are first needed: a lazily built DFA. The mask for a state runs the vocabulary
through that table at once, one byte column at a time (tokens sorted by length; only those whose
first two bytes the state allows; dead ones dropped), and is cached per state. Inside a JSON string
the state after a character is the state before it, so one string costs one mask; and a stack's
top positions (its "lexical context", e.g. the string rule's own) are walked once per engine and
reused wherever that rule appears, only the tokens that leave it part-way (a closing quote and
what follows) being walked on from what lies below (GrammarEngine.token_mask).

JSON whitespace is bounded so that a model cannot loop on it: between JSON tokens at most one
space, or one newline followed by at most 20 spaces (llama-server's json-schema-to-grammar rule).
Numbers and strings are unbounded, as in JSON; the request's max_tokens bounds them.

`LazyGrammar(engine, trigger)` leaves the output free until it writes `trigger`, and applies the
grammar from there on (tool calls with tool_choice "auto", tool_calls.py).

Where it is used: a scheduler Request's `grammar` gives each of its sequences a matcher, whose
mask the executor samples under (on the GPU: the masked logits never leave it; scheduler._masks),
for the API's response_format, grammar and tools fields and the page's engine API alike.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidRequest


class GrammarError(InvalidRequest):
    """A grammar or JSON schema that cannot be used: bad syntax (with line and column), an unknown
    rule, left recursion, an unsupported schema keyword, or nothing that could ever satisfy it.
    `param`: the request field that asked for it, when a request did (GrammarCache.for_request)."""

    param: str | None = None


# --- the grammar as parsed: a small tree per rule -------------------------------------------------

@dataclass(frozen=True)
class Literal:
    text: bytes


@dataclass(frozen=True)
class CharClass:
    ranges: tuple[tuple[int, int], ...]  # code-point ranges, sorted, merged, negation already applied


@dataclass(frozen=True)
class RuleRef:
    name: str
    where: str  # "line L, column C" of the reference, for errors


@dataclass(frozen=True)
class Sequence_:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Alternatives:
    options: tuple[Node, ...]


@dataclass(frozen=True)
class Repeat:
    item: Node
    min: int
    max: int | None  # None: unbounded


Node = Literal | CharClass | RuleRef | Sequence_ | Alternatives | Repeat

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)  # not encodable in UTF-8: never matched
MAX_REPEAT = 10_000  # {m,n} bounds above this are refused (each step is a rule)


def _normalize_ranges(ranges: Iterable[tuple[int, int]], negate: bool = False) -> tuple[tuple[int, int], ...]:
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    if negate:
        complement, start = [], 0
        for lo, hi in merged:
            if lo > start:
                complement.append([start, lo - 1])
            start = hi + 1
        if start <= MAX_CODE_POINT:
            complement.append([start, MAX_CODE_POINT])
        merged = complement
    out = []
    for lo, hi in merged:  # cut out the surrogates
        if lo <= SURROGATES[1] and hi >= SURROGATES[0]:
            if lo < SURROGATES[0]:
                out.append((lo, SURROGATES[0] - 1))
            if hi > SURROGATES[1]:
                out.append((SURROGATES[1] + 1, hi))
        else:
            out.append((lo, hi))
    return tuple(out)


# --- GBNF text -> {rule name: Node} ---------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_RULE_START = re.compile(r"[A-Za-z0-9_-]+[ \t]*::=")
_ESCAPES = {"n": 0x0A, "r": 0x0D, "t": 0x09, "\\": 0x5C, '"': 0x22, "[": 0x5B, "]": 0x5D, "-": 0x2D,
            "/": 0x2F, "'": 0x27, "^": 0x5E, "0": 0x00}
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}  # escape letter -> number of hex digits
_QUANTIFIERS = {"*": (0, None), "+": (1, None), "?": (0, 1)}


class _GbnfParser:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def where(self, pos: int | None = None) -> str:
        pos = self.pos if pos is None else pos
        line = self.text.count("\n", 0, pos) + 1
        return f"line {line}, column {pos - (self.text.rfind(chr(10), 0, pos) + 1) + 1}"

    def error(self, message: str, pos: int | None = None) -> GrammarError:
        return GrammarError(f"grammar {self.where(pos)}: {message}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_space(self) -> None:
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c in " \t\r\n":
                self.pos += 1
            elif c == "#":
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            else:
                break

    def parse(self) -> dict[str, Node]:
        rules: dict[str, Node] = {}
        self.skip_space()
        while self.pos < len(self.text):
            start = self.pos
            name = _NAME.match(self.text, self.pos)
            if not name:
                raise self.error(f"expected a rule name, found {self.peek()!r}")
            self.pos = name.end()
            self.skip_space()
            if not self.text.startswith("::=", self.pos):
                raise self.error(f"expected '::=' after the rule name {name.group()!r}")
            self.pos += 3
            if name.group() in rules:
                raise self.error(f"rule {name.group()!r} is defined twice", start)
            rules[name.group()] = self.alternatives()
            if self.peek() == ")":
                raise self.error("')' without a matching '('")
            self.skip_space()
        if not rules:
            raise GrammarError("grammar is empty: it needs at least a `root ::= ...` rule")
        return rules

    def alternatives(self) -> Node:
        options = [self.sequence()]
        while self.peek() == "|":
            self.pos += 1
            options.append(self.sequence())
        return options[0] if len(options) == 1 else Alternatives(tuple(options))

    def sequence(self) -> Node:
        items: list[Node] = []
        while True:
            self.skip_space()
            c = self.peek()
            if c in ("", "|", ")") or _RULE_START.match(self.text, self.pos):
                break
            items.append(self.quantified(self.atom()))
        return items[0] if len(items) == 1 else Sequence_(tuple(items))

    def atom(self) -> Node:
        c, start = self.peek(), self.pos
        if c == '"':
            return self.literal()
        if c == "[":
            return self.char_class()
        if c == ".":
            self.pos += 1
            return CharClass(_normalize_ranges([(0, MAX_CODE_POINT)]))
        if c == "(":
            self.pos += 1
            inner = self.alternatives()
            self.skip_space()
            if self.peek() != ")":
                raise self.error("'(' is never closed", start)
            self.pos += 1
            return inner
        name = _NAME.match(self.text, self.pos)
        if name:
            self.pos = name.end()
            return RuleRef(name.group(), self.where(start))
        if c in "*+?{":
            raise self.error(f"quantifier {c!r} follows nothing")
        raise self.error(f"unexpected character {c!r}")

    def quantified(self, item: Node) -> Node:
        while True:
            c = self.peek()
            if c in _QUANTIFIERS:
                self.pos += 1
                item = Repeat(item, *_QUANTIFIERS[c])
            elif c == "{":
                item = Repeat(item, *self.braces())
            else:
                return item

    def braces(self) -> tuple[int, int | None]:
        start = self.pos
        m = re.compile(r"\{[ \t]*(\d+)[ \t]*(,[ \t]*(\d*)[ \t]*)?\}").match(self.text, self.pos)
        if not m:
            raise self.error("bad repetition: expected {m}, {m,} or {m,n}", start)
        self.pos = m.end()
        low = int(m.group(1))
        high = low if m.group(2) is None else (int(m.group(3)) if m.group(3) else None)
        if high is not None and high < low:
            raise self.error(f"repetition {{{low},{high}}} has its maximum below its minimum", start)
        if max(low, high or 0) > MAX_REPEAT:
            raise self.error(f"repetition bound above {MAX_REPEAT}", start)
        return low, high

    def char(self, end: str) -> int:
        """One code point of a literal or class, escapes resolved."""
        c = self.peek()
        if c == "":
            raise self.error(f"unterminated {'string' if end == chr(34) else 'character class'}")
        if c != "\\":
            self.pos += 1
            return ord(c)
        letter = self.text[self.pos + 1:self.pos + 2]
        if letter in _HEX_ESCAPES:
            digits = self.text[self.pos + 2:self.pos + 2 + _HEX_ESCAPES[letter]]
            if len(digits) != _HEX_ESCAPES[letter] or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"\\{letter} needs {_HEX_ESCAPES[letter]} hex digits")
            value = int(digits, 16)
            if value > MAX_CODE_POINT or SURROGATES[0] <= value <= SURROGATES[1]:
                raise self.error(f"\\{letter}{digits} is not a Unicode scalar value")
            self.pos += 2 + len(digits)
            return value
        if letter not in _ESCAPES:
            raise self.error(f"unknown escape \\{letter}")
        self.pos += 2
        return _ESCAPES[letter]

    def literal(self) -> Node:
        start = self.pos
        self.pos += 1
        chars = []
        while self.peek() != '"':
            if self.peek() in ("", "\n"):
                raise self.error("unterminated string", start)
            chars.append(self.char('"'))
        self.pos += 1
        return Literal("".join(map(chr, chars)).encode())

    def char_class(self) -> Node:
        start = self.pos
        self.pos += 1
        negate = self.peek() == "^"
        self.pos += negate
        ranges = []
        while self.peek() != "]":
            if self.peek() == "":
                raise self.error("unterminated character class", start)
            lo = hi = self.char("]")
            if self.peek() == "-" and self.text[self.pos + 1:self.pos + 2] not in ("]", ""):
                self.pos += 1
                hi = self.char("]")
                if hi < lo:
                    raise self.error(f"range {chr(lo)!r}-{chr(hi)!r} is reversed")
            ranges.append((lo, hi))
        self.pos += 1
        return CharClass(_normalize_ranges(ranges, negate))


# --- UTF-8: a code-point range as sequences of byte ranges ----------------------------------------

def _utf8(cp: int) -> bytes:
    return chr(cp).encode("utf-8", "surrogatepass")


def _utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """Byte-range sequences whose union is exactly the UTF-8 encodings of code points lo..hi."""
    for boundary in (0x7F, 0x7FF, 0xFFFF):  # split where the encoded length changes
        if lo <= boundary < hi:
            return _utf8_sequences(lo, boundary) + _utf8_sequences(boundary + 1, hi)
    n = len(_utf8(lo))
    for i in range(1, n):  # split until every trailing byte spans its full 0x80..0xBF range or matches
        mask = (1 << (6 * i)) - 1
        if lo & ~mask != hi & ~mask:
            if lo & mask:
                return _utf8_sequences(lo, lo | mask) + _utf8_sequences((lo | mask) + 1, hi)
            if hi & mask != mask:
                return _utf8_sequences(lo, (hi & ~mask) - 1) + _utf8_sequences(hi & ~mask, hi)
    return [list(zip(_utf8(lo), _utf8(hi), strict=True))]


# --- compiled form: flat grammar positions for the pushdown automaton -----------------------------

END, TERMINAL, RULE = 0, 1, 2  # what a grammar position holds


def _byte_set(ranges: Iterable[tuple[int, int]]) -> bytes:
    table = bytearray(256)
    for lo, hi in ranges:
        table[lo:hi + 1] = b"\x01" * (hi - lo + 1)
    return bytes(table)


class Grammar:
    """A compiled grammar: rules of alternatives, each a run of positions ending in END.

    kind[p] says what position p holds; for TERMINAL, accepts[p] is a 256-byte table (1 = this byte
    may come next); for RULE, target[p] is the rule's index and alternatives[rule] the positions
    where its alternatives start."""

    def __init__(self, rules: dict[str, Node]) -> None:
        if "root" not in rules:
            raise GrammarError("grammar has no `root` rule (the start)")
        self.names: list[str] = list(rules)  # the grammar's rules, then helper rules (groups, x*, ...)
        self._n_named = len(rules)
        self._index = {name: i for i, name in enumerate(self.names)}
        self._bodies: list[list[list[tuple[int, Any]]]] = [[] for _ in self.names]
        self._helpers: dict[Any, int] = {}  # structural key -> helper rule, so equal pieces share one
        self._chains: dict[Node, list[int]] = {}  # x{m,n}'s item -> its `x{0,k}` rules by rank k
        for name, node in rules.items():
            self._bodies[self._index[name]] = self._alternatives_of(node, name)
        self._check_left_recursion()
        self._check_productive()
        self.kind: list[int] = []
        self.target: list[int] = []
        self.accepts: list[bytes] = []
        self.alternatives: list[list[int]] = []
        for body in self._bodies:
            starts = []
            for symbols in body:
                starts.append(len(self.kind))
                for kind, arg in symbols:
                    self.kind.append(kind)
                    self.target.append(arg if kind == RULE else -1)
                    self.accepts.append(arg if kind == TERMINAL else b"")
                self.kind.append(END)
                self.target.append(-1)
                self.accepts.append(b"")
            self.alternatives.append(starts)
        self.root = self._index["root"]
        nullable = self._nullable()
        # chains whose item always reads a byte: (rules by rank) for GrammarEngine's canonical keys
        self.byte_chains: list[list[int]] = [
            ranks for ranks in self._chains.values()
            if ranks and not all(k == RULE and nullable[a] for k, a in self._bodies[ranks[0]][0])]

    @classmethod
    def from_gbnf(cls, text: str) -> Grammar:
        return cls(_GbnfParser(text).parse())

    @classmethod
    def json_object(cls) -> Grammar:
        return cls.from_gbnf(JSON_GBNF)

    @classmethod
    def from_json_schema(cls, schema: Any) -> Grammar:
        return cls.from_gbnf(json_schema_to_gbnf(schema))

    # tree -> alternatives of symbols ((TERMINAL, byte table) or (RULE, index))
    def _helper(self, key: Any, name: str, make: Any) -> int:
        if key not in self._helpers:
            self._helpers[key] = index = len(self.names)
            self.names.append(name)
            self._bodies.append([])
            self._bodies[index] = make()
        return self._helpers[key]

    def _alternatives_of(self, node: Node, name: str) -> list[list[tuple[int, Any]]]:
        if isinstance(node, Alternatives):
            return [s for option in node.options for s in self._alternatives_of(option, name)]
        return [self._symbols_of(node, name)]

    def _symbols_of(self, node: Node, name: str) -> list[tuple[int, Any]]:
        if isinstance(node, Literal):
            return [(TERMINAL, _byte_set([(b, b)])) for b in node.text]
        if isinstance(node, RuleRef):
            if node.name not in self._index:
                raise GrammarError(f"grammar {node.where}: rule {node.name!r} is not defined")
            return [(RULE, self._index[node.name])]
        if isinstance(node, Sequence_):
            return [s for item in node.items for s in self._symbols_of(item, name)]
        if isinstance(node, Alternatives):
            return [(RULE, self._helper(node, f"{name}-group", lambda: self._alternatives_of(node, name)))]
        if isinstance(node, CharClass):
            return self._class_symbols(node, name)
        return self._repeat_symbols(node, name)

    def _class_symbols(self, node: CharClass, name: str) -> list[tuple[int, Any]]:
        sequences = [seq for lo, hi in node.ranges for seq in _utf8_sequences(lo, hi)]
        single = [seq[0] for seq in sequences if len(seq) == 1]
        if len(single) == len(sequences):  # all one-byte (ASCII): one terminal
            return [(TERMINAL, _byte_set(single))]

        def body() -> list[list[tuple[int, Any]]]:
            out = [[(TERMINAL, _byte_set(single))]] if single else []
            return out + [[(TERMINAL, _byte_set([r])) for r in seq] for seq in sequences if len(seq) > 1]
        return [(RULE, self._helper(node, f"{name}-class", body))]

    def _repeat_symbols(self, node: Repeat, name: str) -> list[tuple[int, Any]]:
        item = self._symbols_of(node.item, name)
        if node.max is None:  # x* as `r ::= x r | ε` (right recursion: no growing stack)
            key = ("star", node.item)
            if key not in self._helpers:
                self._helpers[key] = index = len(self.names)
                self.names.append(f"{name}-star")
                self._bodies.append([item + [(RULE, index)], []])
            return item * node.min + [(RULE, self._helpers[key])]
        tail: list[tuple[int, Any]] = []
        ranks = self._chains.setdefault(node.item, [])  # this item's chain, rank 1 first
        for count in range(1, node.max - node.min + 1):  # x{0,k} as `r_k ::= x r_{k-1} | ε`
            symbols = item + tail
            rule = self._helper(("optional", node.item, count), f"{name}-opt", lambda s=symbols: [s, []])
            if count > len(ranks):
                ranks.append(rule)
            tail = [(RULE, rule)]
        return item * node.min + tail

    def _nullable(self) -> list[bool]:
        nullable = [False] * len(self.names)
        changed = True
        while changed:
            changed = False
            for r, body in enumerate(self._bodies):
                if not nullable[r] and any(all(k == RULE and nullable[a] for k, a in s) for s in body):
                    nullable[r] = changed = True
        return nullable

    def _check_left_recursion(self) -> None:
        nullable = self._nullable()
        first: list[set[int]] = [set() for _ in self.names]  # rules reachable before any byte
        for r, body in enumerate(self._bodies):
            for symbols in body:
                for kind, arg in symbols:
                    if kind == TERMINAL:
                        break
                    first[r].add(arg)
                    if not nullable[arg]:
                        break
        state = [0] * len(self.names)  # 0 unseen, 1 on the path, 2 done

        def visit(r: int, path: list[int]) -> None:
            state[r] = 1
            for nxt in sorted(first[r]):
                if state[nxt] == 1:
                    cycle = path[path.index(nxt):] + [nxt] if nxt in path else [r, nxt]
                    named = [self.names[c] for c in cycle if c < self._n_named]  # helpers are no news
                    if not named:  # only helper rules: `x*` or `x+` of an x that can match nothing
                        owner = self.names[nxt].rsplit("-", 1)[0]  # helpers are named OWNER-what
                        raise GrammarError(f"grammar rule {owner!r} repeats (* + or {{m,}}) something that "
                                           f"can match nothing, which never ends; make it match a character")
                    raise GrammarError(f"grammar rule {named[0]!r} is left-recursive ({' -> '.join(named)}); "
                                       f"rewrite it to recurse on the right")
                if state[nxt] == 0:
                    visit(nxt, path + [nxt])
            state[r] = 2
        for r in range(len(self.names)):
            if state[r] == 0:
                visit(r, [r])

    def _check_productive(self) -> None:
        productive = [False] * len(self.names)
        changed = True
        while changed:
            changed = False
            for r, body in enumerate(self._bodies):
                if not productive[r] and any(all(productive[a] if k == RULE else any(a) for k, a in s)
                                             for s in body):
                    productive[r] = changed = True
        if not productive[self._index["root"]]:
            raise GrammarError("grammar can never be satisfied: `root` derives no finite text "
                               "(an empty character class, or rules that only ever recurse)")


# --- the vocabulary as byte strings ---------------------------------------------------------------

class TokenVocabulary:
    """Each token id's bytes, plus the ids that end the output (allowed once the grammar accepts).
    Tokens with no bytes (control, unknown, unused) are never allowed by a grammar."""

    def __init__(self, token_bytes: Sequence[bytes], end_ids: Iterable[int]) -> None:
        self.size = len(token_bytes)
        self.token_bytes = list(token_bytes)
        self.end_ids = np.array(sorted(set(end_ids)), dtype=np.int64)
        self.end_set = frozenset(self.end_ids.tolist())
        self.lengths = lengths = np.array([len(b) for b in token_bytes], dtype=np.int64)
        # longest first: the tokens still running at byte column j are a prefix of this order
        self.order = np.argsort(-lengths, kind="stable")
        sorted_lengths = lengths[self.order]
        self.max_len = int(sorted_lengths[0]) if self.size else 0
        # running[j]: how many tokens have more than j bytes
        self.running = [int(np.count_nonzero(sorted_lengths > j)) for j in range(self.max_len + 1)]
        joined = np.zeros((self.running[0], self.max_len), dtype=np.uint8)
        for row, token in enumerate(self.order[:self.running[0]]):
            data = token_bytes[token]
            joined[row, :len(data)] = np.frombuffer(data, dtype=np.uint8)
        self.columns = [np.ascontiguousarray(joined[:self.running[j], j]) for j in range(self.max_len)]
        # GrammarEngine's walks of lexical contexts, by the context's sub-grammar: shared by every
        # grammar run against this vocabulary (each JSON schema has the same string rule)
        self.lexical_walks: dict[tuple, Any] = {}
        # each row's first two bytes as one code (b0 * 257 + 1 + b1, or b0 * 257 for a one-byte
        # token): a walk starts with only the rows whose two-byte prefix its state allows
        if self.max_len:
            second = joined[:, 1].astype(np.int32) + 1 if self.max_len > 1 else np.zeros(len(joined), np.int32)
            second[self.running[1]:] = 0
            self.prefix_codes = joined[:, 0].astype(np.int32) * 257 + second

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenVocabulary:
        """From realm_wasm.tokenizer.Tokenizer: its token_bytes, and EOS plus its end-of-turn ids."""
        ends = set(tokenizer.eot_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
        return cls([tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)], ends)


# --- the recognizer: a lazily built DFA over sets of stacks ---------------------------------------

Stack = tuple[int, ...]  # grammar positions: the top (last) expects a byte, the rest are returns
DEAD = 0  # the state with no stacks: nothing can follow


@dataclass
class _KeyWalk:
    """The vocabulary walked from sibling stacks' top KEY_DEPTH positions alone. inner (bit-packed):
    tokens that stay inside them (or end exactly where they pop). A token that pops them part-way
    needs what lies below: escape_suffixes (as a small vocabulary) hold the bytes left at each such
    point and escape_owner / escape_suffix pair each with its token."""
    inner: np.ndarray
    escape_suffixes: TokenVocabulary | None
    escape_owner: np.ndarray
    escape_suffix: np.ndarray


class GrammarEngine:
    """One grammar run against one vocabulary. States are interned sets of stacks; transitions and
    masks are cached, so share one engine among every output using the same grammar.

    A state's mask is the union over its stacks. Each stack's top KEY_DEPTH positions are its
    "lexical context" (inside a JSON string: the string rule's own positions); sibling stacks, which
    differ only in their top (one character class's ASCII and UTF-8 lead-byte alternatives), form
    one context. A context that allows many first bytes is walked once against the vocabulary and
    cached, whatever lies below it; only the tokens that pop out of it part-way (in a JSON string on
    gemma's vocabulary: 476 tokens holding a closing quote, 185 distinct remainders) are walked on
    from the stack's rest. So a string body in a new place costs a small walk, not a walk of the
    whole vocabulary. The other stacks (between JSON tokens) are walked together, pruned by their
    first two bytes. Bounded repeats (maxLength) share walks between their ranks (_chain_positions).
    Not thread-safe: one engine belongs to one thread (the scheduler's)."""

    MASK_CACHE_SIZE = 512  # masks per state kept (bit-packed: vocab/8 bytes each)
    KEY_DEPTH = 3  # positions in a stack's key: JSON's string body is (closing quote, char loop, char)
    LEXICAL_FIRST_BYTES = 64  # a stack whose key allows this many first bytes is walked by its key
    LEXICAL_WALKS_KEPT = 1024  # walks a vocabulary keeps for all grammars (~vocab/8 bytes each)

    def __init__(self, grammar: Grammar, vocab: TokenVocabulary) -> None:
        self.grammar, self.vocab = grammar, vocab
        self._states: list[frozenset[Stack]] = []
        self._ids: dict[frozenset[Stack], int] = {}
        self._table = np.full((64, 256), -1, dtype=np.int32)  # -1: not computed yet
        self._accepting = np.zeros(64, dtype=np.bool_)
        self._masks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._key_walks: dict[frozenset[Stack], _KeyWalk] = {}
        self._lexical: dict[Stack, bool] = {}
        self._first: dict[int, np.ndarray] = {}
        self._expanded: dict[Stack, frozenset[Stack]] = {}  # _expand's results
        self._canonical, self._lifted = self._chain_positions()
        self._intern(frozenset())
        self._table[DEAD] = DEAD
        root_stacks: set[Stack] = set()
        for start in grammar.alternatives[grammar.root]:
            root_stacks |= self._expand((start,))
        self.initial = self._intern(frozenset(root_stacks))

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self, self.initial)

    def _chain_positions(self) -> tuple[list[int], dict[int, tuple[int, int]]]:
        """Ranks of a chain `x{0,k}` (rule r_k ::= x r_{k-1} | ε) whose x reads at least a byte, seen
        by a token of n bytes: ranks above n look alike, as no token can use them up. The model rank
        is the chain's highest or max_len, whichever is lower. canonical: position -> the same
        position in the model for ranks above it, so those keys share one walk (a maxLength of 500
        costs max_len walks at most, not 500). lifted: for a position in ranks 2 .. model - 1, (the
        same position in the model, its rank r): such a key walks like the model for every token
        of at most r bytes, so only the longer ones are walked again (_walk_key)."""
        g = self.grammar
        canonical, lifted = list(range(len(g.kind))), {}
        for ranks in g.byte_chains:
            top = min(len(ranks), self.vocab.max_len)  # the model: the highest rank a token can tell
            if top < 2:  # rank 1 has no tail position to map the others onto
                continue
            model = g.alternatives[ranks[top - 1]]
            for rank, rule in enumerate(ranks[1:], start=2):
                if rank == top:
                    continue
                for start, model_start in zip(g.alternatives[rule], model, strict=True):
                    end = start
                    while g.kind[end] != END:
                        end += 1
                    for offset in range(end - start + 1):
                        if rank > top:
                            canonical[start + offset] = model_start + offset
                        else:
                            lifted[start + offset] = (model_start + offset, rank)
        return canonical, lifted

    def _key(self, stack: Stack) -> Stack:
        return tuple(self._canonical[p] for p in stack[-self.KEY_DEPTH:])

    @property
    def n_states(self) -> int:
        return len(self._states)

    def _intern(self, stacks: frozenset[Stack]) -> int:
        state = self._ids.get(stacks)
        if state is None:
            state = self._ids[stacks] = len(self._states)
            self._states.append(stacks)
            if state >= len(self._table):
                grown = np.full((2 * len(self._table), 256), -1, dtype=np.int32)
                grown[:len(self._table)] = self._table
                self._table = grown
                self._accepting = np.concatenate([self._accepting, np.zeros_like(self._accepting)])
            self._accepting[state] = () in stacks
        return state

    def _expand(self, stack: Stack) -> frozenset[Stack]:
        """Stacks whose top is a terminal (or the empty, finished stack), reached from stack without
        reading a byte: END pops, a rule reference pushes its return and each alternative."""
        done = self._expanded.get(stack)
        if done is not None:
            return done
        g = self.grammar
        if not stack:
            return frozenset({()})
        top = stack[-1]
        kind = g.kind[top]
        if kind == TERMINAL:
            return frozenset({stack})
        if kind == END:
            return self._expand(stack[:-1])
        # skip a return to END: popping it later is the same as not pushing it (keeps x* flat)
        base = stack[:-1] + ((top + 1,) if g.kind[top + 1] != END else ())
        out: set[Stack] = set()
        for start in g.alternatives[g.target[top]]:
            out |= self._expand(base + (start,))
        done = self._expanded[stack] = frozenset(out)
        return done

    def _compute(self, state: int, byte: int) -> int:
        g = self.grammar
        out: set[Stack] = set()
        for stack in self._states[state]:
            if stack and g.accepts[stack[-1]][byte]:
                out |= self._expand(stack[:-1] + (stack[-1] + 1,))
        nxt = self._intern(frozenset(out))
        self._table[state, byte] = nxt
        return nxt

    def step(self, state: int, byte: int) -> int:
        nxt = int(self._table[state, byte])
        return nxt if nxt >= 0 else self._compute(state, byte)

    def walk(self, state: int, data: bytes) -> int:
        for byte in data:
            state = self.step(state, byte)
            if state == DEAD:
                break
        return state

    def is_accepting(self, state: int) -> bool:
        return bool(self._accepting[state])

    def token_mask(self, state: int) -> np.ndarray:
        """Bool mask over the vocabulary: the tokens whose bytes keep state alive (no end tokens)."""
        packed = self._masks.get(state)
        if packed is not None:
            self._masks.move_to_end(state)
            return np.unpackbits(packed, count=self.vocab.size).view(np.bool_)
        # Stacks that differ only in their top are siblings (the alternatives of one character
        # class: ASCII, then each UTF-8 lead byte): they are lexical together or not at all.
        siblings: dict[Stack, list[Stack]] = {}
        for stack in self._states[state]:
            if stack:  # the finished stack () allows only an end token
                siblings.setdefault(stack[:-1], []).append(stack)
        lexical, structural = [], []
        for members in siblings.values():
            keys = frozenset(self._key(stack) for stack in members)
            if any(self._is_lexical(key) for key in keys):
                lexical.append((keys, members[0][:-self.KEY_DEPTH]))
            else:
                structural += members
        # structural stacks allow few first bytes: one walk of them together is cheap
        mask, _ = self._walk(self._intern(frozenset(structural)), self.vocab, record_escapes=False)
        for keys, rest in lexical:
            walked = self._key_walk(keys)
            mask |= np.unpackbits(walked.inner, count=self.vocab.size).view(np.bool_)
            if rest and walked.escape_suffixes is not None:
                below = self._intern(frozenset(self._expand(rest)))
                suffix_ok, _ = self._walk(below, walked.escape_suffixes, record_escapes=False)
                mask[walked.escape_owner[suffix_ok[walked.escape_suffix]]] = True
        self._masks[state] = np.packbits(mask)
        if len(self._masks) > self.MASK_CACHE_SIZE:
            self._masks.popitem(last=False)
        return mask

    def _first_bytes(self, state: int) -> np.ndarray:
        """The bytes that can come next in state: those its stacks' top terminals accept (stepping
        on one of them always leaves a stack, so no transition needs computing)."""
        first = self._first.get(state)
        if first is None:
            tops = {stack[-1] for stack in self._states[state] if stack}
            table = np.zeros(256, dtype=np.bool_)
            for top in tops:
                table |= np.frombuffer(self.grammar.accepts[top], dtype=np.bool_)
            first = self._first[state] = np.nonzero(table)[0]
        return first

    def _is_lexical(self, key: Stack) -> bool:
        """A key allowing many first bytes (a string body) is walked alone and cached."""
        lexical = self._lexical.get(key)
        if lexical is None:
            first = self._first_bytes(self._intern(frozenset({key})))
            lexical = self._lexical[key] = len(first) >= self.LEXICAL_FIRST_BYTES
        return lexical

    def _key_walk(self, keys: frozenset[Stack]) -> _KeyWalk:
        walked = self._key_walks.get(keys)
        if walked is None:
            # the same lexical context in another grammar (every JSON schema's string rule) walks
            # alike: the vocabulary keeps the walks by the context's own sub-grammar
            signature = frozenset(self._signature(key) for key in keys)
            walked = self.vocab.lexical_walks.get(signature)
        if walked is None:
            walked = self._walk_key(keys)
            self.vocab.lexical_walks[signature] = walked
            if len(self.vocab.lexical_walks) > self.LEXICAL_WALKS_KEPT:  # the oldest goes
                del self.vocab.lexical_walks[next(iter(self.vocab.lexical_walks))]
        self._key_walks[keys] = walked
        return walked

    def _walk_key(self, keys: frozenset[Stack]) -> _KeyWalk:
        vocab = self.vocab
        lifted = [self._lifted[p] for key in keys for p in key if p in self._lifted]
        # tokens longer than this may tell keys from their lifted twins; all when nothing lifts
        longer_than = min(rank for _, rank in lifted) if lifted else 0
        inner, cuts = self._walk(self._intern(keys), vocab, record_escapes=True, longer_than=longer_than)
        escapes = [(token, vocab.token_bytes[token][cut:]) for token, cut in cuts]
        if lifted:  # the shorter tokens read key as they read its twin in rank max_len
            twin = self._key_walk(frozenset(tuple(self._lifted[p][0] if p in self._lifted else p for p in key)
                                            for key in keys))
            short = vocab.lengths <= longer_than
            inner |= np.unpackbits(twin.inner, count=vocab.size).view(np.bool_) & short
            if twin.escape_suffixes is not None:
                escapes += [(token, twin.escape_suffixes.token_bytes[suffix])
                            for token, suffix in zip(twin.escape_owner.tolist(), twin.escape_suffix.tolist(),
                                                     strict=True) if short[token]]
        suffixes: dict[bytes, int] = {}
        owner, suffix_of = [], []
        for token, data in escapes:
            owner.append(token)
            suffix_of.append(suffixes.setdefault(data, len(suffixes)))
        return _KeyWalk(np.packbits(inner), TokenVocabulary(list(suffixes), []) if suffixes else None,
                        np.array(owner, dtype=np.int64), np.array(suffix_of, dtype=np.int64))

    def _signature(self, key: Stack) -> tuple:
        """What a stack of these positions can read, independent of where the grammar keeps them: each
        position's rest of its alternative and every rule reachable from there, rules numbered in
        the order they are met, terminals as their byte tables."""
        g, local, rules = self.grammar, {}, []

        def rest_of(position: int) -> tuple:
            symbols = []
            while g.kind[position] != END:
                if g.kind[position] == TERMINAL:
                    symbols.append(g.accepts[position])
                else:
                    rule = g.target[position]
                    if rule not in local:
                        local[rule] = len(local)
                        rules.append(rule)
                    symbols.append(local[rule])
                position += 1
            return tuple(symbols)

        positions = tuple(rest_of(p) for p in key)
        bodies, done = [], 0
        while done < len(rules):  # rules reached while describing earlier ones are appended
            bodies.append(tuple(rest_of(start) for start in g.alternatives[rules[done]]))
            done += 1
        return positions, tuple(bodies)

    def _lookup(self, flat: np.ndarray) -> np.ndarray:
        """Next states for (state * 256 + byte) codes, computing the transitions not known yet."""
        table = self._table.reshape(-1)
        nxt = table[flat]
        unknown = nxt < 0
        if unknown.any():
            for pair in np.unique(flat[unknown]).tolist():
                self._compute(pair >> 8, pair & 255)
            nxt = self._table.reshape(-1)[flat]  # the table may have grown
        return nxt

    def _note_escapes(self, states: np.ndarray, read: int, vocab: TokenVocabulary,
                      escapes: list[tuple[int, int]], rows: np.ndarray | None = None) -> None:
        popped = np.nonzero(self._accepting[states])[0]
        if len(popped):
            tokens = vocab.order[popped if rows is None else rows[popped]]
            escapes.extend((token, read) for token in tokens.tolist())

    def _walk(self, state: int, vocab: TokenVocabulary, record_escapes: bool,
              longer_than: int = 0) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """Run the tokens of vocab longer than longer_than bytes from state, one byte column at a
        time. Returns the mask of tokens that end alive and, if asked, (token, bytes read) wherever
        a token passed an accepting state before its end (the popping points of a key walk)."""
        allowed_sorted = np.zeros(vocab.size, dtype=np.bool_)
        escapes: list[tuple[int, int]] = []
        if not vocab.max_len:
            return allowed_sorted, escapes
        prefix_ok = np.zeros(256 * 257, dtype=np.bool_)
        for first in self._first_bytes(state).tolist():
            prefix_ok[first * 257] = True
            prefix_ok[first * 257 + 1 + self._first_bytes(self.step(state, first))] = True
        starts = prefix_ok[vocab.prefix_codes]  # per row (position in vocab.order): may be alive
        starts[vocab.running[min(longer_than, vocab.max_len)]:] = False
        if np.count_nonzero(starts) > len(starts) // 2:
            # most tokens alive (a string body): keep every row in place, dead ones in DEAD
            states = np.where(starts, state, DEAD).astype(np.int64)
            for j, column in enumerate(vocab.columns):
                running, ending_from = vocab.running[j], vocab.running[j + 1]
                current = states[:running]
                if record_escapes and j:
                    self._note_escapes(current, j, vocab, escapes)
                flat = current * 256 + column
                nxt = self._lookup(flat)
                allowed_sorted[ending_from:running] = nxt[ending_from:] != DEAD
                states = nxt[:ending_from].astype(np.int64)
                if not states.any():
                    break
        else:  # few alive: carry only their rows
            rows = np.nonzero(starts)[0]
            states = np.full(len(rows), state, dtype=np.int64)
            for j, column in enumerate(vocab.columns):
                keep = np.searchsorted(rows, vocab.running[j])  # drop tokens shorter than j+1 bytes
                rows, states = rows[:keep], states[:keep]
                if not len(rows):
                    break
                if record_escapes and j:
                    self._note_escapes(states, j, vocab, escapes, rows)
                nxt = self._lookup(states * 256 + column[rows])
                alive = nxt != DEAD
                ending = rows >= vocab.running[j + 1]  # this was their last byte
                allowed_sorted[rows[alive & ending]] = True
                go_on = alive & ~ending
                rows, states = rows[go_on], nxt[go_on].astype(np.int64)
        allowed = np.zeros(vocab.size, dtype=np.bool_)
        allowed[vocab.order] = allowed_sorted
        return allowed, escapes


class GrammarMatcher:
    """Where one output stands in its grammar. advance*/allowed_tokens are the sampler's interface:
    mask the logits with allowed_tokens(), sample, advance_token(the sampled id)."""

    def __init__(self, engine: GrammarEngine, state: int) -> None:
        self.engine, self.state = engine, state
        self.ended = False  # an end token was accepted: nothing may follow

    def copy(self) -> GrammarMatcher:
        twin = GrammarMatcher(self.engine, self.state)
        twin.ended = self.ended
        return twin

    def advance(self, data: bytes) -> bool:
        """Read raw output bytes; False (and dead from then on) when they cannot continue it."""
        if self.ended and data:
            self.state = DEAD
        self.state = self.engine.walk(self.state, data)
        return self.state != DEAD

    def advance_token(self, token_id: int) -> bool:
        """Read one sampled token: an end token is accepted only where the output may end."""
        vocab = self.engine.vocab
        if not 0 <= token_id < vocab.size:
            raise GrammarError(f"token id {token_id} is outside the vocabulary of {vocab.size}")
        if token_id in vocab.end_set:
            if not self.is_accepting():
                self.state = DEAD
            self.ended = True
            return self.state != DEAD
        data = vocab.token_bytes[token_id]
        if not data:  # a control token carries no text: it cannot continue a grammar
            self.state = DEAD
        return self.advance(data)

    def allowed_tokens(self) -> np.ndarray:
        """Bool mask over the vocabulary. End tokens are allowed where the output may end. All
        False means nothing can follow (dead, ended, or no token spells the bytes the grammar needs):
        the caller must end the output with an error."""
        if self.ended or self.state == DEAD:
            return np.zeros(self.engine.vocab.size, dtype=np.bool_)
        mask = self.engine.token_mask(self.state)
        if self.is_accepting():
            mask[self.engine.vocab.end_ids] = True
        return mask

    def is_accepting(self) -> bool:
        return self.engine.is_accepting(self.state)

    def is_dead(self) -> bool:
        return self.state == DEAD


class LazyGrammar:
    """A grammar that applies from the first place the output writes `trigger` on (the trigger
    included); before it, any token may come. What `Request.grammar` takes, as an engine does."""

    def __init__(self, engine: GrammarEngine, trigger: bytes) -> None:
        self.engine, self.trigger = engine, trigger

    def matcher(self) -> LazyMatcher:
        return LazyMatcher(self)


class LazyMatcher:
    """A GrammarMatcher's interface over a LazyGrammar: free until the trigger, then its grammar's.
    A token that writes the trigger and, after it, text the grammar refuses leaves it dead (the
    caller ends the output with an error, as for any grammar that allows nothing)."""

    def __init__(self, lazy: LazyGrammar) -> None:
        self.lazy = lazy
        self.tail = b""  # the last bytes written, too few to hold the trigger
        self.inner: GrammarMatcher | None = None  # once triggered
        self.ended = False

    def copy(self) -> LazyMatcher:
        twin = LazyMatcher(self.lazy)
        twin.tail, twin.ended = self.tail, self.ended
        twin.inner = self.inner.copy() if self.inner is not None else None
        return twin

    def advance_token(self, token_id: int) -> bool:
        if self.inner is not None:
            return self.inner.advance_token(token_id)
        vocab = self.lazy.engine.vocab
        if token_id in vocab.end_set:
            self.ended = True
            return True
        return self.advance(vocab.token_bytes[token_id])

    def advance(self, data: bytes) -> bool:
        if self.inner is not None:
            return self.inner.advance(data)
        written = self.tail + data
        at = written.find(self.lazy.trigger)
        if at < 0:
            self.tail = written[max(0, len(written) - len(self.lazy.trigger) + 1):]
            return True
        self.inner = self.lazy.engine.matcher()
        return self.inner.advance(written[at:])

    def allowed_tokens(self) -> np.ndarray:
        if self.inner is not None:
            return self.inner.allowed_tokens()
        return np.full(self.lazy.engine.vocab.size, not self.ended, dtype=np.bool_)

    def is_accepting(self) -> bool:
        return self.inner is None or self.inner.is_accepting()

    def is_dead(self) -> bool:
        return self.inner is not None and self.inner.is_dead()


class GrammarCache:
    """One model's compiled grammars, the `size` latest used: requests that ask for the same
    grammar or schema share its engine, and so the masks it has computed. Built on first use (the
    vocabulary's byte strings too). Like an engine, it belongs to one thread: the one that samples."""

    MAKERS = {"gbnf": Grammar.from_gbnf, "json_schema": Grammar.from_json_schema,
              "json_object": lambda _: Grammar.json_object()}

    def __init__(self, tokenizer: Any, size: int = 16) -> None:
        self.tokenizer, self.size = tokenizer, size
        self._vocab: TokenVocabulary | None = None
        self._engines: OrderedDict[tuple[str, str], GrammarEngine] = OrderedDict()

    def engine(self, kind: str, spec: Any) -> GrammarEngine:
        """The engine of a grammar given as `kind` ("gbnf", "json_schema" or "json_object") and its
        text or schema; GrammarError when it is not one this module can compile."""
        key = (kind, json.dumps(spec, sort_keys=True))
        engine = self._engines.get(key)
        if engine is None:
            if self._vocab is None:
                self._vocab = TokenVocabulary.from_tokenizer(self.tokenizer)
            engine = self._engines[key] = GrammarEngine(self.MAKERS[kind](spec), self._vocab)
            if len(self._engines) > self.size:
                self._engines.popitem(last=False)
        self._engines.move_to_end(key)
        return engine

    def for_request(self, response_format: Any, grammar: Any) -> GrammarEngine | None:
        """The engine of a request's structured output options, as the API and the page's engine
        take them: response_format ({"type": "text" | "json_object"} or {"type": "json_schema",
        "json_schema": {"schema": {...}}}) or grammar (GBNF text); None for free text. A
        GrammarError names the field (`param`)."""
        asked = {"type": "text"} if response_format is None else response_format
        kind = asked.get("type") if isinstance(asked, dict) else None
        if grammar is not None:
            kind, spec, param = "gbnf", grammar, "grammar"
            if asked != {"type": "text"} or not isinstance(grammar, str):
                raise _refused("grammar is GBNF text, given without a response_format", param)
        elif kind == "json_object":
            spec, param = None, "response_format"
        elif kind == "json_schema":
            spec, param = (asked.get("json_schema") or {}).get("schema"), "response_format.json_schema.schema"
            if not isinstance(spec, dict):
                raise _refused('response_format of type json_schema needs {"json_schema": {"schema": {...}}}',
                               "response_format.json_schema")
        elif kind == "text":
            return None
        else:
            raise _refused('response_format must be {"type": "text" | "json_object" | "json_schema", ...} or null',
                           "response_format.type")
        try:
            return self.engine(kind, spec)
        except GrammarError as e:
            e.param = param
            raise


def _refused(message: str, param: str) -> GrammarError:
    error = GrammarError(message)
    error.param = param
    return error


# --- JSON: the json_object grammar and JSON Schema -> GBNF ----------------------------------------

# Shared by json_object and every schema: generic values, strings, numbers and bounded whitespace.
JSON_BASE_GBNF = r"""
value   ::= object | array | string | number | "true" | "false" | "null"
object  ::= "{" ws ( member ( "," ws member )* )? "}"
member  ::= string ws ":" ws value ws
array   ::= "[" ws ( value ws ( "," ws value ws )* )? "]"
string  ::= "\"" char* "\""
char    ::= [^"\\\x00-\x1f] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )
number  ::= integer ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?
integer ::= "-"? ( "0" | [1-9] [0-9]* )
boolean ::= "true" | "false"
null    ::= "null"
ws      ::= ( " " | "\n" " "{0,20} )?
"""
JSON_GBNF = "root ::= object\n" + JSON_BASE_GBNF

# Keywords that say nothing about which texts are valid: accepted and ignored.
SCHEMA_ANNOTATIONS = frozenset({"title", "description", "$schema", "$id", "$comment", "default", "examples",
                                "deprecated", "readOnly", "writeOnly"})
SCHEMA_KEYWORDS = frozenset({"type", "properties", "required", "additionalProperties", "items", "enum", "const",
                             "anyOf", "minItems", "maxItems", "minLength", "maxLength", "$ref", "$defs",
                             "definitions"})
_TYPE_RULES = {"string": "string", "number": "number", "integer": "integer", "boolean": "boolean",
               "null": "null"}


def gbnf_literal(text: str) -> str:
    """A GBNF string literal matching exactly text."""
    escaped = []
    for c in text:
        if c in '"\\':
            escaped.append("\\" + c)
        elif ord(c) < 0x20:
            escaped.append(f"\\x{ord(c):02x}")
        else:
            escaped.append(c)
    return '"' + "".join(escaped) + '"'


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _value_gbnf(value: Any) -> str:
    """GBNF for exactly one JSON value (const, enum), with the usual whitespace between its tokens."""
    if isinstance(value, dict):
        members = [f"{gbnf_literal(_json_text(k))} ws \":\" ws {_value_gbnf(v)} ws" for k, v in value.items()]
        return '"{" ws ' + ' "," ws '.join(members) + (" " if members else "") + '"}"'
    if isinstance(value, list):
        items = [f"{_value_gbnf(v)} ws" for v in value]
        return '"[" ws ' + ' "," ws '.join(items) + (" " if items else "") + '"]"'
    return gbnf_literal(_json_text(value))


class _SchemaConverter:
    def __init__(self, root: Any, rules: dict[str, str] | None = None, prefix: str = "") -> None:
        self.root = root
        self.rules: dict[str, str] = {} if rules is None else rules
        self.prefix = prefix  # of its definitions' rule names: several schemas can share `rules`

    def error(self, where: str, message: str) -> GrammarError:
        return GrammarError(f"JSON schema at {where}: {message}")

    def add_rule(self, name: str, body: str) -> str:
        name = re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-") or "r"
        unique, n = name, 1
        while unique in self.rules or unique in _BASE_RULE_NAMES:
            n += 1
            unique = f"{name}-{n}"
        self.rules[unique] = body
        return unique

    def convert(self) -> str:
        self.rules["root"] = ""
        self.rules["root"] = self.visit(self.root, "#", "root")
        return "".join(f"{name} ::= {body}\n" for name, body in self.rules.items()) + JSON_BASE_GBNF

    def visit(self, schema: Any, where: str, name: str) -> str:
        """A GBNF expression matching the JSON texts schema allows."""
        if schema is True:
            return "value"
        if schema is False:
            raise self.error(where, "the schema `false` allows no value")
        if not isinstance(schema, dict):
            raise self.error(where, f"a schema must be an object or a boolean, not {type(schema).__name__}")
        for key in schema:
            if key not in SCHEMA_KEYWORDS and key not in SCHEMA_ANNOTATIONS:
                raise self.error(where, f"keyword {key!r} is not supported for constrained output "
                                        f"(supported: {', '.join(sorted(SCHEMA_KEYWORDS))})")
        if "$ref" in schema:
            return self.reference(schema["$ref"], where)
        if "const" in schema:
            return _value_gbnf(schema["const"])
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise self.error(where, "enum must be a non-empty list: an empty one allows no value")
            return "( " + " | ".join(_value_gbnf(v) for v in values) + " )"
        if "anyOf" in schema:
            options = schema["anyOf"]
            if not isinstance(options, list) or not options:
                raise self.error(where, "anyOf must be a non-empty list: an empty one allows no value")
            return "( " + " | ".join(self.visit(o, f"{where}/anyOf/{i}", f"{name}-{i}")
                                     for i, o in enumerate(options)) + " )"
        kind = schema.get("type")
        if kind is None:  # infer from the keywords present
            kind = "object" if "properties" in schema else "array" if "items" in schema else None
        if kind is None:
            return "value"
        if isinstance(kind, list):
            if not kind:
                raise self.error(where, "type is an empty list: it allows no value")
            return "( " + " | ".join(self.typed(schema, k, where, name) for k in kind) + " )"
        return self.typed(schema, kind, where, name)

    def typed(self, schema: dict, kind: Any, where: str, name: str) -> str:
        if kind == "object":
            return self.object(schema, where, name)
        if kind == "array":
            return self.array(schema, where, name)
        if kind == "string" and ("minLength" in schema or "maxLength" in schema):
            low, high = self.bounds(schema, "minLength", "maxLength", where)
            return '"\\"" ' + f"char{{{low},{'' if high is None else high}}}" + ' "\\""'
        if kind not in _TYPE_RULES:
            raise self.error(where, f"unknown type {kind!r} (known: object, array, {', '.join(_TYPE_RULES)})")
        return _TYPE_RULES[kind]

    def bounds(self, schema: dict, low_key: str, high_key: str, where: str) -> tuple[int, int | None]:
        low, high = schema.get(low_key, 0), schema.get(high_key)
        for key, value in ((low_key, low), (high_key, high)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise self.error(where, f"{key} must be a non-negative integer, not {value!r}")
            if value is not None and value > MAX_REPEAT:
                raise self.error(where, f"{key} = {value} is above the {MAX_REPEAT} supported")
        if high is not None and low > high:
            raise self.error(where, f"{low_key} = {low} is above {high_key} = {high}: no value can satisfy it")
        return low, high

    def reference(self, ref: Any, where: str) -> str:
        match = re.fullmatch(r"#/(\$defs|definitions)/([^/]+)", ref) if isinstance(ref, str) else None
        if not match:
            raise self.error(where, f"$ref {ref!r} is not supported (only #/$defs/NAME and #/definitions/NAME)")
        defs = self.root.get(match.group(1)) if isinstance(self.root, dict) else None
        if not isinstance(defs, dict) or match.group(2) not in defs:
            raise self.error(where, f"$ref {ref!r} names no definition")
        rule = f"{self.prefix}def-{match.group(2)}"
        key = re.sub(r"[^A-Za-z0-9-]+", "-", rule)
        if key not in self.rules:  # reserve the name first: a definition may refer to itself
            self.rules[key] = ""
            self.rules[key] = self.visit(defs[match.group(2)], ref, key)
        return key

    def object(self, schema: dict, where: str, name: str) -> str:
        properties = schema.get("properties")
        extra = schema.get("additionalProperties", False if properties is not None else True)
        if properties is None:
            if extra is True:
                return "object"  # no properties named: any object
            if extra is False:
                return '"{" ws "}"'
        if extra is not False:
            raise self.error(where, "additionalProperties other than false is not supported when properties "
                                    "are given (constrained output allows exactly the listed properties)")
        if not isinstance(properties, dict):
            raise self.error(where, "properties must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or any(r not in properties for r in required):
            missing = [r for r in required if r not in properties] if isinstance(required, list) else required
            raise self.error(where, f"required names properties that are not in properties: {missing!r}")
        members = []  # (GBNF for `"key" ws ":" ws value ws`, required?) in declared order
        for key, sub in properties.items():
            value = self.visit(sub, f"{where}/properties/{key}", f"{name}-{key}")
            members.append((f"{gbnf_literal(_json_text(key))} ws \":\" ws {value} ws", key in required))
        # Two rules per place i, built from the end: `rest` = members i.. once one is written (each
        # with its comma), `first` = members i.. while none is written yet. Linear in the members.
        rest = first = ""  # for i = len(members): nothing
        for i in range(len(members) - 1, -1, -1):
            text, needed = members[i]
            own = f"{text} {rest}".strip()  # member i written first, then the rest
            if needed:
                first = f"( {own} )"
            else:
                first = self.add_rule(f"{name}-from-{i}", f"{own} | {first}" if first else f"( {own} )?")
            if i:
                comma = f'"," ws {text}' if needed else f'( "," ws {text} )?'
                rest = self.add_rule(f"{name}-rest-{i}", f"{comma} {rest}".strip())
        return f'"{{" ws {first} "}}"'

    def array(self, schema: dict, where: str, name: str) -> str:
        item = self.visit(schema.get("items", True), f"{where}/items", f"{name}-item")
        low, high = self.bounds(schema, "minItems", "maxItems", where)
        item_rule = self.add_rule(f"{name}-item", f"{item} ws")
        if high == 0:
            return '"[" ws "]"'
        more = f'( "," ws {item_rule} ){{{max(low - 1, 0)},{"" if high is None else high - 1}}}'
        body = f"{item_rule} {more}"
        return f'"[" ws {body} "]"' if low > 0 else f'"[" ws ( {body} )? "]"'


_BASE_RULE_NAMES = frozenset(re.findall(r"^(\w+)\s*::=", JSON_BASE_GBNF, re.M))


def json_schema_rules(schema: Any, name: str, rules: dict[str, str]) -> None:
    """Add to `rules` (rule name -> GBNF body) the rule `name` matching the JSON texts `schema`
    allows, and its helpers: for grammars that compose several schemas (tool calls' arguments).
    They refer to JSON_BASE_GBNF's rules, which the composed grammar adds once."""
    rules[name] = ""  # reserved first: a helper's name must not take it
    rules[name] = _SchemaConverter(schema, rules, prefix=f"{name}-").visit(schema, "#", name)


def json_schema_to_gbnf(schema: Any) -> str:
    """GBNF for the JSON texts a schema allows (the subset in SCHEMA_KEYWORDS). Objects with
    properties allow exactly those (OpenAI's strict mode), required ones in declared order and
    optional ones in their declared places; an object schema without properties allows any object."""
    return _SchemaConverter(schema).convert()
