"""Tests for `tts_worker.chunking.split_text`: the chunking contract, as properties and examples.

The greedy-boundary property uses its own oracle below, written from the contract one position
at a time, so that it checks the module's regexes rather than repeating them.
"""

# Chinese examples are written with the fullwidth punctuation they really use.
# ruff: noqa: RUF001

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tts_worker.chunking import split_text

# Characters named by the contract.
ENDERS = ".!?…"
CLOSERS = "\"')]»”’"
CJK_ENDERS = "。！？"
CJK_CLOSERS = "」』”）"
CLAUSE = ",;:—"
CJK_CLAUSE = "，；、："
SPACES = " \n\t\u3000\u00a0"  # space, newline, tab, ideographic space, no-break space

PUNCTUATION = ENDERS + CLOSERS + CJK_ENDERS + CJK_CLOSERS + CLAUSE + CJK_CLAUSE
# Near-misses ride along: digits to put around full stops, a hyphen, an opening bracket.
ALPHABET = "abcXYZ019今天好我们-(" + SPACES + PUNCTUATION
TOKENS = [
    "the", "quick", "brownish", "3.14", "e.g.x", "今天天气很好", "我们", " ", "  ", "\n", "\u3000",
    ". ", "! ", "?", "...", "…", '." ', "?) ", ", ", "; ", ":", " — ", "。", "！」", "？", "，", "、",
    "；", "？！", "。。。", "?!", '!" ', "supercalifragilistic",
]  # fmt: skip

char_soup = st.text(alphabet=ALPHABET, max_size=2500)
token_text = st.lists(st.sampled_from(TOKENS), max_size=600).map("".join)
any_text = st.one_of(char_soup, token_text)


# --- Oracle: is there a boundary of each class at cut position p (text[:p] | text[p:])? ---


def _strip_closers(text: str, p: int, closers: str) -> int:
    while p > 0 and text[p - 1] in closers:
        p -= 1
    return p


def is_sentence_end(text: str, p: int) -> bool:
    at_end = p == len(text)
    i = _strip_closers(text, p, CLOSERS)
    if i > 0 and text[i - 1] in ENDERS and (at_end or text[p].isspace()):
        return True
    # CJK: no whitespace needed, but a cut must not split a run of enders or of closers.
    i = _strip_closers(text, p, CJK_CLOSERS)
    if i == 0 or text[i - 1] not in CJK_ENDERS:
        return False
    if at_end:
        return True
    return text[p] not in CJK_CLOSERS and not (i == p and text[p] in CJK_ENDERS)


def is_clause_end(text: str, p: int) -> bool:
    before = text[p - 1]
    followed_by_space = p < len(text) and text[p].isspace()
    return before in CJK_CLAUSE or (before in CLAUSE and followed_by_space)


def is_word_end(text: str, p: int) -> bool:
    return p < len(text) and text[p].isspace() and not text[p - 1].isspace()


BOUNDARY_CLASSES: list[Callable[[str, int], bool]] = [is_sentence_end, is_clause_end, is_word_end]


def expected_end(text: str, start: int, max_chars: int) -> int:
    """Where the contract says the chunk starting at `start` ends, when the rest does not fit."""
    window = range(start + 1, start + max_chars + 1)
    for is_boundary in BOUNDARY_CLASSES:
        cuts = [p for p in window if is_boundary(text, p)]
        if cuts:
            return cuts[-1]
    return start + max_chars


def assert_basic_contract(text: str, max_chars: int, chunks: list[str]) -> None:
    assert "".join(chunks) == text
    assert all(0 < len(chunk) <= max_chars for chunk in chunks)


# --- Properties ---


@given(text=any_text, max_chars=st.integers(1, 1000))
def test_lossless_bounded_and_nonempty(text: str, max_chars: int) -> None:
    assert_basic_contract(text, max_chars, split_text(text, max_chars))


@given(text=any_text, max_chars=st.integers(50, 1000))
def test_lossless_in_product_range(text: str, max_chars: int) -> None:
    assert_basic_contract(text, max_chars, split_text(text, max_chars))


@settings(max_examples=300)
@given(text=any_text, max_chars=st.integers(1, 1000) | st.integers(1, 40))
def test_each_chunk_ends_at_last_best_boundary(text: str, max_chars: int) -> None:
    chunks = split_text(text, max_chars)
    assert_basic_contract(text, max_chars, chunks)
    start = 0
    for chunk in chunks[:-1]:
        assert len(text) - start > max_chars, "a remainder that fits must be the last chunk"
        assert start + len(chunk) == expected_end(text, start, max_chars)
        start += len(chunk)


@given(text=st.text(alphabet=SPACES, max_size=300), max_chars=st.integers(1, 100))
def test_whitespace_only_text(text: str, max_chars: int) -> None:
    chunks = split_text(text, max_chars)
    assert_basic_contract(text, max_chars, chunks)
    assert all(len(chunk) == max_chars for chunk in chunks[:-1])


# --- Examples ---


def test_english_paragraph_splits_at_sentences() -> None:
    text = (
        "The quick brown fox jumps over the lazy dog. It was a bright, cold day in April. "
        "The clocks were striking thirteen. Nobody noticed."
    )
    assert split_text(text, 50) == [
        "The quick brown fox jumps over the lazy dog.",
        " It was a bright, cold day in April.",
        " The clocks were striking thirteen.",
        " Nobody noticed.",
    ]


@pytest.mark.parametrize(
    ("text", "max_chars", "expected"),
    [
        ("3.14 is pi.", 5, ["3.14", " is", " pi."]),
        ("It is 3.14 and more words", 9, ["It is", " 3.14 and", " more", " words"]),
        ("see e.g.x now", 9, ["see e.g.x", " now"]),
        ("Wait… what?! Fine", 14, ["Wait… what?!", " Fine"]),
        ('He said "Stop." Then left.', 20, ['He said "Stop."', " Then left."]),
        ("One (two.) three", 13, ["One (two.)", " three"]),
    ],
)
def test_sentence_ends(text: str, max_chars: int, expected: list[str]) -> None:
    assert split_text(text, max_chars) == expected


def test_chinese_sentences_split_after_enders() -> None:
    text = "今天天气很好。我们去公园吧！你觉得怎么样？"
    assert split_text(text, 10) == ["今天天气很好。", "我们去公园吧！", "你觉得怎么样？"]


def test_run_of_chinese_enders_is_not_split() -> None:
    assert split_text("好。真的吗？！", 6) == ["好。", "真的吗？！"]


def test_chinese_closing_quote_stays_with_its_sentence() -> None:
    assert split_text("他说：「好。」然后走了。", 8) == ["他说：「好。」", "然后走了。"]


def test_chinese_with_only_commas_splits_after_them() -> None:
    assert split_text("我们今天去公园，然后去超市，最后回家", 8) == [
        "我们今天去公园，",
        "然后去超市，",
        "最后回家",
    ]


def test_clause_ends_when_no_sentence_end_fits() -> None:
    text = "First part, second part; third — and a tail"
    assert split_text(text, 30) == ["First part, second part;", " third — and a tail"]
    assert split_text("a,b c", 4) == ["a,b", " c"]  # a comma with no space after is no clause end


def test_sentence_end_preferred_over_later_clause_and_word() -> None:
    text = "Short. Then a long clause, and more words"
    assert split_text(text, 30) == ["Short.", " Then a long clause,", " and more words"]


def test_word_boundary_keeps_whitespace_with_next_chunk() -> None:
    assert split_text("hello world  foo", 12) == ["hello world", "  foo"]


def test_long_word_gets_hard_cuts() -> None:
    assert split_text("a" * 120, 50) == ["a" * 50, "a" * 50, "a" * 20]
    assert split_text("go " + "b" * 60, 50) == ["go", " " + "b" * 49, "b" * 11]


def test_long_chinese_run_without_punctuation_gets_hard_cuts() -> None:
    text = "我" * 25
    assert split_text(text, 10) == ["我" * 10, "我" * 10, "我" * 5]


@pytest.mark.parametrize(("text", "max_chars"), [("", 1), ("", 50), ("x", 1), ("abc.", 4), ("   ", 3)])
def test_text_that_fits_is_one_chunk_or_none(text: str, max_chars: int) -> None:
    assert split_text(text, max_chars) == ([text] if text else [])


def test_whitespace_only_text_is_cut_in_pieces() -> None:
    assert split_text(" " * 7, 3) == ["   ", "   ", " "]


@pytest.mark.parametrize("max_chars", [0, -5])
def test_max_chars_below_one_is_rejected(max_chars: int) -> None:
    with pytest.raises(ValueError, match="max_chars"):
        split_text("text", max_chars)


@pytest.mark.parametrize(
    "text",
    [
        ("The quick brown fox, as ever, jumps. " * 300)[:10_000],
        ("今天天气很好，我们去公园吧。" * 800)[:10_000],
        ("!" * 999 + "x") * 10,  # long runs of enders that end in a letter
        "a" * 10_000,
    ],
    ids=["english", "chinese", "ender-runs", "one-word"],
)
@pytest.mark.parametrize("max_chars", [50, 1000])
@pytest.mark.timeout(20)  # a hang guard, not a speed test: catastrophic backtracking would take far longer
def test_ten_thousand_chars_split_without_backtracking(text: str, max_chars: int) -> None:
    pieces = split_text(text, max_chars)
    assert "".join(pieces) == text
    assert max(map(len, pieces)) <= max_chars
