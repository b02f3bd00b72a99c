"""A loss that becomes NaN or infinite fails the cell at that step, records it as failed and
stores nothing partial; the last complete checkpoint is kept."""
import re
import warnings

import pandas as pd
import pytest
import torch

from poisonbench.config import resolve
from poisonbench.grid import EXIT_FAILED, state
from poisonbench.store import has_finished_row, read_runs, runs_dir
from poisonbench.train import NonFiniteLossError, load_checkpoint
from store_helpers import temp_files


def test_huge_learning_rate_fails_the_cell_with_the_step_and_stores_nothing_partial(tmp_path, capsys):
    """`bench run -p tiny --lr 1e9 --epochs 1`, in this process: the loss becomes NaN, the cell
    stops and is recorded as failed with the step and the reason; no ok row, no metric, no half file."""
    from poisonbench.cli import run_cell_here

    res = tmp_path / "res"
    cfg = resolve("badnet", "clip", "tiny", lr=1e9, epochs=1)
    code = run_cell_here(cfg, res, "cpu", False, False, True)
    err = " ".join(capsys.readouterr().err.split())
    assert code == EXIT_FAILED
    assert re.search(r"run failed: NonFiniteLossError: non-finite loss nan at step \d+ \(epoch 1\); lower the "
                     r"learning rate \(recorded with status=failed", err), err
    assert [p.name for p in runs_dir(res).iterdir()] == [f"{cfg.run_id}.parquet"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = read_runs(res)
    row = df.iloc[0]
    assert len(df) == 1 and row["status"] == "failed"
    assert re.fullmatch(r"NonFiniteLossError: non-finite loss nan at step \d+ \(epoch 1\); lower the learning rate",
                        row["error"])
    assert pd.isna(row["clean_top1"]) and pd.isna(row["asr"])  # no number recorded (typed nulls)
    assert not has_finished_row(res, cfg.run_id) and state(cfg, res) == "failed"
    assert temp_files(res) == []


def test_nan_loss_stops_training_at_that_step_and_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch):
    """A loss that turns NaN at the second step of epoch 2 (of 3): NonFiniteLossError names that
    step, no further step is trained, the row says failed at that step, and epoch 1's checkpoint
    is left whole and finite for the next run."""
    from poisonbench.defenses.base import Defense
    from poisonbench.runner import run_cell

    real_loss, calls, bad_step = Defense.loss, [], []

    def loss(self, image_emb, text_emb, logit_scale, st):
        calls.append((st.epoch, st.step))
        out = real_loss(self, image_emb, text_emb, logit_scale, st)
        if st.epoch == 2 and sum(e == 2 for e, _ in calls) == 2:  # the second step of epoch 2
            bad_step.append(st.step)
            return out * float("nan")
        return out

    monkeypatch.setattr(Defense, "loss", loss)
    res = tmp_path / "res"
    cfg = resolve("badnet", "clip", "tiny", epochs=3)
    with pytest.raises(NonFiniteLossError) as e:
        run_cell(cfg, res, device="cpu", progress=False)
    assert e.value.step == bad_step[0] and e.value.epoch == 2
    assert calls[-1] == (2, bad_step[0])  # nothing trained after the NaN
    row = read_runs(res).iloc[0]
    assert row["status"] == "failed" and f"at step {bad_step[0]} (epoch 2)" in row["error"]
    state_ = load_checkpoint(res / "checkpoints" / cfg.run_id / "last.pt")  # epoch 1's, complete and finite
    assert state_["epoch"] == 1 and all(torch.isfinite(v).all() for v in state_["model"].values())
    assert temp_files(res) == []
