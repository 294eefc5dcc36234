"""Exact checks of diffusion_model.py: every quantity is compared with the same quantity computed
another way (closed forms, separate forward passes, a second run)."""

import math

import pytest
import torch

from diffusion_model import (
    CrossAttention,
    GroupNorm32,
    NoiseScheduler,
    ResnetBlock,
    SamplerConfig,
    SpatialTransformer,
    UNet,
    UNetConfig,
    attention,
    ddim_step,
    ddim_timesteps,
    diffusion_loss,
    guided_output,
    image_generators,
    pad_context,
    position_embedding_2d,
    sample,
    timestep_embedding,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: one intra-op thread on a shared 2-core machine

TINY = dict(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), n_heads=2, context_dim=16)


def tiny_unet(image_size=16, **kw):
    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=image_size, **{**TINY, **kw}))
    # zero-initialised output layers would make every prediction 0 and hide bugs: randomise them
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0 and p.dim() > 1:
                p.normal_(0, 0.05)
    return model.eval()


def text(B, L, D=16, real=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.randn(B, L, D, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    if real is not None:
        mask[:, real:] = False
    return ctx, mask


# ----------------------------------------------------------------------------- shapes


def test_timestep_embedding_is_sin_cos_of_geometric_frequencies():
    t = torch.tensor([0, 7, 999])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8)
    freqs = [10000 ** (-i / 4) for i in range(4)]
    expected = [[math.cos(tt * f) for f in freqs] + [math.sin(tt * f) for f in freqs] for tt in (0, 7, 999)]
    assert torch.allclose(emb, torch.tensor(expected), atol=1e-4)


def test_block_shapes():
    temb = torch.randn(2, 64)
    assert ResnetBlock(32, 64, 64)(torch.randn(2, 32, 8, 8), temb).shape == (2, 64, 8, 8)
    assert ResnetBlock(64, 64, 64)(torch.randn(2, 64, 4, 4), temb).shape == (2, 64, 4, 4)
    ctx, mask = text(2, 5, 24)
    assert SpatialTransformer(64, 4, 24)(torch.randn(2, 64, 8, 8), ctx, mask).shape == (2, 64, 8, 8)
    assert CrossAttention(64, 24, 4)(torch.randn(2, 10, 64), ctx, mask).shape == (2, 10, 64)


@pytest.mark.parametrize("image_size", [16, 32])
@pytest.mark.parametrize("L", [1, 9])
def test_unet_output_shape(image_size, L):
    model = tiny_unet(image_size)
    x = torch.randn(3, 3, image_size, image_size)
    ctx, mask = text(3, L)
    assert model(x, torch.tensor([0, 5, 999]), ctx, mask).shape == x.shape


def test_indivisible_image_size_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="multiple of 4"):
        UNetConfig(image_size=30, channel_mults=(1, 2, 2))


def test_untrained_unet_predicts_zero():
    # zero-initialised conv_out: training starts from eps_theta = 0, a stable starting point
    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=16, **TINY))
    ctx, mask = text(2, 4)
    assert model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), ctx, mask).abs().max() == 0


# ----------------------------------------------------------------------------- bf16 autocast on the CPU
# The matmuls and convolutions in bf16; the norms and attention in fp32 (their bf16 CPU kernels are slow).


def test_group_norm_runs_in_fp32_under_cpu_autocast():
    torch.manual_seed(0)
    norm = GroupNorm32(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    x = torch.randn(2, 16, 5, 5).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.float32
    # the same normalisation written out: per sample and group of 4 channels, over channels and pixels
    g = x.float().view(2, 4, 4 * 25)
    ref = ((g - g.mean(-1, keepdim=True)) / (g.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()).view(2, 16, 5, 5)
    ref = ref * norm.weight[:, None, None] + norm.bias[:, None, None]
    assert torch.allclose(y, ref, atol=1e-5)


def test_attention_runs_in_fp32_under_cpu_autocast_and_is_masked_softmax():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))  # (B, heads, N, d)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])[:, None, None, :]  # (B, 1, 1, L)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = attention(q, k, v, mask)
    assert h.dtype == torch.float32
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~mask, float("-inf"))  # (B, heads, N, L)
    assert torch.allclose(h, scores.softmax(-1) @ v, atol=1e-5)
    assert torch.equal(attention(q, k, v, mask), h)  # outside autocast: the same fp32 kernel


def test_unet_under_cpu_bf16_autocast_is_fp32_within_bf16_rounding():
    model = tiny_unet(16)
    x = torch.randn(4, 3, 16, 16)
    t = torch.tensor([0, 10, 500, 999])
    ctx, mask = text(4, 6, real=4)
    ref = model(x, t, ctx, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, ctx, mask)
    # bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per operation): a few per mille end to end
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.02, rel


# ----------------------------------------------------------------------------- schedule


def test_cosine_schedule_matches_closed_form():
    T, s = 1000, 0.008
    sch = NoiseScheduler(T)
    abar = sch.alphas_cumprod.double()
    assert (abar[1:] < abar[:-1]).all(), "strictly decreasing"
    assert abar[0] > 0.9999 and abar[-1] < 1e-4
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    closed = torch.tensor([f(t + 1) / f(0) for t in range(T)], dtype=torch.float64)
    unclipped = sch.betas < 0.999  # the clip only touches the very last steps
    assert unclipped[: T - 5].all()
    assert torch.allclose(abar[: T - 5], closed[: T - 5], rtol=1e-5, atol=1e-7)
    assert sch.betas.max() <= 0.999


def test_q_sample_at_t0_is_x0_and_predict_x0_inverts_it():
    sch = NoiseScheduler(1000)
    x0, noise = torch.rand(4, 3, 8, 8) * 2 - 1, torch.randn(4, 3, 8, 8)
    assert torch.allclose(sch.q_sample(x0, torch.zeros(4, dtype=torch.long), noise), x0, atol=0.03)
    t = torch.tensor([0, 10, 500, 998])
    x_t = sch.q_sample(x0, t, noise)
    assert torch.allclose(sch.predict_x0(x_t, t, noise), x0, atol=1e-3)
    assert torch.allclose(sch.predict_eps(x_t, t, x0), noise, atol=1e-3)


def test_v_target_and_its_inverse_round_trip():
    """v = sqrt(abar) eps - sqrt(1 - abar) x_0; x_0 and eps recovered from (x_t, v) at every t,
    including t = T-1 where abar = 2.4e-9 and x_0 from eps would be hopeless."""
    sch = NoiseScheduler(1000, prediction_type="v")
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 400, 998, 999])
    x_t = sch.q_sample(x0, t, eps)
    v = sch.target(x0, t, eps)
    abar = sch.alphas_cumprod[t][:, None, None, None]
    assert torch.allclose(v, abar.sqrt() * eps - (1 - abar).sqrt() * x0, atol=1e-12)
    x0_hat, eps_hat = sch.predict_x0_eps(x_t, t, v)
    assert torch.allclose(x0_hat, x0, atol=1e-9) and torch.allclose(eps_hat, eps, atol=1e-9)
    # and eps -> x_0 agrees with it wherever abar is not tiny
    x0_from_eps, _ = NoiseScheduler(1000).predict_x0_eps(x_t[:4], t[:4], eps[:4])
    assert torch.allclose(x0_from_eps, x0[:4], atol=1e-6)
    assert torch.equal(NoiseScheduler(1000).target(x0, t, eps), eps)
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseScheduler(10, prediction_type="x0")


def test_ddim_eta1_all_steps_is_the_ddpm_posterior_for_v_prediction():
    """The samplers take x_0 from the v output, then run unchanged: one DDIM step with eta = 1
    from t to t-1 is DDPM's posterior step, given the same x_0."""
    sch = NoiseScheduler(1000, prediction_type="v")
    g = torch.Generator().manual_seed(4)
    for t in (999, 600, 20, 1):
        x_t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
        v = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
        tt = torch.full((2,), t)
        x0 = sch.predict_x0_eps(x_t, tt, v)[0].clamp(-1, 1)
        _, mean, var = ddim_step(
            sch, x_t, t, t - 1, x0, sch.predict_eps(x_t, torch.full((2,), t), x0), 1.0, torch.zeros_like(x_t)
        )
        post_mean, post_var = sch.q_posterior(x0, x_t, tt)
        assert torch.allclose(mean, post_mean, atol=1e-9), t
        assert torch.allclose(var, post_var[0].flatten()[0], rtol=1e-9), t


def test_min_snr_weighting_is_the_clipped_snr_loss_on_x0():
    """Min-SNR-gamma: the weighted eps or v loss equals min(SNR_t, gamma) * ||x_0 - x0_hat||^2 / (B*C*H*W)
    averaged over images, for the same network output, computed through x0_hat instead."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(6, 3, 4, 4, generator=g)
    t = torch.tensor([0, 3, 50, 300, 700, 990])
    out = torch.randn(6, 3, 4, 4, generator=g)
    model = lambda x, t, c, m: out  # a fixed prediction, whatever the input
    for kind in ("eps", "v"):
        sch = NoiseScheduler(1000, prediction_type=kind)
        x_t = sch.q_sample(x0, t, noise)
        x0_hat = sch.predict_x0_eps(x_t.double(), t, out.double())[0]
        snr = sch.alphas_cumprod[t] / (1 - sch.alphas_cumprod[t])
        expected = (snr.clamp(max=5.0) * (x0.double() - x0_hat).pow(2).mean(dim=(1, 2, 3))).mean()
        got = diffusion_loss(model, sch, x0, None, None, t, noise, min_snr_gamma=5.0)
        assert torch.allclose(got.double(), expected, rtol=1e-4), kind
        plain = diffusion_loss(model, sch, x0, None, None, t, noise)
        assert torch.allclose(plain, (out - sch.target(x0, t, noise)).pow(2).mean())


def test_posterior_matches_closed_form_at_random_t():
    sch = NoiseScheduler(1000)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(1, 990, (16,), generator=g)  # below the last steps, where beta is clipped
    x0, x_t = torch.randn(16, 3, 4, 4, generator=g), torch.randn(16, 3, 4, 4, generator=g)
    mean, var = sch.q_posterior(x0, x_t, t)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for i, ti in enumerate(t.tolist()):
        a_t, a_prev = (
            torch.tensor(f(ti + 1) / f(0), dtype=torch.float64),
            torch.tensor(f(ti) / f(0), dtype=torch.float64),
        )
        beta = 1 - a_t / a_prev
        exp_mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0[i].double() + (
            (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)
        ) * x_t[i].double()
        exp_var = (1 - a_prev) / (1 - a_t) * beta
        assert torch.allclose(mean[i].double(), exp_mean, rtol=1e-4, atol=1e-5)
        assert torch.allclose(var[i].double().flatten()[0], exp_var, rtol=1e-4)


# ----------------------------------------------------------------------------- positions


def test_position_embedding_is_row_then_column_sinusoids():
    pe = position_embedding_2d(3, 4, 8)  # (12, 8), row-major tokens
    assert pe.shape == (12, 8)
    for i in range(3):
        for j in range(4):
            expected = torch.cat(
                [timestep_embedding(torch.tensor([i]), 4)[0], timestep_embedding(torch.tensor([j]), 4)[0]]
            )
            assert torch.allclose(pe[i * 4 + j], expected)
    assert len({tuple(row.tolist()) for row in pe}) == 12, "every pixel gets its own position"


def test_positions_break_the_translation_symmetry_of_attention():
    """A SpatialTransformer without positions maps a token's features to the same output wherever
    it sits (permutation-equivariant); with positions, moving the input changes more than the
    output's placement."""
    torch.manual_seed(0)
    ctx, mask = text(1, 3)
    for resolution, equivariant in ((None, True), (4, False)):
        st = SpatialTransformer(32, 2, 16, resolution=resolution)
        torch.nn.init.normal_(st.proj_out.weight, std=0.1)
        x = torch.randn(1, 32, 4, 4)
        shifted = x.roll(1, dims=3)
        same = torch.allclose(st(shifted, ctx, mask), st(x, ctx, mask).roll(1, dims=3), atol=1e-5)
        assert same == equivariant, resolution


def test_coord_conv_feeds_x_and_y_to_conv_in():
    model = tiny_unet(coord_conv=True)
    assert model.conv_in.in_channels == 5
    x_chan, y_chan = model.coords[0]
    assert x_chan[0, 0] == -1 and x_chan[0, -1] == 1 and y_chan[0, 0] == -1 and y_chan[-1, 0] == 1
    ctx, mask = text(2, 4)
    assert model(torch.randn(2, 3, 16, 16), torch.tensor([3, 4]), ctx, mask).shape == (2, 3, 16, 16)


def test_position_options_keep_the_checkpoint_layout_loadable():
    """pos_embed adds no parameters (a fixed table, not saved); coord_conv widens conv_in only."""
    plain, pos = tiny_unet(), tiny_unet(pos_embed=True)
    assert plain.state_dict().keys() == pos.state_dict().keys()
    pos.load_state_dict(plain.state_dict())


def test_pos_embed_reaches_the_unets_output():
    """The same weights with and without positions: the outputs differ (the flag is not lost on the way
    into the SpatialTransformers), and two models with positions agree (the difference is the flag)."""
    pos, plain, pos_again = tiny_unet(pos_embed=True), tiny_unet(pos_embed=False), tiny_unet(pos_embed=True)
    plain.load_state_dict(pos.state_dict())
    pos_again.load_state_dict(pos.state_dict())
    x, t, (ctx, mask) = (
        torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)),
        torch.tensor([10, 500]),
        text(2, 4),
    )
    out = pos(x, t, ctx, mask)
    assert torch.equal(pos_again(x, t, ctx, mask), out)
    assert (plain(x, t, ctx, mask) - out).abs().mean() > 1e-3 * out.abs().mean()


# ----------------------------------------------------------------------------- attention


def test_patches_are_the_small_unet_on_folded_pixels():
    """patch_size 2 at 32 px is the 16 px U-Net on 12-channel cells: the same weights give the same
    output once the 2x2 cells are folded into channels (in) and unfolded back into pixels (out)."""
    patched = tiny_unet(32, patch_size=2, pos_embed=True)
    small = UNet(UNetConfig(image_size=16, in_channels=12, pos_embed=True, **TINY)).eval()
    small.load_state_dict(patched.state_dict())  # same parameters, same shapes: conv_in 12 -> 32, conv_out 32 -> 12
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 900])
    ctx, mask = text(2, 4)
    cells = (
        x.reshape(2, 3, 16, 2, 16, 2).permute(0, 1, 3, 5, 2, 4).reshape(2, 12, 16, 16)
    )  # channel 4c + 2i + j: pixel (2y+i, 2x+j)
    out = small(cells, t, ctx, mask).reshape(2, 3, 2, 2, 16, 16).permute(0, 1, 4, 2, 5, 3).reshape(2, 3, 32, 32)
    assert torch.allclose(patched(x, t, ctx, mask), out, atol=1e-5)
    with pytest.raises(ValueError, match="after patches of 2.*use a multiple of 4"):
        UNetConfig(image_size=30, patch_size=2, channel_mults=(1, 2))


@pytest.mark.parametrize("text_layers", [0, 2])
def test_padded_tokens_are_ignored_and_real_tokens_matter(text_layers):
    model = tiny_unet(text_layers=text_layers)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([100, 700])
    ctx, mask = text(2, 6, real=3)
    out = model(x, t, ctx, mask)
    padded = ctx.clone()
    padded[:, 4] += 5.0  # a masked (padding) token
    assert torch.allclose(model(x, t, padded, mask), out, atol=1e-6)
    real = ctx.clone()
    real[:, 1] += 5.0  # a real token
    assert (model(x, t, real, mask) - out).abs().max() > 1e-3


def test_text_layers_start_as_the_identity():
    # zero-initialised output branches: a fresh U-Net with text layers predicts what the same U-Net without them does
    torch.manual_seed(0)
    plain = UNet(UNetConfig(image_size=16, **TINY)).eval()
    layered = UNet(UNetConfig(image_size=16, text_layers=2, **TINY)).eval()
    missing, unexpected = layered.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("text_layers.") for k in missing)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])
    ctx, mask = text(2, 6, real=4)
    assert torch.equal(layered(x, t, ctx, mask), plain(x, t, ctx, mask))


def test_a_text_layer_on_a_padded_caption_is_the_layer_on_the_caption_alone():
    from diffusion_model import TextLayer

    torch.manual_seed(0)
    layer = TextLayer(16, 2).eval()
    for p in (layer.out.weight, layer.ff.out.weight):  # zero-initialised: randomise, or it is the identity
        torch.nn.init.normal_(p, std=0.3)
    ctx, mask = text(2, 7, real=4)
    out = layer(ctx, mask)
    alone = layer(ctx[:, :4])  # the same caption without its padding
    assert torch.allclose(out[:, :4], alone, atol=1e-6)
    assert (out[:, :4] - ctx[:, :4]).abs().max() > 1e-2  # it does change the tokens


# ----------------------------------------------------------------------------- samplers


def test_cfg_scale_one_is_conditional_and_zero_is_unconditional():
    model = tiny_unet()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    cond, uncond = text(2, 4, seed=1), text(2, 4, seed=2)
    eps_c, eps_u = model(x, t, *cond), model(x, t, *uncond)
    assert torch.allclose(guided_output(model, x, t, cond, uncond, 1.0), eps_c, atol=1e-5)
    assert torch.allclose(guided_output(model, x, t, cond, uncond, 0.0), eps_u, atol=1e-5)
    assert torch.allclose(guided_output(model, x, t, cond, uncond, 3.0), eps_u + 3 * (eps_c - eps_u), atol=1e-5)


def test_cfg_is_one_batched_forward():
    model = tiny_unet()
    calls = []
    model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    cond, uncond = text(2, 4, seed=1), text(1, 4, seed=2)
    sample(model, NoiseScheduler(50), cond, uncond, guidance_scale=2.0, sampler="ddim", steps=5)
    assert calls == [4] * 5  # one forward of 2 x batch per step


def test_guidance_in_an_interval_guides_exactly_the_steps_at_or_above_t_min():
    """guidance_t_min: steps at t >= it are guided (one doubled batch), the others run the conditional
    model alone; t_min 0 is plain CFG, t_min above every step is the conditional model, and w = 0
    stays the unconditional model whatever t_min says."""
    model, sch = tiny_unet(), NoiseScheduler(50)
    cond, uncond = text(2, 4, seed=1), text(1, 4, seed=2)
    calls = []
    hook = model.register_forward_hook(lambda m, args, out: calls.append((int(args[1][0]), args[0].shape[0])))
    mixed = sample(model, sch, cond, uncond, guidance_scale=3.0, sampler="ddim", steps=5, guidance_t_min=20)
    assert ddim_timesteps(50, 5) == [49, 39, 29, 19, 9]
    assert calls == [(49, 4), (39, 4), (29, 4), (19, 2), (9, 2)]
    hook.remove()
    run = lambda **kw: sample(model, sch, cond, uncond, sampler="ddim", steps=5, **kw)
    assert torch.equal(run(guidance_scale=3.0, guidance_t_min=0), run(guidance_scale=3.0))
    assert torch.equal(run(guidance_scale=3.0, guidance_t_min=50), run(guidance_scale=1.0))
    assert torch.equal(run(guidance_scale=0.0, guidance_t_min=20), run(guidance_scale=0.0))
    assert (mixed - run(guidance_scale=3.0)).abs().max() > 1e-4 and (mixed - run(guidance_scale=1.0)).abs().max() > 1e-4


def test_focus_guidance_adds_its_own_term_in_one_tripled_batch():
    """out_u + w (out_c - out_u) + w_f (out_f - out_u), with each prediction computed on its own; a
    focus of another token length (padded, masked) and of batch 1 gives the same as one of the caption's."""
    model = tiny_unet()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    cond, uncond, focus = text(2, 4, seed=1), text(2, 4, seed=2), text(2, 4, seed=3)
    eps_c, eps_u, eps_f = (model(x, t, *c) for c in (cond, uncond, focus))
    out = guided_output(model, x, t, cond, uncond, 3.0, focus, 0.5)
    assert torch.allclose(out, eps_u + 3 * (eps_c - eps_u) + 0.5 * (eps_f - eps_u), atol=1e-5)
    assert torch.equal(
        guided_output(model, x, t, cond, uncond, 3.0, focus, 0.0), guided_output(model, x, t, cond, uncond, 3.0)
    )
    short = text(1, 2, seed=4)
    padded = pad_context(short, 4)
    assert padded[0].shape == (1, 4, 16) and padded[1].tolist() == [[True, True, False, False]]
    assert torch.allclose(model(x[:1], t[:1], *padded), model(x[:1], t[:1], *short), atol=1e-5)
    sch = NoiseScheduler(50)
    draw = lambda f: sample(
        model, sch, cond, uncond, sampler="ddim", steps=3, guidance_scale=3.0, focus_scale=0.5, focus=f
    )
    one, both = draw(short), draw(tuple(p.expand(2, *p.shape[1:]) for p in padded))
    assert (one - both).abs().max() < 1e-5


def test_focus_guidance_guides_the_same_steps_as_cfg_and_scale_zero_changes_nothing():
    model, sch = tiny_unet(), NoiseScheduler(50)
    cond, uncond, focus = text(2, 4, seed=1), text(1, 4, seed=2), text(2, 3, seed=3)
    calls = []
    hook = model.register_forward_hook(lambda m, args, out: calls.append((int(args[1][0]), args[0].shape[0])))
    run = lambda **kw: sample(model, sch, cond, uncond, sampler="ddim", steps=5, guidance_t_min=20, **kw)
    focused = run(guidance_scale=3.0, focus=focus, focus_scale=1.0)
    assert calls == [(49, 6), (39, 6), (29, 6), (19, 2), (9, 2)]  # three copies where CFG guides, the caption below
    calls.clear()
    run(guidance_scale=1.0, focus=focus, focus_scale=1.0)  # w = 1 still needs out_u for the focus's term
    assert calls == [(49, 6), (39, 6), (29, 6), (19, 2), (9, 2)]
    hook.remove()
    assert torch.equal(run(guidance_scale=3.0, focus=focus, focus_scale=0.0), run(guidance_scale=3.0))
    assert (focused - run(guidance_scale=3.0)).abs().max() > 1e-4
    with pytest.raises(ValueError, match="focus_scale must be >= 0"):
        SamplerConfig(focus_scale=-1.0)
    assert set(SamplerConfig(sampler="ddim", guidance_scale=1.0, focus_scale=1.0).unused()) == set()


def test_ddim_timesteps_trailing():
    assert ddim_timesteps(1000, 10) == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert ddim_timesteps(20, 20) == list(range(19, -1, -1))
    for bad in (0, 21):
        with pytest.raises(ValueError, match="steps must be between 1 and 20"):
            ddim_timesteps(20, bad)


def test_ddim_eta1_all_steps_is_the_ddpm_posterior():
    sch = NoiseScheduler(1000)
    g = torch.Generator().manual_seed(3)
    for t in (999, 500, 37, 1):
        x0 = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
        x_t = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
        _, mean, var = ddim_step(
            sch, x_t, t, t - 1, x0, sch.predict_eps(x_t, torch.full((2,), t), x0), 1.0, torch.zeros_like(x_t)
        )
        post_mean, post_var = sch.q_posterior(x0, x_t, torch.full((2,), t))
        assert torch.allclose(mean, post_mean, atol=1e-9), t
        assert torch.allclose(var, post_var[0].flatten()[0], rtol=1e-9), t


def test_ddim_eta0_is_deterministic_and_ddpm_is_seeded():
    model, sch = tiny_unet(), NoiseScheduler(40)
    cond = text(2, 4)
    a = sample(model, sch, cond, sampler="ddim", steps=8, eta=0.0, generator=0)
    b = sample(model, sch, cond, sampler="ddim", steps=8, eta=0.0, generator=0)
    assert torch.equal(a, b)
    # eta = 0 draws only the starting noise: another generator state changes only x_T
    d1 = sample(model, sch, cond, sampler="ddpm", generator=5)
    d2 = sample(model, sch, cond, sampler="ddpm", generator=torch.Generator().manual_seed(5))
    d3 = sample(model, sch, cond, sampler="ddpm", generator=6)
    assert torch.equal(d1, d2)
    assert (d1 - d3).abs().max() > 1e-2
    assert d1.min() >= -1 and d1.max() <= 1


def test_sampler_rejects_bad_arguments():
    model, sch, cond = tiny_unet(), NoiseScheduler(10), text(1, 3)
    with pytest.raises(ValueError, match="guidance_scale"):
        sample(model, sch, cond, cond, guidance_scale=-1)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(model, sch, cond, sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        sample(model, sch, cond, sampler="ddim", steps=11)
    with pytest.raises(ValueError, match="steps"):
        sample(model, sch, cond, sampler="dpmpp_2m", steps=0)
    with pytest.raises(ValueError, match="eta must be in"):
        SamplerConfig(sampler="ddim", eta=1.5)


def test_sampler_settings_say_which_of_them_have_no_effect():
    assert set(SamplerConfig(sampler="dpmpp_2m", guidance_scale=3.0).unused()) == {"eta"}
    assert set(SamplerConfig(sampler="ddpm", guidance_scale=3.0).unused()) == {"steps", "eta"}
    assert set(SamplerConfig(sampler="ddim", guidance_scale=3.0).unused()) == set()
    assert set(SamplerConfig(sampler="ddim", guidance_scale=1.0).unused()) == {"guidance_t_min"}


def test_per_image_noise_does_not_depend_on_the_batch_and_differs_between_images_and_seeds():
    model, sch = tiny_unet(), NoiseScheduler(20)
    ctx, mask = text(4, 3)
    draw = lambda gens, rows: sample(
        model, sch, (ctx[rows], mask[rows]), sampler="ddim", steps=4, eta=1.0, generator=gens
    )
    whole = draw(image_generators(7, 4), slice(0, 4))
    halves = torch.cat([draw(image_generators(7, 2), slice(0, 2)), draw(image_generators(7, 2, start=2), slice(2, 4))])
    # the same noise: equal up to float rounding (some CPUs' kernels sum in an order that depends on the batch size);
    # noise that depended on the batch would differ by O(1)
    torch.testing.assert_close(whole, halves, atol=1e-3, rtol=0)
    first = lambda seed, i: torch.randn(4, generator=image_generators(seed, 1, start=i)[0])
    streams = [first(seed, i) for seed in (0, 1) for i in (0, 1, 2**16)]
    assert all(not torch.equal(a, b) for j, a in enumerate(streams) for b in streams[j + 1 :])


@pytest.mark.parametrize("steps", [5, 10])
@pytest.mark.parametrize("prediction_type", ["v", "eps"])
def test_dpmpp_2m_and_ddim_draw_what_diffusers_schedulers_draw(steps, prediction_type):
    """Our U-Net driven by diffusers' DPMSolverMultistepScheduler (DPM-Solver++, order 2, first order
    on the last step down to sigma 0) and DDIMScheduler (eta 0) gives our samplers' images. Both sides
    pinned to the same choices: the cosine schedule (squaredcos_cap_v2), trailing timesteps (with steps
    dividing T: diffusers' DDIM steps to t - T // steps), x_0 clipped to [-1, 1] (thresholding with
    a maximum of 1 is exactly that clip) and, for DDIM, eps recomputed from the clipped x_0."""
    diffusers = pytest.importorskip("diffusers")
    model, sch = tiny_unet(), NoiseScheduler(1000, prediction_type)
    cond, uncond = text(2, 4, seed=1), text(2, 4, seed=2)
    common = dict(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type={"v": "v_prediction", "eps": "epsilon"}[prediction_type],
        timestep_spacing="trailing",
    )
    dpm = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="dpmsolver++",
        solver_order=2,
        lower_order_final=True,
        final_sigmas_type="zero",
        thresholding=True,
        sample_max_value=1.0,
        **common,
    )
    ddim = diffusers.DDIMScheduler(clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, **common)
    for ours, theirs, kw in (("dpmpp_2m", dpm, {}), ("ddim", ddim, dict(eta=0.0, use_clipped_model_output=True))):
        theirs.set_timesteps(steps)
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        assert theirs.timesteps.tolist() == ddim_timesteps(1000, steps)
        for t in theirs.timesteps:
            x = theirs.step(
                guided_output(model, x, torch.full((2,), int(t)), cond, uncond, 3.0), t, x, **kw
            ).prev_sample
        mine = sample(model, sch, cond, uncond, sampler=ours, steps=steps, guidance_scale=3.0, generator=0)
        assert (x.clamp(-1, 1) - mine).abs().max() < 1e-4, (ours, (x.clamp(-1, 1) - mine).abs().max())


# ----------------------------------------------------------------------------- training signal


def test_one_loss_reaches_every_parameter():
    torch.manual_seed(0)
    model = UNet(UNetConfig(image_size=16, **TINY)).train()
    sch = NoiseScheduler(100)
    ctx, mask = text(4, 5, real=3)
    # three steps: at init the zero-initialised layers (conv_out, then each block's last conv)
    # block the gradient to what lies before them, one layer of zeros per step
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        diffusion_loss(model, sch, torch.rand(4, 3, 16, 16) * 2 - 1, ctx, mask).backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, f"parameters without gradient: {dead}"


class GaussianOracle(torch.nn.Module):
    """The exact predictor for data x_0 ~ N(mu, sigma^2 I), one mu per caption (row c of `mus` for a
    context whose first number is c). For x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps,
    E[x_0 | x_t] = mu + k (x_t - sqrt(abar) mu) with k = sqrt(abar) sigma^2 / (abar sigma^2 + 1 - abar);
    eps and v follow from it. sigma = 0 is a point mass at mu."""

    cfg = UNetConfig(image_size=8, base_channels=32, channel_mults=(1,), attention_levels=())

    def __init__(self, sch, mus, sigma):
        super().__init__()
        self.sch, self.mus, self.sigma = sch, mus, sigma

    def forward(self, x, t, context, mask):
        abar = self.sch.alphas_cumprod[t][:, None, None, None]
        mu = self.mus[context[:, 0, 0].long()]
        x0 = mu + abar.sqrt() * self.sigma**2 / (abar * self.sigma**2 + 1 - abar) * (x - abar.sqrt() * mu)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        return (eps if self.sch.prediction_type == "eps" else abar.sqrt() * eps - (1 - abar).sqrt() * x0).float()


def caption(c, B):
    """Context rows that GaussianOracle reads as caption c."""
    return torch.full((B, 1, 4), float(c)), torch.ones(B, 1, dtype=torch.bool)


def chain(abars, eta, sigma):
    """The sampler's chain on N(mu, sigma^2) data, worked out on paper: each DDIM step (Song et al.
    Eq. 12; eta = 1 at all T steps is DDPM's posterior step) with the exact x_0 is affine,
    x' = alpha x + beta mu + s z, so from x_T ~ N(0, 1) the output is A x_T + b mu + N(0, var).
    abars: abar at the visited timesteps, then 1 (the clean image). Float64 scalars throughout."""
    A, b, var = 1.0, 0.0, 0.0
    for a_t, a_p in zip(abars[:-1], abars[1:]):
        k = math.sqrt(a_t) * sigma**2 / (a_t * sigma**2 + 1 - a_t)  # x0 = k x + (1 - k sqrt(a_t)) mu
        s2 = eta**2 * (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        c = math.sqrt(max(0.0, 1 - a_p - s2)) / math.sqrt(1 - a_t)  # eps = (x - sqrt(a_t) x0) / sqrt(1 - a_t)
        alpha = math.sqrt(a_p) * k + c * (1 - math.sqrt(a_t) * k)
        beta = (math.sqrt(a_p) - c * math.sqrt(a_t)) * (1 - k * math.sqrt(a_t))
        A, b, var = alpha * A, alpha * b + beta, alpha**2 * var + s2
    return A, b, var


def visited(sch, timesteps):
    return [sch.alphas_cumprod[t].item() for t in timesteps] + [1.0]


SIGMA = 0.1
MU = (
    torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.2 - 0.1
)  # two captions' means, in [-0.1, 0.1]


def assert_normal(x, mean, std, what):
    """x (B, ...) is drawn from N(mean, std^2) per coordinate: the pooled standardized mean and std,
    and every coordinate's batch mean, within 5 standard errors."""
    z = (x - mean) / std
    n, B = z.numel(), x.shape[0]
    assert abs(z.mean().item()) < 5 / math.sqrt(n), (what, z.mean().item())
    assert abs(z.std().item() - 1) < 5 / math.sqrt(2 * n), (what, z.std().item())
    assert z.mean(0).abs().max().item() < 5 / math.sqrt(B) + 5 / math.sqrt(n), (what, z.mean(0).abs().max().item())


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_ddpm_and_ddim_eta1_on_gaussian_data_draw_the_moments_of_their_chain(prediction_type):
    """Monte Carlo through sample() against the moments of the chain worked out in `chain`; DDPM-1000's
    chain ends within 2.5% of the data's sigma (its variance drops Var(x_0 | x_t) at every step, the
    gap Analytic-DPM closes), so DDPM-1000 draws the data distribution."""
    sch, B = NoiseScheduler(1000, prediction_type), 1024
    oracle = GaussianOracle(sch, MU, SIGMA)
    for kw in (dict(sampler="ddpm"), dict(sampler="ddim", steps=100, eta=1.0), dict(sampler="ddim", steps=10, eta=1.0)):
        steps = range(999, -1, -1) if kw["sampler"] == "ddpm" else ddim_timesteps(1000, kw["steps"])
        A, b, var = chain(visited(sch, steps), 1.0, SIGMA)
        x = sample(oracle, sch, caption(1, B), generator=0, **kw)
        assert_normal(x, b * MU[1], math.sqrt(A**2 + var), kw)
        if kw["sampler"] == "ddpm":
            assert abs(b - 1) < 1e-3 and abs(math.sqrt(A**2 + var) / SIGMA - 1) < 0.025, (b, math.sqrt(A**2 + var))


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_ddim_eta0_on_gaussian_data_follows_the_probability_flow(prediction_type):
    """For Gaussian data the probability-flow ODE keeps each coordinate's standardized value
    (x_t - sqrt(abar_t) mu) / sqrt(abar_t sigma^2 + 1 - abar_t) (an affine flow between 1-D
    Gaussians is the monotone map), so x_0 = mu + sigma (x_T - sqrt(abar_T) mu) / sqrt(abar_T sigma^2 + 1 - abar_T).
    DDIM-1000 at eta 0 lands there within 6% of sigma (its first-order error); with 25 steps it is
    exactly the chain's affine map, 0.1% of sigma."""
    sch, B = NoiseScheduler(1000, prediction_type), 64
    oracle = GaussianOracle(sch, MU, SIGMA)
    for steps, tol in ((1000, 0.06), (25, 1e-3)):
        start = {}
        x = sample(
            oracle,
            sch,
            caption(1, B),
            sampler="ddim",
            steps=steps,
            eta=0.0,
            generator=2,
            callback=lambda i, t, x_t, x0: start.setdefault("x_T", x_t.clone()),
        )
        x_T, a_T = start["x_T"].double(), sch.alphas_cumprod[999].item()
        if steps == 1000:
            expected = MU[1] + SIGMA * (x_T - math.sqrt(a_T) * MU[1]) / math.sqrt(a_T * SIGMA**2 + 1 - a_T)
        else:
            A, b, _ = chain(visited(sch, ddim_timesteps(1000, steps)), 0.0, SIGMA)
            expected = A * x_T + b * MU[1]
        assert (x - expected).abs().max().item() < tol * SIGMA, (steps, (x - expected).abs().max().item() / SIGMA)


def dpmpp_chain(abars, sigma):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on N(mu, sigma^2) data, worked out on paper:
    the exact x_0 prediction is affine in (x_T, mu), so every quantity is a pair (coefficient of x_T,
    coefficient of mu). abars: abar at the visited timesteps. Returns (A, b): x_0 = A x_T + b mu."""
    lam = lambda a: 0.5 * math.log(a / (1 - a))  # log(alpha / sigma)
    x, x0_prev, h_prev = (1.0, 0.0), None, None
    for i, a in enumerate(abars):
        k = math.sqrt(a) * sigma**2 / (a * sigma**2 + 1 - a)
        x0 = (k * x[0], k * x[1] + 1 - k * math.sqrt(a))
        if i == len(abars) - 1:  # the last step, to sigma = 0, lands on the prediction
            return x0
        a_next = abars[i + 1]
        h = lam(a_next) - lam(a)
        if x0_prev is None:
            D = x0
        else:
            r = h_prev / h
            D = tuple((1 + 1 / (2 * r)) * p - 1 / (2 * r) * q for p, q in zip(x0, x0_prev))
        ratio, c = math.sqrt((1 - a_next) / (1 - a)), math.sqrt(a_next) * (math.exp(-h) - 1)
        x = tuple(ratio * xi - c * di for xi, di in zip(x, D))
        x0_prev, h_prev = x0, h


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_dpmpp_2m_on_gaussian_data_is_its_chain_and_a_second_order_solver_of_the_flow(prediction_type):
    """With 8 steps DPM-Solver++(2M) is exactly its chain worked out in `dpmpp_chain`; with many
    steps it approaches the probability-flow ODE's end point (see the DDIM test above) faster than
    DDIM: at 250 steps at least 3 times closer, at 1000 within 1% of sigma."""
    sch, B = NoiseScheduler(1000, prediction_type), 64
    oracle = GaussianOracle(sch, MU, SIGMA)
    a_T = sch.alphas_cumprod[999].item()
    flow_end = lambda x_T: MU[1] + SIGMA * (x_T - math.sqrt(a_T) * MU[1]) / math.sqrt(a_T * SIGMA**2 + 1 - a_T)
    errors = {}
    for sampler, steps in (("dpmpp_2m", 8), ("dpmpp_2m", 250), ("ddim", 250), ("dpmpp_2m", 1000)):
        x_T = torch.randn(B, 3, 8, 8, generator=torch.Generator().manual_seed(2)).double()
        x = sample(oracle, sch, caption(1, B), sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(2))
        if steps == 8:
            A, b = dpmpp_chain([sch.alphas_cumprod[t].item() for t in ddim_timesteps(1000, 8)], SIGMA)
            assert (x - (A * x_T + b * MU[1])).abs().max().item() < 1e-3 * SIGMA
        errors[sampler, steps] = (x - flow_end(x_T)).abs().max().item() / SIGMA
    assert errors["dpmpp_2m", 250] * 3 < errors["ddim", 250], errors
    assert errors["dpmpp_2m", 1000] < 0.01, errors


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_cfg_between_two_gaussians_lands_on_the_extrapolated_mean(prediction_type):
    """Captions 1 and 0 (the unconditional one) are N(mu_1, sigma^2) and N(mu_0, sigma^2): x_0's
    prediction is affine in mu, so guidance w predicts for N(mu_0 + w (mu_1 - mu_0), sigma^2) and
    DDPM draws from that Gaussian's chain."""
    sch, B, w = NoiseScheduler(1000, prediction_type), 512, 3.0
    A, b, var = chain(visited(sch, range(999, -1, -1)), 1.0, SIGMA)
    x = sample(GaussianOracle(sch, MU, SIGMA), sch, caption(1, B), caption(0, 1), guidance_scale=w, generator=1)
    assert_normal(x, b * (MU[0] + w * (MU[1] - MU[0])), math.sqrt(A**2 + var), "cfg")


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_samplers_recover_the_single_image_of_a_point_mass(prediction_type):
    """If the data is one image x* (sigma 0), every sampler, guided or not, must land on x*."""
    sch = NoiseScheduler(1000, prediction_type)
    oracle = GaussianOracle(sch, MU[1:].expand(2, -1, -1, -1), 0.0)
    samplers = (dict(sampler="ddpm"), dict(sampler="ddim", steps=25), dict(sampler="ddim", steps=10, eta=1.0))
    for kw in samplers + (dict(sampler="dpmpp_2m", steps=8),):
        for w in (1.0, 3.0):
            out = sample(oracle, sch, caption(1, 2), caption(0, 1), guidance_scale=w, generator=0, **kw)
            assert torch.allclose(out, MU[1:].expand_as(out), atol=1e-4), (kw, w)


def test_a_checkpoint_rebuilds_the_prediction_type_it_was_trained_with():
    import checkpoints

    for kind in ("eps", "v"):
        assert checkpoints.build_scheduler({"num_timesteps": 10, "prediction_type": kind}).prediction_type == kind
