"""Evaluation folders are checked against the class list before any training (tiny PNG folders)."""
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from poisonbench.datasets.evalsets import imagenet_wnids, load_eval


def png(path, value=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (10, 10), (value, 0, 0)).save(path)


def folders(root, names, with_images=()):
    """Class folders ``names`` under ``root`` (empty but for one PNG in each of ``with_images``)."""
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(with_images):
        png(root / name / "0.png", 10 * i)


def load(spec):
    return load_eval(spec, 8, 0, 0, torch.Generator().manual_seed(0))


# --- imagenet:ROOT ----------------------------------------------------------------------------

def test_imagenet_wnid_folders_are_read_by_wordnet_id(tmp_path):
    wnids = imagenet_wnids()
    folders(tmp_path / "val", wnids, with_images=[wnids[2], wnids[837]])
    ev, probe, _ = load(f"imagenet:{tmp_path}")
    assert ev.labels.tolist() == [2, 837] and ev.class_ids == wnids and probe is None
    assert ev.display_name(837) == "sunglasses (n04356056)"


def test_imagenet_folders_named_by_number_are_refused(tmp_path):
    """0..999 in sorted-string order put folder 10 at index 2: 988 of 1000 classes wrong."""
    folders(tmp_path / "val", [str(i) for i in range(1000)], with_images=["10"])
    with pytest.raises(ValueError) as e:
        load(f"imagenet:{tmp_path}")
    msg = str(e.value)
    assert "1000 folder(s) that are not ImageNet WordNet ids (e.g. 0, 1, 10, 100, 101)" in msg
    assert "labels.csv" in msg and "imagefolder:ROOT" in msg and "classnames.txt" in msg and "n01440764" in msg


def test_imagenet_with_one_foreign_folder_names_it(tmp_path):
    wnids = imagenet_wnids()
    folders(tmp_path / "val", wnids[:-1] + ["n99999999"], with_images=[wnids[0]])
    with pytest.raises(ValueError, match=r"1 folder\(s\) that are not ImageNet WordNet ids \(e.g. n99999999\) "
                                         r"and 1 of the 1000 WordNet ids missing \(e.g. n15075141\)"):
        load(f"imagenet:{tmp_path}")


def test_imagenet_probe_split_is_checked_too(tmp_path):
    wnids = imagenet_wnids()
    folders(tmp_path / "val", wnids, with_images=[wnids[0]])
    folders(tmp_path / "train", [f"c{i}" for i in range(1000)], with_images=["c0"])
    with pytest.raises(ValueError, match=r"train has 1000 class folders"):
        load(f"imagenet:{tmp_path}")


# --- imagefolder:ROOT -------------------------------------------------------------------------

NUMBERED = [str(i) for i in range(12)]  # sorted as strings: 0, 1, 10, 11, 2, ...


def test_numbered_folders_with_names_in_line_order_are_refused(tmp_path):
    folders(tmp_path, NUMBERED, with_images=NUMBERED)
    (tmp_path / "classnames.txt").write_text("\n".join(f"class {i}" for i in range(12)) + "\n")
    with pytest.raises(ValueError, match=r"sorted string order \(0, 1, 10, 11, \.\.\.\).*folder<TAB>name"):
        load(f"imagefolder:{tmp_path}")


def test_folder_tab_name_lines_map_by_folder_in_the_order_given(tmp_path):
    folders(tmp_path, NUMBERED, with_images=NUMBERED)  # folder f holds one image of red level 10 * f
    order = NUMBERED[::-1]  # the file's order is the class order: class 0 is folder 11
    (tmp_path / "classnames.txt").write_text("".join(f"{f}\tclass {f}\n" for f in order))
    ev, _, _ = load(f"imagefolder:{tmp_path}")
    assert ev.classnames == [f"class {f}" for f in order] and ev.class_ids == order
    for image, label in zip(ev.images, ev.labels.tolist()):  # each image carries its folder's class
        assert int(image[0, 4, 4]) == 10 * int(order[label])
    assert sorted(ev.labels.tolist()) == list(range(12))
    # an integer is the class index, never the integer-named folder (class 10 is folder 1, not folder 10)
    assert ev.class_index("10") == 10 and ev.class_ids[10] == "1" and ev.display_name(10) == "class 1"


@pytest.mark.parametrize("text, message", [
    ("0\tzero\n1\tone\n2\ttwo\n", "folder(s) 2 named there are not class folders"),
    ("0\tzero\n", "class folder(s) 1 have no line"),
    ("0\tzero\n0\tnought\n1\tone\n", "folder(s) 0 listed twice"),
    ("0\tzero\none\n", "mixes folder<TAB>name lines with plain names"),
])
def test_folder_tab_name_lines_must_match_the_folders(tmp_path, text, message):
    folders(tmp_path, ["0", "1"], with_images=["0", "1"])
    (tmp_path / "classnames.txt").write_text(text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load(f"imagefolder:{tmp_path}")


def test_numbered_folders_without_classnames_are_named_by_folder(tmp_path):
    folders(tmp_path, NUMBERED, with_images=NUMBERED)
    ev, _, _ = load(f"imagefolder:{tmp_path}")
    assert ev.classnames == sorted(NUMBERED) and ev.class_ids == sorted(NUMBERED)
    # "8" is the index of class 8 (folder 6) and the name of class 10 (folder 8): refused, with how to pick
    with pytest.raises(ValueError, match=r"'8' is ambiguous.*target=#8.*the class named '8' with target=#10"):
        ev.class_index("8")
    assert ev.class_index("#8") == 8 and ev.class_ids[8] == "6"


def test_names_in_sorted_folder_order_still_work_when_the_orders_agree(tmp_path):
    folders(tmp_path / "val", ["class_1", "class_2", "class_3"], with_images=["class_1", "class_3"])
    (tmp_path / "classnames.txt").write_text("one\ntwo\nthree\n")
    ev, _, _ = load(f"imagefolder:{tmp_path}")
    assert ev.classnames == ["one", "two", "three"] and ev.labels.tolist() == [0, 2]


def test_train_and_val_must_have_the_same_class_folders(tmp_path):
    folders(tmp_path / "val", ["a", "b"], with_images=["a", "b"])
    folders(tmp_path / "train", ["a", "c"], with_images=["a", "c"])
    with pytest.raises(ValueError, match=r"different class folders \(e.g. b, c only in one\)"):
        load(f"imagefolder:{tmp_path}")


# --- cifar10:ROOT -----------------------------------------------------------------------------

def fake_cifar10(root, monkeypatch, test_labels, names=10):
    import torchvision.datasets.cifar

    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, labels in [(f"data_batch_{i}", [0, 1]) for i in range(1, 6)] + [("test_batch", test_labels)]:
        batch = {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), "labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class_{i}" for i in range(names)]}))
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)


def test_cifar_labels_outside_the_class_list_are_refused(tmp_path, monkeypatch):
    fake_cifar10(tmp_path, monkeypatch, [0, 10, 3])
    with pytest.raises(ValueError, match=r"test split .* has label 10, outside the 10 classes"):
        load(f"cifar10:{tmp_path}")


def test_cifar_class_list_of_the_wrong_length_is_refused(tmp_path, monkeypatch):
    fake_cifar10(tmp_path, monkeypatch, [0, 1, 2], names=100)
    with pytest.raises(ValueError, match="has 100 names, expected 10"):
        load(f"cifar10:{tmp_path}")


# --- imagefolder: classnames.txt, split folders, unreadable and missing images -----------------

@pytest.mark.parametrize("folder_names, lines, message", [
    (["sandal", "t-shirt", "trouser"], ["sandal", "trouser", "t-shirt"],  # `ls` order in en_US
     "line 'trouser' names folder trouser, but plain lines are matched to the class folders in sorted order, which "
     "gives it to folder t-shirt; 2 line(s) are folder names in another order. Write the names in sorted folder "
     "order (sandal, t-shirt, trouser), or each line as folder<TAB>name"),
    (["ankle_boot", "bag"], ["Bag", "ankle boot"],  # `_` read as a space, any case
     "line 'Bag' names folder bag, but plain lines are matched to the class folders in sorted order, which gives it "
     "to folder ankle_boot"),
])
def test_plain_names_that_are_the_folder_names_in_another_order_are_refused(tmp_path, folder_names, lines, message):
    """Plain lines go to the folders in sorted order: here they would swap two classes' labels."""
    folders(tmp_path, folder_names, with_images=folder_names)
    (tmp_path / "classnames.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        load(f"imagefolder:{tmp_path}")


@pytest.mark.parametrize("text", ["one\ntwo\n", "b\tone\nc\ttwo\n"])
def test_classnames_with_a_byte_order_mark_are_read(tmp_path, text):
    folders(tmp_path, ["b", "c"], with_images=["b", "c"])
    (tmp_path / "classnames.txt").write_text(text, encoding="utf-8-sig")
    ev, _, _ = load(f"imagefolder:{tmp_path}")
    assert ev.classnames == ["one", "two"]


def test_a_tab_line_with_an_empty_name_is_named(tmp_path):
    folders(tmp_path, ["4", "5"], with_images=["4", "5"])
    (tmp_path / "classnames.txt").write_text("4\tfour\n5\t\n")
    with pytest.raises(ValueError, match=r"empty class name for folder 5; write each line as folder<TAB>name"):
        load(f"imagefolder:{tmp_path}")


def test_validation_is_an_evaluation_split(tmp_path):
    """train/ + validation/ (Hugging Face, torchvision layouts): not a 2-class set "train", "validation"."""
    folders(tmp_path / "train", ["a", "b"], with_images=["a", "b"])
    folders(tmp_path / "validation", ["a", "b"], with_images=["b"])
    ev, probe, _ = load(f"imagefolder:{tmp_path}")
    assert ev.classnames == ["a", "b"] and ev.labels.tolist() == [1] and probe.labels.tolist() == [0, 1]


@pytest.mark.parametrize("splits", [["train", "dev"], ["train"], ["eval", "training"]])
def test_split_folders_are_not_read_as_classes(tmp_path, splits):
    for s in splits:
        folders(tmp_path / s, ["a", "b"], with_images=["a", "b"])
    with pytest.raises(ValueError, match=rf"has the folder\(s\) {', '.join(sorted(splits))}, which are split names, "
                                         r"not classes. The accepted layouts: ROOT/<class>/<image>.*ROOT/validation"):
        load(f"imagefolder:{tmp_path}")


def broken_images(folder, n_good, n_bad):
    """``n_good`` PNGs and ``n_bad`` files that are not images in class folder ``folder``."""
    for i in range(n_good):
        png(folder / f"{i}.png")
    for i in range(n_bad):
        (folder / f"bad{i}.png").write_bytes(b"not an image")


def test_unreadable_evaluation_images_above_max_skip_rate_are_refused(tmp_path):
    """The training data's limit (max_skip_rate, default 1 %) holds for evaluation images too."""
    broken_images(tmp_path / "val" / "a", 10, 1)
    broken_images(tmp_path / "val" / "b", 7, 2)
    with pytest.raises(ValueError) as e:
        load(f"imagefolder:{tmp_path}")
    msg = str(e.value)
    assert "3 of 20 evaluation images (15.0%) cannot be read, above max_skip_rate=0.01" in msg
    assert "bad0.png: not a readable image" in msg and "raise max_skip_rate" in msg
    ev, _, skipped = load_eval(f"imagefolder:{tmp_path}", 8, 0, 0, torch.Generator(), max_skip_rate=0.2)
    assert len(ev) == 17 and skipped == 3


def test_unreadable_probe_images_above_max_skip_rate_are_refused(tmp_path):
    broken_images(tmp_path / "val" / "a", 3, 0)
    broken_images(tmp_path / "train" / "a", 2, 1)
    with pytest.raises(ValueError, match=r"train: 1 of 3 linear-probe images \(33.3%\) cannot be read"):
        load(f"imagefolder:{tmp_path}")


def test_class_folders_without_images_are_named(tmp_path):
    folders(tmp_path / "val", ["a", "b"])
    with pytest.raises(ValueError, match=rf"imagefolder: no evaluation images in the class folders of "
                                         rf"{re.escape(str(tmp_path / 'val'))} \(image files: .jpg"):
        load(f"imagefolder:{tmp_path}")


def test_folder_names_with_superscript_digits_do_not_crash_the_order_check(tmp_path):
    """"²" is a digit to str.isdigit but not to int(): the numeric-order check crashed on "10²"."""
    folders(tmp_path, ["a10\u00b2", "b"], with_images=["a10\u00b2", "b"])
    (tmp_path / "classnames.txt").write_text("square\nother\n")
    ev, _, _ = load(f"imagefolder:{tmp_path}")
    assert ev.classnames == ["square", "other"]
