"""Distillation: teacher/student losses (output, VDMini ICD + MCA, router budget) and PARE's
progressive trainer (stage 1: width recovery, router off; stage 2: student + router jointly).

`distill(student_graph, teacher_graph, config) -> graph` runs it all on graphs (graphopt.distill.run)."""

from graphopt.distill.config import DistillConfig, config_from_dict, load_config, read_config
from graphopt.distill.losses import ICDLoss, MCADiscriminator, MCALoss, OutputLoss, RouterBudgetLoss
from graphopt.distill.checkpoint import latest_checkpoint
from graphopt.distill.data import DistillData
from graphopt.distill.trainer import DistillPair, Outputs, TrainResult, output_error, train
from graphopt.distill.run import DistillReport, distill, distill_config, save_distilled

__all__ = [
    "DistillConfig",
    "DistillData",
    "DistillPair",
    "DistillReport",
    "ICDLoss",
    "MCADiscriminator",
    "MCALoss",
    "OutputLoss",
    "Outputs",
    "RouterBudgetLoss",
    "TrainResult",
    "config_from_dict",
    "distill",
    "distill_config",
    "latest_checkpoint",
    "load_config",
    "output_error",
    "read_config",
    "save_distilled",
    "train",
]
