"""End to end through the `bench` command line on the tiny profile (real Fashion-MNIST images)."""
import pytest
from click.testing import CliRunner

from poisonbench.cli import main
from poisonbench.store import read_runs, runs_dir, write_row
from store_helpers import stored_row


def bench(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.slow
def test_tiny_run_then_report(tmp_path):
    res = str(tmp_path / "res")
    out = bench("run", "--attack", "badnet[n_poison=20]", "--defense", "roclip", "--profile", "tiny", "--results", res, "-q")
    assert out.exit_code == 0, out.output
    df = read_runs(res)
    assert len(df) == 1
    r = df.iloc[0]
    assert r["status"] == "ok" and r["attack"] == "badnet" and r["defense"] == "roclip"
    assert r["n_poison"] == 20 and r["p_attack_n_poison"] == 20 and r["p_defense_pool_size"] == 256
    assert r["n_train"] == 532 and r["poison_rate"] == pytest.approx(20 / 532)
    assert 0.0 <= r["clean_top1"] <= r["clean_top5"] <= 1.0 and 0.0 <= r["asr"] <= 1.0
    assert 400 < r["asr_n"] < 500  # the ~10% bags of the 500 eval images are excluded
    assert 0.0 <= r["linear_probe_top1"] <= 1.0 and r["linear_probe_c"] > 0
    assert 0.0 <= r["i2t_r1"] <= r["i2t_r5"] <= r["i2t_r10"] <= 1.0 and 0.0 <= r["t2i_r1"] <= r["t2i_r10"] <= 1.0
    for col in ("config_hash", "git_rev", "version", "device", "manifest_hash", "wall_s", "seed", "model"):
        assert col in df.columns and r[col] is not None
    assert (tmp_path / "res" / "manifests" / f"{r['run_id']}.json").is_file()

    again = bench("run", "--attack", "badnet[n_poison=20]", "--defense", "roclip", "--profile", "tiny", "--results", res, "-q")
    assert "already done" in again.output and len(read_runs(res)) == 1

    rep = bench("report", "--results", res, "--format", "md")
    assert rep.exit_code == 0 and "## badnet" in rep.output and "| roclip" in rep.output
    out_file = tmp_path / "board.csv"
    assert bench("report", "--results", res, "--format", "csv", "--out", str(out_file)).exit_code == 0
    assert out_file.read_text().startswith("attack,defense,profile,setting,seeds,clean_top1")
    plots = tmp_path / "committed plots"
    assert bench("report", "--results", res, "--format", "md", "--out", str(tmp_path / "b.md"),
                 "--plots-dir", str(plots)).exit_code == 0
    assert (plots / "asr_vs_clean-tiny.png").is_file() and (plots / "asr_vs_clean-tiny.svg").is_file()


def test_bad_input_fails_before_training_with_the_valid_choices(tmp_path):
    res = str(tmp_path / "res")
    out = CliRunner().invoke(main, ["run", "--attack", "badnett", "--profile", "tiny", "--results", res])
    assert out.exit_code == 2 and "valid attacks" in out.output and "badnet" in out.output
    out = CliRunner().invoke(main, ["run", "-a", "badnet", "-A", "target=shoe", "--profile", "tiny", "--results", res])
    assert out.exit_code == 2 and "not in the evaluation classes" in out.output and "ankle boot" in out.output
    out = CliRunner().invoke(main, ["run", "-A", "n_poison=100000", "--profile", "tiny", "--results", res])
    assert out.exit_code == 2 and "lower n_poison" in out.output
    assert read_runs(res).empty  # nothing was written


@pytest.mark.parametrize(
    "args,env,message",
    [
        (["--lr", "-1"], {}, "lr must be a positive"),
        (["--seed", "-3"], {}, "not a non-negative integer"),
        (["--seed", "2147483648"], {}, "seed must be in"),
        (["-d", "roclip", "-D", "pool_size=100000"], {}, "exceeds the"),
        (["-d", "roclip"], {"POISONBENCH_WORDNET": "/nonexistent"}, "POISONBENCH_WORDNET=/nonexistent is not"),
        (["--device", "warp-drive"], {}, "valid devices: auto, cpu, cuda"),
        (["-d", "roclipp"], {}, "unknown defense 'roclipp'; valid defenses: aug-only, cleanclip, clip, density-filter"),
        (["-A", "n_poison=-5"], {}, "badnet: n_poison must be >= 0, got -5"),
        (["-A", "n_poison=five"], {}, "bad value 'five' for n_poison (int)"),
        (["--data", "csv:/nope.csv"], {}, "no CSV file at /nope.csv"),
        (["--data", "wds:/nope/{0..1}.tar"], {}, "no WebDataset shard at /nope/0.tar"),
        (["--data", "/nope.csv"], {}, "give csv:PATH (a CSV/TSV of image paths and captions) or wds:URLS"),
    ],
)
def test_more_bad_input_fails_before_training(tmp_path, monkeypatch, args, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    res = tmp_path / "res"
    out = CliRunner().invoke(main, ["run", "--profile", "tiny", "--results", str(res), *args])
    assert out.exit_code == 2 and message in out.output, out.output
    assert not res.exists()  # nothing written: no manifest, no row, no checkpoint


def test_cuda_requested_without_a_gpu_is_a_usage_error(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = CliRunner().invoke(main, ["run", "--profile", "tiny", "--device", "cuda", "--results", str(tmp_path / "r")])
    assert out.exit_code == 2 and "no CUDA GPU is available" in out.output


def test_report_on_empty_store_says_what_to_run(tmp_path):
    out = CliRunner().invoke(main, ["report", "--results", str(tmp_path)])
    assert out.exit_code == 1 and "bench run --attack badnet" in out.output


@pytest.mark.parametrize("store", ["missing", "empty", "failed only"])
def test_report_on_a_store_without_finished_runs_says_what_to_run_first(tmp_path, store):
    res = tmp_path / "res"
    if store == "empty":
        runs_dir(res).mkdir(parents=True)
    if store == "failed only":
        write_row({**stored_row("a", "failed", None), "error": "NonFiniteLossError: ..."}, res)
    out = CliRunner().invoke(main, ["report", "--results", str(res)])
    text = " ".join(out.output.split())
    assert out.exit_code == 1 and f"no finished runs in {res / 'runs'}" in text
    assert f"Run one first, e.g. `bench run --attack badnet --defense clip --results {res}`" in text
    assert ("1 failed run(s) are in the store; see their `error` column" in text) == (store == "failed only")
    assert res.exists() == (store != "missing")  # reporting creates nothing
    assert "Stores inside it" not in text


def test_report_on_a_folder_holding_stores_names_them(tmp_path):
    """After make demo, `bench report` (results/) points to results/demo, which holds the rows."""
    write_row(stored_row("a", "ok", 0.8), tmp_path / "res" / "demo")
    out = CliRunner().invoke(main, ["report", "--results", str(tmp_path / "res")])
    text = " ".join(out.output.split())
    assert out.exit_code == 1 and f"Stores inside it: {tmp_path / 'res' / 'demo'}; e.g. `bench report -r" in text


def test_list_shows_parameters_and_defaults():
    out = bench("list")
    assert out.exit_code == 0
    for text in ("badnet", "patch_size", "roclip", "pool_size", "fashion-mnist", "cpu-small"):
        assert text in out.output


@pytest.mark.parametrize("attack", ["badnet", "blended", "sig", "badnet-lc[n_poison=10]"])
def test_preview_writes_a_png_grid(tmp_path, attack):
    out = tmp_path / "p.png"
    res = CliRunner().invoke(main, ["preview", "-a", attack, "-p", "tiny", "-n", "3", "-o", str(out)])
    assert res.exit_code == 0, res.output
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(out) as img:
        assert img.size == (1260, 945)  # 3 columns (clean, poisoned, difference) x 3 rows at 150 dpi


def test_preview_format_follows_the_extension_and_shows_the_difference(tmp_path):
    from poisonbench.config import resolve
    from poisonbench.runner import prepare

    res = CliRunner().invoke(main, ["preview", "-a", "targeted", "-p", "tiny", "-n", "2", "-o", str(tmp_path / "p.pdf"),
                                    "--dataset-param", "captions=web"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "p.pdf").read_bytes()[:5] == b"%PDF-"
    cell = prepare(resolve("targeted", "clip", "tiny"))
    (_, _, _, caption), = cell.attack.preview_pairs(cell.data, cell.plan, 1)
    assert f"adversarial class: {cell.plan.manifest['targets'][0]['adversarial_class']}" in caption
    bad = CliRunner().invoke(main, ["preview", "-a", "badnet", "-p", "tiny", "-o", str(tmp_path / "p.jpg")])
    assert bad.exit_code == 2 and "png, pdf, svg" in bad.output


def test_preview_of_clean_baseline_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(main, ["preview", "-a", "none", "-p", "tiny", "-o", str(tmp_path / "p.png")])
    assert res.exit_code == 2 and "nothing to preview" in res.output


@pytest.mark.slow
def test_sigterm_records_a_failed_row_and_the_rerun_resumes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    res = tmp_path / "res"
    cmd = [sys.executable, "-m", "poisonbench", "run", "-p", "tiny", "--epochs", "40", "-q", "--results", str(res)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not list(res.glob("checkpoints/*/last.pt")) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    df = read_runs(res)
    assert list(df["status"]) == ["failed"] and "SystemExit" in df.iloc[0]["error"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert done.returncode == 0, done.stdout + done.stderr
    df = read_runs(res)
    assert list(df["status"]) == ["ok"] and df.iloc[0]["resumed_from_epoch"] >= 1


def test_unwritable_results_folder_fails_before_training_and_report_still_prints(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    out = CliRunner().invoke(main, ["run", "-p", "tiny", "--results", str(blocker / "res")])
    assert out.exit_code == 2 and "cannot write to the results folder" in out.output

    from poisonbench.store import write_row

    res = tmp_path / "res"
    write_row({"run_id": "a", "status": "ok", "attack": "badnet", "defense": "clip", "profile": "tiny",
               "clean_top1": 0.5, "clean_top5": 0.9, "asr": 0.5, "asr_n": 10, "seed": 0}, res)
    (res / "plots").write_text("a file where the plots folder should be")
    rep = CliRunner().invoke(main, ["report", "--results", str(res)])
    assert rep.exit_code == 0 and "plots not written" in rep.output and "badnet" in rep.output


# a results folder whose name rich would read as an emoji code and as markup (an unknown closing tag raises)
ODD = "res :cat: [b]bold[/b] [/x]"


@pytest.mark.parametrize("command", ["status", "busy", "done", "report"])
def test_paths_and_commands_print_as_typed(tmp_path, monkeypatch, command):
    """Every printed path and follow-up command is the user's text: no emoji, no markup eaten or raised."""
    import shlex

    import poisonbench.grid as grid
    from poisonbench.config import resolve
    from poisonbench.display import console

    monkeypatch.setattr(console, "width", 400)  # one line each
    res = tmp_path / ODD
    if command == "status":
        out = bench("status", "-p", "tiny", "-r", str(res))
        assert out.exit_code == 0 and f"1 cells in {res}" in " ".join(out.output.split())  # the title wraps at spaces
    if command == "busy":  # a cell another process holds: the hint names the results folder, quoted for the shell
        monkeypatch.setattr(grid, "validate", lambda cfgs, device: [])
        monkeypatch.setattr(grid, "run_cells",
                            lambda cfgs, *a, **k: [grid.CellOutcome(c, grid.EXIT_BUSY, None) for c in cfgs])
        out = bench("run", "-p", "tiny", "-r", str(res))
        assert out.exit_code == 0 and "1 cell(s) are being run by another process" in out.output
        assert f"-r {shlex.quote(str(res))}` shows when they are done" in out.output
    run_id = resolve("badnet", "clip", "tiny").run_id
    if command == "done":
        write_row(stored_row(run_id, "ok", 0.8), res)
        out = bench("run", "-p", "tiny", "-r", str(res))
        assert out.exit_code == 0 and f"cell {run_id} is already done in {res}; showing it" in out.output
    if command == "report":
        write_row(stored_row(run_id, "ok", 0.8), res)
        out = bench("report", "-r", str(res), "--no-plots")
        assert out.exit_code == 0 and f"poisonbench leaderboard ({res})" in out.output
    assert "\N{CAT FACE}" not in out.output


@pytest.mark.parametrize("value, message", [
    ("", "-A/--attack-param target= gives parameter target no value; write target=VALUE"),
    ("bag,,coat", "-A/--attack-param target=bag,,coat: empty item in 'bag,,coat'"),
])
def test_an_empty_parameter_value_names_the_option_and_parameter(tmp_path, value, message):
    out = CliRunner().invoke(main, ["status", "-p", "tiny", "-A", f"target={value}", "-r", str(tmp_path)])
    assert out.exit_code == 2 and message in " ".join(out.output.split()), out.output


def test_tables_are_not_cut_at_80_columns_off_a_terminal(monkeypatch):
    import io

    from poisonbench.display import WIDE, width

    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("COLUMNS", raising=False)
    assert width(Tty()) is None and width(io.StringIO()) == WIDE >= 200
    monkeypatch.setenv("COLUMNS", "132")
    assert width(io.StringIO()) == 132


def test_status_without_options_lists_the_store_and_report_filters_it(tmp_path):
    import json as _json

    from poisonbench.config import resolve

    res = tmp_path / "store"
    cells = {}
    for attack, defense, seed, status in (("badnet", "clip", 0, "ok"), ("badnet", "roclip", 1, "ok"),
                                          ("blended", "clip", 2, "failed")):
        cfg = resolve(attack, defense, "tiny", seed=seed)
        cells[(attack, defense, seed)] = cfg.run_id
        write_row({"run_id": cfg.run_id, "status": status, "attack": attack, "defense": defense, "profile": "tiny",
                   "seed": seed, "config": _json.dumps(cfg.to_dict()), "clean_top1": 0.5, "clean_top5": 0.9,
                   "linear_probe_top1": 0.6, "asr": 0.25, "asr_n": 100, "n_poison": 20, "error": "boom"}, res)
    killed = res / "checkpoints" / "0123456789abcdef"
    killed.mkdir(parents=True)
    (killed / "last.pt").write_bytes(b"x")
    out = CliRunner().invoke(main, ["status", "-r", str(res)])
    assert out.exit_code == 0, out.output
    assert all(run_id in out.output for run_id in cells.values())
    assert "2 done, 0 running, 1 failed; 1 without a row" in out.output and "0123456789abcdef: resumable" in out.output
    out = CliRunner().invoke(main, ["status", "--store", "-a", "badnet", "-s", "1", "-r", str(res)])
    assert cells[("badnet", "roclip", 1)] in out.output and cells[("badnet", "clip", 0)] not in out.output
    assert "1 done, 0 running, 0 failed" in out.output
    rep = CliRunner().invoke(main, ["report", "-r", str(res), "--no-plots", "--format", "md", "-d", "roclip"])
    assert rep.exit_code == 0 and "| roclip" in rep.output and "| clip " not in rep.output
    rep = CliRunner().invoke(main, ["report", "-r", str(res), "--no-plots", "-a", "wanet"])
    assert rep.exit_code == 1 and "no run in" in rep.output and "--attack wanet" in rep.output
