"""The FlowTiTok image tokenizer: an image <-> 77 continuous tokens of 16 channels (a 1D KL tokenizer).

    image (B, 3, S, S) in [0, 1]
      --Encoder: patches (16x16) + 77 learned latent tokens -> ViT (2D RoPE on patches only, SwiGLU, pre-LN)
      --the 77 latent outputs -> Linear(W, 32) = (mean, logvar)--> posterior, each (B, 77, 16)
    tokens (B, 77, 16) + CLIP text features (B, 77, 768)
      --Decoder: [mask tokens under 2D RoPE | tokens + learned positions | text + learned positions] -> ViT
      --the mask-token outputs -> per-patch pixels -> 3x3 conv--> image (B, 3, S, S), roughly [0, 1]

The flow model works on `scale_factor * sample`; the factor (1.0143) is applied in exactly one place:
Tokenizer.flow_tokens (multiply) and Tokenizer.decode_flow_tokens (divide), next to each other below.

Official names: the state dict of the released `FlowTiTok_512.bin` is mapped onto this module by
load_official_tokenizer (conv 1x1 layers become Linear layers, `latent_tokens` moves into the encoder).
"""
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from projector import gaussian_kl, reparameterize
from runtime import (UserError, agree, broadcast, fp32_region, load_checkpoint, load_strict, one_line, read_state_dict,
                     read_weights)

SCALE_FACTOR = 1.0143   # official vq_model.scale_factor (presumably 1 / std of posterior samples)


# ----------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------

def rope_2d_tables(grid, head_dim, theta=10000.0):
    """Axial 2D RoPE tables (grid*grid, head_dim): first half rotates by the row, second half by the column.

    For cell (r, c) (row-major), angles = [r*w0, r*w0, r*w1, r*w1, ..., c*w0, c*w0, ...] with
    w_k = theta^(-k / (head_dim/4)): each frequency repeated for an adjacent pair of channels.
    """
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float32) / quarter)          # (head_dim/4,)
    pos = torch.arange(grid, dtype=torch.float32)
    ang = (pos[:, None] * freqs[None]).repeat_interleave(2, dim=-1)                    # (grid, head_dim/2)
    ang = torch.cat([ang[:, None, :].expand(grid, grid, -1),                           # row angle
                     ang[None, :, :].expand(grid, grid, -1)], dim=-1).reshape(grid * grid, head_dim)
    return ang.cos(), ang.sin()


def rotate_pairs(x):
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) on the last dim."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


class SwiGLU(nn.Module):
    """w3(SiLU(a) * b) with (a, b) = w12(x) split in halves; hidden = int(2/3 * 4 * width).

    On a GPU the hidden width runs zero-padded to a multiple of 8 (ViT-L's 2730 -> 2736): bf16 rows then start on
    16-byte boundaries, as the fast matmul kernels need. The zero units add exact zeros (and get zero gradients);
    the parameters and checkpoints keep the official shapes.
    """

    def __init__(self, width):
        super().__init__()
        hidden = int(2 / 3 * int(4 * width))
        self.w12 = nn.Linear(width, 2 * hidden)
        self.w3 = nn.Linear(hidden, width)
        self.pad_on_cpu = False                  # tests turn the padded path on where there is no GPU

    def forward(self, x):
        hidden = self.w3.in_features
        pad = -hidden % 8 if x.is_cuda or self.pad_on_cpu else 0
        if not pad:
            a, b = self.w12(x).chunk(2, dim=-1)
            return self.w3(F.silu(a) * b)
        w12 = F.pad(self.w12.weight.unflatten(0, (2, hidden)), (0, 0, 0, pad)).flatten(0, 1)   # (2(h+p), W)
        b12 = F.pad(self.w12.bias.unflatten(0, (2, hidden)), (0, pad)).flatten()
        a, b = F.linear(x, w12, b12).chunk(2, dim=-1)                                          # (B, N, h+p)
        return F.linear(F.silu(a) * b, F.pad(self.w3.weight, (0, pad)), self.w3.bias)


def apply_rope(x, cos, sin):
    """RoPE on the first len(cos) tokens of x (B, H, N, d), the grid; the latent and text tokens pass unchanged.

    The same values as identity rows (cos 1, sin 0) for those tokens (x * 1 + r * 0 == x) without computing them.
    """
    grid = x[..., :len(cos), :]                                                     # (B, H, g*g, d)
    return torch.cat([grid * cos + rotate_pairs(grid) * sin, x[..., len(cos):, :]], dim=-2)


class Attention(nn.Module):
    """Bidirectional multi-head attention with RoPE on q and k of the first len(cos) tokens (the grid)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x, cos, sin):
        B, N, W = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)   # (B, H, N, d)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)     # bf16 under autocast: fp32 tables would promote q and k
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, W))


class Block(nn.Module):
    """Pre-LN ViT block: x += Attn(LN(x)); x += SwiGLU(LN(x))."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = SwiGLU(width)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """ln_pre -> blocks -> (caller picks tokens) ; RoPE rotates the first grid*grid tokens, not the others."""

    def __init__(self, width, depth, heads, grid):
        super().__init__()
        self.grid_tokens = grid * grid
        cos, sin = rope_2d_tables(grid, width // heads)
        self.register_buffer("rope_cos", cos)          # persistent, like the official freqs_cos / freqs_sin
        self.register_buffer("rope_sin", sin)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.ModuleList([Block(width, heads) for _ in range(depth)])
        self.grad_checkpointing = False

    def run_blocks(self, x):
        """(B, N, W) with the grid tokens first -> (B, N, W)."""
        cos, sin = self.rope_cos, self.rope_sin         # (g*g, d): apply_rope leaves the latent/text tokens alone
        x = self.ln_pre(x)
        for block in self.transformer:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return x


# ----------------------------------------------------------------------------------------------------------
# Encoder, decoder, tokenizer
# ----------------------------------------------------------------------------------------------------------

class Encoder(ViT):
    """image (B, 3, S, S) -> posterior (mean, logvar), each (B, 77, 16), float32."""

    def __init__(self, image_size, patch_size, width, depth, heads, num_tokens, channels):
        super().__init__(width, depth, heads, image_size // patch_size)
        self.num_tokens = num_tokens
        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size)
        self.ln_post = nn.LayerNorm(width)
        self.init_latents(width, num_tokens, channels)

    def init_latents(self, width, num_tokens, channels):
        """The 77 learned query tokens (+ learned positions) and their read-out Linear(W, 2C)."""
        scale = width ** -0.5
        self.latent_tokens = nn.Parameter(scale * torch.randn(num_tokens, width))
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(num_tokens, width))
        self.to_moments = nn.Linear(width, 2 * channels)                        # official conv_out (1x1 conv)

    def features(self, x):
        """(B, g*g, W) patch embeddings -> (B, 77, W), what to_moments reads: the latent tokens ride through the ViT."""
        latents = (self.latent_tokens + self.latent_token_positional_embedding).expand(len(x), -1, -1)
        x = self.run_blocks(torch.cat([x, latents], dim=1))
        return self.ln_post(x[:, self.grid_tokens:])

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)                  # (B, g*g, W), no abs. positions
        h = self.features(x)
        with fp32_region(h):     # moments head + posterior maths in float32: bf16 keeps ~3 digits of mean, logvar
            moments = self.to_moments(h.float()).view(len(h), self.num_tokens, -1)             # (B, 77, 2C)
            mean, logvar = moments.chunk(2, dim=-1)
            return mean, logvar.clamp(-30.0, 20.0)


class Decoder(ViT):
    """tokens (B, 77, 16) + text features (B, 77, text_dim) -> image (B, 3, S, S) (no output activation)."""

    def __init__(self, image_size, patch_size, width, depth, heads, num_tokens, channels, text_dim, text_len,
                 text_guidance=True):
        super().__init__(width, depth, heads, image_size // patch_size)
        self.patch_size, self.grid, self.text_guidance = patch_size, image_size // patch_size, text_guidance
        self.init_latents(width, num_tokens, channels)
        if text_guidance:                     # False (the demo): no CLIP tokens in the sequence
            self.text_guidance_proj = nn.Linear(text_dim, width)
            self.text_guidance_positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(text_len, width))
        self.ln_post = nn.LayerNorm(width)
        self.to_pixels = nn.Linear(width, patch_size * patch_size * 3)         # official ffn.0 (1x1 conv)
        self.conv_out = nn.Conv2d(3, 3, 3, padding=1)

    def init_latents(self, width, num_tokens, channels):
        """The mask token (its positions come from RoPE) and the 77 tokens' read-in (+ learned positions)."""
        scale = width ** -0.5
        self.mask_token = nn.Parameter(scale * torch.randn(1, 1, width))
        self.decoder_embed = nn.Linear(channels, width)
        self.latent_token_positional_embedding = nn.Parameter(scale * torch.randn(num_tokens, width))

    def grid_and_latents(self, tokens):
        """(B, 77, C) -> [mask tokens (B, g*g, W), embedded tokens (B, 77, W)]: the sequence before the text."""
        return [self.mask_token.expand(len(tokens), self.grid_tokens, -1),
                self.decoder_embed(tokens) + self.latent_token_positional_embedding]

    def forward(self, tokens, text=None):
        B, g, p = len(tokens), self.grid, self.patch_size
        seq = self.grid_and_latents(tokens)
        if self.text_guidance:
            seq.append(self.text_guidance_proj(text) + self.text_guidance_positional_embedding)
        x = self.run_blocks(torch.cat(seq, dim=1))
        x = self.to_pixels(self.ln_post(x[:, :g * g]))                          # (B, g*g, p*p*3)
        # depth-to-space: feature (p1*p + p2)*3 + c of cell (r, col) -> pixel (r*p + p1, col*p + p2)
        x = x.view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * p, g * p)
        return self.conv_out(x)


class LinearEncoder(Encoder):
    """Demo layout (latent_layout "linear"): the 77 tokens are one linear read-out of the whole patch grid."""

    def init_latents(self, width, num_tokens, channels):
        """Linear(g*g*W, 77 * 2C): no latent tokens in the ViT."""
        self.to_moments = nn.Linear(self.grid_tokens * width, num_tokens * 2 * channels)

    def features(self, x):
        """(B, g*g, W) patch embeddings -> (B, g*g*W), what to_moments reads."""
        return self.ln_post(self.run_blocks(x)).flatten(1)


class LinearDecoder(Decoder):
    """Demo layout (latent_layout "linear"): the patch grid is one linear function of the 77 tokens."""

    def init_latents(self, width, num_tokens, channels):
        """Linear(77 * C, g*g*W): no mask token, no latent tokens in the ViT."""
        self.decoder_embed = nn.Linear(num_tokens * channels, self.grid_tokens * width)

    def grid_and_latents(self, tokens):
        """(B, 77, C) -> [the patch grid (B, g*g, W)]."""
        return [self.decoder_embed(tokens.flatten(1)).view(len(tokens), self.grid_tokens, -1)]


LATENT_LAYOUTS = {"tokens": (Encoder, Decoder), "linear": (LinearEncoder, LinearDecoder)}   # the official, the demo's


class Tokenizer(nn.Module):
    """FlowTiTok: encode images to a 77x16 posterior, decode 77x16 tokens (+ text) to images.

    The defaults are the official model. Three options exist for tiny CPU models (the demo) and keep the
    official behaviour at their defaults: latent_layout "linear" (LinearEncoder / LinearDecoder: the 77 tokens
    are a linear read-out of the patch grid and back, instead of learned query tokens riding through the ViTs:
    much faster to train at small sizes), text_guidance False (a decoder without the CLIP tokens), logvar_init
    (the initial posterior log-variance; a very negative value lets the decoder see the latent from the first step).
    """

    def __init__(self, image_size=256, patch_size=16, enc_width=768, enc_depth=12, enc_heads=12,
                 dec_width=1024, dec_depth=24, dec_heads=16, num_tokens=77, channels=16, text_dim=768,
                 text_len=77, scale_factor=SCALE_FACTOR, latent_layout="tokens", text_guidance=True,
                 logvar_init=0.0):
        super().__init__()
        if latent_layout not in LATENT_LAYOUTS:
            raise ValueError(f"latent_layout must be 'tokens' or 'linear', not {latent_layout!r}")
        self.config = dict(image_size=image_size, patch_size=patch_size, enc_width=enc_width, enc_depth=enc_depth,
                           enc_heads=enc_heads, dec_width=dec_width, dec_depth=dec_depth, dec_heads=dec_heads,
                           num_tokens=num_tokens, channels=channels, text_dim=text_dim, text_len=text_len,
                           scale_factor=scale_factor, latent_layout=latent_layout, text_guidance=text_guidance,
                           logvar_init=logvar_init)
        self.image_size, self.scale_factor = image_size, scale_factor
        encoder, decoder = LATENT_LAYOUTS[latent_layout]
        self.encoder = encoder(image_size, patch_size, enc_width, enc_depth, enc_heads, num_tokens, channels)
        self.decoder = decoder(image_size, patch_size, dec_width, dec_depth, dec_heads, num_tokens, channels,
                               text_dim, text_len, text_guidance)
        self.apply(self._init_weights)
        with torch.no_grad():     # logvar outputs are the second half of each token's 2 * channels moments
            self.encoder.to_moments.bias.view(-1, 2 * channels)[:, channels:] = logvar_init

    @staticmethod
    def _init_weights(m):
        """Official init: Linear/Conv ~ N(0, 0.02) truncated at +-2 (absolute), zero bias; LayerNorm 1/0."""
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @classmethod
    def from_preset(cls, name, **overrides):
        """Build a preset from TOKENIZER_PRESETS (keyword overrides win)."""
        if name not in TOKENIZER_PRESETS:
            raise ValueError(f"unknown tokenizer preset {name!r}; choose from {sorted(TOKENIZER_PRESETS)}")
        return cls(**{**TOKENIZER_PRESETS[name], **overrides})

    def set_grad_checkpointing(self, enabled=True):
        self.encoder.grad_checkpointing = self.decoder.grad_checkpointing = enabled

    def encode(self, images):
        """(B, 3, S, S) in [0, 1] -> posterior mean, logvar (B, 77, 16), float32 (logvar clamped to [-30, 20])."""
        return self.encoder(images)

    def decode(self, tokens, text=None):
        """Raw (unscaled) tokens (B, 77, 16) + text features (B, 77, text_dim) -> images (B, 3, S, S)."""
        return self.decoder(tokens, text)

    # The only two places where scale_factor appears ------------------------------------------------------
    def flow_tokens(self, mean, logvar, eps=None):
        """Posterior -> flow-space image tokens x1 = (mean + sigma * eps) * scale_factor, (B, 77, 16)."""
        eps = torch.randn_like(mean) if eps is None else eps
        return reparameterize(mean, logvar, eps) * self.scale_factor

    def decode_flow_tokens(self, x1, text=None):
        """Flow-space tokens (B, 77, 16) -> images: decode(x1 / scale_factor, text)."""
        return self.decode(x1 / self.scale_factor, text)
    # --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def estimate_scale_factor(self, images, generator=None):
        """1 / std of posterior samples of `images`: the factor that gives the flow unit-variance targets.

        (The official 1.0143 belongs to the official weights; a newly trained tokenizer needs its own.)
        """
        mean, logvar = self.encode(images)
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        return 1.0 / reparameterize(mean, logvar, eps).float().std().item()


def psnr(mse):
    """Peak signal-to-noise ratio in dB of images in [0, 1] from their mean squared error: -10 log10(mse)."""
    return -10 * torch.log10(mse)


def posterior_kl(mean, logvar):
    """KL(N(mean, sigma^2) || N(0, I)) per token: 1/2 sum_c (mean^2 + sigma^2 - 1 - logvar), (B, 77)."""
    return gaussian_kl(mean, logvar).sum(-1)


_BL77 = dict(patch_size=16, enc_width=768, enc_depth=12, enc_heads=12, dec_width=1024, dec_depth=24, dec_heads=16)
TOKENIZER_PRESETS = {
    "bl77-256": dict(image_size=256, **_BL77),   # official FlowTiTok (encoder ViT-B, decoder ViT-L), 256 px
    "bl77-512": dict(image_size=512, **_BL77),   # official FlowTiTok_512.bin
    "tiny": dict(image_size=32, patch_size=8, enc_width=64, enc_depth=2, enc_heads=4, dec_width=64, dec_depth=2,
                 dec_heads=4, text_dim=64),       # tests (the official fixture's sizes)
    "demo": dict(image_size=32, patch_size=8, enc_width=128, enc_depth=2, enc_heads=4, dec_width=128, dec_depth=3,
                 dec_heads=4, text_dim=128, latent_layout="linear", text_guidance=False, logvar_init=-7.0),
}


# ----------------------------------------------------------------------------------------------------------
# Official checkpoint
# ----------------------------------------------------------------------------------------------------------

def convert_official_tokenizer(sd):
    """Official FlowTiTok state dict -> ours: renames, 1x1 convs -> Linear weights. Every key is consumed."""
    out, sd = {}, dict(sd)
    for k, v in sd.items():
        k = k.replace("positional_embedding.freqs_cos", "rope_cos").replace("positional_embedding.freqs_sin",
                                                                              "rope_sin")
        if k == "latent_tokens":
            k = "encoder.latent_tokens"
        elif k.startswith("encoder.conv_out."):
            k, v = k.replace("conv_out", "to_moments"), v.flatten(1) if v.dim() == 4 else v
        elif k.startswith("decoder.ffn.0."):
            k, v = k.replace("ffn.0", "to_pixels"), v.flatten(1) if v.dim() == 4 else v
        out[k] = v
    return out


def load_official_tokenizer(src, **overrides):
    """The official FlowTiTok checkpoint (path or state dict) -> Tokenizer; sizes inferred from the shapes."""
    sd = read_state_dict(src)
    try:
        enc_w, _, patch, _ = sd["encoder.patch_embed.weight"].shape
        grid_tokens, head_dim = sd["encoder.positional_embedding.freqs_cos"].shape
        dec_w = sd["decoder.decoder_embed.weight"].shape[0]
        dec_head_dim = sd["decoder.positional_embedding.freqs_cos"].shape[1]
        config = dict(
            image_size=math.isqrt(grid_tokens) * patch, patch_size=patch,
            enc_width=enc_w, enc_heads=enc_w // head_dim,
            enc_depth=1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.transformer.")),
            dec_width=dec_w, dec_heads=dec_w // dec_head_dim,
            dec_depth=1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.transformer.")),
            num_tokens=sd["latent_tokens"].shape[0], channels=sd["decoder.decoder_embed.weight"].shape[1],
            text_dim=sd["decoder.text_guidance_proj.weight"].shape[1],
            text_len=sd["decoder.text_guidance_positional_embedding"].shape[0])
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a FlowTiTok tokenizer checkpoint (cannot read its sizes: {e})") from None
    config.update(overrides)
    with torch.device("meta"):
        model = Tokenizer(**config)
    load_strict(model, convert_official_tokenizer(sd), "FlowTiTok")
    return model


def load_tokenizer(src, ema=True):
    """A trained tokenizer -> Tokenizer in eval mode: our run folder / checkpoint (train.py --stage tokenizer,
    EMA weights unless ema=False) or the official FlowTiTok .bin (path or state dict)."""
    if isinstance(src, (str, os.PathLike)):
        src = os.path.join(src, "last.pt") if os.path.isdir(src) else src
        obj = read_weights(src)
    else:
        obj = src
    if obj.get("stage") == "tokenizer":
        with torch.device("meta"):
            model = Tokenizer(**obj["config"]["tokenizer"])
        load_strict(model, obj["ema" if ema else "model"]["tokenizer"], "tokenizer")
    elif "stage" in obj:
        raise ValueError(f"a '{obj['stage']}' checkpoint, not a tokenizer")
    else:
        model = load_official_tokenizer(obj)
    return model.eval()


def load_frozen_tokenizer(path, image_size, clip_config, clip_width, device):
    """A trained tokenizer (our run / checkpoint or the official .bin) for a flow stage, frozen, checked against
    the run (--image-size, the CLIP tower clip_config = {tower, weights} and its width) -> Tokenizer."""
    ours = load_checkpoint(path) if os.path.isdir(path) or path.endswith(".pt") else None
    try:
        tok = load_tokenizer(ours or path)       # ours: read once (real tokenizers are 1.5 GB)
    except (ValueError, OSError, RuntimeError) as e:
        raise UserError(f"--tokenizer {path}: {e}") from None
    if ours and ours["config"]["clip"]["tower"] != clip_config["tower"]:
        raise UserError(f"--tokenizer {path} was trained with the CLIP tower {ours['config']['clip']['tower']!r}, "
                         f"this run uses {clip_config['tower']!r}")
    if ours and ours["config"]["clip"]["weights"] != clip_config["weights"]:
        print(f"warning: --tokenizer {path} was trained with CLIP weights {ours['config']['clip']['weights']}, "
              f"this run uses {clip_config['weights']}", file=sys.stderr)
    c = tok.config
    if c["image_size"] != image_size:
        raise UserError(f"--tokenizer {path} works at {c['image_size']} px but --image-size is {image_size}: "
                         f"use the matching tokenizer (bl77-{image_size}) or --image-size {c['image_size']}")
    if c["text_dim"] != clip_width:
        raise UserError(f"--tokenizer {path} expects {c['text_dim']}-d text features but --clip-tower "
                         f"{clip_config['tower']} gives {clip_width}-d: it was trained with another text tower")
    return tok.to(device).eval().requires_grad_(False)


def init_tokenizer(tokenizer, path, ema, preset):
    """train.py --init of the tokenizer stage: the weights of any tokenizer checkpoint, the official
    FlowTiTok_256/512.bin included (fine-tuning; the RoPE tables stay this model's, for its image size)."""
    try:
        tok = load_tokenizer(path, ema=ema)
    except (ValueError, OSError, RuntimeError) as e:
        raise UserError(f"--init {path}: {e}") from None
    src, own = tok.state_dict(), tokenizer.state_dict()
    keys = [k for k in own if "rope_" not in k]
    wrong = [k for k in keys if k not in src or src[k].shape != own[k].shape]
    if wrong:
        raise UserError(f"--init {path} ({_tokenizer_size(tok.config)}) does not fit --tokenizer-preset "
                        f"{preset} ({_tokenizer_size(tokenizer.config)}): "
                        + ", ".join(f"{k} {tuple(src[k].shape) if k in src else 'missing'} vs "
                                    f"{tuple(own[k].shape)}" for k in wrong[:5]))
    tokenizer.load_state_dict({k: src[k] for k in keys}, strict=False)


def _tokenizer_size(config):
    """A tokenizer's size in words: 'encoder 768 x 12, decoder 1024 x 24' (width x depth)."""
    return (f"encoder {config['enc_width']} x {config['enc_depth']}, "
            f"decoder {config['dec_width']} x {config['dec_depth']}")


# ----------------------------------------------------------------------------------------------------------
# Tokenizer training losses: the one-stage TA-TiTok recipe (train.py --stage tokenizer)
#
#   generator:      1.0 * MSE(x, x_hat) + 1.1 * perceptual + 1e-6 * KL + 0.1 * d_weight * (-mean D(x_hat))
#                   (the GAN term from --gan-start, 200k steps; d_weight 1, or VQGAN's adaptive balance)
#   perceptual:     (1.0 * LPIPS-VGG16(x, x_hat) + 0.1 * MSE of ConvNeXt-S ImageNet logits at 224 px) / 1.1
#   discriminator:  1/2 (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))                       (hinge)
#                   + 0.001 * (relu(mean D(x) - ema_fake)^2 + relu(ema_real - mean D(x_hat))^2)   (LeCAM)
#                   where ema_real / ema_fake are EMAs (decay 0.999) of the batch-mean logits
# ----------------------------------------------------------------------------------------------------------

# the standard downloads (the first two are torchvision's ImageNet weights, the third LPIPS v0.1's linear heads)
PERCEPTUAL_FILES = {
    "vgg16-397923af.pth": "https://download.pytorch.org/models/vgg16-397923af.pth",
    "convnext_small-0c510722.pth": "https://download.pytorch.org/models/convnext_small-0c510722.pth",
    "lpips_vgg_v0.1.pth": "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class LPIPS(nn.Module):
    """LPIPS v0.1 (VGG16): unit-normalised features at relu1_2 .. relu5_3, squared differences, learned 1x1 weights."""

    ENDS = (4, 9, 16, 23, 30)           # torchvision vgg16.features indices that end each of the five stages

    def __init__(self):
        import torchvision   # heavy and only for the perceptual loss (tokenizer training); weights load below
        super().__init__()
        self.features = torchvision.models.vgg16().features[:30]
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in (64, 128, 256, 512, 512))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x, y):
        """Images in [0, 1], (B, 3, H, W) each -> (B,) distances."""
        h = (torch.cat([x, y]) * 2 - 1 - self.shift) / self.scale                # both images in one pass
        dist, start = 0.0, 0
        for lin, end in zip(self.lins, self.ENDS):
            h = self.features[start:end](h)
            start = end
            fx, fy = (h / (h.norm(dim=1, keepdim=True) + 1e-10)).chunk(2)       # unit length over channels
            dist = dist + lin((fx - fy) ** 2).mean(dim=(1, 2, 3))
        return dist


class PerceptualLoss(nn.Module):
    """TA-TiTok's perceptual term: (w_lpips * LPIPS + w_convnext * MSE of ConvNeXt-S logits) / (w_lpips + w_convnext).

    Always in eval mode and frozen; the official loss runs it in float32 (autocast off), as train.py does.
    """

    def __init__(self, w_lpips=1.0, w_convnext=0.1):
        import torchvision   # heavy and only for the perceptual loss (tokenizer training)
        super().__init__()
        self.w_lpips, self.w_convnext = w_lpips, w_convnext
        self.lpips = LPIPS()
        self.convnext = torchvision.models.convnext_small()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.requires_grad_(False).eval()

    def train(self, mode=True):
        return super().train(False)      # dropout and stochastic depth stay off inside the training loop

    def forward(self, x, y):
        """Images in [0, 1] (B, 3, H, W) -> scalar loss."""
        lpips = self.lpips(x, y).mean()
        both = F.interpolate(torch.cat([x, y]), size=224, mode="bilinear", align_corners=False, antialias=True)
        fx, fy = self.convnext((both - self.mean) / self.std).float().chunk(2)
        return (self.w_lpips * lpips + self.w_convnext * F.mse_loss(fx, fy)) / (self.w_lpips + self.w_convnext)


def load_perceptual(folder=None):
    """PerceptualLoss with pretrained weights from `folder` (the three PERCEPTUAL_FILES), or from torch's hub
    cache (folder None), downloading what is missing there. Raises OSError naming what could not be had."""
    cache = folder is None
    folder = os.path.join(torch.hub.get_dir(), "checkpoints") if cache else folder
    paths = {}
    for name, url in PERCEPTUAL_FILES.items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path) and cache:
            try:
                os.makedirs(folder, exist_ok=True)
                torch.hub.download_url_to_file(url, path, progress=False)
            except Exception as e:                     # offline, proxy, disk: say what to fetch by hand
                raise OSError(f"could not download {url} ({type(e).__name__}); put {name} in a folder and pass "
                              f"--perceptual-weights FOLDER") from None
        if not os.path.isfile(path):
            raise OSError(f"{path} is missing (download it from {url})")
        paths[name] = path
    read = lambda name: torch.load(paths[name], map_location="cpu", weights_only=True)   # noqa: E731
    model = PerceptualLoss()
    vgg = {k.removeprefix("features."): v for k, v in read("vgg16-397923af.pth").items()
           if k.startswith("features.") and int(k.split(".")[1]) < 30}
    lins = {}
    for k, v in read("lpips_vgg_v0.1.pth").items():   # lin{i}.model.1.weight (with dropout) or lin{i}.model.0.weight
        if k.startswith("lin") and k.endswith(".weight"):
            lins[f"{k[3]}.weight"] = v
    try:
        model.lpips.features.load_state_dict(vgg)
        model.lpips.lins.load_state_dict(lins)
        model.convnext.load_state_dict(read("convnext_small-0c510722.pth"))
    except RuntimeError as e:
        raise OSError(f"the perceptual weights in {folder} do not fit: {str(e)[:300]}") from None
    return model


class BlurDown(nn.Module):
    """Anti-aliased 2x down-sampling: a depthwise [1, 3, 3, 1] x [1, 3, 3, 1] / 64 blur with stride 2."""

    def __init__(self):
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        self.register_buffer("kernel", (k[:, None] * k[None, :] / 64).view(1, 1, 4, 4), persistent=False)

    def forward(self, x):
        def pad(n):                      # TF "same" padding for kernel 4, stride 2: (0..3) split floor / ceil
            total = max((math.ceil(n / 2) - 1) * 2 + 4 - n, 0)
            return total // 2, total - total // 2
        x = F.pad(x, [*pad(x.shape[-1]), *pad(x.shape[-2])])
        return F.conv2d(x, self.kernel.expand(x.shape[1], -1, -1, -1), stride=2, groups=x.shape[1])


DISC_GROUPS = 32   # the PatchGAN's GroupNorm groups: its width must be a multiple of this


class PatchDiscriminator(nn.Module):
    """TA-TiTok's NLayer PatchGAN: conv5 -> 3 x [conv3, blur down 2x, GroupNorm(32), LeakyReLU 0.1] -> adaptive
    max-pool to 16x16 -> conv1, LeakyReLU, conv5 -> logits (B, 1, 16, 16). Holds the LeCAM EMAs as a buffer."""

    def __init__(self, width=128, stages=3, lecam_decay=0.999):
        super().__init__()
        self.config = dict(width=width, stages=stages, lecam_decay=lecam_decay)
        self.lecam_decay = lecam_decay
        act = lambda: nn.LeakyReLU(0.1)                                           # noqa: E731
        chans = [width] + [width * 2 ** i for i in range(stages)]                 # 128, 128, 256, 512
        self.block_in = nn.Sequential(nn.Conv2d(3, width, 5, padding=2), act())
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), BlurDown(), nn.GroupNorm(DISC_GROUPS, c_out), act())
            for c_in, c_out in zip(chans[:-1], chans[1:]))
        self.pool = nn.AdaptiveMaxPool2d((16, 16))
        self.to_logits = nn.Sequential(nn.Conv2d(chans[-1], chans[-1], 1), act(), nn.Conv2d(chans[-1], 1, 5, padding=2))
        self.register_buffer("lecam_ema", torch.zeros(2))                         # EMAs of mean D(real), D(fake)

    def forward(self, images):
        """(B, 3, H, W) in [0, 1] -> patch logits (B, 1, 16, 16)."""
        h = self.block_in(images)
        for block in self.blocks:
            h = block(h)
        return self.to_logits(self.pool(h))

    def loss(self, logits_real, logits_fake, w_lecam):
        """Hinge loss + w_lecam * LeCAM against the EMAs (call update_lecam afterwards) -> dict of scalars."""
        hinge = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
        lecam = lecam_loss(logits_real.mean(), logits_fake.mean(), self.lecam_ema[0], self.lecam_ema[1])
        return dict(loss=hinge + w_lecam * lecam, hinge=hinge, lecam=lecam,
                    logits_real=logits_real.detach().mean(), logits_fake=logits_fake.detach().mean())

    @torch.no_grad()
    def update_lecam(self, mean_real, mean_fake):
        """ema = decay * ema + (1 - decay) * batch mean (pass means averaged over all GPUs)."""
        self.lecam_ema.lerp_(torch.stack([mean_real, mean_fake]).float(), 1 - self.lecam_decay)


def lecam_loss(mean_real, mean_fake, ema_real, ema_fake):
    """LeCAM regulariser (Tseng et al. 2021): relu(mean D(x) - ema_fake)^2 + relu(ema_real - mean D(x_hat))^2."""
    return F.relu(mean_real - ema_fake) ** 2 + F.relu(ema_real - mean_fake) ** 2


def generator_gan_loss(logits_fake):
    """The generator's hinge-GAN term: -mean D(x_hat)."""
    return -logits_fake.mean()


def adaptive_gan_weight(rec_loss, gan_loss, last_layer):
    """VQGAN's balance: |d rec / d W| / (|d gan / d W| + 1e-4) at the decoder's last layer W, clamped to [0, 1e4]."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach()


def tokenizer_loss(tok, images, eps, text=None, w_kl=1e-6, perceptual=None, w_perceptual=1.1, disc=None,
                   w_gan=0.1, adaptive=False):
    """The one-stage TA-TiTok objective (the formulas above) on a batch -> dict of scalars ("loss" is what backward
    sees; "recon", detached, is what the discriminator learns from): MSE of the reconstruction from a posterior
    sample (eps), + w_perceptual x perceptual (frozen net, float32), + w_kl x KL (summed over tokens, batch mean),
    + w_gan x the generator's GAN term when `disc` is given (D frozen here: it learns in its own step)."""
    mean, logvar = tok.encode(images)
    recon = tok.decode(reparameterize(mean, logvar, eps), text).float()
    mse = F.mse_loss(recon, images)
    kl = posterior_kl(mean, logvar).sum(1).mean()
    out = dict(mse=mse, kl=kl, psnr=psnr(mse.detach()), sigma=torch.exp(0.5 * logvar.detach()).mean())
    rec = mse
    if perceptual is not None:
        with torch.autocast(images.device.type, enabled=False):
            out["perceptual"] = perceptual(recon, images)
        rec = rec + w_perceptual * out["perceptual"]
    loss = rec + w_kl * kl
    if disc is not None:
        disc.requires_grad_(False)
        with torch.autocast(images.device.type, enabled=False):
            out["gan"] = generator_gan_loss(disc(recon))
        disc.requires_grad_(True)
        weight = w_gan * (adaptive_gan_weight(rec, out["gan"], tok.decoder.conv_out.weight) if adaptive else 1.0)
        out["gan_weight"] = torch.as_tensor(weight, dtype=torch.float32)
        loss = loss + weight * out["gan"]
    out.update(loss=loss, recon=recon.detach())
    return out


def no_decay(name, param):
    """TA-TiTok's AdamW groups: no weight decay on biases, norms, gains, embeddings, latent and mask tokens."""
    return param.ndim < 2 or any(s in name for s in ("ln", "bias", "latent_tokens", "mask_token", "embed", "norm",
                                                     "gamma"))


# ----------------------------------------------------------------------------------------------------------
# Tokenizer training: AdamW's groups, the perceptual network on every rank, the discriminator's own update
# ----------------------------------------------------------------------------------------------------------

def decay_groups(module):
    """AdamW groups of the tokenizer recipe (tokenizer and discriminator): no decay on biases, norms, embeddings,
    tokens. The official FlowTok stages decay every parameter and use plain parameter lists."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not no_decay(n, p)]}]


def perceptual_on_every_rank(weights, device, rank, world, say):
    """The frozen perceptual network (--perceptual-weights: auto, a folder or none) on every rank, or on none (with a
    warning: auto and rank 0 finds no weights); a rank that cannot load the weights rank 0 loaded stops every rank,
    never drops the term."""
    if weights == "none":
        return None
    folder = None if weights == "auto" else weights
    net, why = _perceptual(folder, device) if rank == 0 else (None, None)   # rank 0 first: it downloads once
    agree(f"--perceptual-weights {folder}: {why}" if why and folder else None, world)
    if broadcast(net is None, world):          # auto and none found: the term is off on every rank alike
        say(f"warning: {why}. Training WITHOUT the perceptual term (pass --w-perceptual 0 to silence this)")
        return None
    if rank > 0:
        net, why = _perceptual(folder, device)
    agree(f"rank {rank} cannot load the perceptual weights that rank 0 trains with ({why}): put them in every "
          f"node's torch hub cache or pass --perceptual-weights FOLDER on a filesystem all nodes share"
          if why else None, world)
    return net


def _perceptual(folder, device):
    """-> (the frozen perceptual network, None) or (None, why it cannot be had)."""
    try:
        return load_perceptual(folder).to(device), None
    except OSError as e:
        return None, one_line(e)


