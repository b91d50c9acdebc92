"""Input readers: split an input into *units* on the driver, and turn one unit into raw records
inside a worker.

The driver reads metadata only — file listings, parquet footers, the first line of a text file —
and for a JSON array one pass of the file in bounded memory; a unit is a small descriptor (file,
byte range or row groups, resolved column names), never the rows. Units:

- `parquet` (encoded images): one per file. `webdataset`: one per tar.
- `json` annotations and `.json` URL lists: a JSON array (or the `"images"` array of a Karpathy
  `{"images": [...]}` file) is scanned once by the driver, element by element, and cut into byte
  ranges of `rows_per_unit` elements; JSON Lines are cut like text files. Told apart by content.
- text URL lists (`.csv` `.tsv` with a header line, `.jsonl`, `.txt` one URL a line): byte ranges
  aligned to line starts — a line belongs to the unit its first byte falls in — sized to about
  `rows_per_unit` lines from the first MiB of the file. No newlines inside quoted fields.
- parquet URL lists: row groups (consecutive small ones merged up to `rows_per_unit` rows).

A raw record is a dict with `key`, `image` (bytes or None), `caption`, optional task fields and
`url`, and `_reject` = (reason, detail) when the reader already knows the row is bad. Column
names are resolved on the driver, so a LAION-style (`URL`/`TEXT`) or img2dataset
(`jpg`/`caption`/`key`/`status`) input maps in with no options.

A unit that cannot be read (truncated tar, unreadable parquet, not JSON) ends in one `bad_shard`
record keyed by the file (`guarded`): the rows read before the fault count as usual. A unit the
object store would not serve after the client's retries ends the same way with reason
`storage_error` (the file may be fine: a re-run with `overwrite` reads it again).

Nothing untrusted is read whole before its size is known: a tar member larger than
`max_member_bytes` is skipped in the stream (its sample is rejected `too_large`), and a JSON line
or array element longer than `max_entry_bytes` is let go as it streams past (rejected `too_large`),
so memory stays bounded by the limits, whatever the input holds.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import posixpath
import re
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage

IMAGE_COLUMNS = ("image", "jpg", "jpeg", "png", "webp")
CAPTION_COLUMNS = ("caption", "TEXT", "text", "txt", "Caption")
KEY_COLUMNS = ("key", "KEY", "id", "SAMPLE_ID")
URL_COLUMNS = ("url", "URL")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
URL_LIST_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".json", ".txt")
ANNOTATION_SUFFIXES = (".json", ".jsonl")

# What reading a damaged or unreachable input raises (after the filesystem's own retries).
READ_ERRORS = (OSError, ValueError, EOFError, tarfile.TarError, zlib.error, pa.ArrowException)

_READ_CHUNK = 1 << 20
MAX_ENTRY_BYTES = 16 << 20  # default limit of one JSON entry (a JSON line, an array element)
_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def loads(text: str | bytes) -> object:
    """`json.loads` for untrusted text: nesting deeper than the parser's recursion limit (a few KB
    of '[' would do) is a ValueError, as any other JSON that cannot be read, not a RecursionError
    that would end the task."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(
            f"JSON nested deeper than the parser allows (~{sys.getrecursionlimit()} levels)"
        ) from None


class ColumnError(ValueError):
    """The input lacks a column ingest needs (a configuration problem, not a damaged file)."""


@dataclass
class Columns:
    """Input column names resolved for one input; None where the input has no such column."""

    image: str | None = None
    caption: str | None = None
    key: str | None = None
    url: str | None = None
    status: str | None = None
    error_message: str | None = None
    task: list[str] = field(default_factory=list)


@dataclass
class Unit:
    """One piece of independent ingest work with a stable id (it names every output it writes).

    `layout` says which part of `source` it is: the whole `file`, the `lines` or JSON `array`
    elements starting in the byte range [start, end) (end -1: to the end of the file), or
    parquet `row_groups`. `error` is set when the driver already found the part unreadable."""

    unit_id: str
    kind: str  # parquet | webdataset | json | urls
    source: str  # file URI
    layout: str = "file"  # file | lines | array | row_groups
    start: int = 0
    end: int = -1
    row_groups: list[int] | None = None
    rows: int | None = None  # when the driver knows it (array elements, row groups)
    text_format: str = ""  # urls: csv | tsv | jsonl | txt | json | parquet; json: array | lines
    header: list[str] | None = None  # csv/tsv: the header line's names
    columns: dict | None = None  # urls: the file's resolved Columns
    error: str | None = None
    error_reason: str = "bad_shard"  # the reject reason of `error`: bad_shard | storage_error | too_large


def fault_key(unit: Unit) -> str:
    """The key of the one reject a unreadable unit (or rest of one) counts as."""
    if unit.layout in ("lines", "array") and unit.start:
        return f"{unit.source}@{unit.start}"
    if unit.layout == "row_groups" and unit.row_groups:
        return f"{unit.source}#rowgroup{unit.row_groups[0]}"
    return unit.source


class FaultRecord(dict):
    """The one record an unreadable unit (or the unreadable rest of one) counts as: `bad_shard`
    (damaged), `storage_error` (the store would not serve it) or `too_large` (an entry over its limit)."""


class OversizedEntry(ValueError):
    """A JSON line or array element longer than its limit, let go unread (a `too_large` reject)."""

    def __init__(self, offset: int, size: int, limit: int) -> None:
        super().__init__(
            f"entry at byte {offset} is longer than max_annotation_bytes={limit} ({size}+ bytes)"
        )
        self.offset = offset


@dataclass(frozen=True)
class LongLine:
    """Stands for a line longer than the limit in `iter_lines`: its bytes were never kept."""

    size: int


def guarded(unit: Unit, records: Iterator) -> Iterator:
    """`records`, ending in one FaultRecord if the unit turns out unreadable."""
    if unit.error:
        detail = f"{unit.source}: {unit.error}"
        yield FaultRecord(key=fault_key(unit), _reject=(unit.error_reason, detail))
        return
    read = 0
    try:
        for rec in records:
            read += 1
            yield rec
    except READ_ERRORS as err:
        # Checked by type: the storage helper raises StorageError only when the store failed.
        reason = "storage_error" if isinstance(err, storage.StorageError) else "bad_shard"
        detail = f"{unit.source}: {type(err).__name__}: {err}"
        if read:
            detail += f" (after {read} readable rows of this unit, which are counted as usual)"
        yield FaultRecord(key=fault_key(unit), _reject=(reason, detail))


def _pick(names: list[str], wanted: str | None, candidates: tuple[str, ...], what: str) -> str | None:
    if wanted:
        if wanted not in names:
            raise ColumnError(f"{what} column {wanted!r} not in the input; columns are {names}")
        return wanted
    return next((c for c in candidates if c in names), None)


def resolve_columns(names: list[str], *, image: str | None, caption: str | None, key: str | None,
                    url: str | None, need_image: bool) -> Columns:  # fmt: skip
    from pipelines.data.records import TASK_COLUMNS

    cols = Columns(
        image=_pick(names, image, IMAGE_COLUMNS, "image"),
        caption=_pick(names, caption, CAPTION_COLUMNS, "caption"),
        key=_pick(names, key, KEY_COLUMNS, "key"),
        url=_pick(names, url, URL_COLUMNS, "url"),
        status="status" if "status" in names else None,
        error_message="error_message" if "error_message" in names else None,
        task=[c for c in TASK_COLUMNS if c in names],
    )
    if need_image and cols.image is None:
        raise ColumnError(
            f"no image column among {names}: pass --image-column (looked for {list(IMAGE_COLUMNS)}); "
            "for a URL list use --format urls"
        )
    if not need_image and cols.url is None:
        raise ColumnError(f"no URL column among {names}: pass --url-column (looked for {list(URL_COLUMNS)})")
    if cols.caption is None:
        raise ColumnError(
            f"no caption column among {names}: pass --caption-column (looked for {list(CAPTION_COLUMNS)})"
        )
    return cols


def unit_id_for(input_uri: str, file_uri: str) -> str:
    """A stable, filesystem-safe id from the file's path relative to the input root."""
    root = input_uri.rstrip("/")
    rel = (
        file_uri[len(root) :].lstrip("/")
        if file_uri.startswith(root) and file_uri != root
        else posixpath.basename(file_uri)
    )
    stem = rel.rsplit(".", 1)[0] if "." in posixpath.basename(rel) else rel
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "unit"


def _files(input_uri: str, suffixes: tuple[str, ...]) -> list[str]:
    """The input itself if it is a file, else every file below it with one of `suffixes`."""
    fs, path = storage.pyarrow_fs(input_uri)
    with storage.guard(input_uri, "stat"):
        info = fs.get_file_info(path)
    if info.type.name == "NotFound":
        raise FileNotFoundError(f"input {input_uri!r} does not exist")
    if info.type.name == "File":
        return [input_uri]
    files = [f for f in storage.list_files(input_uri) if f.endswith(suffixes)]
    files = [f for f in files if not posixpath.basename(f).startswith(("_", "."))]
    if not files:
        raise FileNotFoundError(f"no {'/'.join(suffixes)} files under {input_uri!r}")
    return files


def _file_size(file_uri: str) -> int:
    return storage.file_size(file_uri)


def _head(file_uri: str, size: int = _READ_CHUNK) -> bytes:
    with storage.open_input_stream(file_uri, buffer_size=0) as f:  # one request of `size`
        return f.read(size)


# ---- byte ranges of lines ----------------------------------------------------------------------
def line_ranges(file_uri: str, rows_per_unit: int) -> list[tuple[int, int]]:
    """[start, end) byte ranges of about `rows_per_unit` lines each, from the first MiB's line length."""
    size = _file_size(file_uri)
    if size == 0:
        return []
    head = _head(file_uri)
    bytes_per_line = len(head) / max(1, head.count(b"\n"))
    span = max(1, int(bytes_per_line * rows_per_unit))
    return [(start, min(start + span, size)) for start in range(0, size, span)]


def iter_lines(unit: Unit, max_line_bytes: int | None = None) -> Iterator[tuple[int, bytes | LongLine]]:
    """(byte offset, line without its newline) of each line that starts in [start, end). A line
    longer than `max_line_bytes` comes as a LongLine: its bytes are let go as they stream past."""
    end = unit.end if unit.end >= 0 else float("inf")
    limit = max_line_bytes if max_line_bytes is not None else float("inf")
    with storage.open_input_file(unit.source) as f:
        # Start one byte early: if that byte is a newline, the unit's first line starts at `start`.
        pos = max(unit.start - 1, 0)  # where the current line starts
        f.seek(pos)
        buf = b""
        dropped = 0  # bytes of the current line already let go (it is over the limit)
        skip_partial = unit.start > 0
        while True:
            newline = buf.find(b"\n")
            if newline < 0:
                if dropped + len(buf) > limit:
                    dropped, buf = dropped + len(buf), b""
                chunk = f.read(_READ_CHUNK)
                if chunk:
                    buf += chunk
                    continue
                size = dropped + len(buf)
                if size and not skip_partial and pos < end:  # last line without a newline
                    yield pos, LongLine(size) if size > limit else buf.rstrip(b"\r")
                return
            size = dropped + newline
            line, buf = buf[:newline], buf[newline + 1 :]
            if skip_partial:
                skip_partial = False
            elif pos < end:
                yield pos, LongLine(size) if size > limit else line.rstrip(b"\r")
            else:
                return
            pos += size + 1
            dropped = 0
            if pos >= end:
                return


# ---- JSON: layout detection and element spans, in bounded memory -------------------------------
class JsonScanError(ValueError):
    def __init__(self, pos: int, msg: str, entry_start: int | None = None) -> None:
        super().__init__(f"{msg} at byte {pos}")
        self.pos = pos
        self.msg = msg
        self.entry_start = pos if entry_start is None else entry_start


class EntryTooLarge(JsonScanError):
    """A JSON value longer than the window's `max_entry_bytes` (not decoded)."""


class EntryTooDeep(JsonScanError):
    """A JSON value nested deeper than the parser's recursion limit (skipped by its brackets)."""


_OVERSIZED = object()  # stands for an array element over the limit in `_array_spans`
_TOO_DEEP = object()  # and for one nested too deeply to decode
_STRUCTURE = re.compile(r'["\[\]{}]')
_STRING_STOP = re.compile(r'["\\]')
_SCALAR_END = re.compile(r"[,\]}\s]")


class _Window:
    """A sliding latin-1 view of a binary stream. Latin-1 maps each byte to one character, so text
    positions are byte offsets; JSON's structural characters are ASCII and a multi-byte UTF-8
    sequence only ever sits inside a string, where any character is valid JSON."""

    def __init__(self, f, max_entry_bytes: int = MAX_ENTRY_BYTES) -> None:
        self.f = f
        self.max_entry_bytes = max_entry_bytes
        self.base = 0  # byte offset of text[0]
        self.text = ""
        self.eof = False

    def more(self) -> bool:
        chunk = self.f.read(_READ_CHUNK)
        if not chunk:
            self.eof = True
            return False
        self.text += chunk.decode("latin-1")
        return True

    def compact(self, i: int) -> int:
        """Forget text before index i (once there is much of it); returns i's new index."""
        if i > _READ_CHUNK:
            self.base += i
            self.text = self.text[i:]
            return 0
        return i

    def skip_ws(self, i: int) -> int:
        while True:
            i = _WS.match(self.text, i).end()
            if i < len(self.text) or not self.more():
                return i

    def char(self, i: int) -> str:
        return self.text[i] if i < len(self.text) else ""

    def decode(self, i: int) -> tuple[object, int]:
        """One JSON value starting at index i → (value, index after it)."""
        too_large = f"an entry longer than max_annotation_bytes={self.max_entry_bytes}"
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, i)
                if end - i > self.max_entry_bytes:
                    raise EntryTooLarge(self.base + i, too_large)
                if end < len(self.text) or self.eof:  # a number could go on past the window
                    return value, end
            except RecursionError:
                raise EntryTooDeep(
                    self.base + i, "an entry nested deeper than the JSON parser allows"
                ) from None
            except json.JSONDecodeError as err:
                incomplete = err.pos >= len(self.text) - 16 or err.msg.startswith("Unterminated string")
                if self.eof or not incomplete:
                    raise JsonScanError(self.base + err.pos, err.msg) from None
                if len(self.text) - i > self.max_entry_bytes:
                    raise EntryTooLarge(self.base + i, too_large) from None
            self.more()

    def skip_value(self, i: int) -> int:
        """Index just after the JSON value starting at index i, found from its brackets and
        strings alone; the text behind the scan is let go as it goes (a value of any length)."""
        depth, in_string = 0, False
        if self.char(i) not in '[{"':  # a scalar: up to the next delimiter
            while True:
                m = _SCALAR_END.search(self.text, i)
                if m is not None:
                    return m.start()
                i = self.compact(len(self.text))
                if not self.more():
                    return i
        while True:
            m = (_STRING_STOP if in_string else _STRUCTURE).search(self.text, i)
            if m is None or (m.group() == "\\" and m.end() >= len(self.text)):
                i = self.compact(len(self.text) if m is None else m.start())
                if not self.more():
                    raise JsonScanError(self.base + i, "an entry that never ends")
                continue
            c, i = m.group(), m.end()
            if c == "\\":
                i += 1  # the escaped character, whatever it is
            elif c == '"':
                in_string = not in_string
                if not in_string and depth == 0:
                    return i
            elif c in "[{":
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    return i

    def expect(self, i: int, chars: str, what: str) -> str:
        c = self.char(i)
        if not c or c not in chars:
            raise JsonScanError(self.base + i, f"expected {what}, found {c or 'the end of the file'!r}")
        return c


def json_layout(w: _Window) -> tuple[str, int]:
    """How a JSON file holds its entries, from its first bytes: ("array", index of its '['),
    ("container", index of the '[' of a Karpathy-style {"images": [{...}, ...]}), ("lines", 0)
    for JSON Lines (a first object that is itself an entry), or ("empty", 0)."""
    i = w.skip_ws(0)
    c = w.char(i)
    if not c:
        return "empty", i
    if c == "[":
        return "array", i
    if c != "{":
        raise JsonScanError(w.base + i, f"not JSON: starts with {c!r}")
    j = w.skip_ws(i + 1)
    if w.char(j) == "}":
        return "lines", i
    while True:
        w.expect(j, '"', "a key")
        key, j = w.decode(j)
        j = w.skip_ws(j)
        w.expect(j, ":", "':'")
        j = w.skip_ws(j + 1)
        if key == "images" and w.char(j) == "[" and w.char(w.skip_ws(j + 1)) == "{":
            return "container", j  # (NLVR2's "images" is a list of paths: an entry, not a container)
        try:
            _, j = w.decode(j)
        except (EntryTooLarge, EntryTooDeep):
            return "lines", i  # an entry (a first JSON line) over the limit: that line's reject
        j = w.skip_ws(j)
        if w.expect(j, ",}", "',' or '}'") == "}":
            return "lines", i
        j = w.skip_ws(j + 1)


def _array_spans(w: _Window, i: int, whole_file: bool = False) -> Iterator[tuple[int, int, object]]:
    """(start byte, end byte, value) of each element of the array whose '[' is at index i; the
    value is `_OVERSIZED` for an element over the limit (skipped, never held whole), `_TOO_DEEP`
    for one nested too deeply to decode. With `whole_file`, text after the closing ']' is a
    JsonScanError (it would otherwise go unread, uncounted)."""
    i = w.skip_ws(i + 1)
    if w.char(i) == "]":
        _after_array(w, i, whole_file)
        return
    while True:
        i = w.compact(i)
        start = w.base + i
        try:
            value, end = w.decode(i)
        except EntryTooLarge:
            value, end = _OVERSIZED, w.skip_value(i)
        except EntryTooDeep:
            value, end = _TOO_DEEP, w.skip_value(i)
        except JsonScanError as err:
            raise JsonScanError(err.pos, err.msg, entry_start=start) from None
        yield start, w.base + end, value
        i = w.skip_ws(end)
        c = w.char(i)
        if c == "]":
            _after_array(w, i, whole_file)
            return
        if c != ",":
            raise JsonScanError(
                w.base + i, f"expected ',' or ']' after an entry, found {c or 'the end of the file'!r}",
                entry_start=w.base + i,
            )  # fmt: skip
        i = w.skip_ws(i + 1)


def _after_array(w: _Window, i: int, whole_file: bool) -> None:
    j = w.skip_ws(i + 1)
    if whole_file and w.char(j):
        raise JsonScanError(w.base + j, "text after the array's closing ']'", entry_start=w.base + j)


def _array_units(
    w: _Window,
    i: int,
    file_uri: str,
    base: str,
    kind: str,
    rows_per_unit: int,
    check: Callable | None,
    whole_file: bool = False,
) -> Iterator[Unit]:
    """Units of `rows_per_unit` consecutive elements; a damaged rest of the file is one unit of its own."""
    n = count = 0
    first = last = 0

    def unit(**kw) -> Unit:
        return Unit(f"{base}-{n:05d}", kind, file_uri, layout="array", text_format="array", **kw)

    try:
        for start, end, value in _array_spans(w, i, whole_file):
            if value is _OVERSIZED:  # a unit of its own, counted as one too_large reject
                if count:
                    yield unit(start=first, end=last, rows=count)
                    n, count = n + 1, 0
                error = (
                    f"entry at byte {start} is {end - start} bytes > max_annotation_bytes={w.max_entry_bytes}"
                )
                yield unit(start=start, end=end, rows=1, error=error, error_reason="too_large")
                n += 1
                continue
            if value is _TOO_DEEP:  # likewise, one bad_record reject
                if count:
                    yield unit(start=first, end=last, rows=count)
                    n, count = n + 1, 0
                error = f"entry at byte {start} is nested deeper than the JSON parser allows"
                yield unit(start=start, end=end, rows=1, error=error, error_reason="bad_record")
                n += 1
                continue
            if check is not None and n == 0 and count == 0:
                check(value, file_uri)
            if count == 0:
                first = start
            last, count = end, count + 1
            if count == rows_per_unit:
                yield unit(start=first, end=last, rows=count)
                n, count = n + 1, 0
    except JsonScanError as err:
        if count:
            yield unit(start=first, end=last, rows=count)
            n += 1
        yield unit(start=err.entry_start, end=-1, rows=1, error=f"not valid JSON: {err}")
        return
    if count:
        yield unit(start=first, end=last, rows=count)


def json_file_units(
    file_uri: str,
    base: str,
    kind: str,
    rows_per_unit: int,
    check: Callable | None = None,
    max_entry_bytes: int = MAX_ENTRY_BYTES,
) -> list[Unit]:
    """Units of one JSON (array / container / JSON Lines) file, told apart by content. A file the
    store would not serve is one unit that ends in a `storage_error` reject."""
    try:
        return _json_file_units(file_uri, base, kind, rows_per_unit, check, max_entry_bytes)
    except storage.StorageError as err:
        return [Unit(f"{base}-00000", kind, file_uri, error=str(err), error_reason="storage_error")]


def _json_file_units(
    file_uri: str, base: str, kind: str, rows_per_unit: int, check: Callable | None, max_entry_bytes: int
) -> list[Unit]:
    with storage.open_input_stream(file_uri, buffer_size=0) as f:  # _Window reads 1 MiB a request
        w = _Window(f, max_entry_bytes)
        try:
            layout, i = json_layout(w)
        except JsonScanError as err:
            return [Unit(f"{base}-00000", kind, file_uri, error=f"not JSON: {err}")]
        if layout == "empty":
            return []
        if layout in ("array", "container"):
            whole_file = layout == "array"  # (a container's array is followed by its other keys)
            return list(_array_units(w, i, file_uri, base, kind, rows_per_unit, check, whole_file))
    if check is not None:
        try:
            line = next(iter_lines(Unit("", kind, file_uri, layout="lines"), max_entry_bytes))[1]
            first = loads(line) if isinstance(line, bytes) else None
        except (ValueError, StopIteration):
            first = None  # a damaged first line is that row's reject, found by its worker
        if first is not None:
            check(first, file_uri)
    return [
        Unit(f"{base}-{n:05d}", kind, file_uri, layout="lines", start=s, end=e, text_format="lines")
        for n, (s, e) in enumerate(line_ranges(file_uri, rows_per_unit))
    ]


def read_json_unit(unit: Unit, max_entry_bytes: int = MAX_ENTRY_BYTES) -> Iterator[object]:
    """The unit's JSON entries; a JSON Lines line that does not parse comes as a ValueError, one
    over `max_entry_bytes` as an OversizedEntry (its bytes never held)."""
    if unit.layout == "lines":
        for offset, line in iter_lines(unit, max_entry_bytes):
            if isinstance(line, LongLine):
                yield OversizedEntry(offset, line.size, max_entry_bytes)
                continue
            if not line.strip():
                continue
            try:
                yield loads(line)
            except ValueError as err:  # one bad line is that row's problem, not the file's
                yield ValueError(f"line at byte {offset} is not JSON: {err}")
        return
    # The driver measured every element of this range against the limit.
    with storage.open_input_file(unit.source) as f:
        f.seek(unit.start)
        text = f.read(unit.end - unit.start).decode("utf-8")
    i = 0
    while True:
        i = _WS.match(text, i).end()
        if i >= len(text):
            return
        if text[i] == ",":
            i += 1
            continue
        try:
            value, i = _DECODER.raw_decode(text, i)
        except RecursionError:  # the driver decoded it with a shallower stack; the rest is bad_shard
            raise ValueError(f"entry at character {i} of the unit is nested too deeply to decode") from None
        yield value


# ---- parquet -----------------------------------------------------------------------------------
def parquet_units(input_uri: str) -> list[Unit]:
    return [Unit(unit_id_for(input_uri, f), "parquet", f) for f in _files(input_uri, (".parquet",))]


def parquet_schema_names(file_uri: str) -> list[str]:
    with storage.open_input_file(file_uri) as f:
        return pq.ParquetFile(f).schema_arrow.names


def _image_value(value) -> bytes | None:
    # Hugging Face `datasets` stores images as a struct {bytes, path}.
    if isinstance(value, dict):
        return value.get("bytes")
    return value


def read_parquet_unit(unit: Unit, cols: Columns, batch_rows: int = 256) -> Iterator[dict]:
    wanted = [
        c
        for c in (cols.image, cols.caption, cols.key, cols.url, cols.status, cols.error_message, *cols.task)
        if c
    ]
    row = 0
    with storage.open_input_file(unit.source) as f:
        for batch in pq.ParquetFile(f).iter_batches(
            batch_size=batch_rows, columns=list(dict.fromkeys(wanted))
        ):
            for rec in batch.to_pylist():
                key = rec.get(cols.key) if cols.key else None
                out = {
                    "key": str(key) if key is not None else f"{unit.unit_id}-{row:07d}",
                    "image": _image_value(rec.get(cols.image)),
                    "caption": rec.get(cols.caption),
                    "url": rec.get(cols.url) if cols.url else None,
                    **{c: rec.get(c) for c in cols.task},
                }
                status = rec.get(cols.status) if cols.status else None
                if status is not None and status != "success":
                    # img2dataset keeps failed rows in its parquet, without image bytes.
                    message = rec.get(cols.error_message) if cols.error_message else None
                    out["_reject"] = ("missing_image", f"producer status {status!r}: {message}")
                elif key is None and cols.key:
                    out["_reject"] = ("bad_record", f"null {cols.key!r} at row {row}")
                row += 1
                yield out


# ---- webdataset --------------------------------------------------------------------------------
def webdataset_units(input_uri: str) -> list[Unit]:
    return [Unit(unit_id_for(input_uri, f), "webdataset", f) for f in _files(input_uri, (".tar",))]


def _split_wds_name(name: str) -> tuple[str, str]:
    # WebDataset convention: the key is the path up to the first dot of the basename.
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(folder, stem) if folder else stem, ext.lower()


@dataclass(frozen=True)
class SkippedMember:
    """A tar member over the size limit: left unread in the stream."""

    name: str
    size: int
    limit: int
    limit_name: str  # the setting that holds `limit`, for the reject's detail


def _wds_record(
    key: str, members: dict[str, bytes | SkippedMember], media_exts: tuple[str, ...] = WDS_IMAGE_EXTS
) -> dict:
    image_ext = next((e for e in media_exts if e in members), None)
    rec: dict = {"key": key, "image": None, "caption": None, "url": None}
    skipped = next((m for m in members.values() if isinstance(m, SkippedMember)), None)
    if skipped is not None:
        rec["_reject"] = (
            "too_large",
            f"tar member {skipped.name!r} is {skipped.size} bytes > {skipped.limit_name}={skipped.limit} (not read)",
        )
        return rec
    rec["image"] = members.get(image_ext) if image_ext else None
    if "json" in members:
        try:
            meta = loads(members["json"])
            if not isinstance(meta, dict):
                raise ValueError(f"expected an object, got {type(meta).__name__}")
        except (ValueError, UnicodeDecodeError) as err:
            rec["_reject"] = ("bad_record", f"{key}.json: {err}")
            return rec
        rec["key"] = str(meta.get("key") or key)
        rec["url"] = meta.get("url")
        rec["caption"] = meta.get("caption")
    if "txt" in members:
        rec["caption"] = members["txt"].decode("utf-8", errors="replace")
    if image_ext is None:
        rec["_reject"] = ("missing_image", f"no {'/'.join(media_exts)} member for key {key!r}")
    return rec


def read_webdataset_unit(
    unit: Unit,
    max_member_bytes: int | None = None,
    media_exts: tuple[str, ...] = WDS_IMAGE_EXTS,
    limit_name: str = "max_image_bytes",
) -> Iterator[dict]:
    """Stream a tar (no seeking, so it works on object storage) and group members by key. A
    truncated tar raises when reading reaches the damage; the sample being read then is lost. A
    member larger than `max_member_bytes` (its header says so) is not read: the stream passes
    over its bytes in small blocks, and its sample is rejected `too_large`, naming `limit_name` (the
    setting that gave the limit). The sample's `image` is its first member with one of `media_exts`
    (a video's: `pipelines/data/video.py`)."""
    current: str | None = None
    members: dict[str, bytes | SkippedMember] = {}
    with storage.open_input_stream(unit.source) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_wds_name(member.name)
            if key != current and current is not None:
                yield _wds_record(current, members, media_exts)
                members = {}
            current = key
            if max_member_bytes is not None and member.size > max_member_bytes:
                members[ext] = SkippedMember(member.name, member.size, max_member_bytes, limit_name)
                continue
            handle = tar.extractfile(member)
            members[ext] = handle.read() if handle else b""
    if current is not None:
        yield _wds_record(current, members, media_exts)


# ---- annotation files (json) -------------------------------------------------------------------
def json_units(
    input_uri: str, rows_per_unit: int, check: Callable | None = None, max_entry_bytes: int = MAX_ENTRY_BYTES
) -> list[Unit]:
    """Units of every annotation file; `check(first_entry, file_uri)` may refuse a file up front."""
    units: list[Unit] = []
    for file_uri in _files(input_uri, ANNOTATION_SUFFIXES):
        base = unit_id_for(input_uri, file_uri)
        units += json_file_units(file_uri, base, "json", rows_per_unit, check, max_entry_bytes)
    return units


# ---- URL lists ---------------------------------------------------------------------------------
def _url_list_format(file_uri: str) -> str:
    suffix = posixpath.splitext(file_uri)[1].lower()
    return suffix.lstrip(".") if suffix in URL_LIST_SUFFIXES else "txt"


def _parquet_row_group_units(file_uri: str, base: str, rows_per_unit: int, cols: dict) -> list[Unit]:
    with storage.open_input_file(file_uri) as f:
        meta = pq.ParquetFile(f).metadata
    spans: list[list[int]] = []
    rows: list[int] = []
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if not spans or rows[-1] + n > rows_per_unit:
            spans.append([])
            rows.append(0)
        spans[-1].append(g)
        rows[-1] += n
    return [
        Unit(
            f"{base}-{i:05d}",
            "urls",
            file_uri,
            layout="row_groups",
            row_groups=groups,
            rows=n,
            text_format="parquet",
            columns=cols,
        )  # fmt: skip
        for i, (groups, n) in enumerate(zip(spans, rows))
    ]


def _url_file_units(
    file_uri: str, base: str, fmt: str, rows_per_unit: int, names: dict, max_entry_bytes: int
) -> list[Unit]:
    def columns(found: list[str]) -> dict:
        return dataclasses.asdict(resolve_columns(found, image=None, need_image=False, **names))

    if fmt == "json":
        first: list = []
        units = json_file_units(
            file_uri, base, "urls", rows_per_unit, lambda e, _: first.append(e), max_entry_bytes
        )
        found = sorted(first[0]) if first and isinstance(first[0], dict) else ["url", "caption"]
        for u in units:
            u.columns, u.text_format = columns(found), "json"
        return units
    if fmt == "parquet":
        return _parquet_row_group_units(
            file_uri, base, rows_per_unit, columns(parquet_schema_names(file_uri))
        )
    if _file_size(file_uri) == 0:
        return []
    header = None
    if fmt == "txt":
        found = ["url", "caption"]
    else:
        line = next(iter_lines(Unit("", "urls", file_uri, layout="lines"), max_entry_bytes), (0, b""))[1]
        if isinstance(line, LongLine):
            raise ValueError(f"the first line is longer than max_annotation_bytes={max_entry_bytes}")
        if fmt == "jsonl":
            entry = loads(line) if line.strip() else {}
            found = sorted(entry) if isinstance(entry, dict) else []
        else:
            header = next(csv.reader([line.decode("utf-8")], delimiter="\t" if fmt == "tsv" else ","), [])
            found = header
    cols = columns(found)
    return [
        Unit(
            f"{base}-{n:05d}",
            "urls",
            file_uri,
            layout="lines",
            start=s,
            end=e,
            text_format=fmt,
            header=header,
            columns=cols,
        )  # fmt: skip
        for n, (s, e) in enumerate(line_ranges(file_uri, rows_per_unit))
    ]


def url_units(
    input_uri: str,
    rows_per_unit: int,
    *,
    caption: str | None,
    key: str | None,
    url: str | None,
    max_entry_bytes: int = MAX_ENTRY_BYTES,
) -> list[Unit]:
    """Units of every URL list file (column names resolved per file, from metadata only)."""
    units: list[Unit] = []
    names = {"caption": caption, "key": key, "url": url}
    for file_uri in _files(input_uri, URL_LIST_SUFFIXES):
        fmt = _url_list_format(file_uri)
        base = unit_id_for(input_uri, file_uri)
        try:
            units += _url_file_units(file_uri, base, fmt, rows_per_unit, names, max_entry_bytes)
        except ColumnError:
            raise
        except READ_ERRORS as err:
            # Unreadable metadata (footer, first line): the whole file counts as one reject.
            reason = "storage_error" if isinstance(err, storage.StorageError) else "bad_shard"
            units.append(Unit(f"{base}-00000", "urls", file_uri, text_format=fmt,
                              error=f"{type(err).__name__}: {err}", error_reason=reason))  # fmt: skip
    return units


def _url_record(row: dict, cols: Columns, fallback_key: str) -> dict:
    key = row.get(cols.key) if cols.key else None
    rec = {
        "key": str(key) if key is not None and key != "" else fallback_key,
        "url": row.get(cols.url),
        "caption": row.get(cols.caption) if cols.caption else None,
        **{c: row.get(c) for c in cols.task},
    }
    status = row.get(cols.status) if cols.status else None
    if status not in (None, "", "success"):
        # An img2dataset output fed back as a URL list: rows it already failed are not fetched again.
        message = row.get(cols.error_message) if cols.error_message else None
        rec["_reject"] = ("download_error", f"producer status {status!r}: {message}")
    elif not isinstance(rec["url"], str) or not rec["url"].strip():
        rec["_reject"] = ("bad_record", f"no URL in row (url={rec['url']!r})")
    return rec


def _url_rows(unit: Unit, max_entry_bytes: int = MAX_ENTRY_BYTES) -> Iterator[object]:
    """The unit's rows as dicts (or a ValueError for a line that does not parse, an OversizedEntry
    for one over the limit)."""
    fmt = unit.text_format
    if fmt == "parquet":
        cols = Columns(**(unit.columns or {}))
        wanted = [
            c for c in (cols.url, cols.caption, cols.key, cols.status, cols.error_message, *cols.task) if c
        ]
        with storage.open_input_file(unit.source) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=4096, row_groups=unit.row_groups,
                                         columns=list(dict.fromkeys(wanted))):  # fmt: skip
                yield from batch.to_pylist()
        return
    if fmt == "json":
        yield from read_json_unit(unit, max_entry_bytes)
        return
    header = unit.header or []
    for offset, line in iter_lines(unit, max_entry_bytes):
        if unit.start == 0 and offset == 0 and fmt in ("csv", "tsv"):
            continue  # the header line
        if isinstance(line, LongLine):
            yield OversizedEntry(offset, line.size, max_entry_bytes)
            continue
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
            if fmt == "txt":
                yield {"url": text.strip(), "caption": ""}
            elif fmt == "jsonl":
                yield loads(text)
            else:
                values = next(csv.reader([text], delimiter="\t" if fmt == "tsv" else ","))
                if len(values) != len(header):
                    raise ValueError(f"{len(values)} fields, the header has {len(header)}")
                yield dict(zip(header, values))
        except ValueError as err:
            yield ValueError(f"line at byte {offset}: {err}")


def read_url_unit(unit: Unit, max_entry_bytes: int = MAX_ENTRY_BYTES) -> Iterator[dict]:
    """Raw records (no image yet) of one URL-list unit."""
    cols = Columns(**(unit.columns or {}))
    for i, row in enumerate(_url_rows(unit, max_entry_bytes)):
        fallback = f"{unit.unit_id}-{i:07d}"
        if isinstance(row, OversizedEntry):
            yield {"key": fallback, "_reject": ("too_large", str(row))}
        elif isinstance(row, Exception):
            yield {"key": fallback, "_reject": ("bad_record", str(row))}
        elif not isinstance(row, dict):
            yield {"key": fallback, "_reject": ("bad_record", f"row {i} is a {type(row).__name__}")}
        else:
            yield _url_record(row, cols, fallback)
