"""lg-verify finds what changed after sharding."""

import hashlib
import json
import shutil

import webdataset as wds

from tests.conftest import read_manifest, run_cli


def verify(out, split="val"):
    return run_cli("data_prep.verify", out, "--split", split, "--workers", 2)


def test_clean_shards_pass(demo_shards):
    result = verify(demo_shards)
    assert result.returncode == 0, result.stdout
    assert "359 samples: OK" in result.stdout


def test_flipped_byte_is_caught(demo_shards, tmp_path):
    out = shutil.copytree(demo_shards, tmp_path / "out")
    shard = out / read_manifest(out, "val")["shards"][3]["name"]
    data = bytearray(shard.read_bytes())
    data[3000] ^= 0x01
    shard.write_bytes(data)
    result = verify(out)
    assert result.returncode == 1
    assert f"{shard.name}: SHA-256 differs" in result.stdout


def test_truncated_shard_is_caught(demo_shards, tmp_path):
    out = shutil.copytree(demo_shards, tmp_path / "out")
    shard = out / read_manifest(out, "val")["shards"][0]["name"]
    shard.write_bytes(shard.read_bytes()[:20000])
    result = verify(out)
    assert result.returncode == 1
    assert f"{shard.name}: 20000 bytes" in result.stdout and "samples, manifest says 50" in result.stdout


def test_undecodable_image_is_caught_even_with_a_matching_checksum(demo_shards, tmp_path):
    """A shard rewritten by another tool with an updated manifest: the decode check still finds it."""
    out = shutil.copytree(demo_shards, tmp_path / "out")
    manifest = read_manifest(out, "val")
    info = manifest["shards"][1]
    samples = list(wds.WebDataset(str(out / info["name"]), shardshuffle=False))
    samples[4]["jpg"] = samples[4]["jpg"][:200]
    with wds.TarWriter(str(out / info["name"])) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if k in ("__key__", "jpg", "cls", "json")})
    data = (out / info["name"]).read_bytes()
    info.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (out / "val.json").write_text(json.dumps(manifest))
    result = verify(out)
    assert result.returncode == 1
    assert f"{info['name']}:{samples[4]['__key__']}: image does not decode" in result.stdout


def test_missing_manifest_is_a_user_error(tmp_path):
    result = verify(tmp_path)
    assert result.returncode == 2 and "val.json does not exist" in result.stderr
