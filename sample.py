"""Sample FlowTok from the command line: prompts -> PNGs (text to image), images -> captions (image to text).

  # 1 CPU: the embedded demo's run folder
  python sample.py --ckpt runs/demo "a large red circle on the left" "a small blue square at the top" --out samples
  # 1 GPU: the released FlowTok-XL at 512 px (downloads FlowTok-XL.pth, FlowTiTok_512.bin and CLIP ViT-L/14-336)
  python sample.py --official FlowTok-XL --prompts prompts.txt --out samples --batch-size 64
  # offline: the same files already on disk
  python sample.py --official FlowTok-H --official-dir /models/flowtok --clip-weights clip.safetensors ...
  # 8 GPUs on a long prompt list (each rank writes its own slice of the samples; no duplicates, no gaps)
  torchrun --nproc_per_node 8 sample.py --official FlowTok-XL --prompts coco30k.txt --out samples
  # image to text: one caption per image (files or folders)
  python sample.py --ckpt runs/demo --caption photo.png images/

Samples are named {prompt index:05d}_{sample index:02d}.png; each sample's noise is seeded by (--seed, prompt
index, sample index), so an image does not depend on the batch size, the GPU count or the other prompts.
Defaults follow the paper: 20 Euler steps, CFG 2.0, EMA weights.
"""
import argparse
import hashlib
import os
import sys

import numpy as np
import torch
from PIL import Image

import flow_dit
import projector
import tokenizer as tokenizer_lib
from flow_dit import FlowDiT
from projector import CLIPTextEncoder, TextDecoder, TextProjector

OFFICIAL_REPO = "turkeyju/FlowTok"                       # Hugging Face Hub
OFFICIAL = {"FlowTok-XL": ("FlowTok-XL.pth", "FlowTiTok_512.bin"), "FlowTok-H": ("FlowTok-H.pth", "FlowTiTok_512.bin")}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class CheckpointError(Exception):
    """A missing, unreadable or wrong-kind checkpoint: reported in one line."""


# ----------------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------------

def to_uint8(images):
    """(B, 3, H, W) float, ~[0, 1] -> (B, H, W, 3) uint8 numpy, rounding as the official PNG writer."""
    return (images.float() * 255 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


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


def sample_noise(prompt_index, sample_index, seed, shape=(77, 16)):
    """The text-latent noise of one sample, seeded by (seed, prompt, sample): batch-independent."""
    key = hashlib.blake2b(f"{seed},{prompt_index},{sample_index}".encode(), digest_size=8).digest()
    return torch.randn(shape, generator=torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1))


# ----------------------------------------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------------------------------------

class FlowTokPipeline:
    """Text -> image and image -> text over built modules (any device, eval mode).

    t2i: CLIP(prompts) -> projector sample z -> Euler + CFG with `dit` -> tokenizer.decode_flow_tokens(x1, E).
    i2t: tokenizer posterior sample x0 -> Euler + CFG with `i2t_dit` -> text latent -> text_decoder -> caption.
    """

    def __init__(self, clip, projector, dit, tokenizer, i2t_dit=None, text_decoder=None, precision="fp32"):
        self.clip, self.projector, self.dit, self.tokenizer = clip, projector, dit, tokenizer
        self.i2t_dit, self.text_decoder, self.precision = i2t_dit, text_decoder, precision
        for m in (projector, dit, tokenizer, i2t_dit, text_decoder):
            if m is not None:
                m.eval()

    @property
    def device(self):
        return next(self.tokenizer.parameters()).device

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    @torch.no_grad()
    def generate(self, prompts, steps=20, cfg=2.0, generator=None, eps=None):
        """Prompts -> images (B, 3, S, S) in [0, 1]; eps (B, 77, 16) fixes the text-latent noise."""
        if self.dit is None:
            raise CheckpointError("this checkpoint has no text-to-image model")
        feats = self.clip.encode(prompts)                                              # (B, 77, C)
        if eps is None:
            eps = torch.randn((len(prompts), 77, 16), generator=generator)
        with self._autocast():
            z, _, _ = self.projector(feats, eps.to(self.device))                        # x0, (B, 77, 16)
            x1 = flow_dit.euler_sample(self.dit, z, steps=steps, cfg=cfg)
            images = self.tokenizer.decode_flow_tokens(x1, feats)
        return images.float().clamp(0, 1)

    @torch.no_grad()
    def caption(self, images, steps=20, cfg=2.0, generator=None, eps=None):
        """Images (B, 3, S, S) in [0, 1] -> captions (list of B str)."""
        if self.i2t_dit is None or self.text_decoder is None:
            raise CheckpointError("this checkpoint has no image-to-text model (train stages text-ae and flow-i2t)")
        if eps is None:
            eps = torch.randn((len(images), 77, 16), generator=generator)
        with self._autocast():
            mean, logvar = self.tokenizer.encode(images.to(self.device))
            x0 = self.tokenizer.flow_tokens(mean, logvar, eps.to(self.device))         # image tokens, t = 0
            latent = flow_dit.euler_sample(self.i2t_dit, x0, steps=steps, cfg=cfg)     # text latent, t = 1
            ids = self.text_decoder(latent).argmax(-1)                                  # (B, 77)
        return projector.detokenize(ids)


# ----------------------------------------------------------------------------------------------------------
# Loading: our runs and the official release
# ----------------------------------------------------------------------------------------------------------

def load_checkpoint(path):
    """A checkpoint file or a run folder (its last.pt) -> dict, read safely (tensors and plain types only)."""
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or "stage" not in ckpt:
        raise CheckpointError(f"{path} is not a train.py checkpoint (for the official files use --official)")
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
    raise CheckpointError(f"{ckpt_path} refers to {path}, which is missing")


def find_runs(path):
    """A run folder, a checkpoint file, or a demo folder holding stage subfolders -> {stage: checkpoint path}."""
    if os.path.isfile(path) or os.path.isfile(os.path.join(path, "last.pt")):
        return {load_checkpoint(path)["stage"]: path}
    found = {s: os.path.join(path, s) for s in ("flow", "flow-i2t", "text-ae", "tokenizer")
             if os.path.isfile(os.path.join(path, s, "last.pt"))}
    if not found:
        raise CheckpointError(f"no checkpoint at {path} (expected a file, a run folder with last.pt, or a demo "
                              f"folder with flow/last.pt)")
    return found


def _part(ckpt, name, cls, ema):
    """Rebuild one trained part of a checkpoint (EMA weights unless ema=False)."""
    module = cls(**ckpt["config"][name])
    module.load_state_dict(ckpt["ema" if ema else "model"][name])
    return module


def load_pipeline(path, device="cpu", ema=True, precision="fp32", clip_weights=None, tokenizer=None):
    """Our checkpoints -> FlowTokPipeline: a flow run (text to image), plus flow-i2t + text-ae if present."""
    runs = find_runs(path)
    if "flow" not in runs and "flow-i2t" not in runs:
        stage = next(iter(runs))
        raise CheckpointError(f"{runs[stage]} is a '{stage}' checkpoint; sampling needs a 'flow' (text to image) or "
                              f"'flow-i2t' (image to text) run")
    main = load_checkpoint(runs.get("flow") or runs["flow-i2t"])
    clip_cfg = main["config"]["clip"]
    clip = CLIPTextEncoder(clip_cfg["tower"], clip_weights or resolve_path(clip_cfg["weights"], main["path"]))
    tok_path = tokenizer or resolve_path(main["config"]["tokenizer"], main["path"])
    try:
        tok = tokenizer_lib.load_tokenizer(tok_path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"tokenizer {tok_path}: {e}") from None
    dit = proj = i2t = decoder = None
    if "flow" in runs:
        dit, proj = _part(main, "dit", FlowDiT, ema), _part(main, "projector", TextProjector, ema)
    if "flow-i2t" in runs:
        ck = load_checkpoint(runs["flow-i2t"])
        i2t = _part(ck, "dit", FlowDiT, ema)
        text_ae = load_checkpoint(resolve_path(ck["config"]["text_ae"], ck["path"]))
        decoder = _part(text_ae, "text_decoder", TextDecoder, True)
    mods = [m.to(device) if m is not None else None for m in (clip, proj, dit, tok, i2t, decoder)]
    return FlowTokPipeline(*mods, precision=precision)


def official_files(name, official_dir=None):
    """The released checkpoint and its tokenizer: from --official-dir, or the Hugging Face cache / download."""
    files = OFFICIAL[name]
    if official_dir:
        paths = [os.path.join(official_dir, f) for f in files]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise CheckpointError(f"missing {', '.join(missing)}: download {', '.join(files)} from "
                                  f"https://huggingface.co/{OFFICIAL_REPO} into {official_dir}")
        return paths
    try:
        from huggingface_hub import hf_hub_download
        return [hf_hub_download(OFFICIAL_REPO, f) for f in files]
    except Exception as e:
        raise CheckpointError(
            f"could not get {', '.join(files)} from the Hugging Face Hub ({type(e).__name__}); download them from "
            f"https://huggingface.co/{OFFICIAL_REPO} into a folder and pass --official-dir FOLDER") from None


def load_official_pipeline(name, device="cpu", official_dir=None, clip_weights=None, precision="fp32"):
    """The released FlowTok-XL / FlowTok-H (512 px, with FlowTiTok_512 and CLIP ViT-L/14-336) -> pipeline."""
    flow_path, tok_path = official_files(name, official_dir)
    try:
        dit, proj = flow_dit.load_official_flowtok(flow_path)
        tok = tokenizer_lib.load_official_tokenizer(tok_path)
    except ValueError as e:
        raise CheckpointError(str(e).splitlines()[0]) from None
    clip = CLIPTextEncoder(weights=clip_weights or "openai")
    return FlowTokPipeline(clip.to(device), proj.to(device), dit.to(device), tok.to(device), precision=precision)


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
            raise CheckpointError(f"--prompts {args.prompts}: {e}") from None
    return prompts


def image_paths(items):
    """Files and folders (their images, sorted) -> list of image paths."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            paths += sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise CheckpointError(f"no such image or folder: {item}")
    return paths


def main(args):
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "auto":
        args.device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda":
        args.device = f"cuda:{local}"
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    prompts = [] if args.caption else read_prompts(args)
    if not args.caption and not prompts:
        raise CheckpointError("no prompts: give them on the command line or with --prompts FILE")
    if not args.caption:
        try:
            os.makedirs(args.out, exist_ok=True)
            probe = os.path.join(args.out, f".write_test_{rank}")
            open(probe, "w").close()
            os.remove(probe)
        except OSError as e:
            raise CheckpointError(f"--out {args.out} is not writable ({e.strerror})") from None
    if args.official:
        pipe = load_official_pipeline(args.official, args.device, args.official_dir, args.clip_weights, args.precision)
    elif args.ckpt:
        pipe = load_pipeline(args.ckpt, args.device, not args.no_ema, args.precision, args.clip_weights,
                             args.tokenizer)
    else:
        raise CheckpointError("give --ckpt RUN_OR_FILE or --official FlowTok-XL|FlowTok-H")

    if args.caption:
        paths = image_paths(args.caption)
        size = pipe.tokenizer.image_size
        import data
        for start in range(0, len(paths), args.batch_size):
            chunk = paths[start:start + args.batch_size]
            images = []
            for p in chunk:
                try:
                    images.append(data.transform(data.load_image(p), size))
                except data.BadSample as e:
                    raise CheckpointError(f"{p}: {e.reason}") from None
            eps = torch.stack([sample_noise(start + i, 0, args.seed) for i in range(len(chunk))])
            for p, c in zip(chunk, pipe.caption(torch.stack(images), args.steps, args.cfg, eps=eps)):
                print(f"{p}\t{c}")
        return

    jobs = [(i, j) for i in range(len(prompts)) for j in range(args.n_per_prompt)][rank::world]
    written = []
    for start in range(0, len(jobs), args.batch_size):
        chunk = jobs[start:start + args.batch_size]
        eps = torch.stack([sample_noise(i, j, args.seed) for i, j in chunk])
        images = pipe.generate([prompts[i] for i, _ in chunk], args.steps, args.cfg, eps=eps)
        for (i, j), img in zip(chunk, to_uint8(images)):
            path = os.path.join(args.out, f"{i:05d}_{j:02d}.png")
            Image.fromarray(img).save(path)
            written.append(path)
    if world > 1:
        import torch.distributed as dist
        dist.init_process_group("gloo")         # only to wait for every rank before the grid
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0:
        names = sorted(f for f in os.listdir(args.out) if f.endswith(".png") and f[:5].isdigit())[:64]
        grid = torch.stack([torch.from_numpy(np.array(Image.open(os.path.join(args.out, f)))).permute(2, 0, 1)
                            for f in names]).float() / 255
        grid_path = save_grid(grid, os.path.join(args.out, "grid.png"), nrow=args.n_per_prompt
                              if args.n_per_prompt > 1 else 8)
        print(f"wrote {len(jobs) * world if world > 1 else len(written)} samples to {args.out} (grid: {grid_path})")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts_inline", nargs="*", metavar="PROMPT", help="prompts (text to image)")
    p.add_argument("--prompts", help="a text file, one prompt per line")
    p.add_argument("--caption", nargs="+", metavar="IMAGE", help="image files or folders to caption (image to text)")
    p.add_argument("--ckpt", help="a train.py run folder or checkpoint (a demo folder with stage subfolders too)")
    p.add_argument("--official", choices=list(OFFICIAL), help="the released checkpoints (Hugging Face turkeyju/FlowTok)")
    p.add_argument("--official-dir", help="a folder already holding the official files (offline use)")
    p.add_argument("--clip-weights", help="a local open_clip CLIP file instead of the recorded/downloaded one")
    p.add_argument("--tokenizer", help="use this tokenizer instead of the one the run recorded")
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-per-prompt", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-ema", action="store_true", help="use the raw (non-EMA) weights")
    return p


if __name__ == "__main__":
    args = build_parser().parse_args()
    try:
        main(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
