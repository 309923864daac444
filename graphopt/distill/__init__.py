"""Distillation: teacher/student losses (output, VDMini ICD + MCA, router budget) and PARE's
progressive trainer (stage 1: width recovery, router off; stage 2: student + router jointly)."""

from graphopt.distill.config import DistillConfig, config_from_dict, load_config
from graphopt.distill.losses import ICDLoss, MCADiscriminator, MCALoss, OutputLoss, RouterBudgetLoss
from graphopt.distill.trainer import (
    DistillData,
    DistillPair,
    Outputs,
    TrainResult,
    latest_checkpoint,
    output_error,
    train,
)

__all__ = [
    "DistillConfig",
    "DistillData",
    "DistillPair",
    "ICDLoss",
    "MCADiscriminator",
    "MCALoss",
    "OutputLoss",
    "Outputs",
    "RouterBudgetLoss",
    "TrainResult",
    "config_from_dict",
    "latest_checkpoint",
    "load_config",
    "output_error",
    "train",
]
