"""Training throughput (samples/s) of the `paper` profile on one GPU, through the real trainer.

    python scripts/paper_throughput.py [--models RN50,ViT-B-32] [--defenses clip,roclip,aug-only]

    python scripts/paper_throughput.py --jpeg-dir /tmp/jpeg   # batches decoded from JPEG files

Each (model, defense) trains 4 short epochs of ``--steps`` steps on random uint8 224 px images
with real-looking captions (bf16 autocast on CUDA, as every run). Epochs 1-2 warm up (cuDNN
autotuning, the RoCLIP pool's first fill); epochs 3 (CLIP loss) and 4 (a RoCLIP matching epoch)
are timed. EDA is a one-off caption rewrite before training, not part of a step, and is skipped
here. Prints one line per measurement and a Markdown table; writes --out as CSV when given.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from poisonbench.config import resolve
from poisonbench.datasets.base import CaptionDataset
from poisonbench.datasets.fashion_mnist import write_caption
from poisonbench.models import create_model
from poisonbench.registry import DEFENSES, build_params
from poisonbench.runner import device_name, pick_device
from poisonbench.train import train


def synthetic_pairs(n: int, jpeg_dir: str | None) -> CaptionDataset:
    """n pairs of random 224 px images with Fashion-MNIST-style captions: in memory, or (with
    ``jpeg_dir``) written there as 256x320 JPEG files with a CSV and read back lazily through the
    ``files`` dataset, so every batch is decoded from disk as in a real run."""
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    captions = [write_caption(i % 10, rng) for i in range(n)]
    if jpeg_dir is None:
        return CaptionDataset(torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=g),
                              captions, torch.zeros(n, dtype=torch.int64))
    from pathlib import Path

    import numpy as np
    import pandas as pd
    from PIL import Image

    from poisonbench.datasets.files import read_pairs

    root = Path(jpeg_dir)
    root.mkdir(parents=True, exist_ok=True)
    # smooth random images: JPEG-typical sizes (~15-30 KB), unlike incompressible noise
    base = np.random.default_rng(0).integers(0, 256, (n, 8, 10, 3), dtype=np.uint8)
    for i in range(n):
        Image.fromarray(base[i]).resize((320, 256), Image.BICUBIC).save(root / f"{i}.jpg", quality=90)
    pd.DataFrame({"filepath": [f"{i}.jpg" for i in range(n)], "title": captions}).to_csv(root / "train.csv", index=False)
    pairs = read_pairs(f"csv:{root / 'train.csv'}", 224, load="lazy")
    return CaptionDataset(pairs.images, pairs.captions, torch.zeros(n, dtype=torch.int64))


def measure(model_name: str, defense_name: str, steps: int, batch_size: int, device: torch.device,
            jpeg_dir: str | None = None) -> dict:
    cfg = resolve("none", defense_name, "paper", model=model_name, epochs=4, batch_size=batch_size, warmup_steps=10)
    n = steps * batch_size
    data = synthetic_pairs(n, jpeg_dir)
    cls = DEFENSES.get(defense_name)
    defense = cls(build_params(cls.Params, cfg.defense_params, defense_name), 0)
    defense.text_transform = lambda captions: captions  # EDA: once before training, not in a step
    torch.manual_seed(0)
    model, tokenizer = create_model(model_name)
    marks = {}

    def on_epoch_end(epoch, _model):
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        marks[epoch] = time.perf_counter()

    train(model, tokenizer, data, defense, cfg, device, progress=False, on_epoch_end=on_epoch_end)
    out = {"model": model_name, "defense": defense_name, "batch_size": batch_size, "device": device_name(device),
           "images": "JPEG files, decoded per batch" if jpeg_dir else "memory"}
    out["samples_s_clip_epoch"] = n / (marks[3] - marks[2])
    out["samples_s_matching_epoch"] = n / (marks[4] - marks[3])
    if device.type == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="RN50,ViT-B-32")
    ap.add_argument("--defenses", default="clip,roclip,aug-only")
    ap.add_argument("--steps", type=int, default=20, help="steps per epoch")
    ap.add_argument("--batch-size", type=int, default=256, help="per GPU (the paper profile's)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", help="CSV file for the measurements")
    ap.add_argument("--jpeg-dir", help="write the images here as JPEG files and decode each batch from them (load=lazy)")
    args = ap.parse_args()
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    rows = []
    for model_name in args.models.split(","):
        for defense_name in args.defenses.split(","):
            row = measure(model_name, defense_name, args.steps, args.batch_size, device, args.jpeg_dir)
            rows.append(row)
            print({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    print(f"\n| model | defense | images | samples/s (CLIP-loss epoch) | samples/s (matching epoch) | peak GiB |\n"
          "|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['defense']} | {r['images']} | {r['samples_s_clip_epoch']:.0f} | {r['samples_s_matching_epoch']:.0f} "
              f"| {r.get('peak_gib', float('nan')):.1f} |")
    if args.out:
        import pandas as pd

        pd.DataFrame(rows).to_csv(args.out, index=False)


if __name__ == "__main__":
    main()
