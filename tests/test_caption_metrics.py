"""BLEU-4 and CIDEr-D in lora_caption.py against the reference implementations (sacrebleu, pycocoevalcap)."""
import csv
import random

import pytest

from conftest import ROOT
from lora_caption import caption_tokens, cider_d, corpus_bleu4

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


# What pycocoevalcap's PTBTokenizer (Stanford CoreNLP, run with Java) made of these captions, recorded once
# (pycocoevalcap 1.2): the COCO evaluation scores these tokens, lora_caption.py its own.
PTB_TOKENS = {"Two children, playing in the sand!": "two children playing in the sand",
              "A well-dressed man's dog runs .": "a well-dressed man 's dog runs"}


def test_issue21_C4_tokens_equal_cocos_ptb_tokens_only_without_hyphens_and_apostrophes():
    """The metrics equal pycocoevalcap's on the same tokens (the tests below); the tokens themselves equal COCO's
    PTB tokenizer's only for captions without hyphenated words and "'s" (README: what is equal)."""
    plain, hyphenated = PTB_TOKENS
    assert caption_tokens(plain) == PTB_TOKENS[plain].split()
    assert caption_tokens(hyphenated) == ["a", "well", "dressed", "man", "s", "dog", "runs"]
    assert caption_tokens(hyphenated) != PTB_TOKENS[hyphenated].split()


@pytest.mark.parametrize("text, tokens", [
    ("Ein Mädchen läuft über die Straße.", ["ein", "mädchen", "läuft", "über", "die", "straße"]),
    ("Ein Ma\u0308dchen", ["ein", "mädchen"]),  # the same word typed with a combining umlaut
    ("Собака бежит по траве.", ["собака", "бежит", "по", "траве"]),
    ("一只狗在草地上奔跑。", list("一只狗在草地上奔跑")),  # an ideograph is a word; the full stop is dropped
    ("一只Dog在跑", ["一", "只", "dog", "在", "跑"]),
    ("कुत्ता घास पर दौड़ता है", ["कुत्ता", "घास", "पर", "दौड़ता", "है"]),  # vowel signs are part of the word
    ("Ｄｏｇ２ l’été", ["dog2", "l", "été"]),  # full-width letters and digits; a typographic apostrophe splits
])
def test_unicode_words_are_kept_whole(text, tokens):
    assert caption_tokens(text) == tokens


def test_a_caption_equal_to_its_reference_scores_full_marks_in_any_script():
    captions = ["Собака бежит по зелёной траве", "一只黑狗在草地上奔跑", "Ein Mädchen läuft über die Wiese"]
    tokens = [caption_tokens(c) for c in captions]
    assert all(corpus_bleu4([t], [[t]]) == pytest.approx(1.0) for t in tokens)
    assert cider_d(tokens, [[t] for t in tokens]) > 5  # 10 for a perfect match, less the IDF of a 3-image corpus


def test_chinese_tokens_and_bleu_equal_sacrebleus_zh_tokenizer():
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh
    hyps = ["一只黑狗在草地上奔跑", "两个孩子在海边玩沙子", "一个男人骑着红色自行车"]
    refs = [["一只黑色的狗在草地上跑", "黑狗在绿草地上奔跑"], ["两个小孩在海滩上玩沙", "孩子们在海边玩沙子"],
            ["男人骑着一辆红色的自行车", "一个人在骑自行车"]]
    assert all(caption_tokens(s) == TokenizerZh()(s).split() for s in hyps + sum(refs, []))
    ours = corpus_bleu4([caption_tokens(h) for h in hyps], [[caption_tokens(r) for r in rs] for rs in refs])
    streams = [[rs[k] for rs in refs] for k in range(2)]
    reference = sacrebleu.corpus_bleu(hyps, streams, tokenize="zh", smooth_method="none")
    assert ours == pytest.approx(reference.score / 100, abs=1e-9) and ours > 0


def test_an_empty_corpus_scores_zero():
    assert cider_d([], []) == 0.0 and corpus_bleu4([], []) == 0.0


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
