"""Where a trigger is applied (attacks/backdoor.py, "Where a trigger is applied"): at the stored
geometry of the training images, in training and in evaluation alike. A poisoned training image
through the trainer's input path without augmentation (``eval_geometry`` to the model's size,
benchmark/train.py) and the same image triggered by the ASR evaluation are the same pixels, for
every backdoor with a fixed trigger placement and every data source; at the default geometry
(stored size == model size) the evaluation is the one of before (the trigger exact at the
model's input)."""
import io
import tarfile

import pandas as pd
import pytest
import torch
from PIL import Image

from poisonbench.attacks.base import ZeroShotModel
from poisonbench.datasets.base import CaptionDataset, DatasetBundle, EvalSet
from poisonbench.preprocess import eval_geometry
from poisonbench.registry import ATTACKS, DATASETS

CLASSES = ["bag", "cat", "dog"]  # sorted, as the imagefolder evaluation set orders its folders
TARGET = "bag"
STORED, MODEL = 56, 28
# every backdoor whose trigger does not depend on per-image randomness (badnet's corners: not random)
BACKDOORS = ["badnet", "badnet-lc", "blended", "sig", "wanet"]


def make_attack(name: str):
    return ATTACKS.get(name)(ATTACKS.params(name, {"target": TARGET, "n_poison": 1}), 0)


def poison_every_eligible_row(attack, data: DatasetBundle):
    """Poison all the rows the attack may use, so that each evaluation image outside the target
    class has its poisoned training twin. Returns the plan."""
    target = data.eval.classnames.index(TARGET)
    attack.params.n_poison = len(attack.eligible_rows(data, target))
    return attack.poison(data)


def training_inputs(name: str, data: DatasetBundle, plan) -> torch.Tensor:
    """Poisoned training images of the evaluation rows outside the target class, as the model
    receives them without augmentation (benchmark/train.py: ``eval_geometry`` to its size)."""
    poisoned = plan.train.images[plan.train.is_poison.nonzero().squeeze(1)]
    if name == "badnet-lc":  # every training row was patched in place: keep those evaluated
        poisoned = poisoned[data.eval.labels != data.eval.classnames.index(TARGET)]
    return eval_geometry(poisoned, MODEL)


def evaluation_inputs(attack, data: DatasetBundle, plan) -> torch.Tensor:
    """The triggered images the ASR evaluation gives the model (captured from ``predict``)."""
    seen = []

    def record(images):
        seen.append(images.clone())
        return torch.zeros(len(images), 5, dtype=torch.long)

    clean_top5 = torch.zeros(len(data.eval), 5, dtype=torch.long)  # the clean images are not predicted again
    attack.evaluate(ZeroShotModel(record, MODEL, clean_top5), data, plan)
    assert len(seen) == 1
    return seen[0]


def twin_bundle(name: str, size: int) -> DatasetBundle:
    """Training images equal to the evaluation images row for row (uint8, ``size`` px). The
    training rows are labelled as the evaluation rows, or all ``TARGET`` for the label-consistent
    attack (it patches target-class training images)."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (9, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(3).repeat_interleave(3)
    train_labels = torch.zeros_like(labels) if name == "badnet-lc" else labels
    captions = [f"a photo of a {CLASSES[y]}" for y in train_labels.tolist()]
    ev = EvalSet(images.clone(), labels, list(CLASSES), ["a photo of a {}."])
    return DatasetBundle(CaptionDataset(images, captions, train_labels), ev, [[c] for c in CLASSES], ["a photo of {}"])


@pytest.mark.parametrize("name", BACKDOORS)
def test_trained_and_evaluated_trigger_are_the_same_pixels(name):
    data = twin_bundle(name, STORED)
    attack = make_attack(name)
    plan = poison_every_eligible_row(attack, data)
    trained, evaluated = training_inputs(name, data, plan), evaluation_inputs(attack, data, plan)
    assert trained.shape == evaluated.shape == (6, 3, MODEL, MODEL)
    assert torch.equal(trained, evaluated)
    clean = eval_geometry(data.eval.images[data.eval.labels != 0], MODEL)
    assert not torch.equal(evaluated, clean)  # the trigger is there


@pytest.fixture(scope="module")
def twin_files(tmp_path_factory):
    """9 RGB 40x40 PNGs in imagefolder class folders, listed by a CSV and a WebDataset shard.
    Returns a function (source, load, name) -> the ``files`` dataset loaded at STORED px whose
    training pairs are those images, in the evaluation set's order."""
    root = tmp_path_factory.mktemp("twin_files")
    rng = torch.Generator().manual_seed(1)
    rows = []
    for c in CLASSES:
        (root / "eval" / c).mkdir(parents=True)
        for i in range(3):
            img = torch.randint(0, 256, (40, 40, 3), generator=rng, dtype=torch.uint8).numpy()
            path = root / "eval" / c / f"{i}.png"
            Image.fromarray(img, "RGB").save(path)
            rows.append((f"eval/{c}/{i}.png", c))

    def load(source: str, mode: str, name: str) -> DatasetBundle:
        caption = (lambda c: f"a photo of a {TARGET}") if name == "badnet-lc" else (lambda c: f"a photo of a {c}")
        folder = root / f"{source}-{name}"
        folder.mkdir(exist_ok=True)
        if source == "csv":
            pd.DataFrame({"filepath": [str(root / p) for p, _ in rows], "title": [caption(c) for _, c in rows]}).to_csv(
                folder / "train.csv", index=False)
            spec = f"csv:{folder / 'train.csv'}"
        else:
            with tarfile.open(folder / "shard-00000.tar", "w") as tar:
                for i, (p, c) in enumerate(rows):
                    for ext, data in (("png", (root / p).read_bytes()), ("txt", caption(c).encode())):
                        info = tarfile.TarInfo(f"{i:06d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            spec = f"wds:{folder / 'shard-00000.tar'}"
        params = {"train": spec, "eval": f"imagefolder:{root / 'eval'}", "image_size": STORED, "n_heldout": 0,
                  "load": mode}
        return DATASETS.get("files")(DATASETS.params("files", params)).load(0)

    return load


@pytest.mark.parametrize("source,mode", [("csv", "memory"), ("csv", "lazy"), ("wds", "memory"), ("wds", "lazy")])
@pytest.mark.parametrize("name", BACKDOORS)
def test_files_dataset_trains_and_evaluates_the_same_trigger(twin_files, source, mode, name):
    data = twin_files(source, mode, name)
    assert hasattr(data.train.images, "lazy") == (mode == "lazy")
    assert torch.equal(data.train.images[torch.arange(9)], data.eval.images)  # the twins, at 56 px
    attack = make_attack(name)
    plan = poison_every_eligible_row(attack, data)
    assert torch.equal(training_inputs(name, data, plan), evaluation_inputs(attack, data, plan))


@pytest.mark.parametrize("name", BACKDOORS + ["badnet-random"])
def test_default_geometry_evaluates_as_before(name):
    """Fashion-MNIST at 28 px on a 28 px model: the evaluation gives the model the trigger
    applied to the evaluation images themselves (the code before this rule: resize/crop to the
    model's size, the identity here, then the trigger), with badnet's patch exact in the corner."""
    data = DATASETS.get("fashion-mnist")(DATASETS.params(
        "fashion-mnist", {"n_train": 300, "n_eval": 40, "n_probe": 10, "n_heldout": 0})).load(0)
    assert data.train.images.shape[-1] == data.eval.images.shape[-1] == MODEL
    params = {"location": "random"} if name == "badnet-random" else {}
    cls = "badnet" if name == "badnet-random" else name
    attack = ATTACKS.get(cls)(ATTACKS.params(cls, {"target": TARGET, "n_poison": 5, **params}), 0)
    plan = attack.poison(data)
    keep = data.eval.labels != data.eval.classnames.index(TARGET)
    evaluated = evaluation_inputs(attack, data, plan)
    before = attack.apply_trigger(data.eval.images[keep], attack.generator(4))
    assert torch.equal(evaluated, before)
    if name == "badnet":
        assert torch.equal(evaluated[:, :, -4:, -4:], attack.patch.expand(int(keep.sum()), 3, 4, 4))
        assert torch.equal(evaluated[:, :, :-4], data.eval.images[keep][:, :, :-4])


def test_targeted_stores_its_targets_at_the_training_geometry_and_evaluates_them_as_clean_images():
    """Evaluation images of another size than the training images (a dataset plugin may decode
    them so): the poisoned pairs hold the target image resized and centre-cropped as any image
    brought to the stored geometry (``eval_geometry``, not a stretch to the training size); the
    ASR predicts the target images as clean evaluation does."""
    g = torch.Generator().manual_seed(0)
    train = CaptionDataset(torch.randint(0, 256, (40, 3, STORED, STORED), generator=g, dtype=torch.uint8),
                           [f"a photo of a {CLASSES[i % 3]}" for i in range(40)], torch.arange(40) % 3)
    ev = EvalSet(torch.randint(0, 256, (9, 3, 32, 48), generator=g, dtype=torch.uint8), torch.arange(9) % 3,
                 list(CLASSES), ["a photo of a {}."])
    data = DatasetBundle(train, ev, [[c] for c in CLASSES], ["a photo of {}"])
    attack = ATTACKS.get("targeted")(ATTACKS.params("targeted", {"n_targets": 3, "pairs_per_target": 2}), 0)
    plan = attack.poison(data)
    rows = torch.tensor([t["eval_row"] for t in plan.manifest["targets"]])
    stored = plan.train.images[plan.train.is_poison][::2]
    assert torch.equal(stored, eval_geometry(ev.images[rows], STORED))
    seen = []
    attack.evaluate(ZeroShotModel(lambda x: seen.append(x) or torch.zeros(len(x), 5, dtype=torch.long), MODEL), data, plan)
    assert torch.equal(seen[0], eval_geometry(ev.images[rows], MODEL))


def test_non_square_training_images_are_refused_with_the_rule():
    data = twin_bundle("badnet", STORED)
    data.train.images = data.train.images[:, :, :, :40].contiguous()
    attack = make_attack("badnet")
    plan = attack.poison(data)
    with pytest.raises(ValueError, match="stored geometry of the training images, which must be square"):
        attack.evaluate(ZeroShotModel(lambda x: torch.zeros(len(x), 5, dtype=torch.long), MODEL), data, plan)
