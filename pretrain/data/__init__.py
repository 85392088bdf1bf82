"""The data layer: the manifest, shard tars and where they live, decoding, views and the loader."""
