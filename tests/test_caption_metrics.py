"""BLEU-4 and CIDEr-D in lora_caption.py against the reference implementations (sacrebleu, pycocoevalcap)."""
import csv
import random

import pytest

from lora_caption import caption_tokens, cider_d, corpus_bleu4
from conftest import ROOT

sacrebleu = pytest.importorskip("sacrebleu")
Cider = pytest.importorskip("pycocoevalcap.cider.cider").Cider


def real_captions():
    """{image: [5 tokenised references]} from the shipped caption set."""
    refs = {}
    with open(ROOT / "tests" / "data" / "captions-tiny" / "captions.csv", newline="") as f:
        for row in csv.DictReader(f):
            refs.setdefault(row["image"], []).append(caption_tokens(row["caption"]))
    return {k: v for k, v in refs.items() if len(v) == 5}


def corpora():
    """(hypotheses, references) pairs: a caption of the image itself, a caption of another image, a
    shuffled or truncated one, so every n-gram order and the brevity penalty are exercised."""
    refs = real_captions()
    names = sorted(refs)
    rng = random.Random(0)
    hyps_self = [refs[n][0] for n in names]
    hyps_other = [refs[names[(i + 1) % len(names)]][1] for i in range(len(names))]
    hyps_mixed = [rng.sample(h, len(h)) if i % 3 == 0 else h[:max(1, len(h) // 2)] if i % 3 == 1 else h
                  for i, h in enumerate(hyps_self)]
    references = [refs[n][1:] for n in names]  # 4 references each: the hypothesis is not among them
    return [(h, references) for h in (hyps_self, hyps_other, hyps_mixed)]


def test_tokens():
    assert caption_tokens("A dog's ball, RED!  2 cats .") == ["a", "dog", "s", "ball", "red", "2", "cats"]


@pytest.mark.parametrize("case", range(3))
def test_bleu4_equals_sacrebleu(case):
    hyps, refs = corpora()[case]
    ours = corpus_bleu4(hyps, refs)
    streams = [[" ".join(r[k]) for r in refs] for k in range(4)]
    reference = sacrebleu.corpus_bleu([" ".join(h) for h in hyps], streams, tokenize="none", smooth_method="none")
    assert ours == pytest.approx(reference.score / 100, abs=1e-9)
    assert 0 < ours < 1 if case != 1 else ours == 0  # another image's caption shares no 4-gram with the references


def test_bleu4_edge_cases():
    assert corpus_bleu4([["a", "b"]], [[["a", "b", "c"]]]) == 0.0  # no 4-gram at all: 0 without smoothing
    assert corpus_bleu4([list("abcde")], [[list("abcde")]]) == pytest.approx(1.0)


@pytest.mark.parametrize("case", range(3))
def test_cider_d_equals_pycocoevalcap(case):
    hyps, refs = corpora()[case]
    ours = cider_d(hyps, refs)
    gts = {i: [" ".join(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    reference, _ = Cider().compute_score(gts, res)
    assert ours == pytest.approx(reference, rel=1e-9, abs=1e-12)
    assert ours > 0
