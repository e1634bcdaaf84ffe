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

Reading order: the stages (modules owning their models, inputs, loss and preview; the formulas in flow_dit.py,
projector.py, tokenizer.py), schedule and EMA, the step, main. Operations: runtime.py, and after main.

Checkpoints (one schema for every stage; tensors and plain types only, read with weights_only=True):
  {"stage", "args", "config": {part: constructor kwargs, "clip": {...}, "tokenizer"/"text_ae": path},
   "step", "model": {part: state_dict}, "ema": {part: state_dict}, "optimizer", "scheduler",
   "rng": [per-rank RNG states], "data_state": [per-rank loader states], "stats": {"skips", "spikes"},
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
import math
import os
import random
import re
import sys
import textwrap
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
import evaluate
import flow_dit
import projector
import runtime
import sample
import tokenizer as tokenizer_lib
from flow_dit import DEFAULT_CFG, DEFAULT_STEPS, FLOW_MODELS, VELOCITY_NETS
from projector import CLIP_TOWERS, OFFICIAL_CLIP_TOWER, TextDecoder, TextProjector, token_group
from runtime import (PRECISIONS, UserError, amp, finite_float, fraction, non_negative_float, non_negative_int,
                     on_every_rank, positive_float, positive_int, run_cli)
from tokenizer import TOKENIZER_PRESETS, Tokenizer

T = 77 * 16   # elements of one 77x16 latent
OFFICIAL_MICRO_BATCH = 128   # the official flow run's batch per process: 4096 = 32 processes x 128
# What --resume does with each flag of build_parser (runtime.ResumePolicy; test_every_train_flag_has_a_resume_class
# keeps it complete). applied: AdamW's settings and the schedule's peak are replaced, the moments and the schedule's
# position kept; free: numerics up to rounding.
RESUME = runtime.ResumePolicy(
    fixed=("stage", "data", "image_size", "random_crop", "flip", "model", "backbone", "dit_patch_size",
           "tokenizer_preset", "scale_factor", "tokenizer", "text_ae", "clip_tower", "clip_weights", "projector_depth",
           "projector_heads", "projector_ff", "projector_dropout", "projector_patch_size", "align_hidden",
           "decoder_width", "decoder_depth", "decoder_ff", "decoder_patch_size", "decoder_vocab", "w_con", "kl", "w_kl",
           "cfg_prob", "gather_negatives", "caption_groups", "w_perceptual", "perceptual_weights", "w_gan",
           "gan_start", "adaptive_gan", "w_lecam", "lecam_decay", "disc_width", "seed", "size_filter"),
    applied=("steps", "global_batch", "lr", "min_lr", "schedule", "warmup", "weight_decay", "beta1", "beta2", "ema",
             "grad_clip", "disc_lr"),
    kept=("init", "init_from_ema"),
    free=("out", "resume", "batch_size", "num_workers", "precision", "encode_bf16", "compile", "grad_checkpointing",
          "max_bad_steps", "spike_factor", "spike_steps", "log_every", "ckpt_every", "keep", "sample_every",
          "sample_steps", "cfg", "sample_prompts", "no_progress", "tensorboard", "eval_every", "eval_prompts",
          "eval_ref", "eval_samples", "eval_steps", "eval_cfg", "eval_inception", "eval_clip_model",
          "eval_clip_weights"))
# the flags that shape the trained parts: an --init file that does not fit is told by those that differ
SHAPE_FLAGS = ("model", "backbone", "dit_patch_size", "clip_tower", "projector_depth", "projector_heads",
               "projector_ff", "projector_patch_size", "align_hidden", "w_con", "decoder_width", "decoder_depth",
               "decoder_ff", "decoder_patch_size", "decoder_vocab")


# ----------------------------------------------------------------------------------------------------------
# The stages: each owns its trainable parts, the frozen encoders they learn against, its inputs, loss and preview
# ----------------------------------------------------------------------------------------------------------


class Stage(nn.Module):
    """One training stage; forward(inputs) is its loss. The trainable parts are `parts` (this module's only
    parameters, so DDP syncs them and nothing else); frozen encoders and helpers are plain dicts.

    `defaults`: the official (or closest public) recipe, every value one flag away; `noise`: what the per-sample
    noise vector holds (data.py draws it from the sample's stream position); `micro_batch`: the per-process batch
    when --batch-size is not given (None: global batch / processes); `watched`: the logged loss term that
    runtime.SpikeWatch follows; `warmup_offset`: the first update's warm-up factor is offset / warmup.
    """
    defaults, noise, micro_batch, watched, warmup_offset = {}, {}, None, "loss", 1
    disc = None                # the tokenizer stage's PatchGAN (its own optimizer, stepped after the update)
    evaluates = False          # --eval-every (FID of generated images) applies

    def __init__(self, args, parts, frozen, config=None):
        super().__init__()
        self.args, self.gather, self.helpers = args, None, {}  # gather: all ranks' negatives; helpers: frozen nets
        self.parts, self.frozen, self.config = nn.ModuleDict(parts), frozen, config or {}

    @classmethod
    def create(cls, args, device, rank=0):
        """The stage of a run: the frozen CLIP tower, the stage's parts and encoders (build) -> the stage on device."""
        clip, weights = projector.clip_for_run(args.clip_tower, args.clip_weights, args.seed, args.out, rank)
        clip = clip.to(device)
        frozen, config = {"clip": clip}, {"clip": dict(tower=args.clip_tower, weights=weights)}
        parts = cls.build(args, clip, frozen, config, device)
        config.update({name: m.config for name, m in parts.items()})
        return cls(args, {name: m.to(device) for name, m in parts.items()}, frozen, config)

    @staticmethod
    def build(args, clip, frozen, config, device):
        """-> the trainable parts {name: module}; frozen encoders go into `frozen`, their paths into `config`."""
        raise NotImplementedError

    @torch.no_grad()
    def prepare(self, batch, device):
        """A loader batch -> what the loss needs: noise split by name, the frozen encoders applied (no grad)."""
        noise = data.split_noise(batch["noise"].to(device, non_blocking=True), self.noise)
        if "clip" in batch:                                   # pre-tokenised cache: CLIP skipped
            clip = batch["clip"].to(device, non_blocking=True)
        elif self.frozen["clip"] is not None:
            clip = self.frozen["clip"](batch["ids"].to(device, non_blocking=True))
        else:
            clip = None
        return self.inputs(batch, noise, clip, device)

    def inputs(self, batch, noise, clip, device):
        """A loader batch, its noise and CLIP features -> the loss's inputs."""
        raise NotImplementedError

    def forward(self, inputs):
        """The loss -> dict of scalars; "loss" is what backward sees."""
        raise NotImplementedError

    def preview(self, ema, fixed, path, generator):
        """Write a preview of the EMA parts to path + .png / .txt -> the file written."""
        raise NotImplementedError

    def ema_decay(self, step):
        """The EMA decay of update `step` (0-based): --ema from the first update, as FlowTok's trainer
        (train_t2i.py:154, utils.py:122-126); the text stages are ours and follow it."""
        return self.args.ema

    def param_groups(self):
        """AdamW's parameter groups: every trainable parameter decays, as the official FlowTok stages."""
        return [p for p in self.parameters() if p.requires_grad]

    def build_helpers(self, run):
        """Nets the loss uses besides the trained parts, built after the optimizer (the RNG stream's order)."""

    def init_from(self, args):
        """--init: the same parts of another run (any stage that has them), not its optimizer."""
        runtime.init_from_run(self.parts, args, SHAPE_FLAGS)

    def describe_losses(self):
        """A log line on the loss terms beyond the flags' plain values, or None."""

    def on_checkpoint(self, ema, config, say):
        """Rank 0, before a checkpoint is written: update what the checkpoint's config records."""


class TokenizerStage(Stage):
    """The 1D image tokenizer, TA-TiTok's one-stage recipe: L2 + perceptual + KL + PatchGAN with LeCAM."""
    defaults = dict(lr=1e-4, weight_decay=1e-4, beta2=0.999, warmup=10_000, schedule="cosine", min_lr=1e-5,
                    ema=0.999, grad_clip=1.0, w_kl=1e-6, global_batch=256, steps=650_000, w_perceptual=1.1,
                    w_gan=0.1, gan_start=200_000, random_crop=True, flip=True, size_filter=True)
    noise, watched = dict(img=T), "mse"     # the GAN term joins the loss late and moves it by design
    # TA-TiTok's LambdaLR gives the first update lr 0 (1d-tokenizer a5c8922 utils/lr_schedulers.py:56-58: step /
    # warmup from step 0; accelerate ticks it num_processes times per update, warm-up and horizon scaled alike,
    # utils/train_utils.py:248-249); the other stages' first update already moves (FlowTok's own LambdaLR also
    # starts at 0, utils.py:104-106: a one-step shift kept for now)
    warmup_offset = 0

    def __init__(self, args, parts, frozen, config=None):
        super().__init__(args, parts, frozen, config)
        self.w_kl, self.w_perceptual, self.w_gan, self.adaptive_gan = (args.w_kl, args.w_perceptual, args.w_gan,
                                                                       args.adaptive_gan)
        self.scale_images = None             # the first batch's images: the scale-factor estimate at checkpoints

    @staticmethod
    def build(args, clip, frozen, config, device):
        overrides = dict(text_dim=clip.width, image_size=args.image_size)
        if args.scale_factor != "auto":
            overrides["scale_factor"] = float(args.scale_factor)
        tok = Tokenizer.from_preset(args.tokenizer_preset, **overrides)
        if not tok.config["text_guidance"]:
            frozen["clip"] = None              # a decoder without text guidance: no CLIP features to compute
        return {"tokenizer": tok}

    def inputs(self, batch, noise, clip, device):
        images = batch["image"].to(device, non_blocking=True)
        if self.scale_images is None:
            self.scale_images = images[:256]
        return dict(clip=clip, ids=batch["ids"].to(device, non_blocking=True), images=images, eps=noise["img"])

    def forward(self, inputs):
        """The one-stage TA-TiTok objective (tokenizer.tokenizer_loss): MSE + perceptual + KL + GAN generator term."""
        disc = self.disc.net if inputs.get("gan") else None                     # the GAN term from --gan-start on
        return tokenizer_lib.tokenizer_loss(self.parts["tokenizer"], inputs["images"], inputs["eps"], inputs["clip"],
                                            self.w_kl, self.helpers.get("perceptual"), self.w_perceptual, disc,
                                            self.w_gan, self.adaptive_gan)

    def preview(self, ema, fixed, path, generator):
        tok, clip = ema["tokenizer"], self.frozen["clip"]
        mean, _ = tok.encode(fixed["images"])
        recon = tok.decode(mean, clip(fixed["ids"]) if clip is not None else None).clamp(0, 1)
        grid = torch.stack([fixed["images"], recon], 1).flatten(0, 1)         # input, reconstruction, ...
        return sample.save_grid(grid, path + ".png", nrow=8)

    def ema_decay(self, step):
        """TA-TiTok's EMA warm-up (bytedance/1d-tokenizer a5c8922; EMAModel(decay=0.999) at utils/train_utils.py:143,
        stepped per update :514, set_step on resume :359): modeling/modules/ema_model.py:92-107 gives update s + 1
        the decay 0 at s = 0 (the EMA becomes the model), then min(decay, (1 + s) / (10 + s)); short runs so average
        their recent weights, not their random start."""
        return 0.0 if step == 0 else min(self.args.ema, (1 + step) / (10 + step))

    def param_groups(self):
        return tokenizer_lib.decay_groups(self)

    def build_helpers(self, run):
        """The frozen perceptual net (first: construction order keeps the RNG stream), then the PatchGAN."""
        args = self.args
        self.helpers["perceptual"] = tokenizer_lib.perceptual_on_every_rank(
            args.perceptual_weights if args.w_perceptual > 0 else "none", run.device, run.rank, run.world, run.say)
        self.disc = Discriminator(args, run.device, run.world, run.local) if args.w_gan > 0 else None

    def on_checkpoint(self, ema, config, say):
        """--scale-factor auto: 1 / std of posterior samples of the first batch, re-estimated with the EMA weights."""
        if self.args.scale_factor == "auto" and self.scale_images is not None:
            config["tokenizer"]["scale_factor"] = ema["tokenizer"].estimate_scale_factor(
                self.scale_images, torch.Generator().manual_seed(0))
            say(f"scale factor (1 / std of posterior samples of {len(self.scale_images)} images): "
                f"{config['tokenizer']['scale_factor']:.4f}")

    def describe_losses(self):
        args, disc = self.args, self.disc.net if self.disc is not None else None
        return (f"losses: mse + {args.w_kl:g} kl"
                + (f" + {args.w_perceptual:g} perceptual" if self.helpers["perceptual"] is not None else "")
                + (f" + {args.w_gan:g}{' adaptive' if args.adaptive_gan else ''} gan from step {args.gan_start} "
                   f"(PatchGAN {sum(p.numel() for p in disc.parameters()) / 1e6:.2f}M, LeCAM {args.w_lecam:g})"
                   if disc is not None else "") + f"; random crop {args.random_crop}, flip {args.flip}")

    def init_from(self, args):
        """--init: any tokenizer checkpoint, the official FlowTiTok_256/512.bin included (fine-tuning; RoPE tables
        follow this run's image size)."""
        tokenizer_lib.init_tokenizer(self.parts["tokenizer"], args.init, args.init_from_ema, args.tokenizer_preset)


class FlowStage(Stage):
    """Text -> image: DiT + text projector + alignment MLP on a frozen tokenizer and frozen CLIP (flow_dit.py)."""
    defaults = dict(lr=4e-4, weight_decay=0.03, beta2=0.95, warmup=5000, schedule="constant", min_lr=0.0,
                    ema=0.9999, grad_clip=0.0, w_kl=None, global_batch=4096, steps=1_000_000)
    noise = dict(img=T, txt=T, t=1, null=1)
    # the official micro-batch: its KL sum, contrastive negatives and CFG shuffle are per process (FlowTok
    # train_t2i.py:38-39, 4096 / 32 processes, no accumulation); accumulation makes up the global batch
    micro_batch, evaluates = OFFICIAL_MICRO_BATCH, True

    def __init__(self, args, parts, frozen, config=None):
        super().__init__(args, parts, frozen, config)
        self.w_con, self.w_kl, self.kl = args.w_con, args.w_kl, args.kl

    @staticmethod
    def build(args, clip, frozen, config, device):
        dit = FlowStage.build_velocity_net(args, clip, frozen, config, device)
        align = args.align_hidden if args.w_con else 0         # no alignment head without the contrastive term
        return {"dit": dit, "projector": TextProjector(**projector_kwargs(args, clip), align_hidden=align)}

    @staticmethod
    def build_velocity_net(args, clip, frozen, config, device):
        """The frozen tokenizer (into `frozen`) and a fresh velocity network (both flow directions)."""
        if not args.tokenizer:
            raise UserError(f"--stage {args.stage} needs --tokenizer (a tokenizer run or the official .bin)")
        frozen["tokenizer"] = tokenizer_lib.load_frozen_tokenizer(args.tokenizer, args.image_size, config["clip"],
                                                                  clip.width, device)
        config["tokenizer"] = args.tokenizer
        return flow_dit.velocity_net(args.backbone, **FLOW_MODELS[args.model], patch_size=args.dit_patch_size)

    def image_tokens(self, batch, noise, device):
        """Flow-space image tokens (B, 77, 16) of the batch: from the cache's posterior or the frozen encoder."""
        tok = self.frozen["tokenizer"]
        if "posterior" in batch:
            mean, logvar = batch["posterior"].to(device, non_blocking=True).chunk(2, dim=-1)
        else:   # fp32 unless --encode-bf16, whatever --precision: the official trainer encodes in fp32
            with amp(device, "bf16" if self.args.encode_bf16 else "fp32"):
                mean, logvar = tok.encode(batch["image"].to(device, non_blocking=True))
        return tok.flow_tokens(mean, logvar, noise["img"])

    def inputs(self, batch, noise, clip, device):
        t, null = flow_dit.draw_time_and_null(noise["t"], noise["null"], self.args.cfg_prob)
        out = dict(clip=clip, t=t, null=null, x1=self.image_tokens(batch, noise, device), eps=noise["txt"])
        if self.args.caption_groups:
            out["groups"] = projector.caption_groups(batch["ids"].to(device, non_blocking=True))
        return out

    def forward(self, inputs):
        out = flow_dit.flowtok_loss(self.parts["dit"], self.parts["projector"], inputs["clip"], inputs["x1"],
                                    inputs["t"], inputs["null"], inputs["eps"], self.w_con, self.w_kl, self.kl,
                                    inputs.get("groups"), self.gather)
        return dict(loss=out["loss"], diff=out["diff"], contrastive=out["contrastive"], kl=out["kl"],
                    sigma=torch.exp(0.5 * out["logvar"].detach()).mean(), mu=out["mu"].detach().abs().mean())

    def preview(self, ema, fixed, path, generator):
        pipe = sample.FlowTokPipeline(self.frozen["clip"], ema["projector"], ema["dit"], self.frozen["tokenizer"])
        images = pipe.generate(fixed["prompts"], steps=self.args.sample_steps, cfg=self.args.cfg, generator=generator)
        return sample.save_grid(images, path + ".png", nrow=8)

    def batch_terms(self, micro, ranked):
        """How the loss's per-micro-batch terms differ from the official run's (128 per process) -> phrases."""
        official, args, terms = OFFICIAL_MICRO_BATCH, self.args, []
        if args.w_kl and args.kl == "official" and micro != official:
            terms.append(f"the official KL term is summed over the micro-batch: {micro}/{official} = "
                         f"{micro / official:.4g}x the official weight relative to the flow loss")
        if args.w_con and ranked != official:
            terms.append(f"the contrastive softmax ranks each sample among {ranked} (official {official})")
        return terms


class TextAEStage(Stage):
    """The text autoencoder of image-to-text: text projector + TextDecoder (token cross-entropy + KL)."""
    defaults = dict(lr=2e-4, weight_decay=0.03, beta2=0.95, warmup=2000, schedule="constant", min_lr=0.0,
                    ema=0.999, grad_clip=1.0, w_kl=1e-4, global_batch=1024, steps=100_000)
    noise = dict(txt=T)

    def __init__(self, args, parts, frozen, config=None):
        super().__init__(args, parts, frozen, config)
        self.w_kl = args.w_kl

    @staticmethod
    def build(args, clip, frozen, config, device):
        proj = TextProjector(**projector_kwargs(args, clip), align_hidden=0)      # built first: the RNG order
        vocab = data.caption_vocabulary(data.open_dataset(args.data, args.image_size), args.data) \
            if args.decoder_vocab == "data" else None
        decoder = TextDecoder(width=args.decoder_width, depth=args.decoder_depth, heads=args.projector_heads,
                              d_ff=args.decoder_ff, dropout=args.projector_dropout, vocab_ids=vocab,
                              patch_size=args.decoder_patch_size)
        return {"projector": proj, "text_decoder": decoder}

    def inputs(self, batch, noise, clip, device):
        return dict(clip=clip, ids=batch["ids"].to(device, non_blocking=True), eps=noise["txt"])

    def forward(self, inputs):
        return projector.text_ae_loss(self.parts["projector"], self.parts["text_decoder"], inputs["clip"],
                                      inputs["ids"], inputs["eps"], self.w_kl)

    def preview(self, ema, fixed, path, generator):
        _, mu, _ = ema["projector"](self.frozen["clip"](fixed["ids"]))          # decode the mean latent
        captions = projector.detokenize(ema["text_decoder"].decode(mu))
        return sample.write_lines(path + ".txt", fixed["captions"], captions)


class FlowI2TStage(FlowStage):
    """Image -> text: the same DiT and flow, from image tokens to the frozen text autoencoder's latents."""
    defaults, evaluates = dict(FlowStage.defaults, w_kl=0.0, steps=200_000), False

    @staticmethod
    def build(args, clip, frozen, config, device):
        if not args.text_ae:
            raise UserError("--stage flow-i2t needs --text-ae (a text-ae run)")
        dit = FlowStage.build_velocity_net(args, clip, frozen, config, device)
        try:
            text_ae, decoder = sample.load_text_ae(args.text_ae)
        except UserError as e:
            raise UserError(e if str(e).startswith("--text-ae") else f"--text-ae: {e}") from None
        frozen["text_ae"], frozen["text_decoder"] = text_ae.to(device), decoder.to(device)
        config["text_ae"] = args.text_ae
        return {"dit": dit}

    def inputs(self, batch, noise, clip, device):
        t, null = flow_dit.draw_time_and_null(noise["t"], noise["null"], self.args.cfg_prob)
        text_latent, _, _ = self.frozen["text_ae"](clip, noise["txt"])
        return dict(t=t, null=null, x0=self.image_tokens(batch, noise, device), x1=text_latent)

    def forward(self, inputs):
        out = flow_dit.flow_loss(self.parts["dit"], inputs["x0"], inputs["x1"], inputs["t"], inputs["null"])
        return dict(loss=out["diff"], diff=out["diff"])

    def preview(self, ema, fixed, path, generator):
        pipe = sample.FlowTokPipeline(self.frozen["clip"], None, None, self.frozen["tokenizer"], i2t_dit=ema["dit"],
                                      text_decoder=self.frozen["text_decoder"])
        caps = pipe.caption(fixed["images"], steps=self.args.sample_steps, cfg=self.args.cfg, generator=generator)
        return sample.write_lines(path + ".txt", fixed["captions"], caps)

    def batch_terms(self, micro, ranked):
        return []                           # no KL, no contrastive term: only the CFG shuffle differs


STAGES = {"tokenizer": TokenizerStage, "flow": FlowStage, "text-ae": TextAEStage, "flow-i2t": FlowI2TStage}


# ----------------------------------------------------------------------------------------------------------
# Optimisation: the schedule, the EMA, AdamW's groups, the tokenizer stage's discriminator
# ----------------------------------------------------------------------------------------------------------

def lr_factor(step, args, steps=None):
    """Linear warm-up over args.warmup steps, then constant or cosine; update `step` (0-based) uses this factor."""
    if step < args.warmup:
        return (step + STAGES[args.stage].warmup_offset) / args.warmup
    if args.schedule == "constant":
        return 1.0
    progress = min((step - args.warmup) / max((steps or args.steps) - args.warmup, 1), 1.0)
    floor = args.min_lr / args.lr if args.lr else 0.0            # --lr 0: a run that must not move
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


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
    """The tokenizer stage's PatchGAN with its own AdamW and schedule: warm-up and cosine over TA-TiTok's horizon,
    stepped after the tokenizer's update from --gan-start on (hinge + LeCAM, tokenizer.py)."""

    def __init__(self, args, device, world, local):
        self.args = args
        self.net = tokenizer_lib.PatchDiscriminator(args.disc_width, lecam_decay=args.lecam_decay).to(device)
        self.optimizer = torch.optim.AdamW(tokenizer_lib.decay_groups(self.net), lr=args.disc_lr or args.lr,
                                           betas=(args.beta1, args.beta2), weight_decay=args.weight_decay,
                                           **runtime.fused_if_available(device))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(          # TA-TiTok's horizon (disc_horizon)
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
        runtime.load_optimizer(self.optimizer, self.scheduler, state["optimizer"], state["scheduler"])


# ----------------------------------------------------------------------------------------------------------
# The step: forward and backward over the micro-batches, then the update
# ----------------------------------------------------------------------------------------------------------

def forward_backward(run, batches):
    """The step's losses and gradients: each micro-batch's inputs (frozen encoders applied), the stage's loss, its
    backward, accumulated up to the global batch -> (the discriminator's fakes, the last micro-batch's loss)."""
    args, stage = run.args, run.stage
    gan_on, fakes = stage.disc is not None and run.step >= args.gan_start, []
    run.model.train()
    for micro in range(args.accum):
        batch = next(batches)
        run.skips.update(batch["skipped"])
        inputs = stage.prepare(batch, run.device)
        inputs["gan"] = gan_on
        accumulating = run.world > 1 and micro < args.accum - 1      # sync gradients on the last one only
        with run.model.no_sync() if accumulating else contextlib.nullcontext(), amp(run.device, args.precision):
            out = run.model(inputs)                                  # the stage's loss (Stage.forward)
        recon = out.pop("recon", None)
        if gan_on:
            fakes.append((inputs["images"], recon))
        run.scaler.scale(out["loss"] / args.accum).backward()    # fp16: scaled; otherwise as is
        run.seen += len(batch["ids"])
        for k, v in out.items():
            run.sums[k] += v.detach().float() / args.accum
    return fakes, out["loss"].detach()


def update(run, fakes, loss):
    """The step's update: clip, AdamW (skipped if non-finite), EMA, schedule; then the discriminator's own step on
    this step's fakes (tokenizer stage, from --gan-start on)."""
    args, stage = run.args, run.stage
    run.scaler.unscale_(run.optimizer)         # fp16: true gradients before clipping (a no-op otherwise)
    gnorm = torch.nn.utils.clip_grad_norm_(run.params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    if torch.isfinite(gnorm):                  # one host sync per step; DDP-averaged, so all ranks agree
        run.scaler.step(run.optimizer)
        update_ema(run.ema, stage.parts, stage.ema_decay(run.step))
        run.sums["grad_norm"] += gnorm.float()
        run.bad_in_a_row = 0
    elif run.scaler.is_enabled() and torch.isfinite(loss):    # fp16 gradients overflowed: the scaler lowers its scale
        run.skips["fp16 overflow"] += 1
    else:                                      # a NaN/inf loss or gradient: skip the update, count it
        run.skips["non-finite step"] += 1
        run.bad_in_a_row += 1
        run.say(f"step {run.step}: non-finite loss or gradient (loss {float(loss):.4g}), update skipped")
        if run.bad_in_a_row >= args.max_bad_steps:
            raise UserError(f"{run.bad_in_a_row} non-finite steps in a row at step {run.step}: stopping; the last "
                            f"checkpoint is clean (lower --lr, check the data, or try --precision fp32)")
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    if fakes:
        stage.disc.step(fakes, run.sums, run.skips)
    run.step += 1
    run.n_steps += 1


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

def main(args):
    """Train one process of the run -> a summary {step, skips, out, stopped, spikes}. Every rank runs this; rank 0
    locks the run folder before touching it and writes every file; an error of one rank stops every rank."""
    if args.tensorboard and runtime.SummaryWriter is None:     # before anything is created
        raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard); OUT/metrics.jsonl "
                        "holds the same numbers without it")
    rank, world, local, device = runtime.setup_distributed()
    try:
        with contextlib.ExitStack() as stack:  # on any exit: the signal handlers, the bar, the logs, rank 0's lock
            # Setup: the stage's defaults, the run folder (rank 0 locks it), the checkpoint to continue (rank 0's)
            fill_defaults(args, world, device)
            lock = on_every_rank(world, rank,
                                 lambda: stack.enter_context(runtime.RunLock(args.out)) if rank == 0 else None)
            on_every_rank(world, rank, lambda: rank == 0 and runtime.check_output_folder(args.out, args.resume))
            run = runtime.Run(args, rank, world, local, device, lock)
            ckpt = runtime.resume_checkpoint(args, RESUME, rank, world, run.say, lock)
            torch.manual_seed(args.seed + rank)            # dropout only: data randomness is per sample
            random.seed(args.seed + rank)

            # Models: trainable parts and frozen encoders; --init (rank 0 reads it, DDP gives it to the others)
            stage = run.stage = on_every_rank(world, rank, STAGES[args.stage].create, args, device, rank)
            for sub in stage.parts.modules() if args.grad_checkpointing else []:   # recompute in backward
                if hasattr(sub, "grad_checkpointing"):
                    sub.grad_checkpointing = True
            on_every_rank(world, rank, lambda: args.init and not ckpt and rank == 0 and stage.init_from(args))
            stage.gather = runtime.make_gather(world, rank) if args.gather_negatives and world > 1 else None

            # Optimizers: AdamW with warm-up, then constant or cosine; fp16's loss scaling; the stage's helper nets
            run.params = [p for p in stage.parameters() if p.requires_grad]
            run.optimizer = torch.optim.AdamW(stage.param_groups(), lr=args.lr, betas=(args.beta1, args.beta2),
                                              weight_decay=args.weight_decay, **runtime.fused_if_available(device))
            run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: lr_factor(s, args))
            run.scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
            if run.scaler.is_enabled():     # it skips the updates whose gradients overflow: no schedule mistake
                warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            stage.build_helpers(run)

            # Data: this rank's share of --data, the same data on every rank, a cache of this run's encoders
            source, run.loader = on_every_rank(world, rank, build_data, args, rank, world, device)
            runtime.same_on_every_rank(*data.extent(source, args.data), rank, world)
            encoders = {"tokenizer": (stage.frozen.get("tokenizer"), f"--tokenizer {args.tokenizer}"),
                        "clip": (stage.frozen.get("clip"), f"CLIP {stage.config['clip']['weights']}")}
            on_every_rank(world, rank, data.check_cache_identity, source, args.data, encoders, rank)

            # Resume: rank 0's weights everywhere, the EMA a copy of them, then the checkpoint's state everywhere
            runtime.share_rank0s_weights(stage, world)
            run.model = stage if world == 1 else nn.parallel.DistributedDataParallel(
                stage, device_ids=[local] if device.type == "cuda" else None, broadcast_buffers=False)
            run.ema = copy.deepcopy(stage.parts).eval().requires_grad_(False)
            if ckpt:
                restore(run, ckpt)
            if args.compile:
                run.model = torch.compile(run.model)
            describe(run, source)
            if rank == 0:
                run.metrics = stack.enter_context(runtime.MetricsLog(args.out, run.step, args.tensorboard))
            evaluation = evaluate.TrainingEval(args, rank, world, device, run.step) if args.eval_every else None
            preview = rank == 0 and args.sample_every
            fixed = sample.preview_inputs(source, args.sample_prompts, device) if preview else None

            # Loop: until --steps or a signal (SIGTERM, SIGINT, SIGUSR1: checkpoint, then exit 128 + N)
            stop = stack.enter_context(runtime.caught_signals())
            if rank == 0 and sys.stderr.isatty() and not args.no_progress:
                run.bar = stack.enter_context(tqdm(total=args.steps, initial=run.step, dynamic_ncols=True))
            batches, run.t_log = iter(run.loader), time.time()
            while run.step < args.steps:
                update(run, *forward_backward(run, batches))    # the loss: Stage.forward, two calls below
                if run.bar is not None:
                    run.bar.update(1)
                # rank 0 writes below; on_every_rank: a write that fails there (a full disk) stops every rank with
                # its line, instead of leaving the others waiting in the next step's all-reduce
                if run.step % args.log_every == 0 or run.step == args.steps:
                    on_every_rank(world, rank, run.log_metrics, stage.watched)
                if args.sample_every and run.step % args.sample_every == 0:
                    on_every_rank(world, rank, lambda: fixed is not None and run.say(
                        f"preview: {write_preview(run, fixed)}"))
                if evaluation is not None and (run.step % args.eval_every == 0 or run.step == args.steps):
                    evaluation(run)
                interrupted = runtime.any_rank(bool(stop), world, device)
                if run.step % args.ckpt_every == 0 or run.step == args.steps or interrupted:
                    on_every_rank(world, rank, checkpoint, run)
                if interrupted:
                    run.say(f"stopped by a signal at step {run.step}; continue with --resume")
                    break
            runtime.barrier(world)             # nobody leaves while rank 0 still writes the last checkpoint
            if run.watch.diverged() and run.step >= args.steps:
                run.say(f"warning: this run diverged ({run.watch.diverged()}): its numbers are not the recipe's")
            return {"step": run.step, "skips": dict(run.skips), "out": args.out, "stopped": stop[0] if stop else None,
                    "spikes": run.watch.episodes}
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# What only training needs of operations: the run's state, flags' defaults, frozen encoders, --init, data checks,
# restore, logs, checkpoints, previews, the command line
# ----------------------------------------------------------------------------------------------------------

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
        args.precision = runtime.default_precision(device)
    if args.eval_every and not STAGES[args.stage].evaluates:
        raise UserError(f"--eval-every: FID during training needs --stage flow (text to image), not {args.stage}")
    evaluate.check_eval_args(args)


def projector_kwargs(args, clip):
    """The TextProjector's constructor arguments from the flags (its alignment head aside)."""
    return dict(clip_dim=clip.width, depth=args.projector_depth, heads=args.projector_heads, d_ff=args.projector_ff,
                dropout=args.projector_dropout, patch_size=args.projector_patch_size)


def build_data(args, rank, world, device):
    """-> (source, loader) of --data for this rank."""
    source = data.open_dataset(args.data, args.image_size, random_crop=args.random_crop, flip=args.flip,
                               size_filter=args.size_filter)
    loader = data.make_loader(source, args.batch_size, seed=args.seed, rank=rank, world=world,
                              noise_dim=sum(STAGES[args.stage].noise.values()), num_workers=args.num_workers,
                              pin_memory=device.type == "cuda")
    return source, loader


def batch_note(run):
    """How this run's per-micro-batch loss terms differ from the official run's (128 per process), or None."""
    args, micro, official = run.args, run.args.batch_size, OFFICIAL_MICRO_BATCH
    if run.stage.micro_batch is None:
        return None
    ranked = micro * run.world if args.gather_negatives and run.world > 1 else micro
    terms = run.stage.batch_terms(micro, ranked)
    if args.cfg_prob and micro != official:
        terms.append(f"the CFG shuffle (a micro-batch with one null draw trains none) leaves "
                     f"{flow_dit.expected_null_fraction(micro, args.cfg_prob):.1%} of samples unconditional (official "
                     f"{flow_dit.expected_null_fraction(official, args.cfg_prob):.1%})")
    if not terms:
        return None
    return (f"note: micro-batch {micro} per process, the official run's is {official} (4096 = 32 processes x "
            f"{official}; --batch-size sets it): " + "; ".join(terms))


def describe(run, source):
    """The run's first log lines: sizes, data, batch arithmetic, losses."""
    args, parts = run.args, run.stage.parts
    run.say(f"stage {args.stage}: {sum(p.numel() for p in run.params) / 1e6:.2f}M trainable parameters "
            f"({', '.join(parts)}); data {args.data} ({len(source) if hasattr(source, '__len__') else 'streamed'} "
            f"samples); global batch {args.global_batch} = {args.batch_size} x {run.world} GPUs x {args.accum} "
            f"accumulation; {args.precision}; {run.device}")
    for line in (batch_note(run), run.stage.describe_losses()):
        if line:
            run.say(line)
    if args.clip_weights == "random":
        run.say("note: the CLIP text tower is randomly initialised (untrained): it hashes captions into features, "
                "it does not understand them")
    if getattr(source, "skipped", None):
        run.say(f"skipped while indexing {args.data}: {data.format_skips(source.skipped)}")
    if run.loader.num_workers < args.num_workers:    # a tar source with fewer shards than ranks x workers
        run.say(f"note: {len(source.shards)} shards feed {run.loader.num_workers} DataLoader workers per rank, "
                f"not --num-workers {args.num_workers} (each worker reads shards of its own)")


def restore(run, ckpt):
    """Continue from a checkpoint: the stage's weights, the EMA, the discriminator, then the loop's state."""
    for name, m in run.stage.parts.items():
        m.load_state_dict(ckpt["model"][name])
        run.ema[name].load_state_dict(ckpt["ema"][name])
    if run.stage.disc is not None and "discriminator" in ckpt:
        run.stage.disc.load_state_dict(ckpt["discriminator"])
    run.restore_state(ckpt, RESUME)


def checkpoint(run):
    """Every rank gathers its loop state (replicas checked equal); rank 0 writes the checkpoint (docstring schema)."""
    stage = run.stage
    state = run.gather_state([stage.parts, run.ema] + ([stage.disc.net] if stage.disc is not None else []))
    if state is None:                          # ranks > 0
        return
    stage.on_checkpoint(run.ema, stage.config, run.say)
    state.update({"stage": run.args.stage, "args": vars(run.args), "config": stage.config,
                  "model": {k: v.state_dict() for k, v in stage.parts.items()},
                  "ema": {k: v.state_dict() for k, v in run.ema.items()}})
    if stage.disc is not None:
        state["discriminator"] = stage.disc.state_dict()
    run.say(f"saved {runtime.save_checkpoint(state, run.args.out, run.step, run.args.keep)}")


@torch.no_grad()
def write_preview(run, fixed):
    """The stage's preview of the EMA parts under out/samples/ (rank 0; a generator of its own: the training RNG
    is untouched) -> the file written: a PNG grid, or captions in a text file."""
    folder = os.path.join(run.args.out, "samples")
    generator = torch.Generator(device="cpu").manual_seed(run.args.seed)
    with runtime.write_errors(folder, "free space, then continue the run with --resume"):
        os.makedirs(folder, exist_ok=True)
        return run.stage.preview(run.ema, fixed, os.path.join(folder, f"step_{run.step:07d}"), generator)


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
    p.add_argument("--disc-width", type=runtime.multiple_of(tokenizer_lib.DISC_GROUPS), default=128,
                   help=f"PatchGAN base channels, a multiple of {tokenizer_lib.DISC_GROUPS} (its GroupNorm groups)")
    p.add_argument("--disc-lr", type=positive_float, help="discriminator learning rate (default: --lr)")


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
    p.add_argument("--backbone", choices=list(VELOCITY_NETS), default="dit",
                   help="the velocity network (flow_dit.VELOCITY_NETS; recorded in checkpoints and exports)")
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
    p.add_argument("--encode-bf16", action="store_true", help="encode images under bf16 autocast (default: fp32)")
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
    evaluate.add_eval_args(p)
    p.add_argument("--tensorboard", action="store_true", help="also write the logged metrics as TensorBoard scalars "
                   "to OUT/tensorboard (needs `pip install tensorboard`; OUT/metrics.jsonl is always written)")
    return p


if __name__ == "__main__":
    sys.exit(run_cli("train.py", main, build_parser().parse_args()))
