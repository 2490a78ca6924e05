"""Deterministic text: input token counts, reply generation and ``[[sim:...]]`` directives.

Input tokens are approximated per character, the way tokenizers behave on average:

* ASCII: 1 token per 4 characters;
* CJK ideographs, kana, hangul and full-width forms: 1.5 tokens per character;
* characters outside the BMP (emoji, rare CJK): 2 tokens each;
* any other character (accents, Cyrillic, symbols): 1 token each;

summed and rounded up, at least 1 for non-empty text. Characters are code points, not UTF-16
units, so an emoji counts once.

The reply is a pure function of the prompt text: a window onto a fixed token sequence starting
at an offset taken from a hash of the prompt. Every reply starts with Japanese and an emoji so
UTF-8 pass-through (and code that counts characters) is exercised by every call.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass

__all__ = ["Directives", "count_tokens", "parse_directives", "reply_tokens"]

_CJK = re.compile(
    "[\u1100-\u11ff\u2e80-\u9fff\ua960-\ua97f\uac00-\ud7ff\uf900-\ufaff\uff00-\uffef]"
)
_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def count_tokens(text: str) -> float:
    """Approximate token count of ``text`` (unrounded; callers sum parts then round up)."""
    n = len(text)
    if text.isascii():
        return n / 4
    ascii_chars = len(text.encode("ascii", "ignore"))
    cjk = len(_CJK.findall(text))
    astral = len(_ASTRAL.findall(text))
    other = n - ascii_chars - cjk - astral
    return ascii_chars / 4 + cjk * 1.5 + astral * 2 + other


def round_tokens(amount: float) -> int:
    """Round a summed estimate up to a whole count (0 only for nothing at all)."""
    return math.ceil(amount)


# Each entry is one output token. The opening tokens are fixed (Japanese + emoji); the body is a
# cycle through the vocabulary at a stride co-prime with its length, so windows differ by offset.
_OPENING = ("シミュレーター", "の", "応答", " 📚", ":")
_VOCAB = (
    " the", " manga", " volume", " is", " available", " in", " our", " store", ".",
    " おすすめ", "は", "こちら", "です", "。", " 🎌", " new", " series", " and", " classic",
    " titles", ",", " 漫画", " 新刊", " ranking", " this", " week", " 📖", " thanks", "!",
    " ご", "注文", "ありがとう", "ございます", " ✨", " shipping", " takes", " two", " days",
)  # fmt: skip
_STRIDE = 7
_BODY = tuple(_VOCAB[(i * _STRIDE) % len(_VOCAB)] for i in range(len(_VOCAB)))


# Benchmarks repeat the same prompt; caching the pure function makes their replies free.
@functools.lru_cache(maxsize=256)
def reply_tokens(prompt: str, count: int) -> tuple[str, ...]:
    """The ``count`` output tokens answering ``prompt`` (same prompt, same reply)."""
    opening = _OPENING[:count]
    remaining = count - len(opening)
    if remaining <= 0:
        return opening
    digest = hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    start = int.from_bytes(digest, "big") % len(_BODY)
    repeats = (start + remaining) // len(_BODY) + 1
    return opening + (_BODY * repeats)[start : start + remaining]


_DIRECTIVE = re.compile(r"\[\[sim:([a-z_]+)=([^\]]*)\]\]")
FAILURES = frozenset(
    {"throttle", "unavailable", "timeout", "internal", "stream_error", "stream_throttle"}
)


@dataclass(frozen=True, slots=True)
class Directives:
    """Test instructions embedded in the prompt as ``[[sim:key=value]]``."""

    output_tokens: int | None = None
    fail: str | None = None
    stream_error_after: int | None = None
    #: A tool the reply calls (``*``: the first offered); see :mod:`proxy.simulator.tools`.
    tool: str | None = None


NO_DIRECTIVES = Directives()


def parse_directives(text: str) -> Directives:
    """Parse every ``[[sim:key=value]]`` in ``text``; raises ``ValueError`` on a bad one.

    Keys: ``output_tokens=N``, ``fail=throttle|unavailable|timeout|internal|stream_error|
    stream_throttle``, ``stream_error_after=N``, ``tool=NAME|*``.
    """
    if "[[sim:" not in text:
        return NO_DIRECTIVES
    found: dict[str, str] = {}
    for match in _DIRECTIVE.finditer(text):
        found[match.group(1)] = match.group(2)
    unknown = set(found) - {"output_tokens", "fail", "stream_error_after", "tool"}
    if unknown or not found:
        raise ValueError(f"unknown simulator directive in {text[text.index('[[sim:') :][:60]!r}")
    fail = found.get("fail")
    if fail is not None and fail not in FAILURES:
        raise ValueError(f"unknown simulator failure {fail!r}; use one of {sorted(FAILURES)}")
    return Directives(
        output_tokens=_non_negative(found, "output_tokens"),
        fail=fail,
        stream_error_after=_non_negative(found, "stream_error_after"),
        tool=found.get("tool") or None,
    )


def _non_negative(found: dict[str, str], key: str) -> int | None:
    raw = found.get(key)
    if raw is None:
        return None
    if not raw.isdigit():
        raise ValueError(f"simulator directive {key} needs a non-negative integer, got {raw!r}")
    return int(raw)
