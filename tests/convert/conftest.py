"""A tiny random Llama (transformers, perturbed away from its init) imported once as a condformer run."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    from tests.hf.models import hf_config, perturbed, save_model_dir

    from condformer.hf.importer import import_model

    root = tmp_path_factory.mktemp("llama")
    hf = perturbed(hf_config("llama"), seed=3)
    import_model(save_model_dir(hf, root / "src"), root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def swiglu_untied_run(tmp_path_factory):
    """Qwen3 (q/k norms, head_dim != d / heads, untied head): a second family for the conversions."""
    from tests.hf.models import hf_config, perturbed, save_model_dir

    from condformer.hf.importer import import_model

    root = tmp_path_factory.mktemp("qwen3")
    hf = perturbed(hf_config("qwen3"), seed=4)
    import_model(save_model_dir(hf, root / "src"), root / "run")
    return root / "run"
