"""SafeCLIP (defense-spec-cleanclip-safeclip.md §3): the testable properties S1-S10 of the spec's
§5, the task kind's epoch plans in the trainer, bit-identity of a one-term InfoNCE task with
``clip``, and resuming a killed run in its warm-up and after its first split. The DDP properties
(the split and the banks the same on every rank) are in test_ddp.py."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from poisonbench.config import resolve
from poisonbench.defenses import safeclip_core as core
from poisonbench.defenses.base import EpochContext, TaskBatch, TrainingTask, TrainState
from poisonbench.defenses.safeclip import SafeCLIP, SafeCLIPParams
from poisonbench.losses import info_nce
from poisonbench.models import create_model
from poisonbench.preprocess import eval_geometry, normalize
from poisonbench.runner import prepare
from poisonbench.train import train


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def ce(logits):
    return F.cross_entropy(logits, torch.arange(len(logits)))


S = torch.tensor(14.0)


# --- S7, S9, S5: the losses -----------------------------------------------------------------

def test_s7_crossed_clip_loss_is_the_symmetric_clip_loss_when_the_views_coincide():
    i, t = unit(8, 16, seed=1), unit(8, 16, seed=2)
    assert torch.allclose(core.clip_loss(i, t, i, t, S), info_nce(i, t, S), atol=1e-6)
    i2, t2 = unit(8, 16, seed=3), unit(8, 16, seed=4)
    crossed = core.clip_loss(i, t, i2, t2, S)
    assert torch.allclose(crossed, 0.5 * (ce(S * i @ t2.T) + ce(S * t @ i2.T)), atol=1e-6)
    # two different matrices: not the transpose pair of either crossing
    assert abs(crossed - info_nce(i, t2, S)) > 1e-3 and abs(crossed - info_nce(i2, t, S)) > 1e-3


def test_s9_unimodal_loss_without_a_bank():
    i1, t1, i2, t2 = (unit(6, 16, seed=k) for k in range(4))
    expected = 0.5 * (ce(S * i2 @ i1.T) + ce(S * t2 @ t1.T))
    assert torch.allclose(core.unimodal_loss(i1, t1, i2, t2, S), expected, atol=1e-6)
    # one direction: rows are view 2
    assert abs(core.unimodal_loss(i1, t1, i2, t2, S) - core.unimodal_loss(i2, t2, i1, t1, S)) > 1e-4


def test_s5_with_the_bank_no_gradient_reaches_view_1():
    i1, t1, i2, t2 = (unit(6, 16, seed=k).requires_grad_(True) for k in range(4))
    scale = S.clone().requires_grad_(True)
    banks = [core.NNMemoryBank(32, seed=m) for m in range(2)]
    loss = core.unimodal_loss(i1, t1, i2, t2, scale, *banks)
    loss.backward()
    for x in (i1, t1):
        assert x.grad is None or torch.count_nonzero(x.grad) == 0
    for x in (i2, t2, scale):
        assert x.grad is not None and torch.count_nonzero(x.grad) > 0
    with pytest.raises(ValueError, match="both"):
        core.unimodal_loss(i1, t1, i2, t2, S, banks[0], None)


def test_s5_the_positive_is_the_nearest_bank_row_of_view_1():
    bank = core.NNMemoryBank(8, seed=0)
    content = unit(8, 16, seed=9)
    bank.enqueue(content)
    assert bank.ptr == 0  # exactly full: the pointer wraps
    i1, t1, i2, t2 = (unit(4, 16, seed=k) for k in range(4))
    nn = content[(i1 @ content.T).argmax(1)]
    text_bank = core.NNMemoryBank(8, seed=1)
    text_bank.enqueue(content)
    expected = 0.5 * (ce(S * i2 @ nn.T) + ce(S * t2 @ content[(t1 @ content.T).argmax(1)].T))
    assert torch.allclose(core.unimodal_loss(i1, t1, i2, t2, S, bank, text_bank), expected, atol=1e-6)


# --- S6: the memory bank --------------------------------------------------------------------

def test_s6_query_before_enqueue_never_returns_the_current_batch():
    bank = core.NNMemoryBank(64, seed=0)
    x = unit(8, 16, seed=5)
    first = bank.query(x)
    assert not any(torch.allclose(r, y) for r in first for y in x)  # the bank held only its random start
    again = bank.query(x)  # now the previous copy of x is there: each row finds itself, from before
    assert torch.allclose(again, x)


def test_s6_fifo_with_overflow_drop():
    bank = core.NNMemoryBank(5, seed=0)
    a, b = unit(3, 4, seed=1), unit(3, 4, seed=2)
    bank.enqueue(a)
    assert bank.ptr == 3 and torch.equal(bank.bank[:3], a)
    bank.enqueue(b)  # 3 + 3 >= 5: two rows written, the third dropped, the pointer back at 0
    assert bank.ptr == 0 and torch.equal(bank.bank[3:], b[:2]) and torch.equal(bank.bank[:3], a)
    assert not any(torch.equal(b[2], r) for r in bank.bank)


def test_s6_bank_start_normalized_or_as_run():
    b = core.NNMemoryBank(16, seed=0)
    b.enqueue(torch.zeros(0, 8))
    assert torch.allclose(b.bank.norm(dim=1), torch.ones(16), atol=1e-6)
    raw = core.NNMemoryBank(16, seed=0, init="as-run")
    raw.enqueue(torch.zeros(0, 8))
    assert raw.bank.norm(dim=1).mean() > 2.0  # un-normalised Gaussian rows, norm ~ sqrt(8)
    with pytest.raises(ValueError):
        core.NNMemoryBank(0, seed=0)


def tiny_task(**over) -> SafeCLIP:
    params = dataclasses.replace(SafeCLIPParams(), inmodal_warmup=1, multimodal_warmup=0, bank_size=16,
                                 warmup_steps=1, in_lr=1e-3, cross_lr=1e-3, filter_lr=1e-5, **over)
    return SafeCLIP(params, seed=0)


class SpyModel(torch.nn.Module):
    """A CLIP that records, per forward: train mode, grad mode, the token rows and the images."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []
        self.visual, self.logit_scale = model.visual, model.logit_scale

    def forward(self, x, tokens):
        self.calls.append({"training": self.training, "grad": torch.is_grad_enabled(), "tokens": tokens.clone(),
                           "images": x.detach().clone()})
        return self.model(x, tokens)


@pytest.fixture(scope="module")
def tiny_cell():
    cfg = resolve("badnet", "safeclip", "tiny", attack_params={"n_poison": 20}, epochs=3,
                  defense_params={"inmodal_warmup": 1, "multimodal_warmup": 1, "bank_size": 32},
                  dataset_params={"n_train": 256, "n_eval": 100, "n_probe": 100, "n_heldout": 50})
    return prepare(cfg)


def test_s6_s8_only_unimodal_passes_touch_the_bank_and_no_raw_caption_is_encoded(tiny_cell):
    torch.manual_seed(0)
    model, tok = create_model("poisonbench-tiny")
    spy = SpyModel(model)
    task = tiny_task()
    data = tiny_cell.plan.train
    task.prepare(list(data.captions), tok)
    rows = torch.arange(8)
    garbage = torch.full((8, 77), 7, dtype=torch.int64)  # the trainer's tokens of the raw captions: never used
    batch = TaskBatch(rows, data.images[rows], garbage, 28, torch.device("cpu"))
    before = [b.state_dict() for b in task.banks]
    task.step(spy, batch, TrainState(1, 0, group="safe"))
    assert all(b.state_dict()["bank"] is None for b in task.banks) and before[0]["bank"] is None
    task.step(spy, batch, TrainState(1, 0, group="risky"))
    assert [b.ptr for b in task.banks] == [8, 8]  # the whole (global) view-1 batch went in
    raw = tok(list(data.captions))
    for call in spy.calls:
        t = call["tokens"]
        assert torch.equal(t[:8], task.tokens[0][rows]) and torch.equal(t[8:], task.tokens[1][rows])
        assert not (t == 7).all(-1).any()  # the trainer's tokens of the raw captions never reach the encoder
    # the text views are EDA rewrites: most differ from their raw caption, and from each other
    for view in task.tokens:
        assert (view != raw).any(1).float().mean() > 0.5
    assert (task.tokens[0] != task.tokens[1]).any(1).float().mean() > 0.5


# --- S2, S3: the split ----------------------------------------------------------------------

def bimodal(n_clean=900, n_poison=100, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0.6, 0.08, n_clean), rng.normal(0.3, 0.08, n_poison)]).astype(np.float32)


def test_s3_p_clean_is_the_larger_mean_posterior_of_sklearns_two_component_mixture():
    from sklearn.mixture import GaussianMixture

    sim = bimodal()
    gmm = GaussianMixture(n_components=2, random_state=0).fit(sim.reshape(-1, 1))
    expected = gmm.predict_proba(sim.reshape(-1, 1))[:, int(np.argmax(gmm.means_))]
    p = core.clean_probability(sim)
    assert np.array_equal(p, expected)
    assert p[:900].mean() > 0.9 and p[900:].mean() < 0.1
    # fitted to the similarities it is given: the same value gets another p_clean among other values
    wide = bimodal(seed=1) * np.float32(1.5)
    assert not np.allclose(core.clean_probability(np.concatenate([sim, wide[:100]]))[:1000], p, atol=1e-3)


def test_s2_first_split_by_threshold_then_floor_of_n_times_ratio_and_a_partition():
    sim = bimodal()
    n = len(sim)
    p = core.clean_probability(sim)
    safe, risky, r = core.split(sim, None, 0.9)
    assert r == pytest.approx(np.mean(p >= 0.9)) and set(safe) == set(np.flatnonzero(p >= 0.9))
    assert len(set(safe) | set(risky)) == n and not set(safe) & set(risky)
    safe2, risky2, r2 = core.split(sim, 0.47, 0.9)
    assert r2 == 0.47 and len(safe2) == math.floor(n * 0.47)
    assert len(set(safe2) | set(risky2)) == n and not set(safe2) & set(risky2)
    # the safe pairs are the most likely clean: every safe p_clean >= every risky one
    assert p[safe2].min() >= p[risky2].max()


def test_s2_safe_fraction_grows_by_the_step_up_to_the_cap_and_shrinks_to_it():
    r, seen = 0.80, []
    for _ in range(8):
        r = core.next_ratio(r, 0.01, 0.85)
        seen.append(r)
    assert seen[:5] == pytest.approx([0.81, 0.82, 0.83, 0.84, 0.85]) and seen[-1] == 0.85
    assert core.next_ratio(0.93, 0.01, 0.85) == 0.85


def test_ties_in_p_clean_are_broken_by_similarity_then_row():
    sim = np.array([0.2, 0.5, 0.5, 0.9], dtype=np.float32)
    p = np.array([1.0, 1.0, 1.0, 0.3])
    assert core.clean_order(sim, p).tolist() == [1, 2, 0, 3]


# --- S10: the schedules ---------------------------------------------------------------------

# spec §3.7: N = 1M, 4 GPUs x 128, warm-up 1000, in/cross LR 5e-4, E = 32, iw = 5, mw = 1, r7 = 0.30
NB, WARM, LR, E, IW, MW, R7 = 1_000_000 // 512, 1000, 5e-4, 32, 5, 1, 0.30


def test_s10_as_run_schedules_reproduce_the_official_numbers():
    assert NB == 1953
    last_unimodal = core.warmup_lr(IW, NB - 1, NB, IW, MW, LR, 5e-6, WARM, "as-run")
    assert last_unimodal < 1e-8  # the 5 unimodal epochs use up the whole 6-epoch cosine
    assert core.warmup_lr(1, 0, NB, IW, MW, LR, 5e-6, WARM, "as-run") == pytest.approx(4.90e-4, rel=5e-3)  # no warm-up
    assert core.warmup_lr(6, 17, NB, IW, MW, LR, 5e-6, WARM, "as-run") == 5e-6  # the CLIP epoch: constant filter_lr
    total = core.filtering_total(NB, R7, E - IW - MW, 0.01)
    tnb = math.floor(total / (E - IW - MW))
    first = IW + MW + 1
    safe = lambda e, i=0: core.filtering_lr(e, i, tnb, first, LR, WARM, total, "as-run")  # noqa: E731
    assert safe(26) < 2e-7  # the safe cosine reaches 0 ...
    assert safe(32) == pytest.approx(6.9e-5, rel=0.02)  # ... and rises again
    assert safe(7) == pytest.approx(4.36e-4, rel=0.01)
    risky_batches = math.floor((1 - R7) * 1_000_000) // 512
    assert core.filtering_lr(7, 0, risky_batches, first, LR, WARM, total, "as-run") == pytest.approx(3.15e-4, rel=0.01)
    # the safe-pass step is train_num_batches * e + i
    assert safe(10, 5) == pytest.approx(core.cosine_lr(tnb * 10 + 5, LR, WARM, total, clamp=False))


def test_s10_intended_schedules_are_phase_relative_and_never_rise_after_warm_up():
    nb = 50
    lrs = [core.warmup_lr(e, i, nb, IW, MW, LR, 5e-6, 20, "intended") for e in range(1, IW + 1) for i in range(nb)]
    assert lrs[0] == pytest.approx(LR / 20) and max(lrs) == pytest.approx(LR, rel=1e-6)
    assert all(b <= a + 1e-15 for a, b in zip(lrs[19:], lrs[20:]))
    total = core.filtering_total(nb, R7, E - IW - MW, 0.01)
    tnb = math.floor(total / (E - IW - MW))
    safe = [core.filtering_lr(e, i, tnb, IW + MW + 1, LR, 20, total, "intended") for e in range(IW + MW + 1, E + 1)
            for i in range(tnb)]
    assert safe[0] == pytest.approx(LR / 20) and all(b <= a + 1e-15 for a, b in zip(safe[19:], safe[20:]))
    risky = [core.filtering_lr(e, i, 40, IW + MW + 1, LR, 20, total, "intended") for e in range(IW + MW + 1, E + 1)
             for i in range(40)]  # more risky batches than the total allows: the cosine stays at 0
    assert all(b <= a + 1e-15 for a, b in zip(risky[19:], risky[20:])) and risky[-1] == 0.0
    with pytest.raises(ValueError, match="schedule"):
        core.warmup_lr(1, 0, nb, IW, MW, LR, 5e-6, 20, "as-written")


# --- S1, S4: the phase map and the scoring, in the trainer ----------------------------------

class PlanSpy(SafeCLIP):
    """SafeCLIP that records every step's (epoch, group, LR) and the model's mode at scoring."""

    def __init__(self, params, seed):
        super().__init__(params, seed)
        self.steps, self.plans, self.optimizer_lrs = [], {}, []

    def plan_epoch(self, epoch, ctx):
        passes = super().plan_epoch(epoch, ctx)
        self.plans[epoch] = [(p.group, p.rows.clone()) for p in passes]
        return passes

    def step(self, model, batch, state):
        self.steps.append((state.epoch, state.group, len(batch.rows)))
        return super().step(model, batch, state)


def test_s1_s4_phase_map_learning_rates_and_scoring_in_the_trainer(tiny_cell, monkeypatch):
    cfg = tiny_cell.cfg
    params = SafeCLIPParams(**cfg.defense_params)
    task = PlanSpy(params, seed=0)
    torch.manual_seed(0)
    model, tok = create_model(cfg.model)
    data = tiny_cell.plan.train
    n, bs = len(data), cfg.batch_size
    lrs = []
    step_fn = torch.optim.AdamW.step

    def record_lr(self, *a, **k):
        lrs.append(self.param_groups[0]["lr"])
        return step_fn(self, *a, **k)

    scored = []
    similarities = SafeCLIP.similarities

    def spy_similarities(self, ctx, epoch):
        scored.append({"training": ctx.model.training, "step": ctx.step})
        out = similarities(self, ctx, epoch)
        scored[-1]["training_after"] = ctx.model.training
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", record_lr)
    monkeypatch.setattr(SafeCLIP, "similarities", spy_similarities)
    train(model, tok, data, task, cfg, torch.device("cpu"), progress=False)

    by_epoch = {e: [(g, k) for ep, g, k in task.steps if ep == e] for e in (1, 2, 3)}
    assert by_epoch[1] == [("unimodal", bs)] * (n // bs)  # epoch <= iw: unimodal on all N
    assert by_epoch[2] == [("clip", bs)] * (n // bs)  # iw < epoch <= iw + mw: CLIP on all N ...
    assert lrs[n // bs:2 * (n // bs)] == [params.filter_lr] * (n // bs)  # ... at filter_lr at every step
    (g1, risky), (g2, safe) = task.plans[3]
    assert (g1, g2) == ("risky", "safe")  # one unimodal pass over risky, then one CLIP pass over safe
    assert by_epoch[3] == [("risky", bs)] * (len(risky) // bs) + [("safe", bs)] * (len(safe) // bs)
    assert sorted(torch.cat([risky, safe]).tolist()) == list(range(n))
    assert scored == [{"training": True, "step": 2 * (n // bs), "training_after": False}]
    assert task.metrics()["filter_epoch"] == [3]


def test_s4_scores_come_from_eval_mode_no_grad_view_1_and_the_eda_caption(tiny_cell):
    torch.manual_seed(0)
    model, tok = create_model("poisonbench-tiny")
    spy = SpyModel(model).train()
    task = tiny_task(score_batch=100)
    data = tiny_cell.plan.train
    task.prepare(list(data.captions), tok)
    ctx = EpochContext(spy, data, 3, len(data) // 64, 0, 28, torch.device("cpu"))
    sim = task.similarities(ctx, 2)
    assert sim.dtype == np.float32 and sim.shape == (len(data),)
    assert all(not c["training"] and not c["grad"] for c in spy.calls)
    assert torch.equal(torch.cat([c["tokens"] for c in spy.calls]), task.tokens[0])
    raw = normalize(eval_geometry(data.images[:100], 28))
    assert not torch.allclose(spy.calls[0]["images"], raw)  # an augmented view, not the raw image
    assert np.array_equal(task.similarities(EpochContext(spy, data, 3, 4, 0, 28, torch.device("cpu")), 2), sim)
    assert not np.array_equal(task.similarities(ctx, 3), sim)  # a fresh view each epoch
    with torch.no_grad():
        img, txt, _ = model(normalize(eval_geometry(data.images[:100], 28)), tok(list(data.captions[:100])))
    assert not np.allclose(F.cosine_similarity(img, txt).numpy(), sim[:100])


# --- the task kind: bit-identity with clip, resume ------------------------------------------

class OneTermInfoNCE(TrainingTask):
    """CLIP as a task: the same forward and InfoNCE, one loss term."""

    @dataclasses.dataclass
    class Params:
        pass

    name = "one-term"

    def step(self, model, batch, state):
        x = normalize(eval_geometry(batch.images, batch.image_size).to(batch.device))
        img, txt, scale = model(x, batch.tokens.to(batch.device))
        return {"clip": info_nce(img.float(), txt.float(), scale.float())}


def test_a_one_term_infonce_task_trains_bit_identically_to_clip():
    cfg = resolve("badnet", "clip", "tiny", attack_params={"n_poison": 20}, epochs=2,
                  dataset_params={"n_train": 256, "n_eval": 100, "n_probe": 100, "n_heldout": 50})
    cell = prepare(cfg)
    states = []
    for defense in (cell.defense, OneTermInfoNCE(OneTermInfoNCE.Params(), 0)):
        torch.manual_seed(0)
        model, tok = create_model(cfg.model)
        result = train(model, tok, cell.plan.train, defense, cfg, torch.device("cpu"), progress=False)
        states.append((model.state_dict(), result.final_loss, result.steps))
    (a, loss_a, steps_a), (b, loss_b, steps_b) = states
    assert steps_a == steps_b and loss_a == loss_b
    for k in a:
        assert torch.equal(a[k], b[k]), k


class Killed(RuntimeError):
    pass


@pytest.mark.slow
def test_killed_in_the_warm_up_and_after_the_first_split_it_resumes_to_the_same_numbers(tiny_cell, tmp_path):
    cfg = tiny_cell.cfg  # epochs 3: 1 unimodal warm-up, 1 CLIP warm-up, then the first split
    cfg = dataclasses.replace(cfg, epochs=4)
    data = tiny_cell.plan.train

    def run(checkpoint, kill_after=None):
        task = SafeCLIP(SafeCLIPParams(**cfg.defense_params), seed=0)
        torch.manual_seed(0)
        model, tok = create_model(cfg.model)

        def hook(epoch, _model):
            if epoch == kill_after:
                raise Killed

        result = train(model, tok, data, task, cfg, torch.device("cpu"), checkpoint, progress=False, on_epoch_end=hook)
        return model.state_dict(), task.metrics(), result

    straight, metrics, result = run(tmp_path / "a.pt")
    assert metrics["filter_epoch"] == [3, 4]
    for kill in (1, 3):  # in the unimodal warm-up; after the first split
        with pytest.raises(Killed):
            run(tmp_path / "b.pt", kill_after=kill)
    resumed, metrics_b, result_b = run(tmp_path / "b.pt")
    assert result_b.resumed_from_epoch == 3 and result_b.steps == result.steps
    assert metrics_b == metrics and result_b.loss_terms == result.loss_terms
    for k, v in straight.items():
        assert torch.equal(resumed[k], v), k


# --- parameters -----------------------------------------------------------------------------

def test_bad_parameters_and_a_warm_up_longer_than_the_run_are_refused():
    with pytest.raises(ValueError, match="threshold"):
        SafeCLIP(dataclasses.replace(SafeCLIPParams(), threshold=1.0), 0)
    with pytest.raises(ValueError, match="in_lr"):
        SafeCLIP(dataclasses.replace(SafeCLIPParams(), in_lr=0.0), 0)
    cfg = resolve("badnet", "safeclip", "tiny", defense_params={"inmodal_warmup": 2}, epochs=2)
    with pytest.raises(Exception, match="no filtering epoch"):
        prepare(cfg)
