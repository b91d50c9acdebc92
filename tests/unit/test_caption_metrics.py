"""Caption metrics against pycocoevalcap's own COCOEvalCap path, and CIDEr-D for SCST rewards
against the formula and against pycocoevalcap's Cider."""

from __future__ import annotations

import math
import os
import pickle
from collections import Counter

import numpy as np
import psutil
import pytest

from mplug.cider import CiderD, simple_tokenize
from mplug.metrics import caption_metrics

pytestmark = pytest.mark.unit

REFERENCES = {
    1: ["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
        "A person on a surf board riding a wave!", "Man surfing on a big, blue wave."],
    2: ["Two dogs playing with a frisbee in the park.", "Two brown dogs run across the grass.",
        "A pair of dogs chase a red frisbee.", "Dogs playing in a grassy field."],
    3: ["A plate of food with broccoli and rice.", "A white plate topped with rice, broccoli and chicken.",
        "Chicken, rice and broccoli on a dish."],
    4: ["A red double-decker bus on a city street.", "The bus is driving down the road.",
        "A big red bus parked next to a sidewalk.", "A double decker bus in London."],
    5: ["A cat sleeping on a laptop keyboard.", "A cat laying on top of a computer.",
        "The cat's asleep on the keyboard."],
}  # fmt: skip
PREDICTIONS = {
    1: "A man riding a wave on a surfboard.",
    2: "two dogs playing with a frisbee",
    3: "a plate of food with broccoli",
    4: "A red bus driving down a street.",
    5: "a dog sitting on a couch",
}
# COCOEvalCap(...).evaluate() on exactly these inputs (pycocoevalcap 1.2, METEOR 1.5, Java 17).
COCO_EVAL_CAP_METEOR = 0.348239195637162
COCO_EVAL_CAP_METEOR_IMAGE_5 = 0.09211036146617803


def tokenizer_dir() -> str:
    from pycocoevalcap.tokenizer import ptbtokenizer

    return os.path.dirname(os.path.abspath(ptbtokenizer.__file__))


def java_children() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if "java" in p.name()]


# ---- caption_metrics --------------------------------------------------------------------------
class _NotRun:
    """Takes the place of a scorer in the reference run that cannot (SPICE: a download) or need
    not (METEOR: pinned by its own test, its JVM takes a minute) run there."""

    def __init__(self, name: str) -> None:
        self.name = name

    def compute_score(self, gts, res):
        return math.nan, [math.nan] * len(gts)

    def method(self) -> str:
        return self.name


def coco_eval_cap(monkeypatch) -> tuple[dict, dict]:
    """pycocoevalcap's own path: COCO objects, loadRes, COCOEvalCap.evaluate()."""
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    monkeypatch.setattr(coco_eval, "Spice", lambda: _NotRun("SPICE"))
    monkeypatch.setattr(coco_eval, "Meteor", lambda: _NotRun("METEOR"))
    coco = COCO()
    annotations = [(i, c) for i, captions in REFERENCES.items() for c in captions]
    coco.dataset = {
        "images": [{"id": i} for i in REFERENCES],
        "annotations": [{"image_id": i, "id": n, "caption": c} for n, (i, c) in enumerate(annotations, 1)],
    }
    coco.createIndex()
    result = coco.loadRes([{"image_id": i, "caption": c} for i, c in PREDICTIONS.items()])
    evaluator = coco_eval.COCOEvalCap(coco, result)
    evaluator.evaluate()
    return evaluator.eval, evaluator.imgToEval


def test_equals_coco_eval_cap(monkeypatch):
    ours = caption_metrics(PREDICTIONS, REFERENCES, meteor=False)
    reference, per_image = coco_eval_cap(monkeypatch)
    for name in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert ours[name] == pytest.approx(reference[name], rel=1e-12, abs=1e-15), name
        for image_id in REFERENCES:
            assert ours["per_image"][image_id][name] == pytest.approx(per_image[image_id][name], rel=1e-12)
    assert 0 < ours["Bleu_4"] < ours["Bleu_1"] <= 1 and ours["CIDEr"] > 1  # a real, non-trivial score
    assert ours["METEOR"] is None and ours["skipped"] == {"METEOR": "meteor=False"}
    assert ours["SPICE"] is None and "CoreNLP" in ours["unavailable"]["SPICE"]
    assert ours["num_images"] == 5


def test_meteor_and_the_subprocesses_are_cleaned_up():
    # The one METEOR test (a JVM that loads paraphrase tables: up to minutes on a loaded box).
    before_files, before_java = set(os.listdir(tokenizer_dir())), {p.pid for p in java_children()}
    result = caption_metrics(PREDICTIONS, REFERENCES, meteor=True)
    assert result["METEOR"] == pytest.approx(COCO_EVAL_CAP_METEOR, abs=1e-12)
    assert result["per_image"][5]["METEOR"] == pytest.approx(COCO_EVAL_CAP_METEOR_IMAGE_5, abs=1e-12)
    assert result["skipped"] == {}
    assert [p for p in java_children() if p.pid not in before_java] == []  # METEOR and PTB JVMs ended
    assert set(os.listdir(tokenizer_dir())) == before_files  # the tokenizer's temp files removed


def test_line_breaks_inside_a_caption_do_not_shift_the_others():
    # Java also breaks lines at \r: unguarded, "running" would become the next caption.
    refs = {1: ["a dog\rrunning on grass", "a dog runs"], 2: ["a cat on a mat", "a cat sitting"]}
    flat = {i: [c.replace("\r", " ") for c in caps] for i, caps in refs.items()}
    preds = {1: "a dog running", 2: "a cat on a mat"}
    broken = caption_metrics(preds, refs, meteor=False)
    assert broken["per_image"] == caption_metrics(preds, flat, meteor=False)["per_image"]


def test_untokenized_scoring_splits_on_whitespace_only():
    refs = {1: ["a dog runs", "a dog running"], 2: ["a cat sits", "a cat sitting"]}
    same = caption_metrics({1: "a dog runs", 2: "a cat sits"}, refs, meteor=False, tokenize=False)
    cased = caption_metrics({1: "A dog runs.", 2: "a cat sits"}, refs, meteor=False, tokenize=False)
    assert same["per_image"][1]["Bleu_1"] == pytest.approx(1.0)
    assert cased["per_image"][1]["Bleu_1"] < 0.5 and cased["per_image"][2] == same["per_image"][2]


def test_caption_inputs_that_are_errors():
    with pytest.raises(ValueError, match=r"1 images with references have no prediction.*\[2\]"):
        caption_metrics({1: "a"}, {1: ["a"], 2: ["b"]}, meteor=False)
    with pytest.raises(ValueError, match=r"1 predicted images have no references.*\[3\]"):
        caption_metrics({1: "a", 3: "c"}, {1: ["a"]}, meteor=False)
    with pytest.raises(ValueError, match="image 1 needs a non-empty list"):
        caption_metrics({1: "a"}, {1: []}, meteor=False)


# ---- CIDEr-D ------------------------------------------------------------------------------------
def formula_cider_d(candidate: str, refs: list[str], corpus: list[list[str]], sigma: float = 6.0) -> float:
    """CIDEr-D written straight from the definition, on whitespace tokens."""

    def grams(sentence: str, k: int) -> Counter:
        w = sentence.split()
        return Counter(tuple(w[i : i + k]) for i in range(len(w) - k + 1))

    def idf(gram: tuple, k: int) -> float:
        df = sum(any(gram in grams(r, k) for r in refs_of_image) for refs_of_image in corpus)
        return math.log(len(corpus)) - math.log(max(1, df))

    total = 0.0
    for ref in refs:
        penalty = math.exp(-((len(candidate.split()) - len(ref.split())) ** 2) / (2 * sigma**2))
        for k in range(1, 5):
            c, r = grams(candidate, k), grams(ref, k)
            gc = {g: tf * idf(g, k) for g, tf in c.items()}
            gr = {g: tf * idf(g, k) for g, tf in r.items()}
            nc, nr = math.sqrt(sum(v * v for v in gc.values())), math.sqrt(sum(v * v for v in gr.values()))
            if nc and nr:
                overlap = sum(min(c[g], r[g]) * idf(g, k) * gr[g] for g in c if g in r)  # clipped counts
                total += overlap / (nc * nr) * penalty
    return 10 * total / (4 * len(refs))


def tokenized_corpus() -> tuple[dict[int, list[str]], dict[int, str]]:
    refs = {i: [simple_tokenize(c) for c in caps] for i, caps in REFERENCES.items()}
    preds = {i: simple_tokenize(c) for i, c in PREDICTIONS.items()}
    return refs, preds


def test_cider_d_equals_the_formula():
    refs, preds = tokenized_corpus()
    train = list(refs.values()) + [["a dog on a couch", "a dog sleeping"], ["a surfer on a wave"]]
    scorer = CiderD(train)
    candidates = [*preds.values(), "a dog dog dog on a couch", "wave"]
    cand_refs = [*refs.values(), refs[5], refs[1]]
    got = scorer.score(candidates, cand_refs)
    expected = [formula_cider_d(c, r, train) for c, r in zip(candidates, cand_refs)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got.shape == (7,) and got.dtype == np.float64 and got.min() >= 0 and got.max() > 1


def test_cider_d_by_hand():
    scorer = CiderD([["a dog"], ["a cat"]])  # N = 2: idf("a") = 0, idf of the rest = ln 2
    # Unigrams and bigrams both cosine 1, no 3- or 4-grams: (1 + 1 + 0 + 0) / 4 × 10.
    # "dog dog" vs "a dog": unigram tf clipped to 1 -> cosine ln2·ln2 / (2 ln2 · ln2) = 1/2.
    np.testing.assert_allclose(
        scorer.score(["a dog", "a cat", "dog dog", "a bird"], [["a dog"], ["a dog"], ["a dog"], ["a dog"]]),
        [5.0, 0.0, 1.25, 0.0],
    )


def test_cider_d_with_the_evaluated_refs_as_corpus_is_pycocoevalcaps_cider():
    from pycocoevalcap.cider.cider import Cider

    refs, preds = tokenized_corpus()
    score, per_image = Cider().compute_score(refs, {i: [p] for i, p in preds.items()})
    ours = CiderD(list(refs.values()), tokenize=None).score(list(preds.values()), list(refs.values()))
    np.testing.assert_allclose(ours, per_image, rtol=1e-12)
    assert ours.mean() == pytest.approx(score, rel=1e-12)


def test_cider_d_document_frequencies_come_from_its_corpus():
    candidate, refs = ["a dog on a couch"], [["a dog on a couch", "a dog lying on a couch"]]
    rare = CiderD([["a cat"], ["a bird"], ["two horses"]]).score(candidate, refs)
    common = CiderD([["a dog on a couch"], ["a dog on a couch"], ["a cat"]]).score(candidate, refs)
    assert rare[0] > common[0] > 0  # n-grams seen in many training images weigh less


def test_simple_tokenize():
    assert simple_tokenize("A Black-and-white DOG, running!") == "a black and white dog running"
    assert simple_tokenize("  The man's  hat/cap.\n") == "the mans hat cap"


def test_cider_d_pickles_and_errors():
    scorer = CiderD([["a dog"], ["a cat"]])
    scorer.score(["a dog"], [["a dog"]])  # fills the cache
    clone = pickle.loads(pickle.dumps(scorer))
    np.testing.assert_allclose(clone.score(["dog dog"], [["a dog"]]), [1.25])
    with pytest.raises(ValueError, match=r"candidate 0 \('a dog'\) has no references"):
        scorer.score(["a dog"], [[]])
    with pytest.raises(ValueError, match="2 candidates but 1 reference lists"):
        scorer.score(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="corpus entry 1 must be a non-empty list"):
        CiderD([["a"], []])
