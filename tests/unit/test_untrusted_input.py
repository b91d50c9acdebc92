"""Input written by strangers, without Ray: image paths stay inside the image root, URL lists reach
only public http(s) addresses, and oversized tar members and JSON entries are let go unread
(memory stays bounded by the limits, whatever the input holds)."""

from __future__ import annotations

import io
import json
import tarfile
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from pipelines.data import formats, readers
from pipelines.data.download import DownloadConfig, fetch, is_public_address

pytestmark = pytest.mark.unit


def jpeg(size: tuple[int, int] = (48, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (30, 60, 90)).save(buf, format="JPEG")
    return buf.getvalue()


# ---- image paths -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    ["../secret.jpg", "a/../../secret.jpg", "..", "/etc/passwd", "\\\\server\\share\\x.jpg", "C:/x.jpg",
     "s3://other-bucket/x.jpg", "file:///etc/passwd", "http://169.254.169.254/x"],
)  # fmt: skip
def test_image_paths_leaving_the_root_are_path_outside_root_rejects(path: str) -> None:
    entry = {"image": path, "caption": "a cat", "key": "k1"}
    rows = formats.entry_rows(entry, "fallback", "s3://bucket/images")
    assert rows == [{"key": "k1", "_reject": ("path_outside_root", rows[0]["_reject"][1])}]
    assert repr(path)[1:-1] in rows[0]["_reject"][1]


def test_paths_inside_the_root_resolve_under_it_and_the_option_allows_any() -> None:
    inside = formats.entry_rows({"image": "a/../b/c.jpg", "caption": "x"}, "f", "s3://bucket/images")
    assert inside[0]["_image_refs"] == [["s3://bucket/images/b/c.jpg"]]
    # Every format checks every image: a Karpathy entry, an NLVR2 pair with one bad side.
    karpathy = {"filepath": "..", "filename": "x.jpg", "sentences": [{"raw": "a"}], "cocoid": 7}
    assert formats.entry_rows(karpathy, "f", "/data")[0]["_reject"][0] == "path_outside_root"
    pair = {"images": ["left.jpg", "/etc/shadow"], "sentence": "two dogs", "label": True, "identifier": "p1"}
    assert formats.entry_rows(pair, "f", "/data") == [
        {
            "key": "p1",
            "_reject": ("path_outside_root", formats.entry_rows(pair, "f", "/data")[0]["_reject"][1]),
        }
    ]
    allowed = formats.entry_rows(
        {"image": "s3://other/x.jpg", "caption": "x"}, "f", "s3://bucket/images", allow_outside_root=True
    )
    assert allowed[0]["_image_refs"] == [["s3://other/x.jpg"]]


# ---- URLs --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("address", "public"),
    [("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("::1", False),
     ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("169.254.169.254", False),
     ("fe80::1%eth0", False), ("fd00::1", False), ("0.0.0.0", False), ("224.0.0.1", False),
     ("100.64.0.1", False), ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True),
     # IPv4 carried in IPv6 (6to4, NAT64) is judged as that IPv4
     ("2002:7f00:1::", False), ("2002:a9fe:a9fe::1", False), ("2002:808:808::", True),
     ("64:ff9b::7f00:1", False), ("64:ff9b::a00:1", False), ("64:ff9b::808:808", True),
     ("64:ff9b:1::808:808", False)],
)  # fmt: skip
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public_address(address) is public


@pytest.mark.parametrize(
    ("url", "outcome"),
    [("file:///etc/passwd", "bad_scheme"), ("ftp://example.com/x.jpg", "bad_scheme"),
     ("data:image/png;base64,AAAA", "bad_scheme"), ("x.jpg", "bad_scheme"),
     ("http://127.0.0.1:9/x.jpg", "private_address"), ("http://localhost:9/x.jpg", "private_address"),
     ("http://169.254.169.254/latest/meta-data/", "private_address"), ("http://[::1]:9/x", "private_address"),
     ("http://10.0.0.1/x.jpg", "private_address"), ("http://2130706433/x.jpg", "private_address"),
     ("http://0x7f.1/x.jpg", "private_address"), ("http://[::ffff:127.0.0.1]:9/x", "private_address")],
)  # fmt: skip
def test_urls_that_may_not_be_fetched_are_refused_before_any_connection(url: str, outcome: str) -> None:
    result = fetch(url, DownloadConfig(timeout_s=2, retries=3, backoff_s=0))
    assert (result.outcome, result.reason, result.data) == (outcome, "url_not_allowed", None)
    assert "after" not in result.detail  # refused once, never retried


# ---- sizes -------------------------------------------------------------------------------------
def _peak_while(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_an_oversized_tar_member_is_passed_over_unread(tmp_path: Path) -> None:
    big = 24 << 20
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, members in (("a", {"jpg": jpeg(), "txt": b"first"}), ("b", {"jpg": None, "txt": b"big"}),
                             ("c", {"jpg": jpeg(), "txt": b"last"})):  # fmt: skip
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                if data is None:  # 24 MiB of image the header announces
                    info.size = big
                    tar.addfile(info, io.BytesIO(b"\0" * big))
                else:
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tar").write_bytes(buf.getvalue())
    del buf
    unit = readers.Unit("s", "webdataset", str(tmp_path / "s.tar"))
    records, peak = _peak_while(lambda: list(readers.read_webdataset_unit(unit, max_member_bytes=1 << 20)))
    assert [r["key"] for r in records] == ["a", "b", "c"]
    assert records[1]["_reject"] == (
        "too_large",
        f"tar member 'b.jpg' is {big} bytes > max_image_bytes=1048576 (not read)",
    )
    assert records[0]["caption"] == "first" and records[2]["image"] == jpeg()
    assert peak < 8 << 20, f"peak {peak} bytes: the member was read into memory"
    # A video ingest's limit is another setting: the detail names the one to raise.
    videos = readers.read_webdataset_unit(unit, 1 << 20, media_exts=("jpg",), limit_name="max_video_bytes")
    assert next(r for r in videos if r["key"] == "b")["_reject"][1].endswith(
        "> max_video_bytes=1048576 (not read)"
    )


def test_a_gigantic_json_line_or_element_is_let_go_as_it_streams(tmp_path: Path) -> None:
    huge = "x" * (24 << 20)
    good = [{"image": f"{i}.jpg", "caption": f"caption {i}"} for i in range(3)]
    lines = [json.dumps(good[0]), json.dumps({"image": "h.jpg", "caption": huge}), json.dumps(good[1])]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n" + json.dumps(good[2]) + "\n")
    units = readers.json_units(str(tmp_path / "a.jsonl"), 10, max_entry_bytes=1 << 16)
    entries, peak = _peak_while(lambda: [e for u in units for e in readers.read_json_unit(u, 1 << 16)])
    assert entries[0] == good[0] and entries[2:] == good[1:]
    assert isinstance(entries[1], readers.OversizedEntry) and "max_annotation_bytes=65536" in str(entries[1])
    assert peak < 8 << 20, f"peak {peak} bytes: the line was held whole"

    # A JSON array: the element over the limit becomes a unit of its own (one too_large reject),
    # scanned past by its brackets; the elements after it are read as usual.
    array = [*good[:2], {"image": "h.jpg", "caption": huge, "nested": [{"a": "]}"}]}, good[2]]
    (tmp_path / "b.json").write_text(json.dumps(array))
    units, peak = _peak_while(
        lambda: readers.json_units(str(tmp_path / "b.json"), 10, max_entry_bytes=1 << 16)
    )
    assert [(u.rows, u.error_reason if u.error else None) for u in units] == [
        (2, None),
        (1, "too_large"),
        (1, None),
    ]
    assert [e for u in units if not u.error for e in readers.read_json_unit(u)] == good
    assert peak < 8 << 20, f"peak {peak} bytes: the element was held whole"

    # A gigantic first line (a single huge JSON document): JSON Lines, that line one reject.
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"image": "h.jpg", "caption": huge}) + "\n" + json.dumps(good[0])
    )
    units = readers.json_units(str(tmp_path / "c.jsonl"), 10, max_entry_bytes=1 << 16)
    entries = [e for u in units for e in readers.read_json_unit(u, 1 << 16)]
    assert isinstance(entries[0], readers.OversizedEntry) and entries[1:] == [good[0]]


def test_json_nested_deeper_than_the_parser_allows_is_one_bad_entry(tmp_path: Path) -> None:
    """A few KB of brackets would end the task with RecursionError: it is that entry's reject."""
    deep = "[" * 100_000 + "]" * 100_000
    good = [{"image": f"{i}.jpg", "caption": f"caption {i}"} for i in range(3)]
    (tmp_path / "a.jsonl").write_text(
        "\n".join([json.dumps(good[0]), deep, *map(json.dumps, good[1:])]) + "\n"
    )
    entries = [
        e for u in readers.json_units(str(tmp_path / "a.jsonl"), 10) for e in readers.read_json_unit(u)
    ]
    assert entries[0] == good[0] and entries[2:] == good[1:]
    assert isinstance(entries[1], ValueError) and "nested deeper than the parser allows" in str(entries[1])

    # A JSON array: that element is a bad_record unit of its own, found by its brackets.
    (tmp_path / "b.json").write_text(
        "[" + ",".join([json.dumps(good[0]), deep, *map(json.dumps, good[1:])]) + "]"
    )
    units = readers.json_units(str(tmp_path / "b.json"), 10)
    assert [(u.rows, u.error_reason if u.error else None) for u in units] == [
        (1, None),
        (1, "bad_record"),
        (2, None),
    ]
    assert [e for u in units if not u.error for e in readers.read_json_unit(u)] == good

    # A deep first line (JSON Lines), and a tar sample's .json member.
    (tmp_path / "c.jsonl").write_text('{"image": ' + deep + "}\n" + json.dumps(good[0]) + "\n")
    entries = [
        e for u in readers.json_units(str(tmp_path / "c.jsonl"), 10) for e in readers.read_json_unit(u)
    ]
    assert isinstance(entries[0], ValueError) and entries[1:] == [good[0]]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("s.jpg", jpeg()), ("s.json", deep.encode())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "d.tar").write_bytes(buf.getvalue())
    (record,) = readers.read_webdataset_unit(readers.Unit("d", "webdataset", str(tmp_path / "d.tar")))
    assert record["_reject"][0] == "bad_record" and "nested deeper" in record["_reject"][1]


def test_text_after_a_json_arrays_closing_bracket_is_a_counted_reject(tmp_path: Path) -> None:
    """(A JSON Lines file whose first line is an array reads as one JSON array: the lines after it
    are one bad_shard reject, not dropped unread.)"""
    good = [{"image": f"{i}.jpg", "caption": f"caption {i}"} for i in range(3)]
    (tmp_path / "a.json").write_text(json.dumps(good[:2]) + "\n" + json.dumps(good[2]) + "\n")
    units = readers.json_units(str(tmp_path / "a.json"), 10)
    assert [(u.rows, u.error_reason if u.error else None) for u in units] == [(2, None), (1, "bad_shard")]
    assert "text after the array's closing ']'" in units[1].error
    (tmp_path / "b.json").write_text(json.dumps(good) + "\n\n")  # trailing whitespace is fine
    assert [u.error for u in readers.json_units(str(tmp_path / "b.json"), 10)] == [None]
