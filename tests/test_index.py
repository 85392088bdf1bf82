"""lg-index on shards lg-shard did not write: webdataset's own ShardWriter in timm's imagenet-1k-wds layout
(`imagenet1k-train-NNNN.tar`, members jpg/jpeg/png/webp, cls, json), local and at URLs; training and
lg-eval knn on them."""

import io
import json
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from pretrain.core.files import sha256_of_file
from pretrain.data.loader import make_loader
from pretrain.data.manifest import Manifest
from tests.conftest import pretrain, run_cli
from tests.test_remote import start_server

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # one sample in four of each, as real shards use them


def reencoded(data, key):
    if key in ("jpg", "jpeg"):
        return data
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, format=key.upper())
    return out.getvalue()


def write_foreign_split(images, out, split, per_shard, odd=False):
    """The demo ImageFolder `images/split` written by webdataset's ShardWriter as timm's shards are: keys
    n<synset>_<i>, the label in cls, {"filename", "label"} in json. With `odd`, one sample without an
    image and every tenth with a .txt member the loader does not read."""
    files = sorted((images / split).glob("*/*.jpg"))
    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / f"imagenet1k-{split}-%04d.tar"), maxcount=per_shard, verbose=0) as writer:
        for i, path in enumerate(files):
            label, synset = int(path.parent.name), f"n{int(path.parent.name):08d}"
            key = IMAGE_KEYS[i % 4]
            sample = {
                "__key__": f"{synset}_{i}",
                key: reencoded(path.read_bytes(), key),
                "cls": label,
                "json": {"filename": f"{synset}/{synset}_{i}.JPEG", "label": label},
            }
            if odd and i % 10 == 0:
                sample["txt"] = "a caption"
            writer.write(sample)
        if odd:
            writer.write({"__key__": "no_image", "cls": 0, "json": {"label": 0}})
    return len(files) + bool(odd), sorted(out.glob(f"imagenet1k-{split}-*.tar"))


@pytest.fixture(scope="module")
def foreign(demo_images, tmp_path_factory):
    """(shard folder, {split: (samples, shard paths)}) of the demo data in timm's layout."""
    out = tmp_path_factory.mktemp("foreign")
    return out, {
        "train": write_foreign_split(demo_images, out, "train", 200, odd=True),
        "val": write_foreign_split(demo_images, out, "val", 100),
    }


@pytest.mark.slow
def test_lg_index_reads_counts_hashes_and_names_the_classes(foreign, tmp_path):
    folder, splits = foreign
    samples, paths = splits["train"]
    result = run_cli(
        "data_prep.index",
        f"{folder}/imagenet1k-train-{{0000..{len(paths) - 1:04d}}}.tar",
        tmp_path / "train.json",
        "--workers",
        2,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = Manifest.load(tmp_path / "train.json")
    assert (
        manifest.split == "train" and manifest.num_samples == samples and len(manifest.shards) == len(paths)
    )
    for path, shard in zip(paths, manifest.shards):
        assert (
            shard.name == str(path)
            and shard.sha256 == sha256_of_file(path)
            and shard.bytes == path.stat().st_size
        )
    assert manifest.classes == [f"n{label:08d}" for label in range(10)], "named by the json filename's folder"
    reasons = {entry["path"].rsplit(":", 1)[-1]: entry["reason"] for entry in manifest.skipped}
    assert "no image member" in reasons["no_image"] and "members the loader does not read" in reasons["*.txt"]
    assert f"{samples} samples" in result.stdout and "1 samples without an image or label" in result.stdout

    # The loader reads them (each image key), counts the odd sample as bad, and lg-verify agrees with the
    # index.
    loader = make_loader(manifest, 64, img_size=32, num_workers=0, rank=0, world_size=1)
    batches = list(loader.epoch(0))
    assert (
        sum(len(b["keys"]) for b in batches) == samples
        and loader.bad_samples == 1
        and loader.lost_samples == 0
    )
    verify = run_cli("data_prep.verify", tmp_path, "--split", "train", "--workers", 2)
    # Only the sample without image.
    assert verify.returncode == 1 and verify.stdout.count("\n") == 2, verify.stdout
    assert "no_image: no jpg/jpeg/png/webp member" in verify.stdout


@pytest.mark.slow
def test_lg_index_class_names_file_and_errors(foreign, tmp_path):
    folder, splits = foreign
    pattern = f"{folder}/imagenet1k-val-{{0000..{len(splits['val'][1]) - 1:04d}}}.tar"
    names = tmp_path / "names.txt"
    names.write_text("".join(f"digit {i}\n" for i in range(10)))
    result = run_cli("data_prep.index", pattern, tmp_path / "out" / "val.json", "--class-names", names)
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = Manifest.load(tmp_path / "out" / "val.json")
    assert manifest.classes[3] == "digit 3" and manifest.split == "val"

    names.write_text("zero\none\n")
    short = run_cli("data_prep.index", pattern, tmp_path / "short.json", "--class-names", names)
    assert (
        short.returncode == 2
        and f"--class-names {names} names 2 classes; the shards have label 9" in short.stderr
    )
    missing = run_cli("data_prep.index", f"{folder}/imagenet1k-val-{{0000..0099}}.tar", tmp_path / "m.json")
    first_missing = f"imagenet1k-val-{len(splits['val'][1]):04d}.tar does not exist"
    assert missing.returncode == 2 and first_missing in missing.stderr
    broken = tmp_path / "broken.tar"
    broken.write_bytes(splits["val"][1][0].read_bytes()[:3000])
    torn = run_cli("data_prep.index", str(broken), tmp_path / "b.json")
    assert (
        torn.returncode == 2
        and "1 shards could not be read, e.g." in torn.stderr
        and "broken.tar" in torn.stderr
    )
    assert not (tmp_path / "b.json").exists()


@pytest.mark.dist
def test_train_from_indexed_urls_then_knn_on_the_indexed_files(foreign, tmp_path):
    """The shards at a real HTTP server, indexed by URL (the same digests as the files), a few MAE steps
    from the URLs, and lg-eval knn of the result on the local files' manifests."""
    folder, splits = foreign
    last = len(splits["train"][1]) - 1
    local = tmp_path / "local"
    for split in ("train", "val"):
        count = len(splits[split][1]) - 1
        assert (
            run_cli(
                "data_prep.index",
                f"{folder}/imagenet1k-{split}-{{0000..{count:04d}}}.tar",
                local / f"{split}.json",
            ).returncode
            == 0
        )
    server, base = start_server(folder)
    try:
        indexed = run_cli(
            "data_prep.index",
            f"{base}/imagenet1k-train-{{0000..{last:04d}}}.tar",
            tmp_path / "urls" / "train.json",
        )
        assert indexed.returncode == 0, indexed.stderr[-2000:]
        remote, files = Manifest.load(tmp_path / "urls" / "train.json"), Manifest.load(local / "train.json")
        assert [s.name for s in remote.shards] == [f"{base}/{Path(s.name).name}" for s in files.shards]
        assert [(s.sha256, s.num_samples, s.bytes) for s in remote.shards] == [
            (s.sha256, s.num_samples, s.bytes) for s in files.shards
        ]
        run = pretrain(
            tmp_path / "run", tmp_path / "urls" / "train.json", "method=mae", "run.max_steps=4", nproc=1
        )
        assert run.returncode == 0, run.stderr[-3000:]
    finally:
        server.kill()
        server.wait()
    # The sample without an image is left out of the kNN bank (not scored as a copy of another), so the
    # train split is partial: refused, then scored with --allow-partial and said to be partial.
    shards = ["--train", local / "train.json", "--val", local / "val.json"]
    refused = run_cli("pretrain.eval", "knn", tmp_path / "run", *shards)
    assert (
        refused.returncode == 2
        and f"{splits['train'][0] - 1} of the {splits['train'][0]} images" in refused.stderr
    )
    knn = run_cli("pretrain.eval", "knn", tmp_path / "run", *shards, "--allow-partial")
    assert knn.returncode == 0, knn.stderr[-2000:]
    result = json.loads(knn.stdout.strip().splitlines()[-1])
    assert result["val_samples"] == splits["val"][0] and result["train_samples"] == splits["train"][0] - 1
    assert result["partial"] and 10 < result["top1"] <= 100
