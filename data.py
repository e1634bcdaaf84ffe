"""Data for FlowTok: image-caption sources (data specs), a resumable distributed loader and the `shapes` world.

    python data.py pretokenize --data shapes:n=2000 --tokenizer runs/demo/tokenizer --out runs/shapes_cache
    python data.py pretokenize --data jsonl:/data/cc12m/train.jsonl --tokenizer FlowTiTok_512.bin --out cc12m_cache
    torchrun --nproc_per_node 8 data.py pretokenize --data tar:/data/laion/shard-{000000..000999}.tar \\
        --tokenizer FlowTiTok_512.bin --out /data/laion_cache

Pre-tokenising (on a CPU, one GPU, 8 GPUs) caches the tokenizer's posteriors and the CLIP features for flow training.
In Python: source = build_dataset(spec, image_size); loader = make_loader(source, batch_size, seed) (infinite,
resumable, rank-aware). README.md's "Data" section is the manual: the specs, the batches, the stream and resume.
"""
import argparse
import collections
import contextlib
import functools
import glob
import http.client
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
import warnings
import zlib

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

import tokenizer as tokenizer_lib
from projector import CLIPTextEncoder, OFFICIAL_CLIP_TOWER, tokenize
from runtime import (RunLock, UserError, append_npy, dist_env, expand_braces, format_skips, generator,
                     leave_signals_to_the_trainer, lines_and_cut, load_checkpoint, non_negative_int, npy_rows,
                     one_line, pick_device, positive_int, rank_world, resolve_path, run_cli, short_hash,
                     truncate_npy, weights_sha256, write_errors, write_json_atomic)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# TA-TiTok's res_ratio_filtering (1d-tokenizer a5c8922 data/webdataset_reader.py:34-41 and :157, passed on by
# utils/train_utils.py:281-294, True in configs/training/TA-TiTok/tatitok_bl32_vae.yaml:51 and the other TA-TiTok
# configs): height / width in [0.5, 2] and the longer side at least 256, its crop size (ours: the image size)
SIZE_FILTER_RATIO = (0.5, 2.0)
MAX_TAR_SAMPLE_BYTES = 1 << 28     # 256 MiB: a tar sample's members together (an image, its captions, metadata)


# ----------------------------------------------------------------------------- small helpers

class BadSample(Exception):
    """A sample we skip; `reason` ("missing file", "empty caption", ...) keys the skip counts."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def res_ratio_filter(width, height, min_longer):
    """TA-TiTok's filter on an image's original size: BadSample("filtered: aspect") unless 1/2 <= height / width
    <= 2, else BadSample("filtered: small") if the longer side is below min_longer."""
    low, high = SIZE_FILTER_RATIO
    if not low <= height / width <= high:
        raise BadSample("filtered: aspect")
    if max(width, height) < min_longer:
        raise BadSample("filtered: small")


def _json_original_size(files):
    """(width, height) from a tar sample's json original_width / original_height (img2dataset's, what TA-TiTok's
    filter reads: the size before any resizing at download), or None when absent or not positive numbers."""
    try:
        meta = json.loads(files["json"])
        size = (meta["original_width"], meta["original_height"])
    except (KeyError, TypeError, ValueError):              # no json, not an object, bad bytes or syntax
        return None
    ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf") for v in size)
    return size if ok else None


def load_image(src, min_size=0, min_longer=None):
    """A file path or encoded bytes -> RGB PIL image, EXIF orientation applied; raises BadSample.

    min_longer: apply res_ratio_filter (TA-TiTok's) with this longer side, from the header, before decoding.
    """
    if isinstance(src, (bytes, bytearray)):
        src = io.BytesIO(src)
    elif not os.path.isfile(src):
        raise BadSample("missing file")
    try:
        # PIL only *warns* between MAX_IMAGE_PIXELS and twice that: make it an error so that a huge
        # image is never decoded (workers are processes, so changing the warning filter here is safe)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(src) as image:
                if min_longer is not None:       # the recipe's filter first: it names why the data drops an image
                    res_ratio_filter(*image.size, min_longer)
                if min(image.size) < min_size:  # the header is enough: no need to decode
                    raise BadSample("too small")
                image.load()
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise BadSample("decompression bomb") from None
    except BadSample:
        raise
    except Exception as e:  # decoders raise OSError, SyntaxError, ValueError, struct.error, ...
        raise BadSample("unreadable image") from e
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # broken EXIF: keep the stored orientation rather than lose the image
        pass
    return _to_rgb(image)


def _to_rgb(image):
    """Any PIL mode -> RGB: 16-bit grey rescaled (PIL's convert would clip it), transparency over white."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # "I" is how older Pillow opens 16-bit PNGs: treat both as 0..65535
        grey = np.clip(np.asarray(image, dtype=np.float64) / 257, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, F, RGB


def _text(x):
    """Caption bytes (a .txt member) -> str, utf-8 tolerating a byte-order mark; anything else as it is."""
    if isinstance(x, (bytes, bytearray)):
        try:
            return bytes(x).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise BadSample("non-UTF-8 caption") from None
    return x


def clean_caption(x):
    """A caption (str, or bytes read from a .txt) -> whitespace-normalised str; raises BadSample."""
    if x is None:
        raise BadSample("missing caption")
    x = _text(x)
    if not isinstance(x, str):
        raise BadSample("non-string caption")
    x = " ".join(x.split())
    if not x:
        raise BadSample("empty caption")
    return x


# Recaptions, as the official webdataset reader uses them (data/webdataset_reader.py:57-76, applied by
# PretokenizedWebDataset, :319-320 and :342, which train_t2i.py:54-65 builds with these defaults): a sample with
# a `recap_txt` takes it with probability 0.95 instead of its `txt`, stripped of a listed opener.
RECAPTION_PROBABILITY = 0.95                                        # webdataset_reader.py:320, recap_prob=0.95
RECAPTION_OPENERS = tuple("The image " + verb for verb in ("depicts", "displays", "showcases", "features", "shows"))
CAPTION_MODES = ("official", "original", "recaption")   # official: 0.95 recaption; original / recaption: always


def strip_opener(text):
    """A recaption without its opener ("The image depicts ..."), first letter upper-cased, as the official reader."""
    # webdataset_reader.py:63-71: strip, remove the first listed opener the text starts with (case-sensitive, no
    # word boundary), strip again, upper-case the first character; a text without an opener is only stripped
    text = text.strip()
    for opener in RECAPTION_OPENERS:
        if text.startswith(opener):
            text = text[len(opener):].strip()
            return text[:1].upper() + text[1:]
    return text


def choose_caption(original, recaption, mode, generator=None):
    """This draw's caption by `mode`: the original, or the opener-stripped recaption (None: there is none)."""
    # official: the recaption with probability 0.95, one draw from `generator`, made only when there is a
    # recaption (webdataset_reader.py:59-60); recaption: always; original: never. Without a recaption the sample
    # keeps its original in every mode (webdataset_reader.py:59: no recap_txt, the txt stays)
    if recaption is None or mode == "original":
        return original
    if mode == "official" and not float(torch.rand((), generator=generator)) < RECAPTION_PROBABILITY:
        return original
    return strip_opener(_text(recaption))


def transform(image, size, random_crop=False, flip=False, generator=None):
    """PIL RGB image -> (3, size, size) float32 in [0, 1]: shorter side to `size` (bicubic), square crop.

    The crop is centred, or (random_crop) a square of the shorter side at a random place; flip mirrors half
    the images. The randomness comes only from `generator`, which the loader seeds per sample.
    """
    w, h = image.size
    side = min(w, h)
    if random_crop:
        x = int(torch.randint(0, w - side + 1, (), generator=generator))
        y = int(torch.randint(0, h - side + 1, (), generator=generator))
    else:
        x, y = (w - side) / 2, (h - side) / 2
    # resizing just the crop box is "shorter side to size, then crop", without rounding the intermediate
    # size; PIL widens the bicubic kernel when shrinking, i.e. it antialiases
    image = image.resize((size, size), Image.BICUBIC, box=(x, y, x + side, y + side))
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (3, S, S)
    if flip and torch.rand((), generator=generator) < 0.5:
        pixels = pixels.flip(-1)
    return pixels.float() / 255


def _no_samples(name, total, counts):
    """The error for a source that gives nothing to train on (the data's fault: a UserError, one line)."""
    return UserError(f"{name}: 0 usable samples out of {total} ({format_skips(counts)})")


class _Strings:
    """A read-only list of strings packed into two numpy arrays.

    Why: a list of millions of Python strings gets copied into every forked DataLoader worker (reference
    counting writes to the pages that hold them); numpy buffers stay shared.
    """

    def __init__(self, strings):
        encoded = [s.encode("utf-8") for s in strings]
        self.ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        self.blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self):
        return len(self.ends)

    def __getitem__(self, i):
        start = self.ends[i - 1] if i > 0 else 0
        return self.blob[start:self.ends[i]].tobytes().decode("utf-8")


# ----------------------------------------------------------------------------- sources
# A map-style source has len(), .name, .skipped (a Counter of the records dropped when it was built) and
# get(index, generator) -> sample dict (or raises BadSample). The tar source is a stream instead.

def _open_listing(spec, path, mode="rb"):
    """Open the file a spec names (a jsonl or COCO json); a missing or unreadable one is a one-line UserError."""
    try:
        return open(path, mode)
    except OSError as e:  # missing, a folder, no permission, a symlink loop: the spec is wrong, not the code
        raise UserError(f"{spec}: cannot read {path} ({e.strerror})") from None


def _jsonl_records(spec, path, root, recaption=None):
    """A jsonl file -> (image paths, captions, skip counts, recaptions: the `recaption` field's str or None each)."""
    paths, captions, skipped, recaptions = [], [], collections.Counter(), []
    with _open_listing(spec, path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)  # bytes in: a non-UTF-8 line fails here too
            except ValueError:
                skipped["bad json line"] += 1
                continue
            if not isinstance(record, dict):
                skipped["bad json line"] += 1
                continue
            try:
                caption = clean_caption(record.get("caption"))
            except BadSample as e:
                skipped[e.reason] += 1
                continue
            image = record.get("image")
            if not isinstance(image, str) or not image:
                skipped["missing image"] += 1
            elif not os.path.isfile(os.path.join(root, image)):  # one stat per sample, at start-up only
                skipped["missing file"] += 1
            else:
                paths.append(os.path.join(root, image))
                captions.append(caption)
                recap = record.get(recaption) if recaption else None
                recaptions.append(recap if isinstance(recap, str) else None)  # not a string: as if it were absent
    return paths, captions, skipped, recaptions


def _coco_records(spec, path, images):
    """A COCO captions json (captions_train2014.json layout) -> (image paths, captions, skip counts)."""
    with _open_listing(spec, path) as f:
        try:
            coco = json.load(f)
        except (ValueError, OSError) as e:  # ValueError: not JSON or not UTF-8; OSError: a read that failed
            raise UserError(f"{spec}: {path} is not a readable JSON file ({one_line(e)})") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("annotations"), list) \
            or not isinstance(coco.get("images", []), list):
        found = "an object without them" if isinstance(coco, dict) else "a list" if isinstance(coco, list) else \
            "a single value"
        raise UserError(f"{spec}: {path} is not a COCO captions file (expected an object with 'images' and "
                        f"'annotations' lists, found {found})")
    # an image record without an id or a file name is left out: its captions then count as "missing image"
    file_names = {image["id"]: image["file_name"] for image in coco.get("images", [])
                  if isinstance(image, dict) and isinstance(image.get("id"), (int, str))
                  and isinstance(image.get("file_name"), str)}
    exists = {}
    paths, captions, skipped = [], [], collections.Counter()
    for annotation in coco["annotations"]:
        if not isinstance(annotation, dict):
            skipped["bad annotation"] += 1
            continue
        try:
            caption = clean_caption(annotation.get("caption"))
        except BadSample as e:
            skipped[e.reason] += 1
            continue
        image_id = annotation.get("image_id")
        name = file_names.get(image_id) if isinstance(image_id, (int, str)) else None  # a list is no key
        if name is None:
            skipped["missing image"] += 1
            continue
        image = os.path.join(images, name)
        if image not in exists:  # ~5 captions per image: stat each image once
            exists[image] = os.path.isfile(image)
        if not exists[image]:
            skipped["missing file"] += 1
            continue
        paths.append(image)
        captions.append(caption)
    return paths, captions, skipped


KARPATHY_SPLITS = ("train", "restval", "val", "test")


def karpathy_images(listing, splits, what):
    """Karpathy's dataset_*.json, parsed -> the images of `splits` [{id, file, split, references}], in file order."""
    # id: cocoid (dataset_coco.json), else imgid (the Flickr8k/30k files); file: filepath/filename (COCO's filepath
    # is train2014 or val2014; the Flickr files have none); references: the `raw` sentences, whitespace collapsed,
    # empty ones left out. `what` begins the one-line errors (a flag and path, or a data spec)
    if not isinstance(listing, dict) or not isinstance(listing.get("images", []), list):
        raise UserError(f"{what}: not a Karpathy split file (expected an object with an 'images' list)")
    try:
        items = [dict(id=_karpathy_id(im), split=im["split"], file=os.path.join(im.get("filepath", ""), im["filename"]),
                      references=[r for r in (" ".join(s["raw"].split()) if isinstance(s["raw"], str) else ""
                                              for s in im["sentences"]) if r])   # a null sentence is no reference
                 for im in listing["images"] if im["split"] in splits]
    except KeyError as err:
        raise UserError(f"{what}: not a Karpathy split file (missing {err})") from None
    except TypeError as err:   # a record that is not an object, sentences that are not a list, ...
        raise UserError(f"{what}: not a Karpathy split file (a malformed image record: {err})") from None
    if not items:
        found = sorted({str(im["split"]) for im in listing["images"]})
        raise UserError(f"{what}: no image in split {' + '.join(map(repr, splits))} (its splits: "
                        f"{', '.join(found) or 'none'})")
    return items


def _karpathy_id(image):
    """An image record's id: cocoid, else imgid; a TypeError when it is neither a number nor a string."""
    i = image["cocoid"] if "cocoid" in image else image["imgid"]
    if not isinstance(i, (int, str)) or isinstance(i, bool):
        raise TypeError(f"its id is {i!r}, not a number or a string")
    return i


def _karpathy_records(spec, path, images, splits):
    """Karpathy's split file -> (image paths, [its sentences] per image, skip counts) of the images of `splits`."""
    with _open_listing(spec, path) as f:
        try:
            listing = json.load(f)
        except (ValueError, OSError) as e:  # ValueError: not JSON or not UTF-8; OSError: a read that failed
            raise UserError(f"{spec}: {path} is not a readable JSON file ({one_line(e)})") from None
    paths, sentences, skipped = [], [], collections.Counter()
    for item in karpathy_images(listing, splits, spec):
        # IMAGES/filepath/filename (images=/coco holding train2014/ and val2014/), else IMAGES/filename (one
        # folder of them all), as evaluate.py's captions protocol looks for them
        tries = (os.path.join(images, item["file"]), os.path.join(images, os.path.basename(item["file"])))
        image = next((t for t in tries if os.path.isfile(t)), None)
        if image is None:
            skipped["missing file"] += 1
        elif not item["references"]:
            skipped["empty caption"] += 1
        else:
            paths.append(image)
            sentences.append(item["references"])
    return paths, sentences, skipped


def _karpathy_splits(spec, options):
    """The splits=A+B option of a karpathy spec (default train+restval, the paper's 113,287 training images)."""
    splits = tuple(options.get("splits", "train+restval").split("+"))
    unknown = [s for s in splits if s not in KARPATHY_SPLITS]
    if unknown:
        raise UserError(f"{spec}: unknown split {unknown[0]!r} in splits={options['splits']} (splits: "
                        f"{', '.join(KARPATHY_SPLITS)}, joined by +)")
    return splits


def _folder_records(directory):
    """Images under `directory` (recursively, sorted) captioned by a same-name .txt beside each."""
    paths, captions, skipped = [], [], collections.Counter()
    for root, dirs, files in os.walk(directory):
        dirs.sort()  # os.walk order is the file system's: sort for a reproducible index
        for name in sorted(files):
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            image = os.path.join(root, name)
            try:
                with open(os.path.splitext(image)[0] + ".txt", "rb") as f:
                    caption = clean_caption(f.read())
            except FileNotFoundError:
                skipped["missing caption"] += 1
                continue
            except OSError:  # a folder, a symlink loop, no permission: one bad sample, skipped and counted like
                skipped["unreadable caption"] += 1  # the other bad ones, never a reason to stop a run
                continue
            except BadSample as e:
                skipped[e.reason] += 1
                continue
            paths.append(image)
            captions.append(caption)
    return paths, captions, skipped


class ImageCaptions:
    """Map-style source of (image file, caption[, recaption]) records: get(i, generator) -> {"image", "caption"}."""
    # recaptions (optional, one str or None per record) and captions_mode (CAPTION_MODES) choose, per draw,
    # between a record's caption and its recaption, as choose_caption says

    def __init__(self, name, paths, captions, skipped, image_size, min_size=0, random_crop=False, flip=False,
                 recaptions=None, captions_mode="original", min_longer=None):
        self.name, self.skipped = name, skipped
        self.paths, self.captions = _Strings(paths), _Strings(captions)
        self.image_size, self.min_size, self.random_crop, self.flip = image_size, min_size, random_crop, flip
        self.min_longer = min_longer
        self.captions_mode, self.recaptions, self.has_recaption = captions_mode, None, None
        if recaptions is not None and any(r is not None for r in recaptions):
            self.recaptions = _Strings([r or "" for r in recaptions])
            self.has_recaption = np.array([r is not None for r in recaptions], dtype=bool)

    def __len__(self):
        return len(self.paths)

    def get(self, index, generator=None):
        """Decode and transform sample `index`; raises BadSample."""
        image = load_image(self.paths[index], self.min_size, self.min_longer)
        pixels = transform(image, self.image_size, self.random_crop, self.flip, generator)  # (3, S, S)
        return {"image": pixels, "caption": self.caption(index, generator)}

    def caption(self, index, generator=None):
        """Record `index`'s caption for this draw; raises BadSample (an empty recaption)."""
        # get() draws it after the crop and flip, from the same per-sample generator: they stay what they were
        # without recaptions, and the pick, like them, depends on the seed and stream position only
        if self.recaptions is None or not self.has_recaption[index]:
            return self.captions[index]
        return clean_caption(choose_caption(self.captions[index], self.recaptions[index], self.captions_mode,
                                            generator))

    def texts(self):
        """Every caption a draw can give (for a vocabulary): the captions, then the stripped recaptions."""
        texts = [self.captions[i] for i in range(len(self))]
        if self.recaptions is not None and self.captions_mode != "original":
            texts += [" ".join(strip_opener(self.recaptions[i]).split()) for i in range(len(self))
                      if self.has_recaption[i]]
        return [t for t in texts if t]


class KarpathySource(ImageCaptions):
    """Map-style source of images with all their sentences (Karpathy's splits): each draw takes one of them."""

    def __init__(self, name, paths, sentences, skipped, **images):
        super().__init__(name, paths, [s for group in sentences for s in group], skipped, **images)
        # image i's sentences are captions[ends[i - 1]:ends[i]]: numpy, not lists, for the forked workers' sake
        self.ends = np.cumsum([len(group) for group in sentences], dtype=np.int64)

    def caption(self, index, generator=None):
        """One of image `index`'s sentences, drawn by the sample's generator (after its crop and flip)."""
        # one random caption per draw, as the official COCO dataset: k = random.randint(0, n_captions - 1) in each
        # __getitem__ (data/datasets.py:150 and :160); ours comes from the per-sample generator (exact resume)
        start = int(self.ends[index - 1]) if index > 0 else 0
        return self.captions[start + int(torch.randint(0, int(self.ends[index]) - start, (), generator=generator))]

    def texts(self):
        """Every sentence of every image (for a vocabulary)."""
        return [self.captions[i] for i in range(len(self.captions))]


REMOTE = ("pipe:", "http://", "https://")     # shards that are streamed, not files
SHARD_TRIES = 3          # a remote shard that fails is opened again (continuing where it broke), then skipped
SHARD_RETRY_WAIT = 2.0   # seconds before the first retry, doubled for each next one
SHARD_TIMEOUT = 60       # seconds a URL may stay silent before its read fails (a dead server never hangs a run)
# what reading a shard can raise: a truncated or corrupt tar, a failed command or connection, a cut HTTP body
SHARD_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, http.client.HTTPException)


@contextlib.contextmanager
def open_shard(path):
    """A shard's bytes as a stream: a local file, `pipe:CMD` (the command's stdout; its exit status is checked
    once the stream has been read) or an http(s):// URL."""
    if path.startswith("pipe:"):
        command = path[len("pipe:"):]
        with tempfile.TemporaryFile() as err:     # a file, not a pipe: a chatty command never blocks on it
            proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=err)

            def failed(status):
                err.seek(0)
                said = err.read().decode(errors="replace").strip().splitlines()
                return OSError(f"`{command}` exited with status {status}" + (f": {said[-1]}" if said else ""))
            try:
                yield proc.stdout
            except BaseException as e:            # a reader that stops early, or a stream that broke
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5 if isinstance(e, SHARD_ERRORS) else 0)
                status = proc.poll()
                proc.kill()
                proc.wait()
                if isinstance(e, SHARD_ERRORS) and status:   # the command's own failure explains it best
                    raise failed(status) from None
                raise
            finally:
                proc.stdout.close()
            if proc.wait() != 0:
                raise failed(proc.returncode)
    elif path.startswith(REMOTE):
        with urllib.request.urlopen(path, timeout=SHARD_TIMEOUT) as response:
            yield response
    else:
        with open(path, "rb") as f:
            yield f


def _tar_groups(path):
    """Stream a tar shard (open_shard) -> (key, {extension: bytes}) per sample: consecutive files sharing a key.

    A member that would take the sample past MAX_TAR_SAMPLE_BYTES is not read (its size is in the tar header; a
    10 KB shard can declare a 3 GB sparse member): its value is None, which decode reports as an oversized sample.
    """
    key, files, held = None, {}, 0
    with open_shard(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:   # "r|": strictly sequential
        for member in tar:
            if not member.isfile():
                continue
            folder, base = os.path.split(member.name)
            stem, _, extension = base.partition(".")  # webdataset: the key ends at the first dot
            if os.path.join(folder, stem) != key:
                if files:
                    yield key, files
                key, files, held = os.path.join(folder, stem), {}, 0
            held += member.size
            files[extension.lower()] = tar.extractfile(member).read() if held <= MAX_TAR_SAMPLE_BYTES else None
        while stream.read(1 << 16):               # the archive's padding: a command exits once it is read
            pass
    if files:
        yield key, files


def _shard_samples(path, offset):
    """(index, files) of a shard's samples from `offset` on; a remote shard that breaks is opened again (up to
    SHARD_TRIES times, waiting longer each time) and continues after the last sample given; then the error."""
    tries = SHARD_TRIES if path.startswith(REMOTE) else 1      # a corrupt local file stays corrupt
    for attempt in range(tries):
        try:
            for k, (_, files) in enumerate(_tar_groups(path)):
                if k >= offset:
                    offset = k + 1
                    yield k, files
            return
        except SHARD_ERRORS:
            if attempt + 1 == tries:
                raise
            time.sleep(SHARD_RETRY_WAIT * 2 ** attempt)


class TarSource:
    """Webdataset-layout tar shards, streamed: samples(...) yields one reader's endless share of them."""

    def __init__(self, name, pattern, image_size, min_size=0, random_crop=False, flip=False, captions_mode="official",
                 min_longer=None):
        # sources joined by "::" (the official configs mix datasets so), each a brace pattern of local paths,
        # pipe:COMMAND or http(s):// URLs; a missing local file is counted, a remote one is found out when read
        paths = [p for source in pattern.split("::") for p in expand_braces(source)]
        self.captions_mode = captions_mode
        self.name, self.shards = name, [p for p in paths if p.startswith(REMOTE) or os.path.isfile(p)]
        self.skipped = collections.Counter()
        if len(paths) > len(self.shards):
            self.skipped["missing shard"] = len(paths) - len(self.shards)
        if not self.shards:
            raise RuntimeError(f"{name}: no shard found (the pattern gives {len(paths)} paths, none is a file)")
        self.image_size, self.min_size, self.random_crop, self.flip = image_size, min_size, random_crop, flip
        self.min_longer = min_longer

    def samples(self, seed, reader, readers, cursor):
        """Yield (sample dict or BadSample, cursor just after it) forever, for reader `reader` of `readers`.

        A cursor {"epoch", "shard", "offset", "seen"} says where the reader is: shard index in its share
        of that epoch, samples read from that shard, samples read in all; starting from a cursor continues
        exactly (the shard's first `offset` samples are read past, not decoded).
        """
        # crop and flip are seeded by (seed, reader, seen); the caption pick by (seed, epoch, shard, sample in the
        # shard), which names the same read of the same sample for any number of readers: the worker count does
        # not change it
        if readers > len(self.shards):
            raise UserError(f"{self.name}: {len(self.shards)} shards for {readers} readers (each reads shards of its "
                            f"own): use at most {len(self.shards)} processes, or split the data into more shards")
        epoch, shard, offset, seen = cursor["epoch"], cursor["shard"], cursor["offset"], cursor["seen"]
        counts, dry = collections.Counter(), 0  # dry: shards read in a row without a usable sample
        while True:
            order = torch.randperm(len(self.shards), generator=generator(seed, "shards", epoch)).tolist()
            share = order[reader::readers]  # indices into self.shards
            while shard < len(share):
                usable, path = False, self.shards[share[shard]]
                try:
                    for k, files in _shard_samples(path, offset):
                        seen += 1
                        try:
                            sample = self.decode(files, generator(seed, "augment", reader, seen),
                                                 generator(seed, "caption", epoch, share[shard], k))
                            usable = True
                        except BadSample as e:
                            sample = e
                            counts[e.reason] += 1
                        yield sample, dict(epoch=epoch, shard=shard, offset=k + 1, seen=seen)
                except SHARD_ERRORS as e:   # a truncated or corrupt shard, a command or URL that kept failing
                    if path.startswith(REMOTE):
                        print(f"warning: {self.name}: skipped {path} after {SHARD_TRIES} tries ({one_line(e)})",
                              file=sys.stderr)
                    counts["unreadable shard"] += 1
                    yield BadSample("unreadable shard"), dict(epoch=epoch, shard=shard + 1, offset=0, seen=seen)
                dry = 0 if usable else dry + 1
                if dry >= len(self.shards):  # as many shards as there are, and not one sample: give up
                    raise _no_samples(f"{self.name} (reader {reader})", sum(counts.values()), counts)
                shard, offset = shard + 1, 0
            epoch, shard = epoch + 1, 0

    def decode(self, files, generator=None, pick=None):
        """{extension: bytes} of one tar sample -> {"image", "caption"}; raises BadSample; `pick` draws the caption."""
        # generator: crop and flip; pick (default: generator): txt or recap_txt, as choose_caption
        if None in files.values():
            raise BadSample("oversized sample")
        if "txt" in files:
            caption = files["txt"]
        elif "json" in files:
            try:
                meta = json.loads(files["json"])
            except ValueError:
                raise BadSample("bad json caption") from None
            caption = meta.get("caption", meta.get("txt")) if isinstance(meta, dict) else None
        else:
            caption = None
        # the original is needed in every mode: the official reader renames txt -> text before it looks at
        # recap_txt (webdataset_reader.py:337-342), and drops a sample without one
        caption = clean_caption(caption)
        encoded = next((files[e] for e in TAR_IMAGE_EXTENSIONS if e in files), None)
        if encoded is None:
            raise BadSample("missing image")
        original, min_longer = _json_original_size(files), self.min_longer
        if min_longer is not None and original is not None:   # as TA-TiTok: the recorded size, before decoding
            res_ratio_filter(*original, min_longer)
            min_longer = None
        image = load_image(encoded, self.min_size, min_longer)  # no record: the stored image's own size
        pixels = transform(image, self.image_size, self.random_crop, self.flip, generator)  # (3, S, S)
        if "recap_txt" in files:  # drawn after the crop and flip: with pick=None they stay what they were
            caption = clean_caption(choose_caption(caption, files["recap_txt"], self.captions_mode,
                                                   generator if pick is None else pick))
        return {"image": pixels, "caption": caption}


def _numpy(x):
    """A tensor or array-like -> numpy array (bfloat16 through float32)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def write_cache(directory, posterior, clip, ids, captions):
    """Append n rows to a pre-tokenised cache (created if needed).

    posterior (n, 77, 32) tokenizer posterior mean | logvar and clip (n, 77, C) CLIP features (or None) are
    stored float16, ids (n, 77) int32, captions one json object {"caption": ...} per line of captions.jsonl.
    """
    os.makedirs(directory, exist_ok=True)
    arrays = {"posterior": (posterior, np.float16), "clip": (clip, np.float16), "ids": (ids, np.int32)}
    arrays = {k: np.ascontiguousarray(_numpy(v).astype(dtype)) for k, (v, dtype) in arrays.items() if v is not None}
    for name, value in arrays.items():        # every check before the first byte: a batch is appended whole or not
        if len(value) != len(captions):
            raise ValueError(f"write_cache: {name} has {len(value)} rows for {len(captions)} captions")
    lines = "".join(json.dumps({"caption": c}) + "\n" for c in captions).encode("utf-8")
    # a kill between two of these appends leaves arrays of different lengths: cache_rows reports it, trim_cache
    # (run by pretokenize before it continues) cuts every file back to the rows all of them hold
    for name, value in arrays.items():
        append_npy(os.path.join(directory, name + ".npy"), value)
    with open(os.path.join(directory, "captions.jsonl"), "ab") as f:
        f.write(lines)


CACHE_FILES = ("posterior.npy", "clip.npy", "ids.npy", "captions.jsonl")


def cache_rows(part):
    """{file: whole rows it holds} of one cache part's files that exist (captions.jsonl: complete lines)."""
    rows = {}
    for name in CACHE_FILES:
        path = os.path.join(part, name)
        if os.path.isfile(path):
            rows[name] = lines_and_cut(path) if name.endswith(".jsonl") else npy_rows(path)
    return rows


def trim_cache(part):
    """Cut every file of a cache part back to the rows all of them hold -> that count (what an interrupted
    pretokenize left: some arrays of its last batch appended, others not, or a caption line cut short)."""
    rows = cache_rows(part)
    keep = min(rows.values(), default=0)
    for name in rows:
        path = os.path.join(part, name)
        if name.endswith(".jsonl"):
            lines_and_cut(path, keep)
        else:
            truncate_npy(path, keep)
    return keep


IDENTITY_FILE = "identity.json"        # in each cache part: what its rows were made with
# what a cache's rows depend on: pretokenize extends a part only if all of these are unchanged
CACHE_IDENTITY = ("tokenizer", "clip", "data", "image_size", "precision", "world")


def read_identity(part):
    """A cache part's recorded identity (dict), or None for a part written before identities were recorded."""
    path = os.path.join(part, IDENTITY_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable cache identity ({e}): pre-tokenise again into a new folder") from None


class CacheSource:
    """Pre-tokenised features: get(i) -> {"posterior" (77, 32), "clip" (77, C) float32, "ids" (77,), "caption"}.

    DIR holds the arrays itself, or parts DIR/part-00000, DIR/part-00001, ... (one per pre-tokenising rank),
    read as one source. "clip" is absent from caches written with --no-clip (the trainer then runs CLIP).
    """

    def __init__(self, name, directory):
        self.name, self.directory, self.skipped = name, directory, collections.Counter()
        parts = sorted(p for p in glob.glob(os.path.join(directory, "part-*")) if os.path.isdir(p))
        self.parts = parts or [directory]
        for part in self.parts:                 # a pretokenize killed between two appends: every row would shift
            rows = cache_rows(part)
            if len(set(rows.values())) > 1:
                raise UserError(f"{name}: {part} was left unfinished by an interrupted pretokenize ("
                                f"{', '.join(f'{k} {v} rows' for k, v in rows.items())}): run the same `python "
                                f"data.py pretokenize` command again to finish it")
        captions = []
        for part in self.parts:
            try:
                with open(os.path.join(part, "captions.jsonl"), encoding="utf-8") as f:
                    captions += [json.loads(line)["caption"] for line in f if line.strip()]
            except OSError as e:
                raise RuntimeError(f"{name}: not a pre-tokenised cache ({e.strerror}: {e.filename})") from None
            except (ValueError, KeyError, TypeError):  # a line that is not JSON, or not an object with "caption"
                raise UserError(f"{name}: {part}/captions.jsonl has a line that is not {{\"caption\": ...}}; "
                                f"not a pre-tokenised cache, or a damaged one") from None
        self.captions = _Strings(captions)
        self.keys = [k for k in ("posterior", "clip", "ids") if os.path.exists(os.path.join(self.parts[0], k + ".npy"))]
        for part in self.parts:  # "clip" is optional, but then in no part; the others are in every part
            lacking = sorted(f"{k}.npy" for k in {"posterior", "ids", *self.keys}
                             if not os.path.isfile(os.path.join(part, k + ".npy")))
            if lacking:
                raise UserError(f"{name}: not a pre-tokenised cache ({part} has no {', '.join(lacking)})")
        self._arrays = None                     # each DataLoader worker maps the files itself
        rows = [len(a["ids"]) for a in self._open()]
        self.starts = np.cumsum([0] + rows)     # first global row of each part
        if self.starts[-1] != len(self.captions):
            raise RuntimeError(f"{name}: {self.starts[-1]} rows of features for {len(self.captions)} captions")
        identities = [read_identity(p) for p in self.parts]
        if any(i != identities[0] for i in identities):
            raise RuntimeError(f"{name}: its parts were made with different tokenizers, CLIP towers or data "
                               f"(see their {IDENTITY_FILE}): pre-tokenise again into a new folder")
        self.identity = identities[0]           # None: a cache made before identities were recorded

    def _open(self):
        """The memory-mapped arrays of every part, opened once per process."""
        if getattr(self, "_arrays", None) is None:
            self._arrays = [{k: np.load(os.path.join(p, k + ".npy"), mmap_mode="r") for k in self.keys}
                            for p in self.parts]
        return self._arrays

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}  # never pickle a memory map into a worker

    def __len__(self):
        return len(self.captions)

    def get(self, index, generator=None):
        """Row `index` as float32 / long tensors."""
        return self.get_many([index])[0]

    def get_many(self, indices):
        """Rows `indices` read with one fancy index per array and part (a batch of single-row reads costs ~4x)."""
        indices, arrays = np.asarray(indices, dtype=np.int64), self._open()
        parts = np.searchsorted(self.starts, indices, side="right") - 1
        columns = {}
        for k in self.keys:
            column = np.empty((len(indices), *arrays[0][k].shape[1:]), np.int64 if k == "ids" else np.float32)
            for part in np.unique(parts):
                at = np.nonzero(parts == part)[0]
                column[at] = arrays[part][k][indices[at] - self.starts[part]]
            columns[k] = torch.from_numpy(column)
        return [{**{k: columns[k][j] for k in self.keys}, "caption": self.captions[int(i)]}
                for j, i in enumerate(indices)]


# ----------------------------------------------------------------------------- the shapes world
# One shape on a dark background, rendered on the fly from (seed, split, index). Four colour-shape pairs
# never appear in "train": they test compositional generalisation ("novel"). "heldout" has the training
# pairs but other samples (another seed stream). Shapes ignore random crop and flip (flip would swap
# "left" and "right").

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "middle")
HELDOUT_PAIRS = (("red", "triangle"), ("green", "diamond"), ("blue", "circle"), ("yellow", "square"))
SEEN_PAIRS = tuple((c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_PAIRS)
SPLITS = ("train", "heldout", "novel")

RGB = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], np.float32)  # per COLOURS
RADIUS = np.array([0.20, 0.28], np.float32)  # per SIZES, fraction of the image side
CENTRE = np.array([[0.33, 0.5], [0.67, 0.5], [0.5, 0.33], [0.5, 0.67], [0.5, 0.5]], np.float32)  # (x, y) per POSITIONS
WHERE = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")  # per POSITIONS
AREA = (np.pi, 4 * 0.85 ** 2, 0.75 * np.sqrt(3) * 1.1 ** 2, 2 * 1.1 ** 2)  # shape area / radius^2, per SHAPES
CAPTION_PATTERN = re.compile(rf"an? ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) ({'|'.join(WHERE)})")


def _inside(shape, u, v):
    """Is (u, v), in units of the radius from the centroid (v points down), inside the shape?"""
    if shape == 0:  # circle
        return u * u + v * v <= 1
    if shape == 1:  # square, half side 0.85
        return np.maximum(abs(u), abs(v)) <= 0.85
    if shape == 2:  # triangle pointing up, circumradius 1.1 (so its centroid is the centre too)
        return (v <= 0.55) & (np.sqrt(3) / 2 * abs(u) - v / 2 <= 0.55)
    return abs(u) + abs(v) <= 1.1  # diamond


def caption_for(attrs):
    """{"colour", "shape", "size", "position"} -> 'a large red circle on the left'."""
    return f"a {attrs['size']} {attrs['colour']} {attrs['shape']} {WHERE[POSITIONS.index(attrs['position'])]}"


def shapes_prompts(split):
    """The distinct captions of a split (200 for train and heldout, 40 for novel)."""
    pairs = HELDOUT_PAIRS if split == "novel" else SEEN_PAIRS
    return [caption_for({"colour": c, "shape": s, "size": z, "position": p})
            for c, s in pairs for z in SIZES for p in POSITIONS]


def _shape_params(split, indices, seed):
    """Attributes and jitter of samples `indices`, each from its own (seed, split, index) generator."""
    if split not in SPLITS:
        raise ValueError(f"shapes: unknown split {split!r}, one of {SPLITS}")
    pairs = HELDOUT_PAIRS if split == "novel" else SEEN_PAIRS
    u = np.array([np.random.default_rng([seed, SPLITS.index(split), int(i)]).random(11) for i in indices],
                 np.float32).reshape(-1, 11)  # (n, 11) uniforms, columns used below
    pair = (u[:, 0] * len(pairs)).astype(int)
    p = {"colour": np.array([COLOURS.index(pairs[k][0]) for k in pair], int),
         "shape": np.array([SHAPES.index(pairs[k][1]) for k in pair], int),
         "size": (u[:, 1] * len(SIZES)).astype(int),
         "position": (u[:, 2] * len(POSITIONS)).astype(int)}
    p["rgb"] = np.clip(RGB[p["colour"]] + (u[:, 3:6] - 0.5) * 0.2, 0, 1)  # (n, 3) saturated, +-0.1
    p["background"] = u[:, 6:9] * 0.22  # (n, 3) dark
    p["centre"] = CENTRE[p["position"]] + (u[:, 9:11] - 0.5) * 0.04  # (n, 2) (x, y), +-0.02
    p["radius"] = RADIUS[p["size"]]  # (n,)
    return p


def _render(p, size, chunk=256):
    """Shape parameters -> (n, 3, size, size) float32: coverage of 4x4 sub-pixels blends shape and background."""
    n = len(p["shape"])
    grid = ((np.arange(4 * size) + 0.5) / (4 * size)).astype(np.float32)  # sub-pixel centres in (0, 1)
    out = np.empty((n, 3, size, size), np.float32)
    for s in range(0, n, chunk):
        c = slice(s, s + chunk)
        r = p["radius"][c, None, None]
        u = (grid[None, None, :] - p["centre"][c, 0, None, None]) / r  # (m, 1, 4S)
        v = (grid[None, :, None] - p["centre"][c, 1, None, None]) / r  # (m, 4S, 1)
        inside = np.zeros((len(r), 4 * size, 4 * size), bool)
        for shape in range(len(SHAPES)):
            pick = p["shape"][c] == shape
            if pick.any():
                inside[pick] = _inside(shape, u[pick], v[pick])
        sub = inside.view(np.uint8).reshape(-1, size, 4, size, 4)  # (m, S, 4, S, 4) sub-pixels of each pixel
        rows = sub[:, :, 0] + sub[:, :, 1] + sub[:, :, 2] + sub[:, :, 3]  # (m, S, S, 4): slice adds, ~20x a mean()
        cover = (rows[..., 0] + rows[..., 1] + rows[..., 2] + rows[..., 3]) * np.float32(1 / 16)  # (m, S, S), exact
        bg, fg = p["background"][c, :, None, None], p["rgb"][c, :, None, None]  # (m, 3, 1, 1)
        out[c] = bg + (fg - bg) * cover[:, None]
    return out


def shapes_batch(split, indices, seed=0, size=32):
    """Render samples `indices` of a split -> (images (n, 3, size, size) float32 tensor, list of attrs dicts)."""
    p = _shape_params(split, indices, seed)
    attrs = [{"colour": COLOURS[c], "shape": SHAPES[s], "size": SIZES[z], "position": POSITIONS[q]}
             for c, s, z, q in zip(p["colour"], p["shape"], p["size"], p["position"])]
    return torch.from_numpy(_render(p, size)), attrs


class ShapesSource:
    """Map-style source over n samples of one split of the shapes world, rendered on the fly."""

    def __init__(self, name, split="train", n=20000, seed=0, image_size=32):
        _shape_params(split, [], seed)  # validates the split
        self.name, self.split, self.n, self.seed, self.size = name, split, n, seed, image_size
        self.skipped = collections.Counter()

    def __len__(self):
        return self.n

    def get(self, index, generator=None):
        """Sample `index` -> {"image" (3, S, S), "caption"} (no crop or flip)."""
        return self.get_many([index])[0]

    def get_many(self, indices):
        """Samples `indices` rendered together (vectorised: ~2x faster than one by one), equal to get's."""
        images, attrs = shapes_batch(self.split, indices, self.seed, self.size)
        return [{"image": image, "caption": caption_for(a)} for image, a in zip(images, attrs)]


# ----------------------------------------------------------------------------- loader

_KINDS = {"jsonl": {"root", "recaption", "captions"}, "coco": {"images"}, "karpathy": {"images", "splits"},
          "tar": {"captions"}, "folder": set(), "shapes": {"split", "n", "seed"}, "cache": set()}  # kind -> options


def _captions_option(spec, options):
    """The captions=MODE option (CAPTION_MODES, default official: what the official run did); UserError if bad."""
    mode = options.get("captions", "official")
    if mode not in CAPTION_MODES:
        raise UserError(f"{spec}: option captions={mode} must be one of {', '.join(CAPTION_MODES)}")
    if mode == "recaption" and "recaption" not in options and not spec.startswith("tar:"):
        raise UserError(f"{spec}: captions=recaption needs recaption=FIELD, the json field that holds them")
    if options.get("recaption") == "":
        raise UserError(f"{spec}: option recaption= needs a field name")
    return mode


def _int_option(spec, options, key, default, least):
    """The integer option `key` of a spec (shapes:n=2000), at least `least`; a bad one is a UserError naming it."""
    text = options.get(key, str(default))
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < least:  # numpy seeds must be >= 0; n = 0 would be an empty source
        raise UserError(f"{spec}: option {key}={text} must be an integer >= {least}")
    return value


def build_dataset(spec, image_size=32, min_size=None, random_crop=False, flip=False, size_filter=False):
    """A data spec (README "Data") -> source; skips images with shorter side < min_size (default image_size // 2)
    and, with size_filter, TA-TiTok's (aspect ratio outside [1/2, 2], longer side < image_size; image files only)."""
    kind, _, rest = spec.partition(":")
    if kind not in _KINDS:
        raise ValueError(f"{spec}: unknown source kind {kind!r}, one of {sorted(_KINDS)}")
    parts = [p for p in re.split(r",(?![^{]*\})", rest) if p]  # a comma inside {...} belongs to the path
    path = parts.pop(0) if kind != "shapes" and parts else None
    options = dict(p.partition("=")[::2] for p in parts)
    if any("=" not in p for p in parts) or set(options) - _KINDS[kind]:
        raise ValueError(f"{spec}: expected key=value options among {sorted(_KINDS[kind])}")
    if kind != "shapes" and not path:
        raise ValueError(f"{spec}: missing path")
    images = dict(image_size=image_size, min_size=image_size // 2 if min_size is None else min_size,
                  random_crop=random_crop, flip=flip, min_longer=image_size if size_filter else None)
    if kind == "tar":
        return TarSource(spec, path, **images, captions_mode=_captions_option(spec, options))  # checked as it streams
    if kind == "shapes":
        source = ShapesSource(spec, options.get("split", "train"), _int_option(spec, options, "n", 20000, 1),
                              _int_option(spec, options, "seed", 0, 0), image_size)
    elif kind == "cache":
        source = CacheSource(spec, path)
    else:
        if kind == "jsonl":
            if "root" in options and not os.path.isdir(options["root"]):
                raise UserError(f"{spec}: root={options['root']} is not a folder")
            mode, root = _captions_option(spec, options), options.get("root", os.path.dirname(os.path.abspath(path)))
            *records, recaptions = _jsonl_records(spec, path, root, options.get("recaption"))
            images.update(recaptions=recaptions, captions_mode=mode)
        elif kind in ("coco", "karpathy"):
            if "images" not in options:
                raise ValueError(f"{spec}: {kind} needs images=DIR")
            if not os.path.isdir(options["images"]):  # else every caption would count as a "missing file"
                raise UserError(f"{spec}: images={options['images']} is not a folder")
            if kind == "karpathy":
                records = _karpathy_records(spec, path, options["images"], _karpathy_splits(spec, options))
            else:
                records = _coco_records(spec, path, options["images"])
        else:
            if not os.path.isdir(path):  # os.walk of a missing folder is silently empty
                raise UserError(f"{spec}: {path} is not a folder")
            records = _folder_records(path)
        source = (KarpathySource if kind == "karpathy" else ImageCaptions)(spec, *records, **images)
    if len(source) == 0:
        raise _no_samples(spec, sum(source.skipped.values()), source.skipped)
    return source


def open_dataset(spec, image_size=32, **options):
    """build_dataset, a spec that cannot be used (an unknown kind, option or split) as one line naming it."""
    try:
        return build_dataset(spec, image_size=image_size, **options)
    except (ValueError, RuntimeError) as e:
        raise UserError(str(e)) from None


def extent(source, spec):
    """(how many, of what) a source holds, for comparing ranks: (samples, 'samples in --data SPEC') or shards."""
    if hasattr(source, "__len__"):
        return len(source), f"samples in --data {spec}"
    return len(getattr(source, "shards", [])), f"shards in --data {spec}"


def caption_vocabulary(source, spec):
    """The CLIP ids of every caption a map-style source can give, recaptions and all sentences included (the
    TextDecoder's classes with --decoder-vocab data)."""
    if isinstance(source, CacheSource):
        return sorted({int(i) for a in source._open() for i in np.unique(a["ids"])})
    if isinstance(source, ShapesSource):
        captions = shapes_prompts(source.split)
    elif hasattr(source, "texts"):
        captions = source.texts()
    else:
        raise UserError(f"--decoder-vocab data needs a map-style source, not {spec}")
    ids = torch.cat([tokenize(captions[i:i + 4096])[0] for i in range(0, len(captions), 4096)])
    return sorted(int(i) for i in ids.unique())


def check_cache_identity(source, spec, encoders, rank=0):
    """A `cache:` source must come from the run's tokenizer and CLIP weights (pretokenize records their hashes):
    another encoder's features would train the flow on latents that its tokenizer never decodes, silently.
    encoders: {"tokenizer" / "clip": (the frozen module or None, how the run names it)}."""
    if not isinstance(source, CacheSource):
        return
    if source.identity is None:
        if rank == 0:
            print(f"warning: --data {spec} records no tokenizer or CLIP identity (made before caches recorded "
                  f"it): nothing checks that it matches this run's; pre-tokenise again to get the check",
                  file=sys.stderr)
        return
    needed = {"tokenizer": "posterior", "clip": "clip"}
    ours = {name: (weights_sha256(module), what) for name, (module, what) in encoders.items()
            if module is not None and needed[name] in source.keys}
    differ = [f"{name} {short_hash(source.identity.get(name))} in the cache vs {short_hash(mine)} of {what}"
              for name, (mine, what) in ours.items() if source.identity.get(name) != mine]
    if differ:
        raise UserError(f"--data {spec} was pre-tokenised with other weights ({'; '.join(differ)}): pre-tokenise "
                        f"again with this run's (python data.py pretokenize --tokenizer ...), or train with the "
                        f"tokenizer and CLIP the cache was made with")


def _as_is(batch):
    """collate_fn for datasets that already return batches."""
    return batch


def _collate(samples, skipped):
    """Sample dicts -> batch dict (tensors stacked, ints to a long tensor, captions tokenised if needed)."""
    batch = {}
    for key in samples[0] if samples else ():
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], int):
            batch[key] = torch.tensor(values, dtype=torch.long)
        else:
            batch[key] = values
    if samples and "ids" not in batch:
        batch["ids"], truncated = tokenize(batch["caption"])  # (B, 77), (B,)
        if truncated.any():
            skipped["truncated caption"] += int(truncated.sum())
    batch["skipped"] = dict(skipped)
    return batch


@functools.lru_cache(maxsize=2)  # a batch spans at most two epochs
def _epoch_order(n, seed, epoch):
    """Epoch `epoch` of the stream: a permutation of range(n) seeded by (seed, epoch)."""
    return torch.randperm(n, generator=generator(seed, "epoch", epoch)).numpy()


class _Positions(torch.utils.data.Sampler):
    """Yields, forever from stream position `start`, this rank's [(position, index), ...] per batch."""

    def __init__(self, n, batch_size, rank, world, seed, start):
        super().__init__()
        self.n, self.batch_size, self.rank, self.world, self.seed, self.start = n, batch_size, rank, world, seed, start

    def __iter__(self):
        base, span = self.start, self.batch_size * self.world
        while True:
            yield [(p, int(_epoch_order(self.n, self.seed, p // self.n)[p % self.n]))
                   for p in range(base + self.rank, base + span, self.world)]  # strided: r, r + W, ...
            base += span


class _MapBatches(torch.utils.data.Dataset):
    """[(position, index), ...] -> batch dict; runs in the DataLoader workers."""

    def __init__(self, source, seed, noise_dim):
        self.source, self.seed, self.noise_dim = source, seed, noise_dim

    def __len__(self):
        return len(self.source)

    def __getitem__(self, pairs):
        samples, skipped = [], collections.Counter()
        rendered = iter(self.source.get_many([i for _, i in pairs])) if hasattr(self.source, "get_many") else None
        for position, index in pairs:
            try:
                if rendered is not None:     # sources that read or render a batch at once (shapes, cache)
                    sample = next(rendered)
                else:
                    sample = self.source.get(index, generator(self.seed, "augment", position))
            except BadSample as e:
                skipped[e.reason] += 1
                continue
            sample["position"], sample["index"] = position, index
            if self.noise_dim:
                sample["noise"] = torch.randn(self.noise_dim, generator=generator(self.seed, "noise", position))
            samples.append(sample)
        return _collate(samples, skipped)


# The map-style stream: epoch e is a permutation of the N dataset indices seeded by (seed, e), the epochs concatenated.
# Global batch k is stream positions [k*b*W, (k+1)*b*W) and rank r takes k*b*W + r + W*j (j < b), so W ranks take
# exactly what one process with batch b*W would. Augmentation and noise are seeded by (seed, position), never by
# rank or worker: 2 ranks reproduce 1 rank, the worker count changes no bit, and one integer resumes the stream
# (also with another world or batch size: nothing is repeated or lost, batches regroup).
class Loader:
    """Infinite, resumable batches of a map-style source (jsonl, coco, karpathy, folder, shapes, cache).

    Iterate it once per run: each iter() starts its own DataLoader (and workers) at self.position.
    state_dict() -> {"position": p}, the stream position of the next global batch.
    """

    def __init__(self, source, batch_size, seed=0, rank=None, world=None, noise_dim=0, num_workers=0, pin_memory=False):
        self.source, self.batch_size, self.seed, self.noise_dim = source, batch_size, seed, noise_dim
        self.rank, self.world = rank_world(rank, world)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.position = 0

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = int(state["position"])

    def __iter__(self):
        start = self.position
        # generator=: without one, starting a DataLoader draws a seed from the global RNG (breaks exact resume)
        loader = torch.utils.data.DataLoader(
            _MapBatches(self.source, self.seed, self.noise_dim), batch_size=None, collate_fn=_as_is,
            sampler=_Positions(len(self.source), self.batch_size, self.rank, self.world, self.seed, start),
            num_workers=self.num_workers, pin_memory=self.pin_memory, generator=generator(self.seed, "workers"),
            worker_init_fn=leave_signals_to_the_trainer)
        pending, usable = collections.Counter(), 0
        for batch in loader:
            self.position += self.batch_size * self.world
            pending.update(batch["skipped"])
            if not batch.get("caption"):  # all its samples were bad: its counts go with the next batch
                if usable == 0 and self.position - start >= len(self.source):
                    raise _no_samples(f"{self.source.name} (rank {self.rank})", sum(pending.values()), pending)
                continue
            usable += len(batch["caption"])
            batch["skipped"], pending = dict(pending), collections.Counter()
            yield batch


class _TarBatches(torch.utils.data.IterableDataset):
    """Each DataLoader worker reads its own shards and yields whole batches, tagged with its cursor."""

    def __init__(self, source, batch_size, seed, rank, world, noise_dim, batches, cursors):
        self.source, self.batch_size, self.seed, self.rank, self.world = source, batch_size, seed, rank, world
        self.noise_dim, self.batches, self.cursors = noise_dim, batches, cursors

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # the DataLoader takes batches from workers in turn, starting at worker 0; after `batches` batches
        # the next one is reader (batches % workers)'s, so worker w plays reader (w + batches) % workers
        role = (worker + self.batches) % workers
        reader = self.rank * workers + role
        cursor = self.cursors[role] or dict(epoch=0, shard=0, offset=0, seen=0)
        stream = self.source.samples(self.seed, reader, self.world * workers, cursor)
        while True:
            samples, skipped = [], collections.Counter()
            while len(samples) < self.batch_size:
                try:
                    sample, cursor = next(stream)
                except UserError as e:  # sent as data: raised in a worker, the DataLoader would wrap it in a traceback
                    yield {"error": str(e)}
                    return
                if isinstance(sample, BadSample):
                    skipped[sample.reason] += 1
                    continue
                if self.noise_dim:
                    noise = generator(self.seed, "noise", reader, cursor["seen"])
                    sample["noise"] = torch.randn(self.noise_dim, generator=noise)
                samples.append(sample)
            batch = _collate(samples, skipped)
            batch["reader"], batch["cursor"] = role, cursor
            yield batch


# The tar stream: shards, never samples, are split over the R = ranks x workers readers (epoch e shuffles the shard
# list with (seed, e); reader g takes shards g, g + R, ...) and each reader cycles on through epochs, so no rank runs
# dry. Samples keep their order inside a shard: the resume state is then one cursor per reader, not a sample list.
class TarLoader:
    """Infinite, always-full batches of a tar source; state_dict() is per rank (resume: same world and workers)."""

    def __init__(self, source, batch_size, seed=0, rank=None, world=None, noise_dim=0, num_workers=0, pin_memory=False):
        self.source, self.batch_size, self.seed, self.noise_dim = source, batch_size, seed, noise_dim
        self.rank, self.world = rank_world(rank, world)
        self.num_workers, self.pin_memory = num_workers, pin_memory
        if len(source.shards) < self.world:
            raise UserError(f"{source.name}: {len(source.shards)} shards for {self.world} ranks (each reads shards of "
                            f"its own): use at most {len(source.shards)} processes, or split the data into more shards")
        # More workers than shards per rank: fewer workers, not an error. Each reader needs shards of its own (one
        # without could only repeat another's samples), so workers beyond shards // ranks cannot help; fewer read
        # the same stream, only with less decoding in parallel. The count depends on the shards, ranks and
        # --num-workers alone, so the same command resumes the same stream.
        workers = min(max(num_workers, 1), len(source.shards) // self.world)
        self.num_workers = min(num_workers, workers)   # 0 stays 0: one reader, in this process
        self.batches, self.cursors = 0, [None] * workers

    def state_dict(self):
        return {"world": self.world, "batches": self.batches, "readers": [c and dict(c) for c in self.cursors]}

    def load_state_dict(self, state):
        # why not adapt: the reader count decides which shards each reader takes and where its cursor points;
        # another count is another stream, which would repeat and skip samples instead of continuing this one
        if state["world"] != self.world or len(state["readers"]) != len(self.cursors):
            raise UserError(f"{self.source.name}: the tar stream was saved with {state['world']} process(es) x "
                            f"{len(state['readers'])} reader(s) each (now {self.world} x {len(self.cursors)}) and "
                            f"continues exactly only with the same: resume with {state['world']} process(es) and "
                            f"--num-workers {len(state['readers'])}")
        self.batches, self.cursors = int(state["batches"]), [c and dict(c) for c in state["readers"]]

    def __iter__(self):
        dataset = _TarBatches(self.source, self.batch_size, self.seed, self.rank, self.world, self.noise_dim,
                              self.batches, list(self.cursors))
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, collate_fn=_as_is,
                                             num_workers=self.num_workers, pin_memory=self.pin_memory,
                                             generator=generator(self.seed, "workers"),
                                             worker_init_fn=leave_signals_to_the_trainer)
        for batch in loader:
            if "error" in batch:
                raise UserError(batch["error"])
            self.cursors[batch.pop("reader")] = batch.pop("cursor")
            self.batches += 1
            yield batch


def split_noise(noise, spec):
    """(B, D) per-sample normals (the loader's noise_dim = sum of spec's sizes) -> dict of named pieces
    {name: size}: 77 x 16 latents (B, 77, 16), scalars (B,)."""
    out, i = {}, 0
    for name, n in spec.items():
        piece = noise[:, i:i + n]
        out[name] = piece.view(-1, 77, 16) if n == 77 * 16 else piece[:, 0]
        i += n
    return out


def make_loader(source, batch_size, seed=0, rank=None, world=None, noise_dim=0, num_workers=0, pin_memory=False):
    """The loader that fits the source: TarLoader for `tar:`, Loader otherwise (same arguments)."""
    kind = TarLoader if isinstance(source, TarSource) else Loader
    return kind(source, batch_size, seed, rank, world, noise_dim, num_workers, pin_memory)


# ----------------------------------------------------------------------------- pre-tokenising

def _pretokenize_batches(source, rank, world, batch_size, num_workers, done):
    """This rank's samples of a source, in batches of (images, captions), skipping the first `done` usable ones."""
    if isinstance(source, TarSource):       # one pass over this rank's shards, decoded here
        stream = source.samples(0, rank, world, dict(epoch=0, shard=0, offset=0, seen=0))
        items = (s for s, cursor in itertools.takewhile(lambda sc: sc[1]["epoch"] == 0, stream))
    else:
        loader = torch.utils.data.DataLoader(_Indexed(source), batch_size=None, num_workers=num_workers,
                                             sampler=range(rank, len(source), world))
        items = iter(loader)
    usable, batch, skipped = 0, [], collections.Counter()
    for sample in items:
        if isinstance(sample, BadSample):
            skipped[sample.reason] += 1
            continue
        usable += 1
        if usable <= done:
            continue
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch, skipped
            batch = []
    if batch:
        yield batch, skipped


class _Indexed(torch.utils.data.Dataset):
    """source.get(i), or the BadSample it raised (for the pre-tokeniser's DataLoader)."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        try:  # a generator per index: a caption drawn per sample (recaptions, Karpathy) is the same on every run
            return self.source.get(index, generator("pretokenize", index))
        except BadSample as e:
            return e


def _cache_identity(args, tok, clip, world, bf16):
    """What this pretokenize run's rows depend on (CACHE_IDENTITY) plus, for people, the paths it used."""
    return dict(tokenizer=weights_sha256(tok), clip=None if clip is None else weights_sha256(clip), data=args.data,
                image_size=tok.image_size, precision="bf16" if bf16 else "fp32", world=world,
                made_with=dict(tokenizer=args.tokenizer, clip_tower=None if clip is None else clip.tower,
                               clip_weights=None if clip is None else clip.weights))


def _shown(key, value):
    """A CACHE_IDENTITY value for a message: hashes in short form."""
    if key == "clip" and value is None:
        return "none (--no-clip)"
    return short_hash(value) if key in ("tokenizer", "clip") else repr(value)


def check_extension(out, identity):
    """Refuse (before anything is written) to append to a cache whose parts were made with another tokenizer, CLIP
    tower, data spec, image size, precision or rank count: its rows and the new ones would not belong together."""
    for part in sorted(p for p in glob.glob(os.path.join(out, "part-*")) if os.path.isdir(p)):
        old = read_identity(part)
        if old is None and [f for f in os.listdir(part) if not f.startswith(".")]:   # .lock: a run starting there
            raise UserError(f"--out {out}: {part} was made before caches recorded their tokenizer, CLIP and data, so "
                            f"it cannot be checked and is not extended: pre-tokenise into a new --out folder")
        changed = [f"{k} {_shown(k, old.get(k))} -> {_shown(k, identity[k])}" for k in CACHE_IDENTITY
                   if old is not None and old.get(k) != identity[k]]
        if changed:
            raise UserError(f"--out {out} holds a cache made with other settings ({'; '.join(changed)}): nothing "
                            f"appended; pre-tokenise into a new --out folder, or continue with the settings it was "
                            f"made with")


@torch.no_grad()
def pretokenize(args):
    """Encode every sample of --data once: tokenizer posterior (+ CLIP features) -> a cache for `cache:DIR`.

    Under torchrun each rank writes DIR/part-<rank> (read back together); a killed run continues where it
    stopped (rows already in a part are not recomputed). Each part records its identity (tokenizer and CLIP weight
    hashes, data spec, settings) in identity.json; a run of another identity never appends to it.
    """
    rank, world, local = dist_env()
    device = pick_device("auto", local)   # also this rank's current GPU (TF32 on)
    tok = tokenizer_lib.load_tokenizer(args.tokenizer).to(device)
    clip_cfg = dict(tower=OFFICIAL_CLIP_TOWER, weights="openai")   # the official tokenizer's text tower
    if os.path.isdir(args.tokenizer) or args.tokenizer.endswith(".pt"):
        ckpt = load_checkpoint(args.tokenizer)
        clip_cfg = dict(ckpt["config"]["clip"], weights=resolve_path(ckpt["config"]["clip"]["weights"],
                                                                     ckpt["path"]))
    clip = None if args.no_clip else CLIPTextEncoder(args.clip_tower or clip_cfg["tower"],
                                                     args.clip_weights or clip_cfg["weights"]).to(device)
    try:
        source = build_dataset(args.data, image_size=tok.image_size)
    except (ValueError, RuntimeError) as e:   # the spec's errors: an unknown kind, option or split
        raise UserError(str(e)) from None
    part = os.path.join(args.out, f"part-{rank:05d}")
    bf16 = device.type == "cuda" and args.bf16      # fp32 by default, as the official trainer encodes
    identity = _cache_identity(args, tok, clip, world, bf16)
    check_extension(args.out, identity)
    with RunLock(part) as lock:     # one writer per part: a second pretokenize into this --out stops here
        if lock.note:
            print(lock.note)
        with write_errors(part, "run the same command again to continue (the rows written so far are kept)"):
            done = trim_cache(part)  # rows a killed run appended to some arrays and not others go
            _pretokenize_part(args, source, tok, clip, part, identity, done, bf16)


def _pretokenize_part(args, source, tok, clip, part, identity, done, bf16):
    """pretokenize's loop: this rank's samples after the first `done`, encoded and appended to `part` in batches."""
    rank, world, _ = dist_env()
    device = next(tok.parameters()).device
    total, skipped = done, collections.Counter()
    share = len(range(rank, len(source), world)) if hasattr(source, "__len__") else None
    # a context: the bar ends its line on any exit, so an error is printed on a line of its own
    with tqdm(total=share, initial=done, desc="pre-tokenising", unit="img", disable=rank != 0) as bar:
        for batch, skipped in _pretokenize_batches(source, rank, world, args.batch_size, args.num_workers, done):
            images = torch.stack([s["image"] for s in batch]).to(device)
            captions = [s["caption"] for s in batch]
            ids, truncated = tokenize(captions)
            skipped["truncated caption"] += int(truncated.sum())
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                mean, logvar = tok.encode(images)                                    # (B, 77, 16) each
                feats = None if clip is None else clip.distinct(ids.to(device))    # (B, 77, C)
            if not os.path.isfile(os.path.join(part, IDENTITY_FILE)):     # recorded before the part's first rows
                os.makedirs(part, exist_ok=True)
                write_json_atomic(os.path.join(part, IDENTITY_FILE), identity)
            write_cache(part, torch.cat([mean, logvar], -1), feats, ids, captions)
            total += len(batch)
            bar.update(len(batch))
    print(f"rank {rank}: {total} samples in {part} (tokenizer {short_hash(identity['tokenizer'])}, CLIP "
          f"{_shown('clip', identity['clip'])}); skipped: {format_skips(skipped)}")


def build_parser():
    """The command line: one subcommand, pretokenize (the sources themselves are used by train.py)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pretokenize", help="cache tokenizer posteriors and CLIP features for flow training")
    p.add_argument("--data", required=True, help="data spec, e.g. jsonl:FILE,root=DIR")
    p.add_argument("--tokenizer", required=True, help="a tokenizer run / checkpoint or the official FlowTiTok .bin")
    p.add_argument("--out", required=True, help="cache folder (train with --data cache:FOLDER)")
    p.add_argument("--clip-tower", help="default: the tokenizer's (ViT-L-14-336-quickgelu for the official one)")
    p.add_argument("--clip-weights", help="default: the tokenizer's ('openai' for the official one)")
    p.add_argument("--no-clip", action="store_true", help="cache only the image posteriors (CLIP runs in training)")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="images per encoder batch (default: %(default)s)")
    p.add_argument("--num-workers", type=non_negative_int, default=4,
                   help="image-decoding workers (default: %(default)s)")
    p.add_argument("--bf16", action="store_true", help="encode under bf16 autocast on a GPU: faster, posteriors differ "
                   "from fp32's (BENCHMARKS.md, data notes); the default is fp32, as the official trainer encodes")
    p.add_argument("--fp32", action="store_true", help="fp32 encoding: the default now (kept so older commands run)")
    return parser


if __name__ == "__main__":
    sys.exit(run_cli("data.py", pretokenize, build_parser().parse_args()))
