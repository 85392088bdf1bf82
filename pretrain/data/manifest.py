"""The manifest `OUT/{split}.json` that lg-shard writes next to the shards and every reader trusts."""

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pretrain.core.errors import UserError
from pretrain.core.files import write_json_atomic
from pretrain.data.locations import is_url


@dataclass
class ShardInfo:
    name: str  # file name, relative to the manifest's folder
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    split: str
    classes: list
    num_samples: int
    shards: list  # [ShardInfo]
    skipped: list = field(default_factory=list)  # [{"path", "reason"}]
    fingerprint: str = ""  # identifies the lg-shard invocation that wrote the shards
    # A label subset's file or fraction (data_prep.subsets); {}: all.
    subset: dict = field(default_factory=dict)
    # lg-shard --max-side: {"max_side", "quality", "resized": images re-encoded}; {}: every image as it came
    resize: dict = field(default_factory=dict)
    root: Path = field(default=Path("."), compare=False, repr=False)

    @property
    def urls(self):
        """Each shard's location: its name beside the manifest, or the name itself when it is a URL
        (http(s)://, pipe:, s3://, gs://; pretrain.data.locations)."""
        return [shard.name if is_url(shard.name) else str(self.root / shard.name) for shard in self.shards]

    @classmethod
    def load(cls, path):
        """Read a manifest (a path to the .json, or to OUT plus the split as OUT/split.json)."""
        path = Path(path)
        if path.is_dir():
            raise UserError(
                f"{path} is a folder; give the manifest lg-shard wrote in it ({path}/SPLIT.json, "
                "e.g. train.json)"
            )
        try:
            record = json.loads(path.read_text())
            record["shards"] = [ShardInfo(**shard) for shard in record["shards"]]
            manifest = cls(**record)
        except FileNotFoundError:
            raise UserError(
                f"manifest {path} does not exist (lg-shard writes it when sharding completes)"
            ) from None
        except (ValueError, TypeError, KeyError) as error:
            raise UserError(f"{path} is not an lg-shard manifest ({error})") from None
        manifest.root = path.parent
        return manifest

    def check_shards(self, source=""):
        """Refuse (a UserError, naming `source`, say a config key) a manifest without shards or with a
        listed shard missing."""
        where = f"{source}: " if source else ""
        if not self.shards:
            raise UserError(f"{where}manifest of split {self.split!r} in {self.root} lists no shards")
        missing = [url for url in self.urls if not is_url(url) and not os.path.isfile(url)]
        if missing:
            raise UserError(
                f"{where}shard {missing[0]} is missing ({len(missing)} of {len(self.shards)} are)"
            )
        return self

    def save(self, path):
        """Write atomically: readers never see half a manifest."""
        record = asdict(self)
        record.pop("root")
        write_json_atomic(path, record)
