"""mosaicml-streaming's MDS datasets (the format Ettin published its tokenized data in), read
without mosaicml-streaming.

A dataset is a directory with `index.json`: {"version": 2, "shards": [...]}, each shard entry
giving its file(s) relative to the directory ("raw_data": the uncompressed file, "zip_data": the
compressed one or null, each {"basename", "bytes", "hashes"}), "compression" (null, "zstd",
"zstd:7", "gz", "bz2", ...), "samples", and its columns ("column_names", "column_encodings",
"column_sizes": fixed byte sizes or null). An index merged by mosaicml-streaming's `merge_index`
(Ettin's `make_recursive_root.py`) lists the shards of sub-directories with the sub-directory in
the basename ("books/shard.00000.mds.zstd"); those are read the same way.

A shard file (uncompressed) is: uint32 sample count n, n + 1 uint32 absolute offsets, the
writer's JSON config, then the samples; sample i is bytes [offset i, offset i + 1). A sample is
a uint32 size for each variable-size column (in column order), then every column's bytes.
`decode_value` turns a column's bytes back into its value, as mosaicml-streaming's
`mds_decode` does, for the encodings that carry text or numbers ("ndarray[:dtype[:shape]]",
"str", "bytes", "int", the scalar dtypes, "str_int", "str_float", "str_decimal", "json");
images and pickles are refused.

Shards are opened on the first read of one of their samples: an uncompressed shard is
memory-mapped where it lies (a local copy first when in object storage, `storage.cached_copy`);
a compressed one (zstd, gz, bz2) is decompressed once into ettin-jax's cache
(~/.cache/ettin-jax/mds, or $XDG_CACHE_HOME) and memory-mapped there: training reads documents
all over every shard. The raw file is preferred when both exist (Ettin's `decompress.py` leaves
the raw files; its trainer read only those). Sizes are checked against the index on opening;
hashes the index lists (none in Ettin's data: its writers set none) are verified, for hashlib's
algorithms and xxhash's when xxhash is installed, once per shard and process.
"""

from __future__ import annotations

import copy
import dataclasses
import decimal
import functools
import hashlib
import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from data_pipelines.config import SourceConfig
from data_pipelines.sources import LENGTH_SAMPLE_DOCUMENTS, SourceError, token_ids
from ettin_jax import storage

INDEX = "index.json"
# Compressions this reader decompresses (mosaicml-streaming also writes "br" and "snappy").
COMPRESSIONS = ("zstd", "gz", "bz2")
# Shards whose documents measure a source's mean document length (all of them when it has no
# more): evenly spaced, so that the first read of a large source opens only a few shards.
LENGTH_SAMPLE_SHARDS = 8
# Shards a column keeps memory-mapped at once (each map holds a file descriptor): the oldest is
# closed when another opens. Ettin's pre-training data alone has ~10^5 shards.
MAX_OPEN_SHARDS = 128

_NDARRAY_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16",
                   32: "uint32", 33: "int32", 34: "float32", 64: "uint64", 65: "int64",
                   66: "float64"}
_SHAPE_DTYPES = ("uint8", "uint16", "uint32", "uint64")
_SCALARS = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64",
            "float16", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class MdsFile:
    """One file of a shard as the index describes it: `basename` relative to the dataset
    directory, its size in `bytes`, and {algorithm: hex digest} `hashes` (often none)."""

    basename: str
    bytes: int
    hashes: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class MdsShard:
    """One shard of an index: its `samples`, `raw` (uncompressed) file, `zip` (compressed)
    file or None, `compression` as written ("zstd", "zstd:7", ... or None) and its columns:
    `names`, `encodings` and fixed `sizes` in bytes (None: variable)."""

    samples: int
    raw: MdsFile
    zip: MdsFile | None
    compression: str | None
    names: tuple[str, ...]
    encodings: tuple[str, ...]
    sizes: tuple[int | None, ...]


@dataclasses.dataclass(frozen=True)
class MdsIndex:
    """The index.json of an MDS directory `path` (a local path or a URL)."""

    path: str
    shards: tuple[MdsShard, ...]

    @property
    def documents(self) -> int:
        """The number of samples, as the index counts them."""
        return sum(shard.samples for shard in self.shards)

    def columns(self) -> dict[str, str]:
        """{column name: encoding} over all shards, in order of first appearance."""
        columns: dict[str, str] = {}
        for shard in self.shards:
            for name, encoding in zip(shard.names, shard.encodings):
                columns.setdefault(name, encoding)
        return columns


def read_index(path: storage.PathLike) -> MdsIndex:
    """The index of the MDS directory `path`. Raises SourceError when it has no index.json
    (naming sub-directories that do, if any), or the index is not an MDS index mosaicml-streaming
    (version 2) writes. Read once per process and path: a distributed preparation reads one
    shard per step, and Ettin's root index lists about 10^5 of them."""
    return _read_index(str(path))


@functools.lru_cache(maxsize=16)
def _read_index(path: str) -> MdsIndex:
    root = storage.path(path)
    index_file = root / INDEX
    if not index_file.is_file():
        nested = sorted(p.parent.name for p in root.glob(f"*/{INDEX}")) if root.is_dir() else []
        hint = (f"; its sub-directories {nested[:8]} hold one: point the source at one, or "
                f"merge them into one index (mosaicml-streaming's merge_index, Ettin's "
                f"make_recursive_root.py)" if nested else "")
        raise SourceError(f"MDS source {str(root)!r}: no {INDEX}{hint}")
    try:
        obj = json.loads(index_file.read_text())
    except json.JSONDecodeError as err:
        raise SourceError(f"{index_file}: not JSON: {err.msg}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("shards"), list):
        raise SourceError(f"{index_file}: not an MDS index (no list of shards)")
    shards = []
    for number, entry in enumerate(obj["shards"]):
        where = f"{index_file}: shard {number}"
        if entry.get("format") != "mds" or entry.get("version") != 2:
            raise SourceError(f"{where}: format {entry.get('format')!r} version "
                              f"{entry.get('version')!r}; only MDS version 2 is read")
        names, encodings = entry["column_names"], entry["column_encodings"]
        sizes = entry.get("column_sizes") or [None] * len(names)
        shards.append(MdsShard(
            samples=int(entry["samples"]), raw=_file(entry["raw_data"]),
            zip=_file(entry["zip_data"]) if entry.get("zip_data") else None,
            compression=entry.get("compression"), names=tuple(names),
            encodings=tuple(encodings), sizes=tuple(sizes)))
    return MdsIndex(str(root), tuple(shards))


def _file(info: dict) -> MdsFile:
    return MdsFile(info["basename"], int(info["bytes"]),
                   tuple(sorted((info.get("hashes") or {}).items())))


# --- values ------------------------------------------------------------------------------------


def decode_value(encoding: str, data: bytes | np.ndarray) -> Any:
    """The value of one column of one sample from its bytes, as mosaicml-streaming's
    `mds_decode(encoding, data)` returns it (ndarrays share `data`'s memory when it is an
    array). Raises SourceError for encodings this reader does not decode (images, pickles)."""
    name, _, config = encoding.partition(":")
    if name == "ndarray":
        return _decode_ndarray(config, np.frombuffer(data, np.uint8))
    raw = bytes(data)
    if name == "bytes":
        return raw
    if name == "str":
        return raw.decode("utf-8")
    if name == "int":
        return int(np.frombuffer(raw, np.int64)[0])
    if name in _SCALARS:
        return np.frombuffer(raw, name)[0]
    if name in ("str_int", "str_float", "str_decimal"):
        parse = {"str_int": int, "str_float": float, "str_decimal": decimal.Decimal}[name]
        return parse(raw.decode("utf-8"))
    if name == "json":
        return json.loads(raw.decode("utf-8"))
    raise SourceError(f"MDS encoding {encoding!r} is not read by ettin-jax (text, numbers and "
                      f"arrays are; images and pickles are not)")


def _decode_ndarray(config: str, data: np.ndarray) -> np.ndarray:
    parts = config.split(":") if config else []
    at = 0
    if parts and parts[0]:
        dtype = parts[0]
    else:
        dtype = _NDARRAY_DTYPES[int(data[0])]
        at = 1
    if len(parts) > 1:
        shape = tuple(int(d) for d in parts[1].split(","))
    else:
        ndim, shape_dtype = int(data[at]) >> 2, _SHAPE_DTYPES[int(data[at]) & 3]
        width = np.dtype(shape_dtype).itemsize * ndim
        shape = tuple(int(d) for d in data[at + 1:at + 1 + width].view(shape_dtype))
        at += 1 + width
    return data[at:].view(dtype).reshape(shape)


def column_kind(encoding: str) -> str | None:
    """What a column of `encoding` holds for training: "tokens" (an ndarray, integer ids),
    "text" (str) or None (neither)."""
    name, _, config = encoding.partition(":")
    if name == "ndarray":
        dtype = config.split(":")[0]
        return "tokens" if not dtype or np.dtype(dtype).kind in "iu" else None
    return "text" if name == "str" else None


# --- shards ------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "ettin-jax", "mds")


def _local_file(root: str, basename: str) -> Path | None:
    """A local path of the file `basename` of the directory `root` (a local copy when `root`
    is a URL), or None when there is no such file."""
    target = storage.path(root) / basename
    if not storage.is_remote(target):
        return Path(os.fspath(target)) if target.is_file() else None
    return storage.cached_copy(target) if target.exists() else None


def _check_file(path: Path, info: MdsFile, data: bytes | None = None) -> None:
    size = len(data) if data is not None else path.stat().st_size
    if size != info.bytes:
        raise SourceError(f"{path}: {size} bytes, but the index says {info.bytes}; the shard "
                          f"is damaged or from another version of the dataset")
    for algorithm, digest in info.hashes:
        compute = _hasher(algorithm)
        if compute is None:
            continue  # an xxhash digest without xxhash installed: the size check stands
        if data is None:
            data = path.read_bytes()
        if compute(data).hexdigest() != digest:
            raise SourceError(f"{path}: its {algorithm} hash differs from the index's; the "
                              f"shard is damaged or from another version of the dataset")


def _hasher(algorithm: str) -> Callable | None:
    if algorithm in hashlib.algorithms_available and hasattr(hashlib, algorithm):
        return getattr(hashlib, algorithm)
    try:
        import xxhash
    except ImportError:
        return None
    return getattr(xxhash, algorithm, None)


def _decompress(codec: str | None, data: bytes, raw_bytes: int, where: Path) -> bytes:
    family = (codec or "").split(":")[0]
    if family == "zstd":
        import zstandard

        # max_output_size: a frame need not record its content size.
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=raw_bytes)
    if family == "gz":
        import gzip

        return gzip.decompress(data)
    if family == "bz2":
        import bz2

        return bz2.decompress(data)
    raise _unsupported(codec, where)


def _unsupported(codec: str | None, where) -> SourceError:
    return SourceError(f"{where}: compression {codec!r} is not supported (supported: none, "
                       f"{', '.join(COMPRESSIONS)}); decompress the shards first (e.g. Ettin's "
                       f"bin/decompress.py --decompress) or rewrite them with one of these")


def open_shard(root: str, shard: MdsShard) -> np.ndarray:
    """The uncompressed bytes of `shard` of the MDS directory `root`, memory-mapped (uint8).
    Decompresses a compressed shard into the cache once. Raises SourceError when neither of
    its files exists, its sizes or hashes disagree with the index, or its compression is not
    supported."""
    raw = _local_file(root, shard.raw.basename)
    if raw is not None:
        _check_file(raw, shard.raw)
    elif shard.zip is None:
        raise SourceError(f"{storage.path(root) / shard.raw.basename}: the shard listed in "
                          f"{INDEX} does not exist")
    else:
        raw = _decompressed(root, shard)
    data = np.memmap(raw, dtype=np.uint8, mode="r")
    samples = int(data[:4].view(np.uint32)[0]) if len(data) >= 4 else 0
    if samples != shard.samples:
        raise SourceError(f"{raw}: holds {samples} samples, but {INDEX} says {shard.samples}")
    return data


def _decompressed(root: str, shard: MdsShard) -> Path:
    zipped = _local_file(root, shard.zip.basename)
    if zipped is None:
        raise SourceError(f"{storage.path(root) / shard.zip.basename}: the shard listed in "
                          f"{INDEX} does not exist (nor does its uncompressed "
                          f"{shard.raw.basename})")
    stat = zipped.stat()
    key = f"{zipped.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    target = _cache_dir() / hashlib.sha256(key.encode()).hexdigest()[:24] / Path(
        shard.raw.basename).name
    if target.is_file() and target.stat().st_size == shard.raw.bytes:
        return target
    packed = zipped.read_bytes()
    _check_file(zipped, shard.zip, packed)
    data = _decompress(shard.compression, packed, shard.raw.bytes, zipped)
    _check_file(target, shard.raw, data)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}")  # threads decompress too
    try:
        tmp.write_bytes(data)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def sample_bytes(data: np.ndarray, index: int) -> np.ndarray:
    """The bytes of sample `index` of a shard's uncompressed bytes `data` (a view)."""
    begin, end = (int(v) for v in data[4 * (1 + index):4 * (3 + index)].view(np.uint32))
    return data[begin:end]


def column_bytes(sample: np.ndarray, shard: MdsShard, column: int) -> np.ndarray:
    """The bytes of column number `column` (in `shard.names`) of one `sample`'s bytes."""
    sizes, at = [], 0
    for size in shard.sizes:
        if size is None:
            size = int(sample[at:at + 4].view(np.uint32)[0])
            at += 4
        sizes.append(size)
    start = at + sum(sizes[:column])
    return sample[start:start + sizes[column]]


def read_sample(shard: MdsShard, data: np.ndarray, index: int) -> dict[str, Any]:
    """Every column of sample `index` of `shard` (its bytes `data`, from `open_shard`), decoded
    as mosaicml-streaming decodes them."""
    sample = sample_bytes(data, index)
    return {name: decode_value(encoding, column_bytes(sample, shard, number))
            for number, (name, encoding) in enumerate(zip(shard.names, shard.encodings))}


# --- one column as documents -------------------------------------------------------------------


class MdsColumn:
    """One column of an MDS directory as a random-access, picklable source of documents (grain's
    interface: len and getitem), in index order.

    A "tokens" column gives int32 arrays (`sources.token_ids` with `tokenizer`: one leading
    [CLS] and one trailing [SEP] removed, since Ettin stored every chunk bracketed and the
    packer brackets chunks itself; ids outside the vocabulary raise SourceError naming the
    directory, column and sample). A "text" column gives strings. Shards open on first use
    (`open_shard`); up to MAX_OPEN_SHARDS stay open per process (the oldest closes first)."""

    def __init__(self, index: MdsIndex, field: str, *, tokenizer=None):
        columns = index.columns()
        if field not in columns:
            listed = ", ".join(f"{name} ({encoding})" for name, encoding in columns.items())
            tokens = [name for name, enc in columns.items() if column_kind(enc) == "tokens"]
            hint = f" (token ids: `field: {tokens[0]}`)" if tokens else ""
            raise SourceError(f"MDS source {index.path!r}: no column {field!r} (columns: "
                              f"{listed}); set the source's `field`{hint}")
        self.kind = column_kind(columns[field])
        if self.kind is None:
            raise SourceError(f"MDS source {index.path!r}: column {field!r} is encoded "
                              f"{columns[field]!r}: neither token ids (an ndarray of integers) "
                              f"nor text (str)")
        for number, shard in enumerate(index.shards):
            if field not in shard.names:
                raise SourceError(f"MDS source {index.path!r}: shard {number} "
                                  f"({shard.raw.basename}) has no column {field!r} (its "
                                  f"columns: {list(shard.names)})")
        self.index, self.field = index, field
        self.tokenizer = tokenizer
        self._starts = np.cumsum([0] + [shard.samples for shard in index.shards])
        self._open: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> np.ndarray | str:
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} of {len(self)}")
        number = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.document(number, self.shard_data(number), index - int(self._starts[number]))

    def shard_data(self, number: int) -> np.ndarray:
        """The uncompressed bytes of shard `number` (see `open_shard`), kept open while it is
        among the MAX_OPEN_SHARDS opened last."""
        data = self._open.get(number)
        if data is None:
            with self._lock:
                data = self._open.get(number)
                if data is None:
                    data = open_shard(self.index.path, self.index.shards[number])
                    while len(self._open) >= MAX_OPEN_SHARDS:
                        del self._open[next(iter(self._open))]
                    self._open[number] = data
        return data

    def document(self, number: int, data: np.ndarray, index: int) -> np.ndarray | str:
        """Document `index` of shard `number` (its bytes `data`)."""
        shard = self.index.shards[number]
        raw = column_bytes(sample_bytes(data, index), shard, shard.names.index(self.field))
        value = decode_value(shard.encodings[shard.names.index(self.field)], raw)
        if self.kind == "text":
            return value
        return self._tokens(value, int(self._starts[number]) + index)

    def _tokens(self, value: np.ndarray, index: int) -> np.ndarray:
        return token_ids(value, f"MDS source {self.index.path!r} column {self.field!r} sample "
                                f"{index}", self.tokenizer)

    def __getstate__(self) -> dict:  # memory maps and the lock stay with their process
        return {**self.__dict__, "_open": {}, "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def open_column(source: SourceConfig, tokenizer=None) -> MdsColumn:
    """The column `source.field` of the MDS directory `source.path` (see `MdsColumn`); with a
    `tokenizer` (`vocab_size`, `special_tokens`), token ids are checked against its vocabulary
    and [CLS]/[SEP] brackets stripped. Raises SourceError (no index, no such column, ...)."""
    column = copy.copy(_checked_column(str(source.path), source.field))
    column.tokenizer, column._open, column._lock = tokenizer, {}, threading.Lock()
    return column


@functools.lru_cache(maxsize=16)
def _checked_column(path: str, field: str) -> MdsColumn:
    """The column, its checks over every shard of the index done once per process: preparation
    opens it once per unit (MDS shard), and Ettin's root index lists about 10^5 shards."""
    index = read_index(path)
    for shard in index.shards:  # refused before training starts, not at the shard's turn
        codec = (shard.compression or "").split(":")[0]
        if codec and codec not in COMPRESSIONS and _local_file(index.path, shard.raw.basename) \
                is None:
            raise _unsupported(shard.compression,
                               storage.path(index.path) / (shard.zip or shard.raw).basename)
    return MdsColumn(index, field)


def iter_mds_documents(source: SourceConfig, tokenizer=None, *,
                       shards: range | None = None) -> Iterator[np.ndarray | str]:
    """Every document of the MDS source `source` (of its `shards`, default all) in index order,
    one shard open at a time: int32 token arrays for a token column (checked and stripped as
    `open_column` says when `tokenizer` is given; only checked to fit int32 otherwise), strings
    for a text column. Raises SourceError as `open_column` and `open_shard` do."""
    column = open_column(source, tokenizer)
    for number in range(len(column.index.shards)) if shards is None else shards:
        shard = column.index.shards[number]
        data = open_shard(column.index.path, shard)
        for index in range(shard.samples):
            yield column.document(number, data, index)
        del data


def mean_tokens(column: MdsColumn, tokenizer) -> float:
    """The mean document length in tokens of `column` (after stripping), measured on every
    document of up to LENGTH_SAMPLE_SHARDS evenly spaced shards (exact when the source has no
    more): token columns count ids; text columns tokenize up to LENGTH_SAMPLE_DOCUMENTS evenly
    spaced documents of those shards with `tokenizer`."""
    count = len(column.index.shards)
    shards = min(count, LENGTH_SAMPLE_SHARDS)
    picked = sorted({(i * count) // shards for i in range(shards)})
    documents = [(number, index) for number in picked
                 for index in range(column.index.shards[number].samples)]
    if not documents:
        return 1.0
    if column.kind == "text":
        step = max(1, len(documents) // LENGTH_SAMPLE_DOCUMENTS)
        documents = documents[::step][:LENGTH_SAMPLE_DOCUMENTS]
    lengths = []
    for number, index in documents:
        value = column.document(number, column.shard_data(number), index)
        lengths.append(len(tokenizer.encode(value)) if column.kind == "text" else len(value))
    return sum(lengths) / len(lengths)


def open_mds(source: SourceConfig, tokenizer):
    """`source` (kind "mds") for `sources.open_source`: (grain MapDataset of int32 token
    arrays, document count from the index, mean_tokens callable). A token column is read as it
    is (see `MdsColumn`); a text column is tokenized on access with `tokenizer`."""
    import grain

    column = open_column(source, tokenizer)
    dataset = grain.MapDataset.source(column)
    if column.kind == "text":
        dataset = dataset.map(tokenizer.encode)
    return dataset, len(column), functools.cache(functools.partial(mean_tokens, column,
                                                                   tokenizer))
