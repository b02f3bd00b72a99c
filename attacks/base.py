"""The attack interface: poison the training data, then measure success on a trained model."""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from poisonbench.datasets.base import CaptionDataset, CaptionSearch, DatasetBundle, with_article
from poisonbench.preprocess import eval_geometry
from poisonbench.survival import TriggerViews
from poisonbench.utils import derive_seed, hash_json


#: the clean baseline: the attack that poisons nothing (``Attack.poisons`` False); a cell's clean
#: model (``--init clean``) is trained under it
CLEAN = "none"


@dataclass
class PoisonPlan:
    """The result of ``Attack.poison``.

    Attributes:
        train: the training set the model sees (clean rows, then the poisoned pairs, flagged in
            ``train.is_poison``).
        manifest: JSON-serialisable record of what was poisoned (rows, captions, trigger, target);
            saved with the run, and its hash goes into the result row.
    """

    train: CaptionDataset
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def n_poison(self) -> int:
        """Number of poisoned pairs in the training set."""
        return int(self.train.is_poison.sum())

    @property
    def poison_rate(self) -> float:
        """Poisoned pairs / all training pairs, in [0, 1]."""
        return self.n_poison / max(1, len(self.train))

    def manifest_hash(self) -> str:
        """SHA-256 (hex) of the manifest's canonical JSON."""
        return hash_json(self.manifest)


@dataclass
class ZeroShotModel:
    """What an attack's ``evaluate`` gets: a trained model ready for zero-shot prediction.

    Attributes:
        predict: function uint8 images [N, 3, S, S] at the model's geometry -> int64 top-5
            class indices [N, 5] over the evaluation classes.
        image_size: S, the model's input side in pixels.
        clean_top5: int64 [M, 5], ``predict`` of every evaluation image (``data.eval.images`` at
            the evaluation geometry), computed once by the evaluator, or None. Predictions do not
            depend on which other images share a batch, so attacks may index it instead of
            predicting clean evaluation images again.
        encode_images: function uint8 images [N, 3, S, S] -> float32 L2-normalised embeddings
            [N, D], or None.
        encode_texts: function list of N strings -> float32 L2-normalised embeddings [N, D]
            (for text-side attacks), or None.
        classifier: float32 [D, C], the zero-shot classifier (normalised mean prompt embedding
            of each evaluation class), or None.
    """

    predict: Any
    image_size: int
    clean_top5: Any = None
    encode_images: Any = None
    encode_texts: Any = None
    classifier: Any = None

    def predict_eval(self, images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Top-5 of the evaluation images ``rows`` (int64 [K] or bool [M]), given as ``images``
        (uint8 [K, 3, S, S], at the evaluation geometry): ``clean_top5[rows]`` when the
        evaluator has it, else ``predict(images)``."""
        return self.clean_top5[rows] if self.clean_top5 is not None else self.predict(images)


@dataclass
class AttackContext:
    """What ``Attack.poison`` receives beyond the data when the attack needs a model
    (``Attack.model_init`` is not None), e.g. BadCLIP's trigger optimised against a surrogate CLIP.

    Attributes:
        device: where to run the model (the cell's device).
        surrogate: function () -> (model, tokenizer): a new open_clip model of the cell's
            architecture with the weights ``model_init`` names, in eval mode on ``device``, its
            parameters not requiring gradients; the tokenizer maps B strings to int64 [B, L].
        cached: function (name, compute, depends_on=None) -> dict of tensors: ``compute()`` (a dict
            of CPU tensors) run once per (dataset and its parameters, seed, surrogate weights,
            attack, ``depends_on``: the attack parameters the computation depends on, a JSON-ready
            dict, by default all of them, ``name``) and kept on disk under
            ``RESULTS/cache/attack-<key>/``, so every defense's cell, every value of a parameter it
            does not depend on and every process of a DDP cell get the same tensors from one
            computation (rank 0 computes, the other ranks wait and load).
    """

    device: torch.device
    surrogate: Callable[[], tuple[Any, Any]]
    cached: Callable[..., dict[str, torch.Tensor]]


def to_stored_geometry(images: torch.Tensor, data: DatasetBundle) -> torch.Tensor:
    """``images`` brought to the stored geometry of ``data``'s training images: the geometry at
    which every trigger is applied and targeted poisoning stores its target images
    (attacks/backdoor.py, "Where a trigger is applied").

    Args:
        images: uint8 [N, 3, H, W], e.g. evaluation images as their dataset decodes them.
    Returns:
        uint8 [N, 3, S, S], S the side of the training images as decoded (``image_size`` of the
        dataset; ``data.train.images.shape``, in memory or lazy): ``eval_geometry`` to S, so the
        input itself when it is already S x S (every built-in dataset decodes its evaluation images
        at the training images' size).
    Raises:
        ValueError: the training images are not square (the stored geometry is a single side).
    """
    h, w = data.train.images.shape[-2:]
    if h != w:
        raise ValueError(f"training images are {h}x{w}; triggers are applied at the stored geometry of the training "
                         "images, which must be square: decode them to a square size (shorter side resized, centre crop)")
    return eval_geometry(images, int(h))


class Attack:
    """Base class of attacks. Subclasses set ``Params`` (a dataclass) and implement ``poison``
    and ``evaluate``; ``check`` validates parameters against the data before any training.

    ``poison`` must be a function of the data, the parameters and the seed (draw from
    ``generator``, never from a global RNG); an attack that draws nothing at random sets the class
    attribute ``seeded = False``. ``evaluate``'s metrics are fractions in [0, 1] unless named as
    counts (``n_*``, ``*_n``) or seconds (``*_s``). tests/test_conformance.py checks all of this
    for every registered attack.
    """

    seeded: bool = True

    Params: type
    name: str
    #: False only for a clean baseline (``none``): it poisons nothing, which is refused for an attack,
    #: and ``--attack all`` leaves it out
    poisons: bool = True

    def __init__(self, params, seed: int):
        self.params = params
        self.seed = seed

    def generator(self, salt: int = 0) -> torch.Generator:
        """A torch generator seeded from the run seed (and ``salt`` for independent streams)."""
        return torch.Generator().manual_seed(derive_seed("attack", self.name, self.seed, salt))

    def check(self, data: DatasetBundle) -> None:
        """Raise ValueError naming the problem if the parameters cannot work on ``data``."""

    def model_init(self) -> str | None:
        """The ``--init`` spec (``init_spec.parse_init``; ``clean``: the cell's clean model) of the
        model ``poison`` uses, or None (the default): ``poison`` then gets no context."""
        return None

    def poison(self, data: DatasetBundle, context: AttackContext | None = None) -> PoisonPlan:
        """Return the poisoned training set and its manifest.

        An attack that needs a model (``model_init``) is called twice: without a context before
        any training, when every cell is checked (the plan must then have the training set's
        final size and poison count; what needs the model may be a placeholder), and with one
        (``AttackContext``) when its cell runs; only the second plan trains and is evaluated."""
        raise NotImplementedError

    def evaluate(self, model: ZeroShotModel, data: DatasetBundle, plan: PoisonPlan) -> dict[str, float]:
        """Attack metrics (at least ``asr``) of a trained model."""
        raise NotImplementedError

    def evaluate_subset(self, model: ZeroShotModel, data: DatasetBundle, plan: PoisonPlan,
                        rows: torch.Tensor) -> dict[str, Any]:
        """Attack metrics on the evaluation images ``rows`` (int64 [K], a seeded subset) only, for
        the per-epoch curves (``poisonbench.curves``): by default ``evaluate`` on the data with its
        evaluation set cut to those rows. An attack whose evaluation does not scan the evaluation
        set (targeted poisoning: its few target images) overrides it to evaluate them all."""
        ev = dataclasses.replace(data.eval, images=data.eval.images[rows], labels=data.eval.labels[rows])
        return self.evaluate(model, dataclasses.replace(data, eval=ev), plan)

    def target_class(self, data: DatasetBundle, plan: PoisonPlan) -> int | None:
        """The evaluation class every poisoned pair points to (a backdoor's target label), or None
        when there is no single one (targeted poisoning, none). Default: the manifest's
        ``target_index``."""
        return plan.manifest.get("target_index")

    def trigger_views(self, data: DatasetBundle, plan: PoisonPlan) -> "TriggerViews | None":
        """What the trigger-survival probe (``poisonbench.survival``) needs of the poisoned training
        pairs of ``plan``: their rows, clean sources and (patch triggers) patch boxes; None (the
        default) for an attack without a trigger to follow (targeted poisoning, none)."""
        return None

    def preview_pairs(self, data: DatasetBundle, plan: PoisonPlan, n: int) -> list[tuple]:
        """Up to ``n`` (clean image, poisoned image, clean caption, poisoned caption) tuples for
        ``bench preview``; none by default."""
        return []


def class_caption_rows(data: DatasetBundle, cls: int, search: CaptionSearch | None = None) -> list[int]:
    """Training rows whose caption names class ``cls`` (whole-word match of any of
    ``data.class_words[cls]``), restricted to rows labelled ``cls`` when there are any, else to
    unlabelled rows (-1); ascending. ``search``: a ``CaptionSearch`` of ``data.train.captions``,
    for a caller that looks up several classes (built here otherwise)."""
    rows = (search or CaptionSearch(data.train.captions)).naming(data.class_words[cls])
    labels = data.train.labels.tolist()
    return [i for i in rows if labels[i] == cls] or [i for i in rows if labels[i] < 0]


def class_captions(data: DatasetBundle, cls: int, n: int, rng: random.Random, rows: list[int] | None = None) -> list[str]:
    """``n`` captions naming class ``cls`` for poisoned pairs.

    Drawn from the training captions that name the class (``class_caption_rows``, or ``rows`` when
    the caller has them already): without replacement when there are at least ``n`` (as in the
    RoCLIP authors' ``create_poison.ipynb``, docs/roclip-spec.md §3.1), with replacement otherwise.
    When no training caption names the class, they are written from ``data.caption_templates``
    and the class words.
    """
    rows = class_caption_rows(data, cls) if rows is None else rows
    if len(rows) >= n:
        return [data.train.captions[i] for i in rng.sample(rows, n)]
    if rows:
        return [data.train.captions[rng.choice(rows)] for _ in range(n)]
    words = data.class_words[cls]
    return [rng.choice(data.caption_templates).format(with_article(rng.choice(words))) for _ in range(n)]
