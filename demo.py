"""The embedded demo: the whole FlowTok pipeline on the built-in shapes world, trained and scored on a CPU.

  # 1 CPU: tokenizer -> pre-tokenised cache -> text to image -> text autoencoder -> image to text, then a report
  python demo.py --out runs/demo
  python demo.py --out runs/demo-seed1 --seed 1    # another seed: data order, initialisation, noise of every stage
  python demo.py --out runs/smoke --smoke        # a few steps per stage: a quick check that everything runs
  python sample.py --ckpt runs/demo "a large red circle on the left"    # sample from the result

The same command again continues an interrupted demo (finished stages are kept) or, when everything is trained,
only re-evaluates. Writes runs/demo/{tokenizer,cache,flow,text-ae,flow-i2t}/, report.json and heldout_grid.png.
The shapes analyser reads colour, shape, size and position back from an image; it scores generated images
(prompt accuracy) and generated captions (caption accuracy) against the held-out prompts.
"""
import argparse
import functools
import json
import os
import shutil
import sys
import time
from collections import Counter

import numpy as np
import torch
from scipy import ndimage

import data
import projector
import sample
import tokenizer
import train
from flow_dit import DEFAULT_CFG, DEFAULT_STEPS
from runtime import UserError, loss_text, non_negative_int, run_cli

# The demo: the whole FlowTok pipeline on the built-in shapes world, on a laptop CPU.
# Small sizes and the speed knobs of the real modules (a linear 77-token layout in the tokenizer, 7 latent
# tokens per transformer token in the DiT, the projector and the text decoder, a caption-vocabulary text decoder);
# the CLIP tower is random (no download). Two departures from the official recipe, both because the world has only
# 200 captions: the KL weight is 1e-5 instead of 0.01 (the official weight holds sigma at 1 and drowns the caption
# signal of z in noise: 16% prompt accuracy after 1000 steps against 74%), and captions repeated in a batch are all
# positives of the contrastive loss (--caption-groups). The tokenizer trains on L2 alone: no perceptual weights
# offline, and the GAN term at the recipe's fixed weight 0.1 swamps an L2 of 1e-3 (held-out PSNR 22.3 dB against
# 31.7 dB after the same 2000 steps, GAN on for the last 600; with --adaptive-gan 31.8 dB at 4x the step time). The
# tokenizer and the text autoencoder train without KL: sharp, nearly deterministic latents make the easiest flow
# targets here (a KL of 1e-6 on the text autoencoder lowered caption accuracy), and the demo never samples from the
# priors. The text projector drops dropout (on a CPU it cost a third of the text autoencoder's time, and captions
# came out better without it: 93.8% against 91.4%). The grouped text decoder trains 4x faster than one of 77 tokens
# and captions came out better (93.6% against 91.4%).
# Stability (measured over seeds and thread counts, BENCHMARKS.md "Demo"): every stage runs AdamW with beta2 0.95
# (the official flow recipe's) and decays its learning rate to 0 on a cosine. With beta2 0.99 the tokenizer at 4e-3
# diverged for good on some seeds and CPUs (its log-variance blew up: 13.6 dB); with 0.95 it holds up to 6e-3 and
# first spikes (and recovers) at 8e-3. Each peak below sits well inside the stage's stable range: tokenizer 4e-3
# (spikes from 8e-3), text to image 7e-3 (1.2e-2 as good, 2e-2 collapsed on one seed: 16%), text autoencoder 1e-3
# (5e-3 fine, 2e-2 diverged), image to text 1.5e-2 (its loss worsens from 4e-2). Higher peaks than the old
# recipe's (3e-3 for both flows) gave +3 points of prompt and +7 of caption accuracy at the same steps, which
# bought time: text to image 1000 steps instead of 1200 (800: 91.9% on seed 0, too close to the bar), image to
# text 400 instead of 800 (400 against 600 at 1.5e-2: -0.2 to -0.6 points). The tokenizer keeps its 1100 steps
# (900: 30.45 dB; batch 48: 30.44 and 30.90; batch 128 x 600 steps: 29.1 and 30.0) and the text autoencoder its
# 300 (150 at 3e-3: -3 to -6 points of caption accuracy). Checkpoints every 500 steps (a tokenizer checkpoint is
# 138 MB). A loss above 1.3x its best for 100 steps marks a stage as diverged (the report says so and the demo
# exits 1): this flagged every failed run above and none of ~40 sound ones.
DEMO_SPIKE = (1.3, 100)    # a loss above 1.3x its best for 100 steps: the stage diverged (runtime.SpikeWatch)
DEMO_COMMON = ["--image-size", "32", "--clip-tower", "demo", "--num-workers", "0", "--log-every", "50",
               "--spike-factor", str(DEMO_SPIKE[0]), "--spike-steps", str(DEMO_SPIKE[1]),
               "--ckpt-every", "500", "--sample-every", "0", "--warmup", "100", "--grad-clip", "1", "--beta2", "0.95",
               "--ema", "0.99", "--schedule", "cosine", "--min-lr", "0"]
DEMO_TEXT = ["--projector-depth", "2", "--projector-heads", "4", "--projector-ff", "256", "--projector-patch-size", "7",
             "--projector-dropout", "0", "--clip-weights", "{out}/tokenizer/clip_text.safetensors",
             "--data", "cache:{out}/cache"]
DEMO_FLOW = ["--model", "demo", "--dit-patch-size", "7", "--global-batch", "128", "--tokenizer", "{out}/tokenizer"]
DEMO = {   # stage -> (steps, steps with --smoke, arguments); {out} is the demo folder
    "tokenizer": (1100, 150, ["--tokenizer-preset", "demo", "--clip-weights", "random", "--data", "shapes:n=20000",
                              "--global-batch", "64", "--lr", "4e-3", "--warmup", "400", "--w-kl", "0",
                              "--w-perceptual", "0", "--w-gan", "0", "--no-random-crop", "--no-flip"]),
    "flow": (1000, 150, [*DEMO_FLOW, *DEMO_TEXT, "--lr", "7e-3", "--caption-groups", "--w-kl", "1e-5",
                          "--align-hidden", "128"]),
    "text-ae": (300, 40, [*DEMO_TEXT, "--decoder-width", "128", "--decoder-depth", "2", "--decoder-ff", "256",
                           "--decoder-patch-size", "7", "--decoder-vocab", "data", "--global-batch", "128",
                           "--lr", "1e-3", "--w-kl", "0"]),
    "flow-i2t": (400, 60, [*DEMO_FLOW, *DEMO_TEXT[-4:], "--lr", "1.5e-2", "--text-ae", "{out}/text-ae"]),
}
DEMO_CACHE = 8000          # pre-encoded training images for the flow stages (1024 with --smoke)


# ----------------------------------------------------------------------------------------------------------
# The shapes analyser and the accuracies it gives
# ----------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _templates(h, w):
    """The four data.SHAPES stretched over an h x w box -> (4, h, w) bool (4x supersampled, coverage > 0.5)."""
    u = ((np.arange(4 * w) + 0.5) / (4 * w) * 2 - 1)[None, :]  # (1, 4w) in (-1, 1)
    v = ((np.arange(4 * h) + 0.5) / (4 * h) * 2 - 1)[:, None]  # (4h, 1)
    masks = [u * u + v * v <= 1,
             np.ones((4 * h, 4 * w), bool),
             abs(u) <= (v + 1) / 2,  # apex at the top, base at the bottom
             abs(u) + abs(v) <= 1]
    return np.stack([np.broadcast_to(m, (4 * h, 4 * w)).reshape(h, 4, w, 4).mean((1, 3)) > 0.5 for m in masks])


def analyse_shape(image):
    """Read a shapes image ((3, S, S) or (S, S, 3), values in [0, 1]) back -> dict(colour, shape, size, position).

    Values are None when no foreground is found.
    """
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()  # e.g. generated on the GPU
    x = np.asarray(image, dtype=np.float32)
    if x.shape[0] == 3:
        x = x.transpose(1, 2, 0)  # (S, S, 3)
    side = x.shape[0]
    background = np.median(np.concatenate([x[0], x[-1], x[:, 0], x[:, -1]]), axis=0)  # (3,)
    distance = np.linalg.norm(x - background, axis=-1)  # (S, S)
    peak = np.percentile(distance, 99.5)
    labels, count = ndimage.label(distance > peak / 2)
    if peak <= 0 or count == 0:
        return {"colour": None, "shape": None, "size": None, "position": None}
    mask = labels == 1 + np.bincount(labels.ravel())[1:].argmax()  # the largest component
    core = mask & (distance > 0.75 * peak)  # edge pixels are blended with the background: colour the core
    rgb = x[core if core.any() else mask].mean(0)
    colour = int(np.linalg.norm(data.RGB - rgb, axis=1).argmin())
    ys, xs = np.nonzero(mask)
    box = mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    templates = _templates(*box.shape)
    iou = (templates & box).sum((1, 2)) / (templates | box).sum((1, 2))
    shape = int(iou.argmax())
    area = mask.sum() / side ** 2
    size = int(area > data.AREA[shape] * data.RADIUS[0] * data.RADIUS[1])  # threshold: geometric mean of the two areas
    centroid = np.array([xs.mean() + 0.5, ys.mean() + 0.5]) / side
    position = int(np.linalg.norm(data.CENTRE - centroid, axis=1).argmin())
    return {"colour": data.COLOURS[colour], "shape": data.SHAPES[shape], "size": data.SIZES[size],
            "position": data.POSITIONS[position]}


def parse_caption(text):
    """A shapes caption (any case, extra spaces, final '.') -> attrs dict, or None if it is not one."""
    match = data.CAPTION_PATTERN.fullmatch(" ".join(str(text).lower().split()).rstrip("."))
    if match is None:
        return None
    size, colour, shape, where = match.groups()
    return {"colour": colour, "shape": shape, "size": size, "position": data.POSITIONS[data.WHERE.index(where)]}


def shape_accuracy(images, attrs):
    """Fraction of images whose analysed colour, shape, both, size, position match attrs (dicts or captions)."""
    hits = Counter()
    for image, want in zip(images, attrs):
        want = parse_caption(want) if isinstance(want, str) else want
        got = analyse_shape(image)
        for key in ("colour", "shape", "size", "position"):
            hits[key] += want is not None and got[key] == want[key]
        hits["both"] += want is not None and got["colour"] == want["colour"] and got["shape"] == want["shape"]
    return {key: hits[key] / max(len(attrs), 1) for key in ("colour", "shape", "both", "size", "position")}


def shapes_prompt_accuracy(pipe, prompts, n_per_prompt=4, steps=DEFAULT_STEPS, cfg=DEFAULT_CFG, seed=0,
                           batch_size=256):
    """Generate n_per_prompt images per shapes prompt, read them back (analyse_shape) -> accuracies.

    Returns {colour, shape, both, size, position}: the fraction of images whose attribute matches the prompt.
    """
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n_per_prompt)]
    images = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        eps = torch.stack([sample.sample_noise(i, j, seed) for i, j in chunk])
        images.append(pipe.generate([prompts[i] for i, _ in chunk], steps, cfg, eps=eps).cpu())
    return shape_accuracy(torch.cat(images), [prompts[i] for i, _ in jobs])


def shapes_caption_accuracy(captions, attrs):
    """Generated captions vs the true attributes of their images -> {colour, shape, both, size, position, parsed}."""
    hits, n = Counter(), max(len(captions), 1)
    for caption, want in zip(captions, attrs):
        got = parse_caption(caption) or {}
        hits["parsed"] += bool(got)
        for key in ("colour", "shape", "size", "position"):
            hits[key] += got.get(key) == want[key]
        hits["both"] += got.get("colour") == want["colour"] and got.get("shape") == want["shape"]
    return {k: hits[k] / n for k in ("colour", "shape", "both", "size", "position", "parsed")}


# ----------------------------------------------------------------------------------------------------------
# The demo: every stage in sequence, then the report
# ----------------------------------------------------------------------------------------------------------

def demo_args(stage, out, smoke, seed=0):
    """The parsed arguments of one demo stage."""
    steps, smoke_steps, extra = DEMO[stage]
    argv = DEMO_COMMON + [a.format(out=out) for a in extra] + ["--stage", stage, "--out", os.path.join(out, stage),
                                                              "--steps", str(smoke_steps if smoke else steps),
                                                              "--seed", str(seed)]
    return train.build_parser().parse_args(argv)


def run_demo(args):
    """The demo: tokenizer -> pre-tokenised cache -> text-to-image -> text autoencoder -> image-to-text,
    then a report (report.json + a printed table) and a sample grid; a rerun continues an interrupted demo."""
    out, times, spikes = args.out, {}, {}
    os.makedirs(out, exist_ok=True)
    print(f"FlowTok demo in {out}: the built-in shapes world, {'smoke-test sizes' if args.smoke else 'full run'}, "
          f"seed {args.seed}")
    print("note: the CLIP text tower is random (untrained, no download); captions become fixed features")
    for stage in ("tokenizer", "pretokenize", "flow", "text-ae", "flow-i2t"):
        t0 = time.time()
        if stage == "pretokenize":
            if not os.path.exists(os.path.join(out, "cache", "done")):
                shutil.rmtree(os.path.join(out, "cache"), ignore_errors=True)
                n = 1024 if args.smoke else DEMO_CACHE
                data.pretokenize(data.build_parser().parse_args([
                    "pretokenize", "--data", f"shapes:n={n}", "--tokenizer", os.path.join(out, "tokenizer"),
                    "--out", os.path.join(out, "cache"), "--num-workers", "0"]))
                open(os.path.join(out, "cache", "done"), "w").close()
        else:
            stage_args = demo_args(stage, out, args.smoke, args.seed)
            last = os.path.join(stage_args.out, "last.pt")
            ckpt = torch.load(last, weights_only=True) if os.path.exists(last) else None
            if ckpt is not None and ckpt["args"]["seed"] != args.seed:
                raise UserError(f"{out} holds a demo of --seed {ckpt['args']['seed']}: run it again with that seed, "
                                f"or give this seed its own --out")
            spikes[stage] = ckpt["stats"].get("spikes", {}).get("episodes", []) if ckpt else []
            if ckpt is not None and ckpt["step"] >= stage_args.steps:
                print(f"{stage}: already trained ({last})")
                continue
            stage_args.resume = ckpt is not None
            print(f"--- {stage}: {stage_args.steps} steps")
            result = train.main(stage_args)
            spikes[stage] = result["spikes"]
            if result["stopped"]:                                 # a signal: the stage saved; stop the demo too
                print(f"demo stopped during {stage}; run the same command again to continue")
                return result
        times[stage] = time.time() - t0
    t0 = time.time()
    report = demo_report(out, args.smoke, args.seed)
    times["evaluation"] = time.time() - t0
    report["loss_spikes"] = spikes          # per stage: the episodes train.SpikeWatch recorded (none: a sound run)
    report["diverged"] = [stage for stage, episodes in spikes.items() if episodes]
    report["wall_time_s"] = {k: round(v, 1) for k, v in times.items()}
    report["wall_time_s"]["total"] = round(sum(times.values()), 1)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print_report(report, out)
    if report["diverged"]:
        raise UserError(f"the {', '.join(report['diverged'])} stage diverged (a loss spike it did not recover from "
                        f"within {DEMO_SPIKE[1]} steps; see {out}/<stage>/log.txt): the report above is not the "
                        f"recipe's result")
    return report


@torch.no_grad()
def demo_report(out, smoke=False, seed=0):
    """Held-out numbers: tokenizer PSNR, prompt accuracy (CFG 2, no CFG, novel pairs), caption accuracy, CIDEr."""
    pipe = sample.load_pipeline(out)
    n_img, per_prompt = (32, 1) if smoke else (512, 4)
    images, attrs = data.shapes_batch("heldout", list(range(n_img)), size=pipe.tokenizer.image_size)
    mean, _ = pipe.tokenizer.encode(images)
    recon = pipe.tokenizer.decode(mean).clamp(0, 1)
    psnr = tokenizer.psnr(((recon - images) ** 2).mean(dim=(1, 2, 3))).mean().item()
    prompts = data.shapes_prompts("heldout")[::8 if smoke else 1]          # 25 of the 200 with --smoke
    novel = data.shapes_prompts("novel")[::4 if smoke else 1]
    report = {"seed": seed, "tokenizer_psnr_db": round(psnr, 2), "samples_per_prompt": per_prompt,
              "heldout_prompts": len(prompts), "novel_prompts": len(novel)}
    report["prompt_accuracy_cfg2"] = shapes_prompt_accuracy(pipe, prompts, per_prompt, cfg=DEFAULT_CFG, seed=seed)
    report["prompt_accuracy_no_cfg"] = shapes_prompt_accuracy(pipe, prompts, per_prompt, cfg=1.0, seed=seed)
    report["novel_pair_accuracy_cfg2"] = shapes_prompt_accuracy(pipe, novel, per_prompt, cfg=DEFAULT_CFG, seed=seed)
    eps = torch.stack([sample.sample_noise(i, 0, seed) for i in range(n_img)])
    captions = pipe.caption(images, steps=DEFAULT_STEPS, cfg=DEFAULT_CFG, eps=eps)
    report["caption_accuracy"] = shapes_caption_accuracy(captions, attrs)
    truth = [data.caption_for(a) for a in attrs]
    report["caption_cider_d"] = round(projector.cider_d(dict(enumerate(captions)),
                                                       {i: [t] for i, t in enumerate(truth)}), 3)
    report["caption_examples"] = [f"{t} -> {c}" for t, c in list(zip(truth, captions))[:5]]
    grid_prompts = prompts[::max(1, len(prompts) // 16)][:16]
    eps = torch.stack([sample.sample_noise(i, j, seed) for i in range(len(grid_prompts)) for j in range(4)])
    grid = pipe.generate([p for p in grid_prompts for _ in range(4)], cfg=DEFAULT_CFG, eps=eps)
    report["grid"] = sample.save_grid(grid, os.path.join(out, "heldout_grid.png"), nrow=4)
    with open(os.path.join(out, "heldout_grid.txt"), "w") as f:
        f.write("\n".join(grid_prompts) + "\n")
    return report


def print_report(r, out):
    """The demo's report as a table."""
    acc = lambda d: f"both {d['both']:.1%}  colour {d['colour']:.1%}  shape {d['shape']:.1%}  " \
                    f"size {d['size']:.1%}  position {d['position']:.1%}"
    rows = [("seed", str(r["seed"])), ("tokenizer PSNR, held-out images", f"{r['tokenizer_psnr_db']:.2f} dB"),
            (f"prompt accuracy, {r['heldout_prompts']} held-out prompts x {r['samples_per_prompt']}, CFG 2",
             acc(r["prompt_accuracy_cfg2"])),
            ("  same, no CFG (CFG 1)", acc(r["prompt_accuracy_no_cfg"])),
            (f"  {r['novel_prompts']} prompts of colour-shape pairs never trained", acc(r["novel_pair_accuracy_cfg2"])),
            ("caption accuracy (image to text)", acc(r["caption_accuracy"])),
            ("caption CIDEr-D vs the true captions", f"{r['caption_cider_d']:.3f}")]
    rows += [(f"wall time: {k}", f"{v:.0f} s") for k, v in r["wall_time_s"].items()]
    rows += [(f"DIVERGED: {stage}", "; ".join(f"steps {e['start']}-{e['end'] or 'end'}, loss peak "
                                               f"{loss_text(e['peak'])} against a best of {loss_text(e['best'])}"
                                               for e in r["loss_spikes"][stage])) for stage in r["diverged"]]
    width = max(len(a) for a, _ in rows)
    print("\n" + "\n".join(f"{a:<{width}}  {b}" for a, b in rows))
    print("\nexamples: " + "\n          ".join(r["caption_examples"][:3]))
    print(f"report: {os.path.join(out, 'report.json')}   grid: {r['grid']}   "
          f"sample: python sample.py --ckpt {out} \"a large red circle on the left\"")


def main(args):
    """Run the demo -> its report."""
    return run_demo(args)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="the demo folder: one subfolder per stage, the report")
    p.add_argument("--smoke", action="store_true", help="a few steps per stage and 25 prompts (a quick check)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seeds every stage: data order, initialisation (the random CLIP tower too), noise")
    return p


if __name__ == "__main__":
    sys.exit(run_cli("demo.py", main, build_parser().parse_args()))
