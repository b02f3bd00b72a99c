"""Classes travel as indices; names (which need not be unique) are for prompts and people.

OpenAI's ImageNet list names two classes "missile" (657, 744) and two "sunglasses" (836, 837).
Synthetic evaluation sets with duplicate names stand in for it where images are needed; the real
list (names and WordNet ids, no images) checks the ImageNet parts.
"""
import pytest
import torch

from poisonbench.attacks.backdoor import BackdoorAttack
from poisonbench.attacks.base import PoisonPlan, ZeroShotModel
from poisonbench.attacks.targeted import Targeted, TargetedParams
from poisonbench.datasets.base import CaptionDataset, DatasetBundle, EvalSet
from poisonbench.datasets.evalsets import imagenet_classnames, imagenet_wnids
from poisonbench.datasets.files import label_by_caption
from poisonbench.registry import ATTACKS, build_params

NAMES = ["cat", "dog", "sunglasses", "sunglasses", "bag"]
IDS = ["n001", "n002", "n003", "n004", "n005"]
SHARED = {657, 744, 836, 837}  # ImageNet classes whose name another class has


def evalset(names=NAMES, ids=IDS, labels=None, id_kind="WordNet id") -> EvalSet:
    labels = torch.arange(len(names)).repeat_interleave(5) if labels is None else labels
    images = torch.randint(0, 256, (len(labels), 3, 12, 12), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    return EvalSet(images, labels, list(names), ["a photo of a {}."], ids, id_kind)


def bundle(ev: EvalSet | None = None) -> DatasetBundle:
    """10 training pairs per class of ``NAMES``, captions naming the class; 5 eval images per class."""
    labels = torch.arange(len(NAMES)).repeat_interleave(10)
    captions = [f"a photo of a {NAMES[y]}" for y in labels.tolist()]
    train = CaptionDataset(torch.randint(0, 256, (len(labels), 3, 12, 12), generator=torch.Generator().manual_seed(0),
                                         dtype=torch.uint8), captions, labels)
    return DatasetBundle(train, ev or evalset(), [[c] for c in NAMES], ["a picture of {}"])


def imagenet(labels: torch.Tensor) -> EvalSet:
    return EvalSet(torch.zeros(len(labels), 3, 1, 1, dtype=torch.uint8), labels, imagenet_classnames(),
                   ["{}"], imagenet_wnids(), "WordNet id")


# --- the shipped ImageNet ids ----------------------------------------------------------------

def test_imagenet_wnids_are_the_sorted_class_order_and_tell_duplicates_apart():
    wnids, names = imagenet_wnids(), imagenet_classnames()
    assert len(wnids) == len(names) == 1000 and wnids == sorted(wnids) and len(set(wnids)) == 1000
    assert wnids[0] == "n01440764" and names[0] == "tench"
    assert [(names[i], wnids[i]) for i in sorted(SHARED)] == [
        ("missile", "n03773504"), ("missile", "n04008634"), ("sunglasses", "n04355933"), ("sunglasses", "n04356056")]
    assert imagenet(torch.zeros(1, dtype=torch.int64)).shared_name_classes() == sorted(SHARED)


# --- selecting a class -----------------------------------------------------------------------

def test_a_name_of_several_classes_is_refused_with_the_candidates_and_how_to_pick():
    with pytest.raises(ValueError) as e:
        evalset().class_index("sunglasses")
    msg = str(e.value)
    assert "names 2 evaluation classes" in msg and "#2 'sunglasses' (WordNet id n003)" in msg and "#3" in msg
    assert "n004" in msg and "target=2" in msg and "target=n003" in msg
    with pytest.raises(ValueError, match="n04355933.*n04356056"):
        imagenet(torch.zeros(1, dtype=torch.int64)).class_index("sunglasses")
    with pytest.raises(ValueError, match="pick one by index"):
        evalset(ids=None).class_index("Sunglasses")  # case-insensitive: still two classes


def test_selection_by_unique_name_index_and_id():
    ev = evalset()
    assert ev.class_index("cat") == 0 and ev.class_index("BAG") == 4  # exact and case-insensitive
    assert ev.class_index("3") == 3 and ev.class_index("#2") == 2 and ev.class_index(3) == 3
    assert ev.class_index("n004") == 3
    with pytest.raises(ValueError, match="out of range"):
        ev.class_index("5")
    numbered = evalset(names=["1", "0", "x"], ids=None)
    assert numbered.class_index("#0") == 0 and numbered.class_index("2") == 2 and numbered.class_index("x") == 2
    inet = imagenet(torch.zeros(1, dtype=torch.int64))
    assert inet.class_index("n04356056") == 837 and inet.class_index("837") == 837
    assert inet.class_index("tench") == 0 and inet.class_index("mushroom") == 947


def test_an_integer_is_the_index_never_an_integer_folder_name():
    """Folders named by number in another order than the classes (an ImageFolder with a
    folder<TAB>name classnames.txt): "0" is class 0, not the class whose folder is "0"."""
    ev = evalset(names=["cat", "dog", "bag"], ids=["2", "0", "1"], id_kind="folder name")
    assert [ev.class_index(t) for t in ("0", "1", "2", " 2", "#1", 0)] == [0, 1, 2, 2, 1, 0]
    with pytest.raises(ValueError, match="class index 7 is out of range"):
        ev.class_index("7")  # not looked up among the folder names either
    named = evalset(names=["cat", "dog", "bag"], ids=["x_cat", "x_dog", "x_bag"], id_kind="folder name")
    assert named.class_index("x_dog") == 1  # a non-integer id still selects its class


def test_an_integer_that_is_the_name_of_another_class_is_ambiguous():
    """Class 1 is named "0": "0" could mean class 0 (by index) or class 1 (by name)."""
    numbered = evalset(names=["1", "0", "x"], ids=None)
    for text, index_of, name_of in (("0", 0, 1), ("1", 1, 0)):
        with pytest.raises(ValueError) as e:
            numbered.class_index(text)
        msg = str(e.value)
        assert f"it is the name of class #{name_of} {text!r} and the index of class #{index_of}" in msg
        assert f"pick class #{index_of} with target=#{index_of}" in msg and f"with target=#{name_of}" in msg
        assert numbered.class_index(f"#{index_of}") == index_of
    assert evalset(names=["a", "b", "2"], ids=None).class_index("2") == 2  # its own index: no ambiguity
    assert evalset(names=["a", "b", "12"], ids=None).class_index("12") == 2  # no class 12: the name


@pytest.mark.parametrize("text", ["\u0668", "\uff18", "\u00b2", "#\u0668"])  # Arabic-Indic 8, fullwidth 8, superscript 2
def test_non_ascii_digits_are_refused(text):
    with pytest.raises(ValueError, match="non-ASCII digits; give a class index in ASCII digits 0-9"):
        evalset(names=[f"c{i}" for i in range(10)], ids=None).class_index(text)


def test_shared_name_advice_offers_only_spellings_that_select_the_class():
    """Integer folder names read as indices: "by folder name: target=0" would select class 0."""
    ev = evalset(names=["cat", "sunglasses", "sunglasses"], ids=["4", "0", "1"], id_kind="folder name")
    with pytest.raises(ValueError) as e:
        ev.class_index("sunglasses")
    msg = str(e.value)
    assert "pick one by index (e.g. target=1)" in msg and "by folder name: target" not in msg
    ev = evalset(names=["1", "sunglasses", "sunglasses"], ids=["a", "b", "c"], id_kind="folder name")
    with pytest.raises(ValueError, match=r"e.g. target=#1, or by folder name: target=b\)"):
        ev.class_index("sunglasses")  # "1" is the name of class 0


def test_display_names_disambiguate_shared_names_only():
    ev = evalset()
    assert [ev.display_name(i) for i in range(5)] == ["cat", "dog", "sunglasses (n003)", "sunglasses (n004)", "bag"]
    assert evalset(ids=None).display_name(3) == "sunglasses (#3)"
    inet = imagenet(torch.zeros(1, dtype=torch.int64))
    assert inet.display_name(837) == "sunglasses (n04356056)" and inet.display_name(657) == "missile (n03773504)"
    assert inet.display_name(0) == "tench"


# --- backdoors -------------------------------------------------------------------------------

BACKDOORS = sorted(n for n in ATTACKS.names() if issubclass(ATTACKS.get(n), BackdoorAttack))
# what an attack needs beyond n_poison to fit the small bundle (badclip: a batch of target captions)
FITS = {"badclip": {"opt_batch_size": 4}}


@pytest.mark.parametrize("name", BACKDOORS)
def test_a_target_whose_name_another_class_has_is_refused(name):
    """Identical prompts give identical classifier columns: ASR would be decided by tie-breaking."""
    cls = ATTACKS.get(name)
    for target in ("3", "n004"):
        with pytest.raises(ValueError, match=r"shares its name with #2 sunglasses \(n003\).*tie-breaking"):
            cls(build_params(cls.Params, {"target": target, "n_poison": 5, **FITS.get(name, {})}, name), 0).check(bundle())
    for data in (bundle(), bundle(evalset(ids=["n001", "n002", "3", "4", "n005"], id_kind="folder name"))):
        with pytest.raises(ValueError) as e:
            cls(build_params(cls.Params, {"target": "sunglasses", "n_poison": 5, **FITS.get(name, {})}, name), 0).check(data)
        msg = str(e.value)  # at once that neither can be a target, not how to pick one of them
        assert "names 2 evaluation classes" in msg and "none of them can be a backdoor target" in msg
        assert "pick one" not in msg and "tie-breaking" in msg
    cls(build_params(cls.Params, {"target": "bag", "n_poison": 5, **FITS.get(name, {})}, name), 0).check(bundle())  # a unique name is fine


def test_backdoor_manifest_keeps_the_index_and_a_readable_name():
    cls = ATTACKS.get("badnet")
    plan = cls(build_params(cls.Params, {"target": "4", "n_poison": 5}, "badnet"), 0).poison(bundle())
    assert plan.manifest["target_index"] == 4 and plan.manifest["target"] == "bag"


# --- targeted poisoning ----------------------------------------------------------------------

def targeted(n_targets=5, pairs=1, seed=0) -> Targeted:
    return Targeted(TargetedParams(n_targets=n_targets, pairs_per_target=pairs), seed)


def test_draw_is_unchanged_when_names_are_unique():
    """Fashion-MNIST-like names: the plain draw (true + randint(1, C)) % C, nothing redrawn."""
    names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
    ev = evalset(names, None, torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(3)))
    for seed in range(5):
        a = targeted(n_targets=50, seed=seed)
        rows, adversarial = a.choose_targets(bundle(ev))
        g = a.generator(1)
        expect_rows = torch.randperm(200, generator=g)[:50]
        offset = torch.randint(1, 10, (50,), generator=g)
        assert torch.equal(rows, expect_rows)
        assert torch.equal(adversarial, (ev.labels[expect_rows] + offset) % 10)


def test_adversarial_class_never_shares_a_name():
    """True class 744 "missile": the adversarial class is never 657 (the other "missile"), 744,
    nor either "sunglasses"; 5000 draws (the plain draw hits one of 657/836/837 with p 3/999 each)."""
    labels = torch.full((1000,), 744, dtype=torch.int64)
    data = DatasetBundle(bundle().train, imagenet(labels), [], [])
    drawn = torch.cat([targeted(n_targets=1000, seed=s).choose_targets(data)[1] for s in range(5)])
    assert not set(drawn.tolist()) & SHARED
    assert len(set(drawn.tolist())) > 900  # still spread over the other classes


def test_targeted_manifest_holds_indices_and_readable_names():
    data = bundle()
    plan = targeted(n_targets=25, pairs=1).poison(data)
    for t in plan.manifest["targets"]:
        true = int(data.eval.labels[t["eval_row"]])
        assert t["true_index"] == true and t["true_class"] == data.eval.display_name(true)
        assert t["adversarial_index"] not in (2, 3, true)
        assert t["adversarial_class"] == NAMES[t["adversarial_index"]]
    assert any(t["true_class"] == "sunglasses (n004)" for t in plan.manifest["targets"])


def fixed_model(top1: torch.Tensor) -> ZeroShotModel:
    """A model whose top-1 for evaluation row r is ``top1[r]`` (the rest of its top-5 never matters here)."""
    def predict(images):
        raise AssertionError("targets are clean evaluation images: clean_top5 is used")

    top5 = torch.stack([top1] + [(top1 + k) % 5 for k in range(1, 5)], dim=1)
    return ZeroShotModel(predict, 12, clean_top5=top5)


def test_evaluation_compares_indices_not_names():
    """A target of true class 2 ("sunglasses") with adversarial class 3 (also "sunglasses"):
    a clean model that classifies it correctly (top-1 = 2) is no success. Looked up by name,
    the adversarial class was 2 and the clean model counted as fooled."""
    data = bundle()
    row = int((data.eval.labels == 2).nonzero()[0])
    manifest = {"attack": "targeted", "pairs_per_target": 1, "captions": ["a photo of sunglasses"],
                "targets": [{"eval_row": row, "true_class": "sunglasses", "adversarial_class": "sunglasses",
                             "true_index": 2, "adversarial_index": 3}]}
    plan = PoisonPlan(data.train, manifest)
    out = targeted().evaluate(fixed_model(data.eval.labels.clone()), data, plan)
    assert out["asr"] == 0.0 and out["targets"][0]["success"] is False
    assert out["targets"][0]["predicted_class"] == "sunglasses (n003)" and out["targets"][0]["predicted_index"] == 2
    fooled = data.eval.labels.clone()
    fooled[row] = 3
    assert targeted().evaluate(fixed_model(fooled), data, plan)["asr"] == 1.0


def test_targeted_preview_shows_the_disambiguated_true_class():
    data = bundle()
    plan = targeted(n_targets=25, pairs=1).poison(data)
    captions = [p[2] for p in targeted(n_targets=25, pairs=1).preview_pairs(data, plan, 25)]
    assert "target image, true class: sunglasses (n003)" in captions


def test_targeted_needs_two_classes_with_unique_names():
    ev = evalset(["a", "a", "b"], None)
    with pytest.raises(ValueError, match="2 evaluation classes with a name no other class has"):
        targeted(n_targets=2).check(bundle(ev))


# --- captions ---------------------------------------------------------------------------------

def test_a_word_of_several_classes_labels_no_class():
    words = [["cat"], ["sunglasses"], ["sunglasses"]]
    assert label_by_caption(["a cat in sunglasses", "sunglasses", "a cat"], words).tolist() == [-1, -1, 0]
