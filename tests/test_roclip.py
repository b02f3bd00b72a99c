import pytest
import torch
import torch.nn.functional as F

from poisonbench.defenses.base import TrainState
from poisonbench.defenses.roclip import CaptionPool, RoCLIP, RoCLIPParams
from poisonbench.registry import DEFENSES


def pool_of(embed):
    """A TrainState.encode_captions of ``embed`` (n -> [n, D]) whose rows are unknown (-1)."""
    return lambda n, with_rows=False: (embed(n), torch.full((n,), -1)) if with_rows else embed(n)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=-1)


def reference_matching_loss(images, pool, scale):
    """RoCLIP's matching-epoch loss written out directly (docs/roclip-spec.md §1.6)."""
    b = images.shape[0]
    nn_rows = []
    for i in range(b):
        sims = [float(images[i] @ p) / (images[i].norm() * p.norm()) for p in pool]
        nn_rows.append(pool[max(range(len(pool)), key=lambda j: sims[j])])
    t_nn = torch.stack(nn_rows)
    a = scale * t_nn @ images.T  # row j: NN caption of image j; column k: image k
    total = 0.0
    for i in range(b):
        total += -(a[i, i] - torch.logsumexp(a[i], 0))  # caption -> image
        total += -(a[i, i] - torch.logsumexp(a[:, i], 0))  # image -> caption
    return total / (2 * b)


def reference_clip_loss(images, texts, scale):
    logits = scale * images @ texts.T
    b = logits.shape[0]
    return sum(-(logits[i, i] - torch.logsumexp(logits[i], 0)) - (logits[i, i] - torch.logsumexp(logits[:, i], 0))
               for i in range(b)) / (2 * b)


def make(pool_size=16, k=2, **kw):
    return RoCLIP(RoCLIPParams(pool_size=pool_size, match_every=k, **kw), seed=0)


def test_matching_loss_equals_reference():
    d = make(pool_size=16)
    pool = unit(16, 8, seed=1)
    d.start_epoch(TrainState(2, 0, encode_captions=pool_of(lambda n: pool[:n])))
    images, texts, scale = unit(6, 8, seed=2), unit(6, 8, seed=3), torch.tensor(20.0, dtype=torch.float64)
    loss = d.loss(images, texts, scale, TrainState(2, 0))
    assert loss.item() == pytest.approx(reference_matching_loss(images, pool, 20.0).item(), rel=1e-10)


def test_plain_clip_loss_on_other_epochs_and_epoch_one_is_never_matching():
    d = make(k=3)
    assert [e for e in range(1, 10) if d.is_matching_epoch(e)] == [3, 6, 9]
    images, texts = unit(5, 8, seed=4), unit(5, 8, seed=5)
    loss = d.loss(images, texts, torch.tensor(10.0, dtype=torch.float64), TrainState(1, 0))
    assert loss.item() == pytest.approx(reference_clip_loss(images, texts, 10.0).item(), rel=1e-10)
    assert d.pool is None  # the official code's pool only changes on matching epochs


def test_image_never_matched_to_its_own_current_batch_caption():
    d = make(pool_size=32)
    d.start_epoch(TrainState(2, 0, encode_captions=pool_of(lambda n: unit(n, 8, seed=6))))
    images = unit(4, 8, seed=7)
    texts = images.clone()  # each caption is the perfect match of its own image
    pool_before = d.pool.contents().clone()
    seen = {}
    original = d.pool.nearest_index

    def spy(q):
        index = original(q)
        seen["matched"] = d.pool.bank[index].clone()
        return index

    d.pool.nearest_index = spy
    loss = d.loss(images, texts, torch.tensor(10.0, dtype=torch.float64), TrainState(2, 0))
    for row in seen["matched"]:
        assert any(torch.equal(row, p) for p in pool_before)
        assert not any(torch.equal(row, t) for t in texts)
    assert loss.item() == pytest.approx(reference_matching_loss(images, pool_before, 10.0).item(), rel=1e-10)
    assert torch.equal(d.pool.contents()[-4:], texts)  # enqueued after the query


def test_matching_loss_sends_no_gradient_to_text_embeddings():
    d = make(pool_size=8)
    d.start_epoch(TrainState(2, 0, encode_captions=pool_of(lambda n: unit(n, 4, seed=8).float())))
    images = unit(3, 4, seed=9).float().requires_grad_()
    texts = unit(3, 4, seed=10).float().requires_grad_()
    d.loss(images, texts, torch.tensor(5.0), TrainState(2, 0)).backward()
    assert texts.grad is not None and torch.count_nonzero(texts.grad) == 0  # in the graph, zero gradient
    assert torch.count_nonzero(images.grad) > 0


def test_pool_fifo_order_and_size():
    pool = CaptionPool(size=4, dim=1)
    rows = lambda *v: torch.tensor(v, dtype=torch.float32).view(-1, 1)  # noqa: E731
    pool.enqueue(rows(1, 2, 3))
    assert pool.count == 3 and pool.contents().view(-1).tolist() == [1, 2, 3]
    pool.enqueue(rows(4, 5))
    assert pool.count == 4 and pool.contents().view(-1).tolist() == [2, 3, 4, 5]  # oldest dropped first
    pool.enqueue(rows(6, 7, 8, 9, 10, 11))
    assert pool.contents().view(-1).tolist() == [8, 9, 10, 11]  # a batch larger than the pool keeps its tail
    state = pool.state_dict()
    other = CaptionPool(1, 1)
    other.load_state_dict(state)
    assert other.contents().view(-1).tolist() == [8, 9, 10, 11] and other.ptr == pool.ptr


def test_pool_prefilled_before_first_matching_epoch_and_checkpointed():
    d = make(pool_size=10)
    asked = []
    enc = pool_of(lambda n: asked.append(n) or unit(n, 4, seed=11))
    d.start_epoch(TrainState(1, 0, enc))
    assert asked == [] and d.pool is None
    d.start_epoch(TrainState(2, 0, enc))
    assert asked == [10] and d.pool.count == 10
    clone = make(pool_size=10)
    clone.load_state_dict(d.state_dict())
    assert torch.equal(clone.pool.contents(), d.pool.contents())


def test_bad_parameters():
    with pytest.raises(ValueError, match="match_every"):
        make(k=0)
    with pytest.raises(ValueError, match="pool_update: choose one of matching, always"):  # by the registry
        DEFENSES.params("roclip", {"pool_update": "sometimes"})
    with pytest.raises(RuntimeError, match="empty"):
        CaptionPool(3, 2).nearest(torch.ones(1, 2))
