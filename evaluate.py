"""FlowTok evaluation: FID, COCO-30K, MJHQ-30K, CLIP score, image-to-text captions, tokenizer rFID and speed.

    python evaluate.py fid real_images/ samples/ --device cpu
    python evaluate.py mjhq30k --ckpt runs/xl --mjhq-meta meta_data.json --mjhq-images mjhq30k_imgs --out eval/mjhq
    torchrun --nproc_per_node 8 evaluate.py coco30k --ckpt runs/xl --coco-captions captions_val2014.json \\
        --coco-images val2014 --out eval/coco

The first compares two image folders on a CPU; the second runs MJHQ-30K on one GPU; the third COCO-30K on 8 GPUs
(each rank generates its slice, rank 0 computes the FID). `python evaluate.py SUBCOMMAND --help` lists the flags;
README.md's "Evaluation" section is the manual (FID resize modes, protocols, CLIP score, captions, speed).
"""
import argparse
import contextlib
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

try:
    import resource          # Unix only: peak memory on CPU
except ImportError:
    resource = None

import data
import sample
import tokenizer as tokenizer_lib
from flow_dit import DEFAULT_CFG, DEFAULT_STEPS, FLOW_MODELS, FlowDiT, draw_time_and_null, euler_sample, flowtok_loss
from data import IMAGE_EXTENSIONS
from projector import (AMP_DTYPES, CLIPTextEncoder, CLIP_TOWERS, OFFICIAL_CLIP_TOWER, PRECISIONS, TextProjector,
                       UserError, amp, barrier, check_writable, default_precision, file_sha256, finite_float,
                       fused_if_available, load_checkpoint, non_negative_int, on_every_rank, one_line, pick_device,
                       positive_int, ranks, read_weights, resolve_path, run_cli, tokenize, user_errors)
from tokenizer import TOKENIZER_PRESETS, Tokenizer

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
MIN_FID_IMAGES = 2048  # below the feature dimension the covariance is rank-deficient
NUM_WORKERS = min(8, os.cpu_count() or 1)  # default image-decoding workers of the FID


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


def is_release_inception(path):
    """Is the file pytorch-fid's release? torch hub names files name-<first 8+ hex digits of their sha256>.ext, so
    FID_WEIGHTS_FILE's '6726825d' is the beginning of the sha256 of the release's bytes."""
    prefix = re.search(r"-([0-9a-f]{8,})\.", FID_WEIGHTS_FILE).group(1)
    return file_sha256(path).startswith(prefix)


def load_inception(weights=None):
    """The FID InceptionV3 in eval mode, from `weights` (a local release file) or the hub cache / a download."""
    if weights is not None:
        if not os.path.isfile(weights):
            raise UserError(f"--inception-weights: no such file {weights}")
        if not is_release_inception(weights):
            print(f"warning: --inception-weights {weights} is not pytorch-fid's {FID_WEIGHTS_FILE} (its sha256 does "
                  f"not begin with the name's hash): the FID is not comparable with published numbers",
                  file=sys.stderr)
        state = read_weights(weights)
    else:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE
        try:  # reads the cached file if present, else downloads it there
            state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, map_location="cpu", weights_only=True)
        except OSError as err:  # URLError, timeouts, no route: we are offline
            raise UserError(f"the FID Inception weights are not in the torch hub cache and the download failed "
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


def resize_clean(image, size=299):
    """clean-fid's "clean" resize: (H, W, 3) float 0..255 -> (size, size, 3) float32, PIL bicubic per channel.

    Each channel is resized as a float32 ("F" mode) image, so there is no uint8 rounding; PIL's bicubic filter
    widens with the scale factor when downsampling (antialiased, unlike F.interpolate). Clipped to 0..255.
    """
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32))
                           .resize((size, size), Image.BICUBIC)) for c in range(3)]
    return np.stack(channels, axis=-1).clip(0, 255)


def resize_crop(image, size):
    """PIL image -> size x size: shorter side to `size` (PIL bicubic, antialiased), then the centre square."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    w2, h2 = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (w2 - size) // 2, (h2 - size) // 2
    return image.resize((w2, h2), Image.BICUBIC).crop((left, top, left + size, top + size))


def resize_label(resize, size=None):
    """The name a statistics file records for its input pipeline, e.g. 'bilinear' or 'crop256+bilinear'."""
    return resize if not size else f"crop{size}+{resize}"


def preprocess(images, resize="bilinear"):
    """(B, 3, H, W) uint8 or [0,1] float images -> (B, 3, 299, 299) float32 Inception input."""
    if resize == "bilinear":  # pytorch-fid: resize [0, 1] values, then 2x - 1
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    if resize == "tf":  # torch-fidelity: resize 0..255 values, then (x - 128) / 128
        x = images.float() if images.dtype == torch.uint8 else images.float() * 255
        return (resize_tf1(x, 299) - 128) / 128
    if resize == "clean":  # clean-fid: PIL bicubic on 0..255 floats, then (x - 128) / 128
        x = images.float() if images.dtype == torch.uint8 else images.float() * 255
        x = np.stack([resize_clean(img) for img in x.permute(0, 2, 3, 1).cpu().numpy()])   # (B, 299, 299, 3)
        return (torch.from_numpy(x).permute(0, 3, 1, 2) - 128) / 128
    raise ValueError(f"unknown resize {resize!r}: use 'bilinear', 'tf' or 'clean'")


def image_files(folder, recursive=False):
    """The sorted image files inside `folder` (directly, or in any subfolder with recursive=True)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (nor a .npz statistics file)")
    found = folder.rglob("*") if recursive else folder.iterdir()
    files = sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise UserError(f"{folder}: no images ({'/'.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) in it")
    return files


SAMPLE_NAME = re.compile(r"^(\d{5,})_(\d{2,})\.png$")  # sample.py's {prompt index:05d}_{sample index:02d}.png


def fid_files(folder):
    """The images of `folder` that a FID reads: a sample.py output folder's samples only (never its grid.png or any
    other file), every image of any other folder."""
    files = image_files(folder)
    samples = [p for p in files if SAMPLE_NAME.match(p.name)]
    others = [p.name for p in files if not SAMPLE_NAME.match(p.name)]
    if samples and others:
        print(f"note: {folder} holds sample.py's samples: reading those {len(samples)}, not its {len(others)} other "
              f"image(s) ({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})", file=sys.stderr)
    return samples or files


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> ((3, 299, 299) Inception input, readable?); an unreadable file gives zeros and False.

    size: first bring every image to size x size (resize_crop), as the COCO protocol does for both sides.
    """

    def __init__(self, files, resize, size=None):
        self.files, self.resize, self.size = files, resize, size

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            with Image.open(self.files[i]) as im:
                im = im.convert("RGB")
                im = resize_crop(im, self.size) if self.size else im
                img = torch.from_numpy(np.array(im))  # (H, W, 3) uint8
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

    def mean_cov(self, what="the images"):
        """(mu (D,), sigma (D, D)) as float64 numpy arrays; non-finite statistics are refused (UserError)."""
        if self.n < 2:
            raise UserError(f"a covariance needs at least 2 images, got {self.n}")
        mu = self.sum / self.n
        sigma = (self.gram - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return check_finite(mu.cpu().numpy(), sigma.cpu().numpy(), f"the Inception features of {what}")


def check_finite(mu, sigma, what):
    """-> (mu, sigma) if every value is finite; else a UserError (a FID of NaN statistics would print 'FID: nan')."""
    bad = int(np.count_nonzero(~np.isfinite(mu))) + int(np.count_nonzero(~np.isfinite(sigma)))
    if bad:
        raise UserError(f"{what}: {bad} NaN or infinite value(s) in the statistics (mu, sigma): no FID from them; "
                        f"check the images and the Inception weights, or recompute the statistics")
    return mu, sigma


def files_stats(files, net, resize="bilinear", batch_size=50, device="cpu", num_workers=0, size=None, name=None):
    """Inception statistics of image files (net already on `device`); size: resize_crop to size x size first."""
    name = name or (Path(files[0]).parent.name if files else "images")
    if len(files) < MIN_FID_IMAGES:
        print(f"warning: {name} has {len(files)} < {MIN_FID_IMAGES} images: the covariance is rank-deficient "
              f"and the FID unreliable (papers use 10k-50k)", file=sys.stderr)
    device = torch.device(device)
    loader = torch.utils.data.DataLoader(ImageFiles(files, resize, size), batch_size=batch_size,
                                         num_workers=num_workers, pin_memory=device.type == "cuda")
    acc, unreadable = FeatureStats(device=device), []
    with full_fp32(), torch.inference_mode():
        for b, (x, ok) in enumerate(tqdm(loader, desc=f"Inception {name}", unit="batch")):
            unreadable += [files[b * batch_size + i] for i in torch.nonzero(~ok).flatten().tolist()]
            if ok.any():
                acc.update(net(x[ok].to(device, non_blocking=True)))  # (B, 2048)
    if unreadable:
        names = ", ".join(Path(p).name for p in unreadable[:5]) + (", ..." if len(unreadable) > 5 else "")
        raise UserError(f"{name}: {len(unreadable)} unreadable image(s): {names}")
    return Stats(*acc.mean_cov(name), acc.n, resize_label(resize, size))


def folder_stats(folder, net, resize="bilinear", batch_size=50, device="cpu", num_workers=0):
    """Inception statistics of the images in `folder` that a FID reads (fid_files; net already on `device`)."""
    return files_stats(fid_files(folder), net, resize, batch_size, device, num_workers, name=str(folder))


def save_stats(path, stats):
    """Write `mu`, `sigma` (pytorch-fid's keys) plus `n` and `resize` to a .npz file."""
    np.savez_compressed(path, mu=stats.mu, sigma=stats.sigma, n=stats.n, resize=stats.resize)


def load_stats(path):
    """Read a .npz written by save_stats or by pytorch-fid (which has only `mu` and `sigma`)."""
    try:
        with np.load(path) as f:
            stats = Stats(f["mu"].astype(np.float64), f["sigma"].astype(np.float64),
                          int(f["n"]) if "n" in f else None, str(f["resize"]) if "resize" in f else None)
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"{path}: not a statistics file with 'mu' and 'sigma' ({err})") from None
    check_finite(stats.mu, stats.sigma, str(path))
    return stats


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
    value = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    if not math.isfinite(value):   # never a printed 'FID: nan': the callers turn this into one line
        raise ValueError(f"the Frechet distance is {value}: the statistics hold NaN or infinite values")
    return value


# ----------------------------------------------------------------------------------------------------------------
# Reconstruction metrics: PSNR and SSIM (the tokenizer's rFID also uses the FID statistics above)
# ----------------------------------------------------------------------------------------------------------------

def ssim(x, y, window=11, sigma=1.5):
    """Mean SSIM (Wang et al. 2004) of images in [0, 1], (B, C, H, W) -> (B,): an 11x11 Gaussian window
    (sigma 1.5) at every valid position, K1 = 0.01, K2 = 0.03, data range 1; averaged over channels and positions."""
    x, y = x.double(), y.double()
    g = torch.exp(-(torch.arange(window, dtype=torch.float64) - window // 2) ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).to(x.device).expand(x.shape[1], 1, window, window)
    blur = lambda t: F.conv2d(t, kernel, groups=x.shape[1])           # noqa: E731  (valid positions only)
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = (2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def psnr(x, y):
    """PSNR in dB of images in [0, 1], (B, C, H, W) -> (B,)."""
    return tokenizer_lib.psnr(((x.double() - y.double()) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-20))


# ----------------------------------------------------------------------------------------------------------------
# Caption metrics (COCO caption evaluation toolkit: BLEU-4 and CIDEr-D)
# ----------------------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------------------
# CLIP score (open_clip): prompt-image agreement of generated images
# ----------------------------------------------------------------------------------------------------------------



def load_clip_scorer(model="ViT-B-32", pretrained="openai", weights=None, device="cpu"):
    """open_clip CLIP -> (model, image transform, tokenizer) in eval mode.

    model: an open_clip name or an open_clip model-config .json (tests: a tiny random CLIP); weights: a local
    file holding the `pretrained` weights (offline use). QuickGELU is forced when the pretrained tag was trained
    with it (OpenAI's): open_clip 3 builds plain names with exact GELU.
    """
    name = model
    if model.endswith(".json"):
        if not os.path.isfile(model):
            raise UserError(f"--clip-model {model}: no such file")
        open_clip.add_model_config(model)
        name = Path(model).stem
    if weights is not None and not os.path.isfile(weights):
        raise UserError(f"--clip-weights {weights}: no such file")
    tag = open_clip.get_pretrained_cfg(name, pretrained or "")
    try:
        net, _, transform = open_clip.create_model_and_transforms(
            name, pretrained=weights or pretrained, device=device, force_quick_gelu=bool(tag.get("quick_gelu")))
    except Exception as err:  # unknown name, offline download, wrong file: one line that says what to do
        where = f"https://huggingface.co/{tag['hf_hub'].rstrip('/')}" if tag.get("hf_hub") else "the open_clip docs"
        raise UserError(f"could not build CLIP {name} with weights {weights or pretrained} ({type(err).__name__}: "
                        f"{one_line(err)}); offline, download the weights ({where}) and pass --clip-weights "
                        f"FILE") from None
    return net.eval().requires_grad_(False), transform, open_clip.get_tokenizer(name)


@torch.inference_mode()
def clip_scores(files, prompts, scorer, device="cpu", batch_size=64):
    """Image files and their prompts -> (N,) CLIP scores 100 * max(cos(image, text), 0)."""
    net, transform, tokenize = scorer
    out = []
    for start in range(0, len(files), batch_size):
        chunk = range(start, min(start + batch_size, len(files)))
        images = []
        for i in chunk:
            with Image.open(files[i]) as im:
                images.append(transform(im.convert("RGB")))
        img = net.encode_image(torch.stack(images).to(device)).float()                  # (b, E)
        txt = net.encode_text(tokenize([prompts[i] for i in chunk]).to(device)).float()  # (b, E)
        out.append(100 * F.cosine_similarity(img, txt, dim=-1).clamp(min=0))
    return torch.cat(out).cpu()


def sample_files(folder, n_prompts):
    """sample.py's output folder -> (files, prompt index of each); other files (grid.png, ...) are ignored."""
    files, index = [], []
    for p in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        m = SAMPLE_NAME.match(p.name)
        if m:
            files.append(p)
            index.append(int(m.group(1)))
    if not files:
        raise UserError(f"{folder}: no samples named {{prompt:05d}}_{{sample:02d}}.png (as sample.py writes them)")
    if max(index) >= n_prompts:
        raise UserError(f"{folder}: sample {files[index.index(max(index))].name} has prompt index {max(index)}, "
                        f"but the prompt file has {n_prompts} prompts")
    return files, index


# ----------------------------------------------------------------------------------------------------------------
# Protocols: COCO-30K and MJHQ-30K (generate through sample.py's code, then FID against fixed reference statistics)
# ----------------------------------------------------------------------------------------------------------------

PROTOCOLS = {
    "coco30k": dict(title="COCO-30K", samples=30_000, size=256, resize="bilinear",
                    draw="30,000 distinct images of MS-COCO 2014 val drawn at random, one random caption of each",
                    ref="--coco-reference: the drawn images (default) or all images of the captions file"),
    "mjhq30k": dict(title="MJHQ-30K", samples=30_000, size=0, resize="clean",
                    draw="the prompts of meta_data.json (30,000), in a seeded random order",
                    ref="every image under --mjhq-images (30,000 at 1024 px)"),
}
# what a protocol's images depend on: a rerun reuses the images only if these are unchanged
SAMPLE_SETTINGS = ("protocol", "seed", "steps", "cfg", "precision", "decode_precision", "model", "weights")


def _read_json(path, what):
    """A JSON file -> object, or a one-line UserError."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{what} {path}: {err}") from None


def coco_draw(captions_json, images_dir, seed):
    """COCO captions JSON -> (draw [{id, file, prompt}] over all distinct images, reference image files).

    Images are shuffled with `seed`; each image's caption is drawn by a generator seeded by (seed, image id):
    the first N of the draw do not depend on N, so a --limit run is the beginning of the full run.
    """
    data = _read_json(captions_json, "--coco-captions")
    try:
        files = {im["id"]: im["file_name"] for im in data["images"]}
        captions = {}
        for ann in sorted(data["annotations"], key=lambda a: a["id"]):  # a fixed caption order per image
            text = " ".join(str(ann["caption"]).split())
            if text:
                captions.setdefault(ann["image_id"], []).append(text)
    except (KeyError, TypeError) as err:
        raise UserError(f"--coco-captions {captions_json}: not a COCO captions file (missing {err})") from None
    ids = sorted(i for i in captions if i in files)
    folder = Path(images_dir) if images_dir else None
    draw = []
    for k in np.random.default_rng(seed).permutation(len(ids)):
        i = ids[k]
        pick = np.random.default_rng([seed, i]).integers(len(captions[i]))
        draw.append(dict(id=i, file=files[i], prompt=captions[i][pick]))
    return draw, [folder / files[i] for i in sorted(files)] if folder else None


def mjhq_draw(meta_json, images_dir, seed):
    """MJHQ-30K meta_data.json ({id: {category, prompt}}) -> (draw [{id, category, prompt}], reference files)."""
    meta = _read_json(meta_json, "--mjhq-meta")
    try:
        items = {k: (v["category"], " ".join(str(v["prompt"]).split())) for k, v in meta.items()}
    except (AttributeError, KeyError, TypeError) as err:
        raise UserError(f"--mjhq-meta {meta_json}: not MJHQ-30K's meta_data.json (missing {err})") from None
    ids = sorted(k for k, (_, prompt) in items.items() if prompt)
    draw = [dict(id=ids[k], category=items[ids[k]][0], prompt=items[ids[k]][1])
            for k in np.random.default_rng(seed).permutation(len(ids))]
    return draw, image_files(images_dir, recursive=True) if images_dir else None


def check_reference(ref_path, ref_files):
    """(rank 0, which alone reads them) The reference statistics or every reference image are there."""
    missing = [] if os.path.isfile(ref_path) else [p for p in ref_files if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{len(missing)} of the {len(ref_files)} reference images are missing (e.g. {missing[0]})")


def start_protocol(out, settings, draw):
    """(rank 0) The settings match OUT's record; OUT/prompts.txt and prompts.jsonl hold the drawn prompts."""
    check_settings(out, settings)
    with open(os.path.join(out, "prompts.txt"), "w", encoding="utf-8") as f:
        f.writelines(d["prompt"] + "\n" for d in draw)
    with open(os.path.join(out, "prompts.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(dict(index=k, **d)) + "\n" for k, d in enumerate(draw))


def check_settings(out, settings):
    """Refuse to mix images made with other settings: OUT/protocol.json records what the images depend on."""
    path = os.path.join(out, "protocol.json")
    if os.path.isfile(path):
        old = _read_json(path, "the record")
        changed = [f"{k} {old.get(k)!r} -> {settings.get(k)!r}" for k in SAMPLE_SETTINGS
                   if old.get(k) != settings.get(k)]          # captions have no decoder: its precision is None
        if changed:
            raise UserError(f"{out} holds samples made with other settings ({', '.join(changed)}): use another "
                            f"--out, or delete {out}")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(settings, f, indent=1)


def reference_stats(path, ref_files, net, args, resize, size, title, device):
    """The reference statistics: read from `path` if it exists, else computed from the images and saved there."""
    label = resize_label(resize, size)
    if os.path.isfile(path):
        stats = load_stats(path)
        if stats.resize and stats.resize != label:
            print(f"warning: {path} was computed with input pipeline {stats.resize}, the samples use {label}: the "
                  f"FID is not comparable", file=sys.stderr)
        return stats
    stats = files_stats(ref_files, net, resize, args.fid_batch_size, device, args.num_workers, size=size,
                        name=f"{title} reference")
    save_stats(path, stats)
    print(f"wrote the reference statistics ({stats.n} images, {label}) to {path}")
    return stats


def protocol_block(spec, args, settings, n, ref, resize, size, pipe, world):
    """The lines that say exactly how the number is made."""
    how = {"bilinear": "bilinear (F.interpolate, pytorch-fid)", "tf": "TF1 bilinear (torch-fidelity)",
           "clean": "PIL bicubic on float32 (clean-fid's 'clean')"}[resize]
    step = f", step {pipe.info['step']}" if pipe.info.get("step") is not None else ""
    return "\n".join([
        f"protocol        {spec['title']}: {spec['draw']}",
        "implementation  pytorch-fid InceptionV3 (TF 2015-12-05 weights), pool3 2048-d, float64 statistics, scipy "
        "sqrtm",
        "resize          " + (f"PIL bicubic, shorter side to {size} + centre crop (samples and references), then "
                              if size else "native resolution, then ") + f"{how} to 299x299",
        f"samples         {n} (protocol: {spec['samples']})" + (f", --limit {args.limit}" if args.limit else ""),
        f"reference       {spec['ref']}: {ref}",
        f"seed            {settings['seed']} (prompt draw and per-sample noise)",
        f"sampling        {settings['steps']} Euler steps, cfg {settings['cfg']}, precision {settings['precision']} "
        f"(decoder {settings['decode_precision']}), batch {args.batch_size} x {world} process(es)",
        f"weights         {settings['weights']} ({pipe.info.get('source', settings['model'])}{step})"])


# ----------------------------------------------------------------------------------------------------------------
# Captions: a Karpathy split (or a COCO captions file) -> captions by sample.py's code -> BLEU-4 and CIDEr-D
# ----------------------------------------------------------------------------------------------------------------

KARPATHY_SPLITS = data.KARPATHY_SPLITS


def _one_line_text(text):
    """A caption with its whitespace (newlines included) collapsed to single spaces."""
    return " ".join(str(text).split())


def karpathy_items(split_json, split):
    """Karpathy's dataset_*.json -> the images of one split [{id, file, references}], in the file's order."""
    # the parsing is data.karpathy_images, shared with the `karpathy:` training source: id is cocoid (else imgid),
    # file filepath/filename, references the `raw` sentences
    items = data.karpathy_images(_read_json(split_json, "--karpathy-split"), (split,), f"--karpathy-split {split_json}")
    return [dict(id=it["id"], file=it["file"], references=it["references"]) for it in items]


def coco_caption_items(captions_json):
    """A COCO captions file (images + annotations) -> every image with a caption [{id, file, references}], by id."""
    data = _read_json(captions_json, "--captions-json")
    try:
        files = {im["id"]: im["file_name"] for im in data["images"]}
        references = {}
        for ann in sorted(data["annotations"], key=lambda a: a["id"]):   # a fixed reference order per image
            text = _one_line_text(ann["caption"])
            if text:
                references.setdefault(ann["image_id"], []).append(text)
    except (KeyError, TypeError) as err:
        raise UserError(f"--captions-json {captions_json}: not a COCO captions file (missing {err})") from None
    items = [dict(id=i, file=files[i], references=references[i]) for i in sorted(files) if i in references]
    if not items:
        raise UserError(f"--captions-json {captions_json}: no image has a caption")
    return items


def locate_images(items, images_dir):
    """Set each item's `path` (IMAGES/file, else IMAGES/<file name>); missing images: one error naming them."""
    missing = []
    for it in items:
        tries = (os.path.join(images_dir, it["file"]), os.path.join(images_dir, os.path.basename(it["file"])))
        it["path"] = next((p for p in tries if os.path.isfile(p)), None)
        if it["path"] is None:
            missing.append(tries[0])
    if missing:
        names = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UserError(f"{len(missing)} of the {len(items)} images are missing (looked for IMAGES/filepath/filename "
                        f"and IMAGES/filename, --images {images_dir}): {names}")


def _caption_record(item, caption):
    """One line of OUT/captions.jsonl."""
    return json.dumps(dict(id=item["id"], file=item["file"], caption=caption, references=item["references"])) + "\n"


def read_captions(path, items):
    """The captions already in OUT/captions.jsonl for these items (same id and file) -> {id: caption}."""
    files, done = {it["id"]: it["file"] for it in items}, {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                    if files.get(record["id"]) == record["file"] and isinstance(record["caption"], str):
                        done[record["id"]] = record["caption"]
                except (ValueError, KeyError, TypeError):   # a line torn by a kill
                    continue
    return done


def write_captions(path, items, captions):
    """Rewrite OUT/captions.jsonl atomically: the captioned items, in split order."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(_caption_record(it, captions[it["id"]]) for it in items if it["id"] in captions)
    os.replace(tmp, path)


def caption_items(pipe, items, captions, path, seed=0, steps=DEFAULT_STEPS, cfg=DEFAULT_CFG, batch_size=64,
                  progress=False):
    """Caption the items missing from `captions` (filled in place, appended to `path` batch by batch) -> count.

    Item k (its position in the split) gets the noise sample_noise(k, 0, seed), as image k of `sample.py
    --caption`: a caption depends neither on the batch size nor on --limit.
    """
    todo = [k for k, it in enumerate(items) if it["id"] not in captions]
    with open(path, "a", encoding="utf-8") as log, \
            tqdm(total=len(todo), desc="captioning", unit="img", disable=not progress or not todo) as bar:
        for start in range(0, len(todo), batch_size):
            chunk, images = todo[start:start + batch_size], []
            for k in chunk:
                try:   # as in training: shorter side to the tokenizer's size (bicubic), centre crop
                    images.append(data.transform(data.load_image(items[k]["path"]), pipe.tokenizer.image_size))
                except data.BadSample as err:
                    raise UserError(f"{items[k]['path']}: {err.reason} (the {len(captions)} captions made so far are "
                                    f"kept in {path}: replace the image and rerun to continue)") from None
            eps = torch.stack([sample.sample_noise(k, 0, seed) for k in chunk])                # (b, 77, 16)
            for k, text in zip(chunk, pipe.caption(torch.stack(images), steps, cfg, eps=eps)):  # (b, 3, S, S)
                captions[items[k]["id"]] = text
                log.write(_caption_record(items[k], text))
            log.flush()                          # a killed run keeps every finished batch
            bar.update(len(chunk))
    return len(todo)


def i2t_checkpoint(path):
    """The image-to-text checkpoint load_pipeline takes from `path`: a demo folder's flow-i2t/, else path."""
    sub = os.path.join(path, "flow-i2t")
    return sub if os.path.isfile(os.path.join(sub, "last.pt")) else path


# ----------------------------------------------------------------------------------------------------------------
# Speed: samples/s, per-stage time, FLOP/s and peak memory of sampling (or of one training step)
# ----------------------------------------------------------------------------------------------------------------

def _sync(device):
    """Wait for the device's queued work (timings on GPU are meaningless without it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _timed(fn, device):
    """-> (fn(), seconds), synchronised on both ends."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start


def _flops(fn):
    """-> (fn(), FLOPs of its matmuls, convolutions and attention, counted by torch's FlopCounterMode)."""
    with FlopCounterMode(display=False) as counter:
        out = fn()
    return out, counter.get_total_flops()


def matmul_peak(device, dtype, n):
    """FLOP/s of an n x n x n matmul in `dtype` on `device`, timed for ~0.5 s after a warm-up."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    c = a @ b
    _, once = _timed(lambda: torch.matmul(a, b, out=c), device)
    iters = max(1, min(200, math.ceil(0.5 / max(once, 1e-6))))
    _, seconds = _timed(lambda: [torch.matmul(a, b, out=c) for _ in range(iters)], device)
    return 2 * n ** 3 * iters / seconds


def peak_memory(device):
    """(bytes or None, what): CUDA max_memory_allocated, else the process's max RSS (not on Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "CUDA max_memory_allocated"
    if resource is None:
        return None, "not measured (Windows has no getrusage)"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process max RSS"   # macOS: bytes; Linux, BSD: KiB


def gib(nbytes):
    """Bytes -> '1.23 GiB'; None (not measured) -> 'n/a'."""
    return "n/a" if nbytes is None else f"{nbytes / 2 ** 30:.2f} GiB"


def _params(*modules):
    """Parameter count in millions."""
    return sum(p.numel() for m in modules for p in m.parameters()) / 1e6


def _speed_dit(args):
    """FlowDiT of size --model (random weights), --depth overriding its depth -> (model, its name)."""
    dit = FlowDiT(**{**FLOW_MODELS[args.model], **({"depth": args.depth} if args.depth else {})})
    return dit, f"DiT-{args.model}{f' (depth {args.depth})' if args.depth else ''} {_params(dit):.1f}M"


def compile_label(args, device):
    """How a sampling case runs: '' (eager), 'torch.compile', 'torch.compile, CUDA graphs' or 'torch.compile MODE'."""
    if not args.compile:
        return ""
    if args.compile_mode == "default":
        return "torch.compile"
    if args.compile_mode == "reduce-overhead" and device.type == "cuda":
        return "torch.compile, CUDA graphs"
    return f"torch.compile {args.compile_mode}"                   # on a CPU reduce-overhead records no graphs


def speed_sampling(args, device, autocast, out):
    """Text -> image as FlowTokPipeline.generate, then PNGs into `out`, random weights -> (stages, models, pipeline).

    stages: [(name, fn(steps), steps)]; the flow stage's FLOPs are counted on 1 step and scaled (all steps alike).
    """
    clip = CLIPTextEncoder(args.clip_tower, "random").to(device)
    proj = TextProjector(clip_dim=clip.width).to(device).eval()
    dit, dit_name = _speed_dit(args)
    dit = dit.to(device).eval()
    tok = Tokenizer.from_preset(args.tokenizer_preset, text_dim=clip.width)
    del tok.encoder                     # sampling only decodes: keep the encoder out of the memory figure
    tok = tok.to(device).eval()
    pipe = sample.FlowTokPipeline(clip, proj, dit, tok, precision=args.precision,
                                  decode_precision=args.decode_precision)
    pipe._identity = "random weights"   # no sample records: skip hashing the weights
    if args.compile:                    # as sample.py --compile: the DiT and the decoder (tok.decoder in place)
        pipe.compile(args.compile_mode)
    prompts = [f"a photo of object number {i} on a wooden table" for i in range(args.batch_size)]
    eps = torch.randn(args.batch_size, 77, 16, device=device)
    state = {}

    def text(steps):
        state["feats"] = clip.encode(prompts)                                  # (B, 77, C), fp32 as in sampling

    def project(steps):
        with torch.no_grad(), autocast():
            state["z"] = proj(state["feats"], eps)[0]                          # (B, 77, 16)

    def flow(steps):
        with torch.no_grad(), autocast():
            state["x1"] = euler_sample(pipe.dit, state["z"], steps=steps, cfg=args.cfg,  # 2B rows per DiT call
                                       before_step=pipe.step_begin)

    def decode(steps):
        with torch.no_grad(), autocast(args.decode_precision):
            pipe.step_begin()
            state["images"] = tok.decode_flow_tokens(state["x1"], state["feats"]).float().clamp(0, 1)

    def write(steps):                   # as sample.py writes them: uint8 on the host, zlib on a thread pool
        with sample.PNGWriter() as writer:
            writer.submit(sample.uint8_images(state["images"]), [os.path.join(out, f"{i:05d}.png")
                                                                 for i in range(args.batch_size)])

    models = (f"{dit_name} | text projector {_params(proj):.1f}M | CLIP {args.clip_tower} text tower "
              f"{_params(clip):.1f}M | tokenizer decoder {args.tokenizer_preset} {_params(tok):.1f}M")
    stages = [("text encoding", text, 1), ("projector", project, 1),
              (f"flow ({args.steps} steps)", flow, args.steps), ("decoding", decode, 1), ("PNG writing", write, 1)]
    label = compile_label(args, device)
    return stages, models + (f" ({label})" if label else ""), pipe


def speed_training(args, device, autocast):
    """One flow training step (flowtok_loss, backward, AdamW) on random features -> (stages, models)."""
    width, b = CLIP_TOWERS[args.clip_tower]["width"], args.batch_size
    proj = TextProjector(clip_dim=width).to(device).train()
    dit, dit_name = _speed_dit(args)
    dit = dit.to(device).train()
    dit.grad_checkpointing = args.grad_checkpointing           # the official trainer forces it on
    if args.grad_checkpointing:
        dit_name += " with gradient checkpointing"
    params = list(dit.parameters()) + list(proj.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.03, **fused_if_available(device))
    model, text = (torch.compile(dit), torch.compile(proj)) if args.compile else (dit, proj)   # train.py --compile
    feats = torch.randn(b, 77, width, device=device)                           # frozen CLIP features
    x1 = torch.randn(b, 77, 16, device=device)                                 # flow-space image tokens
    t, null = draw_time_and_null(torch.randn(b, device=device), torch.randn(b, device=device))
    eps, state = torch.randn(b, 77, 16, device=device), {}

    def forward(steps):
        with autocast():
            state["loss"] = flowtok_loss(model, text, feats, x1, t, null, eps)["loss"]

    def backward(steps):
        state.pop("loss").backward()

    def step(steps):
        opt.step()
        opt.zero_grad(set_to_none=True)

    models = f"{dit_name} + text projector {_params(proj):.1f}M, trained with AdamW" + (
        " (torch.compile)" if args.compile else "")
    return [("forward", forward, 1), ("backward", backward, 1), ("optimizer", step, 1)], models, dit


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer reconstruction (rfid): our tokenizer runs or the official FlowTiTok .bin
# ----------------------------------------------------------------------------------------------------------------

def load_rfid_tokenizer(path, clip_weights, ema, device):
    """-> (tokenizer, CLIP text encoder or None, description): our tokenizer run / checkpoint or an official .bin."""
    ours = path.endswith(".pt") or os.path.isdir(path)
    with user_errors(f"--tokenizer {path}"):
        ckpt = load_checkpoint(path) if ours else path
        tok = tokenizer_lib.load_tokenizer(ckpt, ema=ema).to(device)
    clip = None
    if tok.config["text_guidance"]:
        tower, weights = OFFICIAL_CLIP_TOWER, clip_weights or "openai"        # the official tokenizers' CLIP
        if ours:
            tower = ckpt["config"]["clip"]["tower"]
            weights = clip_weights or resolve_path(ckpt["config"]["clip"]["weights"], ckpt["path"])
        with user_errors("the tokenizer's CLIP text tower"):
            clip = CLIPTextEncoder(tower, weights).to(device)
    what = (f"{ckpt['path']} step {ckpt['step']}, {'EMA' if ema else 'raw'} weights" if ours
            else f"{path} (official FlowTiTok)")
    return tok.eval(), clip, what


# ----------------------------------------------------------------------------------------------------------------
# Subcommands: one run_* per subcommand, each returns its result
# ----------------------------------------------------------------------------------------------------------------

def run_fid(args):
    """`fid`: FID between REAL and FAKE (folders or .npz), or only write REAL's statistics; returns the FID."""
    paths = [p for p in (args.real, args.fake) if p is not None]
    if args.fake is None and args.save_stats is None:
        raise UserError("give FAKE too, or --save-stats OUT.npz to only write the statistics of REAL")
    for p in paths:  # fail on a bad path before loading the network
        if not p.endswith(".npz"):
            image_files(p)
        elif not os.path.isfile(p):
            raise UserError(f"{p}: no such statistics file")
    if args.save_stats is not None and args.real.endswith(".npz"):
        raise UserError("--save-stats: REAL is already a .npz statistics file")
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
        raise UserError(str(err)) from None
    print(f"implementation: pytorch-fid InceptionV3 (TF 2015-12-05 weights), pool3 2048-d; device {device}\n"
          f"resize:         REAL {real.resize or 'unknown'}, FAKE {fake.resize or 'unknown'} (to 299x299)\n"
          f"samples:        REAL {real.n or '?'} ({args.real}), FAKE {fake.n or '?'} ({args.fake})\n"
          f"precision:      float32 features (TF32 off), float64 statistics, unbiased covariance, scipy sqrtm\n"
          f"FID: {value:.4f}")
    return value


def run_protocol(args):
    """`coco30k` / `mjhq30k`: draw the prompts, generate (resumable, torchrun-able), FID -> the FID (rank 0)."""
    spec = PROTOCOLS[args.command]
    if args.command == "coco30k":
        draw, ref_files = coco_draw(args.coco_captions, args.coco_images, args.seed)
        source, images_flag = args.coco_captions, "--coco-images"
        spec, kind = dict(spec), args.coco_reference
        if kind == "drawn":   # the official trainer's reference file is coco30k_fid_stat.pth (train_t2i.py:112)
            spec["ref"] = f"the {min(len(draw), spec['samples']):,} drawn images (seed {args.seed}; --coco-reference)"
            ref_files = ref_files and [Path(args.coco_images) / d["file"] for d in draw[:spec["samples"]]]
        else:
            spec["ref"] = f"all {len(ref_files or []) or 'the'} images of the captions file (--coco-reference all)"
        kind = f"-drawn-seed{args.seed}" if kind == "drawn" else "-all"
    else:
        draw, ref_files = mjhq_draw(args.mjhq_meta, args.mjhq_images, args.seed)
        source, images_flag, kind = args.mjhq_meta, "--mjhq-images", ""
    n = min(args.limit or spec["samples"], len(draw))
    draw, prompts = draw[:n], [d["prompt"] for d in draw[:n]]
    if not prompts:
        raise UserError(f"no prompts in {source}")
    size = (spec["size"] if args.size is None else args.size) or None
    resize = args.resize or spec["resize"]
    ref_path = args.ref_stats or os.path.join(args.out, f"ref_{args.command}{kind}_{resize_label(resize, size)}.npz")
    if os.path.isfile(ref_path):
        ref = f"precomputed ({ref_path})"
    elif ref_files is None:
        raise UserError(f"no reference: give the images ({images_flag} DIR) or an existing --ref-stats FILE")
    else:
        ref = f"{len(ref_files)} images -> {ref_path}"
    samples_dir = os.path.join(args.out, "samples")
    with ranks() as (rank, world, local):
        on_every_rank(world, rank, lambda: rank == 0 and check_reference(ref_path, ref_files))   # before generating
        device = pick_device(args.device, local)
        precision = args.precision or default_precision(device)
        check_writable(samples_dir, rank)
        settings = dict(protocol=args.command, seed=args.seed, steps=args.steps, cfg=args.cfg, precision=precision,
                        decode_precision=args.decode_precision,
                        model=args.official or os.path.abspath(args.ckpt or ""),
                        weights="released" if args.official else "raw" if args.no_ema else "EMA")
        # rank 0 alone reads and writes the record: what it refuses stops every rank before anyone generates
        on_every_rank(world, rank, lambda: rank == 0 and start_protocol(args.out, settings, draw))
        pipe = on_every_rank(world, rank, sample.build_pipeline, args, device, precision)
        if rank == 0:
            print(protocol_block(spec, args, settings, n, ref, resize, size, pipe, world))
            if n < spec["samples"]:
                print(f"warning: {n} samples < the protocol's {spec['samples']}: this FID is not comparable with "
                      f"published {spec['title']} numbers", file=sys.stderr)
        made, kept, replaced = sample.generate_folder(pipe, prompts, samples_dir, 1, args.seed, args.steps, args.cfg,
                                                      args.batch_size, rank, world, skip_existing=True,
                                                      progress=rank == 0)
        print(f"rank {rank}: generated {made}, reused {kept} samples in {samples_dir}"
              + (f" ({replaced} regenerated: made with another prompt, seed or model, or unrecorded)" if replaced
                 else ""))
        del pipe
        barrier(world)                     # every sample is on disk before rank 0 reads them
        if rank != 0:
            return None
    if device.type == "cuda":
        torch.cuda.empty_cache()
    net = load_inception(args.inception_weights).to(device)
    real = reference_stats(ref_path, ref_files, net, args, resize, size, spec["title"], device)
    files = [sample.sample_path(samples_dir, i, 0) for i in range(n)]
    sample.check_visible(files, world)             # rank 0 reads every rank's samples: one filesystem for all
    fake = files_stats(files, net, resize, args.fid_batch_size, device, args.num_workers, size=size,
                       name=f"{spec['title']} samples")
    try:
        value = frechet_distance(real.mu, real.sigma, fake.mu, fake.sigma)
    except ValueError as err:
        raise UserError(str(err)) from None
    result = dict(settings, fid=value, samples=n, reference=ref_path, reference_set=spec["ref"],
                  reference_images=real.n, input_pipeline=resize_label(resize, size))
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"{spec['title']} FID: {value:.4f} ({n} samples vs {real.n or '?'} reference images; {args.out}/results.json)"
          f"\nCLIP score: python evaluate.py clipscore {samples_dir} --prompts {args.out}/prompts.txt")
    return value


def run_clipscore(args):
    """`clipscore`: mean CLIP score of sample.py's images against their prompts; -> the mean."""
    prompts = sample.read_prompts(argparse.Namespace(prompts_inline=[], prompts=args.prompts))
    if not prompts:
        raise UserError(f"--prompts {args.prompts}: no prompts in it")
    files, index = sample_files(args.folder, len(prompts))
    device = pick_device(args.device)
    scorer = load_clip_scorer(args.clip_model, args.clip_pretrained, args.clip_weights, device)
    scores = clip_scores(files, [prompts[i] for i in index], scorer, device, args.batch_size)
    print(f"CLIP score: {scores.mean().item():.4f} (100 x max(cos, 0), mean over {len(files)} images of "
          f"{len(set(index))} prompts; std {scores.std().item() if len(scores) > 1 else 0.0:.4f}; open_clip "
          f"{args.clip_model} / {args.clip_weights or args.clip_pretrained})")
    return scores.mean().item()


def run_captions(args):
    """`captions`: caption a Karpathy split (or a COCO captions file), score it -> the results dict."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise UserError("captions runs in one process (a 5,000-image split takes minutes on one GPU): no torchrun")
    if args.karpathy_split:
        split = args.split or "test"
        items = karpathy_items(args.karpathy_split, split)
        kind, scope, source = "karpathy", "split", f"Karpathy split '{split}' of {args.karpathy_split}"
    else:
        if args.split:
            raise UserError("--split picks a split of --karpathy-split; --captions-json has none")
        items, split = coco_caption_items(args.captions_json), None
        kind, scope, source = "coco", "file", f"every captioned image of {args.captions_json}"
    ids = Counter(it["id"] for it in items)
    if len(ids) < len(items):
        raise UserError(f"{source}: image id {ids.most_common(1)[0][0]} occurs more than once")
    full = len(items)
    n = min(args.limit or full, full)
    items = items[:n]
    bare = next((it for it in items if not it["references"]), None)
    if bare is not None:                             # the metrics need at least one reference per image
        raise UserError(f"{source}: image {bare['id']} ({bare['file']}) has no reference caption")
    locate_images(items, args.images)                # before the model is loaded
    device = pick_device(args.device)
    precision = args.precision or default_precision(device)
    check_writable(args.out)
    pipe = sample.load_pipeline(args.ckpt, device, not args.no_ema, precision, args.clip_weights, args.tokenizer)
    if pipe.i2t_dit is None or pipe.text_decoder is None:
        raise UserError(f"--ckpt {args.ckpt} has no image-to-text model: give a flow-i2t run, or a folder holding "
                        f"flow-i2t/ (train the stages text-ae and flow-i2t)")
    settings = dict(protocol=f"captions {kind} {split}", seed=args.seed, steps=args.steps, cfg=args.cfg,
                    precision=precision, model=os.path.abspath(args.ckpt), weights="raw" if args.no_ema else "EMA")
    check_settings(args.out, settings)               # after loading: a wrong --ckpt leaves OUT reusable
    path = os.path.join(args.out, "captions.jsonl")
    captions = read_captions(path, items)
    write_captions(path, items, captions)            # without torn lines, before appending to it
    size = pipe.tokenizer.image_size
    refs = sum(len(it["references"]) for it in items)
    print("\n".join([
        f"protocol        image to text: {source}",
        f"images          {n} of the {full} in the {scope}" + (f" (--limit {args.limit})" if n < full else "") +
        f"; PIL bicubic, shorter side to {size} + centre crop (data.transform)",
        f"references      {refs} ({refs / n:.2f} per image): " +
        ("the split's raw sentences" if kind == "karpathy" else "the file's annotations"),
        "metrics         corpus BLEU-4 and CIDEr-D (sigma 6, idf from these images' references), the COCO caption "
        "toolkit's formulas on ptb_tokenize tokens (lower case, punctuation removed)",
        f"seed            {args.seed} (per-image noise sample_noise(image index, 0, seed))",
        f"sampling        {args.steps} Euler steps, cfg {args.cfg}, precision {precision}, batch {args.batch_size}, "
        f"{device}",
        f"weights         {settings['weights']} (image to text: {i2t_checkpoint(args.ckpt)})"]))
    if n < full:
        print(f"warning: {n} of the {scope}'s {full} images: BLEU-4 and CIDEr-D of a subset are not comparable "
              f"with published full-{scope} numbers" + (" (CIDEr-D is 0 for a single image)" if n == 1 else ""),
              file=sys.stderr)
    made = caption_items(pipe, items, captions, path, args.seed, args.steps, args.cfg, args.batch_size, progress=True)
    write_captions(path, items, captions)            # split order
    print(f"captioned {made}, reused {n - made} images -> {path}")
    candidates = {it["id"]: captions[it["id"]] for it in items}
    references = {it["id"]: it["references"] for it in items}
    result = dict(settings, source=source, split=split, images=n, split_images=full, image_size=size,
                  bleu4=bleu4(candidates, references), cider_d=cider_d(candidates, references), captions=path)
    with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(f"BLEU-4: {result['bleu4']:.4f}  CIDEr-D: {result['cider_d']:.4f} ({n} images; papers print both x100; "
          f"{args.out}/results.json)")
    return result


def run_rfid(args):
    """`rfid`: reconstruct an image folder with a tokenizer -> rFID, PSNR, SSIM (dict)."""
    files = image_files(args.images, recursive=True)[:args.num_images]
    device = pick_device(args.device)
    tok, clip, what = load_rfid_tokenizer(args.tokenizer, args.clip_weights, not args.no_ema, device)
    size = args.image_size or tok.image_size
    net = load_inception(args.inception_weights).to(device)
    if args.save_recon:
        os.makedirs(args.save_recon, exist_ok=True)
    real, fake, psnrs, ssims, captioned = FeatureStats(device=device), FeatureStats(device=device), [], [], 0
    with full_fp32(), torch.inference_mode():
        for start in tqdm(range(0, len(files), args.batch_size), desc="reconstructing", unit="batch"):
            batch, captions = [], []
            for f in files[start:start + args.batch_size]:
                try:
                    with Image.open(f) as im:
                        batch.append(torch.from_numpy(np.array(resize_crop(im.convert("RGB"), size))))
                except (OSError, ValueError):
                    raise UserError(f"{f}: unreadable image") from None
                side = Path(f).with_suffix(".txt")          # text guidance: a same-name caption file, else ""
                captions.append(side.read_text(errors="replace").strip() if side.is_file() else "")
                captioned += bool(captions[-1])
            images = torch.stack(batch).permute(0, 3, 1, 2).to(device)                         # (B, 3, S, S) uint8
            text = clip(tokenize(captions)[0].to(device)) if clip is not None else None
            mean, _ = tok.encode(images.float() / 255)
            recon = (tok.decode(mean, text).clamp(0, 1) * 255).round().to(torch.uint8)        # as saved images are
            for i, img in enumerate(recon if args.save_recon else []):
                Image.fromarray(img.permute(1, 2, 0).cpu().numpy()).save(
                    os.path.join(args.save_recon, f"{start + i:06d}.png"))
            a, b = recon.double() / 255, images.double() / 255
            psnrs.append(psnr(a, b).cpu())
            ssims.append(ssim(a, b).cpu())
            real.update(net(preprocess(images, args.resize).to(device)))
            fake.update(net(preprocess(recon, args.resize).to(device)))
    if len(files) < MIN_FID_IMAGES:
        print(f"warning: {len(files)} < {MIN_FID_IMAGES} images: the covariance is rank-deficient and the rFID "
              f"unreliable (the usual protocol: the 50,000 ImageNet val images)", file=sys.stderr)
    value = frechet_distance(*real.mean_cov("the originals"), *fake.mean_cov("the reconstructions"))
    result = dict(rfid=value, psnr=torch.cat(psnrs).mean().item(), ssim=torch.cat(ssims).mean().item(),
                  images=len(files))
    guidance = ("none (a decoder without text)" if clip is None else
                f"same-name .txt captions ({captioned} found), the empty caption otherwise")
    print(f"tokenizer:      {what}; decoded from the posterior mean\n"
          f"images:         the first {len(files)} of {args.images} (sorted paths, subfolders included)\n"
          f"preprocessing:  PIL bicubic, shorter side to {size}, centre crop {size}x{size}; reconstructions clamped "
          f"to [0, 1] and rounded to uint8\n"
          f"text guidance:  {guidance}\n"
          f"FID:            reconstructions vs the {size}px originals, pytorch-fid InceptionV3, --resize {args.resize} "
          f"to 299\n"
          f"PSNR, SSIM:     per image on the uint8 images (SSIM: 11x11 Gaussian, sigma 1.5, valid positions), mean\n"
          f"rFID {value:.4f}  PSNR {result['psnr']:.3f} dB  SSIM {result['ssim']:.4f}")
    return result


def measure(stages, device, repeats, count_flops=True):
    """A warm-up pass that counts FLOPs, then `repeats` timed passes -> ({stage: seconds}, {stage: FLOPs}, bytes).

    bytes: the peak memory from the warm-up on (CUDA max_memory_allocated; on CPU the process's max RSS so far).
    Compiled stages (count_flops False) warm up outside FlopCounterMode, which would make them compile twice;
    their FLOPs are reported as 0 (the eager stages' count applies).
    """
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    flops = dict.fromkeys([name for name, _, _ in stages], 0)
    for _ in range(1 if count_flops else 2):         # compiled: twice, CUDA graphs record on a stage's second call
        for name, fn, steps in stages:               # whole passes in order: a stage may consume the last one's output
            if count_flops:            # the flow runs 1 step here (every step is alike) and is scaled
                flops[name] = _flops(lambda: fn(1))[1] * steps
            else:
                fn(steps)
    seconds = dict.fromkeys(flops, 0.0)
    for _ in range(repeats):
        for name, fn, steps in stages:
            seconds[name] += _timed(lambda: fn(steps), device)[1] / repeats
    return seconds, flops, peak_memory(device)[0]


def speed_setup(args, device):
    """-> (autocast factory, timed passes, matmul size, the setup line shared by both reports)."""
    def autocast(precision=None):
        return amp(device, precision or args.precision)

    repeats = args.repeats or (3 if device.type == "cuda" else 1)
    size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    tf32 = "on" if torch.backends.cuda.matmul.allow_tf32 else "off"
    where = (f"{torch.get_num_threads()} threads" if device.type == "cpu" else
             f"{torch.cuda.get_device_name(device)}, TF32 {tf32}")
    decoder = "" if args.train else f" (decoder {args.decode_precision})"
    setup = f"{device.type} ({where}), {args.precision}{decoder}, torch {torch.__version__}"
    return autocast, repeats, size, setup


def run_speed(args):
    """`speed`: time the stages (after a warm-up that also counts their FLOPs) and print a table; -> the rows."""
    device = pick_device(args.device)
    sample.warn_unused_compile_mode(args)
    if args.suite:
        return run_speed_suite(args, device)
    autocast, repeats, size, setup = speed_setup(args, device)
    batch_size = args.batch_size or 64
    args = argparse.Namespace(**{**vars(args), "batch_size": batch_size})
    with tempfile.TemporaryDirectory(prefix="flowtok-speed-") as out:
        if args.train:
            stages, models, _ = speed_training(args, device, autocast)
        else:
            stages, models, _ = speed_sampling(args, device, autocast, out)
        seconds, flops, memory = measure(stages, device, repeats, count_flops=not args.compile)
    memory_kind = peak_memory(device)[1]
    peak = matmul_peak(device, AMP_DTYPES.get(args.precision, torch.float32), size)

    total = sum(seconds.values())
    what = "one flow training step" if args.train else "text-to-image sampling"
    batch = (f"batch {batch_size}" if args.train else
             f"batch {batch_size}, {args.steps} Euler steps, cfg {args.cfg} as one batched pass")
    lines = [f"FlowTok speed: {what}, random weights, 1 warm-up pass, mean of {repeats} timed pass(es)",
             f"models   {models}", f"setup    {setup}, {batch}", "",
             f"{'stage':<20}{'seconds':>10}{'share':>8}{'GFLOP':>12}{'TFLOP/s':>10}{'of peak':>9}"]
    rows = []

    def row(name, sec, flop):
        """One table line; '-' where FlopCounterMode sees no FLOPs (elementwise-only work such as AdamW)."""
        rate = flop / sec if sec > 0 else 0.0
        rows.append(dict(stage=name, seconds=sec, share=sec / total, flops=flop, flops_per_s=rate))
        nums = (f"{flop / 1e9:>12.1f}{rate / 1e12:>10.3f}{100 * rate / peak:>8.1f}%" if flop else
                f"{'-':>12}{'-':>10}{'-':>9}")
        lines.append(f"{name:<20}{sec:>10.3f}{100 * sec / total:>7.1f}%{nums}")

    for name in seconds:
        row(name, seconds[name], flops[name])
    row("total", total, sum(flops.values()))
    lines += ["", f"samples/s    {batch_size / total:.3f} end to end (" +
              ("forward + backward + optimizer" if args.train else "prompts to PNG files, stages in sequence")
              + ")",
              f"peak memory  {gib(memory)} ({memory_kind})",
              f"matmul peak  {peak / 1e12:.3f} TFLOP/s ({size}x{size} {args.precision} matmul timed in this run)",
              "FLOPs        torch FlopCounterMode (matmul, convolution, attention; elementwise work not counted)"]
    print("\n".join(lines))
    return rows


SPEED_SUITES = {"gpu": ("XL", "H")}    # text to image at batch 64, training at micro-batch 128 (--batch-size: both)
SHORT_STAGES = {"text encoding": "text", "projector": "projector", "decoding": "decoder", "PNG writing": "PNG"}


def suite_row(case, batch_size, seconds, flops, memory, peak):
    """One markdown row: samples/s, each stage's share of the time, counted TFLOP/s, share of peak, memory."""
    total = sum(seconds.values())
    shares = " · ".join(f"{SHORT_STAGES.get(k, k.split(' (')[0])} {100 * v / total:.0f}%" for k, v in seconds.items())
    rate = sum(flops.values()) / total
    row = dict(case=case, samples_per_s=batch_size / total, seconds=seconds, flops_per_s=rate, memory=memory)
    tflops = f"{rate / 1e12:.1f}" if rate >= 1e13 else f"{rate / 1e12:.3g}"
    return row, (f"| {case} | {batch_size / total:.1f} | {shares} | {tflops} | {100 * rate / peak:.0f}% | "
                 f"{gib(memory)} |")


def loop_row(args, pipe, device, batches):
    """sample.generate_folder over `batches` batches (PNGs written while the next batch runs) -> (row, line)."""
    prompts = [f"a photo of object number {i} on a wooden table" for i in range(batches * args.batch_size)]
    warm_up = (2 if pipe.compiled else 1) * args.batch_size     # CUDA graphs record on the second batch
    with tempfile.TemporaryDirectory(prefix="flowtok-speed-") as out:
        sample.generate_folder(pipe, prompts[:warm_up], out, steps=args.steps, cfg=args.cfg,
                               batch_size=args.batch_size)                              # warm-up batches
        _, sec = _timed(lambda: sample.generate_folder(pipe, prompts, out, steps=args.steps, cfg=args.cfg, seed=1,
                                                       batch_size=args.batch_size), device)
    label = compile_label(args, device)
    case = (f"{args.model} sample.py's loop{f', {label}' if label else ''}, {batches} x "
            f"{args.batch_size} prompts to PNGs")
    return (dict(case=case, samples_per_s=len(prompts) / sec),
            f"| {case} | {len(prompts) / sec:.1f} | PNG writing overlaps the next batch | - | - | - |")


def run_speed_suite(args, device):
    """`speed --suite gpu`: XL and H text to image and training steps (with and without gradient checkpointing).

    Prints one markdown table (README's GPU table) and returns its rows.
    """
    autocast, repeats, size, setup = speed_setup(args, device)
    peak = matmul_peak(device, AMP_DTYPES.get(args.precision, torch.float32), size)
    lines = [f"FlowTok speed suite `{args.suite}`: {setup}, random weights, mean of {repeats} timed pass(es) after a "
             f"warm-up; {args.steps} Euler steps with cfg {args.cfg}, decoder {args.tokenizer_preset}; matmul peak "
             f"{peak / 1e12:.1f} TFLOP/s ({size}^3)", "",
             "| case | samples/s | time per stage | TFLOP/s | of matmul peak | peak memory |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    rows = []

    def add(row_line):
        rows.append(row_line[0])
        print(row_line[1], flush=True)    # row by row: a crash in a later case keeps the earlier numbers

    depth, eager_flops = (f" depth {args.depth}" if args.depth else ""), {}

    def sampling(model, compiled, mode=args.compile_mode):
        case = argparse.Namespace(**{**vars(args), "model": model, "batch_size": args.batch_size or 64,
                                     "compile": compiled, "compile_mode": mode})
        label = compile_label(case, device)
        with tempfile.TemporaryDirectory(prefix="flowtok-speed-") as out:
            stages, _, pipe = speed_sampling(case, device, autocast, out)
            seconds, flops, memory = measure(stages, device, repeats, count_flops=not compiled)
            eager_flops.setdefault(model, flops)                          # the same math: eager's count applies
            add(suite_row(f"{model}{depth} text to image, batch {case.batch_size}{f', {label}' if label else ''}",
                          case.batch_size, seconds, eager_flops[model], memory, peak))
        add(loop_row(case, pipe, device, args.loop_batches))

    for model in SPEED_SUITES[args.suite]:
        sampling(model, compiled=False)
    for model in SPEED_SUITES[args.suite]:
        case = argparse.Namespace(**{**vars(args), "model": model, "batch_size": args.batch_size or 128,
                                     "grad_checkpointing": False, "compile": False})   # --compile: sampling rows
        stages, _, dit = speed_training(case, device, autocast)
        for checkpointing in (False, True):
            dit.grad_checkpointing = checkpointing
            name = (f"{model}{depth} training step, micro-batch {case.batch_size}"
                    f"{', gradient checkpointing' if checkpointing else ''}")
            add(suite_row(name, case.batch_size, *measure(stages, device, repeats), peak))
        del stages, dit
    for model in SPEED_SUITES[args.suite] if args.compile else ():     # last: compiling takes the longest
        sampling(model, compiled=True)
    if args.compile and device.type == "cuda" and args.compile_mode != "reduce-overhead":   # graphs need a GPU
        sampling(SPEED_SUITES[args.suite][0], compiled=True, mode="reduce-overhead")        # XL: CUDA graphs
    print(f"\nTFLOP/s: FLOPs counted by torch's FlopCounterMode (matmuls and attention; with gradient "
          f"checkpointing the recomputed forward counts too) over the whole time. Memory: "
          f"{peak_memory(device)[1]}.")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Command line: main(args) runs a parsed command line, build_parser() makes it, cli() is the entry point
# ----------------------------------------------------------------------------------------------------------------

def main(args):
    """Run the chosen subcommand; returns its result (the FID, the CLIP score, the caption scores, the speed rows)."""
    if args.command == "fid":
        return run_fid(args)
    if args.command in PROTOCOLS:
        return run_protocol(args)
    if args.command == "clipscore":
        return run_clipscore(args)
    if args.command == "captions":
        return run_captions(args)
    if args.command == "speed":
        return run_speed(args)
    if args.command == "rfid":
        return run_rfid(args)
    raise UserError(f"unknown command {args.command}")


def add_captions_parser(sub):
    """The `captions` subcommand's flags."""
    cap = sub.add_parser("captions", help="image to text: caption a Karpathy split (or a COCO captions file), "
                         "BLEU-4 and CIDEr-D")
    where = cap.add_mutually_exclusive_group(required=True)
    where.add_argument("--karpathy-split", metavar="JSON", help="Karpathy's dataset_coco.json (or dataset_flickr30k)")
    where.add_argument("--captions-json", metavar="JSON", help="a COCO captions file: captions_val2014.json")
    cap.add_argument("--images", required=True, help="image root: IMAGES/filepath/filename or IMAGES/filename")
    cap.add_argument("--split", choices=KARPATHY_SPLITS, help="the Karpathy split (default test)")
    cap.add_argument("--ckpt", required=True, help="a flow-i2t run, or a demo folder holding tokenizer/, text-ae/, "
                     "flow-i2t/ (there are no released image-to-text weights)")
    cap.add_argument("--out", default="eval/captions", help="folder for captions.jsonl, protocol.json, results.json "
                     "(default: %(default)s)")
    cap.add_argument("--limit", type=positive_int, help="only the first N images of the split (smoke runs)")
    cap.add_argument("--clip-weights", help="a local open_clip CLIP file instead of the recorded one")
    cap.add_argument("--tokenizer", help="use this tokenizer instead of the one the run recorded")
    cap.add_argument("--no-ema", action="store_true", help="use the raw (non-EMA) weights")
    cap.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                     help="Euler steps (default: %(default)s)")
    cap.add_argument("--cfg", type=finite_float, default=DEFAULT_CFG,
                     help="classifier-free guidance scale (default: %(default)s)")
    cap.add_argument("--seed", type=int, default=0, help="seed of the per-image noise (default: %(default)s)")
    cap.add_argument("--batch-size", type=positive_int, default=64, help="images per batch "
                     "(default: %(default)s)")
    cap.add_argument("--precision", choices=PRECISIONS, help="default: bf16 on GPUs that compute it natively, "
                     "fp16 on older ones, fp32 on CPU and MPS")
    cap.add_argument("--device", default="auto", help=sample.DEVICE_HELP)


def add_speed_parser(sub):
    """The `speed` subcommand's flags."""
    speed = sub.add_parser("speed", help="samples/s, per-stage time, FLOP/s and memory (random weights)")
    speed.add_argument("--model", choices=list(FLOW_MODELS), default="XL", help="DiT size (default: %(default)s)")
    speed.add_argument("--depth", type=positive_int, help="override the DiT depth (quick runs)")
    speed.add_argument("--batch-size", type=positive_int, help="prompts (or training samples) per pass "
                       "(default: 64; the suite: 64 to sample, 128 to train)")
    speed.add_argument("--precision", choices=PRECISIONS, default="bf16",
                       help="bf16 or fp16 autocast, or full fp32 (default: %(default)s)")
    speed.add_argument("--device", default="auto", help=sample.DEVICE_HELP)
    speed.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                       help="Euler steps (default: %(default)s)")
    speed.add_argument("--cfg", type=finite_float, default=DEFAULT_CFG,
                       help="guidance scale (1: no unconditional branch) (default: %(default)s)")
    speed.add_argument("--decode-precision", choices=PRECISIONS, default="fp32",
                       help="of the image decoder, as sample.py's flag (default: %(default)s)")
    speed.add_argument("--train", action="store_true", help="time one flow training step instead of sampling")
    speed.add_argument("--grad-checkpointing", action="store_true", help="with --train: checkpoint every DiT block "
                       "(the official trainer's setting)")
    speed.add_argument("--tokenizer-preset", choices=list(TOKENIZER_PRESETS), default="bl77-512",
                       help="the decoder to time (default: %(default)s, the released models' decoder)")
    speed.add_argument("--clip-tower", choices=list(CLIP_TOWERS), default=OFFICIAL_CLIP_TOWER,
                       help="the text tower to time (default: %(default)s)")
    speed.add_argument("--suite", choices=list(SPEED_SUITES), help="gpu: XL and H text to image at batch 64 "
                       "and training steps at micro-batch 128 with and without gradient checkpointing, as one "
                       "markdown table (README's GPU table; under 8 minutes on one GPU)")
    speed.add_argument("--loop-batches", type=positive_int, default=3, help="with --suite: batches timed through "
                       "sample.py's loop, PNG writing included (default: %(default)s)")
    speed.add_argument("--compile", action="store_true", help="torch.compile the DiT and the decoder (sampling; "
                       "the suite adds compiled text-to-image rows), or the DiT and projector (--train); the warm-up "
                       "pass compiles")
    speed.add_argument("--compile-mode", choices=sample.COMPILE_MODES, default="default", help="torch.compile's "
                       "mode for sampling, only with --compile (--train compiles as train.py does): reduce-overhead "
                       "adds CUDA graphs on a GPU, which need fixed shapes (sample.py's loop pads its last batch); on "
                       "a CPU it runs as default. --suite gpu --compile adds XL rows with reduce-overhead on a GPU "
                       "(default: %(default)s)")
    speed.add_argument("--repeats", type=positive_int, help="timed passes (default: 3 on GPU, 1 on CPU)")
    speed.add_argument("--matmul-size", type=positive_int, help="n of the n x n peak matmul "
                       "(default: 8192 on GPU, 2048 on CPU)")


def build_parser():
    """The command line: one subparser per subcommand; defaults are shown in each flag's help."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    resizes = ["bilinear", "tf", "clean"]
    fid = sub.add_parser("fid", help="FID between two image folders / .npz statistics")
    fid.add_argument("real", help="reference image folder or .npz statistics")
    fid.add_argument("fake", nargs="?", help="generated image folder or .npz statistics")
    fid.add_argument("--save-stats", metavar="OUT.npz", help="also write REAL's statistics (REAL must be a folder)")
    fid.add_argument("--inception-weights", metavar="FILE",
                     help=f"local {FID_WEIGHTS_FILE} (default: torch hub cache, else download)")
    fid.add_argument("--resize", choices=resizes, default="bilinear", help="to 299x299: bilinear (pytorch-fid's), "
                     "tf (torch-fidelity's TF1 resize) or clean (clean-fid's) (default: %(default)s)")
    fid.add_argument("--batch-size", type=positive_int, default=50, help="Inception batch size (default: %(default)s)")
    fid.add_argument("--device", default="auto", help=sample.DEVICE_HELP)
    fid.add_argument("--num-workers", type=non_negative_int, default=NUM_WORKERS,
                     help="image-decoding workers (default: %(default)s)")

    for name, spec in PROTOCOLS.items():
        p = sub.add_parser(name, help=f"{spec['title']}: generate with a FlowTok model, then FID")
        if name == "coco30k":
            p.add_argument("--coco-captions", required=True, help="annotations/captions_val2014.json")
            p.add_argument("--coco-images", help="the val2014/ image folder (for the reference statistics)")
            p.add_argument("--coco-reference", choices=["drawn", "all"], default="drawn",
                           help="reference images: the 30,000 drawn ones, as the official coco30k_fid_stat.pth, or "
                           "all 40,504 of val2014 (default: %(default)s)")
        else:
            p.add_argument("--mjhq-meta", required=True, help="MJHQ-30K's meta_data.json")
            p.add_argument("--mjhq-images", help="the MJHQ-30K image folder (category subfolders; for the reference)")
        p.add_argument("--out", required=True, help="folder for samples/, prompts, statistics and results.json")
        p.add_argument("--ref-stats", metavar="FILE.npz", help="reference statistics: used if the file exists, "
                       "else computed from the images and written there (default: OUT/ref_*.npz)")
        p.add_argument("--limit", type=positive_int, help="only the first N prompts of the draw (smoke runs)")
        p.add_argument("--size", type=non_negative_int,
                       help=f"resize + centre-crop both sides to this size first (0: native; "
                       f"default {spec['size']})")
        p.add_argument("--resize", choices=resizes, help=f"to 299 (default {spec['resize']})")
        p.add_argument("--inception-weights", metavar="FILE", help=f"local {FID_WEIGHTS_FILE}")
        p.add_argument("--fid-batch-size", type=positive_int, default=50,
                       help="Inception batch size (default: %(default)s)")
        p.add_argument("--num-workers", type=non_negative_int, default=NUM_WORKERS,
                       help="image-decoding workers of the FID "
                       "(default: %(default)s)")
        sample.add_model_args(p)

    clip = sub.add_parser("clipscore", help="CLIP score of sample.py's images against their prompts")
    clip.add_argument("folder", help="images named {prompt index:05d}_{sample:02d}.png")
    clip.add_argument("--prompts", required=True, help="the prompt file (line i = prompt i, blank lines skipped)")
    clip.add_argument("--clip-model", default="ViT-B-32", help="an open_clip name or model-config .json "
                      "(default: %(default)s)")
    clip.add_argument("--clip-pretrained", default="openai", help="an open_clip pretrained tag (default: %(default)s)")
    clip.add_argument("--clip-weights", metavar="FILE", help="a local file of those weights (offline)")
    clip.add_argument("--batch-size", type=positive_int, default=64, help="CLIP batch size (default: %(default)s)")
    clip.add_argument("--device", default="auto", help=sample.DEVICE_HELP)

    add_captions_parser(sub)

    rfid = sub.add_parser("rfid", help="tokenizer reconstruction: rFID, PSNR, SSIM on an image folder")
    rfid.add_argument("--tokenizer", required=True, help="a tokenizer run / checkpoint, or FlowTiTok_256/512.bin")
    rfid.add_argument("--images", required=True, help="an image folder (subfolders included), e.g. ImageNet val")
    rfid.add_argument("--num-images", type=positive_int, help="only the first N (sorted) images")
    rfid.add_argument("--image-size", type=positive_int, help="default: the tokenizer's (256 for bl77-256)")
    rfid.add_argument("--clip-weights", help="a local open_clip file for the text guidance (default: the recorded "
                      "one; 'openai' download for the official tokenizers)")
    rfid.add_argument("--no-ema", action="store_true", help="use the raw (non-EMA) weights of our checkpoints")
    rfid.add_argument("--save-recon", metavar="DIR", help="also write the reconstructions as PNGs")
    rfid.add_argument("--inception-weights", metavar="FILE", help=f"local {FID_WEIGHTS_FILE}")
    rfid.add_argument("--resize", choices=resizes, default="bilinear", help="to 299 (default: %(default)s)")
    rfid.add_argument("--batch-size", type=positive_int, default=32, help="images per batch "
                      "(default: %(default)s)")
    rfid.add_argument("--device", default="auto", help=sample.DEVICE_HELP)

    add_speed_parser(sub)
    return parser


def cli(argv=None):
    """The command line: user errors become one line on stderr and exit status 1 (no traceback)."""
    sys.exit(run_cli("evaluate.py", main, build_parser().parse_args(argv)))


if __name__ == "__main__":
    cli()
