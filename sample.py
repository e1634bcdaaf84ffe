"""Sample FlowTok: prompts -> PNGs (text to image), images -> captions (image to text).

    python sample.py --ckpt runs/demo "a large red circle on the left" "a small blue square at the top" --out samples
    python sample.py --official FlowTok-XL --prompts prompts.txt --out samples --batch-size 64
    torchrun --nproc_per_node 8 sample.py --official FlowTok-XL --prompts coco30k.txt --out samples --skip-existing
    python sample.py --ckpt runs/demo --caption photo.png images/
    python sample.py --ckpt runs/demo --sampler heun --steps 4 "a large red circle on the left" --out samples_heun

The first runs the demo's run folder on a CPU, the second the released FlowTok-XL on one GPU (downloads its files),
the third the same on 8 GPUs (rerun to resume), the fourth captions images, the last samples with Heun's
solver in 8 network passes. README.md's "Sampling" section says
what is written and how each sample's noise is seeded.
"""
import argparse
import contextlib
import glob
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from huggingface_hub import hf_hub_download, snapshot_download
from PIL import Image, PngImagePlugin
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
import flow_dit
import projector
import tokenizer as tokenizer_lib
from data import IMAGE_EXTENSIONS
from flow_dit import DEFAULT_CFG, DEFAULT_STEPS, velocity_net
from projector import CLIP_TOWERS, OFFICIAL_CLIP_TOWER, CLIPTextEncoder, TextDecoder, TextProjector, tokenize
from runtime import (PRECISIONS, RunLock, UserError, amp, atomic_path, atomic_write, check_writable,
                     default_precision, file_sha256, finite_float, load_checkpoint, load_strict, on_every_rank,
                     one_line, pick_device, positive_float, positive_int, ranks, resolve_path, run_cli,
                     share_with_group, short_hash, state_dict_misfit, user_errors, weights_sha256, write_errors)

OFFICIAL_REPO = "turkeyju/FlowTok"                       # Hugging Face Hub
DEVICE_HELP = "auto (CUDA, else Apple's MPS, else the CPU) | cpu | cuda | cuda:N | mps (default: %(default)s)"
PNG_COMPRESSION = 1    # zlib level: 1.4x faster than PIL's 6 on a noisy 512 px image, +9% bytes, same pixels
OFFICIAL = {"FlowTok-XL": ("FlowTok-XL.pth", "FlowTiTok_512.bin"), "FlowTok-H": ("FlowTok-H.pth", "FlowTiTok_512.bin")}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")     # torch.compile's
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")          # the modes that replay CUDA graphs on a GPU
COMPILE_MODE_HELP = ("torch.compile's mode, only with --compile: reduce-overhead adds CUDA graphs on a GPU (less "
                     "launch overhead per DiT step), which need fixed shapes: --compile pads the last batch to the "
                     "batch size; on a CPU it runs as default (default: %(default)s)")


# ----------------------------------------------------------------------------------------------------------
# Images and noise
# ----------------------------------------------------------------------------------------------------------

def uint8_images(images):
    """(B, 3, H, W) float, ~[0, 1] -> (B, H, W, 3) uint8 on the same device, rounding as the official PNG writer."""
    return (images.float() * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def to_uint8(images):
    """(B, 3, H, W) float, ~[0, 1] -> (B, H, W, 3) uint8 numpy."""
    return uint8_images(images).cpu().numpy()


def save_grid(images, path, nrow=8, pad=2):
    """(B, 3, H, W) in [0, 1] -> one PNG grid with `nrow` images per row; returns the path."""
    arr = to_uint8(images)
    b, h, w, _ = arr.shape
    rows = (b + nrow - 1) // nrow
    cols = min(b, nrow)
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), np.uint8)
    for i, img in enumerate(arr):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = img
    Image.fromarray(grid).save(path)
    return path


def write_lines(path, inputs, outputs):
    """Write "input  ->  output" lines (text previews) -> path."""
    with open(path, "w") as f:
        f.write("\n".join(f"{a}  ->  {b}" for a, b in zip(inputs, outputs)) + "\n")
    return path


def sample_noise(prompt_index, sample_index, seed, shape=(77, 16)):
    """The text-latent noise of one sample, seeded by (seed, prompt, sample): batch-independent."""
    key = hashlib.blake2b(f"{seed},{prompt_index},{sample_index}".encode(), digest_size=8).digest()
    return torch.randn(shape, generator=torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1))


def sample_path(out, prompt_index, sample_index):
    """OUT/{prompt index:05d}_{sample index:02d}.png: sorted names list prompt by prompt."""
    return os.path.join(out, f"{prompt_index:05d}_{sample_index:02d}.png")


RECORD_KEY = "flowtok-sample"     # the PNG text chunk that holds what a sample was made from (sample_record)


def sample_record(prompt, prompt_index, sample_index, seed, steps, cfg, model):
    """sha256 hex of everything one sample depends on: its prompt, its noise (seed, prompt and sample index), the
    sampler settings and the model (weights and precision, FlowTokPipeline.identity)."""
    text = json.dumps([prompt, prompt_index, sample_index, seed, steps, float(cfg), model])
    return hashlib.sha256(text.encode()).hexdigest()


def read_record(path, whole=False):
    """The sample_record stored in an image file, or None (no file, no record, unreadable; with `whole`, also a
    file cut short after its record: every chunk's checksum is verified, the pixels are not decoded)."""
    try:
        with Image.open(path) as im:        # the text chunk precedes the pixels: the header read finds it
            record = im.info.get(RECORD_KEY)
            if whole:
                im.verify()
            return record
    except (OSError, ValueError, SyntaxError):   # PIL's verify raises SyntaxError for a broken chunk
        return None


def save_png(image, path, record=None, compress_level=PNG_COMPRESSION):
    """(H, W, 3) uint8 -> PNG (with `record` in a text chunk), written to a temporary name then renamed: a kill
    never leaves half a file, and an image and its record are always written together."""
    info = None
    if record is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text(RECORD_KEY, record)
    with atomic_write(path, "wb", sync=True) as f:   # on disk before the rename: a crash leaves no empty PNG
        Image.fromarray(image).save(f, format="PNG", pnginfo=info, compress_level=compress_level)


def _write_when_ready(ready, image, path, record):
    """save_png once the device-to-host copy behind `ready` (a CUDA event, or None) has finished."""
    if ready is not None:
        ready.synchronize()
    save_png(image, path, record)


class PNGWriter:
    """Writes PNGs on a thread pool while the caller computes the next batch (zlib runs outside the GIL).

    At most `backlog` images wait at a time (their uint8 copies hold host memory); `wait()` raises the first
    write error (a full disk, say) in the caller's thread.
    """

    def __init__(self, threads=None, backlog=256):
        self.pool = ThreadPoolExecutor(threads or min(8, os.cpu_count() or 1), thread_name_prefix="png")
        self.pending, self.backlog = [], backlog

    def submit(self, images, paths, records=None):
        """(B, H, W, 3) uint8 (numpy, or a tensor on any device) + B paths (+ B sample records) -> queued writes.

        A CUDA tensor is copied into pinned memory without blocking: the caller goes on to queue the next batch
        while the copy runs, and each write waits for the copy's event first.
        """
        while len(self.pending) + len(paths) > self.backlog and self.pending:
            self.pending.pop(0).result()
        ready = None
        if torch.is_tensor(images) and images.is_cuda:
            host = torch.empty(images.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(images, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
            images = host.numpy()
        elif torch.is_tensor(images):
            images = images.cpu().numpy()
        records = records or [None] * len(paths)
        self.pending += [self.pool.submit(_write_when_ready, ready, img, path, rec)
                         for img, path, rec in zip(images, paths, records)]

    def wait(self):
        """Block until every queued PNG is on disk."""
        while self.pending:
            self.pending.pop(0).result()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        try:
            if exc[0] is None:
                self.wait()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def read_png(path):
    """An image file -> (3, H, W) uint8 tensor."""
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------

class FlowTokPipeline:
    """Text -> image and image -> text over built modules (any device, eval mode).

    t2i: CLIP(prompts) -> projector sample z -> Euler + CFG with `dit` -> tokenizer.decode_flow_tokens(x1, E).
    i2t: tokenizer posterior sample x0 -> Euler + CFG with `i2t_dit` -> text latent -> text_decoder -> caption.
    `info` describes where the weights came from (set by the loaders; printed by the evaluation protocols).
    """

    def __init__(self, clip, projector, dit, tokenizer, i2t_dit=None, text_decoder=None, precision="fp32",
                 decode_precision="fp32"):
        self.clip, self.projector, self.dit, self.tokenizer = clip, projector, dit, tokenizer
        self.i2t_dit, self.text_decoder, self.precision = i2t_dit, text_decoder, precision
        self.decode_precision = decode_precision    # fp32: the official decode_tokens runs outside autocast
        self.info, self._identity, self.compiled, self.compile_mode = {}, None, False, None
        self.sampler, self.time_shift = "euler", 1.0   # text to image's ODE solver (flow_dit.solve)
        for m in (projector, dit, tokenizer, i2t_dit, text_decoder):
            if m is not None:
                m.eval()

    @property
    def device(self):
        return next(self.tokenizer.parameters()).device

    def compile(self, mode=None):
        """torch.compile (with `mode`) the DiTs and the image decoder; generate_folder then pads its last batch."""
        self.identity()          # hashed before: compiled modules rename their weights (_orig_mod.)
        self.dit, self.i2t_dit = [m if m is None else torch.compile(m, mode=mode) for m in (self.dit, self.i2t_dit)]
        self.tokenizer.decoder = torch.compile(self.tokenizer.decoder, mode=mode)
        self.compiled, self.compile_mode = True, mode
        return self

    def step_begin(self):
        """Before each call of a compiled DiT or decoder: with CUDA graphs, a new step (no-op otherwise)."""
        if self.compile_mode in CUDA_GRAPH_MODES:   # the replay may overwrite the last call's output: read by now
            torch.compiler.cudagraph_mark_step_begin()

    def _autocast(self, precision=None):
        return amp(self.device, precision or self.precision)

    def identity(self):
        """sha256 of the text-to-image weights (CLIP, projector, DiT, tokenizer) + ':' + the precision; computed
        once (a few seconds for the released models), it tells whether two images came from the same model."""
        if self._identity is None:
            modules = [m for m in (self.clip, self.projector, self.dit, self.tokenizer) if m is not None]
            self._identity = f"{weights_sha256(*modules)}:{self.precision}:decode {self.decode_precision}"
        # another solver makes other images from the same weights (euler: records as before the solvers existed)
        return self._identity + ("" if self.sampler == "euler" else f":{self.sampler} shift {self.time_shift:g}")

    def nfe(self, steps):
        """Network passes per image of text to image with `steps` steps (CFG's two branches are one batched pass)."""
        return steps * flow_dit.SAMPLERS[self.sampler]

    @torch.no_grad()
    def generate(self, prompts, steps=DEFAULT_STEPS, cfg=DEFAULT_CFG, generator=None, eps=None):
        """Prompts -> images (B, 3, S, S) in [0, 1]; eps (B, 77, 16) fixes the text-latent noise."""
        if self.dit is None:
            raise UserError("this checkpoint has no text-to-image model")
        feats = self.clip.encode(prompts)                                              # (B, 77, C)
        if eps is None:
            eps = torch.randn((len(prompts), 77, 16), generator=generator)
        return self.decode(self.flow(self.source(feats, eps), steps, cfg), feats)

    # generate's stages, one method each (bench.py times them one by one)
    @torch.no_grad()
    def source(self, feats, eps):
        """CLIP features (B, 77, C), noise (B, 77, 16) -> the flow's source z = mu + sigma * eps (B, 77, 16), t = 0."""
        with self._autocast():
            return self.projector(feats, eps.to(self.device))[0]

    @torch.no_grad()
    def flow(self, z, steps=DEFAULT_STEPS, cfg=DEFAULT_CFG):
        """z -> image tokens x1 (B, 77, 16) at t = 1: self.sampler with batched CFG (flow_dit.solve; euler: the
        official sampler), float32."""
        with self._autocast():
            return flow_dit.solve(self.dit, z, steps, cfg, self.sampler, self.time_shift, self.step_begin)[0]

    @torch.no_grad()
    def decode(self, x1, feats):
        """Image tokens x1, CLIP features (the decoder's text guidance) -> images (B, 3, S, S) in [0, 1]."""
        with self._autocast(self.decode_precision):
            self.step_begin()
            images = self.tokenizer.decode_flow_tokens(x1, feats)
        return images.float().clamp(0, 1)       # a new tensor: a CUDA graph's output buffer never leaves here

    @torch.no_grad()
    def caption(self, images, steps=DEFAULT_STEPS, cfg=DEFAULT_CFG, generator=None, eps=None):
        """Images (B, 3, S, S) in [0, 1] -> captions (list of B str)."""
        if self.i2t_dit is None or self.text_decoder is None:
            raise UserError("this checkpoint has no image-to-text model (train stages text-ae and flow-i2t)")
        if eps is None:
            eps = torch.randn((len(images), 77, 16), generator=generator)
        with self._autocast():
            mean, logvar = self.tokenizer.encode(images.to(self.device))
            x0 = self.tokenizer.flow_tokens(mean, logvar, eps.to(self.device))         # image tokens, t = 0
            latent = flow_dit.euler_sample(self.i2t_dit, x0, steps=steps, cfg=cfg,     # text latent, t = 1
                                           before_step=self.step_begin)
            ids = self.text_decoder.decode(latent)                                      # (B, 77) CLIP ids
        return projector.detokenize(ids)


# ----------------------------------------------------------------------------------------------------------
# Loading: our runs and the official release
# ----------------------------------------------------------------------------------------------------------

def _part(ckpt, name, cls, ema):
    """Rebuild one trained part of a checkpoint (EMA weights unless ema=False)."""
    with user_errors(f"{ckpt['path']}: part '{name}'"):
        module = cls(**ckpt["config"][name])
        module.load_state_dict(ckpt["ema" if ema else "model"][name])
    return module


def load_text_ae(path):
    """A text-ae run or checkpoint (train.py --stage text-ae) -> (TextProjector, TextDecoder): EMA weights, frozen,
    on the CPU: the text side of image to text."""
    ckpt = load_checkpoint(path)
    if ckpt.get("stage") != "text-ae":
        raise UserError(f"--text-ae {path} is a '{ckpt.get('stage')}' checkpoint, not a text-ae one")
    return tuple(_part(ckpt, name, cls, True).eval().requires_grad_(False)
                 for name, cls in (("projector", TextProjector), ("text_decoder", TextDecoder)))


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


def load_pipeline(path, device="cpu", ema=True, precision="fp32", clip_weights=None, tokenizer=None):
    """Our checkpoints -> FlowTokPipeline: a flow run (text to image), plus flow-i2t + text-ae if present; or an
    exported folder (export_pipeline), local or hf:OWNER/NAME[@REVISION] on the Hugging Face Hub."""
    path = os.fspath(path)
    if path.startswith("hf:"):
        path = fetch_hub(path)
    if is_export(path):
        if tokenizer or not ema:
            raise UserError(f"{path} is an export (EMA weights, its own tokenizer): --tokenizer and --no-ema do not "
                            f"apply")
        return load_export(path, device, precision, clip_weights)
    runs = find_runs(path)
    if "flow" not in runs and "flow-i2t" not in runs:
        stage = next(iter(runs))
        raise UserError(f"{runs[stage]} is a '{stage}' checkpoint; sampling needs a 'flow' (text to image) or "
                              f"'flow-i2t' (image to text) run")
    main = load_checkpoint(runs.get("flow") or runs["flow-i2t"])
    with user_errors(f"{main['path']}: CLIP text tower"):
        clip_cfg = main["config"]["clip"]
        clip = CLIPTextEncoder(clip_cfg["tower"], clip_weights or resolve_path(clip_cfg["weights"], main["path"]))
    tok_path = tokenizer or resolve_path(main["config"]["tokenizer"], main["path"])
    with user_errors(f"tokenizer {tok_path}"):
        tok = tokenizer_lib.load_tokenizer(tok_path)
    dit = proj = i2t = decoder = None
    if "flow" in runs:
        dit, proj = _part(main, "dit", velocity_net, ema), _part(main, "projector", TextProjector, ema)
    if "flow-i2t" in runs:
        ck = load_checkpoint(runs["flow-i2t"])
        i2t = _part(ck, "dit", velocity_net, ema)
        _, decoder = load_text_ae(resolve_path(ck["config"]["text_ae"], ck["path"]))
    with user_errors(f"moving the model to {device}"):
        mods = [m.to(device) if m is not None else None for m in (clip, proj, dit, tok, i2t, decoder)]
    pipe = FlowTokPipeline(*mods, precision=precision)
    pipe.info = dict(source=main["path"], step=main.get("step"), weights="EMA" if ema else "raw (--no-ema)")
    return pipe


# ----------------------------------------------------------------------------------------------------------
# Exported weights: DIR/model.safetensors + DIR/config.json, what a colleague (or the Hub) needs to sample
# ----------------------------------------------------------------------------------------------------------

EXPORT_FORMAT = "flowtok-export"
EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EXPORT_PARTS = {"projector": TextProjector, "dit": velocity_net, "tokenizer": tokenizer_lib.Tokenizer,
                "i2t_dit": velocity_net, "text_decoder": TextDecoder}
# bounds on config.json's integers, checked before anything is built (exports come from strangers too): a depth of
# 10**9 would build modules until memory runs out; within them, the shapes must also equal model.safetensors'
EXPORT_MAX_DEPTH, EXPORT_MAX_INT = 256, 1 << 16


def check_export_folder(out):
    """--export OUT must be new or empty: an export never overwrites files."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--export {out} exists and is not an empty folder: export into a new folder (nothing "
                        f"written)")


def export_pipeline(pipe, out, dtype="fp32"):
    """A pipeline -> OUT/model.safetensors (every part, the CLIP text tower included: parameters in `dtype`,
    buffers such as RoPE tables kept in fp32) + OUT/config.json (each part's config, identities, source)."""
    parts = {"clip": pipe.clip.text, **{name: getattr(pipe, name) for name in EXPORT_PARTS}}
    tensors = {}
    for name, module in parts.items():
        if module is None:
            continue
        params = {k for k, _ in module.named_parameters()}
        for k, v in module.state_dict().items():
            cast = EXPORT_DTYPES[dtype] if k in params and v.is_floating_point() else v.dtype
            tensors[f"{name}.{k}"] = v.detach().to("cpu", cast).clone()     # clone: no shared storage in the file
    config = dict(format=EXPORT_FORMAT, version=1, dtype=dtype,
                  parts={name: parts[name].config for name in EXPORT_PARTS if parts[name] is not None},
                  clip=dict(tower=pipe.clip.tower, origin=str(pipe.clip.weights),
                            sha256=weights_sha256(pipe.clip.text)),
                  identity=pipe.identity(), source={k: v for k, v in pipe.info.items() if v is not None})
    check_export_folder(out)
    weights = os.path.join(out, "model.safetensors")
    with write_errors(out, "nothing was exported"):
        os.makedirs(out, exist_ok=True)
    with write_errors(out, f"the export is incomplete: remove {out} and export again"):
        with atomic_path(weights) as tmp:
            save_file(tensors, tmp, metadata={"format": EXPORT_FORMAT})
            share_with_group(tmp)            # safetensors writes 0600: colleagues on a shared disk could not read it
        config["model_sha256"] = file_sha256(weights)     # load_export checks it: a damaged file never samples
        with atomic_write(os.path.join(out, "config.json")) as f:
            json.dump(config, f, indent=1)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def is_export(path):
    """Whether `path` is a folder written by export_pipeline."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            return json.load(f).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _export_config_problem(config):
    """What makes an export's config.json unusable (None: nothing): missing or mistyped fields, sizes out of bounds."""
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        return f"no \"format\": \"{EXPORT_FORMAT}\""
    if config.get("dtype") not in EXPORT_DTYPES:
        return f"\"dtype\" is {config.get('dtype')!r}, not one of {', '.join(EXPORT_DTYPES)}"
    parts = config.get("parts")
    if not isinstance(parts, dict) or "tokenizer" not in parts or not {"dit", "i2t_dit"} & set(parts):
        return "\"parts\" is not an object naming a tokenizer and a dit or i2t_dit"
    if set(parts) - set(EXPORT_PARTS) or not all(isinstance(c, dict) for c in parts.values()):
        return f"\"parts\" may only map {', '.join(EXPORT_PARTS)} to their configs"
    for name, cfg in parts.items():
        for k, v in cfg.items():
            bound = EXPORT_MAX_DEPTH if "depth" in k or "layers" in k else EXPORT_MAX_INT
            if isinstance(v, int) and not isinstance(v, bool) and not 0 <= v <= bound:
                return f"parts.{name}.{k} is {v}, outside 0..{bound}"
    if not isinstance(config.get("clip"), dict) or config["clip"].get("tower") not in CLIP_TOWERS:
        return f"\"clip\" names no known text tower ({', '.join(CLIP_TOWERS)})"
    if not isinstance(config.get("source", {}), dict):
        return "\"source\" is not an object"
    return None


def read_export(path):
    """An export folder -> (its checked config.json, {part: {key: tensor}} from model.safetensors, in fp32), or one
    line naming the file and the fix: unreadable or incomplete config, weights that are not the recorded file (cut
    short, replaced), shapes that do not fit the config (checked on meta tensors, before anything is built), or
    values that are not finite."""
    file, weights = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{file}: unreadable ({one_line(e)})") from None
    problem = _export_config_problem(config)
    if problem:
        raise UserError(f"{file}: {problem}; not an export sample.py can load: export it again")
    recorded = config.get("model_sha256")              # exports made before it was recorded are not checked
    if recorded is not None and os.path.isfile(weights) and file_sha256(weights) != recorded:
        raise UserError(f"{weights} is not the file {file} records (sha256 {short_hash(file_sha256(weights))}, "
                        f"recorded {short_hash(recorded)}): damaged or replaced; export or download it again")
    try:
        with safe_open(weights, "pt") as f:            # the header only: shapes before any model is built
            shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except (OSError, SafetensorError) as e:
        raise UserError(f"{weights}: unreadable ({one_line(e)}); export or download it again") from None
    for name in config["parts"]:
        with user_errors(f"{file}: part '{name}'"), torch.device("meta"):
            shell = EXPORT_PARTS[name](**config["parts"][name]).state_dict()
        misfit = state_dict_misfit(shell, {k.partition(".")[2]: v for k, v in shapes.items()
                                           if k.partition(".")[0] == name})
        if misfit:
            raise UserError(f"{file}: part '{name}' does not fit {weights} ({misfit}); export it again")
    try:
        tensors = load_file(weights)
    except (OSError, SafetensorError) as e:
        raise UserError(f"{weights}: unreadable ({one_line(e)}); export or download it again") from None
    groups = {}
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise UserError(f"{weights}: {key} holds NaN or infinite values: a damaged export; export it again")
        name, _, rest = key.partition(".")
        groups.setdefault(name, {})[rest] = value.float() if value.is_floating_point() else value
    return config, groups


def load_export(path, device="cpu", precision="fp32", clip_weights=None):
    """An export_pipeline folder -> FlowTokPipeline (weights back in fp32, as the run's own modules)."""
    config, groups = read_export(path)
    modules = {}
    with user_errors(f"{path}: rebuilding the models"):
        for name, cls in EXPORT_PARTS.items():
            if name in config["parts"]:
                modules[name] = cls(**config["parts"][name])
                load_strict(modules[name], groups.get(name, {}), name)
        clip = CLIPTextEncoder(config["clip"]["tower"], clip_weights or "random")
        if not clip_weights:                      # the exported tower (config["clip"] says where it came from)
            load_strict(clip.text, groups.get("clip", {}), "CLIP text tower")
    with user_errors(f"moving the model to {device}"):
        clip = clip.to(device)
        modules = {k: m.to(device) for k, m in modules.items()}
    pipe = FlowTokPipeline(clip, modules.get("projector"), modules.get("dit"), modules["tokenizer"],
                           modules.get("i2t_dit"), modules.get("text_decoder"), precision=precision)
    source = config.get("source", {})
    pipe.info = dict(source=f"export {path}", step=source.get("step"),
                     weights=f"{source.get('weights', 'EMA')}, exported in {config['dtype']}")
    return pipe


def fetch_hub(spec):
    """hf:OWNER/NAME[@REVISION] -> the local folder of that Hub repository (huggingface_hub's cache; once)."""
    repo, _, revision = spec[len("hf:"):].partition("@")
    try:
        return snapshot_download(repo, revision=revision or None, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:   # offline, unknown repo, gated, proxy...: one actionable line
        raise UserError(f"--ckpt {spec}: not in the Hugging Face cache and not downloadable ({type(e).__name__}); "
                        f"where there is internet run `huggingface-cli download {repo} --local-dir DIR`, copy DIR "
                        f"here and pass --ckpt DIR") from None


def official_files(name, official_dir=None):
    """The released checkpoint and its tokenizer: from --official-dir, or the Hugging Face cache / download."""
    files = OFFICIAL[name]
    fetch = (f"huggingface-cli download {OFFICIAL_REPO} {' '.join(files)} --local-dir DIR (or the browser: "
             f"https://huggingface.co/{OFFICIAL_REPO})")
    if official_dir:
        paths = [os.path.join(official_dir, f) for f in files]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise UserError(f"missing {', '.join(missing)}: fetch {', '.join(files)} with {fetch} and pass "
                                  f"--official-dir DIR")
        return paths
    try:
        return [hf_hub_download(OFFICIAL_REPO, f) for f in files]
    except Exception as e:   # offline, no huggingface_hub, proxy...: one actionable line
        raise UserError(f"could not get {', '.join(files)} from the Hugging Face Hub ({type(e).__name__}); "
                              f"on a machine with internet run {fetch}, copy DIR here and pass --official-dir DIR"
                              ) from None


def load_official_pipeline(name, device="cpu", official_dir=None, clip_weights=None, precision="fp32",
                           clip_tower=None):
    """The released FlowTok-XL / FlowTok-H (512 px, with FlowTiTok_512 and CLIP ViT-L/14-336) -> pipeline.

    The released files hold one set of weights (the EMA ones, preferred by read_state_dict if both are there).
    clip_tower None: the tower whose width the projector expects (ViT-L-14-336 for the release; tiny official-
    layout files in the tests get the tiny tower).
    """
    flow_path, tok_path = official_files(name, official_dir)
    with user_errors(f"{flow_path}"):
        dit, proj = flow_dit.load_official_flowtok(flow_path)
    with user_errors(f"{tok_path}"):
        tok = tokenizer_lib.load_official_tokenizer(tok_path)
    width = proj.config["clip_dim"]
    if clip_tower is None:
        fits = [t for t, cfg in projector.CLIP_TOWERS.items() if cfg["width"] == width]
        clip_tower = OFFICIAL_CLIP_TOWER if OFFICIAL_CLIP_TOWER in fits or not fits else fits[0]
    tower_width = projector.CLIP_TOWERS[clip_tower]["width"]
    if width != tower_width or tok.config["text_dim"] != tower_width:   # before any CLIP download
        raise UserError(f"{flow_path} expects {width}-d text features but the CLIP tower {clip_tower} gives "
                              f"{tower_width}-d")
    with user_errors("CLIP text tower"):
        clip = CLIPTextEncoder(clip_tower, clip_weights or "openai")
    with user_errors(f"moving the model to {device}"):
        mods = [m.to(device) for m in (clip, proj, dit, tok)]
    pipe = FlowTokPipeline(*mods, precision=precision)
    pipe.info = dict(source=f"official {name} ({flow_path}, {tok_path})", step=None, weights="released")
    return pipe


# ----------------------------------------------------------------------------------------------------------
# Running: devices, ranks, generation to a folder (shared with evaluate.py's protocols)
# ----------------------------------------------------------------------------------------------------------

def generate_folder(pipe, prompts, out, n_per_prompt=1, seed=0, steps=DEFAULT_STEPS, cfg=DEFAULT_CFG, batch_size=16,
                    rank=0, world=1, skip_existing=False, progress=False):
    """This rank's share of OUT/{i:05d}_{j:02d}.png for every (prompt i, sample j) -> (generated, reused, replaced).

    Rank r of `world` takes jobs r, r + world, ... of the (i, j) list: together the ranks write every file
    exactly once. Each PNG holds the sample_record of what it was made from; skip_existing keeps a file already
    there only if its record is this job's and the file is whole (written atomically, but a disk can lose a tail),
    and regenerates the others: `replaced` counts those, files made with another prompt, seed, settings or model,
    with no record, or damaged.
    """
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n_per_prompt)][rank::world]
    model = pipe.identity()
    record = {(i, j): sample_record(prompts[i], i, j, seed, steps, cfg, model) for i, j in jobs}
    found = {job: read_record(sample_path(out, *job), whole=True) for job in jobs
             if skip_existing and os.path.isfile(sample_path(out, *job))}
    todo = [job for job in jobs if found.get(job) != record[job]]
    replaced = sum(job in found for job in todo)
    with PNGWriter() as writer, tqdm(total=len(todo), desc=f"rank {rank}" if world > 1 else "sampling",
                                     unit="img", disable=not progress or not todo) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            padded = chunk + chunk[-1:] * (batch_size - len(chunk) if pipe.compiled else 0)   # compiled: one shape
            eps = torch.stack([sample_noise(i, j, seed) for i, j in padded])                 # (B, 77, 16)
            images = pipe.generate([prompts[i] for i, _ in padded], steps, cfg, eps=eps)    # (B, 3, S, S)
            images = images[:len(chunk)]
            writer.submit(uint8_images(images), [sample_path(out, i, j) for i, j in chunk],  # written while the
                          [record[job] for job in chunk])                                     # next batch runs
            bar.update(len(chunk))
    return len(todo), len(jobs) - len(todo), replaced


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
    with atomic_write(path) as f:
        f.writelines(_caption_record(it, captions[it["id"]]) for it in items if it["id"] in captions)

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
            eps = torch.stack([sample_noise(k, 0, seed) for k in chunk])                # (b, 77, 16)
            for k, text in zip(chunk, pipe.caption(torch.stack(images), steps, cfg, eps=eps)):  # (b, 3, S, S)
                captions[items[k]["id"]] = text
                log.write(_caption_record(items[k], text))
            log.flush()                          # a killed run keeps every finished batch
            bar.update(len(chunk))
    return len(todo)


def first_samples(source, n=8, look=1000):
    """The first n usable samples of a map-style source among its first `look` ([] for a stream), each drawn with a
    generator of its own: previews never draw from the training RNG (exact resume)."""
    samples = []
    for i in range(min(look, len(source)) if hasattr(source, "get") else 0):
        try:
            samples.append(source.get(i, torch.Generator().manual_seed(i)))
        except data.BadSample:                  # filtered (--size-filter) or unreadable: the next one
            continue
        if len(samples) == n:
            break
    return samples


def preview_inputs(source, prompts_file, device):
    """Fixed inputs for a trainer's periodic previews: the first 8 usable samples of the data (their captions, ids,
    images), and the prompts of `prompts_file` (one per line; None: those captions)."""
    prompts = None
    if prompts_file:
        try:
            with open(prompts_file, encoding="utf-8") as f:
                prompts = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:   # missing, a folder, not text
            raise UserError(f"--sample-prompts {prompts_file}: {getattr(e, 'strerror', None) or e.reason}") from None
    samples = first_samples(source)
    captions = [s["caption"] for s in samples]
    fixed = {"prompts": prompts or captions, "captions": captions,
             "ids": tokenize(captions)[0].to(device)}
    if samples and "image" in samples[0]:
        fixed["images"] = torch.stack([s["image"] for s in samples]).to(device)
    return fixed


def build_pipeline(args, device, precision):
    """--official or --ckpt -> FlowTokPipeline on `device`."""
    if args.official:
        if args.no_ema:
            print("warning: --no-ema is ignored with --official (the release holds one set of weights)",
                  file=sys.stderr)
        pipe = load_official_pipeline(args.official, device, args.official_dir, args.clip_weights, precision)
    elif args.ckpt:
        pipe = load_pipeline(args.ckpt, device, not args.no_ema, precision, args.clip_weights, args.tokenizer)
    else:
        raise UserError("give --ckpt RUN_OR_FILE or --official FlowTok-XL|FlowTok-H")
    pipe.decode_precision = args.decode_precision
    pipe.sampler, pipe.time_shift = args.sampler, args.time_shift
    warn_unused_compile_mode(args)
    return pipe.compile(args.compile_mode) if args.compile else pipe


def warn_unused_compile_mode(args):
    """--compile-mode without --compile: say so (sample.py and evaluate.py speed)."""
    if args.compile_mode != "default" and not args.compile:
        print(f"warning: --compile-mode {args.compile_mode} is ignored without --compile", file=sys.stderr)


def add_model_args(p):
    """The model and sampling options shared by sample.py and evaluate.py's protocols."""
    p.add_argument("--ckpt", help="a train.py run folder or checkpoint (a demo folder with stage subfolders too)")
    p.add_argument("--official", choices=list(OFFICIAL),
                   help=f"the released checkpoints (Hugging Face {OFFICIAL_REPO})")
    p.add_argument("--official-dir", help="a folder already holding the official files (offline use)")
    p.add_argument("--clip-weights", help="a local open_clip CLIP file instead of the recorded/downloaded one")
    p.add_argument("--tokenizer", help="use this tokenizer instead of the one the run recorded")
    p.add_argument("--no-ema", action="store_true", help="use the raw (non-EMA) weights")
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, help="solver steps (default: %(default)s)")
    p.add_argument("--sampler", choices=list(flow_dit.SAMPLERS), default="euler", help="text to image's ODE solver: "
                   "euler (the official), heun, midpoint (2 passes a step), ab2 (1) (default: %(default)s)")
    p.add_argument("--time-shift", type=positive_float, default=1.0, help="heun, midpoint, ab2: time grid shift, > 1 "
                   "puts more steps near the image end (default: %(default)s: uniform)")
    p.add_argument("--cfg", type=finite_float, default=DEFAULT_CFG,
                   help="classifier-free guidance scale (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the per-sample noise (and of evaluate.py's prompt draw) (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="per process (default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, help="of the text encoder, projector and DiT (default: bf16 on "
                   "GPUs that compute it natively, fp16 on older ones, fp32 on CPU and MPS)")
    p.add_argument("--decode-precision", choices=PRECISIONS, default="fp32", help="of the image decoder "
                   "(default: %(default)s, as the official decode_tokens, outside autocast; bf16: faster on GPU)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT and the decoder: the first batch "
                   "compiles (minutes), later ones run faster; outputs equal eager within float rounding")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default", help=COMPILE_MODE_HELP)


# ----------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------

def read_prompts(args):
    """Prompts from the command line and/or --prompts FILE (one per line, blank lines skipped)."""
    prompts = list(args.prompts_inline)
    if args.prompts:
        try:
            with open(args.prompts, encoding="utf-8") as f:
                prompts += [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--prompts {args.prompts}: {one_line(e)}") from None
    return [" ".join(p.split()) for p in prompts]      # one line each: prompts.txt maps line i to prompt i


def image_paths(items):
    """Files and folders (their images, sorted) -> list of image paths."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise UserError(f"no such image or folder: {item}")
    if not paths:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(items)}")
    return paths


def caption_images(pipe, args, rank, world):
    """--caption: print 'path<TAB>caption' for this rank's share of the images."""
    paths = image_paths(args.caption)
    jobs = list(range(len(paths)))[rank::world]
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start:start + args.batch_size]
        images = []
        for k in chunk:
            try:
                images.append(data.transform(data.load_image(paths[k]), pipe.tokenizer.image_size))
            except data.BadSample as e:
                raise UserError(f"{paths[k]}: {e.reason}") from None
        eps = torch.stack([sample_noise(k, 0, args.seed) for k in chunk])
        for k, c in zip(chunk, pipe.caption(torch.stack(images), args.steps, args.cfg, eps=eps)):
            print(f"{paths[k]}\t{c}")


def main(args):
    """Prompts -> OUT/*.png, grid.png, prompts.txt; or, with --caption, images -> 'path<TAB>caption' lines."""
    with ranks() as (rank, world, local):
        device = pick_device(args.device, local)
        precision = args.precision or default_precision(device)
        if args.export:
            if rank == 0:
                check_export_folder(args.export)      # before the model is loaded
                size = export_pipeline(build_pipeline(args, device, precision), args.export, args.export_dtype)
                print(f"exported to {args.export}: model.safetensors ({size / 2 ** 20:.1f} MiB, {args.export_dtype} "
                      f"parameters) and config.json; sample with --ckpt {args.export}")
            return None
        if args.caption:
            image_paths(args.caption)                 # fail on a bad path before loading the model
            return caption_images(build_pipeline(args, device, precision), args, rank, world)
        prompts = read_prompts(args)
        if not prompts:
            raise UserError("no prompts: give them on the command line or with --prompts FILE")
        check_writable(args.out, rank)
        with contextlib.ExitStack() as stack:         # rank 0 holds out/.lock: one sampler per folder
            on_every_rank(world, rank, lambda: rank == 0 and claim_folder(stack, args.out))
            return sample_prompts(args, prompts, device, precision, rank, world)


def claim_folder(stack, out):
    """Rank 0: lock `out` for this sampler (until `stack` closes) and remove what a killed one left half-written."""
    lock = stack.enter_context(RunLock(out))
    if lock.note:
        print(lock.note, file=sys.stderr)
    for partial in glob.glob(os.path.join(glob.escape(out), "*.tmp")):   # name.png.PID.tmp: a kill before a rename
        os.remove(partial)


def warn_truncated(prompts):
    """Say which prompts CLIP will see only the start of (over 77 tokens)."""
    _, truncated = tokenize(prompts)
    cut = truncated.nonzero().flatten().tolist()
    if cut:
        print(f"warning: {len(cut)} of {len(prompts)} prompts are longer than CLIP's 77 tokens and are cut (e.g. "
              f"prompt {cut[0]}: {prompts[cut[0]][:60]!r}...): their images follow the first 75 tokens only",
              file=sys.stderr)


def sample_prompts(args, prompts, device, precision, rank, world):
    """Prompts -> OUT/*.png (this rank's share), then rank 0: prompts.txt and grid.png."""
    if rank == 0:
        warn_truncated(prompts)
    pipe = on_every_rank(world, rank, build_pipeline, args, device, precision)   # a file one node lacks: all stop

    def generate():
        with write_errors(args.out, "free space and run again with --skip-existing (finished images are kept)"):
            return generate_folder(pipe, prompts, args.out, args.n_per_prompt, args.seed, args.steps, args.cfg,
                                   args.batch_size, rank, world, args.skip_existing, progress=rank == 0)
    # a rank that cannot write stops every rank with its line; also the barrier: every file exists before the grid
    made, kept, replaced = on_every_rank(world, rank, generate)
    if args.skip_existing and world > 1:
        print(f"rank {rank}: reused {kept}, regenerated {replaced}, new {made - replaced}")
    if rank != 0:
        return
    with write_errors(args.out), atomic_write(os.path.join(args.out, "prompts.txt")) as f:
        f.writelines(p + "\n" for p in prompts)
    first = [(i, j) for i in range(len(prompts)) for j in range(args.n_per_prompt)][:64]
    check_visible([sample_path(args.out, i, j) for i, j in first], world)
    grid = torch.stack([read_png(sample_path(args.out, i, j)) for i, j in first]).float() / 255
    nrow = args.n_per_prompt if 1 < args.n_per_prompt <= 16 else 8
    with write_errors(args.out):
        grid_path = save_grid(grid, os.path.join(args.out, "grid.png"), nrow=nrow)
    total = len(prompts) * args.n_per_prompt
    reused = ""
    if args.skip_existing and world == 1:
        reused = (f"; reused {kept}, regenerated {replaced} made from another prompt, seed, settings or model "
                  f"(or unrecorded, or damaged), new {made - replaced}")
    print(f"sampler {pipe.sampler}, {args.steps} steps: {pipe.nfe(args.steps)} network passes (NFE) per image")
    print(f"wrote {total} samples ({len(prompts)} prompts x {args.n_per_prompt}{reused}) to {args.out} as "
          f"{{prompt:05d}}_{{sample:02d}}.png; grid: {grid_path}; prompts: {args.out}/prompts.txt")


def check_visible(paths, world):
    """(rank 0, after the barrier) Every file the ranks wrote is here, or a UserError saying why it is not."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"rank 0 does not see {len(missing)} of the {len(paths)} files the ranks wrote (e.g. "
                        f"{missing[0]})" + (": with several nodes, --out must be on a filesystem all nodes share"
                                            if world > 1 else ""))


def build_parser():
    """The command line (the model and sampling flags are add_model_args', shared with evaluate.py)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts_inline", nargs="*", metavar="PROMPT", help="prompts (text to image)")
    p.add_argument("--prompts", help="a text file, one prompt per line")
    p.add_argument("--caption", nargs="+", metavar="IMAGE", help="image files or folders to caption (image to text)")
    p.add_argument("--out", default="samples", help="output folder (default: %(default)s)")
    p.add_argument("--n-per-prompt", type=positive_int, default=1, help="samples per prompt (default: %(default)s)")
    p.add_argument("--skip-existing", action="store_true",
                   help="keep samples already in --out that were made from the same prompt, seed, settings and model "
                   "(resume a run); regenerate the others")
    p.add_argument("--export", metavar="DIR", help="write DIR/model.safetensors + DIR/config.json (the EMA weights "
                   "of every part, CLIP's text tower included) to share or upload, instead of sampling")
    p.add_argument("--export-dtype", choices=list(EXPORT_DTYPES), default="fp32",
                   help="dtype of the exported parameters (default: %(default)s)")
    add_model_args(p)
    return p


def cli(argv=None):
    """The command line: exit status 0 done, 1 a user error (one line, no traceback), 2 bad flags."""
    sys.exit(run_cli("sample.py", main, build_parser().parse_args(argv)))


if __name__ == "__main__":
    cli()
