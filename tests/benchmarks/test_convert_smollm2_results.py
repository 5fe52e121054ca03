"""benchmarks/convert_smollm2.py keeps every result it saves (a regression: ``speed`` once lost all but two)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "convert_smollm2.py"


def load_script():
    spec = importlib.util.spec_from_file_location("convert_smollm2", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_added_after_several_saves_and_by_another_process_all_land(tmp_path: Path) -> None:
    script = load_script()
    results = script.load_results(tmp_path)
    speed = results.setdefault("speed", {})  # the caller keeps this reference, as cmd_speed does
    for i in range(3):
        speed[f"prefill/run{i}"] = {"speedup_median": 1.0 + i}
        script.save_results(tmp_path, results)
    other = script.load_results(tmp_path)  # a second process (train) adds a run meanwhile
    other["runs"]["dense-ft"] = {"val_loss": 1.6}
    script.save_results(tmp_path, other)
    speed["speculative/exits"] = {"rows": []}
    script.save_results(tmp_path, results)

    saved = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert set(saved["speed"]) == {"prefill/run0", "prefill/run1", "prefill/run2", "speculative/exits"}
    assert saved["runs"] == {"dense-ft": {"val_loss": 1.6}}
    assert results["runs"] == {"dense-ft": {"val_loss": 1.6}}  # the caller sees what others saved
