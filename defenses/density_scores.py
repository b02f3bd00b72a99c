"""Local-density backdoor-sample detectors of Huang, Erfani, Li, Ma, Bailey (ICLR 2025, arXiv:2502.01385):
k-distance, SLOF, DAO and LID, as a pure scoring module (torch only; no engine imports).

Faithful to /work/shared/reference/spec-badclip-density-detection.md Part B ("the spec" below; sections
B.1-B.11). Every sample is scored against the other members of its own random batch (B.3), with exact
Euclidean distances (B.2) between *un-normalised* embeddings (B.2, quirk D5): the caller passes
``encode_image(x, normalize=False)`` / ``encode_text(t, normalize=False)``-style features, never
L2-normalised ones. Higher scores are more suspicious for all four detectors (B.4, B.11.12).

Two index modes (B.9 D1-D3, B.10):

- ``"faithful"`` reproduces the authors' code (the paper's numbers): SLOF/DAO look up each neighbour's
  statistics at its column index in the *masked* distance row, used directly as a row of the unmasked
  [images; captions] reference (D1, about half of the look-ups hit the wrong row); DAO's neighbour LIDs
  include the zero self-distance (D2).
- ``"corrected"`` maps each neighbour back to its true reference row and computes neighbour LIDs with the
  self-distance excluded (B.10). Both modes keep D3 (the query uses its ``a_k``, the (k+1)-th nearest
  non-self distance; a neighbour uses its ``b_k``, the k-th nearest non-self distance) and the 1e-4 inside
  the LID logs (D3, D10).

k-distance and LID use no neighbour look-ups, so the two modes give them identical scores.

The default is ``"faithful"`` because it is what produced the paper's detection numbers and the
released DAO-filtered data (B.6); the spec recommends computing and reporting both (B.9 D1), which the
``index_mode`` argument allows.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Literal

import torch
from torch import Tensor

Detector = Literal["k-distance", "slof", "dao", "lid"]
IndexMode = Literal["faithful", "corrected"]

DETECTORS: tuple[str, ...] = ("k-distance", "slof", "dao", "lid")
INDEX_MODES: tuple[str, ...] = ("faithful", "corrected")

DEFAULT_K = 16  # k for k-distance, SLOF and DAO in the paper runs (B.5: extract_bd_scores.py --k default 16)
DEFAULT_LID_K = 64  # k of the LID detector in the paper runs (B.5: hard-coded 64)
DEFAULT_DETECTOR: Detector = "dao"  # the paper filters with DAO (B.6: safe_mode reads DAO_scores.h5)
DEFAULT_INDEX_MODE: IndexMode = "faithful"  # the paper's code (B.9 D1/D2); see the module docstring
DEFAULT_PAIRED = True  # image + caption references, as every CLIP run of the paper (B.2, B.9 D4)
DEFAULT_REMOVE_FRACTION = 0.1  # the paper removes 10 % (B.6: safe_precentage = 0.9)
PAPER_BATCH_SIZE = 2048  # reference set of the paper runs: 512 per GPU x 4 GPUs, gathered (B.3, B.5)

EPS = 1e-4  # added inside every LID log ratio (B.4, D3, D10)
NONFINITE_FILL = 1000.0  # NaN and +inf scores become this; -inf becomes 0 (B.4, B.11.13)


def default_k(detector: Detector) -> int:
    """The paper's k for ``detector`` (B.5): 64 for ``"lid"``, 16 for the others."""
    _check_detector(detector)
    return DEFAULT_LID_K if detector == "lid" else DEFAULT_K


def min_batch_size(k: int, paired: bool) -> int:
    """Smallest batch (number of images N) that every detector can score with this ``k``.

    A query needs ``k + 1`` non-self references (its ``a_k``, B.4): N - 1 images alone, or 2(N - 1)
    images and captions in paired mode (B.3). Everything the neighbour statistics need then exists too.
    So N >= k + 2 image-only (the spec's D9 bound) and N >= ceil((k + 3) / 2) paired.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return (k + 4) // 2 if paired else k + 2


def reference_distances(image_emb: Tensor, text_emb: Tensor | None) -> tuple[Tensor, Tensor]:
    """Distances of each query image to its candidate neighbours, self excluded (B.3).

    The reference is the batch's images, followed in paired mode by the batch's captions:
    R = N (image-only) or 2N rows. For query i exactly one entry (its own image, row i) or, in paired
    mode, two entries (its own image and its own caption, row N + i) are removed, by position: an
    exact duplicate of the query elsewhere in the batch stays a candidate at distance 0 (B.11.3).

    Args:
        image_emb: float [N, D], un-normalised image embeddings (``normalize=False``, B.2/D5).
        text_emb: float [N, D] un-normalised caption embeddings of the same rows, or None (image-only).

    Returns:
        ``(dist, rows)``, both [N, M] with M = N - 1 (image-only) or 2(N - 1) (paired): ``dist`` the
        exact Euclidean distances (float, ``torch.cdist(..., compute_mode="donot_use_mm_for_euclid_dist")``,
        B.2), in reference order (images, then captions); ``rows`` int64, the reference row of each
        column, in [0, R).

    Raises:
        ValueError: on shapes that do not match or non-finite embeddings.
    """
    ref = _reference(image_emb, text_emb)
    return _masked(_cdist(ref[:image_emb.shape[0]], ref))


def reference_lids(reference: Tensor, k: int, index_mode: IndexMode) -> Tensor:
    """MLE LID of every reference point, as DAO uses it for the neighbours (B.4 DAO row, B.10).

    With b_0 <= b_1 <= ... the sorted distances of a reference point to the whole reference,
    itself included (b_0 = 0):

    - ``"faithful"`` (D2): LID = -k / sum_{i<k} ln(b_i / b_k + 1e-4), the zero self-distance counted.
      This collapses to about 1-2 whatever the true dimension (B.4 quirk 2, B.11.8).
    - ``"corrected"``: LID = -k / sum_{i=1..k} ln(b_i / b_{k+1} + 1e-4), self excluded.

    Args:
        reference: float [R, D], the batch's un-normalised reference points (images, then captions).
        k: number of neighbours, 1 <= k <= R - 2.
        index_mode: ``"faithful"`` or ``"corrected"``.

    Returns:
        float [R], same dtype as the computation (float32, or float64 for float64 input); not mapped
        for non-finite values.

    Raises:
        ValueError: on a bad ``index_mode`` or a ``k`` too large for R.
    """
    _check_index_mode(index_mode)
    ref = _as_float(reference, "reference")
    if not 1 <= k <= ref.shape[0] - 2:
        raise ValueError(f"k={k} needs at least k + 2 reference points, got {ref.shape[0]}: lower k or "
                         "use a larger batch")
    return _reference_lids(_sorted_reference(_cdist(ref, ref), k), k, index_mode)


def batch_scores(image_emb: Tensor, text_emb: Tensor | None, detector: Detector = DEFAULT_DETECTOR,
                 k: int | None = None, index_mode: IndexMode = DEFAULT_INDEX_MODE) -> Tensor:
    """Scores of one batch of images against the batch's other members (B.3, B.4).

    Notation (B.4): for query image q, a_0 <= a_1 <= ... are its sorted distances to the references
    (other images, plus all captions but its own in paired mode; see ``reference_distances``); n_j is its
    j-th nearest reference (j < k); b^(n)_k is the k-th nearest non-self distance of reference point n,
    taken over the full reference [images; captions] (only n itself skipped: an image neighbour's own
    caption counts, as in the code; B.4, B.10); LID(n) as in ``reference_lids``.

    - ``"k-distance"``: s = a_k, the distance to the (k+1)-th nearest non-self reference
      (B.4, D:backdoor_sample_detector/k_distance.py:47-48; B.11.2).
    - ``"slof"``: s = (1/k) sum_{j<k} a_k / b^(n_j)_k (B.4, D:.../slof.py:47-64).
    - ``"dao"``: s = (1/k) sum_{j<k} LID(n_j) * ln(a_k / b^(n_j)_k), the mean of the logs (B.4,
      D:.../dao.py:53-86). The authors' code adds no 1e-4 inside this log, only inside the LID logs, and
      neither does this one.
    - ``"lid"``: s = -k / sum_{i<k} ln(a_i / a_k + 1e-4), the query's own MLE LID over self-excluded
      distances (B.4, D:.../lid_detection.py:48-55). Not a monotone isolation score (B.11.11).

    In ``"faithful"`` mode n_j is the reference *row* equal to n_j's column index in the masked row (D1);
    in ``"corrected"`` mode it is n_j's true row (B.10). Ties in the sorts are broken by column index.

    Non-finite scores: NaN and +inf become 1000, -inf becomes 0 (B.4, B.11.13). The code does so for SLOF
    and DAO; here it is applied to all four detectors, so that scores are always finite (k-distance is
    finite for finite embeddings; LID is NaN when a query has k + 1 exact duplicates, which the code
    would have returned as NaN). No finite score is changed.

    Args:
        image_emb: float [N, D] (any float dtype; half precision is computed in float32), the batch's
            un-normalised image embeddings, ``encode_image(..., normalize=False)`` (B.2/D5). These are the
            queries.
        text_emb: float [N, D] un-normalised caption embeddings of the same N pairs (paired references,
            the paper's runs, B.2/D4), or None for image-only references (README/QuickStart).
        detector: one of ``DETECTORS``; default DAO (the paper's filter, B.6).
        k: neighbours; None = the paper's value for the detector (16, or 64 for LID; B.5). Needs
            N >= ``min_batch_size(k, paired)``.
        index_mode: ``"faithful"`` (default, the paper's code) or ``"corrected"`` (B.10).

    Returns:
        float [N] (float32, or float64 for float64 input), on the embeddings' device, in the row order of
        ``image_emb``. Ranges: k-distance >= 0; SLOF >= 0; DAO and LID real; all finite, at most 1000
        where mapped.

    Raises:
        ValueError: on an unknown detector or index mode, mismatched shapes, non-finite embeddings, or a
            ``k`` too large for the batch (the message gives the smallest batch or largest k that works).
    """
    _check_detector(detector)
    _check_index_mode(index_mode)
    k = default_k(detector) if k is None else k
    ref = _reference(image_emb, text_emb)
    n = image_emb.shape[0]
    paired = text_emb is not None
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n < min_batch_size(k, paired):
        largest = 2 * (n - 1) - 1 if paired else n - 2
        raise ValueError(
            f"k={k} is too large for a batch of {n} images ({'paired' if paired else 'image-only'} references: "
            f"{2 * (n - 1) if paired else n - 1} candidates per query, k + 1 needed): use a batch of at least "
            f"{min_batch_size(k, paired)} images or k <= {largest}")

    if detector in ("k-distance", "lid"):
        full = _cdist(ref[:n], ref)
    else:
        full = _cdist(ref, ref)
    dist, rows = _masked(full[:n])
    a, col = _nearest(dist, k + 1)  # a_0..a_k and their columns, ties by column
    a_k = a[:, k]
    if detector == "k-distance":
        scores = a_k
    elif detector == "lid":
        scores = _lid(a, k)
    else:
        # faithful (D1): the masked column index is used as the row; corrected (B.10): its true row
        nbr = col[:, :k] if index_mode == "faithful" else rows.gather(1, col[:, :k])
        b = _sorted_reference(full, k)
        ratio = a_k[:, None] / b[nbr, k]  # b_k: k-th non-self distance of the neighbour (D3)
        if detector == "slof":
            scores = ratio.mean(dim=1)
        else:
            scores = (_reference_lids(b, k, index_mode)[nbr] * torch.log(ratio)).mean(dim=1)
    return _map_nonfinite(scores)


def dataset_scores(embed_fn: Callable[[Tensor], tuple[Tensor, Tensor | None]], n: int, batch_size: int,
                   generator: torch.Generator, *, detector: Detector = DEFAULT_DETECTOR, k: int | None = None,
                   index_mode: IndexMode = DEFAULT_INDEX_MODE, paired: bool = DEFAULT_PAIRED) -> Tensor:
    """Scores of a whole dataset by the per-batch reference protocol (B.3).

    The rows 0..n-1 are shuffled with ``torch.randperm(n, generator=generator)`` and cut into consecutive
    batches of ``batch_size`` (the paper: a seeded shuffle, batches of 2,048 = 512 per GPU x 4,
    gathered). A last batch smaller than ``min_batch_size(k, paired)`` (k + 2 image-only, the spec's D9)
    cannot be scored and is merged into the previous batch. Each batch is embedded by one call of
    ``embed_fn`` and scored with ``batch_scores`` against its own members only; each score is written at
    its row's dataset index.

    Args:
        embed_fn: ``embed_fn(rows)`` with ``rows`` int64 [b] (CPU) dataset indices, in batch order, returns
            ``(image_emb [b, D], text_emb [b, D] or None)``: un-normalised embeddings
            (``normalize=False``, B.2/D5) of those rows, in that order. It may return None for the
            captions when ``paired`` is False (they are ignored then).
        n: dataset size, >= ``min_batch_size(k, paired)``.
        batch_size: images per batch (the reference set), >= ``min_batch_size(k, paired)``.
        generator: seeds the shuffle; the same seed gives the same batches and scores.
        detector, k, index_mode: as in ``batch_scores``.
        paired: use the captions as extra references (default True, the paper's CLIP runs, B.2/D4).

    Returns:
        float [n] on the CPU (float32, or float64 for float64 embeddings), higher = more suspicious.

    Raises:
        ValueError: on a too small ``n`` or ``batch_size``, on ``paired`` with no captions from
            ``embed_fn``, on embeddings of the wrong length, and as ``batch_scores``.
    """
    _check_detector(detector)
    k = default_k(detector) if k is None else k
    least = min_batch_size(k, paired)
    if batch_size < least:
        raise ValueError(f"batch_size={batch_size} is too small for k={k} "
                         f"({'paired' if paired else 'image-only'}): use at least {least} or a smaller k")
    if n < least:
        raise ValueError(f"a dataset of {n} rows is too small to score with k={k}: it needs at least {least} rows")
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < least:  # D9: merge a tiny last batch
        batches[-2:] = [torch.cat(batches[-2:])]
    out: Tensor | None = None
    for rows in batches:
        image_emb, text_emb = embed_fn(rows)
        if not paired:
            text_emb = None
        elif text_emb is None:
            raise ValueError("paired=True needs caption embeddings, but embed_fn returned None for them: "
                             "return encode_text(..., normalize=False) or pass paired=False")
        if image_emb.shape[0] != len(rows):
            raise ValueError(f"embed_fn returned {image_emb.shape[0]} image embeddings for {len(rows)} rows")
        s = batch_scores(image_emb, text_emb, detector=detector, k=k, index_mode=index_mode).cpu()
        if out is None:
            out = torch.empty(n, dtype=s.dtype)
        out[rows] = s
    assert out is not None
    return out


def keep_lowest(scores: Tensor, remove_fraction: float = DEFAULT_REMOVE_FRACTION) -> Tensor:
    """The rows to keep: exactly floor(N * (1 - remove_fraction)) with the lowest scores (B.6, B.11.14).

    The paper keeps the lowest ``safe_precentage`` = 1 - remove_fraction of the DAO scores and retrains
    from scratch on them (B.6). The product is computed on the decimal value of ``remove_fraction``
    (``Fraction(repr(remove_fraction))``), so that e.g. N = 100, remove_fraction = 0.07 keeps 93 rows, not
    the 92 of floating-point 100 * (1 - 0.07). Equal scores are ranked by row index: the lower row is kept
    first (stable sort).

    Args:
        scores: float [N], higher = more suspicious; +-inf allowed, NaN not.
        remove_fraction: in [0, 1); default 0.1 (B.6).

    Returns:
        bool [N] on the scores' device, True for a kept row; exactly floor(N * (1 - remove_fraction)) True.

    Raises:
        ValueError: on a ``remove_fraction`` outside [0, 1), scores that are not 1-D, or NaN scores.
    """
    if not 0.0 <= remove_fraction < 1.0:
        raise ValueError(f"remove_fraction must be in [0, 1), got {remove_fraction}")
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN: map them first (batch_scores maps NaN to 1000)")
    n_keep = math.floor(scores.shape[0] * (1 - Fraction(repr(float(remove_fraction)))))
    order = torch.sort(scores, stable=True).indices
    keep = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    keep[order[:n_keep]] = True
    return keep


# ----------------------------------------------------------------------------------------------------------
def _check_detector(detector: str) -> None:
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}: choose one of {', '.join(DETECTORS)}")


def _check_index_mode(index_mode: str) -> None:
    if index_mode not in INDEX_MODES:
        raise ValueError(f"unknown index_mode {index_mode!r}: choose one of {', '.join(INDEX_MODES)}")


def _as_float(x: Tensor, name: str) -> Tensor:
    """``x`` as a 2-D float tensor of at least float32 precision (the paper's cdist runs in fp32, B.5)."""
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a float tensor, got {x.dtype}")
    if x.dtype != torch.float64:
        x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} has non-finite values: check the model that produced the embeddings")
    return x


def _reference(image_emb: Tensor, text_emb: Tensor | None) -> Tensor:
    """The batch's reference [R, D]: images, then (paired mode) captions (B.3)."""
    img = _as_float(image_emb, "image_emb")
    if img.shape[0] < 2:
        raise ValueError(f"a batch needs at least 2 images, got {img.shape[0]}")
    if text_emb is None:
        return img
    txt = _as_float(text_emb, "text_emb")
    if txt.shape != img.shape:
        raise ValueError(f"text_emb {tuple(txt.shape)} must have the shape of image_emb {tuple(img.shape)}")
    dtype = torch.promote_types(img.dtype, txt.dtype)
    return torch.cat([img.to(dtype), txt.to(img.device, dtype)])


def _cdist(x: Tensor, y: Tensor) -> Tensor:
    """Exact Euclidean distances [len(x), len(y)] (B.2: ``compute_mode="donot_use_mm_for_euclid_dist"``)."""
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")


def _masked(d: Tensor) -> tuple[Tensor, Tensor]:
    """Drop each query's own entries from its distances to the reference (B.3).

    ``d`` [N, R] holds the distances of the N batch images to the reference, R = N (images) or 2N
    (images, then captions). Returns ``(dist, rows)`` [N, M]: the distances without column i (the
    query's own image) and, if R = 2N, column N + i (its own caption), in reference order, and the
    reference row (int64) of each remaining column.
    """
    n, r = d.shape
    j = torch.arange(n - 1, device=d.device)[None, :]
    img_rows = j + (j >= torch.arange(n, device=d.device)[:, None])  # [N, N-1]: skip row i
    blocks = [_drop_diagonal(d[:, :n])]
    rows = [img_rows]
    if r == 2 * n:
        blocks.append(_drop_diagonal(d[:, n:]))
        rows.append(img_rows + n)
    return torch.cat(blocks, dim=1), torch.cat(rows, dim=1)


def _drop_diagonal(sq: Tensor) -> Tensor:
    """[n, n] -> [n, n - 1]: each row without its diagonal entry, the others in order."""
    n = sq.shape[0]
    return sq.reshape(-1)[1:].view(n - 1, n + 1)[:, :-1].reshape(n, n - 1)


def _nearest(d: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """The m smallest entries of each row of ``d`` [N, M] and their columns, both [N, m], ordered by
    (value, column): exactly ``torch.sort(d, stable=True)`` cut to m columns, at the cost of a top-k
    (a full sort is done only for rows with a tie at the m-th value)."""
    v, c = torch.topk(d, m, dim=1, largest=False, sorted=False)
    c, by_col = c.sort(dim=1)
    v, by_val = v.gather(1, by_col).sort(dim=1, stable=True)
    c = c.gather(1, by_val)
    tied = (d <= v[:, -1:]).sum(dim=1) > m  # the m-th value recurs beyond the top m
    if tied.any():
        vs, cs = torch.sort(d[tied], dim=1, stable=True)
        v[tied], c[tied] = vs[:, :m], cs[:, :m]
    return v, c


def _sorted_reference(full: Tensor, k: int) -> Tensor:
    """b_0..b_{k+1} of every reference point [R, k + 2] (B.4 b-notation), from the reference-to-reference
    distances ``full`` [R, R]: its smallest distances to the whole reference [images; captions], itself
    included, so b_0 = 0 and b_i (i >= 1) is the i-th nearest non-self distance."""
    return torch.topk(full, k + 2, dim=1, largest=False, sorted=True).values


def _reference_lids(b: Tensor, k: int, index_mode: str) -> Tensor:
    """Reference LIDs from ``_sorted_reference``: over b_0..b_{k-1} / b_k, self included, in faithful
    mode (D2); over b_1..b_k / b_{k+1}, self excluded, in corrected mode (B.10)."""
    return _lid(b if index_mode == "faithful" else b[:, 1:], k)


def _map_nonfinite(scores: Tensor) -> Tensor:
    """NaN and +inf -> 1000, -inf -> 0 (slof.py/dao.py ``nan_to_num``; B.4, B.11.13)."""
    return torch.nan_to_num(scores, nan=NONFINITE_FILL, posinf=NONFINITE_FILL, neginf=0.0)


def _lid(srt: Tensor, k: int) -> Tensor:
    """MLE LID of each row of ascending distances: -k / sum_{i<k} ln(srt_i / srt_k + 1e-4) (B.4)."""
    return -k / torch.log(srt[:, :k] / srt[:, k:k + 1] + EPS).sum(dim=1)
