"""The trainer: train(cfg) runs one SAE to a finished run directory, train_pack(cfgs) several at once.

trainer.py holds one run (Trainer) and train(); loop.py the batch loop and what runs on one stream
share; pack.py train_pack; evaluate.py the held-out evaluation; checkpoint.py and schedule.py the
checkpoint file and the lr / sparsity-coefficient schedules.
"""

from sae_sweep.train.evaluate import Evaluation, evaluate_sae
from sae_sweep.train.pack import train_pack
from sae_sweep.train.trainer import train

__all__ = ["Evaluation", "evaluate_sae", "train", "train_pack"]
