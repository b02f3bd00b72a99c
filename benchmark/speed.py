"""Speed options of the trainer (``bench run --speed``), off by default until ``bench perf``
shows they pay (README, Performance). Each changes how the arithmetic is scheduled, not what is
computed: a cell's numbers agree with the plain run to floating-point tolerance, not bit for bit
(a test), so the options a row was trained with are stored in it (``speed_options``) and they are
not part of the run id.

- ``compile``: ``torch.compile`` of the model's training forward pass (inductor; on a CPU it needs a
  C++ compiler, and the first step of a run compiles for tens of seconds).
- ``fused-adamw``: ``torch.optim.AdamW(fused=True)``, one kernel for all parameters' updates.
- ``channels-last``: a convolutional image tower (ResNets) and its inputs in channels-last memory
  format; a no-op for ViTs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

SPEED_ENV = "POISONBENCH_SPEED"  # set by `bench run --speed`; read by every cell it starts
NAMES = {"compile": "compile", "fused-adamw": "fused_adamw", "channels-last": "channels_last"}


@dataclass(frozen=True)
class SpeedOptions:
    """Which speed options are on (see the module docstring)."""

    compile: bool = False
    fused_adamw: bool = False
    channels_last: bool = False

    @classmethod
    def parse(cls, text: str) -> "SpeedOptions":
        """From a comma list of option names (``compile,fused-adamw``); "" or ``plain``: all off.
        Raises ValueError naming the valid options for an unknown one."""
        names = [t.strip() for t in text.split(",") if t.strip() and t.strip() != "plain"]
        unknown = [n for n in names if n not in NAMES]
        if unknown:
            raise ValueError(f"unknown speed option(s) {', '.join(unknown)}; valid: {', '.join(NAMES)} (or plain)")
        return cls(**{NAMES[n]: True for n in names})

    def names(self) -> list[str]:
        """The names of the options that are on, in NAMES order."""
        return [name for name, attr in NAMES.items() if getattr(self, attr)]

    def __str__(self) -> str:
        return ",".join(self.names()) or "plain"

    def optimizer(self, groups: list[dict], lr: float) -> torch.optim.AdamW:
        """The trainer's AdamW (betas 0.9/0.999, eps 1e-8) over parameter ``groups``, fused when asked."""
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, **({"fused": True} if self.fused_adamw else {}))

    def layout(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model``, changed in place to channels-last when asked and convolutional."""
        if self.channels_last and is_convolutional(model):
            model.to(memory_format=torch.channels_last)
        return model

    def wrap(self, net: torch.nn.Module) -> torch.nn.Module:
        """The module to call for training steps: ``net`` compiled when asked, else ``net``."""
        return torch.compile(net) if self.compile else net

    def input_format(self, model: torch.nn.Module) -> torch.memory_format:
        """The memory format of ``model``'s float image inputs [B, 3, S, S] under these options
        (channels-last for a convolutional model when asked); asked once per run, not per step."""
        return torch.channels_last if self.channels_last and is_convolutional(model) else torch.contiguous_format


def is_convolutional(model: torch.nn.Module) -> bool:
    """True when the model's image tower has 2-D convolutions beyond a patch embedding (a ResNet)."""
    visual = getattr(model, "visual", model)
    return sum(isinstance(m, torch.nn.Conv2d) for m in visual.modules()) > 1


def from_env() -> SpeedOptions:
    """The options ``bench run --speed`` set for this process (``POISONBENCH_SPEED``); all off when unset."""
    try:
        return SpeedOptions.parse(os.environ.get(SPEED_ENV, ""))
    except ValueError as e:
        raise ValueError(f"{SPEED_ENV}: {e}") from None

