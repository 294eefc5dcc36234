"""
A text-conditioned diffusion model, small enough to read top to bottom.

The story, in the order the file tells it:

1. Timesteps become vectors (sinusoidal embedding -> MLP), exactly like word positions in a
   Transformer, so the network knows how noisy its input is.
2. `ResnetBlock`: two 3x3 convolutions with a residual path; the timestep enters as a per-channel
   scale and shift between them.
3. `SpatialTransformer`: the image's pixels become tokens that attend to each other
   (self-attention) and to the caption's tokens (cross-attention). This is where the text steers
   the image.
4. `UNet`: ResnetBlocks and SpatialTransformers stacked into an encoder that halves the
   resolution level by level, a middle, and a decoder that doubles it back, with skip connections
   from each encoder step to its mirror in the decoder. It predicts the noise eps in x_t, or the
   velocity v (Salimans & Ho 2022), from which the clean image and the noise both follow.
5. `NoiseScheduler`: the cosine schedule of Nichol & Dhariwal (2021), the forward process
   q(x_t | x_0), the posterior q(x_{t-1} | x_t, x_0), and the conversions between eps, v and x_0.
6. Samplers: a denoiser that applies classifier-free guidance (Ho & Salimans 2022), and over it
   DDPM ancestral sampling (Algorithm 2 of Ho et al. 2020), DDIM (Song et al. 2021) and
   DPM-Solver++(2M) (Lu et al. 2022), one short function each.

Shapes use B = batch, C = channels, H, W = height and width, L = text tokens, D = text width.
"""

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

# -----------------------------------------------------------------------------
# 1. Timestep embedding


def timestep_embedding(t, dim, max_period=10000.0):
    """Sinusoidal features of the timesteps t (B,) -> (B, dim), geometric frequencies from 1 to
    1/max_period, as for positions in "Attention is all you need"."""
    assert dim % 2 == 0
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)  # (dim/2,)
    angles = t.float()[:, None] * freqs[None, :]  # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # (B, dim)


def position_embedding_2d(H, W, dim):
    """Fixed 2D sin-cos position of every pixel (as DiT adds to its patches): the first half of
    the features encodes the row, the second half the column, each with the timestep's sinusoids.
    Returns (H*W, dim), row-major like the tokens of `SpatialTransformer`."""
    assert dim % 4 == 0, "half of the features per axis, each half cos and sin"
    rows = timestep_embedding(torch.arange(H), dim // 2)  # (H, dim/2)
    cols = timestep_embedding(torch.arange(W), dim // 2)  # (W, dim/2)
    return torch.cat([rows[:, None].expand(H, W, -1), cols[None, :].expand(H, W, -1)], dim=-1).reshape(H * W, dim)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever its input: under bf16 autocast the statistics of a
    group keep their precision. CUDA's autocast does this for every norm; the CPU's does not, and
    its bf16 GroupNorm is also several times slower than fp32 (docs/performance.md)."""

    def forward(self, x):
        return super().forward(x.float())


def group_norm(channels):
    """GroupNorm with at least 4 channels a group (32 groups from 128 channels up, as in Ho et al.).
    A group of one channel would be instance norm: it erases each channel's mean, and with it the
    image's mean brightness and color, which the network must carry to predict eps at high noise."""
    return GroupNorm32(min(32, channels // 4), channels, eps=1e-6)


def zero_init(module):
    """Zero a layer's weights so that the residual branch it ends starts as the identity: the
    untrained network passes its input straight through, which makes deep U-Nets train stably."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


# -----------------------------------------------------------------------------
# 2. ResnetBlock


class ResnetBlock(nn.Module):
    """norm -> SiLU -> conv3x3, then the timestep as (1 + scale, shift) per channel, then
    norm -> SiLU -> dropout -> conv3x3 (zero-initialised), plus the (1x1-projected) input."""

    def __init__(self, in_ch, out_ch, time_dim, dropout=0.0):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_proj = nn.Linear(time_dim, 2 * out_ch)  # -> scale and shift
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out_ch, H, W)
        scale, shift = self.time_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)  # (B, out_ch, 1, 1) each
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


# -----------------------------------------------------------------------------
# 3. SpatialTransformer: self-attention, cross-attention to the text, feed-forward


def attention(q, k, v, mask=None):
    """softmax(q k^T / sqrt(d)) v for (B, heads, N, d) queries and (B, heads, L, d) keys and values;
    `mask` (B, 1, 1, L) is True where a key may be attended to. Under the CPU's bf16 autocast it runs
    in fp32: torch's bf16 attention backward on the CPU is many times slower than fp32 at these
    sizes (docs/performance.md); on CUDA bf16 attention is the fast one."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class SelfAttention(nn.Module):
    """Multi-head attention of the image tokens to each other; q, k and v come from one matmul."""

    def __init__(self, dim, n_heads):
        super().__init__()
        assert dim % n_heads == 0, f"channels {dim} must divide into {n_heads} heads"
        self.n_heads = n_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        # (B, heads, N, C/heads) each
        q, k, v = self.qkv(x).view(B, N, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        h = attention(q, k, v)  # (B, heads, N, C/heads)
        return self.out(h.transpose(1, 2).reshape(B, N, C))


class CrossAttention(nn.Module):
    """Multi-head attention of the image tokens (queries) to the text tokens (keys and values).
    `mask` (B, L) is True for real tokens: padding receives no attention. Every caption has at
    least its start and end tokens, so no row of the mask is all False."""

    def __init__(self, dim, context_dim, n_heads):
        super().__init__()
        assert dim % n_heads == 0, f"channels {dim} must divide into {n_heads} heads"
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, context, mask=None):
        B, N, C = x.shape
        L = context.shape[1]
        heads, d = self.n_heads, C // self.n_heads
        q = self.q(x).view(B, N, heads, d).transpose(1, 2)  # (B, heads, N, d)
        k, v = self.kv(context).view(B, L, 2, heads, d).permute(2, 0, 3, 1, 4)  # (B, heads, L, d) each
        attn_mask = None if mask is None else mask[:, None, None, :].bool()  # (B, 1, 1, L): over heads and queries
        h = attention(q, k, v, attn_mask)  # (B, heads, N, d)
        return self.out(h.transpose(1, 2).reshape(B, N, C))


class FeedForward(nn.Module):
    """GEGLU (Shazeer 2020): a GELU-gated linear unit, 4x wide."""

    def __init__(self, dim, mult=4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm Transformer layer on image tokens: self-attention, cross-attention, feed-forward."""

    def __init__(self, dim, n_heads, context_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.self_attn = SelfAttention(dim, n_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, context_dim, n_heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context, mask=None):
        x = x + self.self_attn(self.norm1(x))
        x = x + self.cross_attn(self.norm2(x), context, mask)
        x = x + self.ff(self.norm3(x))
        return x


class SpatialTransformer(nn.Module):
    """norm -> 1x1 proj_in -> tokens (B, H*W, C) (+ their 2D positions) -> Transformer blocks ->
    1x1 proj_out (zero-initialised, so the block starts as the identity) -> + input.

    Attention is blind to order: without `resolution`, a token knows where it is only through
    what the convolutions' zero padding leaked into its features. With it, a fixed sin-cos
    position is added to every token, so "top left" in the caption can meet "top left" in the image."""

    def __init__(self, channels, n_heads, context_dim, depth=1, resolution=None):
        super().__init__()
        self.norm = group_norm(channels)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.blocks = nn.ModuleList([TransformerBlock(channels, n_heads, context_dim) for _ in range(depth)])
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))
        pos = position_embedding_2d(resolution, resolution, channels) if resolution else None
        self.register_buffer("pos_embed", pos, persistent=False)  # (H*W, C) or None; fixed, so not in the checkpoint

    def forward(self, x, context, mask=None):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # (B, H*W, C)
        if self.pos_embed is not None:
            assert self.pos_embed.shape[0] == H * W, f"position table for {self.pos_embed.shape[0]} tokens, got {H}x{W}"
            h = h + self.pos_embed.to(h.dtype)
        for block in self.blocks:
            h = block(h, context, mask)
        h = h.transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class TextLayer(nn.Module):
    """A pre-norm Transformer layer over the frozen encoder's caption tokens (B, L, D), trained with the U-Net:
    self-attention among the real tokens (padding masked), then a feed-forward. A frozen sentence encoder spreads
    each word over the whole caption; this lets the model gather, say, "red circle" into the tokens of "top left"
    of the same phrase, so that an image token that looks up its place also finds what goes there. Both branches
    start at zero (the layer starts as the identity)."""

    def __init__(self, dim, n_heads):
        super().__init__()
        assert dim % n_heads == 0, f"text width {dim} must divide into {n_heads} heads"
        self.n_heads = n_heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = zero_init(nn.Linear(dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=2)
        zero_init(self.ff.out)

    def forward(self, context, mask=None):
        B, L, D = context.shape
        q, k, v = self.qkv(self.norm1(context)).view(B, L, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :].bool()  # (B, 1, 1, L): real tokens as keys
        h = attention(q, k, v, attn_mask)  # (B, heads, L, D/heads)
        context = context + self.out(h.transpose(1, 2).reshape(B, L, D))
        return context + self.ff(self.norm2(context))


# -----------------------------------------------------------------------------
# 4. The U-Net


@dataclass
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    base_channels: int = 64
    channel_mults: tuple = (1, 2, 2)  # channels per level = base_channels * mult; one level per resolution
    num_res_blocks: int = 2  # ResnetBlocks per level on the way down (one more on the way up)
    attention_levels: tuple = (1, 2)  # levels (0 = full resolution) that get a SpatialTransformer
    n_heads: int = 4
    context_dim: int = 384  # width of the text encoder's token embeddings
    dropout: float = 0.0
    pos_embed: bool = False  # add a fixed 2D sin-cos position to the image tokens of every SpatialTransformer
    coord_conv: bool = False  # feed conv_in two extra channels holding each pixel's (x, y) in [-1, 1] (CoordConv)
    patch_size: int = 1  # > 1: the U-Net works on cells of p x p pixels (PixelUnshuffle in, PixelShuffle out)
    text_layers: int = 0  # TextLayers over the caption tokens before any cross-attention reads them

    def __post_init__(self):
        self.channel_mults = tuple(self.channel_mults)
        self.attention_levels = tuple(self.attention_levels)
        factor = 2 ** (len(self.channel_mults) - 1) * self.patch_size
        if self.image_size % factor != 0:
            patches = f" after patches of {self.patch_size}" if self.patch_size > 1 else ""
            raise ValueError(
                f"image_size {self.image_size} cannot be halved {len(self.channel_mults) - 1} times{patches} "
                f"by channel_mults {self.channel_mults}: use a multiple of {factor} (e.g. "
                f"{max(factor, self.image_size // factor * factor)})"
            )
        if self.base_channels % 32 != 0:
            raise ValueError(f"base_channels {self.base_channels} must be a multiple of 32 (for GroupNorm's groups)")
        for level in self.attention_levels:
            if not 0 <= level < len(self.channel_mults):
                raise ValueError(f"attention level {level} does not exist: levels are 0..{len(self.channel_mults) - 1}")
        for mult in self.channel_mults:
            if (self.base_channels * mult) % self.n_heads != 0:
                raise ValueError(f"channels {self.base_channels * mult} do not divide into n_heads={self.n_heads}")


class ResAttn(nn.Module):
    """One step of the U-Net: a ResnetBlock, followed by a SpatialTransformer on attention levels."""

    def __init__(self, in_ch, out_ch, time_dim, cfg, use_attn, resolution):
        super().__init__()
        self.res = ResnetBlock(in_ch, out_ch, time_dim, cfg.dropout)
        self.attn = (
            SpatialTransformer(out_ch, cfg.n_heads, cfg.context_dim, resolution=resolution if cfg.pos_embed else None)
            if use_attn
            else None
        )

    def forward(self, x, temb, context, mask):
        x = self.res(x, temb)
        if self.attn is not None:
            x = self.attn(x, context, mask)
        return x


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class UNet(nn.Module):
    """f_theta(x_t, t, text): predicts the noise in x_t (or the velocity v, as the scheduler says).

    down: conv_in, then per level num_res_blocks ResAttn steps and (except at the lowest
          resolution) a Downsample; every output is kept as a skip connection.
    mid:  ResnetBlock -> SpatialTransformer -> ResnetBlock at the lowest resolution.
    up:   per level, from the lowest, num_res_blocks + 1 ResAttn steps, each fed the concatenation
          of the current features and one skip (last in, first out), then an Upsample.
    out:  norm -> SiLU -> conv3x3 (zero-initialised) back to the image's channels.

    patch_size p > 1 folds each p x p cell of pixels into channels before conv_in (PixelUnshuffle:
    (B, 3, H, W) -> (B, 3 p^2, H/p, W/p)) and unfolds conv_out's 3 p^2 channels back into pixels
    (PixelShuffle), as DiT cuts images into patches: every level then costs what it costs at H/p,
    about p^2 times less, while the loss and the samples stay at full resolution.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.base_channels
        time_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        p, size = cfg.patch_size, cfg.image_size // cfg.patch_size  # size: the side of the feature maps at level 0
        coords = None
        if cfg.coord_conv:  # (1, 2, S, S): channel 0 is x (left = -1), channel 1 is y (top = -1)
            y, x = torch.meshgrid(
                torch.linspace(-1, 1, cfg.image_size), torch.linspace(-1, 1, cfg.image_size), indexing="ij"
            )
            coords = torch.stack([x, y])[None]
        self.register_buffer("coords", coords, persistent=False)
        # without patches no fold at all: pixel_(un)shuffle by 1 would still copy the tensor
        self.fold, self.unfold = (nn.PixelUnshuffle(p), nn.PixelShuffle(p)) if p > 1 else (nn.Identity(), nn.Identity())
        self.conv_in = nn.Conv2d((cfg.in_channels + (2 if cfg.coord_conv else 0)) * p * p, ch, 3, padding=1)

        self.text_layers = nn.ModuleList([TextLayer(cfg.context_dim, cfg.n_heads) for _ in range(cfg.text_layers)])

        self.down = nn.ModuleList()
        skip_chs = [ch]
        res = lambda level: size // 2**level  # side of the feature maps at a level
        for level, mult in enumerate(cfg.channel_mults):
            for _ in range(cfg.num_res_blocks):
                self.down.append(
                    ResAttn(ch, cfg.base_channels * mult, time_dim, cfg, level in cfg.attention_levels, res(level))
                )
                ch = cfg.base_channels * mult
                skip_chs.append(ch)
            if level != len(cfg.channel_mults) - 1:
                self.down.append(Downsample(ch))
                skip_chs.append(ch)

        self.mid_res1 = ResnetBlock(ch, ch, time_dim, cfg.dropout)
        lowest = res(len(cfg.channel_mults) - 1)
        self.mid_attn = SpatialTransformer(
            ch, cfg.n_heads, cfg.context_dim, resolution=lowest if cfg.pos_embed else None
        )
        self.mid_res2 = ResnetBlock(ch, ch, time_dim, cfg.dropout)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mults))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(
                    ResAttn(
                        ch + skip_chs.pop(),
                        cfg.base_channels * mult,
                        time_dim,
                        cfg,
                        level in cfg.attention_levels,
                        res(level),
                    )
                )
                ch = cfg.base_channels * mult
            if level != 0:
                self.up.append(Upsample(ch))
        assert not skip_chs, "every skip connection is consumed exactly once"

        self.norm_out = group_norm(ch)
        self.conv_out = zero_init(nn.Conv2d(ch, cfg.in_channels * p * p, 3, padding=1))

    def forward(self, x, t, context, context_mask=None):
        """x (B, 3, H, W), t (B,) integer timesteps, context (B, L, D), context_mask (B, L) True for
        real tokens. Returns the prediction (eps or v), (B, 3, H, W)."""
        B, C, H, W = x.shape
        assert H == W == self.cfg.image_size, f"expected {self.cfg.image_size}px images, got {H}x{W}"
        temb = self.time_mlp(timestep_embedding(t, self.cfg.base_channels))  # (B, 4*base)
        for layer in self.text_layers:
            context = layer(context, context_mask)  # (B, L, D)

        if self.coords is not None:
            x = torch.cat([x, self.coords.to(x.dtype).expand(B, -1, -1, -1)], dim=1)  # (B, 3 + 2, H, W)
        h = self.conv_in(self.fold(x))  # (B, base, H/p, W/p)
        skips = [h]
        for block in self.down:
            h = block(h, temb, context, context_mask) if isinstance(block, ResAttn) else block(h)
            skips.append(h)

        h = self.mid_res1(h, temb)
        h = self.mid_attn(h, context, context_mask)
        h = self.mid_res2(h, temb)

        for block in self.up:
            if isinstance(block, ResAttn):
                h = block(torch.cat([h, skips.pop()], dim=1), temb, context, context_mask)
            else:
                h = block(h)
        return self.unfold(self.conv_out(F.silu(self.norm_out(h))))  # (B, 3, H, W)


# -----------------------------------------------------------------------------
# 5. The noise schedule


class NoiseScheduler(nn.Module):
    """The cosine schedule of Nichol & Dhariwal (2021), Eq. 17:

        alphas_cumprod[t] = f(t + 1) / f(0),  f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2),  s = 0.008

    for t = 0 .. T-1 (index t is the noise level after t + 1 forward steps), with
    beta_t = 1 - alphas_cumprod[t] / alphas_cumprod[t-1] clipped at 0.999 so the last step stays
    finite. Everything is computed and kept in float64, as buffers named after the formula they
    hold (`scheduler.to(device)` moves them), and cast to the images' dtype where it is used:
    near t = 0, 1 - abar_t is so small that float32 would lose a third of its digits.

    `prediction_type` says what the U-Net predicts, and so what the loss compares it with:
    "eps", the noise (Ho et al. 2020), or "v" = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0, the
    velocity (Salimans & Ho 2022). Both give x_0 and eps exactly; they differ in where the error
    lands. At t = T-1 the cosine schedule leaves abar = 2.4e-9, so x_0 from eps divides eps's error by
    sqrt(abar) (x 20,000), while v there is -x_0 itself: the first steps of a sampler start from
    a usable picture instead of amplified noise.
    """

    def __init__(self, num_timesteps=1000, prediction_type="eps", s=0.008):
        super().__init__()
        if prediction_type not in ("eps", "v"):
            raise ValueError(f"prediction_type must be 'eps' or 'v', got {prediction_type!r}")
        T = num_timesteps
        self.num_timesteps = T
        self.prediction_type = prediction_type
        f = lambda t: torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
        steps = torch.arange(T + 1, dtype=torch.float64)
        alphas_cumprod_unclipped = f(steps) / f(torch.zeros((), dtype=torch.float64))  # (T+1,), [0] = 1
        betas = (1 - alphas_cumprod_unclipped[1:] / alphas_cumprod_unclipped[:-1]).clamp(max=0.999)  # (T,)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance), Ho et al. Eq. 7.
        posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)

        buffers = dict(
            betas=betas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas_cumprod=(1 / alphas_cumprod).sqrt(),
            sqrt_recipm1_alphas_cumprod=(1 / alphas_cumprod - 1).sqrt(),
            posterior_variance=posterior_variance,
            posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            posterior_mean_coef2=(1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        )
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    @staticmethod
    def _at(buffer, t, x):
        return buffer[t].to(x.dtype)[:, None, None, None]  # (B,) -> (B, 1, 1, 1), broadcasts over images

    def q_sample(self, x0, t, noise):
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with the given noise."""
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def predict_x0(self, x_t, t, eps):
        """Invert q_sample: x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        return (
            self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps
        )

    def predict_eps(self, x_t, t, x0):
        """The noise that takes x_0 to x_t: eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t)."""
        return (self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / self._at(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def velocity(self, x0, t, eps):
        """The v target: v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, Sec. 4)."""
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0) * eps - self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0
        )

    def target(self, x0, t, eps):
        """What the U-Net learns to output for x_t = q_sample(x0, t, eps): eps, or v."""
        return eps if self.prediction_type == "eps" else self.velocity(x0, t, eps)

    def predict_x0_eps(self, x_t, t, output):
        """The U-Net's output -> (x_0, eps). For v, x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps and
        v together are a rotation of (x_0, eps), so x_0 = sqrt(abar) x_t - sqrt(1 - abar) v and
        eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
        if self.prediction_type == "eps":
            return self.predict_x0(x_t, t, output), output
        a, b = self._at(self.sqrt_alphas_cumprod, t, x_t), self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return a * x_t - b * output, b * x_t + a * output

    def q_posterior(self, x0, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0), Ho et al. Eqs. 6-7."""
        mean = self._at(self.posterior_mean_coef1, t, x0) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t)


def diffusion_loss(model, scheduler, x0, context, mask, t=None, noise=None, min_snr_gamma=0.0):
    """The simple loss of Ho et al. (Algorithm 1), || target - f_theta(x_t, t) ||^2 with t uniform,
    where the target is eps or v (`scheduler.prediction_type`). Validation passes a fixed t and
    noise so that evaluations are comparable.

    min_snr_gamma > 0 weights each image by Min-SNR-gamma (Hang et al. 2023): the loss in x_0 terms,
    SNR_t ||x_0 - x0_hat||^2, with SNR_t = abar_t / (1 - abar_t) clipped at gamma, so that the many
    nearly clean timesteps stop dominating the gradient. Expressed on eps it is min(SNR, gamma) / SNR,
    on v it is min(SNR, gamma) / (SNR + 1)."""
    B = x0.shape[0]
    if t is None:
        t = torch.randint(0, scheduler.num_timesteps, (B,), device=x0.device)
    if noise is None:
        noise = torch.randn_like(x0)
    x_t = scheduler.q_sample(x0, t, noise)
    target = scheduler.target(x0, t, noise)
    if not min_snr_gamma:
        return F.mse_loss(model(x_t, t, context, mask).float(), target.float())
    per_image = (model(x_t, t, context, mask).float() - target.float()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    snr = scheduler.alphas_cumprod[t] / (1 - scheduler.alphas_cumprod[t])  # (B,), float64
    weight = snr.clamp(max=min_snr_gamma) / (snr if scheduler.prediction_type == "eps" else snr + 1)
    return (weight.float() * per_image).mean()


# -----------------------------------------------------------------------------
# 6. Samplers
#
# In the manner of k-diffusion: guidance is built once into a denoiser, (x_t, t) -> (x_0, eps), and
# each sampler is one short function over it with one signature,
#     sampler(denoise, scheduler, x, timesteps, noise, eta, callback) -> x_0,
# where x is x_T, timesteps run from T-1 down, noise() draws fresh N(0, I) like x, and
# callback(i, t, x_t, x0_pred) sees every step. `sample` puts the pieces together.


@dataclass(frozen=True)
class SamplerConfig:
    """How images are drawn, as one value that scripts build once and hand down.

    sampler: "ddpm" (all T steps), "ddim" or "dpmpp_2m" (`steps` trailing steps).
    eta: DDIM's noise, 0 deterministic .. 1 stochastic like DDPM; only DDIM reads it.
    guidance_scale w and guidance_t_min: classifier-free guidance at noise levels t >= guidance_t_min.
    focus_scale w_f: at the same steps, guidance toward a focus, a second text that says what should weigh
        more than the rest of the caption (`guided_output`); the caller hands `sample` its context."""

    sampler: str = "ddpm"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0
    guidance_t_min: int = 0
    focus_scale: float = 0.0

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}: use one of {', '.join(SAMPLERS)}")
        if not self.guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if not self.focus_scale >= 0:
            raise ValueError(f"focus_scale must be >= 0, got {self.focus_scale}")
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")

    @classmethod
    def from_settings(cls, settings):
        """The sampler of a script's settings (an object with these fields among others; one it lacks keeps
        its default: training's evaluations have no focus)."""
        return cls(**{f.name: getattr(settings, f.name, f.default) for f in fields(cls)})

    def timesteps(self, num_timesteps):
        """The noise levels visited, from T-1 down: all of them for DDPM, `steps` trailing ones otherwise."""
        if self.sampler == "ddpm":
            return list(range(num_timesteps - 1, -1, -1))
        return ddim_timesteps(num_timesteps, self.steps)

    def unused(self):
        """The settings this sampler ignores, with what happens instead: {name: reason}."""
        unused = {}
        if self.sampler == "ddpm":
            unused["steps"] = "ddpm always takes all T steps"
        if self.sampler != "ddim":
            unused["eta"] = (
                f"{self.sampler} draws its own noise" if self.sampler == "ddpm" else "dpmpp_2m is deterministic"
            )
        if self.guidance_scale in (0.0, 1.0) and self.focus_scale == 0:
            unused["guidance_t_min"] = f"guidance_scale {self.guidance_scale:g} guides no step"
        return unused


def guided_output(model, x, t, cond, uncond, guidance_scale, focus=None, focus_scale=0.0):
    """Classifier-free guidance (Ho & Salimans 2022): out = out_u + w * (out_c - out_u), on eps or
    on v alike (both are linear in x_0 and eps at a fixed x_t, so guiding either is the same).
    w = 1 is the plain conditional model, w = 0 the unconditional one, w > 1 pushes harder toward
    the caption.

    A focus (a second context, e.g. the caption's type alone) adds its own push, as composable
    diffusion (Liu et al. 2022) adds one term per prompt: out = out_u + w (out_c - out_u) + w_f (out_f - out_u).
    A word that the whole caption drowns out gets a weight of its own.
    All predictions come from one forward pass over a batch of two (or, with a focus, three) copies.
    cond, uncond and focus are (context (B, L, D), mask (B, L)) with the same L."""
    contexts = [cond, uncond] + ([focus] if focus_scale else [])
    n = len(contexts)
    outs = model(
        torch.cat([x] * n), torch.cat([t] * n), torch.cat([c for c, _ in contexts]), torch.cat([m for _, m in contexts])
    ).chunk(n)
    out = outs[1] + guidance_scale * (outs[0] - outs[1])
    return out + focus_scale * (outs[2] - outs[1]) if focus_scale else out


def pad_context(context, L):
    """(tokens (B, L0, D), mask (B, L0)) -> length L >= L0, the new tokens masked out: no query attends
    to them, so the U-Net's output does not change. Contexts of different lengths can then share a batch."""
    tokens, mask = context
    return F.pad(tokens, (0, 0, 0, L - tokens.shape[1])), F.pad(mask, (0, L - mask.shape[1]))


class Denoiser:
    """D(x_t, t) -> (x0_pred, eps_pred) for the captions in `cond`: the U-Net's eps or v turned into
    the clean image, clipped to [-1, 1] (the data's range), and the noise recomputed from the
    clipped image, so that the two stay consistent with x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps.

    Guidance lives here, not in the samplers: at t >= guidance_t_min the output is guided with
    scale w (and focus_scale w_f toward `focus`) in one forward of a doubled (tripled) batch; below,
    the conditional model alone (one forward). Guiding only an interval (Kynkaanniemi et al. 2024)
    keeps the nearly clean steps from bending held-out color x shape pairs into seen ones. w = 0 is
    the unconditional model at every step."""

    def __init__(
        self, model, scheduler, cond, uncond=None, guidance_scale=1.0, guidance_t_min=0, focus=None, focus_scale=0.0
    ):
        B = cond[0].shape[0]
        expand = lambda c: tuple(part.expand(B, *part.shape[1:]) for part in c)  # batch 1 or B -> B
        if guidance_scale != 1.0 or focus_scale:
            assert uncond is not None, "classifier-free guidance needs the unconditional (empty caption) context"
            uncond = expand(uncond)
        if focus_scale:
            assert focus is not None, "focus_scale > 0 needs the focus's context"
            L = max(cond[0].shape[1], uncond[0].shape[1], focus[0].shape[1])
            cond, uncond, focus = (pad_context(expand(c), L) for c in (cond, uncond, focus))
        self.model, self.scheduler, self.cond, self.uncond, self.focus = model, scheduler, cond, uncond, focus
        self.w, self.t_min, self.w_f = guidance_scale, guidance_t_min, focus_scale

    def __call__(self, x, t):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)  # (B,)
        guided = t >= self.t_min
        w = self.w if guided or self.w == 0.0 else 1.0
        w_f = self.w_f if guided else 0.0
        if w == 1.0 and w_f == 0.0:  # the guided formula reduces to one of its terms: skip the others
            out = self.model(x, tt, *self.cond)
        elif w == 0.0 and w_f == 0.0:
            out = self.model(x, tt, *self.uncond)
        else:
            out = guided_output(self.model, x, tt, self.cond, self.uncond, w, self.focus, w_f)
        x0 = self.scheduler.predict_x0_eps(x, tt, out.float())[0].clamp(-1, 1)
        return x0, self.scheduler.predict_eps(x, tt, x0)


def ddim_timesteps(num_timesteps, steps):
    """`steps` timesteps from T-1 down, evenly spaced and "trailing" (Lin et al. 2024, Table 2):
    the first step always starts from pure noise at t = T-1, which a cosine schedule with few
    steps needs. steps = T gives T-1, T-2, ..., 0."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be between 1 and {num_timesteps}, got {steps}")
    return [round(num_timesteps - i * num_timesteps / steps) - 1 for i in range(steps)]


def ddim_step(scheduler, x_t, t, t_prev, x0, eps, eta, noise):
    """One DDIM update (Song et al. 2021, Eq. 12) from t to t_prev (t_prev = -1: to the clean image),
    given the predictions x0 and eps. With eta = 1 over all T steps it is exactly DDPM's posterior
    step. Returns x_{t_prev}, its mean and its variance."""
    abar_t = scheduler.alphas_cumprod[t]  # float64 scalars: the arithmetic below keeps their digits
    abar_prev = scheduler.alphas_cumprod[t_prev] if t_prev >= 0 else torch.ones_like(abar_t)
    variance = eta**2 * (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)  # sigma_t^2
    mean = abar_prev.sqrt().to(x0.dtype) * x0 + (1 - abar_prev - variance).clamp(min=0).sqrt().to(x0.dtype) * eps
    return mean + variance.sqrt().to(x0.dtype) * noise, mean, variance.to(x0.dtype)


def sample_ddpm(denoise, scheduler, x, timesteps, noise, eta=None, callback=None):
    """Ancestral sampling, Algorithm 2 of Ho et al. (2020): x_{t-1} ~ q(x_{t-1} | x_t, x0_pred),
    the forward process's posterior with the predicted clean image (its variance beta~_t, Eq. 7)."""
    assert list(timesteps) == list(range(len(timesteps) - 1, -1, -1)), "DDPM visits every timestep"
    for i, t in enumerate(timesteps):
        x0, _ = denoise(x, t)
        if callback is not None:
            callback(i, t, x, x0)
        mean, variance = scheduler.q_posterior(x0, x, torch.full((x.shape[0],), t, device=x.device))
        x = mean + variance.sqrt() * noise() if t > 0 else mean  # posterior_variance[0] = 0
    return x


def sample_ddim(denoise, scheduler, x, timesteps, noise, eta=0.0, callback=None):
    """DDIM (Song et al. 2021, Eq. 12) over the given timesteps: eta = 0 follows the probability-flow
    ODE deterministically, eta = 1 adds DDPM's amount of fresh noise at every step."""
    for i, t in enumerate(timesteps):
        x0, eps = denoise(x, t)
        if callback is not None:
            callback(i, t, x, x0)
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        x, _, _ = ddim_step(scheduler, x, t, t_prev, x0, eps, eta, noise() if eta > 0 else torch.zeros_like(x))
    return x


def sample_dpmpp_2m(denoise, scheduler, x, timesteps, noise, eta=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): the probability-flow ODE
    solved for the data prediction in lambda = log(alpha / sigma), the half log-SNR, where
    alpha = sqrt(abar) and sigma = sqrt(1 - abar). Each step from s to t (h = lambda_t - lambda_s)
    is exact for a data prediction D that stays constant over the step:

        x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D,

    with D the second-order multistep blend (1 + 1/(2r)) x0_s - 1/(2r) x0_prev, r = h_prev / h,
    of this step's and the previous step's predictions. The first step has no previous one and the
    last (to sigma = 0, lambda = inf) would divide by it: both are first order (D = x0_s), and the
    last one lands on the prediction itself. Deterministic, one model evaluation a step."""
    abar = scheduler.alphas_cumprod  # float64: lambda's differences need the digits
    alpha = lambda t: abar[t].sqrt() if t >= 0 else torch.ones_like(abar[0])
    sigma = lambda t: (1 - abar[t]).sqrt() if t >= 0 else torch.zeros_like(abar[0])
    x0_prev, h_prev = None, None
    for i, t in enumerate(timesteps):
        x0, _ = denoise(x, t)
        if callback is not None:
            callback(i, t, x, x0)
        t_next = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        if t_next < 0:
            return x0
        h = torch.log(alpha(t_next) / sigma(t_next)) - torch.log(alpha(t) / sigma(t))
        if x0_prev is None:
            D = x0
        else:
            r = h_prev / h
            D = (1 + 1 / (2 * r)).to(x.dtype) * x0 - (1 / (2 * r)).to(x.dtype) * x0_prev
        x = (sigma(t_next) / sigma(t)).to(x.dtype) * x - (alpha(t_next) * torch.expm1(-h)).to(x.dtype) * D
        x0_prev, h_prev = x0, h
    return x


SAMPLERS = {"ddpm": sample_ddpm, "ddim": sample_ddim, "dpmpp_2m": sample_dpmpp_2m}


def image_generators(seed, n, start=0):
    """One noise stream per image: image i (counted from `start`) of a draw with `seed` gets its own
    generator, so an image does not depend on the batch it is drawn in. torch's CPU generator keeps
    only 32 bits of its seed, so (seed, i) is packed into 32 bits as seed * K + i with K odd (Knuth's
    multiplicative hashing, K = 2^32 / golden ratio): the images of one draw never share a stream,
    and two seeds' streams overlap only when seed * K lands within n of another's (mod 2^32): for
    the seeds 0..4095 that takes a draw of more than 765,000 images."""
    assert 0 <= seed and 0 <= start and start + n <= 2**32, (seed, start, n)
    return [torch.Generator().manual_seed((seed * 0x9E3779B1 + i) % 2**32) for i in range(start, start + n)]


@torch.no_grad()
def sample(
    model,
    scheduler,
    cond,
    uncond=None,
    settings=SamplerConfig(),
    generator=0,
    callback=None,
    progress=False,
    focus=None,
    **changes,
):
    """Draw one image per caption in `cond` = (context (B, L, D), mask (B, L)) with the sampler that
    `settings` (a SamplerConfig) names; keyword arguments change single fields of it
    (`sample(..., sampler="ddim", steps=25)`).

    uncond: the unconditional (empty caption) context and mask, of batch 1 or B; needed when
        settings.guidance_scale != 1 or settings.focus_scale > 0.
    focus: the focus's context and mask (batch 1 or B, any length); needed when settings.focus_scale > 0.
    generator: a seed, a CPU torch.Generator, or a list of B of them (`image_generators`: one noise
        stream per image). All noise is drawn on the CPU and then moved, so a seed gives the same
        images on every run and device.
    callback(i, t, x_t, x0_pred) is called at every step, e.g. to keep a trajectory.
    Returns x_0 in [-1, 1], (B, 3, H, W)."""
    S = replace(settings, **changes)
    context, _ = cond
    B, device, cfg = context.shape[0], context.device, model.cfg
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if isinstance(generator, (list, tuple)):
        assert len(generator) == B, f"{len(generator)} generators for {B} images"
        noise = lambda: torch.stack([torch.randn(shape, generator=g) for g in generator]).to(device)
    else:
        g = generator if isinstance(generator, torch.Generator) else torch.Generator().manual_seed(int(generator))
        noise = lambda: torch.randn(B, *shape, generator=g).to(device)

    timesteps = S.timesteps(scheduler.num_timesteps)
    denoise = Denoiser(model, scheduler, cond, uncond, S.guidance_scale, S.guidance_t_min, focus, S.focus_scale)
    bar = tqdm(total=len(timesteps), desc=f"{S.sampler} sampling", disable=not progress, leave=False)

    def step_done(i, t, x_t, x0):
        bar.update()
        if callback is not None:
            callback(i, t, x_t, x0)

    x = SAMPLERS[S.sampler](denoise, scheduler, noise(), timesteps, noise, S.eta, step_done)  # from x_T ~ N(0, I)
    bar.close()
    return x.clamp(-1, 1)
