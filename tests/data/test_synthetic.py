"""The synthetic mixed-difficulty corpus: determinism, record semantics, character classes, corpus specs.

Records are parsed here with regular expressions and expected classes are rebuilt from that parse, so the
checks do not reuse the implementation's own line handling.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from condformer.data import Document, load_corpus, prepare_data
from condformer.data.synthetic import CLASSES, class_names, classify, make_documents
from condformer.errors import DataError
from helpers import one_line_error

SPEC = "synthetic:mixed-difficulty"
RECORD = re.compile(
    r"R:(?P<repeat>[a-z]+)\n|C:(?P<source>[a-z]+)\|(?P<copy>[a-z]+)\n"
    r"|S:(?P<a>[0-9]+)\+(?P<b>[0-9]+)=(?P<c>[0-9]+)\n|N:(?P<noise>[a-z0-9]+)\n"
)
CONTENT = set("abcdefghijklmnopqrstuvwxyz0123456789")
GOLDEN_SHA256 = "189b71d292375b1757a0de11a98a96db244cd687c8446acbbd57a56a6a6c9bc8"
"""sha256 of the first three default documents: pins the output across machines and Python versions."""


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDFORMER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def docs() -> list[Document]:
    return make_documents()


def records(text: str) -> list[re.Match[str]]:
    """Every line of ``text`` as a record match; fails unless the records tile the text exactly."""
    matches, pos = [], 0
    while pos < len(text):
        match = RECORD.match(text, pos)
        assert match, f"not a record at {pos}: {text[pos:pos + 40]!r}"
        matches.append(match)
        pos = match.end()
    return matches


def brute_period(body: str) -> int:
    """The smallest p such that ``body`` is its first p characters repeated (and cut), by trying every p."""
    return next(p for p in range(1, len(body) + 1) if (body[:p] * len(body))[: len(body)] == body)


def expected_classes(text: str) -> list[str]:
    """Class names of a whole document, rebuilt from the regex parse of its records."""
    out: list[str] = []
    for m in records(text):
        if m["repeat"]:
            p = brute_period(m["repeat"])
            out += ["format"] * 2 + ["repeat_first"] * p + ["repeat"] * (len(m["repeat"]) - p)
        elif m["source"]:
            out += ["format"] * 2 + ["copy_source"] * len(m["source"]) + ["format"] + ["copy"] * len(m["copy"])
        elif m["a"]:
            out += ["format"] * 2 + ["sum_operand"] * len(m["a"]) + ["format"] + ["sum_operand"] * len(m["b"])
            out += ["format"] + ["sum_result"] * len(m["c"])
        else:
            out += ["format"] * 2 + ["noise"] * len(m["noise"])
        out.append("format")
    return out


def expected_window(doc: str, whole: list[str], start: int, end: int) -> list[str]:
    """The rule for a window: exact unless it starts mid-line; then that leading partial line keeps its
    classes only when it shows its line's separator (``|`` of a copy, ``+`` or ``=`` of a sum), and its
    content is otherwise ``unknown`` (format characters stay ``format``)."""
    expected = whole[start:end]
    if start == 0 or doc[start - 1] == "\n":
        return expected
    newline = doc.find("\n", start, end)
    frag_end = end if newline < 0 else newline + 1
    fragment = doc[start:frag_end]
    kind = doc[doc.rfind("\n", 0, start) + 1]  # the kind letter that starts the line holding ``start``
    shown = (kind == "C" and "|" in fragment) or (kind == "S" and ("+" in fragment or "=" in fragment))
    if not shown:
        for i, ch in enumerate(fragment):
            if ch in CONTENT:
                expected[i] = "unknown"
    return expected


# ------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_documents_and_other_seed_differs(docs: list[Document]) -> None:
    assert make_documents(n_docs=20) == docs[:20]  # a smaller corpus is a prefix of a larger one
    again = make_documents(n_docs=20, seed=0)
    assert again == docs[:20]
    other = make_documents(n_docs=20, seed=1)
    assert [d.path for d in other] == [d.path for d in again]
    assert all(a.text != b.text for a, b in zip(other, again, strict=True))
    assert len({d.text for d in docs}) == len(docs)


def test_output_is_pinned() -> None:
    text = "".join(doc.text for doc in make_documents(n_docs=3))
    assert hashlib.sha256(text.encode()).hexdigest() == GOLDEN_SHA256


def test_default_size_and_paths(docs: list[Document]) -> None:
    assert [d.path for d in docs] == [f"{SPEC}#{i}" for i in range(len(docs))]
    total = sum(len(d.text) for d in docs)
    assert 2_000_000 <= total <= 4_000_000, total


# ------------------------------------------------------------------------------------- record semantics


def test_every_record_is_well_formed_and_correct(docs: list[Document]) -> None:
    kinds: Counter[str] = Counter()
    for doc in docs:
        assert doc.text.isascii() and doc.text.endswith("\n")
        for m in records(doc.text):
            kinds[m.group()[0]] += 1
            if m["repeat"]:
                body = m["repeat"]
                p = brute_period(body)
                assert 2 <= p <= 5 and len(set(body[:p])) == p, body
                assert 20 <= len(body) <= 60 and body == (body[:p] * 60)[: len(body)]
            elif m["source"]:
                assert m["copy"] == m["source"] and 8 <= len(m["source"]) <= 24
            elif m["a"]:
                a, b, c = m["a"], m["b"], m["c"]
                assert int(c) == int(a) + int(b), m.group()
                for number in (a, b, c):
                    assert number == str(int(number)), number  # no leading zeros
                assert len(a) <= 6 and len(b) <= 6
            else:
                assert 8 <= len(m["noise"]) <= 40
    n = sum(kinds.values())
    assert set(kinds) == set("RCSN")
    assert 0.38 < kinds["S"] / n < 0.42, kinds  # sums are drawn 2 in 5
    for kind in "RCN":
        assert 0.18 < kinds[kind] / n < 0.22, kinds


# ------------------------------------------------------------------------------------- classes, whole docs


def test_classify_whole_documents_matches_an_independent_parse(docs: list[Document]) -> None:
    for doc in docs[:100]:
        names = class_names(doc.text)
        assert names == expected_classes(doc.text)
        assert [CLASSES[i] for i in classify(doc.text)] == names
        for ch, name in zip(doc.text, names, strict=True):
            assert (name == "format") == (ch not in CONTENT), (ch, name)
        parsed = records(doc.text)
        counts = Counter(names)
        assert counts["sum_result"] == sum(len(m["c"]) for m in parsed if m["c"])
        assert counts["copy"] == counts["copy_source"] == sum(len(m["copy"]) for m in parsed if m["copy"])
        assert counts["format"] == sum(not ch.isalnum() or ch.isupper() for ch in doc.text)
        assert counts["unknown"] == 0


def test_classify_small_examples() -> None:
    assert class_names("R:abcab\n") == ["format"] * 2 + ["repeat_first"] * 3 + ["repeat"] * 2 + ["format"]
    assert class_names("R:ab") == ["format"] * 2 + ["repeat_first"] * 2  # cut before its second period
    assert class_names("C:ab|ab") == ["format"] * 2 + ["copy_source"] * 2 + ["format"] + ["copy"] * 2
    assert class_names("S:9+1=10") == ["format"] * 2 + ["sum_operand", "format", "sum_operand", "format"] + [
        "sum_result"
    ] * 2
    assert class_names("b|ab\nN:x1\n") == ["copy_source", "format", "copy", "copy", "format"] + [
        "format",
        "format",
        "noise",
        "noise",
        "format",
    ]
    assert class_names("1=10\n") == ["sum_operand", "format", "sum_result", "sum_result", "format"]
    assert class_names("bcab\nX:q\n") == ["unknown"] * 4 + ["format"] * 3 + ["unknown", "format"]
    assert class_names(":ab") == ["format", "unknown", "unknown"]
    assert classify("") == [] and class_names("\n\n") == ["format", "format"]
    assert class_names("N:a\x1cb") == ["format", "format", "noise", "format", "noise"]


# ---------------------------------------------------------------------------------------- classes, windows


def test_classify_random_windows_matches_the_whole_document(docs: list[Document]) -> None:
    rng = random.Random(1234)
    checked = Counter()
    for doc in docs[:20]:
        whole = class_names(doc.text)
        starts = list(range(150)) + [rng.randrange(len(doc.text)) for _ in range(30)]  # every offset of lines 1-3+
        for start in starts:
            for end in (start + 1, start + rng.randint(2, 80), start + rng.randint(80, 400), len(doc.text)):
                end = min(end, len(doc.text))
                expected = expected_window(doc.text, whole, start, end)
                assert class_names(doc.text[start:end]) == expected, (doc.path, start, end)
                checked["unknown" in expected] += 1
    assert checked[True] > 100 and checked[False] > 100  # both kinds of window really occur


def test_windows_across_document_boundaries(docs: list[Document]) -> None:
    """The token stream joins documents with an end token that decodes to nothing: lines stay whole."""
    joined = docs[0].text + docs[1].text
    assert classify(joined) == classify(docs[0].text) + classify(docs[1].text)
    start = len(docs[0].text) - 7
    window = joined[start : start + 300]
    expected = expected_window(joined, class_names(joined), start, start + 300)
    assert class_names(window) == expected


def test_byte_tokenised_validation_text_classifies_without_unknowns(tmp_path: Path) -> None:
    """A report decodes token windows; with bytes, every token but the end-of-document one is a character."""
    data = prepare_data(f"{SPEC}:40", "byte", cache_dir=tmp_path)
    ids = [int(t) for t in data.val_tokens]
    text = data.tokenizer.decode(ids)
    assert len(text) == len(ids) - ids.count(data.tokenizer.eos_id) and text.endswith("\n")
    names = class_names(text)
    assert len(names) == len(text) and "unknown" not in names and "sum_result" in names


# ------------------------------------------------------------------------------------------ corpus specs


def test_load_corpus_splits_and_fingerprint_is_stable(docs: list[Document]) -> None:
    corpus = load_corpus(SPEC)
    assert corpus.train and corpus.val
    assert sorted(corpus.train + corpus.val, key=lambda d: int(d.path.split("#")[1])) == docs
    assert corpus.fingerprint() == load_corpus(SPEC).fingerprint()
    assert corpus.fingerprint()["files"] == len(docs)


def test_document_count_and_max_docs(docs: list[Document]) -> None:
    small = load_corpus(f"{SPEC}:40")
    assert small.train and small.val
    assert sorted(small.train + small.val, key=lambda d: int(d.path.split("#")[1])) == docs[:40]
    capped = load_corpus(SPEC, max_docs=7)
    assert len(capped.train) + len(capped.val) == 7


@pytest.mark.parametrize(
    "spec",
    ["synthetic:nope", "synthetic:", "synthetic:Mixed-Difficulty", f"{SPEC}:0", f"{SPEC}:x", f"{SPEC}:-3",
     f"{SPEC}:5:6", f"{SPEC}:"],
)
def test_bad_specs_are_one_line_data_errors(spec: str) -> None:
    msg = one_line_error(lambda: load_corpus(spec), DataError)
    assert repr(spec) in msg and SPEC.split(":")[1] in msg


def test_make_documents_rejects_bad_arguments() -> None:
    msg = one_line_error(lambda: make_documents("nope"), DataError)
    assert "mixed-difficulty" in msg
    one_line_error(lambda: make_documents(n_docs=0), DataError)
