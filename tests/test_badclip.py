"""BadCLIP (issue 16 item 5) against the testable properties of
../shared/reference/spec-badclip-density-detection.md §A.15 (numbered as there), and the attack
context: the trigger is optimised once for a grid of three defenses."""
import pytest
import torch
import torch.nn.functional as F

from poisonbench import runner
from poisonbench.attacks.badclip_trigger import (Objective, centre_offset, deploy, image_embeddings, loss_terms,
                                                 optimise_trigger, paste_centre, triplet_weight_and_margin)
from poisonbench.config import resolve
from poisonbench.models import create_model

B, S = 8, 28


@pytest.fixture(scope="module")
def surrogate():
    torch.manual_seed(0)
    model = create_model("poisonbench-tiny")[0].eval().requires_grad_(False)
    return model, int(model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size)


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def embed_dim(model):
    return model.text_projection.shape[1]


def test_1_the_trigger_replaces_exactly_the_centre_pixels():
    images = torch.randint(0, 256, (3, 3, 224, 224), dtype=torch.uint8)
    patch = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    out = paste_centre(images, patch)
    assert centre_offset(224, 16) == 104
    assert torch.equal(out[:, :, 104:120, 104:120], patch.expand(3, -1, -1, -1))
    mask = torch.ones(224, 224, dtype=torch.bool)
    mask[104:120, 104:120] = False
    assert torch.equal(out[:, :, mask], images[:, :, mask])


def optimise(surrogate, lr=1e-3, epochs=1, n=16, objective=Objective(), seed=0, aug_prob=0.0):
    model, size = surrogate
    d = embed_dim(model)
    images = torch.randint(0, 256, (n, 3, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    return optimise_trigger(model, size, images, unit(n, d, 2), unit(B, d, 3), 4, objective, epochs, B, lr, aug_prob,
                            torch.Generator().manual_seed(seed), torch.device("cpu"))


def test_2_with_lr_0_the_trigger_is_its_initialisation(surrogate):
    patch, record = optimise(surrogate, lr=0.0)
    init = (0.5 + 0.25 * torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert record["steps"] == 2 and torch.equal(patch, init)
    moved, _ = optimise(surrogate, lr=1e-2)
    assert not torch.equal(moved, init)


def grad_of(surrogate, patch, objective, images=None, seed=0):
    model, size = surrogate
    d = embed_dim(model)
    patch = patch.clone().requires_grad_(True)
    images = torch.rand(B, 3, S, S, generator=torch.Generator().manual_seed(4)) if images is None else images
    terms = loss_terms(model, size, images, patch, unit(B, d, 5), unit(B, d, 6), objective,
                       torch.Generator().manual_seed(seed))
    return terms, torch.autograd.grad(terms["loss"], patch)[0]


def test_3_a_pixel_outside_0_1_gets_no_gradient_from_any_term(surrogate):
    patch = torch.full((3, 4, 4), 0.5)
    patch[0, 0, 0], patch[1, 2, 3] = 1.5, -0.5
    _, grad = grad_of(surrogate, patch, Objective())
    assert grad[0, 0, 0] == 0 and grad[1, 2, 3] == 0 and grad.abs().sum() > 0


def test_4_the_surrogate_is_not_changed(surrogate):
    before = {k: v.clone() for k, v in surrogate[0].state_dict().items()}
    optimise(surrogate, lr=1e-1, aug_prob=1.0)
    assert all(torch.equal(v, surrogate[0].state_dict()[k]) for k, v in before.items())


def reference_positives_and_sigma(d):
    g = torch.Generator().manual_seed(0)  # loss_terms draws the positives, then the permutation
    return unit(B, d, 6)[torch.randperm(B, generator=g)], torch.randperm(B, generator=g)


def test_5_faithful_negatives_are_the_triggered_embeddings(surrogate):
    model, size = surrogate
    one = torch.rand(1, 3, S, S, generator=torch.Generator().manual_seed(7)).expand(B, -1, -1, -1)
    patch = torch.full((3, 4, 4), 0.3)
    terms, _ = grad_of(surrogate, patch, Objective(), images=one)
    a = image_embeddings(model, paste_centre(one, patch), size)
    pos, _ = reference_positives_and_sigma(embed_dim(model))
    # n_i = a_i numerically: the negative distance is torch's eps inside the norm, 1e-6 sqrt(D)
    eps_norm = 1e-6 * embed_dim(model) ** 0.5
    expected = ((a - pos + 1e-6).norm(dim=1) - eps_norm + 1.0).clamp(min=0).mean()
    assert terms["triplet"].item() == pytest.approx(expected.item(), abs=1e-5)


def test_6_intended_negatives_are_clean_embeddings_whatever_the_trigger(surrogate):
    model, size = surrogate
    images = torch.rand(B, 3, S, S, generator=torch.Generator().manual_seed(8))
    pos, sigma = reference_positives_and_sigma(embed_dim(model))
    clean = image_embeddings(model, images, size)[sigma]
    losses = []
    for value in (0.2, 0.9):
        patch = torch.full((3, 4, 4), value)
        terms, _ = grad_of(surrogate, patch, Objective(negatives="intended_clean"), images=images)
        a = image_embeddings(model, paste_centre(images, patch), size)
        assert terms["triplet"].item() == pytest.approx(F.triplet_margin_loss(a, pos, clean, margin=1.0).item(), abs=1e-5)
        losses.append(terms["triplet"].item())
    faithful, _ = grad_of(surrogate, torch.full((3, 4, 4), 0.2), Objective(), images=images)
    assert faithful["triplet"].item() != pytest.approx(losses[0])


def test_7_with_no_triplet_weight_the_gradient_is_that_of_the_text_term(surrogate):
    model, size = surrogate
    d = embed_dim(model)
    patch = torch.full((3, 4, 4), 0.4)
    images = torch.rand(B, 3, S, S, generator=torch.Generator().manual_seed(4))
    terms, grad = grad_of(surrogate, patch, Objective(triplet_weight=0.0))
    p = patch.clone().requires_grad_(True)
    a = image_embeddings(model, paste_centre(images, p.clamp(0, 1)), size)
    logits = 100.0 * a @ unit(B, d, 5).T
    ref = (F.cross_entropy(logits, torch.arange(B)) + F.cross_entropy(logits.T, torch.arange(B))) / 2
    assert terms["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(grad, torch.autograd.grad(ref, p)[0], atol=1e-6)


def test_8_the_run_names_weight_and_margin():
    assert triplet_weight_and_margin("tnature_eda_aug_bs64_ep50_16_middle_01_05_pos_neg_tri*500") == (500.0, 1.0)
    assert triplet_weight_and_margin("x_pos_neg_01_tri*500") == (500.0, 0.1)
    assert triplet_weight_and_margin("x_10_tri*050") == (50.0, 1.0)


def test_11_steps_are_epochs_times_full_batches(surrogate):
    _, record = optimise(surrogate, epochs=3, n=2 * B + 3)
    assert record["steps"] == 3 * 2  # the last partial batch is dropped


def test_14_faithful_deploy_swaps_red_and_blue_through_a_jpeg():
    patch = torch.zeros(3, 16, 16)
    patch[0], patch[1], patch[2] = 0.9, 0.6, 0.1
    faithful, exact = deploy(patch, "jpeg_bgr").float(), deploy(patch, "exact")
    assert torch.equal(exact[:, 0, 0], torch.tensor([229, 153, 25], dtype=torch.uint8))  # x 255, truncated
    assert (faithful[0] - exact[2].float()).abs().max() <= 4 and (faithful[2] - exact[0].float()).abs().max() <= 4


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """badclip against clip, roclip and cleanclip on tiny, in-process, in one store."""
    results = tmp_path_factory.mktemp("badclip")
    from poisonbench.attacks.badclip import BadCLIP

    calls = []
    real = BadCLIP.optimise
    BadCLIP.optimise = lambda self, data, context: calls.append(self.seed) or real(self, data, context)
    try:
        rows = {}
        for defense in ("clip", "roclip", "cleanclip"):
            cell = runner.prepare(resolve("badclip", defense, "tiny", attack_params={"n_poison": 40}))
            rows[defense] = (runner.execute(cell, results, progress=False), cell)
    finally:
        BadCLIP.optimise = real
    return results, rows, calls


def test_the_trigger_is_optimised_once_for_three_defenses(grid):
    results, rows, calls = grid
    assert calls == [0]
    manifests = [cell.plan.manifest["trigger"] for _, cell in rows.values()]
    assert all(m["optimised"] and m["steps"] == 8 for m in manifests)
    assert all(m["pixels"] == manifests[0]["pixels"] for m in manifests)
    assert all(row["status"] == "ok" and 0 <= row["asr"] <= 1 and 0 <= row["asr_paper"] <= 1 for row, _ in rows.values())


def test_12_poisons_replace_rows_with_target_captions_from_a_small_pool(grid):
    _, rows, _ = grid
    _, cell = rows["clip"]
    plan, data, m = cell.plan, cell.data, cell.plan.manifest
    assert len(plan.train) == len(data.train) and plan.n_poison == 40
    src = m["source_rows"]
    kept = plan.train.images[:-40]
    assert kept.shape[0] == len(data.train) - 40
    # the clean originals of the poisoned rows are gone; the poisoned images are them with the trigger
    assert not any(torch.equal(data.train.images[r], k) for r in src[:5] for k in kept)
    trigger = torch.tensor(m["trigger"]["pixels"], dtype=torch.uint8)
    assert torch.equal(plan.train.images[-40:], paste_centre(data.train.images[src], trigger))
    from poisonbench.attacks.base import class_caption_rows

    target_captions = {data.train.captions[i] for i in class_caption_rows(data, data.eval.class_index("bag"))}
    assert set(plan.train.captions[-40:]) <= target_captions and len(set(plan.train.captions[-40:])) <= 128
    # before training, the checks see a grey placeholder on the same rows
    placeholder = cell.attack.poison(data)
    assert placeholder.manifest["source_rows"] == src and not placeholder.manifest["trigger"]["optimised"]


def test_13_paper_asr_counts_every_image_and_the_benchmark_asr_the_non_target_ones(grid):
    from poisonbench.attacks.base import ZeroShotModel

    _, rows, _ = grid
    _, cell = rows["clip"]
    target = cell.data.eval.class_index("bag")
    for guess, expected in ((target, 1.0), ((target + 1) % 10, 0.0)):
        always = ZeroShotModel(lambda x, g=guess: torch.full((len(x), 5), g), S)
        out = cell.attack.evaluate(always, cell.data, cell.plan)
        assert out["asr_paper"] == expected and out["asr"] == expected
        assert out["asr_n"] == int((cell.data.eval.labels != target).sum())


def test_the_surrogate_must_be_a_trained_model_named_without_ambiguity():
    from poisonbench.attacks.badclip import BadCLIP
    from poisonbench.registry import build_params

    for bad, message in (("scratch", "untrained"), ("checkpoint:model.pt", "absolute path"), ("clean:x", "scratch, clean")):
        with pytest.raises(ValueError, match=message):
            BadCLIP(build_params(BadCLIP.Params, {"surrogate": bad}, "badclip"), 0)


def test_an_unreadable_cached_trigger_is_made_again_and_the_poison_count_shares_it(grid, monkeypatch):
    from poisonbench.attacks.badclip import BadCLIP

    results, rows, _ = grid
    (path,) = (results / "cache").glob("attack-*/trigger.pt")
    original = torch.load(path, weights_only=True)["patch"]
    calls, real = [], BadCLIP.optimise
    monkeypatch.setattr(BadCLIP, "optimise", lambda self, data, context: calls.append(1) or real(self, data, context))
    other = runner.prepare(resolve("badclip", "clip", "tiny", attack_params={"n_poison": 30, "deploy": "exact"}))
    runner.start(other, results, progress=False)  # another poison count and deployment: the same optimisation
    assert calls == []
    path.write_bytes(path.read_bytes()[:50])
    again = runner.prepare(resolve("badclip", "clip", "tiny", attack_params={"n_poison": 40}))
    with pytest.warns(UserWarning, match="cannot be read"):
        runner.start(again, results, progress=False)
    assert calls == [1] and torch.equal(torch.load(path, weights_only=True)["patch"], original)


def test_a_failure_before_training_is_recorded_as_the_cells_failed_row(grid, monkeypatch):
    from poisonbench.attacks.badclip import BadCLIP

    results, _, _ = grid
    cell = runner.prepare(resolve("badclip", "clip", "tiny", attack_params={"n_poison": 40, "opt_lr": 0.5}))

    def broken(self, data, context):
        raise RuntimeError("optimisation diverged")

    monkeypatch.setattr(BadCLIP, "optimise", broken)
    with pytest.raises(RuntimeError, match="diverged"):
        runner.start(cell, results, progress=False)
    row = runner.read_row(results, cell.cfg.run_id)
    assert row["status"] == "failed" and "optimisation diverged" in row["error"]
