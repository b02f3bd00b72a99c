import pytest
import torch
import torch.nn.functional as F

from poisonbench.metrics import linear_probe, retrieval_recall


def test_linear_probe_separable_features_and_random_labels():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    y_train, y_test = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (200,), generator=g)
    x_train = centers[y_train] + torch.randn(400, 16, generator=g)
    x_test = centers[y_test] + torch.randn(200, 16, generator=g)
    acc, c = linear_probe(x_train, y_train, x_test, y_test)
    assert acc >= 0.95 and c > 0
    shuffled = torch.randint(0, 4, (200,), generator=g)  # labels unrelated to the features
    acc_random, _ = linear_probe(x_train, y_train, x_test, shuffled)
    assert abs(acc_random - 0.25) < 0.1  # chance for 4 classes


def brute_force_recall(sim, k):
    hits = 0
    n = sim.shape[0]
    for i in range(n):
        above = [j for j in range(n) if j != i and sim[i, j] >= sim[i, i]]
        hits += len(above) < k
    return hits / n


def test_recall_at_k_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(12, 6, generator=g), dim=1)
    txt = F.normalize(img + 0.8 * torch.randn(12, 6, generator=g), dim=1)
    txt[5] = txt[4]  # a duplicate caption: ties count against the query
    out = retrieval_recall(img, txt, ks=(1, 3, 5))
    sim = (img.double() @ txt.double().T)
    for k in (1, 3, 5):
        assert out[f"i2t_r{k}"] == pytest.approx(brute_force_recall(sim, k))
        assert out[f"t2i_r{k}"] == pytest.approx(brute_force_recall(sim.T, k))
    perfect = retrieval_recall(img, img)
    assert perfect["i2t_r1"] == 1.0 and perfect["t2i_r1"] == 1.0
