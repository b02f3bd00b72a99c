"""CaptionSearch (datasets/base.py) against its reference formulation: one IGNORECASE whole-word
regular expression per caption."""
import random
import re

from poisonbench.datasets.base import CaptionDataset, CaptionSearch
from poisonbench.datasets.fashion_mnist import CLASS_WORDS

ODD = ["", "   ", "T-SHIRT!", "a tee-shirt", "teeshirt", "ſhirt on a line", "\u212aNIT SWEATER", "Ankle Boot\nboot",
       "bootie\x00boot", "a pair of  trousers", "pair of trousers", "sandals", "flip-flop.", "ẞ dress", "日本 bag",
       "bag", "handbags", "tote bag,tote bag", "sweater\tjumper", "the shirt's collar", "coat\u00a0rack"]


def reference(captions, words):
    pattern = re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
    return [i for i, c in enumerate(captions) if pattern.search(c)]


def test_caption_search_equals_the_regular_expression_on_odd_and_random_captions():
    rng = random.Random(0)
    vocab = [w for words in CLASS_WORDS for w in words] + ["a", "photo", "of", "ſ", "K", "-", ".", "\n", "é"]
    captions = ODD + ["".join(rng.choice([" ", "", "-"]) + rng.choice(vocab) for _ in range(rng.randrange(8)))
                      for _ in range(3000)]
    search = CaptionSearch(captions)
    for words in CLASS_WORDS + [["knit sweater", "shirt"], ["\u212anit"], ["ſhirt"], ["boot"], ["日本"]]:
        assert search.naming(words) == reference(captions, words), words
    data = CaptionDataset.__new__(CaptionDataset)
    data.captions = captions
    assert CaptionDataset.captions_naming(data, ["shirt"]) == reference(captions, ["shirt"])
