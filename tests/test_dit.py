"""DiT denoiser (pretrain/models/dit.py): adaLN-Zero start, conditioning on t and y, the unpatchify layout
against torch's fold, the paper's parameter counts, one-line errors, and gradients reaching every parameter."""
import pytest
import torch
import torch.nn.functional as F

from pretrain.models.dit import DiT, create_dit, unpatchify

C, S, P, K = 3, 8, 2, 4    # channels, image size, patch, classes


def tiny(**kw):
    torch.manual_seed(0)
    return create_dit("DiT-S/2", S, C, kw.pop("num_classes", K), hidden=32, depth=2, heads=2, **kw)


def randomise(model):
    """Give the zero-initialised adaLN / output Linears random weights, so every path carries signal."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def inputs(n=4):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, C, S, S, generator=g), torch.tensor([0.0, 250.5, 999.0, 10.0])[:n]


def test_adaln_zero_start_is_zero_output_and_identity_blocks():
    m = tiny()
    x, t = inputs()
    out = m(x, t, torch.tensor([0, 1, 2, K]))
    assert out.shape == (4, C, S, S) and torch.equal(out, torch.zeros_like(out))
    h, c = torch.randn(4, (S // P) ** 2, 32), torch.randn(4, 32)
    for block in m.blocks:
        assert torch.equal(block(h, c), h)
    assert [n for n, _ in m.named_children()].count("blocks") == 1 and isinstance(m.blocks, torch.nn.ModuleList)
    assert "pos_embed" not in m.state_dict() and all("pos_embed" not in n for n, _ in m.named_parameters())


def test_output_depends_on_t_and_y_and_none_is_the_null_label():
    m = randomise(tiny()).eval()
    x, t = inputs()
    y = torch.tensor([0, 1, 2, 3])
    base = m(x, t, y)
    assert not torch.allclose(base, m(x, t + 100, y))
    assert not torch.allclose(base, m(x, t, (y + 1) % K))
    torch.testing.assert_close(m(x, t, None), m(x, t, torch.full((4,), K)), rtol=0, atol=0)
    # DDPM passes integer step indices: the same as the float timesteps
    ti = torch.tensor([0, 250, 999, 10])
    torch.testing.assert_close(m(x, ti, y), m(x, ti.float(), y))
    # unconditional: no label table, y ignored
    u = randomise(tiny(num_classes=0))
    assert u.y_embedder is None and torch.equal(u(x, t, None), u(x, t, y))


def fold_reference(tokens, grid, p, c):
    """[B, h*w, p*p*c] tokens laid out (row, col, channel) within a patch -> [B, c, h*p, w*p] through
    F.fold, whose columns are laid out (channel, row, col)."""
    B, L, _ = tokens.shape
    cols = tokens.reshape(B, L, p, p, c).permute(0, 4, 2, 3, 1).reshape(B, c * p * p, L)
    return F.fold(cols, output_size=(grid[0] * p, grid[1] * p), kernel_size=p, stride=p)


def test_unpatchify_matches_fold_in_float64():
    tokens = torch.randn(2, 3 * 5, 2 * 2 * 6, dtype=torch.float64)
    torch.testing.assert_close(unpatchify(tokens, (3, 5), (2, 2)), fold_reference(tokens, (3, 5), 2, 6), rtol=0, atol=0)


def test_model_output_is_its_tokens_unpatchified():
    m = tiny(learn_sigma=True).double()
    x, t = inputs(2)
    tokens = torch.randn(2, (S // P) ** 2, P * P * 2 * C, dtype=torch.float64)
    m.final_layer.forward = lambda h, c: tokens
    torch.testing.assert_close(m(x.double(), t), fold_reference(tokens, (S // P, S // P), P, 2 * C), rtol=0, atol=0)


@pytest.mark.parametrize("name, paper", [("DiT-S/2", 33e6), ("DiT-B/2", 130e6)])
def test_param_counts_match_the_paper(name, paper):
    """Peebles & Xie 2023, Table 4 (ImageNet 256: 32x32x4 latents, 1000 classes, learned sigma)."""
    with torch.device("meta"):
        m = create_dit(name, 32, 4, 1000, learn_sigma=True)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - paper) / paper < 0.01, n


@pytest.mark.parametrize("name", ["DiT-M/2", "DiT-S", "dit-s/2", "DiT-S/0", "ViT-S/2"])
def test_bad_name_is_one_line_error(name):
    with pytest.raises(ValueError, match="DiT-S, DiT-B, DiT-L, DiT-XL") as e:
        create_dit(name, 32, 3, 0)
    assert "\n" not in str(e.value)


def test_image_size_not_divisible_by_patch_is_one_line_error():
    with pytest.raises(ValueError, match="image_size=30.*multiple of 4") as e:
        create_dit("DiT-S/4", 30, 3, 0, depth=1)
    assert "\n" not in str(e.value)


def test_learn_sigma_doubles_channels_and_every_parameter_gets_a_gradient():
    m = randomise(tiny(learn_sigma=True)).train()
    assert m.out_channels == 2 * C
    x, t = inputs()
    out = m(x, t, torch.tensor([0, 1, 2, 3]))
    assert out.shape == (4, 2 * C, S, S)
    out2 = m(x, t, None)                              # the null row too, as classifier-free guidance trains it
    (out.square().mean() + out2.square().mean()).backward()
    dead = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead, dead


def test_bf16_weights_take_fp32_inputs():
    m = randomise(tiny()).to(torch.bfloat16)
    x, t = inputs(2)
    out = m(x, t, torch.tensor([1, K]))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
