"""GRPO with OCC in TRL: train an MTP model on one of our verifiable task families with `MTPGRPOTrainer`.

    python examples/trl_grpo_occ.py                          # tiny fresh default, a few steps on CPU
    python examples/trl_grpo_occ.py --model runs/base        # a checkpoint from `mtprl pretrain --output-dir runs/base`
    python examples/trl_grpo_occ.py --regime detach --steps 50

A fresh tiny model earns (almost) no reward, so its updates are near zero: start from a pre-trained
checkpoint (`mtprl pretrain`) or a real MTP model (any `MTPCausalLM.from_pretrained` directory) to
see learning. OCC needs several optimiser steps per rollout batch: `steps_per_generation` is 4×
`gradient_accumulation_steps` here, as in the paper (λ is 0 on the first of the four, see the log).
"""

import argparse

from trl import GRPOConfig

from mtprl.integrations.trl import MTPGRPOTrainer, task_dataset, task_reward_function
from mtprl.losses import MTP_REGIMES
from mtprl.model import MTPCausalLM, build_tiny_model, build_tokenizer
from mtprl.tasks import get_task, training_problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="MTPCausalLM checkpoint directory (default: the tiny fresh default)")
    parser.add_argument("--task", default="add", help="task family: add, expr or sort")
    parser.add_argument("--regime", default="occ", choices=list(MTP_REGIMES), help="MTP regime")
    parser.add_argument("--coef", type=float, default=0.1, help="base MTP coefficient λ₀")
    parser.add_argument("--steps", type=int, default=8, help="optimiser steps")
    parser.add_argument("--out", default="runs/trl_grpo_occ", help="output directory (final checkpoint here)")
    args = parser.parse_args()

    tokenizer = build_tokenizer()
    model = MTPCausalLM.from_pretrained(args.model) if args.model else build_tiny_model(tokenizer)
    task = get_task(args.task)
    dataset = task_dataset(training_problems(seed=0, n=256, families=[args.task], difficulties=[1]))

    config = GRPOConfig(
        output_dir=args.out, max_steps=args.steps, learning_rate=1e-4,
        per_device_train_batch_size=8, num_generations=8, gradient_accumulation_steps=1,
        steps_per_generation=4,  # 4 optimiser steps per rollout batch: OCC's δ is non-zero on steps 2-4
        max_completion_length=64, temperature=1.0, epsilon=0.2, epsilon_high=0.28, loss_type="dapo",
        bf16=False, use_cpu=not args.model, gradient_checkpointing=False, logging_steps=1, report_to=[],
        save_strategy="no",
    )
    trainer = MTPGRPOTrainer(
        model, reward_funcs=task_reward_function(task), args=config, train_dataset=dataset,
        processing_class=tokenizer, mtp_regime=args.regime, mtp_coef=args.coef,
    )
    trainer.train()
    for log in trainer.state.log_history:  # rewards are logged on the steps that generate
        if "mtp/lambda_mean" in log:
            print(f"step {log['step']:3d}  reward {log.get('reward', float('nan')):6.3f}  "
                  f"λ {log['mtp/lambda_mean']:+.4f}  loss {log['loss']:+.4f}")
    trainer.save_model(args.out)  # MiMo layout: MTPCausalLM.from_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
