"""`mtprl acceptance`: MTP acceptance of a checkpoint in vLLM beside our engine, on the held-out suites.

For a run directory (its latest checkpoint), a checkpoint directory or a model directory, the model
is exported as vLLM serves it (`MTPCausalLM.save_pretrained`) and both engines generate from the
same suite prompts, greedily and at T = 1, drafting `draft_tokens` with the MTP layers. Printed and
(with --output) written as JSON: per engine and mode, the acceptance per draft position (our
engine's definition, which vLLM's `spec_decode_num_accepted_tokens_per_pos / num_drafts` follows).

What to expect. Greedily both engines accept a draft iff the MTP head's argmax equals the main
head's, so their rates agree (to the few argmax ties that float differences flip). At T = 1 they
differ by design: our engine samples the draft from the MTP head and accepts it with probability
min(1, p/q); vLLM's MTP proposer drafts the argmax and accepts it with probability p (the exact
rule for a one-hot q), so vLLM's rate at T = 1 is E[p(argmax q)] and ours E[Σ min(p, q)].
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import tempfile
from pathlib import Path

from mtprl.config import add_config_arguments, load_config, opt
from mtprl.errors import UserError


@dataclasses.dataclass
class AcceptanceConfig:
    """MTP acceptance of a checkpoint in vLLM beside our engine, on the held-out suites."""

    path: str | None = opt(None, "a run directory (its latest checkpoint), a checkpoint, or a model directory; "
                                 "a PATH argument on the command line wins")
    suites: list[str] = opt([], "held-out suites; empty: all six")
    limit: int = opt(32, "problems per suite")
    draft_tokens: int = opt(1, "tokens drafted per step (vLLM's num_speculative_tokens)")
    samples: int = opt(4, "samples per prompt at T = 1")
    max_new_tokens: int = opt(96, "longest response")
    seed: int = opt(0, "seed of the T = 1 samples")
    output: str | None = opt(None, "write the figures as JSON to this file")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("positional_path", nargs="?", metavar="PATH", help="run, checkpoint or model directory")
    add_config_arguments(parser, AcceptanceConfig)


def model_dir(path: Path) -> Path:
    """The model directory of a run directory (latest checkpoint), a checkpoint or a model directory."""
    from mtprl.train.checkpoint import latest_checkpoint

    if (path / "config.json").is_file():
        return path
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path / "checkpoints")
        if latest is not None:
            return latest / "model"
    raise UserError(f"'{path}' is neither a model directory (config.json), a checkpoint (model/) nor a run directory "
                    "with a complete checkpoint")


def measure(path: str | Path, suites: list[str], limit: int, draft_tokens: int, samples: int, max_new_tokens: int,
            seed: int = 0) -> dict:
    """{"greedy" | "sampled": {"ours" | "vllm": {"accept_rate/d": ..., "mean_accepted": ...}}} on the suites."""
    import torch

    from mtprl.model import MTPCausalLM, load_tokenizer
    from mtprl.rollout import SamplingParams, generate
    from mtprl.rollout.vllm_backend import VLLMEngine, VLLMSettings
    from mtprl.tasks.suites import SUITES, suite_problems

    for name in suites:
        if name not in SUITES:
            raise UserError(f"unknown suite '{name}'; known: {', '.join(SUITES)}")
    if limit < 1 or draft_tokens < 1 or samples < 1 or max_new_tokens < 1:
        raise UserError("--limit, --draft-tokens, --samples and --max-new-tokens must be >= 1")
    if importlib.util.find_spec("vllm") is None:
        raise UserError("mtprl acceptance needs vLLM: `pip install mtprl[vllm]` on GPUs, `make install-vllm` on CPU "
                        "(then run .venv-vllm/bin/mtprl acceptance)")
    source = model_dir(Path(path))
    model = MTPCausalLM.from_pretrained(source).eval()
    tokenizer = load_tokenizer(source)
    prompts = [tokenizer(p.prompt)["input_ids"] for name in (suites or list(SUITES))
               for p in suite_problems(name)[:limit]]
    modes = {"greedy": SamplingParams(max_new_tokens=max_new_tokens, temperature=0, draft_tokens=draft_tokens),
             "sampled": SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, n=samples,
                                       draft_tokens=draft_tokens)}
    out = {mode: {} for mode in modes}
    keys = [f"rollout/accept_rate/{d}" for d in range(draft_tokens)] + ["rollout/mean_accepted"]
    for mode, params in modes.items():
        gen = torch.Generator().manual_seed(seed)
        metrics = generate(model, prompts, params, eos_token_id=tokenizer.eos_token_id, generator=gen).metrics
        out[mode]["ours"] = {k.removeprefix("rollout/"): metrics[k] for k in keys}
    with tempfile.TemporaryDirectory(prefix="mtprl-accept-") as directory:
        model.save_pretrained(directory, tokenizer=tokenizer)
        try:
            engine = VLLMEngine(directory, VLLMSettings(draft_tokens=draft_tokens, seed=seed, max_model_len=min(
                model.config.max_position_embeddings, max(len(p) for p in prompts) + max_new_tokens)))
        except ValueError as err:
            raise UserError(str(err)) from None
        for mode, params in modes.items():
            metrics = engine.generate(prompts, params, tokenizer.eos_token_id, seed=seed).metrics
            out[mode]["vllm"] = {k.removeprefix("rollout/"): metrics[k] for k in keys}
    out["prompts"] = len(prompts)
    out["model"] = str(source)
    return out


def run(args) -> int:
    overrides = {"path": args.positional_path} if args.positional_path else {}
    cfg = load_config(AcceptanceConfig, args, **overrides)
    if not cfg.path:
        raise UserError("no checkpoint given; pass PATH (a run, checkpoint or model directory) or path in --config")
    figures = measure(cfg.path, cfg.suites, cfg.limit, cfg.draft_tokens, cfg.samples, cfg.max_new_tokens, cfg.seed)
    print(f"MTP acceptance of {figures['model']} on {figures['prompts']} held-out prompts")
    print(f"{'mode':8} {'engine':6} " + " ".join(f"{k:>16}" for k in figures["greedy"]["ours"]))
    for mode in ("greedy", "sampled"):
        for engine in ("ours", "vllm"):
            row = figures[mode][engine]
            print(f"{mode:8} {engine:6} " + " ".join(f"{v:16.4f}" for v in row.values()))
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(figures, indent=1))
    return 0
