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
import functools
import math
import os
import re
from collections import Counter

import torch
import torch.nn as nn
import torch.nn.functional as F
import open_clip
from huggingface_hub import hf_hub_download
from open_clip.transformer import QuickGELU, TextTransformer
from safetensors.torch import save_file

from runtime import UserError, atomic_path, checked, fp32_region, read_weights

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
# argparse type of the --*-patch-size flags: groups of consecutive tokens must tile the 77
token_group = checked(int, lambda v: v >= 1 and CONTEXT_LENGTH % v == 0,
                      f"a divisor of the {CONTEXT_LENGTH} tokens (1, 7, 11 or 77)", "token_group")


# ----------------------------------------------------------------------------------------------------------
# CLIP: tokenizer and frozen text tower
# ----------------------------------------------------------------------------------------------------------

# A caption is cut to this many characters (after collapsing runs of whitespace, as CLIP's cleaning does anyway)
# before BPE: a CLIP token spans at most 32 bytes, so 77 tokens never reach past 77 x 33 characters, and BPE, whose
# time grows faster than a word's length (20k characters: 16 s), never sees an unbounded input.
MAX_CAPTION_CHARS = CONTEXT_LENGTH * 33
BPE_CACHE_WORDS = 100_000                  # open_clip caches every distinct word; past this many it starts afresh
_WHITESPACE = re.compile(r"\s+")


@functools.lru_cache(maxsize=1)
def _bpe():
    """open_clip's CLIP BPE tokenizer (the vocabulary ships inside open_clip: no download) and its word cache as
    built (the special tokens)."""
    tok = open_clip.SimpleTokenizer()
    return tok, dict(tok.cache)


def cut_caption(text):
    """A caption -> (what BPE sees, whether it was cut): at most MAX_CAPTION_CHARS characters."""
    if len(text) <= MAX_CAPTION_CHARS:
        return text, False
    text = _WHITESPACE.sub(" ", text).lstrip()
    return text[:MAX_CAPTION_CHARS], len(text) > MAX_CAPTION_CHARS


@functools.lru_cache(maxsize=4096)    # a few MB per loader worker even for long recaptions (cut_caption bounds them)
def _bpe_ids(text):
    """One caption -> its BPE ids (a tuple), cached: captions repeat across epochs and, in the demo, within a batch."""
    bpe, special = _bpe()
    if len(bpe.cache) > BPE_CACHE_WORDS:  # a stream of ever new words (URLs, ids) would grow it without end
        bpe.cache = dict(special)
    return tuple(bpe.encode(text))


def tokenize(texts):
    """Captions -> (ids (B, 77) long, truncated (B,) bool), exactly as open_clip's CLIP tokenizer.

    [SOT, bpe..., EOT] padded with 0; a caption over 77 tokens is cut and its last id forced to EOT
    (we re-do open_clip's loop so that the truncation can be reported instead of silently happening). A caption
    over MAX_CAPTION_CHARS is cut to that first (cut_caption): its 77 ids are the same, BPE's time is bounded.
    """
    rows, truncated = [], []
    for text in texts:
        text, cut = cut_caption(text)
        seq = [SOT, *_bpe_ids(text), EOT]
        truncated.append(cut or len(seq) > CONTEXT_LENGTH)
        seq = seq[:CONTEXT_LENGTH - 1] + [EOT] if truncated[-1] else seq
        rows.append(seq + [0] * (CONTEXT_LENGTH - len(seq)))
    ids = torch.tensor(rows, dtype=torch.long).reshape(len(texts), CONTEXT_LENGTH)   # (B, 77)
    return ids, torch.tensor(truncated, dtype=torch.bool)


def detokenize(ids):
    """CLIP ids (B, 77) -> captions: text between SOT and the first EOT; special tokens never reach the output."""
    bpe, out = _bpe()[0], []
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
        return self.distinct(ids.to(self.text.token_embedding.weight.device))

    def distinct(self, ids):
        """forward(ids), each distinct row run once: rows never interact in the tower, and captions repeat (several
        samples per prompt; the shapes world's 200 captions)."""
        unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
        return self(unique)[inverse] if len(unique) < len(ids) else self(ids)


def clip_for_run(tower, weights, seed, out, rank=0):
    """The frozen CLIP text tower of a training run -> (encoder, the weights its checkpoints record).

    A random tower (tests, the demo) is drawn from `seed` on every rank and saved (rank 0) as
    out/clip_text.safetensors, so that later stages and sample.py use exactly the same one (that file is what
    they record and what --clip-weights takes).
    """
    if weights != "random":
        try:
            return CLIPTextEncoder(tower, weights), weights
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(str(e)) from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextEncoder(tower, "random")
    path = os.path.join(out, "clip_text.safetensors")
    if rank == 0 and not os.path.exists(path):
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in clip.text.state_dict().items()}, tmp)
    return clip, path


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


def caption_groups(ids):
    """(B, 77) CLIP ids -> (B,) int64 hash: equal captions get equal ids (contrastive positives)."""
    weights = torch.arange(1, ids.shape[1] + 1, device=ids.device, dtype=torch.long) * 1_000_003 + 7919
    return (ids.long() * weights).sum(1) % (2 ** 61 - 1)


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


def text_ae_loss(proj, decoder, clip, ids, eps, w_kl=1e-4):
    """The text autoencoder's objective (image to text, train.py --stage text-ae): the caption's CLIP features ->
    projector sample z -> TextDecoder -> token cross-entropy over the caption's tokens (caption_mask), + w_kl x the
    standard KL -> dict of scalars ("loss" is what backward sees; token_acc and exact: the decoded tokens)."""
    z, mu, logvar = proj(clip, eps)
    keep = caption_mask(ids)
    targets = decoder.class_of[ids]                                          # CLIP ids -> head classes
    logits = decoder(z, keep)                                                # (N, classes): real tokens only
    ce = text_reconstruction_loss(logits, targets, keep)
    kl = kl_standard(mu, logvar)
    wrong = torch.zeros_like(keep)
    wrong[keep] = logits.detach().argmax(-1) != targets[keep]
    return dict(loss=ce + w_kl * kl, ce=ce, kl=kl, token_acc=1 - wrong.sum() / keep.sum(),
                exact=(~wrong.any(1)).float().mean(), sigma=torch.exp(0.5 * logvar.detach()).mean())


# ----------------------------------------------------------------------------------------------------------
# Caption metrics (COCO caption evaluation toolkit: BLEU-4 and CIDEr-D)
# ----------------------------------------------------------------------------------------------------------

# tokens the toolkit drops after PTB tokenisation. Its list spells the brackets -LRB- etc., but its tokenizer runs
# with -lowerCase and writes -lrb- etc.: brackets stay in the scored text as -lrb- -rrb- -lsb- -rsb- -lcb- -rcb-
PTB_PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
PTB_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"],
                   "gimme": ["gim", "me"], "lemme": ["lem", "me"], "'tis": ["'t", "is"], "'twas": ["'t", "was"]}
# words that keep their final period (as do single letters and letter-period runs: a. u.s. e.g.; "no." before digits)
PTB_ABBREVIATIONS = set("mr mrs ms dr st jr sr prof gen capt mt ft sq ave co inc ltd corp vs etc "
                        "jan feb mar apr jun jul aug sep sept oct nov dec".split())
_PTB_END = r"[.,;:?!]*(?:\s|$)"        # the end of a word, allowing for the punctuation that follows it


def _ptb_periods(tokens):
    """Split a word's final period off, unless the word is an abbreviation (see PTB_ABBREVIATIONS)."""
    out = []
    for k, t in enumerate(tokens):
        stem = t[:-1]
        keep = (not t.endswith(".") or t in PTB_PUNCTUATION or re.fullmatch(r"[a-z](?:\.[a-z])*", stem)
                or stem in PTB_ABBREVIATIONS or stem == "no" and tokens[k + 1:k + 2] and tokens[k + 1][0].isdigit())
        out += [t] if keep else [stem, "."]
    return out


def ptb_tokenize(caption):
    """Caption -> lower-case PTB tokens without the toolkit's punctuation (the Java tokenizer's common rules)."""
    s = re.sub(r"(?<![A-Z])&|&(?![A-Z])", " & ", caption.replace("\n", " ")).lower()   # AT&T whole, b&w split
    s = re.sub(r"\"|``|''", " ", s)                         # double quotes (`` and '' there, then dropped)
    s = re.sub(r"[()\[\]{}]", lambda m: f" {PTB_BRACKETS[m.group()]} ", s)
    s = re.sub(r"[$%#+=*^~|\\]|/(?!\S)", r" \g<0> ", s)      # symbols are tokens ($ 5, 50 %, w /; a/b stays)
    s = re.sub(r"-{2,}", " -- ", s)
    s = re.sub(r"\.{2,}", " ... ", s)
    s = re.sub(r"(\d:\d\d)([ap]m)\b", r"\1 \2", s)          # 10:30pm -> 10:30 pm
    s = re.sub(r"(?<=\d)'(?=\d)", " ", s)                    # 6'2 -> 6 2
    s = re.sub(r"(\w)'n'(\w)", r"\1 'n' \2", s)             # rock'n'roll -> rock 'n' roll
    s = re.sub(r"(\w)(n't)\b", r"\1 \2", s)                 # don't -> do n't
    s = re.sub(r"(\w)('s|'re|'ve|'ll|'d|'m)\b", r"\1 \2", s)  # dog's -> dog 's
    # quote marks: a leading ' (unless it begins 's 're ... 'em 'n' 'tis '90s), a trailing ' (unless it ends 'n')
    s = re.sub(rf"(?<!\S)'(?!(?:s|re|ve|ll|d|m|em|n'|tis|twas){_PTB_END}|\d)", " ", s)
    s = re.sub(rf"(?<!'n)'(?={_PTB_END})", " ", s)
    s = re.sub(r"[?!]+(?=\s|$)", r" \g<0> ", s)              # is it?! -> is it ?! (a?b stays whole)
    s = re.sub(r";|(?<!\d)[,:]|[,:](?!\d)", r" \g<0> ", s)   # keep 1,000 and 12:30
    tokens = [w for t in s.split() for w in PTB_SPLIT_WORDS.get(t, [t])]
    return [t for t in _ptb_periods(tokens) if t not in PTB_PUNCTUATION]


def _ngram_counts(tokens, n=4):
    """Counter of all k-grams (tuples), k = 1..n."""
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def _tokenized(candidates, references):
    """Check the two dicts match and tokenise: id -> candidate tokens, id -> list of reference token lists."""
    if candidates.keys() != references.keys():
        raise ValueError("candidates and references must have the same ids")
    if not candidates or any(len(references[i]) == 0 for i in candidates):
        raise ValueError("need at least one id, and at least one reference per id")
    return ({i: ptb_tokenize(c) for i, c in candidates.items()},
            {i: [ptb_tokenize(r) for r in refs] for i, refs in references.items()})


def bleu4(candidates, references):
    """Corpus BLEU-4 as the COCO toolkit's Bleu scorer ('closest' reference length for the brevity penalty)."""
    cands, refs = _tokenized(candidates, references)
    correct, guess, cand_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for i, cand in cands.items():
        max_ref = Counter()
        for ref in refs[i]:
            max_ref |= _ngram_counts(ref)  # union = per-n-gram max count over the references
        for gram, count in _ngram_counts(cand).items():
            correct[len(gram) - 1] += min(count, max_ref[gram])  # clipped matches
        for k in range(4):
            guess[k] += max(0, len(cand) - k)
        cand_len += len(cand)
        ref_len += min((abs(len(r) - len(cand)), len(r)) for r in refs[i])[1]  # closest; ties -> the shorter
    # the toolkit's smoothing constants: a zero count gives ~0 (not an error), an empty order ~1e-6
    tiny, small = 1e-15, 1e-9
    score = math.prod((c + tiny) / (g + small) for c, g in zip(correct, guess)) ** (1 / 4)
    ratio = (cand_len + tiny) / (ref_len + small)
    return score * math.exp(1 - 1 / ratio) if ratio < 1 else score


def cider_d(candidates, references, sigma=6.0):
    """Corpus CIDEr-D as the COCO toolkit's Cider scorer (idf from the references of all ids; x10 scale)."""
    cands, refs = _tokenized(candidates, references)
    # document frequency: in how many ids' reference sets an n-gram occurs
    df = Counter(gram for i in refs for gram in set().union(*(_ngram_counts(r) for r in refs[i])))
    log_n = math.log(len(refs))  # a single id gives idf 0 everywhere, hence CIDEr 0: score a whole corpus

    def tfidf(tokens):
        """-> per-order {n-gram: tf * idf} (4 dicts), their L2 norms, and the toolkit's length (# of bigrams)."""
        vec = [{} for _ in range(4)]
        for gram, tf in _ngram_counts(tokens).items():
            vec[len(gram) - 1][gram] = tf * (log_n - math.log(max(1.0, df[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        return vec, norms, max(len(tokens) - 1, 0)  # the toolkit counts bigrams as the caption length

    scores = []
    for i, cand in cands.items():
        vec_c, norm_c, len_c = tfidf(cand)
        total = [0.0] * 4
        for ref in refs[i]:
            vec_r, norm_r, len_r = tfidf(ref)
            penalty = math.exp(-((len_c - len_r) ** 2) / (2 * sigma ** 2))  # Gaussian length penalty
            for k in range(4):
                # cosine similarity with the candidate's tf-idf clipped by the reference's ("-D": no gaming by repeats)
                dot = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_c[k].items())
                if norm_c[k] != 0 and norm_r[k] != 0:
                    dot /= norm_c[k] * norm_r[k]
                total[k] += dot * penalty
        scores.append(10.0 * sum(total) / 4 / len(refs[i]))  # mean over n, mean over references, x10
    return sum(scores) / len(scores)
