"""The local-density detectors (defenses/density_scores.py) against the testable properties of
/work/shared/reference/spec-badclip-density-detection.md B.11 that apply to k-distance, SLOF, DAO and LID:
1-11, 13 and 14 (one test each, named test_b11_<n>_...), plus an independent brute-force reference of the
corrected mode and the per-batch protocol of B.3.

Not here: B.11.12 (sign conventions) concerns the negation of IsolationForest and CLIPScores before AUROC
(these four detectors are used as is; every test below uses higher = more suspicious); B.11.15 (metrics)
is the detection-metric code of the engine. IsolationForest and Cognitive Distillation are not in scope.
"""
import math
from fractions import Fraction

import pytest
import torch
from sklearn.metrics import roc_auc_score

from poisonbench.defenses import density_scores as ds
from poisonbench.defenses.density_scores import DETECTORS, INDEX_MODES, batch_scores, dataset_scores, keep_lowest

F64 = torch.float64
EXACT = "donot_use_mm_for_euclid_dist"
NEIGHBOUR_DETECTORS = ("slof", "dao")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gaussian(n: int, d: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=gen(seed), dtype=F64)


def subspace(n: int, d: int, seed: int, dim: int = 64) -> torch.Tensor:
    """n i.i.d. uniform points of [0, 1]^d embedded in a random d-dim subspace of R^dim (B.11.6-8)."""
    g = gen(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, d, generator=g, dtype=F64))
    return torch.rand(n, d, generator=g, dtype=F64) @ basis.T


@pytest.fixture(scope="module")
def uniform_subspaces() -> dict[int, torch.Tensor]:
    return {d: subspace(2000, d, seed=d) for d in (2, 5, 10)}


# ---------------------------------------------------------------------------------------- brute force
def brute_force(img: list[list[float]], txt: list[list[float]] | None, k: int) -> dict[str, list[float]]:
    """k-distance, SLOF, DAO and LID in corrected mode (B.4, B.10) with plain Python loops over sorted
    distance lists; independent of the module's tensor code."""
    n = len(img)
    ref = img + (txt or [])

    def non_self(p: int, skip: set[int]) -> list[tuple[float, int]]:
        return sorted((math.dist(ref[p], ref[r]), r) for r in range(len(ref)) if r not in skip)

    def lid(dists: list[float]) -> float:  # dists ascending, self excluded, at least k + 1 of them
        return -k / sum(math.log(dists[i] / dists[k] + 1e-4) for i in range(k))

    out: dict[str, list[float]] = {d: [] for d in DETECTORS}
    for q in range(n):
        own = {q, n + q} if txt is not None else {q}
        cand = non_self(q, own)
        a = [dist for dist, _ in cand]
        a_k = a[k]
        nbr_kdist, nbr_lid = [], []
        for _, r in cand[:k]:
            b = [dist for dist, _ in non_self(r, {r})]  # b_1, b_2, ... (self excluded)
            nbr_kdist.append(b[k - 1])  # b_k: its k-th non-self distance (D3)
            nbr_lid.append(lid(b))  # over b_1..b_k / b_{k+1}
        out["k-distance"].append(a_k)
        out["slof"].append(sum(a_k / bk for bk in nbr_kdist) / k)
        out["dao"].append(sum(l * math.log(a_k / bk) for l, bk in zip(nbr_lid, nbr_kdist)) / k)
        out["lid"].append(lid(a))
    return out


@pytest.mark.parametrize("paired", [False, True])
def test_corrected_mode_equals_brute_force(paired):
    img, txt = gaussian(24, 5, seed=1), gaussian(24, 5, seed=2) + 0.5
    k = 4
    ref = brute_force(img.tolist(), txt.tolist() if paired else None, k)
    for det in DETECTORS:
        got = batch_scores(img, txt if paired else None, det, k, "corrected")
        assert torch.allclose(got, torch.tensor(ref[det], dtype=F64), rtol=1e-10, atol=1e-12), det


# ---------------------------------------------------------------------------------------- B.11
def test_b11_1_cluster_point_has_smaller_k_distance_than_isolated_point():
    pts = torch.cat([0.01 * gaussian(10, 3, seed=3), torch.tensor([[5.0, 5.0, 5.0]], dtype=F64)])
    s = batch_scores(pts, None, "k-distance", 2)
    assert s[:10].max() < s[10]


def test_b11_2_exact_small_numbers():
    """B.11.2 literally (k-distance = 2nd nearest for k=1), and a hand-worked 1-D batch {0, 2, 3, 10},
    k = 1, image-only, showing D1 (faithful look-up of row = masked column), D2 (self-zero in neighbour
    LID) and D3 (query a_1 = 2nd nearest, neighbour b_1 = 1st nearest)."""
    line = torch.arange(8, dtype=F64)[:, None]
    assert batch_scores(line, None, "k-distance", 1)[0].item() == 2.0
    x = torch.tensor([[0.0], [2.0], [3.0], [10.0]], dtype=F64)
    # query a_1 (2nd nearest other point): 0 -> 3, 2 -> 2, 3 -> 3, 10 -> 8
    # b_1 (nearest other point) of rows 0..3: 2, 1, 1, 7
    # nearest neighbour (masked column / true row): 0 -> col 0 / row 1; 2 -> col 1 / row 2;
    # 3 -> col 1 / row 1; 10 -> col 2 / row 2. Faithful looks up the column as a row: query 0 reads row 0.
    assert batch_scores(x, None, "k-distance", 1).tolist() == [3.0, 2.0, 3.0, 8.0]
    assert batch_scores(x, None, "slof", 1, "faithful").tolist() == [3 / 2, 2 / 1, 3 / 1, 8 / 1]
    assert batch_scores(x, None, "slof", 1, "corrected").tolist() == [3 / 1, 2 / 1, 3 / 1, 8 / 1]
    lid_faithful = -1 / math.log(0 + 1e-4)  # b_0 / b_1 = 0 for every row (D2)
    want = [lid_faithful * math.log(r) for r in (3 / 2, 2 / 1, 3 / 1, 8 / 1)]
    assert torch.allclose(batch_scores(x, None, "dao", 1, "faithful"), torch.tensor(want, dtype=F64), rtol=1e-12)
    # corrected neighbour LIDs: b_1 / b_2 of rows 1 (1/2) and 2 (1/3)
    lid1, lid2 = -1 / math.log(1 / 2 + 1e-4), -1 / math.log(1 / 3 + 1e-4)
    want = [lid1 * math.log(3), lid2 * math.log(2), lid1 * math.log(3), lid2 * math.log(8)]
    assert torch.allclose(batch_scores(x, None, "dao", 1, "corrected"), torch.tensor(want, dtype=F64), rtol=1e-12)
    want = [-1 / math.log(a0 / a1 + 1e-4) for a0, a1 in ((2, 3), (1, 2), (1, 3), (7, 8))]
    for mode in INDEX_MODES:
        assert torch.allclose(batch_scores(x, None, "lid", 1, mode), torch.tensor(want, dtype=F64), rtol=1e-12)


def test_b11_3_self_excluded_exact_duplicate_counted():
    img = gaussian(12, 4, seed=4)
    img[5] = img[2]  # exact duplicate of row 2
    for txt in (None, gaussian(12, 4, seed=5)):
        dist, rows = ds.reference_distances(img, txt)
        r = 12 if txt is None else 24
        assert dist.shape == rows.shape == (12, r - r // 12)
        for i in range(12):
            own = {i} if txt is None else {i, 12 + i}
            assert set(rows[i].tolist()) == set(range(r)) - own  # exactly the own entries removed
        kd = batch_scores(img, txt, "k-distance", 1)
        nearest = dist.min(dim=1).values
        assert nearest[2] == 0 and nearest[5] == 0  # the duplicate is a neighbour at distance 0
        assert (nearest[[i for i in range(12) if i not in (2, 5)]] > 0).all()  # never the self-zero
        assert (kd > 0).all()  # k=1: the 2nd nearest, the self-zero never counted
    # three copies: each copy has two others at distance 0, so its 2nd nearest (k=1) is 0
    img[7] = img[2]
    kd = batch_scores(img, None, "k-distance", 1)
    assert kd[[2, 5, 7]].tolist() == [0.0, 0.0, 0.0] and (kd[[0, 1, 3]] > 0).all()


def test_b11_4_paired_candidates_and_own_caption_never_a_neighbour():
    n = 10
    img = gaussian(n, 6, seed=6)
    dist, rows = ds.reference_distances(img, gaussian(n, 6, seed=7))
    assert dist.shape == (n, 2 * (n - 1))
    for i in range(n):
        assert n + i not in rows[i].tolist() and i not in rows[i].tolist()
    # captions identical to their images: every distance of the image-only list appears twice, and the
    # own caption (distance 0) must not: paired a_2 = image-only a_1 (the 2nd nearest other image)
    paired = batch_scores(img, img.clone(), "k-distance", 2)
    assert torch.equal(paired, batch_scores(img, None, "k-distance", 1))
    assert torch.equal(batch_scores(img, img.clone(), "k-distance", 1), dist[:, :n - 1].min(dim=1).values)


def test_b11_5_scale_behaviour():
    img, txt = gaussian(40, 8, seed=8), gaussian(40, 8, seed=9)
    c = 7.3
    for t in (None, txt):
        for mode in INDEX_MODES:
            for det in DETECTORS:
                k = 5
                base = batch_scores(img, t, det, k, mode)
                scaled = batch_scores(c * img, None if t is None else c * t, det, k, mode)
                want = c * base if det == "k-distance" else base
                assert torch.allclose(scaled, want, rtol=1e-9, atol=1e-12), (det, mode, t is None)


def test_b11_6_homogeneous_data(uniform_subspaces):
    """Median SLOF ~ 1 (replication 1.02-1.04), median DAO small and positive (faithful 0.02-0.03,
    corrected 0.17-0.35 for d = 5-10), both far below an isolated point's score."""
    for d in (5, 10):
        x = uniform_subspaces[d][:1000]
        far = torch.cat([x, x[:1] + 3.0])  # one isolated point
        for mode in INDEX_MODES:
            slof = batch_scores(far, None, "slof", 16, mode)
            dao = batch_scores(far, None, "dao", 16, mode)
            assert 1.0 < slof[:-1].median() < 1.1, (d, mode)
            lo, hi = (0.0, 0.08) if mode == "faithful" else (0.1, 0.5)
            assert lo < dao[:-1].median() < hi, (d, mode, dao[:-1].median())
            assert slof[-1] > 5 * slof[:-1].median() and dao[-1] > 5 * dao[:-1].median()


def test_b11_7_lid_estimates_the_dimension(uniform_subspaces):
    """MLE LID, k = 64 (the paper's), median ~ d (replication with N = 3,000: 1.96 / 4.44 / 7.95),
    finite-sample downward bias allowed at larger d."""
    for d, (lo, hi) in {2: (1.8, 2.2), 5: (4.0, 5.2), 10: (7.0, 10.2)}.items():
        med = batch_scores(uniform_subspaces[d], None, "lid", ds.DEFAULT_LID_K).median().item()
        assert lo < med < hi, (d, med)


def test_b11_8_dao_faithful_neighbour_lid_collapses(uniform_subspaces):
    """Faithful (self-zero included, D2): median < 2 for d = 2/5/10 (replication 0.96/1.29/1.46);
    corrected: tracks d."""
    for d in (2, 5, 10):
        x = uniform_subspaces[d]
        assert ds.reference_lids(x, 16, "faithful").median() < 2
        assert 0.75 * d < ds.reference_lids(x, 16, "corrected").median() < 1.2 * d
    # and DAO really uses them: faithful DAO = mean LID_faithful(n_j) * ln(a_k / b_k(n_j)) with the D1 rows
    x = uniform_subspaces[5][:300]
    k = 16
    dist, _ = ds.reference_distances(x, None)
    a, col = torch.sort(dist, dim=1, stable=True)
    b_k = torch.sort(torch.cdist(x, x, compute_mode=EXACT), dim=1).values[:, k]
    nbr = col[:, :k]
    want = (ds.reference_lids(x, k, "faithful")[nbr] * torch.log(a[:, k:k + 1] / b_k[nbr])).mean(dim=1)
    assert torch.allclose(batch_scores(x, None, "dao", k, "faithful"), want, rtol=1e-9)


@pytest.mark.parametrize("paired", [False, True])
def test_b11_9_order_invariance_corrected_not_faithful(paired):
    img, txt = gaussian(300, 32, seed=10), gaussian(300, 32, seed=11)
    t = txt if paired else None
    perm = torch.randperm(300, generator=gen(12))
    for det in DETECTORS:
        for mode in INDEX_MODES:
            s = batch_scores(img, t, det, 16, mode)
            sp = batch_scores(img[perm], None if t is None else t[perm], det, 16, mode)
            delta = (s[perm] - sp).abs().max().item()
            if mode == "faithful" and det in NEIGHBOUR_DETECTORS:
                assert delta > 0.05, (det, delta)  # D1 makes the scores depend on the batch order
            else:
                assert delta < 1e-9, (det, mode, delta)


def test_b11_10_batch_dependence():
    x, txt = gaussian(256, 16, seed=13), gaussian(256, 16, seed=14)

    def embed(rows):
        return x[rows], txt[rows]

    for det in DETECTORS:
        k = 8
        s0 = dataset_scores(embed, 256, 64, gen(0), detector=det, k=k)
        assert torch.equal(s0, dataset_scores(embed, 256, 64, gen(0), detector=det, k=k))  # seeded
        s1 = dataset_scores(embed, 256, 64, gen(1), detector=det, k=k)
        assert (s0 != s1).float().mean() > 0.9, det


def test_b11_11_isolated_poisons():
    """Two nearby points at +15 in every coordinate of a 2,048-point standard Gaussian cloud in R^64:
    AUROC 1 for k-distance, SLOF and DAO in both modes; LID is not an isolation score (replication 0.12)."""
    cloud = gaussian(2048, 64, seed=15)
    poisons = 15 + 0.1 * gaussian(2, 64, seed=16)
    x = torch.cat([cloud, poisons])
    labels = [0] * 2048 + [1, 1]
    for mode in INDEX_MODES:
        for det in DETECTORS if mode == "faithful" else NEIGHBOUR_DETECTORS:  # k-distance, LID: mode-free
            auroc = roc_auc_score(labels, batch_scores(x, None, det, None, mode).numpy())
            if det == "lid":
                assert auroc < 0.5, (mode, auroc)
            else:
                assert auroc == 1.0, (det, mode)


def test_b11_13_non_finite_scores_are_mapped():
    """NaN and +inf -> 1000, -inf -> 0. Five copies of one point (a_k = b_k = 0 for each copy with k = 2:
    0/0) and a point whose nearest neighbours are those copies (a_k > 0 = b_k: +inf). -inf (DAO with
    a_k = 0 < b_k) is not reachable with a simple batch, so the mapping itself is checked on it."""
    x = torch.cat([torch.zeros(5, 3, dtype=F64), torch.tensor([[1.0, 0, 0], [9.0, 9, 9], [-9.0, 9, 0]], dtype=F64)])
    for mode in INDEX_MODES:
        for det in NEIGHBOUR_DETECTORS:
            s = batch_scores(x, None, det, 2, mode)
            assert torch.isfinite(s).all()
            assert s[5] == 1000.0, (det, mode)  # +inf
            assert s[0] == 1000.0, (det, mode)  # NaN
    assert torch.isfinite(batch_scores(x, None, "lid", 2)).all() and batch_scores(x, None, "lid", 2)[0] == 1000.0
    assert ds._map_nonfinite(torch.tensor([float("nan"), float("inf"), -float("inf"), 2.5])).tolist() == \
        [1000.0, 1000.0, 0.0, 2.5]


def test_b11_14_keep_exactly_the_lowest():
    s = torch.tensor([1.0, 0.0, 1.0, 1.0, 2.0])
    assert keep_lowest(s, 0.4).tolist() == [True, True, True, False, False]  # ties: lower row kept
    scores = torch.rand(1000, generator=gen(17))
    for f in (0.0, 0.01, 0.07, 0.1, 0.5, 0.999):
        keep = keep_lowest(scores, f)
        n_keep = math.floor(1000 * (1 - Fraction(str(f))))
        assert keep.dtype == torch.bool and int(keep.sum()) == n_keep
        assert scores[keep].max() <= scores[~keep].min() if n_keep < 1000 else keep.all()
    assert int(keep_lowest(torch.rand(100), 0.07).sum()) == 93  # not the 92 of floating-point 100 * 0.93
    assert int(keep_lowest(torch.rand(7)).sum()) == 6  # default remove_fraction 0.1: floor(6.3)
    with pytest.raises(ValueError, match="remove_fraction"):
        keep_lowest(scores, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        keep_lowest(torch.tensor([0.0, float("nan")]), 0.1)


def test_ties_are_broken_by_column_index():
    """Faithful SLOF/DAO look up the neighbour's column index (D1), so with tied distances (repeated
    captions are common) the result depends on which tied column comes first: always the lowest, as a
    stable sort gives, on every device."""
    d = torch.randint(0, 4, (50, 40), generator=gen(26)).to(F64)
    v, c = ds._nearest(d, 7)
    vs, cs = torch.sort(d, dim=1, stable=True)
    assert torch.equal(v, vs[:, :7]) and torch.equal(c, cs[:, :7])
    img = gaussian(60, 4, seed=27)
    txt = gaussian(3, 4, seed=28)[torch.arange(60) % 3]  # 3 distinct captions, 20 copies each
    k = 5
    dist, _ = ds.reference_distances(img, txt)
    a, col = torch.sort(dist, dim=1, stable=True)
    ref = torch.cat([img, txt])
    b = torch.sort(torch.cdist(ref, ref, compute_mode=EXACT), dim=1).values
    nbr = col[:, :k]
    ratio = a[:, k:k + 1] / b[nbr, k]
    # 20 copies of each caption: a caption row has b_k = 0, so a look-up on it gives +inf -> 1000 (B.11.13)
    slof = torch.nan_to_num(ratio.mean(dim=1), nan=1000.0, posinf=1000.0, neginf=0.0)
    assert (slof == 1000.0).any() and (slof < 1000.0).any()
    assert torch.allclose(batch_scores(img, txt, "slof", k, "faithful"), slof, rtol=1e-12)
    lids = ds.reference_lids(ref, k, "faithful")
    dao = torch.nan_to_num((lids[nbr] * torch.log(ratio)).mean(dim=1), nan=1000.0, posinf=1000.0, neginf=0.0)
    assert torch.allclose(batch_scores(img, txt, "dao", k, "faithful"), dao, rtol=1e-12)


# ---------------------------------------------------------------------------------------- protocol (B.3)
def test_dataset_scores_writes_each_batch_back_at_its_rows():
    x, txt = gaussian(150, 8, seed=18), gaussian(150, 8, seed=19)
    seen = []

    def embed(rows):
        seen.append(rows.clone())
        return x[rows], txt[rows]

    for det in DETECTORS:
        seen.clear()
        s = dataset_scores(embed, 150, 64, gen(3), detector=det, k=6, index_mode="faithful")
        assert [len(r) for r in seen] == [64, 64, 22]  # 22 >= min_batch_size(6, paired) = 5: not merged
        assert sorted(torch.cat(seen).tolist()) == list(range(150))  # a random partition of the rows
        assert seen[0].tolist() != list(range(64))  # shuffled
        for rows in seen:
            assert torch.equal(s[rows], batch_scores(x[rows], txt[rows], det, 6, "faithful"))


def test_dataset_scores_merges_a_tiny_last_batch():
    x = gaussian(95, 8, seed=20)
    sizes = []

    def embed(rows):
        sizes.append(len(rows))
        return x[rows], x[rows] + 1

    dataset_scores(embed, 95, 40, gen(0), detector="k-distance", k=16, paired=False)
    assert sizes == [40, 55]  # the last 15 < k + 2 = 18 (D9) went into the previous batch
    sizes.clear()
    dataset_scores(embed, 58, 40, gen(0), detector="k-distance", k=16, paired=False)
    assert sizes == [40, 18]  # 18 = k + 2 can be scored on its own
    sizes.clear()
    dataset_scores(embed, 95, 40, gen(0), detector="k-distance", k=16, paired=True)
    assert sizes == [40, 40, 15]  # paired: 15 images give 28 >= k + 1 candidates


def test_one_batch_dataset_equals_batch_scores_in_corrected_mode():
    x, txt = gaussian(80, 8, seed=22), gaussian(80, 8, seed=23)
    for det in DETECTORS:
        s = dataset_scores(lambda r: (x[r], txt[r]), 80, 128, gen(5), detector=det, k=6, index_mode="corrected")
        assert torch.allclose(s, batch_scores(x, txt, det, 6, "corrected"), rtol=1e-12)


# ---------------------------------------------------------------------------------------- defaults, errors
def test_defaults_follow_the_spec():
    assert (ds.DEFAULT_K, ds.DEFAULT_LID_K, ds.DEFAULT_REMOVE_FRACTION) == (16, 64, 0.1)  # B.5, B.6
    assert ds.DEFAULT_PAIRED is True and ds.DEFAULT_INDEX_MODE == "faithful" and ds.DEFAULT_DETECTOR == "dao"
    assert ds.default_k("lid") == 64 and ds.default_k("slof") == 16
    x = gaussian(70, 4, seed=24)
    assert torch.equal(batch_scores(x, None, "lid"), batch_scores(x, None, "lid", 64))
    assert torch.equal(batch_scores(x, None), batch_scores(x, None, "dao", 16, "faithful"))


def test_errors_say_what_to_do():
    x = gaussian(17, 4, seed=25)
    with pytest.raises(ValueError, match="at least 18 images or k <= 15"):
        batch_scores(x, None, "k-distance", 16)
    batch_scores(x, x.clone(), "k-distance", 16)  # paired: 2 * 16 = 32 candidates suffice
    with pytest.raises(ValueError, match="at least 10 images"):
        batch_scores(x[:9], x[:9].clone(), "slof", 16)
    with pytest.raises(ValueError, match="unknown detector"):
        batch_scores(x, None, "lof", 2)
    with pytest.raises(ValueError, match="unknown index_mode"):
        batch_scores(x, None, "slof", 2, "fixed")
    with pytest.raises(ValueError, match="non-finite"):
        batch_scores(torch.full((20, 4), float("nan")), None, "slof", 2)
    with pytest.raises(ValueError, match="batch_size=10 is too small"):
        dataset_scores(lambda r: (x[r], None), 17, 10, gen(0), detector="slof", k=16, paired=False)
    with pytest.raises(ValueError, match="paired=True needs caption embeddings"):
        dataset_scores(lambda r: (x[r], None), 17, 17, gen(0), detector="slof", k=4)
