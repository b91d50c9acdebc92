"""CIDEr-D (Vedantam et al., CVPR 2015) for SCST rewards: document frequencies counted once from
a corpus of reference sets (the training images' captions), then a score for each candidate
against its own image's references.

The arithmetic is that of coco-caption's `ciderD` scorer as self-critical training uses it
(ruotianluo/cider, the `df=<training corpus>` mode), which pycocoevalcap's `Cider` also runs with
the evaluated references as its corpus:

- n-grams of orders 1..n (n = 4) weighted tf × idf, tf the raw count in the sentence and
  idf = log(#reference sets) − log(max(1, df)), df the number of reference *sets* (images)
  holding the n-gram at least once;
- per order, a clipped cosine: Σ_g min(c_g, r_g)·r_g / (|c|·|r|) (0 when either norm is 0);
- a Gaussian length penalty exp(−δ²/2σ²), σ = 6, where δ is the difference of the two
  sentences' bigram counts (the reference code measures length in bigrams: the word-length
  difference, except against an empty sentence);
- the mean over orders, averaged over the references, × 10.
"""

from __future__ import annotations

import math
import string
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

import numpy as np

# Hyphens and slashes separate words ("black-and-white", "indoor/outdoor"); other punctuation
# is deleted ("man's" -> "mans"), as the project's caption cleaning and Karpathy's prepro do.
_SPLIT_WORDS = str.maketrans({"-": " ", "/": " "})
_DELETE_PUNCTUATION = str.maketrans("", "", string.punctuation.replace("-", "").replace("/", ""))


def simple_tokenize(text: str) -> str:
    """The tokenisation of SCST rewards: lower-case, hyphens and slashes to spaces, every other
    ASCII punctuation mark deleted, runs of whitespace to one space. No JVM, no vocabulary: the
    candidates (decoded model output) and the references go through the same function."""
    return " ".join(text.lower().translate(_SPLIT_WORDS).translate(_DELETE_PUNCTUATION).split())


def _ngrams(words: Sequence[str], n: int) -> Counter[str]:
    """Counts of the sentence's 1..n-grams, each n-gram as its words joined by one space."""
    return Counter(" ".join(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


class CiderD:
    """CIDEr-D scorer with document frequencies from a fixed corpus (built once, reused every step).

    corpus: one entry per image, that image's reference captions (at least one each).
    tokenize: applied to every corpus, reference and candidate sentence; `None` when the text is
        already tokenised (then it is only split on whitespace).
    cache_size: how many references' tf-idf vectors to keep (an image's references recur across
        its sampled candidates and across epochs); the cache is emptied when it is full.
    """

    def __init__(
        self,
        corpus: Iterable[Sequence[str]],
        n: int = 4,
        sigma: float = 6.0,
        tokenize: Callable[[str], str] | None = simple_tokenize,
        cache_size: int = 200_000,
    ) -> None:
        if n < 1 or sigma <= 0:
            raise ValueError(f"CiderD needs n >= 1 and sigma > 0, got n={n}, sigma={sigma}")
        self.n, self.sigma, self.tokenize, self.cache_size = n, sigma, tokenize, cache_size
        self.document_frequency: Counter[str] = Counter()
        self.num_documents = 0
        for index, references in enumerate(corpus):
            if isinstance(references, str) or not references:
                raise ValueError(
                    f"corpus entry {index} must be a non-empty list of reference captions, got {references!r}"
                )
            self.document_frequency.update(set().union(*(self._counts(r) for r in references)))
            self.num_documents += 1
        if self.num_documents == 0:
            raise ValueError(
                "CiderD needs a corpus of at least one reference set for its document frequencies"
            )
        self.log_num_documents = math.log(self.num_documents)
        self._cache: dict[str, tuple[list[dict[str, float]], list[float], int]] = {}

    def _words(self, sentence: str) -> list[str]:
        return (self.tokenize(sentence) if self.tokenize is not None else sentence).split()

    def _counts(self, sentence: str) -> Counter[str]:
        return _ngrams(self._words(sentence), self.n)

    def _vector(self, sentence: str) -> tuple[list[dict[str, float]], list[float], int]:
        """Per order: the tf-idf weights and their norm; and the length in bigrams."""
        words = self._words(sentence)
        weights: list[dict[str, float]] = [{} for _ in range(self.n)]
        for gram, tf in _ngrams(words, self.n).items():
            idf = self.log_num_documents - math.log(max(1, self.document_frequency[gram]))
            weights[gram.count(" ")][gram] = tf * idf
        norms = [math.sqrt(sum(w * w for w in order.values())) for order in weights]
        # The reference code's length: the total count of bigrams (none when n = 1).
        length = max(0, len(words) - 1) if self.n >= 2 else 0
        return weights, norms, length

    def _reference_vector(self, sentence: str) -> tuple[list[dict[str, float]], list[float], int]:
        vector = self._cache.get(sentence)
        if vector is None:
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            vector = self._cache[sentence] = self._vector(sentence)
        return vector

    def score(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of each candidate against its references -> (N,) float64 (0 to ~10)."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
        out = np.zeros(len(candidates), dtype=np.float64)
        penalty_scale = 2.0 * self.sigma**2
        for index, (candidate, refs) in enumerate(zip(candidates, references)):
            if isinstance(refs, str) or not refs:
                raise ValueError(
                    f"candidate {index} ({candidate!r}) has no references (got {refs!r}): "
                    "CIDEr-D needs at least one"
                )
            c_weights, c_norms, c_length = self._vector(candidate)
            total = 0.0
            for ref in refs:
                r_weights, r_norms, r_length = self._reference_vector(ref)
                penalty = math.exp(-((c_length - r_length) ** 2) / penalty_scale)
                for c_order, r_order, c_norm, r_norm in zip(c_weights, r_weights, c_norms, r_norms):
                    if c_norm == 0.0 or r_norm == 0.0:
                        continue  # the reference code's numerator is 0 here too
                    overlap = 0.0
                    for gram, c_w in c_order.items():
                        r_w = r_order.get(gram)
                        if r_w is not None:
                            overlap += min(c_w, r_w) * r_w
                    total += overlap / (c_norm * r_norm) * penalty
            out[index] = 10.0 * total / (self.n * len(refs))
        return out

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache"] = {}  # a cache, not state: ship the scorer without it
        return state
