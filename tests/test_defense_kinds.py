"""Every kind of defense through the one registry (issue 14 items 1, 2, 3 and 5; KINDS.md): toy
defenses of each kind, registered by this module as a plugin would register them, run tiny cells
end to end in this process; the cached undefended model is trained once per attack x seed and
reused (by the undefended cell itself too, with the same numbers); a repair's fine-tuning phase
resumes after a kill with the numbers of an uninterrupted run; the clean fine-tuning split is
disjoint from the training pairs and never poisoned."""
from __future__ import annotations

import dataclasses
import io
import math

import pandas as pd
import pytest
from train_spy import Trainings
import torch
from click.testing import CliRunner
from PIL import Image

import poisonbench.runner as runner
from poisonbench.config import resolve
from poisonbench.defenses.base import (UNDEFENDED, DataFilter, Defense, PhaseSettings, PostTrainingRepair, TaskBatch,
                                       TrainingTask)
from poisonbench.grid import GridSpec
from poisonbench.losses import info_nce
from poisonbench.preprocess import eval_geometry, normalize
from poisonbench.registry import DATASETS, DEFENSES, param, register_defense
from poisonbench.store import read_runs
from poisonbench.train import NonFiniteLossError, task_loss

ATTACK = {"n_poison": 20}
SMALL_EVAL = {"n_eval": 100, "n_probe": 100, "n_heldout": 50}  # the tiny profile's training data, a smaller evaluation
METRICS = ["clean_top1", "clean_top5", "asr", "final_loss", "steps", "linear_probe_top1", "i2t_r1", "t2i_r10"]


# --- toy defenses of every kind ----------------------------------------------------------------

@dataclasses.dataclass
class NoParams:
    pass


@dataclasses.dataclass
class OracleParams:
    remove_fraction: float = param(0.05, "fraction of pairs removed")


class OracleFilter(DataFilter):
    """Scores each pair by its poison flag: a perfect detector."""

    Params = OracleParams

    def score(self, model, tokenizer, data, device):
        assert not model.training  # scored with the cached model in eval mode
        return data.is_poison.float()


class TwoTerms(TrainingTask):
    """CLIP's loss split into two named terms (0.75 + 0.25 of InfoNCE), forward pass its own."""

    Params = NoParams

    def __init__(self, params, seed):
        super().__init__(params, seed)
        self.prepared = 0
        self.steps = 0

    def prepare(self, captions, tokenizer):
        self.prepared += 1

    def step(self, model, batch: TaskBatch, state):
        self.steps += 1
        x = normalize(eval_geometry(batch.images, batch.image_size).to(batch.device))
        img, txt, scale = model(x, batch.tokens.to(batch.device))
        loss = info_nce(img, txt, scale)
        return {"main": 0.75 * loss, "rest": 0.25 * loss}

    def metrics(self):
        return {"n_steps": self.steps, "n_prepared": self.prepared}


class TwoTermRepair(PostTrainingRepair):
    """Fine-tunes for 2 epochs at batch 32 with the two-term task."""

    Params = NoParams

    def __init__(self, params, seed):
        super().__init__(params, seed)
        self.task = TwoTerms(NoParams(), seed)

    def phase(self, cfg):
        return PhaseSettings("finetune", epochs=2, lr=1e-4, batch_size=32, warmup_steps=1, weight_decay=0.1)

    def training(self):
        return self.task


class Counting(Defense):
    """Plain CLIP that reports how often its loss ran (the metrics channel)."""

    Params = NoParams

    def __init__(self, params, seed):
        super().__init__(params, seed)
        self.calls = 0

    def loss(self, image_emb, text_emb, logit_scale, state):
        self.calls += 1
        return super().loss(image_emb, text_emb, logit_scale, state)

    def metrics(self):
        return {"n_loss_calls": self.calls, "share": 0.5, "curve": [0.1, 0.2]}


TOYS = {"toy-oracle-filter": OracleFilter, "toy-two-term-repair": TwoTermRepair, "toy-two-terms": TwoTerms,
        "toy-counting": Counting}


@pytest.fixture(scope="module", autouse=True)
def toys():
    DEFENSES.names()  # built-ins first, so that restoring the registry keeps them
    saved = dict(DEFENSES._items)
    for name, cls in TOYS.items():
        register_defense(name)(cls)
    yield
    DEFENSES._items.clear()
    DEFENSES._items.update(saved)


@pytest.fixture(scope="module")
def bundle():
    """The clean tiny Fashion-MNIST bundle of seed 0 (SMALL_EVAL), loaded once."""
    cfg = resolve("badnet", UNDEFENDED, "tiny", 0, dataset_params=SMALL_EVAL)
    ds = DATASETS.get(cfg.dataset)
    return ds(ds.Params(**cfg.dataset_params)).load(0)


def cell(defense: str, bundle, **kw):
    cfg = resolve("badnet", defense, "tiny", 0, ATTACK, dataset_params=SMALL_EVAL, epochs=1, **kw)
    return runner.prepare(cfg, "cpu", data=bundle)


# --- the cells ---------------------------------------------------------------------------------

def test_cache_is_trained_once_and_the_undefended_cell_reuses_it_with_the_same_numbers(
        bundle, tmp_path, monkeypatch):
    # the undefended cell alone: trained, its model written to the cache
    alone = tmp_path / "alone"
    clip = cell(UNDEFENDED, bundle)
    trained = runner.execute(clip, alone, progress=False)
    assert (alone / "cache" / clip.cfg.run_id / "model.pt").is_file()
    assert "start_model" not in trained or trained["start_model"] is None

    # a filter then a repair of the same attack x seed: one training of the undefended model
    shared = tmp_path / "shared"
    count = Trainings(monkeypatch)
    filt = cell("toy-oracle-filter", bundle)
    row = runner.execute(filt, shared, progress=False)
    assert count.calls == [(UNDEFENDED, None), ("toy-oracle-filter", None)]
    assert row["status"] == "ok" and row["start_model"] == clip.cfg.run_id
    n = len(filt.plan.train)
    assert row["n_kept"] == math.floor(n * 0.95) and row["n_filtered"] == n - row["n_kept"]
    kept = filt.defense.keep(filt.plan.train.is_poison.float())
    assert not (kept & filt.plan.train.is_poison).any()  # every poison removed
    assert row["steps"] == filt.cfg.epochs * (row["n_kept"] // filt.cfg.batch_size)
    assert row["det_auroc"] == 1.0

    count.calls.clear()
    rep = cell("toy-two-term-repair", bundle)
    repaired = runner.execute(rep, shared, progress=False)
    assert count.calls == [("toy-two-term-repair", "finetune")]  # the cached model, fine-tuned only
    assert repaired["status"] == "ok" and repaired["start_model"] == clip.cfg.run_id
    assert repaired["start_model_train_s"] == 0.0 and repaired["n_finetune"] == len(bundle.finetune)
    assert repaired["steps"] == 2 * (len(bundle.finetune) // 32)
    assert repaired["final_loss"] == pytest.approx(repaired["final_loss_main"] + repaired["final_loss_rest"], rel=1e-5)
    assert repaired["d_n_steps"] == repaired["steps"] and repaired["d_n_prepared"] == 1  # its task's, by default

    # the undefended cell, run after them, evaluates the cached model without training
    count.calls.clear()
    reused = runner.execute(cell(UNDEFENDED, bundle), shared, progress=False)
    assert count.calls == []
    assert reused["start_model"] == clip.cfg.run_id and reused["train_s"] == 0.0
    for key in METRICS:
        assert reused[key] == trained[key], key

    # kill the repair after its first fine-tuning epoch, rerun: resumed, same numbers
    killed = tmp_path / "killed"
    count = Trainings(monkeypatch, kill_after=1)
    with pytest.raises(KeyboardInterrupt):
        runner.execute(cell("toy-two-term-repair", bundle), killed, progress=False)
    assert count.calls == [(UNDEFENDED, None), ("toy-two-term-repair", "finetune")]
    count = Trainings(monkeypatch)
    resumed = runner.execute(cell("toy-two-term-repair", bundle), killed, progress=False)
    assert count.calls == [("toy-two-term-repair", "finetune")]
    assert resumed["resumed_from_epoch"] == 1
    for key in METRICS + ["final_loss_main", "final_loss_rest"]:
        assert resumed[key] == repaired[key], key
    assert set(read_runs(shared)["start_model"]) == {clip.cfg.run_id}


def test_task_and_training_time_defenses_report_their_terms_and_metrics(bundle, tmp_path):
    task = cell("toy-two-terms", bundle)
    row = runner.execute(task, tmp_path, progress=False)
    assert row["status"] == "ok" and "start_model" not in row
    assert row["final_loss"] == pytest.approx(row["final_loss_main"] + row["final_loss_rest"], rel=1e-5)
    assert row["final_loss_main"] == pytest.approx(3 * row["final_loss_rest"], rel=1e-5)
    assert row["d_n_steps"] == row["steps"] == len(task.plan.train) // task.cfg.batch_size and row["d_n_prepared"] == 1

    counting = cell("toy-counting", bundle)
    row = runner.execute(counting, tmp_path, progress=False)
    assert row["d_n_loss_calls"] == row["steps"] and row["d_share"] == 0.5 and row["d_curve"] == [0.1, 0.2]
    runs = read_runs(tmp_path)  # rows with and without the new columns read together
    assert len(runs) == 2 and runs["d_n_loss_calls"].isna().sum() == 1


def test_a_task_loss_term_that_is_not_finite_is_named():
    good = torch.tensor(1.0)
    assert task_loss({"a": good, "b": torch.tensor(2.0)}, 0, 1) == 3.0
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss term 'inmodal' = nan at step 7 \(epoch 2\)") as e:
        task_loss({"clip": good, "inmodal": torch.tensor(float("nan"))}, 7, 2)
    assert e.value.term == "inmodal"
    with pytest.raises(ValueError, match="no loss term"):
        task_loss({}, 0, 1)


def test_a_repair_without_a_fine_tuning_split_is_refused_before_training(bundle):
    with pytest.raises(runner.ConfigError, match="gives no fine-tuning split"):
        runner.prepare(resolve("badnet", "toy-two-term-repair", "tiny", 0, ATTACK, dataset_params=SMALL_EVAL), "cpu",
                       data=dataclasses.replace(bundle, finetune=None))


def test_filter_keeps_exactly_the_lowest_scores():
    f = OracleFilter(OracleParams(0.25), 0)
    kept = f.keep(torch.tensor([0.5, 0.1, 0.9, 0.1, 0.3, 0.7, 0.2, 0.0, 0.4, 0.8]))
    assert kept.tolist() == [True, True, False, True, True, False, True, True, True, False]  # floor(10 * 0.75) = 7


# --- the clean fine-tuning split ------------------------------------------------------------------

def test_the_fine_tuning_split_is_disjoint_from_training_rows_and_never_poisoned(bundle):
    from poisonbench.datasets import fashion_mnist as fm

    x, _ = fm.load_split(fm.find_root(), "train")
    cfg = resolve("badnet", UNDEFENDED, "tiny", 0)
    n_train = cfg.dataset_params["n_train"]
    g = torch.Generator().manual_seed(0)
    train_idx = fm.draw_rows(len(x), n_train, g, "n_train")
    assert torch.equal(bundle.train.images, x[train_idx])  # the training draw is the one before the split existed
    ft_idx = fm.finetune_rows(len(x), train_idx, -1, 0)
    assert len(ft_idx) == 128 and len(bundle.finetune) == 128  # tiny: 10 % of 512 is below the floor of 128
    assert not set(ft_idx.tolist()) & set(train_idx.tolist())
    assert torch.equal(bundle.finetune.images, x[ft_idx])
    assert len(fm.finetune_rows(len(x), fm.draw_rows(len(x), 10000, torch.Generator().manual_seed(0), "n"), -1, 0)) == 1000
    assert len(fm.finetune_rows(len(x), torch.arange(len(x)), -1, 0)) == 0  # n_train = all: none left
    # spec C10: poisons are made from training rows (appended copies), never from the fine-tuning split
    plan = cell(UNDEFENDED, bundle).plan
    assert not bundle.finetune.is_poison.any() and plan.n_poison == 20
    poisons = plan.train.images[plan.train.is_poison]
    assert not (bundle.finetune.images[:, None] == poisons[None]).flatten(2).all(2).any()
    # (generated captions repeat across rows by chance, so provenance is checked by rows and images)


def test_run_ids_of_existing_cells_are_unchanged():
    """Ids computed on main before the fine-tuning split and the kinds existed."""
    assert resolve("badnet", "clip", "tiny", 0).run_id == "477ce5b67d0c22cf"
    assert resolve("sig", "aug-only", "tiny", 0).run_id == "0ed82e5e05cb1130"
    assert resolve("targeted", "roclip", "tiny", 0).run_id == "10ba640d61fddb32"


def test_files_take_a_separate_fine_tuning_source(tmp_path):
    spec = GridSpec(data="csv:train.csv", finetune="csv:clean.csv")
    assert spec.dataset() == ("files", {"train": "csv:train.csv", "finetune": "csv:clean.csv"})
    assert spec.args()[spec.args().index("--finetune-data") + 1] == "csv:clean.csv"
    with pytest.raises(ValueError, match="give --data too"):
        GridSpec(finetune="csv:clean.csv").dataset()
    (tmp_path / "img").mkdir()
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray((torch.rand(16, 16) * 255).byte().numpy(), "L").save(buf, format="PNG")
        (tmp_path / "img" / f"{i}.png").write_bytes(buf.getvalue())
    pd.DataFrame({"filepath": [f"img/{i}.png" for i in range(6)], "title": ["a photo of a bag"] * 6}).to_csv(
        tmp_path / "pairs.csv", index=False)
    files = DATASETS.get("files")
    pairs = f"csv:{tmp_path / 'pairs.csv'}"
    data = files(files.Params(train=pairs, finetune=pairs, n_heldout=2, n_probe=10, n_eval=10, image_size=16)).load(0)
    assert len(data.finetune) == 6 and data.finetune.labels.tolist() == [8] * 6
    assert files(files.Params(train=pairs, n_heldout=2, n_probe=10, n_eval=10, image_size=16)).load(0).finetune is None


def test_bench_list_shows_each_defense_kind():
    from poisonbench.cli import main

    out = CliRunner().invoke(main, ["list", "defenses"], terminal_width=200).output
    assert "kind" in out and "training" in out and "filter" in out and "repair" in out and "task" in out
