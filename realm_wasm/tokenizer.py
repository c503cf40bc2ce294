"""Tokenizers built from GGUF metadata, matching llama.cpp token for token.

`tokenizer.ggml.model` picks one of two vocabularies:

* ``llama``, SentencePiece-style (gemma, llama-2, mistral): spaces become U+2581, adjacent symbols
  merge pairwise, highest vocab score first; what no token spells falls back to ``<0xXX>`` tokens.
* ``gpt2``, byte-level BPE (llama-3, qwen2, smollm): text is pre-split into words by the pattern that
  `tokenizer.ggml.pre` names, each word's UTF-8 bytes are spelled in GPT-2's printable byte alphabet,
  then pairs merge in `tokenizer.ggml.merges` rank order.

In both, special tokens (control, user-defined, unknown) are cut out of the raw text first, longest
first, as llama.cpp does, so "<start_of_turn>" in a prompt is one token. Both merge words (BPE's
pre-split words; SPM's runs from a word's U+2581 to the next word's, where no token spans one)
each on its own, and keep the ids of the words they have merged (`_WordCache`): a long prompt's
merges are most of its time to first token in the page, where Python is several times slower.

The metadata comes from an untrusted file: every key this module reads is type-checked first
(`_METADATA_TYPES`), so a malformed vocab is a `TokenizerError` naming the key, never a crash later.
Text is untrusted too: a lone surrogate (JSON allows "\\ud800") has no UTF-8 form, so it becomes
U+FFFD before encoding, the character a UTF-8 decoder (llama.cpp's, HF's) makes of invalid input.
"""

from __future__ import annotations

import codecs
import heapq
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BadModel

_KEY = "tokenizer.ggml."

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Token texts that end generation besides eos and the eot/eom ids in metadata (llama.cpp's list).
_END_OF_TURN_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                      "<|endoftext|>", "<EOT>")
_SPM_SPACE = "\u2581"
MAX_VOCAB = 1 << 21  # 8x gemma-3's 262144: bounds the tables built from an untrusted vocab
_WORD_START = re.compile(f"[^{_SPM_SPACE}]{_SPM_SPACE}")  # a word's U+2581 after another word
MAX_SPANNING = 64  # tokens spanning a word start that an SPM vocab may have and still be split


class TokenizerError(BadModel):
    """The metadata describes no tokenizer this module runs, or text/ids cannot be mapped."""


# --- the metadata this module reads, and the type each key must have ---------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # bool is an int subclass


def _is_numbers(kinds: str) -> Callable[[Any], bool]:
    """A 1-D numeric array (a GGUF array, or a list in hand-built metadata) of these numpy kinds."""
    def check(value: Any) -> bool:
        if not isinstance(value, (list, tuple, np.ndarray)):
            return False
        try:
            arr = np.asarray(value)
        except ValueError:  # ragged nested lists
            return False
        return arr.ndim == 1 and (arr.dtype.kind in kinds or arr.size == 0)
    return check


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {  # kind -> (test, what it means)
    "string": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "a bool"),
    "integer": (_is_int, "an integer"),
    "strings": (_is_strings, "an array of strings"),
    "numbers": (_is_numbers("fiu"), "an array of numbers"),
    "integers": (_is_numbers("iu"), "an array of integers"),
}
_METADATA_TYPES = {
    _KEY + "model": "string",
    _KEY + "pre": "string",
    _KEY + "tokens": "strings",
    _KEY + "scores": "numbers",
    _KEY + "token_type": "integers",
    _KEY + "merges": "strings",
    _KEY + "add_bos_token": "bool",
    _KEY + "add_space_prefix": "bool",
    **{f"{_KEY}{name}_token_id": "integer" for name in ("bos", "eos", "unknown", "eot", "eom")},
    "tokenizer.chat_template": "string",  # read by the server's chat templates, checked here with the rest
}


def _check_metadata_types(metadata: dict[str, Any]) -> None:
    for key, kind in _METADATA_TYPES.items():
        value = metadata.get(key)
        test, meaning = _CHECKS[kind]
        if value is not None and not test(value):
            raise TokenizerError(f"{key} must be {meaning}, got {_describe(value)}")


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of {value.dtype}"
    if isinstance(value, list):
        odd = next((v for v in value if not isinstance(v, str)), None)
        return f"an array holding {type(odd).__name__} {odd!r:.30}" if odd is not None else "an array of strings"
    return f"{type(value).__name__} {value!r:.40}"


_BYTE_TOKEN = re.compile("<0x[0-9A-Fa-f]{2}>")
_SURROGATE = re.compile("[\ud800-\udfff]")


# --- GPT-2's byte alphabet ---------------------------------------------------------------------

def _gpt2_byte_alphabet() -> list[str]:
    """Byte-level vocabularies spell each byte as one printable character: bytes that print as
    Latin-1 stand for themselves, the others (controls, space, NBSP, soft hyphen) take U+0100 on."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    spare = iter(range(0x100, 0x200))
    return [chr(b) if b in printable else chr(next(spare)) for b in range(256)]


_BYTE_CHARS = _gpt2_byte_alphabet()
_SPELL_LATIN1 = dict(enumerate(_BYTE_CHARS))  # str.translate table over bytes decoded as Latin-1
_BYTE_OF_CHAR = {c: b for b, c in enumerate(_BYTE_CHARS)}


def _spell_bytes(text: str) -> str:
    return text.encode().decode("latin-1").translate(_SPELL_LATIN1)


# --- pre-tokenizers ------------------------------------------------------------------------------
# The reference patterns use \p{L} / \p{N} / \p{P}, which stdlib `re` lacks, and the `regex` module
# that has them is not in Pyodide's offline package set. So every non-ASCII character is first
# collapsed to a stand-in for its class (ASCII stays itself: the patterns name ' s t \r \n 0-9
# literally), then stdlib patterns over the stand-ins split the text. The collapsed string has the
# text's length, so match spans carry over unchanged.
_LETTER, _NUMBER, _SPACE, _PUNCT, _OTHER = "\ue000", "\ue001", "\ue002", "\ue003", "\ue004"
_STAND_IN = {"L": _LETTER, "N": _NUMBER, "P": _PUNCT}


class _Collapse(dict):
    """str.translate table, filled on demand: non-ASCII code point -> its class stand-in."""

    def __missing__(self, cp: int) -> int | str:
        char = chr(cp)
        if cp < 128:
            stand_in: int | str = cp
        elif char.isspace():  # beyond ASCII, str.isspace() is exactly Unicode White_Space
            stand_in = _SPACE
        else:
            stand_in = _STAND_IN.get(unicodedata.category(char)[0], _OTHER)
        self[cp] = stand_in
        return stand_in


_COLLAPSE = _Collapse()
# Character-class bodies. \s is Unicode White_Space, which has no ASCII beyond \t-\r and space
# (stdlib's \s would also take \x1c-\x1f).
_L, _N, _S = "A-Za-z" + _LETTER, "0-9" + _NUMBER, "\t\n\v\f\r " + _SPACE
_P = re.escape("".join(c for c in map(chr, range(128)) if unicodedata.category(c)[0] == "P")) + _PUNCT
_GPT2 = rf"'s|'t|'re|'ve|'m|'ll|'d| ?[{_L}]+| ?[{_N}]+| ?[^{_S}{_L}{_N}]+|[{_S}]+(?![^{_S}])|[{_S}]+"


def _llama3_style(digit_run: str) -> str:
    return (rf"'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD]|[^\r\n{_L}{_N}]?[{_L}]+"
            rf"|[{_N}]{digit_run}| ?[^{_S}{_L}{_N}]+[\r\n]*|[{_S}]*[\r\n]+|[{_S}]+(?![^{_S}])|[{_S}]+")


@dataclass(frozen=True)
class _PreTokenizer:
    patterns: tuple[re.Pattern[str], ...]  # applied in turn, each cutting the pieces of the last
    ignore_merges: bool = False  # a word that is itself a token skips merging (llama-3)
    add_bos: bool = False  # llama.cpp's default when the metadata has no add_bos_token


def _pre(*patterns: str, **flags: bool) -> _PreTokenizer:
    return _PreTokenizer(tuple(map(re.compile, patterns)), **flags)


_LLAMA3 = _pre(_llama3_style("{1,3}"), ignore_merges=True, add_bos=True)
_GPT2_PRE = _pre(_GPT2)
# tokenizer.ggml.pre -> pre-tokenizer, as llama.cpp's llm_tokenizer_bpe sets them up.
_PRE_TOKENIZERS = {
    "default": _pre(rf"[{_P}$+<=>^~|]+", _GPT2, rf"[{_N}]+", "[0-9][0-9][0-9]"),
    "gpt-2": _GPT2_PRE,
    "gpt2": _GPT2_PRE,
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "qwen2": _pre(_llama3_style("")),
    "smollm": _pre(rf"[{_N}]", _GPT2),
}


def _pre_split(text: str, patterns: tuple[re.Pattern[str], ...]) -> list[str]:
    """Words of text: each pattern cuts every current piece into its matches and the gaps between
    them (llama.cpp's unicode_regex_split, HF's Split(behavior="isolated")). A pattern sees only its
    piece, so a lookahead at a piece's end sees the end of text."""
    collapsed = text.translate(_COLLAPSE)
    spans = [(0, len(text))] if text else []
    for pattern in patterns:
        cut = []
        for start, end in spans:
            for match in pattern.finditer(collapsed, start, end):
                if match.start() > start:
                    cut.append((start, match.start()))
                cut.append(match.span())
                start = match.end()
            if start < end:
                cut.append((start, end))
        spans = cut
    return [text[a:b] for a, b in spans]


# --- the shared merge loop and special-token cutting ---------------------------------------------

def _merge_pairs(symbols: list[str], priority: Callable[[str, str], float | None]) -> list[str]:
    """Merge adjacent symbols, always the pair with the lowest priority (None: never), the leftmost
    on ties, until no pair can merge; returns the pieces in order. The queue holds pairs as they
    were when pushed: one whose side has merged since is skipped when popped (llama.cpp's scheme)."""
    pieces = list(symbols)
    prev = list(range(-1, len(pieces) - 1))
    nxt = [*range(1, len(pieces)), -1]
    queue: list[tuple[float, int, int, int]] = []

    def consider(left: int, right: int) -> None:
        if left >= 0 and right >= 0:
            rank = priority(pieces[left], pieces[right])
            if rank is not None:
                heapq.heappush(queue, (rank, left, right, len(pieces[left]) + len(pieces[right])))

    for i in range(1, len(pieces)):
        consider(i - 1, i)
    while queue:
        _, left, right, size = heapq.heappop(queue)
        if not pieces[left] or not pieces[right] or len(pieces[left]) + len(pieces[right]) != size:
            continue
        pieces[left] += pieces[right]
        pieces[right] = ""
        nxt[left] = nxt[right]
        if nxt[left] >= 0:
            prev[nxt[left]] = left
        consider(prev[left], left)
        consider(left, nxt[left])
    return [p for p in pieces if p]


class _WordCache(dict):
    """Word -> its ids, bounded: emptied when full (a chat's words repeat; a flood of new ones
    must not grow it without end)."""

    LIMIT = 1 << 16

    def ids(self, word: str, encode: Callable[[str], list[int]]) -> list[int]:
        ids = self.get(word)
        if ids is None:
            if len(self) >= self.LIMIT:
                self.clear()
            ids = self[word] = encode(word)
        return ids


class _Specials:
    """Special tokens in the order they are cut (longest first), indexed by their first two
    characters: a text is checked only for those whose start it contains (gemma-3 has 6,414, and
    looking for each one in a long prompt took most of its encoding)."""

    def __init__(self, specials: list[tuple[str, int]]) -> None:
        self._by_head: dict[str, list[tuple[int, str, int]]] = {}
        for order, (text, token_id) in enumerate(specials):
            self._by_head.setdefault(text[:2], []).append((order, text, token_id))

    def in_text(self, text: str) -> list[tuple[str, int]]:
        heads = {text[i:i + 2] for i in range(len(text))} | set(text)  # one-character specials too
        found = sorted(entry for head in heads & self._by_head.keys() for entry in self._by_head[head])
        return [(special, token_id) for _, special, token_id in found if special in text]


def _cut_specials(text: str, specials: list[tuple[str, int]]) -> list[str | int]:
    """Text split into raw pieces and special token ids. Specials are tried longest first over the
    whole text, each cutting every raw piece at its leftmost non-overlapping occurrences
    (llama.cpp's tokenizer_st_partition)."""
    parts: list[str | int] = [text] if text else []
    for special, token_id in specials:
        cut: list[str | int] = []
        for part in parts:
            if isinstance(part, int) or special not in part:
                cut.append(part)
                continue
            for k, chunk in enumerate(part.split(special)):
                cut.extend(([token_id] if k else []) + ([chunk] if chunk else []))
        parts = cut
    return parts


# --- the two vocabularies ------------------------------------------------------------------------

class _SentencePiece:
    """llama.cpp's SPM tokenizer: merges by vocab score, byte tokens for what no token spells."""

    def __init__(self, metadata: dict[str, Any], token_ids: dict[str, int], n_tokens: int,
                 unk_id: int | None) -> None:
        scores = metadata.get(_KEY + "scores")
        self._scores = [0.0] * n_tokens if scores is None else np.asarray(scores, np.float32).tolist()
        if len(self._scores) != n_tokens:
            raise TokenizerError(f"{_KEY}scores has {len(self._scores)} entries for {n_tokens} tokens")
        self._token_ids = token_ids
        self._byte_ids = [self._byte_token(b, unk_id) for b in range(256)]
        self.add_bos = True
        self.space_prefix = bool(metadata.get(_KEY + "add_space_prefix", True))
        # Tokens a merge across a word start would make ('>▁</' in gemma-3's vocab): the text is not
        # split inside their occurrences; a vocab with many of them is merged whole.
        spanning = [token for token in token_ids if _WORD_START.search(token)]
        self._spanning = spanning if len(spanning) <= MAX_SPANNING else None
        self._words = _WordCache()

    def _byte_token(self, byte: int, unk_id: int | None) -> int | None:
        """A byte's token: "<0xXX>", else the byte as a one-character token (ASCII), else <unk>."""
        token_id = self._token_ids.get(f"<0x{byte:02X}>")
        if token_id is None and byte < 128:
            token_id = self._token_ids.get(chr(byte))
        return unk_id if token_id is None else token_id

    def _pair_priority(self, left: str, right: str) -> float | None:
        token_id = self._token_ids.get(left + right)
        return None if token_id is None else -self._scores[token_id]

    def encode_text(self, text: str) -> list[int]:
        return [i for word in self._words_of(text.replace(" ", _SPM_SPACE)) for i in self._words.ids(word, self._merge)]

    def _words_of(self, text: str) -> list[str]:
        """Text cut before each word's U+2581, except inside a spanning token: no merge can join
        two of the pieces, so merging each alone gives what merging the whole text gives."""
        if self._spanning is None:
            return [text]
        cuts = {m.start() + 1 for m in _WORD_START.finditer(text)}
        for token in self._spanning:
            at = text.find(token)
            while at >= 0 and cuts:
                cuts.difference_update(range(at + 1, at + len(token)))
                at = text.find(token, at + 1)
        bounds = [0, *sorted(cuts), len(text)]
        return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]

    def _merge(self, word: str) -> list[int]:
        ids: list[int] = []
        for piece in _merge_pairs(list(word), self._pair_priority):
            token_id = self._token_ids.get(piece)
            ids.extend(self._byte_fallback(piece) if token_id is None else [token_id])
        return ids

    def _byte_fallback(self, piece: str) -> list[int]:
        ids = [self._byte_ids[b] for b in piece.encode()]
        if None in ids:
            raise TokenizerError(f"no token spells {piece!r}: the vocab has neither byte tokens nor <unk>")
        return ids

    def normal_bytes(self, text: str) -> bytes:
        return text.replace(_SPM_SPACE, " ").encode()


class _BytePairs:
    """llama.cpp's byte-level BPE tokenizer: pre-split words, merges in rank order."""

    def __init__(self, metadata: dict[str, Any], token_ids: dict[str, int], n_tokens: int,
                 unk_id: int | None) -> None:
        merges = metadata.get(_KEY + "merges")
        if merges is None:
            raise TokenizerError(f"byte-level BPE vocab without {_KEY}merges")
        # Keyed by the merge line "left right" itself: byte-level pieces never hold a literal space.
        self._ranks = {merge: rank for rank, merge in enumerate(merges)}
        pre_name = metadata.get(_KEY + "pre", "default")
        if pre_name not in _PRE_TOKENIZERS:
            raise TokenizerError(f"unsupported {_KEY}pre {pre_name!r} (supported: {', '.join(_PRE_TOKENIZERS)})")
        self._pre = _PRE_TOKENIZERS[pre_name]
        self._token_ids, self._unk_id = token_ids, unk_id
        self.add_bos = self._pre.add_bos
        self.space_prefix = False
        self._words = _WordCache()

    def _pair_priority(self, left: str, right: str) -> int | None:
        return self._ranks.get(f"{left} {right}")

    def encode_text(self, text: str) -> list[int]:
        return [i for word in _pre_split(text, self._pre.patterns) for i in self._words.ids(word, self._merge)]

    def _merge(self, word: str) -> list[int]:
        spelled = _spell_bytes(word)
        whole = self._token_ids.get(spelled) if self._pre.ignore_merges else None
        pieces = [spelled] if whole is not None else _merge_pairs(list(spelled), self._pair_priority)
        return [self._piece_id(piece) for piece in pieces]

    def _piece_id(self, piece: str) -> int:
        token_id = self._token_ids.get(piece, self._unk_id)
        if token_id is None:
            raise TokenizerError(f"no token spells {piece!r} and the vocab has no <unk>")
        return token_id

    def normal_bytes(self, text: str) -> bytes:
        try:
            return bytes(_BYTE_OF_CHAR[c] for c in text)
        except KeyError:  # not spelled in the byte alphabet (a hand-added token): plain text
            return text.encode()


_MODELS = {"llama": _SentencePiece, "gpt2": _BytePairs}


# --- the public tokenizer --------------------------------------------------------------------------

class Tokenizer:
    """Text <-> token ids for one GGUF model; build it with `Tokenizer.from_metadata`."""

    def __init__(self, metadata: dict[str, Any]) -> None:
        _check_metadata_types(metadata)
        kind = metadata.get(_KEY + "model")
        if kind not in _MODELS:
            raise TokenizerError(f"unsupported {_KEY}model {kind!r} (supported: {', '.join(_MODELS)})")
        tokens = metadata.get(_KEY + "tokens")
        if tokens is None or len(tokens) == 0:
            raise TokenizerError(f"GGUF metadata has no {_KEY}tokens (the vocab)")
        if len(tokens) > MAX_VOCAB:
            raise TokenizerError(f"{_KEY}tokens holds {len(tokens)} tokens, more than the {MAX_VOCAB} allowed")
        self.tokens: list[str] = list(tokens)
        self.vocab_size = n = len(self.tokens)
        types = metadata.get(_KEY + "token_type")
        self._types: list[int] = [NORMAL] * n if types is None else np.asarray(types).tolist()
        if len(self._types) != n:
            raise TokenizerError(f"{_KEY}token_type has {len(self._types)} entries for {n} tokens")
        bad_byte = next((i for i, t in enumerate(self._types) if t == BYTE and not _BYTE_TOKEN.fullmatch(tokens[i])),
                        None)  # token_bytes reads their hex digits
        if bad_byte is not None:
            raise TokenizerError(f"token {bad_byte} is of type byte but spelled {tokens[bad_byte]!r:.30}, not <0xXX>")
        # Later duplicates win, as in llama.cpp's token_to_id.
        self._token_ids = {text: i for i, text in enumerate(self.tokens)}

        self.bos_id = self._metadata_id(metadata, "bos")
        self.eos_id = self._metadata_id(metadata, "eos")
        self._model = _MODELS[kind](metadata, self._token_ids, n, self._metadata_id(metadata, "unknown"))
        # Whether encode(add_bos=True) adds BOS: the model asks for it (llama.cpp's add_special).
        self.add_bos_token = bool(metadata.get(_KEY + "add_bos_token", self._model.add_bos))
        ends = {self.eos_id, self._metadata_id(metadata, "eot"), self._metadata_id(metadata, "eom")}
        ends.update(self._token_ids.get(text) for text in _END_OF_TURN_TEXTS)
        self.eot_ids = frozenset(ends - {None})

        # Cut out of raw text longest first (UTF-8 length, as llama.cpp); user-defined ones always.
        special_ids = [i for i, t in enumerate(self._types) if t in (CONTROL, USER_DEFINED, UNKNOWN) and self.tokens[i]]
        special_ids.sort(key=lambda i: -len(self.tokens[i].encode()))
        specials = [(self.tokens[i], i) for i in special_ids]
        self._specials = _Specials(specials)
        self._user_defined = _Specials([(text, i) for text, i in specials if self._types[i] == USER_DEFINED])

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> Tokenizer:
        """Build from a GGUF key/value dict (`realm_wasm.gguf.read_gguf(path).metadata`)."""
        return cls(metadata)

    def _metadata_id(self, metadata: dict[str, Any], name: str) -> int | None:
        value = metadata.get(f"{_KEY}{name}_token_id")
        if value is not None and not 0 <= int(value) < self.vocab_size:
            raise TokenizerError(f"{_KEY}{name}_token_id = {value} is outside the vocab of {self.vocab_size}")
        return None if value is None else int(value)

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids for text. add_bos: prepend BOS if the model asks for one (add_bos_token);
        parse_special: control tokens written in the text (e.g. "<start_of_turn>") become those
        tokens; user-defined tokens are always matched, as in llama.cpp."""
        ids = [self.bos_id] if add_bos and self.add_bos_token and self.bos_id is not None else []
        text = _SURROGATE.sub("\ufffd", text)
        after_special = True  # SPM's space prefix goes on the first piece and after each special
        for part in _cut_specials(text, (self._specials if parse_special else self._user_defined).in_text(text)):
            if isinstance(part, int):
                ids.append(part)
                after_special = True
                continue
            if self._model.space_prefix and after_special:
                part = " " + part
            ids.extend(self._model.encode_text(part))
            after_special = False
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for: none for control, unknown and unused tokens."""
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocab of {self.vocab_size}")
        kind, text = self._types[token_id], self.tokens[token_id]
        if kind == NORMAL:
            return self._model.normal_bytes(text)
        if kind == USER_DEFINED:  # stored as the plain text they match
            return text.encode()
        if kind == BYTE:  # "<0xXX>"
            return bytes([int(text[3:5], 16)])
        return b""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; bytes that are not valid UTF-8 become U+FFFD."""
        return b"".join(map(self.token_bytes, ids)).decode("utf-8", errors="replace")


class StreamDecoder:
    """Decode ids one at a time: feed() returns only complete characters, holding back the first
    bytes of one split across tokens; the joined stream plus flush() equals Tokenizer.decode."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Whatever is held back (an unfinished character becomes U+FFFD); starts afresh."""
        tail = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return tail
