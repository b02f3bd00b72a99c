"""Built-in defenses. Importing this package registers none of them: the registry imports the
modules named in ``BUILTIN_MODULES`` on its first look-up."""
from .base import (KINDS, UNDEFENDED, DataFilter, Defense, DefenseBase, PhaseSettings, PostTrainingRepair, TaskBatch,
                   TrainingTask, TrainState)

# Modules of this package that register the built-in defenses (imported by ``registry.Registry``).
BUILTIN_MODULES = ("aug_only", "cleanclip", "clip", "density_filter", "roclip")

__all__ = ["Defense", "DefenseBase", "TrainingTask", "TaskBatch", "DataFilter", "PostTrainingRepair",
           "PhaseSettings", "TrainState", "KINDS", "UNDEFENDED", "BUILTIN_MODULES"]
