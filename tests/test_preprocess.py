"""The pre-processing leaf module: OpenAI's normalisation constants, and no heavy imports."""
import subprocess
import sys

import open_clip.constants as oc
import torch

from poisonbench.preprocess import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, eval_geometry, normalize


def test_constants_are_open_clips():
    assert OPENAI_DATASET_MEAN == tuple(oc.OPENAI_DATASET_MEAN)
    assert OPENAI_DATASET_STD == tuple(oc.OPENAI_DATASET_STD)


def test_normalize_maps_uint8_and_float_alike():
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    a, b = normalize(x), normalize(x.float() / 255)
    assert torch.equal(a, b)
    mean = torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    assert torch.allclose(normalize(torch.full((1, 3, 2, 2), 1.0) * mean), torch.zeros(1, 3, 2, 2), atol=1e-6)


def test_eval_geometry_crops_the_centre_of_a_non_square_image():
    x = torch.zeros(1, 3, 28, 56, dtype=torch.uint8)
    x[..., 14:42] = 255  # the centre square is white, the sides black
    y = eval_geometry(x, 28)
    assert y.shape == (1, 3, 28, 28) and y.dtype == torch.uint8
    assert int(y.min()) >= 250


def test_importing_it_loads_neither_open_clip_nor_the_evaluator():
    code = "import sys, poisonbench.preprocess; print(sorted(m for m in sys.modules if m.startswith(('open_clip', 'poisonbench.evaluate'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
