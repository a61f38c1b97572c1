"""Split long input into pieces at sentence boundaries, so each is synthesised (and streamed) in turn."""

from __future__ import annotations

import re

# A sentence runs to . ! ? … (plus closing quotes or brackets) before a space or the end, or to a
# CJK full stop, which needs no space after it.
_SENTENCE = re.compile(r"\S.*?(?:[.!?…]+[\"'”’)\]]*(?=\s|$)|[。！？；]+[”’」』）]*|$)", re.S)
_CLAUSE = re.compile(r"[^,;:，、：]+[,;:，、：]*")
_WORD = re.compile(r"\S+")


def split_text(text: str, max_chars: int = 300) -> list[str]:
    """Sentences of ``text``, in order, none longer than ``max_chars``.

    Short sentences are joined up to ``max_chars`` (fewer, longer pieces sound more natural);
    an overlong sentence is cut at clause marks, then between words, then anywhere.
    """
    sentences = [s.strip() for s in _SENTENCE.findall(text)]
    return _pack([part for s in sentences if s for part in _fit(s, max_chars)], max_chars)


def _fit(sentence: str, max_chars: int) -> list[str]:
    if len(sentence) <= max_chars:
        return [sentence]
    for pattern in (_CLAUSE, _WORD):
        parts = [p.strip() for p in pattern.findall(sentence) if p.strip()]
        if len(parts) > 1:
            return _pack([piece for part in parts for piece in _fit(part, max_chars)], max_chars)
    return [sentence[i : i + max_chars] for i in range(0, len(sentence), max_chars)]


def _pack(parts: list[str], max_chars: int) -> list[str]:
    packed: list[str] = []
    for part in parts:
        if packed and len(packed[-1]) + 1 + len(part) <= max_chars:
            packed[-1] += " " + part
        else:
            packed.append(part)
    return packed
