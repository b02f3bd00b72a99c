import pytest
import torch
import torch.nn.functional as F

from poisonbench.metrics import linear_probe, linear_probe_paper, retrieval_recall


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


def test_the_papers_probe_agrees_with_the_logistic_regression_on_separable_features():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(5, 32, generator=g) * 3
    y_train, y_test = torch.randint(0, 5, (1000,), generator=g), torch.randint(0, 5, (300,), generator=g)
    x_train = centers[y_train] + torch.randn(1000, 32, generator=g)
    x_test = centers[y_test] + torch.randn(300, 32, generator=g)
    paper = linear_probe_paper(x_train, y_train, x_test, y_test, seed=0, epochs=8, batch_size=64)
    sklearn, _ = linear_probe(x_train, y_train, x_test, y_test)
    assert paper >= 0.9 and abs(paper - sklearn) <= 0.03
    assert paper == linear_probe_paper(x_train, y_train, x_test, y_test, seed=0, epochs=8, batch_size=64)  # seeded
    shuffled = torch.randint(0, 5, (300,), generator=g)
    assert abs(linear_probe_paper(x_train, y_train, x_test, shuffled, epochs=4) - 0.2) < 0.1  # chance


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
