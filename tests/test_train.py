import pytest
import torch

from poisonbench.config import resolve
from poisonbench.models import create_model
from poisonbench.runner import prepare
from poisonbench.train import CheckpointError, load_checkpoint, lr_lambda, param_groups, train


class Crash(RuntimeError):
    pass


def fresh(cell):
    torch.manual_seed(0)
    return create_model(cell.cfg.model)


@pytest.mark.slow
def test_checkpoint_resume_matches_uninterrupted_run(tmp_path):
    cfg = resolve("badnet", "roclip", "tiny", attack_params={"n_poison": 10}, epochs=2)
    cell = prepare(cfg)
    model, tok = fresh(cell)
    train(model, tok, cell.plan.train, prepare(cfg).defense, cfg, torch.device("cpu"), tmp_path / "a.pt", progress=False)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    def crash_after_first_epoch(epoch, _model):
        if epoch == 1:
            raise Crash()

    model, tok = fresh(cell)
    with pytest.raises(Crash):
        train(model, tok, cell.plan.train, prepare(cfg).defense, cfg, torch.device("cpu"), tmp_path / "b.pt",
              progress=False, on_epoch_end=crash_after_first_epoch)
    state = torch.load(tmp_path / "b.pt", weights_only=True)  # plain tensors and numbers only
    assert state["epoch"] == 1 and state["config_hash"] == cfg.config_hash
    model, tok = fresh(cell)  # a new process would start from a fresh model
    result = train(model, tok, cell.plan.train, prepare(cfg).defense, cfg, torch.device("cpu"), tmp_path / "b.pt",
                   progress=False)
    assert result.resumed_from_epoch == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    # killed after the last epoch (during evaluation, say): the rerun trains nothing and reports the same loss
    again = train(*fresh(cell), cell.plan.train, prepare(cfg).defense, cfg, torch.device("cpu"), tmp_path / "b.pt",
                  progress=False)
    assert again.resumed_from_epoch == 2 and again.final_loss == result.final_loss and result.final_loss == result.final_loss


def test_an_incomplete_checkpoint_is_refused_naming_what_it_lacks(tmp_path):
    from poisonbench.train import CheckpointError, load_checkpoint

    path = tmp_path / "last.pt"
    torch.save({"config_hash": "x", "epoch": 1, "step": 2, "model": {}, "scheduler": {}, "defense": {}}, path)
    with pytest.raises(CheckpointError, match="no optimizer.*--force"):
        load_checkpoint(path)


def test_tampered_or_code_carrying_checkpoint_is_refused(tmp_path):
    """Garbage, a truncated checkpoint, a foreign dict and a pickle that would run code are all
    refused with CheckpointError; the code never runs."""
    import pickle

    good = tmp_path / "good.pt"
    torch.save({"config_hash": "x", "epoch": 1, "step": 2, "model": {"w": torch.ones(3)}, "optimizer": {}, "scheduler": {},
                "defense": {}}, good)
    assert load_checkpoint(good)["step"] == 2
    assert load_checkpoint(tmp_path / "missing.pt") is None
    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    cases = {"garbage.pt": b"not a checkpoint", "truncated.pt": good.read_bytes()[:200],
             "evil.pt": pickle.dumps({"model": Evil()})}
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    for name in [*cases, "foreign.pt"]:
        with pytest.raises(CheckpointError, match="refusing checkpoint .*delete it, or rerun with --force"):
            load_checkpoint(tmp_path / name)
    assert not marker.exists()


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = lr_lambda(warmup=4, total=20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) for s in range(4, 20))


def test_no_weight_decay_on_norms_biases_and_logit_scale():
    model, _ = create_model("poisonbench-tiny")
    no_decay, decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "logit_scale" in skipped and any("ln" in n for n in skipped) and any("bias" in n for n in skipped)
    assert all(p.ndim >= 2 for p in decay["params"])


def test_weight_decay_groups_depart_from_roclip_only_on_the_class_embedding():
    """RoCLIP's code decays every parameter whose name lacks bn/ln/bias/logit_scale; this grouping
    (open_clip's) also spares the 1-D ones: in the ViTs here that is the class embedding alone
    (``param_groups``' docstring)."""
    model, _ = create_model("poisonbench-tiny")
    no_decay, _ = param_groups(model, 0.1)
    ours = {n for n, p in model.named_parameters() if any(p is q for q in no_decay["params"])}
    roclip = {n for n, _ in model.named_parameters() if any(k in n for k in ("bn", "ln", "bias", "logit_scale"))}
    assert ours - roclip == {"visual.class_embedding"} and roclip <= ours
