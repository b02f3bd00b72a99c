"""The training text (benchmark/train_text.py): the EDA cache returns what EDA computes, is shared
by the defenses that rewrite captions the same way, survives a broken file; tokens made batch by
batch equal those made up front."""
import pytest
import torch

from poisonbench.datasets.fashion_mnist import CLASS_WORDS
from poisonbench.models import create_model
from poisonbench.registry import DEFENSES, build_params
from poisonbench import train_text
from poisonbench.train_text import CaptionTokens, transformed_captions

CAPTIONS = [f"a photo of a {w}, number {i}" for i, words in enumerate(CLASS_WORDS * 30) for w in words[:1]]


def defense(name, **params):
    cls = DEFENSES.get(name)
    return cls(build_params(cls.Params, params, name), 0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("POISONBENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(train_text, "CACHE_ABOVE", 100)
    return tmp_path / "captions"


def test_cached_eda_equals_eda_and_is_shared_by_aug_only_and_roclip(cache, monkeypatch):
    aug = defense("aug-only")
    expected = aug.text_transform(CAPTIONS)
    assert expected != CAPTIONS and transformed_captions(aug, CAPTIONS) == expected
    (written,) = cache.glob("*.parquet")
    roclip = defense("roclip", pool_size=256)
    monkeypatch.setattr(type(roclip), "text_transform", lambda self, c: pytest.fail("recomputed, not read"))
    assert transformed_captions(roclip, CAPTIONS) == expected  # same EDA seed and alpha: the same file
    assert transformed_captions(defense("clip"), CAPTIONS) == CAPTIONS and len(list(cache.glob("*.parquet"))) == 1


def test_another_alpha_or_fewer_captions_are_not_served_from_the_cache(cache):
    transformed_captions(defense("aug-only"), CAPTIONS)
    other = defense("aug-only", eda_alpha=0.3)
    assert transformed_captions(other, CAPTIONS) == other.text_transform(CAPTIONS)
    few = CAPTIONS[:50]  # below CACHE_ABOVE: computed, nothing written
    assert transformed_captions(other, few) == other.text_transform(few) and len(list(cache.glob("*.parquet"))) == 2


def test_a_broken_cache_file_is_computed_again_and_replaced(cache):
    aug = defense("aug-only")
    transformed_captions(aug, CAPTIONS)
    (path,) = cache.glob("*.parquet")
    path.write_bytes(path.read_bytes()[:100])
    assert transformed_captions(aug, CAPTIONS) == aug.text_transform(CAPTIONS)
    assert len(path.read_bytes()) > 100


def test_tokens_made_per_batch_equal_tokens_made_up_front():
    _, tokenizer = create_model("poisonbench-tiny")
    eager, lazy = CaptionTokens(CAPTIONS, tokenizer, eager=True), CaptionTokens(CAPTIONS, tokenizer, eager=False)
    rows = torch.tensor([5, 0, 199, 5, 42])
    assert lazy.tensor is None and torch.equal(lazy[rows], eager[rows]) and lazy[rows].dtype == torch.int64


def test_an_unwritable_cache_folder_computes_the_captions_with_a_warning(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("POISONBENCH_CACHE", str(tmp_path / "file"))  # a file: no folder can be made in it
    monkeypatch.setattr(train_text, "CACHE_ABOVE", 100)
    aug = defense("aug-only")
    with pytest.warns(UserWarning, match="cannot be used"):
        assert transformed_captions(aug, CAPTIONS) == aug.text_transform(CAPTIONS)


def test_a_cache_file_of_the_right_length_but_not_captions_is_computed_again(cache):
    import pyarrow as pa
    import pyarrow.parquet as pq

    aug = defense("aug-only")
    transformed_captions(aug, CAPTIONS)
    (path,) = cache.glob("*.parquet")
    pq.write_table(pa.table({"caption": [None] * len(CAPTIONS)}, schema=pa.schema([("caption", pa.string())])), path)
    assert transformed_captions(aug, CAPTIONS) == aug.text_transform(CAPTIONS)
