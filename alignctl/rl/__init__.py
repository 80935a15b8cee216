"""alignctl's own reinforcement learning from a reward model: PPO (``ppo_core``), KL controllers (``kl``), the
PPO configuration (``ppo_config``) and the training loop (``ppo_trainer``). Nothing here is imported by ``plan``."""
