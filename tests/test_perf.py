"""``bench perf`` and the vectorised triggers it measures: the fast forms equal their reference
formulations exactly, and the benchmark reports what it measured (its figures are not asserted)."""
import math

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from poisonbench.attacks.backdoor import map_pixels
from poisonbench.attacks.badnet import paste_patch, patch_positions
from poisonbench.attacks.blended import blend
from poisonbench.attacks.sig import SIG, SIGParams
from poisonbench.attacks.wanet import WaNet, WaNetParams, warp_grid
from poisonbench.cli import main
from poisonbench.perf import BARE, interleaved, summary

IMAGES = torch.randint(0, 256, (37, 3, 11, 13), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_paste_patch_equals_a_per_image_loop():
    patch = torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8)
    pos = patch_positions(len(IMAGES), 11, 13, 4, "random", torch.Generator().manual_seed(1))
    expected = IMAGES.clone()
    for i, (r, c) in enumerate(pos.tolist()):
        expected[i, :, r : r + 4, c : c + 4] = patch
    assert torch.equal(paste_patch(IMAGES, patch, pos), expected)


@pytest.mark.parametrize("chunk", [1, 5, 37, 1000])
def test_chunked_triggers_equal_the_one_shot_float_formulas(chunk):
    def one_shot(x: torch.Tensor) -> torch.Tensor:
        return x.round().clamp(0, 255).to(torch.uint8)

    key = torch.randint(0, 256, (3, 11, 13), dtype=torch.uint8)
    assert torch.equal(map_pixels(IMAGES, lambda x: x.mul_(0.8).add_(0.2 * key.float()), chunk),
                       one_shot(0.8 * IMAGES.float() + 0.2 * key.float()))
    assert torch.equal(blend(IMAGES, key, 0.37), one_shot((1 - 0.37) * IMAGES.float() + 0.37 * key.float()))
    sig = SIG(SIGParams(delta=40, frequency=3), 0)
    wave = 40 * torch.sin(2 * math.pi * torch.arange(13, dtype=torch.float64) * 3 / 13)
    assert torch.equal(sig.apply_trigger(IMAGES, torch.Generator()), one_shot(IMAGES.float() + wave.float()))
    wanet = WaNet(WaNetParams(strength=3), 0)
    grid = warp_grid(wanet.control, 11, 13, 3).expand(len(IMAGES), -1, -1, -1)
    warped = F.grid_sample(IMAGES.float(), grid, mode="bilinear", padding_mode="border", align_corners=True)
    assert torch.equal(wanet.apply_trigger(IMAGES, torch.Generator()), one_shot(warped))


def test_repetitions_are_interleaved_and_rotated_across_variants():
    calls = []
    records = interleaved({v: (lambda v=v: calls.append(v) or {"x": len(calls)}) for v in "abc"}, repeats=4)
    assert "".join(calls) == "abc" "bca" "cab" "abc"
    assert [(r["variant"], r["repeat"], r["value"]) for r in records[:6]] == [
        ("a", 0, 1), ("b", 0, 2), ("c", 0, 3), ("b", 1, 4), ("c", 1, 5), ("a", 1, 6)]


def test_summary_takes_medians_and_the_median_of_paired_ratios_against_the_right_reference():
    speeds = {BARE: [100, 300, 200], "clip": [95, 290, 50], "roclip": [80, 250, 40], "aug-only": [85, 240, 20]}
    rows = [{"stage": "training", "variant": v, "measure": "samples_per_s", "repeat": r, "value": x}
            for v, xs in speeds.items() for r, x in enumerate(xs)]
    rows += [{"stage": "poisoning", "variant": v, "measure": "poison_s", "repeat": 0, "value": x}
             for v, x in (("sig", 0.4), ("wanet", 1.5))]
    med = summary(pd.DataFrame(rows)).set_index("variant")
    assert med.loc[BARE, "value"] == 200 and math.isnan(med.loc[BARE, "ratio"])
    assert (med.loc[BARE, "lo"], med.loc[BARE, "hi"]) == (100, 300)
    # clip / bare per repetition: 0.95, 0.967, 0.25 -> median 0.95, exactly at the target
    assert med.loc["clip", "value"] == 95 and med.loc["clip", "ratio"] == pytest.approx(0.95)
    assert bool(med.loc["clip", "met"])
    # roclip / clip: 0.842, 0.862, 0.8 -> 0.842 (< 0.85); aug-only / clip: 0.895, 0.828, 0.4 -> 0.828
    assert med.loc["roclip", "ratio"] == pytest.approx(80 / 95) and not med.loc["roclip", "met"]
    assert med.loc["aug-only", "ratio"] == pytest.approx(240 / 290) and not med.loc["aug-only", "met"]
    assert med.loc["sig", "met"] and not med.loc["wanet", "met"]


def test_bench_perf_measures_every_defense_attack_and_evaluation_part(tmp_path):
    args = ["perf", "-p", "tiny", "--steps", "4", "--epochs", "2", "--repeats", "2", "--poison-images", "3000",
            "--speed", "fused-adamw,channels-last", "--stage", "training", "--stage", "poisoning", "--stage", "eval",
            "--results", str(tmp_path)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "perf").glob("perf-*.parquet")
    frame = pq.read_table(path).to_pandas()
    got = set(zip(frame.stage, frame.variant, frame.measure))
    for v in (BARE, "clip", "roclip", "aug-only", "clip +fused-adamw"):
        assert ("training", v, "samples_per_s") in got
    assert ("training", "clip +channels-last", "samples_per_s") not in got  # the tiny model is a ViT
    assert {("training", "model", "train_flops_per_sample"), ("training", "device", "matmul_peak_flops")} <= got
    for a in ("badnet", "badnet-lc", "blended", "sig", "wanet", "targeted"):
        assert ("poisoning", a, "poison_s") in got
    for part in ("zero_shot_s", "attack_eval_s", "probe_s", "retrieval_s", "eval_s"):
        assert ("eval", "evaluate", part) in got
    assert (frame[frame.measure == "n_images"].value == 3000).all()
    parts = frame[frame.measure == "ms_per_batch"]
    assert set(parts.variant) == {f"augment: {p}" for p in ("RandomHorizontalFlip", "RandomResizedCrop", "ColorJitter",
                                                             "RandomGrayscale", "RandomGaussianBlur")}
    assert (parts.groupby("variant").size() == 10).all()  # 5 per repetition: they are quick
    stock = frame[frame.measure == "ms_per_batch_kornia_hue"]
    assert set(stock.variant) == {"augment: ColorJitter"} and len(stock) == 10
    repeated = frame[~frame.variant.isin(["process", "model", "device"]) & ~frame.measure.str.startswith("ms_per_batch")]
    assert (repeated.groupby(["stage", "variant", "measure"]).size() == 2).all()  # every figure once per repetition
    assert (frame[frame.variant == "process"].measure == "peak_rss_mib").all()
    shares = frame[frame.measure.str.endswith("share")].value
    assert ((shares >= 0) & (shares <= 1)).all() and (frame[~frame.measure.str.endswith("share")].value > 0).all()
    aug = frame[frame.measure == "augment_share"]
    augments = aug.variant.isin(["roclip", "aug-only"])
    assert (aug[~augments].value == 0).all() and (aug[augments].value > 0).all()
    assert "bare loop" in result.output and path.name in result.output.replace("\n", "")
    assert "MFU" in result.output and "clip +fused-adamw" in result.output and "ColorJitter" in result.output
    assert "kornia's own hue step" in result.output


def test_train_flops_per_sample_counts_the_matmuls_of_a_linear_clip():
    """Two linear towers without bias: each costs 2*B*D_in*D_out forward and the same again for its
    weight's gradient (the inputs need none); the loss's two B x B logit matmuls cost 2*B*B*D
    forward and twice that backward (both operands need gradients)."""
    from poisonbench.perf import train_flops_per_sample

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.image, self.text = torch.nn.Linear(12, 8, bias=False), torch.nn.Linear(5, 8, bias=False)
            self.scale = torch.nn.Parameter(torch.tensor(1.0))

        def forward(self, images, tokens):
            return self.image(images.flatten(1)), self.text(tokens.float()), self.scale

    b = 4
    flops = train_flops_per_sample(Linear(), torch.rand(b, 3, 2, 2), torch.randint(0, 9, (b, 5)))
    towers = 2 * b * (12 + 5) * 8 * 2  # forward + the weight gradients (inputs need no gradient)
    logits = 2 * b * b * 8 * 2 * 3  # image-to-text and text-to-image logits, forward and two gradients each
    assert flops * b == towers + logits


def test_bench_perf_data_stage_decodes_jpegs_with_workers_and_reports_the_speed_up(tmp_path):
    result = CliRunner().invoke(main, ["perf", "-p", "tiny", "--stage", "data", "--data-images", "256", "--repeats", "1",
                                       "--results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "perf").glob("perf-*.parquet")
    frame = pq.read_table(path).to_pandas()
    rates = frame[frame.measure == "images_per_s"].set_index("variant").value
    assert {"csv, threads", "csv, 1 worker", "csv, 2 workers", "wds, 1 worker", "wds, 2 workers"} <= set(rates.index)
    assert (rates > 0).all()
    med = summary(frame).set_index("variant")
    up = med[med.measure == "speedup_vs_1_worker"]
    assert up.loc["csv, 2 workers", "value"] == pytest.approx(rates["csv, 2 workers"] / rates["csv, 1 worker"])
    assert "cores for an H200" in result.output


@pytest.mark.parametrize("args,message", [
    (["-p", "tiny", "--steps", "1"], "use --steps 4 or more"),  # tiny: pool 256, batch 64
    (["-p", "tiny", "--stage", "poisoning", "--poison-images", "100000"], "exceeds the 60000 images"),
    (["-p", "paper"], "scripts/paper_throughput.py"),
])
def test_bench_perf_refuses_what_could_not_finish_before_measuring(tmp_path, args, message):
    result = CliRunner().invoke(main, ["perf", *args, "--results", str(tmp_path)])
    assert result.exit_code != 0 and message in result.output and result.exception.__class__ is SystemExit
    assert not (tmp_path / "perf").exists() or not any((tmp_path / "perf").iterdir())


def test_bench_perf_refuses_an_unwritable_results_folder_before_measuring(tmp_path):
    (tmp_path / "file").write_text("")
    result = CliRunner().invoke(main, ["perf", "-p", "tiny", "--results", str(tmp_path / "file" / "sub")])
    assert result.exit_code == 2 and "cannot write to the results folder" in result.output


def test_bench_perf_stopped_by_sigterm_removes_its_temp_folder(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "poisonbench", "perf", "-p", "tiny", "--stage", "data",
                             "--data-images", "256", "--repeats", "1000", "--results", str(tmp_path / "results")],
                            env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # not a pipe: a full one would block the progress bar
    deadline = time.monotonic() + 120
    while not list(tmp.glob("poisonbench-perf-*/*.csv")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert list(tmp.glob("poisonbench-perf-*")), "the data stage never wrote its JPEGs"
    time.sleep(1.0)  # into the decoding
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert not list(tmp.glob("poisonbench-perf-*"))  # before: SIGTERM killed it with its JPEGs in place
