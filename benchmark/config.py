"""Profiles and the resolved configuration of one cell (attack x defense x seed x parameters)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .registry import ATTACKS, DATASETS, DEFENSES, RegistryError, unhashed_defaults
from .init_spec import absolute_init, parse_init  # noqa: F401  (parse_init: part of the config's API)
from .utils import hash_json


@dataclass(frozen=True)
class Profile:
    """A named scale: model, data and training hyper-parameters.

    Attributes:
        model: open_clip architecture name.
        dataset / dataset_params: training and evaluation data.
        epochs, batch_size: training length; batch_size is per process.
        lr: peak learning rate of AdamW; warmup_steps: linear warm-up steps before the cosine decay.
        weight_decay: AdamW decoupled weight decay (not on norms, biases, logit scale).
        attack_params / defense_params: per-attack and per-defense parameter defaults for this
            scale, e.g. the RoCLIP pool size; explicit parameters override them.
        init: the cells' starting weights unless ``--init`` is given (``init_spec.parse_init``):
            ``scratch`` for pre-training, ``clean`` or ``pretrained:ARCH/TAG`` for fine-tuning.
        pretrain: the profile whose clean model ``--init clean`` starts from (its cell of attack
            ``none`` and the undefended defense, ``runner.clean_config``); None: this profile.
        curve_n: evaluation images of the per-epoch curves (``curves``; 0: none). Not part of a
            cell's identity: it changes what is measured along the way, not what is trained.
    """

    name: str
    description: str
    model: str
    dataset: str
    dataset_params: dict[str, Any]
    epochs: int
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float
    defense_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    attack_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    init: str = "scratch"
    pretrain: str | None = None
    curve_n: int = 1000


# cpu-small-ft's fine-tuning (docs/measurements/ft_sweep_cpu-small-ft_badnet_seed0_2026-12-01.csv):
# clip under badnet (100 poisoned pairs) from cpu-small's clean model, lr 3e-5..1e-3 x 2 or 5 epochs.
# Below 3e-4 nothing implants (ASR <= 7 %), as CleanCLIP's issue #3 at lr 1e-6; 5e-4 x 5 epochs is
# the lowest lr to pass ASR 0.8 (85 %, clean top-1 83.4 % from the clean model's 84.2 %). Its summed
# step sizes (5e-4 x 390 steps) equal those of the literature's poisoned fine-tuning that does
# implant (1e-5 x 5 epochs x 3,906 steps of 500K pairs at batch 128).
FT_EPOCHS, FT_LR = 5, 5e-4
# BadCLIP's optimisation in the cpu-small profiles (attack_params): 10 of its 50 epochs over the
# ~9,000 non-target training images (1,400 steps of the paper's 7,800); everything else as the paper

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in [
        Profile(
            "tiny", "seconds on a CPU; for tests", "poisonbench-tiny", "fashion-mnist",
            {"n_train": 512, "n_eval": 500, "n_probe": 500, "n_heldout": 200}, epochs=2, batch_size=64, lr=2e-3, warmup_steps=2,
            weight_decay=0.1, curve_n=200,
            # cleanclip: 128 clean pairs (the split's floor), 8 steps per epoch at batch 16
            # safeclip: one unimodal warm-up epoch, then one filtering epoch (split, risky and safe passes)
            defense_params={"roclip": {"pool_size": 256},
                            "cleanclip": {"epochs": 2, "batch_size": 16, "lr": 2e-4, "warmup_steps": 1},
                            "safeclip": {"inmodal_warmup": 1, "multimodal_warmup": 0, "in_lr": 2e-3, "cross_lr": 2e-3,
                                         "filter_lr": 2e-5, "warmup_steps": 2, "bank_size": 64, "min_crop": 0.5}},
            # 512 pairs hold ~50 bags: badnet-lc needs fewer than its default 100 target-class images
            attack_params={"targeted": {"pairs_per_target": 10}, "badnet-lc": {"n_poison": 20},
                           # ~50 bags: batches of 16; one epoch over 128 images (8 steps)
                           "badclip": {"opt_images": 128, "opt_epochs": 1, "opt_batch_size": 16}},
        ),
        Profile(
            "cpu-small", "the embedded default: 10k Fashion-MNIST pairs, minutes on 2 CPU cores",
            "poisonbench-cpu-small", "fashion-mnist", {"n_train": 10000, "n_eval": 0}, epochs=10,
            batch_size=128, lr=1e-3, warmup_steps=78, weight_decay=0.1,
            # An epoch here is 78 steps, not the paper's ~2000. Matching every 3rd epoch (the authors'
            # own run, docs/roclip-spec.md §1.5) leaves the model time to recover between matching epochs;
            # a pool fed every step never holds captions embedded epochs ago (with the official
            # matching-epochs-only update, clean top-1 fell from 0.68 to 0.57); crops below half of
            # a 28 px image carry no class information.
            defense_params={
                "roclip": {"match_every": 3, "pool_update": "always", "min_crop": 0.5},
                "aug-only": {"min_crop": 0.5},
                # CleanCLIP's recipe (10 epochs, batch 64) over the 1000-pair clean split: 15 steps
                # per epoch, 150 in all, against the paper's 15620 (100K pairs). lr 1e-3 makes the summed
                # step sizes of the 150 steps those of the paper's 1e-5 over 15620; 50 warm-up steps
                # would be a third of the run: 1 here. Measured on badnet seed 0 (docs/measurements/
                # cleanclip_lr_sweep_cpu-small_badnet_seed0_2026-12-01.csv): 2e-5 (the paper's ratio to
                # its pre-training lr) and 1e-4 leave the backdoor (ASR 98 %, 97 %); 1e-3 removes most of it.
                "cleanclip": {"lr": 1e-3, "warmup_steps": 1},
                # SafeCLIP's 32 epochs (5 unimodal, 1 CLIP, 26 filtering) in this profile's 10: 2 + 1 + 7,
                # the safe set growing 0.04 per epoch (6 x 0.04, the official 25 x 0.01); its LRs are this
                # profile's lr where the official is RoCLIP's 5e-4 (filter_lr 1/100 of it, as 5e-6); warm-up
                # half an epoch (1000 of 1953 steps); a bank of 256 (its 21845 are 2 % of CC-1M: 2 % of
                # 10k pairs is ~200; 256 is the parser's default); crops as roclip's here.
                "safeclip": {"inmodal_warmup": 2, "multimodal_warmup": 1, "in_lr": 1e-3, "cross_lr": 1e-3,
                             "filter_lr": 1e-5, "warmup_steps": 40, "bank_size": 256, "safe_step": 0.04,
                             "min_crop": 0.5},
            },
            # The authors' 100 pairs per target are 0.01 % of their 1M pairs; at 10k pairs, 10 per
            # target (1.6 % for all 16) already reach 15/16 against CLIP.
            attack_params={"targeted": {"pairs_per_target": 10}, "badclip": {"opt_epochs": 10}},
        ),
        Profile(
            "cpu-small-ft", "the fine-tuning setting in miniature: cpu-small's clean model (--init clean) fine-tuned "
            "on the poisoned 10k pairs at a low lr for a few epochs, minutes on 2 CPU cores",
            "poisonbench-cpu-small", "fashion-mnist", {"n_train": 10000, "n_eval": 0}, epochs=FT_EPOCHS,
            batch_size=128, lr=FT_LR, warmup_steps=10, weight_decay=0.1, init="clean", pretrain="cpu-small",
            defense_params={
                # roclip: every 2nd epoch a matching epoch (the official default K), fed every step as
                # in cpu-small; crops and cleanclip's repair as cpu-small's
                "roclip": {"match_every": 2, "pool_update": "always", "min_crop": 0.5},
                "aug-only": {"min_crop": 0.5},
                "cleanclip": {"lr": 1e-3, "warmup_steps": 1},
                # safeclip in a fine-tuning run: one unimodal warm-up epoch, no CLIP warm-up epoch (the
                # model is already aligned), the rest filtering epochs; cpu-small's lrs, banks, crops
                "safeclip": {"inmodal_warmup": 1, "multimodal_warmup": 0, "in_lr": FT_LR, "cross_lr": FT_LR,
                             "filter_lr": FT_LR / 100, "warmup_steps": 10, "bank_size": 256, "safe_step": 0.04,
                             "min_crop": 0.5},
            },
            attack_params={"targeted": {"pairs_per_target": 10}, "badclip": {"opt_epochs": 10}},
        ),
        Profile(
            "paper", "RoCLIP's setting (docs/roclip-spec.md §2): open_clip RN50 from scratch on your "
            "CC3M-style --data, ImageNet zero-shot; for GPUs", "RN50", "files",
            # eval "imagenet" without a folder makes the run ask for --eval imagenet:ROOT
            {"eval": "imagenet", "n_heldout": 1000, "n_probe": 10000},
            # The authors' code defaults: 24 epochs, 5e-5 with 10k warm-up steps, AdamW wd 0.1; their
            # run used 2 GPUs x 256 (batch_size is per process: --nproc 2 gives their 512).
            epochs=24, batch_size=256, lr=5e-5, warmup_steps=10000, weight_decay=0.1,
            defense_params={"roclip": {"pool_size": 21845, "match_every": 2}},
            # Their backdoor runs: 300 poisoned pairs of 1M (0.03 %), target "mushroom"; CleanCLIP's
            # 16 px patch at a random position of the 224 px image (spec §3.2).
            attack_params={
                **{a: {"n_poison": 300, "target": "mushroom"} for a in ("blended", "sig", "wanet")},
                **{a: {"n_poison": 300, "target": "mushroom", "patch_size": 16, "location": "random"}
                   for a in ("badnet", "badnet-lc")},
            },
        ),
        Profile(
            "paper-ft", "the CleanCLIP/BadCLIP setting: OpenAI's pretrained RN50 (--init pretrained:RN50/openai, from the "
            "local cache) fine-tuned on your CC3M-style --data (their 500K pairs), ImageNet zero-shot; for GPUs",
            "RN50", "files", {"eval": "imagenet", "n_heldout": 1000, "n_probe": 10000},
            # BadCLIP's README recipe (spec Part A §A.9): batch 128 on one GPU, 10 epochs, AdamW lr 1e-6, wd 0.1,
            # 10,000 warm-up steps. At 1e-6, users of the same code base report a weak BadNet (CleanCLIP
            # issue #3: ASR 5.7 %; 97.7 % at 1e-5), and BadCLIP's own baselines were trained at 1e-5 (§A.9, Q8).
            epochs=10, batch_size=128, lr=1e-6, warmup_steps=10000, weight_decay=0.1, init="pretrained:RN50/openai",
            # safeclip fine-tunes as on cpu-small-ft: one unimodal warm-up epoch, no CLIP warm-up, the
            # profile's lr where its pre-training runs have 5e-4 (filter lr 1/100 of it)
            defense_params={"roclip": {"pool_size": 21845, "match_every": 2},
                            "safeclip": {"inmodal_warmup": 1, "multimodal_warmup": 0, "in_lr": 1e-6, "cross_lr": 1e-6,
                                         "filter_lr": 1e-8}},
            # 1,500 poisoned pairs, target "banana" (§A.8); BadCLIP's 16 px trigger against the same RN50, and
            # its baselines' BadNet: CleanCLIP's code, a fresh noise patch per image at a random position
            # (spec §A.14 #6; roclip-spec §3.2 (b)), and its blended key drawn per image
            attack_params={
                **{a: {"n_poison": 1500, "target": "banana"} for a in ("sig", "wanet")},
                "blended": {"n_poison": 1500, "target": "banana", "key": "fresh"},
                **{a: {"n_poison": 1500, "target": "banana", "patch_size": 16, "location": "random", "pattern": "fresh"}
                   for a in ("badnet", "badnet-lc")},
                "badclip": {"n_poison": 1500, "target": "banana", "patch_size": 16, "surrogate": "pretrained:RN50/openai"},
            },
        ),
    ]
}


def get_profile(name: str) -> Profile:
    """The profile called ``name``; ValueError listing the valid profiles otherwise."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; valid profiles: {', '.join(PROFILES)}")
    return PROFILES[name]


@dataclass(frozen=True)
class RunConfig:
    """Everything that determines one cell's numbers. Its hash is the run id.

    What identifies a cell is ``identity``: attack, defense, dataset and model with all their
    resolved parameters, the training settings (epochs, per-process batch size, lr, warm-up, weight
    decay), the profile, the number of processes that train it (``world_size``; the global batch
    is batch_size x world_size) and the seed. Two cells are the same setting when these agree up
    to the seed (``setting_id``): ``bench report`` pools exactly those.
    """

    attack: str
    attack_params: dict[str, Any]
    defense: str
    defense_params: dict[str, Any]
    dataset: str
    dataset_params: dict[str, Any]
    profile: str
    model: str
    seed: int
    epochs: int
    batch_size: int
    lr: float
    warmup_steps: int
    weight_decay: float
    # Fields added after the first release carry hash_default=False: they enter the hashed dict
    # (``to_dict``, the run id) only when they depart from their default, so that every cell that
    # existed before them keeps its run id and its finished results (``identity``).
    # world_size: processes that train the cell together (--nproc, torchrun's WORLD_SIZE).
    world_size: int = field(default=1, metadata={"hash_default": False})
    # init: the cell's starting weights (--init, else the profile's; init_spec.parse_init): scratch,
    # clean, checkpoint:PATH or pretrained:ARCH/TAG. The file's path (not its content) is part of the run id;
    # a row that started from the clean model names its cell (clean_model).
    init: str = field(default="scratch", metadata={"hash_default": False})

    def to_dict(self) -> dict[str, Any]:
        """The config as it is hashed into the run id and stored with the row (``identity``):
        JSON-ready, and ``RunConfig(**to_dict())`` gives back an equal cell."""
        return identity(dataclasses.asdict(self))

    @property
    def config_hash(self) -> str:
        """SHA-256 hex of the canonical JSON of the whole config."""
        return hash_json(self.to_dict())

    @property
    def run_id(self) -> str:
        """Short, filesystem-safe id of the cell: the first 16 hex digits of the config hash."""
        return self.config_hash[:16]


def resolve(
    attack: str,
    defense: str,
    profile: str = "cpu-small",
    seed: int = 0,
    attack_params: dict[str, Any] | None = None,
    defense_params: dict[str, Any] | None = None,
    dataset_params: dict[str, Any] | None = None,
    dataset: str | None = None,
    world_size: int = 1,
    **training: Any,
) -> RunConfig:
    """Resolve names, profile defaults and overrides into a RunConfig.

    ``dataset`` replaces the profile's dataset (e.g. ``files`` for CSV/WebDataset data); the
    profile's dataset parameters that it also has still apply. A dataset ``image_size`` of 0 is
    set to the model's input size. ``world_size`` is the number of processes that will train the
    cell (``--nproc``, torchrun's WORLD_SIZE): the global batch is batch_size x world_size, so it is
    part of the cell. ``training`` may override epochs, batch_size, lr, warmup_steps, weight_decay
    , model or init (the starting weights, ``models.parse_init``).
    Raises RegistryError (unknown name or parameter, listing valid ones) or ValueError.
    """
    prof = get_profile(profile)
    allowed = {"epochs", "batch_size", "lr", "warmup_steps", "weight_decay", "model", "init"}
    unknown = set(training) - allowed
    if unknown:
        raise ValueError(f"unknown training settings {sorted(unknown)}; valid: {sorted(allowed)}")
    training = {k: v for k, v in training.items() if v is not None}
    a_over = {**prof.attack_params.get(attack, {}), **(attack_params or {})}
    d_over = {**prof.defense_params.get(defense, {}), **(defense_params or {})}
    dataset = dataset or prof.dataset
    ds_fields = {f.name for f in dataclasses.fields(DATASETS.get(dataset).Params)}
    ds_over = {**{k: v for k, v in prof.dataset_params.items() if k in ds_fields}, **(dataset_params or {})}
    model = training.get("model", prof.model)
    if "model" in training:
        model_image_size(model)  # an unknown architecture is refused here, listing the valid ones
    ds_params = dataclasses.asdict(DATASETS.params(dataset, ds_over))
    if ds_params.get("image_size") == 0:
        ds_params["image_size"] = model_image_size(model)
    cfg = RunConfig(
        attack=attack,
        attack_params=dataclasses.asdict(ATTACKS.params(attack, a_over)),
        defense=defense,
        defense_params=dataclasses.asdict(DEFENSES.params(defense, d_over)),
        dataset=dataset,
        dataset_params=ds_params,
        profile=prof.name,
        model=model,
        seed=int(seed),
        epochs=int(training.get("epochs", prof.epochs)),
        batch_size=int(training.get("batch_size", prof.batch_size)),
        lr=float(training.get("lr", prof.lr)),
        warmup_steps=int(training.get("warmup_steps", prof.warmup_steps)),
        weight_decay=float(training.get("weight_decay", prof.weight_decay)),
        world_size=int(world_size),
        init=absolute_init(str(training.get("init", prof.init))),
    )  # a malformed spec is refused here; the file is checked before training (runner.prepare)
    for name in ("epochs", "batch_size", "world_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {cfg.lr}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not 0 <= cfg.seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {cfg.seed}")
    return cfg


def model_image_size(model: str) -> int:
    """Input side, in pixels, of open_clip architecture ``model`` (read from its config; nothing
    is built). ValueError listing the valid models for an unknown one."""
    import open_clip

    from .models import register_model_configs

    register_model_configs()
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise ValueError(f"unknown model {model!r}; valid models: {', '.join(open_clip.list_models())}")
    size = cfg["vision_cfg"]["image_size"]
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """What identifies a cell, from a resolved config (``dataclasses.asdict`` of a RunConfig, or
    the ``config`` stored in a result row): ``config`` without the fields that were added with
    ``hash_default=False`` (RunConfig's ``world_size``; a plugin parameter declared with
    ``registry.param(..., hash_default=False)``) while they equal their default. This is the one
    rule behind the run id (``RunConfig.to_dict``) and the report's settings (``setting_id``).
    The parameters of a plugin that is not installed are kept as they are."""
    out = dict(config)
    for f in dataclasses.fields(RunConfig):
        if f.metadata.get("hash_default", True) is False and f.name in out and out[f.name] == f.default:
            del out[f.name]
    for kind, registry in (("attack", ATTACKS), ("defense", DEFENSES), ("dataset", DATASETS)):
        params = out.get(f"{kind}_params")
        if not isinstance(params, dict) or not isinstance(out.get(kind), str):
            continue
        try:
            defaults = unhashed_defaults(registry.get(out[kind]).Params)
        except RegistryError:
            continue
        if defaults:
            out[f"{kind}_params"] = {k: v for k, v in params.items() if not (k in defaults and v == defaults[k])}
    return out


def setting_id(config: dict[str, Any]) -> str:
    """Id of the setting of a resolved config: the hash of its ``identity`` without the seed.
    Cells with equal setting ids differ in their seed alone and are pooled by ``bench report``;
    16 hex digits."""
    return hash_json({k: v for k, v in identity(config).items() if k != "seed"})[:16]


def settings(configs: list[dict[str, Any]]) -> list[str]:
    """For each resolved config (``RunConfig.to_dict()``), ``"k=v, ..."`` naming the values of its
    ``identity`` in which it departs from its profile's defaults for the same attack and defense
    (the seed aside); ``""`` for the defaults.
    When the defaults cannot be resolved (an attack from a plugin that is not installed), the
    values that differ among the configs of the same attack, defense and profile are named
    instead. Configs of different settings (``setting_id``) get different labels: where the short
    labels of one attack, defense and profile would coincide, the full ones (``dataset=files,
    attack_params.x=1``) are used, else the setting id is added. Labels settings in tables and
    plots."""
    flat = [_flatten(identity(c)) for c in configs]
    out, full = [""] * len(configs), [""] * len(configs)

    def key(i: int) -> tuple:
        return tuple(configs[i].get(k) for k in ("attack", "defense", "profile"))

    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault((c.get("attack"), c.get("defense"), c.get("profile"), c.get("dataset")), []).append(i)
    for (attack, defense, profile, _), members in groups.items():
        try:
            dataset = configs[members[0]].get("dataset")
            same = dataset if dataset != get_profile(profile).dataset else None
            base = _flatten(resolve(attack, defense, profile, dataset=same).to_dict())
        except Exception:  # noqa: BLE001 - unknown names or profiles: fall back to the group
            keys = sorted({k for i in members for k in flat[i]})
            base = {k: flat[members[0]].get(k) for k in keys if len({flat[i].get(k) for i in members}) == 1}
            base.update({k: None for k in keys if k not in base})
        for i in members:
            out[i] = ", ".join(f"{k.split('.')[-1]}={v}" for k, v in flat[i].items() if base.get(k) != v)
            own = configs[i].get("dataset") != getattr(PROFILES.get(profile), "dataset", None)
            full[i] = ", ".join([f"dataset={configs[i].get('dataset')}"] * own
                                + [f"{k}={v}" for k, v in flat[i].items() if base.get(k) != v])
    # two settings of one attack, defense and profile under one label (x=1 of the attack and of the
    # defense; defaults of two plugins that are not installed): the full names, else the setting id
    ids = [setting_id(c) for c in configs]
    for labels in (full, [f"{full[i]} [{ids[i]}]".lstrip() for i in range(len(configs))]):
        seen: dict[tuple, set[str]] = {}
        for i in range(len(configs)):
            seen.setdefault((key(i), out[i]), set()).add(ids[i])
        out = [labels[i] if len(seen[(key(i), out[i])]) > 1 else out[i] for i in range(len(configs))]
    return out


def _flatten(config: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in config.items():
        if key == "seed":
            continue
        if isinstance(value, dict):
            out.update({f"{key}.{k}": str(v) for k, v in value.items()})
        else:
            out[key] = str(value)
    return out
