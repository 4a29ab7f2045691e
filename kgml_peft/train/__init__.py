"""One Accelerate training loop, objectives (Eq. 1) and the staged KGML-ag pretraining."""

from kgml_peft.train.loop import PhaseConfig, run_phase
from kgml_peft.train.pretrain import PretrainConfig, PretrainResult, default_phases, pretrain

__all__ = ["PhaseConfig", "PretrainConfig", "PretrainResult", "default_phases", "pretrain", "run_phase"]
