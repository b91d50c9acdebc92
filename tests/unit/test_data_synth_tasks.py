"""The shapes world's finetuning tasks: official layouts, annotations true to their scenes,
deterministic splits, and the model-free baselines a learning test compares against."""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from jobs.cli import main as cli_main
from jobs.synth_cmd import TASK_NAMES
from pipelines.synth import language as lang
from pipelines.synth.tasks import (
    SNLI_LABELS,
    TASKS,
    largest_object_accuracy,
    largest_object_box,
    majority_by_question_type,
    majority_label_by_text,
    render_task_annotations,
    task_baselines,
)
from pipelines.synth.world import COLOURS, SHAPES

pytestmark = pytest.mark.unit
SIZE = 64


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tasks")
    render_task_annotations(str(root), 60, seed=3, image_size=SIZE)
    return root


@pytest.fixture(scope="module")
def baseline_world(tmp_path_factory) -> Path:
    """Large enough test splits (100 images or pairs) for a baseline's accuracy to mean something."""
    root = tmp_path_factory.mktemp("baselines")
    render_task_annotations(str(root), 200, seed=5, image_size=48, tasks=("vqa", "grounding", "nlvr2", "snli_ve"),
                            split_fractions=(0.5, 0.0, 0.5))  # fmt: skip
    return root


def load(root: Path, name: str):
    return json.loads((root / name).read_text())


def scenes(root: Path) -> dict:
    return {k: v for split in ("train", "val", "test") for k, v in load(root, f"scenes_{split}.json").items()}


def obj(colour: str, shape: str, size: str, cell: int) -> dict:
    side = SIZE / 3
    extent = 0.3 * SIZE if size == "large" else 0.18 * SIZE
    return {"colour": colour, "shape": shape, "size": size, "cell": cell,
            "bbox": [cell % 3 * side, cell // 3 * side, extent, extent]}  # fmt: skip


def test_every_file_has_the_official_layout(world: Path) -> None:
    truth = scenes(world)
    for image in truth:
        with Image.open(world / image) as im:
            assert im.format == "JPEG" and im.size == (SIZE, SIZE)
    for split in ("train", "val", "test"):
        vqa = load(world, f"vqa_{split}.json")
        assert {tuple(sorted(e)) for e in vqa} == {("answer", "dataset", "image", "question", "question_id")}
        assert all(len(e["answer"]) == 10 and all(isinstance(a, str) for a in e["answer"]) for e in vqa)
        assert all(isinstance(e["question_id"], int) and e["dataset"] == "vqa" for e in vqa)
        assert all(e["question"][0].isupper() and e["question"].endswith("?") for e in vqa)
        grounding = load(world, f"grounding_{split}.json")
        assert {tuple(sorted(e)) for e in grounding} == {("bbox", "image", "ref_id", "text")}
        for e in grounding:
            x, y, w, h = e["bbox"]
            assert min(x, y) >= 0 and w > 0 and h > 0 and x + w <= SIZE + 0.01 and y + h <= SIZE + 0.01
        nlvr2 = load(world, f"nlvr2_{split}.json")
        assert {tuple(sorted(e)) for e in nlvr2} == {("identifier", "images", "label", "sentence")}
        assert all(len(e["images"]) == 2 and e["label"] in ("True", "False") for e in nlvr2)
        snli = load(world, f"snli_ve_{split}.json")
        assert {tuple(sorted(e)) for e in snli} == {("image", "label", "sentence")}
        assert {e["label"] for e in snli} == set(SNLI_LABELS)
        for e in vqa + grounding + snli:
            assert e["image"] in truth
        assert all(p in truth for e in nlvr2 for p in e["images"])
    ids = [e["question_id"] for s in ("train", "val", "test") for e in load(world, f"vqa_{s}.json")]
    refs = [e["ref_id"] for s in ("train", "val", "test") for e in load(world, f"grounding_{s}.json")]
    assert len(set(ids)) == len(ids) and len(set(refs)) == len(refs)
    assert sorted(set(load(world, "vqa_answer_list.json"))) == sorted(load(world, "vqa_answer_list.json"))


def test_caption_files_karpathy_and_albef(world: Path) -> None:
    karpathy = load(world, "dataset_coco.json")
    assert karpathy["dataset"] == "coco" and len(karpathy["images"]) == 60
    fields = {"filepath", "filename", "sentences", "split", "cocoid", "imgid", "sentids"}
    for imgid, image in enumerate(karpathy["images"]):
        assert set(image) == fields and image["imgid"] == imgid and image["split"] in ("train", "val", "test")
        assert (world / image["filepath"] / image["filename"]).is_file()
        assert len(image["sentences"]) == 5 and [s["sentid"] for s in image["sentences"]] == image["sentids"]
        for sentence in image["sentences"]:
            assert sentence["tokens"] == re.findall(r"[a-z0-9]+", sentence["raw"].lower())
    train = load(world, "caption_train.json")
    assert {tuple(sorted(e)) for e in train} == {("caption", "image", "image_id")}
    assert all(isinstance(e["caption"], str) for e in train)
    assert len(train) == 5 * sum(i["split"] == "train" for i in karpathy["images"])
    retrieval_train = load(world, "retrieval_train.json")
    assert [e["caption"] for e in retrieval_train] == [e["caption"] for e in train]
    assert all(isinstance(e["image_id"], int) for e in retrieval_train)
    raw = {
        (i["filepath"] + "/" + i["filename"]): [s["raw"] for s in i["sentences"]] for i in karpathy["images"]
    }
    for split in ("val", "test"):
        entries = load(world, f"caption_{split}.json")
        assert entries == load(world, f"retrieval_{split}.json")
        assert {tuple(sorted(e)) for e in entries} == {("caption", "image")}
        assert all(e["caption"] == raw[e["image"]] for e in entries)


def test_captions_are_five_faithful_paraphrases(world: Path) -> None:
    truth = scenes(world)
    images = load(world, "dataset_coco.json")["images"]
    all_refs = []
    for image in images:
        refs = [s["raw"] for s in image["sentences"]]
        objects = truth[image["filepath"] + "/" + image["filename"]]["objects"]
        assert len({r.lower().rstrip(".") for r in refs}) == 5
        for ref in refs:
            words = re.findall(r"[a-z]+", ref.lower())
            assert len(ref.split()) <= 30
            for o in objects:  # every reference names every object's colour and shape
                assert o["colour"] in words and o["shape"] in words, (ref, objects)
            assert not {w for w in words if w in COLOURS} - {o["colour"] for o in objects}
        all_refs += [r.lower().rstrip(".") for r in refs]
        # Detail varies: one reference gives no positions at all, another leads with them.
        starts = {r.split()[0].lower().rstrip(":") for r in refs}
        assert len(starts) >= 3
    assert len(set(all_refs)) >= 0.9 * len(all_refs)


def test_vqa_ten_human_answers_with_the_right_majority(world: Path) -> None:
    truth = scenes(world)
    entries = [e for s in ("train", "val", "test") for e in load(world, f"vqa_{s}.json")]
    types = Counter(lang.vqa_question_type(e["question"]) for e in entries)
    assert set(types) == {"colour", "shape", "count", "exist", "position", "size"}
    answers_by_type: dict[str, Counter] = {}
    all_raw = Counter()
    for e in entries:
        right = lang.vqa_answer(e["question"], truth[e["image"]]["objects"])
        counts = Counter(e["answer"])
        assert counts.most_common(1)[0] == (right, counts[right]) and counts[right] >= 4
        answers_by_type.setdefault(lang.vqa_question_type(e["question"]), Counter())[right] += 1
        all_raw.update(e["answer"])
    # Human variation: number words, synonyms, articles, case and punctuation all occur.
    raw = set(all_raw)
    assert raw & set(lang.NUMBER_NAMES[:5]) and raw & {"middle", "upper left", "lower right", "big", "violet"}
    assert any(a.startswith("a ") for a in raw) and any(a[0].isupper() for a in raw)
    assert any(a.endswith(".") for a in raw)
    exist = answers_by_type["exist"]
    assert 0.35 <= exist["yes"] / sum(exist.values()) <= 0.65
    for kind, counted in answers_by_type.items():  # no answer dominates its type
        limit = 0.7 if kind in ("exist", "size", "count") else 0.35
        assert counted.most_common(1)[0][1] / sum(counted.values()) <= limit, (kind, counted)


def test_vqa_answer_and_question_type_read_the_templates() -> None:
    objects = [
        obj("red", "circle", "small", 0),
        obj("blue", "circle", "large", 4),
        obj("red", "star", "large", 8),
    ]
    cases = {
        "What color is the large circle?": "blue",
        "What color is the shape in the middle?": "blue",
        "What shape is the small red object?": "circle",
        "What shape is at the bottom right?": "star",
        "How many circles are there?": "2",
        "How many red shapes are there?": "2",
        "How many squares are there?": "0",
        "Is there a blue star?": "no",
        "Is there an orange shape?": "no",
        "Is there a large red star?": "yes",
        "Where is the star?": "bottom right",
        "Is the blue shape small or large?": "large",
    }
    for question, answer in cases.items():
        assert lang.vqa_answer(question, objects) == answer, question
    with pytest.raises(ValueError, match="refers to 2 objects"):
        lang.vqa_answer("What color is the circle?", objects)
    assert lang.vqa_question_type("How many circles are there?") == "count"
    assert lang.vqa_question_type("is the star small or large?") == "size"
    with pytest.raises(ValueError, match="name no question type"):
        lang.vqa_question_type("Why is the sky blue?")


def _attributes_only(expression: str) -> bool:
    """'the small red circle': a bare noun phrase, no position, relation or comparison."""
    try:
        lang.parse_description(expression[4:])
    except ValueError:
        return False
    return True


def test_referring_expressions_pick_their_object_alone(world: Path) -> None:
    truth = scenes(world)
    entries = [e for s in ("train", "val", "test") for e in load(world, f"grounding_{s}.json")]
    needs_more_than_attributes = 0
    for e in entries:
        objects = truth[e["image"]]["objects"]
        assert 2 <= len(objects) <= 4
        found = lang.resolve_referring(e["text"], objects)
        assert len(found) == 1 and objects[found[0]]["bbox"] == e["bbox"], (e, objects)
        needs_more_than_attributes += not _attributes_only(e["text"])
    assert needs_more_than_attributes >= 0.5 * len(entries)
    # Distractors: many scenes repeat a shape or a colour.
    repeats = [len({o["shape"] for o in s["objects"]}) < len(s["objects"]) or
               len({o["colour"] for o in s["objects"]}) < len(s["objects"])
               for image, s in truth.items() if image.startswith("refcoco/")]  # fmt: skip
    assert sum(repeats) >= 0.4 * len(repeats)
    texts = " ".join(e["text"] for e in entries)
    for phrase in (
        " left of the ",
        " above the ",
        "the larger of the two ",
        " furthest to the ",
        "the highest ",
    ):
        assert phrase in texts, phrase


def test_resolve_referring_on_a_handmade_scene() -> None:
    objects = [
        obj("red", "circle", "small", 0),
        obj("red", "circle", "large", 2),
        obj("blue", "square", "small", 4),
    ]
    cases = {
        "the red circle": [0, 1],
        "the larger of the two red circles": [1],
        "the smaller of the two circles": [0],
        "the larger of the two small shapes": [0, 2],  # same size: no reading picks one
        "the red circle furthest to the right": [1],
        "the lowest shape": [2],
        "the highest shape": [0, 1],
        "the circle above the blue square": [0, 1],
        "the small shape above the square": [0],
        "the square below the large circle": [2],
        "the square left of the small circle": [],
        "the square below the circle": [],  # the anchor is not unique
        "the red shape at the top right": [1],
        "the shape in the center": [2],
        "the blue star": [],
    }
    for text, expected in cases.items():
        assert lang.resolve_referring(text, objects) == expected, text
    with pytest.raises(ValueError, match="no shape"):
        lang.resolve_referring("the red car", objects)


def test_nlvr2_labels_are_true_to_the_pair_and_balanced(world: Path) -> None:
    truth = scenes(world)
    entries = [e for s in ("train", "val", "test") for e in load(world, f"nlvr2_{s}.json")]
    for e in entries:
        left, right = (truth[p]["objects"] for p in e["images"])
        assert str(lang.nlvr2_truth(e["sentence"], left, right)) == e["label"], e
    labels = Counter(e["label"] for e in entries)
    assert 0.4 <= labels["True"] / len(entries) <= 0.6
    by_template: dict[str, Counter] = {}
    for e in entries:
        by_template.setdefault(lang.text_template(e["sentence"]), Counter())[e["label"]] += 1
    frequent = [c for c in by_template.values() if sum(c.values()) >= 8]
    assert frequent and all(len(c) == 2 for c in frequent)


def test_nlvr2_truth_on_a_handmade_pair() -> None:
    left = [obj("red", "circle", "small", 0), obj("blue", "triangle", "large", 4)]
    right = [
        obj("red", "triangle", "small", 1),
        obj("red", "triangle", "large", 3),
        obj("green", "star", "small", 8),
    ]
    cases = {
        "Both images contain a triangle.": True,
        "Both images contain a red circle.": False,
        "Neither image contains a square.": True,
        "Only one image contains a star.": True,
        "The right image contains a blue shape.": False,
        "The left image contains an orange shape.": False,
        "The right image has more triangles than the left image.": True,
        "The left image has more shapes than the right image.": False,
        "There are exactly five shapes in total.": True,
        "There are exactly four shapes in total.": False,
        "The right image contains exactly two red triangles.": True,
        "The left image contains exactly one shape.": False,
        "Both images contain the same number of circles.": False,
        "Both images contain the same number of large shapes.": True,
    }
    for sentence, expected in cases.items():
        assert lang.nlvr2_truth(sentence, left, right) is expected, sentence


def test_snli_ve_labels_are_true_to_the_scene_and_share_templates(world: Path) -> None:
    truth = scenes(world)
    entries = [e for s in ("train", "val", "test") for e in load(world, f"snli_ve_{s}.json")]
    for e in entries:
        scene = truth[e["image"]]
        assert lang.snli_ve_label(e["sentence"], scene["objects"], scene["covered"]) == e["label"], (e, scene)
    labels = Counter(e["label"] for e in entries)
    assert labels == {label: len(entries) // 3 for label in SNLI_LABELS}  # one of each per image
    by_template: dict[str, Counter] = {}
    for e in entries:
        by_template.setdefault(lang.text_template(e["sentence"]), Counter())[e["label"]] += 1
    all_three = [t for t, c in by_template.items() if len(c) == 3]
    assert sum(sum(by_template[t].values()) for t in all_three) >= 0.4 * len(entries)
    assert any(s["covered"] for s in truth.values()) and any(not s["covered"] for s in truth.values())


def test_snli_ve_label_on_a_handmade_scene() -> None:
    objects = [obj("red", "circle", "small", 0), obj("blue", "square", "large", 4)]
    covered = [8]
    cases = {
        "There is a red circle at the top left.": "entailment",
        "There is a blue circle at the top left.": "contradiction",
        "There is a star in the bottom right corner.": "neutral",  # that cell is covered
        "There is a star at the bottom.": "contradiction",  # visible and empty
        "There is a star in the picture.": "neutral",  # it could be under the cover
        "There is a blue shape in the picture.": "entailment",
        "The picture shows exactly two shapes.": "neutral",
        "The picture shows exactly four shapes.": "contradiction",
        "The picture shows at least three shapes.": "neutral",
        "The picture shows at least one shape.": "entailment",
        "There are no red shapes in the picture.": "contradiction",
        "There are no stars in the picture.": "neutral",
        "The red circle is made of wood.": "neutral",
        "The green star is spinning.": "neutral",  # could be hidden
    }
    for sentence, expected in cases.items():
        assert lang.snli_ve_label(sentence, objects, covered) == expected, sentence
    assert lang.snli_ve_label("There are no stars in the picture.", objects, []) == "entailment"
    assert lang.snli_ve_label("The picture shows exactly two shapes.", objects, []) == "entailment"
    assert lang.snli_ve_label("The green star is spinning.", objects, []) == "contradiction"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_by_seed_and_splits_independent(tmp_path: Path) -> None:
    a, b, c, d = (tmp_path / n for n in "abcd")
    render_task_annotations(str(a), 10, seed=1, image_size=48)
    render_task_annotations(str(b), 10, seed=1, image_size=48)
    render_task_annotations(str(c), 10, seed=2, image_size=48)
    assert _tree(a) == _tree(b)
    assert load(a, "vqa_train.json") != load(c, "vqa_train.json")
    # More scenes, or fewer tasks, leave the scenes already there unchanged.
    render_task_annotations(str(d), 20, seed=1, image_size=48, tasks=("vqa", "nlvr2"))
    small, large = load(a, "vqa_train.json"), load(d, "vqa_train.json")
    assert large[: len(small)] == small and len(large) > len(small)
    assert load(a, "nlvr2_test.json") == load(d, "nlvr2_test.json")[: len(load(a, "nlvr2_test.json"))]
    for name in _tree(a):
        if name.endswith(".jpg") and (d / name).exists():
            assert (a / name).read_bytes() == (d / name).read_bytes()
    assert not (d / "grounding_train.json").exists()


def test_baselines_a_learning_test_can_call(baseline_world: Path) -> None:
    train = [{"question": "What color is the circle?", "answer": ["red"] * 6 + ["blue"] * 4, "question_id": 1},
             {"question": "What color is the star?", "answer": ["blue"] * 10, "question_id": 2},
             {"question": "How many stars are there?", "answer": ["2"] * 10, "question_id": 3}]  # fmt: skip
    test = [{"question": "What color is the square?", "answer": ["red"] * 10, "question_id": 7},
            {"question": "How many circles are there?", "answer": ["1"] * 10, "question_id": 8}]  # fmt: skip
    assert majority_by_question_type(train, test) == {7: "blue", 8: "2"}
    objects = [
        obj("red", "circle", "small", 0),
        obj("blue", "square", "large", 4),
        obj("red", "star", "large", 8),
    ]
    assert largest_object_box(objects) == objects[1]["bbox"]
    labelled = [{"sentence": "There is a red circle.", "label": "True"}, {"sentence": "There is a blue star.", "label": "True"},
                {"sentence": "Both images contain a star.", "label": "False"}]  # fmt: skip
    assert (
        majority_label_by_text(labelled, [{"sentence": "There is a green square.", "label": "False"}]) == 0.0
    )
    # On the world itself, every baseline stays weak (percent).
    world = baseline_world
    baselines = task_baselines(str(world), tasks=("vqa", "grounding", "nlvr2", "snli_ve"))
    assert baselines["grounding"]["largest_object"] < 45
    assert baselines["grounding"]["largest_object"] == largest_object_accuracy(
        load(world, "grounding_test.json"), load(world, "scenes_test.json")
    )
    for task, chance in (("nlvr2", 50), ("snli_ve", 100 / 3)):
        assert baselines[task]["majority_class"] == pytest.approx(chance, abs=1)  # balanced labels
        assert baselines[task]["text_only_by_template"] < chance + 20, task
        assert baselines[task]["text_only_by_sentence"] < chance + 20, task
    assert 20 < baselines["vqa"]["majority_by_question_type"] < 50
    assert baselines["vqa"]["majority_by_question_type/colour"] < 30


def test_cli_writes_the_tasks_and_refuses_a_wrong_format(tmp_path: Path, capsys) -> None:
    assert TASK_NAMES == TASKS
    out = tmp_path / "cli"
    argv = ["synth", "--output", str(out), "--num", "10", "--format", "json", "--tasks", "vqa,caption,grounding",
            "--image-size", "48", "--baselines"]  # fmt: skip
    assert cli_main(argv) == 0
    assert (out / "vqa_test.json").is_file() and (out / "grounding_train.json").is_file()
    assert (out / "dataset_coco.json").is_file() and not (out / "nlvr2_train.json").exists()
    printed = capsys.readouterr().out
    assert "vqa:" in printed and "image root:" in printed
    assert re.search(r"grounding: largest_object \d+\.\d\d", printed)
    assert re.search(r"caption: consensus_caption_cider \d\.\d\d, one_reference_vs_others_cider", printed)
    # Invalid combinations are config errors: exit 2, one line saying what to change.
    for argv, says in ((["--baselines"], "add --tasks"), (["--tasks", "vqa"], "--format json"),
                       (["--format", "json", "--tasks", "vqa,ocr"], "valid tasks")):  # fmt: skip
        assert cli_main(["synth", "--output", str(out), "--num", "5", *argv]) == 2
        err = capsys.readouterr().err
        assert says in err and err.count("\n") == 1
    with pytest.raises(ValueError, match="'ocr'"):
        render_task_annotations(str(out), 5, tasks=("ocr",))
    with Image.open(io.BytesIO((out / load(out, "vqa_test.json")[0]["image"]).read_bytes())) as im:
        assert im.size == (48, 48)
    assert {o["shape"] for s in load(out, "scenes_train.json").values() for o in s["objects"]} <= set(SHAPES)
