"""FlowTok evaluation: FID of image folders (text-to-image) and BLEU-4 / CIDEr-D of captions (image-to-text).

    python evaluate.py fid REAL FAKE                          # REAL, FAKE: image folders or .npz statistics
    python evaluate.py fid coco_val/ --save-stats coco.npz    # only write the statistics of one folder
    python evaluate.py fid coco.npz samples/ --resize tf --inception-weights pt_inception-2015-12-05-6726825d.pth

FID protocol. pytorch-fid's InceptionV3 (the TF 2015-12-05 graph with its FID quirks, ported to PyTorch) gives
2048-d pool3 features; their mean and unbiased covariance are accumulated in float64 and the Frechet distance
uses scipy.linalg.sqrtm. The weights are pytorch-fid's release file (key names kept, so it loads strictly):
`--inception-weights FILE`, else the torch hub cache, else a download. Images are resized to 299x299 by
  --resize bilinear  (default) pytorch-fid's F.interpolate(bilinear, align_corners=False) on [0,1], then 2x-1;
  --resize tf        torch-fidelity's (as the official FlowTok evaluator) TF1 resize_bilinear on 0..255, (x-128)/128.
The two give different FIDs for the same images: TF1 samples input pixel i*in/out where PyTorch uses half-pixel
centres (a shift of (1-in/out)/2 input pixels, 0.07 for 256->299), and (x-128)/128 is not x/127.5-1.
Compare only FIDs computed with the same resize, sample count and reference set. Fewer than 2048 images make
the covariance rank-deficient (a warning is printed); papers use 10k-50k samples.

Caption metrics (image-to-text) follow the COCO caption evaluation toolkit (pycocoevalcap): corpus BLEU-4 and
CIDEr-D on lower-cased PTB tokens with punctuation removed. The toolkit runs the Stanford PTBTokenizer (Java);
`ptb_tokenize` is a Python approximation of it (clitics, punctuation, quotes, brackets): captions with rare
symbols may tokenise, hence score, slightly differently.
"""
import argparse
import contextlib
import math
import os
import re
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from tqdm import tqdm

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MIN_FID_IMAGES = 2048  # below the feature dimension the covariance is rank-deficient


class EvalError(Exception):
    """A user-facing error: the CLI prints its one-line message and exits non-zero."""


# ----------------------------------------------------------------------------------------------------------------
# FID Inception (pytorch-fid's FID variant of InceptionV3; module and attribute names = its state-dict keys)
# ----------------------------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, as in TF) + ReLU."""

    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    """3x3 stride-1 average pool that, like TF's, leaves the zero padding out of the average."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | TF avg pool-1x1."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction: 3x3/2 | 1x1-3x3-3x3/2 | max pool/2."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    """17x17 block with factorised 7x7 convs: 1x1 | 1x7-7x1 | 7x1-1x7-7x1-1x7 | TF avg pool-1x1."""

    def __init__(self, cin, channels_7x7):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(_tf_avg_pool(x))], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE_1(nn.Module):
    """8x8 block (Mixed_7b): 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | TF avg pool-1x1."""

    def __init__(self, cin):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def pool(self, x):
        return _tf_avg_pool(x)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3dbl = torch.cat([self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl)], 1)
        return torch.cat([self.branch1x1(x), b3, b3dbl, self.branch_pool(self.pool(x))], 1)


class FIDInceptionE_2(FIDInceptionE_1):
    """Last 8x8 block (Mixed_7c): the FID graph max-pools in its pool branch (a quirk of that TF graph)."""

    def pool(self, x):
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class InceptionV3(nn.Module):
    """pytorch-fid's FID InceptionV3: (B, 3, 299, 299) input in [-1, 1] -> (B, 2048) pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE_1(1280)
        self.Mixed_7c = FIDInceptionE_2(2048)
        self.fc = nn.Linear(2048, 1008)  # unused for FID; kept so that the release file loads strictly

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                       # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                      # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                       # (B, 192, 35, 35)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)                                                   # ... -> (B, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)                      # (B, 2048)


def load_inception(weights=None):
    """The FID InceptionV3 in eval mode, from `weights` (a local release file) or the hub cache / a download."""
    if weights is not None:
        if not os.path.isfile(weights):
            raise EvalError(f"--inception-weights: no such file {weights}")
        state = torch.load(weights, map_location="cpu", weights_only=True)
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE
        try:  # reads the cached file if present, else downloads it there
            state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", weights_only=True)
        except OSError as err:  # URLError, timeouts, no route: we are offline
            raise EvalError(f"the FID Inception weights are not in the torch hub cache and the download failed "
                            f"({err}). Download {FID_WEIGHTS_URL} on a machine with internet access and either "
                            f"put it at {cached} or pass --inception-weights /path/to/{FID_WEIGHTS_FILE}") from None
    net = InceptionV3()
    net.load_state_dict(state)  # strict: the key names are pytorch-fid's
    return net.eval().requires_grad_(False)


@contextlib.contextmanager
def full_fp32():
    """Disable TF32 (cuDNN's default for convolutions on Ampere+): FID features need full float32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# ----------------------------------------------------------------------------------------------------------------
# Input pipeline: images -> (B, 3, 299, 299) network input
# ----------------------------------------------------------------------------------------------------------------

def resize_tf1(x, size=299):
    """Bilinear resize of (B, C, H, W) float as TF 1.x resize_bilinear(align_corners=False), like torch-fidelity."""
    def axis(n_in):
        # TF1 maps output index i to source coordinate i * in/out (no half-pixel offset), in float32
        src = torch.arange(size, dtype=torch.float32, device=x.device) * (n_in / size)
        lo = src.long()  # floor: src >= 0
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).to(x.dtype)
    (y0, y1, wy), (x0, x1, wx) = axis(x.shape[2]), axis(x.shape[3])
    top, bottom = x[:, :, y0], x[:, :, y1]                       # (B, C, size, W)
    top = top[..., x0] + (top[..., x1] - top[..., x0]) * wx      # (B, C, size, size)
    bottom = bottom[..., x0] + (bottom[..., x1] - bottom[..., x0]) * wx
    return top + (bottom - top) * wy[:, None]


def preprocess(images, resize="bilinear"):
    """(B, 3, H, W) uint8 or [0,1] float images -> (B, 3, 299, 299) float32 Inception input."""
    if resize == "bilinear":  # pytorch-fid: resize [0, 1] values, then 2x - 1
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    if resize == "tf":  # torch-fidelity: resize 0..255 values, then (x - 128) / 128
        x = images.float() if images.dtype == torch.uint8 else images.float() * 255
        return (resize_tf1(x, 299) - 128) / 128
    raise ValueError(f"unknown resize {resize!r}: use 'bilinear' or 'tf'")


def image_files(folder):
    """The sorted image files directly inside `folder` (not recursive)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalError(f"{folder}: not a folder (nor a .npz statistics file)")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise EvalError(f"{folder}: no images ({'/'.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) in it")
    return files


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> ((3, 299, 299) Inception input, readable?); an unreadable file gives zeros and False."""

    def __init__(self, files, resize):
        self.files, self.resize = files, resize

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as im:
                img = torch.from_numpy(np.array(im.convert("RGB")))  # (H, W, 3) uint8
        except (OSError, ValueError):  # PIL's errors for truncated or non-image files
            return torch.zeros(3, 299, 299), False
        # resized one by one here (in the workers), so that a folder may mix image sizes
        return preprocess(img.permute(2, 0, 1)[None], self.resize)[0], True


# ----------------------------------------------------------------------------------------------------------------
# Statistics and the Frechet distance
# ----------------------------------------------------------------------------------------------------------------

class Stats(NamedTuple):
    """Gaussian fit of Inception features: mean (D,), covariance (D, D), sample count, resize (None: unknown)."""
    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None
    resize: str | None = None


class FeatureStats:
    """Running float64 sum and Gram matrix of features -> mean and unbiased (N-1) covariance."""

    def __init__(self, dim=2048, device="cpu"):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)          # (D,)
        self.gram = torch.zeros(dim, dim, dtype=torch.float64, device=device)    # (D, D)

    def update(self, feats):
        """Add a (B, D) batch of features."""
        f = feats.to(self.sum.device, torch.float64)
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.gram += f.T @ f

    def mean_cov(self):
        """(mu (D,), sigma (D, D)) as float64 numpy arrays."""
        if self.n < 2:
            raise EvalError(f"a covariance needs at least 2 images, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.gram - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def folder_stats(folder, net, resize="bilinear", batch_size=50, device="cpu", num_workers=0):
    """Inception statistics of the images in `folder` (net already on `device`)."""
    files = image_files(folder)
    if len(files) < MIN_FID_IMAGES:
        print(f"warning: {folder} has {len(files)} < {MIN_FID_IMAGES} images: the covariance is rank-deficient "
              f"and the FID unreliable (papers use 10k-50k)", file=sys.stderr)
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(ImageFiles(files, resize), batch_size=batch_size, num_workers=num_workers,
                                         pin_memory=device.type == "cuda")
    acc, unreadable = FeatureStats(device=device), []
    with full_fp32(), torch.inference_mode():
        for b, (x, ok) in enumerate(tqdm(loader, desc=f"Inception {Path(folder).name}", unit="batch")):
            unreadable += [files[b * batch_size + i] for i in torch.nonzero(~ok).flatten().tolist()]
            if ok.any():
                acc.update(net(x[ok].to(device, non_blocking=True)))  # (B, 2048)
    if unreadable:
        names = ", ".join(p.name for p in unreadable[:5]) + (", ..." if len(unreadable) > 5 else "")
        raise EvalError(f"{folder}: {len(unreadable)} unreadable image(s): {names}")
    return Stats(*acc.mean_cov(), acc.n, resize)


def save_stats(path, stats):
    """Write `mu`, `sigma` (pytorch-fid's keys) plus `n` and `resize` to a .npz file."""
    np.savez_compressed(path, mu=stats.mu, sigma=stats.sigma, n=stats.n, resize=stats.resize)


def load_stats(path):
    """Read a .npz written by save_stats or by pytorch-fid (which has only `mu` and `sigma`)."""
    try:
        with np.load(path) as f:
            return Stats(f["mu"].astype(np.float64), f["sigma"].astype(np.float64),
                         int(f["n"]) if "n" in f else None, str(f["resize"]) if "resize" in f else None)
    except (OSError, KeyError, ValueError) as err:
        raise EvalError(f"{path}: not a statistics file with 'mu' and 'sigma' ({err})") from None


def _sqrtm(a):
    """scipy's matrix square root, without its singular-matrix warning (handled by the caller)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(a)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) in float64, as pytorch-fid."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # a (near-)singular product, e.g. from fewer samples than dimensions: regularise both covariances
        print(f"warning: singular covariance product; adding {eps} to the covariance diagonals", file=sys.stderr)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # round-off gives the square root of a PSD product a tiny imaginary part; a large one means broken input
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------------------------------------------
# Caption metrics (COCO caption evaluation toolkit: BLEU-4 and CIDEr-D)
# ----------------------------------------------------------------------------------------------------------------

# tokens the toolkit drops after PTB tokenisation (brackets are -LRB- etc. there; we drop them before)
PTB_PUNCTUATION = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def ptb_tokenize(caption):
    """Caption -> lower-case PTB-style tokens without punctuation (approximates the toolkit's Java tokenizer)."""
    s = caption.lower().replace("\n", " ")
    s = re.sub(r"[\"()\[\]{}]", " ", s)                    # quotes and brackets: PTB symbols the toolkit drops
    s = re.sub(r"(^|\s)'|'(\s|$)", r"\1 \2", s)            # quote marks around words (dogs' -> dogs)
    s = re.sub(r"(\w)(n't)\b", r"\1 \2", s)                # don't -> do n't
    s = re.sub(r"(\w)('s|'re|'ve|'ll|'d|'m)\b", r"\1 \2", s)  # dog's -> dog 's
    s = re.sub(r"[?!;]|(?<!\d)[.,:]|[.,:](?!\d)", r" \g<0> ", s)  # split punctuation, keep 3.5 / 1,000 / 12:30
    return [t for t in s.split() if t not in PTB_PUNCTUATION]


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


# ----------------------------------------------------------------------------------------------------------------
# The shapes world (the embedded demo): prompt accuracy of generated images, caption accuracy of generated text
# ----------------------------------------------------------------------------------------------------------------

def shapes_prompt_accuracy(pipe, prompts, n_per_prompt=4, steps=20, cfg=2.0, seed=0, batch_size=256):
    """Generate n_per_prompt images per shapes prompt, read them back (data.analyse_shape) -> accuracies.

    Returns {colour, shape, both, size, position}: the fraction of images whose attribute matches the prompt.
    """
    import data
    import sample
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n_per_prompt)]
    images = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        eps = torch.stack([sample.sample_noise(i, j, seed) for i, j in chunk])
        images.append(pipe.generate([prompts[i] for i, _ in chunk], steps, cfg, eps=eps).cpu())
    return data.shape_accuracy(torch.cat(images), [prompts[i] for i, _ in jobs])


def shapes_caption_accuracy(captions, attrs):
    """Generated captions vs the true attributes of their images -> {colour, shape, both, size, position, parsed}."""
    import data
    hits, n = Counter(), max(len(captions), 1)
    for caption, want in zip(captions, attrs):
        got = data.parse_caption(caption) or {}
        hits["parsed"] += bool(got)
        for key in ("colour", "shape", "size", "position"):
            hits[key] += got.get(key) == want[key]
        hits["both"] += got.get("colour") == want["colour"] and got.get("shape") == want["shape"]
    return {k: hits[k] / n for k in ("colour", "shape", "both", "size", "position", "parsed")}


# ----------------------------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------------------------

def pick_device(name):
    """'auto' -> cuda if available else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_fid(args):
    """`fid`: FID between REAL and FAKE (folders or .npz), or only write REAL's statistics; returns the FID."""
    paths = [p for p in (args.real, args.fake) if p is not None]
    if args.fake is None and args.save_stats is None:
        raise EvalError("give FAKE too, or --save-stats OUT.npz to only write the statistics of REAL")
    for p in paths:  # fail on a bad path before loading the network
        if not p.endswith(".npz"):
            image_files(p)
        elif not os.path.isfile(p):
            raise EvalError(f"{p}: no such statistics file")
    if args.save_stats is not None and args.real.endswith(".npz"):
        raise EvalError("--save-stats: REAL is already a .npz statistics file")
    device, net, stats = pick_device(args.device), None, []
    for p in paths:
        if p.endswith(".npz"):
            stats.append(load_stats(p))
            continue
        if net is None:  # built only when a folder needs it
            net = load_inception(args.inception_weights).to(device)
        stats.append(folder_stats(p, net, args.resize, args.batch_size, device, args.num_workers))
    if args.save_stats is not None:
        save_stats(args.save_stats, stats[0])
        print(f"wrote statistics of {args.real} ({stats[0].n} images, resize {args.resize}) to {args.save_stats}")
    if len(stats) == 1:
        return None
    real, fake = stats
    if real.resize and fake.resize and real.resize != fake.resize:
        print(f"warning: REAL used resize {real.resize}, FAKE {fake.resize}: the FID is not comparable",
              file=sys.stderr)
    try:
        value = frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)
    except ValueError as err:  # mismatched or broken statistics
        raise EvalError(str(err)) from None
    print(f"implementation: pytorch-fid InceptionV3 (TF 2015-12-05 weights), pool3 2048-d; device {device}\n"
          f"resize:         REAL {real.resize or 'unknown'}, FAKE {fake.resize or 'unknown'} (to 299x299)\n"
          f"samples:        REAL {real.n or '?'} ({args.real}), FAKE {fake.n or '?'} ({args.fake})\n"
          f"precision:      float32 features (TF32 off), float64 statistics, unbiased covariance, scipy sqrtm\n"
          f"FID: {value:.4f}")
    return value


def main(args):
    """Run the chosen subcommand; returns its result (the FID for `fid`)."""
    if args.command == "fid":
        return run_fid(args)
    raise EvalError(f"unknown command {args.command}")


def build_parser():
    """The command-line interface."""
    parser = argparse.ArgumentParser(description="FlowTok evaluation (see the module docstring).")
    sub = parser.add_subparsers(dest="command", required=True)
    fid = sub.add_parser("fid", help="FID between two image folders / .npz statistics")
    fid.add_argument("real", help="reference image folder or .npz statistics")
    fid.add_argument("fake", nargs="?", help="generated image folder or .npz statistics")
    fid.add_argument("--save-stats", metavar="OUT.npz", help="also write REAL's statistics (REAL must be a folder)")
    fid.add_argument("--inception-weights", metavar="FILE",
                     help=f"local {FID_WEIGHTS_FILE} (default: torch hub cache, else download)")
    fid.add_argument("--resize", choices=["bilinear", "tf"], default="bilinear",
                     help="bilinear: pytorch-fid's (default); tf: torch-fidelity's TF1 resize")
    fid.add_argument("--batch-size", type=int, default=50)
    fid.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    fid.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1))
    return parser


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except EvalError as err:
        sys.exit(f"evaluate.py: error: {err}")
