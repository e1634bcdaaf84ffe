"""FlowTok evaluation: FID, COCO-30K, MJHQ-30K, CLIP score, image-to-text captions, tokenizer rFID.

    python evaluate.py fid real_images/ samples/ --device cpu
    python evaluate.py mjhq30k --ckpt runs/xl --mjhq-meta meta_data.json --mjhq-images mjhq30k_imgs --out eval/mjhq
    torchrun --nproc_per_node 8 evaluate.py coco30k --ckpt runs/xl --coco-captions captions_val2014.json \\
        --coco-images val2014 --out eval/coco

The first compares two image folders on a CPU; the second runs MJHQ-30K on one GPU; the third COCO-30K on 8 GPUs
(each rank generates its slice, rank 0 computes the FID). `python evaluate.py SUBCOMMAND --help` lists the flags;
README.md's "Evaluation" section is the manual (FID resize modes, protocols, CLIP score, captions); the speed
benchmark is bench.py.
"""
import argparse
import contextlib
import json
import math
import os
import re
import sys
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
from tqdm import tqdm

import data
import projector
import sample
import tokenizer as tokenizer_lib
from flow_dit import DEFAULT_CFG, DEFAULT_STEPS
from data import IMAGE_EXTENSIONS
from projector import CLIPTextEncoder, OFFICIAL_CLIP_TOWER, tokenize
from runtime import (PRECISIONS, MetricsLog, UserError, barrier, check_writable, default_precision, dist_env,
                     file_sha256, finite_float, load_checkpoint, non_negative_int, on_every_rank, one_line, pick_device,
                     positive_int, ranks, read_weights, resolve_path, rng_state, run_cli, set_rng_state, user_errors,
                     write_errors)

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
STATS_DIM = 2048       # pool3 features: the dimension of every FID statistics file
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


def preprocess(images, resize="bilinear", dtype=torch.float32):
    """(B, 3, H, W) uint8 or [0,1] float images -> (B, 3, 299, 299) Inception input in `dtype` (the official
    evaluator, torch-fidelity's InceptionV3 at float64, resizes in float64 too)."""
    if resize == "bilinear":  # pytorch-fid: resize [0, 1] values, then 2x - 1
        x = images.to(dtype) / 255 if images.dtype == torch.uint8 else images.to(dtype)
        return 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    if resize == "tf":  # torch-fidelity: resize 0..255 values, then (x - 128) / 128
        x = images.to(dtype) if images.dtype == torch.uint8 else images.to(dtype) * 255
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
    """Read a .npz written by save_stats or by pytorch-fid (which has only `mu` and `sigma`): 2048-d pool3 statistics,
    plain arrays only (never unpickled)."""
    why = None
    try:
        with np.load(path) as f:          # allow_pickle=False: an object array or a pickle is refused
            lacking = [k for k in ("mu", "sigma") if k not in f]
            if lacking:
                raise KeyError(lacking[0])
            stats = Stats(f["mu"].astype(np.float64), f["sigma"].astype(np.float64),
                          int(f["n"]) if "n" in f else None, str(f["resize"]) if "resize" in f else None)
    except KeyError as err:
        why = f"no {err.args[0]!r} array"
    except (OSError, ValueError, EOFError):  # not a zip of .npy arrays (numpy's own advice would be to unpickle it)
        why = "not a NumPy .npz of plain arrays"
    if why is None and (stats.mu.shape != (STATS_DIM,) or stats.sigma.shape != (STATS_DIM, STATS_DIM)):
        why = f"mu {stats.mu.shape} and sigma {stats.sigma.shape}, not the {STATS_DIM}-d pool3 statistics"
    if why is not None:
        raise UserError(f"{path}: not FID statistics ({why}); make them with `python evaluate.py fid IMAGES "
                        f"--save-stats OUT.npz`")
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
    # a distance is >= 0: identical statistics give round-off around 0 (a printed -0.0000), not a negative FID
    if value < -1e-6 * max(1.0, float(np.trace(sigma1) + np.trace(sigma2))):
        raise ValueError(f"the Frechet distance is {value:.4g} < 0: a covariance is not positive semi-definite")
    return max(value, 0.0)


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
            text = _one_line_text(ann["caption"])
            if text:
                captions.setdefault(ann["image_id"], []).append(text)
    except KeyError as err:
        raise UserError(f"--coco-captions {captions_json}: not a COCO captions file (missing {err})") from None
    except TypeError as err:    # a record that is not an object, an id that is a list, ...
        raise UserError(f"--coco-captions {captions_json}: not a COCO captions file (a malformed record: {err})") \
            from None
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
    """A caption with its whitespace (newlines included) collapsed to single spaces; "" for what is no text (a
    null, a number: no reference or prompt should read "None")."""
    return " ".join(text.split()) if isinstance(text, str) else ""


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
    except KeyError as err:
        raise UserError(f"--captions-json {captions_json}: not a COCO captions file (missing {err})") from None
    except TypeError as err:    # a record that is not an object, an id that is a list, ...
        raise UserError(f"--captions-json {captions_json}: not a COCO captions file (a malformed record: {err})") \
            from None
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


def i2t_checkpoint(path):
    """The image-to-text checkpoint load_pipeline takes from `path`: a demo folder's flow-i2t/, else path."""
    sub = os.path.join(path, "flow-i2t")
    return sub if os.path.isfile(os.path.join(sub, "last.pt")) else path


# ----------------------------------------------------------------------------------------------------------------
# FID during training (train.py --eval-every, as the official trainer): the EMA weights through sample.py's
# generation, this file's FID; every rank generates its share, rank 0 measures. No draw from the training RNG.
# ----------------------------------------------------------------------------------------------------------------

class TrainingEval:
    """--eval-every N: FID (and CLIP score with --eval-clip-weights) of the EMA weights every N steps."""

    def __init__(self, args, rank, world, device, step):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.prompts = read_eval_prompts(args)
        self.folder = os.path.join(args.out, "eval", "samples")
        self.history = MetricsLog(args.out, step, False, name="eval.jsonl") if rank == 0 else None
        self.ref = load_stats(args.eval_ref) if rank == 0 else None
        self.net = self.scorer = None                       # loaded at the first evaluation (rank 0)

    def __call__(self, run):
        """Evaluate with the RNG states saved and restored around it: building Inception or CLIP draws random
        initial weights, which would otherwise shift dropout and break the exact resume."""
        state = rng_state()
        try:
            return self.evaluate(run)
        finally:
            set_rng_state(state)

    def evaluate(self, run):
        """Generate OUT/eval/samples from the EMA weights, then (rank 0) FID and CLIP score -> the record or None."""
        args, t0 = self.args, time.time()
        pipe = sample.FlowTokPipeline(run.stage.frozen["clip"], run.ema["projector"], run.ema["dit"],
                                      run.stage.frozen["tokenizer"], precision=args.precision)
        pipe._identity = f"step {run.step}"                 # records name the step; hashing the weights is not needed

        def generate():
            with write_errors(self.folder, "free space, then continue the run with --resume"):
                os.makedirs(self.folder, exist_ok=True)
                sample.generate_folder(pipe, self.prompts, self.folder, 1, args.seed, args.eval_steps, args.eval_cfg,
                                       args.batch_size, self.rank, self.world)
        # each step ends with every rank: all images on disk before scoring, or every rank stopped with one line
        on_every_rank(self.world, self.rank, generate)
        return on_every_rank(self.world, self.rank, lambda: self.score(run, t0) if self.rank == 0 else None)

    def score(self, run, t0):
        """(rank 0) FID and CLIP score of the images in OUT/eval/samples -> the record, logged."""
        args = self.args
        files = [sample.sample_path(self.folder, i, 0) for i in range(len(self.prompts))]
        if self.net is None:
            self.net = load_inception(args.eval_inception).to(self.device)
        stats = files_stats(files, self.net, device=self.device, name=f"eval at step {run.step}")
        record = {"step": run.step, "fid": frechet_distance(self.ref.mu, self.ref.sigma, stats.mu, stats.sigma),
                  "eval_samples": len(files)}
        if args.eval_clip_weights:
            if self.scorer is None:
                self.scorer = load_clip_scorer(args.eval_clip_model, weights=args.eval_clip_weights,
                                               device=self.device)
            record["clip_score"] = float(clip_scores(files, self.prompts, self.scorer, self.device).mean())
        record["eval_seconds"] = time.time() - t0
        self.history.write(record)
        if run.metrics is not None:
            run.metrics.write(record)
        clip = f", CLIP score {record['clip_score']:.2f}" if "clip_score" in record else ""
        run.say(f"eval at step {run.step}: FID {record['fid']:.3f}{clip} ({len(files)} samples vs "
                f"{self.ref.n or '?'} reference images, {record['eval_seconds']:.0f} s)")
        return record

def read_eval_prompts(args):
    """The first --eval-samples prompts of --eval-prompts (one per line, blank lines skipped)."""
    try:
        with open(args.eval_prompts, encoding="utf-8") as f:
            prompts = [" ".join(line.split()) for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--eval-prompts {args.eval_prompts}: {one_line(e)}") from None
    return prompts[:args.eval_samples] if args.eval_samples else prompts

def check_eval_args(args):
    """--eval-every needs the flow stage, a prompt file and reference statistics: checked before any training."""
    if not args.eval_every:
        return
    missing = [flag for flag, value in (("--eval-prompts", args.eval_prompts), ("--eval-ref", args.eval_ref))
               if not value]
    if missing:
        raise UserError(f"--eval-every needs {' and '.join(missing)} (reference statistics: py fid "
                        f"REFERENCE_IMAGES --save-stats ref.npz)")
    if not read_eval_prompts(args):
        raise UserError(f"--eval-prompts {args.eval_prompts}: no prompts")
    load_stats(args.eval_ref)                          # a missing or broken file stops here, not later

def add_eval_args(p):
    """The flags of FID during training (TrainingEval)."""
    p.add_argument("--eval-every", type=non_negative_int, default=0, help="flow stage: FID of the EMA weights every "
                   "N steps and at the end, as the official trainer (0: off; default: %(default)s)")
    p.add_argument("--eval-prompts", metavar="FILE", help="prompts of the FID samples, one per line")
    p.add_argument("--eval-ref", metavar="STATS.npz", help="reference statistics of images at the training size, "
                   "bilinear to 299 (py fid IMAGES --save-stats STATS.npz)")
    p.add_argument("--eval-samples", type=non_negative_int, default=0, help="use the first N prompts (0: all; "
                   "default: %(default)s)")
    p.add_argument("--eval-steps", type=positive_int, default=DEFAULT_STEPS, help="Euler steps of the FID samples "
                   "(default: %(default)s)")
    p.add_argument("--eval-cfg", type=finite_float, default=DEFAULT_CFG, help="guidance of the FID samples "
                   "(default: %(default)s)")
    p.add_argument("--eval-inception", metavar="FILE", help="local pt_inception-2015-12-05 weights (default: the "
                   "torch hub cache, else a download)")
    p.add_argument("--eval-clip-model", default="ViT-B-32", help="CLIP of the CLIP score: an open_clip name or "
                   "model-config .json (default: %(default)s)")
    p.add_argument("--eval-clip-weights", metavar="FILE", help="its weights; given, every evaluation also reports "
                   "the CLIP score")


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
    if dist_env()[1] > 1:
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
    captions = sample.read_captions(path, items)
    sample.write_captions(path, items, captions)            # without torn lines, before appending to it
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
    made = sample.caption_items(pipe, items, captions, path, args.seed, args.steps, args.cfg, args.batch_size,
                                progress=True)
    sample.write_captions(path, items, captions)            # split order
    print(f"captioned {made}, reused {n - made} images -> {path}")
    candidates = {it["id"]: captions[it["id"]] for it in items}
    references = {it["id"]: it["references"] for it in items}
    result = dict(settings, source=source, split=split, images=n, split_images=full, image_size=size,
                  bleu4=projector.bleu4(candidates, references), cider_d=projector.cider_d(candidates, references),
                  captions=path)
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
        raise UserError("the speed benchmark moved to bench.py: python bench.py " + " ".join(args.rest) + " (the same "
                        "flags)")
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

    speed = sub.add_parser("speed", help="moved: python bench.py (the same flags)")
    speed.add_argument("rest", nargs=argparse.REMAINDER, help="the flags, for bench.py")
    return parser


def cli(argv=None):
    """The command line: user errors become one line on stderr and exit status 1 (no traceback)."""
    sys.exit(run_cli("evaluate.py", main, build_parser().parse_args(argv)))


if __name__ == "__main__":
    cli()
