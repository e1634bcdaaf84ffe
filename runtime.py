"""Operations shared by every entry point, and nothing of FlowTok: what makes a run safe, not what it computes.

  errors and exit codes   UserError (one line, exit 1), run_cli, argparse types that fail at parse time (exit 2)
  files                   one atomic writer (atomic_path / atomic_write), one writability probe, safe weight reading
  devices and precision   pick_device, default_precision, amp, fused AdamW where available
  ranks                   one reader of torchrun's environment (dist_env), set-up, broadcast, agree, gather
  run folders             RunLock (one writer per folder), checkpoint writing and choosing, the resume policy
  signals and logs        stop_signals, MetricsLog (metrics.jsonl, TensorBoard), SpikeWatch (a diverged run)

The lowest file: it imports no other file of the project, and every other file may import it.
"""
import argparse
import contextlib
import ctypes
import datetime
import errno
import glob
import hashlib
import io
import json
import math
import os
import random
import re
import signal
import socket
import sys
import time
from collections import Counter
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file

try:
    import fcntl      # POSIX: the kernel drops a dead process's flock, the surest test of a stale lock file
except ImportError:   # Windows: the lock file and its pid alone
    fcntl = None
try:
    from torch.utils.tensorboard import SummaryWriter   # optional: --tensorboard needs the tensorboard package
except ImportError:
    SummaryWriter = None

# How long a collective waits for the slowest rank before the job fails (torch's default is 10 minutes with NCCL):
# the other ranks wait at a barrier while rank 0 alone writes a multi-GB checkpoint to a shared filesystem or draws
# the preview samples, which can take many minutes; an hour still ends a truly hung job the same day.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)
SHARED = "--out must be on a filesystem all nodes share"


# ----------------------------------------------------------------------------------------------------------
# Errors, exit codes and flag types: a user's mistake is one line, never a traceback
# ----------------------------------------------------------------------------------------------------------

class UserError(Exception):
    """A user's mistake (a bad file, flag or input): every CLI prints it as one line and exits with status 1."""


def one_line(err):
    """An exception -> one line: its first line, plus up to three more joined with '; '."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    more = "; ".join(lines[1:4]) + ("; ..." if len(lines) > 4 else "")
    return lines[0] + (f" ({more})" if more else "")


@contextlib.contextmanager
def user_errors(what):
    """Turn the errors of loading user-given files (bad shapes, missing keys, no file) into a UserError."""
    try:
        yield
    except UserError:
        raise
    except (ValueError, KeyError, TypeError, RuntimeError, OSError) as e:
        raise UserError(f"{what}: {one_line(e)}") from None


def run_cli(prog, main, args):
    """Run a CLI's main -> the exit status: 0 done, 1 a user error (one line on stderr, no traceback),
    128 + N a run stopped by signal N after saving (main returns {"stopped": N}); argparse exits 2 on bad flags."""
    try:
        result = main(args)
    except UserError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 1
    return 128 + result["stopped"] if isinstance(result, dict) and result.get("stopped") else 0


def checked(kind, ok, what, name):
    """An argparse type: kind(text) that must satisfy ok, else a one-line error naming the flag (exit 2)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = name
    return parse


# argparse types for every numeric flag: a bad value stops at parse time, never as a wrong or crashed run
positive_int = checked(int, lambda v: v >= 1, ">= 1", "positive_int")
non_negative_int = checked(int, lambda v: v >= 0, ">= 0", "non_negative_int")
finite_float = checked(float, math.isfinite, "a finite number", "finite_float")
positive_float = checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0", "positive_float")
non_negative_float = checked(float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0",
                             "non_negative_float")
fraction = checked(float, lambda v: 0 <= v <= 1, "in [0, 1]", "fraction")


def multiple_of(n):
    """An argparse type for widths split into n groups (GroupNorm(n, width)): n, 2n, 3n, ..."""
    return checked(int, lambda v: v >= n and v % n == 0, f"a multiple of {n}", f"multiple_of_{n}")


# ----------------------------------------------------------------------------------------------------------
# Files: one atomic writer, one writability probe, weights read safely (never unpickled)
# ----------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_path(path):
    """-> a temporary name next to `path` (path.PID.tmp) to write by name; renamed onto `path` when the block ends,
    removed when it fails: readers see the old file or the whole new one, never a part, and a second process
    writing the same name never shares a partial file. The one atomic writer of the project."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_write(path, mode="w", sync=False):
    """atomic_path as an open file (text: UTF-8); sync: on disk (fsync) before the rename."""
    with atomic_path(path) as tmp, open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
        yield f
        if sync:
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(path, obj):
    """Write obj as JSON atomically (atomic_write)."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def share_with_group(path):
    """Give a file the permissions of a new file under the umask (0644 for the usual 022): tempfile-style writers
    create 0600 files that colleagues on a shared filesystem cannot read."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def read_json(path):
    """A small JSON file's content, or None when it is missing or unreadable."""
    try:
        with open(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def _npy_header(f):
    """An open .npy file -> (shape, dtype, header writer, data offset); ValueError when it is no growable array."""
    fmt = np.lib.format
    version = fmt.read_magic(f)
    read, write = {(1, 0): (fmt.read_array_header_1_0, fmt.write_array_header_1_0),
                   (2, 0): (fmt.read_array_header_2_0, fmt.write_array_header_2_0)}[version]
    shape, fortran, dtype = read(f)
    if fortran or not shape:
        raise ValueError(f"{f.name}: not a C-order array with rows")
    return shape, dtype, write, f.tell()


def _set_npy_rows(f, shape, dtype, write, data_start, rows):
    """Rewrite an .npy header in place for `rows` rows (numpy's header keeps room for the first axis to grow)."""
    header = io.BytesIO()
    write(header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                   "shape": (rows,) + tuple(shape[1:])})
    if len(header.getvalue()) != data_start:
        raise ValueError(f"{f.name}: the .npy header has no room to grow; rewrite the cache")
    f.seek(0)
    f.write(header.getvalue())


def append_npy(path, rows):
    """Append rows to an .npy file in place: data first, header last, so an interrupted append leaves the old array
    (plus bytes past its end that the next append overwrites and npy_rows ignores)."""
    if not os.path.exists(path):
        np.save(path, rows)
        return
    with open(path, "r+b") as f:
        shape, dtype, write, data_start = _npy_header(f)
        if dtype != rows.dtype or shape[1:] != rows.shape[1:]:
            raise ValueError(f"{path}: cannot append {rows.dtype}{rows.shape[1:]} rows to {dtype}{shape[1:]}")
        f.seek(data_start + int(np.prod(shape)) * dtype.itemsize)
        f.write(rows.tobytes())
        _set_npy_rows(f, shape, dtype, write, data_start, shape[0] + len(rows))


def npy_rows(path):
    """The whole rows of an .npy file: those its header declares and whose bytes are all there (0: no file, or a
    header cut short by a kill)."""
    try:
        with open(path, "rb") as f:
            shape, dtype, _, data_start = _npy_header(f)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        return 0
    except (ValueError, KeyError, EOFError):
        return 0
    row = int(np.prod(shape[1:])) * dtype.itemsize
    return min(shape[0], (size - data_start) // row) if row else shape[0]


def truncate_npy(path, rows):
    """Cut an .npy file back to its first `rows` rows (header and bytes); an unreadable one is removed."""
    try:
        with open(path, "r+b") as f:
            shape, dtype, write, data_start = _npy_header(f)
            _set_npy_rows(f, shape, dtype, write, data_start, rows)
            f.truncate(data_start + rows * int(np.prod(shape[1:])) * dtype.itemsize)
    except (ValueError, KeyError, EOFError):
        if rows:
            raise
        os.remove(path)


def lines_and_cut(path, keep=None):
    """Complete lines (ending in a newline) of a text file -> their count; with `keep`, also cut the file after its
    first `keep` lines (a last line without its newline, left by a kill, always goes)."""
    count = end = offset = 0
    with open(path, "rb" if keep is None else "r+b") as f:     # counting works on a read-only cache too
        for block in iter(lambda: f.read(1 << 20), b""):    # counted in C: a cache may hold a billion lines
            n = block.count(b"\n")
            if keep is not None and count + n >= keep:      # the keep-th line ends in this block
                at = -1
                for _ in range(keep - count):
                    at = block.index(b"\n", at + 1)
                count, end = keep, offset + at + 1
                break
            count += n
            end = offset + block.rindex(b"\n") + 1 if n else end
            offset += len(block)
        if keep is not None:
            f.truncate(end)
    return count


def expand_braces(pattern):
    """'a-{00..02}.tar' -> ['a-00.tar', 'a-01.tar', 'a-02.tar']; '{x,y}' lists too; zero padding is kept."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.groups()
        padded = any(len(end) > 1 and end.startswith("0") for end in (lo, hi))  # "000..099" but not "0..10"
        width = max(len(lo), len(hi)) if padded else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    head, tail = pattern[:match.start()], pattern[match.end():]
    return [out for item in items for out in expand_braces(head + item + tail)]


@contextlib.contextmanager
def write_errors(what, then=""):
    """An OSError while writing `what` -> one line naming it (a full disk says so), plus what to do `then`."""
    try:
        yield
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        where = e.filename2 or e.filename
        raise UserError(f"{'the disk is full: ' if full else ''}cannot write {what} ({e.strerror or e}"
                        f"{f': {where}' if where and not full else ''}){f'; {then}' if then else ''}") from None


def check_writable(out, rank=0):
    """Create `out` and prove it writable now, before any model is loaded or any work is done (the one probe)."""
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, f".write_test_{rank}_{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"--out {out} is not writable ({e.strerror or e})") from None


def read_weights(path):
    """A weights file -> its contents, read safely: safetensors, or torch.load(weights_only=True). A missing, corrupt
    or unsafe file is a UserError of one line (never the advice to load it unsafely that torch's message carries)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    try:
        return load_file(path) if str(path).endswith(".safetensors") else torch_load(path)
    except Exception as e:     # pickle, zip, safetensors and OS errors alike: the file cannot be used
        why = one_line(e)[:200]
        if "weights_only" in str(e):
            why = "it holds Python objects besides tensors and plain types, which are not loaded (unsafe)"
        raise UserError(f"{path} is not a readable weights file ({type(e).__name__}: {why})") from None


def torch_load(path):
    """torch.load(weights_only=True) to CPU, memory-mapped where the file's format and filesystem allow."""
    # mapped, a checkpoint's tensors are pages of the OS file cache that all ranks of a node share, not one private
    # copy of many GB per rank; legacy-format files (and filesystems without mmap) are read the ordinary way.
    # Not on Windows: it can neither replace nor delete a mapped file, as a resumed run does to its last.pt.
    if os.name != "nt":
        with contextlib.suppress(Exception):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(src):
    """A path or a dict -> a flat state dict: unwraps {ema, nnet_ema, model, state_dict} and module./_orig_mod."""
    sd = read_weights(src) if isinstance(src, (str, bytes)) or hasattr(src, "__fspath__") else src
    for key in ("ema", "nnet_ema", "model", "state_dict"):     # EMA weights preferred when both are present
        if isinstance(sd.get(key), dict):
            return read_state_dict(sd[key])
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def load_strict(model, sd, what):
    """Load every key with matching shapes, or raise one error that lists everything that does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
             for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        lines = [f"{what} checkpoint does not fit the model:"]
        lines += [f"  missing: {k}" for k in missing] + [f"  unexpected: {k}" for k in unexpected]
        lines += [f"  shape: {w}" for w in wrong]
        raise ValueError("\n".join(lines))
    model.load_state_dict(sd, strict=True, assign=True)


def state_dict_misfit(own, src):
    """The keys of two state dicts that do not match -> up to 3 described, and the count, or '' when they fit."""
    wrong = [f"{k} missing" for k in own if k not in src] + [f"{k} unexpected" for k in src if k not in own]
    wrong += [f"{k} {tuple(src[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in src and src[k].shape != own[k].shape]
    return ", ".join(wrong[:3]) + (f" ({len(wrong)} keys in all)" if len(wrong) > 3 else "")


def load_checkpoint(path):
    """A checkpoint file or a run folder (its last.pt) -> dict, read safely (tensors and plain types only)."""
    if os.path.isdir(path):
        path = os.path.join(path, "last.pt")
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    ckpt = read_weights(path)
    if not isinstance(ckpt, dict) or "stage" not in ckpt:
        raise UserError(f"{path} is not a train.py checkpoint (for the official files use --official)")
    ckpt["path"] = path
    return ckpt


def init_from_run(parts, args, shape_flags):
    """--init: the parts {name: module} := the same parts of another run's checkpoint (any stage that has them;
    --init-from-ema: its EMA weights). One that does not fit is told by the shape_flags whose values differ."""
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
        misfit = state_dict_misfit(m.state_dict(), weights[name])
        if misfit:
            flags = [f"--{k.replace('_', '-')} {saved[k]} there, {getattr(args, k)} here" for k in shape_flags
                     if k in saved and saved[k] != getattr(args, k)]
            raise UserError(f"--init {args.init} (a '{init['stage']}' run) does not fit this '{args.stage}' run"
                            f"{': ' + '; '.join(flags) if flags else ''}; its {name}: {misfit}")
        m.load_state_dict(weights[name])


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
    raise UserError(f"{ckpt_path} refers to {path}, which is missing")


def weights_sha256(*modules):
    """sha256 hex of modules' (or state dicts') tensors: key, dtype, shape and bytes, keys sorted, modules in order.

    The identity of weights, not of a file: the same tensors hash the same from any file format, device or key
    order, and a checkpoint's unused copies (raw weights beside the EMA ones, optimizer state) do not count.
    """
    digest = hashlib.sha256()
    for k, module in enumerate(modules):
        sd = module.state_dict() if isinstance(module, nn.Module) else module
        for key in sorted(sd):
            t = sd[key].detach().cpu().contiguous()
            digest.update(f"{k}:{key}:{t.dtype}:{tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())     # raw bytes (bfloat16 has no numpy dtype)
    return digest.hexdigest()


def file_sha256(path, chunk=1 << 20):
    """sha256 hex of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def short_hash(digest):
    """The first 12 hex digits of a hash, for messages (None -> 'none')."""
    return digest[:12] if digest else "none"


# ----------------------------------------------------------------------------------------------------------
# Devices and precision
# ----------------------------------------------------------------------------------------------------------

def pick_device(name, local_rank=0):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' | 'mps' -> torch.device; auto: CUDA, then MPS, then CPU; under torchrun,
    auto / cuda mean the local rank's GPU."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return use_cuda(torch.device("cuda", local_rank))
    if name == "auto":                                   # then Apple's GPU, then the CPU
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: Apple's MPS is not available here")
    return use_cuda(device) if device.type == "cuda" else device


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}     # --precision choices besides fp32
PRECISIONS = ["bf16", "fp16", "fp32"]


def default_precision(device):
    """bf16 where the GPU computes it natively (Ampere and later), fp16 on older CUDA GPUs (V100, T4), fp32 on CPU
    and Apple's MPS."""
    if device.type != "cuda":
        return "fp32"
    try:
        native = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:                        # older torch: no emulation to exclude
        native = torch.cuda.is_bf16_supported()
    return "bf16" if native else "fp16"


def amp(device, precision):
    """Autocast to `precision` (bf16 | fp16) on `device`; fp32: a disabled context."""
    return torch.autocast(device.type, dtype=AMP_DTYPES.get(precision, torch.bfloat16), enabled=precision in AMP_DTYPES)


def fp32_region(x):
    """A context with autocast off on x's device: code inside that casts its inputs with .float() runs in float32.

    Under bf16 autocast a .float() input alone is not enough: matmuls and Linear layers still run in bf16.
    """
    return torch.autocast(x.device.type, enabled=False)


def use_cuda(device):
    """Make `device` this process's current GPU and let fp32 matmuls use TF32, as every entry point does."""
    torch.cuda.set_device(device)            # NCCL and bare .cuda() calls go to this rank's GPU, not GPU 0
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return device


def fused_if_available(device):
    """AdamW's fused kernel where this torch has it for the device (CUDA; CPU from torch 2.4)."""
    try:
        torch.optim.AdamW([torch.zeros(1, device=device, requires_grad=True)], fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError):
        return {}


# ----------------------------------------------------------------------------------------------------------
# Ranks: torchrun's environment, set-up, and one decision or one error for every rank
# ----------------------------------------------------------------------------------------------------------

def seed_of(*parts):
    """Mix ints and strings into a 63-bit seed, e.g. (seed, "noise", position): one independent stream each."""
    digest = hashlib.blake2b(",".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def generator(*parts):
    """A torch.Generator seeded by seed_of(*parts)."""
    return torch.Generator().manual_seed(seed_of(*parts))


def dist_env():
    """(rank, world, local rank) from torchrun's environment, (0, 1, 0) without it: the one place that reads it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def rank_world(rank=None, world=None):
    """Explicit rank and world size, or torch.distributed's, or (0, 1)."""
    initialised = dist.is_available() and dist.is_initialized()
    if world is None:
        world = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    return rank, world


def setup_distributed():
    """(rank, world, local_rank, device) from torchrun's environment; NCCL on GPU, gloo on CPU."""
    rank, world, local = dist_env()
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        use_cuda(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return rank, world, local, device


@contextlib.contextmanager
def ranks():
    """-> (rank, world, local rank) from torchrun's environment, (0, 1, 0) without it; world > 1 joins a gloo group.

    The group only serves barriers (wait for every rank's images) and agreements on errors (agree), so gloo works on
    CPU and GPU alike.
    """
    rank, world, local = dist_env()
    if world > 1 and not dist.is_initialized():
        # hours: a barrier waits for the slowest rank's whole share of the samples (uneven after --skip-existing)
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=12))
    try:
        yield rank, world, local
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def barrier(world):
    """Wait for every rank (no-op alone)."""
    if world > 1:
        dist.barrier()


def broadcast(obj, world):
    """Rank 0's picklable `obj` on every rank (as is alone): one decision for all, never one per rank."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj, world):
    """The list of obj from every rank (rank order)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def agree(problem, world):
    """Every rank calls this at the same point with None or its one-line problem; a problem on any rank raises the
    same UserError (the lowest failing rank's) on every rank, so none waits forever for a rank that left."""
    problems = [problem]
    if world > 1:
        problems = [None] * world
        dist.all_gather_object(problems, problem)
    failed = [p for p in problems if p]
    if failed:
        raise UserError(failed[0] + (f" ({len(failed)} of {world} ranks failed)" if len(failed) > 1 else ""))


def on_every_rank(world, rank, fn, *args):
    """fn(*args) on this rank -> its result; a UserError on any rank stops every rank with that one message."""
    if world == 1:
        return fn(*args)
    try:
        result, problem = fn(*args), None
    except UserError as e:
        result, problem = None, (f"rank {rank}: " if rank else "") + one_line(e)
    agree(problem, world)
    return result


def same_on_every_rank(value, what, rank, world):
    """Stop every rank when this rank's `value` (e.g. the number of samples it sees) differs from rank 0's."""
    ref = broadcast(value, world)
    agree(f"rank {rank} sees {value} {what}, rank 0 sees {ref}: every node must see the same" if value != ref
          else None, world)


def any_rank(flag, world, device):
    """True on every rank when `flag` is true on any (a signal reached one process: all stop together)."""
    if world == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


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

def share_rank0s_weights(module, world):
    """Every parameter and buffer of `module` := rank 0's (DDP's own start-up broadcast may leave buffers out)."""
    if world > 1:
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t, src=0)


def weight_checksum(module):
    """(sum, sum of squares) of all parameters in float64: equal on ranks that hold the same weights."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in module.parameters()])
        return [flat.sum().item(), flat.square().sum().item()]


# ----------------------------------------------------------------------------------------------------------
# Run folders: one writer (RunLock), checkpoints written atomically and chosen for --resume
# ----------------------------------------------------------------------------------------------------------

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
        raise UserError(f"{self.out}: {self.path} keeps changing hands; is another process starting there?")

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
            raise UserError(f"{self.out} is locked by {self.path}, which names no process; if none uses {self.out}, "
                            f"delete {self.path}")
        who = f"pid {holder['pid']} on host {holder['host']} since {holder['since']}"
        here = holder["host"] == self.me["host"]
        if not here or locked is False or (locked is None and process_running(int(holder["pid"]))):
            os.close(fd)
            raise UserError(f"{self.out} is in use by {who}; " + (
                "wait for it to end or stop it, or use another --out" if here else
                f"if nothing runs there any more, delete {self.path} and start again"))
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


def check_output_folder(out, resume):
    """Prove out/ (created and locked by RunLock) is writable; refuse to overwrite a run unless resuming."""
    check_writable(out)
    last = os.path.join(out, "last.pt")
    if os.path.isdir(last) and not os.path.islink(last):  # no file can replace it: say so now, not at the first save
        raise UserError(f"{last} is a folder: every checkpoint is written there; move it away")
    if not resume and run_checkpoints(out):
        raise UserError(f"{out} already holds a run ({os.path.basename(run_checkpoints(out)[0])}): pass --resume to "
                        f"continue it, or another --out")
    for partial in glob.glob(os.path.join(out, "*.tmp")) + glob.glob(os.path.join(out, "*.last")):
        os.remove(partial)                     # left by a kill during a checkpoint write: name.pt.PID.tmp / .last


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
    last = os.path.join(out, "last.pt")
    try:
        with atomic_path(path) as tmp:         # a kill before its rename leaves the previous files intact
            _write_synced(state, tmp)
        with atomic_path(last) as link:        # last.pt: a hard link to the step file (no second copy)
            try:
                os.link(path, link)
            except OSError:
                _write_synced(state, link)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):  # a failed write() names no file: name the checkpoint
            raise UserError(f"the disk is full at {out}: cannot write the checkpoint {path} ({e.strerror}); the "
                            f"previous checkpoints are intact: free space, then continue with --resume") from None
        where = e.filename2 or e.filename       # os.replace onto a folder names the folder second
        raise UserError(f"cannot write the checkpoint {path} ({e.strerror}{f': {where}' if where else ''}); the "
                        f"previous checkpoints in {out} are intact") from None
    for old in sorted(glob.glob(os.path.join(out, "step_*.pt")))[:-keep] if keep > 0 else []:
        os.remove(old)
    return path


def run_checkpoints(out):
    """The checkpoints of the run in out/, the one to resume first: last.pt, then step files newest first."""
    steps = sorted(glob.glob(os.path.join(out, "step_*.pt")), reverse=True)
    return [p for p in [os.path.join(out, "last.pt")] if os.path.exists(p)] + steps


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


# ----------------------------------------------------------------------------------------------------------
# The resume policy: which flags a resumed run may change, and how
# ----------------------------------------------------------------------------------------------------------

class ResumePolicy(NamedTuple):
    """What --resume does with each flag (every flag of the entry point in exactly one group):
    fixed: what the models, losses and data are; a different value is refused by name.
    applied: optimisation and schedule; a new value acts from the resumed step on, said in the log.
    kept: used only when a run starts; a resume keeps (and records) the run's value, and says so if it differs.
    free: how the run is executed, logged, saved and previewed; changes at will."""
    fixed: tuple
    applied: tuple
    kept: tuple
    free: tuple


def choose_checkpoint(args, policy, say=print):
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
    check_resume_args(ckpt, args, policy, say)
    return ckpt


def check_resume_args(ckpt, args, policy, say):
    """Refuse a changed fixed flag by name; put the run's own values back into the kept ones (and say so)."""
    changed = [f"--{k.replace('_', '-')} (run: {ckpt['args'].get(k)!r}, now: {getattr(args, k)!r})"
               for k in policy.fixed if k in ckpt["args"] and ckpt["args"][k] != getattr(args, k)]
    if changed:
        raise UserError("cannot resume with different " + ", ".join(changed))
    unrecorded = [f"--{k.replace('_', '-')} {getattr(args, k)!r}" for k in policy.fixed if k not in ckpt["args"]]
    if unrecorded:                             # a run made by an older version, before these flags existed
        say(f"note: the run records no {', '.join(unrecorded)} (made before these flags existed): resuming with "
            f"these values")
    for k in policy.kept:                      # only a run's start uses them: the record must keep saying what it did
        if ckpt["args"].get(k) != getattr(args, k):
            say(f"note: --{k.replace('_', '-')} {getattr(args, k)!r} is not used by a resume; the run started with "
                f"{ckpt['args'].get(k)!r}")
            setattr(args, k, ckpt["args"].get(k))


def resume_checkpoint(args, policy, rank=0, world=1, say=print, lock=None):
    """The checkpoint every rank continues (None for a new run): rank 0 alone decides, every rank reads that file."""
    choice, ckpt = None, None
    if rank == 0:                              # one decision: a rank deciding alone could start at step 0
        try:
            ckpt = choose_checkpoint(args, policy, say)
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
        ckpt = ckpt if rank == 0 else read_rank0s_choice(args, policy, rank, choice)
    except UserError as e:
        problem = one_line(e)
    agree(problem, world)                      # a rank that cannot follow rank 0 stops them all
    return ckpt


def read_rank0s_choice(args, policy, rank, choice):
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
    check_resume_args(ckpt, args, policy, say=lambda msg: None)   # rank 0 said it; the kept flags must change here too
    return ckpt


def sees(path, content):
    """Whether the JSON file `path` holds `content`: five tries a second apart, for network filesystem caches."""
    for turn in range(5):
        if read_json(path) == content:
            return True
        time.sleep(1)
    return False


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


def applied_changes(ckpt, args, policy):
    """The policy's applied flags that differ from the run's -> "--lr 0.001 -> 0.0001" phrases."""
    return [f"--{k.replace('_', '-')} {ckpt['args'].get(k)} -> {getattr(args, k)}"
            for k in policy.applied if ckpt["args"].get(k) != getattr(args, k)]


# ----------------------------------------------------------------------------------------------------------
# Stop signals and logs
# ----------------------------------------------------------------------------------------------------------

def stop_signals():
    """The signals that checkpoint and stop a run: SIGTERM, SIGINT and, where the platform has it, SIGUSR1."""
    return [getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name)]


@contextlib.contextmanager
def caught_signals():
    """-> a list that the stop signals append their numbers to, instead of ending the process; the previous
    handlers come back on exit. The loop checks it between steps, saves, and stops."""
    caught = []
    handlers = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in stop_signals()}
    try:
        yield caught
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def leave_signals_to_the_trainer(worker_id):
    """DataLoader workers ignore SIGTERM / SIGINT / SIGUSR1: a scheduler signals the whole process group on
    preemption, and a worker that died first would crash the trainer before it saves its checkpoint."""
    for s in stop_signals():
        signal.signal(s, signal.SIG_IGN)


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
        with atomic_write(self.path) as f:
            f.writelines(kept)
        self.writer = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=step + 1) if tensorboard else None

    def write(self, record):
        """Append one record {step, ...}; scalars also go to TensorBoard."""
        with write_errors(self.path, "free space, then continue the run with --resume"), \
                open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, record["step"])
            self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


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
                    f"steps ({value:.4g} against {loss_text(self.best)} at step {self.best_step}): the run diverged "
                    f"at step {self.start}; a result of this run is not the recipe's (lower --lr, raise --warmup, or "
                    f"resume from a checkpoint before step {self.start})")
        return None

    def diverged(self):
        """The recorded episodes -> a one-line summary, or None when there were none."""
        if not self.episodes:
            return None
        return "; ".join(f"steps {e['start']}-{e['end'] if e['end'] is not None else 'end (never recovered)'}: "
                         f"peak {loss_text(e['peak'])} against a best of {loss_text(e['best'])}" for e in self.episodes)


def loss_text(x):
    """A logged loss value, or 'non-finite' for None."""
    return "non-finite" if x is None else f"{x:.4g}"


# ----------------------------------------------------------------------------------------------------------
# A training process's loop state: its log lines, metrics, spike watch, and the checkpoint state of the loop
# ----------------------------------------------------------------------------------------------------------

def format_skips(counts):
    """{reason: count} -> 'missing file: 5, empty caption: 2' (largest first), or 'none'."""
    items = sorted(((n, reason) for reason, n in counts.items() if n), key=lambda t: (-t[0], t[1]))
    return ", ".join(f"{reason}: {n}" for n, reason in items) or "none"


class Run:
    """One training process's loop state and its logs. The trainer sets, section by section: stage (its `parts`,
    `watched` loss term), params, optimizer, scheduler, scaler, loader, model, ema."""

    def __init__(self, args, rank, world, local, device, lock=None):
        self.args, self.rank, self.world, self.local, self.device = args, rank, world, local, device
        self.step, self.skips, self.sums, self.seen, self.n_steps, self.bad_in_a_row = 0, Counter(), Counter(), 0, 0, 0
        self.bar, self.log_file, self.t_log = None, os.path.join(args.out, "log.txt"), 0.0
        self.metrics = None                          # rank 0's MetricsLog, once the step is known
        self.watch = SpikeWatch(args.spike_factor, args.spike_steps)   # restore_state replaces it on a resume
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)
        if lock is not None and lock.note:
            self.say(lock.note)

    def say(self, msg):
        """Rank 0: print (above the progress bar, if any) and append to out/log.txt."""
        if self.rank == 0:
            (self.bar.write if self.bar is not None else print)(msg)
            with write_errors(self.log_file, "free space, then continue the run with --resume"), \
                    open(self.log_file, "a") as f:
                f.write(msg + "\n")

    def log_metrics(self, watched):
        """Average the loss terms since the last log line over steps and ranks -> one line with lr, speed and skips,
        a metrics record (rank 0), and the `watched` term's mean to the SpikeWatch (every rank: the same means)."""
        keys = sorted(self.sums)
        vec = torch.stack([self.sums[k].to(self.device) for k in keys] +
                          [torch.tensor(float(self.seen), device=self.device)])
        if self.world > 1:
            dist.all_reduce(vec)
            vec[:-1] /= self.world
        total_skips = sum((Counter(c) for c in gather_objects(dict(self.skips), self.world)), Counter())
        means = {k: v / self.n_steps for k, v in zip(keys, vec[:-1].tolist())}
        lr, speed = self.scheduler.get_last_lr()[0], vec[-1].item() / (time.time() - self.t_log)
        metrics = " ".join(f"{k} {v:.4g}" for k, v in means.items())
        self.say(f"step {self.step}/{self.args.steps} | {metrics} | lr {lr:.3g} | {speed:.1f} samples/s | "
                 f"skipped: {format_skips(total_skips)}")
        spike = self.watch.update(self.step, means.get(watched, 0.0))
        if spike:
            self.say(spike)
        if self.metrics is not None:
            self.metrics.write({"step": self.step, **means, "lr": lr, "samples_per_s": speed, "time": time.time(),
                                "skipped": dict(total_skips)})
        self.sums, self.n_steps, self.t_log, self.seen = Counter(), 0, time.time(), 0

    def gather_state(self, nets):
        """Every rank: its RNG, data position and skip counts, and a check that the replicas of `nets` agree ->
        rank 0: the checkpoint's loop state (step, optimizer, scheduler, rng, data_state, stats); other ranks: None."""
        rngs = gather_objects(rng_state(), self.world)
        positions = gather_objects(self.loader.state_dict(), self.world)
        all_skips = gather_objects(dict(self.skips), self.world)
        sums = gather_objects([x for net in nets for x in weight_checksum(net)], self.world)
        if any(c != sums[0] for c in sums):        # DDP keeps replicas (and so EMAs) identical; else a bug to stop on
            raise UserError(f"step {self.step}: the ranks' weights differ (checksums {sums}); not saving")
        if self.world > 1:
            self.say(f"step {self.step}: weights identical on all {self.world} ranks")
        if self.rank > 0:
            return None
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "rng": rngs, "data_state": positions, "stats": {"skips": all_skips, "spikes": self.watch.state_dict()}}
        if self.scaler.is_enabled():
            state["grad_scaler"] = self.scaler.state_dict()
        return state

    def restore_state(self, ckpt, policy):
        """Continue the loop of a checkpoint: optimizer, schedule, fp16 scaler, step, data position, skips, the spike
        watch, RNG; say which applied flags (policy) changed."""
        load_optimizer(self.optimizer, self.scheduler, ckpt["optimizer"], ckpt["scheduler"])
        if self.scaler.is_enabled() and "grad_scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["grad_scaler"])
        self.step = ckpt["step"]
        mine = min(self.rank, len(ckpt["rng"]) - 1)     # a tar stream insists on the same world size (data.py)
        try:
            self.loader.load_state_dict(ckpt["data_state"][mine])
        except ValueError as e:                    # a tar stream continues exactly only with the same GPUs and workers
            raise UserError(f"--resume: {e}") from None
        self.skips = Counter(ckpt["stats"]["skips"][mine]) if self.rank < len(ckpt["rng"]) else Counter()
        if "spikes" in ckpt["stats"]:               # runs saved before the watch existed start it afresh
            self.watch = SpikeWatch(self.args.spike_factor, self.args.spike_steps, ckpt["stats"]["spikes"])
        set_rng_state(ckpt["rng"][mine])
        self.say(f"resumed {self.args.out} at step {self.step}")
        if applied_changes(ckpt, self.args, policy):
            self.say(f"changed from step {self.step} on: {', '.join(applied_changes(ckpt, self.args, policy))}")
