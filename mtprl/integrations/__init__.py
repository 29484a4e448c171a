"""Thin adapters that bring the MTP regimes and OCC into other RL frameworks.

- `mtprl.integrations.trl`:  `MTPGRPOTrainer`, a TRL `GRPOTrainer` that trains an `MTPCausalLM` under
  any regime, and `task_reward_function` / `task_dataset` to use our tasks with TRL
  (`pip install mtprl[trl]`).
- `mtprl.integrations.verl`: the `occ` and `mtp_policy` policy losses in verl's registry, and
  `mtp_ppo_loss`, the actor loss that hands an MTP model's log-probs to them
  (`pip install mtprl[verl]`).

Both only call `mtprl.losses`; neither copies a framework's trainer. This package imports neither
framework: import the submodule you need (importing `mtprl.integrations.verl` registers its losses
with verl, which is what it is for).
"""
