"""`mtprl smoke`: build the tiny default, score a few texts with every head, save and reload it."""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from mtprl.model import MTPCausalLM, build_tiny_model, build_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mtp-layers", type=int, default=1, help="number of MTP layers (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="initialisation seed")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    tok = build_tokenizer()
    model = build_tiny_model(tok, num_mtp_layers=args.mtp_layers, seed=args.seed).eval()
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
