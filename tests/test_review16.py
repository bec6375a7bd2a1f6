"""Review of issue 16 (flow, DiT, CFG, latent diffusion, generative metrics): regression tests for what it found."""
from __future__ import annotations

import math

import torch

from test_flow import _latent, autoencoder  # noqa: F401  (the module-scoped fixture: a tiny exported VAE)


def test_latent_training_with_half_precision_weights(autoencoder):  # noqa: F811
    """DeepSpeed bf16 casts every parameter (the frozen autoencoder's too) but keeps buffers fp32, and FSDP2's
    compute weights are bf16: encoding the fp32 images on the fly must still work, with the fp32 model's latents
    up to bf16 rounding."""
    vae, path = autoencoder
    from pretrain.models import convert_to_fp32_bn

    method = convert_to_fp32_bn(_latent(path))   # as both backends do before casting
    for p in method.parameters():   # DeepSpeed's _cast_module_mixed_precision: parameters only
        p.data = p.data.to(torch.bfloat16)
    images = torch.rand(16, 3, 8, 8) * 2 - 1
    torch.manual_seed(7)
    want_z = vae.encode(images).double()                                   # fp32 VAE, the same posterior draw
    torch.manual_seed(7)
    method.train()
    loss = method.training_step({"views": [images[None]]}, method.step_context())["loss"]
    assert torch.isfinite(loss)
    want = 1 / want_z.var(unbiased=False).sqrt().item()
    assert math.isclose(method.latent_scale.item(), want, rel_tol=0.05)


def test_torchvision_inception_gets_the_input_its_weights_expect(tmp_path):
    """torchvision's Inception-v3 weights (ported from TF) take inputs in [-1, 1]: torchvision builds the model with
    transform_input=True for them, mapping ImageNet-normalised inputs there. Reference: the same weights without
    that transform, fed 299 px images scaled to [-1, 1] directly (float64)."""
    import torchvision
    from safetensors.torch import save_file

    from pretrain.evaluation import fidelity as fi

    from test_fidelity import _kaiming   # random weights with O(1) activations

    tv = _kaiming(torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False), 1).eval()
    path = tmp_path / "inception_v3.safetensors"
    save_file({k: v.contiguous() for k, v in tv.state_dict().items()}, str(path))
    net = fi.load_inception(path)
    u8 = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    pool, _ = net(u8)
    ref = tv.double()
    ref.transform_input = False
    feats = {}
    ref.avgpool.register_forward_hook(lambda m, i, o: feats.update(x=o.flatten(1)))
    x = torch.nn.functional.interpolate(u8.double() / 255, size=(299, 299), mode="bilinear", align_corners=False)
    with torch.no_grad():
        ref(x * 2 - 1)
    assert torch.allclose(pool.double(), feats["x"], rtol=1e-4, atol=1e-4)
    assert feats["x"].std() > 1e-3


def test_labels_outside_the_classes_are_a_one_line_error():
    """method.num_classes > 0 with shards whose labels are missing (-1) or >= num_classes: a one-line error naming
    the cause, not an embedding IndexError (a device-side assert on GPU); index num_classes is the null label."""
    import pytest

    from test_flow import _method

    method = _method("flow", "method.num_classes=3", "method.label_dropout=0.0")
    batch = lambda y: {"views": [torch.zeros(1, len(y), 3, 8, 8)], "label": torch.tensor(y)}   # noqa: E731
    assert method.train_labels(batch([0, 2])).tolist() == [0, 2]
    for bad in ([0, -1], [3, 1]):
        with pytest.raises(ValueError, match="num_classes"):
            method.train_labels(batch(bad))


def test_ddpm_checkpoints_from_before_latent_diffusion_load():
    """A DDPM checkpoint written before issue 16 has unet/unet_ema keys and no latent_scale buffer (pixel space):
    it loads, with the same weights, and the model stays in pixel space (scale unused, 0)."""
    from test_flow import _method

    old = _method("ddpm")
    sd = {("unet_ema." + k[8:]) if k.startswith("net_ema.") else ("unet." + k[4:]) if k.startswith("net.") else k: v
          for k, v in old.state_dict().items() if k != "latent_scale"}
    new = _method("ddpm", "method.base_channels=8")
    new.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(new.net.state_dict().values(), old.net.state_dict().values()))
    assert new.latent_scale.item() == 0 and new.autoencoder is None
