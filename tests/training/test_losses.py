"""The contrastive losses against hand-written definitions and open_clip's own implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from retriever.training import losses


def _feats(n=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return img, txt


def test_infonce_matches_definition_and_open_clip():
    from open_clip.loss import ClipLoss

    img, txt = _feats()
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64)
    got = losses.infonce_loss(img, txt, log_scale)
    # By hand: -log softmax of the matching pair, both directions, averaged.
    s = log_scale.exp() * img @ txt.T
    i2t = -(s.diag() - torch.logsumexp(s, dim=1)).mean()
    t2i = -(s.diag() - torch.logsumexp(s, dim=0)).mean()
    assert got.item() == pytest.approx(((i2t + t2i) / 2).item(), rel=1e-12)
    assert got.item() == pytest.approx(ClipLoss()(img, txt, log_scale.exp()).item(), rel=1e-12)


def test_infonce_rewards_aligned_pairs():
    img, _ = _feats()
    scale = torch.tensor(math.log(100.0), dtype=torch.float64)
    aligned = losses.infonce_loss(img, img, scale)
    shuffled = losses.infonce_loss(img, img.roll(1, dims=0), scale)
    assert aligned < 0.05 < shuffled


def test_siglip_matches_open_clip():
    from open_clip.loss import SigLipLoss

    img, txt = _feats(seed=1)
    t, b = torch.tensor(math.log(10.0), dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    got = losses.siglip_loss(img, txt, t, b)
    assert got.item() == pytest.approx(SigLipLoss()(img, txt, t.exp(), b).item(), rel=1e-12)


def test_loss_parameter_gradients_flow():
    img, txt = _feats()
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    losses.siglip_loss(img, txt, scale, bias).backward()
    assert scale.grad != 0 and bias.grad != 0


def test_init_and_clamp_of_temperature(tiny):
    model = tiny.build()
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(7.0)
    losses.clamp_logit_scale(model)
    assert model.logit_scale.item() == pytest.approx(math.log(100), rel=1e-6)


def test_ensure_logit_bias_makes_a_saveable_siglip_model(tiny, tmp_path):
    import open_clip

    from retriever.training.checkpoint import save_checkpoint

    model = tiny.build()
    config = {"model_cfg": tiny.model_cfg}
    losses.ensure_logit_bias(model, config)
    assert model.logit_bias.item() == losses.SIGLIP_INIT_LOGIT_BIAS and model.logit_bias.requires_grad
    with torch.no_grad():
        model.logit_bias.fill_(-3.5)
    save_checkpoint(tmp_path / "m", model, config)
    again, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'm'}")
    assert again.logit_bias.item() == -3.5
