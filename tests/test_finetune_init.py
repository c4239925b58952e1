"""Starting weights of vmae-finetune: the authors' fine-tuned layout, their pretraining layout, a K710 -> K400
head sliced by class name, a UMT student, and the errors a wrong start gives (one line each)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import objective_sections, run, write_config
from official_videomae_v2 import PretrainVisionTransformer
from safetensors.torch import save_file

from vmae_ds.models import CheckpointError, create_classifier
from vmae_ds.models.init_weights import load_classifier_init


def _authors_finetuned(path, num_classes=5, seed=0):
    """A fine-tuned checkpoint as the authors save it: DeepSpeed's {'module': state} with their key names."""
    torch.manual_seed(seed)
    src = create_classifier("vit_tiny_debug", num_classes)
    torch.nn.init.normal_(src.head.weight)  # a trained head, not the tiny fresh one
    torch.save({"module": src.state_dict(), "epoch": 3}, path)
    return src


def test_authors_finetuned_layout_loads_whole(tmp_path):
    src = _authors_finetuned(tmp_path / "ft.pth")
    model = create_classifier("vit_tiny_debug", 5)
    lines = load_classifier_init(model, str(tmp_path / "ft.pth"))
    assert "videomae-finetune" in lines[0] and lines[-1] == "head: from the checkpoint"
    video = torch.randn(2, 3, 4, 32, 32)
    assert torch.equal(model.eval()(video), src.eval()(video))


def test_authors_pretraining_layout_gives_the_encoder_and_a_fresh_head(tmp_path):
    official = PretrainVisionTransformer(img_size=32, patch_size=8, encoder_embed_dim=48, encoder_depth=2,
                                         encoder_num_heads=3, decoder_num_classes=3 * 2 * 8 * 8, decoder_embed_dim=32,
                                         decoder_depth=1, decoder_num_heads=2, mlp_ratio=4.0, qkv_bias=True,
                                         tubelet_size=2, all_frames=4)
    torch.save({"model": official.state_dict()}, tmp_path / "pt.pth")
    model = create_classifier("vit_tiny_debug", 7)
    lines = load_classifier_init(model, str(tmp_path / "pt.pth"))
    assert lines[-1] == "head: fresh (the checkpoint has none)"
    ref = official.encoder.state_dict()
    assert torch.equal(model.blocks[1].attn.qkv.weight, ref["blocks.1.attn.qkv.weight"])
    assert model.head.weight.abs().max() < 1e-3  # the fresh, scaled-down head


def test_k710_head_sliced_to_k400_by_class_name(tmp_path):
    names = [f"class {i}" for i in range(5)]
    (tmp_path / "src.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "dst.csv").write_text("id,name\n0,Class_3\n1,class 0\n2,CLASS 4\n")  # another spelling
    src = _authors_finetuned(tmp_path / "ft.pth")
    from vmae_ds.engine.run_config import HeadMapConfig

    model = create_classifier("vit_tiny_debug", 3)
    lines = load_classifier_init(model, str(tmp_path / "ft.pth"),
                                 HeadMapConfig(source_classes=str(tmp_path / "src.txt"),
                                               target_classes=str(tmp_path / "dst.csv")))
    assert "3 rows sliced by class name" in lines[-1]
    assert torch.equal(model.head.weight, src.head.weight[[3, 0, 4]])
    assert torch.equal(model.head.bias, src.head.bias[[3, 0, 4]])


def test_a_head_of_other_classes_without_a_map_is_one_line(tmp_path):
    _authors_finetuned(tmp_path / "ft.pth")
    with pytest.raises(CheckpointError) as e:
        load_classifier_init(create_classifier("vit_tiny_debug", 3), str(tmp_path / "ft.pth"))
    msg = str(e.value)
    assert "\n" not in msg and "its head has 5 classes, this run 3" in msg and "init_head_map" in msg
    model = create_classifier("vit_tiny_debug", 3)
    assert load_classifier_init(model, str(tmp_path / "ft.pth"), fresh_head=True)[-1] == \
        "head: fresh (finetune.init_fresh_head)"
    wrong = create_classifier("vit_tiny_debug", 5, dim=96, num_heads=3)
    with pytest.raises(CheckpointError, match="does not fit the classifier"):
        load_classifier_init(wrong, str(tmp_path / "ft.pth"))


def test_a_umt_student_export_starts_a_classifier(tmp_path):
    from vmae_ds.models.umt import UMTStudent

    student = UMTStudent(img_size=32, patch_size=8, num_frames=8, tubelet_size=1, dim=48, depth=2, num_heads=3,
                         mlp_ratio=4.0, teacher_dim=48, align_layers=2)
    save_file(student.state_dict(), str(tmp_path / "umt.safetensors"))
    model = create_classifier("vit_tiny_debug", 4, num_frames=8, tubelet_size=1)
    load_classifier_init(model, str(tmp_path / "umt.safetensors"))
    assert torch.equal(model.blocks[0].mlp.fc1.weight, student.encoder.blocks[0].mlp.fc1.weight)


@pytest.mark.distributed
def test_vmae_finetune_starts_from_the_authors_checkpoint(tmp_path):
    _authors_finetuned(tmp_path / "ft.pth", num_classes=4)
    sections = objective_sections(tmp_path, "classify")
    sections["finetune"] = {**sections["finetune"], "init": str(tmp_path / "ft.pth")}
    cfg = write_config(tmp_path / "c.yaml", name="ft", output_dir=str(tmp_path / "runs"), optim={"max_steps": 2},
                       logging={"every_steps": 1, "tensorboard": False}, **sections)
    code, log = run("--config", str(cfg), log=tmp_path / "log.txt", entry="classify")
    assert code == 0, log[-3000:]
    assert f"initial weights: {tmp_path / 'ft.pth'} [videomae-finetune (in 'module')]" in log
    assert "head: from the checkpoint" in log and "done: 2 steps" in log

    # the run exports to a transformers folder that predicts what the trained classifier predicts
    import transformers

    from vmae_ds.export import consolidate, find_checkpoint
    from vmae_ds.export import main as export_main

    assert export_main([str(tmp_path / "runs" / "ft"), str(tmp_path / "hf"), "--format", "hf"]) == 0
    hf = transformers.VideoMAEForVideoClassification.from_pretrained(str(tmp_path / "hf")).eval()
    ours = create_classifier("vit_tiny_debug", 4)
    ours.load_state_dict(consolidate(find_checkpoint(tmp_path / "runs" / "ft")))
    video = torch.randn(2, 3, 4, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=video.transpose(1, 2)).logits, ours.eval()(video),
                                   atol=1e-4, rtol=1e-4)
