"""lora_caption.py's part of issue 24: caption data in the course's and Flickr8k's layouts (item 3), the course's
BLEU beside ours (item 4), a Python API that captions images with a trained run (item 5)."""
import contextlib
import io
import json
import warnings

import pytest
from nltk.translate.bleu_score import corpus_bleu

import lora_caption
from conftest import TINY_CAPTIONS


@pytest.fixture(scope="module")
def trained(tiny_captioner, tmp_path_factory):
    """A 2-step run (baseline on, 3 test images scored), its printed output and summary."""
    out = tmp_path_factory.mktemp("issue24") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        lora_caption.main(["--model", str(tiny_captioner), "--data-dir", str(TINY_CAPTIONS), "--device", "cpu",
                           "--out-dir", str(out), "--batch-size", "10", "--max-steps", "2", "--eval-images", "3",
                           "--no-plots"])
    (out.parent / "stdout.txt").write_text(printed.getvalue())
    return out

# 4. The course's BLEU: nltk's corpus_bleu, one reference per row, whitespace tokens ------------------------------

# (hypothesis, [the references of its image: one table row each]): real-looking captions, the course's raw strings
TABLE = [
    ("a dog runs on the grass .", ["A dog runs across the green grass .", "a brown dog is running on grass",
                                   "The dog plays outside ."]),
    ("a man rides a bike", ["A man is riding a bicycle down the street .", "a man rides a bike on a road"]),
    ("two children", ["Two children play in the sand at the beach .", "two children"]),  # short: n-grams and BP
    ("a", ["a cat sleeps on a red sofa", "a"]),  # one word: no 2-, 3- or 4-gram, denominators of 1
    ("zebra zebra zebra", ["a girl in a pink dress climbs the stairs ."]),  # no match at all
]


def nltk_bleu(table):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # nltk's "0 counts of n-gram overlaps"
        return corpus_bleu([[ref.split()] for _, refs in table for ref in refs],
                           [hyp.split() for hyp, refs in table for _ in refs])


def ours(table):
    return lora_caption.bleu_one_ref_per_row([h for h, _ in table], [refs for _, refs in table])


@pytest.mark.parametrize("rows", [slice(None), slice(0, 2), slice(2, 4), slice(3, 4), slice(4, 5), slice(3, 5)],
                         ids=["all", "long", "short", "one-word", "zero-match", "one-word+zero-match"])
def test_issue24_4_course_bleu_equals_nltks_corpus_bleu(rows):
    table = TABLE[rows]
    expected = nltk_bleu(table)
    assert ours(table) == pytest.approx(expected, rel=1e-12, abs=0)
    if rows == slice(4, 5):
        assert expected == 0 and ours(table) == 0.0  # no unigram matches: nltk returns 0
    if rows == slice(3, 4):
        assert 0 < expected < 1e-50  # matches only unigrams: nltk's smallest-float precisions, not 0


def test_issue24_4_the_brevity_penalty_is_nltks_and_case_counts():
    table = [("a dog", ["a dog runs on the grass"])]  # 2 of 6 words: BP exp(1 - 6/2), no 3- or 4-gram
    assert ours(table) == pytest.approx(nltk_bleu(table), rel=1e-12) and ours(table) < 0.2
    table = [("the dog runs fast today", ["the dog runs fast today"]), ("A dog", ["a dog"])]
    lower = [(h.lower(), refs) for h, refs in table]
    assert ours(table) == pytest.approx(nltk_bleu(table), rel=1e-12)
    assert ours(table) < ours(lower) == pytest.approx(nltk_bleu(lower), rel=1e-12)  # "A" is not "a": raw tokens
    assert lora_caption.corpus_bleu4([["a", "dog"]], [[["a", "dog"]]]) == 0  # ours has no 4-gram: 0, not nltk's


def test_issue24_4_score_captions_reports_both_and_the_line_names_the_course_figure():
    hyps = [h for h, _ in TABLE]
    refs = [r for _, r in TABLE]
    scores = lora_caption.score_captions(hyps, refs)
    assert scores["bleu_one_ref_per_row"] == pytest.approx(nltk_bleu(TABLE), rel=1e-12)
    assert scores["bleu_one_ref_per_row"] != scores["bleu4"]
    assert "BLEU (one reference per row, whitespace tokens)" in lora_caption.score_line(scores)


def test_issue24_4_the_course_bleu_is_in_the_summary_and_the_result_line(trained):
    summary = json.loads((trained / "summary.json").read_text())
    for key in ("bleu_one_ref_per_row_before", "bleu_one_ref_per_row"):
        assert isinstance(summary[key], float) and 0 <= summary[key] <= 1, key
    examples = summary["examples"][:3]
    after = [e["after"] for e in examples]
    assert summary["bleu_one_ref_per_row"] == pytest.approx(nltk_bleu(list(zip(after, [e["references"]
                                                                                      for e in examples]))))
    printed = (trained.parent / "stdout.txt").read_text()
    fmt = lambda v: f"{v:.4f}"
    assert (f"| BLEU (one reference per row, whitespace tokens) {fmt(summary['bleu_one_ref_per_row_before'])} -> "
            f"{fmt(summary['bleu_one_ref_per_row'])} |") in printed, printed
    assert "before fine-tuning: BLEU-4 " in printed and "after fine-tuning: BLEU-4 " in printed
