"""Distributed training (DDP) on the CPU: 2 processes, gloo backend, started with
torch.multiprocessing.spawn (``bench run --nproc`` itself goes through torchrun: the slow test).

Starting a process that imports torch and open_clip takes seconds, so one spawn runs every
scenario (``scenarios``); each scenario saves what it saw, or its traceback, per rank, and the
tests check those."""
import copy
import datetime
import json
import os
import socket
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from click.testing import CliRunner

from poisonbench import distributed
from poisonbench.cli import main
from poisonbench.config import resolve
from poisonbench.datasets.base import CaptionDataset
from poisonbench.defenses.base import TrainState
from poisonbench.defenses.clip import CLIP, CLIPParams
from poisonbench.defenses.roclip import RoCLIP, RoCLIPParams
from poisonbench.grid import cell_command
from poisonbench.models import create_model
from poisonbench.store import read_runs

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    # a scenario that fails on one rank only leaves the other waiting in a collective: until this timeout
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(minutes=5))
    try:
        for name, fn in SCENARIOS.items():
            try:
                result = fn(rank, out / name)
            except Exception:
                result = {"error": traceback.format_exc()}
            torch.save(result, out / f"{name}.{rank}.pt")
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory):
    """Run every scenario in WORLD fresh processes sharing a gloo group; name -> function of
    (rank, name) -> that rank's result (the scenario's folder is ``out / name``)."""
    out = tmp_path_factory.mktemp("ddp")
    for name in SCENARIOS:
        (out / name).mkdir()
    mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=True)

    def result(name, rank):
        r = torch.load(out / f"{name}.{rank}.pt")
        assert "error" not in r, f"rank {rank}: {r['error']}"
        return r

    result.folder = lambda name: out / name
    return result


# --- a. loss and gradients equal those of one process on the concatenated batch -------------

B = 4  # per rank


def defenses():
    """name -> (a fresh defense, the training state its loss is called with). RoCLIP's pool is
    filled with the same 16 random captions on every rank, and epoch 2 is a matching epoch."""
    pool = F.normalize(torch.randn(16, 32, generator=torch.Generator().manual_seed(3)), dim=1)

    def roclip():
        d = RoCLIP(RoCLIPParams(pool_size=16, match_every=2, augment=False), seed=0)
        d._enqueue(pool)
        return d

    return {"clip": (lambda: CLIP(CLIPParams(), 0), TrainState(1, 0)), "roclip": (roclip, TrainState(2, 0))}


def global_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B * WORLD, 3, 28, 28, generator=g), torch.randint(1, 49406, (B * WORLD, 20), generator=g)


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def gradients_scenario(rank, out):
    torch.manual_seed(0)
    base, _ = create_model("poisonbench-tiny")
    x, t = global_batch()
    mine = slice(rank * B, (rank + 1) * B)
    result = {}
    for name, (make, state) in defenses().items():
        ref = copy.deepcopy(base)  # one process, the concatenated batch
        img, txt, scale = ref(x, t)
        ref_loss = make().loss(img, txt, scale, state)
        ref_loss.backward()

        runs = {}
        for gather in (True, False):  # without the gather: the control, which must differ
            model = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(base))
            img, txt, scale = model(x[mine], t[mine])
            if gather:
                img, txt = distributed.gather_with_grad(img, txt)
            loss = make().loss(img, txt, scale, state)
            loss.backward()
            runs[gather] = (loss.detach(), grads(model.module))
        loss, g = runs[True]
        result[name] = {
            "loss_diff": (loss - ref_loss.detach()).abs().item(),
            "names": sorted(g), "ref_names": sorted(grads(ref)), "all_names": sorted(n for n, _ in base.named_parameters()),
            "grad_diff": max((g[n] - p.grad).abs().max().item() for n, p in ref.named_parameters()),
            "control_diff": max((runs[False][1][n] - p.grad).abs().max().item() for n, p in ref.named_parameters()),
        }
    return result


def test_ddp_loss_and_gradients_equal_one_process_on_the_concatenated_batch(scenarios):
    for rank in range(WORLD):
        for name, r in scenarios("gradients", rank).items():
            assert r["names"] == r["ref_names"] == r["all_names"], name  # every parameter has a gradient
            assert r["loss_diff"] < 1e-5, (name, rank, r)
            assert r["grad_diff"] < 1e-5, (name, rank, r)
            assert r["control_diff"] > 1e-3, (name, rank, r)  # the gather is what makes them equal


# --- b. the RoCLIP pool is the same on every rank after training ----------------------------


def tiny_data(n=40) -> CaptionDataset:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % 4
    words = ["cat", "dog", "bag", "shoe"]
    captions = [f"a photo of a {words[y]} number {i}" for i, y in enumerate(labels.tolist())]
    return CaptionDataset(torch.randint(0, 256, (n, 3, 28, 28), generator=g, dtype=torch.uint8), captions, labels)


class Crash(RuntimeError):
    pass


def crash_after_first_epoch(epoch, model):
    if epoch == 1:
        raise Crash


class RecordingImages:
    """Training images that remember which rows each step read."""

    def __init__(self, images: torch.Tensor):
        self.images, self.shape, self.rows = images, images.shape, []

    def __getitem__(self, idx):
        self.rows.append(idx.clone())
        return self.images[idx]


def train_roclip(out, on_epoch_end=None) -> dict:
    from poisonbench.train import train

    cfg = resolve("none", "roclip", "tiny", defense_params={"pool_size": 24, "match_every": 1, "augment": False},
                  epochs=2, batch_size=4)
    defense = RoCLIP(RoCLIPParams(pool_size=24, match_every=1, augment=False), seed=0)
    torch.manual_seed(0)
    model, tokenizer = create_model("poisonbench-tiny")
    data = tiny_data()
    data.images = RecordingImages(data.images)
    result = train(model, tokenizer, data, defense, cfg, torch.device("cpu"), out / "last.pt", progress=False,
                   on_epoch_end=on_epoch_end)
    return {"pool": defense.pool.state_dict(), "steps": result.steps, "model": model.state_dict(),
            "resumed_from_epoch": result.resumed_from_epoch, "rows": data.images.rows}


def pool_scenario(rank, out):
    return train_roclip(out)


def resume_scenario(rank, out):
    """Killed after epoch 1 (on every rank, as torchrun would), then run again."""
    try:
        train_roclip(out, crash_after_first_epoch)
    except Crash:
        pass
    return train_roclip(out)


def pool_without_gather_scenario(rank, out):
    """The control: without the gather each rank enqueues only its own captions."""
    gather = distributed.gather_with_grad
    distributed.gather_with_grad = lambda image_emb, text_emb: (image_emb, text_emb)
    try:
        return train_roclip(out)
    finally:
        distributed.gather_with_grad = gather


@pytest.mark.parametrize("name", ["pool", "pool_without_gather"])
def test_roclip_pool_is_identical_on_every_rank(scenarios, name):
    a, b = (scenarios(name, r) for r in range(WORLD))
    assert a["steps"] == b["steps"] == 2 * (40 // (4 * WORLD))  # the global batch is 4 x 2
    pa, pb = a["pool"], b["pool"]
    assert pa["count"] == 24 and (pa["ptr"], pa["count"]) == (pb["ptr"], pb["count"])
    if name == "pool":
        assert torch.equal(pa["bank"], pb["bank"])
        assert torch.load(scenarios.folder(name) / "last.pt", weights_only=True)["world_size"] == WORLD
    else:
        assert not torch.equal(pa["bank"], pb["bank"])


def test_each_rank_takes_its_slice_of_the_global_batch_of_a_common_permutation(scenarios):
    from poisonbench.utils import derive_seed

    rows = [scenarios("pool", r)["rows"] for r in range(WORLD)]
    steps = 40 // (4 * WORLD)
    for epoch in (1, 2):
        order = torch.randperm(40, generator=torch.Generator().manual_seed(derive_seed(0, "shuffle", epoch)))
        for b in range(steps):
            step = (epoch - 1) * steps + b
            assert torch.equal(torch.cat([rows[r][step] for r in range(WORLD)]), order[b * 8 : (b + 1) * 8])


def test_ddp_resumed_from_a_checkpoint_repeats_the_uninterrupted_run(scenarios):
    for rank in range(WORLD):
        resumed, straight = scenarios("resume", rank), scenarios("pool", rank)
        assert resumed["resumed_from_epoch"] == 1 and straight["resumed_from_epoch"] == 0
        assert torch.equal(resumed["pool"]["bank"], straight["pool"]["bank"])
        for k, v in straight["model"].items():
            assert torch.equal(resumed["model"][k], v), k


# --- c. one result row for a cell run by 2 processes ----------------------------------------


def cell_scenario(rank, results):
    from poisonbench import runner

    writes, write_row = [], runner.write_row
    runner.write_row = lambda row, res: writes.append(row["status"]) or write_row(row, res)
    try:
        cfg = resolve("badnet", "clip", "tiny", attack_params={"n_poison": 20}, epochs=1, world_size=WORLD,
                      dataset_params={"n_train": 256, "n_eval": 100, "n_probe": 100, "n_heldout": 50})
        cell = runner.prepare(cfg, "cpu")
        row = runner.execute(cell, results, progress=False)
    finally:
        runner.write_row = write_row
    return {"writes": writes, "returned_row": row is not None}


def test_a_two_process_cell_writes_exactly_one_row_from_rank_0(scenarios):
    zero, one = scenarios("cell", 0), scenarios("cell", 1)
    assert zero == {"writes": ["ok"], "returned_row": True} and one == {"writes": [], "returned_row": False}
    results = scenarios.folder("cell")
    df = read_runs(results)
    assert len(df) == 1 and len(list((results / "runs").iterdir())) == 1
    r = df.iloc[0]
    assert r["status"] == "ok" and r["world_size"] == WORLD
    assert r["steps"] == 276 // (64 * WORLD)  # 256 + 20 poisoned pairs, batch 64 per process, one epoch
    assert not (results / "checkpoints" / r["run_id"]).exists()
    # trigger survival counts the poisoned views of both processes (every row of the epoch's global batches)
    from poisonbench.utils import derive_seed

    cell = runner_prepare(r)
    order = torch.randperm(276, generator=torch.Generator().manual_seed(derive_seed(0, "shuffle", 1)))
    used = order[: r["steps"] * 64 * WORLD]
    assert r["trig_n"] == int(cell.plan.train.is_poison[used].sum()) > 0 and r["trig_present"] == 1.0


def runner_prepare(row):
    from poisonbench import runner

    cfg = resolve("badnet", "clip", "tiny", attack_params={"n_poison": 20}, epochs=1, world_size=WORLD,
                  dataset_params={"n_train": 256, "n_eval": 100, "n_probe": 100, "n_heldout": 50})
    assert cfg.run_id == row["run_id"]
    return runner.prepare(cfg, "cpu", world_size=WORLD)


def badclip_scenario(rank, results):
    """A two-process badclip cell that starts from the clean model: the clean model is trained by
    both processes, the trigger optimised once, on rank 0, and every rank poisons with it."""
    from poisonbench import runner
    from poisonbench.attacks.badclip import BadCLIP

    calls, optimise = [], BadCLIP.optimise
    BadCLIP.optimise = lambda self, data, context: calls.append(rank) or optimise(self, data, context)
    try:
        cfg = resolve("badclip", "clip", "tiny", attack_params={"n_poison": 20}, epochs=1, world_size=WORLD,
                      init="clean", dataset_params={"n_train": 256, "n_eval": 100, "n_probe": 100, "n_heldout": 50})
        cell = runner.prepare(cfg, "cpu")
        runner.execute(cell, results, progress=False)
    finally:
        BadCLIP.optimise = optimise
    return {"calls": calls, "trigger": cell.plan.manifest["trigger"], "train": cell.plan.train.images.sum().item()}


def test_a_two_process_cell_shares_the_clean_model_and_the_attacks_one_computation(scenarios):
    zero, one = scenarios("badclip", 0), scenarios("badclip", 1)
    assert zero["calls"] == [0] and one["calls"] == []
    assert zero["trigger"]["optimised"] and zero["trigger"] == one["trigger"] and zero["train"] == one["train"]
    df = read_runs(scenarios.folder("badclip"))
    assert sorted(df["attack"]) == ["badclip", "none"] and set(df["world_size"]) == {WORLD}
    assert set(df["status"]) == {"ok"}


# --- the command line --------------------------------------------------------------------


def test_cell_command_runs_torchrun_for_a_cell_of_several_processes():
    cfg, two = resolve("badnet", "clip", "tiny"), resolve("badnet", "clip", "tiny", world_size=2)
    cell = ["-m", "poisonbench", "cell", json.dumps(cfg.to_dict()), "--results", "res", "--device"]
    assert cell_command(cfg, "res", "cpu", False, False, True) == [sys.executable, *cell, "cpu", "--quiet"]
    cell[3] = json.dumps(two.to_dict())
    assert cell_command(two, "res", "cuda", False, True, False) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *cell, "cuda",
        "--keep-checkpoint"]
    with pytest.raises(ValueError, match="world_size"):
        resolve("badnet", "clip", "tiny", world_size=0)


def test_more_processes_than_gpus_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = CliRunner().invoke(main, ["run", "-p", "tiny", "--nproc", "2", "--device", "cuda", "-r", str(tmp_path)])
    assert out.exit_code == 2 and "1 GPU(s) are visible; give --nproc 1 or less" in out.output
    out = CliRunner().invoke(main, ["run", "-p", "tiny", "--nproc", "2", "--device", "cuda:0", "-r", str(tmp_path)])
    assert out.exit_code == 2 and "give --device cuda" in out.output
    assert not (tmp_path / "runs").exists()


# --- d. SafeCLIP: the split and the memory banks are the same on every rank -----------------

SAFECLIP = {"inmodal_warmup": 1, "multimodal_warmup": 0, "bank_size": 16, "score_batch": 16, "warmup_steps": 1}


def safeclip_task():
    from poisonbench.defenses.safeclip import SafeCLIP, SafeCLIPParams

    return SafeCLIP(SafeCLIPParams(**{**resolve("none", "safeclip", "tiny").defense_params, **SAFECLIP}), seed=0)


def fixed_model_similarities(task, data):
    """The task's scores of ``data`` at epoch 2 under a fresh seeded model (no training)."""
    from poisonbench.defenses.base import EpochContext

    torch.manual_seed(0)
    model, tokenizer = create_model("poisonbench-tiny")
    task.prepare(list(data.captions), tokenizer)
    return task.similarities(EpochContext(model, data, 3, 5, 0, 28, torch.device("cpu")), 2)


def safeclip_scenario(rank, out):
    from poisonbench.train import train

    cfg = resolve("none", "safeclip", "tiny", defense_params=SAFECLIP, epochs=3, batch_size=4)
    task, plans, ptr = safeclip_task(), {}, {}
    plan_epoch = task.plan_epoch

    def recorded(epoch, ctx):
        passes = plan_epoch(epoch, ctx)
        plans[epoch] = [(p.group, p.rows.clone()) for p in passes]
        return passes

    task.plan_epoch = recorded
    torch.manual_seed(0)
    model, tokenizer = create_model("poisonbench-tiny")
    data = tiny_data()
    train(model, tokenizer, data, task, cfg, torch.device("cpu"), out / "last.pt", progress=False,
          on_epoch_end=lambda epoch, _m: ptr.setdefault(epoch, [b.ptr for b in task.banks]))
    return {"plans": plans, "banks": [b.state_dict() for b in task.banks], "ptr": ptr, "model": model.state_dict(),
            "metrics": task.metrics(), "sim": torch.from_numpy(fixed_model_similarities(safeclip_task(), data))}


def test_safeclip_split_and_banks_are_the_same_on_every_rank(scenarios):
    a, b = (scenarios("safeclip", r) for r in range(WORLD))
    assert sorted(a["plans"]) == [1, 2, 3] and [g for g, _ in a["plans"][3]] == ["risky", "safe"]
    for epoch, passes in a["plans"].items():
        for (ga, ra), (gb, rb) in zip(passes, b["plans"][epoch]):
            assert ga == gb and torch.equal(ra, rb), epoch
    assert a["metrics"] == b["metrics"] and a["metrics"]["filter_epoch"] == [2, 3]
    for bank_a, bank_b in zip(a["banks"], b["banks"]):
        assert torch.equal(bank_a["bank"], bank_b["bank"]) and bank_a["ptr"] == bank_b["ptr"]
    # epoch 1: 5 steps, each enqueueing the global batch of 8 into 16 rows: 8, 0, 8, 0, 8 (4 per rank would end at 4)
    assert a["ptr"][1] == b["ptr"][1] == [8, 8]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    # the scores do not depend on the number of processes: each chunk is seeded on its own
    one_process = fixed_model_similarities(safeclip_task(), tiny_data())
    assert torch.equal(a["sim"], b["sim"]) and np.allclose(a["sim"].numpy(), one_process, atol=1e-6)


SCENARIOS = {"gradients": gradients_scenario, "pool": pool_scenario, "resume": resume_scenario,
             "pool_without_gather": pool_without_gather_scenario, "cell": cell_scenario, "safeclip": safeclip_scenario,
             "badclip": badclip_scenario}


@pytest.mark.slow
def test_bench_run_nproc_2_through_torchrun(tmp_path):
    res = tmp_path / "res"
    bench = [sys.executable, "-m", "poisonbench"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    out = subprocess.run(bench + ["run", "-p", "tiny", "-a", "badnet", "-d", "roclip", "--epochs", "2", "--nproc", "2",
                                  "--device", "cpu", "-q", "-r", str(res)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    print(f"bench run --nproc 2 (tiny, roclip): {time.perf_counter() - t0:.1f} s")
    df = read_runs(res)
    assert len(df) == 1 and df.iloc[0]["status"] == "ok" and df.iloc[0]["world_size"] == 2
    assert out.stdout.count("badnet vs roclip") == 1  # one result table (its title): only rank 0 prints it
