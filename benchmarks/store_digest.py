"""SHA-256 of every array of a store, for comparing two builds array by array.

Each array is read whole with plain zarr and hashed as its dtype, shape and values (numbers as
little-endian bytes; strings as UTF-8 joined by NUL). The root attributes are hashed too, less
the fields that record when, how or by which version a store was built (``created_at``,
``created_by``, ``runtime``)::

    python benchmarks/store_digest.py STORE.zarr                 # one line per array
    python benchmarks/store_digest.py A.zarr B.zarr              # the arrays that differ; exit 1 if any
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import zarr

#: Root attributes that describe the build run rather than the content.
RUN_FIELDS = ("created_at", "created_by", "runtime")


def _array_digest(array: zarr.Array) -> str:
    values = array[...]
    digest = hashlib.sha256(f"{array.dtype}|{array.shape}|".encode())
    if values.dtype.kind in "OUT":
        digest.update(b"\0".join(str(v).encode("utf-8") for v in np.asarray(values).ravel()))
    else:
        digest.update(np.ascontiguousarray(values).astype(values.dtype.newbyteorder("<")).tobytes())
    return digest.hexdigest()


def store_digest(path: str | Path) -> dict[str, str]:
    """``{array path: sha256}`` for every array of the store, plus ``"attrs"`` for the root attributes."""
    root = zarr.open_group(str(path), mode="r")
    out = {name: _array_digest(array) for name, array in sorted(root.arrays(), key=lambda kv: kv[0])}
    for group_name, group in sorted(root.groups(), key=lambda kv: kv[0]):
        for name, array in group.arrays():
            out[f"{group_name}/{name}"] = _array_digest(array)
    attrs = {k: v for k, v in dict(root.attrs.get("cbstore", {})).items() if k not in RUN_FIELDS}
    out["attrs"] = hashlib.sha256(json.dumps(attrs, sort_keys=True).encode()).hexdigest()
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stores", nargs="+", type=Path, help="one store (print) or two (compare)")
    args = parser.parse_args(argv)
    if len(args.stores) > 2:
        parser.error("give one store to print its digests or two to compare them")
    digests = [store_digest(p) for p in args.stores]
    if len(digests) == 1:
        for name, value in digests[0].items():
            print(f"{value}  {name}")
        return 0
    a, b = digests
    different = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    for name in different:
        print(f"differs: {name}")
    print(f"{len(a.keys() & b.keys()) - len([k for k in different if k in a and k in b])} of "
          f"{len(a.keys() | b.keys())} entries identical")
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
