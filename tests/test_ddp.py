"""Distributed training (DDP) on the CPU: 2 processes, gloo backend, started with
torch.multiprocessing.spawn (``bench run --nproc`` itself goes through torchrun: the slow test).

Starting a process that imports torch and open_clip takes seconds, so one spawn runs every
scenario (``scenarios``); each scenario saves what it saw, or its traceback, per rank, and the
tests check those."""
import copy
import os
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from poisonbench import distributed
from poisonbench.config import resolve
from poisonbench.datasets.base import CaptionDataset
from poisonbench.defenses.base import TrainState
from poisonbench.defenses.clip import CLIP, CLIPParams
from poisonbench.defenses.roclip import RoCLIP, RoCLIPParams
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
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
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


def train_roclip(out) -> dict:
    from poisonbench.train import train

    cfg = resolve("none", "roclip", "tiny", defense_params={"pool_size": 24, "match_every": 1, "augment": False},
                  epochs=2, batch_size=4)
    defense = RoCLIP(RoCLIPParams(pool_size=24, match_every=1, augment=False), seed=0)
    torch.manual_seed(0)
    model, tokenizer = create_model("poisonbench-tiny")
    result = train(model, tokenizer, tiny_data(), defense, cfg, torch.device("cpu"), out / "last.pt", progress=False)
    return {"pool": defense.pool.state_dict(), "steps": result.steps}


def pool_scenario(rank, out):
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


# --- c. one result row for a cell run by 2 processes ----------------------------------------


def cell_scenario(rank, results):
    from poisonbench import runner

    writes, write_row = [], runner.write_row
    runner.write_row = lambda row, res: writes.append(row["status"]) or write_row(row, res)
    try:
        cfg = resolve("badnet", "clip", "tiny", attack_params={"n_poison": 20}, epochs=1,
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


SCENARIOS = {"gradients": gradients_scenario, "pool": pool_scenario,
             "pool_without_gather": pool_without_gather_scenario, "cell": cell_scenario}
