"""CSV and WebDataset pairs: odd captions read back exactly, images of every mode decoded to the right
RGB, bad images (and shards cut short) skipped, counted and named, never replaced by another sample,
through read_pairs and the `files` dataset in memory and lazily."""
import csv
import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from poisonbench.config import resolve
from poisonbench.datasets.files import decode_image, read_csv_pairs, read_wds_pairs
from poisonbench.grid import EXIT_OK
from poisonbench.registry import DATASETS
from poisonbench.store import read_runs

CAPTIONS = [
    "plain caption",
    'a "quoted", comma, caption',
    "tab\tinside",
    "new\nline and\r\ncarriage return",
    "emoji 👗👟 and accents: café",
    "עברית مرحبا right-to-left",
    " ".join(["long"] * 120),
    "",
    "NA",
    "  leading and trailing spaces  ",
]


def png(mode="RGB", value=128, side=20):
    arr = np.full((side, side, 3) if mode in ("RGB", "CMYK_SRC") else (side, side), value, dtype=np.uint8)
    buf = io.BytesIO()
    if mode == "I;16":
        Image.fromarray(np.full((side, side), value * 257, dtype=np.uint16)).save(buf, "PNG")
    elif mode == "RGBA":
        Image.fromarray(np.dstack([np.full((side, side), value, np.uint8)] * 3 + [np.zeros((side, side), np.uint8)]),
                        "RGBA").save(buf, "PNG")
    elif mode == "CMYK":
        Image.fromarray(np.full((side, side, 3), value, np.uint8)).convert("CMYK").save(buf, "JPEG", quality=100)
    else:
        Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


GOOD = [("a.png", png("RGB", 10)), ("b.png", png("L", 20)), ("c.png", png("RGBA", 30)), ("d.jpg", png("CMYK", 40)),
        ("e.png", png("I;16", 50)), ("f.png", png("RGB", 60)), ("g.png", png("RGB", 70)), ("h.png", png("RGB", 80)),
        ("i.png", png("RGB", 90)), ("j.png", png("P", 100))]
assert len(GOOD) == len(CAPTIONS)  # one caption per image
BAD = [("empty.png", b""), ("junk.png", b"not an image at all"), ("trunc.png", png("RGB", 1, side=64)[:60])]


def test_modes_decode_to_rgb_at_the_asked_size():
    for name, data in GOOD:
        x = decode_image(data, 8)
        assert x.dtype == torch.uint8 and x.shape == (3, 8, 8), name
    assert decode_image(png("I;16", 50), 8).float().mean().item() == pytest.approx(50, abs=1)  # 16-bit scaled to 8
    for name, data in BAD:
        with pytest.raises(ValueError):
            decode_image(data, 8)


def test_csv_reads_captions_exactly_and_skips_bad_images(tmp_path):
    rows = list(zip([n for n, _ in GOOD], CAPTIONS))
    rows.insert(2, ("missing.png", "a file that does not exist"))
    for name, data in GOOD + BAD:
        (tmp_path / "img").mkdir(exist_ok=True)
        (tmp_path / "img" / name).write_bytes(data)
    rows += [(n, f"bad {n}") for n, _ in BAD]
    with open(tmp_path / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "title"])
        w.writerows((f"img/{n}", c) for n, c in rows)
    pairs = read_csv_pairs(tmp_path / "pairs.csv", size=8)
    assert pairs.captions == CAPTIONS  # order kept, nothing replaced, text exact
    assert pairs.images.shape == (len(GOOD), 3, 8, 8)
    assert [int(v) for v in pairs.images[:, 0, 4, 4]][:3] == [10, 20, 30]  # image i belongs to caption i
    assert len(pairs.skipped) == 1 + len(BAD)


def test_tsv_and_named_columns(tmp_path):
    (tmp_path / "x.png").write_bytes(png())
    (tmp_path / "p.tsv").write_text("caption\timage\nhello, world\tx.png\n", encoding="utf-8")
    pairs = read_csv_pairs(tmp_path / "p.tsv", image_key="image", caption_key="caption", size=4)
    assert pairs.captions == ["hello, world"]
    with pytest.raises(ValueError, match="columns: caption, image"):
        read_csv_pairs(tmp_path / "p.tsv", size=4)


def test_open_clips_tab_separated_train_csv_is_read_as_it_is(tmp_path):
    """open_clip's trainer reads a tab-separated train.csv with columns filepath and title."""
    (tmp_path / "x.png").write_bytes(png())
    (tmp_path / "train.csv").write_text("filepath\ttitle\nx.png\ta shirt, folded\n", encoding="utf-8")
    assert read_csv_pairs(tmp_path / "train.csv", size=4).captions == ["a shirt, folded"]
    (tmp_path / "comma.csv").write_text('filepath,title\nx.png,"a shirt\tfolded"\n', encoding="utf-8")
    assert read_csv_pairs(tmp_path / "comma.csv", size=4).captions == ["a shirt\tfolded"]


@pytest.mark.parametrize("name, sep", [("tab", "\t"), ("comma", ","), ("semicolon", ";"), ("pipe", "|")])
def test_delimiters_are_given_by_name(tmp_path, name, sep):
    (tmp_path / "x.png").write_bytes(png())
    (tmp_path / "p.txt").write_text(f"filepath{sep}title\nx.png{sep}hello\n", encoding="utf-8")
    assert read_csv_pairs(tmp_path / "p.txt", delimiter=name, size=4).captions == ["hello"]


def test_a_delimiter_that_is_not_a_name_and_keys_on_shards_are_refused():
    for bad in (";", "\t", "t", "TAB"):
        with pytest.raises(ValueError, match="auto, tab, comma, semicolon, pipe"):
            DATASETS.get("files")(DATASETS.params("files", {"train": "csv:x.csv", "delimiter": bad}))
    with pytest.raises(ValueError, match="drop them for wds"):
        DATASETS.get("files")(DATASETS.params("files", {"train": "wds:a.tar", "caption_key": "json.caption"}))


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_read_back_exactly(tmp_path):
    samples = [(f"{i:05d}", {n.split(".")[-1]: d, "txt": c.encode()}) for i, ((n, d), c) in enumerate(zip(GOOD, CAPTIONS))]
    bad = [(f"9{i:04d}", {"png": d, "txt": b"bad"}) for i, (_, d) in enumerate(BAD)] + [("99999", {"txt": b"no image"})]
    write_shard(tmp_path / "00000.tar", samples[:5] + bad[:2])
    write_shard(tmp_path / "00001.tar", samples[5:] + bad[2:])
    pairs = read_wds_pairs(str(tmp_path / "{00000..00001}.tar"), size=8)
    assert pairs.captions == CAPTIONS and pairs.images.shape == (len(GOOD), 3, 8, 8)
    assert len(pairs.skipped) == len(bad)
    with pytest.raises(FileNotFoundError):
        read_wds_pairs(str(tmp_path / "{00000..00002}.tar"))


# --- every image mode, and unreadable images skipped, counted and named through the `files` dataset ---

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
