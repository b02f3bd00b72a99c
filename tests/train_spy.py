"""A spy on the runner's calls of ``train``, shared by the tests of cached models and repairs."""
from __future__ import annotations

import poisonbench.runner as runner
from poisonbench.train import train


class Trainings:
    """Counts the runner's calls of ``train`` as (defense of the config, phase name or None); with
    ``kill_after``, raises KeyboardInterrupt after that epoch of a phase (a kill mid-fine-tuning)."""

    def __init__(self, monkeypatch, kill_after: int | None = None):
        self.calls: list[tuple[str, str | None]] = []

        def counted(model, tokenizer, data, defense, cfg, device, checkpoint=None, progress=True, on_epoch_end=None,
                    phase=None, **kw):
            self.calls.append((cfg.defense, phase.name if phase else None))

            def hook(epoch, model):
                if phase is not None and epoch == kill_after:
                    raise KeyboardInterrupt("killed after the first fine-tuning epoch")

            return train(model, tokenizer, data, defense, cfg, device, checkpoint, progress, hook, phase, **kw)

        monkeypatch.setattr(runner, "train", counted)
