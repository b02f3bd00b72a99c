"""Two `bench run` on one results folder at once lose and duplicate nothing."""
import os
import subprocess
import sys
import warnings

import pytest

from poisonbench.grid import GridSpec, expand
from poisonbench.store import read_runs, runs_dir
from store_helpers import SUBPROCESS_ENV, temp_files

SLOW_CHECKPOINTS = """
import os, time
import poisonbench.train as train

real_save = train.save_checkpoint


def save_checkpoint(*args, **kwargs):  # a second of sleep per epoch: the two runs' trainings overlap
    time.sleep(float(os.environ["POISONBENCH_TEST_EPOCH_SLEEP"]))
    return real_save(*args, **kwargs)


train.save_checkpoint = save_checkpoint
"""


@pytest.mark.slow
def test_two_bench_runs_on_one_store_at_once_lose_and_duplicate_nothing(tmp_path):
    """Two overlapping grids (badnet x clip in both, first) start together on one results folder:
    every cell ends with exactly one ok row, and the common cell was trained once (the other
    process found it running, or done). Every process sleeps a second per epoch (sitecustomize),
    which costs no CPU but makes the trainings of the common cell overlap."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(SLOW_CHECKPOINTS)
    env = {**SUBPROCESS_ENV, "POISONBENCH_TEST_EPOCH_SLEEP": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    res = tmp_path / "res"
    grids = ["badnet,blended", "badnet,sig"]
    procs = [subprocess.Popen([sys.executable, "-m", "poisonbench", "run", "-p", "tiny", "-a", attacks, "-d", "clip",
                               "--results", str(res)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for attacks in grids]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    cells = {c.run_id for attacks in grids for c in expand(GridSpec(attacks, "clip", "tiny", "0"))}
    assert len(cells) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = read_runs(res)
    assert sorted(df["run_id"]) == sorted(cells) and set(df["status"]) == {"ok"}
    assert sorted(p.name for p in runs_dir(res).iterdir()) == sorted(f"{c}.parquet" for c in cells)
    assert sum(out.count("epoch 2/2: loss") for out in outs) == len(cells), outs  # each cell trained once
    assert temp_files(res) == [] and not list((res / "checkpoints").glob("*/last.pt"))
