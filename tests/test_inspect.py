"""``inspect_routing`` / ``plot_routing``: routing decisions of one text, as a dict and as a PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from condformer.config import LayerSpec, ModelConfig, every_other
from condformer.data import ByteTokenizer
from condformer.errors import CondformerError
from condformer.inspection import MAX_LABELLED_TOKENS, inspect_routing, plot_routing, token_label
from condformer.model import build_model
from condformer.routing.mod import capacity_tokens, set_eval_routing

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXT = 'def mean(xs):\n    """Average of xs."""\n    return sum(xs) / len(xs)\n'


def mod_model(max_seq_len: int = 64, n_layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=n_layers, n_heads=2, max_seq_len=max_seq_len,
                      layers=every_other(LayerSpec(router="mod", options={"capacity": 0.25})))
    return build_model(cfg)


def read_png(path: Path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(path)


def centre_predictor(model: torch.nn.Module, tokens_BT: torch.Tensor) -> None:
    """Shift layer 1's causal predictor so about half the tokens route: an untrained one routes them all,
    which would make comparing decisions trivial."""
    seen: list[torch.Tensor] = []
    hook = model.layers[1].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    model.eval()
    with torch.no_grad():
        model(tokens_BT)
        predictor = model.layers[1].predictor
        predictor[-1].bias -= predictor(seen[0]).median()
    hook.remove()


@pytest.mark.parametrize("routing", ["causal", "topk"])
def test_routed_lists_match_the_model_traces(routing: str) -> None:
    model, tok = mod_model(), ByteTokenizer()
    text = TEXT[:60]
    set_eval_routing(model, routing)
    if routing == "causal":
        centre_predictor(model, torch.tensor([tok.encode(text)]))
    result = inspect_routing(model, tok, text)
    model.eval()
    with torch.no_grad():
        traces = model(torch.tensor([tok.encode(text)]), trace=True).traces
    assert [e["layer"] for e in result["layers"]] == [1] and result["layers"][0]["name"] == "mod_routed"
    entry = result["layers"][0]
    assert entry["routed"] == traces["layer1/mod_routed"][0].int().tolist()
    assert entry["routed_frac"] == pytest.approx(sum(entry["routed"]) / len(entry["routed"]))
    assert result["routed_frac"] == pytest.approx(entry["routed_frac"])
    if routing == "topk":  # top-k routes exactly the capacity: a check that does not trust the trace
        assert sum(entry["routed"]) == capacity_tokens(0.25, 60)
    else:
        assert 0 < sum(entry["routed"]) < 60
    assert "".join(result["tokens"]) == text and result["token_ids"] == tok.encode(text)
    assert result["n_layers"] == 2 and result["routers"] == ["dense", "mod"] and result["notes"] == []
    json.dumps(result)  # JSON-able as it is


def test_restores_training_mode_and_truncates_with_a_note() -> None:
    model = mod_model()
    model.train()
    result = inspect_routing(model, ByteTokenizer(), "x" * 100)
    assert model.training
    assert result["n_tokens"] == 64 and len(result["layers"][0]["routed"]) == 64
    assert "100 tokens" in result["notes"][0] and "max_seq_len" in result["notes"][0]


def test_empty_text_is_an_error() -> None:
    with pytest.raises(CondformerError, match="empty"):
        inspect_routing(mod_model(), ByteTokenizer(), "")


def test_non_ascii_bytes_are_shown_as_escapes() -> None:
    result = inspect_routing(mod_model(), ByteTokenizer(), "é!")
    assert result["tokens"] == ["\\xc3", "\\xa9", "!"]


def test_token_labels_make_whitespace_visible() -> None:
    assert [token_label(t) for t in [" ", "\n", "\t", "a", "", "\x00"]] == ["␣", "\\n", "\\t", "a", "∅", "\\x00"]


def test_plot_writes_a_png_matplotlib_reads_back(tmp_path: Path) -> None:
    result = inspect_routing(mod_model(), ByteTokenizer(), TEXT)
    out = plot_routing(result, tmp_path / "sub" / "routing.png")
    img = read_png(out)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert sorted(p.name for p in out.parent.iterdir()) == ["routing.png"]  # no temp file left behind


def test_plot_long_text_and_dense_model(tmp_path: Path) -> None:
    model = mod_model(max_seq_len=2 * MAX_LABELLED_TOKENS, n_layers=4)
    set_eval_routing(model, "topk")
    result = inspect_routing(model, ByteTokenizer(), TEXT * 3)
    assert [e["layer"] for e in result["layers"]] == [1, 3]
    assert read_png(plot_routing(result, tmp_path / "long.png")).shape[1] > 0

    torch.manual_seed(0)
    dense = build_model(ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64))
    result = inspect_routing(dense, ByteTokenizer(), "x = 1\n")
    assert result["layers"] == [] and result["routed_frac"] is None
    assert read_png(plot_routing(result, tmp_path / "dense.png")).shape[0] > 0


def test_missing_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    result = inspect_routing(mod_model(), ByteTokenizer(), "x")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(CondformerError, match=r"condformer\[plot\]"):
        plot_routing(result, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_unwritable_output_is_a_one_line_error(tmp_path: Path) -> None:
    result = inspect_routing(mod_model(), ByteTokenizer(), "x")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CondformerError, match="cannot write"):
        plot_routing(result, blocker / "x.png")


# -- Mixture-of-Experts layers: expert assignments and, for integrated MoDE, FFN skipping ------------
def moe_model(**opts) -> torch.nn.Module:
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                      layers=every_other(LayerSpec(ffn="moe", options=opts)))
    torch.manual_seed(0)
    return build_model(cfg).eval()


def test_moe_assignments_match_the_router() -> None:
    model = moe_model(top_k=2)
    text = "def f(x):\n    return x + 1\n"
    result = inspect_routing(model, ByteTokenizer(), text)
    (entry,) = result["assignments"]
    assert (entry["layer"], entry["name"]) == (1, "moe_expert")
    # recompute layer 1's routing by hand: its FFN sees the pre-FFN-normed state after attention
    ids = torch.tensor([ByteTokenizer().encode(text)])
    seen = {}
    ffn = model.layers[1].block.ffn
    hook = ffn.register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(ids)
    hook.remove()
    x = seen["x"][0]
    expected = (x.double() @ ffn.router.weight.double().t()).softmax(-1).topk(2, dim=-1).indices
    assert entry["ids"] == expected.tolist()
    counts = torch.bincount(expected.flatten(), minlength=8).tolist()
    assert entry["counts"] == counts and len(entry["counts"]) == 8
    assert sum(entry["shares"]) == pytest.approx(1.0) and entry["none_frac"] == 0
    assert result["layers"] == []  # no boolean routing trace without no-op experts


def test_integrated_mode_shows_which_tokens_skipped_the_ffn() -> None:
    model = moe_model(top_k=1, null_experts=8)
    with torch.no_grad():  # a token goes to no-op expert 8 when v . x > 0, else to real expert 0
        ffn = model.layers[1].block.ffn
        v = torch.randn(32, generator=torch.Generator().manual_seed(1))
        ffn.router.weight.zero_()
        ffn.router.weight[8], ffn.router.weight[0] = 10 * v, -10 * v
    result = inspect_routing(model, ByteTokenizer(), "abcabc  xyz")
    (entry,) = result["assignments"]
    (layer,) = result["layers"]
    assert layer["name"] == "moe_routed"
    visited = [row[0] >= 0 for row in entry["ids"]]
    assert layer["routed"] == [int(v) for v in visited]
    assert entry["none_frac"] == pytest.approx(1 - sum(visited) / len(visited))
    assert 0 < entry["none_frac"] < 1  # the crafted router splits tokens both ways on this text


@pytest.mark.parametrize("coefficients", ["scalar", "gemma"])
def test_altup_coefficients_are_reported_per_layer(coefficients: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                      altup={"k": 3, "variant": "recycled", "coefficients": coefficients})
    model = build_model(cfg)
    with torch.no_grad():
        for c in model.altup.coefs:
            for param in c.parameters():
                param.normal_()
    result = inspect_routing(model, ByteTokenizer(), TEXT)
    assert [e["layer"] for e in result["altup"]] == [0, 1]
    for e, c in zip(result["altup"], model.altup.coefs, strict=True):
        if coefficients == "scalar":
            assert torch.tensor(e["p"]).allclose(c.p) and torch.tensor(e["g"]).allclose(c.g)
        else:
            assert torch.tensor(e["p"]).shape == (3, 3) and len(e["g"]) == 3
    if coefficients == "gemma":  # layer 0's prediction coefficients by hand: tanh router over block 0
        ids = torch.tensor([result["token_ids"]])  # the text truncated to max_seq_len
        c = model.altup.coefs[0]
        with torch.no_grad():
            x = model.embed(ids)
            m = torch.tanh(c.modality_router(c.router_norm(x) / 32))
            C = (m @ c.prediction_coefs.weight.t()).view(1, -1, 3, 3).mean((0, 1))
        assert torch.tensor(result["altup"][0]["p"]).allclose(torch.eye(3) + C, atol=1e-5)
    assert inspect_routing(mod_model(), ByteTokenizer(), TEXT)["altup"] == []
