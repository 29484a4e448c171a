"""`mtprl smoke`: build the tiny default, score a few texts with every head, save and reload it."""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time

from mtprl.config import add_config_arguments, load_config, opt, require


@dataclasses.dataclass
class SmokeConfig:
    """Build the tiny default MTP model, score a few texts with every head, save and reload it."""

    mtp_layers: int = opt(1, "number of MTP layers")
    seed: int = opt(0, "initialisation seed")

    def validate(self) -> None:
        require(self.mtp_layers >= 1, f"mtp_layers must be >= 1, got {self.mtp_layers}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, SmokeConfig)


def run(args: argparse.Namespace) -> int:
    cfg = load_config(SmokeConfig, args)
    import torch

    from mtprl.model import MTPCausalLM, build_tiny_model, build_tokenizer

    start = time.perf_counter()
    tok = build_tokenizer()
    model = build_tiny_model(tok, num_mtp_layers=cfg.mtp_layers, seed=cfg.seed).eval()
    n_shared = sum(p.numel() for p in model.shared_parameters())
    n_mtp = sum(p.numel() for p in model.mtp_parameters())
    enc = tok(["12+34 = 46", "7*8 = 56\n#### 56"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.token_log_probs(enc["input_ids"], enc["attention_mask"], with_entropy=True)
    print(f"tiny default: {n_shared:,} shared + {n_mtp:,} MTP parameters, {model.num_mtp} MTP layer(s)")
    print(f"main head: mean log-prob {out.log_probs[out.mask].mean():.3f} over {int(out.mask.sum())} tokens, "
          f"entropy {out.entropy[out.mask].mean():.3f}")
    for k in range(model.num_mtp):
        m = out.mtp_mask[k]
        print(f"MTP depth {k + 1}: mean log-prob {out.mtp_log_probs[k][m].mean():.3f} over {int(m.sum())} tokens")
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d, tokenizer=tok)
        again = MTPCausalLM.from_pretrained(d).eval()
        with torch.no_grad():
            same = torch.equal(again.token_log_probs(**enc).mtp_log_probs, out.mtp_log_probs)
    print(f"save -> load round trip identical: {same}; {time.perf_counter() - start:.1f}s")
    return 0 if same else 1
