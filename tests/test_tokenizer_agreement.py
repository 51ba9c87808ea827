"""The target's Hugging Face tokenizer and llama.cpp's tokenizer of the drafter GGUF give the same ids.

Speculative decoding needs the drafter and the target to share one vocabulary *and* one
tokenization: the cloud tokenizes prompts with ``tokenizers`` (models/target/tokenizer.json), the
edge with llama.cpp (models/SmolLM2-135M-Instruct.Q4_1.gguf). Both must agree on every text,
including chat-template special tokens, and llama.cpp's detokenizer must round-trip them.
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_JSON = REPO / "models" / "target" / "tokenizer.json"
GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_HINT = "python tools/build_models.py"


def _require(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; build the shipped models with `{BUILD_HINT}`")
    return path


TEXTS = [
    # plain prose
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "What is the capital of France?",
    "It's a dog's life, isn't it? They'll say we'd've known.",
    "ALL CAPS SHOUTING AND MiXeD cAsE",
    # whitespace
    "two  spaces and   three and          ten",
    "\ttab\tseparated\tvalues\t",
    "line one\nline two\n\nline four\n",
    "windows\r\nline\r\nendings\r\n",
    "   \n\t \r\n  \t\t\n",
    "\n\n\n\n",
    "\u00a0non-breaking\u00a0space and\u2009thin\u2003em",
    # code
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC;",
    '{"key": [1, 2.5, -3e10, null, true], "nested": {"a": "b"}}',
    "<div class=\"x\">&amp; &lt;tag&gt;</div>",
    "x=>x.map(y=>y*2).filter(Boolean)//comment",
    "if __name__ == '__main__':\n\tmain()\r\n",
    # numbers
    "1234567890",
    "3.14159265358979 2.71828 -0.0001 1e-9 0x1F 0b1011",
    "Call 555-123-4567 on 2024-01-31 at 23:59:59.",
    "$1,000,000.00 and 50% off and 1/2 cup",
    # URLs, paths, identifiers
    "https://example.com/path/to/page?query=1&lang=en#section-2",
    "user.name+tag@example.co.uk",
    "C:\\Users\\Admin\\Documents\\file_v2.final.txt",
    "snake_case_identifier camelCaseIdentifier PascalCase kebab-case SCREAMING_CASE",
    # very long words and runs
    "Pneumonoultramicroscopicsilicovolcanoconiosis",
    "a" * 300,
    "ab" * 150 + "!" * 40,
    "supercalifragilisticexpialidocious" * 8,
    "=" * 80 + "\n" + "-" * 80,
    # accented, other scripts, emoji
    "café naïve résumé Zürich Ångström señor façade",
    "e\u0301 combining acute vs é precomposed",
    "Привет, мир! Ελληνικά γράμματα.",
    "日本語のテキストと中文文本，还有한국어 문장。",
    "مرحبا بالعالم — שלום עולם",
    "नमस्ते दुनिया, ภาษาไทย",
    "emoji 😀🎉🚀 flags 🇫🇷🇯🇵 family 👨‍👩‍👧‍👦 skin 👍🏽",
    "math ∑∫∂√∞ ≠ ≤ ≥ ± × ÷ → ⇒ ∀x∃y",
    # chat-template strings and special tokens
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n",
    "<|im_end|><|im_start|><|endoftext|><|im_end|>",
    "text<|im_end|>glued<|im_start|>together",
    "not special: <|im_start <im_start|> < |im_end| > <|im_stop|>",
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(_require(TOKENIZER_JSON)))


@pytest.fixture(scope="module")
def llama():
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(_require(GGUF)), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def test_enough_varied_texts():
    assert len(TEXTS) >= 48 and len(set(TEXTS)) == len(TEXTS)


def test_same_vocabulary_size(hf_tokenizer, llama):
    assert hf_tokenizer.get_vocab_size(with_added_tokens=True) == llama.n_vocab()


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_agrees(hf_tokenizer, llama, text):
    hf_ids = hf_tokenizer.encode(text, add_special_tokens=False).ids
    cpp_ids = llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    assert hf_ids == cpp_ids


def _cpp_detokenize(llm, ids: list[int]) -> bytes:
    """llama.cpp's own detokenizer, piece by piece with a buffer as large as each piece needs.

    (``Llama.detokenize`` in llama-cpp-python uses a fixed 32-byte buffer and silently drops any
    longer piece: see ``test_llama_cpp_python_detokenize_drops_long_pieces``.)
    """
    import ctypes

    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    out, size = b"", 64
    buf = ctypes.create_string_buffer(size)
    for t in ids:
        n = llama_cpp.llama_token_to_piece(vocab, t, buf, size, 0, True)
        if n < 0:  # -n bytes needed
            size = -n
            buf = ctypes.create_string_buffer(size)
            n = llama_cpp.llama_token_to_piece(vocab, t, buf, size, 0, True)
        out += buf.raw[:n]
    return out


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_detokenize_round_trips(hf_tokenizer, llama, text):
    ids = hf_tokenizer.encode(text, add_special_tokens=False).ids
    assert _cpp_detokenize(llama, ids).decode("utf-8") == text
    assert hf_tokenizer.decode(ids, skip_special_tokens=False) == text
    if max((len(t.encode()) for t in hf_tokenizer.encode(text, add_special_tokens=False).tokens), default=0) <= 32:
        # pieces of at most 32 bytes: llama-cpp-python's Llama.detokenize is right too
        assert llama.detokenize(ids, special=True).decode("utf-8") == text


LONG_PIECES = ["=" * 80, "\n" + " " * 80 + "return x", "#" * 80, "a" * 300]


def test_llama_cpp_python_detokenize_drops_long_pieces(hf_tokenizer, llama):
    """Upstream bug (llama-cpp-python 0.3.x): ``Llama.detokenize`` loses pieces longer than 32 bytes.

    This vocabulary has such pieces (runs of '=', '#', '-', newline + indentation). Anything that
    turns drafter ids back into text must not use ``Llama.detokenize`` as is.
    """
    long_ids = [i for text in LONG_PIECES for i in hf_tokenizer.encode(text, add_special_tokens=False).ids
                if len(_cpp_detokenize(llama, [i])) > 32]
    assert long_ids, "the vocabulary has pieces longer than 32 bytes"
    for i in long_ids:
        assert llama.detokenize([i], special=True) in (b"", _cpp_detokenize(llama, [i]))


def test_drafter_detokenize_round_trips_long_pieces(hf_tokenizer):
    from wisp_edge.drafters.llama_cpp import LlamaCppDrafter

    drafter = LlamaCppDrafter(GGUF, n_ctx=64, n_threads=1)
    try:
        for text in LONG_PIECES:
            ids = hf_tokenizer.encode(text, add_special_tokens=False).ids
            assert drafter.tokenize(text) == ids
            assert drafter.detokenize(ids) == text
    finally:
        drafter.close()


def test_special_tokens_are_single_ids(hf_tokenizer, llama):
    for tok in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        tid = hf_tokenizer.token_to_id(tok)
        assert tid is not None
        assert llama.tokenize(tok.encode(), add_bos=False, special=True) == [tid]
    assert hf_tokenizer.token_to_id("<|im_start|>") == 1 and hf_tokenizer.token_to_id("<|im_end|>") == 2
