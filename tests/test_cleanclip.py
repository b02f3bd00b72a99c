"""CleanCLIP's testable properties C1-C10 (defense-spec-cleanclip-safeclip.md §5) on
defenses/cleanclip_core.py; the plugin (defenses/cleanclip.py) and the trainer's generic task hooks
it uses; and tiny cells end to end (issue 14 item 6): the cell fine-tunes the cached undefended
model from its AdamW state, trains the undefended model once, resumes after a kill with the same
numbers, and its fine-tuning split holds no poisoned image (C10)."""
import copy
import datetime
import os
import socket

import pytest
from train_spy import Trainings
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from poisonbench import distributed
from poisonbench.defenses import cleanclip_core as cc
from poisonbench.defenses.base import TrainingTask
from poisonbench.losses import info_nce
from poisonbench.preprocess import eval_geometry, normalize


def param_groups(model, weight_decay):
    from poisonbench.train import param_groups  # imported here: the DDP test's processes need not load open_clip

    return param_groups(model, weight_decay)


def trainer_lr_lambda(warmup, total):
    from poisonbench.train import lr_lambda

    return lr_lambda(warmup, total)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def four(n=6, d=8, seed=0):
    """Four raw (un-normalised) embedding sets [n, d]: I, T, Ĩ, T̃."""
    return tuple(rand(n, d, seed=seed + k) * (1 + k) for k in range(4))


def ce_rows(logits):
    """Mean over rows of -log softmax(row)[i] at its own index i, written out."""
    n = logits.shape[0]
    return sum(-(logits[i, i] - torch.logsumexp(logits[i], 0)) for i in range(n)) / n


def unit(x):
    return x / x.norm(dim=1, keepdim=True)


S = torch.tensor(14.3, dtype=torch.float64)


# --- C1-C5: the loss -------------------------------------------------------------------------

def test_c1_without_the_inmodal_term_the_loss_is_the_symmetric_clip_loss():
    i, t, ia, ta = four()
    out = cc.cleanclip_losses(i, t, ia, ta, S, clip_weight=1.0, inmodal_weight=0.0)
    assert out["inmodal"].item() == 0.0
    ref = (ce_rows(S * unit(i) @ unit(t).T) + ce_rows(S * unit(t) @ unit(i).T)) / 2
    torch.testing.assert_close(out["clip"], ref)
    torch.testing.assert_close(out["clip"], info_nce(unit(i), unit(t), S))


def test_c1_the_joint_two_view_forward_gives_the_original_half_its_own_embeddings():
    """C1's proviso: with a LayerNorm model the original half of the 2B forward equals a forward
    of the original batch alone, so the clip term is the CLIP loss of (original image, caption)."""
    from poisonbench.models import create_model, image_size

    torch.manual_seed(0)
    model, tokenizer = create_model("poisonbench-tiny")
    model.train()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 36, 40), generator=g, dtype=torch.uint8)  # stored size != model size
    caps = ["a photo of a cat", "a dog", "a red bag on a table", "a shoe"]
    tokens, tokens_aug = tokenizer(caps), tokenizer(cc.text_views(caps, 0))
    size = image_size(model)
    i, t, ia, ta, s = cc.two_view_forward(model, images, tokens, tokens_aug, size, torch.device("cpu"))
    assert i.shape == ia.shape == (4, t.shape[1])
    i_alone, t_alone, s_alone = model(normalize(eval_geometry(images, size)), tokens)
    torch.testing.assert_close(i, i_alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(t, t_alone, atol=1e-5, rtol=1e-5)
    loss = cc.cleanclip_losses(i, t, ia, ta, s, 1.0, 0.0)["clip"]
    torch.testing.assert_close(loss, info_nce(i_alone, t_alone, s_alone), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ia, i, atol=1e-3)  # the second half is another view


def test_c2_without_the_clip_term_the_loss_is_the_one_way_inmodal_loss():
    i, t, ia, ta = four()
    out = cc.cleanclip_losses(i, t, ia, ta, S, clip_weight=0.0, inmodal_weight=1.0)
    assert out["clip"].item() == 0.0
    ref = (ce_rows(S * unit(i) @ unit(ia).T) + ce_rows(S * unit(t) @ unit(ta).T)) / 2  # rows original, columns augmented
    torch.testing.assert_close(out["inmodal"], ref)
    both = cc.cleanclip_losses(i, t, ia, ta, S, clip_weight=0.5, inmodal_weight=2.0)  # weights scale the terms, which sum
    torch.testing.assert_close(both["inmodal"], 2.0 * ref)
    torch.testing.assert_close(both["clip"], 0.5 * cc.cleanclip_losses(i, t, ia, ta, S, 1.0, 0.0)["clip"])


def test_c3_the_inmodal_term_is_asymmetric_and_n_by_n():
    i, t, ia, ta = four()
    out = cc.cleanclip_losses(i, t, ia, ta, S, 0.0, 1.0)["inmodal"]
    swapped = cc.cleanclip_losses(ia, t, i, ta, S, 0.0, 1.0)["inmodal"]
    assert abs(out.item() - swapped.item()) > 1e-3
    # SimCLR's NT-Xent: 2N x 2N, both directions, same-view negatives; not what CleanCLIP computes
    z = torch.cat([unit(i), unit(ia)])
    logits = S * z @ z.T - torch.eye(12, dtype=z.dtype) * 1e9
    n = 6
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    ntxent_img = F.cross_entropy(logits, target)
    assert abs(ce_rows(S * unit(i) @ unit(ia).T).item() - ntxent_img.item()) > 1e-3


def test_c4_positive_rescaling_of_any_feature_row_changes_nothing():
    i, t, ia, ta = four()
    ref = cc.cleanclip_losses(i, t, ia, ta, S)
    c = torch.rand(4, 6, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 10 + 0.01
    out = cc.cleanclip_losses(i * c[0], t * c[1], ia * c[2], ta * c[3], S)
    for k in ("clip", "inmodal"):
        torch.testing.assert_close(out[k], ref[k])


def test_c5_one_learnable_scale_multiplies_all_four_logit_matrices():
    i, t, ia, ta = four()
    s = S.clone().requires_grad_(True)
    out = cc.cleanclip_losses(i, t, ia, ta, s)
    (g_clip,) = torch.autograd.grad(out["clip"], s, retain_graph=True)
    (g_ss,) = torch.autograd.grad(out["inmodal"], s)
    assert g_clip.abs() > 1e-6 and g_ss.abs() > 1e-6  # both terms train the one temperature
    # the same s in every matrix: the total equals the written-out loss with s everywhere
    s2 = torch.tensor(3.7, dtype=torch.float64)
    out2 = cc.cleanclip_losses(i, t, ia, ta, s2)
    ref = ((ce_rows(s2 * unit(i) @ unit(t).T) + ce_rows(s2 * unit(t) @ unit(i).T)) / 2
           + (ce_rows(s2 * unit(i) @ unit(ia).T) + ce_rows(s2 * unit(t) @ unit(ta).T)) / 2)
    torch.testing.assert_close(out2["clip"] + out2["inmodal"], ref)


def test_c5_the_trainer_clamps_logit_scale_to_the_official_bound():
    """The clamp after every optimizer step is the trainer's (shared by every defense kind); its
    bound is the official 4.6052 = ln 100 (spec §2.3)."""
    from poisonbench.train import MAX_LOGIT_SCALE

    assert MAX_LOGIT_SCALE == pytest.approx(4.6052, abs=1e-4)


def test_the_loss_refuses_mismatched_inputs_and_negative_weights():
    i, t, ia, ta = four()
    with pytest.raises(ValueError, match="one shape"):
        cc.cleanclip_losses(i, t, ia[:5], ta, S)
    with pytest.raises(ValueError, match=">= 0"):
        cc.cleanclip_losses(i, t, ia, ta, S, inmodal_weight=-1.0)


# --- C6: DDP -------------------------------------------------------------------------------

WORLD, B = 2, 3


def _ddp_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(minutes=2))
    try:
        result = {}
        for gather in (True, False):  # False: the control without the gather, which must differ
            if not gather:
                distributed.gather_with_grad = lambda a, b: (a, b)
            local = [x[rank * B:(rank + 1) * B].clone().requires_grad_(True) for x in four(WORLD * B)]
            terms = cc.cleanclip_losses(*local, S)
            (terms["clip"] + terms["inmodal"]).backward()
            result[gather] = {k: v.item() for k, v in terms.items()} | {"grads": [x.grad for x in local]}
        torch.save(result, out / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_c6_every_rank_computes_the_one_process_loss_of_the_concatenated_batch(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, tmp_path), nprocs=WORLD, join=True)
    full = [x.clone().requires_grad_(True) for x in four(WORLD * B)]
    ref = cc.cleanclip_losses(*full, S)
    (ref["clip"] + ref["inmodal"]).backward()
    for rank in range(WORLD):
        r = torch.load(tmp_path / f"{rank}.pt")
        for k in ("clip", "inmodal"):
            assert r[True][k] == pytest.approx(ref[k].item(), abs=1e-10), (rank, k)
            assert abs(r[False][k] - ref[k].item()) > 1e-3, (rank, k)
        # gather_with_grad: each rank's rows get W x the gradient of the common loss, which
        # DistributedDataParallel's average over ranks turns into the one-process gradient
        # (the official no-grad gather gives 1 x, i.e. the full-batch gradient / W after DDP)
        for x, g in zip(full, r[True]["grads"]):
            torch.testing.assert_close(g, WORLD * x.grad[rank * B:(rank + 1) * B])


# --- C7: the views -------------------------------------------------------------------------

CAPTIONS = [f"a photo of a {w} lying on the {v} next to a small {u}"
            for w, v, u in zip(["cat", "dog", "bag", "shoe", "shirt", "coat"] * 3, ["floor", "table", "grass"] * 6,
                               ["box", "lamp", "chair"] * 6)]


def test_c7_the_eda_caption_is_fixed_given_the_seed():
    a, b = cc.text_views(CAPTIONS, 1), cc.text_views(CAPTIONS, 1)
    assert a == b and len(a) == len(CAPTIONS)
    assert a != CAPTIONS  # rewritten
    assert cc.text_views(CAPTIONS, 2) != a  # the seed decides which rewrite
    ref = __import__("poisonbench.augment", fromlist=["eda_captions"]).eda_captions(CAPTIONS, 1, alpha=0.1)
    assert a == ref  # CleanCLIP's alpha 0.1 for all four operations


def test_c7_the_autoaugment_view_is_fresh_per_load_and_per_image_and_follows_the_global_rng():
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 256, (1, 3, 40, 36), generator=g, dtype=torch.uint8)
    batch = img.repeat(16, 1, 1, 1)
    torch.manual_seed(5)
    v1 = cc.autoaugment_view(batch, 32)
    v2 = cc.autoaugment_view(batch, 32)
    assert v1.shape == (16, 3, 32, 32) and v1.dtype == torch.uint8
    assert not torch.equal(v1, v2)  # two loads of the same images differ
    assert len({tuple(v.flatten().tolist()) for v in v1}) > 4  # a fresh draw per image, not per batch
    torch.manual_seed(5)
    assert torch.equal(cc.autoaugment_view(batch, 32), v1)  # seeded by torch's global RNG (resume repeats it)
    state = torch.get_rng_state()
    assert torch.equal(cc.autoaugment_view(batch, 32, seed=9), cc.autoaugment_view(batch, 32, seed=9))
    assert torch.equal(torch.get_rng_state(), state)  # an explicit seed leaves the global RNG alone
    with pytest.raises(ValueError, match="uint8"):
        cc.autoaugment_view(batch.float(), 32)


def test_c7_the_original_view_is_the_deterministic_eval_geometry():
    img = torch.randint(0, 256, (2, 3, 40, 36), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    torch.manual_seed(0)
    a = cc.original_view(img, 32)
    torch.manual_seed(1)
    assert torch.equal(a, cc.original_view(img, 32)) and torch.equal(a, eval_geometry(img, 32))


# --- C8: the schedule ------------------------------------------------------------------------

NB, EPOCHS, WARMUP, LR = 100_000 // 64, 10, 50, 1e-5  # the README recipe on 100K pairs: 1562 batches


def lrs(schedule):
    return [LR * cc.lr_multiplier(s, WARMUP, NB, EPOCHS, schedule) for s in range(NB * EPOCHS)]


def test_c8_as_run_schedule_skips_the_warmup_and_passes_pi_in_the_last_epoch():
    lr = lrs("as-run")
    assert lr[0] == pytest.approx(9.77e-6, rel=1e-3)
    assert max(lr) < 1e-5
    last = lr[(EPOCHS - 1) * NB:]
    assert last[0] == pytest.approx(0.0, abs=1e-12)
    assert last[-1] == pytest.approx(2.46e-7, rel=1e-2)
    assert all(b > a for a, b in zip(last, last[1:]))  # it rises again from 0


def test_c8_intended_schedule_warms_up_peaks_and_ends_near_zero():
    lr = lrs("intended")
    assert lr[0] == pytest.approx(2e-7)
    assert lr[WARMUP - 1] == pytest.approx(1e-5) and max(lr) == pytest.approx(1e-5)
    assert lr[-1] < 1e-12  # ≈ 0
    f = trainer_lr_lambda(WARMUP, NB * EPOCHS)  # the same as the trainer's own schedule
    g = cc.lr_lambda(WARMUP, NB, EPOCHS, "intended")
    assert all(f(s) == g(s) for s in range(0, NB * EPOCHS + 10, 7))


def test_c8_schedule_is_a_lambdalr_function_and_refuses_unknown_modes():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cc.lr_lambda(WARMUP, NB, EPOCHS, "as-run"))
    assert opt.param_groups[0]["lr"] == pytest.approx(9.77e-6, rel=1e-3)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(LR * cc.lr_multiplier(1, WARMUP, NB, EPOCHS, "as-run"))
    with pytest.raises(ValueError, match="as-run"):
        cc.lr_lambda(WARMUP, NB, EPOCHS, "as_run")


# --- C9: the restored optimizer state --------------------------------------------------------

def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


def batch_loss(model, k):
    g = torch.Generator().manual_seed(100 + k)
    return model(torch.randn(16, 5, generator=g)).pow(2).mean()


def pretrained():
    """A model after 20 AdamW steps at lr 1e-3 with its LambdaLR, and the optimizer's state_dict."""
    model = small_model()
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, trainer_lr_lambda(2, 20))
    for k in range(20):
        opt.zero_grad()
        batch_loss(model, k).backward()
        opt.step()
        sched.step()
    return model, opt.state_dict()


def first_update(model, opt):
    opt.zero_grad()
    batch_loss(model, 99).backward()
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


PHASE_LR = 1e-5


def official_first_update(model0, state):
    """[CC] src/main.py:133 and src/scheduler.py: AdamW built with the fine-tuning lr, the
    checkpoint's optimizer state loaded, then the scheduler assigns the LR of the step."""
    model = copy.deepcopy(model0)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=PHASE_LR, betas=(0.9, 0.999), eps=1e-8)
    opt.load_state_dict(copy.deepcopy(state))  # read from the checkpoint file
    for group in opt.param_groups:
        group["lr"] = PHASE_LR * cc.lr_multiplier(0, 1, 5, 2, "intended")
    return first_update(model, opt)


def phase_first_update(model0, state):
    model = copy.deepcopy(model0)
    opt = cc.phase_optimizer(param_groups(model, 0.1), PHASE_LR, state)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cc.lr_lambda(1, 5, 2, "intended"))
    assert all(g["lr"] == PHASE_LR for g in opt.param_groups) and sched.base_lrs == [PHASE_LR] * 2
    return first_update(model, opt)


def test_c9_restoring_the_optimizer_state_reproduces_the_official_first_update():
    model0, state = pretrained()
    ref = official_first_update(model0, state)
    before = copy.deepcopy(state)
    restored = phase_first_update(model0, state)
    for k, v in before["state"].items():  # the caller's state is left as it was
        assert all(torch.equal(v[n], state["state"][k][n]) for n in v)
    fresh = phase_first_update(model0, None)
    for a, b in zip(restored, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert max((a - b).abs().max().item() for a, b in zip(fresh, ref)) > 1e-6  # a fresh AdamW does not


def test_c9_restored_groups_keep_the_phase_hyperparameters_not_the_pretraining_lr():
    model0, state = pretrained()
    opt = cc.phase_optimizer(param_groups(copy.deepcopy(model0), 0.05), PHASE_LR, state)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.05]
    assert all("initial_lr" not in g and g["lr"] == PHASE_LR for g in opt.param_groups)
    assert all(int(s["step"]) == 20 for s in opt.state.values())  # pre-training moments and step counts


def test_c9_a_state_of_another_model_is_refused_with_what_to_do():
    _, state = pretrained()
    other = torch.nn.Linear(5, 3)
    with pytest.raises(ValueError, match="restore_optimizer=False"):
        cc.phase_optimizer([{"params": [other.weight], "weight_decay": 0.1}], PHASE_LR, state)


# --- the plugin's hooks and the trainer's generic task hooks --------------------------------

def cleanclip_params(**kw):
    from poisonbench.defenses.cleanclip import CleanCLIPParams

    return CleanCLIPParams(**kw)


def test_the_task_restores_the_optimizer_state_only_when_asked_and_when_there_is_one():
    from poisonbench.defenses.cleanclip import CleanCLIPTask

    model0, state = pretrained()

    def started(restore, cached):
        task = CleanCLIPTask(cleanclip_params(restore_optimizer=restore), 0)
        opt = torch.optim.AdamW(param_groups(copy.deepcopy(model0), 0.1), lr=PHASE_LR)
        task.start_optimizer(opt, cached)
        return task, opt

    task, opt = started(True, state)
    assert task.metrics() == {"restored_optimizer": 1} and len(opt.state) == len(state["state"])
    assert all(int(s["step"]) == 20 for s in opt.state.values())
    task, opt = started(False, state)
    assert task.metrics() == {"restored_optimizer": 0} and len(opt.state) == 0  # a fresh AdamW
    with pytest.warns(UserWarning, match="no optimizer state"):
        task, opt = started(True, None)  # a cache written before the optimizer state was stored
    assert task.metrics() == {"restored_optimizer": 0} and len(opt.state) == 0
    resumed = CleanCLIPTask(cleanclip_params(), 0)
    resumed.load_state_dict(started(True, state)[0].state_dict())  # the checkpoint carries the flag
    assert resumed.metrics() == {"restored_optimizer": 1}


def test_the_task_gives_the_trainer_its_schedule_mode():
    from poisonbench.defenses.cleanclip import CleanCLIPTask

    for mode in ("intended", "as-run"):
        f = CleanCLIPTask(cleanclip_params(schedule=mode), 0).lr_lambda(3, 5, 2)
        assert [f(s) for s in range(10)] == [cc.lr_multiplier(s, 3, 5, 2, mode) for s in range(10)]


def test_the_repair_refuses_bad_recipes_and_names_its_phase():
    from poisonbench.config import resolve
    from poisonbench.defenses.cleanclip import CleanCLIP

    phase = CleanCLIP(cleanclip_params(), 0).phase(resolve("badnet", "cleanclip", "paper", 0,
                                                           dataset_params={"train": "csv:x.csv"}))
    assert (phase.epochs, phase.batch_size, phase.lr, phase.warmup_steps, phase.weight_decay) == (10, 64, 1e-5, 50, 0.1)
    assert phase.name == "finetune"
    with pytest.raises(ValueError, match="not both 0"):
        CleanCLIP(cleanclip_params(clip_weight=0.0, inmodal_weight=0.0), 0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        CleanCLIP(cleanclip_params(lr=0.0), 0)


class HookSpy(TrainingTask):
    """A task (plain CLIP's loss) whose ``lr_lambda`` gives ``schedule`` and whose
    ``start_optimizer`` records (the optimizer's number of parameter states, the state it got)."""

    name = "hook-spy"

    def __init__(self, schedule=None):
        super().__init__(None, 0)
        self.schedule, self.started = schedule, []

    def step(self, model, batch, state):
        x = normalize(eval_geometry(batch.images, batch.image_size).to(batch.device))
        return {"clip": info_nce(*model(x, batch.tokens.to(batch.device)))}

    def lr_lambda(self, warmup_steps, steps_per_epoch, epochs):
        return self.schedule

    def start_optimizer(self, optimizer, cached_state):
        self.started.append((len(optimizer.state), cached_state))


def test_the_trainer_takes_a_task_schedule_and_starts_its_fresh_optimizer_once(tmp_path):
    """The generic hooks of ``TrainingTask``: ``lr_lambda`` replaces the trainer's schedule (a
    schedule of 0 leaves every weight as it was), ``start_optimizer`` gets the fresh AdamW and
    the given state once, and not when the phase resumes from its own checkpoint."""
    from poisonbench.config import resolve
    from poisonbench.datasets.base import CaptionDataset
    from poisonbench.defenses.base import PhaseSettings
    from poisonbench.models import create_model
    from poisonbench.train import train

    cfg = resolve("badnet", "clip", "tiny", 0)
    g = torch.Generator().manual_seed(0)
    data = CaptionDataset(torch.randint(0, 256, (32, 3, 28, 28), generator=g, dtype=torch.uint8),
                          [f"a photo of a thing number {i}" for i in range(32)], torch.zeros(32, dtype=torch.long))
    phase = PhaseSettings("finetune", epochs=1, lr=1e-2, batch_size=16, warmup_steps=0, weight_decay=0.1)
    torch.manual_seed(0)
    model, tokenizer = create_model(cfg.model)
    before = copy.deepcopy(model.state_dict())
    cached = {"marker": torch.ones(1)}
    spy = HookSpy(lambda step: 0.0)
    ckpt = tmp_path / "last.pt"
    result = train(model, tokenizer, data, spy, cfg, torch.device("cpu"), ckpt, False, phase=phase,
                   optimizer_state=cached, keep_optimizer_state=True)
    assert result.steps == 2 and spy.started == [(0, cached)]  # once, on the fresh AdamW, with the given state
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # lr 0 at every step
    assert {int(s["step"]) for s in result.optimizer_state["state"].values()} == {2}  # the final AdamW's state
    spy.started.clear()
    train(model, tokenizer, data, spy, cfg, torch.device("cpu"), ckpt, False, phase=phase, optimizer_state=cached)
    assert spy.started == []  # resumed from the phase's checkpoint: its own optimizer state, no new start
    default = HookSpy(None)  # no schedule of its own: the trainer's, and the weights move
    train(model, tokenizer, data, default, cfg, torch.device("cpu"), None, False, phase=phase)
    assert default.started == [(0, None)]
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- end to end on tiny: the cell through the runner ----------------------------------------

E2E_ATTACK = {"n_poison": 20}
E2E_EVAL = {"n_eval": 100, "n_probe": 100, "n_heldout": 50}  # the tiny profile's training data, a smaller evaluation
E2E_METRICS = ["clean_top1", "clean_top5", "asr", "final_loss", "final_loss_clip", "final_loss_inmodal", "steps",
               "linear_probe_top1", "i2t_r1", "t2i_r10", "d_restored_optimizer"]


@pytest.fixture(scope="module")
def tiny_bundle():
    """The clean tiny Fashion-MNIST bundle of seed 0 (E2E_EVAL), loaded once."""
    from poisonbench.config import resolve
    from poisonbench.registry import DATASETS

    cfg = resolve("badnet", "clip", "tiny", 0, dataset_params=E2E_EVAL)
    ds = DATASETS.get(cfg.dataset)
    return ds(ds.Params(**cfg.dataset_params)).load(0)


def e2e_cell(defense, bundle):
    """A tiny badnet cell of ``defense`` (the undefended model trained 1 epoch; cleanclip's
    fine-tuning as the tiny profile scales it: 2 epochs at batch 16)."""
    from poisonbench import runner
    from poisonbench.config import resolve

    return runner.prepare(resolve("badnet", defense, "tiny", 0, E2E_ATTACK, dataset_params=E2E_EVAL, epochs=1), "cpu",
                          data=bundle)


@pytest.fixture(scope="module")
def after_clip(tiny_bundle, tmp_path_factory):
    """One store: the clip cell, then the cleanclip cell of the same attack x seed (counted)."""
    from poisonbench import runner

    results = tmp_path_factory.mktemp("cleanclip_e2e")
    with pytest.MonkeyPatch.context() as mp:
        clip = e2e_cell("clip", tiny_bundle)
        count = Trainings(mp)
        clip_row = runner.execute(clip, results, progress=False)
        clip_calls = list(count.calls)
        count.calls.clear()
        cell = e2e_cell("cleanclip", tiny_bundle)
        row = runner.execute(cell, results, progress=False)
    return {"results": results, "clip": clip, "clip_row": clip_row, "clip_calls": clip_calls, "cell": cell, "row": row,
            "calls": count.calls}


def test_a_cleanclip_cell_fine_tunes_the_cached_undefended_model_with_its_terms(after_clip, tiny_bundle):
    row, clip = after_clip["row"], after_clip["clip"]
    assert row["status"] == "ok" and row["defense"] == "cleanclip"
    assert row["start_model"] == clip.cfg.run_id
    assert row["n_finetune"] == len(tiny_bundle.finetune) == 128
    assert row["steps"] == 2 * (128 // 16)  # the tiny profile's fine-tuning: 2 epochs at batch 16
    assert row["final_loss_clip"] > 0 and row["final_loss_inmodal"] > 0
    assert row["final_loss"] == pytest.approx(row["final_loss_clip"] + row["final_loss_inmodal"], rel=1e-5)
    assert row["d_restored_optimizer"] == 1  # started from the undefended model's AdamW state (C9)
    assert row["p_defense_lr"] == 2e-4 and row["p_defense_batch_size"] == 16  # scaled by the profile


def test_after_the_clip_cell_the_undefended_model_is_not_trained_again(after_clip):
    assert after_clip["clip_calls"] == [("clip", None)]
    assert after_clip["calls"] == [("cleanclip", "finetune")]  # the cached model, fine-tuned only
    assert after_clip["row"]["start_model_train_s"] == 0.0


def test_the_cached_optimizer_state_fits_the_fine_tuning_groups(after_clip):
    """The cache's optimizer.pt is the AdamW of the clip cell's training at its end, over
    ``train.param_groups`` of the same model: each restored moment has its parameter's shape."""
    from poisonbench.models import create_model
    from poisonbench.runner import cache_dir

    folder = cache_dir(after_clip["results"], after_clip["clip"].cfg.run_id)
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    model, _ = create_model(after_clip["clip"].cfg.model)
    model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))
    groups = param_groups(model, 0.1)
    assert [len(g["params"]) for g in groups] == [len(g["params"]) for g in state["param_groups"]]
    params = [p for g in groups for p in g["params"]]
    ids = [i for g in state["param_groups"] for i in g["params"]]
    for p, i in zip(params, ids):
        assert state["state"][i]["exp_avg"].shape == p.shape == state["state"][i]["exp_avg_sq"].shape
        assert int(state["state"][i]["step"]) == after_clip["clip_row"]["steps"]
    opt = cc.phase_optimizer(param_groups(model, 0.1), 1e-4, state)  # as start_optimizer restores it
    assert all(opt.state[p]["exp_avg"].shape == p.shape for p in params)


def test_c10_no_fine_tuning_image_is_a_poisoned_image(after_clip):
    cell = after_clip["cell"]
    poisons = cell.plan.train.images[cell.plan.train.is_poison]
    finetune = cell.data.finetune
    assert len(poisons) == 20 and not finetune.is_poison.any()
    assert not (finetune.images[:, None] == poisons[None]).flatten(2).all(2).any()


def test_killed_mid_fine_tuning_the_cell_resumes_with_the_same_numbers(after_clip, tiny_bundle, tmp_path, monkeypatch):
    """In a store of its own, the cell trains the undefended model itself, is killed after its
    first fine-tuning epoch, and the rerun resumes the fine-tuning (not the undefended model's
    training) and gives the numbers of the cell that started from the clip cell's cache."""
    from poisonbench import runner

    count = Trainings(monkeypatch, kill_after=1)
    with pytest.raises(KeyboardInterrupt):
        runner.execute(e2e_cell("cleanclip", tiny_bundle), tmp_path, progress=False)
    assert count.calls == [("clip", None), ("cleanclip", "finetune")]
    count = Trainings(monkeypatch)
    resumed = runner.execute(e2e_cell("cleanclip", tiny_bundle), tmp_path, progress=False)
    assert count.calls == [("cleanclip", "finetune")]
    assert resumed["status"] == "ok" and resumed["resumed_from_epoch"] == 1
    for key in E2E_METRICS:
        assert resumed[key] == after_clip["row"][key], key
