"""A fast writer of WebDataset tar shards."""
import hashlib
import tarfile

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # what tar(1) and tarfile pad an archive to


class ShardTarWriter:
    """Write samples (`{"__key__": k, ext: bytes, ...}`) as `k.ext` members of a POSIX ustar archive.

    The member layout is webdataset's TarWriter's (members of a sample sorted by extension, fixed
    owner and mode, fixed mtime so that equal input gives byte-identical shards) and webdataset reads
    the result like any shard. It differs in speed: each header comes from `tarfile.TarInfo.tobuf`
    and each payload is written straight to the file, where webdataset's writer copies every member
    through tarfile's stream layer and PAX header code, about 3x slower per sample (bench/shard.py).
    The SHA-256 and size of the archive are computed while writing.
    """

    def __init__(self, path, mtime=0):
        self.file = open(path, "wb")
        self.mtime = mtime
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, sample):
        key = sample["__key__"]
        for extension in sorted(k for k in sample if not k.startswith("_")):
            self._add_member(f"{key}.{extension}", sample[extension])

    def _add_member(self, name, data):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), self.mtime, 0o444
        info.uname = info.gname = "bigdata"
        self._emit(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        self._emit(data)
        if len(data) % TAR_BLOCK:
            self._emit(bytes(TAR_BLOCK - len(data) % TAR_BLOCK))

    def _emit(self, data):
        self.sha256.update(data)
        self.file.write(data)
        self.bytes += len(data)

    def close(self):
        end = 2 * TAR_BLOCK
        end += -(self.bytes + end) % TAR_RECORD
        self._emit(bytes(end))
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:
            self.file.close()
