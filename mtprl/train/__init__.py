"""Training: pre-training of the embedded default (`mtprl.train.pretrain`) and the RL loop."""
