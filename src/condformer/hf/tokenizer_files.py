"""A run's tokenizer as the files transformers reads (``tokenizer.json`` + ``tokenizer_config.json``).

Only a pretrained model's own tokenizer (:class:`~condformer.data.HFTokenizer`) has such files; condformer's
byte and BPE tokenizers are written by neither export format (transformers has no class for them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_tokenizer(tok: Any, out: Path) -> None:
    """The run's tokenizer as transformers' files (a pretrained model's own tokenizer; BPE and bytes have none)."""
    d = tok.to_dict() if tok is not None else {}
    if d.get("kind") != "hf":
        return
    (out / "tokenizer.json").write_text(d["tokenizer_json"], encoding="utf-8")
    inner = json.loads(d["tokenizer_json"])
    by_id = {t["id"]: t["content"] for t in inner.get("added_tokens", [])}
    vocab = inner.get("model", {}).get("vocab", {})
    by_id.update({i: s for s, i in vocab.items()} if isinstance(vocab, dict) else {})
    special = d["special_ids"]
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    for key in ("bos", "eos", "pad"):
        if special.get(key) in by_id:
            config[f"{key}_token"] = by_id[special[key]]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
