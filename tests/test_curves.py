"""Per-epoch curves (poisonbench.curves) and RoCLIP's matching diagnostics."""
import dataclasses

import pytest
import torch

from poisonbench.config import PROFILES, resolve
from poisonbench.curves import curve_rows
from poisonbench.defenses.base import DiagnosticRows, TrainState
from poisonbench.defenses.roclip import RoCLIP, RoCLIPParams
from poisonbench.models import create_model
from poisonbench.runner import prepare, run_cell
from poisonbench.train import train


class Crash(RuntimeError):
    pass


def test_curve_rows_are_seeded_distinct_and_capped():
    a, b = curve_rows(500, 200, 0), curve_rows(500, 200, 1)
    assert len(a) == 200 and len(set(a.tolist())) == 200 and torch.equal(a, curve_rows(500, 200, 0))
    assert not torch.equal(a, b) and torch.equal(a, a.sort().values)
    assert curve_rows(50, 200, 0).tolist() == list(range(50))


@pytest.mark.parametrize("attack", ["badnet", "targeted"])
def test_the_last_curve_point_over_the_whole_evaluation_set_is_the_rows_result(attack, tmp_path, monkeypatch):
    monkeypatch.setitem(PROFILES, "tiny", dataclasses.replace(PROFILES["tiny"], curve_n=10_000))
    row = run_cell(resolve(attack, "clip", "tiny", epochs=2), tmp_path, progress=False)
    assert row["curve_epoch"] == [1, 2] and row["curve_n"] == row["n_eval"] == 500  # capped at the evaluation set
    assert row["curve_clean_top1"][-1] == pytest.approx(row["clean_top1"], abs=1e-12)
    assert row["curve_asr"][-1] == pytest.approx(row["asr"], abs=1e-12)
    if attack == "badnet":  # no augmentation under clip: every poisoned view is the evaluated trigger
        assert row["trig_present"] == row["trig_at_eval"] == 1.0 and row["trig_corr"] == pytest.approx(1.0)
    else:
        assert "trig_n" not in row


def test_a_resumed_run_reports_every_epochs_record(tmp_path):
    cfg = resolve("badnet", "clip", "tiny", attack_params={"n_poison": 10}, epochs=2)
    cell = prepare(cfg)

    def run(path, on_epoch_end=None):
        torch.manual_seed(0)
        model, tok = create_model(cfg.model)
        return train(model, tok, cell.plan.train, prepare(cfg).defense, cfg, torch.device("cpu"), path,
                     progress=False, on_epoch_end=on_epoch_end, **cell.watchers(tok))

    reference = run(tmp_path / "a.pt").history

    def crash(epoch, _model):
        if epoch == 1:
            raise Crash()

    with pytest.raises(Crash):
        run(tmp_path / "b.pt", crash)
    resumed = run(tmp_path / "b.pt")
    assert resumed.resumed_from_epoch == 1 and [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history == reference


def roclip_with_pool(labels, pool_rows, names_target=None, poison=None):
    d = RoCLIP(RoCLIPParams(pool_size=len(pool_rows), match_every=1), 0)
    n = len(labels)
    d.observe(DiagnosticRows(torch.tensor(labels), torch.zeros(n, dtype=torch.bool) if poison is None
                             else torch.tensor(poison), names_target))
    emb = torch.nn.functional.normalize(torch.randn(len(pool_rows), 8, generator=torch.Generator().manual_seed(0)), dim=1)
    d.start_epoch(TrainState(1, 0, encode_captions=lambda k, with_rows=False: (emb[:k], torch.tensor(pool_rows[:k]))))
    return d, emb


def test_own_class_share_is_one_when_the_pool_holds_only_captions_of_the_querys_class():
    labels = [0] * 6 + [1] * 6
    d, emb = roclip_with_pool(labels, [0, 1, 2, 3])  # pool: captions of rows of class 0 only
    rows = torch.tensor([4, 5, 0, 1])  # queries of class 0
    images = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    d.loss(images, emb[:4].clone(), torch.tensor(10.0), TrainState(1, 0, rows=rows))
    m = d.metrics()
    assert m["match_epoch"] == [1] and m["match_own_class"] == [1.0] and 1 <= m["match_distinct"][0] <= 4
    assert "match_poison_to_target" not in m  # no target label given


def test_matching_diagnostics_count_other_classes_distinct_entries_and_poisons_to_target():
    labels = [0, 0, 1, 1, 2, 2]
    names_target = torch.tensor([False, False, False, False, True, True])  # rows 4, 5 name the target
    poison = [False, False, False, True, False, False]
    d, emb = roclip_with_pool(labels, [0, 4], names_target, poison)
    # each query is its matched entry's embedding: query 0 -> entry 0 (row 0), the others -> entry 1 (row 4)
    images = torch.stack([emb[0], emb[1], emb[1]])
    rows = torch.tensor([1, 3, 2])  # classes 0, 1 (poisoned), 1
    d.loss(images, images.clone(), torch.tensor(10.0), TrainState(1, 0, rows=rows))
    m = d.metrics()
    assert m["match_own_class"] == [pytest.approx(1 / 3)]  # only row 1 (class 0) matched a class-0 caption
    assert m["match_distinct"] == [2.0] and m["match_poison_to_target"] == [1.0]
    state = d.state_dict()
    again = RoCLIP(RoCLIPParams(pool_size=2, match_every=1), 0)
    again.load_state_dict(state)
    assert again.metrics() == m and torch.equal(again.pool.rows, d.pool.rows)


def test_names_target_leaves_out_other_classes_whose_caption_holds_a_target_word():
    from poisonbench.runner import diagnostic_rows

    cell = prepare(resolve("badnet", "clip", "tiny", attack_params={"target": "shirt"}))
    rows = diagnostic_rows(cell)
    tshirt = cell.data.eval.class_index("t-shirt")
    shirt = cell.data.eval.class_index("shirt")
    assert not rows.names_target[cell.plan.train.labels == tshirt].any() or bool(
        cell.plan.train.is_poison[rows.names_target & (cell.plan.train.labels == tshirt)].all())
    assert rows.names_target[cell.plan.train.is_poison].all()  # every poisoned caption names the target
    assert rows.names_target[(cell.plan.train.labels == shirt)].float().mean() > 0.9
