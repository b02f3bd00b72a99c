"""kill -9 in the middle of a write: a result row or a checkpoint is never half-written over the
previous one, and a cell killed after its ok row is reported done."""
import json
import signal
import subprocess
import sys
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pandas as pd
import pytest

from poisonbench.config import resolve
from poisonbench.grid import state
from poisonbench.store import has_finished_row, read_runs, runs_dir, write_row
from poisonbench.train import load_checkpoint
from poisonbench.utils import remove_temp_files
from store_helpers import SUBPROCESS_ENV, stored_row, temp_files

# the start of both kill scripts: cut a file written in full to its first half (on disk), then kill -9
HALVE_THEN_DIE = r"""
import os, signal


def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)


def halve_then_die(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    die()
"""

KILL_ROW = HALVE_THEN_DIE + r"""
import json, sys
import pyarrow.parquet as pq
from poisonbench import store, utils

results, point, row = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if point == "mid-write":
    real = pq.write_table

    def half_then_die(table, where, **kw):
        real(table, where, **kw)
        halve_then_die(where)

    pq.write_table = half_then_die
else:  # the temp file is complete, the rename never happens
    utils.os.replace = die
store.write_row(row, results)
"""


@pytest.mark.parametrize("point", ["mid-write", "before-rename"])
def test_sigkill_while_writing_a_row_leaves_the_previous_row_untouched(tmp_path, point):
    path = write_row(stored_row("cell", "failed", None), tmp_path)
    before = path.read_bytes()
    new = stored_row("cell", "ok", 0.75)
    proc = subprocess.run([sys.executable, "-c", KILL_ROW, str(tmp_path), point, json.dumps(new)],
                          env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert path.read_bytes() == before  # the target was never half-written
    (leftover,) = temp_files(tmp_path)  # the killed writer's temp file ...
    assert leftover.parent == path.parent and leftover.name.startswith(".cell.parquet.")
    if point == "mid-write":
        with pytest.raises(pa.ArrowException):
            pq.read_table(leftover)  # ... is really partial
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ... and never read, not even to warn about it
        df = read_runs(tmp_path)
    expected = {**stored_row("cell", "failed", None), "clean_top1": None}
    (got,) = df.to_dict("records")  # every column of the store; the others are typed nulls
    assert {k: (None if pd.isna(got[k]) else got[k]) if not isinstance(got[k], (list, dict)) else got[k]
            for k in expected} == expected
    assert not has_finished_row(tmp_path, "cell")
    assert remove_temp_files(path) == [leftover] and temp_files(tmp_path) == []
    assert path.read_bytes() == before


KILL_CHECKPOINT = HALVE_THEN_DIE + r"""
import sys
from poisonbench import train
from poisonbench.config import resolve
from poisonbench.runner import run_cell

real, writes = train.atomic_write, []


def atomic_write(path, write):
    writes.append(path)
    if len(writes) < 2:
        return real(path, write)

    def half_then_die(tmp):  # epoch 2's checkpoint: half of it, then kill -9
        write(tmp)
        halve_then_die(tmp)

    real(path, half_then_die)


train.atomic_write = atomic_write
run_cell(resolve("badnet", "clip", "tiny", epochs=2), sys.argv[1], device="cpu", progress=False)
"""


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path):
    from poisonbench.runner import run_cell

    res = tmp_path / "res"
    cfg = resolve("badnet", "clip", "tiny", epochs=2)
    proc = subprocess.run([sys.executable, "-c", KILL_CHECKPOINT, str(res)], env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpt = res / "checkpoints" / cfg.run_id / "last.pt"
    assert load_checkpoint(ckpt)["epoch"] == 1  # epoch 1's checkpoint, whole
    assert [p.parent for p in temp_files(res)] == [ckpt.parent]  # epoch 2's half, beside it
    assert read_runs(res).empty and state(cfg, res) == "pending"  # no row; the lock died with the process

    row = run_cell(cfg, res, device="cpu", progress=False)
    assert row["status"] == "ok" and row["resumed_from_epoch"] == 1
    assert temp_files(res) == [] and not ckpt.parent.exists()  # the half checkpoint was removed


def test_a_cell_killed_after_writing_its_ok_row_is_reported_done_not_failed(tmp_path):
    from poisonbench.display import cell_line
    from poisonbench.grid import CellOutcome

    cfg, res = resolve("badnet", "clip", "tiny"), tmp_path / "res"
    write_row({"run_id": cfg.run_id, "status": "ok", "attack": "badnet", "defense": "clip", "clean_top1": 0.5,
               "asr": 0.9, "wall_s": 3.0}, res)
    line = cell_line(CellOutcome(cfg, -9, None), res)
    assert line.startswith("[yellow]done") and "exit -9" in line and "nothing recorded" not in line
    (runs_dir(res) / f"{cfg.run_id}.parquet").unlink()
    assert "nothing recorded, retried next time" in cell_line(CellOutcome(cfg, -9, None), res)
