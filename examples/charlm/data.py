"""The data: the CPython documentation topics that ship with Python, as characters.

``pydoc_data.topics`` is part of the standard library (it backs ``help('if')``), so nothing is
downloaded. Its text differs a little between Python versions; :func:`load_corpus` records its
length and a hash so that results can be traced to the text they were measured on.

Both frameworks draw their batches from :class:`BatchSampler`, a NumPy generator with a fixed seed,
so the JAX and the PyTorch runs see exactly the same sequence of batches.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A tokenised text: a character vocabulary and the deterministic train / held-out split."""

    chars: tuple[str, ...]     # the vocabulary, sorted; token id = index
    train: np.ndarray          # int32 token ids, the first (1 - val_fraction) of the text
    val: np.ndarray            # int32 token ids, the last val_fraction of the text (held out)
    n_chars: int               # length of the whole text
    sha256: str                # hash of the text (which Python's docs these are)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.chars)}
        return np.array([index[c] for c in s], dtype=np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def corpus_text() -> str:
    """All documentation topics, in sorted topic order, separated by blank lines."""
    from pydoc_data import topics  # standard library
    return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def load_corpus(val_fraction: float = 0.1) -> Corpus:
    """Character vocabulary of the whole text, then a contiguous split: the last
    ``val_fraction`` of the text is held out (as in nanoGPT's shakespeare_char)."""
    text = corpus_text()
    chars = tuple(sorted(set(text)))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((index[c] for c in text), dtype=np.int32, count=len(text))
    n_train = int(round(len(ids) * (1.0 - val_fraction)))
    return Corpus(
            chars=chars,
            train=ids[:n_train],
            val=ids[n_train:],
            n_chars=len(text),
            sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )


class BatchSampler:
    """Random windows of ``context + 1`` tokens: inputs ``x`` and next-token targets ``y``.

    A ``numpy.random.Generator`` seeded once: the k-th batch is the same for every optimizer and
    both frameworks. Returns int32 NumPy arrays of shape (batch, context).
    """

    def __init__(self, data: np.ndarray, batch_size: int, context: int, seed: int):
        if len(data) <= context + 1:
            raise ValueError(f"data: {len(data)} tokens is too short for context {context}")
        self.data = data
        self.batch_size = batch_size
        self.context = context
        self.rng = np.random.default_rng(seed)
        self._offsets = np.arange(context + 1)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray]:
        starts = self.rng.integers(0, len(self.data) - self.context - 1, size=self.batch_size)
        windows = self.data[starts[:, None] + self._offsets[None, :]]
        return windows[:, :-1], windows[:, 1:]


def eval_batches(data: np.ndarray, n_batches: int, batch_size: int, context: int,
                                  seed: int = 1234) -> list[tuple[np.ndarray, np.ndarray]]:
    """A fixed held-out evaluation set: ``n_batches`` batches drawn once with their own seed."""
    sampler = BatchSampler(data, batch_size, context, seed)
    return [next(sampler) for _ in range(n_batches)]
