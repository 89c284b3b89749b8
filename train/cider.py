"""CIDEr-D as a training reward (self-critical sequence training).

The same formula as coco-caption's CiderScorer (n = 1..4, tf-idf, clipping, Gaussian length penalty
sigma = 6, x10), but with document frequencies computed once over the training references, so scoring
thousands of sampled captions per batch does not recount the corpus. Evaluation uses pycocoevalcap itself.
"""
from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Sequence

N = 4
SIGMA = 6.0


def ngrams(words: Sequence[str]) -> Counter:
    c = Counter()
    for n in range(1, N + 1):
        for i in range(len(words) - n + 1):
            c[tuple(words[i : i + n])] += 1
    return c


class CiderD:
    """Scores token lists against the references of one image; df from a fixed reference corpus."""

    def __init__(self, corpus_refs: Sequence[Sequence[Sequence[str]]]):
        self.df: dict = defaultdict(float)
        for refs in corpus_refs:
            for g in set(g for r in refs for g in ngrams(r)):
                self.df[g] += 1
        self.ref_len = math.log(float(len(corpus_refs)))
        self._cache: dict = {}

    def _vec(self, counts: Counter):
        vec = [defaultdict(float) for _ in range(N)]
        norm = [0.0] * N
        length = 0
        for g, tf in counts.items():
            n = len(g) - 1
            df = math.log(max(1.0, self.df.get(g, 0.0)))
            vec[n][g] = float(tf) * (self.ref_len - df)
            norm[n] += vec[n][g] ** 2
            if n == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def refs_vectors(self, key, refs: Sequence[Sequence[str]]):
        if key not in self._cache:
            self._cache[key] = [self._vec(ngrams(r)) for r in refs]
        return self._cache[key]

    def score(self, hyp: Sequence[str], key, refs: Sequence[Sequence[str]]) -> float:
        vh, nh, lh = self._vec(ngrams(hyp))
        total = [0.0] * N
        ref_vecs = self.refs_vectors(key, refs)
        for vr, nr, lr in ref_vecs:
            delta = float(lh - lr)
            for n in range(N):
                val = 0.0
                for g, x in vh[n].items():
                    y = vr[n].get(g)
                    if y is not None:
                        val += min(x, y) * y
                if nh[n] != 0 and nr[n] != 0:
                    val /= nh[n] * nr[n]
                total[n] += val * math.exp(-(delta**2) / (2 * SIGMA**2))
        return sum(t / len(ref_vecs) for t in total) / N * 10.0
