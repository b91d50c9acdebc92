"""The tasks' official annotation formats, read unchanged: small hand-written files in each
format, images the test renders, the three ingest stages run in-process (no Ray)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pipelines import storage
from pipelines.data.formats import detect
from pipelines.data.ingest import IngestConfig, list_units
from pipelines.data.records import DATA_SCHEMA
from tests.unit.test_data_ingest import ingest_in_process, read_dir

pytestmark = pytest.mark.unit


def png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_images(root: str) -> None:
    """A few images under `root` (a path or URI), named as the annotation files below use them."""
    images = {
        "train2014/COCO_1.jpg": png((128, 64), (200, 0, 0)),
        "val2014/COCO_2.jpg": png((64, 64), (0, 200, 0)),
        "val2014/COCO_3.jpg": png((96, 64), (0, 0, 200)),
        "nlvr/left.png": png((80, 64), (10, 10, 10)),
        "nlvr/right.png": png((64, 64), (250, 250, 250)),
        "nlvr/tiny.png": png((8, 8), (250, 0, 250)),
        "flickr/2248275918.jpg": png((64, 96), (100, 100, 0)),
        "flickr/11.jpg": png((64, 64), (0, 100, 100)),
    }
    for rel, data in images.items():
        storage.write_bytes(storage.join(root, rel), data)


# One file per task format, exactly as the official releases lay them out.
TASK_FILES: dict[str, object] = {
    "vqa_train.json": [
        {"image": "train2014/COCO_1.jpg", "question": "What Colour is it?", "question_id": 101,
         "answer": ["Red", "red", "red", "dark red", "Red", "red", "red", "red", "maroon", "red"],
         "dataset": "vqa"},
        {"image": "val2014/COCO_2.jpg", "question": "Is it green?", "question_id": 102, "answer": "yes",
         "dataset": "vg"},
    ],
    "dataset_coco.json": {
        "images": [
            {"filepath": "train2014", "filename": "COCO_1.jpg", "split": "train", "cocoid": 1, "imgid": 0,
             "sentences": [{"raw": "A red box."}, {"raw": "Something RED."}]},
            {"filepath": "val2014", "filename": "COCO_2.jpg", "split": "restval", "cocoid": 2, "imgid": 1,
             "sentences": [{"raw": "A green square"}]},
            {"filepath": "val2014", "filename": "COCO_3.jpg", "split": "test", "cocoid": 3, "imgid": 2,
             "sentences": [{"raw": "A blue thing"}]},
        ],
        "dataset": "coco",
    },
    "retrieval_test.json": [
        {"image": "val2014/COCO_3.jpg", "caption": ["A blue rectangle.", "Blue!", "a wide blue shape"]},
    ],
    "refcoco_val.jsonl": [
        {"image": "train2014/COCO_1.jpg", "bbox": [32, 16, 64, 32], "text": "the left part", "ref_id": 7},
        {"image": "val2014/COCO_2.jpg", "bbox": [0, 0, 32, 32], "phrase": "top corner", "ref_id": 8},
    ],
    "nlvr2_dev.json": [
        {"images": ["nlvr/left.png", "nlvr/right.png"], "sentence": "The left image is darker.",
         "label": "True", "identifier": "dev-1"},
        {"images": ["nlvr/left.png", "nlvr/tiny.png"], "sentence": "Two images.", "label": "False",
         "identifier": "dev-2"},
    ],
    "ve_test.json": [
        {"image": "flickr/2248275918", "sentence": "A yellow picture.", "label": "entailment"},
        {"image": "flickr/11.jpg", "sentence": "A cat sleeps.", "label": "neutral"},
    ],
}  # fmt: skip


def write_task_file(root: str, name: str) -> str:
    uri = storage.join(root, name)
    content = TASK_FILES[name]
    if name.endswith(".jsonl"):
        storage.write_text(uri, "\n".join(json.dumps(e) for e in content) + "\n")  # type: ignore[union-attr]
    else:
        storage.write_text(uri, json.dumps(content))
    return uri


def ingest_file(tmp_path: Path, name: str, **options) -> tuple[dict, dict[str, dict], dict[str, str]]:
    root = str(tmp_path / "raw")
    write_images(root)
    cfg = IngestConfig(input=write_task_file(root, name), format="json", image_root=root,
                       output=str(tmp_path / "out"), image_size=32, **options)  # fmt: skip
    stats = ingest_in_process(cfg)
    assert stats["read"] == stats["written"] + stats["rejected"]
    data = read_dir(tmp_path / "out" / "data")
    assert data.schema.equals(DATA_SCHEMA)
    rejects_dir = tmp_path / "out" / "rejects"
    rejects = read_dir(rejects_dir).to_pylist() if rejects_dir.exists() else []
    return stats, {r["key"]: r for r in data.to_pylist()}, {r["key"]: r["detail"] for r in rejects}


def test_vqa_keeps_every_human_answer_and_the_answer_source(tmp_path: Path) -> None:
    _, rows, _ = ingest_file(tmp_path, "vqa_train.json")
    vqa, vg = rows["101"], rows["102"]
    assert vqa["question"] == "what colour is it" and vqa["caption"] == ""
    assert vqa["raw_answers"] == TASK_FILES["vqa_train.json"][0]["answer"]  # as annotated, uncleaned
    assert vqa["answers"] == ["Red", "red", "dark red", "maroon"]
    assert vqa["answer_weights"] == pytest.approx([0.2, 0.6, 0.1, 0.1])
    assert (vqa["dataset"], vg["dataset"]) == ("vqa", "vg")
    assert (vg["raw_answers"], vg["answers"], vg["answer_weights"]) == (["yes"], ["yes"], [1.0])
    assert vqa["image_id"] == "train2014/COCO_1.jpg"  # no image_id in the file: the image path
    assert (vqa["orig_width"], vqa["orig_height"], vqa["width"], vqa["height"]) == (128, 64, 64, 32)


def test_karpathy_coco_one_row_per_sentence_of_the_selected_splits(tmp_path: Path) -> None:
    stats, rows, _ = ingest_file(tmp_path, "dataset_coco.json", splits=["train", "restval"])
    assert set(rows) == {"1#0", "1#1", "2#0"} and stats["skipped_by_split"] == 1
    assert [rows[k]["image_id"] for k in ("1#0", "1#1", "2#0")] == ["1", "1", "2"]
    assert rows["1#1"]["caption"] == "something red"


def test_caption_list_rows_share_the_image_path_as_image_id(tmp_path: Path) -> None:
    _, rows, _ = ingest_file(tmp_path, "retrieval_test.json", dedupe=False)
    assert len(rows) == 3 and all(k.startswith("retrieval_test-00000-000000#") for k in rows)
    assert {r["image_id"] for r in rows.values()} == {"val2014/COCO_3.jpg"}
    assert sorted(r["caption"] for r in rows.values()) == ["a blue rectangle", "a wide blue shape", "blue"]


def test_grounding_json_lines_box_scaled_and_original_size_kept(tmp_path: Path) -> None:
    _, rows, _ = ingest_file(tmp_path, "refcoco_val.jsonl")
    left, corner = rows["7"], rows["8"]
    assert left["caption"] == "the left part" and corner["caption"] == "top corner"
    assert left["bbox"] == [16, 8, 32, 16]  # 128x64 stored at 64x32
    assert (left["orig_width"], left["orig_height"]) == (128, 64)
    assert corner["bbox"] == [0, 0, 16, 16]


def test_nlvr2_stores_both_images_and_rejects_a_pair_with_one_bad_image(tmp_path: Path) -> None:
    stats, rows, rejects = ingest_file(tmp_path, "nlvr2_dev.json")
    pair = rows["dev-1"]
    assert (pair["label"], pair["caption"]) == ("True", "the left image is darker")
    assert len(pair["images"]) == 2 and pair["images"][0] == pair["image"]
    sizes = [Image.open(io.BytesIO(b)).size for b in pair["images"]]
    assert sizes == [(40, 32), (32, 32)]
    assert stats["rejected_by_reason"]["too_small"] == 1
    assert rejects["dev-2"].startswith("image 1 (") and "tiny.png" in rejects["dev-2"]


def test_snli_ve_accepts_flickr_ids_with_and_without_jpg(tmp_path: Path) -> None:
    _, rows, _ = ingest_file(tmp_path, "ve_test.json")
    labels = sorted((r["label"], r["image_id"]) for r in rows.values())
    assert labels == [("entailment", "flickr/2248275918"), ("neutral", "flickr/11.jpg")]


@pytest.mark.parametrize(
    ("entry", "fmt"),
    [
        ({"image": "a", "question": "q?", "answer": "x"}, "vqa"),
        ({"image": "a", "caption": "c"}, "caption"),
        ({"image": "a", "caption": "c", "bbox": [0, 0, 1, 1]}, "grounding"),
        ({"image": "a", "sentence": "s", "label": "neutral"}, "snli_ve"),
        ({"images": ["a", "b"], "sentence": "s", "label": "True"}, "nlvr2"),
        ({"filename": "a", "sentences": [{"raw": "s"}], "split": "val"}, "karpathy"),
        ({"file_name": "a", "id": 3}, None),
        ("just text", None),
    ],
)
def test_formats_told_apart_by_keys(entry: object, fmt: str | None) -> None:
    assert detect(entry) == fmt


def test_an_entry_that_fits_no_format_is_a_clear_error(tmp_path: Path) -> None:
    write_images(str(tmp_path))
    coco_instances = {"images": [{"file_name": "x.jpg", "id": 1, "width": 4, "height": 4}], "annotations": []}
    (tmp_path / "instances.json").write_text(json.dumps(coco_instances))
    cfg = IngestConfig(input=str(tmp_path / "instances.json"), format="json", image_root=str(tmp_path),
                       output=str(tmp_path / "out"))  # fmt: skip
    with pytest.raises(ValueError, match=r"fits no annotation format \(keys: \['file_name', 'height'"):
        list_units(cfg)
    # Past the first entry, a stray entry is that row's reject, with the same explanation.
    ann = [{"image": "val2014/COCO_2.jpg", "caption": "ok"}, {"img": "val2014/COCO_2.jpg"}]
    (tmp_path / "mixed.json").write_text(json.dumps(ann))
    stats = ingest_in_process(cfg.model_copy(update={"input": str(tmp_path / "mixed.json")}))
    detail = read_dir(tmp_path / "out" / "rejects").to_pylist()[0]["detail"]
    assert stats["rejected_by_reason"]["bad_record"] == 1 and "keys: ['img']" in detail
    assert "valid formats: karpathy" in detail
