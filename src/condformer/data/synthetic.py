"""Synthetic diagnostic corpora, generated on the fly (deterministic, no files, no download).

``synthetic:mixed-difficulty`` mixes trivially predictable spans with unpredictable and "hard but
computable" ones, and every character's *class* can be recovered from the text alone (:func:`classify`).
That lets a report measure where a conditional-computation model spends its compute (routed fraction,
experts, exit depth) per class: a model that routes intelligently should spend little on repeats and copies
and much on sum results, while no amount of compute helps on noise.

Format
------
A document is a sequence of lines, each one *record* ``K:BODY\\n`` whose kind ``K`` is one uppercase letter:

* ``R:abcabcab``: repeat. A pattern of 2-5 *distinct* lowercase letters repeated (and cut) to 20-60
  characters. Distinct letters make the first period exactly the part before the first letter recurs, so
  every prefix of the body reveals the period it has seen, even when a window cuts the line short.
* ``C:qwerty|qwerty``: copy. 8-24 random lowercase letters, ``|``, then the same letters again.
* ``S:123+45=168``: sum. Two numbers of 1-6 digits (uniform digit count, no leading zeros) and their sum.
* ``N:x9k2m0``: noise. 8-40 random lowercase letters and digits.

A line is a sum with probability 2/5 and each other kind with 1/5: sum lines are the shortest, and
``sum_result`` is the class a report most needs enough characters of (about 6% rather than 4%).

Only lowercase letters and digits are *content*; everything else (the kind letter, ``:``, ``|``, ``+``,
``=``, ``\\n``) is *format* and appears nowhere else, so a character's formatness is a function of the
character alone, and an uppercase letter always starts a line.

Documents start at a line start and end with ``\\n``, so the token stream's concatenation of documents (the
tokenizer's end-of-document token decodes to nothing) still splits into whole lines.

Classes
-------
:data:`CLASSES`, in a fixed order so reports can index counts by class id:

* ``format``: the format characters above (a mix: ``:`` is certain, a kind letter or ``|`` position is not).
* ``repeat_first`` / ``repeat``: a repeat's first period (random) / the rest (trivially predictable).
* ``copy_source`` / ``copy``: the letters before ``|`` (random) / after it (predictable given attention).
* ``sum_operand`` / ``sum_result``: digits before ``=`` (random) / after it (computable, but hard).
* ``noise``: noise content (unlearnable).
* ``unknown``: content whose line cannot be identified from the text (see :func:`classify`).
"""

from __future__ import annotations

import hashlib
import random
import string
from collections.abc import Callable

from condformer.data.document import Document
from condformer.errors import DataError

__all__ = [
    "CLASSES",
    "DEFAULT_DOCS",
    "LINES_PER_DOC",
    "SYNTHETIC_CORPORA",
    "class_names",
    "classify",
    "make_documents",
    "synthetic_documents",
]

CLASSES: tuple[str, ...] = (
    "format",
    "repeat_first",
    "repeat",
    "copy_source",
    "copy",
    "sum_operand",
    "sum_result",
    "noise",
    "unknown",
)
"""Character classes in a fixed order; :func:`classify` returns indices into this tuple."""

DEFAULT_DOCS = 1000
"""About 2.8 MB: a few hundred steps of 16x256 byte tokens (about 1 MB per 256 steps) see little repetition."""

LINES_PER_DOC = 100
"""Documents of about 3 KB: many 256-token windows per document, and enough documents for a hash split."""

(_FORMAT, _REPEAT_FIRST, _REPEAT, _COPY_SOURCE, _COPY, _SUM_OPERAND, _SUM_RESULT, _NOISE, _UNKNOWN) = range(
    len(CLASSES)
)

_LETTERS = string.ascii_lowercase
_NOISE_ALPHABET = string.ascii_lowercase + string.digits
_CONTENT = frozenset(_NOISE_ALPHABET)
_KIND_DRAW = "RCSSN"
"""A line's kind is a uniform draw from this string: sums twice as often as each other kind."""
_COPY_SEP, _SUM_PLUS, _SUM_EQUALS = "|", "+", "="


# ---------------------------------------------------------------------------------------------- generating


def _repeat_body(rng: random.Random) -> str:
    """A pattern of distinct letters cut to length; a partial Fisher-Yates on randrange, not random.sample,
    so the draw rests only on primitives whose output Python keeps stable across versions."""
    letters = list(_LETTERS)
    period = rng.randint(2, 5)
    for i in range(period):
        j = rng.randrange(i, len(letters))
        letters[i], letters[j] = letters[j], letters[i]
    length = rng.randint(20, 60)
    return ("".join(letters[:period]) * (length // period + 1))[:length]


def _random_text(rng: random.Random, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.choices(alphabet, k=rng.randint(low, high)))


def _number(rng: random.Random) -> int:
    """A number with a uniformly drawn digit count, so long and short operands are equally common."""
    digits = rng.randint(1, 6)
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def _record(rng: random.Random) -> str:
    kind = _KIND_DRAW[rng.randrange(len(_KIND_DRAW))]
    if kind == "R":
        body = _repeat_body(rng)
    elif kind == "C":
        source = _random_text(rng, _LETTERS, 8, 24)
        body = f"{source}{_COPY_SEP}{source}"
    elif kind == "S":
        a, b = _number(rng), _number(rng)
        body = f"{a}{_SUM_PLUS}{b}{_SUM_EQUALS}{a + b}"
    else:
        body = _random_text(rng, _NOISE_ALPHABET, 8, 40)
    return f"{kind}:{body}\n"


def _document_rng(name: str, seed: int, index: int) -> random.Random:
    """One generator per document, seeded from (name, seed, index) through sha256.

    Document ``i`` is then the same whatever the number of documents asked for (a smaller corpus is a
    prefix of a larger one), and nothing depends on Python's per-process string hash seed.
    """
    key = hashlib.sha256(f"{name}\0{seed}\0{index}".encode()).digest()
    return random.Random(int.from_bytes(key[:8], "big"))


def _mixed_difficulty_text(rng: random.Random) -> str:
    return "".join(_record(rng) for _ in range(LINES_PER_DOC))


SYNTHETIC_CORPORA: dict[str, Callable[[random.Random], str]] = {"mixed-difficulty": _mixed_difficulty_text}
"""Known synthetic corpus names and the function that writes one document from its generator."""


def make_documents(name: str = "mixed-difficulty", n_docs: int = DEFAULT_DOCS, seed: int = 0) -> list[Document]:
    """Generate ``n_docs`` documents of the synthetic corpus ``name``, named ``synthetic:NAME#i``.

    The output is a pure function of the arguments: the same on every machine and Python version.
    """
    if name not in SYNTHETIC_CORPORA:
        raise DataError(f"unknown synthetic corpus {name!r}; known: {', '.join(sorted(SYNTHETIC_CORPORA))}")
    if isinstance(n_docs, bool) or not isinstance(n_docs, int) or n_docs < 1:
        raise DataError(f"a synthetic corpus needs at least 1 document, got {n_docs!r}")
    write = SYNTHETIC_CORPORA[name]
    return [Document(f"synthetic:{name}#{i}", write(_document_rng(name, seed, i))) for i in range(n_docs)]


def synthetic_documents(spec: str, max_docs: int | None = None) -> list[Document]:
    """The documents named by ``synthetic:NAME`` or ``synthetic:NAME:N_DOCS`` (at most ``max_docs``)."""
    parts = spec.split(":")
    known = ", ".join(f"synthetic:{name}" for name in sorted(SYNTHETIC_CORPORA))
    if len(parts) not in (2, 3) or parts[1] not in SYNTHETIC_CORPORA:
        raise DataError(f"unknown synthetic corpus spec {spec!r}; known: {known} (optionally :N_DOCS)")
    n_docs = DEFAULT_DOCS
    if len(parts) == 3:
        count = parts[2]
        if not (count.isascii() and count.isdigit()) or int(count) < 1:
            raise DataError(f"bad document count in {spec!r}; use synthetic:{parts[1]}:N with N >= 1")
        n_docs = int(count)
    if max_docs is not None:
        n_docs = min(n_docs, max_docs)
    return make_documents(parts[1], n_docs)


# --------------------------------------------------------------------------------------------- classifying


def _smallest_period(body: str) -> int:
    """The smallest p with ``body[i] == body[i - p]`` for all i >= p (Knuth-Morris-Pratt border table)."""
    border = [0] * len(body)
    k = 0
    for i in range(1, len(body)):
        while k and body[i] != body[k]:
            k = border[k - 1]
        if body[i] == body[k]:
            k += 1
        border[i] = k
    return len(body) - (border[-1] if body else 0)


def _split_at(chars: str, sep: str, before: int, after: int) -> list[int]:
    """Content before the first ``sep`` is ``before``, content after it ``after``; format stays format."""
    out, cls = [], before
    for ch in chars:
        if ch == sep:
            cls = after
        out.append(cls if ch in _CONTENT else _FORMAT)
    return out


def _classify_line(line: str) -> list[int]:
    """Classes of one line that starts at a line start (it may be cut short, and its ``\\n`` is optional)."""
    kind = line[0]
    if kind == "C":
        return _split_at(line, _COPY_SEP, _COPY_SOURCE, _COPY)
    if kind == "S":
        return _split_at(line, _SUM_EQUALS, _SUM_OPERAND, _SUM_RESULT)
    if kind == "R":
        period = _smallest_period("".join(ch for ch in line if ch in _CONTENT))
        out, seen = [], 0
        for ch in line:
            if ch in _CONTENT:
                out.append(_REPEAT_FIRST if seen < period else _REPEAT)
                seen += 1
            else:
                out.append(_FORMAT)
        return out
    content = _NOISE if kind == "N" else _UNKNOWN
    return [content if ch in _CONTENT else _FORMAT for ch in line]


def _classify_fragment(fragment: str) -> list[int]:
    """Classes of a line whose start is not in the text: only a separator identifies its kind.

    ``|`` occurs only in copies and ``+``/``=`` only in sums, so a fragment holding one is classified exactly
    (a sum fragment without ``=`` is all operand, since ``=`` comes last). Any other fragment (part of a
    repeat, a copy's second half, a sum's result digits or noise, all only letters or digits) is ``unknown``.
    """
    if _COPY_SEP in fragment:
        return _split_at(fragment, _COPY_SEP, _COPY_SOURCE, _COPY)
    if _SUM_PLUS in fragment or _SUM_EQUALS in fragment:
        return _split_at(fragment, _SUM_EQUALS, _SUM_OPERAND, _SUM_RESULT)
    return [_UNKNOWN if ch in _CONTENT else _FORMAT for ch in fragment]


def _lines(text: str) -> list[str]:
    """The non-empty lines of ``text``, each with its ``\\n`` (the last may lack it).

    Only ``\\n`` ends a line here: :meth:`str.splitlines` also splits at characters such as ``\\x1c`` and
    would start a "line" (and read a kind letter) where the corpus has none.
    """
    pieces = text.split("\n")
    lines = [piece + "\n" for piece in pieces[:-1]]
    return lines + [pieces[-1]] if pieces[-1] else lines


def classify(text: str) -> list[int]:
    """The class (an index into :data:`CLASSES`) of every character of a text cut from this corpus.

    ``text`` may be a whole document or any window of one (or of documents concatenated): it may start and
    end mid-line. A line cut at its end is classified as the whole line would be (a repeat's period shows in
    any prefix of it). The text starts a line exactly when its first character is an uppercase kind letter;
    otherwise its leading partial line, up to its ``\\n``, lacks the kind letter and is classified by
    :func:`_classify_fragment`: exactly when it holds a separator, else its content is ``unknown``. Lines with
    an unrecognised kind letter also have ``unknown`` content. Format characters are always ``format``.
    A pure function of ``text``; characters outside the corpus alphabet count as format.
    """
    out: list[int] = []
    for i, line in enumerate(_lines(text)):
        if i == 0 and line[0] not in string.ascii_uppercase:
            out.extend(_classify_fragment(line))
        else:
            out.extend(_classify_line(line))
    return out


def class_names(text: str) -> list[str]:
    """:func:`classify` as class names, for reading and debugging."""
    return [CLASSES[i] for i in classify(text)]
