"""lg-shard's tar writer and reader agree with tarfile and webdataset."""

import hashlib
import io
import tarfile

import pytest
import webdataset as wds

from pretrain.data.shard_tar import ShardTarWriter, read_shard


def samples(count=5):
    return [
        {
            "__key__": f"{i:08d}",
            "jpg": bytes([i]) * (100 + 700 * i),
            "cls": str(i).encode(),
            "json": b'{"path": "x"}',
        }
        for i in range(count)
    ]


def wds_read(path):
    return [{k: v for k, v in s.items()} for s in wds.tarfile_samples([{"url": str(path)}])]


def test_writer_output_is_a_standard_tar_that_webdataset_reads(tmp_path):
    path = tmp_path / "a.tar"
    with ShardTarWriter(path) as writer:
        for sample in samples():
            writer.write(sample)
    data = path.read_bytes()
    assert len(data) % 10240 == 0 and writer.bytes == len(data)
    assert writer.sha256.hexdigest() == hashlib.sha256(data).hexdigest()
    with tarfile.open(path) as tar:
        assert tar.getnames()[:3] == ["00000000.cls", "00000000.jpg", "00000000.json"]
    read = wds_read(path)
    assert [{k: v for k, v in s.items() if k != "__url__"} for s in read] == samples()
    assert list(read_shard(path)) == read


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reader_matches_webdataset_on_foreign_tars(tmp_path, fmt):
    """Directories in keys, names over 100 bytes (GNU/PAX long names), float mtimes (PAX records)."""
    path = tmp_path / "b.tar"
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "dir/sub"
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, name in enumerate(
            ["k0.jpg", "k0.CLS", "k0.json", f"{long_dir}/k1.jpg", f"{long_dir}/k1.seg.png", "k2.jpg"]
        ):
            info = tarfile.TarInfo(name)
            payload = name.encode() * (i + 1)
            info.size, info.mtime = len(payload), 1.5 if fmt == tarfile.PAX_FORMAT else 0
            tar.addfile(info, io.BytesIO(payload))
        tar.addfile(tarfile.TarInfo("a_directory"))
    expected = wds_read(path)
    assert [s["__key__"] for s in expected] == ["k0", f"{long_dir}/k1", "k2"]
    assert list(read_shard(path)) == expected
    selected = list(read_shard(path, select=lambda name: name.endswith(".jpg")))
    assert [sorted(s) for s in selected] == [["__key__", "__url__", "jpg"]] * 3


def test_webdataset_writer_shards_read_the_same(tmp_path):
    path = tmp_path / "c.tar"
    with wds.TarWriter(str(path)) as writer:
        for sample in samples(3):
            writer.write(sample)
    assert list(read_shard(path)) == wds_read(path)


def test_corrupt_header_raises(tmp_path):
    path = tmp_path / "d.tar"
    with ShardTarWriter(path) as writer:
        writer.write(samples(1)[0])
    original = path.read_bytes()
    flipped = bytearray(original)
    flipped[5] ^= 0xFF
    path.write_bytes(flipped)
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(read_shard(path))
    path.write_bytes(original[:600])
    with pytest.raises(tarfile.ReadError, match="truncated at byte 1024"):
        list(read_shard(path))
    path.write_bytes(original[:1600])
    with pytest.raises(tarfile.ReadError, match="truncated member 00000000.jpg"):
        list(read_shard(path))


@pytest.mark.parametrize("name", ["00000000.jpg", "a.cls", "x" * 100, "d" * 120 + "/y.json", "ünï.json"])
@pytest.mark.parametrize("size", [0, 1, 511, 512, 10**6, 8**11 - 1])
def test_header_matches_tarfile_byte_for_byte(name, size):
    from pretrain.data.shard_tar import ustar_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, 12345, 0o444, "bigdata", "bigdata"
    assert ustar_header(name, size, 12345) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
