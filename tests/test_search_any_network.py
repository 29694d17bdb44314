"""Real, short PaS searches beyond the hand-written families: a ResNet mini member built by name,
and a plain torchvision ResNet-18 through the Python API. On target, and above chance after
fine-tuning (digits: 10 classes, chance 10%)."""
import torch
import torchvision

import pas.models as M
from pas.compact import compact
from pas.data import load_data, make_loader
from pas.engine import OptimConfig, Trainer, evaluate
from pas.flops import ptflops_macs
from pas.gates import freeze_gates, masks
from pas.search import search


def _digits(resize):
    train, val, info = load_data("digits", resize=resize, seed=0)

    def loader(epoch):
        return make_loader(train, batch_size=64, shuffle=True, seed=0, epoch=epoch, drop_last=True)
    return loader, make_loader(val, batch_size=512, shuffle=False), info


def _search_finetune_deploy(model, loader, val_loader, **search_kw):
    result = search(model, loader, target="50%", epochs=4, optim=OptimConfig(lr=0.05, schedule="constant"),
                    history_every=5, **search_kw)
    freeze_gates(model)
    Trainer(model, train_loader=loader if callable(loader) else (lambda epoch: loader), epochs=2,
            optim=OptimConfig(lr=0.02)).fit()
    small = compact(model.eval())
    # ptflops' counts of the compact network and of the full one (every channel kept): the landed MACs
    # within 1% below half the full network's
    shape = (model.arch.in_channels, model.arch.resolution)
    full = ptflops_macs(compact(model, [torch.ones(w, dtype=torch.bool) for w in model.arch.full_widths()]), *shape)
    macs = ptflops_macs(small, *shape)
    assert macs == result.macs and result.target_macs == round(0.5 * full)
    assert 0.99 * result.target_macs <= macs <= result.target_macs
    with torch.no_grad():
        x = next(iter(val_loader))[0][:8]
        assert torch.allclose(model(x), small(x), atol=1e-4 * float(model(x).abs().max()))
    return evaluate(small, val_loader)["top1"]


def test_resnet_mini_search_lands_on_target_and_learns():
    loader, val_loader, info = _digits(16)
    model = M.build("resnet10_mini", num_classes=10, in_channels=1, resolution=16)
    Trainer(model, train_loader=loader, epochs=6, optim=OptimConfig(lr=0.05)).fit()
    assert len(model.arch.searched) == 8  # stem+layer1 trunk, 3 stage trunks, 4 block-inner convs
    top1 = _search_finetune_deploy(model, loader, val_loader)
    assert top1 > 60, f"resnet10_mini after search and fine-tune: {top1:.1f}% (chance 10%)"


def test_torchvision_resnet18_through_the_python_api():
    loader, val_loader, info = _digits(32)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # digits are grayscale
    Trainer(model, train_loader=loader, epochs=4, optim=OptimConfig(lr=0.02)).fit()
    x = next(iter(loader(0)))[0]
    batches = list(loader(0))  # any iterable of (x, y) batches works as the loader
    top1 = _search_finetune_deploy(model, batches, val_loader, example_input=x)
    assert model.arch.backbone == "ResNet" and len(model.arch.searched) == 12  # stem+layer1, 3 trunks, 8 inner convs
    assert top1 > 40, f"torchvision resnet18 after search and fine-tune: {top1:.1f}% (chance 10%)"


def test_grouped_repvgg_mini_search_lands_in_whole_groups_and_learns():
    """The g4 recipe (groups 4 on layers 2, 4, 6, 8) on the small RepVGG-B0 widths, traced through the
    Python API: searched, landed with every block of a grouped conv keeping the same count, fine-tuned,
    compacted into grouped convs with the masked network's outputs."""
    from pas.graph.network import describe
    from pas.models import GROUPED_LAYERS, MINI_B_BLOCKS, MINI_BASE, MINI_STRIDES
    from pas.models.repvgg import RepVGG, repvgg_arch
    loader, val_loader, info = _digits(16)
    torch.manual_seed(0)
    model = RepVGG(repvgg_arch(a=1, b=2.5, blocks=MINI_B_BLOCKS, base=MINI_BASE, strides=MINI_STRIDES, groups=4,
                               grouped_layers=GROUPED_LAYERS, in_channels=1, num_classes=10, resolution=16))
    describe(model, (1, 16, 16))
    assert model.arch.blocks() == [1, 4, 4, 4, 4, 4, 4, 4, 4, 1]
    Trainer(model, train_loader=loader, epochs=4, optim=OptimConfig(lr=0.05)).fit()
    top1 = _search_finetune_deploy(model, loader, val_loader)
    for mask, blocks in zip(masks(model), model.arch.blocks()):
        assert len(set(mask.view(blocks, -1).sum(1).tolist())) == 1
    assert [b.conv.groups for b in compact(model.eval()).blocks] == [1, 1, 4, 1, 4, 1, 4, 1, 4, 1]
    assert top1 > 60, f"grouped repvgg mini after search and fine-tune: {top1:.1f}% (chance 10%)"
