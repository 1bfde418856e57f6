"""lora_caption.py's part of issue 24: caption data in the course's and Flickr8k's layouts (item 3), the course's
BLEU beside ours (item 4), a Python API that captions images with a trained run (item 5)."""
import contextlib
import csv
import io
import json
import warnings

import pytest
import torch
from nltk.translate.bleu_score import corpus_bleu

import lora_caption
from conftest import TINY_CAPTIONS, one_line_error


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


# 3. Caption data as the course and Flickr8k ship it ------------------------------------------------------------

def shipped_rows():
    """({image: [captions]} in captions.csv's order, {split: [image names]}) of the shipped tiny set."""
    by_image = {}
    with open(TINY_CAPTIONS / "captions.csv", newline="") as f:
        for row in csv.DictReader(f):
            by_image.setdefault(row["image"], []).append(row["caption"])
    return by_image, json.loads((TINY_CAPTIONS / "splits.json").read_text())


def course_layout(root, extra=None):
    """train.txt, val.txt, test.txt (image;caption, a header line) + images/, made from captions.csv and splits.json;
    extra: {file name: [raw lines]} appended."""
    root.mkdir()
    (root / "images").symlink_to(TINY_CAPTIONS / "images")
    by_image, splits = shipped_rows()
    for k, names in splits.items():
        lines = ["image;caption"] + [f"{n};{c}" for n in names for c in by_image[n]]
        (root / f"{k}.txt").write_text("\n".join(lines + (extra or {}).get(f"{k}.txt", [])) + "\n")
    return root


def flickr8k_layout(root, extra=None):
    """Flickr8k.token.txt (image#n<TAB>caption) + Flickr_8k.{train,dev,test}Images.txt + Flicker8k_Dataset/ (sic)."""
    root.mkdir()
    (root / "Flicker8k_Dataset").symlink_to(TINY_CAPTIONS / "images")
    by_image, splits = shipped_rows()
    lines = [f"{n}#{i}\t{c}" for n, caps in by_image.items() for i, c in enumerate(caps)]
    files = {"Flickr8k.token.txt": lines}
    files.update({f"Flickr_8k.{w}Images.txt": splits[k] for k, w in (("train", "train"), ("val", "dev"),
                                                                       ("test", "test"))})
    for name, content in files.items():
        (root / name).write_text("\n".join(content + (extra or {}).get(name, [])) + "\n")
    return root


def load(root, log=None):
    logged = [] if log is None else log
    return lora_caption.load_caption_data(root, (32, 32), 2, seed=0, log=logged.append)


def assert_same_data(ours, shipped):
    for k in lora_caption.SPLITS:
        assert ours[k].names == shipped[k].names, k
        assert ours[k].captions == shipped[k].captions, k
        assert torch.equal(ours[k].images, shipped[k].images), k
    assert lora_caption.data_fingerprint(ours) == lora_caption.data_fingerprint(shipped)


@pytest.mark.parametrize("layout", [course_layout, flickr8k_layout], ids=["course", "flickr8k"])
def test_issue24_3_each_layout_yields_the_pairs_and_splits_of_the_csv_it_was_made_from(layout, tmp_path):
    shipped = load(TINY_CAPTIONS)
    assert [len(shipped[k].names) for k in lora_caption.SPLITS] == [20, 5, 5]
    logged = []
    assert_same_data(load(layout(tmp_path / "set"), logged), shipped)
    assert logged == []  # nothing skipped, nothing joined


def test_issue24_3_the_lists_decide_the_splits_and_test_is_optional(tmp_path):
    by_image, splits = shipped_rows()
    root = course_layout(tmp_path / "course")
    (root / "test.txt").unlink()
    logged = []
    data = load(root, logged)
    assert data["test"].names == [] and data["val"].names == splits["val"] and data["train"].names == splits["train"]
    assert any("the test split is empty (there is no test.txt)" in line for line in logged), logged
    # Flickr8k: a captioned image in no list is left out with a word; a listed image without captions is dropped
    root = flickr8k_layout(tmp_path / "flickr", {"Flickr_8k.testImages.txt": ["no-caption.jpg"]})
    moved = splits["val"][0]
    for name, k in (("Flickr_8k.devImages.txt", "val"),):
        (root / name).write_text("\n".join(n for n in splits[k] if n != moved) + "\n")
    logged = []
    data = load(root, logged)
    assert moved not in sum((data[k].names for k in lora_caption.SPLITS), [])
    assert data["test"].names == splits["test"] and len(data["val"].names) == 4
    assert f"1 captioned image(s) are in none of the Flickr_8k.*Images.txt lists; left out, e.g. {moved}" in logged
    assert "the Flickr_8k.*Images.txt lists names 1 image(s) that were skipped or have no caption" in logged


def test_issue24_3_bad_rows_of_each_layout_are_reported_and_skipped(tmp_path):
    shipped = load(TINY_CAPTIONS)
    by_image, splits = shipped_rows()
    first = splits["train"][0]
    logged = []
    bad = ["only-one-field", f"{first};", f"{first};{by_image[first][0]}"]  # lines 102, 103, 104 of train.txt
    assert_same_data(load(course_layout(tmp_path / "course", {"train.txt": bad}), logged), shipped)
    assert "skipped 1 caption row(s) (malformed row): train.txt line 102" in logged, logged
    assert "skipped 1 caption row(s) (empty caption): train.txt line 103" in logged, logged
    assert "skipped 1 caption row(s) (duplicate row): train.txt line 104" in logged, logged
    logged = []
    bad = [f"{first}\tno number", f"{first}#x\tnot a number", f"{first}#7", f"{first}#5\t  ",
           f"{first}#6\t{by_image[first][0]}"]  # lines 151-155
    data = load(flickr8k_layout(tmp_path / "flickr", {"Flickr8k.token.txt": bad,
                                                      "Flickr_8k.trainImages.txt": ["a.jpg b.jpg"]}), logged)
    assert_same_data(data, shipped)
    assert ("skipped 3 caption row(s) (malformed row): Flickr8k.token.txt line 151, Flickr8k.token.txt line 152, "
            "Flickr8k.token.txt line 153") in logged, logged
    assert "skipped 1 caption row(s) (empty caption): Flickr8k.token.txt line 154" in logged, logged
    assert "skipped 1 caption row(s) (duplicate row): Flickr8k.token.txt line 155" in logged, logged
    assert "skipped 1 image list line(s) (malformed line): Flickr_8k.trainImages.txt line 21" in logged, logged


def break_course(root, case):
    if case == "no header":
        lines = (root / "train.txt").read_text().splitlines()
        (root / "train.txt").write_text("\n".join(lines[1:]) + "\n")
    elif case == "no val.txt":
        (root / "val.txt").unlink()
    elif case == "an image in two files":
        with open(root / "test.txt", "a") as f:
            f.write(f"{shipped_rows()[1]['train'][0]};a caption in the wrong file\n")
    elif case == "latin-1":
        (root / "val.txt").write_bytes("image;caption\na.jpg;un caf\u00e9\n".encode("latin-1"))


def break_flickr8k(root, case):
    if case == "no dev list":
        (root / "Flickr_8k.devImages.txt").unlink()
    elif case == "an image in two lists":
        with open(root / "Flickr_8k.testImages.txt", "a") as f:
            f.write(shipped_rows()[1]["val"][0] + "\n")
    elif case == "a csv named as the token file":
        (root / "Flickr8k.token.txt").write_text((TINY_CAPTIONS / "captions.csv").read_text())


@pytest.mark.parametrize("layout, case, message", [
    (course_layout, "no header", "train.txt: needs the columns image,caption; its header is 1000268201_693b08cb0e.jpg"),
    (course_layout, "no val.txt", "train.txt is there but not val.txt; the course's layout: train.txt, val.txt, "
                                  "optional test.txt, each image;caption with a header"),
    (course_layout, "an image in two files", "is in both train.txt and test.txt; an image belongs to one split"),
    (course_layout, "latin-1", "val.txt is not UTF-8 text (line 2 holds the byte 0xe9)"),
    (flickr8k_layout, "no dev list", "Flickr8k.token.txt is there but not Flickr_8k.devImages.txt"),
    (flickr8k_layout, "an image in two lists",
     "is in both Flickr_8k.devImages.txt and Flickr_8k.testImages.txt; an image belongs to one split"),
    (flickr8k_layout, "a csv named as the token file",
     "Flickr8k.token.txt: no line of the form image#n<TAB>caption (line 1 is 'image,caption')"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 30 else None)
def test_issue24_3_what_stops_a_layout_is_one_line_before_any_work(layout, case, message, tiny_captioner, tmp_path,
                                                                    capsys):
    root = layout(tmp_path / "set")
    (break_course if layout is course_layout else break_flickr8k)(root, case)
    argv = ["--model", str(tiny_captioner), "--data-dir", str(root), "--device", "cpu", "--out-dir",
            str(tmp_path / "run")]
    err = one_line_error(capsys, lambda: lora_caption.main(argv))
    assert message in err, err
    assert not (tmp_path / "run").exists()


def test_issue24_3_a_folder_with_no_known_layout_names_all_three(tmp_path, tiny_captioner, capsys):
    (tmp_path / "set").mkdir()
    argv = ["--model", str(tiny_captioner), "--data-dir", str(tmp_path / "set"), "--device", "cpu"]
    err = one_line_error(capsys, lambda: lora_caption.main([*argv, "--out-dir", str(tmp_path / "run")]))
    assert "no captions.csv (columns image,caption) or captions.txt found, nor the course's train.txt + val.txt" in err
    assert "nor Flickr8k's Flickr8k.token.txt + image lists" in err


def test_issue24_3_a_run_on_the_flickr8k_layout_trains_and_scores(tiny_captioner, tmp_path):
    root = flickr8k_layout(tmp_path / "set")
    summary = lora_caption.main(["--model", str(tiny_captioner), "--data-dir", str(root), "--device", "cpu",
                                 "--out-dir", str(tmp_path / "run"), "--batch-size", "10", "--max-steps", "1",
                                 "--no-baseline", "--eval-images", "1", "--no-plots"])
    assert summary["steps"] == 1 and summary["train_images"] == 20 and summary["test_images"] == 1


# 5. The Python API: load_trained + caption_images, the same strings as --caption ---------------------------------

@pytest.fixture(scope="module")
def adapted(tiny_captioner, tmp_path_factory):
    """A run folder whose adapter/ (decoder and cross-attention, B drawn at random, as a trained one would not be
    after a few steps on the tiny model) makes the tiny captioner write a different, non-empty caption per image."""
    import argparse

    import common
    model, _, _ = lora_caption.load_captioner(str(tiny_captioner), torch.device("cpu"))
    lora = argparse.Namespace(rank=4, alpha=8, lora_dropout=0.0, targets=lora_caption.DECODER_TARGETS,
                              cross_attention=True)
    torch.manual_seed(0)  # before add_lora, whose A matrices are drawn too: the same adapter in any test order
    model = lora_caption.add_lora(model, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    run = tmp_path_factory.mktemp("adapted") / "run"
    common.save_adapter(model, run, base_model=str(tiny_captioner))
    return run


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Three shipped images, a grey PNG and an EXIF-rotated JPEG: paths whose reading matters."""
    import numpy as np
    from PIL import Image
    folder = tmp_path_factory.mktemp("pictures")
    shipped = sorted((TINY_CAPTIONS / "images").iterdir())[:3]
    rgb = np.array(Image.open(shipped[0]).convert("RGB"))
    Image.fromarray(rgb).convert("L").save(folder / "grey.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown
    Image.fromarray(rgb[:, :40]).save(folder / "rotated.jpg", exif=exif)
    return [str(p) for p in shipped] + [str(folder / "grey.png"), str(folder / "rotated.jpg")]


def cli_captions(*flags, images):
    return list(lora_caption.main(["--caption", *images, *flags, "--device", "cpu"]).values())


def test_issue24_5_the_api_gives_the_captions_of_caption_from_paths_and_pil_images(adapted, pictures):
    from PIL import Image
    expected = cli_captions("--adapter", str(adapted / "adapter"), images=pictures)
    assert len(expected) == 5 and all(isinstance(c, str) and c for c in expected) and len(set(expected)) >= 3
    for given in (adapted, adapted / "adapter", str(adapted / "adapter")):  # a run folder or its adapter
        captioner = lora_caption.load_trained(given)
        assert captioner.device == torch.device("cpu") and not captioner.model.training
        assert lora_caption.caption_images(captioner, pictures) == expected
        assert lora_caption.caption_images(captioner, [Image.open(p) for p in pictures]) == expected
    mixed = [pictures[0], Image.open(pictures[1])]
    assert lora_caption.caption_images(captioner, mixed) == expected[:2]
    assert lora_caption.caption_images(captioner, pictures[2]) == expected[2:3]  # one image, not in a list
    assert lora_caption.caption_images(captioner, []) == []
    beams = cli_captions("--adapter", str(adapted / "adapter"), "--num-beams", "2", "--max-new-tokens", "5",
                         images=pictures[:2])
    assert lora_caption.caption_images(captioner, pictures[:2], num_beams=2, max_new_tokens=5) == beams


def test_issue24_5_the_api_loads_a_merged_model_and_a_base_given_for_an_adapter(adapted, tiny_captioner, pictures,
                                                                                tmp_path):
    lora_caption.main(["--merge", "--adapter", str(adapted / "adapter"), "--out-dir", str(tmp_path / "merged"),
                       "--device", "cpu"])
    expected = cli_captions("--model", str(tmp_path / "merged"), images=pictures)
    assert all(expected) and len(set(expected)) >= 3
    merged = lora_caption.load_trained(tmp_path / "merged", device=torch.device("cpu"))
    assert lora_caption.caption_images(merged, pictures) == expected
    on_base = lora_caption.load_trained(adapted, "cpu", model=tiny_captioner)
    assert lora_caption.caption_images(on_base, pictures) == cli_captions(
        "--adapter", str(adapted / "adapter"), "--model", str(tiny_captioner), images=pictures)
    with pytest.raises(lora_caption.DataError, match="model= is the base of an adapter"):
        lora_caption.load_trained(tmp_path / "merged", model=tiny_captioner)
    with pytest.raises(lora_caption.DataError, match="nothing-here: no such folder"):
        lora_caption.load_trained(tmp_path / "nothing-here")


def test_issue24_5_caption_runs_through_caption_images(adapted, pictures, monkeypatch, capsys):
    calls = []
    real = lora_caption.caption_images

    def recorded(captioner, images, *rest):
        calls.append(len(images))
        return real(captioner, images, *rest)
    monkeypatch.setattr(lora_caption, "caption_images", recorded)
    captions = lora_caption.main(["--caption", *pictures, "--adapter", str(adapted / "adapter"), "--device", "cpu"])
    assert calls == [5] and list(captions) == pictures
    printed = capsys.readouterr().out.split("\n")  # split("\n"): a random caption may hold \x1c, a line end to Python
    assert printed[-6:-1] == [f"{p}: {c}" for p, c in captions.items()]
