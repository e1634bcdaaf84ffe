"""The text side of FlowTok: captions -> CLIP features -> 77x16 text tokens (and back, for image-to-text).

    captions --tokenize--> ids (B, 77) --CLIPTextEncoder (frozen)--> E (B, 77, 768)
             --TextProjector: 6 post-LN blocks, Linear(768, 32) = (mu, logvar)--> z = mu + sigma * eps (B, 77, 16)

`z` is the *source* of the flow (t = 0). Three training terms live here, next to each other:
  - contrastive_loss: aligns z with a per-token MLP projection of E (the paper's L_align, learnable temperature);
  - kl_official: the KL-like term the released checkpoints were trained with (the default);
  - kl_standard: the paper's textbook KL to N(0, I), one flag away.
TextDecoder maps a (B, 77, 16) text latent back to CLIP token ids; with TextProjector it forms the text
autoencoder used for image-to-text.

Official names: TextProjector is the official `context_encoder` (+ `context_projector` = our `align_mlp`,
`t2t_temperature` = our `log_temperature`); see flow_dit.load_official_flowtok for the key mapping.
"""
import argparse
import contextlib
import datetime
import functools
import hashlib
import json
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import open_clip
from huggingface_hub import hf_hub_download
from open_clip.transformer import QuickGELU, TextTransformer
from safetensors.torch import load_file

CONTEXT_LENGTH = 77
SOT, EOT = 49406, 49407                    # CLIP's start/end-of-text ids; padding is 0
CLIP_VOCAB = 49408

# The official text tower: open_clip ViT-L-14-336 with OpenAI weights. open_clip >= 3 builds the plain name
# with exact GELU; the OpenAI weights were trained with QuickGELU, hence the "-quickgelu" name.
OFFICIAL_CLIP_TOWER = "ViT-L-14-336-quickgelu"
CLIP_TOWERS = {
    OFFICIAL_CLIP_TOWER: dict(width=768, layers=12, heads=12),
    "tiny": dict(width=64, layers=2, heads=4),       # random tower for tests
    "demo": dict(width=128, layers=2, heads=4),      # random tower for the CPU demo
}
CLIP_HF_REPO = "timm/vit_large_patch14_clip_336.openai"
CLIP_HF_FILE = "open_clip_model.safetensors"


# ----------------------------------------------------------------------------------------------------------
# CLIP: tokenizer and frozen text tower
# ----------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _bpe():
    """open_clip's CLIP BPE tokenizer (the vocabulary ships inside open_clip: no download)."""
    return open_clip.SimpleTokenizer()


@functools.lru_cache(maxsize=4096)    # a few MB per loader worker even for long recaptions
def _bpe_ids(text):
    """One caption -> its BPE ids (a tuple), cached: captions repeat across epochs and, in the demo, within a batch."""
    return tuple(_bpe().encode(text))


def tokenize(texts):
    """Captions -> (ids (B, 77) long, truncated (B,) bool), exactly as open_clip's CLIP tokenizer.

    [SOT, bpe..., EOT] padded with 0; a caption over 77 tokens is cut and its last id forced to EOT
    (we re-do open_clip's loop so that the truncation can be reported instead of silently happening).
    """
    rows, truncated = [], []
    for text in texts:
        seq = [SOT, *_bpe_ids(text), EOT]
        truncated.append(len(seq) > CONTEXT_LENGTH)
        seq = seq[:CONTEXT_LENGTH - 1] + [EOT] if truncated[-1] else seq
        rows.append(seq + [0] * (CONTEXT_LENGTH - len(seq)))
    ids = torch.tensor(rows, dtype=torch.long).reshape(len(texts), CONTEXT_LENGTH)   # (B, 77)
    return ids, torch.tensor(truncated, dtype=torch.bool)


def detokenize(ids):
    """CLIP ids (B, 77) -> captions: text between SOT and the first EOT; special tokens never reach the output."""
    bpe, out = _bpe(), []
    for row in ids.tolist():
        row = row[1:] if row and row[0] == SOT else row
        row = row[:row.index(EOT)] if EOT in row else row
        out.append(bpe.decode([i for i in row if 0 < i < SOT]).strip())
    return out


def _read_clip_weights(path):
    """A local open_clip checkpoint (.safetensors, or .bin/.pt read with weights_only) -> its text-tower tensors."""
    sd = read_weights(path)
    sd = sd.get("state_dict", sd)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    # full CLIP checkpoints also hold the vision tower and logit_scale; keep the text tower only
    return {k: v for k, v in sd.items() if not k.startswith("visual.") and k != "logit_scale"}


def _download_clip_weights():
    """Fetch the official text tower's weights through the Hugging Face cache, or say what to do offline."""
    try:
        return hf_hub_download(CLIP_HF_REPO, CLIP_HF_FILE)
    except Exception as e:  # offline, proxy, missing package...: one actionable message
        raise RuntimeError(
            f"could not get the CLIP ViT-L-14-336 (OpenAI) weights: {type(e).__name__}: {e}\n"
            f"Download '{CLIP_HF_FILE}' from https://huggingface.co/{CLIP_HF_REPO} on a machine with internet and "
            f"pass it with --clip-weights PATH (or set HF_HUB_OFFLINE=0 and retry online).") from None


class CLIPTextEncoder(nn.Module):
    """Frozen open_clip text tower returning all 77 per-token features after ln_final: (B, 77, width).

    weights: "openai" (download through the Hugging Face cache), a local open_clip checkpoint path, or
    "random" (random initialisation: tests and the CPU demo; the features then carry no pretrained meaning).
    """

    def __init__(self, tower=OFFICIAL_CLIP_TOWER, weights="openai"):
        super().__init__()
        cfg = CLIP_TOWERS[tower]
        self.tower, self.weights, self.width = tower, weights, cfg["width"]
        self.text = TextTransformer(context_length=CONTEXT_LENGTH, vocab_size=CLIP_VOCAB, width=cfg["width"],
                                    heads=cfg["heads"], layers=cfg["layers"], output_dim=cfg["width"],
                                    act_layer=QuickGELU, output_tokens=True)
        if weights != "random":
            path = _download_clip_weights() if weights == "openai" else weights
            if not os.path.isfile(path):
                raise FileNotFoundError(f"--clip-weights {path}: no such file")
            missing, unexpected = self.text.load_state_dict(_read_clip_weights(path), strict=False)
            if missing or unexpected:
                raise ValueError(f"{path} is not an open_clip '{tower}' checkpoint: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        self.requires_grad_(False)
        self.eval()

    def train(self, mode=True):
        """Always in eval mode: the tower is frozen."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, ids):
        """ids (B, 77) -> features (B, 77, width), float32 (the official code runs CLIP outside autocast)."""
        with torch.autocast(ids.device.type, enabled=False):
            return self.text(ids)[1].float()

    def encode(self, texts):
        """Captions -> (B, 77, width) on the tower's device."""
        ids, _ = tokenize(texts)
        return self(ids.to(self.text.token_embedding.weight.device))


# ----------------------------------------------------------------------------------------------------------
# The variational text projector (official `context_encoder`)
# ----------------------------------------------------------------------------------------------------------

class LayerNorm(nn.Module):
    """The official text-VAE LayerNorm: g * (x - mean) / (unbiased std + eps) + b (eps on the std, n - 1)."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.g = nn.Parameter(torch.ones(dim))
        self.b = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        std, mean = torch.std_mean(x, dim=-1, keepdim=True)     # one pass; std is unbiased (n - 1)
        return self.g * (x - mean) / (std + self.eps) + self.b


class EncoderLayer(nn.Module):
    """Post-LN transformer layer: x = LN1(x + Attn(x)); x = LN2(x + FFN(x)); dropout at four sites."""

    def __init__(self, dim, heads, d_ff, dropout=0.1):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim)       # the official W_Q, W_K, W_V, fused into one GEMM
        self.proj = nn.Linear(dim, dim)          # official W_O
        self.ffn_1 = nn.Linear(dim, d_ff)
        self.ffn_2 = nn.Linear(d_ff, dim)
        self.norm1 = LayerNorm(dim)
        self.norm2 = LayerNorm(dim)

    def forward(self, x):
        B, N, D = x.shape
        p = self.dropout if self.training else 0.0
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)              # dropout on the attention map
        a = self.proj(a.transpose(1, 2).reshape(B, N, D))
        x = self.norm1(x + F.dropout(a, p, self.training))
        f = self.ffn_2(F.dropout(F.relu(self.ffn_1(x)), p, self.training))
        return self.norm2(x + F.dropout(f, p, self.training))


class TokenGrouping(nn.Linear):
    """(B, L, C) -> (B, L / p, C): p consecutive CLIP tokens -> one transformer token (a CPU speed knob)."""

    def __init__(self, patch_size, dim):
        super().__init__(patch_size * dim, dim)
        self.patch_size = patch_size

    def forward(self, x):
        B, L, C = x.shape
        return super().forward(x.reshape(B, L // self.patch_size, self.patch_size * C))


class TextProjector(nn.Module):
    """CLIP features (B, 77, clip_dim) -> (z, mu, logvar), each (B, 77, 16); plus the alignment head.

    The alignment MLP (768-512-512-16, SiLU) and the learnable log-temperature (init log(1/0.07)) exist
    only for the training-time contrastive loss; sampling uses z alone.
    """

    def __init__(self, clip_dim=768, depth=6, heads=8, d_ff=1024, dropout=0.1, channels=16, align_hidden=512,
                 patch_size=1):
        super().__init__()
        self.config = dict(clip_dim=clip_dim, depth=depth, heads=heads, d_ff=d_ff, dropout=dropout,
                           channels=channels, align_hidden=align_hidden, patch_size=patch_size)
        # patch_size > 1 (the demo): p consecutive CLIP tokens per transformer token; 1 (official): none
        self.group_in = TokenGrouping(patch_size, clip_dim) if patch_size > 1 else nn.Identity()
        self.layers = nn.ModuleList([EncoderLayer(clip_dim, heads, d_ff, dropout) for _ in range(depth)])
        self.linear = nn.Linear(clip_dim, 2 * channels * patch_size)
        if align_hidden:        # 0: no alignment head (the text autoencoder of image-to-text has none)
            self.align_mlp = nn.Sequential(nn.Linear(clip_dim, align_hidden), nn.SiLU(),
                                           nn.Linear(align_hidden, align_hidden), nn.SiLU(),
                                           nn.Linear(align_hidden, channels))
            self.log_temperature = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # the official layers are deep copies of one freshly built layer: all start identical
        for layer in self.layers[1:]:
            layer.load_state_dict(self.layers[0].state_dict())

    def forward(self, clip_feats, eps=None):
        """(B, 77, clip_dim) -> z, mu, logvar (B, 77, 16) float32; z = mu + exp(logvar / 2) * eps."""
        B, L, _ = clip_feats.shape
        h = self.group_in(clip_feats)                            # (B, 77 / p, clip_dim)
        for layer in self.layers:
            h = layer(h)
        with fp32_region(h):         # the (mu, logvar) head and posterior maths in float32, not autocast's bf16
            mu, logvar = self.linear(h.float()).view(B, L, -1).chunk(2, dim=-1)
        eps = torch.randn_like(mu) if eps is None else eps
        return reparameterize(mu, logvar, eps), mu, logvar

    def align(self, clip_feats):
        """Per-token alignment target MLP(E): (B, 77, clip_dim) -> (B, 77, 16)."""
        return self.align_mlp(clip_feats)


# ----------------------------------------------------------------------------------------------------------
# Training terms of the text side
# ----------------------------------------------------------------------------------------------------------

def reparameterize(mu, logvar, eps):
    """A sample of N(mu, exp(logvar)) from standard normals eps: mu + exp(logvar / 2) * eps (every posterior here)."""
    return mu + torch.exp(0.5 * logvar) * eps


def gaussian_kl(mu, logvar):
    """KL(N(mu, exp(logvar)) || N(0, 1)) per element, float32: 1/2 (mu^2 + exp(logvar) - 1 - logvar)."""
    with fp32_region(mu):        # float32 by construction, not by what autocast's op lists happen to keep
        mu, logvar = mu.float(), logvar.float()
        return 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar)


def contrastive_loss(z, target, log_temperature, groups=None):
    """Symmetric InfoNCE between flattened, L2-normalised z and MLP(E): (CE(S) + CE(S^T)) / 2, S = e^tau z p^T.

    groups: optional (B,) ids; samples with equal ids (the same caption) all count as positives, the target
    mass spread evenly over them (needed when a small caption set repeats within a batch). None = the
    official diagonal.
    """
    with fp32_region(z):         # logits and cross-entropy in float32, even under bf16 autocast
        logits = contrastive_logits(z, target, log_temperature)
        if groups is None:
            labels = torch.arange(len(logits), device=logits.device)
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        positives = (groups[:, None] == groups[None]).float()   # (B, B), symmetric
        soft = positives / positives.sum(1, keepdim=True)
        return (F.cross_entropy(logits, soft) + F.cross_entropy(logits.T, soft.T)) / 2


def contrastive_logits(z, target, log_temperature):
    """S = e^tau a p^T (B, B) of the L2-normalised flattened z and MLP(E), computed in float32 under any autocast."""
    with fp32_region(z):         # autocast would run the matmul in bf16 despite the .float() inputs
        a = F.normalize(z.flatten(1).float(), dim=-1)            # (B, 1232)
        p = F.normalize(target.flatten(1).float(), dim=-1)       # (B, 1232)
        return log_temperature.float().exp() * a @ p.T           # temperature never clamped (official)


def kl_official(mu, logvar):
    """The released checkpoints' KL-like term: -1/2 sum(1 + logvar - (0.3 mu)^6 - e^logvar), SUMMED over batch.

    Differs from kl_standard in two ways: the mean penalty (0.3 mu)^6 is a soft wall (weaker than mu^2 for
    |mu| < ~6, much stronger beyond), and the batch sum makes its weight grow with the per-GPU batch.
    The variance part is the standard KL's, pulling sigma towards 1 (which keeps the source noisy).
    """
    with fp32_region(mu):        # float32 by construction: 1 and e^logvar nearly cancel in the sum
        mu, logvar = mu.float(), logvar.float()
        return -0.5 * torch.sum(1 + logvar - (0.3 * mu) ** 6 - logvar.exp())


def kl_standard(mu, logvar):
    """The paper's KL(N(mu, sigma^2) || N(0, I)), summed over the 77x16 latent and averaged over the batch."""
    return gaussian_kl(mu, logvar).sum() / mu.shape[0]


KL_TERMS = {"official": (kl_official, 0.01), "standard": (kl_standard, 1e-4)}   # form -> (function, default weight)


# ----------------------------------------------------------------------------------------------------------
# Text decoder (image-to-text): text latent -> CLIP token ids
# ----------------------------------------------------------------------------------------------------------

class TextDecoder(nn.Module):
    """(B, 77, 16) text latent -> logits (B, 77, classes): Linear in, learned positions, N layers, Linear out.

    Non-causal: every position sees the whole latent and predicts its CLIP id in one shot; decoding reads
    the ids up to the first EOT (see detokenize). The classes are all 49408 CLIP ids, or (vocab_ids, a CPU
    speed knob) only the ids that occur in the training captions: the head then costs a few hundred outputs
    per position instead of 49408. patch_size (another CPU knob, 1 in the official layout) reads p consecutive
    latent tokens into one transformer token and predicts p positions from it.
    """

    def __init__(self, channels=16, width=768, depth=6, heads=8, d_ff=3072, dropout=0.1, vocab_ids=None,
                 patch_size=1):
        super().__init__()
        if CONTEXT_LENGTH % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide the {CONTEXT_LENGTH} tokens")
        self.config = dict(channels=channels, width=width, depth=depth, heads=heads, d_ff=d_ff, dropout=dropout,
                           vocab_ids=vocab_ids, patch_size=patch_size)
        self.patch_size = patch_size
        # patch_size > 1 (the demo): p consecutive latent tokens in, p positions' logits out of each transformer token
        self.embed = nn.Linear(patch_size * channels, width)
        self.pos = nn.Parameter(torch.randn(CONTEXT_LENGTH // patch_size, width) * width ** -0.5)
        self.layers = nn.ModuleList([EncoderLayer(width, heads, d_ff, dropout) for _ in range(depth)])
        ids = torch.arange(CLIP_VOCAB) if vocab_ids is None else torch.tensor(sorted(set(vocab_ids) | {SOT, EOT}))
        self.register_buffer("vocab_ids", ids, persistent=False)                         # class -> CLIP id
        self.register_buffer("class_of", torch.full((CLIP_VOCAB,), -100).index_put_(   # CLIP id -> class
            (ids,), torch.arange(len(ids))), persistent=False)                           # (-100: not a class)
        self.head = nn.Linear(width, len(ids) * patch_size)

    def forward(self, z, keep=None):
        """(B, 77, 16) -> (B, 77, classes) logits; with keep (B, 77) bool only those positions: (N, classes).

        With all 49408 classes the head dominates the cost: training asks only for the positions of real
        tokens (SOT..EOT, see caption_mask), typically 10-20 of the 77.
        """
        B, L, C = z.shape
        p = self.patch_size
        h = self.embed(z.reshape(B, L // p, p * C)) + self.pos                   # (B, 77 / p, width)
        for layer in self.layers:
            h = layer(h)
        if p == 1:
            return self.head(h if keep is None else h[keep])
        logits = self.head(h).view(B, L, -1)          # (B, 77, classes): p positions per transformer token
        return logits if keep is None else logits[keep]

    def decode(self, z):
        """(B, 77, 16) latent -> (B, 77) CLIP ids (most likely class at each position)."""
        return self.vocab_ids[self(z).argmax(-1)]


def caption_mask(ids):
    """(B, 77) ids -> (B, 77) bool: the positions SOT..EOT of each caption (not the padding after EOT)."""
    eot_pos = (ids == EOT).int().argmax(1, keepdim=True)                        # (B, 1)
    return torch.arange(ids.shape[1], device=ids.device)[None] <= eot_pos


def text_reconstruction_loss(logits, targets, keep):
    """Token cross-entropy over the positions `keep` (caption_mask): logits (B, 77, C) or already masked (N, C);
    targets (B, 77) class indices (TextDecoder.class_of[ids]; ids outside the classes, -100, are ignored)."""
    return F.cross_entropy((logits[keep] if logits.dim() == 3 else logits).float(), targets[keep])


# ----------------------------------------------------------------------------------------------------------
# Shared runtime (the lowest file, so every file may import it): user errors, checkpoint files, devices, ranks
# ----------------------------------------------------------------------------------------------------------

class UserError(Exception):
    """A user's mistake (a bad file, flag or input): every CLI prints it as one line and exits with status 1."""


def one_line(err):
    """An exception -> one line: its first line, plus up to three more joined with '; '."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    more = "; ".join(lines[1:4]) + ("; ..." if len(lines) > 4 else "")
    return lines[0] + (f" ({more})" if more else "")


@contextlib.contextmanager
def user_errors(what):
    """Turn the errors of loading user-given files (bad shapes, missing keys, no file) into a UserError."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
        raise UserError(f"{what}: {one_line(e)}") from None


def fp32_region(x):
    """A context with autocast off on x's device: code inside that casts its inputs with .float() runs in float32.

    Under bf16 autocast a .float() input alone is not enough: matmuls and Linear layers still run in bf16.
    """
    return torch.autocast(x.device.type, enabled=False)


def read_weights(path):
    """A weights file -> its contents, read safely: safetensors, or torch.load(weights_only=True). A missing, corrupt
    or unsafe file is a UserError of one line (never the advice to load it unsafely that torch's message carries)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        return load_file(path) if str(path).endswith(".safetensors") else torch_load(path)
    except Exception as e:     # pickle, zip, safetensors and OS errors alike: the file cannot be used
        why = one_line(e)[:200]
        if "weights_only" in str(e):
            why = "it holds Python objects besides tensors and plain types, which are not loaded (unsafe)"
        raise UserError(f"{path} is not a readable weights file ({type(e).__name__}: {why})") from None


def torch_load(path):
    """torch.load(weights_only=True) to CPU, memory-mapped where the file's format and filesystem allow."""
    # mapped, a checkpoint's tensors are pages of the OS file cache that all ranks of a node share, not one private
    # copy of many GB per rank; legacy-format files (and filesystems without mmap) are read the ordinary way.
    # Not on Windows: it can neither replace nor delete a mapped file, as a resumed run does to its last.pt.
    if os.name != "nt":
        with contextlib.suppress(Exception):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(src):
    """A path or a dict -> a flat state dict: unwraps {ema, nnet_ema, model, state_dict} and module./_orig_mod."""
    sd = read_weights(src) if isinstance(src, (str, bytes)) or hasattr(src, "__fspath__") else src
    for key in ("ema", "nnet_ema", "model", "state_dict"):     # EMA weights preferred when both are present
        if isinstance(sd.get(key), dict):
            return read_state_dict(sd[key])
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def load_strict(model, sd, what):
    """Load every key with matching shapes, or raise one error that lists everything that does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        lines = [f"{what} checkpoint does not fit the model:"]
        lines += [f"  missing: {k}" for k in missing] + [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  shape: {w}" for w in wrong]
        raise ValueError("\n".join(lines))
    model.load_state_dict(sd, strict=True, assign=True)


def load_checkpoint(path):
    """A checkpoint file or a run folder (its last.pt) -> dict, read safely (tensors and plain types only)."""
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    ckpt = read_weights(path)
    if not isinstance(ckpt, dict) or "stage" not in ckpt:
        raise UserError(f"{path} is not a train.py checkpoint (for the official files use --official)")
    ckpt["path"] = path
    return ckpt


def resolve_path(path, ckpt_path):
    """A path recorded in a checkpoint: as recorded if it exists, else found by its tail next to the run.

    Lets a run folder be moved or copied: runs/demo/tokenizer recorded by runs/demo/flow/last.pt is found
    as <wherever runs/demo is now>/tokenizer.
    """
    if path in (None, "openai", "random") or os.path.exists(path):
        return path
    parts = os.path.normpath(path).split(os.sep)
    folder = os.path.dirname(os.path.abspath(ckpt_path))
    for ancestor in (folder, os.path.dirname(folder), os.path.dirname(os.path.dirname(folder))):
        for k in range(1, min(3, len(parts)) + 1):
            candidate = os.path.join(ancestor, *parts[-k:])
            if os.path.exists(candidate):
                return candidate
    raise UserError(f"{ckpt_path} refers to {path}, which is missing")


def find_runs(path):
    """A run folder, a checkpoint file, or a demo folder holding stage subfolders -> {stage: checkpoint path}."""
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, "last.pt")):
        return {load_checkpoint(path)["stage"]: path}
    found = {s: os.path.join(path, s) for s in ("flow", "flow-i2t", "text-ae", "tokenizer")
             if os.path.isfile(os.path.join(path, s, "last.pt"))}
    if not found:
        raise UserError(f"no checkpoint at {path} (expected a file, a run folder with last.pt, or a demo "
                              f"folder with flow/last.pt)")
    return found


def pick_device(name, local_rank=0):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> torch.device; auto: CUDA, then MPS, then CPU; under torchrun,
    auto / cuda mean the local rank's GPU."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return use_cuda(torch.device("cuda", local_rank))
    if name == "auto":                                   # then Apple's GPU, then the CPU
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple's MPS is not available here")
    return use_cuda(device) if device.type == "cuda" else device


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}     # --precision choices besides fp32
PRECISIONS = ["bf16", "fp16", "fp32"]


def default_precision(device):
    """bf16 where the GPU computes it natively (Ampere and later), fp16 on older CUDA GPUs (V100, T4), fp32 on CPU
    and Apple's MPS."""
    if device.type != "cuda":
        return "fp32"
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:                        # older torch: no emulation to exclude
        native = torch.cuda.is_bf16_supported()
    return "bf16" if native else "fp16"


def amp(device, precision):
    """Autocast to `precision` (bf16 | fp16) on `device`; fp32: a disabled context."""
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(precision, torch.bfloat16), enabled=precision in AMP_DTYPES)


def use_cuda(device):
    """Make `device` this process's current GPU and let fp32 matmuls use TF32, as every entry point does."""
    torch.cuda.set_device(device)            # NCCL and bare .cuda() calls go to this rank's GPU, not GPU 0
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


@contextlib.contextmanager
def ranks():
    """-> (rank, world, local rank) from torchrun's environment, (0, 1, 0) without it; world > 1 joins a gloo group.

    The group only serves barriers (wait for every rank's images) and agreements on errors (agree), so gloo works on
    CPU and GPU alike.
    """
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        # hours: a barrier waits for the slowest rank's whole share of the samples (uneven after --skip-existing)
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    try:
        yield rank, world, int(os.environ.get("LOCAL_RANK", 0))
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def barrier(world):
    """Wait for every rank (no-op alone)."""
    if world > 1:
        dist.barrier()


def broadcast(obj, world):
    """Rank 0's picklable `obj` on every rank (as is alone): one decision for all, never one per rank."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(problem, world):
    """Every rank calls this at the same point with None or its one-line problem; a problem on any rank raises the
    same UserError (the lowest failing rank's) on every rank, so none waits forever for a rank that left."""
    problems = [problem]
    if world > 1:
        problems = [None] * world
        dist.all_gather_object(problems, problem)
    failed = [p for p in problems if p]
    if failed:
        raise UserError(failed[0] + (f" ({len(failed)} of {world} ranks failed)" if len(failed) > 1 else ""))


def on_every_rank(world, rank, fn, *args):
    """fn(*args) on this rank -> its result; a UserError on any rank stops every rank with that one message."""
    if world == 1:
        return fn(*args)
    try:
        result, problem = fn(*args), None
    except UserError as e:
        result, problem = None, (f"rank {rank}: " if rank else "") + one_line(e)
    agree(problem, world)
    return result


def check_writable(out, rank=0):
    """Create --out and prove it writable now, before any model is loaded."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write_test_{rank}_{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out {out} is not writable ({e.strerror or e})") from None


def fused_if_available(device):
    """AdamW's fused kernel where this torch has it for the device (CUDA; CPU from torch 2.4)."""
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError):
        return {}


def _checked(kind, ok, what, name):
    """An argparse type: kind(text) that must satisfy ok, else a one-line error naming the flag (exit 2)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = name
    return parse


# argparse types for every numeric flag: a bad value stops at parse time, never as a wrong or crashed run
positive_int = _checked(int, lambda v: v >= 1, ">= 1", "positive_int")
non_negative_int = _checked(int, lambda v: v >= 0, ">= 0", "non_negative_int")
finite_float = _checked(float, math.isfinite, "a finite number", "finite_float")
positive_float = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0", "positive_float")
non_negative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0",
                              "non_negative_float")
fraction = _checked(float, lambda v: 0 <= v <= 1, "in [0, 1]", "fraction")
token_group = _checked(int, lambda v: v >= 1 and CONTEXT_LENGTH % v == 0,          # the --*-patch-size flags
                       f"a divisor of the {CONTEXT_LENGTH} tokens (1, 7, 11 or 77)", "token_group")


def multiple_of(n):
    """An argparse type for widths split into n groups (GroupNorm(n, width)): n, 2n, 3n, ..."""
    return _checked(int, lambda v: v >= n and v % n == 0, f"a multiple of {n}", f"multiple_of_{n}")


def run_cli(prog, main, args):
    """Run a CLI's main -> the exit status: 0 done, 1 a user error (one line on stderr, no traceback),
    128 + N a run stopped by signal N after saving (main returns {"stopped": N}); argparse exits 2 on bad flags."""
    try:
        result = main(args)
    except UserError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 1
    return 128 + result["stopped"] if isinstance(result, dict) and result.get("stopped") else 0


def weights_sha256(*modules):
    """sha256 hex of modules' (or state dicts') tensors: key, dtype, shape and bytes, keys sorted, modules in order.

    The identity of weights, not of a file: the same tensors hash the same from any file format, device or key
    order, and a checkpoint's unused copies (raw weights beside the EMA ones, optimizer state) do not count.
    """
    digest = hashlib.sha256()
    for k, module in enumerate(modules):
        sd = module.state_dict() if isinstance(module, nn.Module) else module
        for key in sorted(sd):
            t = sd[key].detach().cpu().contiguous()
            digest.update(f"{k}:{key}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())     # raw bytes (bfloat16 has no numpy dtype)
    return digest.hexdigest()


def file_sha256(path, chunk=1 << 20):
    """sha256 hex of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def short_hash(digest):
    """The first 12 hex digits of a hash, for messages (None -> 'none')."""
    return digest[:12] if digest else "none"


def write_json_atomic(path, obj):
    """Write obj as JSON to a temporary name, then rename: readers see the old file or the whole new one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
