"""Grid expansion (cells and their hashes), the per-cell lock, and kill -9 in the middle of a grid."""
import itertools
import os
import signal
import subprocess
import sys
import time

import pytest

from poisonbench.config import resolve
from poisonbench.grid import GridSpec, expand, parse_seeds, split_list, state
from poisonbench.registry import ATTACKS
from poisonbench.store import CellBusyError, cell_lock, is_running, read_runs


def test_split_list_keeps_bracketed_parameters_together():
    assert split_list("badnet[patch_size=3,location=random], blended ,sig") == [
        "badnet[patch_size=3,location=random]", "blended", "sig"]
    for bad in ("badnet[a=1", "badnet]", "badnet,,sig"):
        with pytest.raises(ValueError):
            split_list(bad)


def test_seed_lists_and_ranges():
    assert parse_seeds("0,1,2") == parse_seeds("0-2") == [0, 1, 2]
    assert parse_seeds("3,0-1,1") == [3, 0, 1]
    for bad in ("-1", "a", "3-1"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_grid_has_one_cell_per_combination_with_the_hash_of_its_config():
    cfgs = expand(GridSpec("all", "clip,roclip", "tiny", "0,1,2"))
    attacks = [a for a in ATTACKS.names() if a != "none"]
    assert len(cfgs) == len(attacks) * 2 * 3
    expected = [resolve(a, d, "tiny", s).run_id for a, d, s in itertools.product(attacks, ["clip", "roclip"], [0, 1, 2])]
    assert [c.run_id for c in cfgs] == expected  # same order, same hashes as one-cell runs


def test_sweeps_apply_to_the_attacks_that_have_the_parameter():
    spec = GridSpec("badnet[patch_size=3],targeted", "clip", "tiny", "0,1", attack_params={"n_poison": "25,50,100"})
    cfgs = expand(spec)
    badnet = [c for c in cfgs if c.attack == "badnet"]
    assert sorted((c.attack_params["n_poison"], c.seed) for c in badnet) == sorted(itertools.product([25, 50, 100], [0, 1]))
    assert all(c.attack_params["patch_size"] == 3 for c in badnet)
    assert len([c for c in cfgs if c.attack == "targeted"]) == 2  # one per seed: it has no n_poison
    assert len({c.run_id for c in cfgs}) == len(cfgs) == 8


def test_duplicate_cells_are_run_once_and_unknown_sweeps_are_refused():
    assert len(expand(GridSpec("badnet,badnet[n_poison=100]", "clip", "tiny", "0,0"))) == 1
    with pytest.raises(ValueError, match="no selected attack .* has a parameter 'pool_size'"):
        expand(GridSpec("badnet", "clip", "tiny", "0", attack_params={"pool_size": "1,2"}))


def test_a_cell_held_by_one_process_is_busy_for_another(tmp_path):
    cfg = resolve("badnet", "clip", "tiny")
    assert state(cfg, tmp_path) == "pending"
    with cell_lock(tmp_path, cfg.run_id):
        assert state(cfg, tmp_path) == "running"
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from poisonbench.store import cell_lock\n"
             f"with cell_lock({str(tmp_path)!r}, {cfg.run_id!r}): pass"],
            capture_output=True, text=True)
        assert probe.returncode != 0 and "CellBusyError" in probe.stderr
        with pytest.raises(CellBusyError):
            with cell_lock(tmp_path, cfg.run_id):
                pass
    assert state(cfg, tmp_path) == "pending"  # released


METRICS = ["clean_top1", "clean_top5", "asr", "linear_probe_top1", "i2t_r10", "t2i_r10", "final_loss"]


@pytest.mark.slow
def test_sigkill_mid_grid_then_rerun_completes_only_the_missing_cells(tmp_path):
    res = tmp_path / "res"
    grid = ["run", "-p", "tiny", "-a", "badnet[n_poison=20]", "-d", "clip,roclip", "--epochs", "12", "-q"]
    cmd = [sys.executable, "-m", "poisonbench", *grid, "--results", str(res)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # wait until the first cell is finished and the second has a checkpoint
    while time.time() < deadline:
        df = read_runs(res)
        if len(df) == 1 and [p for p in res.glob("checkpoints/*/last.pt") if p.parent.name != df["run_id"][0]]:
            break
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60  # the orphaned cell gets SIGTERM from the kernel and records a failed row
    while (len(read_runs(res)) < 2 or any(is_running(res, p.stem) for p in res.glob("locks/*.lock"))) \
            and time.time() < deadline:
        time.sleep(0.2)
    before = read_runs(res).set_index("run_id")
    assert sorted(before["status"]) == ["failed", "ok"]
    done_id = before.index[before["status"] == "ok"][0]

    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 done, 1 to run" in again.stdout
    after = read_runs(res).set_index("run_id")
    assert len(after) == 2 and set(after["status"]) == {"ok"}
    # the finished cell was not rerun: same metrics, same row
    assert [after.loc[done_id, m] for m in METRICS + ["finished_at"]] == [before.loc[done_id, m] for m in METRICS + ["finished_at"]]
    resumed = after.drop(index=done_id).iloc[0]
    assert resumed["resumed_from_epoch"] >= 1

    # the resumed cell ends with exactly the metrics of an uninterrupted run (CPU is deterministic)
    fresh = tmp_path / "fresh"
    solo = [sys.executable, "-m", "poisonbench", "run", "-p", "tiny", "-a", "badnet[n_poison=20]", "-d",
            resumed["defense"], "--epochs", "12", "-q", "--results", str(fresh)]
    assert subprocess.run(solo, capture_output=True, timeout=600).returncode == 0
    uninterrupted = read_runs(fresh).iloc[0]
    assert uninterrupted["run_id"] == resumed.name and uninterrupted["resumed_from_epoch"] == 0
    for m in METRICS:
        assert uninterrupted[m] == resumed[m], m


def test_every_attack_and_defense_can_run_on_the_tiny_profile():
    from poisonbench.grid import validate

    assert validate(expand(GridSpec("all,none", "all", "tiny", "0"))) == []


@pytest.mark.parametrize("spec, message", [
    (GridSpec(seeds="0-2147483648"), r"seed must be in \[0, 2\*\*31\)"),
    (GridSpec(seeds="0-100000"), "at most 10000 cells"),
    (GridSpec("badnet[n_poison=10]", attack_params={"n_poison": "20"}), "given both in brackets"),
    (GridSpec("badnet", attack_params={"pool_size": "1"}), "valid parameters: .*n_poison"),
])
def test_grid_mistakes_are_refused_before_anything_runs(spec, message):
    spec.profile = "tiny"
    with pytest.raises(ValueError, match=message):
        expand(spec)


def test_a_parameter_given_twice_is_refused():
    from poisonbench.grid import parse_assignments

    with pytest.raises(ValueError, match="given twice"):
        parse_assignments(["n_poison=10", "n_poison=20"])


# --- the processes of a cell are part of it -------------------------------------------------

def test_a_cell_is_trained_only_by_the_number_of_processes_it_was_resolved_for():
    from poisonbench.runner import ConfigError, prepare

    two = resolve("badnet", "clip", "tiny", world_size=2)
    with pytest.raises(ConfigError, match="cell of 2 process.*but 1 would train it.*--nproc 1"):
        prepare(two, "cpu")  # not under torchrun: one process
    assert expand(GridSpec("badnet", "clip", "tiny", world_size=2)) == [two]


def test_bench_run_under_torchrun_resolves_the_cells_for_its_processes(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from poisonbench import cli, distributed

    ran = []
    monkeypatch.setattr(distributed, "launched_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "launched", lambda: True)
    monkeypatch.setattr(cli, "run_here", lambda cfgs, *args: ran.extend(cfgs))
    out = CliRunner().invoke(cli.main, ["run", "-p", "tiny", "-a", "badnet", "-s", "0,1", "-r", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert ran == expand(GridSpec("badnet", "clip", "tiny", "0,1", world_size=2))


# --- one description of a grid: the follow-up commands name the same cells --------------------

FULL_GRID = ["-p", "tiny", "-a", "badnet[n_poison=20],blended", "-d", "clip,roclip", "-s", "0-1",
             "-A", "target=bag,shirt", "-D", "pool_size=128", "--data", "csv:/data/pairs.csv", "--eval", "cifar10:/data/c10",
             "--dataset-param", "n_train=100,200", "--dataset-param", "caption_key=caption",
             "--epochs", "1", "--batch-size", "32", "--lr", "0.0005", "--nproc", "2"]


def spec_of(args):
    """The GridSpec `bench status ARGS` selects, through the command line's own parsing."""
    from poisonbench import cli

    ctx = cli.status.make_context("status", list(args))
    return cli.grid_spec(**{k: v for k, v in ctx.params.items() if k != "list_store"})


def test_the_status_command_of_a_grid_parses_back_to_the_same_cells(tmp_path):
    spec = spec_of(FULL_GRID + ["-r", str(tmp_path / "my results")])
    assert (spec.data, spec.eval, spec.world_size, spec.training) == (
        "csv:/data/pairs.csv", "cifar10:/data/c10", 2, {"epochs": 1, "batch_size": 32, "lr": 0.0005})
    command = spec.command("status")
    assert command[:2] == ["bench", "status"]
    again = spec_of(command[2:])
    assert again == spec
    cfgs = expand(spec)
    assert len(cfgs) == 2 * 2 * 2 * 2 * 2  # attacks x defenses x seeds x targets x n_train
    assert [c.run_id for c in expand(again)] == [c.run_id for c in cfgs]
    assert {c.world_size for c in cfgs} == {2} and {c.dataset for c in cfgs} == {"files"}
    assert spec.command("report") == ["bench", "report", "-r", str(tmp_path / "my results")]
