"""A real, short PaS search on scikit-learn's digits: on target, and well above chance."""
import torch

import pas.models as M
from pas.compact import compact
from pas.data import load_data, make_loader
from pas.engine import OptimConfig, Trainer, evaluate
from pas.flops import ptflops_macs
from pas.search import search


def test_short_search_on_digits_reaches_target_and_stays_accurate():
    train, val, info = load_data("digits", resize=16, seed=0)
    assert info.num_classes == 10 and info.resolution == 16

    def loader(epoch):
        return make_loader(train, batch_size=64, shuffle=True, seed=0, epoch=epoch, drop_last=True)

    val_loader = make_loader(val, batch_size=512, shuffle=False)
    model = M.build("repvgg_b0_mini", num_classes=10, in_channels=1, resolution=16)
    Trainer(model, train_loader=loader, epochs=6, optim=OptimConfig(lr=0.05)).fit()
    pretrained = evaluate(model, val_loader)["top1"]
    assert pretrained > 80

    result = search(model, loader, target="40%", epochs=4, optim=OptimConfig(lr=0.05, schedule="constant"),
                    history_every=5)
    full = ptflops_macs(M.build_deployed(model.arch), 1, 16)  # the full deployed network, counted by ptflops
    assert result.target_macs == round(0.4 * full)
    # the penalty alone already brought the gates close to the target; the adjustment only finishes it
    assert abs(result.searched_macs - result.target_macs) <= 0.25 * result.target_macs
    assert result.history[0]["macs"] == full and len(result.history[0]["kept"]) == len(model.arch.widths)
    assert result.history[-1]["macs"] < 0.8 * full

    small = compact(model.eval())
    macs = ptflops_macs(small, 1, 16)
    assert macs == result.macs and 0.99 * result.target_macs <= macs <= result.target_macs
    searched = evaluate(small, val_loader)["top1"]
    assert searched > 50, f"accuracy after search {searched:.1f}% (chance is 10%)"
    with torch.no_grad():
        x = next(iter(val_loader))[0][:8]
        assert torch.allclose(model(x), small(x), atol=1e-4 * float(model(x).abs().max()))
