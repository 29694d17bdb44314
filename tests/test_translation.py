"""Image-to-image translation (pas.translation): CycleGAN's generator and discriminator against
CycleGAN's and GAN Compression's published sizes, the contour domain against scipy, the unpaired
split, an exact resume of the CycleGAN trainer, and the stages end to end on a tiny run: PaS and the
baselines land on the target (ptflops on the compact generator), the deployed ONNX generator gives
the compact PyTorch generator's images, and evaluate's L1/PSNR/top-1 agree with a recomputation from
ONNX Runtime's outputs in NumPy."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import ndimage

from pas.data import load_data
from pas.engine import OptimConfig
from pas.errors import PasError
from pas.flops import ptflops_macs
from pas.models import arch_for, build
from pas.models.generator import PatchDiscriminator, ResnetGenerator
from pas.translation import (CycleGAN, CycleGANTrainer, UnpairedLoader, contours, translation_data)

CYCLEGAN_256 = dict(num_classes=3, in_channels=3, resolution=256)


def test_resnet_generator_matches_cyclegans_published_size_and_gan_compressions_macs():
    # CycleGAN prints "[Network G_A] Total number of parameters : 11.378 M" for resnet_9blocks
    # (3 -> 3 channels, 64 filters) and "[Network D_A] ... 2.765 M" for the 70x70 PatchGAN.
    g = ResnetGenerator(in_channels=3, out_channels=3, filters=64, blocks=9)
    assert round(sum(p.numel() for p in g.parameters()) / 1e6, 3) == 11.378
    assert round(sum(p.numel() for p in PatchDiscriminator(in_channels=3).parameters()) / 1e6, 3) == 2.765
    net = arch_for("resnet_generator", **CYCLEGAN_256)
    assert net.params() == sum(p.numel() for p in g.parameters())
    # MACs by hand at 256x256 (stem and last 7x7 at 256^2, downs and the 18 block convs at their
    # outputs, the two transposed convs at their inputs (64^2 and 128^2)
    stem = 3 * 64 * 49 * 256 ** 2
    downs = 64 * 128 * 9 * 128 ** 2 + 128 * 256 * 9 * 64 ** 2
    blocks = 18 * 256 * 256 * 9 * 64 ** 2
    ups = 256 * 128 * 9 * 64 ** 2 + 128 * 64 * 9 * 128 ** 2
    last = 64 * 3 * 49 * 256 ** 2
    assert net.macs() == stem + downs + blocks + ups + last == 49_551_507_456
    # GAN Compression's 56.8 G counts the transposed convs at their output size, 4x as many pixels
    assert round((net.macs() + 3 * ups) / 1e9, 1) == 56.8
    assert ptflops_macs(build("resnet_generator", **CYCLEGAN_256), 3, 256) == net.macs()


def test_generators_search_every_conv_but_the_one_writing_the_image():
    plain = arch_for("resnet_generator_mini", num_classes=1, in_channels=1, resolution=28)
    # stem, two downs, the trunk (down 2 + every block's output), 3 block convs, two ups
    assert plain.full_widths() == [16, 32, 64, 64, 64, 64, 32, 16]
    mobile = arch_for("mobile_resnet_generator_mini", num_classes=1, in_channels=1, resolution=28)
    assert mobile.full_widths() == [16, 32, 64, 64, 64, 64, 32, 16]
    assert mobile.macs() < plain.macs() / 2  # separable blocks
    assert ptflops_macs(build("mobile_resnet_generator_mini", num_classes=1, in_channels=1, resolution=28),
                        1, 28) == mobile.macs()


def test_contours_are_the_morphological_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 12, 12, generator=g)
    expected = [ndimage.grey_dilation(a[0], size=3, mode="nearest") - ndimage.grey_erosion(a[0], size=3, mode="nearest")
                for a in x.numpy()]
    assert np.allclose(contours(x)[:, 0].numpy(), np.stack(expected), atol=1e-6)
    square = torch.zeros(1, 1, 9, 9)
    square[..., 2:7, 2:7] = 1  # 5x5: the ring between its 7x7 dilation and 3x3 erosion
    assert int(contours(square).sum()) == 49 - 9


def _domains(max_train=40, max_val=20):
    train, val, info = load_data("animal_mnist", augment=False, max_train=max_train, max_val=max_val)
    return translation_data(train, val, info, split_seed=0), train, val, info


def _key(image01: torch.Tensor) -> bytes:
    """An image in [0, 1] made of the data's 8-bit levels, as exact bytes."""
    return torch.round(image01 * 255).to(torch.int16).numpy().tobytes()


def test_training_is_unpaired_and_validation_is_paired():
    data, train, _, info = _domains()
    unit = (train.images * info.std[0] + info.mean[0]).clamp(0, 1)
    every = {_key(contours(x[None])[0]) for x in unit}
    seen_a = {_key((a + 1) / 2) for a in data.train_a}
    # the contour of each image seen as a silhouette: none of them is among the contours G translates
    of_b = {_key(contours(((b + 1) / 2)[None])[0]) for b in data.train_b}
    assert len(seen_a) == len(of_b) == 20
    assert not seen_a & of_b
    assert seen_a | of_b == every  # every training image in exactly one domain
    assert torch.allclose(data.val_a, contours((data.val_b + 1) / 2) * 2 - 1)
    assert data.val_a.min() >= -1 and data.val_b.max() <= 1


def test_translation_refuses_data_it_cannot_make_domains_of():
    train, val, info = load_data("animal_mnist", augment=False, max_train=20, max_val=10, resize=30)
    with pytest.raises(PasError, match="multiple of 4"):
        translation_data(train, val, info, split_seed=0)
    with pytest.raises(PasError, match="not an image generator"):
        from pas.translation import build_cyclegan
        build_cyclegan("repvgg_a0_mini", channels=1, resolution=28)


def _cyclegan(seed=0):
    torch.manual_seed(seed)
    return CycleGAN(build("resnet_generator_mini", num_classes=1, in_channels=1, resolution=28),
                    build("resnet_generator_mini", num_classes=1, in_channels=1, resolution=28),
                    PatchDiscriminator(in_channels=1, filters=8, layers=2),
                    PatchDiscriminator(in_channels=1, filters=8, layers=2))


def test_cyclegan_trainer_resumes_exactly(tmp_path):
    data, *_ = _domains(max_train=32)

    class Killed(Exception):
        pass

    def kill(epoch, row):
        raise Killed

    def trainer(model, state, on_epoch=None):
        return CycleGANTrainer(model, train_loader=lambda e: UnpairedLoader(data.train_a, data.train_b, batch_size=8,
                                                                            seed=0, epoch=e),
                               epochs=2, optim=OptimConfig(lr=2e-4), seed=0, state_path=state, on_epoch=on_epoch)
    straight = _cyclegan()
    trainer(straight, tmp_path / "a.pt").fit()
    with pytest.raises(Killed):  # after the first epoch's state is written
        trainer(_cyclegan(), tmp_path / "b.pt", on_epoch=kill).fit()
    again = _cyclegan(seed=1)  # other initial weights: everything must come from the state file
    rows = trainer(again, tmp_path / "b.pt").fit()
    assert len(rows) == 2
    for (k, a), b in zip(straight.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    assert not torch.equal(straight.d_a.model[0].weight, _cyclegan().d_a.model[0].weight)  # it did train


def _pas(*args):
    return subprocess.run([sys.executable, "-m", "pas.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """pretrain (CycleGAN and a classifier) -> search / uniform / l1 -> finetune -> deploy -> evaluate,
    tiny, through the CLI."""
    d = tmp_path_factory.mktemp("translation")
    cfg = d / "cfg.yaml"
    cfg.write_text("task: translation\nbackbone: resnet_generator_mini\nepochs: 1\nbatch_size: 16\nthreads: 1\n"
                   "dataset: {max_train: 96, max_val: 40}\noptim: {lr: 0.0005, weight_decay: 0.0}\n"
                   "tracking: {enabled: false}\nsearch: {target: 40%}\nevaluate: {batch_sizes: [], repeats: 1}\n")
    run = [("pretrain", "--out-weights", d / "pre.pt", "--out-metrics", d / "pre.json"),
           ("pretrain", "--set", "task=classification", "--set", "backbone=repvgg_a0_mini", "--set", "optim.lr=0.1",
            "--out-weights", d / "cls.pt", "--out-metrics", d / "cls.json"),
           ("search", "--weights", d / "pre.pt", "--set", "optim.gate_lr_scale=100", "--out-weights", d / "s.pt",
            "--out-masks", d / "pas.json", "--out-history", d / "h.json", "--out-metrics", d / "s.json")]
    for method in ("uniform", "l1"):
        run.append(("prune", "--weights", d / "pre.pt", "--set", f"search.method={method}",
                    "--out-masks", d / f"{method}.json"))
    run.append(("finetune", "--weights", d / "s.pt", "--masks", d / "pas.json", "--out-weights", d / "f.pt",
                "--out-metrics", d / "f.json"))
    run.append(("deploy", "--weights", d / "f.pt", "--masks", d / "pas.json", "--out-dir", d / "deploy"))
    run.append(("evaluate", "--arch", d / "deploy" / "arch.json", "--weights", d / "deploy" / "model.safetensors",
                "--set", f"translation.classifier={d / 'cls.pt'}", "--set", "translation.classifier_backbone=repvgg_a0_mini",
                "--out", d / "eval" / "eval.json"))
    for stage, *args in run:
        r = _pas(stage, "--config", cfg, *args)
        assert r.returncode == 0, f"pas {stage}: {r.stderr[-3000:]}"
    return d


def test_pas_and_baselines_land_on_the_generators_target(stages):
    from pas.compact import compact
    from pas.gates import set_masks
    full = arch_for("resnet_generator_mini", num_classes=1, in_channels=1, resolution=28).macs()
    for method in ("pas", "uniform", "l1"):
        rec = json.loads((stages / f"{method}.json").read_text())
        model = build("resnet_generator_mini", num_classes=1, in_channels=1, resolution=28)
        set_masks(model, [torch.tensor(m, dtype=torch.bool) for m in rec["masks"]])
        measured = ptflops_macs(compact(model.eval()), 1, 28)
        assert measured == rec["macs"], method
        assert 0.99 * 0.4 * full <= measured <= 0.4 * full, method


def test_deployed_generator_and_its_metrics_agree_with_onnxruntime(stages):
    import onnxruntime as ort
    from PIL import Image

    from pas.deploy import load_deployed
    ev = json.loads((stages / "eval" / "eval.json").read_text())
    data, _, _, info = _domains(max_train=96, max_val=40)
    session = ort.InferenceSession(str(stages / "deploy" / "model.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: data.val_a.numpy()})[0]
    model = load_deployed(stages / "deploy" / "arch.json", stages / "deploy" / "model.safetensors")
    with torch.no_grad():
        assert np.allclose(out, model(data.val_a).numpy(), atol=1e-5)
    pred = (np.clip(out, -1, 1) + 1) / 2
    truth = (data.val_b.numpy() + 1) / 2
    assert np.isclose(ev["val_l1"], np.abs(pred - truth).mean(), rtol=1e-4)
    psnr = np.mean([10 * np.log10(1 / np.mean((p - t) ** 2)) for p, t in zip(pred, truth)])
    assert np.isclose(ev["psnr"], psnr, rtol=1e-4)
    # the classifier's top-1 on the translations, and at both ends (true silhouettes, raw contours)
    classifier = build("repvgg_a0_mini", num_classes=10, in_channels=1, resolution=28)
    classifier.load_state_dict(torch.load(stages / "cls.pt", weights_only=True))
    classifier.eval()
    mean, std = info.mean[0], info.std[0]
    with torch.no_grad():
        logits = classifier((torch.from_numpy(pred).float() - mean) / std)
        real = classifier(((data.val_b + 1) / 2 - mean) / std)
    assert ev["top1"] == pytest.approx(100 * float((logits.argmax(1) == data.val_labels).float().mean()))
    assert ev["top1_silhouettes"] == pytest.approx(100 * float((real.argmax(1) == data.val_labels).float().mean()))
    # samples.png: the first 8 contours, their translations (as ONNX Runtime gives them), the silhouettes
    grid = np.asarray(Image.open(stages / "eval" / "samples.png"))
    assert grid.shape == (3 * 28, 8 * 28)
    row = np.concatenate(list(np.round((np.clip(out[:8, 0], -1, 1) + 1) * 127.5)), axis=1)
    assert np.abs(grid[28:56].astype(int) - row).max() <= 1


def test_samples_figure_and_its_bad_input(stages, tmp_path):
    png = stages / "eval" / "samples.png"
    r = _pas("samples", "--model", f"PaS={png}", "--model", f"again={png}", "--out", tmp_path / "t.png")
    assert r.returncode == 0, r.stderr
    from PIL import Image
    assert Image.open(tmp_path / "t.png").size[0] > 100
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    r = _pas("samples", "--model", f"PaS={bad}", "--out", tmp_path / "u.png")
    assert r.returncode == 2 and "cannot be read" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "u.png").exists()


def test_translation_stage_refuses_a_classifier_backbone_and_another_dataset(tmp_path):
    r = _pas("pretrain", "--set", "task=translation", "--set", "backbone=repvgg_a0_mini", "--set", "epochs=0",
             "--set", "tracking.enabled=false", "--out-weights", tmp_path / "w.pt", "--out-metrics", tmp_path / "m.json")
    assert r.returncode == 2 and "not an image generator" in r.stderr
    r = _pas("pretrain", "--set", "task=translate", "--out-weights", tmp_path / "w.pt", "--out-metrics", tmp_path / "m.json")
    assert r.returncode == 2 and "'task' must be one of classification, translation" in r.stderr
    assert not (tmp_path / "w.pt").exists()


# -- the workflow: config/test_translation.yaml's whole DAG ---------------------------------------------

@pytest.mark.slow
def test_translation_workflow_runs_end_to_end(tmp_path):
    from tests.test_workflow import ROOT, main_table, run_whole_dag
    run_whole_dag(tmp_path, ROOT / "config" / "test_translation.yaml", "translation")
    rows = {(r["method"], r["model"]): r for r in main_table(tmp_path)}
    assert set(rows) == {("pas", "PaS-G50"), ("uniform", "uniform@PaS-G50"), ("l1", "l1@PaS-G50"),
                         ("full", "resnet_generator_mini")}
    full = arch_for("resnet_generator_mini", num_classes=1, in_channels=1, resolution=28).macs()
    for (method, model), r in rows.items():
        assert int(r["macs"]) == int(r["macs_ptflops"]), model  # the compact generator, counted by ptflops
        if method != "full":
            assert 0.99 * full / 2 <= int(r["macs"]) <= full / 2, model
        assert 0 <= float(r["top1"]) <= 100 and 0 < float(r["val_l1"]) < 1 and float(r["psnr"]) > 0
        ev = json.loads((tmp_path / "results" / "seed0" / "models" / method / model.split("@")[-1] /
                         "eval.json").read_text())
        assert float(r["psnr"]) == pytest.approx(ev["psnr"]) and float(r["top1"]) == pytest.approx(ev["top1"])
    md = (tmp_path / "results" / "tables" / "main.md").read_text()
    assert "PSNR dB" in md and "L1" in md
    from PIL import Image
    figure = Image.open(tmp_path / "results" / "plots" / "samples.png")
    assert figure.size[1] > figure.size[0] / 8  # six rows: contours, four generators, silhouettes
