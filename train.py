"""Train FlowTok with plain PyTorch DDP: every stage, one entry point, runs that survive being killed.

Stages (--stage):
  tokenizer   the 1D image tokenizer, TA-TiTok's one-stage recipe: L2 + perceptual + KL + PatchGAN with LeCAM
  flow        text -> image: DiT + text projector + alignment MLP on a frozen tokenizer and frozen CLIP
  text-ae     the text autoencoder of image-to-text: text projector + TextDecoder (token cross-entropy + KL)
  flow-i2t    image -> text: the same DiT and flow, from image tokens to the frozen text autoencoder's latents

  # 1 CPU: the whole embedded demo (tokenizer, text->image, image->text on the built-in shapes world): demo.py
  python demo.py --out runs/demo
  # 1 GPU (batch 128, gradient accumulation up to the global batch 4096)
  python train.py --stage flow --model XL --data jsonl:/data/cc12m.jsonl --tokenizer FlowTiTok_512.bin \\
      --image-size 512 --batch-size 128 --out runs/xl
  # 8 GPUs on one node (4096 = 128 x 8 x 4 accumulation steps)
  torchrun --nproc_per_node 8 train.py --stage flow --model XL ... --batch-size 128 --out runs/xl
  # 2 nodes x 8 GPUs (run on both nodes, NODE_RANK 0 and 1)
  torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $MASTER --master_port 29500 --nproc_per_node 8 \\
      train.py --stage flow --model XL ... --batch-size 128 --out runs/xl
  # the image tokenizer (8 GPUs x 32), or fine-tuning the released one (--init FlowTiTok_512.bin)
  torchrun --nproc_per_node 8 train.py --stage tokenizer --tokenizer-preset bl77-256 \\
      --data tar:/data/{00000..09999}.tar --batch-size 32 --out runs/tok
  # after a crash, a kill or a preemption: the same command plus --resume continues exactly
  python train.py ... --out runs/xl --resume

Checkpoints (one schema for every stage; tensors and plain types only, read with weights_only=True):
  {"stage", "args", "config": {part: constructor kwargs, "clip": {...}, "tokenizer"/"text_ae": path},
   "step", "model": {part: state_dict}, "ema": {part: state_dict}, "optimizer", "scheduler",
   "rng": [per-rank RNG states], "data_state": [per-rank loader states], "stats": {counters},
   "discriminator": {"model", "optimizer", "scheduler", "config"} (tokenizer stage with a GAN term only)}
written by rank 0 to a temporary file and renamed (atomic): out/step_XXXXXXX.pt, rotated, and out/last.pt.

Randomness is drawn per sample from the data stream (data.py: seeded by stream position), so a run resumed
from any checkpoint ends bitwise equal to an uninterrupted one on CPU, and 2 processes match 1 process for
losses without batch coupling (the flow stage's contrastive loss and CFG shuffle are per-GPU batch, as in
the official code; --gather-negatives takes the contrastive negatives from all GPUs instead).
"""
import argparse
import contextlib
import copy
import ctypes
import datetime
import errno
import glob
import json
import math
import os
import random
import re
import signal
import socket
import sys
import textwrap
import time
import warnings
from collections import Counter

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

import data
import evaluate
import flow_dit
import projector
import sample
import tokenizer as tokenizer_lib
from flow_dit import DEFAULT_CFG, DEFAULT_STEPS, FLOW_MODELS, FlowDiT
from projector import (CLIPTextEncoder, CLIP_TOWERS, OFFICIAL_CLIP_TOWER, PRECISIONS, TextDecoder, TextProjector,
                       UserError, agree, amp, broadcast, default_precision, finite_float, fraction, fused_if_available,
                       load_checkpoint, non_negative_float, non_negative_int, on_every_rank, one_line, positive_float,
                       positive_int, reparameterize, run_cli, short_hash, token_group, use_cuda, weights_sha256)
from tokenizer import TOKENIZER_PRESETS, Tokenizer

try:
    import fcntl      # POSIX: the kernel drops a dead process's flock, the surest test of a stale lock file
except ImportError:   # Windows: the lock file and its pid alone
    fcntl = None
try:
    from torch.utils.tensorboard import SummaryWriter   # optional: --tensorboard needs the tensorboard package
except ImportError:
    SummaryWriter = None

T = 77 * 16   # elements of one 77x16 latent
# How long a collective waits for the slowest rank before the job fails (torch's default is 10 minutes with NCCL):
# the other ranks wait at a barrier while rank 0 alone writes a multi-GB checkpoint to a shared filesystem or draws
# the preview samples, which can take many minutes; an hour still ends a truly hung job the same day.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)
SHARED = "--out must be on a filesystem all nodes share"
OFFICIAL_MICRO_BATCH = 128   # the official flow run's batch per process: 4096 = 32 processes x 128
# What --resume does with each flag of build_parser (test_every_train_flag_has_a_resume_class keeps this complete):
# fixed: what the models are, what the losses are and what data they see; a different value is refused by name
RESUME_FIXED = ("stage", "data", "image_size", "random_crop", "flip", "model", "dit_patch_size", "tokenizer_preset",
                "scale_factor", "tokenizer", "text_ae", "clip_tower", "clip_weights", "projector_depth",
                "projector_heads", "projector_ff", "projector_dropout", "projector_patch_size", "align_hidden",
                "decoder_width", "decoder_depth", "decoder_ff", "decoder_patch_size", "decoder_vocab", "w_con", "kl",
                "w_kl", "cfg_prob", "gather_negatives", "caption_groups", "w_perceptual", "perceptual_weights", "w_gan",
                "gan_start", "adaptive_gan", "w_lecam", "lecam_decay", "disc_width", "seed", "size_filter")
# applied: optimisation and schedule; a new value acts from the resumed step on (AdamW's settings and the schedule's
# peak are replaced, the moments and the schedule's position kept), is said in the log and recorded in checkpoints
RESUME_APPLIED = ("steps", "global_batch", "lr", "min_lr", "schedule", "warmup", "weight_decay", "beta1", "beta2",
                  "ema", "grad_clip", "disc_lr")
# kept: used only when a run starts; a resume keeps (and records) the run's value, and says so if it differs
RESUME_KEPT = ("init", "init_from_ema")
# free: how the run is executed, logged, saved and previewed (numerics up to rounding); changes at will
RESUME_FREE = ("out", "resume", "batch_size", "num_workers", "precision", "compile", "grad_checkpointing",
               "max_bad_steps", "spike_factor", "spike_steps", "log_every", "ckpt_every", "keep", "sample_every",
               "sample_steps", "cfg", "sample_prompts", "no_progress", "tensorboard", "eval_every", "eval_prompts", "eval_ref",
               "eval_samples", "eval_steps", "eval_cfg", "eval_inception", "eval_clip_model", "eval_clip_weights")


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------

def split_noise(noise, spec):
    """(B, D) per-sample normals -> dict of named pieces {name: size} (shapes (B, 77, 16) or (B,))."""
    out, i = {}, 0
    for name, n in spec.items():
        piece = noise[:, i:i + n]
        out[name] = piece.view(-1, 77, 16) if n == T else piece[:, 0]
        i += n
    return out


def caption_groups(ids):
    """(B, 77) CLIP ids -> (B,) int64 hash: equal captions get equal ids (contrastive positives)."""
    weights = torch.arange(1, ids.shape[1] + 1, device=ids.device, dtype=torch.long) * 1_000_003 + 7919
    return (ids.long() * weights).sum(1) % (2 ** 61 - 1)


def _write_synced(state, path):
    """torch.save into path through a Python file, on disk when it returns (fsync).

    Through a file object a full disk raises OSError(ENOSPC); torch.save(state, path) would give an opaque
    RuntimeError from its C++ writer ("unexpected pos ...") that cannot be told from a bug.
    """
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(state, out, step, keep):
    """Atomically write out/step_XXXXXXX.pt and point out/last.pt at it; keep the newest `keep` step files.

    A write that fails (full disk, quota, a folder in the way) removes its partial files, leaves the previous
    checkpoints as they were and is a UserError: the run stops with one line and continues with --resume.
    """
    path = os.path.join(out, f"step_{step:07d}.pt")
    # per process: a stray second writer never shares a partial file
    tmp, link = f"{path}.{os.getpid()}.tmp", f"{path}.{os.getpid()}.last"
    try:
        _write_synced(state, tmp)
        os.replace(tmp, path)                  # a kill before this line leaves the previous files intact
        try:                                   # last.pt: a hard link to the step file (no second copy)
            os.link(path, link)
        except OSError:
            _write_synced(state, link)
        os.replace(link, os.path.join(out, "last.pt"))
    except OSError as e:
        for partial in (tmp, link):
            if os.path.isfile(partial):
                os.remove(partial)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a failed write() names no file: name the checkpoint
            raise UserError(f"the disk is full at {out}: cannot write the checkpoint {path} ({e.strerror}); the "
                            f"previous checkpoints are intact: free space, then continue with --resume") from None
        where = e.filename2 or e.filename       # os.replace onto a folder names the folder second
        raise UserError(f"cannot write the checkpoint {path} ({e.strerror}{f': {where}' if where else ''}); the "
                        f"previous checkpoints in {out} are intact") from None
    for old in sorted(glob.glob(os.path.join(out, "step_*.pt")))[:-keep] if keep > 0 else []:
        os.remove(old)
    return path


def rng_state():
    """This process's RNG states (torch CPU and CUDA, python)."""
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    """Restore rng_state()."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weight_checksum(module):
    """(sum, sum of squares) of all parameters in float64: equal on ranks that hold the same weights."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in module.parameters()])
        return [flat.sum().item(), flat.square().sum().item()]


def gather_objects(obj, world):
    """The list of obj from every rank (rank order)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def make_gather(world, rank):
    """x (B_local, ...) -> (B_global, ...) concatenated over ranks; gradients reach the local slice only.

    The local slice's gradient is scaled by the world size because DDP averages gradients over ranks, while
    every rank computes the same global loss: the average of W partial gradients x W is the full gradient.
    """
    def gather(x):
        sizes = [torch.zeros((), dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor(len(x), device=x.device))
        big = max(int(s) for s in sizes)
        pad = torch.zeros((big - len(x), *x.shape[1:]), dtype=x.dtype, device=x.device)
        parts = [torch.empty((big, *x.shape[1:]), dtype=x.dtype, device=x.device) for _ in range(world)]
        dist.all_gather(parts, torch.cat([x.detach(), pad]))
        scaled = x * world - x.detach() * (world - 1) if x.is_floating_point() else x   # value x, grad W * g
        parts = [scaled if r == rank else p[:int(n)] for r, (p, n) in enumerate(zip(parts, sizes))]
        return torch.cat(parts)
    return gather


# ----------------------------------------------------------------------------------------------------------
# Frozen encoders and the models' constructor arguments
# ----------------------------------------------------------------------------------------------------------

def build_clip(args, device, rank):
    """The frozen CLIP text tower of the run -> (encoder, the weights to record in checkpoints).

    A random tower (tests, the demo) is drawn from --seed on every rank and saved as out/clip_text.safetensors
    so that later stages and sample.py use exactly the same one (pass that file as --clip-weights).
    """
    if args.clip_weights != "random":
        try:
            return CLIPTextEncoder(args.clip_tower, args.clip_weights).to(device), args.clip_weights
        except (OSError, ValueError, RuntimeError) as e:
            raise UserError(str(e)) from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        clip = CLIPTextEncoder(args.clip_tower, "random")
    path = os.path.join(args.out, "clip_text.safetensors")
    if rank == 0 and not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        save_file({k: v.contiguous() for k, v in clip.text.state_dict().items()}, tmp)
        os.replace(tmp, path)
    return clip.to(device), path


def load_frozen_tokenizer(path, args, clip_config, clip_width, device):
    """A trained tokenizer (our run / checkpoint or the official .bin) for a flow stage, checked against the run."""
    ours = load_checkpoint(path) if os.path.isdir(path) or path.endswith(".pt") else None
    try:
        tok = tokenizer_lib.load_tokenizer(ours or path)       # ours: read once (real tokenizers are 1.5 GB)
    except (ValueError, OSError, RuntimeError) as e:
        raise UserError(f"--tokenizer {path}: {e}") from None
    if ours and ours["config"]["clip"]["tower"] != clip_config["tower"]:
        raise UserError(f"--tokenizer {path} was trained with the CLIP tower {ours['config']['clip']['tower']!r}, "
                         f"this run uses {clip_config['tower']!r}")
    if ours and ours["config"]["clip"]["weights"] != clip_config["weights"]:
        print(f"warning: --tokenizer {path} was trained with CLIP weights {ours['config']['clip']['weights']}, "
              f"this run uses {clip_config['weights']}", file=sys.stderr)
    c = tok.config
    if c["image_size"] != args.image_size:
        raise UserError(f"--tokenizer {path} works at {c['image_size']} px but --image-size is {args.image_size}: "
                         f"use the matching tokenizer (bl77-{args.image_size}) or --image-size {c['image_size']}")
    if c["text_dim"] != clip_width:
        raise UserError(f"--tokenizer {path} expects {c['text_dim']}-d text features but --clip-tower "
                         f"{args.clip_tower} gives {clip_width}-d: it was trained with another text tower")
    return tok.to(device).eval().requires_grad_(False)


def load_frozen_text_ae(path, device):
    """The text autoencoder (stage text-ae) for the flow-i2t stage -> (projector, text decoder), EMA weights."""
    try:
        ckpt = load_checkpoint(path)
    except UserError as e:
        raise UserError(f"--text-ae: {e}") from None
    if ckpt.get("stage") != "text-ae":
        raise UserError(f"--text-ae {path} is a '{ckpt.get('stage')}' checkpoint, not a text-ae one")
    proj = TextProjector(**ckpt["config"]["projector"])
    decoder = TextDecoder(**ckpt["config"]["text_decoder"])
    proj.load_state_dict(ckpt["ema"]["projector"])
    decoder.load_state_dict(ckpt["ema"]["text_decoder"])
    return proj.to(device).eval().requires_grad_(False), decoder.to(device).eval().requires_grad_(False)


def open_data(args, **options):
    """--data -> its source (data.build_dataset); a spec that cannot be used is one line, naming it."""
    try:
        return data.build_dataset(args.data, image_size=args.image_size, **options)
    except (ValueError, RuntimeError) as e:   # data.py's spec errors: an unknown kind, option or split
        raise UserError(str(e)) from None


def caption_vocabulary(args):
    """The CLIP ids of every training caption of --data (for --decoder-vocab data)."""
    source = open_data(args)
    if isinstance(source, data.CacheSource):
        return sorted({int(i) for a in source._open() for i in np.unique(a["ids"])})
    if isinstance(source, data.ShapesSource):
        captions = data.shapes_prompts(source.split)
    elif hasattr(source, "texts"):   # every caption a draw can give: recaptions and all sentences included
        captions = source.texts()
    else:
        raise UserError(f"--decoder-vocab data needs a map-style source, not {args.data}")
    ids = torch.cat([projector.tokenize(captions[i:i + 4096])[0] for i in range(0, len(captions), 4096)])
    return sorted(int(i) for i in ids.unique())


def projector_kwargs(args, clip):
    """The TextProjector's constructor arguments from the flags (its alignment head aside)."""
    return dict(clip_dim=clip.width, depth=args.projector_depth, heads=args.projector_heads, d_ff=args.projector_ff,
                dropout=args.projector_dropout, patch_size=args.projector_patch_size)


# ----------------------------------------------------------------------------------------------------------
# Stages: each stage's defaults, per-sample noise, models, inputs, loss and preview, in one class per stage
# ----------------------------------------------------------------------------------------------------------

class Stage:
    """One training stage. `defaults`: the official (or closest public) recipe, every value one flag away;
    `noise`: what the per-sample noise vector holds (data.py draws it from the sample's stream position);
    `micro_batch`: the per-process batch when --batch-size is not given (None: global batch / processes);
    `watched`: the logged loss term that SpikeWatch follows."""
    defaults, noise, micro_batch, watched = {}, {}, None, "loss"

    def build(self, args, clip, frozen, config, device):
        """-> the trainable parts {name: module}; frozen encoders go into `frozen`, paths into `config`."""
        raise NotImplementedError

    def inputs(self, batch, noise, clip, frozen, args, device):
        """A loader batch (its noise split by name, CLIP features computed) -> what the loss needs (no grad)."""
        raise NotImplementedError

    def loss(self, parts, inputs, args, gather, helpers):
        """-> dict of scalars; "loss" is what backward sees."""
        raise NotImplementedError

    def preview(self, ema, frozen, fixed, args, path, generator):
        """Write a preview of the EMA model to path + .png / .txt -> the file written."""
        raise NotImplementedError


class TokenizerStage(Stage):
    """The 1D image tokenizer, TA-TiTok's one-stage recipe: L2 + perceptual + KL + PatchGAN with LeCAM."""
    defaults = dict(lr=1e-4, weight_decay=1e-4, beta2=0.999, warmup=10_000, schedule="cosine", min_lr=1e-5,
                    ema=0.999, grad_clip=1.0, w_kl=1e-6, global_batch=256, steps=650_000, w_perceptual=1.1,
                    w_gan=0.1, gan_start=200_000, random_crop=True, flip=True, size_filter=True)
    noise, watched = dict(img=T), "mse"     # the GAN term joins the loss late and moves it by design

    def build(self, args, clip, frozen, config, device):
        overrides = dict(text_dim=clip.width, image_size=args.image_size)
        if args.scale_factor != "auto":
            overrides["scale_factor"] = float(args.scale_factor)
        tok = Tokenizer.from_preset(args.tokenizer_preset, **overrides)
        if not tok.config["text_guidance"]:
            frozen["clip"] = None              # a decoder without text guidance: no CLIP features to compute
        return {"tokenizer": tok}

    def inputs(self, batch, noise, clip, frozen, args, device):
        return dict(clip=clip, ids=batch["ids"].to(device, non_blocking=True),
                    images=batch["image"].to(device, non_blocking=True), eps=noise["img"])

    def loss(self, parts, inputs, args, gather, helpers):
        """The one-stage TA-TiTok objective (formulas in tokenizer.py): MSE + perceptual + KL + GAN generator term."""
        tok, images = parts["tokenizer"], inputs["images"]
        mean, logvar = tok.encode(images)
        recon = tok.decode(reparameterize(mean, logvar, inputs["eps"]), inputs["clip"]).float()
        mse = F.mse_loss(recon, images)
        kl = tokenizer_lib.posterior_kl(mean, logvar).sum(1).mean()            # summed over tokens, batch mean
        out = dict(mse=mse, kl=kl, psnr=tokenizer_lib.psnr(mse.detach()), sigma=torch.exp(0.5 * logvar.detach()).mean())
        rec = mse
        if helpers.get("perceptual") is not None:
            with torch.autocast(images.device.type, enabled=False):           # float32, as the official loss
                out["perceptual"] = helpers["perceptual"](recon, images)
            rec = rec + args.w_perceptual * out["perceptual"]
        loss = rec + args.w_kl * kl
        if inputs.get("gan"):                                                  # from --gan-start on
            disc = helpers["discriminator"]
            disc.requires_grad_(False)            # this term trains the tokenizer; D learns in its own step
            with torch.autocast(images.device.type, enabled=False):
                out["gan"] = tokenizer_lib.generator_gan_loss(disc(recon))
            disc.requires_grad_(True)
            weight = args.w_gan * (tokenizer_lib.adaptive_gan_weight(rec, out["gan"], tok.decoder.conv_out.weight)
                                   if args.adaptive_gan else 1.0)
            out["gan_weight"] = torch.as_tensor(weight, dtype=torch.float32)
            loss = loss + weight * out["gan"]
        out.update(loss=loss, recon=recon.detach())   # recon: the discriminator's fakes (popped by the loop)
        return out

    def preview(self, ema, frozen, fixed, args, path, generator):
        tok = ema["tokenizer"]
        mean, _ = tok.encode(fixed["images"])
        recon = tok.decode(mean, frozen["clip"](fixed["ids"]) if frozen["clip"] is not None else None).clamp(0, 1)
        grid = torch.stack([fixed["images"], recon], 1).flatten(0, 1)         # input, reconstruction, ...
        return sample.save_grid(grid, path + ".png", nrow=8)


class FlowStage(Stage):
    """Text -> image: DiT + text projector + alignment MLP on a frozen tokenizer and frozen CLIP (flow_dit.py)."""
    defaults = dict(lr=4e-4, weight_decay=0.03, beta2=0.95, warmup=5000, schedule="constant", min_lr=0.0,
                    ema=0.9999, grad_clip=0.0, w_kl=None, global_batch=4096, steps=1_000_000)
    noise = dict(img=T, txt=T, t=1, null=1)
    # the official micro-batch: its KL sum, contrastive negatives and CFG shuffle are per process (FlowTok
    # train_t2i.py:38-39, 4096 / 32 processes, no accumulation); accumulation makes up the global batch
    micro_batch = OFFICIAL_MICRO_BATCH

    def build(self, args, clip, frozen, config, device):
        dit = self.build_dit(args, clip, frozen, config, device)
        align = args.align_hidden if args.w_con else 0         # no alignment head without the contrastive term
        return {"dit": dit, "projector": TextProjector(**projector_kwargs(args, clip), align_hidden=align)}

    def build_dit(self, args, clip, frozen, config, device):
        """The frozen tokenizer (into `frozen`) and a fresh DiT (both flow directions)."""
        if not args.tokenizer:
            raise UserError(f"--stage {args.stage} needs --tokenizer (a tokenizer run or the official .bin)")
        frozen["tokenizer"] = load_frozen_tokenizer(args.tokenizer, args, config["clip"], clip.width, device)
        config["tokenizer"] = args.tokenizer
        return FlowDiT(**FLOW_MODELS[args.model], patch_size=args.dit_patch_size)

    def image_tokens(self, batch, noise, frozen, args, device):
        """Flow-space image tokens (B, 77, 16) of the batch: from the cache's posterior or the frozen encoder."""
        tok = frozen["tokenizer"]
        if "posterior" in batch:
            mean, logvar = batch["posterior"].to(device, non_blocking=True).chunk(2, dim=-1)
        else:
            with autocast(args, device):
                mean, logvar = tok.encode(batch["image"].to(device, non_blocking=True))
        return tok.flow_tokens(mean, logvar, noise["img"])

    def inputs(self, batch, noise, clip, frozen, args, device):
        t, null = flow_dit.draw_time_and_null(noise["t"], noise["null"], args.cfg_prob)
        ids = batch["ids"].to(device, non_blocking=True)
        out = dict(clip=clip, t=t, null=null, x1=self.image_tokens(batch, noise, frozen, args, device),
                   eps=noise["txt"])
        if args.caption_groups:
            out["groups"] = caption_groups(ids)
        return out

    def loss(self, parts, inputs, args, gather, helpers):
        out = flow_dit.flowtok_loss(parts["dit"], parts["projector"], inputs["clip"], inputs["x1"], inputs["t"],
                                    inputs["null"], inputs["eps"], args.w_con, args.w_kl, args.kl,
                                    inputs.get("groups"), gather)
        return dict(loss=out["loss"], diff=out["diff"], contrastive=out["contrastive"], kl=out["kl"],
                    sigma=torch.exp(0.5 * out["logvar"].detach()).mean(), mu=out["mu"].detach().abs().mean())

    def preview(self, ema, frozen, fixed, args, path, generator):
        pipe = sample.FlowTokPipeline(frozen["clip"], ema["projector"], ema["dit"], frozen["tokenizer"])
        images = pipe.generate(fixed["prompts"], steps=args.sample_steps, cfg=args.cfg, generator=generator)
        return sample.save_grid(images, path + ".png", nrow=8)


class TextAEStage(Stage):
    """The text autoencoder of image-to-text: text projector + TextDecoder (token cross-entropy + KL)."""
    defaults = dict(lr=2e-4, weight_decay=0.03, beta2=0.95, warmup=2000, schedule="constant", min_lr=0.0,
                    ema=0.999, grad_clip=1.0, w_kl=1e-4, global_batch=1024, steps=100_000)
    noise = dict(txt=T)

    def build(self, args, clip, frozen, config, device):
        proj = TextProjector(**projector_kwargs(args, clip), align_hidden=0)      # built first: the RNG order
        vocab = caption_vocabulary(args) if args.decoder_vocab == "data" else None
        decoder = TextDecoder(width=args.decoder_width, depth=args.decoder_depth, heads=args.projector_heads,
                              d_ff=args.decoder_ff, dropout=args.projector_dropout, vocab_ids=vocab,
                              patch_size=args.decoder_patch_size)
        return {"projector": proj, "text_decoder": decoder}

    def inputs(self, batch, noise, clip, frozen, args, device):
        return dict(clip=clip, ids=batch["ids"].to(device, non_blocking=True), eps=noise["txt"])

    def loss(self, parts, inputs, args, gather, helpers):
        z, mu, logvar = parts["projector"](inputs["clip"], inputs["eps"])
        decoder, keep = parts["text_decoder"], projector.caption_mask(inputs["ids"])
        targets = decoder.class_of[inputs["ids"]]                                # CLIP ids -> head classes
        logits = decoder(z, keep)                                                # (N, classes): real tokens only
        ce = projector.text_reconstruction_loss(logits, targets, keep)
        kl = projector.kl_standard(mu, logvar)
        wrong = torch.zeros_like(keep)
        wrong[keep] = logits.detach().argmax(-1) != targets[keep]
        return dict(loss=ce + args.w_kl * kl, ce=ce, kl=kl, token_acc=1 - wrong.sum() / keep.sum(),
                    exact=(~wrong.any(1)).float().mean(), sigma=torch.exp(0.5 * logvar.detach()).mean())

    def preview(self, ema, frozen, fixed, args, path, generator):
        _, mu, _ = ema["projector"](frozen["clip"](fixed["ids"]))              # decode the mean latent
        return write_lines(path + ".txt", fixed["captions"], projector.detokenize(ema["text_decoder"].decode(mu)))


class FlowI2TStage(FlowStage):
    """Image -> text: the same DiT and flow, from image tokens to the frozen text autoencoder's latents."""
    defaults = dict(FlowStage.defaults, w_kl=0.0, steps=200_000)

    def build(self, args, clip, frozen, config, device):
        if not args.text_ae:
            raise UserError("--stage flow-i2t needs --text-ae (a text-ae run)")
        dit = self.build_dit(args, clip, frozen, config, device)
        frozen["text_ae"], frozen["text_decoder"] = load_frozen_text_ae(args.text_ae, device)
        config["text_ae"] = args.text_ae
        return {"dit": dit}

    def inputs(self, batch, noise, clip, frozen, args, device):
        t, null = flow_dit.draw_time_and_null(noise["t"], noise["null"], args.cfg_prob)
        text_latent, _, _ = frozen["text_ae"](clip, noise["txt"])
        return dict(t=t, null=null, x0=self.image_tokens(batch, noise, frozen, args, device), x1=text_latent)

    def loss(self, parts, inputs, args, gather, helpers):
        out = flow_dit.flow_loss(parts["dit"], inputs["x0"], inputs["x1"], inputs["t"], inputs["null"])
        return dict(loss=out["diff"], diff=out["diff"])

    def preview(self, ema, frozen, fixed, args, path, generator):
        pipe = sample.FlowTokPipeline(frozen["clip"], None, None, frozen["tokenizer"], i2t_dit=ema["dit"],
                                      text_decoder=frozen["text_decoder"])
        caps = pipe.caption(fixed["images"], steps=args.sample_steps, cfg=args.cfg, generator=generator)
        return write_lines(path + ".txt", fixed["captions"], caps)


STAGES = {"tokenizer": TokenizerStage(), "flow": FlowStage(), "text-ae": TextAEStage(), "flow-i2t": FlowI2TStage()}
STAGE_DEFAULTS = {name: stage.defaults for name, stage in STAGES.items()}


def build_stage(args, device, rank=0):
    """-> (trainable parts {name: module}, frozen encoders {name: module}, config for the checkpoint)."""
    clip, clip_weights = build_clip(args, device, rank)
    frozen, config = {"clip": clip}, {"clip": dict(tower=args.clip_tower, weights=clip_weights)}
    parts = STAGES[args.stage].build(args, clip, frozen, config, device)
    config.update({name: m.config for name, m in parts.items()})
    return {k: v.to(device) for k, v in parts.items()}, frozen, config


@torch.no_grad()
def prepare(batch, frozen, args, device):
    """A loader batch -> the tensors the stage's loss needs, with the frozen encoders applied (no grad)."""
    stage = STAGES[args.stage]
    noise = split_noise(batch["noise"].to(device, non_blocking=True), stage.noise)
    if "clip" in batch:                                   # pre-tokenised cache: CLIP skipped
        clip = batch["clip"].to(device, non_blocking=True)
    else:
        clip = frozen["clip"](batch["ids"].to(device, non_blocking=True)) if frozen["clip"] is not None else None
    return stage.inputs(batch, noise, clip, frozen, args, device)


def stage_loss(parts, inputs, args, gather=None, helpers=None):
    """The stage's objective -> dict of scalars ("loss" is what backward sees)."""
    return STAGES[args.stage].loss(parts, inputs, args, gather, helpers or {})


# ----------------------------------------------------------------------------------------------------------
# Optimisation: the objective as one module, AdamW groups, --init, schedule, EMA, the discriminator
# ----------------------------------------------------------------------------------------------------------

class Objective(nn.Module):
    """A stage's trainable parts and its loss as one module, so that DDP syncs every part's gradients."""

    def __init__(self, parts, args, gather=None):
        super().__init__()
        self.parts = nn.ModuleDict(parts)
        self.args, self.gather = args, gather
        self.helpers = {}         # frozen perceptual net, discriminator: a plain dict, so DDP does not sync them

    def forward(self, inputs):
        return stage_loss(self.parts, inputs, self.args, self.gather, self.helpers)


def decay_groups(module):
    """AdamW groups of the tokenizer recipe (tokenizer and discriminator): no decay on biases, norms, embeddings,
    tokens. The official FlowTok stages decay every parameter and use plain parameter lists."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if tokenizer_lib.no_decay(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not tokenizer_lib.no_decay(n, p)]}]


def build_perceptual(args, device, rank, world, say):
    """The frozen perceptual network on every rank, or on none (with a warning: --perceptual-weights auto and rank 0
    finds no weights); a rank that cannot load the weights rank 0 loaded stops every rank, never drops the term."""
    if args.w_perceptual <= 0 or args.perceptual_weights == "none":
        return None
    folder = None if args.perceptual_weights == "auto" else args.perceptual_weights
    net, why = load_perceptual(folder, device) if rank == 0 else (None, None)   # rank 0 first: it downloads once
    agree(f"--perceptual-weights {folder}: {why}" if why and folder else None, world)
    if broadcast(net is None, world):          # auto and none found: the term is off on every rank alike
        say(f"warning: {why}. Training WITHOUT the perceptual term (pass --w-perceptual 0 to silence this)")
        return None
    if rank > 0:
        net, why = load_perceptual(folder, device)
    agree(f"rank {rank} cannot load the perceptual weights that rank 0 trains with ({why}): put them in every "
          f"node's torch hub cache or pass --perceptual-weights FOLDER on a filesystem all nodes share"
          if why else None, world)
    return net


# the flags that shape the trained parts: an --init file that does not fit is told by those that differ
SHAPE_FLAGS = ("model", "dit_patch_size", "clip_tower", "projector_depth", "projector_heads", "projector_ff",
               "projector_patch_size", "align_hidden", "w_con", "decoder_width", "decoder_depth", "decoder_ff",
               "decoder_patch_size", "decoder_vocab")


def _misfit(own, src):
    """The keys of two state dicts that do not match -> up to 3 described, and the count, or '' when they fit."""
    wrong = [f"{k} missing" for k in own if k not in src] + [f"{k} unexpected" for k in src if k not in own]
    wrong += [f"{k} {tuple(src[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in src and src[k].shape != own[k].shape]
    return ", ".join(wrong[:3]) + (f" ({len(wrong)} keys in all)" if len(wrong) > 3 else "")


def init_from_run(parts, args):
    """--init for the DiT / projector / decoder stages: the same parts of another run (any stage that has them)."""
    try:
        init = load_checkpoint(args.init)
    except UserError as e:
        raise UserError(f"--init: {e}") from None
    weights, saved = init.get("ema" if args.init_from_ema else "model") or {}, init.get("args") or {}
    absent = [name for name in parts if name not in weights]
    if absent:
        raise UserError(f"--init {args.init} is a '{init['stage']}' checkpoint (parts: {', '.join(weights)}): it "
                        f"has no {', '.join(absent)}, which --stage {args.stage} trains")
    for name, m in parts.items():
        misfit = _misfit(m.state_dict(), weights[name])
        if misfit:
            flags = [f"--{k.replace('_', '-')} {saved[k]} there, {getattr(args, k)} here" for k in SHAPE_FLAGS
                     if k in saved and saved[k] != getattr(args, k)]
            raise UserError(f"--init {args.init} (a '{init['stage']}' run) does not fit this '{args.stage}' run"
                            f"{': ' + '; '.join(flags) if flags else ''}; its {name}: {misfit}")
        m.load_state_dict(weights[name])


def _tokenizer_size(config):
    """A tokenizer's size in words: 'encoder 768 x 12, decoder 1024 x 24' (width x depth)."""
    return (f"encoder {config['enc_width']} x {config['enc_depth']}, "
            f"decoder {config['dec_width']} x {config['dec_depth']}")


def load_perceptual(folder, device):
    """-> (the frozen perceptual network, None) or (None, why it cannot be had)."""
    try:
        return tokenizer_lib.load_perceptual(folder).to(device), None
    except OSError as e:
        return None, one_line(e)


def share_rank0s_weights(module, world):
    """Every parameter and buffer of `module` := rank 0's (DDP's own start-up broadcast may leave buffers out)."""
    if world > 1:
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t, src=0)


def init_weights(parts, args):
    """--init: the trained parts from another run; for the tokenizer stage also any tokenizer checkpoint,
    the official FlowTiTok_256/512.bin included (fine-tuning; RoPE tables follow this run's image size)."""
    if args.stage != "tokenizer":
        return init_from_run(parts, args)
    try:
        tok = tokenizer_lib.load_tokenizer(args.init, ema=args.init_from_ema)
    except (ValueError, OSError, RuntimeError) as e:
        raise UserError(f"--init {args.init}: {e}") from None
    src, own = tok.state_dict(), parts["tokenizer"].state_dict()
    keys = [k for k in own if "rope_" not in k]
    wrong = [k for k in keys if k not in src or src[k].shape != own[k].shape]
    if wrong:
        raise UserError(f"--init {args.init} ({_tokenizer_size(tok.config)}) does not fit --tokenizer-preset "
                        f"{args.tokenizer_preset} ({_tokenizer_size(parts['tokenizer'].config)}): "
                        + ", ".join(f"{k} {tuple(src[k].shape) if k in src else 'missing'} vs "
                                    f"{tuple(own[k].shape)}" for k in wrong[:5]))
    parts["tokenizer"].load_state_dict({k: src[k] for k in keys}, strict=False)


def autocast(args, device):
    """Autocast to --precision (bf16 | fp16); fp32: none."""
    return amp(device, args.precision)


def lr_factor(step, args, steps=None):
    """Linear warm-up over args.warmup steps, then constant or cosine; update `step` (0-based) uses this factor."""
    if step < args.warmup:
        # the tokenizer stage's first update has lr 0, as TA-TiTok's LambdaLR gives (1d-tokenizer a5c8922
        # utils/lr_schedulers.py:56-58: step / warmup from step 0; accelerate ticks it num_processes times per
        # update, warm-up and horizon scaled alike, utils/train_utils.py:248-249); the other stages' first update
        # already moves (FlowTok's own LambdaLR also starts at 0, utils.py:104-106: a one-step shift kept for now)
        return (step + (0 if args.stage == "tokenizer" else 1)) / args.warmup
    if args.schedule == "constant":
        return 1.0
    progress = min((step - args.warmup) / max((steps or args.steps) - args.warmup, 1), 1.0)
    floor = args.min_lr / args.lr if args.lr else 0.0            # --lr 0: a run that must not move
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def ema_decay(step, args):
    """The EMA decay of update `step` (0-based): --ema, under the tokenizer stage's warm-up."""
    if args.stage != "tokenizer":
        # FlowTok's trainer: a constant rate from the first update (train_t2i.py:154, utils.py:122-126); the
        # text stages are ours and follow it
        return args.ema
    # TA-TiTok (bytedance/1d-tokenizer a5c8922; EMAModel(decay=0.999) at utils/train_utils.py:143, stepped per
    # update :514, set_step on resume :359): modeling/modules/ema_model.py:92-107 gives update s + 1 the decay 0
    # at s = 0 (the EMA becomes the model), then min(decay, (1 + s) / (10 + s)); short runs so average their recent
    # weights, not their random start
    return 0.0 if step == 0 else min(args.ema, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema, parts, decay):
    """ema = decay * ema + (1 - decay) * model, one fused op over all parameters."""
    ema_p = [p for p in ema.parameters()]
    model_p = [p.detach() for p in parts.parameters()]
    torch._foreach_lerp_(ema_p, model_p, 1 - decay)


def disc_horizon(args, world):
    """The discriminator schedule's length in its own updates, computed as TA-TiTok computes it."""
    # TA-TiTok (1d-tokenizer a5c8922 utils/train_utils.py:254-261): horizon steps x processes - discriminator_start
    # and warm-up warmup x processes, in scheduler ticks, of which accelerate makes `processes` per update (stepped
    # only once the discriminator trains, :474-500): in updates, warm-up --warmup and horizon steps - gan_start /
    # processes (more than the steps - gan_start updates it gets on several GPUs: there its cosine stops short)
    return args.steps - args.gan_start / world


class Discriminator:
    """The tokenizer stage's PatchGAN with its own AdamW and schedule: warm-up and cosine, stepped only from
    --gan-start on, over TA-TiTok's horizon of steps - gan_start / processes updates (see __init__)."""

    def __init__(self, args, device, world, local):
        self.args = args
        self.net = tokenizer_lib.PatchDiscriminator(args.disc_width, lecam_decay=args.lecam_decay).to(device)
        self.optimizer = torch.optim.AdamW(decay_groups(self.net), lr=args.disc_lr or args.lr,
                                           betas=(args.beta1, args.beta2), weight_decay=args.weight_decay,
                                           **fused_if_available(device))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, args, steps=disc_horizon(args, world)))
        self.ddp = self.net if world == 1 else nn.parallel.DistributedDataParallel(
            self.net, device_ids=[local] if device.type == "cuda" else None, broadcast_buffers=False)
        self.world = world

    def step(self, fakes, sums, skips):
        """One discriminator update on this step's (real, fake) micro-batches (hinge + LeCAM, tokenizer.py)."""
        for micro, (real, fake) in enumerate(fakes):
            accumulating = self.world > 1 and micro < len(fakes) - 1
            with self.ddp.no_sync() if accumulating else contextlib.nullcontext():
                logits_real, logits_fake = self.ddp(torch.cat([real, fake])).float().chunk(2)     # one pass
                d = self.net.loss(logits_real, logits_fake, self.args.w_lecam)
            (d["loss"] / self.args.accum).backward()
            means = torch.stack([d["logits_real"], d["logits_fake"]])
            if self.world > 1:                     # the LeCAM EMAs follow the global means: equal on all ranks
                dist.all_reduce(means)
                means /= self.world
            self.net.update_lecam(*means)
            for k, v in d.items():
                sums["d_" + k] += v.detach().float() / self.args.accum
        clip = self.args.grad_clip if self.args.grad_clip > 0 else float("inf")
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip)):
            self.optimizer.step()
        else:
            skips["non-finite discriminator step"] += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def state_dict(self):
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "config": self.net.config}

    def load_state_dict(self, state):
        self.net.load_state_dict(state["model"])
        load_optimizer(self.optimizer, self.scheduler, state["optimizer"], state["scheduler"])


# ----------------------------------------------------------------------------------------------------------
# The run: setup, one optimisation step, logging, checkpoints
# ----------------------------------------------------------------------------------------------------------

class Run:
    """What the training loop shares: the models, optimizers, data and counters of one process."""

    def __init__(self, args, rank, world, device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.step, self.skips, self.sums, self.seen, self.n_steps, self.bad_in_a_row = 0, Counter(), Counter(), 0, 0, 0
        self.bar, self.log_file, self.scale_images, self.t_log = None, os.path.join(args.out, "log.txt"), None, 0.0
        self.metrics = self.evaluation = None       # rank 0's MetricsLog and TrainingEval, once the step is known
        self.watch = SpikeWatch(args.spike_factor, args.spike_steps)   # restore() replaces it on a resume
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)   # setup_run enables it for fp16
        # set by main, section by section: frozen, config, objective, ema, params, optimizer, scheduler, disc,
        # loader, model

    def say(self, msg):
        """Rank 0: print (above the progress bar, if any) and append to out/log.txt."""
        if self.rank == 0:
            (self.bar.write if self.bar is not None else print)(msg)
            with open(self.log_file, "a") as f:
                f.write(msg + "\n")


class MetricsLog:
    """Rank 0's OUT/metrics.jsonl (one JSON object per logged step) and, with --tensorboard, OUT/tensorboard/.

    A resumed run first drops the records past its checkpoint's step (logged by the killed process after its last
    save): they are logged again, so every step appears once across resumes.
    """

    def __init__(self, out, step, tensorboard, name="metrics.jsonl"):
        self.path = os.path.join(out, name)
        kept = []
        if os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:              # a line cut by the kill
                        continue
                    if isinstance(record, dict) and record.get("step", step + 1) <= step:
                        kept.append(line if line.endswith("\n") else line + "\n")
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)
        self.writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=step + 1) if tensorboard else None

    def write(self, record):
        """Append one record {step, ...}; scalars also go to TensorBoard."""
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, record["step"])
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()


class SpikeWatch:
    """A loss far above its best for many steps: a run that diverged, reported in the log and the checkpoint.

    Fed the watched loss's mean at every log line. An episode starts when the mean exceeds `factor` x the best mean
    before it and ends when it falls back under that; one lasting `steps` steps or more is recorded (a brief spike
    that recovers is not). An episode still open at the end of training is a spike the run never recovered from.
    """

    def __init__(self, factor, steps, state=None):
        self.factor, self.steps = factor, steps
        self.best = self.best_step = self.start = self.peak = None   # start, peak: of the excursion under way
        self.last_step, self.episodes = 0, []   # episodes: {"start", "end" (None: open), "best", "best_step", "peak"}
        if state:
            for k in ("best", "best_step", "start", "peak", "last_step"):
                setattr(self, k, state[k])
            self.episodes = [dict(e) for e in state["episodes"]]

    def state_dict(self):
        keys = ("best", "best_step", "start", "peak", "last_step")
        return {**{k: getattr(self, k) for k in keys}, "episodes": [dict(e) for e in self.episodes]}

    def update(self, step, value):
        """The mean over the steps since the last call -> a line to log when an episode is recorded or ends."""
        since, self.last_step = self.last_step, step
        if not self.factor:
            return None
        above = not math.isfinite(value) or (self.best is not None and value > self.factor * self.best)
        open_ = self.episodes[-1] if self.episodes and self.episodes[-1]["end"] is None else None
        if not above:
            self.start = self.peak = None
            if self.best is None or value < self.best:
                self.best, self.best_step = value, step
            if open_ is None:
                return None
            open_["end"] = step
            return (f"step {step}: the loss is back under {self.factor:g}x its best ({value:.4g}; the spike lasted "
                    f"steps {open_['start']}-{step})")
        self.start = since if self.start is None else self.start
        if math.isfinite(value):                                  # a non-finite mean: above, not a peak
            self.peak = value if self.peak is None else max(self.peak, value)
        if open_ is not None:
            open_["peak"] = self.peak
        elif step - self.start >= self.steps:
            self.episodes.append({"start": self.start, "end": None, "best": self.best, "best_step": self.best_step,
                                  "peak": self.peak})
            return (f"step {step}: warning: the loss has been above {self.factor:g}x its best for {step - self.start} "
                    f"steps ({value:.4g} against {_num(self.best)} at step {self.best_step}): the run diverged at "
                    f"step {self.start}; a result of this run is not the recipe's (lower --lr, raise --warmup, or "
                    f"resume from a checkpoint before step {self.start})")
        return None

    def diverged(self):
        """The recorded episodes -> a one-line summary, or None when there were none."""
        if not self.episodes:
            return None
        return "; ".join(f"steps {e['start']}-{e['end'] if e['end'] is not None else 'end (never recovered)'}: "
                         f"peak {_num(e['peak'])} against a best of {_num(e['best'])}" for e in self.episodes)


def _num(x):
    """A logged loss value, or 'non-finite' for None."""
    return "non-finite" if x is None else f"{x:.4g}"


def stop_signals():
    """The signals that checkpoint and stop a run: SIGTERM, SIGINT and, where the platform has it, SIGUSR1."""
    return [getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name)]


def setup_distributed():
    """(rank, world, local_rank, device) from torchrun's environment; NCCL on GPU, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        use_cuda(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return rank, world, local, device


def fill_defaults(args, world, device=torch.device("cpu")):
    """Stage defaults for unset flags, and the batch arithmetic: global = micro-batch x GPUs x accumulation."""
    for k, v in STAGES[args.stage].defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.w_kl is None:
        args.w_kl = projector.KL_TERMS[args.kl][1]
    for k in ("random_crop", "flip", "size_filter", "w_perceptual", "w_gan", "gan_start"):   # tokenizer-only knobs
        setattr(args, k, getattr(args, k) or type(TokenizerStage.defaults[k])())
    if args.batch_size is None:
        if args.global_batch % world:
            raise UserError(f"--global-batch {args.global_batch} is not divisible by the world size {world}")
        per_process = args.global_batch // world
        cap = min(STAGES[args.stage].micro_batch or per_process, per_process)
        # the largest micro-batch up to the stage's that divides the process's share (8 -> 8, 4096 -> 128)
        args.batch_size = max(d for d in range(1, cap + 1) if per_process % d == 0)
    if args.global_batch % (args.batch_size * world):
        raise UserError(f"--global-batch {args.global_batch} is not a multiple of --batch-size {args.batch_size} "
                        f"x {world} processes")
    args.accum = args.global_batch // (args.batch_size * world)
    if args.precision is None:
        args.precision = default_precision(device)


def check_output_folder(out, resume):
    """Prove out/ (created and locked by RunLock) is writable; refuse to overwrite a run unless resuming."""
    try:
        probe = os.path.join(out, f".write_test.{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out {out} is not writable ({e.strerror})") from None
    last = os.path.join(out, "last.pt")
    if os.path.isdir(last) and not os.path.islink(last):  # no file can replace it: say so now, not at the first save
        raise UserError(f"{last} is a folder: every checkpoint is written there; move it away")
    if not resume and run_checkpoints(out):
        raise UserError(f"{out} already holds a run ({os.path.basename(run_checkpoints(out)[0])}): pass --resume to "
                        f"continue it, or another --out")
    for partial in glob.glob(os.path.join(out, "*.tmp")) + glob.glob(os.path.join(out, "*.last")):
        os.remove(partial)                     # left by a kill during a checkpoint write: name.pt.PID.tmp / .last


def os_lock(fd, wait):
    """Hold the OS lock (flock) of an open file -> True, False (another process holds it) or None (no OS lock
    here: Windows, or a network filesystem without lock support; the pid decides then)."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return True
    except BlockingIOError:
        return False
    except OSError:                            # ENOLCK and the like
        return None


def process_running(pid):
    """Whether process `pid` of this host is alive (a stale lock's test where there is no OS lock)."""
    if os.name == "nt":                        # os.kill(pid, 0) would terminate the process on Windows
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x100000, False, pid)                   # SYNCHRONIZE
        if not handle:
            return ctypes.get_last_error() == 5                                # ERROR_ACCESS_DENIED: it exists
        try:
            return kernel32.WaitForSingleObject(handle, 0) == 0x102            # WAIT_TIMEOUT: still running
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                    # another user's process
        return True
    return True


def same_file(fd, path):
    """Whether `path` still names the file open as `fd` (not deleted or replaced meanwhile)."""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class RunLock:
    """One writer per run folder: out/.lock, created atomically (O_EXCL: also on NFS and Windows), names the
    trainer's pid, host and start time, and is flocked where the OS can. Rank 0 holds it from before anything in
    out/ is touched until it leaves by any path; a lock whose process ended on this host is taken over."""

    def __init__(self, out):
        self.out, self.path, self.fd, self.note = out, os.path.join(out, ".lock"), None, None
        self.me = dict(pid=os.getpid(), host=socket.gethostname(), since=time.strftime("%Y-%m-%d %H:%M:%S %z"))

    def __enter__(self):
        try:
            os.makedirs(self.out, exist_ok=True)
            for _ in range(5):                 # a holder that leaves while we look: look again
                if self.create() or self.take_over_if_stale():
                    return self
        except OSError as e:
            raise UserError(f"--out {self.out} is not writable ({e.strerror})") from None
        raise UserError(f"{self.out}: {self.path} keeps changing hands; is another trainer starting there?")

    def __exit__(self, *exc):
        ours = same_file(self.fd, self.path)   # a lock deleted by hand and taken by another trainer is theirs
        if ours and os.name != "nt":           # POSIX: unlink while still flocked, so nobody takes it in between
            os.remove(self.path)
        os.close(self.fd)
        if ours and os.name == "nt":           # Windows cannot delete an open file
            with contextlib.suppress(OSError):
                os.remove(self.path)

    def create(self):
        """Create the lock file -> True, or False when it exists."""
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        except FileExistsError:
            return False
        os_lock(self.fd, wait=True)            # waits only for a contender reading the still empty file
        self.write()
        return True

    def take_over_if_stale(self):
        """An existing lock: take it over when its process ended on this host (True), look again when it went
        away meanwhile (False); otherwise stop with who holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            locked = os_lock(fd, wait=False)
            holder = json.loads(os.read(fd, 4096) or b"null")
        except ValueError:
            holder = None
        if not isinstance(holder, dict) or type(holder.get("pid")) is not int or not {"host", "since"} <= set(holder):
            os.close(fd)
            raise UserError(f"{self.out} is locked by {self.path}, which names no trainer; if none uses {self.out}, "
                            f"delete {self.path}")
        who = f"pid {holder['pid']} on host {holder['host']} since {holder['since']}"
        here = holder["host"] == self.me["host"]
        if not here or locked is False or (locked is None and process_running(int(holder["pid"]))):
            os.close(fd)
            raise UserError(f"{self.out} is in use by {who}; " + (
                "wait for it to end or stop it, or train into another --out" if here else
                f"if no trainer runs there any more, delete {self.path} and start again"))
        if not same_file(fd, self.path):       # released and recreated meanwhile
            os.close(fd)
            return False
        self.fd, self.note = fd, f"warning: took over the lock of {self.out} from {who} (that process has ended)"
        self.write()
        return True

    def write(self):
        """Put this process's pid, host and start time into the lock file."""
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        os.write(self.fd, json.dumps(self.me).encode() + b"\n")
        os.fsync(self.fd)


def run_checkpoints(out):
    """The checkpoints of the run in out/, the one to resume first: last.pt, then step files newest first."""
    steps = sorted(glob.glob(os.path.join(out, "step_*.pt")), reverse=True)
    return [p for p in [os.path.join(out, "last.pt")] if os.path.exists(p)] + steps


def choose_checkpoint(args, say=print):
    """The checkpoint --resume continues (None for a new run), checked against this run's fixed arguments.

    A missing or unreadable last.pt (a crash mid-copy, a full disk, a hand-deleted file) falls back to the newest
    readable step file, and says so: a run with checkpoints on disk never restarts from step 0 by itself.
    """
    candidates = run_checkpoints(args.out) if args.resume else []
    ckpt, failed = None, []
    for path in candidates:
        try:
            ckpt = load_checkpoint(path)
            break
        except UserError as e:
            failed.append(f"{os.path.basename(path)} ({one_line(e)})")
    if candidates and ckpt is None:
        raise UserError(f"--resume: no readable checkpoint in {args.out}: " + "; ".join(failed))
    if ckpt is None:
        return None
    if failed or os.path.basename(ckpt["path"]) != "last.pt":
        say(f"warning: resuming from {ckpt['path']}" + (f"; unreadable: {', '.join(failed)}" if failed else
                                                          " (no last.pt)"))
    check_resume_args(ckpt, args, say)
    return ckpt


def check_resume_args(ckpt, args, say):
    """Refuse a changed fixed flag by name; put the run's own values back into the kept ones (and say so)."""
    changed = [f"--{k.replace('_', '-')} (run: {ckpt['args'].get(k)!r}, now: {getattr(args, k)!r})"
               for k in RESUME_FIXED if k in ckpt["args"] and ckpt["args"][k] != getattr(args, k)]
    if changed:
        raise UserError("cannot resume with different " + ", ".join(changed))
    unrecorded = [f"--{k.replace('_', '-')} {getattr(args, k)!r}" for k in RESUME_FIXED if k not in ckpt["args"]]
    if unrecorded:                             # a run made by an older version, before these flags existed
        say(f"note: the run records no {', '.join(unrecorded)} (made before these flags existed): resuming with "
            f"these values")
    for k in RESUME_KEPT:                      # only a run's start uses them: the record must keep saying what it did
        if ckpt["args"].get(k) != getattr(args, k):
            say(f"note: --{k.replace('_', '-')} {getattr(args, k)!r} is not used by a resume; the run started with "
                f"{ckpt['args'].get(k)!r}")
            setattr(args, k, ckpt["args"].get(k))


def resume_checkpoint(args, rank=0, world=1, say=print, lock=None):
    """The checkpoint every rank continues (None for a new run): rank 0 alone decides, every rank reads that file."""
    choice, ckpt = None, None
    if rank == 0:                              # one decision: a rank deciding alone could start at step 0
        try:
            ckpt = choose_checkpoint(args, say)
            choice = dict(name=ckpt and os.path.basename(ckpt["path"]), step=ckpt and ckpt["step"],
                          size=ckpt and os.path.getsize(ckpt["path"]), lock=lock and lock.me)
        except UserError as e:
            choice = dict(error=one_line(e))
    choice = broadcast(choice, world)
    if "error" in choice:                      # the same error on every rank, raised at the same point
        raise UserError(choice["error"])
    if world == 1:
        return ckpt
    problem = None
    try:
        ckpt = ckpt if rank == 0 else read_rank0s_choice(args, rank, choice)
    except UserError as e:
        problem = one_line(e)
    agree(problem, world)                      # a rank that cannot follow rank 0 stops them all
    return ckpt


def read_rank0s_choice(args, rank, choice):
    """(rank > 0) The checkpoint rank 0 resumes, read from this rank's --out, or None; a UserError when this rank's
    --out is not the folder rank 0 sees (a node-local disk): its lock file, or the checkpoint's size and step."""
    if choice["name"] is None:                 # a new run: the lock that rank 0 holds must be visible here
        path = os.path.join(args.out, ".lock")
        if not sees(path, choice["lock"]):
            raise UserError(f"rank {rank} does not see the lock file {path} that rank 0 holds: {SHARED}")
        return None
    path = os.path.join(args.out, choice["name"])
    size = os.path.getsize(path) if os.path.isfile(path) else None
    if size != choice["size"]:
        seen = "" if size is None else f" ({size} bytes here, {choice['size']} bytes on rank 0)"
        raise UserError(f"rank {rank} cannot read {path} that rank 0 resumes from{seen}: {SHARED}")
    ckpt = load_checkpoint(path)
    if ckpt["step"] != choice["step"]:
        raise UserError(f"rank {rank} reads step {ckpt['step']} from {path}, rank 0 step {choice['step']}: {SHARED}")
    check_resume_args(ckpt, args, say=lambda msg: None)     # rank 0 said it; the kept flags must change here too
    return ckpt


def sees(path, content):
    """Whether the JSON file `path` holds `content`: five tries a second apart, for network filesystem caches."""
    for turn in range(5):
        if read_json(path) == content:
            return True
        time.sleep(1)
    return False


def read_json(path):
    """A small JSON file's content, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def load_optimizer(optimizer, scheduler, state, schedule_state):
    """Load AdamW's moments and the schedule's position from a checkpoint, keeping this command's settings (lr,
    weight decay, betas): a changed --lr is applied, not recorded in the checkpoint while the old one runs on."""
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    scheduler.load_state_dict(schedule_state)
    for group, mine, factor in zip(optimizer.param_groups, settings, scheduler.lr_lambdas):
        group.update(mine)
        group["lr"] = group["initial_lr"] * factor(scheduler.last_epoch)     # the schedule (new args) at this step
    scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]


def applied_changes(ckpt, args):
    """The RESUME_APPLIED flags that differ from the run's -> "--lr 0.001 -> 0.0001" phrases."""
    return [f"--{k.replace('_', '-')} {ckpt['args'].get(k)} -> {getattr(args, k)}"
            for k in RESUME_APPLIED if ckpt["args"].get(k) != getattr(args, k)]


def build_data(args, rank, world, device):
    """-> (source, loader) of --data for this rank."""
    source = open_data(args, random_crop=args.random_crop, flip=args.flip, size_filter=args.size_filter)
    loader = data.make_loader(source, args.batch_size, seed=args.seed, rank=rank, world=world,
                              noise_dim=sum(STAGES[args.stage].noise.values()), num_workers=args.num_workers,
                              pin_memory=device.type == "cuda")
    return source, loader


def check_cache_identity(source, frozen, config, args, rank):
    """A `cache:` source must come from this run's tokenizer and CLIP weights (pretokenize records their hashes):
    another encoder's features would train the flow on latents that its tokenizer never decodes, silently."""
    if not isinstance(source, data.CacheSource):
        return
    if source.identity is None:
        if rank == 0:
            print(f"warning: --data {args.data} records no tokenizer or CLIP identity (made before caches recorded "
                  f"it): nothing checks that it matches this run's; pre-tokenise again to get the check",
                  file=sys.stderr)
        return
    ours = {}
    if "posterior" in source.keys and frozen.get("tokenizer") is not None:
        ours["tokenizer"] = (weights_sha256(frozen["tokenizer"]), f"--tokenizer {args.tokenizer}")
    if "clip" in source.keys and frozen.get("clip") is not None:
        ours["clip"] = (weights_sha256(frozen["clip"]), f"CLIP {config['clip']['weights']}")
    differ = [f"{name} {short_hash(source.identity.get(name))} in the cache vs {short_hash(mine)} of {what}"
              for name, (mine, what) in ours.items() if source.identity.get(name) != mine]
    if differ:
        raise UserError(f"--data {args.data} was pre-tokenised with other weights ({'; '.join(differ)}): pre-tokenise "
                        f"again with this run's (python data.py pretokenize --tokenizer {args.tokenizer} ...), or "
                        f"train with the tokenizer and CLIP the cache was made with")


def check_same_data(source, args, rank, world):
    """Stop every rank when this rank sees another --data than rank 0 (a node-local copy that is incomplete)."""
    size = len(source) if hasattr(source, "__len__") else len(getattr(source, "shards", []))
    ref = broadcast(size, world)
    agree(f"rank {rank} sees {size} {'samples' if hasattr(source, '__len__') else 'shards'} in --data {args.data}, "
          f"rank 0 sees {ref}: every node must see the same data" if size != ref else None, world)


def restore(run, ckpt):
    """Continue from a checkpoint: weights, EMA, optimizer, schedule, discriminator, data position, RNG."""
    for name, m in run.objective.parts.items():
        m.load_state_dict(ckpt["model"][name])
        run.ema[name].load_state_dict(ckpt["ema"][name])
    load_optimizer(run.optimizer, run.scheduler, ckpt["optimizer"], ckpt["scheduler"])
    if run.disc is not None and "discriminator" in ckpt:
        run.disc.load_state_dict(ckpt["discriminator"])
    if run.scaler.is_enabled() and "grad_scaler" in ckpt:
        run.scaler.load_state_dict(ckpt["grad_scaler"])
    run.step = ckpt["step"]
    mine = min(run.rank, len(ckpt["rng"]) - 1)     # a tar stream insists on the same world size (data.py)
    try:
        run.loader.load_state_dict(ckpt["data_state"][mine])
    except ValueError as e:                    # a tar stream continues exactly only with the same GPUs and workers
        raise UserError(f"--resume: {e}") from None
    run.skips = Counter(ckpt["stats"]["skips"][mine]) if run.rank < len(ckpt["rng"]) else Counter()
    if "spikes" in ckpt["stats"]:               # runs saved before the watch existed start it afresh
        run.watch = SpikeWatch(run.args.spike_factor, run.args.spike_steps, ckpt["stats"]["spikes"])
    set_rng_state(ckpt["rng"][mine])
    run.say(f"resumed {run.args.out} at step {run.step}")
    if applied_changes(ckpt, run.args):
        run.say(f"changed from step {run.step} on: {', '.join(applied_changes(ckpt, run.args))}")


def batch_note(args, world):
    """How this run's per-micro-batch loss terms differ from the official run's (128 per process), or None."""
    micro, official = args.batch_size, OFFICIAL_MICRO_BATCH
    if STAGES[args.stage].micro_batch is None:
        return None
    terms = []
    if args.stage == "flow" and args.w_kl and args.kl == "official" and micro != official:
        terms.append(f"the official KL term is summed over the micro-batch: {micro}/{official} = "
                     f"{micro / official:.4g}x the official weight relative to the flow loss")
    ranked = micro * world if args.gather_negatives and world > 1 else micro
    if args.stage == "flow" and args.w_con and ranked != official:
        terms.append(f"the contrastive softmax ranks each sample among {ranked} (official {official})")
    if args.cfg_prob and micro != official:
        terms.append(f"the CFG shuffle (a micro-batch with one null draw trains none) leaves "
                     f"{flow_dit.expected_null_fraction(micro, args.cfg_prob):.1%} of samples unconditional (official "
                     f"{flow_dit.expected_null_fraction(official, args.cfg_prob):.1%})")
    if not terms:
        return None
    return (f"note: micro-batch {micro} per process, the official run's is {official} (4096 = 32 processes x "
            f"{official}; --batch-size sets it): " + "; ".join(terms))


def describe(run, source, params):
    """The run's first log lines: sizes, data, batch arithmetic, losses."""
    args, parts = run.args, run.objective.parts
    run.say(f"stage {args.stage}: {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters "
            f"({', '.join(parts)}); data {args.data} ({len(source) if hasattr(source, '__len__') else 'streamed'} "
            f"samples); global batch {args.global_batch} = {args.batch_size} x {run.world} GPUs x {args.accum} "
            f"accumulation; {args.precision}; {run.device}")
    if batch_note(args, run.world):
        run.say(batch_note(args, run.world))
    if args.stage == "tokenizer":
        disc = run.disc.net if run.disc is not None else None
        run.say(f"losses: mse + {args.w_kl:g} kl"
                + (f" + {args.w_perceptual:g} perceptual" if run.objective.helpers["perceptual"] is not None else "")
                + (f" + {args.w_gan:g}{' adaptive' if args.adaptive_gan else ''} gan from step {args.gan_start} "
                   f"(PatchGAN {sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M, LeCAM {args.w_lecam:g})"
                   if disc is not None else "") + f"; random crop {args.random_crop}, flip {args.flip}")
    if args.clip_weights == "random":
        run.say("note: the CLIP text tower is randomly initialised (untrained): it hashes captions into features, "
                "it does not understand them")
    if getattr(source, "skipped", None):
        run.say(f"skipped while indexing {args.data}: {data.format_skips(source.skipped)}")
    if run.loader.num_workers < args.num_workers:    # a tar source with fewer shards than ranks x workers
        run.say(f"note: {len(source.shards)} shards feed {run.loader.num_workers} DataLoader workers per rank, "
                f"not --num-workers {args.num_workers} (each worker reads shards of its own)")


def train_step(run, batches):
    """One optimisation step: accumulate the micro-batches, clip, update (skipped if non-finite), EMA, schedule,
    then the discriminator's step on this step's fakes."""
    args, gan_on, fakes = run.args, run.disc is not None and run.step >= run.args.gan_start, []
    run.model.train()
    for micro in range(args.accum):
        batch = next(batches)
        if run.scale_images is None and "image" in batch:        # a fixed batch for the scale estimate
            run.scale_images = batch["image"][:256].to(run.device)
        run.skips.update(batch["skipped"])
        inputs = prepare(batch, run.frozen, args, run.device)
        inputs["gan"] = gan_on
        accumulating = run.world > 1 and micro < args.accum - 1      # sync gradients on the last one only
        with run.model.no_sync() if accumulating else contextlib.nullcontext(), autocast(args, run.device):
            out = run.model(inputs)
        recon = out.pop("recon", None)
        if gan_on:
            fakes.append((inputs["images"], recon))
        run.scaler.scale(out["loss"] / args.accum).backward()    # fp16: scaled; otherwise as is
        run.seen += len(batch["ids"])
        for k, v in out.items():
            run.sums[k] += v.detach().float() / args.accum
    run.scaler.unscale_(run.optimizer)         # fp16: true gradients before clipping (a no-op otherwise)
    gnorm = torch.nn.utils.clip_grad_norm_(run.params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    overflow = run.scaler.is_enabled() and torch.isfinite(out["loss"].detach())
    if torch.isfinite(gnorm):                  # one host sync per step; DDP-averaged, so all ranks agree
        run.scaler.step(run.optimizer)
        update_ema(run.ema, run.objective.parts, ema_decay(run.step, args))
        run.sums["grad_norm"] += gnorm.float()
        run.bad_in_a_row = 0
    elif overflow:                             # fp16 gradients overflowed at this scale: the scaler lowers it
        run.skips["fp16 overflow"] += 1
    else:                                      # a NaN/inf loss or gradient: skip the update, count it
        run.skips["non-finite step"] += 1
        run.bad_in_a_row += 1
        run.say(f"step {run.step}: non-finite loss or gradient (loss {float(out['loss'].detach()):.4g}), "
                f"update skipped")
        if run.bad_in_a_row >= args.max_bad_steps:
            raise UserError(f"{run.bad_in_a_row} non-finite steps in a row at step {run.step}: stopping; the last "
                            f"checkpoint is clean (lower --lr, check the data, or try --precision fp32)")
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    if fakes:
        run.disc.step(fakes, run.sums, run.skips)
    run.step += 1
    run.n_steps += 1


def log_metrics(run):
    """Average the losses since the last log line over steps and ranks; one line with lr, speed and skips."""
    keys = sorted(run.sums)
    vec = torch.stack([run.sums[k].to(run.device) for k in keys] + [torch.tensor(float(run.seen), device=run.device)])
    if run.world > 1:
        dist.all_reduce(vec)
        vec[:-1] /= run.world
    total_skips = sum((Counter(c) for c in gather_objects(dict(run.skips), run.world)), Counter())
    means = {k: v / run.n_steps for k, v in zip(keys, vec[:-1].tolist())}
    lr, speed = run.scheduler.get_last_lr()[0], vec[-1].item() / (time.time() - run.t_log)
    metrics = " ".join(f"{k} {v:.4g}" for k, v in means.items())
    run.say(f"step {run.step}/{run.args.steps} | {metrics} | lr {lr:.3g} | {speed:.1f} samples/s | "
            f"skipped: {data.format_skips(total_skips)}")
    spike = run.watch.update(run.step, means.get(STAGES[run.args.stage].watched, 0.0))  # every rank: same means
    if spike:
        run.say(spike)
    if run.metrics is not None:
        run.metrics.write({"step": run.step, **means, "lr": lr, "samples_per_s": speed, "time": time.time(),
                           "skipped": dict(total_skips)})
    run.sums, run.n_steps, run.t_log, run.seen = Counter(), 0, time.time(), 0


def checkpoint(run):
    """Gather every rank's RNG, data position and skip counts; check the replicas agree; rank 0 writes."""
    args, world = run.args, run.world
    rngs, positions = gather_objects(rng_state(), world), gather_objects(run.loader.state_dict(), world)
    all_skips = gather_objects(dict(run.skips), world)
    disc = run.disc.net if run.disc is not None else None
    sums = gather_objects(weight_checksum(run.objective.parts) + weight_checksum(run.ema)
                          + (weight_checksum(disc) if disc else []), world)
    if any(c != sums[0] for c in sums):        # DDP keeps replicas (and so EMAs) identical; else a bug to stop on
        raise UserError(f"step {run.step}: the ranks' weights differ (checksums {sums}); not saving")
    if world > 1:
        run.say(f"step {run.step}: weights identical on all {world} ranks")
    if run.rank == 0 and args.stage == "tokenizer" and args.scale_factor == "auto" and run.scale_images is not None:
        run.config["tokenizer"]["scale_factor"] = run.ema["tokenizer"].estimate_scale_factor(
            run.scale_images, torch.Generator().manual_seed(0))
        run.say(f"scale factor (1 / std of posterior samples of {len(run.scale_images)} images): "
                f"{run.config['tokenizer']['scale_factor']:.4f}")
    if run.rank == 0:
        state = {"stage": args.stage, "args": vars(args), "config": run.config, "step": run.step,
                 "model": {k: v.state_dict() for k, v in run.objective.parts.items()},
                 "ema": {k: v.state_dict() for k, v in run.ema.items()}, "optimizer": run.optimizer.state_dict(),
                 "scheduler": run.scheduler.state_dict(), "rng": rngs, "data_state": positions,
                 "stats": {"skips": all_skips, "spikes": run.watch.state_dict()}}
        if run.disc is not None:
            state["discriminator"] = run.disc.state_dict()
        if run.scaler.is_enabled():
            state["grad_scaler"] = run.scaler.state_dict()
        run.say(f"saved {save_checkpoint(state, args.out, run.step, args.keep)}")


def any_rank(flag, run):
    """True on every rank when `flag` is true on any (a signal reached one process: all stop together)."""
    if run.world == 1:
        return flag
    t = torch.tensor(float(flag), device=run.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

def main(args):
    """Train (one process of the run): rank 0 locks the run folder before touching it and until it leaves."""
    if args.tensorboard and SummaryWriter is None:     # before anything is created
        raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard); OUT/metrics.jsonl "
                        "holds the same numbers without it")
    rank, world, local, device = setup_distributed()
    try:
        fill_defaults(args, world, device)
        check_eval_args(args)
        with contextlib.ExitStack() as stack:  # a lock rank 0 cannot take stops every rank, not rank 0 alone
            lock = on_every_rank(world, rank, lambda: stack.enter_context(RunLock(args.out)) if rank == 0 else None)
            run, source = setup_run(args, rank, world, local, device, lock)
            return train_loop(run, source)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup_run(args, rank, world, local, device, lock):
    """This process's part of the run, ready to train: the folder checked, the checkpoint rank 0 chose, the models,
    optimizers and data, DDP, the EMA -> (run, data source). Errors of one rank stop every rank (on_every_rank)."""
    on_every_rank(world, rank, lambda: rank == 0 and check_output_folder(args.out, args.resume))
    run = Run(args, rank, world, device)
    if lock is not None and lock.note:
        run.say(lock.note)
    ckpt = resume_checkpoint(args, rank, world, run.say, lock)
    torch.manual_seed(args.seed + rank)            # dropout only: data randomness is per sample
    random.seed(args.seed + rank)

    # models: the stage's trainable parts (one module for DDP), the frozen encoders every rank reads
    parts, run.frozen, run.config = on_every_rank(world, rank, build_stage, args, device, rank)
    if args.grad_checkpointing:
        for sub in (s for m in parts.values() for s in m.modules() if hasattr(s, "grad_checkpointing")):
            sub.grad_checkpointing = True
    # --init: weights from another run (e.g. the previous stage); rank 0 reads them, DDP gives them to the others
    on_every_rank(world, rank, lambda: args.init and not ckpt and rank == 0 and init_weights(parts, args))
    gather = make_gather(world, rank) if args.gather_negatives and world > 1 else None
    run.objective = Objective(parts, args, gather)

    # optimizers: AdamW + warm-up / constant or cosine; the tokenizer stage's perceptual net and PatchGAN
    run.params = [p for p in run.objective.parameters() if p.requires_grad]
    groups = decay_groups(run.objective) if args.stage == "tokenizer" else run.params
    run.optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2),
                                      weight_decay=args.weight_decay, **fused_if_available(device))
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: lr_factor(s, args))
    run.scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")   # fp16's loss scaling
    if run.scaler.is_enabled():     # the scaler skips the updates whose gradients overflow: no schedule mistake
        warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
    run.disc = None
    if args.stage == "tokenizer":                  # perceptual first: construction order keeps the RNG stream
        run.objective.helpers["perceptual"] = build_perceptual(args, device, rank, world, run.say)
        run.disc = Discriminator(args, device, world, local) if args.w_gan > 0 else None
        run.objective.helpers["discriminator"] = run.disc.net if run.disc is not None else None
    source, run.loader = on_every_rank(world, rank, build_data, args, rank, world, device)
    check_same_data(source, args, rank, world)
    on_every_rank(world, rank, check_cache_identity, source, run.frozen, run.config, args, rank)

    # rank 0's weights on every rank (each drew its own random start; --init reached rank 0 only), the EMA a copy
    # of those, then everything from the checkpoint: the same file on every rank
    share_rank0s_weights(run.objective, world)
    run.model = run.objective if world == 1 else nn.parallel.DistributedDataParallel(
        run.objective, device_ids=[local] if device.type == "cuda" else None, broadcast_buffers=False)
    run.ema = copy.deepcopy(run.objective.parts).eval().requires_grad_(False)
    if ckpt:
        restore(run, ckpt)
    if args.compile:
        run.model = torch.compile(run.model)
    describe(run, source, run.params)
    if rank == 0:
        run.metrics = MetricsLog(args.out, run.step, args.tensorboard)
    run.evaluation = TrainingEval(args, rank, world, device, run.step) if args.eval_every else None
    return run, source


def train_loop(run, source):
    """Train until --steps or a signal (SIGTERM, SIGINT, SIGUSR1: checkpoint, then exit 128 + N) -> a summary."""
    args, rank, world, device, evaluation = run.args, run.rank, run.world, run.device, run.evaluation
    stop, handlers = [], {s: signal.signal(s, lambda signum, frame: stop.append(signum)) for s in stop_signals()}
    try:
        fixed = preview_inputs(source, args, device) if rank == 0 and args.sample_every else None
        batches, run.t_log = iter(run.loader), time.time()
        if rank == 0 and sys.stderr.isatty() and not args.no_progress:
            run.bar = tqdm(total=args.steps, initial=run.step, dynamic_ncols=True)
        while run.step < args.steps:
            train_step(run, batches)
            if run.bar is not None:
                run.bar.update(1)
            if run.step % args.log_every == 0 or run.step == args.steps:
                log_metrics(run)
            if fixed is not None and run.step % args.sample_every == 0:
                run.say(f"preview: {write_samples(run.ema, run.frozen, fixed, args, run.step, device)}")
            if evaluation is not None and (run.step % args.eval_every == 0 or run.step == args.steps):
                evaluation(run)
            interrupted = any_rank(bool(stop), run)
            # save: every --ckpt-every steps, at the end, and when a signal arrived
            if run.step % args.ckpt_every == 0 or run.step == args.steps or interrupted:
                checkpoint(run)
            if interrupted:
                run.say(f"stopped by a signal at step {run.step}; continue with --resume")
                break
        if world > 1:
            dist.barrier()                     # nobody leaves while rank 0 still writes the last checkpoint
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
        if run.bar is not None:
            run.bar.close()
        if run.metrics is not None:
            run.metrics.close()
    if rank == 0 and run.watch.diverged() and run.step >= args.steps:
        run.say(f"warning: this run diverged ({run.watch.diverged()}): its numbers are not the recipe's")
    return {"step": run.step, "skips": dict(run.skips), "out": args.out, "stopped": stop[0] if stop else None,
            "spikes": run.watch.episodes}


# ----------------------------------------------------------------------------------------------------------
# FID during training (--eval-every, as the official trainer): the EMA weights through sample.py's generation,
# evaluate.py's FID; every rank generates its share, rank 0 measures. No draw from the training RNG.
# ----------------------------------------------------------------------------------------------------------

class TrainingEval:
    """--eval-every N: FID (and CLIP score with --eval-clip-weights) of the EMA weights every N steps."""

    def __init__(self, args, rank, world, device, step):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.prompts = read_eval_prompts(args)
        self.folder = os.path.join(args.out, "eval", "samples")
        self.history = MetricsLog(args.out, step, False, name="eval.jsonl") if rank == 0 else None
        self.ref = evaluate.load_stats(args.eval_ref) if rank == 0 else None
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
        pipe = sample.FlowTokPipeline(run.frozen["clip"], run.ema["projector"], run.ema["dit"],
                                      run.frozen["tokenizer"], precision=args.precision)
        pipe._identity = f"step {run.step}"                 # records name the step; hashing the weights is not needed
        os.makedirs(self.folder, exist_ok=True)
        sample.generate_folder(pipe, self.prompts, self.folder, 1, args.seed, args.eval_steps, args.eval_cfg,
                               args.batch_size, self.rank, self.world)
        if self.world > 1:
            dist.barrier()                                  # every rank's images are on disk
        record = None
        if self.rank == 0:
            files = [sample.sample_path(self.folder, i, 0) for i in range(len(self.prompts))]
            if self.net is None:
                self.net = evaluate.load_inception(args.eval_inception).to(self.device)
            stats = evaluate.files_stats(files, self.net, device=self.device, name=f"eval at step {run.step}")
            record = {"step": run.step, "fid": evaluate.frechet_distance(self.ref.mu, self.ref.sigma, stats.mu,
                                                                          stats.sigma), "eval_samples": len(files)}
            if args.eval_clip_weights:
                if self.scorer is None:
                    self.scorer = evaluate.load_clip_scorer(args.eval_clip_model, weights=args.eval_clip_weights,
                                                            device=self.device)
                record["clip_score"] = float(evaluate.clip_scores(files, self.prompts, self.scorer,
                                                                  self.device).mean())
            record["eval_seconds"] = time.time() - t0
            self.history.write(record)
            if run.metrics is not None:
                run.metrics.write(record)
            clip = f", CLIP score {record['clip_score']:.2f}" if "clip_score" in record else ""
            run.say(f"eval at step {run.step}: FID {record['fid']:.3f}{clip} ({len(files)} samples vs "
                    f"{self.ref.n or '?'} reference images, {record['eval_seconds']:.0f} s)")
        if self.world > 1:
            dist.barrier()
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
    if args.stage != "flow":
        raise UserError(f"--eval-every: FID during training needs --stage flow (text to image), not {args.stage}")
    missing = [flag for flag, value in (("--eval-prompts", args.eval_prompts), ("--eval-ref", args.eval_ref))
               if not value]
    if missing:
        raise UserError(f"--eval-every needs {' and '.join(missing)} (reference statistics: evaluate.py fid "
                        f"REFERENCE_IMAGES --save-stats ref.npz)")
    if not read_eval_prompts(args):
        raise UserError(f"--eval-prompts {args.eval_prompts}: no prompts")
    evaluate.load_stats(args.eval_ref)                          # a missing or broken file stops here, not later


# ----------------------------------------------------------------------------------------------------------
# Periodic previews (rank 0, EMA weights, a generator of their own: the training RNG is untouched)
# ----------------------------------------------------------------------------------------------------------

def write_lines(path, inputs, outputs):
    """Write "input  ->  output" lines (text previews) -> path."""
    with open(path, "w") as f:
        f.write("\n".join(f"{a}  ->  {b}" for a, b in zip(inputs, outputs)) + "\n")
    return path


@torch.no_grad()
def write_samples(ema, frozen, fixed, args, step, device):
    """The stage's preview under out/samples/: a PNG grid, or captions in a text file."""
    folder = os.path.join(args.out, "samples")
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    return STAGES[args.stage].preview(ema, frozen, fixed, args, os.path.join(folder, f"step_{step:07d}"), generator)


def preview_samples(source, n=8, look=1000):
    """The first n usable samples of a map-style source among its first `look` ([] for a stream)."""
    samples = []
    for i in range(min(look, len(source)) if hasattr(source, "get") else 0):
        try:   # a generator of their own: the previews must not draw from the training RNG (exact resume)
            samples.append(source.get(i, torch.Generator().manual_seed(i)))
        except data.BadSample:             # filtered (--size-filter) or unreadable: the next one
            continue
        if len(samples) == n:
            break
    return samples


def preview_inputs(source, args, device):
    """Fixed inputs for the periodic previews: the first 8 samples of the data (or the prompts file)."""
    prompts = None
    if args.sample_prompts:
        try:
            with open(args.sample_prompts, encoding="utf-8") as f:
                prompts = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:   # missing, a folder, not text
            raise UserError(f"--sample-prompts {args.sample_prompts}: {getattr(e, 'strerror', None) or e.reason}"
                            ) from None
    samples = preview_samples(source)
    captions = [s["caption"] for s in samples]
    fixed = {"prompts": prompts or captions, "captions": captions,
             "ids": projector.tokenize(captions)[0].to(device)}
    if samples and "image" in samples[0]:
        fixed["images"] = torch.stack([s["image"] for s in samples]).to(device)
    return fixed


def stage_defaults_text():
    """The --help epilog: each stage's defaults for the flags left unset."""
    lines = ["defaults per stage (flags left unset):"]
    for name, stage in STAGES.items():
        flags = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in stage.defaults.items() if v is not None)
        lines.append(textwrap.fill(flags, 116, initial_indent=f"  {name:<10}", subsequent_indent=" " * 12))
    return "\n".join(lines) + "\n  (--w-kl of the flow stage: per --kl form, official 0.01, standard 1e-4)"


def scale_factor(text):
    """--scale-factor's argparse type: 'auto', or a finite number > 0 (else one argparse line, exit 2)."""
    return text if text == "auto" else positive_float(text)


def add_tokenizer_loss_args(p):
    """The tokenizer stage's flags: the one-stage TA-TiTok losses (tokenizer.py)."""
    p.add_argument("--w-perceptual", type=non_negative_float, help="perceptual weight (tokenizer default 1.1; 0: off)")
    p.add_argument("--perceptual-weights", default="auto", help="'auto' (torch hub cache, downloading what is "
                   "missing; offline: a warning and the term off), a folder with the three files, or 'none'")
    p.add_argument("--w-gan", type=non_negative_float,
                   help="GAN generator weight (tokenizer default 0.1; 0: no discriminator)")
    p.add_argument("--gan-start", type=non_negative_int,
                   help="step at which the GAN terms start (tokenizer default 200000)")
    p.add_argument("--adaptive-gan", action="store_true", help="scale the GAN term by VQGAN's adaptive weight")
    p.add_argument("--w-lecam", type=non_negative_float, default=0.001, help="LeCAM regularisation weight")
    p.add_argument("--lecam-decay", type=fraction, default=0.999, help="EMA decay of LeCAM's mean logits")
    p.add_argument("--disc-width", type=projector.multiple_of(tokenizer_lib.DISC_GROUPS), default=128,
                   help=f"PatchGAN base channels, a multiple of {tokenizer_lib.DISC_GROUPS} (its GroupNorm groups)")
    p.add_argument("--disc-lr", type=positive_float, help="discriminator learning rate (default: --lr)")


def add_eval_args(p):
    """The flags of FID during training (TrainingEval)."""
    p.add_argument("--eval-every", type=non_negative_int, default=0, help="flow stage: FID of the EMA weights every "
                   "N steps and at the end, as the official trainer (0: off; default: %(default)s)")
    p.add_argument("--eval-prompts", metavar="FILE", help="prompts of the FID samples, one per line")
    p.add_argument("--eval-ref", metavar="STATS.npz", help="reference statistics of images at the training size, "
                   "bilinear to 299 (evaluate.py fid IMAGES --save-stats STATS.npz)")
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


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, epilog=stage_defaults_text(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=list(STAGES), default="flow", help="what to train (defaults per stage below)")
    p.add_argument("--data", default="shapes", help="data spec (see data.py), e.g. jsonl:FILE,root=DIR")
    p.add_argument("--out", required=True, help="run folder (checkpoints, log.txt, samples/)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--init", help="initialise the trained parts from another run's checkpoint (not its optimizer)")
    p.add_argument("--init-from-ema", action="store_true", help="with --init: take the EMA weights")
    p.add_argument("--image-size", type=positive_int, default=256, help="training resolution in pixels")
    p.add_argument("--random-crop", action=argparse.BooleanOptionalAction,
                   help="random square crops (default: on for the tokenizer stage)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="random horizontal flips (default: on for the tokenizer stage)")
    p.add_argument("--size-filter", action=argparse.BooleanOptionalAction, help="skip images with an aspect ratio "
                   "beyond 2 or a longer side below --image-size, TA-TiTok's (default: on for the tokenizer stage)")
    # models
    p.add_argument("--model", choices=list(FLOW_MODELS), default="XL", help="DiT size (flow stages)")
    p.add_argument("--dit-patch-size", type=token_group, default=1, help="group this many latent tokens per DiT token")
    p.add_argument("--tokenizer-preset", choices=list(TOKENIZER_PRESETS), default="bl77-256",
                   help="tokenizer size (stage tokenizer)")
    p.add_argument("--scale-factor", type=scale_factor, default="auto", help="tokenizer stage: the flow-space scale "
                   "recorded in the checkpoint, a number or 'auto' (1 / std of posterior samples, re-estimated at each "
                   "checkpoint)")
    p.add_argument("--tokenizer", help="trained tokenizer for the flow stages: our run/checkpoint or FlowTiTok_*.bin")
    p.add_argument("--text-ae", help="trained text autoencoder (stage text-ae) for stage flow-i2t")
    p.add_argument("--clip-tower", choices=list(CLIP_TOWERS), default=OFFICIAL_CLIP_TOWER,
                   help="the frozen CLIP text tower (tiny and demo: small random towers)")
    p.add_argument("--clip-weights", default="openai", help="'openai' (download), a local open_clip file, or 'random'")
    p.add_argument("--projector-depth", type=positive_int, default=6, help="TextProjector blocks")
    p.add_argument("--projector-heads", type=positive_int, default=8, help="TextProjector (and TextDecoder) heads")
    p.add_argument("--projector-ff", type=positive_int, default=1024, help="TextProjector feed-forward width")
    p.add_argument("--projector-dropout", type=fraction, default=0.1, help="TextProjector (and TextDecoder) dropout")
    p.add_argument("--projector-patch-size", type=token_group, default=1,
                   help="group this many CLIP tokens (CPU speed)")
    p.add_argument("--align-hidden", type=non_negative_int, default=512,
                   help="hidden width of the alignment MLP (official 512)")
    p.add_argument("--decoder-width", type=positive_int, default=768, help="TextDecoder width (text-ae)")
    p.add_argument("--decoder-depth", type=positive_int, default=6, help="TextDecoder blocks (text-ae)")
    p.add_argument("--decoder-ff", type=positive_int, default=3072, help="TextDecoder feed-forward width (text-ae)")
    p.add_argument("--decoder-patch-size", type=token_group, default=1,
                   help="TextDecoder: this many latent tokens per transformer token (CPU speed)")
    p.add_argument("--decoder-vocab", choices=["all", "data"], default="all",
                   help="TextDecoder classes: all 49408 CLIP ids, or only those in the training captions (fast)")
    # objective
    p.add_argument("--w-con", type=non_negative_float, default=1.0, help="contrastive alignment weight (flow)")
    p.add_argument("--kl", choices=list(projector.KL_TERMS), default="official",
                   help="official: the released checkpoints' term (weight 0.01); standard: the paper's (1e-4)")
    p.add_argument("--w-kl", type=non_negative_float, help="KL weight (default: per stage / per --kl form)")
    p.add_argument("--cfg-prob", type=fraction, default=flow_dit.CFG_PROB,
                   help="fraction of samples trained unconditionally")
    p.add_argument("--gather-negatives", action="store_true", help="contrastive negatives from all GPUs")
    p.add_argument("--caption-groups", action="store_true", help="samples with equal captions are all positives")
    add_tokenizer_loss_args(p)
    # optimisation (None: the stage default, see STAGE_DEFAULTS)
    p.add_argument("--steps", type=positive_int, help="optimisation steps")
    p.add_argument("--global-batch", type=positive_int, help="samples per optimisation step over all GPUs")
    p.add_argument("--batch-size", type=positive_int, help="micro-batch per GPU, accumulated up to --global-batch "
                   "(default: flow stages the official 128 or the largest divisor of global / GPUs below it; "
                   "others global / GPUs)")
    p.add_argument("--lr", type=non_negative_float, help="peak learning rate")
    p.add_argument("--min-lr", type=non_negative_float, help="the cosine schedule's floor")
    p.add_argument("--schedule", choices=["constant", "cosine"], help="learning rate after the warm-up")
    p.add_argument("--warmup", type=non_negative_int, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=non_negative_float, help="AdamW weight decay")
    p.add_argument("--beta1", type=fraction, default=0.9, help="AdamW beta1")
    p.add_argument("--beta2", type=fraction, help="AdamW beta2")
    p.add_argument("--ema", type=fraction, help="EMA decay")
    p.add_argument("--grad-clip", type=non_negative_float,
                   help="max gradient norm (0: no clipping; the norm is logged anyway)")
    p.add_argument("--max-bad-steps", type=positive_int, default=5,
                   help="stop after this many non-finite steps in a row")
    p.add_argument("--spike-factor", type=non_negative_float, default=2.0, help="warn when the logged loss stays "
                   "above this many times its best (0: never); recorded in checkpoints as a diverged run")
    p.add_argument("--spike-steps", type=positive_int, default=500,
                   help="... for at least this many steps (a shorter spike that recovers is not reported)")
    # system
    p.add_argument("--precision", choices=PRECISIONS, help="autocast dtype (default: bf16 on GPUs that compute it "
                   "natively, fp16 with a gradient scaler on older ones, fp32 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the objective")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    p.add_argument("--num-workers", type=non_negative_int, default=4, help="DataLoader worker processes per GPU")
    p.add_argument("--seed", type=int, default=1234, help="seed of the data order, noise and initialisation")
    p.add_argument("--log-every", type=positive_int, default=250, help="steps between log lines")
    p.add_argument("--ckpt-every", type=positive_int, default=5000, help="steps between checkpoints")
    p.add_argument("--keep", type=non_negative_int, default=3, help="step checkpoints kept besides last.pt")
    p.add_argument("--sample-every", type=non_negative_int, default=5000,
                   help="preview grid from the EMA model (0: never)")
    p.add_argument("--sample-steps", type=positive_int, default=DEFAULT_STEPS, help="Euler steps of the previews")
    p.add_argument("--cfg", type=finite_float, default=DEFAULT_CFG, help="guidance scale of the previews")
    p.add_argument("--sample-prompts", help="a text file of preview prompts, one per line")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar even on a terminal")
    add_eval_args(p)
    p.add_argument("--tensorboard", action="store_true", help="also write the logged metrics as TensorBoard scalars "
                   "to OUT/tensorboard (needs `pip install tensorboard`; OUT/metrics.jsonl is always written)")
    return p


if __name__ == "__main__":
    sys.exit(run_cli("train.py", main, build_parser().parse_args()))
