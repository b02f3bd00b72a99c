"""CSV and WebDataset pairs: odd captions read back exactly, odd images decoded, bad images skipped
and counted (never replaced by another sample)."""
import csv
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from poisonbench.datasets.files import decode_image, read_csv_pairs, read_wds_pairs

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
