"""Writing the shards of ``cxr/images`` directly, in the zarr v3 sharding format.

zarr 3.1 encodes every inner chunk of a shard through its asynchronous codec pipeline, with
thread hand-offs per chunk: about 1 ms per inner chunk, absent (all-zero) ones included, so the
3,080 films of a 3,080-stay store took 2-3 s to write, of which compression was 0.2 s. This module
produces the same bytes itself: each present film is compressed with the array's Blosc codec, the
compressed films are concatenated in stay order, and the shard index (offset and length per inner
chunk, ``2**64 - 1`` for chunks never written) follows with its CRC32C checksum, as the
``sharding_indexed`` codec of the array's metadata specifies (index at the end, index codecs
``bytes`` little-endian + ``crc32c``). Films of stays without one are never written.

:class:`ShardWriter` refuses an array whose codecs differ from that description, so a zarr
release that changed its defaults cannot make it write shards zarr would read differently; the
tests check that the shards are byte-identical to those zarr writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from numcodecs import Blosc

from cbstore.errors import StoreError

#: Marks an inner chunk that was never written, in both fields of its index entry.
_EMPTY = np.uint64(2**64 - 1)
_SHUFFLE = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}


def _expected_codecs(array: zarr.Array, blosc: dict) -> list[dict]:
    """The codec metadata this module implements, for ``array``'s inner chunk shape."""
    return [{
        "name": "sharding_indexed",
        "configuration": {
            "chunk_shape": [1, *array.shape[1:]],
            "codecs": [{"name": "bytes"}, {"name": "blosc", "configuration": blosc}],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
            "index_location": "end",
        },
    }]


class ShardWriter:
    """Writes whole shards of a uint8 ``[stay, y, x]`` array sharded as ``(k, y, x)`` of ``(1, y, x)`` chunks.

    Parameters
    ----------
    array : zarr.Array
        The freshly created image array, in a local store.
    folder : pathlib.Path
        The array's folder (where its ``zarr.json`` lies).

    Raises
    ------
    StoreError
        The array's chunking or codecs are not the ones this writer implements.
    """

    def __init__(self, array: zarr.Array, folder: Path) -> None:
        codecs = json.loads(json.dumps(array.metadata.to_dict().get("codecs") or [{}]))  # tuples -> lists
        try:
            blosc = codecs[0]["configuration"]["codecs"][1]["configuration"]
        except (KeyError, IndexError, TypeError):
            blosc = None
        if (array.dtype != np.uint8 or array.ndim != 3 or array.shards is None
                or array.chunks != (1, *array.shape[1:]) or array.shards[1:] != array.shape[1:]
                or blosc is None or codecs != _expected_codecs(array, blosc)):
            raise StoreError(
                f"cannot write image shards of {folder}: its layout or codecs ({codecs}) differ from "
                "the uint8 (1, y, x) chunks in (k, y, x) shards with [bytes, blosc] inner codecs that "
                "cbstore.store.image_shards implements (a zarr release with other sharding defaults?)"
            )
        self.array = array
        self.folder = Path(folder)
        self.shard_stays = int(array.shards[0])
        self._blosc = Blosc(cname=blosc["cname"], clevel=blosc["clevel"], shuffle=_SHUFFLE[blosc["shuffle"]],
                            blocksize=blosc["blocksize"], typesize=blosc["typesize"])

    def write(self, shard: int, images: np.ndarray, present: np.ndarray) -> bool:
        """Write shard ``shard`` from the films of its stays; return whether a file was written.

        Parameters
        ----------
        shard : int
            Shard index (its first stay is ``shard * shard_stays``).
        images : numpy.ndarray
            uint8 ``[k, y, x]``, the stays of the shard (``k`` is the shard size, or less for the
            last shard); only rows where ``present`` is true are read.
        present : numpy.ndarray
            bool ``[k]``. A shard without any present film writes no file.
        """
        rows = np.flatnonzero(present)
        if rows.size == 0:
            return False
        index = np.full((self.shard_stays, 2), _EMPTY, dtype="<u8")
        parts = []
        offset = 0
        for row in rows:  # ascending stay order, which is also zarr's (Morton) order for (k, 1, 1)
            data = self._blosc.encode(np.ascontiguousarray(images[row]))
            parts.append(data)
            index[row] = (offset, len(data))
            offset += len(data)
        index_bytes = index.tobytes()
        parts.append(index_bytes)
        parts.append(np.uint32(google_crc32c.value(index_bytes)).astype("<u4").tobytes())
        path = self.folder / self.array.metadata.encode_chunk_key((shard, 0, 0))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(parts))
        return True
