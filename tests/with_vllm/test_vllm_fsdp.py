"""`rollout_backend: vllm` on 2 CPU processes (gloo, torchrun): each rank's own engine serves the trained weights.

The slow test launches this file under `torchrun --nproc_per_node 2` (the vLLM environment's python) twice, with
`parallel: fsdp` and with `parallel: ddp`. Each rank starts a run on the shipped base (MTP drafting of one token),
takes 2 steps and, before the first and after each, compares on fixed prompts its engine's greedy tokens, MTP
acceptance and log-probs with its own trainer's model (gathered from the shards): equal after every push, and
different from the start's after the steps (so a skipped or partial push would show). The FSDP and DDP runs sample
the same prompts with the same seeds on each rank, so their step metrics agree within float tolerance.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtprl.train.distributed import free_port

REPO = Path(__file__).resolve().parents[2]
STEPS = 2
COMPARED = ("pg/loss", "mtp/0/loss", "grad_norm", "mtp/grad_norm", "entropy", "reward/mean",
            "rollout/mismatch_abs", "rollout/accept_rate/0", "response_len/mean")


def _rows(r):
    return [r.response_ids[i, : r.lengths[i]].tolist() for i in range(len(r.lengths))]


def _check(run, prompts) -> dict:
    """This rank's engine against this rank's trainer model on `prompts`, greedily."""
    from mtprl.rollout import SamplingParams, generate
    from mtprl.train.fsdp import gathered

    greedy = SamplingParams(max_new_tokens=24, temperature=0, draft_tokens=1)
    eos = run.tokenizer.eos_token_id
    served = run.engine.generate(prompts, greedy, eos)
    with gathered(run.model), torch.no_grad():
        ours = generate(run.model, prompts, greedy, eos_token_id=eos)
        ids = torch.cat([served.prompt_ids, served.response_ids], 1)
        mask = torch.cat([served.prompt_mask, served.response_mask], 1)
        lp = run.model.token_log_probs(ids, mask, mtp=False).log_probs[:, served.prompt_ids.shape[1]:]
    return {"served": _rows(served), "ours": _rows(ours),
            "lp_gap": float((lp - served.log_probs)[served.response_mask].abs().max()),
            "accept_served": served.metrics["rollout/accept_rate/0"], "accept_ours": ours.metrics["rollout/accept_rate/0"]}


def _worker(out: Path, base: str, parallel: str) -> None:
    from mtprl.tasks.suites import SUITES, suite_problems
    from mtprl.train.config import TrainConfig
    from mtprl.train.distributed import shutdown
    from mtprl.train.loop import _start
    from mtprl.train.rundir import RunLock

    torch.set_num_threads(1)
    run_dir = out / parallel
    cfg = TrainConfig(model=base, rollout_backend="vllm", draft_tokens=1, regime="ce", mtp_coef=5.0, steps=STEPS,
                      prompts_per_step=4, group_size=4, mini_batches=2, micro_batch_size=4, max_new_tokens=24,
                      max_draws=1, lr=1e-2, eval_every=0, eval_at_start=False, eval_limit=2, eval_suites=["add-easy"],
                      exact_every=0, save_every=0, output_dir=str(run_dir), progress=False, tis_cap=2.0,
                      vllm_kv_cache_mb=32, parallel=parallel)
    lock = RunLock(run_dir)
    run, _ = _start(cfg, lock)
    assert run.dist.world == 2
    tok = run.tokenizer
    prompts = [tok(p.prompt)["input_ids"] for name in SUITES for p in suite_problems(name)[:2]]
    checks, records = [_check(run, prompts)], []
    for step in range(1, STEPS + 1):
        records.append(run.step(step))
        checks.append(_check(run, prompts))
    (out / f"{parallel}-rank{run.dist.rank}.json").write_text(json.dumps({"checks": checks, "records": records}))
    run.dist.barrier()
    run.engine.close()  # last: it ends the process group too
    lock.release()
    shutdown()



def _launch(tmp_path: Path, base: Path, parallel: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), __file__, str(tmp_path), str(base), parallel]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-6000:]
    return [json.loads((tmp_path / f"{parallel}-rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_process_engines_serve_the_trained_weights(tmp_path, base_dir):
    fsdp = _launch(tmp_path, base_dir, "fsdp")
    for rank in fsdp:
        start, *after = rank["checks"]
        assert start["served"] == start["ours"]
        for check in after:  # after every step's push: the engine generates what the trainer's model does
            assert check["served"] == check["ours"]
            assert check["lp_gap"] < 1e-3
            assert check["accept_served"] == pytest.approx(check["accept_ours"], abs=0.005)
        assert after[-1]["ours"] != start["ours"]  # the steps moved the trunk: a skipped push would show
        assert rank["records"][1]["rollout/mismatch_abs"] < 1e-4  # step 2 sampled from the pushed weights
        assert "time/weight_sync_s" in rank["records"][1]
    # Data-parallel, same prompts and seeds per rank: the same steps within float tolerance.
    ddp = _launch(tmp_path, base_dir, "ddp")
    for a, b in zip(fsdp, ddp):
        assert [c["served"] for c in a["checks"]] == [c["served"] for c in b["checks"]]
        for ra, rb in zip(a["records"], b["records"]):
            for key in COMPARED:
                assert ra[key] == pytest.approx(rb[key], abs=1e-5, rel=1e-5), key


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
