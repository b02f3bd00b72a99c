"""A cell's starting weights (issue 16 item 1): ``--init scratch`` keeps every run id; a
checkpoint file (a state dict, or an open_clip training checkpoint with ``module.`` prefixes)
and open_clip pretrained weights found in the local Hugging Face cache are loaded into the
cell's model; missing weights are refused before training, saying where they go."""
import pytest
import torch
from click.testing import CliRunner

from poisonbench import runner
from poisonbench.cli import main
from poisonbench.config import parse_init, resolve
from poisonbench.models import create_model, pretrained_file

SMALL = {"n_train": 256, "n_eval": 100, "n_probe": 100, "n_heldout": 50}


def weights(seed=7):
    torch.manual_seed(seed)
    return create_model("poisonbench-tiny")[0].state_dict()


def cell(init, **kw):
    return runner.prepare(resolve("badnet", "clip", "tiny", attack_params={"n_poison": 20}, dataset_params=SMALL,
                                  init=init, **kw))


def assert_loaded(model, state):
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k


def test_scratch_keeps_the_run_id_and_malformed_specs_are_refused():
    plain = resolve("badnet", "clip", "tiny")
    assert resolve("badnet", "clip", "tiny", init="scratch").run_id == plain.run_id and "init" not in plain.to_dict()
    for bad in ("checkpoint:", "pretrained:RN50", "pretrained:/openai", "imagenet", "clean:x"):
        with pytest.raises(ValueError, match="scratch, clean, checkpoint:PATH, pretrained:ARCH/TAG"):
            parse_init(bad)


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_checkpoint_file_is_loaded_into_the_cells_model(tmp_path, wrapped):
    state = weights()
    path = tmp_path / "start.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}} if wrapped else state, path)
    c = cell(f"checkpoint:{path}")
    assert c.cfg.init == f"checkpoint:{path.resolve()}" and c.cfg.run_id != cell("scratch").cfg.run_id
    model, _ = runner.fresh_model(c)
    assert_loaded(model, state)
    scratch, _ = runner.fresh_model(cell("scratch"))
    assert not torch.equal(scratch.state_dict()["text_projection"], state["text_projection"])


def test_a_missing_or_unfitting_checkpoint_is_refused(tmp_path):
    with pytest.raises(runner.ConfigError, match="no such file"):
        cell(f"checkpoint:{tmp_path / 'absent.pt'}")
    torch.manual_seed(0)
    other = create_model("poisonbench-cpu-small")[0].state_dict()
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="do not fit model poisonbench-tiny"):
        runner.fresh_model(cell(f"checkpoint:{tmp_path / 'other.pt'}"))


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_pretrained_weights_absent_are_refused_before_training_saying_where_they_go(hf_cache):
    with pytest.raises(FileNotFoundError) as e:
        pretrained_file("RN50", "openai")
    assert "nothing is downloaded" in str(e.value) and "models--timm--resnet50_clip.openai" in str(e.value)
    with pytest.raises(runner.ConfigError, match="nothing is downloaded"):
        runner.prepare(resolve("badnet", "clip", "tiny", model="RN50", init="pretrained:RN50/openai"))
    with pytest.raises(runner.ConfigError, match="add --model RN50"):
        cell("pretrained:RN50/openai")
    with pytest.raises(ValueError, match="tags for RN50"):
        pretrained_file("RN50", "no-such-tag")


def test_pretrained_weights_in_the_local_cache_are_loaded(hf_cache, monkeypatch):
    from open_clip import pretrained as pt

    monkeypatch.setitem(pt._PRETRAINED, "poisonbench-tiny", {"test": pt._pcfg(hf_hub="poisonbench/tiny-test/")})
    snapshot = hf_cache / "models--poisonbench--tiny-test" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (hf_cache / "models--poisonbench--tiny-test" / "refs").mkdir()
    (hf_cache / "models--poisonbench--tiny-test" / "refs" / "main").write_text("0123abcd")
    state = weights(seed=11)
    torch.save(state, snapshot / "open_clip_pytorch_model.bin")
    model, _ = runner.fresh_model(cell("pretrained:poisonbench-tiny/test"))
    assert_loaded(model, state)


def test_the_cli_takes_init_and_model_and_refuses_an_unknown_model(tmp_path):
    path = tmp_path / "start.pt"
    torch.save(weights(), path)
    out = CliRunner().invoke(main, ["status", "-p", "tiny", "--init", f"checkpoint:{path}", "-r", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output
    assert "1 pending" in out.output
    from poisonbench.grid import GridSpec, expand

    spec = GridSpec(profile="tiny", training={"init": f"checkpoint:{path}", "model": "poisonbench-tiny"})
    args = spec.args()
    assert args[args.index("--init") + 1] == f"checkpoint:{path}" and args[args.index("--model") + 1] == "poisonbench-tiny"
    (cfg,) = expand(spec)
    assert cfg.init == f"checkpoint:{path.resolve()}"
    out = CliRunner().invoke(main, ["status", "-p", "tiny", "--model", "RN5O", "-r", str(tmp_path / "r")])
    assert out.exit_code == 2 and "unknown model 'RN5O'" in out.output


def test_clean_starts_from_the_clean_cell_which_is_trained_once(tmp_path, monkeypatch):
    trained = []
    real_train = runner.train
    monkeypatch.setattr(runner, "train", lambda *a, **k: trained.append(a[4].attack) or real_train(*a, **k))
    first, second = cell("clean"), runner.prepare(resolve("blended", "clip", "tiny", attack_params={"n_poison": 20},
                                                          dataset_params=SMALL, init="clean"))
    ccfg = runner.clean_config(first.cfg)
    # the clean model is a cell of its own, on the cell's data: `bench run -a none -d clip -p tiny --dataset-param ...`
    assert ccfg.run_id == resolve("none", "clip", "tiny", dataset_params=SMALL).run_id and ccfg.init == "scratch"
    assert runner.clean_config(resolve("badnet", "clip", "cpu-small-ft")).run_id == resolve("none", "clip", "cpu-small").run_id
    runner.start(first, tmp_path, progress=False)
    assert trained == ["none"] and runner.read_row(tmp_path, ccfg.run_id)["status"] == "ok"
    state = torch.load(first.clean_model, weights_only=True)
    assert_loaded(runner.fresh_model(first)[0], state)
    stamp = first.clean_model.stat().st_mtime_ns
    runner.start(second, tmp_path, progress=False)  # another cell that starts from it: loaded, not trained
    assert trained == ["none"] and second.clean_model == first.clean_model
    assert first.clean_model.stat().st_mtime_ns == stamp
    assert_loaded(runner.fresh_model(second)[0], state)
    assert cell("clean").cfg.run_id != cell("scratch").cfg.run_id


def test_an_unreadable_clean_model_is_trained_again(tmp_path, monkeypatch):
    trained = []
    real_train = runner.train
    monkeypatch.setattr(runner, "train", lambda *a, **k: trained.append(a[4].attack) or real_train(*a, **k))
    first = cell("clean")
    runner.start(first, tmp_path, progress=False)
    first.clean_model.write_bytes(first.clean_model.read_bytes()[:100])  # cut short, as by a full disk
    second = cell("clean")
    with pytest.warns(UserWarning, match="missing or unreadable"):
        runner.start(second, tmp_path, progress=False)
    assert trained == ["none", "none"] and runner.readable(second.clean_model)


def test_an_unreadable_checkpoint_is_refused_naming_the_file(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=f"{text}.*(cannot be read|not an open_clip state dict)"):
        runner.fresh_model(cell(f"checkpoint:{text}"))
