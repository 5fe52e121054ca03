"""HFTokenizer: a pretrained model's own tokenizer, checked against transformers on locally built tokenizers.

Nothing is downloaded: the source tokenizers are trained here (a small byte-level BPE with chat-style special
tokens, a 70,000-word WordLevel vocabulary) and saved the way ``save_pretrained`` writes them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from condformer.data import HFTokenizer, load_corpus, prepare_data, tokenizer_from_dict
from condformer.errors import DataError
from helpers import one_line_error

tokenizers = pytest.importorskip("tokenizers")

EOS, BOS, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
TRAIN_TEXT = (
    "def greet(name):\n    return f'hello {name}!'\n\n"
    "class Counter:\n\tdef __init__(self):\n\t\tself.count = 0\n\n"
    "# café, naïve, über, 日本語のテキスト, emoji 😀🚀\n"
)
TEXTS = [
    "def add(a, b):\n    return a + b  # sum\n",
    "café naïve Ångström über façade",
    "日本語のテキストと中文字符",
    "emoji 😀🚀👩‍💻 and flags 🇫🇷",
    "   leading spaces,\t\ttabs,\n\n\nnewlines   and trailing   ",
    f"first document{EOS}second {BOS}user\nhi{IM_END}",
    "",
]


@pytest.fixture(scope="module", autouse=True)
def _offline() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


def train_bpe() -> Any:
    """A byte-level BPE (GPT-2 style) whose special tokens take ids 0..3."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[EOS, BOS, IM_END, PAD],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAIN_TEXT * 20], trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def bpe() -> Any:
    return train_bpe()


@pytest.fixture(scope="module")
def hf_dir(bpe: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory exactly as transformers' ``save_pretrained`` writes it."""
    transformers = pytest.importorskip("transformers")
    directory = tmp_path_factory.mktemp("hf_tok")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS)
    fast.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def reference(hf_dir: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(hf_dir))


def bare_dir(root: Path, bpe: Any, **json_files: dict) -> Path:
    """``root`` with only tokenizer.json plus the given JSON files (``config`` -> config.json)."""
    root.mkdir(parents=True, exist_ok=True)
    bpe.save(str(root / "tokenizer.json"))
    for stem, content in json_files.items():
        (root / f"{stem}.json").write_text(json.dumps(content), encoding="utf-8")
    return root


# ------------------------------------------------------------------------------------------- round trips


def test_encode_and_decode_match_transformers(hf_dir: Path, reference: Any) -> None:
    tok = HFTokenizer.from_dir(hf_dir)
    assert tok.vocab_size == len(reference) > 300
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert tok.decode(ids) == reference.decode(ids, skip_special_tokens=True), text
        if EOS not in text:  # byte-level BPE is lossless on text without special-token strings
            assert tok.decode(ids) == text
    # a special-token string in the text is the special token, as the pretrained model saw it
    assert tok.eos_id in tok.encode(TEXTS[5]) and tok.bos_id in tok.encode(TEXTS[5])
    assert tok.decode(tok.encode(TEXTS[5])) == "first documentsecond user\nhi"


def test_encode_batch_matches_encode(hf_dir: Path) -> None:
    tok = HFTokenizer.from_dir(hf_dir)
    assert tok.encode_batch(TEXTS) == [tok.encode(text) for text in TEXTS]


def test_decode_never_raises_on_junk_ids(hf_dir: Path) -> None:
    tok = HFTokenizer.from_dir(hf_dir)
    ids = tok.encode("def")
    assert tok.decode([-1, 10**9, "x", None, 3]) == ""  # 3 is <|pad|>, special in the source: skipped
    junk: list[Any] = [-1, 10**9, "x", None, 3, ids[0], 2**70, 1.5, tok.vocab_size, *ids[1:], tok.eos_id]
    assert tok.decode(junk) == "def"  # 1.5 -> 1 is the bos id, skipped like every special id


# ---------------------------------------------------------------------------------------- special ids


def test_special_ids_from_tokenizer_config(hf_dir: Path, bpe: Any) -> None:
    tok = HFTokenizer.from_dir(hf_dir)
    assert (tok.bos_id, tok.eos_id) == (bpe.token_to_id(BOS), bpe.token_to_id(EOS)) == (1, 0)
    assert tok.pad_id == tok.eos_id  # no pad token: falls back to eos
    assert tok.mask_id == tok.pad_id  # no mask token: falls back to pad
    assert tok.source == str(hf_dir)


def test_special_ids_from_special_tokens_map_only(tmp_path: Path, bpe: Any) -> None:
    directory = bare_dir(
        tmp_path / "d", bpe, special_tokens_map={"eos_token": {"content": IM_END, "special": True}, "pad_token": PAD}
    )
    tok = HFTokenizer.from_dir(directory)
    assert (tok.eos_id, tok.pad_id, tok.mask_id) == (bpe.token_to_id(IM_END), bpe.token_to_id(PAD), 3)
    assert tok.bos_id == tok.eos_id  # no bos anywhere: a decoder starts documents after an eos


def test_special_ids_from_config_json_only(tmp_path: Path, bpe: Any) -> None:
    directory = bare_dir(tmp_path / "d", bpe, config={"bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": None})
    tok = HFTokenizer.from_dir(directory)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (1, 2, 2, 2)


def test_tokenizer_config_wins_over_the_other_files(tmp_path: Path, bpe: Any) -> None:
    directory = bare_dir(
        tmp_path / "d",
        bpe,
        tokenizer_config={"eos_token": IM_END, "bos_token": None},
        special_tokens_map={"eos_token": EOS, "bos_token": BOS, "pad_token": PAD},
        config={"eos_token_id": 1, "bos_token_id": 0, "pad_token_id": 0},
    )
    tok = HFTokenizer.from_dir(directory)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (2, 1, 3)  # each from the first file that names it


# ---------------------------------------------------------------------------------------- serialisation


def test_to_dict_round_trip(hf_dir: Path) -> None:
    tok = HFTokenizer.from_dir(hf_dir)
    assert re.fullmatch(r"hf-[0-9a-f]{12}", tok.name)
    d = json.loads(json.dumps(tok.to_dict()))  # what a checkpoint stores
    assert d["kind"] == "hf" and d["special_ids"] == {"pad": 0, "bos": 1, "eos": 0, "mask": 0}
    back = tokenizer_from_dict(d)
    assert isinstance(back, HFTokenizer)
    assert back.name == tok.name and back.vocab_size == tok.vocab_size and back.to_dict() == tok.to_dict()
    assert [back.encode(text) for text in TEXTS] == [tok.encode(text) for text in TEXTS]
    assert HFTokenizer.from_dict(d).special_ids == tok.special_ids


def test_name_depends_on_the_tokenizer(hf_dir: Path, tmp_path: Path, bpe: Any) -> None:
    other = tokenizers.Tokenizer.from_str(bpe.to_str())
    other.add_tokens(["<|extra|>"])
    assert HFTokenizer(other, bos_id=1, eos_id=0).name != HFTokenizer.from_dir(hf_dir).name


@pytest.mark.parametrize(
    "tamper",
    [
        lambda d: d["special_ids"].update(eos=2),
        lambda d: d["special_tokens"].update(eos=IM_END),
        lambda d: d["special_ids"].update(bos=None),
        lambda d: d["special_ids"].update(eos=10**6),
        lambda d: d.update(vocab_size=d["vocab_size"] + 1),
        lambda d: d.update(tokenizer_json="{not json"),
        lambda d: d.pop("tokenizer_json"),
    ],
    ids=["eos", "eos-token", "bos-missing", "eos-out-of-range", "vocab-size", "invalid-json", "no-json"],
)
def test_tampered_dict_raises(hf_dir: Path, tamper: Any) -> None:
    d = HFTokenizer.from_dir(hf_dir).to_dict()
    tamper(d)
    message = one_line_error(lambda: tokenizer_from_dict(d), DataError)
    assert "corrupt" in message


# ------------------------------------------------------------------------------------------ transformers


def test_from_transformers_matches_from_dir(hf_dir: Path, bpe: Any, reference: Any) -> None:
    transformers = pytest.importorskip("transformers")
    from_dir = HFTokenizer.from_dir(hf_dir)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS)
    for source in (fast, reference):
        tok = HFTokenizer.from_transformers(source)
        assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.mask_id) == (1, 0, 0, 0)
        assert [tok.encode(text) for text in TEXTS] == [from_dir.encode(text) for text in TEXTS]
    assert HFTokenizer.from_transformers(reference).source == str(hf_dir)


def test_from_transformers_does_not_change_the_source(reference: Any) -> None:
    before = reference.backend_tokenizer.to_str()
    tok = HFTokenizer.from_transformers(reference)
    tok.encode("x" * 10)
    assert reference.backend_tokenizer.to_str() == before


def test_from_transformers_rejects_a_slow_tokenizer() -> None:
    class SlowTokenizer:
        is_fast = False
        eos_token_id = 0

    assert "slow" in one_line_error(lambda: HFTokenizer.from_transformers(SlowTokenizer()), DataError)


# -------------------------------------------------------------------------------------------- bad input


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    message = one_line_error(lambda: HFTokenizer.from_dir(tmp_path), DataError)
    assert "tokenizer.json" in message and "save_pretrained" in message


def test_no_eos_anywhere(tmp_path: Path, bpe: Any) -> None:
    directory = bare_dir(tmp_path / "d", bpe, tokenizer_config={"bos_token": BOS}, config={"pad_token_id": 3})
    message = one_line_error(lambda: HFTokenizer.from_dir(directory), DataError)
    assert "end-of-sequence" in message and "eos_token" in message


def test_invalid_tokenizer_json(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ', encoding="utf-8")
    assert "invalid tokenizer JSON" in one_line_error(lambda: HFTokenizer.from_dir(tmp_path), DataError)


def test_invalid_config_json(tmp_path: Path, bpe: Any) -> None:
    directory = bare_dir(tmp_path / "d", bpe)
    (directory / "tokenizer_config.json").write_text("{oops", encoding="utf-8")
    assert "tokenizer_config.json" in one_line_error(lambda: HFTokenizer.from_dir(directory), DataError)


def test_special_token_not_in_vocabulary(tmp_path: Path, bpe: Any) -> None:
    directory = bare_dir(tmp_path / "d", bpe, tokenizer_config={"eos_token": "</s>"})
    message = one_line_error(lambda: HFTokenizer.from_dir(directory), DataError)
    assert "'</s>'" in message and "vocabulary" in message


# ---------------------------------------------------------------------------------------- wide vocabulary

N_WORDS = 70_000


def test_wide_vocabulary_is_stored_as_uint32(tmp_path: Path) -> None:
    vocab = {f"w{i}": i for i in range(N_WORDS)} | {"<eos>": N_WORDS, "<unk>": N_WORDS + 1}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    word_level.add_special_tokens(["<eos>"])
    tok = HFTokenizer(word_level, bos_id=None, eos_id=N_WORDS)
    assert tok.vocab_size == N_WORDS + 2

    text_dir = tmp_path / "text"
    text_dir.mkdir()
    for f in range(6):
        words = [f"w{65_530 + 7 * f + j}" for j in range(30)] + [f"w{f}", "w69999", "w65536", "w65535"]
        (text_dir / f"doc_{f}.txt").write_text(" ".join(words) + "\n", encoding="utf-8")

    data = prepare_data(str(text_dir), tok, val_fraction=0.2, cache_dir=tmp_path / "cache")
    meta = json.loads((data.directory / "meta.json").read_text(encoding="utf-8"))
    assert meta["dtype"] == "uint32"
    corpus = load_corpus(str(text_dir), 0.2)
    for split, docs in (("train", corpus.train), ("val", corpus.val)):
        stream = data.tokens(split)
        assert stream.dtype == np.uint32
        expected = [i for doc in docs for i in [*tok.encode(doc.text), N_WORDS]]
        assert stream.tolist() == expected  # ids above 65,535 come back exactly, not modulo 65,536
        assert max(expected) > 65_535 and N_WORDS - 1 in expected
