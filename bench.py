"""The speed and memory benchmark: text-to-image sampling through sample.py's pipeline and flow training steps
through train.py's step, with random weights; samples/s, time per stage, FLOP/s against the measured matmul peak,
peak memory.

  # 1 CPU: sampling with FlowTok-S (batch 8), and one training step of S in fp32
  python bench.py --model S --batch-size 8 --precision fp32 --device cpu
  python bench.py --train --model S --batch-size 16 --precision fp32 --device cpu --repeats 5
  # 1 GPU: XL sampling at batch 64, compiled; the suite of README's GPU table (XL and H, sampling and training)
  python bench.py --model XL --batch-size 64 --compile
  python bench.py --suite gpu --compile

Every number comes from the code a user runs: FlowTokPipeline's stages (source, flow, decode) and PNGWriter for
sampling, train.forward_backward and train.update for training; nothing here computes a loss or a sampler step.
"""
import argparse
import copy
import math
import os
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

try:
    import resource          # Unix only: peak memory on CPU
except ImportError:
    resource = None

import flow_dit
import runtime
import sample
import train
from flow_dit import DEFAULT_CFG, DEFAULT_STEPS, FLOW_MODELS
from projector import CLIPTextEncoder, CLIP_TOWERS, OFFICIAL_CLIP_TOWER, TextProjector
from runtime import AMP_DTYPES, PRECISIONS, amp, finite_float, pick_device, positive_int, run_cli
from tokenizer import TOKENIZER_PRESETS, Tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Timing, FLOPs, memory
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
    """The DiT of size --model (random weights), --depth overriding its depth -> (model, its name)."""
    dit = flow_dit.velocity_net(**{**FLOW_MODELS[args.model], **({"depth": args.depth} if args.depth else {})})
    return dit, f"DiT-{args.model}{f' (depth {args.depth})' if args.depth else ''} {_params(dit):.1f}M"


# ----------------------------------------------------------------------------------------------------------------
# The cases: sampling and training, each a list of (stage name, fn(steps), steps)
# ----------------------------------------------------------------------------------------------------------------

def speed_sampling(args, device, autocast, out):
    """Text -> image through FlowTokPipeline's stages (what generate runs), then PNGs into `out`, random weights
    -> (stages, models, pipeline). The flow stage's FLOPs are counted on 1 step and scaled (all steps alike)."""
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
        state["z"] = pipe.source(state["feats"], eps)                          # (B, 77, 16)

    def flow(steps):
        state["x1"] = pipe.flow(state["z"], steps, args.cfg)                   # 2B rows per DiT call

    def decode(steps):
        state["images"] = pipe.decode(state["x1"], state["feats"])

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


def training_run(args, device, out):
    """train.py's flow stage around a random DiT and text projector, ready for its step (AdamW, EMA, schedule as
    train.main builds them), and a batch in the pre-tokenised cache's layout (CLIP features, posterior, noise)
    -> (run, batch). Nothing is read from disk; `out` takes the run's log."""
    width, b = CLIP_TOWERS[args.clip_tower]["width"], args.batch_size
    targs = train.build_parser().parse_args(["--stage", "flow", "--out", out, "--global-batch", str(b),
                                             "--batch-size", str(b), "--precision", args.precision])
    train.fill_defaults(targs, 1, device)
    dit, _ = _speed_dit(args)
    dit.grad_checkpointing = args.grad_checkpointing              # the official trainer forces it on
    parts = {"dit": dit.to(device), "projector": TextProjector(clip_dim=width).to(device)}
    tok = Tokenizer.from_preset("tiny")                           # only its flow_tokens (the scale factor) runs
    run = runtime.Run(targs, 0, 1, 0, device)
    run.stage = run.model = train.FlowStage(targs, parts, {"tokenizer": tok, "clip": None})
    run.params = [p for p in run.stage.parameters() if p.requires_grad]
    run.optimizer = torch.optim.AdamW(run.stage.param_groups(), lr=targs.lr, betas=(targs.beta1, targs.beta2),
                                      weight_decay=targs.weight_decay, **runtime.fused_if_available(device))
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: train.lr_factor(s, targs))
    run.ema = copy.deepcopy(run.stage.parts).eval().requires_grad_(False)
    if args.compile:                                              # as train.py --compile
        run.model = torch.compile(run.model)
    noise = torch.randn(b, sum(train.FlowStage.noise.values()), device=device)
    batch = {"clip": torch.randn(b, 77, width, device=device), "ids": torch.zeros(b, 77, dtype=torch.long),
             "posterior": torch.randn(b, 77, 32, device=device), "noise": noise, "skipped": {}}
    return run, batch


def speed_training(args, device, out):
    """One flow training step through train.py: forward_backward (the stage's loss and its gradients), then update
    (clip, AdamW, EMA, schedule) -> (stages, models, (run, batch))."""
    run, batch = training_run(args, device, out)
    state = {}

    def forward_backward(steps):
        state["step"] = train.forward_backward(run, iter([batch]))

    def update(steps):
        train.update(run, *state.pop("step"))

    dit = run.stage.parts["dit"]
    name = f"DiT-{args.model}{f' (depth {args.depth})' if args.depth else ''} {_params(dit):.1f}M"
    models = (name + (" with gradient checkpointing" if args.grad_checkpointing else "") +
              f" + text projector {_params(run.stage.parts['projector']):.1f}M, trained with AdamW" +
              (" (torch.compile)" if args.compile else ""))
    return [("forward + backward", forward_backward, 1), ("update", update, 1)], models, (run, batch)


def compile_label(args, device):
    """How a sampling case runs: '' (eager), 'torch.compile', 'torch.compile, CUDA graphs' or 'torch.compile MODE'."""
    if not args.compile:
        return ""
    if args.compile_mode == "default":
        return "torch.compile"
    if args.compile_mode == "reduce-overhead" and device.type == "cuda":
        return "torch.compile, CUDA graphs"
    return f"torch.compile {args.compile_mode}"                   # on a CPU reduce-overhead records no graphs


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


# ----------------------------------------------------------------------------------------------------------------
# The reports: one case as a table, or the suite as markdown rows
# ----------------------------------------------------------------------------------------------------------------

def main(args):
    """Time the stages (after a warm-up that also counts their FLOPs) and print a table (or the suite) -> the rows."""
    device = pick_device(args.device)
    sample.warn_unused_compile_mode(args)
    if args.suite:
        return run_speed_suite(args, device)
    autocast, repeats, size, setup = speed_setup(args, device)
    batch_size = args.batch_size or 64
    args = argparse.Namespace(**{**vars(args), "batch_size": batch_size})
    with tempfile.TemporaryDirectory(prefix="flowtok-speed-") as out:
        if args.train:
            stages, models, _ = speed_training(args, device, out)
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
              ("forward, backward, update" if args.train else "prompts to PNG files, stages in sequence")
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
        tmp = tempfile.TemporaryDirectory(prefix="flowtok-speed-")
        stages, _, (run, _) = speed_training(case, device, tmp.name)
        dit = run.stage.parts["dit"]
        for checkpointing in (False, True):
            dit.grad_checkpointing = checkpointing
            name = (f"{model}{depth} training step, micro-batch {case.batch_size}"
                    f"{', gradient checkpointing' if checkpointing else ''}")
            add(suite_row(name, case.batch_size, *measure(stages, device, repeats), peak))
        del stages, dit, run
        tmp.cleanup()
    for model in SPEED_SUITES[args.suite] if args.compile else ():     # last: compiling takes the longest
        sampling(model, compiled=True)
    if args.compile and device.type == "cuda" and args.compile_mode != "reduce-overhead":   # graphs need a GPU
        sampling(SPEED_SUITES[args.suite][0], compiled=True, mode="reduce-overhead")        # XL: CUDA graphs
    print(f"\nTFLOP/s: FLOPs counted by torch's FlopCounterMode (matmuls and attention; with gradient "
          f"checkpointing the recomputed forward counts too) over the whole time. Memory: "
          f"{peak_memory(device)[1]}.")
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def build_parser():
    speed = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 1)[1],
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
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
    return speed


if __name__ == "__main__":
    sys.exit(run_cli("bench.py", main, build_parser().parse_args()))
