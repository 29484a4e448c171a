"""Rollout throughput: this engine without drafting, with MTP drafting, and `transformers`' `generate`.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_rollout.py [--threads 1 --repeats 3 --models tiny large fitted]

All variants run side by side in one process, in rotation, on the same prompts and sampling
settings (no EOS, so every row generates max_new_tokens); each figure is the median over
`--repeats` rounds of tokens/s by wall clock and by this process's CPU time (the latter is
steadier on a shared machine), with ratios against `transformers` `generate` (hf) and against
this engine without drafting (D=0); "D=0 tf" is D=0 decoding through the transformers forward
instead of the lean one-token step (mtprl/rollout/lean.py, same tokens bit for bit); "D=d pr" draws from one
generator per prompt (`PromptGenerators`, `rollout_rng: prompt`) instead of one for the batch. Models, all randomly initialised unless
fitted: the tiny default, a 12-layer x 512-hidden model, and (with --fit-steps > 0) the tiny
default fitted for a few hundred steps (main + MTP cross-entropy) on a noisy alphabet corpus, so
that its MTP layer drafts something the main model agrees with. Acceptance is reported as
measured. CPU only: no GPU was available when this was written.
"""

from __future__ import annotations

import argparse
import statistics
import string
import time

import torch

from mtprl.model import MTPCausalLM, build_tiny_model, build_tokenizer
from mtprl.rollout import PromptGenerators, SamplingParams, generate, lean


def fit_alphabet(model: MTPCausalLM, tokenizer, steps: int, seed: int = 0) -> MTPCausalLM:
    """Fit main + MTP heads on lowercase-alphabet runs where 10% of letters skip one ahead."""
    g = torch.Generator().manual_seed(seed)
    letters = torch.tensor(tokenizer.convert_tokens_to_ids(list(string.ascii_lowercase)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        start = torch.randint(0, 26, (16, 1), generator=g)
        step = 1 + (torch.rand(16, 47, generator=g) < 0.1).long()  # [16, 47]
        idx = torch.cat([start, start + step.cumsum(1)], 1) % 26  # [16, 48]
        ids = torch.cat([torch.full((16, 1), tokenizer.bos_token_id), letters[idx]], 1)
        out = model.token_log_probs(ids)
        loss = -(out.log_probs.sum() / out.mask.sum() + out.mtp_log_probs.sum() / out.mtp_mask.sum())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def hf_generate(model: MTPCausalLM, prompts, params: SamplingParams) -> None:
    """`transformers` `generate` on the base model with the same settings (left-padded batch)."""
    pad, n = model.config.pad_token_id, params.n
    if params.greedy:  # generate refuses num_return_sequences > 1 when greedy: repeat the prompts instead
        prompts, n = [p for p in prompts for _ in range(n)], 1
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = (torch.arange(width) >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
    sample = not params.greedy
    extra = dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k) if sample else {}
    model.base.generate(ids, attention_mask=mask, do_sample=sample, max_new_tokens=params.max_new_tokens,
                        num_return_sequences=n, pad_token_id=pad, eos_token_id=None, **extra)


def _without_lean(fn, *args, **kwargs):
    lean.ENABLED = False
    try:
        return fn(*args, **kwargs)
    finally:
        lean.ENABLED = True


def bench(model: MTPCausalLM, prompts, params: SamplingParams, drafts: list[int], repeats: int) -> None:
    """Print median tokens/s (wall, CPU) of hf and of this engine per draft length, and acceptance."""
    model.base.generation_config.eos_token_id = None
    tokens = len(prompts) * params.n * params.max_new_tokens
    variants = {"hf": lambda g: hf_generate(model, prompts, params)}
    for d in drafts:
        p = SamplingParams(**{**params.__dict__, "draft_tokens": d})
        variants[f"D={d}"] = lambda g, p=p: generate(model, prompts, p, generator=g)
    if 0 in drafts:  # plain decoding through the transformers forward instead of the lean step (the old path)
        variants["D=0 tf"] = lambda g: _without_lean(generate, model, prompts, params, generator=g)
    for d in sorted({0, max(drafts)} & set(drafts)):  # one generator per prompt (rollout_rng: prompt)
        p = SamplingParams(**{**params.__dict__, "draft_tokens": d})
        variants[f"D={d} pr"] = lambda g, p=p: generate(model, prompts, p, generator=PromptGenerators(
            [g.initial_seed() * 1000 + i for i in range(len(prompts))], p.n))
    wall, cpu = {k: [] for k in variants}, {k: [] for k in variants}
    accept = {}
    with torch.no_grad():
        for name, fn in variants.items():  # warm-up
            fn(torch.Generator().manual_seed(0))
        for r in range(repeats):
            for name, fn in variants.items():
                t, c = time.perf_counter(), time.process_time()
                out = fn(torch.Generator().manual_seed(r))
                wall[name].append(tokens / (time.perf_counter() - t))
                cpu[name].append(tokens / (time.process_time() - c))
                if out is not None and name not in ("D=0", "D=0 tf", "D=0 pr"):
                    accept.setdefault(name, []).append(out.metrics["rollout/accept_rate"])
    mode = "greedy" if params.greedy else f"T={params.temperature} top_p={params.top_p} top_k={params.top_k}"
    print(f"  [{mode}]  {len(prompts)} prompts x n={params.n}, {params.max_new_tokens} new tokens")
    print(f"    {'':>6}  {'wall tok/s':>10} {'vs hf':>6} {'vs D=0':>6}   {'cpu tok/s':>10} {'vs hf':>6} {'vs D=0':>6}")
    w = {k: statistics.median(v) for k, v in wall.items()}
    c = {k: statistics.median(v) for k, v in cpu.items()}
    for name in variants:
        acc = f"   accept_rate={statistics.mean(accept[name]):.2f}" if name in accept else ""
        print(f"    {name:>6}  {w[name]:10.0f} {w[name] / w['hf']:6.2f} {w[name] / w['D=0']:6.2f}   "
              f"{c[name]:10.0f} {c[name] / c['hf']:6.2f} {c[name] / c['D=0']:6.2f}{acc}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for these sizes)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--drafts", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--fit-steps", type=int, default=150, help="fitting steps of the `fitted` model")
    ap.add_argument("--models", nargs="+", default=["tiny", "large", "fitted"], choices=["tiny", "large", "fitted"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = build_tokenizer()
    g = torch.Generator().manual_seed(0)
    prompts = [[tok.bos_token_id] + torch.randint(3, len(tok), (int(torch.randint(8, 24, (1,), generator=g)),),
                                                  generator=g).tolist() for _ in range(args.prompts)]
    base = dict(max_new_tokens=args.max_new_tokens, n=args.n)
    settings = [SamplingParams(temperature=1.0, **base), SamplingParams(temperature=0.0, **base)]
    models = {}
    if "tiny" in args.models:
        models["tiny default (random init)"] = build_tiny_model(tok).eval()
    if "large" in args.models:
        models["12 layers x 512 hidden (random init)"] = build_tiny_model(
            tok, hidden_size=512, num_layers=12, num_heads=8, num_kv_heads=4).eval()
    if "fitted" in args.models:
        t = time.perf_counter()
        models[f"tiny default fitted {args.fit_steps} steps on alphabet runs"] = fit_alphabet(
            build_tiny_model(tok), tok, args.fit_steps)
        print(f"(fitting took {time.perf_counter() - t:.0f} s)", flush=True)
        letters = tok.convert_tokens_to_ids(list(string.ascii_lowercase))
        fitted_prompts = [[tok.bos_token_id] + letters[i % 26: i % 26 + 5] for i in range(args.prompts)]
    print(f"torch threads: {args.threads}; figures: median tokens/s over {args.repeats} rounds")
    for name, model in models.items():
        print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters", flush=True)
        for params in settings:
            bench(model, fitted_prompts if "fitted" in name else prompts, params, args.drafts, args.repeats)


if __name__ == "__main__":
    main()
