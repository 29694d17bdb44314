"""`pas pretrain --import`, executed: checkpoints under the names they are published with (the official
RepVGG repository's training form with a DistributedDataParallel `module.` prefix inside a
`state_dict` wrapper, timm's, torchvision's) go into the backbone on an ImageNet-shaped folder.

The oracle is always the network that wrote the file: after the import, our network (built from the
stage's output weights) gives the source network's outputs. ImageNet weights on a data set with
another class count load with a fresh classifier: every other tensor is the checkpoint's (the source
network with our classifier copied in gives our outputs), said in one log line and in the run record.
"""
from __future__ import annotations

import json

import pytest
import timm
import torch
import torchvision

from pas.cli import main as pas_main
from pas.models import build
from tests.helpers import imagenet_folder
from tests.test_checkpoints import OfficialRepVGG, randomize_

CLASSES = 4
RES = 32  # the `imagenet` transforms at 32 px: the names and shapes are what is tested here


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return imagenet_folder(tmp_path_factory.mktemp("imagenet"), CLASSES, 2, 1)


def run_pretrain(tmp_path, data, backbone, checkpoint, *, epochs=0):
    """`pas pretrain --import` in process (the CLI's own entry point); the weights it wrote."""
    out = tmp_path / "pretrain"
    argv = ["pretrain", "--set", f"backbone={backbone}", "--set", "dataset.name=imagenet",
            "--set", f"dataset.root={data}", "--set", f"dataset.resize={RES}", "--set", f"epochs={epochs}",
            "--set", "batch_size=4", "--set", "tracking.enabled=false", "--set", "threads=1",
            "--import", str(checkpoint), "--out-weights", str(out / "weights.pt"),
            "--out-metrics", str(out / "metrics.json")]
    assert pas_main(argv) == 0
    model = build(backbone, num_classes=CLASSES, resolution=RES)
    model.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
    record = json.loads((out / "metrics.run.json").read_text())
    return model.eval(), record


def same_outputs(ours, theirs, what):
    x = torch.randn(2, 3, RES, RES, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(x), theirs.eval()(x)
    err = float((a - b).abs().max() / b.abs().max())
    assert err < 1e-5, f"{what}: relative error {err:.1e}"


def official_a0(num_classes):
    return OfficialRepVGG((2, 4, 14, 1), (0.75, 0.75, 0.75, 2.5), num_classes=num_classes)


def test_official_training_names_with_module_prefix_in_a_state_dict_wrapper(tmp_path, data):
    theirs = randomize_(official_a0(CLASSES), seed=5)
    assert "stage0.rbr_dense.conv.weight" in theirs.state_dict() and "linear.weight" in theirs.state_dict()
    path = tmp_path / "RepVGG-A0-train.pth"
    torch.save({"epoch": 120, "state_dict": {f"module.{k}": v for k, v in theirs.state_dict().items()}}, path)
    ours, record = run_pretrain(tmp_path, data, "repvgg_a0", path)
    same_outputs(ours, theirs, "official names")
    assert record["tags"]["import.format"] == "official"
    assert record["tags"]["import.new_classifier"] == ""


def test_torchvision_names(tmp_path, data):
    for backbone, make in (("resnet18", torchvision.models.resnet18),
                           ("mobilenetv2_100", torchvision.models.mobilenet_v2)):
        theirs = randomize_(make(num_classes=CLASSES), seed=6)
        path = tmp_path / f"{backbone}.pth"
        torch.save(theirs.state_dict(), path)
        ours, record = run_pretrain(tmp_path / backbone, data, backbone, path)
        same_outputs(ours, theirs, f"torchvision {backbone}")


def test_imagenet_checkpoint_on_another_class_count_gets_a_new_classifier(tmp_path, data, capfd):
    theirs = randomize_(timm.create_model("repvgg_a0", pretrained=False, num_classes=1000), seed=7)
    path = tmp_path / "repvgg_a0_timm_in1k.pth"
    torch.save(theirs.state_dict(), path)
    ours, record = run_pretrain(tmp_path, data, "repvgg_a0", path)

    log = capfd.readouterr().err
    lines = [line for line in log.splitlines() if "classifier" in line]
    assert len(lines) == 1 and "1000 classes" in lines[0] and f"the data {CLASSES}" in lines[0], log[-2000:]
    assert record["tags"]["import.format"] == "timm"
    assert (record["tags"]["import.new_classifier"], record["tags"]["import.checkpoint_classes"]) == ("fc", "1000")
    # Every tensor but the classifier is the checkpoint's: timm's network with our classifier in
    # place of its own computes our outputs.
    reference = timm.create_model("repvgg_a0", pretrained=False, num_classes=CLASSES)
    state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("head.fc.")}
    state |= {"head.fc.weight": ours.fc.weight, "head.fc.bias": ours.fc.bias}
    reference.load_state_dict(state)
    same_outputs(ours, reference, "timm names, new classifier")
    assert not torch.allclose(ours.fc.weight, theirs.head.fc.weight[:CLASSES])  # a fresh one, not a slice


def test_new_classifier_is_trained_on_the_data(tmp_path, data):
    theirs = randomize_(torchvision.models.resnet18(num_classes=1000), seed=8)
    path = tmp_path / "resnet18-in1k.pth"
    torch.save(theirs.state_dict(), path)
    _, record = run_pretrain(tmp_path, data, "resnet18", path, epochs=1)
    metrics = json.loads((tmp_path / "pretrain" / "metrics.json").read_text())
    assert [row["epoch"] for row in metrics["history"]] == [1]  # trained, not only evaluated
    assert record["tags"]["import.new_classifier"] == "fc"


def test_any_other_shape_mismatch_stays_an_error(tmp_path, data, capsys):
    theirs = timm.create_model("repvgg_a1", pretrained=False, num_classes=1000)  # wider than A0
    path = tmp_path / "repvgg_a1.pth"
    torch.save(theirs.state_dict(), path)
    argv = ["pretrain", "--set", "backbone=repvgg_a0", "--set", "dataset.name=imagenet",
            "--set", f"dataset.root={data}", "--set", f"dataset.resize={RES}", "--set", "tracking.enabled=false",
            "--import", str(path), "--out-weights", str(tmp_path / "w.pt"), "--out-metrics", str(tmp_path / "m.json")]
    assert pas_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stem.conv_kxk.conv.weight" in err[0] and "expected (48, 3, 3, 3)" in err[0], err
    assert not (tmp_path / "w.pt").exists() and not (tmp_path / "m.json").exists()
