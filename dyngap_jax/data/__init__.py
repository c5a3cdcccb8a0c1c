"""Record format (shared with the converters in ``data_prep/``) and grain loaders giving batch dicts."""
from dyngap_jax.data.loader import (
    IN_MEMORY_MAX_BYTES,
    FrameAugment,
    InMemoryLoader,
    check_manifest,
    make_loader,
    open_split,
)
from dyngap_jax.data.records import (
    FeatureSpec,
    Manifest,
    RecordError,
    decode_example,
    encode_example,
    load_manifest,
    verify_shards,
    write_shard,
)

__all__ = [
    "IN_MEMORY_MAX_BYTES", "FeatureSpec", "FrameAugment", "InMemoryLoader", "Manifest", "RecordError",
    "check_manifest", "decode_example", "encode_example", "load_manifest", "make_loader", "open_split",
    "verify_shards", "write_shard",
]
