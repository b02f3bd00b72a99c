"""Issue 7: bad inputs, failures and concurrent runs never corrupt the store or silently change a
number. Odd images and captions, non-finite losses, kill -9 in the middle of a write, two
`bench run` on one store at once, results of an older schema, an empty store."""
import csv
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tarfile
import warnings
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from poisonbench.cli import main
from poisonbench.config import PROFILES, resolve
from poisonbench.grid import EXIT_FAILED, EXIT_OK, GridSpec, expand, state
from poisonbench.registry import DATASETS
from poisonbench.store import has_finished_row, read_runs, runs_dir, write_row
from poisonbench.train import NonFiniteLossError, load_checkpoint
from poisonbench.utils import remove_temp_files
from test_files import CAPTIONS  # distinct captions with everything a caption file may hold

SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def temp_files(folder):
    """Temp files of atomic writes (``.<name>.*.tmp``) anywhere under ``folder``."""
    return sorted(p for p in folder.rglob(".*.tmp") if p.is_file())


# --- 1. corrupt and non-RGB images --------------------------------------------------------------

def _save(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _png16(channels: tuple[int, ...], side: int = 12) -> bytes:
    """A PNG with 16 bits per channel (grey or RGB) written by hand: PIL cannot write 48-bit RGB."""
    colour_type = {1: 0, 3: 2}[len(channels)]
    raw = b"".join(b"\x00" + struct.pack(f">{len(channels)}H", *channels) * side for _ in range(side))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


RED = (200, 10, 30)
SIDE = (12, 12)
# mode -> (encoded image, the RGB it must decode to, tolerance)
MODES = {
    "L": (lambda: _save(Image.new("L", SIDE, 77)), (77, 77, 77), 0),
    "LA": (lambda: _save(Image.new("LA", SIDE, (77, 0))), (77, 77, 77), 0),  # alpha dropped, not composited
    "1": (lambda: _save(Image.new("1", SIDE, 1)), (255, 255, 255), 0),
    "P": (lambda: _save(Image.new("RGB", SIDE, RED).convert("P", palette=Image.ADAPTIVE, colors=4)), RED, 0),
    "RGBA": (lambda: _save(Image.new("RGBA", SIDE, (*RED, 0))), RED, 0),
    "CMYK-jpeg": (lambda: _save(Image.new("RGB", SIDE, RED).convert("CMYK"), "JPEG"), RED, 4),
    "CMYK-tiff": (lambda: _save(Image.new("RGB", SIDE, RED).convert("CMYK"), "TIFF"), RED, 0),
    "I;16-png": (lambda: _save(Image.fromarray(np.full((12, 12), 40000, np.uint16))), (156,) * 3, 0),  # 40000/65535
    "grey16-png": (lambda: _png16((40000,)), (156,) * 3, 0),
    "rgb48-png": (lambda: _png16(tuple(257 * c for c in RED)), RED, 0),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_non_rgb_modes_decode_to_the_right_rgb_uint8(mode):
    from poisonbench.datasets.files import decode_image

    data, rgb, tol = MODES[mode]
    x = decode_image(data(), 8)
    assert x.dtype == torch.uint8 and x.shape == (3, 8, 8)
    expected = torch.tensor(rgb, dtype=torch.int16).view(3, 1, 1).expand(3, 8, 8)
    assert (x.to(torch.int16) - expected).abs().max().item() <= tol, x[:, 0, 0].tolist()


GOOD_MODES = ["RGB", "L", "LA", "RGBA", "P", "I;16", "rgb48", "RGB", "L", "RGBA"]


def level(i: int) -> int:
    """The grey level of good image ``i`` (i < 230): distinct per image, so each decoded image names its row."""
    return 20 + i


def good_image(i: int) -> bytes:
    v, mode = level(i), GOOD_MODES[i % len(GOOD_MODES)]
    if mode == "I;16":
        return _save(Image.fromarray(np.full((12, 12), v * 257, np.uint16)))
    if mode == "rgb48":
        return _png16((v * 257,) * 3)
    img = Image.new("RGB", SIDE, (v, v, v))
    return _save(img.convert("P", palette=Image.ADAPTIVE, colors=2) if mode == "P" else img.convert(mode))


BAD_IMAGES = {"empty.png": b"", "junk.png": b"not an image at all", "truncated.png": good_image(0)[:40]}


def write_pairs(folder, source: str, n_good: int, captions=None, bad=BAD_IMAGES,
                missing: bool = True) -> tuple[str, list[str]]:
    """Good images 0..n_good-1 (grey level ``level(i)``) with their captions, the ``bad`` images
    spread among them, and with ``missing`` for CSV a missing file, for shards a sample without an
    image and one without a caption. Returns the ``csv:``/``wds:`` spec and the bad entries' names."""
    captions = captions or [f"caption {i}" for i in range(n_good)]
    entries = [(f"{i:04d}.png", good_image(i), captions[i]) for i in range(n_good)]
    for k, (name, data) in enumerate(bad.items()):
        entries.insert(1 + 3 * k, (name, data, f"bad image {name}"))
    bad_names = list(bad)
    if source == "csv":
        if missing:
            entries.insert(2, ("missing.png", None, "a file that is not there"))
            bad_names.append("missing.png")
        (folder / "img").mkdir()
        for name, data, _ in entries:
            if data is not None:
                (folder / "img" / name).write_bytes(data)
        with open(folder / "pairs.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["filepath", "title"])
            w.writerows((f"img/{name}", caption) for name, _, caption in entries)
        return f"csv:{folder / 'pairs.csv'}", bad_names
    members = [(name.split(".")[0], {"png": data, "txt": caption.encode()}) for name, data, caption in entries]
    if missing:
        members.insert(4, ("noimage", {"txt": b"a caption without an image"}))
        members.insert(6, ("nocaption", {"png": good_image(1)}))
        bad_names += ["noimage", "nocaption"]
    half = len(members) // 2
    for shard, part in enumerate((members[:half], members[half:])):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for key, files in part:
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return "wds:" + str(folder / "{00000..00001}.tar"), bad_names


def image_rows(images, n: int) -> torch.Tensor:
    """uint8 [n, 3, S, S] of an in-memory tensor or a LazyImages."""
    return images[torch.arange(n)]


def row_of(image: torch.Tensor) -> int:
    """The good-image index whose grey level ``image`` has (every pixel, every channel)."""
    v = int(image[0, 0, 0])
    assert (image == v).all() and v >= 20, f"not one of the written images: {image[:, 0, 0].tolist()}"
    return v - 20


@pytest.mark.parametrize("load", ["memory", "lazy"])
@pytest.mark.parametrize("source", ["csv", "wds"])
def test_bad_images_are_skipped_and_counted_never_replaced_or_repeated(tmp_path, source, load):
    """Through read_pairs (what the `files` dataset reads): every readable pair once, in order,
    with its own caption read back exactly; every unreadable one counted and named."""
    from poisonbench.datasets.files import read_pairs

    spec, bad = write_pairs(tmp_path, source, len(CAPTIONS), CAPTIONS)
    pairs = read_pairs(spec, 8, load=load)
    assert pairs.captions == CAPTIONS
    rows = [row_of(img) for img in image_rows(pairs.images, len(pairs.captions))]
    assert rows == list(range(len(CAPTIONS)))  # image i with caption i; none twice, none in another's place
    assert len(pairs.skipped) == len(bad)
    named = [where for where, _ in pairs.skipped]
    for name in bad:  # lazily read shards name an unreadable image by its shard and byte offset
        key = name.split(".")[0]
        assert any(key in where for where in named) or (source, load) == ("wds", "lazy"), name
    if source == "wds":
        assert all(".tar" in where for where in named)


@pytest.mark.parametrize("source, load", [("csv", "lazy"), ("wds", "memory"), ("wds", "lazy")])
def test_skip_rate_threshold_for_every_source_and_load_mode(tmp_path, source, load):
    """(CSV in memory: test_files_dataset.) 2 unreadable of 100: refused at the default 1 % with a
    message naming the rate and the parameter; at 5 % the 98 others are each used once."""
    from poisonbench.datasets.files import Files

    spec, _ = write_pairs(tmp_path, source, 98, bad={"empty.png": b"", "junk.png": b"junk"}, missing=False)
    params = {"train": spec, "image_size": 8, "n_heldout": 10, "n_probe": 100, "n_eval": 100, "load": load}
    with pytest.raises(ValueError, match=r"2 of 100 images \(2.0%\) cannot be read.*max_skip_rate=0.01.*"
                                         r"raise max_skip_rate"):
        Files(DATASETS.params("files", params)).load(0)
    data = Files(DATASETS.params("files", {**params, "max_skip_rate": 0.05})).load(0)
    assert data.skipped == 2 and len(data.train) + len(data.heldout) == 98
    for part in (data.train, data.heldout):
        for img, caption in zip(image_rows(part.images, len(part)), part.captions):
            assert caption == f"caption {row_of(img)}"
    kept = data.train.captions + data.heldout.captions
    assert sorted(kept) == sorted(f"caption {i}" for i in range(98))  # each pair exactly once


def test_skipped_images_are_counted_in_the_row_and_the_terminal(tmp_path, capsys):
    """One unreadable image of 200 (under the 1 % threshold): the cell runs, its row has
    n_skipped=1, and the terminal (or a grid cell's log) says so."""
    from poisonbench.cli import run_cell_here

    spec, _ = write_pairs(tmp_path, "csv", 199, bad={})  # the missing file is one of 200: 0.5 %
    cfg = resolve("none", "clip", "tiny", 0, dataset="files",
                  dataset_params={"train": spec, "n_train": 0, "n_heldout": 20, "n_eval": 100, "n_probe": 100})
    code = run_cell_here(cfg, tmp_path / "res", "cpu", False, False, True)
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.out + captured.err
    row = read_runs(tmp_path / "res").iloc[0]
    assert row["status"] == "ok" and row["n_skipped"] == 1 and row["n_train"] == 199 - 20
    assert "1 training image(s) could not be read and were left out (column n_skipped" in " ".join(captured.out.split())


# --- 2. captions: tokenised with the end-of-text token kept ------------------------------------

@pytest.mark.parametrize("model", sorted({p.model for p in PROFILES.values()}))
def test_tokenizer_truncates_long_captions_keeping_the_end_of_text_token(model):
    """The tokenizer the models train with (open_clip's, at the model's context length: 20 for the
    package's models, 77 for RN50): every caption starts with SOT and its last non-pad token is
    EOT, once; a caption longer than the context keeps its beginning; nothing else is lost."""
    import open_clip

    from poisonbench.models import register_model_configs

    register_model_configs()
    tok = open_clip.get_tokenizer(model)
    ctx = tok.context_length
    long_caption = " ".join(f"word{i}" for i in range(200))
    assert len(tok.encode(long_caption)) > 77
    tokens = tok(CAPTIONS + [long_caption])
    assert tokens.shape == (len(CAPTIONS) + 1, ctx) and tokens.dtype == torch.int64
    for caption, row in zip(CAPTIONS + [long_caption], tokens):
        used = row[row != 0]
        assert used[0] == tok.sot_token_id and used[-1] == tok.eot_token_id, repr(caption)
        assert (row == tok.eot_token_id).sum() == 1 and (row[len(used):] == 0).all(), repr(caption)
    assert tokens[-1, -1] == tok.eot_token_id  # truncated to the context, EOT in the last place
    assert tokens[-1, 1:-1].tolist() == tok.encode(long_caption)[: ctx - 2]
    assert tokens[CAPTIONS.index("")].tolist()[:3] == [tok.sot_token_id, tok.eot_token_id, 0]
    for text in ("emoji 👗👟 and accents café", "עברית مرحبا right to left"):
        assert tok.decode(tok.encode(text)).strip() == text  # emoji and right-to-left text are encoded, not lost
    if model == "poisonbench-tiny":  # the tokenizer the runner uses is this one
        from poisonbench.models import create_model

        assert torch.equal(create_model(model)[1](CAPTIONS + [long_caption]), tokens)


# --- 3. non-finite loss --------------------------------------------------------------------------

def test_huge_learning_rate_fails_the_cell_with_the_step_and_stores_nothing_partial(tmp_path, capsys):
    """`bench run -p tiny --lr 1e9 --epochs 1`, in this process: the loss becomes NaN, the cell
    stops and is recorded as failed with the step and the reason; no ok row, no metric, no half file."""
    from poisonbench.cli import run_cell_here

    res = tmp_path / "res"
    cfg = resolve("badnet", "clip", "tiny", lr=1e9, epochs=1)
    code = run_cell_here(cfg, res, "cpu", False, False, True)
    err = " ".join(capsys.readouterr().err.split())
    assert code == EXIT_FAILED
    assert re.search(r"run failed: NonFiniteLossError: non-finite loss nan at step \d+ \(epoch 1\); lower the "
                     r"learning rate \(recorded with status=failed", err), err
    assert [p.name for p in runs_dir(res).iterdir()] == [f"{cfg.run_id}.parquet"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = read_runs(res)
    row = df.iloc[0]
    assert len(df) == 1 and row["status"] == "failed"
    assert re.fullmatch(r"NonFiniteLossError: non-finite loss nan at step \d+ \(epoch 1\); lower the learning rate",
                        row["error"])
    assert "clean_top1" not in df.columns and "asr" in df.columns and row["asr"] is None  # no number recorded
    assert not has_finished_row(res, cfg.run_id) and state(cfg, res) == "failed"
    assert temp_files(res) == []


def test_nan_loss_stops_training_at_that_step_and_keeps_the_last_complete_checkpoint(tmp_path, monkeypatch):
    """A loss that turns NaN at the second step of epoch 2 (of 3): NonFiniteLossError names that
    step, no further step is trained, the row says failed at that step, and epoch 1's checkpoint
    is left whole and finite for the next run."""
    from poisonbench.defenses.base import Defense
    from poisonbench.runner import run_cell

    real_loss, calls, bad_step = Defense.loss, [], []

    def loss(self, image_emb, text_emb, logit_scale, st):
        calls.append((st.epoch, st.step))
        out = real_loss(self, image_emb, text_emb, logit_scale, st)
        if st.epoch == 2 and sum(e == 2 for e, _ in calls) == 2:  # the second step of epoch 2
            bad_step.append(st.step)
            return out * float("nan")
        return out

    monkeypatch.setattr(Defense, "loss", loss)
    res = tmp_path / "res"
    cfg = resolve("badnet", "clip", "tiny", epochs=3)
    with pytest.raises(NonFiniteLossError) as e:
        run_cell(cfg, res, device="cpu", progress=False)
    assert e.value.step == bad_step[0] and e.value.epoch == 2
    assert calls[-1] == (2, bad_step[0])  # nothing trained after the NaN
    row = read_runs(res).iloc[0]
    assert row["status"] == "failed" and f"at step {bad_step[0]} (epoch 2)" in row["error"]
    state_ = load_checkpoint(res / "checkpoints" / cfg.run_id / "last.pt")  # epoch 1's, complete and finite
    assert state_["epoch"] == 1 and all(torch.isfinite(v).all() for v in state_["model"].values())
    assert temp_files(res) == []


# --- 4. kill -9 in the middle of a write ---------------------------------------------------------

# the start of both kill scripts: cut a file written in full to its first half (on disk), then kill -9
HALVE_THEN_DIE = r"""
import os, signal


def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)


def halve_then_die(path):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    die()
"""

KILL_ROW = HALVE_THEN_DIE + r"""
import json, sys
import pyarrow.parquet as pq
from poisonbench import store, utils

results, point, row = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if point == "mid-write":
    real = pq.write_table

    def half_then_die(table, where, **kw):
        real(table, where, **kw)
        halve_then_die(where)

    pq.write_table = half_then_die
else:  # the temp file is complete, the rename never happens
    utils.os.replace = die
store.write_row(row, results)
"""


def stored_row(run_id, status, top1):
    return {"run_id": run_id, "status": status, "attack": "badnet", "defense": "clip", "profile": "tiny", "seed": 0,
            "clean_top1": top1, "asr": 0.5, "asr_n": 10}


@pytest.mark.parametrize("point", ["mid-write", "before-rename"])
def test_sigkill_while_writing_a_row_leaves_the_previous_row_untouched(tmp_path, point):
    path = write_row(stored_row("cell", "failed", None), tmp_path)
    before = path.read_bytes()
    new = stored_row("cell", "ok", 0.75)
    proc = subprocess.run([sys.executable, "-c", KILL_ROW, str(tmp_path), point, json.dumps(new)],
                          env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert path.read_bytes() == before  # the target was never half-written
    (leftover,) = temp_files(tmp_path)  # the killed writer's temp file ...
    assert leftover.parent == path.parent and leftover.name.startswith(".cell.parquet.")
    if point == "mid-write":
        with pytest.raises(pa.ArrowException):
            pq.read_table(leftover)  # ... is really partial
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ... and never read, not even to warn about it
        df = read_runs(tmp_path)
    assert df.to_dict("records") == [{**stored_row("cell", "failed", None), "clean_top1": None}]
    assert not has_finished_row(tmp_path, "cell")
    assert remove_temp_files(path) == [leftover] and temp_files(tmp_path) == []
    assert path.read_bytes() == before


KILL_CHECKPOINT = HALVE_THEN_DIE + r"""
import sys
from poisonbench import train
from poisonbench.config import resolve
from poisonbench.runner import run_cell

real, writes = train.atomic_write, []


def atomic_write(path, write):
    writes.append(path)
    if len(writes) < 2:
        return real(path, write)

    def half_then_die(tmp):  # epoch 2's checkpoint: half of it, then kill -9
        write(tmp)
        halve_then_die(tmp)

    real(path, half_then_die)


train.atomic_write = atomic_write
run_cell(resolve("badnet", "clip", "tiny", epochs=2), sys.argv[1], device="cpu", progress=False)
"""


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_last_complete_one(tmp_path):
    from poisonbench.runner import run_cell

    res = tmp_path / "res"
    cfg = resolve("badnet", "clip", "tiny", epochs=2)
    proc = subprocess.run([sys.executable, "-c", KILL_CHECKPOINT, str(res)], env=SUBPROCESS_ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ckpt = res / "checkpoints" / cfg.run_id / "last.pt"
    assert load_checkpoint(ckpt)["epoch"] == 1  # epoch 1's checkpoint, whole
    assert [p.parent for p in temp_files(res)] == [ckpt.parent]  # epoch 2's half, beside it
    assert read_runs(res).empty and state(cfg, res) == "pending"  # no row; the lock died with the process

    row = run_cell(cfg, res, device="cpu", progress=False)
    assert row["status"] == "ok" and row["resumed_from_epoch"] == 1
    assert temp_files(res) == [] and not ckpt.parent.exists()  # the half checkpoint was removed


# --- 5. two `bench run` on one store at once ----------------------------------------------------

SLOW_CHECKPOINTS = """
import os, time
import poisonbench.train as train

real_save = train.save_checkpoint


def save_checkpoint(*args, **kwargs):  # a second of sleep per epoch: the two runs' trainings overlap
    time.sleep(float(os.environ["POISONBENCH_TEST_EPOCH_SLEEP"]))
    return real_save(*args, **kwargs)


train.save_checkpoint = save_checkpoint
"""


@pytest.mark.slow
def test_two_bench_runs_on_one_store_at_once_lose_and_duplicate_nothing(tmp_path):
    """Two overlapping grids (badnet x clip in both, first) start together on one results folder:
    every cell ends with exactly one ok row, and the common cell was trained once (the other
    process found it running, or done). Every process sleeps a second per epoch (sitecustomize),
    which costs no CPU but makes the trainings of the common cell overlap."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(SLOW_CHECKPOINTS)
    env = {**SUBPROCESS_ENV, "POISONBENCH_TEST_EPOCH_SLEEP": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    res = tmp_path / "res"
    grids = ["badnet,blended", "badnet,sig"]
    procs = [subprocess.Popen([sys.executable, "-m", "poisonbench", "run", "-p", "tiny", "-a", attacks, "-d", "clip",
                               "--results", str(res)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for attacks in grids]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    cells = {c.run_id for attacks in grids for c in expand(GridSpec(attacks, "clip", "tiny", "0"))}
    assert len(cells) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        df = read_runs(res)
    assert sorted(df["run_id"]) == sorted(cells) and set(df["status"]) == {"ok"}
    assert sorted(p.name for p in runs_dir(res).iterdir()) == sorted(f"{c}.parquet" for c in cells)
    assert sum(out.count("epoch 2/2: loss") for out in outs) == len(cells), outs  # each cell trained once
    assert temp_files(res) == [] and not list((res / "checkpoints").glob("*/last.pt"))


# --- 7. results of an older schema --------------------------------------------------------------

def old_schema_store(res):
    """Rows as older versions wrote them: no clean_top5, poison_rate, asr_n, schema metadata;
    one without seed, profile or config; an unknown column; a current row; a note."""
    runs = runs_dir(res)
    runs.mkdir(parents=True)

    def config(seed):
        return json.dumps({"attack": "badnet", "defense": "clip", "profile": "tiny", "seed": seed,
                           "attack_params": {"n_poison": 100}})

    pq.write_table(pa.Table.from_pylist([{
        "run_id": "old1", "status": "ok", "attack": "badnet", "defense": "clip", "profile": "tiny", "seed": 0,
        "config": config(0), "clean_top1": 0.5, "asr": 0.8, "n_poison": 100, "legacy_metric": "x"}]),
        runs / "old1.parquet")
    pq.write_table(pa.Table.from_pylist([{
        "run_id": "old2", "status": "ok", "attack": "blended", "defense": "roclip", "clean_top1": 0.4, "asr": 0.1}]),
        runs / "old2.parquet")
    write_row({"run_id": "new", "status": "ok", "attack": "badnet", "defense": "clip", "profile": "tiny", "seed": 1,
               "config": config(1), "clean_top1": 0.6, "clean_top5": 0.9, "asr": 0.7, "asr_n": 100, "n_poison": 100,
               "poison_rate": 0.1, "linear_probe_top1": 0.5, "wall_s": 3.0}, res)
    (runs / "notes.txt").write_text("not a result")


def test_a_store_with_rows_of_an_older_schema_still_reports(tmp_path):
    from poisonbench.report import load_leaderboard, to_html, to_text

    res = tmp_path / "res"
    old_schema_store(res)
    with pytest.warns(UserWarning, match=r"skipping .*notes.txt: not a .parquet file"):
        board = load_leaderboard(res).set_index(["attack", "defense"])
    badnet, blended = board.loc[("badnet", "clip")], board.loc[("blended", "roclip")]
    assert badnet["seeds"] == 2 and badnet["clean_top1"] == pytest.approx(0.55) and badnet["clean_top5"] == 0.9
    assert badnet["asr"] == pytest.approx(0.75) and badnet["n_poison"] == 100
    assert blended["seeds"] == 1 and blended["clean_top1"] == 0.4 and np.isnan(blended["clean_top5"])
    assert blended["profile"] == "?"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "3 runs in 2 settings" in to_html(load_leaderboard(res))
        assert "## blended" in to_text(load_leaderboard(res), "md")

    out = CliRunner().invoke(main, ["report", "--results", str(res), "--format", "json", "--no-plots"])
    assert out.exit_code == 0, out.output
    assert "notes.txt:nota.parquetfile" in re.sub(r"\s", "", out.stderr)  # rich may wrap the long path
    records = {(r["attack"], r["defense"]): r for r in json.loads(out.stdout)}
    assert records[("blended", "roclip")]["seeds"] == 1 and records[("badnet", "clip")]["seeds"] == 2
    out = CliRunner().invoke(main, ["report", "--results", str(res)])  # the terminal tables and the plots
    assert out.exit_code == 0, out.output
    assert "blended" in out.stdout and (res / "plots" / "asr_vs_clean.png").is_file()


def test_a_done_cell_whose_row_is_of_an_older_schema_is_shown(tmp_path):
    """`bench run` of a cell already done shows its stored row; one without clean_top5,
    poison_rate or wall_s shows '-' there (it raised KeyError)."""
    res = tmp_path / "res"
    cfg = resolve("badnet", "clip", "tiny")
    write_row({"run_id": cfg.run_id, "status": "ok", "attack": "badnet", "defense": "clip", "profile": "tiny",
               "seed": 0, "clean_top1": 0.5, "asr": 0.25, "n_poison": 100}, res)
    out = CliRunner().invoke(main, ["run", "-p", "tiny", "--results", str(res)])
    assert out.exit_code == 0, out.output
    assert "already done" in out.output and "50.0%" in out.output and "25.0%" in out.output


# --- 9. `bench report` on an empty store ---------------------------------------------------------

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


def test_a_decompression_bomb_is_skipped_like_any_unreadable_image(monkeypatch):
    from PIL import Image as PILImage

    from poisonbench.datasets.files import decode_image

    buf = io.BytesIO()
    PILImage.new("RGB", (8, 8)).save(buf, "PNG")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10)  # 64 pixels > 2 x 10: PIL's DecompressionBombError
    with pytest.raises(ValueError, match="not a readable image"):
        decode_image(buf.getvalue(), 8)


@pytest.mark.parametrize("cut", ["block boundary", "inside a member", "no end marker"])
def test_a_shard_cut_short_is_named_before_training(tmp_path, cut):
    from poisonbench.datasets.files import check_shard

    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(6):
            data = bytes(range(256)) * 8  # 2048 bytes: 4 blocks per member
            info = tarfile.TarInfo(f"{i:05d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    check_shard(str(path))  # the whole shard passes
    data = path.read_bytes()
    keep = {"block boundary": 512 * 10, "inside a member": 512 * 10 + 700, "no end marker": 6 * 5 * 512}[cut]
    path.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=r"00000.tar is not a complete tar file"):
        check_shard(str(path))


def test_status_and_report_survive_junk_or_odd_rows_at_a_cells_own_name(tmp_path):
    from poisonbench.display import grid_table
    from poisonbench.report import load_leaderboard

    cfgs = [resolve("badnet", "clip", "tiny"), resolve("badnet", "roclip", "tiny")]
    res = tmp_path / "res"
    runs_dir(res).mkdir(parents=True)
    (runs_dir(res) / f"{cfgs[0].run_id}.parquet").write_text("garbage")
    write_row({"run_id": cfgs[1].run_id, "status": "ok", "attack": "badnet", "defense": "roclip", "asr": 0.1,
               "config": "not json"}, res)  # no clean_top1, no seed, a config that is not JSON
    table = grid_table(cfgs, res)
    assert table.row_count == 2
    with pytest.warns(UserWarning, match="not JSON"):
        board = load_leaderboard(res)
    assert len(board) == 1 and board.iloc[0]["asr"] == pytest.approx(0.1)


def test_a_cell_killed_after_writing_its_ok_row_is_reported_done_not_failed(tmp_path):
    from poisonbench.display import cell_line
    from poisonbench.grid import CellOutcome

    cfg, res = resolve("badnet", "clip", "tiny"), tmp_path / "res"
    write_row({"run_id": cfg.run_id, "status": "ok", "attack": "badnet", "defense": "clip", "clean_top1": 0.5,
               "asr": 0.9, "wall_s": 3.0}, res)
    line = cell_line(CellOutcome(cfg, -9, None), res)
    assert line.startswith("[yellow]done") and "exit -9" in line and "nothing recorded" not in line
    (runs_dir(res) / f"{cfg.run_id}.parquet").unlink()
    assert "nothing recorded, retried next time" in cell_line(CellOutcome(cfg, -9, None), res)
