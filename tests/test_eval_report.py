"""EvalAccumulator metrics against an independent numpy computation and a hand example; report files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vmae_ds.eval.report import EvalAccumulator, EvalError, write_report


def _random_eval(n: int, c: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, c, generator=g) * 3, dim=1)  # float32, no ties in practice
    labels = torch.randint(0, c, (n,), generator=g)
    valid = torch.rand(n, generator=g) > 0.1
    indices = torch.randperm(n, generator=g)
    return indices, probs, labels, valid


def test_top1_top5_per_class_and_confusion_match_numpy():
    n, c = 300, 12
    indices, probs, labels, valid = _random_eval(n, c, seed=0)
    # As after gathering two ranks: two accumulators, several batches, padding (index -1) in between.
    a, b = EvalAccumulator(c), EvalAccumulator(c)
    for lo, hi, acc in ((0, 100, a), (100, 180, b), (180, 300, a)):
        pad = 3
        acc.add(torch.cat([indices[lo:hi], torch.full((pad,), -1)]), torch.cat([probs[lo:hi], torch.zeros(pad, c)]),
                torch.cat([labels[lo:hi], torch.full((pad,), -1)]),
                torch.cat([valid[lo:hi], torch.zeros(pad, dtype=torch.bool)]))
    a.merge(b)
    r = a.result()

    p, y, v = probs.numpy(), labels.numpy(), valid.numpy()
    pv, yv = p[v], y[v]
    order = np.argsort(-pv, axis=1, kind="stable")
    top1 = np.mean(order[:, 0] == yv)
    top5 = np.mean([yv[i] in order[i, :5] for i in range(len(yv))])
    conf = np.zeros((c, c), dtype=np.int64)
    np.add.at(conf, (yv, order[:, 0]), 1)
    support = np.bincount(yv, minlength=c)
    per_class = np.diag(conf) / support

    assert r.count == int(v.sum()) and r.top5_k == 5
    assert r.top1 == pytest.approx(top1) and r.top5 == pytest.approx(top5)
    assert 0 < r.top1 < r.top5 < 1
    assert np.array_equal(r.confusion.numpy(), conf)
    assert r.per_class_support == support.tolist()
    assert r.per_class_accuracy == pytest.approx(per_class.tolist())
    assert r.mean_class_accuracy == pytest.approx(per_class.mean())
    assert r.invalid == sorted(indices[~valid].tolist())


def test_hand_example_per_class_and_confusion():
    # 3 classes; the predicted class is the one with 0.6. True labels and predictions:
    #   video 0: 0 -> 0, 1: 0 -> 0, 2: 1 -> 0, 3: 1 -> 1, 4: 2 -> 2, 5: 2 -> 1; video 6 undecodable.
    preds, labels = [0, 0, 0, 1, 2, 1, 0], [0, 0, 1, 1, 2, 2, -1]
    probs = torch.full((7, 3), 0.2)
    probs[torch.arange(7), torch.tensor(preds)] = 0.6
    acc = EvalAccumulator(3)
    acc.add(torch.arange(7), probs, torch.tensor(labels), torch.tensor([True] * 6 + [False]))
    r = acc.result(class_names=["walk", "run", "swim"])
    assert r.confusion.tolist() == [[2, 0, 0], [1, 1, 0], [0, 1, 1]]
    assert r.per_class_support == [2, 2, 2] and r.per_class_correct == [2, 1, 1]
    assert r.per_class_accuracy == [1.0, 0.5, 0.5]
    assert r.top1 == pytest.approx(4 / 6) and r.mean_class_accuracy == pytest.approx(2 / 3)
    assert r.top5_k == 3 and r.top5 == 1.0  # k capped at the number of classes
    assert r.invalid == [6] and r.count == 6


def test_a_video_index_twice_is_refused():
    probs, labels, ok = torch.full((2, 4), 0.25), torch.tensor([1, 2]), torch.tensor([True, True])
    acc = EvalAccumulator(4)
    acc.add(torch.tensor([5, 9]), probs, labels, ok)
    with pytest.raises(EvalError, match=r"^video index 9 was already added"):
        acc.add(torch.tensor([11, 9]), probs, labels, ok)
    assert len(acc) == 2 and acc.result().count == 2  # the refused batch left nothing behind
    with pytest.raises(EvalError, match="video index 3 appears twice in one batch"):
        acc.add(torch.tensor([3, 3]), probs, labels, ok)
    with pytest.raises(EvalError, match="video index 5 was already added"):  # invalid entries count too
        acc.add(torch.tensor([5]), probs[:1], labels[:1], torch.tensor([False]))
    other = EvalAccumulator(4)
    other.add(torch.tensor([7, 5]), probs, labels, ok)
    with pytest.raises(EvalError, match="video index 5 is in both accumulators"):
        acc.merge(other)
    assert acc.result().count == 2


def test_bad_inputs_name_the_video():
    acc = EvalAccumulator(4)
    with pytest.raises(EvalError, match=r"video index 8: label -1 is outside \[0, 4\)"):
        acc.add(torch.tensor([7, 8]), torch.full((2, 4), 0.25), torch.tensor([0, -1]), torch.tensor([True, True]))
    with pytest.raises(EvalError, match=r"expected probs \(2, 4\)"):
        acc.add(torch.tensor([7, 8]), torch.full((2, 5), 0.2), torch.tensor([0, 1]), torch.tensor([True, True]))
    with pytest.raises(EvalError, match="video index 8: non-finite scores"):
        acc.add(torch.tensor([7, 8]), torch.tensor([[0.25] * 4, [float("nan")] * 4]), torch.tensor([0, 1]),
                torch.tensor([True, True]))
    with pytest.raises(EvalError, match="2 class names given for 4 classes"):
        acc.result(class_names=["a", "b"])


def test_report_files_for_a_person_and_a_program(tmp_path):
    indices, probs, labels, valid = _random_eval(60, 5, seed=1)
    acc = EvalAccumulator(5)
    acc.add(indices, probs, labels, valid)
    names = ["abseiling", "passing American football (in game)", "riding a bike", "tai chi", "a|b"]
    r = acc.result(names)
    paths = write_report(r, tmp_path / "rep", "ViT-B K400 val", {"checkpoint": "run/ckpt", "views": "5 x 3"})
    assert set(paths) == {"json", "md", "png"}
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 5000
    doc = json.loads(paths["json"].read_text())
    assert doc["title"] == "ViT-B K400 val" and doc["extra"] == {"checkpoint": "run/ckpt", "views": "5 x 3"}
    assert (doc["count"], doc["top1"], doc["top5"], doc["num_classes"]) == (r.count, r.top1, r.top5, 5)
    assert doc["invalid"] == r.invalid and doc["invalid_count"] == int((~valid).sum())
    assert doc["confusion"] == r.confusion.tolist()
    assert [c["name"] for c in doc["per_class"]] == names
    assert sum(c["support"] for c in doc["per_class"]) == r.count
    md = paths["md"].read_text()
    assert md.startswith("# ViT-B K400 val\n")
    assert f"| {r.count:,} | {100 * r.top1:.2f}% | {100 * r.top5:.2f}% |" in md
    assert "| 1 | passing American football (in game) |" in md and "a\\|b" in md  # pipes escaped
    assert "- views: 5 x 3" in md and "[confusion.png](confusion.png)" in md
    assert f"not scored: {len(r.invalid)} (indices {r.invalid[0]}," in md


def test_many_classes_report_has_no_png_and_lists_weakest_classes(tmp_path):
    c = 60
    indices, probs, labels, valid = _random_eval(200, c, seed=2)
    acc = EvalAccumulator(c)
    acc.add(indices, probs, labels, torch.ones(200, dtype=torch.bool))
    r = acc.result()
    paths = write_report(r, tmp_path, "many", None)
    assert set(paths) == {"json", "md"} and not (tmp_path / "confusion.png").exists()
    md = paths["md"].read_text()
    assert "## Weakest classes" in md and "Every video decoded" in md
    assert len(json.loads(paths["json"].read_text())["confusion"]) == c


def test_nothing_scored_gives_na_not_a_crash(tmp_path):
    acc = EvalAccumulator(3)
    acc.add(torch.tensor([0, -1]), torch.zeros(2, 3), torch.tensor([-1, -1]), torch.tensor([False, False]))
    r = acc.result()
    assert (r.count, r.top1, r.mean_class_accuracy, r.invalid) == (0, None, None, [0])
    md = write_report(r, tmp_path, "empty", {})["md"].read_text()
    assert "| 0 | n/a | n/a | n/a | 1 |" in md
