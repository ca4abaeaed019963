"""Resource limits on untrusted input, declared in one place.

A small file can ask for a lot of memory or time: a zip member that inflates a thousandfold, an
array header declaring terabytes, a YAML alias bomb, an input dim of 10^9, a graph with an
endless Loop. Every loader checks the declared sizes against these limits before it reads or
allocates anything, and a breach is one line (InputError, exit 2). Each limit can be raised
with an environment variable for inputs known to be large and trusted.
"""

from __future__ import annotations

import os


def _env_bytes(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(float(value)) if value else default
    except ValueError:
        return default


GIB, MIB = 1 << 30, 1 << 20
# arrays read from .npy/.npz and the members of any archive (.npz, .pt, .keras), decompressed
MAX_DATA_BYTES = _env_bytes("ENGINEKIT_MAX_DATA_BYTES", 4 * GIB)
# inputs enginekit generates itself (seeded random feeds for parity, benchmarks) for one shape
MAX_FEED_BYTES = _env_bytes("ENGINEKIT_MAX_FEED_BYTES", 2 * GIB)
# members of one archive
MAX_ARCHIVE_MEMBERS = int(_env_bytes("ENGINEKIT_MAX_ARCHIVE_MEMBERS", 100_000))
# a model's config inside a .keras archive or .h5, a YAML build config
MAX_CONFIG_BYTES = _env_bytes("ENGINEKIT_MAX_CONFIG_BYTES", 64 * MIB)
# JSON documents enginekit reads back (manifests, calibration tables, reports)
MAX_DOCUMENT_BYTES = _env_bytes("ENGINEKIT_MAX_DOCUMENT_BYTES", 512 * MIB)
# activations bias correction carries between its segments, all calibration samples together
BIAS_CORRECTION_BYTES = _env_bytes("ENGINEKIT_BIAS_CORRECTION_BYTES", 2 * GIB)
# one run of a graph in the reference executor (parity, calibration, evaluation), in seconds
DEFAULT_RUN_TIMEOUT = float(os.environ.get("ENGINEKIT_RUN_TIMEOUT", "600"))


def describe(nbytes: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", MIB), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} bytes"


def check_bytes(nbytes: float, limit: int, what: str, variable: str, path=None) -> None:
    """Refuse `what` when it would take more than `limit` bytes (raise the limit with `variable`)."""
    if nbytes > limit:
        from enginekit.core.errors import InputError

        raise InputError(f"{what} would take {describe(nbytes)}, over the {describe(limit)} limit "
                         f"(set {variable} to allow more for input you trust)", path)
