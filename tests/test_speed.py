"""Speed options (benchmark/speed.py): each leaves a cell's numbers equal to a plain run's within
floating-point tolerance, and the row says which were on."""
import copy
import shutil

import open_clip
import pytest
import torch

from poisonbench.config import resolve
from poisonbench.speed import SPEED_ENV, SpeedOptions, is_convolutional

TOLERANCE = {"final_loss": 1e-3, "clean_top1": 0.02, "linear_probe_top1": 0.02, "asr": 0.02}


def test_parse_names_and_refuses_unknown_options():
    assert str(SpeedOptions.parse("fused-adamw, compile")) == "compile,fused-adamw"
    assert SpeedOptions.parse("") == SpeedOptions.parse("plain") == SpeedOptions()
    with pytest.raises(ValueError, match="valid: compile, fused-adamw, channels-last"):
        SpeedOptions.parse("compile,turbo")


def cell_rows(tmp_path, monkeypatch, option):
    from poisonbench.runner import run_cell

    cfg = resolve("badnet", "clip", "tiny", 0, epochs=1)
    rows = {}
    for speed in ("plain", option):
        monkeypatch.setenv(SPEED_ENV, speed)
        rows[speed] = run_cell(cfg, tmp_path / speed, device="cpu", progress=False)
    return rows["plain"], rows[option]


def assert_close(plain, fast):
    assert plain["speed_options"] == "plain" and fast["status"] == "ok"
    for key, tol in TOLERANCE.items():
        assert abs(fast[key] - plain[key]) <= tol * max(1.0, abs(plain[key])), (key, plain[key], fast[key])


def test_fused_adamw_trains_a_tiny_cell_to_the_same_numbers(tmp_path, monkeypatch):
    plain, fused = cell_rows(tmp_path, monkeypatch, "fused-adamw")
    assert fused["speed_options"] == "fused-adamw"
    assert_close(plain, fused)


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_model_trains_a_tiny_cell_to_the_same_numbers(tmp_path, monkeypatch):
    """torch.compile (inductor, C++ on the CPU): about a minute of compiling."""
    plain, compiled = cell_rows(tmp_path, monkeypatch, "compile")
    assert compiled["speed_options"] == "compile"
    assert_close(plain, compiled)


def test_channels_last_resnet_step_equals_the_contiguous_one():
    """One CLIP loss step of a small ResNet CLIP, channels-last vs contiguous: same loss and gradients."""
    torch.manual_seed(0)
    model = open_clip.CLIP(32, vision_cfg={"layers": (1, 1, 1, 1), "width": 8, "image_size": 32, "head_width": 8},
                           text_cfg={"context_length": 8, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1})
    assert is_convolutional(model)
    x, t = torch.rand(6, 3, 32, 32), torch.randint(0, 100, (6, 8))
    results = []
    for opts in (SpeedOptions(), SpeedOptions(channels_last=True)):
        m = opts.layout(copy.deepcopy(model))
        img, txt, scale = m(x.contiguous(memory_format=opts.input_format(m)), t)
        loss = open_clip.ClipLoss()(img, txt, scale)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
        assert m.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last) == opts.channels_last
    assert model.visual.conv1.weight.is_contiguous()  # the original was not touched
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=1e-5) and all(torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(g0, g1))


def test_channels_last_leaves_a_vit_alone():
    from poisonbench.models import create_model

    model, _ = create_model("poisonbench-tiny")
    assert not is_convolutional(model)  # its one convolution is the patch embedding
    SpeedOptions(channels_last=True).layout(model)
    assert all(p.is_contiguous() for p in model.parameters())
