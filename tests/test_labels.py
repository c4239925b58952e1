"""Label maps, class-name files, K710 -> K400 head slicing, and labelled shard builds on real H.264 clips."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
from data_helpers import run_cli

from data_tools.build import BuildError, build_shards
from data_tools.manifest import ClipRow, ManifestError, write_manifest
from data_tools.synth import make_videos
from vmae_ds.data.labels import (
    LabelError,
    LabelMap,
    head_index_map,
    normalize_class_name,
    read_class_names,
    slice_head,
)
from vmae_ds.models import create_classifier

# Real Kinetics class names, spelled as in different releases / tools.
K400_STYLE = ["abseiling", "passing American football (in game)", "passing American football (not in game)",
              "massaging person's head", "riding a bike", "zumba"]


def test_label_map_round_trip_and_lookup(tmp_path):
    labels = LabelMap(K400_STYLE)
    path = labels.save(tmp_path / "labels.json")
    doc = json.loads(path.read_text())
    assert doc["format"] == "vmae_ds-labels-v1" and doc["classes"] == K400_STYLE
    back = LabelMap.load(path)
    assert back == labels and back.classes == K400_STYLE and len(back) == 6
    assert LabelMap.from_file(path) == labels
    assert labels.index("riding a bike") == 4 and labels.name(4) == "riding a bike"
    assert labels.index("Passing_American_Football_(Not_In_Game)") == 2  # normalised lookup
    with pytest.raises(LabelError, match="unknown class 'riding a bicycle'.*did you mean 'riding a bike'"):
        labels.index("riding a bicycle")
    with pytest.raises(LabelError, match=r"class id 6 is outside \[0, 6\)"):
        labels.name(6)
    (tmp_path / "other.json").write_text('{"format": "something-else", "classes": ["a"]}')
    with pytest.raises(LabelError, match="other.json: not a vmae_ds labels file"):
        LabelMap.load(tmp_path / "other.json")


def test_label_map_refuses_names_equal_after_normalisation():
    with pytest.raises(LabelError, match="class 2 'Riding_A_Bike' duplicates class 0 'riding a bike'"):
        LabelMap(["riding a bike", "zumba", "Riding_A_Bike"])


def test_from_dirs_sorts_and_deduplicates():
    assert LabelMap.from_dirs(["walk", "run", "walk", "Swim"]).classes == ["Swim", "run", "walk"]


@pytest.mark.parametrize("text", [
    # one name per line, blank lines ignored
    "abseiling\n\npassing American football (in game)\npassing American football (not in game)\n"
    "massaging person's head\nriding a bike\n\nzumba\n",
    # Kinetics' csv: header, id,name, a quoted name, ids out of order
    'id,name\n0,abseiling\n2,passing American football (not in game)\n1,"passing American football (in game)"\n'
    "3,massaging person's head\n4,riding a bike\n5,zumba\n",
    # name,id without header
    "zumba,5\nabseiling,0\npassing American football (in game),1\npassing American football (not in game),2\n"
    "massaging person's head,3\nriding a bike,4\n",
    # tab separated id<TAB>name
    "0\tabseiling\n1\tpassing American football (in game)\n2\tpassing American football (not in game)\n"
    "3\tmassaging person's head\n4\triding a bike\n5\tzumba\n",
], ids=["plain", "id_name_header", "name_id", "tabs"])
def test_class_name_files_in_every_layout(tmp_path, text):
    (tmp_path / "names.txt").write_text(text)
    assert read_class_names(tmp_path / "names.txt") == K400_STYLE
    assert LabelMap.from_file(tmp_path / "names.txt").classes == K400_STYLE


def test_class_name_json_variants(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(K400_STYLE))
    (tmp_path / "ssv2.json").write_text(json.dumps({n: str(i) for i, n in reversed(list(enumerate(K400_STYLE)))}))
    assert LabelMap.from_file(tmp_path / "list.json").classes == K400_STYLE
    assert LabelMap.from_file(tmp_path / "ssv2.json").classes == K400_STYLE


@pytest.mark.parametrize("text,message", [
    ("walk\nrun\n\nwalk\n", r"names.txt:4: duplicate class name 'walk' \(first on line 1\)"),
    ("walk\nrun\nRun\n", r"names.txt:3: duplicate class name 'Run' \(first on line 2\)"),
    ("0,walk\n1,run\n1,swim\n", r"names.txt:3: id 1 repeated \(first on line 2\)"),
    ("id,name\n0,walk\n1,run\n0,walk\n", r"names.txt:4: id 0 repeated"),
    ("0,walk\n1,run\n3,swim\n", r"names.txt: class ids must run 0..2 without gaps; missing 2"),
    ("0,walk\nrun\n", r"names.txt:2: expected 'id,name' like line 1, got 'run'"),
    ("walk\n5,run\n", r"names.txt:2: expected a plain name like line 1, got '5,run'"),
    ("\n\n", r"names.txt: no class names"),
])
def test_bad_class_name_files_name_file_and_line(tmp_path, text, message):
    (tmp_path / "names.txt").write_text(text)
    with pytest.raises(LabelError, match=message):
        read_class_names(tmp_path / "names.txt")


def test_normalisation_matches_kinetics_spellings():
    a, b = "passing American football (in game)", "passing_american_football_(in_game)"
    assert normalize_class_name(a) == normalize_class_name(b) == "passing american football in game"
    assert normalize_class_name('"massaging person\'s head"') == normalize_class_name("massaging persons head")
    assert normalize_class_name("  Riding  a\tBike ") == "riding a bike"
    assert normalize_class_name(a) != normalize_class_name("passing American football (not in game)")


def _k710_and_k400() -> tuple[LabelMap, LabelMap, list[int]]:
    """A 12-class 'K710' list and a 5-class 'K400' list spelled differently, with the rows to pick by hand."""
    k710 = LabelMap(["zumba", "abseiling", "dancing ballet", "passing American football (in game)",
                     "passing American football (not in game)", "riding a bike", "massaging person's head",
                     "surfing water", "yoga", "tai chi", "juggling balls", "playing cards"])
    k400 = LabelMap(["abseiling", "massaging persons head", "passing_american_football_(in_game)",
                     "Riding A Bike", "zumba"])
    return k710, k400, [1, 6, 3, 5, 0]  # read off the lists above


def test_k710_head_slices_to_k400_rows_and_logits():
    k710, k400, expected = _k710_and_k400()
    index = head_index_map(k710, k400)
    assert index == expected
    torch.manual_seed(0)
    src = create_classifier("vit_tiny_debug", num_classes=len(k710), attention="math").eval()
    with torch.no_grad():  # the fine-tuning init scales the head by 0.001: make rows clearly different
        src.head.weight.normal_()
        src.head.bias.normal_()
    dst = create_classifier("vit_tiny_debug", num_classes=len(k400), attention="math").eval()
    weight, bias = slice_head(src.head.weight, src.head.bias, index)
    assert weight.shape == (5, src.head.weight.shape[1]) and not weight.requires_grad
    state = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    dst.load_state_dict(state | {"head.weight": weight, "head.bias": bias})
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        full, sliced = src(video), dst(video)
    torch.testing.assert_close(sliced, full[:, expected])  # every K400 logit is its K710 class's logit


def test_missing_target_classes_are_listed_and_aliases_fix_renames():
    k710, k400, _ = _k710_and_k400()
    renamed = LabelMap([*k400.classes, "dyeing hair"])
    with pytest.raises(LabelError, match=r"^1 of 6 target classes are not in the source label map \(12 classes\): "
                                         r"'dyeing hair'; give"):
        head_index_map(k710, renamed)
    assert head_index_map(k710, renamed, aliases={"Dyeing Hair": "dancing ballet"})[-1] == 2
    many = LabelMap([f"class {i}" for i in range(13)])
    with pytest.raises(LabelError, match=r"13 of 13 .*'class 9', \.\.\. \(\+3 more\)"):
        head_index_map(k710, many)


def test_slice_head_checks_shapes_and_rows():
    w, b = torch.arange(12.0).view(4, 3), torch.arange(4.0)
    pw, pb = slice_head(w, b, [3, 0])
    assert pw.tolist() == [[9.0, 10.0, 11.0], [0.0, 1.0, 2.0]] and pb.tolist() == [3.0, 0.0]
    assert slice_head(w, None, [1])[1] is None
    with pytest.raises(LabelError, match=r"rows 4 are outside the source head's \[0, 4\)"):
        slice_head(w, b, [0, 4])
    with pytest.raises(LabelError, match="bias shape"):
        slice_head(w, torch.zeros(3), [0])


# ---- labelled shard builds (real clips) ----

CLASSES = ["abseiling", "passing American football (in game)", "riding a bike"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> list[Path]:
    return make_videos(tmp_path_factory.mktemp("label_clips"), 5, frames=20, size=(48, 64), fps=25, seed=3)


def _samples(folder: Path) -> list[dict]:
    metas = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            metas += [json.loads(t.extractfile(m).read()) for m in t.getmembers() if m.name.endswith(".json")]
    return metas


def test_string_labels_with_label_map_become_ids(clips, tmp_path):
    (tmp_path / "k400_labels.csv").write_text("id,name\n" + "".join(f'{i},"{n}"\n' for i, n in enumerate(CLASSES)))
    names = ["riding a bike", "passing_american_football_(in_game)", "abseiling", "riding a bike", "abseiling"]
    write_manifest([ClipRow(path=str(p), source="k400", label=n) for p, n in zip(clips, names)],
                   tmp_path / "m.jsonl")
    out = tmp_path / "shards"
    res = run_cli("build", "--manifest", str(tmp_path / "m.jsonl"), "--out", str(out), "--label-map",
                  str(tmp_path / "k400_labels.csv"), "--workers", "0", "--shard-size", "2", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "labels: 3 classes from" in res.stdout and "written 5 + skipped 0 = 5" in res.stdout
    assert json.loads((out / "labels.json").read_text())["classes"] == CLASSES
    index = json.loads((out / "index.json").read_text())
    assert index["labels"] == "labels.json" and index["num_classes"] == 3
    assert index["settings"]["labels"].startswith("3 classes, sha256 ")
    by_path = {m["path"]: m for m in _samples(out)}
    assert len(by_path) == 5
    for p, n in zip(clips, names):
        meta = by_path[str(p)]
        expected = CLASSES.index("passing American football (in game)" if "american" in n else n)
        assert meta["label"] == expected and isinstance(meta["label"], int)
        assert meta["label_name"] == CLASSES[expected]
    again = build_shards(tmp_path / "m.jsonl", out, shard_size=2, workers=0, label_map=LabelMap(CLASSES),
                         progress=False)  # the same map (here as an object): a finished build, left alone
    assert again.written == 5 and json.loads((out / "index.json").read_text())["num_classes"] == 3
    # The same folder with another map (same size, other order) is refused: ids would mean other classes.
    (tmp_path / "other.txt").write_text("\n".join(reversed(CLASSES)) + "\n")
    with pytest.raises(BuildError, match="labels: '3 classes, sha256 "):
        build_shards(tmp_path / "m.jsonl", out, shard_size=2, workers=0, label_map=tmp_path / "other.txt",
                     progress=False)


def test_unknown_label_name_stops_before_writing_and_names_the_row(clips, tmp_path):
    (tmp_path / "names.txt").write_text("\n".join(CLASSES) + "\n")
    rows = "".join(f"{p},{n}\n" for p, n in zip(clips, ["abseiling", "riding a bike", "ridin a bike", "zumba"]))
    (tmp_path / "m.csv").write_text("path,label\n" + rows)
    out = tmp_path / "never"
    res = run_cli("build", "--manifest", str(tmp_path / "m.csv"), "--out", str(out), "--class-names",
                  str(tmp_path / "names.txt"), "--workers", "0", "--quiet")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "m.csv:4: unknown label 'ridin a bike', not among the 3 classes" in res.stderr
    assert "did you mean 'riding a bike'" in res.stderr
    assert not out.exists()
    with pytest.raises(ManifestError, match="m.csv:4: unknown label 'ridin a bike'"):
        build_shards(tmp_path / "m.csv", out, label_map=LabelMap(CLASSES), progress=False)
    assert not out.exists()


def test_integer_labels_are_checked_against_the_class_names(clips, tmp_path):
    (tmp_path / "names.txt").write_text("\n".join(CLASSES) + "\n")
    (tmp_path / "train.txt").write_text(f"{clips[0]} 2\n{clips[1]} 3\n")  # the authors' `path label` list
    with pytest.raises(ManifestError, match=r"train.txt:2: label 3 is outside \[0, 3\)"):
        build_shards(tmp_path / "train.txt", tmp_path / "o", label_map=tmp_path / "names.txt", progress=False)
    (tmp_path / "train.txt").write_text(f"{clips[0]} 2\n{clips[1]} 0\n")
    build_shards(tmp_path / "train.txt", tmp_path / "o", label_map=tmp_path / "names.txt", workers=0,
                 progress=False)
    assert sorted((m["label"], m["label_name"]) for m in _samples(tmp_path / "o")) == \
        [(0, "abseiling"), (2, "riding a bike")]


def test_class_name_labels_without_a_map_and_rows_without_label_are_refused(clips, tmp_path):
    write_manifest([ClipRow(path=str(clips[0]), label="abseiling")], tmp_path / "m.jsonl")
    with pytest.raises(ManifestError, match="m.jsonl:1: label 'abseiling' is a class name, but no label map"):
        build_shards(tmp_path / "m.jsonl", tmp_path / "o", progress=False)
    write_manifest([ClipRow(path=str(clips[0]), label=1), ClipRow(path=str(clips[1]))], tmp_path / "n.jsonl")
    with pytest.raises(ManifestError, match="n.jsonl:2: no label, but the build has a label map"):
        build_shards(tmp_path / "n.jsonl", tmp_path / "o", label_map=LabelMap(CLASSES), progress=False)
    assert not (tmp_path / "o").exists()


def test_unlabelled_build_has_no_label_fields(clips, tmp_path):
    write_manifest([ClipRow(path=str(p)) for p in clips[:2]], tmp_path / "m.jsonl")
    build_shards(tmp_path / "m.jsonl", tmp_path / "o", workers=0, progress=False)
    index = json.loads((tmp_path / "o" / "index.json").read_text())
    assert "labels" not in index and "num_classes" not in index and "labels" not in index["settings"]
    assert not (tmp_path / "o" / "labels.json").exists()
    assert [m["label"] for m in _samples(tmp_path / "o")] == [None, None]
    assert all("label_name" not in m for m in _samples(tmp_path / "o"))


def test_labels_from_dirs_manifest_to_shards_keeps_folder_names(clips, tmp_path):
    folders = {"walk the dog": clips[:2], "Swim": clips[2:3], "run": clips[3:5]}
    for name, paths in folders.items():
        (tmp_path / "vids" / name).mkdir(parents=True)
        for p in paths:
            shutil.copy(p, tmp_path / "vids" / name / p.name)
    res = run_cli("manifest", str(tmp_path / "vids"), "--out", str(tmp_path / "m.jsonl"), "--labels-from-dirs")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "m.labels.json").is_file() and "3 class names" in res.stdout
    build_shards(tmp_path / "m.jsonl", tmp_path / "o", shard_size=2, workers=0, progress=False)
    assert LabelMap.load(tmp_path / "o" / "labels.json").classes == sorted(folders)
    metas = _samples(tmp_path / "o")
    assert len(metas) == 5
    for m in metas:
        folder = Path(m["path"]).parent.name
        assert m["label_name"] == folder and m["label"] == sorted(folders).index(folder)
