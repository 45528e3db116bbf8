"""JOINT: the upper bound every continual table is read against (not a continual method).

SeqLoRA's adapter and one head over every class, trained on every task's training data at once
(instruction streams: multi-task training on the union), then scored on every task's test set by the
same evaluator as the others. The run (`train/joint.py`) chooses its own rate and epochs on a seeded
held-out part of the merged training data: first a linear probe on the frozen features, then LoRA +
head fine-tuning started from the probe's head (LP-FT, Kumar et al. 2022), at each rate of
`learning_rates` for up to `max_epochs` epochs; the probe alone is a candidate too, so the chosen model
is never below the probe on held-out data. The chosen setting is retrained on all the training data.

Its accuracy matrix holds one model's scores (there is no "after task j"): BWT, forgetting and the
incremental averages are not reported for it.
"""
from __future__ import annotations

import dataclasses

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.errors import ConfigError
from jaxtree_lora.methods.seqlora import SeqLoRA


@dataclasses.dataclass(frozen=True)
class Joint(SeqLoRA):
    """SeqLoRA's spec trained on all tasks at once, rate and epochs chosen on held-out training data."""

    name = "joint"
    continual = False
    lora: lora_lib.LoraSpec = lora_lib.LoraSpec(dropout=0.1)
    # Share of each task's training rows (per class on classification streams) held out for selection.
    holdout: float = 0.15
    # Fine-tuning rates tried from the probe's head; () tries the config's optimiser rate alone.
    learning_rates: tuple = (1e-4, 3e-4, 1e-3)
    # Most epochs tried per rate (each epoch scored on the held-out part); 0: the config's train.epochs.
    max_epochs: int = 0
    # The linear probe: full-batch Adam on cached frozen features, its L2 weight chosen on held-out data.
    probe_steps: int = 300
    probe_learning_rate: float = 1e-2
    probe_l2: tuple = (1e-3, 1e-2, 1e-1)
    # False: no selection; the probe's head, then max_epochs at the first rate (a quick joint run).
    select: bool = True
    # False: fine-tuning starts from the zero head instead of the probe's (the ablation of LP-FT).
    probe_first: bool = True

    def __post_init__(self):
        where = "config.method.joint"
        if not 0.0 <= float(self.holdout) < 1.0:
            raise ConfigError(f"{where}.holdout is the share of training rows held out: give 0 <= holdout < 1, "
                              f"got {self.holdout}")
        if any(not float(rate) > 0 for rate in self.learning_rates):
            raise ConfigError(f"{where}.learning_rates must all be > 0, got {list(self.learning_rates)}")
        if int(self.max_epochs) < 0 or int(self.probe_steps) < 1 or not float(self.probe_learning_rate) > 0:
            raise ConfigError(f"{where}: max_epochs >= 0 (0: train.epochs), probe_steps >= 1 and "
                              f"probe_learning_rate > 0, got {self.max_epochs}, {self.probe_steps}, "
                              f"{self.probe_learning_rate}")
        if not self.probe_l2 or any(float(l2) < 0 for l2 in self.probe_l2):
            raise ConfigError(f"{where}.probe_l2 must list at least one weight >= 0, got {list(self.probe_l2)}")

    def prepare_task(self, trainable, state, context):
        # The continual loop would train it task after task (SeqLoRA, mislabelled): refuse that.
        raise ConfigError("joint trains on every task at once: run it with `jaxtree-lora run "
                          "--config.method.name=joint` (train.joint.JointRun), not the continual loop")
