"""BadCLIP diagnostic (spec-badclip-density-detection.md §A.15 item 13): the zero-shot ASR that a
trigger alone gets from the surrogate, the clean model it was optimised against, before any
poisoning. Prints, per seed, the share of triggered non-target evaluation images the clean model
puts in the target class for: the clean images, BadNets' patch, and for every BadCLIP trigger of
that seed in the store's cache (one per patch size) the optimised patch as deployed (jpeg_bgr), the
optimised pixels (exact) and a mid-grey patch of its size, each pasted at the centre.

    python scripts/badclip_surrogate_asr.py results/reference [seeds...]   # CSV on stdout
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from poisonbench.attacks.badclip_trigger import deploy, paste_centre
from poisonbench.config import resolve
from poisonbench.evaluate import predict, zero_shot_classifier
from poisonbench.models import create_model, load_init
from poisonbench.preprocess import eval_geometry
from poisonbench.registry import DATASETS, build_params
from poisonbench.runner import cache_dir, clean_config


def main(results: Path, seeds: list[int]) -> None:
    print("seed,trigger,side,asr_on_clean_model")
    for seed in seeds:
        cfg = resolve("badclip", "clip", "cpu-small-ft", seed)
        ccfg = clean_config(cfg)
        model, tok = create_model(cfg.model)
        load_init(model, "clean", cfg.model, cache_dir(results, ccfg.run_id) / "model.pt")
        model.eval()
        found = sorted(d for d in (results / "cache").glob("attack-*")
                       if json.loads((d / "what.json").read_text()).get("surrogate") == ccfg.run_id
                       and json.loads((d / "what.json").read_text())["seed"] == seed)
        patches = [torch.load(d / "trigger.pt", weights_only=True)["patch"] for d in found]
        ds = DATASETS.get(cfg.dataset)
        data = ds(build_params(ds.Params, cfg.dataset_params, "dataset")).load(seed)
        ev = data.eval
        target = ev.class_index(cfg.attack_params["target"])
        images = ev.images[ev.labels != target]
        classifier = zero_shot_classifier(model, tok, ev.classnames, ev.templates)
        badnet = resolve("badnet", "clip", "cpu-small-ft", seed)
        from poisonbench.attacks.badnet import BadNet, BadNetParams

        bn = BadNet(BadNetParams(**{k: v for k, v in badnet.attack_params.items() if k in BadNetParams.__dataclass_fields__}), seed)
        triggers = [("none", None), ("badnet_patch_centre", bn.patch)]
        for patch in sorted(patches, key=lambda p: p.shape[-1]):
            s = patch.shape[-1]
            triggers += [("badclip_deployed", deploy(patch, "jpeg_bgr")), ("badclip_exact", deploy(patch, "exact")),
                         ("grey", torch.full((3, s, s), 128, dtype=torch.uint8))]
        size = int(model.visual.image_size if isinstance(model.visual.image_size, int) else model.visual.image_size[0])
        for name, trig in triggers:
            x = images if trig is None else paste_centre(images, trig)
            top1 = predict(model, eval_geometry(x, size), classifier, k=1)[:, 0]
            side = 0 if trig is None else trig.shape[-1]
            print(f"{seed},{name},{side},{(top1 == target).double().mean().item():.4f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), [int(s) for s in sys.argv[2:]] or [0, 1, 2])
