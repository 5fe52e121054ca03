"""Corpus loading: stdlib, files, directories, globs, Hugging Face specs, splitting and errors."""

from __future__ import annotations

import hashlib
import sys
import sysconfig
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from condformer.data import Corpus, Document, load_corpus
from condformer.errors import DataError

EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages"}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONDFORMER_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def stdlib() -> Corpus:
    return load_corpus("stdlib")


def bucket(path: str) -> int:
    """The split bucket of a path, computed independently of the implementation's helpers."""
    return int.from_bytes(hashlib.sha1(path.encode("utf-8")).digest()[:8], "big") % 10_000


def write_files(root: Path, files: dict[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def one_line_error(excinfo: pytest.ExceptionInfo[DataError]) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    assert message
    return message


def all_paths(corpus: Corpus) -> list[str]:
    return [doc.path for doc in corpus.train + corpus.val]


# ------------------------------------------------------------------------------------------------- stdlib


def test_stdlib_excludes_tests_and_site_packages(stdlib: Corpus) -> None:
    paths = all_paths(stdlib)
    assert len(paths) > 100
    assert "os.py" in paths and "json/__init__.py" in paths
    for path in paths:
        *dirs, name = path.split("/")
        assert not EXCLUDED_DIRS & set(dirs), path
        assert not name.startswith("test_"), path
        assert name.endswith(".py"), path


def test_stdlib_matches_an_independent_listing(stdlib: Corpus) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    expected = set()
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        hidden = any(part.startswith(".") for part in rel.parts)
        excluded = EXCLUDED_DIRS | {"__pycache__"}
        if hidden or excluded & set(rel.parts[:-1]) or rel.name.startswith("test_") or not path.is_file():
            continue
        try:
            if path.read_bytes().decode("utf-8"):
                expected.add(rel.as_posix())
        except UnicodeDecodeError:
            pass
    train = {doc.path for doc in stdlib.train}
    val = {doc.path for doc in stdlib.val}
    assert not train & val
    assert train | val == expected
    assert len(train) + len(val) == len(all_paths(stdlib))  # no duplicates


def test_stdlib_is_deterministic_and_sorted(stdlib: Corpus) -> None:
    again = load_corpus("stdlib")
    assert again.fingerprint() == stdlib.fingerprint()
    for docs in (stdlib.train, stdlib.val):
        paths = [doc.path for doc in docs]
        assert paths == sorted(paths)


def test_stdlib_fingerprint_and_val_fraction(stdlib: Corpus) -> None:
    fp = stdlib.fingerprint()
    docs = stdlib.train + stdlib.val
    assert fp["source"] == "stdlib"
    assert fp["files"] == len(docs)
    assert fp["train_files"] == len(stdlib.train) and fp["val_files"] == len(stdlib.val)
    assert fp["bytes"] == sum(len(doc.text.encode("utf-8")) for doc in docs)
    assert len(fp["sha256"]) == 64
    assert 0.01 < len(stdlib.val) / len(docs) < 0.12  # about 5%


# ----------------------------------------------------------------------------------- directories and files


def test_directory_corpus_reads_text_and_skips_hidden_binary_and_empty(tmp_path: Path) -> None:
    write_files(
        tmp_path,
        {
            "b.txt": "bee\n",
            "a.txt": "ay\n",
            "sub/c.md": "see ✓\n",
            "sub/deeper/d.py": "x = 1\n",
            ".hidden/e.txt": "hidden dir\n",
            ".f.txt": "hidden file\n",
            "blob.bin": b"\x00\x01\x02binary",
            "latin1.txt": b"caf\xe9\n",
            "empty.txt": "",
        },
    )
    corpus = load_corpus(str(tmp_path), val_fraction=0.5)
    texts = {doc.path: doc.text for doc in corpus.train + corpus.val}
    assert texts == {"a.txt": "ay\n", "b.txt": "bee\n", "sub/c.md": "see ✓\n", "sub/deeper/d.py": "x = 1\n"}
    assert corpus.train and corpus.val


def test_split_follows_the_path_hash(tmp_path: Path) -> None:
    write_files(tmp_path, {f"doc{i:03d}.txt": f"text {i}\n" for i in range(200)})
    corpus = load_corpus(str(tmp_path), val_fraction=0.1)
    expected_val = {f"doc{i:03d}.txt" for i in range(200) if bucket(f"doc{i:03d}.txt") < 1000}
    assert {doc.path for doc in corpus.val} == expected_val
    assert {doc.path for doc in corpus.train} == {f"doc{i:03d}.txt" for i in range(200)} - expected_val


def test_split_is_stable_when_files_are_added(tmp_path: Path) -> None:
    write_files(tmp_path, {f"old{i}.txt": f"old {i}\n" for i in range(40)})
    before = load_corpus(str(tmp_path), val_fraction=0.2)
    write_files(tmp_path, {f"new{i}.txt": f"new {i}\n" for i in range(25)})
    after = load_corpus(str(tmp_path), val_fraction=0.2)
    before_val = {doc.path for doc in before.val}
    after_val = {doc.path for doc in after.val}
    assert before_val  # the check below is vacuous otherwise
    assert {p for p in after_val if p.startswith("old")} == before_val
    assert len(all_paths(after)) == 65


def _names_in(predicate: Callable[[int], bool], count: int) -> list[str]:
    """The first ``count`` file names whose split bucket satisfies ``predicate``."""
    names = [f"f{i}.txt" for i in range(10_000) if predicate(bucket(f"f{i}.txt"))]
    return names[:count]


def test_tiny_corpus_gets_one_val_doc_when_hash_gives_none(tmp_path: Path) -> None:
    names = _names_in(lambda b: b >= 10, 3)  # none of these fall below val_fraction=0.001's threshold
    write_files(tmp_path, {name: f"{name}\n" for name in names})
    corpus = load_corpus(str(tmp_path), val_fraction=0.001)
    smallest = min(names, key=lambda name: (bucket(name), name))
    assert [doc.path for doc in corpus.val] == [smallest]
    assert len(corpus.train) == 2


def test_tiny_corpus_keeps_one_train_doc_when_hash_puts_all_in_val(tmp_path: Path) -> None:
    names = _names_in(lambda b: b < 5000, 2)
    write_files(tmp_path, {name: f"{name}\n" for name in names})
    corpus = load_corpus(str(tmp_path), val_fraction=0.5)
    largest = max(names, key=lambda name: (bucket(name), name))
    assert [doc.path for doc in corpus.train] == [largest]
    assert len(corpus.val) == 1


def test_single_file_is_split_inside_its_text(tmp_path: Path) -> None:
    text = "".join(f"line {i} 😀 ü\n" for i in range(300))
    (tmp_path / "one.txt").write_text(text, encoding="utf-8")
    corpus = load_corpus(str(tmp_path / "one.txt"), val_fraction=0.1)
    assert len(corpus.train) == 1 and len(corpus.val) == 1
    train, val = corpus.train[0], corpus.val[0]
    assert train.text + val.text == text
    assert train.path == "one.txt" and val.path != train.path
    val_share = len(val.text.encode("utf-8")) / len(text.encode("utf-8"))
    assert 0.095 < val_share < 0.105


def test_single_file_cut_respects_multibyte_characters(tmp_path: Path) -> None:
    text = "😀" * 97
    (tmp_path / "emoji.txt").write_text(text, encoding="utf-8")
    corpus = load_corpus(str(tmp_path / "emoji.txt"), val_fraction=0.05)
    assert corpus.train[0].text + corpus.val[0].text == text
    assert set(corpus.val[0].text) == {"😀"}


def test_glob_corpus_names_files_relative_to_the_glob_root(tmp_path: Path) -> None:
    write_files(tmp_path, {"a/x.txt": "x\n", "a/b/y.txt": "y\n", "a/z.md": "z\n"})
    corpus = load_corpus(str(tmp_path / "a" / "**" / "*.txt"), val_fraction=0.5)
    assert sorted(all_paths(corpus)) == ["b/y.txt", "x.txt"]
    assert corpus.source.endswith("*.txt")


def test_existing_path_with_glob_characters_is_a_path(tmp_path: Path) -> None:
    write_files(tmp_path, {"data[1].txt": "literal name " * 20, "data1.txt": "glob match " * 20})
    corpus = load_corpus(str(tmp_path / "data[1].txt"))
    assert corpus.train[0].path == "data[1].txt"
    assert corpus.train[0].text + corpus.val[0].text == "literal name " * 20


def test_fingerprint_tracks_content(tmp_path: Path) -> None:
    write_files(tmp_path, {"a.txt": "alpha\n", "b.txt": "beta\n", "c.txt": "gamma\n"})
    first = load_corpus(str(tmp_path)).fingerprint()
    assert load_corpus(str(tmp_path) + "/").fingerprint()["sha256"] == first["sha256"]
    (tmp_path / "b.txt").write_text("BETA\n", encoding="utf-8")
    second = load_corpus(str(tmp_path)).fingerprint()
    assert second["sha256"] != first["sha256"]
    assert second["bytes"] == first["bytes"] == len("alpha\nbeta\ngamma\n")


def test_document_is_frozen() -> None:
    doc = Document("a", "b")
    with pytest.raises(AttributeError):
        doc.text = "c"  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------- errors


def test_missing_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError) as excinfo:
        load_corpus(missing)
    message = one_line_error(excinfo)
    assert missing in message and "does not exist" in message and "stdlib" in message


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError) as excinfo:
        load_corpus(str(tmp_path / "empty.txt"))
    assert "empty" in one_line_error(excinfo)


def test_empty_glob(tmp_path: Path) -> None:
    with pytest.raises(DataError) as excinfo:
        load_corpus(str(tmp_path / "*.nothing"))
    assert "matches no files" in one_line_error(excinfo)


@pytest.mark.parametrize(
    "content",
    [b"text\x00with NUL", b"caf\xe9 is latin-1", b"ok start " + b"\xff" * 3],
    ids=["nul", "latin1", "ff"],
)
def test_binary_or_invalid_utf8_file_is_named(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "weird.dat"
    path.write_bytes(content)
    with pytest.raises(DataError) as excinfo:
        load_corpus(str(path))
    message = one_line_error(excinfo)
    assert "weird.dat" in message and "UTF-8" in message


def test_binary_file_in_glob_is_an_error(tmp_path: Path) -> None:
    write_files(tmp_path, {"a.txt": "fine\n", "b.txt": b"\x00\x00"})
    with pytest.raises(DataError) as excinfo:
        load_corpus(str(tmp_path / "*.txt"))
    assert "b.txt" in one_line_error(excinfo)


def test_directory_with_only_binary_files(tmp_path: Path) -> None:
    write_files(tmp_path, {"a.bin": b"\x00\x01", "b.bin": b"\xff\xfe\xfd", "c.txt": ""})
    with pytest.raises(DataError) as excinfo:
        load_corpus(str(tmp_path))
    assert "no non-empty UTF-8 text files" in one_line_error(excinfo)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 0.51, 1.0, float("nan")])
def test_bad_val_fraction(tmp_path: Path, fraction: float) -> None:
    (tmp_path / "a.txt").write_text("some text\n")
    with pytest.raises(DataError) as excinfo:
        load_corpus(str(tmp_path / "a.txt"), val_fraction=fraction)
    assert "val_fraction" in one_line_error(excinfo)


def test_too_short_single_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError) as excinfo:
        load_corpus(str(tmp_path / "a.txt"))
    assert "too short" in one_line_error(excinfo)


# ------------------------------------------------------------------------------------------- Hugging Face


def test_hf_without_datasets_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError) as excinfo:
        load_corpus("hf:wikitext")
    message = one_line_error(excinfo)
    assert "pip install 'condformer[hf]'" in message


def test_hf_bad_spec() -> None:
    with pytest.raises(DataError) as excinfo:
        load_corpus("hf:name:train")
    assert "hf:NAME:SPLIT:COLUMN" in one_line_error(excinfo)


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, records: list[dict], calls: list) -> None:
    def load_dataset(name: str, config: str | None = None, *, split: str, streaming: bool) -> object:
        calls.append((name, config, split, streaming))
        if name == "broken":
            raise ConnectionError("no network\nsecond line")
        return iter(records)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hf_spec_with_a_fake_datasets_module(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    records = [{"content": f"record {i}\n", "id": i} for i in range(30)] + [{"content": ""}]
    _fake_datasets(monkeypatch, records, calls)
    corpus = load_corpus("hf:org/name:cfg:valid:content", val_fraction=0.2, max_docs=25)
    assert calls == [("org/name", "cfg", "valid", True)]
    docs = {doc.path: doc.text for doc in corpus.train + corpus.val}
    assert docs == {f"hf:org/name#{i}": f"record {i}\n" for i in range(25)}


def test_hf_missing_column_and_load_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_datasets(monkeypatch, [{"content": "x"}], [])
    with pytest.raises(DataError) as excinfo:
        load_corpus("hf:name")  # default column "text" is absent
    assert "no column 'text'" in one_line_error(excinfo)
    with pytest.raises(DataError) as excinfo:
        load_corpus("hf:broken")
    assert "ConnectionError: no network" in one_line_error(excinfo)
