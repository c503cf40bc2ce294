"""What the grammar mask costs per token, on both bundled vocabularies; and, with --decode, what
constrained decoding costs end to end on a backend.

    python bench/bench_grammar.py [--repeat 1]
    python bench/bench_grammar.py --decode webgpu [--tokens 96]

For each vocabulary (gemma-3's 262,144 SentencePiece tokens with byte fallback, SmolLM2's 49,152
byte-level BPE tokens) and each grammar (json_object, a small JSON schema), a realistic JSON
document is tokenized with the model's own tokenizer and forced through token by token; the time of
`allowed_tokens()` is taken before each token (which must be allowed) and the token is then
advanced. Two passes per engine: "cold" on a fresh GrammarEngine, then "warm" with a different
document of the same shape on the same engine (what a server reusing one engine per grammar sees).
The vocabulary is built once per model, as a server would: the walk of JSON's string rule it keeps
for every grammar is made by the first json_object row and reused by the schema rows.
Steps are split by where the token starts: inside a JSON string body, or between JSON tokens.

--decode BACKEND: the bundled gemma generates --tokens tokens at temperature 0.7 (seed 1) through
the scheduler, free, under json_object and under the schema, each with its mask where sampling runs
(on the GPU: applied before the device's sampler, only ids come back) and, for comparison, sampled
on the host from the logits read back (what `logprobs` makes a request do): tokens/s of each, the
median of --repeat runs on a warm engine (each grammar's engine warmed once first).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from realm_wasm.engine import Engine  # noqa: E402
from realm_wasm.gguf import read_gguf  # noqa: E402
from realm_wasm.grammar import Grammar, GrammarEngine, TokenVocabulary  # noqa: E402
from realm_wasm.model_files import chat_model_path, default_model_path  # noqa: E402
from realm_wasm.sampling import SamplingParams  # noqa: E402
from realm_wasm.scheduler import Request, Scheduler, TokenEvent  # noqa: E402
from realm_wasm.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string", "maxLength": 64},
        "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "zip": {"type": "string"}}, "required": ["city"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age"],
}
PEOPLE = [  # cold pass, warm pass
    {"name": "Ada Lovelace", "age": 36, "email": "ada@analytical.example",
     "languages": ["English", "French", "Mathematics"],
     "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"}, "active": False},
    {"name": "Grace Hopper", "age": 85, "email": "grace@navy.example", "languages": ["COBOL", "FLOW-MATIC"],
     "address": {"city": "Arlington"}, "active": True},
]
DOCUMENTS = [  # json_object: nesting, numbers, escapes and prose in strings
    {"title": "Notes on the Analytical Engine", "year": 1843, "pages": [1, 2, 3.5, -4e2],
     "summary": "The engine weaves algebraic patterns just as the Jacquard loom weaves flowers and leaves.",
     "meta": {"translated_from": "Italian (Menabrea)", "quote": "It has no pretensions to \"originate\" anything",
              "tags": ["computing", "history"], "ok": True, "missing": None}},
    {"title": "A Mathematical Theory of Communication", "year": 1948, "pages": [379, 423],
     "summary": "Information is measured in bits; a channel has a capacity that no code can exceed.",
     "meta": {"journal": "Bell System Technical Journal", "volume": 27, "tags": ["entropy", "coding"],
              "reviewed": False}},
]
GRAMMARS = {"json_object": (Grammar.json_object, DOCUMENTS),
            "schema": (lambda: Grammar.from_json_schema(SCHEMA), PEOPLE)}


def string_body_starts(text: bytes) -> np.ndarray:
    """For each byte offset: is a token starting there inside a JSON string (after its opening
    quote, before its closing one)?"""
    inside, escaped, out = False, False, np.zeros(len(text) + 1, dtype=bool)
    for i, byte in enumerate(text):
        out[i] = inside
        if escaped:
            escaped = False
        elif inside and byte == ord("\\"):
            escaped = True
        elif byte == ord('"'):
            inside = not inside
    return out


def force_through(engine: GrammarEngine, tokenizer: Tokenizer, document: object) -> tuple[np.ndarray, np.ndarray]:
    """Mask time (ms) before each token of the document, and whether the token starts in a string."""
    text = json.dumps(document, ensure_ascii=False)
    ids = tokenizer.encode(text, add_bos=False)
    in_string = string_body_starts(text.encode())
    m, offset, times, where = engine.matcher(), 0, [], []
    for token in ids:
        start = time.perf_counter()
        mask = m.allowed_tokens()
        times.append((time.perf_counter() - start) * 1e3)
        assert mask[token], f"token {token} ({tokenizer.token_bytes(token)!r}) masked at byte {offset}"
        where.append(in_string[offset])
        assert m.advance_token(token)
        offset += len(tokenizer.token_bytes(token))
    assert m.is_accepting()
    return np.array(times), np.array(where)


def stats(times: np.ndarray) -> str:
    if not len(times):
        return f"{'-':>7} {'-':>7}"
    return f"{times.mean():7.2f} {np.percentile(times, 95):7.2f}"


def decode_rate(engine: Engine, request: Request) -> tuple[float, int]:
    """Tokens/s of one request run alone through a scheduler, and how many it generated."""
    scheduler, tokens = Scheduler(engine, n_slots=1), []
    scheduler.submit(request, lambda event: isinstance(event, TokenEvent) and tokens.append(event))
    start = time.perf_counter()
    while scheduler.busy:
        scheduler.step()
    return len(tokens) / (time.perf_counter() - start), len(tokens)


def bench_decode(backend: str, tokens: int, repeat: int) -> None:
    engine = Engine.load(default_model_path(), backend=backend, n_ctx=1024, n_slots=1)
    vocab = TokenVocabulary.from_tokenizer(engine.tokenizer)
    engines = {name: GrammarEngine(make(), vocab) for name, (make, _) in GRAMMARS.items()}
    prompt = engine.tokenizer.encode("A person described as JSON, with name, age, email, languages and address:\n")
    sampling = SamplingParams(temperature=0.7, seed=1)
    print(f"# gemma on {backend} ({engine.executor.name}), {tokens} tokens at temperature 0.7, median of {repeat}")
    print("| grammar | mask applied | tok/s | tokens | vs free |")
    print("| --- | --- | ---: | ---: | ---: |")
    free = None
    for name, grammar in (("free", None), *engines.items()):
        for where, logprobs in (("by the executor", None), ("on the host (logits read back)", 0)):
            if grammar is None and logprobs is not None:
                continue
            request = Request(prompt, tokens, sampling, stop_at_eos=False, grammar=grammar, logprobs=logprobs)
            decode_rate(engine, request)  # warm: pipelines, the grammar's states
            runs = [decode_rate(engine, request) for _ in range(repeat)]
            rate, n = float(np.median([r for r, _ in runs])), runs[0][1]
            free = free or rate
            print(f"| {name} | {where if grammar else '-'} | {rate:,.0f} | {n} | {rate / free:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=1, help="cold+warm rounds per engine (fresh engine each); "
                        "with --decode, runs per row")
    parser.add_argument("--decode", metavar="BACKEND", help="constrained decoding end to end on this backend")
    parser.add_argument("--tokens", type=int, default=96, help="with --decode: tokens generated per run")
    args = parser.parse_args()
    if args.decode:
        bench_decode(args.decode, args.tokens, max(args.repeat, 3))
        return
    print(f"{'vocabulary':<10} {'grammar':<12} {'pass':<5} {'tokens':>6} | {'all ms: mean':>12} {'p95':>7} "
          f"{'max':>7} | {'string body: mean':>17} {'p95':>7} | {'other: mean':>11} {'p95':>7} | states")
    for label, path in (("gemma", default_model_path()), ("smollm2", chat_model_path())):
        tokenizer = Tokenizer.from_metadata(read_gguf(path).metadata)
        start = time.perf_counter()
        vocab = TokenVocabulary.from_tokenizer(tokenizer)
        print(f"# {label}: {vocab.size} tokens, longest {vocab.max_len} bytes, "
              f"TokenVocabulary built in {time.perf_counter() - start:.2f} s")
        for name, (make, documents) in GRAMMARS.items():
            for _ in range(args.repeat):
                engine = GrammarEngine(make(), vocab)
                for pass_name, document in zip(("cold", "warm"), documents, strict=True):
                    times, in_string = force_through(engine, tokenizer, document)
                    print(f"{label:<10} {name:<12} {pass_name:<5} {len(times):>6} | {stats(times):>20} "
                          f"{times.max():7.2f} | {stats(times[in_string]):>25} | {stats(times[~in_string]):>19} "
                          f"| {engine.n_states}")


if __name__ == "__main__":
    main()
