"""lg-shard on real files: round trip, ImageNet layouts, bad inputs, errors, determinism, crash resume."""

import io
import json
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from data_prep.images import inspect_image, jpeg_structure
from tests.conftest import REPO, jpeg_bytes, read_manifest, run_cli, write_file


def tar_samples(out, split):
    """{key: {ext: bytes}} of every shard in the manifest, read with the standard tarfile module."""
    samples = {}
    for shard in read_manifest(out, split)["shards"]:
        with tarfile.open(Path(out) / shard["name"]) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def shard(src, out, *args):
    return run_cli("data_prep.shard", src, out, *args)


def test_round_trip_keeps_bytes_labels_and_every_image_once(demo_images, demo_shards):
    manifest = read_manifest(demo_shards, "train")
    samples = tar_samples(demo_shards, "train")
    sources = sorted(p.relative_to(demo_images).as_posix() for p in (demo_images / "train").rglob("*.jpg"))
    assert len(sources) == 1438 and manifest["num_samples"] == len(samples) == len(sources)
    assert manifest["classes"] == [str(d) for d in range(10)] and manifest["skipped"] == []
    seen = []
    for sample in samples.values():
        meta = json.loads(sample["json"])
        seen.append(meta["path"])
        assert sample["jpg"] == (demo_images / meta["path"]).read_bytes()
        assert meta["class"] == Path(meta["path"]).parent.name
        assert manifest["classes"][int(sample["cls"])] == meta["class"]
    assert sorted(seen) == sources
    for info in manifest["shards"]:
        with tarfile.open(demo_shards / info["name"]) as tar:
            classes = {tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".cls")}
        assert info["num_samples"] == 50 or info is manifest["shards"][-1]
        assert len(classes) >= 5, "shards must mix classes (the file list is shuffled before sharding)"


@pytest.mark.slow
def test_same_seed_gives_identical_shards_with_any_worker_count(demo_images, tmp_path):
    hashes = {}
    for name, seed, workers in (("a", 0, 1), ("b", 0, 2), ("c", 1, 2)):
        result = shard(
            demo_images,
            tmp_path / name,
            "--split",
            "val",
            "--layout",
            "imagefolder",
            "--max-per-shard",
            100,
            "--seed",
            seed,
            "--workers",
            workers,
        )
        assert result.returncode == 0, result.stderr
        hashes[name] = [s["sha256"] for s in read_manifest(tmp_path / name, "val")["shards"]]
    assert hashes["a"] == hashes["b"]
    assert hashes["a"] != hashes["c"]


def test_shard_size_limit(demo_images, tmp_path):
    result = shard(demo_images, tmp_path, "--split", "val", "--layout", "imagefolder", "--shard-size-mb", 0.2)
    assert result.returncode == 0, result.stderr
    shards = read_manifest(tmp_path, "val")["shards"]
    assert len(shards) > 1 and sum(s["num_samples"] for s in shards) == 359
    assert all(s["bytes"] <= 0.2e6 + 10240 for s in shards)


def write_meta_mat(path, wnid_of_id):
    """A devkit-style meta.mat; the extra non-leaf synset must be ignored."""
    dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
    records = np.zeros(len(wnid_of_id) + 1, dtype=dtype)
    for i, (ilsvrc_id, wnid) in enumerate(sorted(wnid_of_id.items())):
        records[i] = (ilsvrc_id, wnid, "words", 0)
    records[-1] = (len(wnid_of_id) + 1, "n09999999", "a parent synset", 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(path, {"synsets": records})


# ILSVRC2012_IDs in the devkit are not in sorted wnid order: ID 1 is the last wnid here.
WNID_OF_ID = {1: "n03000000", 2: "n01000000", 3: "n02000000"}
SORTED_WNIDS = sorted(WNID_OF_ID.values())
VAL_IDS = [1, 2, 3, 1, 3, 2]  # ground truth of ILSVRC2012_val_00000001 .. 06


def fake_imagenet(root):
    for c, wnid in enumerate(SORTED_WNIDS):
        for i in range(3):
            write_file(root / "train" / wnid / f"{wnid}_{i}.JPEG", jpeg_bytes(seed=10 * c + i))
    for number in range(1, len(VAL_IDS) + 1):
        write_file(root / "val" / f"ILSVRC2012_val_{number:08d}.JPEG", jpeg_bytes(seed=100 + number))


def check_val_labels(out):
    manifest = read_manifest(out, "val")
    assert manifest["classes"] == SORTED_WNIDS
    for sample in tar_samples(out, "val").values():
        meta = json.loads(sample["json"])
        number = int(Path(meta["path"]).stem.split("_")[-1])
        wnid = WNID_OF_ID[VAL_IDS[number - 1]]
        assert meta["class"] == wnid and int(sample["cls"]) == SORTED_WNIDS.index(wnid)
    return manifest


def test_imagenet_train_and_flat_val_with_devkit_labels(tmp_path):
    src, out = tmp_path / "imagenet", tmp_path / "out"
    fake_imagenet(src)
    devkit = src / "ILSVRC2012_devkit_t12" / "data"
    write_file(devkit / "ILSVRC2012_validation_ground_truth.txt", "\n".join(map(str, VAL_IDS)).encode())
    write_meta_mat(devkit / "meta.mat", WNID_OF_ID)
    for split in ("train", "val"):
        result = shard(src, out, "--split", split, "--max-per-shard", 4)
        assert result.returncode == 0, result.stderr
    assert read_manifest(out, "train")["classes"] == SORTED_WNIDS
    assert check_val_labels(out)["num_samples"] == len(VAL_IDS)


def test_flat_val_with_kaggle_csv_lists_unlabeled_images(tmp_path):
    src, out = tmp_path / "imagenet", tmp_path / "out"
    fake_imagenet(src)
    rows = [
        f"ILSVRC2012_val_{n:08d},{WNID_OF_ID[i]} 1 2 3 4 {WNID_OF_ID[i]} 5 6 7 8"
        for n, i in enumerate(VAL_IDS, 1)
    ]
    write_file(src / "LOC_val_solution.csv", ("ImageId,PredictionString\n" + "\n".join(rows)).encode())
    write_file(src / "val" / "ILSVRC2012_val_00000099.JPEG", jpeg_bytes())
    result = shard(src, out, "--split", "val")
    assert result.returncode == 0, result.stderr
    manifest = check_val_labels(out)
    assert manifest["skipped"] == [
        {"path": "val/ILSVRC2012_val_00000099.JPEG", "reason": f"no label in {src / 'LOC_val_solution.csv'}"}
    ]


def test_sorted_wnid_list_for_devkit_ids_is_refused(tmp_path):
    src = tmp_path / "imagenet"
    fake_imagenet(src)
    labels = write_file(tmp_path / "gt.txt", b"1\n2\n3\n1\n3\n2\n")
    synsets = write_file(tmp_path / "LOC_synset_mapping.txt", "\n".join(SORTED_WNIDS).encode())
    result = shard(src, tmp_path / "out", "--split", "val", "--val-labels", labels, "--synsets", synsets)
    assert result.returncode == 2 and "sorted order" in result.stderr and "Traceback" not in result.stderr


def truncated_with_exif_thumbnail():
    """A JPEG whose APP1 segment embeds a complete thumbnail JPEG (with its own EOI), cut mid-scan."""
    full, thumbnail = jpeg_bytes(size=(64, 48), seed=5), jpeg_bytes(size=(8, 8), seed=6)
    payload = b"Exif\0\0" + thumbnail
    app1 = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    return (full[:2] + app1 + full[2:])[: len(app1) + len(full) // 2]


def test_inspect_image_needs_the_image_own_end_marker():
    assert inspect_image(jpeg_bytes()) == (None, False)
    assert jpeg_structure(truncated_with_exif_thumbnail()) == (3, False)
    assert "truncated" in inspect_image(truncated_with_exif_thumbnail())[0]


@pytest.mark.parametrize("mode, needs_conversion", [("RGB", False), ("L", True), ("CMYK", True)])
def test_structure_check_agrees_with_a_full_decode(mode, needs_conversion):
    data = jpeg_bytes(mode=mode)
    assert jpeg_structure(data) == ({"RGB": 3, "L": 1, "CMYK": 4}[mode], True)
    assert inspect_image(data) == inspect_image(data, full_decode=True) == (None, needs_conversion)


def test_bad_files_are_skipped_and_odd_images_kept(tmp_path):
    src = tmp_path / "src"
    good, full = jpeg_bytes(seed=1), jpeg_bytes(size=(64, 48), seed=2)
    odd = {
        "cmyk.jpg": jpeg_bytes(mode="CMYK"),
        "gray.jpg": jpeg_bytes(mode="L"),
        "png_named.JPEG": jpeg_bytes(fmt="PNG"),
    }
    bad = {
        "truncated.jpg": full[: len(full) // 2],
        "empty.jpg": b"",
        "text.JPEG": b"this is not an image\n",
        "thumbnail_truncated.jpg": truncated_with_exif_thumbnail(),
    }
    write_file(src / "a" / "good.jpg", good)
    for name, data in {**odd, **bad}.items():
        write_file(src / ("b" if name in odd else "a") / name, data)
    for out, extra in ((tmp_path / "kept", []), (tmp_path / "reencoded", ["--reencode"])):
        result = shard(src, out, "--split", "train", "--layout", "imagefolder", *extra)
        assert result.returncode == 0, result.stderr
        manifest = read_manifest(out, "train")
        assert sorted(Path(s["path"]).name for s in manifest["skipped"]) == sorted(bad)
        reasons = {Path(s["path"]).name: s["reason"] for s in manifest["skipped"]}
        assert reasons["empty.jpg"] == "empty file" and "truncated" in reasons["truncated.jpg"]
        assert "not a decodable image" in reasons["text.JPEG"]
        stored = {
            Path(json.loads(s["json"])["path"]).name: s["jpg"] for s in tar_samples(out, "train").values()
        }
        assert sorted(stored) == sorted(["good.jpg", *odd]) and stored["good.jpg"] == good
        for name, data in odd.items():
            image = Image.open(io.BytesIO(stored[name]))
            if extra:
                assert (image.format, image.mode) == ("JPEG", "RGB")
            else:
                assert stored[name] == data
                image.convert("RGB").load()


@pytest.mark.parametrize("case", ["missing_src", "empty_class", "unwritable_out", "no_classes"])
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, case):
    src, out = tmp_path / "src", tmp_path / "out"
    write_file(src / "a" / "x.jpg", jpeg_bytes())
    if case == "missing_src":
        src, expected = tmp_path / "nowhere", str(tmp_path / "nowhere")
    elif case == "empty_class":
        (src / "b").mkdir()
        write_file(src / "b" / "notes.txt", b"no images here")
        expected = str(src / "b")
    elif case == "unwritable_out":
        out = write_file(tmp_path / "a_file", b"") / "out"
        expected = str(out)
    else:
        src = write_file(tmp_path / "flat" / "x.jpg", jpeg_bytes()).parent
        expected = "no class folders"
    result = shard(src, out, "--split", "train", "--layout", "imagefolder")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    if case == "missing_src":
        assert not out.exists(), "a failed run must not leave an empty OUT behind"
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("lg-shard: error: ") and expected in last_line, result.stderr


@pytest.mark.slow
def test_foreign_shards_in_out_are_refused(demo_images, tmp_path):
    common = ["--split", "val", "--layout", "imagefolder", "--max-per-shard", 100]
    assert shard(demo_images, tmp_path / "out", *common).returncode == 0
    again = shard(demo_images, tmp_path / "out", *common)
    assert again.returncode == 0 and "already complete" in again.stdout
    other_seed = shard(demo_images, tmp_path / "out", *common, "--seed", 7)
    assert other_seed.returncode == 2 and "different lg-shard command" in other_seed.stderr
    write_file(tmp_path / "other" / "val-000000.tar", b"someone else's shard")
    foreign = shard(demo_images, tmp_path / "other", *common)
    assert foreign.returncode == 2 and "not written by this command" in foreign.stderr


def many_images(root, count=1200):
    """`count` distinct 256x256 JPEGs (60 KB each) in 4 classes; slow enough to interrupt mid-way."""
    tiles = [jpeg_bytes(size=(256, 256), seed=s) for s in range(8)]
    for i in range(count):
        write_file(root / f"c{i % 4}" / f"{i:05d}.jpg", tiles[i % 8] + i.to_bytes(4, "big"))


def start_and_interrupt(src, out, sig):
    """Start lg-shard, send `sig` once two shards are complete; return the finished process."""
    command = [
        sys.executable,
        "-m",
        "data_prep.shard",
        str(src),
        str(out),
        "--split",
        "train",
        "--layout",
        "imagefolder",
        "--max-per-shard",
        "20",
        "--workers",
        "2",
        "--full-decode",
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    before = len(list(out.glob("train-*.tar"))) if out.exists() else 0
    deadline = time.monotonic() + 120
    while (
        len(list(out.glob("train-*.tar"))) < before + 2
        and process.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.005)
    process.send_signal(sig)
    process.communicate(timeout=60)
    return process


@pytest.mark.slow
def test_interrupted_sharding_resumes_with_every_image_exactly_once(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    many_images(src)
    interrupted = start_and_interrupt(src, out, signal.SIGINT)
    assert interrupted.returncode == 130
    killed = start_and_interrupt(src, out, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "train.json").exists(), "the run finished before it could be interrupted"
    partial = {p.name: p.stat().st_size for p in out.iterdir()}
    time.sleep(1.0)  # the killed run's pool workers must have died with it, not go on writing
    assert {p.name: p.stat().st_size for p in out.iterdir()} == partial
    assert 2 <= len([n for n in partial if n.endswith(".tar") and not n.startswith(".")]) < 60

    resumed = run_cli(
        "data_prep.shard",
        src,
        out,
        "--split",
        "train",
        "--layout",
        "imagefolder",
        "--max-per-shard",
        20,
        "--workers",
        2,
        "--full-decode",
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    paths = Counter(json.loads(s["json"])["path"] for s in tar_samples(out, "train").values())
    assert len(paths) == 1200 and set(paths.values()) == {1}
    assert read_manifest(out, "train")["num_samples"] == 1200
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"train-{i:06d}.tar" for i in range(60)] + ["train.json"]
    )
    verified = run_cli("data_prep.verify", out, "--split", "train")
    assert verified.returncode == 0, verified.stdout


def test_a_subset_list_shards_exactly_the_listed_files_and_a_missing_name_is_named(demo_images, tmp_path):
    files = sorted((demo_images / "train").rglob("*.jpg"))
    listed = [files[i] for i in range(0, len(files), 97)]  # 15 files across the classes
    subset = tmp_path / "1percent.txt"
    subset.write_text("# a subset list, SimCLR's format\n" + "".join(f"{p.name}\n" for p in listed))
    out = tmp_path / "subset"
    result = run_cli(
        "data_prep.shard",
        demo_images,
        out,
        "--split",
        "train",
        "--layout",
        "imagefolder",
        "--subset-file",
        subset,
        "--workers",
        1,
    )
    assert result.returncode == 0, result.stderr
    manifest = read_manifest(out, "train")
    paths = sorted(json.loads(s["json"])["path"] for s in tar_samples(out, "train").values())
    assert paths == sorted(p.relative_to(demo_images).as_posix() for p in listed)
    assert manifest["num_samples"] == 15 and manifest["subset"] == {"file": str(subset), "names": 15}
    subset.write_text(subset.read_text() + "n01440764_10026.JPEG\n")
    missing = run_cli(
        "data_prep.shard",
        demo_images,
        tmp_path / "other",
        "--split",
        "train",
        "--layout",
        "imagefolder",
        "--subset-file",
        subset,
    )
    assert (
        missing.returncode == 2 and "'n01440764_10026.JPEG' is not an image of this split" in missing.stderr
    )


@pytest.mark.slow
def test_a_subset_fraction_keeps_that_share_of_every_class_by_seed(demo_images, tmp_path):
    counts = {}
    for seed in (0, 0, 1):
        out = tmp_path / f"fraction{len(counts)}"
        result = run_cli(
            "data_prep.shard",
            demo_images,
            out,
            "--split",
            "train",
            "--layout",
            "imagefolder",
            "--subset-fraction",
            0.1,
            "--subset-seed",
            seed,
            "--workers",
            1,
        )
        assert result.returncode == 0, result.stderr
        counts[out] = sorted(json.loads(s["json"])["path"] for s in tar_samples(out, "train").values())
    first, again, other = counts.values()
    per_class = {}
    for path in first:
        per_class[Path(path).parent.name] = per_class.get(Path(path).parent.name, 0) + 1
    sizes = {d.name: len(list(d.glob("*.jpg"))) for d in (demo_images / "train").iterdir()}
    assert per_class == {name: max(1, round(0.1 * n)) for name, n in sizes.items()}
    assert first == again and first != other


@pytest.mark.slow
def test_max_side_resizes_the_large_images_only_and_lg_verify_holds_it(tmp_path):
    """--max-side N: an image whose longer side exceeds N is re-encoded at that size (aspect kept, the
    given JPEG quality), a smaller one keeps its bytes, a CMYK one too large comes out RGB; the manifest
    records it and lg-verify checks the sides against it (a manifest that claims less is caught)."""
    src = tmp_path / "src"
    y, x = np.mgrid[0:375, 0:500]
    smooth = np.stack([x * 255 / 500, y * 255 / 375, (x + y) * 255 / 875], axis=-1).astype(np.uint8)
    photo = io.BytesIO()
    Image.fromarray(smooth).save(photo, format="JPEG", quality=95)
    images = {
        "wide.jpg": photo.getvalue(),
        "tall.jpg": jpeg_bytes(size=(120, 400), seed=2),
        "small.jpg": jpeg_bytes(size=(300, 200), seed=3),
        "cmyk.jpg": jpeg_bytes(size=(640, 480), mode="CMYK"),
    }
    for name, data in images.items():
        write_file(src / "a" / name, data)
    out = tmp_path / "out"
    result = shard(
        src, out, "--split", "train", "--layout", "imagefolder", "--max-side", 320, "--quality", 85
    )
    assert result.returncode == 0, result.stderr
    assert "resized 3 to a longer side of 320" in result.stdout
    manifest = read_manifest(out, "train")
    assert manifest["resize"] == {"max_side": 320, "quality": 85, "resized": 3}
    stored = {Path(json.loads(s["json"])["path"]).name: s["jpg"] for s in tar_samples(out, "train").values()}
    assert stored["small.jpg"] == images["small.jpg"]
    sizes = {name: Image.open(io.BytesIO(data)).size for name, data in stored.items()}
    assert sizes == {
        "wide.jpg": (320, 240),
        "tall.jpg": (96, 320),
        "small.jpg": (300, 200),
        "cmyk.jpg": (320, 240),
    }
    assert Image.open(io.BytesIO(stored["cmyk.jpg"])).mode == "RGB"
    original = np.asarray(Image.fromarray(smooth).resize((320, 240), Image.Resampling.BILINEAR), dtype=float)
    resized = np.asarray(Image.open(io.BytesIO(stored["wide.jpg"])), dtype=float)
    assert 10 * np.log10(255**2 / np.mean((original - resized) ** 2)) > 35  # the same picture, smaller
    verified = run_cli("data_prep.verify", out, "--split", "train")
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stdout
    manifest["resize"]["max_side"] = 256  # a manifest that claims smaller images than the shards hold
    (out / "train.json").write_text(json.dumps(manifest))
    verified = run_cli("data_prep.verify", out, "--split", "train")
    assert verified.returncode == 1 and "longer than the manifest's max_side 256" in verified.stdout
    again = shard(src, out, "--split", "train", "--layout", "imagefolder", "--max-side", 384)
    # Never mixed with other sizes.
    assert again.returncode == 2 and "different lg-shard command" in again.stderr
    bad = shard(src, tmp_path / "bad", "--split", "train", "--layout", "imagefolder", "--max-side", 8)
    assert bad.returncode == 2 and "--max-side 8" in bad.stderr
