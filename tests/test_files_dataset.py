"""The `files` dataset (issue 5): CSV and WebDataset training data, evaluation sets from local
folders, the skip-rate threshold, poisoned pairs written beside (never into) the user's data."""
import io
import random
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from poisonbench.config import resolve
from poisonbench.datasets import fashion_mnist as fm
from poisonbench.datasets.base import CaptionDataset
from poisonbench.datasets.evalsets import imagenet_classnames, load_eval, openai_templates
from poisonbench.datasets.files import Files, label_by_caption, read_csv_pairs, read_wds_pairs, write_poison
from poisonbench.registry import DATASETS
from poisonbench.runner import ConfigError, prepare

N_IMAGES = 300


def _png(array) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, "L").save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def fashion_files(tmp_path_factory):
    """N_IMAGES real Fashion-MNIST training images as PNG files with a captions CSV, and the
    same pairs as two WebDataset shards. Returns (folder, images uint8 [N, 28, 28], captions)."""
    root = tmp_path_factory.mktemp("fashion_files")
    x, y = fm.load_split(fm.find_root(), "train")
    rng = random.Random(0)
    captions = [fm.write_caption(int(label), rng) for label in y[:N_IMAGES]]
    (root / "img").mkdir()
    for i in range(N_IMAGES):
        (root / "img" / f"{i}.png").write_bytes(_png(x[i, 0].numpy()))
    pd.DataFrame({"filepath": [f"img/{i}.png" for i in range(N_IMAGES)], "title": captions}).to_csv(root / "train.csv", index=False)
    half = N_IMAGES // 2
    for shard, rows in enumerate((range(half), range(half, N_IMAGES))):
        with tarfile.open(root / f"shard-{shard:05d}.tar", "w") as tar:
            for i in rows:
                for ext, data in (("png", _png(x[i, 0].numpy())), ("txt", captions[i].encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root, x[:N_IMAGES, 0], captions


@pytest.mark.parametrize("source", ["csv", "wds"])
def test_tiny_badnet_end_to_end_from_files(fashion_files, source, tmp_path):
    """Trains the tiny profile with badnet poisoning from PNG+CSV and from two shards: one ok row,
    the poisoned pairs written beside the data in its format, the user's files untouched."""
    from poisonbench.runner import run_cell

    root, _, _ = fashion_files
    spec = f"csv:{root / 'train.csv'}" if source == "csv" else "wds:" + str(root / "shard-{00000..00001}.tar")
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    cfg = resolve("badnet", "clip", "tiny", 0, {"n_poison": 20}, dataset="files",
                  dataset_params={"train": spec, "n_train": 0, "n_heldout": 50}, epochs=1)
    assert cfg.dataset_params["image_size"] == 28  # the tiny model's input size
    row = run_cell(cfg, tmp_path, device="cpu", progress=False)
    assert row["status"] == "ok" and row["n_train"] == N_IMAGES - 50 + 20 and row["n_poison"] == 20
    assert row["n_skipped"] == 0 and 0.0 <= row["asr"] <= 1.0
    written = Path(row["poison_files"])
    back = read_csv_pairs(written) if source == "csv" else read_wds_pairs(str(written), size=28)
    assert written.is_relative_to(tmp_path) and len(back.captions) == 20
    manifest_captions = pd.read_json(tmp_path / "manifests" / f"{cfg.run_id}.json", typ="series")["captions"]
    assert back.captions == list(manifest_captions)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before


def test_csv_and_shards_give_the_same_pairs(fashion_files):
    root, images, captions = fashion_files
    a = read_csv_pairs(root / "train.csv", size=28)
    b = read_wds_pairs(str(root / "shard-{00000..00001}.tar"), size=28)
    assert a.captions == b.captions == captions
    assert torch.equal(a.images, b.images) and torch.equal(a.images[:, 0], images)


def test_skip_rate_threshold(fashion_files, tmp_path):
    """2 unreadable of 100 images: refused at the default 1 %, counted and left out at 5 %."""
    root, _, captions = fashion_files
    table = pd.DataFrame({"filepath": [str(root / f"img/{i}.png") for i in range(100)], "title": captions[:100]})
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    table.loc[[3, 7], "filepath"] = [str(tmp_path / "broken.png"), str(tmp_path / "missing.png")]
    table.to_csv(tmp_path / "t.csv", index=False)
    params = {"train": f"csv:{tmp_path / 't.csv'}", "image_size": 28, "n_heldout": 10, "n_probe": 100, "n_eval": 100}
    with pytest.raises(ValueError, match=r"2 of 100 images \(2.0%\) cannot be read.*max_skip_rate=0.01"):
        Files(DATASETS.params("files", params)).load(0)
    data = Files(DATASETS.params("files", {**params, "max_skip_rate": 0.05})).load(0)
    assert data.skipped == 2 and len(data.train) + len(data.heldout) == 98
    kept = data.train.captions + data.heldout.captions
    assert sorted(kept) == sorted(c for i, c in enumerate(captions[:100]) if i not in (3, 7))


def test_skip_rate_threshold_holds_for_evaluation_images(fashion_files, tmp_path):
    """1 unreadable of 20 evaluation images: refused at the default 1 % before training, counted at 10 %."""
    root, _, _ = fashion_files
    for i in range(20):
        folder = tmp_path / "ev" / ("bag" if i % 2 else "coat")
        folder.mkdir(parents=True, exist_ok=True)
        if i == 5:
            (folder / f"{i}.png").write_bytes(b"\x89PNG not really")
        else:
            Image.new("RGB", (12, 12), (i, 0, 0)).save(folder / f"{i}.png")
    params = {"train": f"csv:{root / 'train.csv'}", "eval": f"imagefolder:{tmp_path / 'ev'}", "image_size": 28,
              "n_heldout": 10}
    with pytest.raises(ValueError, match=r"1 of 20 evaluation images \(5.0%\) cannot be read.*max_skip_rate=0.01.*5.png"):
        Files(DATASETS.params("files", params)).load(0)
    data = Files(DATASETS.params("files", {**params, "max_skip_rate": 0.1})).load(0)
    assert data.eval_skipped == 1 and len(data.eval) == 19


def test_label_by_caption_whole_words_and_ambiguity():
    words = [["coat", "jacket"], ["bag"], ["ankle boot", "boot"]]
    caps = ["a new coat", "a handbag", "an ankle boot", "a coat and a bag", "COAT!", "a bootie", "a boot"]
    assert label_by_caption(caps, words).tolist() == [0, -1, 2, -1, 0, -1, 2]


def test_write_poison_reads_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=g)
    caps = ["a, \"quoted\" bag", "tab\there", "new\nline", "", "NA", "emoji 👜 حقيبة"]
    train = CaptionDataset(images, caps, torch.zeros(6, dtype=torch.int64), torch.tensor([0, 1, 1, 1, 1, 1], dtype=torch.bool))
    csv = write_poison(train, "csv:x.csv", tmp_path / "p_csv")
    shard = write_poison(train, "wds:x.tar", tmp_path / "p_wds")
    for back in (read_csv_pairs(csv, size=16), read_wds_pairs(str(shard), size=16)):
        assert back.captions == caps[1:] and torch.equal(back.images, images[1:])
    assert not (tmp_path / "p_csv.tmp").exists()


def test_imagefolder_eval_with_classnames_and_probe_split(tmp_path):
    for split, n in (("val", 3), ("train", 2)):
        for cls, value in (("c0_red", 10), ("c1_blue", 200)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 12), (value, i, 0)).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "classnames.txt").write_text("red thing\nblue thing\n")
    ev, probe, skipped = load_eval(f"imagefolder:{tmp_path}", 8, 0, 0, torch.Generator().manual_seed(0))
    assert ev.classnames == ["red thing", "blue thing"] and ev.templates == openai_templates()
    assert ev.images.shape == (6, 3, 8, 8) and ev.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert int(ev.images[0, 0, 4, 4]) == 10 and int(ev.images[5, 0, 4, 4]) == 200
    assert len(probe) == 4 and skipped == 0


def test_imagenet_labels_csv_layout(tmp_path):
    for i in range(4):
        Image.new("RGB", (10, 10), (i * 50, 0, 0)).save(tmp_path / f"im{i}.jpg")
    pd.DataFrame({"image": [f"im{i}.jpg" for i in range(4)], "label": [0, 999, 1, 5]}).to_csv(tmp_path / "labels.csv", index=False)
    ev, probe, _ = load_eval(f"imagenet:{tmp_path}", 8, 0, 0, torch.Generator())
    names = imagenet_classnames()
    assert len(names) == 1000 and names[0] == "tench" and len(openai_templates()) == 80
    assert ev.labels.tolist() == [0, 999, 1, 5] and ev.classnames == names and probe is None
    # the evaluation's names and prompts are open_clip's own, not a copy
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    assert ev.classnames == list(IMAGENET_CLASSNAMES)
    assert [t.format(names[3]) for t in ev.templates] == [f(names[3]) for f in OPENAI_IMAGENET_TEMPLATES]


def test_cifar10_from_a_local_root(tmp_path, monkeypatch):
    """torchvision's CIFAR-10 reader on a local folder (its md5 check bypassed for the fake batches)."""
    import pickle

    import numpy as np
    import torchvision.datasets.cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(n))}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class_{i}" for i in range(10)]}))
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    ev, probe, _ = load_eval(f"cifar10:{tmp_path}", 32, 0, 0, torch.Generator())
    assert ev.classnames[0] == "class 0" and ev.labels.tolist() == [0, 1, 2] and len(probe) == 10
    raw = pickle.loads((folder / "test_batch").read_bytes())["data"][1].reshape(3, 32, 32)
    assert torch.equal(ev.images[1], torch.from_numpy(raw))


@pytest.mark.parametrize("spec, message", [
    ("", "give --data csv:PATH or --data wds:URLS"),
    ("s3:bucket", "give csv:PATH"),
    ("csv:/no/such.csv", "no CSV file at /no/such.csv"),
    ("wds:/no/shard-{0..1}.tar", "no WebDataset shard at /no/shard-0.tar"),
])
def test_bad_training_data_fails_before_training(spec, message):
    cfg = resolve("badnet", "clip", "tiny", 0, dataset="files", dataset_params={"train": spec})
    with pytest.raises(ConfigError, match=message):
        prepare(cfg, "cpu")


@pytest.mark.parametrize("spec, message", [
    ("mnist:/x", "valid: fashion-mnist, imagenet:ROOT"),
    ("cifar10", "needs its folder: give --eval cifar10:ROOT"),
    ("imagenet:/no/such/dir", "no folder at /no/such/dir"),
])
def test_bad_eval_set_names_the_choices(spec, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_eval(spec, 28, 0, 0, torch.Generator())


def lazy_cell(root, source: str, load: str):
    """The tiny badnet-lc x roclip cell of the files in ``root`` (csv or wds), loaded ``load``."""
    spec = f"csv:{root / 'train.csv'}" if source == "csv" else "wds:" + str(root / "shard-{00000..00001}.tar")
    params = {"train": spec, "n_train": 0, "n_heldout": 50, "load": load}
    return resolve("badnet-lc", "roclip", "tiny", 0, {"n_poison": 5}, {"pool_size": 128}, params, "files", epochs=2)


COMPARED = ("clean_top1", "asr", "linear_probe_top1", "final_loss", "n_poison", "manifest_hash", "i2t_r10", "curve_asr",
            "trig_present")


@pytest.mark.parametrize("source", ["csv", "wds"])
def test_lazy_loading_trains_exactly_as_in_memory(fashion_files, source, tmp_path, monkeypatch):
    """load=lazy decodes batch by batch, in a thread (--workers 0) or in 2 worker processes; the
    pairs, the poisoning and every metric equal load=memory."""
    from poisonbench.datasets.lazy import LazyImages
    from poisonbench.runner import run_cell
    from poisonbench.utils import WORKERS_ENV

    root, _, _ = fashion_files
    rows, data = {}, {}
    for load, workers in (("memory", 0), ("lazy", 0), ("lazy", 2)):
        cfg = lazy_cell(root, source, load)
        monkeypatch.setenv(WORKERS_ENV, str(workers))
        data[load] = Files(DATASETS.params("files", {**cfg.dataset_params, "n_eval": 100, "n_probe": 100})).load(0)
        rows[load, workers] = run_cell(cfg, tmp_path / f"{load}{workers}", device="cpu", progress=False)
    assert isinstance(data["lazy"].train.images, LazyImages) and isinstance(data["memory"].train.images, torch.Tensor)
    assert torch.equal(data["lazy"].train.images[torch.arange(len(data["lazy"].train))], data["memory"].train.images)
    assert data["lazy"].train.captions == data["memory"].train.captions
    for key in COMPARED:
        assert rows["lazy", 0][key] == rows["memory", 0][key], key
        assert rows["lazy", 2][key] == rows["memory", 0][key], key


KILL_MID_EPOCH = r"""
import json, os, signal, sys
import torch
from poisonbench.config import RunConfig
from poisonbench.runner import run_cell

steps, real = [0], torch.optim.AdamW.step


def step(self, *args, **kwargs):  # kill -9 at optimizer step N, decoding workers running
    steps[0] += 1
    if steps[0] == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)


torch.optim.AdamW.step = step
run_cell(RunConfig(**json.loads(sys.argv[2])), sys.argv[1], device="cpu", progress=False)
"""


def test_lazy_cell_with_workers_killed_mid_epoch_resumes_to_the_same_numbers(fashion_files, tmp_path, monkeypatch):
    """kill -9 in epoch 2 of a lazily loaded cell decoding in 2 worker processes; the rerun resumes
    from epoch 1's checkpoint and ends with the numbers of an uninterrupted in-memory run."""
    import json
    import signal
    import subprocess
    import sys

    from poisonbench.runner import run_cell
    from poisonbench.utils import WORKERS_ENV
    from store_helpers import SUBPROCESS_ENV

    root, _, _ = fashion_files
    cfg = lazy_cell(root, "csv", "lazy")
    env = {**SUBPROCESS_ENV, WORKERS_ENV: "2"}
    proc = subprocess.run([sys.executable, "-c", KILL_MID_EPOCH, str(tmp_path / "res"), json.dumps(cfg.to_dict()), "5"],
                          env=env, capture_output=True, text=True, timeout=300)  # 3 steps per epoch: step 5 is in epoch 2
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    monkeypatch.setenv(WORKERS_ENV, "2")
    resumed = run_cell(cfg, tmp_path / "res", device="cpu", progress=False)
    assert resumed["status"] == "ok" and resumed["resumed_from_epoch"] == 1
    reference = run_cell(lazy_cell(root, "csv", "memory"), tmp_path / "memory", device="cpu", progress=False)
    for key in COMPARED:
        assert resumed[key] == reference[key], key


def test_lazy_images_take_cat_and_assign_match_a_tensor(fashion_files):
    from poisonbench.datasets.lazy import LazyImages, Member

    root, images, _ = fashion_files
    lazy = LazyImages([Member(str(root / f"img/{i}.png")) for i in range(10)], 28)
    ref = images[:10].unsqueeze(1).repeat(1, 3, 1, 1)
    extra = torch.full((2, 3, 28, 28), 7, dtype=torch.uint8)
    sub = lazy.take(torch.tensor([9, 2, 4])).cat(extra)
    expect = torch.cat([ref[[9, 2, 4]], extra])
    assert sub.shape == (5, 3, 28, 28) and torch.equal(sub[torch.arange(5)], expect) and torch.equal(sub[1], ref[2])
    sub[torch.tensor([0])] = torch.zeros(1, 3, 28, 28, dtype=torch.uint8)
    assert int(sub[0].sum()) == 0 and torch.equal(lazy[9], ref[9])  # the source object is unchanged
    (root / "img" / "gone.png").write_bytes(b"")
    broken = LazyImages([Member(str(root / "img" / "gone.png"))], 28)
    assert broken.check()[0][1] == "empty file"
    with pytest.raises(RuntimeError, match="gone.png cannot be read any more"):
        broken[0]
    from poisonbench.train import prefetched

    with pytest.raises(RuntimeError, match=r"^training image \S*gone.png cannot be read any more") as raised:
        list(prefetched(broken, [torch.tensor([0])], workers=1))  # in a worker process: its own error, one line
    assert "Original Traceback" not in str(raised.value)


@pytest.mark.parametrize("load", ["memory", "lazy"])
def test_truncated_or_foreign_shard_is_named_before_training(fashion_files, tmp_path, load):
    root, _, _ = fashion_files
    (tmp_path / "shard-00000.tar").write_bytes((root / "shard-00000.tar").read_bytes())
    (tmp_path / "shard-00001.tar").write_bytes((root / "shard-00001.tar").read_bytes()[:30000])
    cfg = resolve("badnet", "clip", "tiny", 0, dataset="files",
                  dataset_params={"train": "wds:" + str(tmp_path / "shard-{00000..00001}.tar"), "load": load})
    with pytest.raises(ConfigError, match=r"shard-00001.tar is not a complete tar file.*download it again"):
        prepare(cfg, "cpu")
    cfg = resolve("badnet", "clip", "tiny", 0, dataset="files", dataset_params={"train": f"wds:{root / 'train.csv'}"})
    with pytest.raises(ConfigError, match="train.csv is not a complete tar file"):
        prepare(cfg, "cpu")


def test_unknown_target_among_many_classes_names_the_closest(tmp_path):
    from poisonbench.datasets.base import EvalSet

    ev = EvalSet(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1, dtype=torch.int64),
                 imagenet_classnames(), openai_templates())
    with pytest.raises(ValueError, match=r"not among the 1000 evaluation classes; closest: .*plastic bag") as e:
        ev.class_index("bag")
    assert len(str(e.value)) < 300


def test_setting_label_of_files_runs_names_only_what_departs():
    from poisonbench.config import settings

    base = resolve("badnet", "clip", "tiny", 0, dataset="files", dataset_params={"train": "csv:a.csv"}).to_dict()
    other = resolve("badnet", "clip", "tiny", 0, dataset="files",
                    dataset_params={"train": "csv:a.csv", "n_heldout": 50}).to_dict()
    assert settings([base, other]) == ["train=csv:a.csv", "train=csv:a.csv, n_heldout=50"]


def test_preview_poisons_the_users_files(fashion_files, tmp_path):
    from click.testing import CliRunner

    from poisonbench.cli import main

    root, _, _ = fashion_files
    out = tmp_path / "p.svg"
    res = CliRunner().invoke(main, ["preview", "-a", "badnet", "-p", "tiny", "-n", "2", "-A", "n_poison=20",
                                    "--data", f"csv:{root / 'train.csv'}", "--dataset-param", "n_heldout=50", "--dataset-param", "n_train=0",
                                    "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text().lstrip().startswith(("<?xml", "<svg"))
