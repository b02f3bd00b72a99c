import json
import math

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from poisonbench.report import EmptyStoreError, leaderboard, load_leaderboard, to_text
from poisonbench.store import SCHEMA_KEY, has_finished_row, read_runs, write_row


def row(run_id, attack="badnet", defense="clip", top1=0.8, asr=0.9, status="ok", seed=0, n_poison=100, **extra):
    config = json.dumps({"attack": attack, "attack_params": {"n_poison": n_poison}, "defense": defense, "seed": seed})
    return {"run_id": run_id, "status": status, "attack": attack, "defense": defense, "profile": "tiny",
            "clean_top1": top1, "clean_top5": 0.99, "asr": asr, "p_patch_size": 4, "p_poison_rate": None,
            "seed": seed, "config": config, **extra}


def test_parquet_round_trip_keeps_values_types_and_schema_version(tmp_path):
    r = row("abc", seed=3, wall_s=12.5)
    path = write_row(r, tmp_path)
    assert path == tmp_path / "runs" / "abc.parquet"
    back = read_runs(tmp_path).iloc[0].to_dict()
    for k, v in r.items():
        if v is None:
            assert back[k] is None or (isinstance(back[k], float) and math.isnan(back[k]))
        else:
            assert back[k] == v and type(back[k]) in (type(v), __import__("numpy").int64, __import__("numpy").float64)
    assert pq.read_schema(path).metadata[SCHEMA_KEY] == b"2"
    assert not [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(".")]  # no temp file left


def test_rewrite_replaces_the_cells_row_and_new_columns_do_not_break_reading(tmp_path):
    write_row(row("a", status="failed", top1=None, asr=None), tmp_path)
    write_row(row("a"), tmp_path)
    write_row(row("b", defense="roclip", asr=0.01, new_metric=1.5), tmp_path)
    df = read_runs(tmp_path)
    assert len(df) == 2 and set(df["status"]) == {"ok"}
    assert math.isnan(df.set_index("run_id").loc["a", "new_metric"])


def test_has_finished_row(tmp_path):
    assert not has_finished_row(tmp_path, "a")
    write_row(row("a", status="failed"), tmp_path)
    assert not has_finished_row(tmp_path, "a")
    write_row(row("a"), tmp_path)
    assert has_finished_row(tmp_path, "a")


def test_unreadable_files_are_skipped_with_a_warning(tmp_path):
    write_row(row("a"), tmp_path)
    (tmp_path / "runs" / "broken.parquet").write_bytes(b"PAR1 not really")
    (tmp_path / "runs" / "notes.txt").write_text("hi")
    with pytest.warns(UserWarning):
        df = read_runs(tmp_path)
    assert list(df["run_id"]) == ["a"]


def test_leaderboard_ranks_by_asr_then_clean_accuracy_and_ignores_failed_runs():
    df = pd.DataFrame([
        row("1", defense="clip", asr=0.9, top1=0.84), row("2", defense="clip", asr=0.8, top1=0.82, seed=1),
        row("3", defense="roclip", asr=0.02, top1=0.7), row("4", defense="aug-only", asr=0.02, top1=0.75),
        row("5", defense="roclip", status="failed", asr=None, top1=None),
    ])
    board = leaderboard(df)
    assert list(board["defense"]) == ["aug-only", "roclip", "clip"]
    clip = board[board["defense"] == "clip"].iloc[0]
    assert clip["seeds"] == 2 and clip["asr"] == pytest.approx(0.85) and clip["clean_top1"] == pytest.approx(0.83)
    assert board[board["defense"] == "roclip"].iloc[0]["seeds"] == 1
    md = to_text(board, "md")
    assert "| aug-only" in md and "85.0" in md
    assert to_text(board, "csv").splitlines()[0].startswith("attack,defense,profile,setting,seeds,clean_top1,clean_top1_lo")


def test_runs_with_different_parameters_are_not_averaged_together():
    df = pd.DataFrame([
        row("1", asr=0.9), row("2", asr=0.7, seed=1), row("3", asr=0.1, n_poison=10),
    ])
    board = leaderboard(df).set_index("setting")  # named by what departs from the tiny profile's defaults
    assert board.loc["", "asr"] == pytest.approx(0.8) and board.loc["", "seeds"] == 2
    assert board.loc["n_poison=10", "asr"] == pytest.approx(0.1) and board.loc["n_poison=10", "seeds"] == 1


def test_foreign_parquet_files_are_skipped(tmp_path):
    write_row(row("a"), tmp_path)
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / "runs" / "other.parquet")
    with pytest.warns(UserWarning, match="not a poisonbench result"):
        assert list(read_runs(tmp_path)["run_id"]) == ["a"]


def test_empty_or_missing_store_says_what_to_run(tmp_path):
    with pytest.raises(EmptyStoreError, match="bench run --attack badnet"):
        load_leaderboard(tmp_path / "nothing")


def test_parameter_columns_are_always_prefixed_by_their_kind():
    """A parameter's column does not depend on which other plugins have a parameter of that name."""
    from types import SimpleNamespace

    import torch

    from poisonbench.config import resolve
    from poisonbench.runner import base_row

    plan = SimpleNamespace(train=[0] * 10, n_poison=2, poison_rate=0.2, manifest_hash=lambda: "h")
    for defense in ("clip", "roclip"):
        row = base_row(resolve("badnet", defense, "tiny"), plan, torch.device("cpu"))
        params = {k for k in row if k.startswith("p_")}
        assert {"p_attack_n_poison", "p_attack_location", "p_dataset_n_train"} <= params
        assert all(k.startswith(("p_attack_", "p_defense_", "p_dataset_")) for k in params), params
    assert row["p_defense_pool_size"] == 256 and row["world_size"] == 1


def test_a_row_of_schema_1_is_read_with_the_columns_of_schema_2_and_still_reports(tmp_path):
    import pyarrow as pa

    from poisonbench.config import resolve
    from poisonbench.store import runs_dir

    old_cfg, new_cfg = resolve("badnet", "clip", "tiny", 0), resolve("badnet", "clip", "tiny", 1)
    old = {**row(old_cfg.run_id, seed=0, asr=0.5), "config": json.dumps(old_cfg.to_dict()), "profile": "tiny",
           "p_n_poison": 100, "p_patch_size": 4, "p_poison_rate": None, "world_size": 1}
    table = pa.Table.from_pylist([old]).replace_schema_metadata({SCHEMA_KEY: b"1"})
    runs_dir(tmp_path).mkdir(parents=True)
    pq.write_table(table, runs_dir(tmp_path) / f"{old_cfg.run_id}.parquet")
    new = {k: v for k, v in row(new_cfg.run_id, seed=1, asr=0.7).items() if not k.startswith("p_")}
    write_row({**new, "config": json.dumps(new_cfg.to_dict()), "p_attack_n_poison": 100, "p_attack_patch_size": 4}, tmp_path)
    df = read_runs(tmp_path).set_index("run_id")
    assert "p_n_poison" not in df and "p_patch_size" not in df
    assert df.loc[old_cfg.run_id, "p_attack_n_poison"] == 100 and df.loc[old_cfg.run_id, "p_attack_patch_size"] == 4
    assert df.loc[old_cfg.run_id, "p_dataset_n_train"] == 512  # from the row's config
    board = load_leaderboard(tmp_path)
    assert len(board) == 1 and board.loc[0, "seeds"] == 2 and board.loc[0, "asr"] == pytest.approx(0.6)


def test_git_rev_is_not_dirty_for_files_outside_the_package():
    """A results folder or a note beside the package (untracked or edited) is not a change of the code."""
    from pathlib import Path

    from poisonbench.runner import git_rev

    before = git_rev()
    if before.endswith("-dirty") or before == "unknown":
        pytest.skip(f"the package itself has local changes or no git ({before}): nothing to compare")
    probe = Path(__file__).resolve().parent.parent / "docs" / "_git_rev_probe.md"
    try:
        probe.write_text("not code\n")
        assert git_rev() == before
    finally:
        probe.unlink(missing_ok=True)


def test_pandas_reads_a_mixed_store_whole_whichever_file_comes_first(tmp_path):
    """Every row file carries the full column set: a targeted row (targets, asr_top5), a backdoor
    row and a filter row (det_*) read together through pandas.read_parquet(runs/) lose nothing."""
    base = {"status": "ok", "attack": "badnet", "defense": "clip", "seed": 0, "clean_top1": 0.5}
    rows = [
        {**base, "run_id": "a", "clean_top1_nontarget": 0.4, "p_attack_patch_size": 4},
        {**base, "run_id": "b", "attack": "targeted", "asr_top5": 0.25,
         "targets": [{"eval_row": 3, "true_class": "bag", "adversarial_class": "coat", "true_index": 8,
                      "adversarial_index": 4, "predicted_class": "coat", "predicted_index": 4, "success": True}]},
        {**base, "run_id": "c", "defense": "density-filter", "det_auroc": 0.9, "det_roc_fpr": [0.0, 1.0],
         "d_custom": 3.5},
    ]
    for row in rows:
        write_row(row, tmp_path)
    whole = pd.read_parquet(tmp_path / "runs").set_index("run_id")
    assert whole.loc["a", "clean_top1_nontarget"] == 0.4 and whole.loc["a", "p_attack_patch_size"] == 4
    assert whole.loc["b", "asr_top5"] == 0.25 and whole.loc["b", "targets"][0]["adversarial_index"] == 4
    assert whole.loc["c", "det_auroc"] == 0.9 and list(whole.loc["c", "det_roc_fpr"]) == [0.0, 1.0]
    assert pd.isna(whole.loc["a", "det_auroc"]) and pd.isna(whole.loc["c", "asr_top5"])
    files = sorted((tmp_path / "runs").glob("*.parquet"))
    common = set(pq.read_schema(files[0]).names)
    assert all(set(pq.read_schema(f).names) >= common - {"d_custom"} for f in files)


def test_rewrite_rows_gives_old_rows_the_columns_added_since(tmp_path, monkeypatch):
    """A row written before a plugin gained a parameter lacks its column, so pandas, reading the
    schema of the first file, would drop it for every row; rewrite_rows restores a store that
    reads whole, filling the parameter from the row's config and keeping every value."""
    import json as _json

    import poisonbench.store as store
    from poisonbench.config import resolve

    cfg = resolve("badnet", "aug-only", "tiny")
    base = {"status": "ok", "attack": "badnet", "defense": "aug-only", "seed": 0, "clean_top1": 0.5,
            "config": _json.dumps(cfg.to_dict()), "d_custom": [1.0, 2.0]}
    real_schema = store.row_schema
    monkeypatch.setattr(store, "row_schema", lambda row: pa.schema(  # as written before image_augment existed
        [f for f in real_schema(row) if f.name != "p_defense_image_augment"]))
    store.write_row({**base, "run_id": "a_old"}, tmp_path)
    monkeypatch.setattr(store, "row_schema", real_schema)
    store.write_row({**base, "run_id": "b_new", "p_defense_image_augment": False}, tmp_path)
    assert "p_defense_image_augment" not in pd.read_parquet(tmp_path / "runs").columns  # the first file's schema
    before = store.read_row(tmp_path, "a_old")
    assert store.rewrite_rows(tmp_path) == 2
    whole = pd.read_parquet(tmp_path / "runs").set_index("run_id")
    assert whole.loc["a_old", "p_defense_image_augment"] == True and whole.loc["b_new", "p_defense_image_augment"] == False  # noqa: E712
    after = store.read_row(tmp_path, "a_old")
    assert all(after[k] == v for k, v in before.items() if v is not None)  # no value changed
    assert after["p_defense_min_crop"] == 0.08 and after["p_dataset_n_train"] == 512  # filled from the config


def test_after_rewrite_every_row_file_has_every_column_of_the_store(tmp_path):
    """Rows of different defenses carry different d_* / final_loss_* columns; rewrite_rows gives
    each file the union, so pandas.read_parquet(runs/) returns every column for every row,
    whichever file comes first; only_if_needed leaves complete files alone."""
    import poisonbench.store as store

    base = {"status": "ok", "attack": "badnet", "seed": 0, "clean_top1": 0.5}
    store.write_row({**base, "run_id": "a", "defense": "clip"}, tmp_path)
    store.write_row({**base, "run_id": "b", "defense": "safeclip", "d_safe_fraction": [0.1, 0.2],
                     "final_loss_unimodal": 2.5}, tmp_path)
    store.write_row({**base, "run_id": "c", "defense": "cleanclip", "d_restored_optimizer": 1}, tmp_path)
    assert "d_safe_fraction" not in pd.read_parquet(tmp_path / "runs").columns  # file "a" first: dropped
    assert store.rewrite_rows(tmp_path, only_if_needed=True) == 3
    whole = pd.read_parquet(tmp_path / "runs").set_index("run_id")
    assert list(whole.loc["b", "d_safe_fraction"]) == [0.1, 0.2] and whole.loc["b", "final_loss_unimodal"] == 2.5
    assert whole.loc["c", "d_restored_optimizer"] == 1 and pd.isna(whole.loc["a", "d_restored_optimizer"])
    names = [set(pq.read_schema(f).names) for f in sorted((tmp_path / "runs").glob("*.parquet"))]
    assert names[0] == names[1] == names[2]
    assert store.rewrite_rows(tmp_path, only_if_needed=True) == 0
    # a second rewrite of every file keeps the types: a row without a value gets a typed null, never
    # a null-typed column (which pandas cannot then read beside a file that has the value)
    store.write_row({**base, "run_id": "d", "defense": "cleanclip", "d_restored_optimizer": 2}, tmp_path)
    assert store.rewrite_rows(tmp_path) == 4 and store.rewrite_rows(tmp_path) == 4
    for f in sorted((tmp_path / "runs").glob("*.parquet")):
        schema = pq.read_schema(f)
        assert not any(pa.types.is_null(field.type) for field in schema), f
    assert len(pd.read_parquet(tmp_path / "runs")) == 4


def test_the_committed_reference_store_reads_whole_with_pandas():
    """Every row file of results/reference carries the store's full column set, so
    pandas.read_parquet of the folder neither fails nor drops a column (`bench rewrite-rows`)."""
    from pathlib import Path

    import pandas as pd
    import pyarrow.parquet as pq

    from poisonbench.store import runs_dir, store_schema

    reference = Path(__file__).parent.parent / "results" / "reference"
    union = set(store_schema(reference).names)
    files = sorted(runs_dir(reference).glob("*.parquet"))
    assert files and all(set(pq.read_schema(f).names) == union for f in files)
    frame = pd.read_parquet(runs_dir(reference))
    assert set(frame.columns) == union and len(frame) == len(files)
