"""GradCache gives the full-batch gradient exactly, with the loss parameters' gradient counted once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from retriever.training.gradcache import contrastive_backward
from retriever.training.losses import infonce_loss, siglip_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(1, 49000, (n, 16), generator=g)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, images, texts, loss_fn, micro_batch):
    model.zero_grad(set_to_none=True)
    loss = contrastive_backward(
        lambda x: model.encode_image(x, normalize=True),
        lambda t: model.encode_text(t, normalize=True),
        images,
        texts,
        loss_fn,
        micro_batch=micro_batch,
    )
    return loss, _grads(model)


def _assert_same_grads(a, b, tol=1e-5):
    assert a.keys() == b.keys() and len(a) > 10
    for name in a:
        err = (a[name] - b[name]).norm() / b[name].norm().clamp_min(1e-30)
        assert err < tol, (name, float(err))


@pytest.mark.parametrize("micro_batch", [4, 5, 1])
def test_gradcache_equals_full_batch_step_infonce(tiny, micro_batch):
    model = tiny.build()
    images, texts = _batch(16)
    loss_fn = lambda i, t: infonce_loss(i, t, model.logit_scale)  # noqa: E731
    full_loss, full = _run(model, images, texts, loss_fn, None)
    gc_loss, gc = _run(model, images, texts, loss_fn, micro_batch)
    assert gc_loss == pytest.approx(full_loss, rel=1e-6)
    _assert_same_grads(gc, full)
    assert "logit_scale" in gc and full["logit_scale"].abs() > 0


def test_gradcache_equals_full_batch_step_siglip(tiny):
    model = tiny.build(init_logit_bias=-10.0)
    images, texts = _batch(12)
    loss_fn = lambda i, t: siglip_loss(i, t, model.logit_scale, model.logit_bias)  # noqa: E731
    _, full = _run(model, images, texts, loss_fn, None)
    _, gc = _run(model, images, texts, loss_fn, 3)
    _assert_same_grads(gc, full)
    assert "logit_bias" in gc


def test_loss_parameters_get_their_gradient_once_not_k_times(tiny):
    """open_clip's --accum-freq recomputes the full loss per chunk: logit_scale's grad comes out k·g."""
    model = tiny.build()
    images, texts = _batch(16)
    loss_fn = lambda i, t: infonce_loss(i, t, model.logit_scale)  # noqa: E731
    _, full = _run(model, images, texts, loss_fn, None)
    _, gc = _run(model, images, texts, loss_fn, 4)

    # open_clip_train.train's accumulation: cache features, then per chunk re-forward it with grad,
    # splice it into the cached features and backprop the whole loss.
    model.zero_grad(set_to_none=True)
    chunks = [(s, s + 4) for s in range(0, 16, 4)]
    with torch.no_grad():
        cached = [
            (model.encode_image(images[s:e], normalize=True), model.encode_text(texts[s:e], normalize=True))
            for s, e in chunks
        ]
    for j, (s, e) in enumerate(chunks):
        img = [c[0] for c in cached]
        txt = [c[1] for c in cached]
        img[j] = model.encode_image(images[s:e], normalize=True)
        txt[j] = model.encode_text(texts[s:e], normalize=True)
        loss_fn(torch.cat(img), torch.cat(txt)).backward()
    accum = _grads(model)

    assert gc["logit_scale"].item() == pytest.approx(full["logit_scale"].item(), rel=1e-5)
    assert (accum["logit_scale"] / full["logit_scale"]).item() == pytest.approx(4.0, rel=1e-5)
    # The encoders' gradients agree with the full batch in all three.
    name = "visual.conv1.weight"
    assert torch.allclose(accum[name], full[name], rtol=1e-4, atol=1e-7)


class _DropoutTower(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(10, 6)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return F.normalize(self.drop(self.lin(x)), dim=-1)


def test_dropout_masks_are_replayed_in_the_second_forward():
    """The reference draws each chunk's masks in the same order as GradCache's first pass."""
    torch.manual_seed(0)
    img_tower, txt_tower = _DropoutTower(), _DropoutTower()
    scale = torch.nn.Parameter(torch.tensor(2.0))
    x, y = torch.randn(12, 10), torch.randn(12, 10)
    params = [*img_tower.parameters(), *txt_tower.parameters(), scale]
    loss_fn = lambda i, t: infonce_loss(i, t, scale)  # noqa: E731

    torch.manual_seed(123)
    ref_parts = [(img_tower(x[s : s + 4]), txt_tower(y[s : s + 4])) for s in range(0, 12, 4)]
    loss_fn(torch.cat([p[0] for p in ref_parts]), torch.cat([p[1] for p in ref_parts])).backward()
    ref = [p.grad.clone() for p in params]
    after_ref = torch.rand(1)

    for p in params:
        p.grad = None
    torch.manual_seed(123)
    contrastive_backward(img_tower, txt_tower, x, y, loss_fn, micro_batch=4)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-7)
    # The global RNG ends where one pass over the chunks leaves it: later steps are unaffected.
    assert torch.rand(1) == after_ref


def test_gradient_checkpointing_changes_memory_not_gradients(tiny):
    images, texts = _batch(8)
    plain, ckpt = tiny.build(), tiny.build()
    ckpt.set_grad_checkpointing(True)
    _, g_plain = _run(plain, images, texts, lambda i, t: infonce_loss(i, t, plain.logit_scale), 4)
    _, g_ckpt = _run(ckpt, images, texts, lambda i, t: infonce_loss(i, t, ckpt.logit_scale), 4)
    _assert_same_grads(g_ckpt, g_plain)


def test_train_mode_batchnorm_stats_update_once_per_chunk():
    """Pass 1 (no grad) must not move BN running stats; pass 2 updates them once per chunk."""
    torch.manual_seed(0)
    tower = torch.nn.Sequential(torch.nn.Linear(10, 6), torch.nn.BatchNorm1d(6)).train()
    scale = torch.nn.Parameter(torch.tensor(2.0))
    x = torch.randn(12, 10)
    loss_fn = lambda i, t: infonce_loss(i, t, scale)  # noqa: E731
    enc = lambda v: F.normalize(tower(v), dim=-1)  # noqa: E731
    bn = tower[1]
    contrastive_backward(enc, enc, x, x + 0.1, loss_fn, micro_batch=6, module=tower)
    # Reference: the same 4 BN batches (image chunk, text chunk, twice) once, from fresh stats.
    ref = torch.nn.BatchNorm1d(6).train()
    ref.load_state_dict(
        {
            **bn.state_dict(),
            "running_mean": torch.zeros(6),
            "running_var": torch.ones(6),
            "num_batches_tracked": torch.tensor(0),
        }
    )
    with torch.no_grad():
        h = tower[0]
        for s in (0, 6):
            ref(h(x[s : s + 6]))
            ref(h(x[s : s + 6] + 0.1))
    assert int(bn.num_batches_tracked) == 4
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
