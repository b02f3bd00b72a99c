"""Invariants of the protocol that decide a reported number (issue 13, item 8). Each test here
fails under a small, plausible bug that the rest of the fast suite let through (docs/mutation-pass.md
lists the mutations and the test that catches each)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from poisonbench.config import resolve
from poisonbench.datasets.base import CaptionDataset, EvalSet
from poisonbench.evaluate import topk_accuracy, topk_classes, zero_shot_classifier
from poisonbench.metrics import linear_probe


# --- zero-shot classifier ---------------------------------------------------------------------

class TableTextModel:
    """A 'model' whose text embedding of each prompt is a fixed row of ``table`` (float [P, D])."""

    def __init__(self, prompts: list[str], table: torch.Tensor):
        self.index = {p: i for i, p in enumerate(prompts)}
        self.table = table

    def tokenizer(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([self.index[t] for t in texts])

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens]


def reference_classifier(model: TableTextModel, classnames, templates) -> torch.Tensor:
    """Radford et al. 2021 §3.1.4, written out: per class, normalise each template's embedding,
    average, normalise the average; float64 [D, C]."""
    columns = []
    for name in classnames:
        embs = [model.table[model.index[t.format(name)]].double() for t in templates]
        mean = sum(e / e.norm() for e in embs) / len(embs)
        columns.append(mean / mean.norm())
    return torch.stack(columns, dim=1)


def test_zero_shot_classifier_averages_unit_template_embeddings_and_renormalises():
    """Templates of class b disagree (their mean is short) and have different norms: without the
    final renormalisation class a wins the image below, without the first normalisation class b's
    direction tilts towards its longer template."""
    classnames, templates = ["a", "b"], ["x {}", "y {}"]
    prompts = ["x a", "y a", "x b", "y b"]
    table = torch.tensor([[5.0, 0, 0], [0.5, 0, 0], [0, 1.8, 2.4], [0, 0.12, -0.16]])
    model = TableTextModel(prompts, table)
    got = zero_shot_classifier(model, model.tokenizer, classnames, templates)
    want = reference_classifier(model, classnames, templates)
    assert got.shape == (3, 2) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=0), torch.ones(2))
    image = torch.tensor([[0.7, 0.75, 0.0]])  # closer in direction to b (0, 1, 0) than to a (1, 0, 0)
    assert topk_classes(image, got, 1).item() == 1


# --- accuracy -----------------------------------------------------------------------------------

def test_topk_accuracy_counts_the_label_anywhere_in_the_first_k():
    topk = torch.tensor([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [1, 2, 3, 4, 0], [2, 0, 1, 3, 4]])
    labels = torch.tensor([0, 1, 0, 4])
    assert topk_accuracy(topk, labels, 1) == 0.25  # row 0 only
    assert topk_accuracy(topk, labels, 4) == 0.5  # rows 0 and 1 (label 1 at position 4)
    assert topk_accuracy(topk, labels, 5) == 1.0


# --- the logit scale ----------------------------------------------------------------------------

def test_logit_scale_is_clamped_at_ln_100_after_every_step():
    """The learnable temperature is stored as a log: its cap is ln(100), so that exp(logit_scale),
    the factor on the cosine similarities, is at most 100 (Radford et al. 2021, §2.5). One AdamW
    step of lr 10 on a loss that rewards a larger scale pushes it far above the cap."""
    from poisonbench.defenses.base import Defense
    from poisonbench.models import create_model
    from poisonbench.train import MAX_LOGIT_SCALE, train

    class LargerScale(Defense):
        name = "larger-scale"

        def loss(self, image_emb, text_emb, logit_scale, state):
            return -logit_scale + 0.0 * (image_emb.sum() + text_emb.sum())

    assert MAX_LOGIT_SCALE == pytest.approx(math.log(100.0), abs=1e-12)
    torch.manual_seed(0)
    model, tokenizer = create_model("poisonbench-tiny")
    data = CaptionDataset(torch.randint(0, 256, (8, 3, 28, 28), dtype=torch.uint8), ["a photo of a bag"] * 8,
                          torch.zeros(8, dtype=torch.int64))
    cfg = resolve("none", "clip", "tiny", epochs=1, batch_size=8, lr=10.0, warmup_steps=0, weight_decay=0.0)
    before = model.logit_scale.item()
    result = train(model, tokenizer, data, LargerScale(None, 0), cfg, torch.device("cpu"), progress=False)
    assert result.steps == 1 and before < math.log(100.0)
    assert model.logit_scale.item() == pytest.approx(math.log(100.0), abs=1e-6)
    assert model.logit_scale.exp().item() <= 100.0 + 1e-4


# --- the linear probe ---------------------------------------------------------------------------

def test_linear_probe_is_fitted_on_the_probe_features_only():
    """Train features of class y sit at centre y; evaluation features of class y at centre
    (y + 1) % 4. A probe fitted on the train features scores 0 on them; one fitted (or refitted)
    on the evaluation features would score near 1."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    y_train, y_test = torch.arange(4).repeat(100), torch.arange(4).repeat(50)
    x_train = centers[y_train] + torch.randn(400, 16, generator=g)
    x_test = centers[(y_test + 1) % 4] + torch.randn(200, 16, generator=g)
    acc, _ = linear_probe(x_train, y_train, x_test, y_test)
    assert acc < 0.05
    acc_own, _ = linear_probe(x_train, y_train, x_train[:200], y_train[:200])
    assert acc_own > 0.95


def test_the_runner_fits_the_probe_on_probe_images_and_tests_it_on_evaluation_images(bundle, monkeypatch):
    """runner.evaluate hands linear_probe the raw features of the probe images with their labels
    as training data and those of the evaluation images as test data, never the reverse or the
    same set twice."""
    from poisonbench import runner
    from poisonbench.attacks.none import NoAttack
    from poisonbench.defenses.clip import CLIP
    from poisonbench.evaluate import encode_images
    from poisonbench.models import create_model, image_size
    from poisonbench.preprocess import eval_geometry

    g = torch.Generator().manual_seed(5)
    bundle.probe_train = EvalSet(torch.randint(0, 256, (21, 3, 12, 12), generator=g, dtype=torch.uint8),
                                 torch.arange(3).repeat(7), list(bundle.eval.classnames), ["a photo of a {}."])
    calls = []

    def spy(train_x, train_y, test_x, test_y, seed=0):
        calls.append((train_x, train_y, test_x, test_y))
        return 0.5, 1.0

    monkeypatch.setattr(runner, "linear_probe", spy)
    torch.manual_seed(0)
    model, tokenizer = create_model("poisonbench-tiny")
    model.eval()
    attack = NoAttack(NoAttack.Params(), 0)
    cell = runner.Cell(resolve("none", "clip", "tiny"), bundle, attack, attack.poison(bundle), CLIP(CLIP.Params(), 0),
                       torch.device("cpu"))
    metrics = runner.evaluate(model, tokenizer, cell, torch.device("cpu"))
    assert metrics["linear_probe_top1"] == 0.5 and len(calls) == 1
    train_x, train_y, test_x, test_y = calls[0]
    size = image_size(model)
    torch.testing.assert_close(train_x, encode_images(model, eval_geometry(bundle.probe_train.images, size), unit=False))
    torch.testing.assert_close(test_x, encode_images(model, eval_geometry(bundle.eval.images, size), unit=False))
    assert torch.equal(train_y, bundle.probe_train.labels) and torch.equal(test_y, bundle.eval.labels)


# --- the grid: done cells are kept, failed ones retried ---------------------------------------

def test_a_done_cell_is_not_trained_again_unless_forced(tmp_path, monkeypatch):
    from poisonbench import runner
    from poisonbench.store import write_row

    class Trained(Exception):
        pass

    def trains(*args, **kwargs):
        raise Trained()

    cfg = resolve("badnet", "clip", "tiny")
    write_row({"run_id": cfg.run_id, "status": "ok", "clean_top1": 0.25}, tmp_path)
    monkeypatch.setattr(runner, "_execute", trains)
    monkeypatch.setattr(runner, "start", lambda *a: None)  # a cell of nothing but its config: nothing to start
    cell = runner.Cell(cfg, None, None, None, None, torch.device("cpu"))  # nothing but the config is needed
    assert runner.execute(cell, tmp_path, progress=False)["clean_top1"] == 0.25
    with pytest.raises(Trained):
        runner.execute(cell, tmp_path, progress=False, force=True)


def test_bench_run_runs_the_failed_and_missing_cells_of_a_grid_and_skips_the_done_ones(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from poisonbench import grid
    from poisonbench.cli import main
    from poisonbench.store import write_row

    done, failed, missing = (resolve("badnet", d, "tiny") for d in ("clip", "roclip", "aug-only"))
    write_row({"run_id": done.run_id, "status": "ok"}, tmp_path)
    write_row({"run_id": failed.run_id, "status": "failed", "error": "RuntimeError: boom"}, tmp_path)
    started = []
    monkeypatch.setattr(grid, "validate", lambda cfgs, *a, **k: [])
    monkeypatch.setattr(grid, "run_cells", lambda cfgs, *a, **k: started.extend(c.run_id for c in cfgs) or [])
    out = CliRunner().invoke(main, ["run", "-p", "tiny", "-a", "badnet", "-d", "clip,roclip,aug-only",
                                    "--results", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert sorted(started) == sorted([failed.run_id, missing.run_id])
    assert "1 done, 2 to run" in out.output
