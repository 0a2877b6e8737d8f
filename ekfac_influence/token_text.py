"""Each token's text as a piece of the decoded sequence, so that the pieces concatenate to it exactly.

Decoding token ids one at a time shows a character split across tokens (CJK, emoji, accents under
byte-level BPE; byte-fallback pieces under SentencePiece) as `�`, and loses the spaces a
SentencePiece decoder strips or a clean-up pass removes. Here the text of token i is instead the
characters that token i adds to the decoded sequence:

    text = decode(ids),   e_i = |longest common prefix of decode(ids[:i + 1]) and text|
    piece_i = text[e_{i-1} : e_i]   (e_{-1} = 0, e_i never moves back, the last piece runs to the end)

A character that needs several tokens belongs to the token that completes it; the tokens before hold
"" (an empty piece still carries its influence value). `"".join(pieces) == text` always holds.

The definition decodes n prefixes (O(n²) work: 0.4 s for 2,048 tokens); `token_pieces` first
computes the same pieces from short windows (each starting at the last complete token, as
text-generation servers decode a stream), which is linear, and keeps them only when they concatenate
to `text` and the text holds no literal U+FFFD (which a window could not tell from an incomplete
character); otherwise it takes the definition. Only `tokenizer.decode` is used: any
Hugging Face tokenizer, slow or fast, works.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a decoder writes for an incomplete UTF-8 sequence


def token_pieces(tokenizer, ids: list[int]) -> tuple[list[str], str]:
    """(the text of each token, the decoded sequence); the pieces concatenate to the sequence."""
    ids = [int(t) for t in ids]
    text = tokenizer.decode(ids)
    if REPLACEMENT not in text:
        pieces = incremental_pieces(tokenizer, ids)
        if "".join(pieces) == text:
            return pieces, text
    return prefix_pieces(tokenizer, ids, text), text


def prefix_pieces(tokenizer, ids: list[int], text: str | None = None) -> list[str]:
    """The definition: piece_i = text[e_{i-1}:e_i], e_i = |lcp(decode(ids[:i + 1]), text)| (O(n²))."""
    text = tokenizer.decode(ids) if text is None else text
    pieces, start = [], 0
    for i in range(len(ids)):
        end = len(text) if i == len(ids) - 1 else max(start, _common_prefix_length(tokenizer.decode(ids[: i + 1]), text))
        pieces.append(text[start:end])
        start = end
    return pieces


def incremental_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Linear: the same pieces, the prefixes decoded from a window that starts at the last complete token.

    The window's first token is context only (its text was emitted already): it keeps a space that a
    decoder strips at the start of a text (SentencePiece) out of the next piece. A window whose text
    ends in U+FFFD holds an incomplete character; the window grows until a token completes it. Only a
    token that decodes alone starts a window (SentencePiece's byte fallback decodes a run of byte
    tokens as a whole, all of it U+FFFD when it starts mid-character).
    """
    pieces, context, consumed = [], 0, 0  # the first `consumed` characters of the window's text are emitted
    for i in range(len(ids)):
        window = tokenizer.decode(ids[context : i + 1])
        complete = window.rstrip(REPLACEMENT)
        pieces.append(complete[consumed:])
        consumed = max(consumed, len(complete))
        if complete == window and i > context:  # nothing pending: token i becomes the context ...
            alone = tokenizer.decode(ids[i : i + 1])
            if REPLACEMENT not in alone:  # ... if it decodes alone (a byte-fallback run decodes as a whole)
                context, consumed = i, len(alone)
    return pieces


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
