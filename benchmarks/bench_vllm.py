"""Rollout throughput: our engine vs vLLM, without and with MTP drafting (needs the vLLM environment).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv-vllm/bin/python benchmarks/bench_vllm.py [--threads 1 --repeats 3]

Models: the shipped pre-trained base (the tiny default: 4 layers x 128, one MTP layer; it drafts
well) and a randomly initialised 8-layer x 512 model with one MTP layer (its drafts are mostly
rejected, so drafting there shows the cost of a draft). Every model is exported as vLLM serves it
and run by one vLLM engine per drafting setting (D = 0 and D = 1, built once, warmed up once);
all variants generate the same prompts at T = 1 with n samples each and no EOS (every row makes
max_new_tokens), in rotation over `--repeats` rounds; figures are medians of response tokens/s by
wall clock, with ratios against our engine at D = 0. vLLM's CPU backend runs its own kernels
(oneDNN GEMMs, its paged attention) and its scheduler; on a GPU the comparison would be another
one. CPU only here: no GPU was lent when this was written.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mtprl.model import MTPCausalLM, build_tiny_model, build_tokenizer, load_tokenizer
from mtprl.rollout import SamplingParams, generate


def models(tmp: Path) -> dict[str, tuple[MTPCausalLM, Path]]:
    import mtprl.pretrain

    shipped = Path(mtprl.pretrain.__file__).parent / "base"
    tiny = MTPCausalLM.from_pretrained(shipped).eval()
    tok = load_tokenizer(shipped)
    large = build_tiny_model(build_tokenizer(), num_mtp_layers=1, seed=0, hidden_size=512, num_layers=8,
                             num_heads=8, num_kv_heads=4).eval()  # head dim 64 (vLLM's CPU backend needs >= 32)
    out = {}
    for name, model in (("tiny default (pre-trained)", tiny), ("8x512 random", large)):
        directory = tmp / name.split()[0]
        model.save_pretrained(directory, tokenizer=tok)
        out[name] = (model, directory)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from mtprl.rollout.vllm_backend import VLLMEngine, VLLMSettings
    from mtprl.tasks.suites import suite_problems

    tok = build_tokenizer()
    prompts = [tok(p.prompt)["input_ids"] for p in suite_problems("add-hard")[: args.prompts]]
    print(f"{args.prompts} prompts x n={args.n}, {args.max_new_tokens} new tokens, T=1, no EOS; "
          f"torch threads {args.threads}; median of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, directory) in models(Path(tmp)).items():
            engines = {d: VLLMEngine(directory, VLLMSettings(draft_tokens=d, max_model_len=256)) for d in (0, 1)}
            runs, accept = {}, {}
            variants = [("ours", 0), ("ours", 1), ("vllm", 0), ("vllm", 1)]
            for rep in range(args.repeats + 1):  # round 0 warms up
                for engine, d in variants:
                    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, n=args.n,
                                            draft_tokens=d)
                    started = time.perf_counter()
                    if engine == "ours":
                        out = generate(model, prompts, params, eos_token_id=None,
                                       generator=torch.Generator().manual_seed(rep))
                    else:
                        out = engines[d].generate(prompts, params, None, seed=rep)
                    elapsed = time.perf_counter() - started
                    if rep:
                        runs.setdefault((engine, d), []).append(float(out.lengths.sum()) / elapsed)
                        accept.setdefault((engine, d), []).append(out.metrics.get("rollout/accept_rate/0", 0.0))
            base = statistics.median(runs[("ours", 0)])
            print(f"\n{name}")
            print(f"{'engine':8} {'D':>2} {'tokens/s':>10} {'x ours D=0':>11} {'accept':>7}")
            for engine, d in variants:
                rate = statistics.median(runs[(engine, d)])
                print(f"{engine:8} {d:>2} {rate:10.0f} {rate / base:11.2f} {statistics.median(accept[(engine, d)]):7.3f}")
            del engines


if __name__ == "__main__":
    main()
