"""`bench export` (issue 16 item 6): a finished cell's final model as an open_clip local-dir
folder, which open_clip alone loads and which reproduces the row's clean zero-shot top-1."""
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from poisonbench import runner
from poisonbench.cli import main
from poisonbench.config import resolve


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    results = tmp_path_factory.mktemp("export")
    cfg = resolve("badnet", "clip", "tiny", attack_params={"n_poison": 20}, epochs=1,
                  dataset_params={"n_train": 256, "n_eval": 200, "n_probe": 100, "n_heldout": 50})
    cell = runner.prepare(cfg)
    row = runner.execute(cell, results, progress=False)
    return results, cell, row


def test_an_exported_model_reproduces_the_rows_clean_top1_in_open_clip_alone(finished, tmp_path):
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    results, cell, row = finished
    out = tmp_path / "exported"
    res = CliRunner().invoke(main, ["export", row["run_id"], str(out), "-r", str(results)])
    assert res.exit_code == 0, res.output
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    ev = cell.data.eval
    with torch.no_grad():
        classifier = build_zero_shot_classifier(model, tokenizer, ev.classnames, ev.templates, num_classes_per_batch=None,
                                                use_tqdm=False)
        x = torch.stack([preprocess(Image.fromarray(img.permute(1, 2, 0).numpy())) for img in ev.images])
        pred = (open_clip_features := model.encode_image(x, normalize=True)) @ classifier
    top1 = (pred.argmax(1) == ev.labels).float().mean().item()
    assert open_clip_features.shape[0] == len(ev) == row["n_eval"]
    assert top1 == pytest.approx(row["clean_top1"], abs=1.5 / len(ev))


def test_export_refuses_an_unknown_cell_and_a_non_empty_folder(finished, tmp_path):
    results, _, row = finished
    res = CliRunner().invoke(main, ["export", "0123456789abcdef", str(tmp_path / "a"), "-r", str(results)])
    assert res.exit_code == 1 and "no final model of cell 0123456789abcdef" in res.output
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    res = CliRunner().invoke(main, ["export", row["run_id"], str(tmp_path / "b"), "-r", str(results)])
    assert res.exit_code == 1 and "not empty" in res.output and (tmp_path / "b" / "keep.txt").read_text() == "mine"
