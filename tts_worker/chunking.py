"""Split long text into chunks a TTS engine can synthesise, cutting at natural boundaries.

Engines have an input limit and their prosody suffers when a sentence is cut in the middle, so
`split_text` fills each chunk greedily up to `max_chars` and ends it at the best boundary it can
find in that window, in this order of preference:

1. a sentence end: `.` `!` `?` `…` (a run of them, with any closing quotes or brackets) followed by
   whitespace or the end of the text, so "3.14" and "e.g.x" stay whole; or the CJK enders
   U+3002 U+FF01 U+FF1F (with their closing quotes), which need no whitespace after them;
2. a clause end: `,` `;` `:` or an em dash followed by whitespace, or the CJK comma, semicolon,
   enumeration comma and colon, which need none;
3. a word boundary: just before a run of whitespace;
4. failing all three, a hard cut at `max_chars` (one very long word, or CJK text with no
   punctuation).

The split is lossless: `"".join(split_text(t, n)) == t`. Whitespace after a cut starts the next
chunk, so the chunks map back onto the source text exactly; callers strip them before synthesis.

`text_chunks` applies it to a request: the chunks an engine speaks, stripped, silent pieces joined
to their neighbours.
"""

from __future__ import annotations

import re
import unicodedata
from bisect import bisect_right

from tts_contract.schema import TTSRequest

__all__ = ["split_text", "text_chunks"]

# Written as escapes because several of these look like ASCII punctuation in an editor.
_CLOSERS = re.escape("\"')]\u00bb\u201d\u2019")  # " ' ) ] », right double and single quotes
_CJK_ENDERS = "\u3002\uff01\uff1f"  # ideographic full stop, fullwidth ! and ?
_CJK_CLOSERS = "\u300d\u300f\u201d\uff09"  # corner brackets, right double quote, fullwidth )
_CJK_CLAUSE = "\uff0c\uff1b\u3001\uff1a"  # fullwidth , and ;, ideographic comma, fullwidth :

_SENTENCE_END = re.compile(
    # The leading lookahead only lets the engine skip ahead to candidate characters quickly.
    # The lookbehind lets a run of enders start a match only at its first character: without it
    # a long run followed by a letter would be retried from every position, which is quadratic.
    rf"(?=[.!?\u2026{_CJK_ENDERS}])"
    rf"(?:(?<![.!?\u2026])[.!?\u2026]+[{_CLOSERS}]*(?=\s|\Z)|[{_CJK_ENDERS}]+[{_CJK_CLOSERS}]*)"
)
_CLAUSE_END = re.compile(rf"[,;:\u2014](?=\s)|[{_CJK_CLAUSE}]")
# A run of non-whitespace ends just before whitespace (or at the end of the text, which is never
# a cut because the last chunk always fits).
_WORD_END = re.compile(r"\S+")
_BOUNDARIES = (_SENTENCE_END, _CLAUSE_END, _WORD_END)


def split_text(text: str, max_chars: int) -> list[str]:
    """Split text into chunks of at most max_chars characters for synthesis.

    The chunks join back to `text` exactly; none is empty, and text that fits is one chunk.
    Raises ValueError when max_chars is below 1.
    """
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    if len(text) <= max_chars:
        return [text] if text else []
    # Found once over the whole text rather than per window: whether a position is a boundary
    # can depend on characters before the window (a closing quote right after a hard cut), and
    # one pass keeps the split linear however many chunks there are.
    boundaries = [_boundary_ends(pattern, text) for pattern in _BOUNDARIES]
    chunks: list[str] = []
    start = 0
    while len(text) - start > max_chars:
        end = _cut(boundaries, start, start + max_chars)
        chunks.append(text[start:end])
        start = end
    chunks.append(text[start:])
    return chunks


def _boundary_ends(pattern: re.Pattern[str], text: str) -> list[int]:
    """Every position where a match of `pattern` ends, ascending: the cuts of one class."""
    return [match.end() for match in pattern.finditer(text)]


def _cut(boundaries: list[list[int]], start: int, limit: int) -> int:
    """Where the chunk from `start` ends: the last cut of the best class in (start, limit].

    A cut at `start` itself would make an empty chunk, so it does not count; with no cut of
    any class in the window the chunk is cut hard at `limit`.
    """
    for ends in boundaries:
        i = bisect_right(ends, limit)
        if i and ends[i - 1] > start:
            return ends[i - 1]
    return limit


def text_chunks(request: TTSRequest) -> list[str]:
    """The pieces of the request's text the engine speaks one by one, stripped, none empty.

    A piece of punctuation alone ("...", "—", a closing bracket cut off by the size limit) makes
    no sound in any engine (Piper returns nothing, IndexTTS2 fails), so it joins its neighbour
    instead of failing the job, as long as the chunk stays within `max_chars_per_chunk`; past it,
    the silent piece is left out (`"! " * 5000` made one chunk of 10,000 characters).
    """
    if not request.enable_chunking:
        return [request.text.strip()]
    limit = request.max_chars_per_chunk
    chunks: list[str] = []
    for piece in split_text(request.text, limit):
        if not chunks or (_speakable(piece) and _speakable(chunks[-1])):
            chunks.append(piece)
        elif len(chunks[-1]) + len(piece) <= limit:
            chunks[-1] += piece
        elif _speakable(piece):  # the chunk before is silent and full: the piece takes its place
            chunks[-1] = piece
    return [chunk.strip() for chunk in chunks if chunk.strip()]


def _speakable(text: str) -> bool:
    """Whether `text` holds anything but punctuation and white space (letters, digits, symbols)."""
    return any(not (char.isspace() or unicodedata.category(char).startswith("P")) for char in text)
