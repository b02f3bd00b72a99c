"""Built-in defenses. Importing this package registers none of them: the registry imports the
modules named in ``BUILTIN_MODULES`` on its first look-up."""
from .base import (KINDS, UNDEFENDED, DataFilter, Defense, DefenseBase, EpochContext, PhaseSettings,
                   PostTrainingRepair, TaskBatch, TrainingPass, TrainingTask, TrainState)

# Modules of this package that register the built-in defenses (imported by ``registry.Registry``).
BUILTIN_MODULES = ("aug_only", "cleanclip", "clip", "density_filter", "roclip", "safeclip")

__all__ = ["Defense", "DefenseBase", "TrainingTask", "TaskBatch", "DataFilter", "PostTrainingRepair",
           "PhaseSettings", "TrainState", "TrainingPass", "EpochContext", "KINDS", "UNDEFENDED", "BUILTIN_MODULES"]
