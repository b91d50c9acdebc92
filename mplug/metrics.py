"""Evaluation metrics, computed as the reference implementations compute them (no Ray):

- `vqa_accuracy`: the official VQA evaluator (GT-Vision-Lab/VQA `vqaEval.py`), answer
  normalisation included;
- `caption_metrics`: BLEU-1..4, METEOR, ROUGE-L and CIDEr from pycocoevalcap's scorers, wired as
  its `COCOEvalCap` wires them (PTB tokenizer first); `CiderD` (in `mplug.cider`) for SCST rewards;
- `retrieval_recall` / `retrieval_chance`: image↔text R@k as ALBEF/mPLUG's `itm_eval` ranks;
- `box_iou`, `grounding_accuracy`, `generalized_box_iou`, `box_cxcywh_to_xyxy`: referring-
  expression grounding (Acc@IoU ≥ 0.5) and the GIoU the grounding loss weighs by;
- `accuracy`: NLVR2 and SNLI-VE.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from collections.abc import Hashable, Mapping, Sequence
from math import comb
from typing import Any

import numpy as np
import torch

from mplug.cider import CiderD, simple_tokenize

__all__ = [
    "CiderD",
    "accuracy",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "caption_metrics",
    "generalized_box_iou",
    "grounding_accuracy",
    "normalize_vqa_answer",
    "retrieval_chance",
    "retrieval_recall",
    "simple_tokenize",
    "vqa_accuracy",
]


# ---- VQA ------------------------------------------------------------------------------------
# The official evaluator's tables and regexes, verbatim (vqaEval.py @ GT-Vision-Lab/VQA master).
# fmt: off
_VQA_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
# fmt: on
# fmt: off
_VQA_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_VQA_ARTICLES = ("a", "an", "the")
_VQA_PUNCTUATION = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
# fmt: on
# `(?!<=\d)` is a lookahead in the original too (it meant a lookbehind): the pattern removes a
# period not followed by a digit. ASCII `\d`, as Python 2 matched it without re.UNICODE.
_VQA_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
_VQA_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)", re.ASCII)
# The original calls `periodStrip.sub("", text, re.UNICODE)`: the flag lands in `count`, so at
# most re.UNICODE (32) periods are removed.
_VQA_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _vqa_whitespace(text: str) -> str:
    """The normalisation the official evaluator applies to every answer: newlines and tabs to
    spaces, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def _vqa_punctuation(text: str) -> str:
    """Official `processPunctuation`: each mark is deleted when it touches a space in the original
    text (or the text has a digit,digit comma), else replaced by a space; then periods not
    followed by a digit are removed."""
    out = text
    digit_comma = _VQA_COMMA_STRIP.search(text) is not None
    for mark in _VQA_PUNCTUATION:
        if (mark + " " in text or " " + mark in text) or digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _VQA_PERIOD_STRIP.sub("", out, count=_VQA_PERIOD_STRIP_COUNT)


def _vqa_digits_articles(text: str) -> str:
    """Official `processDigitArticle`: lower-case, number words to digits, articles dropped,
    contractions restored ("dont" -> "don't"), words re-joined by single spaces."""
    words = [_VQA_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


def normalize_vqa_answer(text: str) -> str:
    """The official evaluator's full answer processing (punctuation, then digits/articles/
    contractions). `vqa_accuracy` applies it only where the evaluator does: to a question's
    human answers and its prediction when those answers are not all the same."""
    return _vqa_digits_articles(_vqa_punctuation(text))


def _vqa_question_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's accuracy in [0, 1]: for each human answer, min(1, matches among the other
    humans / 3), averaged over the humans."""
    humans = [_vqa_whitespace(a) for a in answers]
    predicted = _vqa_whitespace(prediction)
    if len(set(humans)) > 1:  # the evaluator normalises only when the humans disagree
        humans = [normalize_vqa_answer(a) for a in humans]
        predicted = normalize_vqa_answer(predicted)
    matches = sum(h == predicted for h in humans)
    return sum(min(1.0, (matches - (h == predicted)) / 3) for h in humans) / len(humans)


def _check_keys(what: str, predicted: Mapping, truth: Mapping, truth_name: str) -> None:
    """Predictions and ground truth must cover the same ids: name what is missing on each side."""
    extra = [k for k in predicted if k not in truth]
    missing = [k for k in truth if k not in predicted]
    if extra:
        raise ValueError(
            f"{len(extra)} predicted {what}s have no {truth_name}, e.g. {extra[:3]}: "
            f"every predicted {what} needs its {truth_name}"
        )
    if missing:
        raise ValueError(
            f"{len(missing)} {what}s with {truth_name} have no prediction, e.g. {missing[:3]}: "
            f"predict every {what} (or leave it out of the {truth_name})"
        )
    if not truth:
        raise ValueError(f"no {what}s to evaluate")


def _mean_by_group(values: Mapping[Hashable, float], groups: Mapping[Hashable, str], name: str) -> dict:
    missing = [k for k in values if k not in groups]
    if missing:
        raise ValueError(f"{len(missing)} questions have no {name}, e.g. {missing[:3]}")
    totals: dict[str, list[float]] = {}
    for key, value in values.items():
        totals.setdefault(str(groups[key]), []).append(value)
    return {group: sum(v) / len(v) for group, v in totals.items()}


def vqa_accuracy(
    predictions: Mapping[Hashable, str],
    answers: Mapping[Hashable, Sequence[str]],
    answer_types: Mapping[Hashable, str] | None = None,
    question_types: Mapping[Hashable, str] | None = None,
    single_answer_exact: bool = False,
) -> dict[str, Any]:
    """VQA accuracy as the official evaluator computes it.

    predictions: question id -> predicted answer. answers: question id -> the human answers, as
    annotated (10 in VQA v2, repeats kept). Both must hold the same question ids.
    answer_types / question_types: optional question id -> type ("yes/no", "number", "other" /
    "what color is", ...) for the per-type means.
    single_answer_exact: the official rule cannot credit a question with ONE human answer (no
        other humans to agree: always 0), and False (default) scores it so. True scores such
        questions 100 on an exact match instead (single-answer sources such as Visual Genome).
        Counted either way in `num_single_answer`.

    Returns (percent, unrounded; the official code rounds to 2 decimals):
      overall: mean accuracy over the questions;
      per_question: question id -> accuracy;
      per_answer_type / per_question_type: type -> mean accuracy (only when the types are given);
      num_questions; num_single_answer: questions with one human answer.
    """
    _check_keys("question", predictions, answers, "human answers")
    per_question: dict[Hashable, float] = {}
    num_single = 0
    for qid, prediction in predictions.items():
        humans = answers[qid]
        if isinstance(humans, str) or not humans:
            raise ValueError(
                f"question {qid!r} has no human answers (got {humans!r}): VQA accuracy needs them"
            )
        if not isinstance(prediction, str) or not all(isinstance(a, str) for a in humans):
            raise ValueError(f"question {qid!r}: answers must be strings, got {prediction!r} and {humans!r}")
        if len(humans) == 1:
            num_single += 1
            if single_answer_exact:
                per_question[qid] = 100.0 * (_vqa_whitespace(prediction) == _vqa_whitespace(humans[0]))
                continue
        per_question[qid] = 100.0 * _vqa_question_accuracy(prediction, humans)
    out: dict[str, Any] = {
        "overall": sum(per_question.values()) / len(per_question),
        "per_question": per_question,
        "num_questions": len(per_question),
        "num_single_answer": num_single,
    }
    if answer_types is not None:
        out["per_answer_type"] = _mean_by_group(per_question, answer_types, "answer type")
    if question_types is not None:
        out["per_question_type"] = _mean_by_group(per_question, question_types, "question type")
    return out


# ---- captioning -------------------------------------------------------------------------------
CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
SPICE_UNAVAILABLE = (
    "SPICE needs the Stanford CoreNLP 3.6.0 models, which pycocoevalcap downloads on first use; "
    "nothing can be downloaded at run time here"
)


def _one_line(text: str) -> str:
    # The PTB tokenizer (Java) also breaks lines at \r, \u2028, ... where pycocoevalcap only
    # replaces \n: an odd line break would shift every later caption onto the wrong image.
    return " ".join(text.splitlines())


def _ptb_tokenize(captions: dict[Hashable, list[str]]) -> dict[Hashable, list[str]]:
    """pycocoevalcap's PTBTokenizer (a short JVM run), with a check that each caption came back."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if shutil.which("java") is None:
        raise RuntimeError("the PTB tokenizer needs Java on PATH (pycocoevalcap runs Stanford CoreNLP)")
    tokenized = PTBTokenizer().tokenize(
        {k: [{"caption": _one_line(c)} for c in caps] for k, caps in captions.items()}
    )
    lost = [k for k, caps in captions.items() if len(tokenized.get(k, [])) != len(caps)]
    if lost:
        raise RuntimeError(f"the PTB tokenizer returned the wrong number of captions for {lost[:3]}")
    return tokenized


def _close_meteor(scorer: Any) -> None:
    """End METEOR's JVM now (pycocoevalcap leaves it to `__del__`, i.e. to the garbage collector)."""
    with scorer.lock:
        process = scorer.meteor_p
        process.stdin.close()
        process.kill()
        process.wait()
        process.stdout.close()
        process.stderr.close()


def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    meteor: bool = True,
    tokenize: bool = True,
) -> dict[str, Any]:
    """COCO caption metrics of one caption per image against that image's references.

    predictions: image id -> generated caption; references: image id -> reference captions
    (at least one); both must hold the same image ids.
    meteor: False skips METEOR (its JVM loads paraphrase tables for ~10-100 s): quick evaluations.
    tokenize: True runs the PTB tokenizer (lower-cases, splits, drops punctuation) on both sides,
        as COCOEvalCap does; False scores the text as given, split on whitespace (already
        tokenised text, or a quick approximate search).

    Returns pycocoevalcap's values on its own scale (BLEU/METEOR/ROUGE-L in [0, 1], CIDEr in
    [0, 10]; papers print ×100): `Bleu_1`..`Bleu_4`, `METEOR`, `ROUGE_L`, `CIDEr` (corpus
    scores: BLEU over the whole corpus, the others averaged over images; CIDEr's document
    frequencies come from these references); `SPICE` None with its reason in
    `unavailable["SPICE"]`; a skipped METEOR is None with its reason in `skipped["METEOR"]`;
    `per_image`: image id -> each computed metric for that image; `num_images`.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    _check_keys("image", predictions, references, "references")
    for image_id, refs in references.items():
        if isinstance(refs, str) or not refs or not all(isinstance(r, str) for r in refs):
            raise ValueError(f"image {image_id!r} needs a non-empty list of reference strings, got {refs!r}")
        if not isinstance(predictions[image_id], str):
            raise ValueError(
                f"image {image_id!r}: the prediction must be a string, got {predictions[image_id]!r}"
            )
    ids = list(references)
    gts = {i: list(references[i]) for i in ids}
    res = {i: [predictions[i]] for i in ids}
    if tokenize:  # two tokenizer runs, references then predictions, as COCOEvalCap does
        gts, res = _ptb_tokenize(gts), _ptb_tokenize(res)

    out: dict[str, Any] = {name: None for name in CAPTION_METRICS}
    per_image: dict[Hashable, dict[str, float]] = {i: {} for i in ids}

    def record(name: str, score: float, scores: Sequence[float]) -> None:
        out[name] = float(score)
        for image_id, value in zip(ids, scores):
            per_image[image_id][name] = float(value)

    with contextlib.redirect_stdout(io.StringIO()):  # BLEU prints its n-gram statistics
        bleu, bleu_per_image = Bleu(4).compute_score(gts, res, verbose=0)
    for n, (score, scores) in enumerate(zip(bleu, bleu_per_image), start=1):
        record(f"Bleu_{n}", score, scores)
    if meteor:
        scorer = Meteor()
        try:
            record("METEOR", *scorer.compute_score(gts, res))
        finally:
            _close_meteor(scorer)
    record("ROUGE_L", *Rouge().compute_score(gts, res))
    record("CIDEr", *Cider().compute_score(gts, res))
    out["skipped"] = {} if meteor else {"METEOR": "meteor=False"}
    out["unavailable"] = {"SPICE": SPICE_UNAVAILABLE}
    out["per_image"] = per_image
    out["num_images"] = len(ids)
    return out


# ---- retrieval ----------------------------------------------------------------------------------
def _check_groups(image_group: torch.Tensor, text_group: torch.Tensor) -> torch.Tensor:
    """The (images × texts) match matrix, after checking that the image ids are distinct, that
    every text names one of them, and that every image has a text."""
    if image_group.unique().numel() != image_group.numel():
        raise ValueError("image_group must hold distinct image ids (one row of sim_i2t per image)")
    match = image_group[:, None] == text_group[None, :]  # (Ni, Nt)
    orphans = (~match.any(0)).nonzero().flatten()
    if orphans.numel():
        raise ValueError(
            f"{orphans.numel()} texts name an image not in image_group, e.g. text ids {text_group[orphans[:3]].tolist()}"
        )
    captionless = (~match.any(1)).nonzero().flatten()
    if captionless.numel():
        raise ValueError(
            f"{captionless.numel()} images have no text, e.g. image ids {image_group[captionless[:3]].tolist()}"
        )
    return match


def _add_recall_means(out: dict[str, float], ks: tuple[int, ...]) -> None:
    for name in ("i2t", "t2i"):
        out[f"{name}_r_mean"] = sum(out[f"{name}_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["i2t_r_mean"] + out["t2i_r_mean"]) / 2


def retrieval_recall(
    sim_i2t: torch.Tensor,
    image_group: torch.Tensor,
    text_group: torch.Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
) -> dict[str, float]:
    """R@k both ways for an (images × texts) similarity matrix, as ALBEF/mPLUG's `itm_eval` ranks.

    image_group (Ni,): the image id of each row, distinct. text_group (Nt,): the id of the image
    each text describes (several texts per image: 5 in COCO and Flickr30K).
    Image→text: an image's rank is that of its best-ranked caption; text→image: the rank of the
    one image. Ties rank in index order.
    Returns percentages `i2t_r{k}`, `t2i_r{k}` for each k, `i2t_r_mean` / `t2i_r_mean` (the
    mean over `ks`) and `r_mean` (the mean of the two).
    """
    if sim_i2t.shape != (image_group.numel(), text_group.numel()):
        raise ValueError(
            f"sim_i2t {tuple(sim_i2t.shape)} does not match {image_group.numel()} images × {text_group.numel()} texts"
        )
    match = _check_groups(image_group, text_group)
    out: dict[str, float] = {}
    for name, sim, m in (("i2t", sim_i2t, match), ("t2i", sim_i2t.T, match.T)):
        order = sim.argsort(dim=1, descending=True, stable=True)
        hits = torch.gather(m, 1, order)  # (Nq, Nc): True where the ranked candidate is correct
        first = hits.float().argmax(dim=1)  # rank of the first correct candidate
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * (first < k).float().mean().item()
    _add_recall_means(out, ks)
    return out


def retrieval_chance(
    image_group: torch.Tensor, text_group: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Expected R@k of a random ranking (percent), for the same ground truth and with the same
    keys as `retrieval_recall`."""
    match = _check_groups(image_group, text_group)
    out: dict[str, float] = {}
    for name, m in (("i2t", match), ("t2i", match.T)):
        n = m.shape[1]
        for k in ks:
            # P(at least one of g correct candidates in the top k of n, uniformly shuffled).
            p = [1.0 - comb(n - int(g), k) / comb(n, k) if k < n else 1.0 for g in m.sum(1).tolist()]
            out[f"{name}_r{k}"] = 100.0 * sum(p) / len(p)
    _add_recall_means(out, ks)
    return out


# ---- grounding ----------------------------------------------------------------------------------
def _boxes(boxes: Any, name: str) -> np.ndarray:
    array = boxes.detach().cpu().numpy() if isinstance(boxes, torch.Tensor) else np.asarray(boxes)
    array = array.astype(np.float64)
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"{name} must be (N, 4) boxes, got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds non-finite coordinates")
    return array


def box_iou(a: Any, b: Any) -> np.ndarray:
    """Row-wise IoU of (N, 4) boxes as (x, y, w, h) (top-left corner, width, height; any unit)
    -> (N,) float64; 0 where both boxes have no area. Tensors or arrays."""
    a, b = _boxes(a, "a"), _boxes(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"box_iou compares boxes row by row: shapes {a.shape} and {b.shape} differ")
    if (a[:, 2:] < 0).any() or (b[:, 2:] < 0).any():
        raise ValueError("box widths and heights must be >= 0 (boxes are x, y, w, h)")
    left, top = np.maximum(a[:, 0], b[:, 0]), np.maximum(a[:, 1], b[:, 1])
    right = np.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2])
    bottom = np.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    union = a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def grounding_accuracy(
    pred_boxes: Any, gt_boxes: Any, threshold: float = 0.5, image_sizes: Any | None = None
) -> float:
    """Percent of predicted boxes whose IoU with the ground-truth box is >= `threshold` (the
    official Acc@0.5). Boxes (N, 4) as (x, y, w, h) in pixels of the original image.
    image_sizes: optional (N, 2) (width, height): predicted boxes are first clipped to their image,
    as the official evaluation clamps them to the frame they were predicted in."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    pred = _boxes(pred_boxes, "pred_boxes")
    if image_sizes is not None:
        sizes = image_sizes.detach().cpu().numpy() if isinstance(image_sizes, torch.Tensor) else image_sizes
        sizes = np.asarray(sizes, dtype=np.float64)
        if sizes.shape != (pred.shape[0], 2):
            raise ValueError(f"image_sizes must be ({pred.shape[0]}, 2) (width, height), got {sizes.shape}")
        x1 = np.clip(pred[:, 0], 0, sizes[:, 0])
        y1 = np.clip(pred[:, 1], 0, sizes[:, 1])
        x2 = np.clip(pred[:, 0] + pred[:, 2], 0, sizes[:, 0])
        y2 = np.clip(pred[:, 1] + pred[:, 3], 0, sizes[:, 1])
        pred = np.stack([x1, y1, np.maximum(x2 - x1, 0), np.maximum(y2 - y1, 0)], axis=1)
    iou = box_iou(pred, gt_boxes)
    if iou.size == 0:
        raise ValueError("no boxes to evaluate")
    return 100.0 * float((iou >= threshold).mean())


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(..., 4) boxes as (centre x, centre y, w, h) -> (x1, y1, x2, y2)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def generalized_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Row-wise generalized IoU (Rezatofighi et al., 2019) of (N, 4) boxes as (x1, y1, x2, y2)
    -> (N,) in [-1, 1]: IoU − (enclosing area − union) / enclosing area. A zero union counts as
    IoU 0 and a zero enclosing box as no penalty (the official code adds 1e-5 to both instead).
    Boxes need x2 >= x1 and y2 >= y1; that is not checked, so a training step pays no host sync."""
    if boxes1.shape != boxes2.shape or boxes1.shape[-1:] != (4,) or boxes1.dim() != 2:
        raise ValueError(
            f"generalized_box_iou needs two (N, 4) tensors of one shape, got {tuple(boxes1.shape)} and {tuple(boxes2.shape)}"
        )
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    inter_wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(
        min=0
    )
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    union = area1 + area2 - inter
    hull_wh = torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    iou = torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), 0.0)
    penalty = torch.where(hull > 0, (hull - union) / hull.clamp(min=torch.finfo(hull.dtype).tiny), 0.0)
    return iou - penalty


# ---- classification -----------------------------------------------------------------------------
def accuracy(predictions: Sequence[Any], labels: Sequence[Any]) -> float:
    """Percent of predictions equal to their label (NLVR2, SNLI-VE)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels: one label per prediction")
    if len(labels) == 0:
        raise ValueError("no predictions to evaluate")
    return 100.0 * sum(bool(p == t) for p, t in zip(predictions, labels)) / len(labels)
