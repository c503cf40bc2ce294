"""The chat model's byte-level BPE tokenizer (SmolLM2, `tokenizer.ggml.pre = smollm`) against
llama.cpp's ids: its tokenizer cases, every golden prompt (ChatML ones included), and the golden
generations decoded whole and streamed. (gemma's SentencePiece-style cases: test_tokenizer.py.)"""

from __future__ import annotations

import pytest
from golden import load_cases, load_tokenizer_cases

from realm_wasm.chat_template import ChatTemplate
from realm_wasm.gguf import read_gguf
from realm_wasm.model_files import chat_model_path
from realm_wasm.tokenizer import StreamDecoder, Tokenizer

MODEL = "smollm2-135m-instruct-q4_1"
TOKENIZER_CASES = load_tokenizer_cases(MODEL)
CASES = load_cases(MODEL)


@pytest.fixture(scope="module")
def metadata() -> dict:
    return read_gguf(chat_model_path()).metadata


@pytest.fixture(scope="module")
def smollm(metadata) -> Tokenizer:
    return Tokenizer.from_metadata(metadata)


@pytest.mark.parametrize("case", TOKENIZER_CASES, ids=[repr(c["text"])[:30] for c in TOKENIZER_CASES])
def test_ids_match_llama_cpp(smollm, case):
    ids = smollm.encode(case["text"], add_bos=False)
    assert ids == case["ids_no_bos"]
    assert smollm.decode(ids) == case["text"]  # byte-level BPE: every text comes back exactly


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_golden_prompts_and_generations(smollm, case):
    assert smollm.encode(case.prompt) == case.token_ids  # no BOS added: the metadata says so
    assert smollm.decode(case.greedy_ids) == case.greedy_text
    decoder = StreamDecoder(smollm)
    assert "".join([decoder.feed(i) for i in case.greedy_ids] + [decoder.flush()]) == case.greedy_text


def test_special_tokens(smollm):
    assert (smollm.bos_id, smollm.eos_id, smollm.vocab_size) == (1, 2, 49152)
    assert smollm.tokens[1:3] == ["<|im_start|>", "<|im_end|>"]
    assert smollm.eot_ids == {0, 2}  # <|endoftext|> and <|im_end|> both end a turn


def test_chat_template_renders_the_golden_chatml_prompts(smollm, metadata):
    """The model's own template (the page and the server render with it) gives llama.cpp's ChatML
    prompts for the golden conversations, token for token."""
    template = ChatTemplate.from_metadata(smollm, metadata)
    assert template.source == "gguf"
    chats = [c for c in CASES if c.name.startswith("chat_")]
    assert chats
    for case in chats:
        # the golden prompts are "<|im_start|>role\ncontent<|im_end|>\n" turns and an open assistant turn
        turns = case.prompt.removesuffix("<|im_start|>assistant\n").split("<|im_end|>\n")
        messages = [dict(zip(("role", "content"), t.removeprefix("<|im_start|>").split("\n", 1), strict=True))
                    for t in turns if t]
        prompt = template.render(messages)
        assert prompt.text == case.prompt
        assert smollm.encode(prompt.text, add_bos=prompt.add_bos) == case.token_ids
