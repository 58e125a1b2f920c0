"""Data tests: every contract violation is quarantined with its reason; the source is untouched."""

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from segloop.data.validate import validate_folder

K = 4  # classes


def _img(path, size=(40, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(path.name)) % 2**32)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode=mode).save(path)


def _mask(path, size=(40, 30), values=(0, 1, 2, 3, 255)):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.resize(np.array(values, dtype=np.uint8), size[1] * size[0]).reshape(size[1], size[0])
    Image.fromarray(arr, mode="L").save(path)


def _tree_digest(root):
    return {
        str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def messy(tmp_path):
    src = tmp_path / "batch"
    im, mk = src / "images", src / "masks"
    _img(im / "good_rgb.png")
    _mask(mk / "good_rgb.png")
    _img(im / "good_gray.jpg", mode="L")
    _mask(mk / "good_gray.png")
    _img(im / "good_palette.png")
    pal = Image.fromarray(np.zeros((30, 40), dtype=np.uint8), mode="P")
    pal.putpalette([0, 0, 0, 255, 0, 0] * 128)
    pal.save(mk / "good_palette.png")
    (im / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    _mask(mk / "corrupt.png")
    _img(im / "truncated.png", size=(64, 64))
    data = (im / "truncated.png").read_bytes()
    (im / "truncated.png").write_bytes(data[: len(data) // 2])
    _mask(mk / "truncated.png", size=(64, 64))
    _img(im / "no_mask.png")
    _img(im / "size_mismatch.png")
    _mask(mk / "size_mismatch.png", size=(41, 30))
    _img(im / "bad_values.png")
    _mask(mk / "bad_values.png", values=(0, 1, 7, 254))
    _img(im / "rgb_mask.png")
    _img(mk / "rgb_mask.png")
    _img(im / "dup.png")
    _img(im / "dup.jpg")
    _mask(mk / "dup.png")
    _mask(mk / "orphan.png")
    (im / "notes.txt").write_text("not an image")
    return src


def test_each_reason_is_quarantined(messy, tmp_path):
    before = _tree_digest(messy)
    out, q = tmp_path / "accepted", tmp_path / "quarantine"
    result = validate_folder(messy, out, q, K)

    assert sorted(img.stem for img, _ in result.accepted) == ["good_gray", "good_palette", "good_rgb"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["good_gray.jpg", "good_palette.png", "good_rgb.png"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["good_gray.png", "good_palette.png", "good_rgb.png"]

    lines = [json.loads(line) for line in (q / "reasons.jsonl").read_text().splitlines()]
    reasons = {(r["file"].split("/")[-2] + "/" + r["file"].split("/")[-1]): r["reason"] for r in lines}
    expect = {
        "images/corrupt.png": "unreadable image",
        "images/truncated.png": "unreadable image",
        "images/no_mask.png": "mask missing",
        "images/size_mismatch.png": "image/mask size mismatch",
        "images/bad_values.png": "mask values out of range: [7, 254]",
        "images/rgb_mask.png": "mask not single-channel",
        "images/dup.png": "duplicate stem 'dup'",
        "images/dup.jpg": "duplicate stem 'dup'",
        "masks/orphan.png": "image missing for mask",
        "images/notes.txt": "unsupported image file type",
        "masks/corrupt.png": "pair rejected: unreadable image",
        "masks/size_mismatch.png": "pair rejected: image/mask size mismatch",
    }
    for name, words in expect.items():
        assert words in reasons[name], (name, reasons.get(name))
    # every rejected file has a quarantined copy, and nothing left the source
    for line in lines:
        assert (q / line["quarantined_as"].split(str(q) + "/")[1]).is_file()
    assert _tree_digest(messy) == before
    # accepted + rejected account for every source file except the accepted masks' dup mask
    assert len(lines) + 2 * len(result.accepted) == len(before)


def test_quarantine_appends_and_never_overwrites(messy, tmp_path):
    q = tmp_path / "q"
    validate_folder(messy, tmp_path / "a1", q, K)
    n1 = len((q / "reasons.jsonl").read_text().splitlines())
    validate_folder(messy, tmp_path / "a2", q, K)
    lines = (q / "reasons.jsonl").read_text().splitlines()
    assert len(lines) == 2 * n1
    assert (q / "images" / "corrupt.png").is_file() and (q / "images" / "corrupt.1.png").is_file()


def test_refuses_non_empty_destination(messy, tmp_path):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    (out / "images" / "keep.png").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not empty"):
        validate_folder(messy, out, tmp_path / "q", K)
    assert (out / "images" / "keep.png").read_bytes() == b"precious"


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty folder"):
        validate_folder(tmp_path / "empty", tmp_path / "out", tmp_path / "q", K)


def test_cli_exit_codes(messy, tmp_path, cli_env):
    from conftest import ROOT

    def run(src, name):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "segloop.cli",
                "validate",
                str(src),
                "--params",
                str(ROOT / "params.yaml"),
                "--out",
                str(tmp_path / name),
                "--quarantine",
                str(tmp_path / f"q_{name}"),
            ],
            capture_output=True,
            text=True,
            env=cli_env,
        )

    ok = run(messy, "ok")
    assert ok.returncode == 0, ok.stderr
    assert "accepted 3 pairs" in ok.stdout
    bad = tmp_path / "all_bad"
    shutil.copytree(messy, bad)
    for name in ("good_rgb.png", "good_gray.jpg", "good_palette.png"):
        (bad / "images" / name).unlink()
    nothing = run(bad, "nothing")
    assert nothing.returncode == 1
    assert "nothing accepted" in nothing.stderr


def test_the_file_only_commands_start_without_torch(messy, tmp_path, cli_env):
    """generate, validate and split handle files only: importing torch would add ~10 s to
    each of them (and to every such DVC stage) on a 2-core CPU."""
    from conftest import ROOT

    params, out = str(ROOT / "params.yaml"), tmp_path
    script = f"""
import sys
from segloop import cli
for argv in (["validate", {str(messy)!r}, "--out", {str(out / "ok")!r}, "--quarantine", {str(out / "q")!r}],
             ["split", {str(out / "ok")!r}, "--out", {str(out / "split")!r}],
             ["generate", "--domain", "fog", "--n", "4", "--out", {str(out / "gen")!r}]):
    assert cli.main(argv + ["--params", {params!r}]) == 0, argv
print(sorted(m for m in ("torch", "torchvision", "mlflow", "matplotlib") if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli_env)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]"
    assert len(list((out / "split" / "train" / "images").iterdir())) >= 1
    assert len(list((out / "gen" / "images").iterdir())) == 4
