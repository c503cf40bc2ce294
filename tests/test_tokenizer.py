"""Tokenizer tests: SentencePiece-style against llama.cpp's ids for the default model (gemma-3);
byte-level BPE against HF `tokenizers` (a test-only oracle) on a vocab trained here."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
from golden import GOLDEN_DIR, load_cases
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realm_wasm import tokenizer as tokenizer_module
from realm_wasm.gguf import read_gguf
from realm_wasm.model_files import default_model_path
from realm_wasm.tokenizer import (
    _METADATA_TYPES,
    _PRE_TOKENIZERS,
    CONTROL,
    NORMAL,
    StreamDecoder,
    Tokenizer,
    TokenizerError,
    _pre_split,
)

GOLDEN_TOKENIZER_CASES = json.loads((GOLDEN_DIR / "tokenizer.json").read_text())
CASES = load_cases()


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tok)
    return [decoder.feed(i) for i in ids] + [decoder.flush()]


# --- SentencePiece-style: gemma-3 against llama.cpp ----------------------------------------------

@pytest.fixture(scope="module")
def gemma_metadata() -> dict:
    return read_gguf(default_model_path()).metadata


@pytest.fixture(scope="module")
def gemma(gemma_metadata) -> Tokenizer:
    return Tokenizer.from_metadata(gemma_metadata)


@pytest.mark.parametrize("case", GOLDEN_TOKENIZER_CASES, ids=[repr(c["text"])[:30] for c in GOLDEN_TOKENIZER_CASES])
def test_gemma_matches_llama_cpp_ids(gemma, case):
    ids = gemma.encode(case["text"], add_bos=False)
    assert ids == case["ids_no_bos"]
    # control tokens stand for no text
    assert gemma.decode(ids) == re.sub("<(start|end)_of_turn>", "", case["text"])


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_gemma_golden_prompts_and_generations(gemma, case):
    assert gemma.encode(case.prompt) == case.token_ids  # BOS 2 first
    text = json.loads((GOLDEN_DIR / f"{case.name}.json").read_text())["greedy_text"]
    assert gemma.decode(case.greedy_ids) == text
    assert "".join(stream(gemma, case.greedy_ids)) == text


def whole_text_ids(tok: Tokenizer, text: str) -> list[int]:
    """SPM as llama.cpp runs it: the whole text's symbols merged at once (no words, no cache)."""
    spm = tok._model
    return [i for piece in tokenizer_module._merge_pairs(list(text.replace(" ", "\u2581")), spm._pair_priority)
            for i in ([spm._token_ids[piece]] if piece in spm._token_ids else spm._byte_fallback(piece))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.lists(st.sampled_from(["> </", ">", " ", "  ", "</", "a", "the", "\n", "é", "ab>", "\u2581", "<"]),
                     max_size=12).map("".join))
def test_gemma_words_merge_as_the_whole_text_does(gemma, text):
    """Merged word by word (and cached), the ids of the whole text merged at once: also around the
    one gemma-3 token that spans a word start ('>\u2581</'), and on a second encoding (cached words)."""
    assert gemma._model._spanning == [">\u2581</"]
    for _ in range(2):
        assert gemma._model.encode_text(text) == whole_text_ids(gemma, text)


@settings(max_examples=300, deadline=None)
@given(specials=st.lists(st.text(alphabet="<>ab", min_size=1, max_size=4), unique=True, max_size=12),
       text=st.text(alphabet="<>abc", max_size=16))
def test_specials_found_in_a_text_are_those_it_contains_in_cutting_order(specials, text):
    ordered = sorted(specials, key=len, reverse=True)
    index = tokenizer_module._Specials([(s, i) for i, s in enumerate(ordered)])
    assert index.in_text(text) == [(s, i) for i, s in enumerate(ordered) if s in text]


def test_gemma_special_ids(gemma):
    assert (gemma.bos_id, gemma.eos_id, gemma.vocab_size) == (2, 1, 262144)
    assert gemma.eot_ids == {1, gemma.tokens.index("<end_of_turn>")}
    assert gemma.token_bytes(gemma.bos_id) == b""
    assert gemma.token_bytes(gemma.tokens.index("<0x41>")) == b"A"
    assert gemma.token_bytes(gemma.tokens.index("\u2581the")) == b" the"
    for bad in (-1, gemma.vocab_size):
        with pytest.raises(TokenizerError, match="outside the vocab"):
            gemma.token_bytes(bad)


def test_gemma_byte_fallback_and_streaming(gemma):
    char = "\U000f0041"  # supplementary private use: no token spells it
    assert char not in gemma.tokens
    byte_ids = [gemma.tokens.index(f"<0x{b:02X}>") for b in char.encode()]
    assert gemma.encode(f"a{char}", add_bos=False) == [gemma.tokens.index("a"), *byte_ids]
    assert stream(gemma, byte_ids) == ["", "", "", char, ""]
    assert gemma.decode(byte_ids[:2]) == "\ufffd"  # a cut-off character
    assert stream(gemma, byte_ids[:2]) == ["", "", "\ufffd"]


def test_gemma_parse_special_off_keeps_control_text_but_user_defined_tokens(gemma):
    text = "<start_of_turn>user\nhi  there"
    ids = gemma.encode(text, add_bos=False, parse_special=False)
    assert gemma.tokens.index("<start_of_turn>") not in ids
    assert gemma.decode(ids) == text
    assert gemma.tokens.index("  ") in ids  # user-defined tokens are always matched (llama.cpp)


def test_space_prefix_goes_first_and_after_each_special(gemma, gemma_metadata):
    prefixed = Tokenizer.from_metadata({**gemma_metadata, "tokenizer.ggml.add_space_prefix": True})
    assert prefixed.encode("Hello world", add_bos=False) == gemma.encode(" Hello world", add_bos=False)
    assert prefixed.encode("<start_of_turn>user") == [2, 105, *gemma.encode(" user", add_bos=False)]


def test_bos_follows_metadata(gemma_metadata):
    no_bos = Tokenizer.from_metadata({**gemma_metadata, "tokenizer.ggml.add_bos_token": False})
    assert no_bos.encode("hello") == [23391]


# --- byte-level BPE against HF tokenizers --------------------------------------------------------

CORPUS = [
    "Hello world! It's a test: we're here, they'll see, I'd say you've got it, I'm sure.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG; the quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\n",
    "for (int i = 0; i < 100; ++i) { x[i] = y[i] * 2.5f; }  // loop\r\n\tindented\ttabs",
    "Prices: $12.99, €15, ¥2000; 1234567890 and 3.14159 or 2,718; ٣٤٥ ५६७ Ⅻ ½",
    "Größe, naïve café, déjà vu, façade, Übermensch, señor, smørrebrød.",
    "Привет мир, как дела? Ελληνικά γράμματα. שלום עולם. مرحبا بالعالم.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다。",
    "नमस्ते दुनिया, ภาษาไทย, Tiếng Việt có dấu.",
    "Emoji: 🚀🔥👩‍💻🇫🇷 ❤️ 👍🏽 — dashes – and “quotes” «guillemets» …",
    "   leading spaces, trailing spaces   \n\n\nnew\u00a0lines\u3000and\u2009thin spaces",
    "x<y && y>z || a^b ~c | d = e + f - g * h / i % j @ k # l ` m",
]

TEXTS = [
    "", " ", "  ", "\n", "hello", " hello", "Hello World", "hello\nworld", "\n\n\n", "\t\t x",
    "don't", "DON'T", "I'M FINE", "you're, we've, they'll, she'd, it's", "'hello' 'S 'LL",
    "1234567890", "3.14159", "12 345 6789", "a1b22c333d4444", "x=1e-10", "٣٤٥٦ ५६७८",
    "def f(x):\n    return x*2", "if (a) {\r\n\treturn;\r\n}\r\n", "  \n  \n", "a \n b", "end  ",
    "naïve café", "東京", "🚀🔥", "👩‍💻 and 🇫🇷", "Größe", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "https://example.com/a?b=c&d=e#f", "   leading", "trailing   ", "x<y && y>z", "<b>bold</b>",
    "ünïcödé", "مرحبا", "Привет мир", "e=mc^2", "--flag=value", "$100+$200=$300", "~|^<=>",
    "a\u00a0b\u3000c\u2009d", "x\x1cy\x1f z", "नमस्ते", "e\u0301t\u00e9", "!!!???...", "a  \t\n b",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n", "text<|endoftext|>more",
    " supercalifragilistic and supercalifragilistic", "Hello world! It's a test",
]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WHOLE_WORDS = ["Ġsupercalifragilistic"]  # tokens no merge reaches: only ignore_merges finds them
FUZZ_ALPHABET = "aZq é東😀1٣ \t\n\r\xa0\u3000'sdtTmlLrRvVeE.,!?$+<=>^~|-_()[]{}\\/\"#%&*@`\x1c\u0301\u200d0"


def fuzz_texts(n: int = 150) -> list[str]:
    rng = random.Random(1234)
    return ["".join(rng.choice(FUZZ_ALPHABET) for _ in range(rng.randint(1, 24))) for _ in range(n)]


ALL_TEXTS = TEXTS + fuzz_texts()
GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"


def llama3_re(digits: str) -> str:
    return (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}" + digits
            + r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def hf_pre(name: str):
    """The reference pre-tokenizer for a tokenizer.ggml.pre name, in HF's own terms."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    def split(*patterns):
        return [pt.Split(Regex(p), behavior="isolated") for p in patterns] + [
            pt.ByteLevel(add_prefix_space=False, use_regex=False)]

    table = {
        "gpt-2": [pt.ByteLevel(add_prefix_space=False, use_regex=True)],  # HF's GPT-2 pre-tokenizer
        "default": split(r"[\p{P}\$\+<=>\^~\|]+", GPT2_RE, r"\p{N}+", "[0-9][0-9][0-9]"),
        "llama-bpe": split(llama3_re("{1,3}")),
        "qwen2": split(llama3_re("")),
        "smollm": [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)],
    }
    return pt.Sequence(table[name])


PRE_NAMES = ["gpt-2", "default", "llama-bpe", "qwen2", "smollm"]


@pytest.fixture(scope="module")
def trained() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A small byte-level BPE trained by HF here: its vocab (plus whole-word tokens) and merges."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import pre_tokenizers as pt

    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = pt.ByteLevel(add_prefix_space=False)
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=1500, initial_alphabet=pt.ByteLevel.alphabet(),
                                             special_tokens=SPECIALS, show_progress=False)
    hf.train_from_iterator(CORPUS * 20, trainer)
    model = json.loads(hf.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab.update((w, len(vocab) + k) for k, w in enumerate(WHOLE_WORDS))
    return vocab, [tuple(m) for m in model["merges"]]


def build_pair(trained, pre: str):
    """(HF tokenizer, ours) over the same vocab, merges and pre-tokenizer."""
    import tokenizers

    vocab, merges = trained
    llama3 = _PRE_TOKENIZERS[pre].ignore_merges
    hf = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, ignore_merges=llama3))
    hf.pre_tokenizer = hf_pre(pre)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.add_special_tokens(SPECIALS)
    tokens = sorted(vocab, key=vocab.get)
    ours = Tokenizer.from_metadata({
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [CONTROL if t in SPECIALS else NORMAL for t in tokens],
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges],
        "tokenizer.ggml.eos_token_id": vocab["<|endoftext|>"],
    })
    return hf, ours


@pytest.mark.parametrize("pre", PRE_NAMES)
def test_pre_split_matches_hf(pre):
    pytest.importorskip("tokenizers")
    reference = hf_pre(pre)
    for text in ALL_TEXTS:
        expected = [text[a:b] for _, (a, b) in reference.pre_tokenize_str(text)]
        assert _pre_split(text, _PRE_TOKENIZERS[pre].patterns) == expected, repr(text)


@pytest.mark.parametrize("pre", PRE_NAMES)
def test_bpe_encode_decode_match_hf(trained, pre):
    hf, ours = build_pair(trained, pre)
    for text in ALL_TEXTS + CORPUS:
        ids = ours.encode(text, add_bos=False)
        assert ids == hf.encode(text, add_special_tokens=False).ids, repr(text)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), repr(text)
        assert "".join(stream(ours, ids)) == ours.decode(ids)


def test_bpe_whole_word_tokens_only_with_ignore_merges(trained):
    whole = trained[0][WHOLE_WORDS[0]]
    assert whole in build_pair(trained, "llama-bpe")[1].encode(" supercalifragilistic")
    assert whole not in build_pair(trained, "gpt-2")[1].encode(" supercalifragilistic")


def test_bpe_specials_eot_and_bos(trained):
    _, ours = build_pair(trained, "qwen2")
    ids = ours.encode("<|im_start|>user<|im_end|>", parse_special=True)
    assert ids[0] == trained[0]["<|im_start|>"] and ids[-1] == trained[0]["<|im_end|>"]
    assert trained[0]["<|im_start|>"] not in ours.encode("<|im_start|>", parse_special=False)
    assert ours.eot_ids == {trained[0]["<|endoftext|>"], trained[0]["<|im_end|>"]}
    assert ours.bos_id is None and ours.encode("hi") == ours.encode("hi", add_bos=False)


def test_stream_decoder_equals_decode_on_arbitrary_bytes(trained):
    _, ours = build_pair(trained, "gpt-2")
    # the 256 one-byte tokens every byte-level vocab has; feed random, often invalid, UTF-8 through them
    alphabet = {ours.token_bytes(i): i for i in range(ours.vocab_size) if len(ours.token_bytes(i)) == 1}
    assert len(alphabet) == 256
    rng = random.Random(7)
    for _ in range(200):
        data = bytes(rng.choice(b"\xe6\x9d\xb1\xf0\x9f\x9a\x80\xc3\xa9a \xff\x80") for _ in range(rng.randint(1, 12)))
        ids = [alphabet[bytes([b])] for b in data]
        assert "".join(stream(ours, ids)) == ours.decode(ids) == data.decode("utf-8", errors="replace")


@pytest.mark.parametrize("metadata, message", [
    ({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]}, "unsupported tokenizer.ggml.model 'bert'"),
    ({"tokenizer.ggml.model": "llama"}, "no tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]}, "without tokenizer.ggml.merges"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": [],
      "tokenizer.ggml.pre": "tekken"}, "unsupported tokenizer.ggml.pre 'tekken'"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.bos_token_id": 5},
     "bos_token_id = 5 is outside"),
    ({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.scores": [0.0]},
     "scores has 1 entries for 2 tokens"),
])
def test_bad_metadata_is_named(metadata, message):
    with pytest.raises(TokenizerError, match=re.escape(message)):
        Tokenizer.from_metadata(metadata)


def test_text_no_token_spells_is_named():
    tok = Tokenizer.from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "\u2581"]})
    assert tok.encode("a a") == [1, 0, 1, 0]  # add_space_prefix defaults to true: "\u2581a\u2581a"
    with pytest.raises(TokenizerError, match="no token spells 'b'"):
        tok.encode("b")


@pytest.mark.parametrize("changes, message", [
    ({"tokenizer.ggml.tokens": np.arange(3, dtype=np.int32)}, "must be an array of strings, got an array of int32"),
    ({"tokenizer.ggml.tokens": ["a", 5]}, "tokens must be an array of strings, got an array holding int 5"),
    ({"tokenizer.ggml.tokens": "abc"}, "tokens must be an array of strings, got str 'abc'"),
    ({"tokenizer.ggml.scores": ["x", "y"]}, "scores must be an array of numbers"),
    ({"tokenizer.ggml.scores": np.zeros((2, 1))}, "scores must be an array of numbers"),
    ({"tokenizer.ggml.scores": [[1.0], [2.0, 3.0]]}, "scores must be an array of numbers"),
    ({"tokenizer.ggml.token_type": np.array([1.0, 1.0])}, "token_type must be an array of integers, got an array of f"),
    ({"tokenizer.ggml.model": 1}, "tokenizer.ggml.model must be a string, got int 1"),
    ({"tokenizer.ggml.model": np.array([1])}, "tokenizer.ggml.model must be a string, got an array of int64"),
    ({"tokenizer.ggml.bos_token_id": "0"}, "bos_token_id must be an integer, got str '0'"),
    ({"tokenizer.ggml.eos_token_id": True}, "eos_token_id must be an integer, got bool True"),
    ({"tokenizer.ggml.eos_token_id": 1.0}, "eos_token_id must be an integer, got float 1.0"),
    ({"tokenizer.ggml.add_bos_token": 1}, "add_bos_token must be a bool, got int 1"),
    ({"tokenizer.ggml.add_space_prefix": np.array([True])}, "add_space_prefix must be a bool"),
    ({"tokenizer.chat_template": ["{{ x }}"]}, "tokenizer.chat_template must be a string"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": np.array([1, 2])}, "merges must be an array of strings"),
    ({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": [], "tokenizer.ggml.pre": ["gpt2"]},
     "tokenizer.ggml.pre must be a string"),
    ({"tokenizer.ggml.token_type": [1, 6]}, "token 1 is of type byte but spelled 'b', not <0xXX>"),
])
def test_metadata_of_the_wrong_type_is_named(changes, message):
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b"], **changes}
    with pytest.raises(TokenizerError, match=re.escape(message)):
        Tokenizer.from_metadata(metadata)


def test_lone_surrogates_are_encoded_as_replacement_characters(gemma, trained):
    """A lone surrogate ("\\ud800" in JSON) has no UTF-8 form: it becomes U+FFFD, as a UTF-8 decoder
    makes of invalid input, in both vocabularies; nothing raises."""
    _, bpe = build_pair(trained, "smollm")
    for tok in (gemma, bpe):
        for text, clean in [("\ud800", "\ufffd"), ("a\udfffb", "a\ufffdb"), ("\ud83d\ude00 x", "\ufffd\ufffd x")]:
            assert tok.encode(text) == tok.encode(clean)
            assert tok.decode(tok.encode(text, add_bos=False)) == clean


ANY_TEXT = st.text(st.one_of(st.characters(codec=None), st.sampled_from("\ud800\udbff\udc00\udfff \n\u2581")),
                   max_size=40)


@pytest.fixture(scope="module")
def bpe(trained) -> Tokenizer:
    return build_pair(trained, "gpt-2")[1]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=ANY_TEXT)
def test_any_text_round_trips_with_surrogates_replaced(gemma, bpe, text):
    clean = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    for tok in (gemma, bpe):
        assert tok.decode(tok.encode(text, add_bos=False, parse_special=False)) == clean


def test_vocab_size_is_bounded(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "MAX_VOCAB", 2)
    with pytest.raises(TokenizerError, match="tokenizer.ggml.tokens holds 3 tokens, more than the 2 allowed"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["a", "b", "c"]})


ANY_METADATA_VALUE = st.one_of(
    st.none(), st.integers(-(1 << 64), 1 << 64), st.integers(-1, 6), st.floats(), st.booleans(),
    st.sampled_from(["llama", "gpt2", "gpt-2", "default", "smollm"]), st.text(max_size=6),
    st.lists(st.text(max_size=4), max_size=6), st.lists(st.integers(-10, 10), max_size=6).map(np.array),
    st.lists(st.floats(width=32), max_size=6).map(lambda v: np.array(v, np.float32)))


@settings(max_examples=300, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(sorted(_METADATA_TYPES)), ANY_METADATA_VALUE, max_size=4),
       text=ANY_TEXT)
def test_any_tokenizer_metadata_builds_or_raises_a_named_error(changes, text):
    base = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "a", "\u2581", "<0x61>", "a b"],
            "tokenizer.ggml.merges": ["a b"]}
    metadata = {k: v for k, v in {**base, **changes}.items() if v is not None}
    try:
        tok = Tokenizer.from_metadata(metadata)
        ids = tok.encode(text)
    except TokenizerError as e:
        assert "tokenizer." in str(e) or "token" in str(e)
        return
    assert all(0 <= i < tok.vocab_size for i in ids)
    tok.decode(ids + list(range(tok.vocab_size)))
