"""FlowTok test suite: CPU, tiny configs, minutes. Run: python -m pytest -q test_flowtok.py

Known answers, equivalence with the official code (testdata/official_tiny.pt, produced by the official
FlowTok code at tiny sizes), round trips, resume and DDP checks, bad-input corpora and CLI runs.
"""
import argparse
import ast
import collections
import contextlib
import copy
import errno
import functools
import hashlib
import http.server
import io
import itertools
import json
import math
import os
import pickle
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import urllib.error
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

import bench
import data
import demo
import evaluate
import flow_dit
import projector
import runtime
import sample
import tokenizer
from flow_dit import FLOW_MODELS, FlowDiT, build_flowtok, euler_sample, flowtok_loss, load_official_flowtok
from projector import CLIPTextEncoder, TextDecoder, TextProjector
from runtime import UserError
from tokenizer import Tokenizer, load_official_tokenizer

REPO = Path(__file__).resolve().parent
TESTDATA = REPO / "testdata"
torch.set_num_threads(min(2, torch.get_num_threads()))


def assert_exact(mine, ref, atol=1e-5):
    """The fixture tolerance: atol 1e-5, rtol 0 (structural errors show up at 1e-3 and above)."""
    torch.testing.assert_close(mine, ref, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def official():
    return torch.load(TESTDATA / "official_tiny.pt", weights_only=True)


def tiny_flowtok(official):
    """The fixture's flow model: DiT 64/2/4, text projector (clip 64, 2 blocks, 4 heads, d_ff 96, MLP 128)."""
    dit_sd, proj_sd = flow_dit.convert_official_flowtok(official["flowtok_state_dict"])
    dit = FlowDiT(depth=2, width=64, heads=4)
    proj = TextProjector(clip_dim=64, depth=2, heads=4, d_ff=96, align_hidden=128)
    runtime.load_strict(dit, dit_sd, "dit")
    runtime.load_strict(proj, proj_sd, "projector")
    return dit.eval(), proj.eval()


def to_flow_layout(x):
    """Official tokenizer layout (B, 16, 1, 77) -> ours (B, 77, 16)."""
    return x.squeeze(2).transpose(1, 2)


def listing(name):
    """An official state-dict listing (testdata/state_dicts) as a dict of meta tensors."""
    sd = {}
    for line in (TESTDATA / "state_dicts" / f"{name}.txt").read_text().splitlines():
        key, shape, _ = line.split("\t") if line.count("\t") == 2 else (line, None, None)
        if shape is not None:
            sd[key] = torch.empty(json.loads(shape), device="meta")
    return sd


def random_weights(model, seed=0, std=0.05):
    """Perturb every parameter (zero-initialised adaLN/output layers would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn(p.shape, generator=g))
    return model


# ----------------------------------------------------------------------------------------------------------
# Model core: equivalence with the official code
# ----------------------------------------------------------------------------------------------------------

def test_official_dit_and_projector(official):
    d = official
    dit, proj = tiny_flowtok(d)
    with torch.no_grad():
        assert_exact(dit(d["dit_x"], d["dit_t"], d["dit_null_indicator"]), d["dit_out"])
        z, mu, logvar = proj(d["cond"], d["text_eps"])
        assert_exact(mu, d["text_mu"])
        assert_exact(logvar, d["text_logvar"])
        assert_exact(z, d["text_z"])
        assert_exact(proj.align(d["cond"]), d["proj_out"])
        assert_exact(proj.log_temperature, d["t2t_temperature"])


def test_official_training_loss(official):
    d = official
    dit, proj = tiny_flowtok(d)
    x1_before = d["loss_x1"].clone()
    with torch.no_grad():
        out = flowtok_loss(dit, proj, d["loss_cond"], d["loss_x1"], d["loss_t"], d["loss_null_indicator"],
                           d["loss_eps"], w_con=1.0, w_kl=0.01, kl="official")
    assert torch.equal(d["loss_x1"], x1_before), "the caller's x1 must not be mutated"
    assert_exact(out["x1"], d["loss_x1_after_shuffle"])
    assert_exact(out["x0"], d["loss_x0"])
    assert_exact(out["xt"], d["loss_xt"])
    assert_exact(out["target"], d["loss_target_velocity"])
    assert_exact(out["pred"], d["loss_pred"])
    assert_exact(out["diff_per_sample"], d["loss_diff"])
    assert_exact(out["contrastive"], d["loss_contrastive"])
    assert_exact(out["kl"], d["loss_kld"])
    assert_exact(out["diff_per_sample"] + out["contrastive"] + out["kl"], d["loss_per_sample"])
    assert_exact(out["loss"], d["loss_per_sample"].mean())


class LinearField(nn.Module):
    """dx/dt = -x + cos(3 t), whatever the CFG flag: x(1) = (x0 - 0.1) / e + (cos 3 + 3 sin 3) / 10."""

    def forward(self, x, t, null):
        return -x + torch.cos(3 * t.double())[:, None, None]


def test_solvers_integrate_to_their_order_and_euler_stays_official(official):
    x0 = torch.linspace(-1, 1, 2 * 77 * 16, dtype=torch.float64).reshape(2, 77, 16)
    exact = (x0 - 0.1) / math.e + (math.cos(3) + 3 * math.sin(3)) / 10
    for sampler, order in (("heun", 2), ("midpoint", 2), ("ab2", 2)):
        for shift in (1.0, 2.0):
            errors = []
            for steps in (8, 16, 32):
                x1, nfe = flow_dit.solve(LinearField(), x0, steps, cfg=2.0, sampler=sampler, shift=shift)
                assert nfe == steps * flow_dit.SAMPLERS[sampler]
                errors.append((x1 - exact).abs().max().item())
            ratios = [a / b for a, b in zip(errors, errors[1:])]         # halving the step: error / 2^order
            assert all(2 ** order * 0.8 < r < 2 ** order * 1.25 for r in ratios), (sampler, shift, errors, ratios)
    assert flow_dit.time_grid(4, 2.0) == pytest.approx([0, 0.4, 2 / 3, 6 / 7, 1])   # more steps near t = 1
    d = official                                      # euler: the official sampler, bitwise
    dit, _ = tiny_flowtok(d)
    x1, nfe = flow_dit.solve(dit, d["sampler_xT"], 5, cfg=2.0, sampler="euler")
    assert nfe == 5 and torch.equal(x1, euler_sample(dit, d["sampler_xT"], steps=5, cfg=2.0))
    assert_exact(x1, d["sampler_out"])
    with pytest.raises(ValueError, match="unknown sampler 'rk4'"):
        flow_dit.solve(dit, d["sampler_xT"], 2, sampler="rk4")


def test_official_sampler(official):
    d = official
    dit, _ = tiny_flowtok(d)
    t_eval, dt = flow_dit.sampling_schedule(5)
    assert_exact(t_eval, d["sampler_t_eval"], atol=0)
    assert_exact(dt, d["sampler_step_sizes"], atol=0)
    traj = euler_sample(dit, d["sampler_xT"], steps=5, cfg=2.0, trajectory=True)
    assert_exact(traj, d["sampler_traj"])
    assert_exact(euler_sample(dit, d["sampler_xT"], steps=5, cfg=2.0), d["sampler_out"])


def test_official_tokenizer(official):
    d = official
    tok = Tokenizer.from_preset("tiny")
    runtime.load_strict(tok, tokenizer.convert_official_tokenizer(d["flowtitok_state_dict"]), "tok")
    tok.eval()
    with torch.no_grad():
        mean, logvar = tok.encode(d["tok_img"])
        assert_exact(mean, to_flow_layout(d["tok_enc_raw"][:, :16]))
        assert_exact(logvar, to_flow_layout(d["tok_post_logvar"]))
        eps = to_flow_layout(d["tok_post_eps"])
        assert_exact(mean + eps * torch.exp(0.5 * logvar), to_flow_layout(d["tok_post_sample"]))
        assert_exact(tok.flow_tokens(mean, logvar, eps), d["tok_flow_tokens"])
        assert_exact(tokenizer.posterior_kl(mean, logvar), d["tok_post_kl"])
        assert_exact(tok.decode(to_flow_layout(d["dec_tokens"]), d["dec_text"]), d["dec_out"])
        assert_exact(to_flow_layout(d["pipe_tokens"]) * tokenizer.SCALE_FACTOR, d["sampler_out"])
        assert_exact(tok.decode_flow_tokens(d["sampler_out"], d["cond"]), d["pipe_img"])


def test_official_tokenizer_loader_infers_sizes(official):
    tok = load_official_tokenizer({"state_dict": official["flowtitok_state_dict"]})
    assert (tok.config["image_size"], tok.config["patch_size"], tok.config["enc_width"], tok.config["enc_heads"],
            tok.config["dec_depth"], tok.config["text_dim"]) == (32, 8, 64, 4, 2, 64)
    with torch.no_grad():
        assert_exact(tok.eval().decode(to_flow_layout(official["dec_tokens"]), official["dec_text"]),
                     official["dec_out"])


def test_parameter_counts_match_official():
    with torch.device("meta"):
        for size, expected in [("B", 153_925_185), ("XL", 698_083_905), ("H", 1_092_095_553)]:
            dit, proj = build_flowtok(size)
            n = sum(p.numel() for p in dit.parameters()) + dit.pos_embed.numel()   # the fixed table counts too
            assert n + sum(p.numel() for p in proj.parameters()) == expected, size
        for preset in ("bl77-256", "bl77-512"):
            assert sum(p.numel() for p in Tokenizer.from_preset(preset).parameters()) == 389_851_220


@pytest.mark.parametrize("name", ["FlowTok-B", "FlowTok-XL", "FlowTok-H"])
def test_official_flowtok_listing_loads(name):
    sd = listing(name)
    dit, proj = load_official_flowtok({"nnet_ema": {"module." + k: v for k, v in sd.items()}})
    size = name.split("-")[1]
    assert (dit.config["depth"], dit.config["width"], dit.config["heads"]) == tuple(
        FLOW_MODELS[size][k] for k in ("depth", "width", "heads"))
    # every official element is accounted for (Q, K, V are fused, nothing dropped or invented)
    n_official = sum(v.numel() for v in sd.values())
    assert sum(v.numel() for v in dit.state_dict().values()) + sum(
        v.numel() for v in proj.state_dict().values()) == n_official


@pytest.mark.parametrize("name,size", [("FlowTiTok-256", 256), ("FlowTiTok-512", 512)])
def test_official_tokenizer_listing_loads(name, size):
    sd = listing(name)
    tok = load_official_tokenizer(sd)
    assert tok.config["image_size"] == size
    assert sum(v.numel() for v in tok.state_dict().values()) == sum(v.numel() for v in sd.values())
    with torch.device("meta"):
        ours = Tokenizer.from_preset(f"bl77-{size}")
    assert {k: v.shape for k, v in tok.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


def test_loader_errors_list_what_does_not_fit(official):
    sd = dict(official["flowtitok_state_dict"])
    sd["decoder.extra.weight"] = torch.zeros(3)
    del sd["decoder.conv_out.bias"]
    sd["decoder.ln_post.weight"] = torch.zeros(65)
    with pytest.raises(ValueError) as e:
        load_official_tokenizer(sd)
    msg = str(e.value)
    assert "missing: decoder.conv_out.bias" in msg and "unexpected: decoder.extra.weight" in msg
    assert "decoder.ln_post.weight: checkpoint (65,) vs model (64,)" in msg
    with pytest.raises(ValueError, match="not a FlowTiTok"):
        load_official_tokenizer({"foo": torch.zeros(1)})
    sd = dict(official["flowtok_state_dict"], stray=torch.zeros(1))
    with pytest.raises(ValueError, match="stray"):
        load_official_flowtok(sd, heads=4)


def test_official_flowtok_loader_from_file(official, tmp_path):
    torch.save({"model": official["flowtok_state_dict"]}, tmp_path / "FlowTok-tiny.pth")
    dit, proj = load_official_flowtok(str(tmp_path / "FlowTok-tiny.pth"), heads=4, projector_heads=4)
    d = official
    with torch.no_grad():
        assert_exact(dit.eval()(d["dit_x"], d["dit_t"], d["dit_null_indicator"]), d["dit_out"])
        assert_exact(proj.eval()(d["cond"], d["text_eps"])[0], d["text_z"])
    assert load_official_flowtok(official["flowtok_state_dict"], projector_heads=4)[0].config["heads"] == 4  # "tiny"
    one_block = {k: v for k, v in official["flowtok_state_dict"].items() if not k.startswith("blocks.1.")}
    with pytest.raises(ValueError, match="width 64 and depth 1 matches no size"):
        load_official_flowtok(one_block)


# ----------------------------------------------------------------------------------------------------------
# Model core: known answers and invariants
# ----------------------------------------------------------------------------------------------------------

def test_batched_cfg_equals_two_pass():
    torch.manual_seed(0)
    dit = random_weights(FlowDiT(depth=2, width=64, heads=4)).eval()
    x0 = torch.randn(3, 77, 16)
    x, (t_eval, dt) = x0, flow_dit.sampling_schedule(6)
    with torch.no_grad():
        for i in range(6):
            t = t_eval[i].expand(3)
            v_c = dit(x, t, torch.zeros(3, dtype=torch.bool))
            v_u = dit(x, t, torch.ones(3, dtype=torch.bool))
            x = x + dt[i] * (v_u + 3.0 * (v_c - v_u))
    assert_exact(euler_sample(dit, x0, steps=6, cfg=3.0), x)
    # cfg = 1 is the conditional branch alone
    with torch.no_grad():
        x = x0
        for i in range(6):
            x = x + dt[i] * dit(x, t_eval[i].expand(3), torch.zeros(3, dtype=torch.bool))
    assert_exact(euler_sample(dit, x0, steps=6, cfg=1.0), x)


def test_cfg_shuffle_matches_official_rule():
    def reference(x1, null):   # the official loop, written plainly
        idx = [i for i, n in enumerate(null.tolist()) if n]
        if len(idx) <= 1:
            return x1.clone(), torch.zeros_like(null)
        out = x1.clone()
        for j, i in enumerate(idx):
            out[i] = x1[idx[(j + 1) % len(idx)]]
        return out, null.clone()
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(9, 77, 16, generator=g)
    cases = [torch.rand(9, generator=g) < p for p in (0.0, 0.1, 0.3, 0.5, 0.9, 1.0)]
    cases.append(torch.tensor([False, True] + [False] * 7))
    for null in cases:
        mine, mine_null = flow_dit.cfg_shuffle(x1, null)
        ref, ref_null = reference(x1, null)
        assert torch.equal(mine, ref) and torch.equal(mine_null, ref_null)


def test_contrastive_loss_known_answers():
    z = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    # normalised: a = p = I, logits = e^tau I; each row: -log(e^s / (e^s + 1)) = log(1 + e^-s)
    for tau in (0.0, 1.0):
        s = math.exp(tau)
        got = projector.contrastive_loss(z, p, torch.tensor(tau))
        assert got.item() == pytest.approx(math.log(1 + math.exp(-s)), rel=1e-6)
    # two rows share a caption: both count as positives with weight 1/2
    got = projector.contrastive_loss(z, p, torch.tensor(0.0), groups=torch.tensor([7, 7]))
    expected = -0.5 * (math.log(math.e / (math.e + 1)) + math.log(1 / (math.e + 1)))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # a 3-row case with known cosine matrix
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    S = z @ z.T
    lse = torch.logsumexp(S, 1)
    expected = (lse - S.diag()).mean().item()          # symmetric S: both directions equal
    assert projector.contrastive_loss(z, z, torch.tensor(0.0)).item() == pytest.approx(expected, rel=1e-6)


def test_kl_forms_known_answers():
    n = 2 * 77 * 16
    mu, logvar = torch.ones(2, 77, 16), torch.zeros(2, 77, 16)
    # official: -1/2 sum(1 + 0 - 0.3^6 - 1) = 0.5 * 0.000729 * n (summed over the whole batch)
    # (float32: 1 - 0.000729 - 1 keeps ~4 digits of the tiny term, as in the official code)
    assert projector.kl_official(mu, logvar).item() == pytest.approx(0.5 * 0.3 ** 6 * n, rel=1e-4)
    # standard: 1/2 sum(mu^2) / B = 0.5 * 1232
    assert projector.kl_standard(mu, logvar).item() == pytest.approx(0.5 * 77 * 16, rel=1e-6)
    mu, logvar = torch.zeros(2, 77, 16), torch.full((2, 77, 16), math.log(2.0))
    assert projector.kl_official(mu, logvar).item() == pytest.approx(0.5 * (1 - math.log(2)) * n, rel=1e-6)
    assert projector.kl_standard(mu, logvar).item() == pytest.approx(0.5 * (1 - math.log(2)) * 1232, rel=1e-6)
    assert projector.kl_official(torch.zeros(1, 3), torch.zeros(1, 3)).item() == 0.0
    # the soft wall: beyond |mu| ~ 6.09 the official mean penalty exceeds mu^2
    assert (0.3 * 7.0) ** 6 > 7.0 ** 2 and (0.3 * 5.0) ** 6 < 5.0 ** 2


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    dit = random_weights(FlowDiT(depth=2, width=64, heads=4))
    tok = Tokenizer.from_preset("tiny")
    x, t, null = torch.randn(2, 77, 16), torch.rand(2), torch.tensor([False, True])
    img, text = torch.rand(2, 3, 32, 32), torch.randn(2, 77, 64)

    def grads(flag):
        dit.grad_checkpointing = flag
        tok.set_grad_checkpointing(flag)
        dit.zero_grad()
        tok.zero_grad()
        mean, _ = tok.encode(img)
        (dit(x, t, null).square().sum() + tok.decode(mean, text).square().sum()).backward()
        return [p.grad.clone() for p in list(dit.parameters()) + list(tok.parameters())]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


BF16_EPS = 2 ** -8     # bf16's machine epsilon (8 significant bits): one rounding step of a bf16 number, relative


def test_bf16_autocast_keeps_posteriors_and_losses_float32():
    torch.manual_seed(0)
    dit, proj = FlowDiT(depth=1, width=64, heads=4), TextProjector(clip_dim=64, depth=1, heads=4, d_ff=96).eval()
    tok = Tokenizer.from_preset("tiny")
    images = torch.rand(2, 3, 32, 32)
    inputs = (torch.randn(2, 77, 64), torch.randn(2, 77, 16), torch.rand(2), torch.zeros(2, dtype=torch.bool),
              torch.randn(2, 77, 16))
    with torch.no_grad():
        mean_32, logvar_32 = tok.encode(images)
        out_32 = flowtok_loss(dit, proj, *inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mean, logvar = tok.encode(images)
            out = flowtok_loss(dit, proj, *inputs)
    assert mean.dtype == logvar.dtype == torch.float32
    assert all(out[k].dtype == torch.float32 for k in ("loss", "diff", "kl", "contrastive", "mu", "logvar", "x0"))
    # and the values are float32's up to bf16 rounding elsewhere: each scalar averages many bf16-rounded numbers,
    # so it must not move by a whole bf16 step; a posterior entry by at most a couple of steps of the largest one
    for k in ("loss", "diff", "kl", "contrastive"):
        torch.testing.assert_close(out[k], out_32[k], rtol=BF16_EPS, atol=0)
    for bf, ref in ((mean, mean_32), (logvar, logvar_32)):
        torch.testing.assert_close(bf, ref, rtol=0, atol=2 * BF16_EPS * ref.abs().max().item())


def record_calls(module):
    """Keep every (input, output) of module's forward calls in the returned list (a forward hook)."""
    calls = []
    module.register_forward_hook(lambda m, args, out: calls.append((args[0].detach(), out.detach())))
    return calls


def assert_float32_linear(calls, linear):
    """Every recorded call of `linear` returned float32 equal to a float32 Linear of the same input (to 1e-6)."""
    assert calls
    for inp, out in calls:
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, F.linear(inp.float(), linear.weight, linear.bias), atol=1e-6, rtol=0)


def test_fp32_regions_hold_under_bf16_autocast(official):
    """Under CPU bf16 autocast the float32 regions (posterior heads, contrastive logits and loss, KL) still compute in
    float32: from the same bf16-produced inputs they equal a float32 computation to 1e-6, and one training step's
    loss terms stay within a bf16 step of the float32 step's."""
    d = official
    dit, proj = tiny_flowtok(d)
    inputs = (d["loss_cond"], d["loss_x1"], d["loss_t"], d["loss_null_indicator"], d["loss_eps"])
    ref = flowtok_loss(dit, proj, *inputs)
    heads, targets = record_calls(proj.linear), record_calls(proj.align_mlp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = flowtok_loss(dit, proj, *inputs)
        z, p, tau = out["x0"].detach(), targets[0][1], proj.log_temperature.detach()
        logits = projector.contrastive_logits(z, p, tau)
        a, b = F.normalize(z.flatten(1), dim=-1), F.normalize(p.flatten(1).float(), dim=-1)
        bf16_logits = tau.exp() * a @ b.T          # the same formula outside an fp32 region: autocast's bf16 matmul
    out["loss"].backward()                         # the rest of the training step, still through the regions
    assert p.dtype == torch.bfloat16, "the alignment MLP runs in bf16: the regions' inputs really are bf16-made"
    assert_float32_linear(heads, proj.linear)
    assert logits.dtype == torch.float32
    fp32_logits = projector.contrastive_logits(z, p, tau)
    torch.testing.assert_close(logits, fp32_logits, atol=1e-6, rtol=0)
    # the check can tell: bf16 logits of size ~e^tau = 15 are off by about e^tau * BF16_EPS / 2, far above 1e-6
    assert (bf16_logits.float() - fp32_logits).abs().max() > 1e-3
    torch.testing.assert_close(out["contrastive"].detach(), projector.contrastive_loss(z, p, tau), atol=1e-6, rtol=0)
    kl = 0.01 * projector.kl_official(out["mu"].detach(), out["logvar"].detach())
    torch.testing.assert_close(out["kl"].detach(), kl, atol=0, rtol=1e-6)
    for k in ("loss", "diff", "kl", "contrastive"):       # bf16 elsewhere: within one bf16 step (see the test above)
        torch.testing.assert_close(out[k].detach(), ref[k].detach(), rtol=BF16_EPS, atol=0)
    grads = [q.grad for q in list(dit.parameters()) + list(proj.parameters()) if q.grad is not None]
    assert proj.log_temperature.grad is not None and all(torch.isfinite(g).all() for g in grads)

    official_tok = Tokenizer.from_preset("tiny")
    runtime.load_strict(official_tok, tokenizer.convert_official_tokenizer(d["flowtitok_state_dict"]), "tok")
    for tok in (official_tok.eval(), random_weights(Tokenizer.from_preset("demo")).eval()):   # both latent layouts
        with torch.no_grad():
            mean_32, logvar_32 = tok.encode(d["tok_img"])
            moments = record_calls(tok.encoder.to_moments)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                mean, logvar = tok.encode(d["tok_img"])
                kl = tokenizer.posterior_kl(mean, logvar)
        assert_float32_linear(moments, tok.encoder.to_moments)
        assert mean.dtype == logvar.dtype == kl.dtype == torch.float32
        torch.testing.assert_close(kl, tokenizer.posterior_kl(mean, logvar), atol=0, rtol=1e-6)
        for bf, ref in ((mean, mean_32), (logvar, logvar_32)):
            torch.testing.assert_close(bf, ref, rtol=0, atol=2 * BF16_EPS * ref.abs().max().item())
        kl_32 = tokenizer.posterior_kl(mean_32, logvar_32)
        torch.testing.assert_close(kl.sum(1).mean(), kl_32.sum(1).mean(), rtol=BF16_EPS, atol=0)  # train.py's KL


def test_dit_patch_size_groups_consecutive_tokens():
    torch.manual_seed(0)
    dit = random_weights(FlowDiT(depth=1, width=32, heads=2, patch_size=7)).eval()
    assert dit.pos_embed.shape == (1, 11, 32)
    x = torch.randn(2, 77, 16)
    with torch.no_grad():
        v = dit(x, torch.rand(2), torch.zeros(2, dtype=torch.bool))
        x2 = x.clone()
        x2[:, 7:14] += 1.0      # change the 2nd group only: the 1st group's input embedding is unchanged
        assert v.shape == (2, 77, 16)
        h1 = dit.x_embedder(x.reshape(2, 11, 112))
        h2 = dit.x_embedder(x2.reshape(2, 11, 112))
        assert torch.equal(h1[:, 0], h2[:, 0]) and not torch.equal(h1[:, 1], h2[:, 1])
    with pytest.raises(ValueError, match="must divide"):
        FlowDiT(depth=1, width=32, heads=2, patch_size=5)


def test_tokenizer_presets_and_shapes():
    tok = Tokenizer.from_preset("tiny")
    img = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        mean, logvar = tok.encode(img)
        assert mean.shape == logvar.shape == (2, 77, 16)
        assert tok.decode(mean, torch.randn(2, 77, 64)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown tokenizer preset"):
        Tokenizer.from_preset("nope")


# The layout-specific state-dict entries (name -> shape) of checkpoints written before the demo variants became
# their own classes (LinearEncoder / LinearDecoder, TokenGrouping): these must keep loading unchanged.
OLD_LAYOUT_KEYS = {
    "tiny": {"encoder.latent_tokens": (77, 64), "encoder.latent_token_positional_embedding": (77, 64),
             "encoder.to_moments.weight": (32, 64), "encoder.to_moments.bias": (32,),
             "decoder.mask_token": (1, 1, 64), "decoder.latent_token_positional_embedding": (77, 64),
             "decoder.decoder_embed.weight": (64, 16), "decoder.decoder_embed.bias": (64,),
             "decoder.text_guidance_proj.weight": (64, 64), "decoder.text_guidance_proj.bias": (64,),
             "decoder.text_guidance_positional_embedding": (77, 64)},
    "demo": {"encoder.to_moments.weight": (2464, 2048), "encoder.to_moments.bias": (2464,),
             "decoder.decoder_embed.weight": (2048, 1232), "decoder.decoder_embed.bias": (2048,)},
}
SHARED_PARTS = {"transformer", "rope_cos", "rope_sin", "ln_pre", "ln_post", "patch_embed", "to_pixels", "conv_out"}


def test_tokenizer_variants_rebuild_from_their_checkpoints(tmp_path):
    for preset, encoder, decoder in (("tiny", tokenizer.Encoder, tokenizer.Decoder),
                                     ("demo", tokenizer.LinearEncoder, tokenizer.LinearDecoder)):
        torch.manual_seed(0)
        tok = random_weights(Tokenizer.from_preset(preset)).eval()
        assert (type(tok.encoder), type(tok.decoder)) == (encoder, decoder)
        sd = tok.state_dict()
        # the official path holds no grid-sized read-outs, the linear one no latent, mask or text tokens
        assert {k: tuple(v.shape) for k, v in sd.items() if k.split(".")[1] not in SHARED_PARTS} == \
            OLD_LAYOUT_KEYS[preset]
        torch.save({"stage": "tokenizer", "config": {"tokenizer": tok.config}, "ema": {"tokenizer": sd}},
                   tmp_path / f"{preset}.pt")
        again = tokenizer.load_tokenizer(str(tmp_path / f"{preset}.pt"))      # strict, built on the meta device
        assert (type(again.encoder), type(again.decoder)) == (encoder, decoder)
        img, text = torch.rand(2, 3, 32, 32), torch.randn(2, 77, tok.config["text_dim"])
        with torch.no_grad():
            assert torch.equal(again.decode(again.encode(img)[0], text), tok.decode(tok.encode(img)[0], text))
    with pytest.raises(ValueError, match="latent_layout must be"):
        Tokenizer.from_preset("tiny", latent_layout="grid")


def test_projector_grouping_is_its_own_component():
    grouped, plain = TextProjector(clip_dim=64, depth=1, patch_size=7), TextProjector(clip_dim=64, depth=1)
    assert isinstance(grouped.group_in, projector.TokenGrouping) and isinstance(plain.group_in, nn.Identity)
    assert {k: tuple(v.shape) for k, v in grouped.state_dict().items() if k.startswith("group_in.")} == {
        "group_in.weight": (64, 7 * 64), "group_in.bias": (64,)}
    assert not any(k.startswith("group_in.") for k in plain.state_dict())
    for proj in (grouped, plain):
        again = TextProjector(**proj.config)
        again.load_state_dict(proj.state_dict())             # strict
        feats, eps = torch.randn(2, 77, 64), torch.randn(2, 77, 16)
        with torch.no_grad():
            assert all(map(torch.equal, again.eval()(feats, eps), proj.eval()(feats, eps)))
    x = torch.randn(1, 77, 64)
    x2 = x.clone()
    x2[:, 7:14] += 1.0      # change the 2nd group of 7 CLIP tokens only: only the 2nd grouped token changes
    h1, h2 = grouped.group_in(x), grouped.group_in(x2)
    assert h1.shape == (1, 11, 64) and torch.equal(h1[:, 0], h2[:, 0]) and not torch.equal(h1[:, 1], h2[:, 1])


# ----------------------------------------------------------------------------------------------------------
# Model core: values a fresh model computes itself (loading official weights overwrites them, so only these
# tests ever compute them)
# ----------------------------------------------------------------------------------------------------------

def reference_rope(grid, head_dim, theta=10000.0):
    """The fact sheet's 2D RoPE, one cell at a time in float64: cell (r, c) (row-major) has the angles
    [r w0, r w0, r w1, r w1, ..., c w0, c w0, ...], w_k = theta^(-k / (head_dim / 4))."""
    q = head_dim // 4
    angles = torch.tensor([[pos * theta ** (-k / q) for pos in (r, c) for k in range(q) for _ in range(2)]
                           for r in range(grid) for c in range(grid)], dtype=torch.float64)
    return angles.cos().float(), angles.sin().float()


def test_fresh_rope_and_position_tables_equal_the_official_ones(official):
    sd, tok_sd = official["flowtok_state_dict"], official["flowtitok_state_dict"]
    # the DiT's frozen sin-cos table, as built at construction (the fixture's is the official, unperturbed one)
    assert_exact(FlowDiT(depth=2, width=64, heads=4).pos_embed, sd["pos_embed"], atol=1e-6)
    # the tokenizer's RoPE buffers, as built at construction (grid 4, head dim 16)
    fresh = Tokenizer.from_preset("tiny").state_dict()
    for part in ("encoder", "decoder"):
        for ours, theirs in (("rope_cos", "freqs_cos"), ("rope_sin", "freqs_sin")):
            assert_exact(fresh[f"{part}.{ours}"], tok_sd[f"{part}.positional_embedding.{theirs}"], atol=1e-6)
    # other sizes against the closed form: the official 256 and 512 px grids (16, 32) with head dim 64
    for grid, head_dim in ((16, 64), (32, 64), (3, 8)):
        cos, sin = tokenizer.rope_2d_tables(grid, head_dim)
        ref_cos, ref_sin = reference_rope(grid, head_dim)
        assert cos.shape == (grid * grid, head_dim)
        assert_exact(cos, ref_cos) and assert_exact(sin, ref_sin)
    with torch.device("meta"):
        assert Tokenizer.from_preset("bl77-512").encoder.rope_cos.shape == (32 * 32, 64)
    # sin-cos positions at the XL width: [sin(p w_k) | cos(p w_k)], w_k = 10000^(-k / 576)
    pos = flow_dit.sincos_positions(77, 1152)
    assert pos.shape == (77, 1152) and pos.dtype == torch.float32
    assert torch.equal(pos[0], torch.cat([torch.zeros(576), torch.ones(576)]))
    for p, k in ((1, 0), (76, 1), (40, 300), (76, 575)):
        w = 10000 ** (-k / 576)
        assert pos[p, k].item() == pytest.approx(math.sin(p * w), abs=1e-6)
        assert pos[p, 576 + k].item() == pytest.approx(math.cos(p * w), abs=1e-6)
    # the timestep embedding: t raw in [0, 1], [cos(t f_k) | sin(t f_k)], f_k = e^(-ln(1e4) k / 128)
    e = flow_dit.timestep_embedding(torch.tensor([0.0, 1.0, 0.25]))
    assert torch.equal(e[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    for i, t in ((1, 1.0), (2, 0.25)):
        for k in (0, 1, 64, 127):
            f = math.exp(-math.log(10000) * k / 128)
            assert e[i, k].item() == pytest.approx(math.cos(t * f), abs=1e-6)
            assert e[i, 128 + k].item() == pytest.approx(math.sin(t * f), abs=1e-6)


def test_rope_on_the_grid_tokens_only_equals_the_padded_identity_tables():
    """Attention rotates q, k of the grid tokens only; the former formula padded the tables with identity rows
    (cos 1, sin 0) for the latent and text tokens and rotated every token: the outputs are bitwise equal in fp32."""
    torch.manual_seed(0)
    for grid, extra, width, heads in ((4, 2 * 77, 64, 4), (3, 5, 32, 2), (4, 0, 64, 4)):
        attn = tokenizer.Attention(width, heads).eval()
        cos, sin = tokenizer.rope_2d_tables(grid, width // heads)                   # (g*g, d)
        pad_cos = F.pad(cos, (0, 0, 0, extra), value=1.0)                           # (g*g + extra, d)
        pad_sin = F.pad(sin, (0, 0, 0, extra), value=0.0)
        x = torch.randn(2, grid * grid + extra, width)                              # (B, N, W)
        B, N, _ = x.shape
        with torch.no_grad():
            q, k, v = attn.qkv(x).view(B, N, 3, heads, width // heads).permute(2, 0, 3, 1, 4)   # (B, H, N, d)
            old_q, old_k = (t * pad_cos + tokenizer.rotate_pairs(t) * pad_sin for t in (q, k))
            old = attn.proj(F.scaled_dot_product_attention(old_q, old_k, v).transpose(1, 2).reshape(B, N, width))
            assert torch.equal(attn(x, cos, sin), old)
            rotated = tokenizer.apply_rope(q, cos, sin)
        assert torch.equal(rotated, old_q)
        assert torch.equal(rotated[..., grid * grid:, :], q[..., grid * grid:, :])        # the others untouched
        assert not torch.equal(rotated[..., 1:grid * grid, :], q[..., 1:grid * grid, :])  # cell 0 has angle 0


def _std_close(t, std, rel):
    return t.float().std().item() == pytest.approx(std, rel=rel)


def test_fresh_models_start_from_the_official_initial_values():
    torch.manual_seed(0)
    # the contrastive log-temperature: ln(1 / 0.07) = 2.6592600, a learnable 0-dim scalar (logit scale 14.29)
    proj = TextProjector(clip_dim=64, depth=2, heads=4, d_ff=96, align_hidden=128)
    assert proj.log_temperature.dim() == 0 and proj.log_temperature.requires_grad
    assert proj.log_temperature.item() == pytest.approx(2.6592600, abs=1e-6)
    assert math.exp(proj.log_temperature.item()) == pytest.approx(1 / 0.07, rel=1e-6)
    assert not hasattr(TextProjector(clip_dim=64, depth=1, heads=4, d_ff=96, align_hidden=0), "log_temperature")
    # the text encoder's layers start as copies of one layer; its LayerNorms at g = 1, b = 0
    first = proj.layers[0].state_dict()
    assert all(torch.equal(v, proj.layers[1].state_dict()[k]) for k, v in first.items())
    assert torch.equal(first["norm1.g"], torch.ones(64)) and torch.equal(first["norm2.b"], torch.zeros(64))
    # the DiT (adaLN-Zero): modulation and output layers zero, so a fresh model predicts exactly 0
    dit = FlowDiT(depth=2, width=64, heads=4)
    with torch.no_grad():
        assert torch.equal(dit(torch.randn(2, 77, 16), torch.rand(2), torch.tensor([False, True])),
                           torch.zeros(2, 77, 16))
    for layer in [b.adaLN_modulation[-1] for b in dit.blocks] + [dit.final_layer.adaLN_modulation[-1],
                                                                dit.final_layer.linear]:
        assert not layer.weight.any() and not layer.bias.any()
    assert not any(m.bias.any() for m in dit.modules() if isinstance(m, nn.Linear))
    bound = math.sqrt(6 / (64 + 192))                        # Xavier-uniform over the fused (3D, D) qkv matrix
    qkv = dit.blocks[0].attn.qkv.weight
    assert qkv.abs().max() <= bound and _std_close(qkv, bound / math.sqrt(3), 0.05)
    assert _std_close(dit.t_embedder.mlp[0].weight, 0.02, 0.05) and _std_close(dit.t_embedder.mlp[2].weight, 0.02, 0.05)
    assert _std_close(dit.y_embedder.embedding_table.weight, 0.02, 0.25)
    # the tokenizer: Linear / Conv ~ N(0, 0.02) with zero bias, LayerNorm 1 / 0, tokens and positions W^-1/2
    tok = Tokenizer.from_preset("tiny")
    for name, m in tok.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.numel() >= 4096:
            assert _std_close(m.weight, 0.02, 0.1), name
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            assert not m.bias.any(), name
        if isinstance(m, nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones(64)) and not m.bias.any(), name
    for p in (tok.encoder.latent_tokens, tok.encoder.latent_token_positional_embedding,
              tok.decoder.latent_token_positional_embedding, tok.decoder.text_guidance_positional_embedding):
        assert _std_close(p, 64 ** -0.5, 0.05)
    assert _std_close(tok.decoder.mask_token, 64 ** -0.5, 0.3)
    demo = Tokenizer.from_preset("demo").encoder.to_moments.bias.view(-1, 32)   # logvar_init -7: the logvar half
    assert torch.equal(demo[:, 16:], torch.full((77, 16), -7.0)) and not demo[:, :16].any()
    # the text decoder's positions and the discriminator's LeCAM averages
    assert _std_close(TextDecoder(width=64, depth=1, heads=4, d_ff=64, vocab_ids=[1, 2]).pos, 64 ** -0.5, 0.05)
    disc = tokenizer.PatchDiscriminator(32)
    assert torch.equal(disc.lecam_ema, torch.zeros(2)) and disc.lecam_decay == 0.999


def test_auto_scale_factor_is_one_over_the_std_of_posterior_samples(monkeypatch):
    tok = Tokenizer.from_preset("tiny")
    monkeypatch.setattr(tok, "encode", lambda images: (torch.full((len(images), 77, 16), 3.0),
                                                       torch.full((len(images), 77, 16), math.log(4.0))))
    # samples 3 + 2 * eps: std 2 over 8 x 1232 draws, so the factor is 1/2 (the mean does not enter)
    got = tok.estimate_scale_factor(torch.zeros(8, 3, 32, 32), torch.Generator().manual_seed(0))
    assert got == pytest.approx(0.5, rel=0.02)


def test_size_registries_match_the_official_tables(official):
    assert {k: FLOW_MODELS[k] for k in ("S", "B", "L", "XL", "H")} == {
        "S": dict(depth=12, width=384, heads=6), "B": dict(depth=12, width=768, heads=12),
        "L": dict(depth=24, width=1024, heads=16), "XL": dict(depth=28, width=1152, heads=16),
        "H": dict(depth=36, width=1280, heads=20)}
    assert FLOW_MODELS["tiny"] == dict(depth=2, width=64, heads=4)         # the fixture's DiT
    with torch.device("meta"):
        for size in ("S", "L"):           # the fact sheet's count formula (B, XL, H: test_parameter_counts_...)
            dit = FlowDiT(**FLOW_MODELS[size])
            D, depth = FLOW_MODELS[size]["width"], FLOW_MODELS[size]["depth"]
            expected = (depth * (18 * D * D + 15 * D) + 17 * D + 256 * D + D * D + 2 * D + 2 * D
                        + 2 * D * D + 18 * D + 16)
            assert sum(p.numel() for p in dit.parameters()) + dit.pos_embed.numel() == expected + 77 * D, size
    assert FlowDiT.__init__.__defaults__ == (28, 1152, 16, 4.0, 16, 77, 1)              # FlowTok-XL
    bl77 = dict(patch_size=16, enc_width=768, enc_depth=12, enc_heads=12, dec_width=1024, dec_depth=24, dec_heads=16)
    assert tokenizer.TOKENIZER_PRESETS["bl77-256"] == dict(image_size=256, **bl77)
    assert tokenizer.TOKENIZER_PRESETS["bl77-512"] == dict(image_size=512, **bl77)
    with torch.device("meta"):
        c = Tokenizer().config
        tiny = Tokenizer.from_preset("tiny").config
    assert (c["num_tokens"], c["channels"], c["text_dim"], c["text_len"], c["scale_factor"]) == (
        77, 16, 768, 77, 1.0143)
    assert (c["latent_layout"], c["text_guidance"], c["logvar_init"]) == ("tokens", True, 0.0)
    m = official["meta"]["flowtitok_config"]
    assert (tiny["image_size"], tiny["patch_size"], tiny["enc_width"], tiny["enc_depth"], tiny["enc_heads"]) == (
        m["image_size"], m["patch_size"], m["encoder"]["width"], m["encoder"]["num_layers"], m["encoder"]["num_heads"])
    assert projector.CLIP_TOWERS["ViT-L-14-336-quickgelu"] == dict(width=768, layers=12, heads=12)
    with torch.device("meta"):
        assert TextProjector().config == dict(clip_dim=768, depth=6, heads=8, d_ff=1024, dropout=0.1, channels=16,
                                              align_hidden=512, patch_size=1)
    assert flow_dit.SIGMA_MIN == 1e-5 and tokenizer.SCALE_FACTOR == 1.0143
    assert {k: w for k, (_, w) in projector.KL_TERMS.items()} == {"official": 0.01, "standard": 1e-4}


# ----------------------------------------------------------------------------------------------------------
# Model core: CLIP text side
# ----------------------------------------------------------------------------------------------------------

def test_tokenize_matches_open_clip_and_reports_truncation():
    import open_clip
    texts = ["a large red circle on the left", "word " * 100, "", "Ünïcode & <b>html</b>  spaces"]
    ids, truncated = projector.tokenize(texts)
    assert torch.equal(ids, open_clip.SimpleTokenizer()(texts))
    assert truncated.tolist() == [False, True, False, False]
    again, _ = projector.tokenize(texts[::-1] + texts)             # the cached ids: repeated captions, any order
    assert torch.equal(again, torch.cat([ids.flip(0), ids])) and projector.tokenize([])[0].shape == (0, 77)
    assert ids[1, -1].item() == projector.EOT and ids[0, 0].item() == projector.SOT
    assert projector.detokenize(ids[:1]) == ["a large red circle on the left"]
    assert projector.detokenize(torch.tensor([[projector.SOT, projector.EOT] + [0] * 75])) == [""]


def test_overlong_captions_reach_bpe_cut_to_a_bound_with_the_same_77_ids(monkeypatch, capsys):
    import open_clip
    words = "a large red circle on the left next to a small blue square at the top, "
    long = (words * 400).replace("next", "next" + " \t" * 2000, 1)     # 30k characters, one run of 4000 blanks
    ids, truncated = projector.tokenize([long, long[:200]])
    assert torch.equal(ids, open_clip.SimpleTokenizer()([long, long[:200]])) and truncated.tolist() == [True, False]
    bpe, special = projector._bpe()
    seen, encode = [], bpe.encode
    monkeypatch.setattr(bpe, "encode", lambda text: seen.append(len(text)) or encode(text))
    ids, truncated = projector.tokenize(["  " + "x" * 10_000_000])       # one 10 MB word: ~36 hours of BPE uncut
    assert seen == [projector.MAX_CAPTION_CHARS] and truncated.tolist() == [True]
    assert ids[0, 0] == projector.SOT and ids[0, -1] == projector.EOT and (ids[0] != 0).all()
    # open_clip caches every distinct word: past BPE_CACHE_WORDS the cache starts again from the special tokens
    monkeypatch.setattr(projector, "BPE_CACHE_WORDS", len(special) + 10)
    projector.tokenize([" ".join(f"qz{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(50))])   # 50 new words
    assert len(bpe.cache) >= len(special) + 50
    projector.tokenize(["zebra quokka unseenword"])
    assert len(bpe.cache) == len(special) + 3 and set(special) <= set(bpe.cache)
    sample.warn_truncated(["a red circle", long])                         # sample.py says which prompts are cut
    err = capsys.readouterr().err
    assert err.startswith("warning: 1 of 2 prompts are longer than CLIP's 77 tokens and are cut (e.g. prompt 1: ")


def test_clip_text_encoder_tokens_after_ln_final():
    torch.manual_seed(0)
    enc = CLIPTextEncoder("tiny", weights="random")
    ids, _ = projector.tokenize(["a red circle", "a small blue square at the top"])
    feats = enc(ids)
    assert feats.shape == (2, 77, 64) and feats.dtype == torch.float32 and not feats.requires_grad
    # independent recomputation from the tower's parts: embeddings + positions, causal blocks, ln_final
    t = enc.text
    x = t.token_embedding(ids) + t.positional_embedding
    with torch.no_grad():
        x = t.ln_final(t.transformer(x, attn_mask=t.attn_mask))
    assert_exact(feats, x)
    # causal: changing a later token leaves earlier positions unchanged
    ids2 = ids.clone()
    ids2[0, 5] = 1234
    f2 = enc(ids2)
    assert torch.equal(f2[0, :5], feats[0, :5]) and not torch.allclose(f2[0, 5:], feats[0, 5:])
    assert all(not p.requires_grad for p in enc.parameters()) and not enc.train().training


def test_clip_text_encoder_local_weights_and_offline_error(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ref = CLIPTextEncoder("tiny", weights="random")
    sd = {k: v for k, v in ref.text.state_dict().items()}
    sd["visual.conv1.weight"] = torch.zeros(1)         # a full open_clip checkpoint carries the vision tower
    sd["logit_scale"] = torch.zeros(())
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / "clip.safetensors"))
    torch.save(sd, tmp_path / "clip.bin")
    ids, _ = projector.tokenize(["a green diamond"])
    for f in ("clip.safetensors", "clip.bin"):
        assert torch.equal(CLIPTextEncoder("tiny", weights=str(tmp_path / f))(ids), ref(ids))
    with pytest.raises(FileNotFoundError, match="--clip-weights"):
        CLIPTextEncoder("tiny", weights=str(tmp_path / "nope.safetensors"))
    wrong = {k: v for k, v in sd.items() if not k.startswith("ln_final")}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(ValueError, match="not an open_clip"):
        CLIPTextEncoder("tiny", weights=str(tmp_path / "wrong.safetensors"))

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(projector, "hf_hub_download", offline)         # the name projector calls (no network here)
    with pytest.raises(RuntimeError) as e:
        CLIPTextEncoder("tiny", weights="openai")
    assert "open_clip_model.safetensors" in str(e.value) and "--clip-weights" in str(e.value)


def test_text_decoder_and_reconstruction_loss():
    torch.manual_seed(0)
    dec = TextDecoder(width=32, depth=2, heads=4, d_ff=64)
    logits = dec(torch.randn(2, 77, 16))
    assert logits.shape == (2, 77, projector.CLIP_VOCAB)
    ids, _ = projector.tokenize(["a red circle", "a blue square on the left"])
    keep = projector.caption_mask(ids)
    assert keep.sum(1).tolist() == [5, 8]             # SOT, the words, EOT; never the padding
    targets = dec.class_of[ids]
    assert torch.equal(targets, ids)                   # all CLIP ids: classes are the ids themselves
    # perfect logits on SOT..EOT give ~0 loss whatever the padding positions predict
    perfect = torch.full((2, 77, projector.CLIP_VOCAB), -1e4)
    perfect.scatter_(2, ids[..., None], 1e4)
    perfect[:, -1] = 0.0                     # garbage after EOT is ignored
    assert projector.text_reconstruction_loss(perfect, targets, keep).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(2, 77, projector.CLIP_VOCAB)
    uniform[:, -1, 0] = 1e4                  # a confident wrong guess after EOT must not count either
    expected = math.log(projector.CLIP_VOCAB)
    assert projector.text_reconstruction_loss(uniform, targets, keep).item() == pytest.approx(expected, rel=1e-6)
    assert projector.text_reconstruction_loss(uniform[keep], targets, keep).item() == pytest.approx(expected,
                                                                                                 rel=1e-6)
    # a vocabulary of the training captions only: few classes, ids mapped both ways
    vocab = sorted(set(ids.flatten().tolist()) - {0})
    small = TextDecoder(width=32, depth=1, heads=4, d_ff=64, vocab_ids=vocab)
    assert small.head.out_features == len(vocab) and small.config["vocab_ids"] == vocab
    assert torch.equal(small.vocab_ids[small.class_of[ids[keep]]], ids[keep])
    assert small.class_of[1234].item() == -100         # an id outside the vocabulary is ignored by the loss
    z = torch.randn(2, 77, 16)
    assert set(small.decode(z).flatten().tolist()) <= set(vocab)


def test_text_decoder_patches_read_and_predict_consecutive_tokens():
    """patch_size p: transformer token j reads latent tokens p*j .. p*j + p - 1 and predicts exactly those positions
    (checked without layers, where nothing else mixes positions); with layers the keep path equals the full one."""
    torch.manual_seed(0)
    dec = TextDecoder(width=32, depth=0, heads=4, d_ff=64, vocab_ids=[5, 6, 7], patch_size=7)
    assert dec.pos.shape == (11, 32) and dec.head.out_features == 7 * 5 and dec.config["patch_size"] == 7
    z = torch.randn(2, 77, 16)
    moved = z.clone()
    moved[:, 9] += 1.0                                      # a token of the second group (positions 7..13)
    changed = (dec(moved) - dec(z)).abs().amax((0, 2)) > 0  # (77,) which positions' logits moved
    assert changed.nonzero().flatten().tolist() == list(range(7, 14))
    deep = TextDecoder(width=32, depth=2, heads=4, d_ff=64, dropout=0.0, vocab_ids=[5, 6, 7], patch_size=7).eval()
    keep = torch.rand(2, 77) < 0.3
    assert torch.equal(deep(z, keep), deep(z)[keep]) and deep(z).shape == (2, 77, 5)
    with pytest.raises(ValueError, match="divide"):
        TextDecoder(width=32, depth=1, heads=4, d_ff=64, patch_size=5)


# ==========================================================================================================
# data.py: decoding, sources and skip counts, the tar stream, the resumable loader, shapes, cache
# ==========================================================================================================

# ----------------------------------------------------------------------------- corpus helpers

def _solid(size, colour, mode="RGB"):
    """A PIL image of one colour."""
    return Image.new(mode, size, colour)


def _noise_image(w, h, seed):
    """A random RGB image (random content makes a truncated JPEG truly truncated)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _jpeg_bytes(image, **kw):
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **kw)
    return buffer.getvalue()


def _png16_rgb(path, rgb16):
    """Write a 48-bit (16 bits per channel) RGB PNG by hand: PIL cannot create one."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _write_mode_images(folder):
    """One image per awkward mode -> {file name: expected RGB of pixel (row 5, col 5) and (row 5, col 35)}."""
    _solid((40, 40), (0, 255, 255, 0), "CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(np.full((40, 40), 128 * 257, np.uint16)).save(folder / "gray16.png")
    _png16_rgb(folder / "rgb16.png", np.tile(np.array([65535, 32896, 0], np.uint16), (40, 40, 1)))
    palette = Image.fromarray(np.where(np.arange(40)[None, :] < 20, 0, 1).repeat(40, 0).astype(np.uint8), "P")
    palette.putpalette([0, 0, 255, 9, 9, 9] + [0] * 762)
    palette.save(folder / "palette.png", transparency=1)  # index 1 (right half) is transparent
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[:, :20] = (0, 255, 0, 255)
    rgba[:, 20:] = (255, 0, 0, 0)  # fully transparent red -> white
    Image.fromarray(rgba, "RGBA").save(folder / "rgba.png")
    _solid((40, 40), 100, "L").save(folder / "gray.png")
    la = np.zeros((40, 40, 2), np.uint8)
    la[:, :20] = (50, 255)
    Image.fromarray(la, "LA").save(folder / "la.png")
    return {"cmyk.jpg": ((255, 0, 0), (255, 0, 0)), "gray16.png": ((128, 128, 128),) * 2,
            "rgb16.png": ((255, 128, 0),) * 2, "palette.png": ((0, 0, 255), (255, 255, 255)),
            "rgba.png": ((0, 255, 0), (255, 255, 255)), "gray.png": ((100, 100, 100),) * 2,
            "la.png": ((50, 50, 50), (255, 255, 255))}


def _write_exif_rotated(path):
    """48x32 stored image, left half red, right half blue, EXIF orientation 6 (display rotated 90 deg clockwise)."""
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:, :24] = (255, 0, 0)
    pixels[:, 24:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(path, exif=exif, quality=95)


def _write_broken_images(folder):
    """Files that must be skipped at load time -> {file name: reason}."""
    (folder / "zero.jpg").write_bytes(b"")
    encoded = _jpeg_bytes(_noise_image(40, 40, 0))
    (folder / "truncated.jpg").write_bytes(encoded[:len(encoded) // 2])
    (folder / "text.jpg").write_text("this is not an image")
    _solid((8, 8), (9, 9, 9)).save(folder / "tiny.png")
    _solid((120, 120), (9, 9, 9)).save(folder / "bomb_warning.png")  # 14400 px: between the limit and twice it
    _solid((200, 200), (9, 9, 9)).save(folder / "bomb_error.png")  # 40000 px: over twice the limit
    return {"zero.jpg": "unreadable image", "truncated.jpg": "unreadable image", "text.jpg": "unreadable image",
            "tiny.png": "too small", "bomb_warning.png": "decompression bomb", "bomb_error.png": "decompression bomb"}


def _epoch(source, batch_size):
    """Iterate one epoch (batch_size must divide len(source)) -> (captions, load-time skip counts, batches)."""
    loader = data.Loader(source, batch_size, rank=0, world=1)
    batches = list(itertools.islice(loader, len(source) // batch_size))
    assert loader.state_dict() == {"position": len(source)}
    skipped = collections.Counter()
    for batch in batches:
        skipped.update(batch["skipped"])
    return [c for b in batches for c in b["caption"]], skipped, batches


@pytest.fixture
def low_bomb_limit(monkeypatch):
    """PIL's decompression-bomb limit lowered to 100x100 pixels, so that a small file is a bomb."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)


# ----------------------------------------------------------------------------- decoding

def test_load_image_modes_come_out_rgb(tmp_path):
    expected = _write_mode_images(tmp_path)
    for name, (left, right) in expected.items():
        image = data.load_image(str(tmp_path / name))
        assert image.mode == "RGB", name
        pixels = np.asarray(image).astype(int)
        tolerance = 6 if name.endswith(".jpg") else 1
        assert np.abs(pixels[5, 5] - left).max() <= tolerance, (name, pixels[5, 5])
        assert np.abs(pixels[5, 35] - right).max() <= tolerance, (name, pixels[5, 35])
    # bytes work like paths
    image = data.load_image((tmp_path / "gray.png").read_bytes())
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (100, 100, 100)


def test_load_image_applies_exif_orientation(tmp_path):
    _write_exif_rotated(tmp_path / "exif.jpg")
    image = data.load_image(str(tmp_path / "exif.jpg"))
    assert image.size == (32, 48)  # turned upright: now portrait
    pixels = np.asarray(image).astype(int)
    assert np.abs(pixels[5, 16] - (255, 0, 0)).max() < 30  # the stored left half is now on top
    assert np.abs(pixels[42, 16] - (0, 0, 255)).max() < 30
    x = data.transform(image, 32)  # centre crop keeps rows 8..40: red above, blue below
    assert x[0, 2, 16] > 0.8 and x[2, 2, 16] < 0.2 and x[2, 29, 16] > 0.8 and x[0, 29, 16] < 0.2


def test_load_image_bad_files(tmp_path, low_bomb_limit):
    for name, reason in _write_broken_images(tmp_path).items():
        with pytest.raises(data.BadSample) as error:
            data.load_image(str(tmp_path / name), min_size=16)
        assert error.value.reason == reason, name
    with pytest.raises(data.BadSample, match="missing file"):
        data.load_image(str(tmp_path / "nowhere.jpg"))
    with pytest.raises(data.BadSample, match="unreadable image"):
        data.load_image(b"")


def test_clean_caption():
    assert data.clean_caption("  a red\n  circle ") == "a red circle"
    assert data.clean_caption(b"\xef\xbb\xbfcaf\xc3\xa9") == "caf\u00e9"  # UTF-8 with a byte-order mark
    for bad, reason in [(None, "missing caption"), ("", "empty caption"), (" \n\t", "empty caption"),
                        (5, "non-string caption"), (["a"], "non-string caption"), (b"caf\xe9", "non-UTF-8 caption")]:
        with pytest.raises(data.BadSample) as error:
            data.clean_caption(bad)
        assert error.value.reason == reason, bad


def test_transform_crop_and_flip():
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :10] = (255, 0, 0)  # outside the centre square (columns 10..50)
    pixels[:, 10:] = (0, 0, 255)
    image = Image.fromarray(pixels)
    x = data.transform(image, 32)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x[0].max() < 0.05 and x[2].min() > 0.95
    same = [data.transform(image, 32, True, True, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(same[0], same[1])
    outs = {data.transform(image, 32, True, True, torch.Generator().manual_seed(s))[0].sum().item() for s in range(20)}
    assert len(outs) > 3  # crops differ
    torch.manual_seed(0)
    a = data.transform(image, 32, True, True, torch.Generator().manual_seed(3))
    torch.manual_seed(1)  # the global RNG plays no part
    assert torch.equal(a, data.transform(image, 32, True, True, torch.Generator().manual_seed(3)))


def test_expand_braces_and_spec_errors():
    assert runtime.expand_braces("/d/s-{000..002}.tar") == ["/d/s-000.tar", "/d/s-001.tar", "/d/s-002.tar"]
    assert runtime.expand_braces("{a,b}{8..10}") == ["a8", "a9", "a10", "b8", "b9", "b10"]
    assert runtime.expand_braces("{09..11}") == ["09", "10", "11"]
    assert runtime.expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ValueError, match="unknown source kind"):
        data.build_dataset("csv:/x.csv", 32)
    with pytest.raises(ValueError, match="key=value"):
        data.build_dataset("jsonl:/x.jsonl,rooot=/y", 32)
    with pytest.raises(ValueError, match="images=DIR"):
        data.build_dataset("coco:/x.json", 32)


def test_format_skips():
    counts = {"missing file": 5, "empty caption": 7, "too small": 0}
    assert data.format_skips(counts) == "empty caption: 7, missing file: 5"
    assert data.format_skips({}) == "none"


# ----------------------------------------------------------------------------- map-style sources

def test_jsonl_source_counts_every_skip(tmp_path, low_bomb_limit):
    images = tmp_path / "images"
    images.mkdir()
    modes = _write_mode_images(images)
    _write_exif_rotated(images / "exif.jpg")
    broken = _write_broken_images(images)
    long_caption = "a photo of " + "a very long caption " * 30
    good = {name: f"good {name}" for name in modes} | {"exif.jpg": long_caption}
    lines = [json.dumps({"image": name, "caption": caption}).encode() for name, caption in good.items()]
    lines += [json.dumps({"image": name, "caption": f"broken {name}"}).encode() for name in broken]
    lines += [json.dumps(record).encode() for record in [
        {"image": "nowhere.jpg", "caption": "missing file"},
        {"image": "gray.png"}, {"image": "gray.png", "caption": None},  # missing caption x2
        {"image": "gray.png", "caption": ""}, {"image": "gray.png", "caption": " \n "},  # empty x2
        {"image": "gray.png", "caption": 5}, {"image": "gray.png", "caption": ["a", "b"]},  # non-string x2
        {"caption": "no image field"}, [1, 2]]]  # missing image, bad json line
    lines += [b"not json at all", b'{"image": "gray.png", "caption": "caf\xe9"}', b""]  # bad json x2, blank
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    source = data.build_dataset(f"jsonl:{tmp_path / 'train.jsonl'},root={images}", 32)
    assert source.skipped == {"missing file": 1, "missing caption": 2, "empty caption": 2, "non-string caption": 2,
                              "missing image": 1, "bad json line": 3}
    assert len(source) == len(good) + len(broken) == 14
    captions, skipped, batches = _epoch(source, 7)
    assert skipped == {"unreadable image": 3, "too small": 1, "decompression bomb": 2, "truncated caption": 1}
    assert sorted(captions) == sorted(" ".join(c.split()) for c in good.values())
    for batch in batches:
        assert batch["image"].shape == (len(batch["caption"]), 3, 32, 32) and batch["image"].dtype == torch.float32
        assert 0 <= batch["image"].min() and batch["image"].max() <= 1
        assert batch["ids"].shape == (len(batch["caption"]), 77) and batch["ids"].dtype == torch.long
    # the root defaults to the jsonl's folder
    (images / "local.jsonl").write_text(json.dumps({"image": "gray.png", "caption": "grey"}) + "\n")
    assert len(data.build_dataset(f"jsonl:{images / 'local.jsonl'}", 32)) == 1


def test_coco_source(tmp_path):
    images = tmp_path / "train2014"
    images.mkdir()
    _noise_image(40, 30, 1).save(images / "c1.png")
    _solid((50, 40), (0, 200, 0)).save(images / "c2.jpg")
    _solid((8, 8), (0, 0, 0)).save(images / "tiny.png")
    coco = {"images": [{"id": 1, "file_name": "c1.png"}, {"id": 2, "file_name": "c2.jpg"},
                       {"id": 3, "file_name": "gone.jpg"}, {"id": 4, "file_name": "tiny.png"}],
            "annotations": [{"image_id": 1, "caption": "cap one a"}, {"image_id": 1, "caption": "cap one b"},
                            {"image_id": 2, "caption": "cap two "}, {"image_id": 3, "caption": "cap three"},
                            {"image_id": 4, "caption": "cap tiny"}, {"image_id": 99, "caption": "orphan"},
                            {"image_id": 2, "caption": ""}, {"image_id": 2, "caption": None},
                            {"image_id": 1, "caption": 7}]}
    (tmp_path / "captions_train2014.json").write_text(json.dumps(coco))
    source = data.build_dataset(f"coco:{tmp_path / 'captions_train2014.json'},images={images}", 32)
    assert source.skipped == {"missing file": 1, "missing image": 1, "empty caption": 1, "missing caption": 1,
                              "non-string caption": 1}
    captions, skipped, _ = _epoch(source, 4)
    assert skipped == {"too small": 1}
    assert sorted(captions) == ["cap one a", "cap one b", "cap two"]


def test_folder_source(tmp_path):
    root = tmp_path / "pets"
    (root / "sub").mkdir(parents=True)
    _noise_image(40, 40, 2).save(root / "a.png")
    (root / "a.txt").write_text("a noisy square")
    _solid((48, 40), (10, 20, 30)).save(root / "b.jpg")
    (root / "b.txt").write_text("  multiple   spaces\n")
    _solid((40, 40), 0).save(root / "c.png")  # no caption file
    _solid((40, 40), 0).save(root / "d.png")
    (root / "d.txt").write_bytes(b"")
    _solid((40, 40), 0).save(root / "e.png")
    (root / "e.txt").write_bytes(b"\xff\xfe\x00bad")
    _solid((40, 40), (200, 0, 0)).save(root / "sub" / "f.webp")
    (root / "sub" / "f.txt").write_text("a red webp")
    (root / "g.jpg").write_text("not an image")
    (root / "g.txt").write_text("broken image")
    _solid((40, 40), 0).save(root / "h.png")
    (root / "h.txt").write_bytes(b"\xef\xbb\xbfbom caption")
    (root / "notes.md").write_text("ignored")
    source = data.build_dataset(f"folder:{root}", 32)
    assert source.skipped == {"missing caption": 1, "empty caption": 1, "non-UTF-8 caption": 1}
    captions, skipped, _ = _epoch(source, 5)
    assert skipped == {"unreadable image": 1}
    assert sorted(captions) == ["a noisy square", "a red webp", "bom caption", "multiple spaces"]


def test_sources_with_no_usable_sample_stop_clearly(tmp_path):
    lines = [{"image": f"gone{i}.jpg", "caption": f"c{i}"} for i in range(5)] + [{"image": "x.jpg", "caption": ""}] * 7
    (tmp_path / "y.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    spec = f"jsonl:{tmp_path / 'y.jsonl'}"
    with pytest.raises(UserError) as error:
        data.build_dataset(spec, 32)
    assert str(error.value) == f"{spec}: 0 usable samples out of 12 (empty caption: 7, missing file: 5)"
    # images that exist but never decode: found while loading, after one epoch of the stream
    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"{i}.jpg").write_text("no")
        (tmp_path / "bad" / f"{i}.txt").write_text("fine caption")
    loader = data.Loader(data.build_dataset(f"folder:{tmp_path / 'bad'}", 32), 3, rank=0, world=1)
    with pytest.raises(UserError, match=r"0 usable samples out of 3 \(unreadable image: 3\)"):
        next(iter(loader))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="0 usable samples out of 0"):
        data.build_dataset(f"folder:{tmp_path / 'empty'}", 32)


def test_missing_jsonl_or_coco_file_is_a_one_line_error(tmp_path):
    """--data naming a file that is not there (or is a folder): one line naming the spec and the path."""
    for spec, path in ((f"jsonl:{tmp_path}/nope.jsonl", f"{tmp_path}/nope.jsonl"),
                       (f"coco:{tmp_path}/nope.json,images={tmp_path}", f"{tmp_path}/nope.json"),
                       (f"jsonl:{tmp_path}", str(tmp_path))):
        with pytest.raises(UserError) as err:
            data.build_dataset(spec, 32)
        assert str(err.value).startswith(f"{spec}: cannot read {path} (") and "\n" not in str(err.value)
    r = train_cli(*TOKENIZER_RUN, "--data", f"coco:{tmp_path}/nope.json,images={tmp_path}", "--out", tmp_path / "run",
                  "--steps", 1)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"train.py: error: coco:{tmp_path}/nope.json,images={tmp_path}: cannot "
                                             f"read {tmp_path}/nope.json (No such file or directory)"]


def test_coco_captions_json_that_is_a_list_is_a_one_line_error(tmp_path):
    """A list, an object without annotations, not JSON: one line; malformed records inside a good file are skipped."""
    for name, text, why in (("list.json", json.dumps([{"image_id": 1, "caption": "x"}]), "found a list"),
                            ("noann.json", json.dumps({"images": []}), "found an object without them"),
                            ("annstr.json", json.dumps({"annotations": "x"}), "found an object without them"),
                            ("number.json", "7", "found a single value"),
                            ("broken.json", "{not json", "is not a readable JSON file")):
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=why) as err:
            data.build_dataset(f"coco:{tmp_path / name},images={tmp_path}", 32)
        assert str(err.value).startswith(f"coco:{tmp_path / name},images={tmp_path}: {tmp_path / name} ")
    _solid((40, 40), (0, 200, 0)).save(tmp_path / "ok.png")
    coco = {"images": [{"id": 1, "file_name": "ok.png"}, {"id": 2}, "junk", {"id": [3], "file_name": "ok.png"}],
            "annotations": [{"image_id": 1, "caption": "fine"}, "junk", 5, {"image_id": 2, "caption": "no name"},
                            {"image_id": [1], "caption": "a list id"}]}
    (tmp_path / "odd.json").write_text(json.dumps(coco))
    source = data.build_dataset(f"coco:{tmp_path / 'odd.json'},images={tmp_path}", 32)
    assert len(source) == 1 and source.skipped == {"bad annotation": 2, "missing image": 2}


def test_folder_caption_that_is_a_folder_or_a_symlink_loop_is_skipped(tmp_path):
    """A caption that cannot be read is one bad sample, counted, like a missing one: never a crash."""
    for name in ("a", "b", "c"):
        _solid((40, 40), (0, 0, 200)).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").mkdir()
    os.symlink("b.txt", tmp_path / "b.txt")                       # points at itself: ELOOP on open
    (tmp_path / "c.txt").write_text("a readable caption")
    source = data.build_dataset(f"folder:{tmp_path}", 32)
    assert source.skipped == {"unreadable caption": 2} and [source.captions[0]] == ["a readable caption"]


@pytest.mark.parametrize("option, least", [("n=abc", 1), ("n=1.5", 1), ("n=0", 1), ("n=-3", 1), ("seed=x", 0),
                                           ("seed=-1", 0)])
def test_shapes_spec_with_a_bad_number_is_a_one_line_error(option, least):
    """shapes:n=abc names the option and what it must be, instead of int()'s message or a numpy traceback."""
    with pytest.raises(UserError) as err:
        data.build_dataset(f"shapes:split=train,{option}", 32)
    assert str(err.value) == f"shapes:split=train,{option}: option {option} must be an integer >= {least}"
    assert len(data.build_dataset("shapes:n=3,seed=0", 32)) == 3


def test_folder_coco_images_or_jsonl_root_that_is_not_a_folder_is_a_one_line_error(tmp_path):
    """Said as such, not as '0 usable samples' (an empty walk) or every caption a 'missing file'."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"image": "x.png", "caption": "x"}) + "\n")
    (tmp_path / "c.json").write_text(json.dumps({"images": [], "annotations": []}))
    for spec, what in ((f"folder:{tmp_path}/nope", f"{tmp_path}/nope"),
                       (f"folder:{tmp_path}/a.jsonl", f"{tmp_path}/a.jsonl"),
                       (f"coco:{tmp_path}/c.json,images={tmp_path}/nope", f"images={tmp_path}/nope"),
                       (f"jsonl:{tmp_path}/a.jsonl,root={tmp_path}/nope", f"root={tmp_path}/nope")):
        with pytest.raises(UserError) as err:
            data.build_dataset(spec, 32)
        assert str(err.value) == f"{spec}: {what} is not a folder"


# ----------------------------------------------------------------------------- tar shards

def _write_tar(path, files):
    """A tar with (name, bytes) members, in order."""
    with tarfile.open(path, "w") as tar:
        for name, payload in files:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def _write_shards(folder, shards, per_shard):
    """Clean shards shard-000.tar... of `per_shard` samples captioned 'sample {shard} {i}'."""
    for s in range(shards):
        files = []
        for i in range(per_shard):
            files += [(f"{s:03d}{i:03d}.jpg", _jpeg_bytes(_noise_image(36, 36, 100 * s + i))),
                      (f"{s:03d}{i:03d}.txt", f"sample {s} {i}".encode())]
        _write_tar(folder / f"shard-{s:03d}.tar", files)
    return f"tar:{folder}/shard-{{000..{shards - 1:03d}}}.tar"


def test_tar_source_decodes_and_counts(tmp_path, monkeypatch):
    png, webp = io.BytesIO(), io.BytesIO()
    _solid((40, 40), (0, 255, 0)).save(png, "PNG")
    _solid((40, 40), (0, 0, 255)).save(webp, "WEBP")
    jpeg = _jpeg_bytes(_noise_image(40, 40, 3))
    _write_tar(tmp_path / "a-0.tar", [
        ("s0.jpg", jpeg), ("s0.txt", b"plain text"),
        ("s1.png", png.getvalue()), ("s1.json", b'{"caption": "json caption", "w": 40}'),
        ("s2.webp", webp.getvalue()), ("s2.json", b'{"txt": "txt field"}'),
        ("s3.jpg", jpeg),  # missing caption
        ("s4.txt", b"no image"),  # missing image
        ("s5.jpg", b"garbage"), ("s5.txt", b"unreadable"),
        ("s6.jpg", jpeg), ("s6.json", b"{not json"),
        ("s7.jpeg", jpeg), ("s7.txt", b"  "),
        ("dir/s8.jpg", jpeg), ("dir/s8.cls.txt", b"1"), ("dir/s8.txt", b"in a folder"),
        ("s9.jpg", jpeg), ("s9.txt", b"x" * 40_000)])   # over the (lowered) cap on a sample's bytes: never read
    monkeypatch.setattr(data, "MAX_TAR_SAMPLE_BYTES", 20_000)
    _write_tar(tmp_path / "a-1.tar", [file for i in range(4) for file in [(f"t{i}.jpg", jpeg),
                                                                          (f"t{i}.txt", f"t{i} ".encode() * 400)]])
    with tarfile.open(tmp_path / "a-1.tar") as tar:
        cut = tar.getmember("t3.txt").offset_data + 100
    (tmp_path / "a-1.tar").write_bytes((tmp_path / "a-1.tar").read_bytes()[:cut])  # a shard cut short
    source = data.build_dataset(f"tar:{tmp_path}/a-{{0..2}}.tar", 32)  # a-2.tar does not exist
    assert source.skipped == {"missing shard": 1} and len(source.shards) == 2
    counts, captions = collections.Counter(), []
    stream = source.samples(seed=0, reader=0, readers=1, cursor=dict(epoch=0, shard=0, offset=0, seen=0))
    for item, cursor in itertools.islice(stream, 100):
        if cursor["epoch"] == 1:
            break
        if isinstance(item, data.BadSample):
            counts[item.reason] += 1
        else:
            assert item["image"].shape == (3, 32, 32)
            captions.append(item["caption"][:10])
    assert cursor["epoch"] == 1, "the stream must move on to epoch 1 after both shards"
    assert counts == {"missing caption": 1, "missing image": 1, "unreadable image": 1, "bad json caption": 1,
                      "empty caption": 1, "unreadable shard": 1, "oversized sample": 1}
    assert sorted(captions) == sorted(["plain text", "json capti", "txt field", "in a folde",
                                       "t0 t0 t0 t", "t1 t1 t1 t", "t2 t2 t2 t"])  # t3 was cut off
    batch = next(iter(data.make_loader(source, 7, rank=0, world=1)))
    assert sorted(c[:10] for c in batch["caption"]) == sorted(captions)
    assert batch["skipped"]["truncated caption"] == 3 and batch["ids"].shape == (7, 77)


def test_tar_ranks_and_workers_split_the_corpus_and_resume(tmp_path):
    spec = _write_shards(tmp_path, shards=8, per_shard=4)
    source = data.build_dataset(spec, 32, random_crop=True, flip=True)
    # 2 ranks x 2 workers = 4 readers, 2 shards (8 samples, 2 batches) each per epoch: 4 batches per rank per epoch
    epochs = []
    for rank in range(2):
        batches = list(itertools.islice(data.make_loader(source, 4, seed=5, rank=rank, world=2, num_workers=2), 8))
        epochs.append([[c for b in batches[e * 4:(e + 1) * 4] for c in b["caption"]] for e in range(2)])
    everything = sorted(f"sample {s} {i}" for s in range(8) for i in range(4))
    for e in range(2):
        assert sorted(epochs[0][e] + epochs[1][e]) == everything  # disjoint (no repeats) and complete
    assert epochs[0][0] + epochs[1][0] != epochs[0][1] + epochs[1][1]  # reshuffled per epoch

    loader = data.make_loader(source, 4, seed=5, rank=1, world=2, noise_dim=3, num_workers=2)
    stream = iter(loader)
    for _ in range(3):
        next(stream)
    state = pickle.loads(pickle.dumps(loader.state_dict()))  # what a checkpoint holds
    expected = [next(stream) for _ in range(4)]
    resumed = data.make_loader(source, 4, seed=5, rank=1, world=2, noise_dim=3, num_workers=2)
    resumed.load_state_dict(state)
    for want, got in zip(expected, itertools.islice(resumed, 4)):
        assert want["caption"] == got["caption"]
        assert torch.equal(want["image"], got["image"]) and torch.equal(want["noise"], got["noise"])
    with pytest.raises(UserError, match=r"saved with 2 process\(es\) x 2 reader\(s\) each \(now 2 x 1\)"):
        data.make_loader(source, 4, rank=1, world=2, num_workers=1).load_state_dict(state)


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):          # no request lines on the test's stderr
        pass


@contextlib.contextmanager
def serving(folder):
    """An HTTP server on 127.0.0.1 serving `folder` (a thread) -> its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietFiles, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_tar_shards_stream_from_commands_and_urls_and_resume_exactly(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "shards"
    folder.mkdir()
    local = _write_shards(folder, shards=3, per_shard=4)
    start = dict(epoch=0, shard=0, offset=0, seen=0)

    def take(spec, n, cursor=start, readers=1, reader=0):
        stream = data.build_dataset(spec, 32, random_crop=True, flip=True).samples(5, reader, readers, cursor)
        return [(s.reason if isinstance(s, data.BadSample) else (s["caption"], s["image"].sum().item()), c)
                for s, c in itertools.islice(stream, n)]
    whole = take(local, 14)                                    # 12 samples, then epoch 1 begins
    with serving(folder) as url:
        remote = {"pipe": f"tar:pipe:cat {folder}/shard-{{000..002}}.tar",
                  "http": f"tar:{url}/shard-{{000..002}}.tar",
                  "mixed": f"tar:{folder}/shard-000.tar::pipe:cat {folder}/shard-001.tar::{url}/shard-002.tar"}
        for name, spec in remote.items():
            assert take(spec, 14) == whole, name
            assert take(spec, 5, whole[5][1]) == whole[6:11], name      # resumed mid-shard: the same next samples
            assert take(spec, 4, readers=2, reader=1) == take(local, 4, readers=2, reader=1), name
        # a command that fails and a URL that does not exist: retried, then skipped with one line each
        monkeypatch.setattr(data, "SHARD_RETRY_WAIT", 0.0)
        spec = f"tar:pipe:echo no such shard >&2; exit 3::{url}/missing.tar::pipe:cat {folder}/shard-001.tar"
        got = take(spec, 6)
        err = capsys.readouterr().err
        assert [g for g, _ in got].count("unreadable shard") == 2 and len([g for g, _ in got if g != "unreadable "
                                                                               "shard"]) == 4
        assert (f"skipped pipe:echo no such shard >&2; exit 3 after {data.SHARD_TRIES} tries (`echo no such shard "
                f">&2; exit 3` exited with status 3: no such shard)") in err
        assert f"skipped {url}/missing.tar after {data.SHARD_TRIES} tries (HTTP Error 404: File not found)" in err
    # a server that accepts and never answers: a read timeout, never a hang
    monkeypatch.setattr(data, "SHARD_TIMEOUT", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        spec = f"tar:http://127.0.0.1:{silent.getsockname()[1]}/x.tar::{folder}/shard-000.tar"
        assert [g for g, _ in take(spec, 5)].count("unreadable shard") == 1
    assert "timed out" in capsys.readouterr().err


def test_tar_too_few_shards_and_dead_shards(tmp_path):
    spec = _write_shards(tmp_path, shards=3, per_shard=2)
    with pytest.raises(UserError, match="3 shards for 4 ranks"):
        data.make_loader(data.build_dataset(spec, 32), 2, rank=0, world=4, num_workers=2)
    _write_tar(tmp_path / "dead.tar", [("x.jpg", b"garbage"), ("x.txt", b"caption")])
    with pytest.raises(UserError, match=r"0 usable samples out of 1 \(unreadable image: 1\)"):
        next(iter(data.make_loader(data.build_dataset(f"tar:{tmp_path}/dead.tar", 32), 2, rank=0, world=1)))
    with pytest.raises(RuntimeError, match="no shard found"):
        data.build_dataset(f"tar:{tmp_path}/nothing-{{0..3}}.tar", 32)


def test_tar_with_fewer_shards_than_ranks_x_workers_runs_with_fewer_workers(tmp_path):
    """3 shards, 2 ranks x 2 workers: 1 worker per rank (a reader needs shards of its own), the whole corpus
    still read once per epoch; fewer shards than ranks, or resuming with another count: one line saying what to pass."""
    spec = _write_shards(tmp_path, shards=3, per_shard=2)
    source = data.build_dataset(spec, 32)
    loaders = [data.make_loader(source, 2, seed=1, rank=rank, world=2, num_workers=2) for rank in range(2)]
    assert [loader.num_workers for loader in loaders] == [1, 1]
    # per epoch, reader 0 takes 2 shards (4 samples, 2 batches) and reader 1 one shard (1 batch)
    captions = [c for loader, n in zip(loaders, (2, 1)) for b in itertools.islice(loader, n) for c in b["caption"]]
    assert sorted(captions) == sorted(f"sample {s} {i}" for s in range(3) for i in range(2))
    assert data.make_loader(source, 2, rank=0, world=1, num_workers=0).num_workers == 0   # in-process stays so
    with pytest.raises(UserError) as err:
        data.make_loader(source, 2, rank=0, world=4, num_workers=0)
    assert str(err.value) == (f"{spec}: 3 shards for 4 ranks (each reads shards of its own): use at most 3 "
                              "processes, or split the data into more shards")
    with pytest.raises(UserError, match="3 shards for 4 readers .*use at most 3 processes"):   # pretokenize's path
        next(source.samples(0, 0, 4, dict(epoch=0, shard=0, offset=0, seen=0)))
    # train.py: runs with 2 of --num-workers 4 and says so; a resume with 1 worker says what to pass
    out = tmp_path / "run"
    spec2 = spec.replace("{000..002}", "{000..001}")
    run_train(*TOKENIZER_RUN, "--data", spec2, "--out", out, "--steps", 1, "--num-workers", 4)
    assert "note: 2 shards feed 2 DataLoader workers per rank, not --num-workers 4" in (out / "log.txt").read_text()
    with pytest.raises(UserError) as err:
        run_train(*TOKENIZER_RUN, "--data", spec2, "--out", out, "--steps", 2, "--num-workers", 1, "--resume")
    assert str(err.value) == (f"{spec2}: the tar stream was saved with 1 process(es) x 2 reader(s) each (now 1 x 1) "
                              "and continues exactly only with the same: resume with 1 process(es) and --num-workers 2")


def test_data_whose_every_image_is_unreadable_stops_training_with_one_line(tmp_path):
    """Found while training (the images decode only then): one line, also when a DataLoader worker finds it."""
    (tmp_path / "bad").mkdir()
    for i in range(3):
        (tmp_path / "bad" / f"{i}.jpg").write_text("no")
        (tmp_path / "bad" / f"{i}.txt").write_text("fine caption")
    _write_tar(tmp_path / "dead-0.tar", [("x.jpg", b"garbage"), ("x.txt", b"caption")])
    _write_tar(tmp_path / "dead-1.tar", [("y.jpg", b"garbage"), ("y.txt", b"caption")])
    for spec, workers, why in ((f"folder:{tmp_path / 'bad'}", 0, r"\(rank 0\): 0 usable samples out of 4"),
                               (f"tar:{tmp_path}/dead-{{0..1}}.tar", 2, r"\(reader \d\): 0 usable samples out of 2")):
        with pytest.raises(UserError) as err:        # tar: 2 workers, each reads its shard twice, then gives up
            run_train(*TOKENIZER_RUN, "--data", spec, "--out", tmp_path / f"run{workers}", "--steps", 1,
                      "--num-workers", workers)
        assert re.fullmatch(re.escape(spec) + f" {why} " + r"\(unreadable image: \d\)", str(err.value))


# ----------------------------------------------------------------------------- recaptions (issue 13 item 2)

def test_recaption_openers_are_stripped_like_the_official_reader():
    """Known answers of webdataset_reader.py:61-71: strip, drop the first listed opener, strip, upper-case."""
    assert data.RECAPTION_OPENERS == ("The image depicts", "The image displays", "The image showcases",
                                      "The image features", "The image shows")
    assert data.RECAPTION_PROBABILITY == 0.95
    for text, want in [("The image depicts a cat on a mat.", "A cat on a mat."),
                       ("  The image shows  two dogs \n", "Two dogs"),
                       ("The image displays a chart", "A chart"),
                       ("The image showcases a red car", "A red car"),      # not "cases a red car"
                       ("The image features an old tree.", "An old tree."),
                       ("The image displays: a chart", ": a chart"),        # only whitespace goes
                       ("The image features", ""),
                       ("The image depicts the image shows", "The image shows"),   # one opener, once
                       ("The image showsmanship", "Manship"),               # no word boundary, as the official
                       ("the image depicts a cat", "the image depicts a cat"),     # case-sensitive
                       ("The picture depicts a cat ", "The picture depicts a cat"),
                       ("A plain recaption.", "A plain recaption.")]:
        assert data.strip_opener(text) == want, text
    assert data.choose_caption("orig", None, "recaption") == "orig"       # no recaption: the original, any mode
    assert data.choose_caption("orig", b"The image shows x", "recaption") == "X"
    assert data.choose_caption("orig", "The image shows x", "original") == "orig"


def _recap_shard(path):
    """One shard: 3 samples with txt and recap_txt, a 4th with txt only -> {txt: stripped recaption or None}."""
    recaps = {"a cat": "The image depicts a black cat on a mat.", "a dog": "  The image shows  two dogs playing \n",
              "a car": "A red car parked outside.", "a tree": None}
    files = []
    for k, (txt, recap) in enumerate(recaps.items()):
        files += [(f"s{k}.jpg", _jpeg_bytes(_noise_image(36, 36, k))), (f"s{k}.txt", txt.encode())]
        files += [(f"s{k}.recap_txt", recap.encode())] if recap else []
    _write_tar(path, files)
    return {"a cat": "A black cat on a mat.", "a dog": "Two dogs playing", "a car": "A red car parked outside.",
            "a tree": None}


def test_tar_recaptions_official_frequency_and_the_original_and_recaption_modes(tmp_path):
    want = _recap_shard(tmp_path / "r.tar")
    recap_of = {v: k for k, v in want.items() if v}

    def first_epoch(mode, seed):
        source = data.build_dataset(f"tar:{tmp_path}/r.tar" + (f",captions={mode}" if mode else ""), 32)
        stream = source.samples(seed, 0, 1, dict(epoch=0, shard=0, offset=0, seen=0))
        return [s["caption"] for s, _ in itertools.islice(stream, 4)]

    picks, seeds = collections.Counter(), range(700)
    for seed in seeds:                                 # the default is official
        captions = first_epoch(None, seed)
        assert captions[3] == "a tree"                 # no recap_txt: its txt, and no draw
        for k, caption in enumerate(captions[:3]):
            # known answer: the (seed, epoch, shard, sample in shard) generator's first number against 0.95
            u = torch.rand((), generator=runtime.generator(seed, "caption", 0, 0, k))
            assert caption == (want[list(want)[k]] if u < 0.95 else list(want)[k]), (seed, k, caption)
            picks[caption in recap_of] += 1
    n = 3 * len(seeds)                                  # 2100 draws: mean 1995, sd 10.0
    assert abs(picks[True] - 0.95 * n) < 4 * math.sqrt(n * 0.95 * 0.05), picks
    assert first_epoch("official", 3) == first_epoch(None, 3)
    for seed in range(5):
        assert first_epoch("original", seed) == ["a cat", "a dog", "a car", "a tree"]
        assert first_epoch("recaption", seed) == [want["a cat"], want["a dog"], want["a car"], "a tree"]
    with pytest.raises(UserError, match=r"option captions=recap must be one of official, original, recaption"):
        data.build_dataset(f"tar:{tmp_path}/r.tar,captions=recap", 32)
    with pytest.raises(ValueError, match="key=value options among"):
        data.build_dataset(f"tar:{tmp_path}/r.tar,recaption=recap_txt", 32)


def test_tar_caption_pick_is_the_same_for_any_worker_count_and_after_resume(tmp_path):
    for s in range(4):
        files = []
        for i in range(3):
            files += [(f"{s}{i}.jpg", _jpeg_bytes(_noise_image(36, 36, 10 * s + i))),
                      (f"{s}{i}.txt", f"sample {s} {i}".encode()),
                      (f"{s}{i}.recap_txt", f"The image depicts sample {s} {i} again".encode())]
        _write_tar(tmp_path / f"shard-{s}.tar", files)
    source = data.build_dataset(f"tar:{tmp_path}/shard-{{0..3}}.tar", 32)

    def recap(seed, epoch, s, i):
        return bool(torch.rand((), generator=runtime.generator(seed, "caption", epoch, s, i)) < 0.95)
    # a seed whose 2 epochs keep a few originals, so that another seeding would show
    seed = next(x for x in range(500) if sum(not recap(x, e, s, i) for e in range(2) for s in range(4)
                                             for i in range(3)) >= 3)
    runs = {}
    for workers in (0, 2):                # 1 reader (4 shards an epoch) or 2 readers (2 shards each)
        batches = list(itertools.islice(data.make_loader(source, 3, seed, rank=0, world=1, num_workers=workers), 8))
        runs[workers] = [c for b in batches for c in b["caption"]]
        for j, batch in enumerate(batches):   # batches 0-3 are epoch 0 in both layouts, 4-7 epoch 1
            for caption in batch["caption"]:
                s, i = map(int, re.search(r"ample (\d) (\d)", caption).groups())
                assert caption == (f"Sample {s} {i} again" if recap(seed, j // 4, s, i) else f"sample {s} {i}")
    assert sorted(runs[0][:12]) == sorted(runs[2][:12]) and sorted(runs[0][12:]) == sorted(runs[2][12:])
    loader = data.make_loader(source, 3, seed, rank=0, world=1, num_workers=2)
    stream = iter(loader)
    for _ in range(3):
        next(stream)
    resumed = data.make_loader(source, 3, seed, rank=0, world=1, num_workers=2)
    resumed.load_state_dict(pickle.loads(pickle.dumps(loader.state_dict())))
    assert [b["caption"] for b in itertools.islice(resumed, 4)] == [next(stream)["caption"] for _ in range(4)]


def test_jsonl_recaption_field_is_drawn_per_stream_position(tmp_path):
    for k in range(4):
        _noise_image(44, 36, k).save(tmp_path / f"{k}.png")
    records = [{"image": "0.png", "caption": "zero", "recap": "The image features zero things."},
               {"image": "1.png", "caption": "one", "recap": "The image displays one thing"},
               {"image": "2.png", "caption": "two"},                      # no recaption
               {"image": "3.png", "caption": "three", "recap": None}]     # not a string: as if absent
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = f"jsonl:{tmp_path / 'r.jsonl'},recaption=recap"
    recaps = {"zero": "Zero things.", "one": "One thing"}

    def recap(seed, position):   # no crop or flip: the caption's draw is the generator's first number
        return bool(torch.rand((), generator=runtime.generator(seed, "augment", position)) < 0.95)
    seed = next(x for x in range(500) if sum(not recap(x, p) for p in range(16) if p % 4 < 2) >= 2)
    source = data.build_dataset(spec, 32)                      # default captions=official
    assert sorted(source.texts()) == sorted(["zero", "one", "two", "three", "Zero things.", "One thing"])
    runs = {}
    for workers in (0, 2):
        batches = list(itertools.islice(data.Loader(source, 2, seed, rank=0, world=1, num_workers=workers), 8))
        runs[workers] = [b["caption"] for b in batches]
        for batch in batches:
            for caption, index, position in zip(batch["caption"], batch["index"].tolist(),
                                                batch["position"].tolist()):
                original = records[index]["caption"]
                assert caption == (recaps[original] if original in recaps and recap(seed, position) else original)
    assert runs[0] == runs[2]
    loader = data.Loader(source, 2, seed, rank=0, world=1)
    stream = iter(loader)
    for _ in range(3):
        next(stream)
    resumed = data.Loader(source, 2, seed, rank=0, world=1)
    resumed.load_state_dict(loader.state_dict())
    assert [b["caption"] for b in itertools.islice(resumed, 4)] == [next(stream)["caption"] for _ in range(4)]
    for mode, want in (("original", lambda c: c), ("recaption", lambda c: recaps.get(c, c))):
        batch = next(iter(data.Loader(data.build_dataset(f"{spec},captions={mode}", 32), 8, seed, rank=0, world=1)))
        assert batch["caption"] == [want(records[i]["caption"]) for i in batch["index"].tolist()]
    # the draw comes after the crop and flip: the images are those of the same run without recaptions
    crops = [next(iter(data.Loader(data.build_dataset(s, 32, random_crop=True, flip=True), 4, seed, rank=0,
                                   world=1)))["image"] for s in (spec, f"jsonl:{tmp_path / 'r.jsonl'}")]
    assert torch.equal(*crops)
    for bad, why in ((",captions=recaption", "captions=recaption needs recaption=FIELD"),
                     (",recaption=,captions=official", "option recaption= needs a field name"),
                     (",captions=both", "option captions=both must be one of official, original, recaption")):
        with pytest.raises(UserError, match=why):
            data.build_dataset(f"jsonl:{tmp_path / 'r.jsonl'}{bad}", 32)


# ----------------------------------------------------------------------------- the Karpathy source (issue 13 item 4)

def _fake_karpathy(root):
    """A dataset_coco.json of 5 images (train x2, restval, val, test), raw sentences with messy whitespace."""
    entries = []
    for k, split in enumerate(["train", "restval", "train", "val", "test"]):
        folder = "train2014" if split == "train" else "val2014"
        name = f"COCO_{folder}_{k:012d}.png"
        where = root if k == 1 else root / folder        # the restval image only at IMAGES/filename
        where.mkdir(parents=True, exist_ok=True)
        _solid((40, 36), (50 * k, 20, 200 - 40 * k)).save(where / name)
        raws = [f"  A {split}  image\n number {k}. ", f"Picture {k} of the {split} split", f"Sentence {k}c"]
        raws = raws[:2 + k % 2]
        entries.append({"filepath": folder, "filename": name, "imgid": k, "split": split, "cocoid": 900 + k,
                        "sentids": list(range(10 * k, 10 * k + len(raws))),
                        "sentences": [{"raw": r, "tokens": r.lower().split()[:2], "imgid": k, "sentid": 10 * k + j}
                                      for j, r in enumerate(raws)]})
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return [[" ".join(s["raw"].split()) for s in e["sentences"]] for e in entries]


def test_karpathy_source_splits_and_one_raw_sentence_per_draw(tmp_path):
    sentences = _fake_karpathy(tmp_path)
    assert sentences[0] == ["A train image number 0.", "Picture 0 of the train split"]
    spec = f"karpathy:{tmp_path / 'dataset_coco.json'},images={tmp_path}"
    source = data.build_dataset(spec, 32)             # default splits: train+restval, in the file's order
    assert isinstance(source, data.KarpathySource) and len(source) == 3 and source.skipped == {}
    assert [source.paths[i] for i in range(3)] == [str(tmp_path / "train2014" / "COCO_train2014_000000000000.png"),
                                                   str(tmp_path / "COCO_val2014_000000000001.png"),
                                                   str(tmp_path / "train2014" / "COCO_train2014_000000000002.png")]
    assert source.texts() == sentences[0] + sentences[1] + sentences[2]
    # each draw: one raw sentence of the image, the (seed, position) generator's first number picks it
    batches = list(itertools.islice(data.Loader(source, 3, seed=4, rank=0, world=1), 6))
    for batch in batches:
        for caption, index, position in zip(batch["caption"], batch["index"].tolist(), batch["position"].tolist()):
            group = sentences[index]   # train, restval, train: the first three
            k = int(torch.randint(0, len(group), (), generator=runtime.generator(4, "augment", position)))
            assert caption == group[k], (index, position)
    for i, group in enumerate(sentences[:3]):
        assert {source.caption(i, torch.Generator().manual_seed(g)) for g in range(60)} == set(group)
    for splits, want in (("val", [3]), ("test+val", [3, 4]), ("train", [0, 2]),
                         ("restval+train+test", [0, 1, 2, 4])):
        other = data.build_dataset(f"{spec},splits={splits}", 32)
        assert sorted(other.texts()) == sorted(s for k in want for s in sentences[k]), splits
    # a missing image and an image without a non-empty sentence are skipped and counted
    listing = json.loads((tmp_path / "dataset_coco.json").read_text())
    listing["images"] += [dict(listing["images"][0], filename="gone.png", cocoid=1),
                          dict(listing["images"][2], cocoid=2, sentences=[{"raw": " \n "}])]
    (tmp_path / "more.json").write_text(json.dumps(listing))
    more = data.build_dataset(f"karpathy:{tmp_path / 'more.json'},images={tmp_path}", 32)
    assert len(more) == 3 and more.skipped == {"missing file": 1, "empty caption": 1}


def test_karpathy_spec_errors_are_one_line(tmp_path):
    _fake_karpathy(tmp_path)
    path = tmp_path / "dataset_coco.json"
    with pytest.raises(ValueError, match="karpathy needs images=DIR"):
        data.build_dataset(f"karpathy:{path}", 32)
    for spec, why in ((f"karpathy:{tmp_path}/nope.json,images={tmp_path}",
                       f"cannot read {tmp_path}/nope.json (No such file or directory)"),
                      (f"karpathy:{path},images={tmp_path}/nope", f"images={tmp_path}/nope is not a folder"),
                      (f"karpathy:{path},images={tmp_path},splits=train+rest",
                       "unknown split 'rest' in splits=train+rest (splits: train, restval, val, test, joined by +)")):
        with pytest.raises(UserError) as err:
            data.build_dataset(spec, 32)
        assert str(err.value) == f"{spec}: {why}"
    for name, text, why in (("coco.json", json.dumps({"images": [{"id": 1, "file_name": "x.png"}], "annotations": []}),
                             "not a Karpathy split file (missing 'split')"),
                            ("list.json", "[]", "not a Karpathy split file (expected an object with an 'images' list)"),
                            ("junk.json", json.dumps({"images": ["x"]}), "not a Karpathy split file (a malformed "),
                            ("listid.json", json.dumps({"images": [dict(json.loads(path.read_text())["images"][0],
                                                                         cocoid=[1, 2])]}),
                             "not a Karpathy split file (a malformed image record: its id is [1, 2], not a number"),
                            ("broken.json", "{not json", f"{tmp_path / 'broken.json'} is not a readable JSON file"),
                            ("test.json", json.dumps({"images": json.loads(path.read_text())["images"][4:]}),
                             "no image in split 'train' + 'restval' (its splits: test)")):
        (tmp_path / name).write_text(text)
        spec = f"karpathy:{tmp_path / name},images={tmp_path}"
        with pytest.raises(UserError) as err:
            data.build_dataset(spec, 32)
        assert str(err.value).startswith(f"{spec}: {why}") and "\n" not in str(err.value)
    listing = json.loads(path.read_text())
    (tmp_path / "gone.json").write_text(json.dumps({"images": [dict(e, filename="gone.png") for e in
                                                              listing["images"]]}))
    with pytest.raises(UserError, match=r"0 usable samples out of 3 \(missing file: 3\)"):
        data.build_dataset(f"karpathy:{tmp_path / 'gone.json'},images={tmp_path}", 32)
    # evaluate.py's captions protocol reads the same file through the same parser
    assert [it["id"] for it in evaluate.karpathy_items(path, "test")] == [904]
    with pytest.raises(UserError, match=r"--karpathy-split .*list\.json: not a Karpathy split file"):
        evaluate.karpathy_items(tmp_path / "list.json", "test")
    listing["images"][4]["sentences"][0]["raw"] = None                   # a null sentence is no reference "None"
    (tmp_path / "nulls.json").write_text(json.dumps(listing))
    refs = evaluate.karpathy_items(tmp_path / "nulls.json", "test")[0]["references"]
    assert refs == [" ".join(x["raw"].split()) for x in listing["images"][4]["sentences"][1:]]
    (tmp_path / "c.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [
        {"id": 1, "image_id": 1, "caption": None}, {"id": 2, "image_id": 1, "caption": " a  cat"}]}))
    assert evaluate.coco_caption_items(tmp_path / "c.json")[0]["references"] == ["a cat"]


# ----------------------------------------------------------------------------- the map-style loader

@pytest.fixture
def noisy_folder(tmp_path):
    """12 random non-square images with captions, read with random crop and flip."""
    for i in range(12):
        _noise_image(44, 36, i).save(tmp_path / f"{i:02d}.png")
        (tmp_path / f"{i:02d}.txt").write_text(f"image number {i}")
    return data.build_dataset(f"folder:{tmp_path}", 32, random_crop=True, flip=True)


def _merge(batches):
    """Batches of several ranks -> one batch ordered by stream position."""
    position = torch.cat([b["position"] for b in batches])
    order = position.argsort()
    merged = {key: torch.cat([b[key] for b in batches])[order]
              for key in ("position", "index", "image", "ids", "noise")}
    merged["caption"] = [c for b in batches for c in b["caption"]]
    merged["caption"] = [merged["caption"][i] for i in order]
    return merged


def _assert_same_batch(a, b):
    assert a["caption"] == b["caption"]
    for key in ("position", "index", "image", "ids", "noise"):
        assert torch.equal(a[key], b[key]), key


def test_two_ranks_equal_one_process_and_cover_each_epoch(noisy_folder):
    one = list(itertools.islice(data.Loader(noisy_folder, 6, seed=3, rank=0, world=1, noise_dim=5), 4))
    ranks = [list(itertools.islice(data.Loader(noisy_folder, 3, seed=3, rank=r, world=2, noise_dim=5), 4))
             for r in range(2)]
    for k in range(4):
        assert ranks[0][k]["position"].tolist() == list(range(6 * k, 6 * k + 6, 2))  # strided positions
        _assert_same_batch(_merge([ranks[0][k], ranks[1][k]]), one[k])
    assert one[0]["noise"].shape == (6, 5) and one[0]["image"].shape == (6, 3, 32, 32)
    epoch0 = torch.cat([one[0]["index"], one[1]["index"]])
    epoch1 = torch.cat([one[2]["index"], one[3]["index"]])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(12))
    assert not torch.equal(epoch0, epoch1)  # a new permutation each epoch
    # an epoch boundary inside a batch (10 samples, batches of 4)
    shapes = data.build_dataset("shapes:n=10", 32)
    index = torch.cat([b["index"] for b in itertools.islice(data.Loader(shapes, 4, rank=0, world=1), 5)])
    assert sorted(index[:10].tolist()) == sorted(index[10:].tolist()) == list(range(10))


def test_resume_continues_exactly(noisy_folder):
    full = list(itertools.islice(data.Loader(noisy_folder, 3, seed=1, rank=1, world=2, noise_dim=4), 6))
    loader = data.Loader(noisy_folder, 3, seed=1, rank=1, world=2, noise_dim=4)
    stream = iter(loader)
    next(stream), next(stream)
    state = loader.state_dict()
    assert state == {"position": 2 * 3 * 2}
    resumed = data.Loader(noisy_folder, 3, seed=1, rank=1, world=2, noise_dim=4)
    resumed.load_state_dict(state)
    for want, got in zip(full[2:], itertools.islice(resumed, 4)):
        _assert_same_batch(want, got)


def test_workers_do_not_change_the_batches(noisy_folder):
    plain = list(itertools.islice(data.Loader(noisy_folder, 4, seed=2, rank=0, world=1, noise_dim=2), 5))
    loader = data.Loader(noisy_folder, 4, seed=2, rank=0, world=1, noise_dim=2, num_workers=2)
    for want, got in zip(plain, itertools.islice(loader, 5)):
        _assert_same_batch(want, got)
    assert loader.state_dict() == {"position": 20}


class Flaky:
    """A map-style source of n tiny samples; the indices in `bad` fail to load ("unreadable image")."""

    def __init__(self, n, bad=()):
        self.name, self.n, self.bad, self.skipped = "flaky", n, set(bad), collections.Counter()

    def __len__(self):
        return self.n

    def get(self, index, generator=None):
        if index in self.bad:
            raise data.BadSample("unreadable image")
        return {"image": torch.full((3, 2, 2), float(index)), "caption": f"sample {index}"}


@pytest.mark.parametrize("workers", [0, 2])
def test_all_bad_batches_pass_their_skip_counts_to_the_next(workers):
    order = [int(b["index"][0]) for b in itertools.islice(data.Loader(Flaky(12), 1, seed=7, rank=0, world=1), 12)]
    # batches of 2: positions 2-3 and 4-5 all bad, 7 bad, 10 bad
    bad = {order[p] for p in (2, 3, 4, 5, 7, 10)}
    loader = data.Loader(Flaky(12, bad), 2, seed=7, rank=0, world=1, noise_dim=3, num_workers=workers)
    stream = iter(loader)
    got = [next(stream) for _ in range(3)]
    assert [b["position"].tolist() for b in got] == [[0, 1], [6], [8, 9]]
    assert [b["index"].tolist() for b in got] == [order[:2], [order[6]], order[8:10]]
    assert [b["skipped"] for b in got] == [{}, {"unreadable image": 5}, {}]
    assert loader.state_dict() == {"position": 10}
    nxt = next(stream)
    assert nxt["position"].tolist() == [11] and nxt["skipped"] == {"unreadable image": 1}
    # a stream whose every sample is bad stops with an error after one epoch instead of spinning
    with pytest.raises(UserError, match=r"0 usable samples out of 12 \(unreadable image: 12\)"):
        next(iter(data.Loader(Flaky(12, range(12)), 2, seed=7, rank=0, world=1, num_workers=workers)))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_the_seed_sets_the_order_and_the_worker_count_does_not(noisy_folder, tmp_path):
    def batches(seed, workers=0):
        return list(itertools.islice(data.Loader(noisy_folder, 4, seed=seed, rank=0, world=1, noise_dim=3,
                                                 num_workers=workers), 6))        # two epochs of 12

    def order(bs):
        return torch.cat([x["index"] for x in bs]).tolist()

    a, b = batches(0), batches(1)
    assert order(a)[:12] != order(b)[:12] and order(a)[12:] != order(b)[12:]     # each epoch its own order
    assert sorted(order(a)[:12]) == sorted(order(b)[:12]) == list(range(12))
    assert not torch.equal(a[0]["noise"], b[0]["noise"])
    # crops and flips: one image at every position, 8 positions, other draws under another seed
    (tmp_path / "one").mkdir()
    _noise_image(44, 36, 0).save(tmp_path / "one" / "a.png")
    (tmp_path / "one" / "a.txt").write_text("one image")
    one = data.build_dataset(f"folder:{tmp_path / 'one'}", 32, random_crop=True, flip=True)
    crops = [next(iter(data.Loader(one, 8, seed=seed, rank=0, world=1)))["image"] for seed in (0, 1)]
    assert sum(not torch.equal(x, y) for x, y in zip(*crops)) >= 4
    for workers in (1, 3):                                                        # the same seed: the same batches
        for want, got in zip(a, batches(0, workers)):
            _assert_same_batch(want, got)

    # the tar stream: the seed shuffles the shards of each epoch
    def tar(seed):
        loader = data.make_loader(data.build_dataset(spec, 32), 2, seed=seed, rank=0, world=1, noise_dim=3)
        return [c for x in itertools.islice(loader, 8) for c in x["caption"]]     # two epochs of 8
    spec = _write_shards(tmp_path, 4, 2)
    assert tar(0) == tar(0) and tar(0) != tar(1) and sorted(tar(0)[:8]) == sorted(tar(1)[:8])


# ----------------------------------------------------------------------------- pre-tokenised cache

def test_cache_write_append_and_read(tmp_path):
    rng = np.random.default_rng(0)
    posterior, clip = rng.normal(size=(5, 77, 32)), torch.randn(5, 77, 8, dtype=torch.bfloat16)
    ids = rng.integers(0, 49408, (5, 77))
    captions = [f"cached caption {i}" for i in range(5)]
    data.write_cache(tmp_path / "c", posterior[:3], clip[:3], ids[:3], captions[:3])
    data.write_cache(tmp_path / "c", posterior[3:], clip[3:], ids[3:], captions[3:])  # appended
    stored = np.load(tmp_path / "c" / "posterior.npy", mmap_mode="r")
    assert stored.shape == (5, 77, 32) and stored.dtype == np.float16
    source = data.build_dataset(f"cache:{tmp_path / 'c'}", 32)
    assert len(source) == 5
    sample = source.get(4)
    assert torch.equal(sample["posterior"], torch.from_numpy(posterior[4].astype(np.float16).astype(np.float32)))
    assert torch.equal(sample["clip"], clip[4].float().half().float())
    assert sample["ids"].dtype == torch.long and sample["ids"].tolist() == ids[4].tolist()
    assert sample["caption"] == "cached caption 4"
    assert len(pickle.dumps(source)) < 4000  # memory maps are not pickled into workers
    # rows spread over two parts, read in one call per array and part (as the loader does), in the asked order
    data.write_cache(tmp_path / "p" / "part-00000", posterior[:2], clip[:2], ids[:2], captions[:2])
    data.write_cache(tmp_path / "p" / "part-00001", posterior[2:], clip[2:], ids[2:], captions[2:])
    parts = data.build_dataset(f"cache:{tmp_path / 'p'}", 32)
    order = [4, 0, 3, 0, 1]
    many = parts.get_many(order)
    assert [m["caption"] for m in many] == [captions[i] for i in order]
    assert all(torch.equal(m["posterior"], torch.from_numpy(posterior[i].astype(np.float16).astype(np.float32)))
               and torch.equal(m["clip"], clip[i].float().half().float()) and m["ids"].tolist() == ids[i].tolist()
               for m, i in zip(many, order))
    batch = next(iter(data.Loader(source, 5, rank=0, world=1, noise_dim=2)))
    assert batch["posterior"].shape == (5, 77, 32) and batch["posterior"].dtype == torch.float32
    assert batch["clip"].shape == (5, 77, 8) and "image" not in batch and batch["ids"].shape == (5, 77)
    assert sorted(batch["caption"]) == captions


def test_cache_without_its_arrays_or_with_a_bad_captions_line_is_a_one_line_error(tmp_path):
    """A folder that only looks like a cache: one line naming what is missing or damaged, not KeyError: 'ids'."""
    rng = np.random.default_rng(0)
    data.write_cache(tmp_path / "c" / "part-00000", rng.normal(size=(2, 77, 32)), None,
                     rng.integers(0, 49408, (2, 77)), ["a", "b"])
    data.write_cache(tmp_path / "c" / "part-00001", rng.normal(size=(1, 77, 32)), None,
                     rng.integers(0, 49408, (1, 77)), ["c"])
    assert len(data.build_dataset(f"cache:{tmp_path / 'c'}", 32)) == 3
    (tmp_path / "c" / "part-00001" / "ids.npy").unlink()
    with pytest.raises(UserError) as err:
        data.build_dataset(f"cache:{tmp_path / 'c'}", 32)
    assert str(err.value) == (f"cache:{tmp_path / 'c'}: not a pre-tokenised cache ({tmp_path}/c/part-00001 has no "
                              "ids.npy)")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "captions.jsonl").write_text('{"caption": "x"}\n')
    with pytest.raises(UserError, match=r"d has no ids.npy, posterior.npy\)$"):
        data.build_dataset(f"cache:{tmp_path / 'd'}", 32)
    for line in ("not json", '["x"]', '{"text": "x"}'):
        (tmp_path / "d" / "captions.jsonl").write_text(line + "\n")
        with pytest.raises(UserError, match='captions.jsonl has a line that is not {"caption": ...}'):
            data.build_dataset(f"cache:{tmp_path / 'd'}", 32)


# ----------------------------------------------------------------------------- shapes world

def test_shapes_deterministic_and_splits():
    a, attrs = data.shapes_batch("train", range(40), seed=1)
    b, _ = data.shapes_batch("train", range(40), seed=1)
    c, _ = data.shapes_batch("train", range(40), seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (40, 3, 32, 32)
    assert data.shapes_batch("train", [7], seed=1)[1][0] == attrs[7]  # a sample depends on its index only
    held = set(data.HELDOUT_PAIRS)
    assert len(held) == 4 and len({c for c, _ in held}) == 4 and len({s for _, s in held}) == 4
    train, train_attrs = data.shapes_batch("train", range(3000))
    heldout, heldout_attrs = data.shapes_batch("heldout", range(500))
    _, novel_attrs = data.shapes_batch("novel", range(500))
    assert not {(x["colour"], x["shape"]) for x in train_attrs + heldout_attrs} & held
    assert {(x["colour"], x["shape"]) for x in novel_attrs} == held
    distance = torch.cdist(heldout.flatten(1), train.flatten(1))
    assert distance.min() > 0.1  # no heldout image is a training image
    assert {data.caption_for(x) for x in train_attrs} == set(data.shapes_prompts("train"))
    assert set(data.shapes_prompts("heldout")) == set(data.shapes_prompts("train"))
    assert len(data.shapes_prompts("train")) == 200 and len(data.shapes_prompts("novel")) == 40
    assert len(set(data.shapes_prompts("train")) | set(data.shapes_prompts("novel"))) == 240
    source = data.build_dataset("shapes:split=novel,n=7,seed=1", 64)
    sample = source.get(3)
    assert len(source) == 7 and sample["image"].shape == (3, 64, 64)
    many = source.get_many([5, 3, 5])                       # rendered together, as the loader does: same samples
    assert all(torch.equal(m["image"], source.get(i)["image"]) and m["caption"] == source.get(i)["caption"]
               for m, i in zip(many, [5, 3, 5]))
    parsed = demo.parse_caption(sample["caption"])
    assert (parsed["colour"], parsed["shape"]) in held
    with pytest.raises(ValueError, match="unknown split"):
        data.build_dataset("shapes:split=test", 32)


def test_shapes_render_is_the_sub_pixel_coverage():
    """Each pixel blends shape and background by the fraction of its 4x4 sub-pixels inside the shape (a plain
    per-image mean here; the renderer adds slices in a batch), for every shape, at two sizes."""
    for size in (16, 32):
        images, _ = data.shapes_batch("train", range(24), size=size)
        p = data._shape_params("train", range(24), 0)
        grid = (np.arange(4 * size) + 0.5) / (4 * size)
        assert set(p["shape"].tolist()) == {0, 1, 2, 3}
        for i in range(24):
            u = (grid[None, :] - p["centre"][i, 0]) / p["radius"][i]        # (1, 4S)
            v = (grid[:, None] - p["centre"][i, 1]) / p["radius"][i]        # (4S, 1)
            cover = data._inside(p["shape"][i], u, v).reshape(size, 4, size, 4).mean((1, 3))
            bg, fg = p["background"][i][:, None, None], p["rgb"][i][:, None, None]
            np.testing.assert_allclose(images[i].numpy(), bg + (fg - bg) * cover, rtol=0, atol=1e-6)


def test_shapes_captions_round_trip():
    for caption in data.shapes_prompts("train") + data.shapes_prompts("novel"):
        attrs = demo.parse_caption(caption)
        assert attrs is not None and data.caption_for(attrs) == caption
    assert demo.parse_caption("A Large  red circle on the left.") == {"colour": "red", "shape": "circle",
                                                                     "size": "large", "position": "left"}
    assert demo.parse_caption("a small blue square at the top")["position"] == "top"
    for bad in ("a red circle", "a huge red circle on the left", "a large red circle on the left and more", ""):
        assert demo.parse_caption(bad) is None


@pytest.mark.parametrize("split", data.SPLITS)
def test_shape_analyser_reads_renders_back(split):
    images, attrs = data.shapes_batch(split, range(600), seed=4)
    accuracy = demo.shape_accuracy(images, attrs)
    assert min(accuracy.values()) >= 0.99, accuracy
    images, attrs = data.shapes_batch(split, range(100), seed=4, size=64)
    captions = [data.caption_for(x) for x in attrs]
    assert min(demo.shape_accuracy(images, captions).values()) >= 0.99
    # a blank image or a wrong caption scores as wrong
    assert demo.analyse_shape(torch.zeros(3, 32, 32))["shape"] is None
    wrong = [dict(x, colour="cyan" if x["colour"] != "cyan" else "red") for x in attrs]
    assert demo.shape_accuracy(images, wrong)["colour"] == 0


# ==========================================================================================================
# evaluate.py: Frechet distance, the bundled FID Inception, the fid CLI, BLEU-4 and CIDEr-D
# ==========================================================================================================


# ---------------------------------------------------------------------------------------------- Frechet distance

def test_frechet_identical_statistics_give_zero():
    feats = np.random.default_rng(0).standard_normal((50, 8))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    assert abs(evaluate.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_diagonal_gaussians_closed_form_and_symmetric():
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    # |mu1-mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2)) = (1 + 0 + 4) + ((1+4-4) + (4+1-4) + (9+1-6)) = 5 + 6 = 11
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert expected == 11
    assert evaluate.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(11, abs=1e-9)
    assert evaluate.frechet_distance(mu2, np.diag(s2), mu1, np.diag(s1)) == pytest.approx(11, abs=1e-9)
    # rotating both Gaussians leaves the distance unchanged, and makes sqrtm work on a non-diagonal product
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((3, 3)))
    r1, r2 = q @ np.diag(s1) @ q.T, q @ np.diag(s2) @ q.T
    assert evaluate.frechet_distance(q @ mu1, r1, q @ mu2, r2) == pytest.approx(11, abs=1e-9)
    assert evaluate.frechet_distance(q @ mu2, r2, q @ mu1, r1) == pytest.approx(11, abs=1e-9)


def test_frechet_singular_product_adds_eps_offset(monkeypatch):
    calls, real_sqrtm = [], evaluate._sqrtm

    def singular_first(m):  # the first sqrtm "fails" as on a singular product (non-finite result)
        calls.append(m)
        return np.full_like(m, np.inf) if len(calls) == 1 else real_sqrtm(m)
    monkeypatch.setattr(evaluate, "_sqrtm", singular_first)
    s1, s2, eps = np.diag([1.0, 4.0]), np.diag([4.0, 1.0]), 1e-2
    d = evaluate.frechet_distance(np.zeros(2), s1, np.zeros(2), s2, eps=eps)
    np.testing.assert_allclose(calls[1], (s1 + eps * np.eye(2)) @ (s2 + eps * np.eye(2)))
    # tr(s1) + tr(s2) - 2 tr sqrt((s1 + eps) (s2 + eps)) = 10 - 4 sqrt(1.01 * 4.01)
    assert d == pytest.approx(10 - 4 * math.sqrt(1.01 * 4.01), abs=1e-12)


def test_frechet_large_imaginary_part_raises():
    # a "covariance" with a negative eigenvalue: sqrtm is genuinely complex, which must not be silently dropped
    with pytest.raises(ValueError, match="imaginary"):
        evaluate.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_feature_stats_match_numpy():
    feats = torch.randn(37, 16, dtype=torch.float32) * 3 + 1
    acc = evaluate.FeatureStats(dim=16)
    for chunk in feats.split(10):
        acc.update(chunk)
    mu, sigma = acc.mean_cov()
    ref = feats.double().numpy()
    assert acc.n == 37 and mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, ref.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False), rtol=1e-10, atol=1e-10)  # unbiased (N-1)


# ------------------------------------------------------------------------------------------------ input pipeline

def test_resize_tf1_known_answer():
    # TF1 align_corners=False samples source x = i * in/out = 0, 0.5, 1, 1.5 (clamped): [0, 5, 10, 10];
    # PyTorch's half-pixel bilinear gives [0, 2.5, 7.5, 10]
    row = torch.tensor([0.0, 10.0]).expand(1, 1, 2, 2)
    out = evaluate.resize_tf1(row, 4)
    assert out.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 5.0, 10.0, 10.0]))
    torch.testing.assert_close(F.interpolate(row, size=(4, 4), mode="bilinear", align_corners=False)[0, 0, 0],
                               torch.tensor([0.0, 2.5, 7.5, 10.0]))


def test_preprocess_normalisations():
    img = torch.full((1, 3, 20, 30), 128, dtype=torch.uint8)
    torch.testing.assert_close(evaluate.preprocess(img, "bilinear"), torch.full((1, 3, 299, 299), 2 * 128 / 255 - 1))
    torch.testing.assert_close(evaluate.preprocess(img, "tf"), torch.zeros(1, 3, 299, 299))  # (128 - 128) / 128
    torch.testing.assert_close(evaluate.preprocess(img.float() / 255, "bilinear"), evaluate.preprocess(img))


# ------------------------------------------------- the bundled Inception vs an independent pytorch-fid construction

class RefFIDInceptionA(InceptionA):
    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), b5, b3, pool], 1)


class RefFIDInceptionC(InceptionC):
    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        b7d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(b7d))))
        pool = self.branch_pool(F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        return torch.cat([self.branch1x1(x), b7, b7d, pool], 1)


class RefFIDInceptionE(InceptionE):
    def __init__(self, in_channels, max_pool):
        super().__init__(in_channels)
        self.max_pool = max_pool

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        if self.max_pool:  # pytorch-fid's FIDInceptionE_2
            pool = F.max_pool2d(x, 3, stride=1, padding=1)
        else:  # FIDInceptionE_1
            pool = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), b3, b3d, self.branch_pool(pool)], 1)


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    """(random-weights file named and keyed like pytorch-fid's release, the torchvision-built reference net)."""
    torch.manual_seed(0)
    ref = Inception3(num_classes=1008, aux_logits=False, init_weights=False)  # pytorch-fid's fid_inception_v3()
    for name, c_in, pool in [("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)]:
        setattr(ref, name, RefFIDInceptionA(c_in, pool_features=pool))
    for name, c7 in [("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)]:
        setattr(ref, name, RefFIDInceptionC(768, channels_7x7=c7))
    ref.Mixed_7b, ref.Mixed_7c = RefFIDInceptionE(1280, max_pool=False), RefFIDInceptionE(2048, max_pool=True)
    with torch.no_grad():  # random weights that keep activations O(1) through the ~100 layers
        for m in ref.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("weights") / evaluate.FID_WEIGHTS_FILE
    torch.save(ref.state_dict(), path)
    ref.fc = nn.Identity()  # pool3 features out of torchvision's forward
    return path, ref.eval()


def test_inception_matches_independent_construction(fid_weights):
    path, ref = fid_weights
    net = evaluate.load_inception(str(path))  # strict load: also checks every key name and shape
    images = torch.rand(2, 3, 40, 56)
    with torch.no_grad():
        expected = ref(2 * F.interpolate(images, size=(299, 299), mode="bilinear", align_corners=False) - 1)
        got = net(evaluate.preprocess(images))
    assert got.shape == (2, 2048) and torch.isfinite(got).all() and expected.abs().mean() > 1e-2
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_missing_weights_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty hub cache

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as err:
        evaluate.load_inception()
    msg = str(err.value)
    assert evaluate.FID_WEIGHTS_URL in msg and "--inception-weights" in msg
    assert str(tmp_path / "hub" / "checkpoints" / evaluate.FID_WEIGHTS_FILE) in msg


# --------------------------------------------------------------------------------------------------- the fid CLI

def _write_images(folder, seed, bright, count=4):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = rng.integers(0, 256, (32, 32, 3)) // 4 + (160 if bright else 0)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:02d}.png")
    return str(folder)


def _fid(*argv):
    """Run `evaluate.py fid ...` through main(); -> (returned value, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        value = evaluate.main(evaluate.build_parser().parse_args(["fid", *argv]))
    return value, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def fid_runs(fid_weights, tmp_path_factory):
    """The shared CLI runs on two folders of 4 PNGs each (4 < 2048: singular covariances). One computes its FID
    (two 2048-d sqrtm, ~10 s each here); the others record the statistics they would compare (`inputs`)."""
    tmp = tmp_path_factory.mktemp("fid")
    a, b = _write_images(tmp / "a", 0, bright=False), _write_images(tmp / "b", 1, bright=True)
    opts = ["--inception-weights", str(fid_weights[0]), "--device", "cpu", "--num-workers", "0"]
    runs, inputs, real = {"dir": tmp, "inputs": {}}, [], evaluate.frechet_distance

    def record(*stats):                              # the statistics, copied, and the real distance
        inputs.append([np.array(x) for x in stats])
        return real(*stats)
    evaluate.frechet_distance = record
    try:
        runs["ab"] = _fid(a, b, "--save-stats", str(tmp / "a_bs3.npz"), "--batch-size", "3", *opts)
        runs["inputs"]["ab"] = inputs.pop()
        evaluate.frechet_distance = lambda *stats: inputs.append([np.array(x) for x in stats]) or 0.0
        runs["save_a"] = _fid(a, "--save-stats", str(tmp / "a.npz"), "--batch-size", "4", *opts)
        for name, argv in (("ba", (b, str(tmp / "a.npz"))), ("aa", (str(tmp / "a.npz"), str(tmp / "a_bs3.npz")))):
            runs[name] = _fid(*argv, *opts)
            runs["inputs"][name] = inputs.pop()
        runs["tf_a"] = _fid(a, "--resize", "tf", "--save-stats", str(tmp / "a_tf.npz"), *opts)
    finally:
        evaluate.frechet_distance = real
    return runs


def test_fid_cli_reports_and_warns(fid_runs):
    value, out, err = fid_runs["ab"]
    assert math.isfinite(value) and value > 0
    assert f"FID: {value:.4f}" in out and "bilinear" in out and "REAL 4" in out and "float64" in out
    assert "4 < 2048" in err


def test_fid_cli_save_stats_only_writes_statistics(fid_runs):
    value, out, _ = fid_runs["save_a"]
    assert value is None and "FID" not in out
    with np.load(fid_runs["dir"] / "a.npz") as f:
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048) and f["mu"].dtype == np.float64
        assert int(f["n"]) == 4 and str(f["resize"]) == "bilinear"


def test_fid_cli_stable_across_runs_and_batch_sizes(fid_runs):
    with np.load(fid_runs["dir"] / "a.npz") as f4, np.load(fid_runs["dir"] / "a_bs3.npz") as f3:
        np.testing.assert_allclose(f4["mu"], f3["mu"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(f4["sigma"], f3["sigma"], rtol=1e-4, atol=1e-6 * np.abs(f4["sigma"]).max())


def test_fid_cli_symmetric_and_npz_round_trip(fid_runs):
    # fid(B folder, A's saved .npz) compares what fid(A folder, B folder) compared, swapped (B recomputed with another
    # batch size), and the distance is symmetric (on the first 256 dimensions: a 2048-d sqrtm costs ~10 s here)
    ab, ba = fid_runs["inputs"]["ab"], fid_runs["inputs"]["ba"]
    for x, y in zip(ab, ba[2:] + ba[:2]):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6 * np.abs(x).max())
    cut = [x[:256] if x.ndim == 1 else x[:256, :256] for x in ab]
    assert evaluate.frechet_distance(*cut[2:], *cut[:2]) == pytest.approx(evaluate.frechet_distance(*cut), rel=1e-6)


def test_fid_cli_same_images_give_zero(fid_runs):
    # A's statistics from two runs (batch sizes 4 and 3): singular covariances, sqrtm of a rank-3 product
    aa = [x[:256] if x.ndim == 1 else x[:256, :256] for x in fid_runs["inputs"]["aa"]]
    ab = [x[:256] if x.ndim == 1 else x[:256, :256] for x in fid_runs["inputs"]["ab"]]
    assert abs(evaluate.frechet_distance(*aa)) < 1e-4 * evaluate.frechet_distance(*ab)


def test_fid_cli_tf_resize_differs(fid_runs):
    # compared on the statistics: one more FID would cost another 2048-d sqrtm (~10 s here)
    with np.load(fid_runs["dir"] / "a.npz") as f, np.load(fid_runs["dir"] / "a_tf.npz") as f_tf:
        assert str(f_tf["resize"]) == "tf"
        assert np.isfinite(f_tf["mu"]).all() and np.isfinite(f_tf["sigma"]).all()
        assert np.abs(f_tf["mu"] - f["mu"]).max() > 1e-3 * np.abs(f["mu"]).max()
        # the distance between the two fits, on the first 64 dimensions (cheap sqrtm): finite and non-zero
        d = evaluate.frechet_distance(f["mu"][:64], f["sigma"][:64, :64], f_tf["mu"][:64], f_tf["sigma"][:64, :64])
        assert math.isfinite(d) and d > 0


def test_fid_statistics_files_are_checked_and_a_distance_is_never_negative(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 8))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False) + 1e-3 * np.eye(8)
    d = evaluate.frechet_distance(mu, sigma, mu, sigma)            # round-off around 0 gave a printed -0.0000
    assert d == 0.0 and math.copysign(1, d) == 1
    with pytest.raises(ValueError, match="not positive semi-definite"):
        evaluate.frechet_distance(mu, -sigma, mu, -sigma)
    pickle.dump({"mu": 1}, (tmp_path / "junk.npz").open("wb"))
    np.savez(tmp_path / "small.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "objects.npz", mu=np.array([None, 1], dtype=object), sigma=sigma)
    np.savez(tmp_path / "nosigma.npz", mu=mu)
    for name, why in (("junk", "not a NumPy .npz of plain arrays"), ("objects", "not a NumPy .npz of plain arrays"),
                      ("small", "mu (8,) and sigma (8, 8), not the 2048-d pool3 statistics"),
                      ("nosigma", "no 'sigma' array")):
        with pytest.raises(UserError) as err:
            evaluate.load_stats(tmp_path / f"{name}.npz")
        msg = str(err.value)
        assert msg.startswith(f"{tmp_path / name}.npz: not FID statistics ({why}); make them with") \
            and "pickle" not in msg, msg


def test_fid_cli_unreadable_image(fid_weights, tmp_path):
    folder = Path(_write_images(tmp_path / "c", 2, bright=False, count=2))
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"1 unreadable image\(s\): broken.png"):
        _fid(str(folder), "--save-stats", str(tmp_path / "c.npz"), "--inception-weights", str(fid_weights[0]),
             "--device", "cpu", "--num-workers", "0")


def test_fid_cli_empty_folder_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "evaluate.py"), "fid", str(tmp_path / "empty"),
                           "--save-stats", str(tmp_path / "x.npz")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("evaluate.py: error:") and "no images" in last


def test_fid_ignores_the_grid_and_refuses_nan_statistics(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "samples"                      # a sample.py output folder: 3 samples, a grid, a stray image
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"{i:05d}_00.png" for i in range(3)]
    for name in names + ["grid.png", "notes.jpg"]:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / name)
    (folder / "prompts.txt").write_text("a\nb\nc\n")
    assert [p.name for p in evaluate.fid_files(folder)] == names
    plain = Path(_write_images(tmp_path / "plain", 0, bright=False, count=3))   # any other folder: every image
    assert len(evaluate.fid_files(plain)) == 3
    capsys.readouterr()

    def first_pixels(x):                               # a stand-in Inception (the real one costs ~10 s here)
        return x.flatten(1)[:, :2048]
    stats = evaluate.folder_stats(folder, first_pixels)    # what `evaluate.py fid` computes for a folder
    assert stats.n == 3
    assert "reading those 3, not its 2 other image(s) (grid.png, notes.jpg)" in capsys.readouterr().err
    # NaN or inf in statistics, read or computed: one line, never 'FID: nan'
    good, shifted, nan, inf = (str(tmp_path / f"{n}.npz") for n in ("good", "shifted", "nan", "inf"))
    monkeypatch.setattr(evaluate, "STATS_DIM", 4)       # 4-d statistics: a 2048-d sqrtm costs ~10 s here
    np.savez(good, mu=np.zeros(4), sigma=np.eye(4))
    np.savez(shifted, mu=np.array([1.0, 0, 0, 0]), sigma=np.eye(4))
    np.savez(nan, mu=np.array([0, np.nan, 0, 0]), sigma=np.eye(4))
    np.savez(inf, mu=np.zeros(4), sigma=np.diag([1, np.inf, 1, 1]))
    assert _fid(good, shifted)[0] == pytest.approx(1.0)                 # |mu1 - mu2|^2, equal covariances
    capsys.readouterr()
    for real, fake, bad in ((nan, good, nan), (good, inf, inf)):
        rc = evaluate.run_cli("evaluate.py", evaluate.main, evaluate.build_parser().parse_args(["fid", real, fake]))
        captured = capsys.readouterr()
        assert rc == 1 and "FID" not in captured.out and captured.err.count("\n") == 1
        assert captured.err.startswith(f"evaluate.py: error: {bad}: 1 NaN or infinite value(s)")
    acc = evaluate.FeatureStats(dim=3)
    acc.update(torch.tensor([[1.0, 2.0, float("nan")], [0.0, 1.0, 2.0]]))
    with pytest.raises(UserError, match="the Inception features of x: 6 NaN"):
        acc.mean_cov("x")
    with pytest.raises(ValueError, match="the Frechet distance is nan"):
        evaluate.frechet_distance(np.array([np.nan]), np.eye(1), np.zeros(1), np.eye(1))


def test_inception_file_is_checked_by_content(fid_weights, tmp_path, monkeypatch, capsys):
    tiny = tmp_path / "abc.bin"
    tiny.write_bytes(b"abc")
    digest = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"   # sha256("abc"), FIPS 180-2
    assert hashlib.sha256(b"abc").hexdigest() == digest == runtime.file_sha256(tiny)
    assert evaluate.FID_WEIGHTS_FILE == "pt_inception-2015-12-05-6726825d.pth"
    assert not evaluate.is_release_inception(tiny)
    monkeypatch.setattr(evaluate, "FID_WEIGHTS_FILE", "pt_inception-2015-12-05-ba7816bf.pth")
    assert evaluate.is_release_inception(tiny)
    monkeypatch.undo()
    path = str(fid_weights[0])                     # named like the release, random weights: loaded, with a warning
    evaluate.load_inception(path)
    assert "not comparable with published numbers" in capsys.readouterr().err
    monkeypatch.setattr(evaluate, "FID_WEIGHTS_FILE", f"x-{runtime.file_sha256(path)[:8]}.pth")
    evaluate.load_inception(path)
    assert "not comparable" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- caption metrics

def test_ptb_tokenize():
    # the toolkit writes brackets as -lrb- -rrb- (lower case: its punctuation filter, upper case, keeps them)
    assert projector.ptb_tokenize('A dog\'s toy, (red) "ball"... isn\'t it? 3.5 kg - 12:30.') == \
        ["a", "dog", "'s", "toy", "-lrb-", "red", "-rrb-", "ball", "is", "n't", "it", "3.5", "kg", "12:30"]


def ptb_toolkit_cases():
    """testdata/ptb_toolkit.txt as (caption, the toolkit's space-joined tokens) pairs."""
    lines = [line for line in (TESTDATA / "ptb_toolkit.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(lines) % 2 == 0 and all(line.startswith("=> ") for line in lines[1::2])
    return [(caption, tokens[3:]) for caption, tokens in zip(lines[::2], lines[1::2])]


def test_ptb_tokenize_equals_the_toolkit_outputs():
    # 166 captions (COCO-style ones and hard cases: abbreviations, brackets, quotes, clitics, symbols, numbers)
    # with the toolkit's Java PTBTokenizer output; known differences, left out: us$5 (us$ 5), a#b (a #b),
    # 1.99/lb (1.99 / lb), emoticons (:-rrb-)
    cases = ptb_toolkit_cases()
    assert len(cases) == 166
    assert [(c, " ".join(projector.ptb_tokenize(c))) for c, _ in cases] == cases


def test_bleu4_identical_is_one_and_disjoint_is_zero():
    refs = {1: ["a man riding a horse on a beach"], 2: ["two dogs play in the snow", "dogs in snow"]}
    assert projector.bleu4({1: "A man riding a horse on a beach.", 2: "two dogs play in the snow"},
                          refs) == pytest.approx(1.0, abs=1e-6)
    assert projector.bleu4({1: "x y z w v u t s", 2: "p q r o n m"}, refs) < 1e-9


def test_bleu4_worked_examples():
    # candidate "the cat sat on the mat" vs reference "the cat sat on a mat" (6 words each: no brevity penalty)
    #   1-grams: the x2 (clipped to 1), cat, sat, on, mat -> 5/6
    #   2-grams: the cat, cat sat, sat on | on the, the mat -> 3/5
    #   3-grams: the cat sat, cat sat on | sat on the, on the mat -> 2/4
    #   4-grams: the cat sat on | cat sat on the, sat on the mat -> 1/3
    #   BLEU-4 = (5/6 * 3/5 * 2/4 * 1/3)^(1/4) = (1/12)^(1/4) = 0.537285
    cand, refs = {1: "the cat sat on the mat"}, {1: ["the cat sat on a mat"]}
    assert projector.bleu4(cand, refs) == pytest.approx((1 / 12) ** 0.25, rel=1e-8)
    # corpus level: add "a dog runs" vs ["a dog runs fast", "a big dog runs in the park"]: matches 3/3, 2/2, 1/1,
    # 0/0; closest reference length 4. Counts are summed over the corpus before the precisions:
    #   (5+3)/(6+3) * (3+2)/(5+2) * (2+1)/(4+1) * (1+0)/(3+0) = 8/63; lengths 9 vs 6+4 -> BP = exp(1 - 10/9)
    cand[2], refs[2] = "a dog runs", ["a dog runs fast", "a big dog runs in the park"]
    assert projector.bleu4(cand, refs) == pytest.approx((8 / 63) ** 0.25 * math.exp(-1 / 9), rel=1e-8)


def test_bleu4_closest_reference_length_tie_takes_the_shorter():
    # 5 words, references of 4 and 6 words, all n-grams match: the tie goes to 4 -> no brevity penalty -> 1.0
    # (taking 6 would give exp(1 - 6/5) = 0.819)
    assert projector.bleu4({1: "a man rides a horse"}, {1: ["a man rides a", "a man rides a horse today"]}) == \
        pytest.approx(1.0, abs=1e-6)


def test_cider_d_worked_examples():
    # two ids, N = 2: "a" is in both reference sets (idf log 2 - log 2 = 0); every other n-gram has df 1 or 0,
    # hence weight tf * log 2, and log 2 cancels in the cosines. Identical two-word captions match on 1- and
    # 2-grams only (no 3-/4-grams): 10 * mean(1, 1, 0, 0) = 5
    assert projector.cider_d({1: "a cat", 2: "a dog"}, {1: ["a cat"], 2: ["a dog"]}) == pytest.approx(5.0)
    # id 1: "a cat cat" vs ["a black cat", "a cat"]; id 2: "a white dog" vs ["a dog"]  (units of log 2)
    #   id 1, cand 1-grams {cat: 2} (norm 2), 2-grams {a cat: 1, cat cat: 1} (norm sqrt 2), length 2 bigrams
    #     vs "a black cat" (1-gram norm sqrt 2, length 2): 1-gram min(2, 1) * 1 / (2 sqrt 2) = 0.353553; rest 0
    #     vs "a cat" (norms 1, length 1, penalty exp(-1/72) = 0.986207): 1-gram 1/2, 2-gram 1/sqrt 2
    #     10 * (0.353553 + 0.986207 * (0.5 + 0.707107)) / 4 / 2 = 1.930013
    #   id 2: 1-gram {white, dog} . {dog} = 1 / sqrt 2, penalty exp(-1/72): 10 * 0.697354 / 4 = 1.743385
    #   CIDEr-D = (1.930013 + 1.743385) / 2 = 1.836699
    cands = {1: "a cat cat", 2: "a white dog"}
    refs = {1: ["a black cat", "a cat"], 2: ["a dog"]}
    p = math.exp(-1 / 72)
    id1 = 10 * (1 / (2 * math.sqrt(2)) + p * (0.5 + 1 / math.sqrt(2))) / 4 / 2
    id2 = 10 * p / math.sqrt(2) / 4
    assert projector.cider_d(cands, refs) == pytest.approx((id1 + id2) / 2, rel=1e-9)
    assert projector.cider_d(cands, refs) == pytest.approx(1.836699, abs=1e-6)
    # clipping: repeating a matched word does not raise the score ("a cat cat" scores below "a cat" on id 1)
    assert projector.cider_d({1: "a cat", 2: "a white dog"}, refs) > projector.cider_d(cands, refs)
    assert projector.cider_d({1: "x y", 2: "z w"}, refs) == 0.0


def test_caption_metrics_reject_mismatched_ids():
    with pytest.raises(ValueError):
        projector.bleu4({1: "a cat"}, {2: ["a cat"]})
    with pytest.raises(ValueError):
        projector.cider_d({1: "a cat"}, {1: []})


# ==========================================================================================================
# train.py: every stage, checkpoints, exact resume, DDP, bad input
# ==========================================================================================================

import signal  # noqa: E402  (kept with the section that needs it)
import socket  # noqa: E402
import time  # noqa: E402

import train  # noqa: E402

TINY = ["--image-size", "32", "--clip-tower", "tiny", "--num-workers", "0", "--log-every", "1",
        "--sample-every", "0", "--no-progress", "--projector-depth", "1", "--projector-ff", "64", "--seed", "0",
        "--w-perceptual", "0", "--w-gan", "0"]   # tokenizer stage: L2 + KL unless a test turns the others on


def train_args(*argv):
    """train.py's parsed arguments for a tiny CPU run."""
    return train.build_parser().parse_args(list(TINY) + [str(a) for a in argv])


def run_train(*argv):
    """Run train.main in this process."""
    return train.main(train_args(*argv))


def train_cli(*argv, **kw):
    """Run train.py as a subprocess with this process's thread count (bitwise comparisons need it)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(REPO / "train.py"), *TINY, *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    """A 3-step tokenizer run (random tiny CLIP tower) that the flow stages can stand on."""
    out = tmp_path_factory.mktemp("tok") / "run"
    run_train("--stage", "tokenizer", "--tokenizer-preset", "tiny", "--clip-weights", "random", "--data",
              "shapes:n=64", "--out", out, "--steps", 3, "--global-batch", 8, "--lr", 1e-3, "--warmup", 1)
    return out


def flow_args(tok, out, *extra):
    return ("--stage", "flow", "--model", "tiny", "--tokenizer", tok, "--clip-weights", tok / "clip_text.safetensors",
            "--data", "shapes:n=64", "--out", out, "--global-batch", 8, "--warmup", 1, "--lr", 1e-3, *extra)


def all_tensors(ckpt):
    """Every tensor of a checkpoint's model, EMA and optimizer state, by a flat name."""
    out = {}

    def walk(prefix, x):
        if isinstance(x, torch.Tensor):
            out[prefix] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}.{i}", v)
    for key in ("model", "ema", "optimizer", "scheduler", "discriminator"):
        if key in ckpt:
            walk(key, ckpt[key])
    return out


def run_start(out):
    """Run `out`'s args, its trained parts as main() built them before step 1 (same seed, same order), its
    frozen encoders and its last checkpoint."""
    ck = torch.load(out / "last.pt", weights_only=True)
    args = argparse.Namespace(**ck["args"])
    torch.manual_seed(args.seed)
    stage = train.STAGES[args.stage].create(args, torch.device("cpu"))
    return args, stage, ck


def flat(sd):
    """A state dict's float tensors (RoPE tables and other buffers included) as one float64 vector."""
    return torch.cat([v.double().flatten() for v in sd.values() if v.is_floating_point()])


def log_value(out, step, key):
    """The value of `key` on the log line of `step` of run `out`."""
    line = next(x for x in (out / "log.txt").read_text().splitlines() if x.startswith(f"step {step}/"))
    words = line.split()
    return float(words[words.index(key) + 1])


LEARNED = {"tokenizer": "mse", "flow": "diff", "text-ae": "ce", "flow-i2t": "diff"}   # each stage's main term


def learning(out):
    """Run `out`'s loss and main term (LEARNED) on its first 16 training samples with the initial and the final
    weights (eval mode, the same noise, times and CFG draws), and the trained parameters that never moved
    -> (first, last, unmoved), first and last as tensors [loss, main term]."""
    args, stage, ck = run_start(out)
    parts = stage.parts
    batch = next(iter(data.make_loader(data.build_dataset(args.data, image_size=args.image_size), 16, seed=args.seed,
                                       noise_dim=sum(train.STAGES[args.stage].noise.values()))))
    inputs = dict(stage.prepare(batch, torch.device("cpu")), gan=False)

    def loss():
        with torch.no_grad():
            terms = stage.eval()(inputs)
            return torch.stack([terms["loss"], terms[LEARNED[args.stage]]])
    first = loss()
    unmoved = [f"{name}.{k}" for name, m in parts.items() for k, p in m.named_parameters()
               if torch.equal(p, ck["model"][name][k])]
    for name, m in parts.items():
        m.load_state_dict(ck["model"][name])
    return first, loss(), unmoved


def test_every_stage_trains_and_checkpoints(tiny_tokenizer, tmp_path):
    ck = torch.load(tiny_tokenizer / "last.pt", weights_only=True)
    assert set(ck) >= {"stage", "args", "config", "step", "model", "ema", "optimizer", "scheduler", "rng",
                       "data_state", "stats"} and ck["stage"] == "tokenizer" and ck["step"] == 3
    log = (tiny_tokenizer / "log.txt").read_text()
    for word in ("mse", "kl", "psnr", "grad_norm", "lr", "samples/s", "skipped"):
        assert word in log
    flow = tmp_path / "flow"
    run_train(*flow_args(tiny_tokenizer, flow, "--steps", 3, "--sample-every", 3, "--sample-steps", 2))
    assert (flow / "samples" / "step_0000003.png").exists()
    ck = torch.load(flow / "last.pt", weights_only=True)
    assert set(ck["model"]) == {"dit", "projector"} and ck["config"]["tokenizer"] == str(tiny_tokenizer)
    log = (flow / "log.txt").read_text()
    assert all(w in log for w in ("diff", "contrastive", "kl", "sigma", "grad_norm"))
    assert "note: micro-batch 8 per process, the official run's is 128" in log        # how its terms differ
    tae = tmp_path / "tae"
    run_train("--stage", "text-ae", "--clip-weights", tiny_tokenizer / "clip_text.safetensors", "--data",
              "shapes:n=64", "--out", tae, "--steps", 3, "--global-batch", 8, "--decoder-width", 32,
              "--decoder-depth", 1, "--decoder-ff", 64, "--lr", 1e-3, "--warmup", 1)
    assert "token_acc" in (tae / "log.txt").read_text()
    i2t = tmp_path / "i2t"
    run_train("--stage", "flow-i2t", "--model", "tiny", "--tokenizer", tiny_tokenizer, "--text-ae", tae,
              "--clip-weights", tiny_tokenizer / "clip_text.safetensors", "--data", "shapes:n=64", "--out", i2t,
              "--steps", 3, "--global-batch", 8, "--sample-every", 3, "--sample-steps", 2, "--lr", 1e-3, "--warmup", 1)
    assert " -> " in (i2t / "samples" / "step_0000003.txt").read_text()
    assert torch.load(i2t / "last.pt", weights_only=True)["stage"] == "flow-i2t"
    # every stage learned: a lower loss on its first training samples, and every trained parameter moved
    for run in (tiny_tokenizer, flow, tae, i2t):
        first, last, unmoved = learning(run)
        assert (last < 0.99 * first).all() and unmoved == [], (run.name, first, last, unmoved)


class ToyVelocity(nn.Module):
    """A velocity network that is not a DiT (a per-token MLP told t and the null flag), as a researcher would add
    one: a class with forward(x, t, null) and a `config` of its constructor arguments, registered by name."""

    def __init__(self, width=32, channels=16, **size):          # the size registry's other DiT numbers: unused
        super().__init__()
        self.config = dict(width=width, channels=channels)
        self.net = nn.Sequential(nn.Linear(channels + 2, width), nn.GELU(), nn.Linear(width, channels))

    def forward(self, x, t, null):
        cond = torch.stack([t, null.float()], -1)[:, None].expand(*x.shape[:2], 2)
        return self.net(torch.cat([x, cond.to(x.dtype)], -1))


def test_a_registered_velocity_network_trains_resumes_and_samples(tiny_tokenizer, tmp_path, monkeypatch):
    """Swapping the velocity network is one registry entry: --backbone toy trains it through train.py's loop, a
    resume equals the uninterrupted run, the checkpoint and an export record its name, and sample.py rebuilds it
    from them; a checkpoint made before backbones had names loads as the DiT."""
    monkeypatch.setitem(flow_dit.VELOCITY_NETS, "toy", ToyVelocity)
    toy = ("--backbone", "toy", "--ckpt-every", 2)
    run_train(*flow_args(tiny_tokenizer, tmp_path / "whole", "--steps", 4, *toy))
    run_train(*flow_args(tiny_tokenizer, tmp_path / "part", "--steps", 2, *toy))
    run_train(*flow_args(tiny_tokenizer, tmp_path / "part", "--steps", 4, "--resume", *toy))
    a, b = (all_tensors(torch.load(tmp_path / r / "last.pt", weights_only=True)) for r in ("whole", "part"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    ck = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    assert ck["config"]["dit"] == {"backbone": "toy", "width": 64, "channels": 16} and ck["args"]["backbone"] == "toy"
    assert set(ck["model"]["dit"]) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    pipe = sample.load_pipeline(tmp_path / "whole")
    assert type(pipe.dit) is ToyVelocity and not pipe.dit.training
    eps = torch.randn(2, 77, 16, generator=torch.Generator().manual_seed(0))
    images = pipe.generate(["a red circle", "a blue square"], steps=3, eps=eps)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    sample.export_pipeline(pipe, str(tmp_path / "export"))
    again = sample.load_pipeline(tmp_path / "export")
    assert type(again.dit) is ToyVelocity and torch.equal(again.generate(["a red circle", "a blue square"], steps=3,
                                                                         eps=eps), images)
    with pytest.raises(ValueError, match="unknown velocity network 'mlp' .*dit, toy"):
        flow_dit.velocity_net("mlp")
    # a run recorded before the registry (no "backbone" in its DiT config) is a DiT
    run_train(*flow_args(tiny_tokenizer, tmp_path / "old", "--steps", 1))
    old = torch.load(tmp_path / "old" / "last.pt", weights_only=True)
    assert old["config"]["dit"].pop("backbone") == "dit"
    os.remove(tmp_path / "old" / "last.pt")
    torch.save(old, tmp_path / "old" / "last.pt")
    assert type(sample.load_pipeline(tmp_path / "old").dit) is FlowDiT


def test_resume_after_sigkill_equals_uninterrupted(tiny_tokenizer, tmp_path):
    steps = ("--steps", 30, "--ckpt-every", 4, "--keep", 2)
    whole = tmp_path / "whole"
    run_train(*flow_args(tiny_tokenizer, whole, *steps))
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY,
                             *map(str, flow_args(tiny_tokenizer, killed, *steps))], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "step_0000004.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)                  # no chance to save anything
    proc.wait()
    stopped_at = torch.load(killed / "last.pt", weights_only=True)["step"]
    assert 4 <= stopped_at < 30, "the run must be killed mid-way"
    run_train(*flow_args(tiny_tokenizer, killed, *steps, "--resume"))
    a = all_tensors(torch.load(whole / "last.pt", weights_only=True))
    b = all_tensors(torch.load(killed / "last.pt", weights_only=True))
    assert a.keys() == b.keys() and len(a) > 20
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert len(list(killed.glob("step_*.pt"))) <= 2                 # rotation
    # metrics.jsonl: every step once across the kill and the resume, the same losses as the uninterrupted run
    whole_log, killed_log = (metrics_records(p) for p in (whole, killed))
    assert [r["step"] for r in killed_log] == [r["step"] for r in whole_log] == list(range(1, 31))
    for key in ("loss", "grad_norm", "lr"):
        assert [r[key] for r in killed_log] == [r[key] for r in whole_log], key


def test_fp16_training_scales_the_loss_and_resumes_exactly(tiny_tokenizer, tmp_path):
    """--precision fp16 (GPUs without native bf16) trains through a GradScaler whose state is checkpointed:
    3 + 3 resumed steps equal 6 uninterrupted ones bitwise, the scaler's state included."""
    steps = ("--precision", "fp16", "--ckpt-every", 3)
    run_train(*flow_args(tiny_tokenizer, tmp_path / "whole", "--steps", 6, *steps))
    run_train(*flow_args(tiny_tokenizer, tmp_path / "split", "--steps", 3, *steps))
    run_train(*flow_args(tiny_tokenizer, tmp_path / "split", "--steps", 6, *steps, "--resume"))
    a, b = (torch.load(tmp_path / name / "last.pt", weights_only=True) for name in ("whole", "split"))
    assert a["grad_scaler"]["scale"] > 0 and a["grad_scaler"] == b["grad_scaler"]
    ta, tb = all_tensors(a), all_tensors(b)
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    records = metrics_records(tmp_path / "whole")
    assert all(math.isfinite(r["loss"]) for r in records) and records[-1]["loss"] < records[0]["loss"]


def test_platform_facts_signals_memory_devices_precision(monkeypatch, tiny_tokenizer, tmp_path):
    """Windows has no SIGUSR1 and no getrusage, macOS reports max RSS in bytes, auto prefers CUDA, then MPS, then
    the CPU, and bf16 is the default only where the GPU computes it natively (fp16 on V100 / T4)."""
    monkeypatch.delattr(signal, "SIGUSR1")
    assert runtime.stop_signals() == [signal.SIGTERM, signal.SIGINT]
    assert run_train(*flow_args(tiny_tokenizer, tmp_path / "run", "--steps", 2))["step"] == 2
    usage = argparse.Namespace(ru_maxrss=1000)
    monkeypatch.setattr(bench, "resource", argparse.Namespace(getrusage=lambda who: usage, RUSAGE_SELF=0))
    cpu = torch.device("cpu")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert bench.peak_memory(cpu)[0] == 1000
    monkeypatch.setattr(sys, "platform", "linux")
    assert bench.peak_memory(cpu)[0] == 1000 * 1024
    monkeypatch.setattr(bench, "resource", None)
    assert bench.peak_memory(cpu)[0] is None and bench.gib(None) == "n/a"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert runtime.pick_device("auto") == torch.device("mps") and runtime.pick_device("cpu") == cpu
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert runtime.pick_device("auto") == cpu
    with pytest.raises(UserError, match="--device mps: Apple's MPS is not available"):
        runtime.pick_device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runtime, "use_cuda", lambda device: device)
    assert runtime.pick_device("auto", 3) == torch.device("cuda", 3)
    for native, want in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, n=native: n)
        assert runtime.default_precision(torch.device("cuda")) == want
    assert runtime.default_precision(cpu) == runtime.default_precision(torch.device("mps")) == "fp32"


def test_fid_during_training_from_the_ema_weights(tiny_tokenizer, corpus, frechet_spy, tmp_path):
    """--eval-every: FID (and CLIP score) of the EMA weights every N steps and at the end, in eval.jsonl and
    metrics.jsonl; the training itself is untouched (bitwise), and a resume evaluates each step once."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a shape number {i}\n" for i in range(5)))
    net = evaluate.load_inception(str(corpus / "inception.pth"))
    ref_images = sorted((corpus / "val2014").glob("*.jpg"))
    evaluate.save_stats(tmp_path / "ref.npz", evaluate.files_stats(ref_images, net))
    tiny_open_clip(tmp_path)
    evals = ("--eval-every", 2, "--eval-prompts", prompts, "--eval-ref", tmp_path / "ref.npz", "--eval-samples", 4,
             "--eval-steps", 2, "--eval-inception", corpus / "inception.pth", "--eval-clip-model",
             tmp_path / "tinyclip.json", "--eval-clip-weights", tmp_path / "tinyclip.pt")
    run_train(*flow_args(tiny_tokenizer, tmp_path / "plain", "--steps", 3))
    run_train(*flow_args(tiny_tokenizer, tmp_path / "eval", "--steps", 3, *evals))
    a, b = (all_tensors(torch.load(tmp_path / n / "last.pt", weights_only=True)) for n in ("plain", "eval"))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []          # no draw from the training RNG
    history = metrics_records(tmp_path / "eval")                       # metrics.jsonl: the eval records too
    evals_logged = [r for r in history if "fid" in r]
    assert [r["step"] for r in evals_logged] == [2, 3]
    eval_jsonl = [json.loads(line) for line in (tmp_path / "eval" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in eval_jsonl] == [2, 3] and all(r["eval_samples"] == 4 for r in eval_jsonl)
    assert all(math.isfinite(r["fid"]) and r["clip_score"] >= 0 for r in eval_jsonl)
    # the last FID is the distance between the reference and the statistics of the 4 samples written last
    files = [tmp_path / "eval" / "eval" / "samples" / f"{i:05d}_00.png" for i in range(4)]
    mine = evaluate.files_stats(files, net)
    np.testing.assert_allclose(frechet_spy[-1][2], mine.mu, rtol=1e-5, atol=1e-6)
    assert f"eval at step 3: FID {eval_jsonl[-1]['fid']:.3f}" in (tmp_path / "eval" / "log.txt").read_text()
    # a resume from step 2 evaluates step 3 (the end) once, step 2 is not repeated
    run_train(*flow_args(tiny_tokenizer, tmp_path / "split", "--steps", 2, *evals))
    run_train(*flow_args(tiny_tokenizer, tmp_path / "split", "--steps", 3, *evals, "--resume"))
    split = [json.loads(line) for line in (tmp_path / "split" / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in split] == [2, 3]
    assert [r["fid"] for r in split] == [r["fid"] for r in eval_jsonl]
    with pytest.raises(UserError, match="--eval-every needs --eval-ref"):
        run_train(*flow_args(tiny_tokenizer, tmp_path / "none", "--steps", 2, "--eval-every", 1,
                             "--eval-prompts", prompts))


def test_previews_skip_unreadable_samples(tmp_path):
    """The preview inputs are the first 8 readable samples: a corrupt first image does not stop training."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "00.png").write_bytes(b"not an image")
    (folder / "00.txt").write_text("broken")
    for i in range(1, 4):
        _noise_image(40, 40, i).save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"image number {i}")
    args = train_args(*TOKENIZER_RUN[:-4], "--data", f"folder:{folder}", "--global-batch", 2, "--steps", 1,
                      "--out", tmp_path / "run", "--sample-every", 1)
    train.fill_defaults(args, 1)
    fixed = sample.preview_inputs(data.build_dataset(args.data, 32), args.sample_prompts, torch.device("cpu"))
    assert fixed["captions"] == ["image number 1", "image number 2", "image number 3"]
    assert train.main(args)["step"] == 1 and list((tmp_path / "run" / "samples").iterdir())


def test_resume_of_a_run_made_before_a_flag_existed_and_init_files_that_are_missing(tiny_tokenizer, tmp_path):
    """A checkpoint without a fixed flag (an older version) resumes with a note, not a refusal; a missing --init or
    --text-ae file names its flag."""
    out = tmp_path / "run"
    run_train(*flow_args(tiny_tokenizer, out, "--steps", 2))
    ckpt = torch.load(out / "last.pt", weights_only=True)
    del ckpt["args"]["caption_groups"]
    os.remove(out / "last.pt")
    torch.save(ckpt, out / "last.pt")
    assert run_train(*flow_args(tiny_tokenizer, out, "--steps", 3, "--resume"))["step"] == 3
    assert "note: the run records no --caption-groups False" in (out / "log.txt").read_text()
    with pytest.raises(UserError, match="^--init: no checkpoint at /nope"):
        run_train(*flow_args(tiny_tokenizer, tmp_path / "init", "--steps", 1, "--init", "/nope"))


def metrics_records(out):
    """OUT/metrics.jsonl -> list of dicts."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_metrics_jsonl_and_tensorboard_scalars(tiny_tokenizer, tmp_path, monkeypatch):
    """One JSON object per logged step (losses, lr, grad norm, speed, skips); --tensorboard mirrors the scalars,
    and without the package it stops before any work with one line."""
    scalars = []

    class FakeWriter:
        def __init__(self, folder, purge_step=None):
            scalars.append(("open", folder, purge_step))

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def flush(self):
            pass

        def close(self):
            scalars.append(("close",))
    monkeypatch.setattr(runtime, "SummaryWriter", FakeWriter)
    out = tmp_path / "run"
    run_train(*flow_args(tiny_tokenizer, out, "--steps", 4, "--log-every", 2, "--tensorboard"))
    records = metrics_records(out)
    assert [r["step"] for r in records] == [2, 4]
    assert {"loss", "diff", "contrastive", "kl", "grad_norm", "lr", "samples_per_s", "skipped"} <= set(records[0])
    log = (out / "log.txt").read_text()
    assert "step 4/4 | " in log and f"loss {records[1]['loss']:.4g}" in log
    assert scalars[0] == ("open", str(out / "tensorboard"), 1) and scalars[-1] == ("close",)
    assert ("loss", records[1]["loss"], 4) in scalars and ("lr", records[0]["lr"], 2) in scalars
    monkeypatch.setattr(runtime, "SummaryWriter", None)
    with pytest.raises(UserError, match="--tensorboard needs the tensorboard package"):
        run_train(*flow_args(tiny_tokenizer, tmp_path / "none", "--steps", 2, "--tensorboard"))
    assert not (tmp_path / "none").exists()


TOKENIZER_RUN = ("--stage", "tokenizer", "--tokenizer-preset", "tiny", "--clip-weights", "random", "--data",
                 "shapes:n=64", "--global-batch", 2)


def test_resume_with_a_broken_last_pt_continues_from_the_newest_readable_step_file(tmp_path):
    out = tmp_path / "run"
    run_train(*TOKENIZER_RUN, "--out", out, "--steps", 3, "--ckpt-every", 1, "--keep", 3)
    (out / "last.pt").write_bytes((out / "last.pt").read_bytes()[:100])         # truncated
    (out / "step_0000003.pt").write_bytes(b"not a checkpoint")                   # and the newest step file broken
    result = run_train(*TOKENIZER_RUN, "--out", out, "--steps", 4, "--ckpt-every", 1, "--keep", 3, "--resume")
    log = (out / "log.txt").read_text()
    assert "warning: resuming from " + str(out / "step_0000002.pt") in log and "unreadable: last.pt" in log
    assert "resumed " + str(out) + " at step 2" in log and result["step"] == 4
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4


def test_step_files_without_last_pt_are_an_existing_run(tmp_path):
    out = tmp_path / "run"
    run_train(*TOKENIZER_RUN, "--out", out, "--steps", 2, "--ckpt-every", 1, "--keep", 3)
    (out / "last.pt").unlink()
    with pytest.raises(UserError, match=r"already holds a run \(step_0000002.pt\)"):   # never overwritten
        run_train(*TOKENIZER_RUN, "--out", out, "--steps", 2)
    result = run_train(*TOKENIZER_RUN, "--out", out, "--steps", 3, "--resume")     # continues, not from 0
    assert result["step"] == 3 and "(no last.pt)" in (out / "log.txt").read_text()
    for f in out.glob("*.pt"):
        f.write_bytes(b"junk")
    with pytest.raises(UserError, match="--resume: no readable checkpoint in .*last.pt .*step_0000003.pt"):
        run_train(*TOKENIZER_RUN, "--out", out, "--steps", 4, "--resume")


def test_resume_whose_last_pt_is_a_directory_is_a_one_line_error(tmp_path):
    """A folder named last.pt stops the run at once, not at the first save (after training) or as a resume that
    reads last.pt/last.pt."""
    out = tmp_path / "run"
    run_train(*TOKENIZER_RUN, "--out", out, "--steps", 1)
    (out / "last.pt").unlink()
    (out / "last.pt").mkdir()
    for resume in (("--resume",), ()):
        with pytest.raises(UserError) as err:
            run_train(*TOKENIZER_RUN, "--out", out, "--steps", 2, *resume)
        assert str(err.value) == f"{out}/last.pt is a folder: every checkpoint is written there; move it away"


def test_sample_prompts_file_that_is_missing_or_not_text_is_a_one_line_error(tmp_path):
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
    for name, why in (("nope.txt", "No such file or directory"), ("binary.txt", "invalid start byte"),
                      (".", "Is a directory")):
        with pytest.raises(UserError) as err:
            run_train(*TOKENIZER_RUN, "--out", tmp_path / name.replace(".", "x"), "--steps", 1, "--sample-every", 1,
                      "--sample-prompts", tmp_path / name)
        assert str(err.value) == f"--sample-prompts {tmp_path / name}: {why}"


def test_sigterm_to_the_process_group_with_workers_saves_and_exits_143(tmp_path):
    """Preemption as schedulers do it: SIGTERM to the whole group; the workers leave it to the trainer."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [*TOKENIZER_RUN, "--out", out, "--steps", 100000, "--num-workers", 2, "--ckpt-every", 100000]
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and "step 3/" not in (
            (out / "log.txt").read_text() if (out / "log.txt").exists() else ""):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)              # the trainer and its DataLoader workers alike
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    saved = torch.load(out / "last.pt", weights_only=True)["step"]
    assert saved >= 3 and f"stopped by a signal at step {saved}" in (out / "log.txt").read_text()


def test_sigterm_to_torchrun_is_forwarded_and_every_rank_saves_and_stops(tmp_path):
    """A scheduler that signals torchrun alone: torchrun forwards SIGTERM to its workers, which save one checkpoint
    together at the same step and stop; the job ends non-zero (not as a finished run) and resumes."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    argv = [*TOKENIZER_RUN, "--out", out, "--steps", 100000, "--ckpt-every", 100000]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "train.py"), *TINY, *map(str, argv)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_log(out, "step 3/", proc, timeout=180)
        proc.send_signal(signal.SIGTERM)             # torchrun's pid only
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0, stderr[-2000:]
    log = (out / "log.txt").read_text()
    saved = torch.load(out / "last.pt", weights_only=True)["step"]
    assert saved >= 3 and f"stopped by a signal at step {saved}" in log and "weights identical on all 2" in log
    r = train_cli(*TOKENIZER_RUN, "--out", out, "--steps", saved + 1, "--resume")
    assert r.returncode == 0 and torch.load(out / "last.pt", weights_only=True)["step"] == saved + 1, r.stderr


def wait_for_log(out, text, proc, timeout=120):
    """Wait until `text` is in out/log.txt (or the process ended)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and text not in (
            (out / "log.txt").read_text() if (out / "log.txt").exists() else ""):
        time.sleep(0.05)


def test_second_trainer_on_the_same_out_stops_and_the_first_finishes_untouched(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argv = [*TOKENIZER_RUN, "--out", out, "--steps", 100000, "--ckpt-every", 2, "--keep", 1]
    first = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, *map(str, argv)], cwd=REPO, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_log(out, "saved ", first)
    partial = out / f"step_9999999.pt.{first.pid}.tmp"   # as if the first were writing a checkpoint right now
    partial.write_bytes(b"half")
    busy = f"{out} is in use by pid {first.pid} on host {socket.gethostname()} since "
    for extra in ([], ["--resume"], ["--resume", "--steps", 5]):
        with pytest.raises(UserError, match=re.escape(busy) + ".*wait for it to end or stop it"):
            run_train(*TOKENIZER_RUN, "--out", out, "--steps", 3, *extra)
    r = train_cli(*TOKENIZER_RUN, "--out", out, "--steps", 3, "--resume")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("train.py: error: " + busy)
    assert partial.read_bytes() == b"half"          # the second never cleaned the first's files
    os.kill(first.pid, signal.SIGTERM)              # the first ends as a preempted run: save, exit 143, unlock
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    log = (out / "log.txt").read_text()
    saved = torch.load(out / "last.pt", weights_only=True)["step"]
    assert f"stopped by a signal at step {saved}" in log and log.count("stage tokenizer:") == 1
    assert "resumed" not in log and not (out / ".lock").exists()
    result = run_train(*TOKENIZER_RUN, "--out", out, "--steps", saved + 1, "--resume")    # free again
    log = (out / "log.txt").read_text()
    assert result["step"] == saved + 1 and "took over" not in log and not partial.exists()
    assert not (out / ".lock").exists() and not list(out.glob("*.tmp")) + list(out.glob("*.last"))


def dead_pid():
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def write_lock(out, pid, host):
    out.mkdir(parents=True, exist_ok=True)
    (out / ".lock").write_text(json.dumps(dict(pid=pid, host=host, since="2024-01-02 03:04:05 +0000")))


def test_a_lock_left_by_a_dead_trainer_here_is_taken_over_and_one_from_another_host_is_respected(tmp_path,
                                                                                                monkeypatch):
    out, pid, here = tmp_path / "run", dead_pid(), socket.gethostname()
    write_lock(out, pid, here)                      # a SIGKILLed trainer of this host
    run_train(*TOKENIZER_RUN, "--out", out, "--steps", 1)
    assert (f"warning: took over the lock of {out} from pid {pid} on host {here} since 2024-01-02 03:04:05 +0000 "
            f"(that process has ended)") in (out / "log.txt").read_text()
    assert not (out / ".lock").exists()
    write_lock(out, pid, "node-17")                 # another host: its pid means nothing here
    with pytest.raises(UserError, match=re.escape(f"{out} is in use by pid {pid} on host node-17 since 2024-01-02 "
                                                  f"03:04:05 +0000; if nothing runs there any more, delete "
                                                  f"{out / '.lock'} and start again")):
        run_train(*TOKENIZER_RUN, "--out", out, "--steps", 2, "--resume")
    assert (out / ".lock").exists() and torch.load(out / "last.pt", weights_only=True)["step"] == 1
    (out / ".lock").write_text("")                  # a lock file naming nobody is respected too
    with pytest.raises(UserError, match="which names no process; if none uses .* delete .*.lock"):
        run_train(*TOKENIZER_RUN, "--out", out, "--steps", 2, "--resume")
    (out / ".lock").unlink()                        # a refused run (UserError inside the lock) leaves none behind
    with pytest.raises(UserError, match="already holds a run"):
        run_train(*TOKENIZER_RUN, "--out", out, "--steps", 2)
    assert not (out / ".lock").exists()
    monkeypatch.setattr(runtime, "fcntl", None)       # no OS lock (Windows, NFS without locks): the pid decides
    write_lock(out, os.getppid(), here)
    with pytest.raises(UserError, match=f"in use by pid {os.getppid()} on host"):
        with runtime.RunLock(str(out)):
            pass
    write_lock(out, pid, here)
    with runtime.RunLock(str(out)) as lock:
        assert "took over" in lock.note and json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert not (out / ".lock").exists()


def test_spike_watch_records_long_excursions_above_the_best_and_their_end():
    """Known answers: a spike shorter than `steps` is not recorded; a longer one is, once; its end when the loss
    is back under factor x the best; a NaN mean counts as above; the state survives a round trip (resume)."""
    watch = runtime.SpikeWatch(2.0, 100)
    said = [watch.update(step, v) for step, v in [(50, 1.0), (100, 0.5), (150, 0.4), (200, 0.9), (250, 0.3)]]
    assert said == [None] * 5 and watch.episodes == [] and (watch.best, watch.best_step) == (0.3, 250)
    assert [watch.update(step, v) for step, v in [(300, 0.7), (350, 0.5)]] == [None, None]   # 50 steps: brief
    said = [watch.update(step, v) for step, v in [(400, 0.7), (450, float("nan")), (500, 5.0)]]
    assert said[0] is None and said[2] is None and "above 2x its best for 100 steps" in said[1]
    assert "diverged at step 350" in said[1]
    assert watch.episodes == [{"start": 350, "end": None, "best": 0.3, "best_step": 250, "peak": 5.0}]
    assert watch.diverged() == "steps 350-end (never recovered): peak 5 against a best of 0.3"
    again = runtime.SpikeWatch(2.0, 100, watch.state_dict())          # what a checkpoint carries
    assert again.state_dict() == watch.state_dict()
    assert again.update(550, 0.8) is None and again.episodes[0]["peak"] == 5.0
    assert "back under 2x its best" in again.update(600, 0.5) and again.episodes[0]["end"] == 600
    assert again.update(650, 0.25) is None and (again.best, again.best_step) == (0.25, 650)
    assert again.diverged() == "steps 350-600: peak 5 against a best of 0.3"
    off = runtime.SpikeWatch(0.0, 1)                                  # --spike-factor 0: never
    assert [off.update(s, v) for s, v in [(1, 1.0), (2, 100.0), (3, 100.0)]] == [None] * 3 and not off.episodes


def test_a_diverging_run_says_so_in_its_log_checkpoint_and_result(tiny_tokenizer, tmp_path):
    """Through the real loop: a loss above 1.0001x its best for 2 logged steps (a tiny run's loss wanders) is
    recorded, logged, returned and checkpointed; a resume carries the record on."""
    out = tmp_path / "run"
    result = run_train(*flow_args(tiny_tokenizer, out, "--steps", 12, "--spike-factor", 1.0001, "--spike-steps", 2,
                                  "--ckpt-every", 6))
    assert result["spikes"] and all(e["peak"] > 1.0001 * e["best"] for e in result["spikes"])
    log = (out / "log.txt").read_text()
    assert "warning: the loss has been above 1.0001x its best for 2 steps" in log
    assert "warning: this run diverged (steps" in log
    saved = torch.load(out / "last.pt", weights_only=True)["stats"]["spikes"]
    assert saved["episodes"] == result["spikes"]
    resumed = run_train(*flow_args(tiny_tokenizer, out, "--steps", 13, "--spike-factor", 1.0001, "--spike-steps",
                                   2, "--resume"))
    starts = [e["start"] for e in result["spikes"]]
    assert [e["start"] for e in resumed["spikes"]][:len(starts)] == starts     # carried on, not started afresh


def test_every_train_flag_has_a_resume_class():
    """A new flag must be put in one of train.py's resume classes (fixed, applied, kept, free), and in one only."""
    classes = train.RESUME.fixed + train.RESUME.applied + train.RESUME.kept + train.RESUME.free
    flags = {a.dest for a in train.build_parser()._actions if a.dest != "help"}
    assert len(flags) > 60
    assert [k for k, n in collections.Counter(classes).items() if n > 1] == []          # in two classes
    assert sorted(flags - set(classes)) == [] and sorted(set(classes) - flags) == []    # unclassified, stale


@pytest.fixture(scope="module")
def resume_runs(tiny_tokenizer, tmp_path_factory):
    """1-step runs to resume: a tokenizer with its GAN on, a flow run, a text autoencoder -> {stage: argv}."""
    root, clip = tmp_path_factory.mktemp("resume"), tiny_tokenizer / "clip_text.safetensors"
    runs = {"tokenizer": (*TOKENIZER_RUN, "--out", root / "tok", "--w-gan", 0.1, "--gan-start", 0, "--disc-width", 32),
            "flow": flow_args(tiny_tokenizer, root / "flow"),
            "text-ae": ("--stage", "text-ae", "--clip-weights", clip, "--data", "shapes:n=64", "--out", root / "tae",
                        "--global-batch", 2, "--decoder-width", 32, "--decoder-depth", 1, "--decoder-ff", 64)}
    for argv in runs.values():
        run_train(*argv, "--steps", 1)
    return runs


@pytest.mark.parametrize("stage, change, message", [
    ("tokenizer", ["--w-gan", 0], "--w-gan (run: 0.1, now: 0.0)"),
    ("tokenizer", ["--disc-width", 64], "--disc-width (run: 32, now: 64)"),
    ("tokenizer", ["--no-flip"], "--flip (run: True, now: False)"),
    ("tokenizer", ["--adaptive-gan"], "--adaptive-gan (run: False, now: True)"),
    ("flow", ["--align-hidden", 32], "--align-hidden (run: 512, now: 32)"),
    ("flow", ["--w-con", 0], "--w-con (run: 1.0, now: 0.0)"),
    ("flow", ["--kl", "standard"], "--kl (run: 'official', now: 'standard'), --w-kl (run: 0.01, now: 0.0001)"),
    ("flow", ["--cfg-prob", 0.5], "--cfg-prob (run: 0.1, now: 0.5)"),
    ("text-ae", ["--decoder-ff", 32], "--decoder-ff (run: 64, now: 32)"),
    ("text-ae", ["--w-kl", 0.5], "--w-kl (run: 0.0001, now: 0.5)")])
def test_resume_with_a_changed_model_or_loss_flag_is_refused_by_name(resume_runs, stage, change, message):
    out = Path(resume_runs[stage][resume_runs[stage].index("--out") + 1])
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    with pytest.raises(UserError, match=re.escape(f"cannot resume with different {message}")):
        run_train(*resume_runs[stage], "--steps", 2, "--resume", *change)
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before      # nothing touched


def test_resume_with_a_new_lr_applies_and_logs_it(tmp_path):
    """Two resumes from the same step with --lr 1e-4 and 2e-4: the same gradient, so updates in a ratio of 2;
    the optimizer, the log and the checkpoint all say the new settings (not the run's --lr 1e-3)."""
    run = (*TOKENIZER_RUN, "--warmup", 1, "--min-lr", 0, "--weight-decay", 0.1, "--ckpt-every", 1, "--keep", 5)
    base = tmp_path / "base"
    run_train(*run, "--out", base, "--steps", 2, "--lr", 1e-3)
    start = torch.load(base / "last.pt", weights_only=True)["model"]["tokenizer"]
    delta = {}
    for lr in (1e-4, 2e-4):
        out = tmp_path / f"lr{lr}"
        shutil.copytree(base, out)
        run_train(*run, "--out", out, "--steps", 4, "--lr", lr, "--weight-decay", 0.5, "--beta2", 0.99,
                  "--init", "nowhere.pt", "--resume")
        ck = torch.load(out / "step_0000003.pt", weights_only=True)         # the first step with the new settings
        delta[lr] = flat(ck["model"]["tokenizer"]) - flat(start)
        factor = train.lr_factor(3, argparse.Namespace(**ck["args"]))       # cosine 1 -> 0 over steps 1..4: 0.25
        no_decay, decay = ck["optimizer"]["param_groups"]
        assert factor == pytest.approx(0.25) and decay["lr"] == no_decay["lr"] == pytest.approx(lr * factor)
        assert decay["initial_lr"] == no_decay["initial_lr"] == lr and ck["scheduler"]["base_lrs"] == [lr, lr]
        assert (decay["weight_decay"], no_decay["weight_decay"], tuple(decay["betas"])) == (0.5, 0.0, (0.9, 0.99))
        assert ck["args"]["lr"] == lr and ck["args"]["init"] is None
        log = (out / "log.txt").read_text()
        assert (f"changed from step 2 on: --steps 2 -> 4, --lr 0.001 -> {lr}, --weight-decay 0.1 -> 0.5, "
                f"--beta2 0.999 -> 0.99") in log
        assert "note: --init 'nowhere.pt' is not used by a resume; the run started with None" in log
    a, b = delta[1e-4], delta[2e-4]
    assert a.norm() > 0 and (b - 2 * a).norm() < 1e-3 * b.norm()


@pytest.mark.parametrize("argv, message", [
    (["--cfg", "nan"], "--cfg: must be a finite number, got nan"), (["--steps", "0"], "--steps: must be >= 1"),
    (["--batch-size", "-2"], "--batch-size: must be >= 1"), (["--global-batch", "0"], "--global-batch: must be >= 1"),
    (["--log-every", "0"], "--log-every: must be >= 1"), (["--ckpt-every", "0"], "--ckpt-every: must be >= 1"),
    (["--lr", "inf"], "--lr: must be a finite number >= 0"), (["--ema", "1.5"], "--ema: must be in [0, 1]"),
    (["--cfg-prob", "-0.1"], "--cfg-prob: must be in [0, 1]"), (["--warmup", "x"], "--warmup: 'x' is not an integer"),
    (["--grad-clip", "nan"], "--grad-clip: must be a finite number >= 0"),
    (["--dit-patch-size", "5"], "--dit-patch-size: must be a divisor of the 77 tokens (1, 7, 11 or 77), got 5"),
    (["--projector-patch-size", "0"], "--projector-patch-size: must be a divisor of the 77 tokens"),
    (["--decoder-patch-size", "14"], "--decoder-patch-size: must be a divisor of the 77 tokens")])
def test_numeric_flags_are_checked_at_parse_time(argv, message, capsys):
    """A bad number stops argparse (exit 2, one line) instead of training nothing, dividing by 0 or writing NaN."""
    with pytest.raises(SystemExit) as exit_:
        train.build_parser().parse_args(["--out", "x", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        sample.build_parser().parse_args(["--ckpt", "x", "--cfg", "nan", "--batch-size", "4", "a prompt"])
    assert exit_.value.code == 2 and "--cfg: must be a finite number, got nan" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        data.build_parser().parse_args(["pretokenize", "--data", "x", "--tokenizer", "t", "--out", "o",
                                        "--batch-size", "0"])
    assert "--batch-size: must be >= 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("width", ["8", "16", "48", "0", "-32"])
def test_disc_width_that_is_not_a_multiple_of_32_is_a_parse_error(width, capsys):
    """The PatchGAN's GroupNorm splits its channels into 32 groups: another width stops argparse, not GroupNorm."""
    with pytest.raises(SystemExit) as exit_:
        train.build_parser().parse_args(["--out", "x", "--disc-width", width])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"--disc-width: must be a multiple of 32, got {width}" in err
    assert "Traceback" not in err
    assert train.build_parser().parse_args(["--out", "x", "--disc-width", "96"]).disc_width == 96


@pytest.mark.parametrize("value, message", [("abc", "'abc' is not a number"), ("0", "must be a finite number > 0"),
                                            ("nan", "must be a finite number > 0")])
def test_scale_factor_that_is_not_a_number_or_auto_is_a_parse_error(value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.build_parser().parse_args(["--out", "x", "--scale-factor", value])
    assert exit_.value.code == 2 and f"--scale-factor: {message}" in capsys.readouterr().err
    assert train.build_parser().parse_args(["--out", "x", "--scale-factor", "0.5"]).scale_factor == 0.5
    assert train.build_parser().parse_args(["--out", "x"]).scale_factor == "auto"


class NotAWeight:
    """An arbitrary Python object: a file holding one must never be unpickled."""


def test_corrupt_or_unsafe_weight_files_are_one_line_errors(tmp_path):
    """Truncated, junk and pickled-object files: one UserError naming the file; never the weights_only=False advice."""
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:50])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    torch.save({"w": NotAWeight()}, tmp_path / "object.pt")
    for name in ("truncated.pt", "junk.safetensors", "object.pt", "missing.bin"):
        for read in (runtime.read_weights, runtime.read_state_dict, tokenizer.load_tokenizer,
                     runtime.load_checkpoint):
            with pytest.raises(UserError) as err:
                read(str(tmp_path / name))
            assert name in str(err.value) and "weights_only=False" not in str(err.value)
    with pytest.raises(UserError, match="Python objects besides tensors"):
        runtime.read_weights(str(tmp_path / "object.pt"))
    assert torch.equal(runtime.read_weights(str(good))["w"], torch.ones(2))


def _write_part(f, payload):
    """What a torch.save cut short leaves: a few bytes in f (a path or an open file, as torch.save takes)."""
    with open(f, "wb") if isinstance(f, (str, os.PathLike)) else contextlib.nullcontext(f) as fh:
        fh.write(payload)


def test_read_weights_memory_maps_zip_checkpoints_and_still_reads_legacy_files(tmp_path, monkeypatch):
    """torch.save's zip files are read with mmap=True (tensors backed by the file: the OS cache, shared by the ranks
    of a node); legacy-format files, which torch cannot map, are still read."""
    torch.save({"w": torch.arange(4.0)}, tmp_path / "zip.pt")
    torch.save({"w": torch.arange(4.0)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    calls, real_load = [], torch.load

    def spy(path, *args, **kw):
        calls.append((Path(path).name, kw.get("mmap", False)))
        return real_load(path, *args, **kw)
    monkeypatch.setattr(torch, "load", spy)
    for name in ("zip.pt", "legacy.pt"):
        assert torch.equal(runtime.read_weights(str(tmp_path / name))["w"], torch.arange(4.0))
    if os.name != "nt":                              # Windows cannot replace a mapped last.pt: read there unmapped
        assert calls[0] == ("zip.pt", True) and len([c for c in calls if c[0] == "zip.pt"]) == 1
        assert ("legacy.pt", True) in calls and calls[-1] == ("legacy.pt", False)   # tried, then read unmapped
    ckpt = runtime.load_checkpoint(str(_a_checkpoint(tmp_path)))
    assert calls[-1] == ("last.pt", os.name != "nt") and ckpt["step"] == 7


def _a_checkpoint(tmp_path):
    """A minimal train.py-schema checkpoint file -> its path."""
    (tmp_path / "run").mkdir()
    torch.save({"stage": "tokenizer", "step": 7, "model": {"w": torch.ones(2)}}, tmp_path / "run" / "last.pt")
    return tmp_path / "run" / "last.pt"


def test_kill_during_checkpoint_write_keeps_the_previous(tmp_path, monkeypatch):
    state = {"step": 1, "w": torch.ones(3)}
    runtime.save_checkpoint(state, str(tmp_path), 1, keep=3)
    real_save = torch.save

    def dies_half_way(obj, f, *a, **k):
        _write_part(f, b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt                        # the process dies here
    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        runtime.save_checkpoint({"step": 2, "w": torch.zeros(3)}, str(tmp_path), 2, keep=3)
    monkeypatch.setattr(torch, "save", real_save)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["step"] == 1 and torch.equal(last["w"], torch.ones(3))
    assert not (tmp_path / "step_0000002.pt").exists()
    runtime.check_output_folder(str(tmp_path), resume=True)      # a resume clears the partial file
    assert not list(tmp_path.glob("*.tmp"))


def test_disk_full_while_saving_a_checkpoint_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """ENOSPC mid-write: one line (exit 1) saying the disk is full; the previous files intact, the partial removed."""
    out, real_save = tmp_path / "run", torch.save

    def fills_the_disk(obj, f, *a, **k):
        if obj["step"] < 2:
            return real_save(obj, f, *a, **k)
        _write_part(f, b"PK\x03\x04 the first bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", fills_the_disk)
    args = train_args(*TOKENIZER_RUN, "--out", out, "--steps", 3, "--ckpt-every", 1)
    assert runtime.run_cli("train.py", train.main, args) == 1
    assert capsys.readouterr().err == (f"train.py: error: the disk is full at {out}: cannot write the checkpoint "
                                       f"{out}/step_0000002.pt (No space left on device); the previous checkpoints "
                                       "are intact: free space, then continue with --resume\n")
    assert sorted(p.name for p in out.glob("*.pt*")) == ["last.pt", "step_0000001.pt"]      # no .tmp left
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 1
    if os.path.exists("/dev/full"):   # a real full disk: the write through a Python file says ENOSPC
        monkeypatch.setattr(torch, "save", real_save)
        with pytest.raises(OSError) as err:
            runtime._write_synced({"w": torch.ones(1000)}, "/dev/full")
        assert err.value.errno == errno.ENOSPC


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tiny_tokenizer, tmp_path, monkeypatch):
    real_loss, calls = train.FlowStage.forward, []

    def poisoned(stage, inputs):
        out = real_loss(stage, inputs)
        calls.append(1)
        if len(calls) in poison:
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(train.FlowStage, "forward", poisoned)
    poison = {2}
    run_train(*flow_args(tiny_tokenizer, tmp_path / "a", "--steps", 4))
    ck = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert ck["stats"]["skips"][0]["non-finite step"] == 1
    assert all(torch.isfinite(t).all() for t in all_tensors(ck).values() if t.is_floating_point())
    assert "update skipped" in (tmp_path / "a" / "log.txt").read_text()
    calls.clear()
    poison = set(range(3, 100))
    with pytest.raises(UserError, match="2 non-finite steps in a row"):
        run_train(*flow_args(tiny_tokenizer, tmp_path / "b", "--steps", 6, "--ckpt-every", 1, "--max-bad-steps", 2))
    ck = torch.load(tmp_path / "b" / "last.pt", weights_only=True)   # saved after the skipped step 3: clean
    assert ck["step"] == 3 and ck["stats"]["skips"][0]["non-finite step"] == 1 and all(
        torch.isfinite(t).all() for t in all_tensors(ck).values()
                                   if t.is_floating_point())


def test_clear_errors(tiny_tokenizer, tmp_path):
    with pytest.raises(UserError, match="works at 32 px but --image-size is 64"):
        run_train(*flow_args(tiny_tokenizer, tmp_path / "a", "--steps", 1), "--image-size", 64)
    run_train(*flow_args(tiny_tokenizer, tmp_path / "b", "--steps", 1))
    with pytest.raises(UserError, match="already holds a run"):
        run_train(*flow_args(tiny_tokenizer, tmp_path / "b", "--steps", 2))
    with pytest.raises(UserError, match=r"cannot resume with different --model \(run: 'tiny', now: 'demo'\)"):
        run_train(*flow_args(tiny_tokenizer, tmp_path / "b", "--steps", 2, "--resume"), "--model", "demo")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not writable"):
        run_train(*flow_args(tiny_tokenizer, tmp_path / "file" / "run", "--steps", 1))
    with pytest.raises(UserError, match="not a multiple of --batch-size 3"):
        run_train(*flow_args(tiny_tokenizer, tmp_path / "c", "--steps", 1, "--batch-size", 3))
    args = train_args("--stage", "flow", "--out", tmp_path / "d", "--global-batch", 8)
    with pytest.raises(UserError, match="not divisible by the world size 3"):
        train.fill_defaults(args, world=3)
    with pytest.raises(UserError, match="needs --tokenizer"):
        run_train("--stage", "flow", "--clip-weights", "random", "--out", tmp_path / "e", "--steps", 1)
    with pytest.raises(UserError, match="not a tokenizer"):
        run_train(*flow_args(tiny_tokenizer, tmp_path / "f", "--steps", 1), "--tokenizer", tmp_path / "b")
    with pytest.raises(UserError, match="--clip-weights .*nope.safetensors: no such file"):
        run_train(*flow_args(tiny_tokenizer, tmp_path / "h", "--steps", 1), "--clip-weights", "nope.safetensors")
    with pytest.raises(UserError, match="0 usable samples"):
        (tmp_path / "empty.jsonl").write_text('{"image": "nope.png", "caption": "x"}\n')
        run_train(*flow_args(tiny_tokenizer, tmp_path / "g", "--steps", 1), "--data", f"jsonl:{tmp_path}/empty.jsonl")
    r = train_cli(*flow_args(tiny_tokenizer, tmp_path / "b", "--steps", 1))       # the CLI: one line, exit 1
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr.startswith("train.py: error: ")


def test_init_from_another_stage_or_model_size_is_a_one_line_error(tiny_tokenizer, tmp_path):
    """--init names what the file is (stage, parts, sizes) and what this run needs, instead of a KeyError or
    load_state_dict's size-mismatch traceback."""
    flow = tmp_path / "flow"
    run_train(*flow_args(tiny_tokenizer, flow, "--steps", 1))
    with pytest.raises(UserError) as err:
        run_train(*flow_args(tiny_tokenizer, tmp_path / "a", "--steps", 1, "--init", tiny_tokenizer))
    assert str(err.value) == (f"--init {tiny_tokenizer} is a 'tokenizer' checkpoint (parts: tokenizer): it has no "
                              "dit, projector, which --stage flow trains")
    with pytest.raises(UserError, match=r"\(a 'flow' run\) does not fit this 'flow' run: --model tiny there, demo "
                                        r"here; its dit: .* \(\d+ keys in all\)$"):
        run_train(*flow_args(tiny_tokenizer, tmp_path / "b", "--steps", 1, "--init", flow), "--model", "demo")
    with pytest.raises(UserError, match="has no text_decoder, which --stage text-ae trains"):
        run_train("--stage", "text-ae", "--clip-weights", tiny_tokenizer / "clip_text.safetensors", "--out",
                  tmp_path / "c", "--global-batch", 2, "--steps", 1, "--decoder-width", 32, "--decoder-depth", 1,
                  "--decoder-ff", 32, "--init", flow)
    with pytest.raises(UserError, match=r"\(encoder 64 x 2, decoder 64 x 2\) does not fit --tokenizer-preset demo "
                                        r"\(encoder 128 x 2, decoder 128 x 3\)"):
        run_train(*TOKENIZER_RUN, "--tokenizer-preset", "demo", "--out", tmp_path / "d", "--steps", 1,
                  "--init", tiny_tokenizer)
    with pytest.raises(UserError, match="a 'flow' checkpoint, not a tokenizer"):
        run_train(*TOKENIZER_RUN, "--out", tmp_path / "e", "--steps", 1, "--init", flow)
    assert run_train(*flow_args(tiny_tokenizer, tmp_path / "f", "--steps", 1, "--init", flow))["step"] == 1


def test_bad_data_spec_in_text_ae_vocabulary_and_pretokenize_is_one_line(tiny_tokenizer, tmp_path, capsys):
    """Every command that opens --data says a bad spec in one line: also --decoder-vocab data and data.py."""
    with pytest.raises(UserError, match="unknown split 'nope'"):
        run_train("--stage", "text-ae", "--clip-weights", tiny_tokenizer / "clip_text.safetensors", "--data",
                  "shapes:split=nope", "--out", tmp_path / "a", "--global-batch", 2, "--steps", 1,
                  "--decoder-width", 32, "--decoder-depth", 1, "--decoder-ff", 32, "--decoder-vocab", "data")
    for spec, why in (("csv:x", "csv:x: unknown source kind 'csv'"), ("shapes:split=nope", "unknown split 'nope'"),
                      (f"jsonl:{tmp_path}/nope.jsonl", "nope.jsonl: cannot read")):
        args = data.build_parser().parse_args(["pretokenize", "--data", spec, "--tokenizer", str(tiny_tokenizer),
                                               "--out", str(tmp_path / "cache"), "--no-clip", "--num-workers", "0"])
        assert runtime.run_cli("data.py", data.pretokenize, args) == 1
        err = capsys.readouterr().err
        assert err.startswith("data.py: error: ") and why in err and err.count("\n") == 1, err


def test_pretokenised_cache_gives_the_same_first_step_loss(tiny_tokenizer, tmp_path):
    cache = tmp_path / "cache"
    data.pretokenize(data.build_parser().parse_args(["pretokenize", "--data", "shapes:n=16", "--tokenizer",
                                                     str(tiny_tokenizer), "--out", str(cache), "--num-workers", "0",
                                                     "--batch-size", "5"]))
    losses = []
    for spec in ("shapes:n=16", f"cache:{cache}"):
        args = train_args(*flow_args(tiny_tokenizer, tmp_path / "x", "--steps", 1), "--data", spec)
        train.fill_defaults(args, 1)
        torch.manual_seed(0)
        stage = train.STAGES[args.stage].create(args, torch.device("cpu")).eval()
        source = data.build_dataset(spec, image_size=32)
        batch = next(iter(data.make_loader(source, 8, seed=0, noise_dim=sum(train.STAGES["flow"].noise.values()))))
        inputs = stage.prepare(batch, torch.device("cpu"))
        with torch.no_grad():
            losses.append({k: float(v) for k, v in stage(inputs).items()})
    live, cached = losses
    for k in ("loss", "diff", "contrastive", "kl"):
        assert cached[k] == pytest.approx(live[k], rel=2e-3), k     # the cache stores float16


def pretokenize_cli(*argv):
    """`data.py pretokenize ...` through run_cli in this process (no workers) -> (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    args = data.build_parser().parse_args(["pretokenize", "--num-workers", "0", *map(str, argv)])
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = data.run_cli("data.py", data.pretokenize, args)
    return rc, out.getvalue(), err.getvalue()


def other_tokenizer(tok, folder):
    """A copy of a tokenizer run whose EMA weights differ in one value: another tokenizer of the same shapes."""
    ck = torch.load(tok / "last.pt", weights_only=True)
    key = next(k for k, v in sorted(ck["ema"]["tokenizer"].items()) if k.endswith("weight"))
    ck["ema"]["tokenizer"][key] = ck["ema"]["tokenizer"][key] + 0.01
    folder.mkdir()
    torch.save(ck, folder / "last.pt")
    return folder


def ema_hash(tok):
    """weights_sha256 of a tokenizer run's EMA weights, read straight from its last.pt."""
    return runtime.weights_sha256(torch.load(tok / "last.pt", weights_only=True)["ema"]["tokenizer"])


def test_flow_training_refuses_a_cache_made_with_another_tokenizer(tiny_tokenizer, tmp_path, capsys):
    # the identity is sha256 over (index:key:dtype:shape;) + raw bytes per tensor, keys sorted
    one = struct.pack("<f", 1.0)
    assert runtime.weights_sha256({"b": torch.ones(1), "a": torch.ones(1)}) == \
        hashlib.sha256(b"0:a:torch.float32:(1,);" + one + b"0:b:torch.float32:(1,);" + one).hexdigest()
    cache, clip_file = tmp_path / "cache", tiny_tokenizer / "clip_text.safetensors"
    assert pretokenize_cli("--data", "shapes:n=8", "--tokenizer", tiny_tokenizer, "--out", cache)[0] == 0
    identity = json.loads((cache / "part-00000" / "identity.json").read_text())
    ck = torch.load(tiny_tokenizer / "last.pt", weights_only=True)
    # what the cache used: the EMA weights, not the raw ones the checkpoint also holds
    assert identity["tokenizer"] == ema_hash(tiny_tokenizer)
    assert identity["tokenizer"] != runtime.weights_sha256(ck["model"]["tokenizer"])
    assert identity["clip"] == runtime.weights_sha256(CLIPTextEncoder("tiny", str(clip_file)))
    assert data.build_dataset(f"cache:{cache}").identity == identity
    spec = f"cache:{cache}"
    capsys.readouterr()
    assert run_train(*flow_args(tiny_tokenizer, tmp_path / "ok", "--steps", 1), "--data", spec)["step"] == 1
    assert "warning: --data" not in capsys.readouterr().err
    tok2 = other_tokenizer(tiny_tokenizer, tmp_path / "tok2")
    with pytest.raises(UserError) as err:
        run_train(*flow_args(tok2, tmp_path / "t2", "--steps", 1), "--clip-weights", clip_file, "--data", spec)
    theirs = runtime.short_hash(ema_hash(tok2))
    msg = str(err.value)
    assert f"tokenizer {identity['tokenizer'][:12]} in the cache vs {theirs} of --tokenizer {tok2}" in msg
    assert "python data.py pretokenize" in msg and "\n" not in msg and "clip" not in msg
    with pytest.raises(UserError, match=f"clip {identity['clip'][:12]} in the cache vs [0-9a-f]{{12}} of CLIP "):
        run_train(*flow_args(tiny_tokenizer, tmp_path / "c2", "--steps", 1), "--clip-weights", "random", "--seed", 3,
                  "--data", spec)
    # a cache made before identities were recorded still loads, with a warning
    os.remove(cache / "part-00000" / "identity.json")
    capsys.readouterr()
    data.check_cache_identity(data.build_dataset(spec), spec, {}, 0)
    assert capsys.readouterr().err.startswith(f"warning: --data {spec} records no tokenizer or CLIP identity")


def test_images_are_encoded_in_fp32_unless_asked(tiny_tokenizer, tmp_path, monkeypatch):
    """The official trainer encodes images into tokens in fp32 (train_t2i.py:131-133): so do the flow stages that
    read images, whatever --precision, and pretokenize (its identity says fp32); --encode-bf16 asks for bf16."""
    seen, encode = [], Tokenizer.encode

    def spy(self, images):
        seen.append(torch.is_autocast_enabled("cpu"))
        return encode(self, images)
    monkeypatch.setattr(Tokenizer, "encode", spy)
    for extra, want in (((), False), (("--encode-bf16",), True)):
        seen.clear()
        run_train(*flow_args(tiny_tokenizer, tmp_path / f"r{len(extra)}", "--steps", 1, "--precision", "bf16", *extra))
        assert seen and set(seen) == {want}, (extra, seen)
    assert pretokenize_cli("--data", "shapes:n=2", "--tokenizer", tiny_tokenizer, "--out", tmp_path / "c")[0] == 0
    assert json.loads((tmp_path / "c" / "part-00000" / "identity.json").read_text())["precision"] == "fp32"


class Killed(Exception):
    """A stand-in for a kill in the middle of pre-tokenising."""


def test_pretokenize_refuses_to_extend_a_cache_of_other_data_or_tokenizer(tiny_tokenizer, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    same = ("--tokenizer", tiny_tokenizer, "--out", cache, "--batch-size", 2)
    write = data.write_cache

    def killed_after_one_batch(directory, *rest):
        write(directory, *rest)
        raise Killed
    monkeypatch.setattr(data, "write_cache", killed_after_one_batch)
    with pytest.raises(Killed):
        pretokenize_cli("--data", "shapes:n=6", *same)
    monkeypatch.undo()
    rc, out, _ = pretokenize_cli("--data", "shapes:n=6", *same)            # the same identity continues
    assert rc == 0 and "6 samples" in out
    source = data.build_dataset(f"cache:{cache}")
    assert [source.get(i)["caption"] for i in range(6)] == [data.ShapesSource("s", n=6).get(i)["caption"]
                                                            for i in range(6)]
    part = cache / "part-00000"
    before = {f: (part / f).read_bytes() for f in sorted(os.listdir(part))}
    old = json.loads((part / "identity.json").read_text())
    tok2 = other_tokenizer(tiny_tokenizer, tmp_path / "tok2")
    new_tok = runtime.short_hash(ema_hash(tok2))
    for argv, change in [(("--data", "shapes:n=8", *same), "data 'shapes:n=6' -> 'shapes:n=8'"),
                         (("--data", "shapes:n=6", *same, "--tokenizer", tok2),
                          f"tokenizer {old['tokenizer'][:12]} -> {new_tok}"),
                         (("--data", "shapes:n=6", *same, "--no-clip"),
                          f"clip {old['clip'][:12]} -> none (--no-clip)")]:
        rc, _, err = pretokenize_cli(*argv)
        assert rc == 1 and err.count("\n") == 1 and change in err and "nothing appended" in err, err
        assert {f: (part / f).read_bytes() for f in sorted(os.listdir(part))} == before
    os.remove(part / "identity.json")                                       # a cache from before the records
    rc, _, err = pretokenize_cli("--data", "shapes:n=6", *same)
    assert rc == 1 and "made before caches recorded" in err and len(os.listdir(part)) == len(before) - 1
    # parts of one cache that disagree are refused when the cache is read
    (part / "identity.json").write_text(json.dumps(old))
    other = cache / "part-00001"
    other.mkdir()
    for f, blob in before.items():
        (other / f).write_bytes(blob)
    (other / "identity.json").write_text(json.dumps(dict(old, data="shapes:n=7")))
    with pytest.raises(RuntimeError, match="parts were made with different"):
        data.build_dataset(f"cache:{cache}")


def cache_bytes(cache):
    """{file: bytes} of every file of a cache folder's parts (the identity and lock files aside)."""
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(cache.glob("part-*/*"))
            if p.name not in ("identity.json", ".lock")}


def test_an_interrupted_or_disk_full_pretokenize_is_refused_then_finished_exactly(tiny_tokenizer, tmp_path,
                                                                                  monkeypatch):
    argv = ("--data", "shapes:n=7", "--tokenizer", tiny_tokenizer, "--batch-size", 3)
    assert pretokenize_cli(*argv, "--out", tmp_path / "whole")[0] == 0
    whole = cache_bytes(tmp_path / "whole")
    appended, real = [], data.append_npy

    def killed_at_append(n, error):
        def append(path, rows):                 # the n-th append fails: a kill, or a full disk
            appended.append(path)
            if len(appended) == n:
                raise error
            real(path, rows)
        return append
    # a kill between two appends of the second batch: posterior.npy holds 6 rows, the others 3
    monkeypatch.setattr(data, "append_npy", killed_at_append(5, Killed()))
    with pytest.raises(Killed):
        pretokenize_cli(*argv, "--out", tmp_path / "killed")
    monkeypatch.undo()
    rows = data.cache_rows(tmp_path / "killed" / "part-00000")
    assert rows == {"posterior.npy": 6, "clip.npy": 3, "ids.npy": 3, "captions.jsonl": 3}
    with pytest.raises(UserError, match=r"left unfinished by an interrupted pretokenize \(posterior.npy 6 rows, "
                                        r"clip.npy 3 rows.*run the same `python data.py pretokenize` command again"):
        data.build_dataset(f"cache:{tmp_path / 'killed'}")
    rc, out, _ = pretokenize_cli(*argv, "--out", tmp_path / "killed")
    assert rc == 0 and "7 samples" in out and cache_bytes(tmp_path / "killed") == whole
    # a full disk in the middle of a batch: one line, nothing left locked, and a rerun finishes it exactly
    appended.clear()
    monkeypatch.setattr(data, "append_npy", killed_at_append(6, OSError(errno.ENOSPC, "No space left on device")))
    rc, _, err = pretokenize_cli(*argv, "--out", tmp_path / "full")
    monkeypatch.undo()
    part = tmp_path / "full" / "part-00000"
    last = err.rstrip().splitlines()[-1]                                    # after the progress bar, if any
    assert rc == 1 and err.count("error") == 1 and last.startswith("data.py: error: the disk is full: "), err
    assert f"the disk is full: cannot write {part} (No space left on device); run the same command again" in last
    assert not (part / ".lock").exists()
    (part / "captions.jsonl").open("a").write('{"caption": "a half-writ')   # and a caption line cut short
    assert pretokenize_cli(*argv, "--out", tmp_path / "full")[0] == 0 and cache_bytes(tmp_path / "full") == whole
    # two writers: a second pretokenize into a part in use stops with who holds it, touching nothing
    with runtime.RunLock(str(part)):
        rc, _, err = pretokenize_cli(*argv, "--out", tmp_path / "full")
    assert rc == 1 and f"{part} is in use by pid {os.getpid()}" in err and cache_bytes(tmp_path / "full") == whole


# ----------------------------------------------------------------------------------------------------------
# train.py: the optimisation pieces, with small exact numbers
# ----------------------------------------------------------------------------------------------------------

def test_stage_defaults_follow_the_official_recipes():
    flow = dict(lr=4e-4, weight_decay=0.03, beta2=0.95, warmup=5000, schedule="constant", min_lr=0.0, ema=0.9999,
                grad_clip=0.0, w_kl=None, global_batch=4096, steps=1_000_000)
    assert train.STAGES["flow"].defaults == flow                      # the stage configs (fact sheet 10)
    assert {k: train.STAGES["flow-i2t"].defaults[k] for k in ("lr", "beta2", "schedule", "ema", "grad_clip")} == {
        k: flow[k] for k in ("lr", "beta2", "schedule", "ema", "grad_clip")}
    assert train.STAGES["tokenizer"].defaults == dict(                         # TA-TiTok's VAE recipe (fact sheet 9)
        lr=1e-4, weight_decay=1e-4, beta2=0.999, warmup=10_000, schedule="cosine", min_lr=1e-5, ema=0.999,
        grad_clip=1.0, w_kl=1e-6, global_batch=256, steps=650_000, w_perceptual=1.1, w_gan=0.1, gan_start=200_000,
        random_crop=True, flip=True, size_filter=True)
    args = train.build_parser().parse_args(["--out", "x"])
    assert (args.cfg_prob, args.beta1, args.w_con, args.kl, args.align_hidden, args.cfg, args.w_lecam,
            args.lecam_decay) == (0.1, 0.9, 1.0, "official", 512, 2.0, 0.001, 0.999)
    train.fill_defaults(args, world=1)
    assert args.w_kl == 0.01 and args.accum == 32 and args.batch_size == 128       # the official micro-batch


def test_update_ema_known_answers():
    model = nn.ModuleDict({"a": nn.Linear(3, 2), "b": nn.Linear(2, 1)})
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.fill_(1.0)
        for p in model.parameters():
            p.fill_(11.0)
    train.update_ema(ema, model, 0.9)                         # 0.9 * 1 + 0.1 * 11
    assert all(torch.allclose(p, torch.full_like(p, 2.0), atol=1e-6, rtol=0) for p in ema.parameters())
    train.update_ema(ema, model, 0.9)                         # 0.9 * 2 + 0.1 * 11
    assert all(torch.allclose(p, torch.full_like(p, 2.9), atol=1e-6, rtol=0) for p in ema.parameters())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in list(model.parameters()) + list(ema.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    before = [p.clone() for p in ema.parameters()]
    train.update_ema(ema, model, 0.99)
    for e, old, m in zip(ema.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.99 * old + 0.01 * m, atol=1e-6, rtol=0)
    kept = [p.clone() for p in ema.parameters()]
    train.update_ema(ema, model, 1.0)                         # decay 1: unchanged; decay 0: a copy of the model
    assert all(torch.equal(e, k) for e, k in zip(ema.parameters(), kept))
    train.update_ema(ema, model, 0.0)
    assert all(torch.equal(e, m) for e, m in zip(ema.parameters(), model.parameters()))


def test_lr_factor_warmup_constant_and_cosine_known_answers():
    args = argparse.Namespace(stage="flow", warmup=4, schedule="constant", steps=10, lr=2.0, min_lr=0.0)
    # linear warm-up: step k (0-based) uses (k + 1) / warmup, so the first update already moves; then 1
    assert [train.lr_factor(k, args) for k in range(7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    args.stage = "tokenizer"                    # TA-TiTok's LambdaLR: k / warmup, the first update at lr 0
    assert [train.lr_factor(k, args) for k in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    for args.stage in ("flow", "tokenizer"):
        args.warmup = 0
        assert train.lr_factor(0, args) == 1.0
    # cosine from the end of warm-up to the last step, down to min_lr / lr = 0.1
    args = argparse.Namespace(stage="flow", warmup=2, schedule="cosine", steps=10, lr=2.0, min_lr=0.2)
    got = {k: train.lr_factor(k, args) for k in (0, 1, 2, 6, 9, 10, 50)}
    want = {0: 0.5, 1: 1.0, 2: 1.0, 6: 0.55, 9: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)), 10: 0.1, 50: 0.1}
    assert got == pytest.approx(want, abs=1e-12)
    assert train.lr_factor(2, args, steps=4) == 1.0 and train.lr_factor(3, args, steps=4) == pytest.approx(0.55)
    args.min_lr = 0.0
    assert train.lr_factor(6, args) == pytest.approx(0.5) and train.lr_factor(10, args) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- TA-TiTok parity of --stage tokenizer

def _ta_titok_ema_decay(optimization_step, decay=0.999):
    """1d-tokenizer a5c8922 modeling/modules/ema_model.py:92-107 (update_after_step 0, min_decay 0, no
    use_ema_warmup), called by step() after its increment: the k-th update (1-based) passes k."""
    step = max(0, optimization_step - 0 - 1)
    if step <= 0:
        return 0.0
    return max(min((1 + step) / (10 + step), decay), 0.0)


def _ta_titok_lambda(tick, warmup, total, base_lr, end_lr):
    """1d-tokenizer a5c8922 utils/lr_schedulers.py:56-62: the cosine schedule's LambdaLR factor at scheduler tick."""
    if tick < warmup:
        return float(tick) / float(max(1, warmup))
    progress = float(tick - warmup) / float(max(1, total - warmup))
    ratio = max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    return (end_lr + (base_lr - end_lr) * ratio) / base_lr


def test_ema_decay_warms_up_as_ta_titok_on_the_tokenizer_stage_only():
    weights = dict(w_kl=0.0, w_perceptual=0.0, w_gan=0.0, adaptive_gan=False, w_con=1.0, kl="official")
    decay = lambda stage, ema: train.STAGES[stage](argparse.Namespace(ema=ema, **weights), {}, {}).ema_decay  # noqa
    tokenizer_decay = decay("tokenizer", 0.999)
    assert [tokenizer_decay(s) for s in range(4)] == pytest.approx([0.0, 2 / 11, 3 / 12, 4 / 13], abs=1e-15)
    assert tokenizer_decay(8989) == pytest.approx(8990 / 8999) and tokenizer_decay(8990) == 0.999
    assert all(tokenizer_decay(s) == _ta_titok_ema_decay(s + 1) for s in range(20_000))
    for stage in ("flow", "text-ae", "flow-i2t"):          # FlowTok's constant rate (train_t2i.py:154)
        assert [decay(stage, 0.9999)(s) for s in (0, 1, 9, 10_000)] == [0.9999] * 4


def test_tokenizer_lr_and_discriminator_horizon_follow_ta_titoks_schedulers():
    """Every update's factor equals TA-TiTok's LambdaLR at the tick accelerate has reached (processes ticks per
    update): the generator's from 0 at step 0; the discriminator's, stepped from --gan-start on, over its horizon
    steps x processes - gan_start ticks."""
    steps, warmup, gan_start, lr, min_lr = 100, 10, 40, 1e-4, 1e-5
    args = train_args("--stage", "tokenizer", "--out", "x", "--steps", steps, "--warmup", warmup, "--gan-start",
                      gan_start, "--lr", lr, "--min-lr", min_lr, "--w-gan", 0.1, "--disc-width", 32)
    train.fill_defaults(args, world=1)
    assert args.schedule == "cosine" and [train.lr_factor(k, args) for k in range(3)] == [0.0, 0.1, 0.2]
    for world in (1, 4, 32):
        for k in range(steps):
            want = _ta_titok_lambda(k * world, warmup * world, steps * world, lr, min_lr)
            assert train.lr_factor(k, args) == pytest.approx(want, abs=1e-12), (world, k)
        horizon = train.disc_horizon(args, world)
        for s in range(steps - gan_start):
            want = _ta_titok_lambda(s * world, warmup * world, steps * world - gan_start, lr, min_lr)
            assert train.lr_factor(s, args, steps=horizon) == pytest.approx(want, abs=1e-12), (world, s)
    assert (train.disc_horizon(args, 1), train.disc_horizon(args, 4)) == (60, 90)
    disc = train.Discriminator(args, torch.device("cpu"), 1, 0)          # the scheduler the trainer steps
    assert [disc.scheduler.lr_lambdas[0](s) for s in (0, 5, 30, 59)] == pytest.approx(
        [_ta_titok_lambda(s, warmup, steps - gan_start, lr, min_lr) for s in (0, 5, 30, 59)], abs=1e-12)
    args.stage = "flow"                                    # the flow stages keep their first update moving
    assert [train.lr_factor(k, args) for k in range(3)] == pytest.approx([0.1, 0.2, 0.3])


def test_size_filter_known_answers():
    """TA-TiTok's filter: height / width in [1/2, 2] (bounds included), then the longer side >= the minimum."""
    for (w, h), why in [((256, 128), None), ((128, 256), None), ((256, 512), None), ((512, 256), None),
                        ((256, 127), "filtered: aspect"), ((100, 300), "filtered: aspect"),
                        ((300, 40), "filtered: aspect"), ((200, 100), "filtered: small"),
                        ((255, 255), "filtered: small")]:
        if why is None:
            data.res_ratio_filter(w, h, 256)
        else:
            with pytest.raises(data.BadSample, match=why):
                data.res_ratio_filter(w, h, 256)


def test_size_filter_in_the_loaders_counts_what_it_drops(tmp_path):
    """A folder and a tar shard at image size 32 (longer side >= 32): the filter names its skips; off, it keeps
    them. In a tar, a json original_width / original_height decides (what TA-TiTok reads), else the image's."""
    sizes = {"keep": (40, 40), "wide": (80, 30), "tiny": (20, 30), "tall_ok": (20, 36)}
    for name, size in sizes.items():
        _noise_image(*size, 0).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(name)
    spec = f"folder:{tmp_path}"
    on, off = data.build_dataset(spec, 32, size_filter=True), data.build_dataset(spec, 32)
    got = {}
    for i in range(len(on)):
        try:
            got[on.captions[i]] = on.get(i)["image"].shape
        except data.BadSample as e:
            got[on.captions[i]] = e.reason
    assert got == {"keep": (3, 32, 32), "wide": "filtered: aspect", "tiny": "filtered: small", "tall_ok": (3, 32, 32)}
    assert all(off.get(i)["image"].shape == (3, 32, 32) for i in range(len(off)))
    batch = next(iter(data.make_loader(on, 4, rank=0, world=1)))
    assert batch["skipped"] == {"filtered: aspect": 1, "filtered: small": 1} and len(batch["ids"]) == 2
    square, wide = _jpeg_bytes(_noise_image(40, 40, 1)), _jpeg_bytes(_noise_image(80, 30, 2))
    _write_tar(tmp_path / "s-0.tar", [
        ("a.jpg", square), ("a.txt", b"recorded wide"), ("a.json", b'{"original_width": 900, "original_height": 300}'),
        ("b.jpg", square), ("b.txt", b"recorded small"), ("b.json", b'{"original_width": 20, "original_height": 20}'),
        ("c.jpg", wide), ("c.txt", b"recorded fine"), ("c.json", b'{"original_width": 512, "original_height": 512}'),
        ("d.jpg", wide), ("d.txt", b"no record"), ("d.json", b'{"original_width": "?"}'),
        ("e.jpg", square), ("e.txt", b"plain")])
    for filtered, want in ((True, {"filtered: aspect": 2, "filtered: small": 1}), (False, {})):
        source = data.build_dataset(f"tar:{tmp_path}/s-0.tar", 32, size_filter=filtered)
        stream = source.samples(seed=0, reader=0, readers=1, cursor=dict(epoch=0, shard=0, offset=0, seen=0))
        items = [item for item, _ in itertools.islice(stream, 5)]
        counts = collections.Counter(i.reason for i in items if isinstance(i, data.BadSample))
        kept = [i["caption"] for i in items if not isinstance(i, data.BadSample)]
        assert counts == want and kept == (["recorded fine", "plain"] if filtered else
                                           ["recorded wide", "recorded small", "recorded fine", "no record", "plain"])


def test_size_filter_is_on_for_the_tokenizer_stage_and_one_flag_away(tmp_path):
    for name, size in {"a": (40, 40), "b": (90, 30), "c": (36, 36)}.items():
        _noise_image(*size, 0).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"caption {name}")
    common = ("--data", f"folder:{tmp_path}", "--out", tmp_path / "run", "--global-batch", 2)
    for argv, on in ((("--stage", "tokenizer"), True), (("--stage", "tokenizer", "--no-size-filter"), False),
                     (("--stage", "flow"), False), (("--stage", "text-ae", "--size-filter"), True)):
        args = train_args(*argv, *common)
        train.fill_defaults(args, world=1)
        source, _ = train.build_data(args, 0, 1, torch.device("cpu"))
        assert args.size_filter is on and source.min_longer == (32 if on else None), argv
        # the previews pass over what the filter drops
        assert [s["caption"] for s in sample.first_samples(source)] == (
            ["caption a", "caption c"] if on else ["caption a", "caption b", "caption c"])


def test_training_loop_applies_warmup_ema_and_clipping(tmp_path):
    common = ("--stage", "tokenizer", "--tokenizer-preset", "tiny", "--clip-weights", "random", "--data",
              "shapes:n=64", "--global-batch", 4, "--weight-decay", 0, "--schedule", "constant", "--ema", 0.9,
              "--beta2", 0.99, "--ckpt-every", 1, "--keep", 5)
    run_train(*common, "--lr", 1e-3, "--warmup", 4, "--grad-clip", 0, "--steps", 2, "--out", tmp_path / "free")
    run_train(*common, "--lr", 1.0, "--warmup", 0, "--grad-clip", 1e-10, "--steps", 1, "--out", tmp_path / "clip")
    _, stage, _ = run_start(tmp_path / "free")
    init = flat(stage.parts["tokenizer"].state_dict())
    step = [torch.load(tmp_path / "free" / f"step_000000{k}.pt", weights_only=True) for k in (1, 2)]
    model = [flat(ck["model"]["tokenizer"]) for ck in step]
    ema = [flat(ck["ema"]["tokenizer"]) for ck in step]
    # the tokenizer's first update has lr 0 (TA-TiTok's LambdaLR): the weights stay; the second moves them
    assert torch.equal(model[0], init) and (model[1] - init).abs().max() > 1e-5
    assert [g["betas"] for g in step[0]["optimizer"]["param_groups"]] == [(0.9, 0.99)] * 2
    # the scheduler after k steps holds the lr of step k: lr * k / 4
    assert [ck["scheduler"]["_last_lr"][0] for ck in step] == pytest.approx([2.5e-4, 5e-4])
    # EMA with TA-TiTok's warm-up: decay 0 at the first update (the model), then min(0.9, 2 / 11)
    assert torch.equal(ema[0], model[0])
    torch.testing.assert_close(ema[1], 2 / 11 * ema[0] + 9 / 11 * model[1], atol=1e-7, rtol=0)
    # clipping to norm 1e-10 (<< Adam's eps 1e-8): the update is lr * g_clipped / eps, of L2 norm lr * 1e-10 / 1e-8
    clipped = flat(torch.load(tmp_path / "clip" / "last.pt", weights_only=True)["model"]["tokenizer"])
    assert (clipped - init).norm().item() == pytest.approx(0.01, rel=0.02)
    # the logged norm is the one before clipping: the same first batch and weights give the same norm
    norm = log_value(tmp_path / "free", 1, "grad_norm")
    assert norm > 1e-3 and log_value(tmp_path / "clip", 1, "grad_norm") == pytest.approx(norm, rel=1e-3)


def test_time_and_cfg_null_draws_follow_their_distributions(tiny_tokenizer, tmp_path):
    n = 4000
    noise = torch.randn(n, sum(train.STAGES["flow"].noise.values()), generator=torch.Generator().manual_seed(0))
    batch = {"noise": noise, "ids": torch.zeros(n, 77, dtype=torch.long), "clip": torch.zeros(n, 77, 1),
             "posterior": torch.zeros(n, 77, 32)}               # a cache batch: no encoder runs
    args = train_args(*flow_args(tiny_tokenizer, tmp_path / "run"))
    train.fill_defaults(args, 1)
    stage = train.STAGES["flow"].create(args, torch.device("cpu"))
    inputs = stage.prepare(batch, torch.device("cpu"))
    t, null = inputs["t"], inputs["null"]
    # t ~ logit-normal(0, 1): logit(t) is standard normal (Kolmogorov-Smirnov distance under its 1% bound)
    logit = (torch.log(t.double()) - torch.log1p(-t.double())).sort().values
    cdf = 0.5 * (1 + torch.erf(logit / math.sqrt(2)))
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max().item()
    assert ks < 1.63 / math.sqrt(n), ks
    assert 0 < t.min() and t.max() < 1 and abs(logit.mean().item()) < 0.05 and abs(logit.std().item() - 1) < 0.05
    # the CFG null draws: 10% of samples, independent of t
    assert null.float().mean().item() == pytest.approx(0.1, abs=0.015)
    assert null[t > 0.5].float().mean().item() == pytest.approx(0.1, abs=0.02)
    assert null[t < 0.3].float().mean().item() == pytest.approx(0.1, abs=0.025)
    args.cfg_prob = 0.3
    assert stage.prepare(batch, torch.device("cpu"))["null"].float().mean().item() == pytest.approx(0.3, abs=0.02)
    # the per-sample noise the loader draws is standard normal
    loader = data.make_loader(data.build_dataset("shapes:n=16", 32), 16, seed=0, noise_dim=noise.shape[1])
    x = next(iter(loader))["noise"].double().flatten().sort().values
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    m = len(x)
    assert torch.maximum(torch.arange(1, m + 1) / m - cdf, cdf - torch.arange(m) / m).max() < 1.63 / math.sqrt(m)


def test_caption_groups_give_equal_captions_equal_ids():
    ids, _ = projector.tokenize(["a red circle", "a blue square", "a red circle", "a red circle on the left", ""])
    groups = projector.caption_groups(ids).tolist()
    assert groups[0] == groups[2] and len(set(groups)) == 4


def test_gradient_accumulation_equals_the_doubled_micro_batch(tmp_path, monkeypatch):
    """The tokenizer's loss is a per-sample mean: 2 micro-batches of 4 must give the batch of 8's steps."""
    norms, real_clip = collections.defaultdict(list), torch.nn.utils.clip_grad_norm_
    run = [None]

    def recording(params, max_norm, *a, **k):
        norm = real_clip(params, max_norm, *a, **k)
        norms[run[0]].append(norm.item())
        return norm
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    common = ("--stage", "tokenizer", "--tokenizer-preset", "tiny", "--clip-weights", "random", "--data",
              "shapes:n=64", "--steps", 3, "--global-batch", 8, "--lr", 1e-3, "--warmup", 2, "--ema", 0.9,
              "--grad-clip", 1)
    for name, extra in (("accum", ("--batch-size", 4)), ("whole", ())):
        run[0] = name
        run_train(*common, *extra, "--out", tmp_path / name)
    assert "global batch 8 = 4 x 1 GPUs x 2 accumulation" in (tmp_path / "accum" / "log.txt").read_text()
    a = torch.load(tmp_path / "accum" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    for part in ("model", "ema"):
        diff = (flat(a[part]["tokenizer"]) - flat(b[part]["tokenizer"])).abs().max().item()
        assert diff < 1e-5, (part, diff)
    assert (flat(b["model"]["tokenizer"]) - flat(run_start(tmp_path / "whole")[1].parts["tokenizer"].state_dict())).abs(
        ).max() > 1e-4                                                          # it did train
    assert len(norms["accum"]) == 3 and norms["accum"] == pytest.approx(norms["whole"], rel=1e-5)
    for step in (1, 3):                                                         # the logged losses: means, not sums
        for key in ("loss", "mse", "kl"):
            assert log_value(tmp_path / "accum", step, key) == pytest.approx(log_value(tmp_path / "whole", step, key),
                                                                             rel=1e-3)


# ----------------------------------------------------------------------------- the official micro-batch (issue 13.1)

def test_flow_stages_default_to_the_official_micro_batch_of_128():
    """Without --batch-size the flow stages run 128 per process (FlowTok train_t2i.py:38-39 on 32 processes) and
    accumulate up to the global batch; a smaller share takes its largest divisor up to 128; other stages keep
    global / processes; an explicit --batch-size wins."""
    cases = [("flow", 4096, 8, None, 128, 4), ("flow", 4096, 1, None, 128, 32), ("flow", 4096, 32, None, 128, 1),
             ("flow", 8, 1, None, 8, 1), ("flow", 8, 2, None, 4, 1), ("flow", 200, 1, None, 100, 2),
             ("flow", 4096, 8, 64, 64, 8), ("flow-i2t", 1024, 2, None, 128, 4), ("text-ae", 1024, 1, None, 1024, 1),
             ("tokenizer", 256, 8, None, 32, 1)]
    for stage, global_batch, world, given, micro, accum in cases:
        argv = ["--stage", stage, "--out", "x", "--global-batch", str(global_batch)]
        args = train.build_parser().parse_args(argv + (["--batch-size", str(given)] if given else []))
        train.fill_defaults(args, world)
        assert (args.batch_size, args.accum) == (micro, accum), (stage, global_batch, world, given)


def test_expected_null_fraction_equals_the_cfg_shuffle_enumerated():
    """cfg_shuffle keeps a null draw only when another sample of its micro-batch is null too: the closed form
    against every draw of a batch of 5, and the known values at 128 and 8 (the training log quotes them)."""
    p, n = 0.3, 5
    want = 0.0
    for draws in itertools.product([False, True], repeat=n):
        null = torch.tensor(draws)
        _, kept = flow_dit.cfg_shuffle(torch.zeros(n, 1, 1), null)
        want += p ** int(null.sum()) * (1 - p) ** (n - int(null.sum())) * int(kept.sum()) / n
    assert flow_dit.expected_null_fraction(n, p) == pytest.approx(want, abs=1e-12)
    assert f"{flow_dit.expected_null_fraction(128, 0.1):.1%}" == "10.0%"
    assert f"{flow_dit.expected_null_fraction(8, 0.1):.1%}" == "5.2%" and flow_dit.expected_null_fraction(1, 0.1) == 0


def test_batch_note_says_how_the_loss_terms_differ_from_the_official_run():
    def note(world, *argv):
        args = train.build_parser().parse_args(["--stage", "flow", "--out", "x", *map(str, argv)])
        train.fill_defaults(args, world)
        run = runtime.Run(args, 0, world, 0, torch.device("cpu"))
        run.stage = train.FlowStage(args, {}, {})
        return train.batch_note(run)
    assert note(8) is None and note(1) is None                        # 128 per process: the official terms
    assert note(1, "--global-batch", 8) == (
        "note: micro-batch 8 per process, the official run's is 128 (4096 = 32 processes x 128; --batch-size sets "
        "it): the official KL term is summed over the micro-batch: 8/128 = 0.0625x the official weight relative to "
        "the flow loss; the contrastive softmax ranks each sample among 8 (official 128); the CFG shuffle (a "
        "micro-batch with one null draw trains none) leaves 5.2% of samples unconditional (official 10.0%)")
    assert note(8, "--gather-negatives") == ("note: micro-batch 128 per process, the official run's is 128 (4096 = 32 "
                                             "processes x 128; --batch-size sets it): the contrastive softmax ranks "
                                             "each sample among 1024 (official 128)")
    only_cfg = note(1, "--global-batch", 8, "--kl", "standard", "--w-con", 0)   # batch-mean KL, no contrastive term
    assert "KL" not in only_cfg and "contrastive" not in only_cfg and "5.2%" in only_cfg


def _official_per_gpu_loss(dit, proj, clip, x1, t, null, eps, w_con=1.0, w_kl=0.01, sigma_min=1e-5):
    """FlowTok's loss on one GPU's batch, written from its diffusion/flow_matching.py:237-277 (release 74d0461)."""
    B = clip.shape[0]
    x0, mu, log_var = proj(clip, eps)
    a = F.normalize(x0.reshape(B, -1), dim=-1)
    c = F.normalize(proj.align(clip).reshape(B, -1), dim=-1)
    scale, targets = proj.log_temperature.exp(), torch.arange(B)
    con = (F.cross_entropy(scale * a @ c.T, targets) + F.cross_entropy(scale * c @ a.T, targets)) * w_con / 2
    kld = -0.5 * torch.sum(1 + log_var - (0.3 * mu) ** 6 - log_var.exp()) * w_kl      # summed over this batch
    x1, null = x1.clone(), null.clone()
    if null.sum() <= 1:
        null[:] = False
    else:
        x1[null] = torch.cat((x1[null][1:], x1[null][:1]))
    tt = t[:, None, None]
    xt, target = (tt * (sigma_min - 1) + 1) * x0 + tt * x1, (sigma_min - 1) * x0 + x1
    diff = ((dit(xt, t, null) - target) ** 2).mean(dim=(1, 2))
    return (diff + con + kld).mean()


def _one_train_step_gradient(args, parts, batch, tmp_path):
    """The gradient train.py's step hands to the optimizer for `batch` (micro-batches and accumulation from args)."""
    run = runtime.Run(args, 0, 1, 0, torch.device("cpu"))
    run.stage = run.model = train.FlowStage(args, parts, {"tokenizer": Tokenizer.from_preset("tiny")})
    run.params = [p for p in run.stage.parameters() if p.requires_grad]
    run.ema = copy.deepcopy(run.stage.parts)
    grads = []

    class Recorder:
        def step(self):
            grads.append(torch.cat([p.grad.flatten() for p in run.params]))

        def zero_grad(self, set_to_none=True):
            for p in run.params:
                p.grad = None
    run.optimizer, run.scheduler = Recorder(), argparse.Namespace(step=lambda: None)
    micro = args.batch_size
    batches = iter([{k: v[i:i + micro] if torch.is_tensor(v) else v for k, v in batch.items()}
                    for i in range(0, len(batch["ids"]), micro)])
    train.update(run, *train.forward_backward(run, batches))
    return grads[0]


def test_accumulation_equals_the_official_per_gpu_computation(tmp_path):
    """One process, global batch 8 as 2 micro-batches of 4, gives the gradient of two official GPUs of 4 averaged
    (DDP): each with its own KL sum, its own 4 contrastive negatives and its own CFG shuffle. Null draws at 0, 2, 3
    (rotated within the first 4) and 5 (alone in the second 4: cleared). The same 8 as one batch differ."""
    g = torch.Generator().manual_seed(0)
    width, n = 32, 8
    noise = torch.randn(n, 2 * train.T + 2, generator=g)
    noise[:, -1] = torch.tensor([-5.0, 5, -5, -5, 5, -5, 5, 5])               # Phi(-5) < 0.1: drawn null
    batch = {"clip": torch.randn(n, 77, width, generator=g), "ids": torch.zeros(n, 77, dtype=torch.long),
             "posterior": torch.cat([torch.randn(n, 77, 16, generator=g), torch.full((n, 77, 16), -2.0)], -1),
             "noise": noise, "skipped": {}}
    torch.manual_seed(0)
    dit = FlowDiT(**FLOW_MODELS["tiny"])
    with torch.no_grad():                                    # off the zero init: every DiT weight gets a gradient
        for p in dit.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    proj = TextProjector(clip_dim=width, depth=1, heads=4, d_ff=64, dropout=0.0, align_hidden=32)
    parts = {"dit": dit, "projector": proj}
    argv = ("--stage", "flow", "--model", "tiny", "--out", tmp_path, "--global-batch", n, "--grad-clip", 0)
    args = train_args(*argv, "--batch-size", 4)
    train.fill_defaults(args, world=1)
    assert (args.batch_size, args.accum, args.w_kl, args.w_con) == (4, 2, 0.01, 1.0)
    ours = _one_train_step_gradient(args, parts, batch, tmp_path)
    # the official run: two GPUs of 4, DDP averaging their gradients
    stage = train.FlowStage(args, parts, {"tokenizer": Tokenizer.from_preset("tiny")})
    inputs = stage.prepare(batch, torch.device("cpu"))
    assert inputs["null"].tolist() == [True, False, True, True, False, True, False, False]
    params = [p for m in parts.values() for p in m.parameters()]
    for p in params:
        p.grad = None
    for half in (slice(0, 4), slice(4, 8)):
        loss = _official_per_gpu_loss(dit, proj, inputs["clip"][half], inputs["x1"][half], inputs["t"][half],
                                      inputs["null"][half], inputs["eps"][half])
        (loss / 2).backward()
    official = torch.cat([p.grad.flatten() for p in params])
    assert official.abs().max() > 0.1 and (official != 0).float().mean() > 0.95
    assert (ours - official).abs().max().item() < 1e-6
    # one batch of 8: the KL summed over 8, 8 negatives, one CFG shuffle over all four nulls: another gradient
    whole = train_args(*argv)
    train.fill_defaults(whole, world=1)
    assert (whole.batch_size, whole.accum) == (8, 1)
    assert (_one_train_step_gradient(whole, parts, batch, tmp_path) - official).abs().max().item() > 1e-2


def torchrun(*argv, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *map(str, argv)], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_two_process_ddp_matches_one_process(tmp_path):
    common = ("--stage", "tokenizer", "--tokenizer-preset", "tiny", "--clip-weights", "random", "--data",
              "shapes:n=64", "--steps", 3, "--global-batch", 8, "--lr", 1e-3, "--warmup", 1, "--flip")
    r = torchrun(REPO / "train.py", *TINY, *common, "--out", tmp_path / "ddp")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "global batch 8 = 4 x 2 GPUs" in r.stdout and "weights identical on all 2 ranks" in r.stdout
    torch.set_num_threads(1)
    try:
        run_train(*common, "--out", tmp_path / "one")
    finally:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    a = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)["model"]["tokenizer"]
    b = torch.load(tmp_path / "one" / "last.pt", weights_only=True)["model"]["tokenizer"]
    start = Tokenizer(**torch.load(tmp_path / "one" / "last.pt", weights_only=True)["config"]["tokenizer"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert max((b[k] - start.state_dict()[k]).abs().max().item() for k in b) > 1e-4   # it did train


def test_two_process_loader_sees_every_sample_once_per_epoch(tmp_path):
    script = tmp_path / "epoch.py"
    script.write_text(f"""
import sys, torch, torch.distributed as dist
sys.path.insert(0, {str(REPO)!r})
import data
dist.init_process_group("gloo")
source = data.build_dataset("shapes:n=24", image_size=16)
loader = iter(data.make_loader(source, batch_size=3, seed=5))
seen = torch.cat([next(loader)["index"] for _ in range(8)])          # 8 global batches of 6 = 2 epochs
parts = [torch.zeros_like(seen) for _ in range(2)]
dist.all_gather(parts, seen)
if dist.get_rank() == 0:
    torch.save(torch.stack(parts), {str(tmp_path / "seen.pt")!r})
dist.barrier()
dist.destroy_process_group()
""")
    r = torchrun(script)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = torch.load(tmp_path / "seen.pt")                             # (ranks, 24)
    for epoch in range(2):
        both = seen[:, epoch * 12:(epoch + 1) * 12].flatten()
        assert sorted(both.tolist()) == list(range(24))
    assert not set(seen[0].tolist()[:12]) & set(seen[1].tolist()[:12])


def test_two_process_flow_with_gathered_negatives(tiny_tokenizer, tmp_path):
    """With --gather-negatives, 2 processes x 4 train exactly as 1 process x 8: the contrastive loss sees all 8.

    Everything else is made per-sample (standard KL, no CFG draws, no dropout), so local negatives would differ.
    """
    same = ("--steps", 2, "--kl", "standard", "--cfg-prob", 0, "--projector-dropout", 0)
    r = torchrun(REPO / "train.py", *TINY, *flow_args(tiny_tokenizer, tmp_path / "g", *same, "--gather-negatives",
                                                       "--ckpt-every", 1))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("weights identical on all 2 ranks") == 2
    torch.set_num_threads(1)
    try:
        run_train(*flow_args(tiny_tokenizer, tmp_path / "one", *same))
    finally:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    two, one = (torch.load(tmp_path / run / "last.pt", weights_only=True) for run in ("g", "one"))
    for part in ("dit", "projector"):      # Adam turns float noise in the few zero gradients (a softmax's key bias)
        for kind in ("model", "ema"):      # into steps of up to lr * 0.1: look at all but those
            diff = (flat(two[kind][part]) - flat(one[kind][part])).abs()
            assert (diff > 1e-5).float().mean() < 1e-3 and diff.median() < 1e-7, (kind, part)
    # the contrastive loss is the one over all 8 samples (about log 8, not log 4), and so are the gradients
    for step in (1, 2):
        for key in ("contrastive", "grad_norm", "loss"):
            assert log_value(tmp_path / "g", step, key) == pytest.approx(log_value(tmp_path / "one", step, key),
                                                                         rel=1e-3)
    assert log_value(tmp_path / "g", 1, "contrastive") > 1.8

def two_ranks(tmp_path, *argvs, timeout=240):
    """`python ARGV` once per argv, as ranks 0, 1, ... of one group (torchrun's environment variables, without
    torchrun, which kills the other ranks when one fails first) -> [(returncode, stdout, stderr)] per rank.

    Each rank may get its own arguments: an --out of its own simulates a node-local disk. A hang fails the test.
    """
    with socket.socket() as s:                       # a free port for the group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, logs = [], []
    for rank, argv in enumerate(argvs):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", RANK=str(rank),
                   LOCAL_RANK=str(rank), WORLD_SIZE=str(len(argvs)), LOCAL_WORLD_SIZE=str(len(argvs)),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        logs.append((tmp_path / f"rank{rank}.{port}.out", tmp_path / f"rank{rank}.{port}.err"))
        with open(logs[-1][0], "w") as out, open(logs[-1][1], "w") as err:      # files: no pipe fills and blocks
            procs.append(subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO, env=env, stdout=out,
                                          stderr=err, text=True, start_new_session=True))
    deadline = time.time() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        pytest.fail(f"the ranks did not finish in {timeout} s (waiting for each other?): "
                    + " | ".join(err.read_text()[-1500:] for _, err in logs))
    return [(proc.returncode, out.read_text(), err.read_text()) for proc, (out, err) in zip(procs, logs)]


def test_ranks_with_different_out_contents_stop_together_or_resume_together(tmp_path):
    """Rank 0 alone decides what --resume continues and every rank reads that very file from its own --out: a rank
    whose --out (a node-local disk) lacks it or holds another copy stops every rank with the same line, instead of
    starting at step 0 alone (which hung the job); with one shared folder, all resume together."""
    run, empty, stale = tmp_path / "run", tmp_path / "empty", tmp_path / "stale"
    run_train(*TOKENIZER_RUN, "--out", run, "--steps", 2)    # one process; two resume it (map-style data regroups)
    empty.mkdir()
    stale.mkdir()
    (stale / "last.pt").write_bytes((run / "last.pt").read_bytes()[:-100])                 # an unfinished copy
    resume = [REPO / "train.py", *TINY, *TOKENIZER_RUN, "--steps", 3, "--resume", "--out"]
    shared = "--out must be on a filesystem all nodes share"
    for rank1_out, says in ((empty, f"rank 1 cannot read {empty / 'last.pt'} that rank 0 resumes from: {shared}"),
                            (stale, f"rank 1 cannot read {stale / 'last.pt'} that rank 0 resumes from (")):
        ranks = two_ranks(tmp_path, [*resume, run], [*resume, rank1_out])
        errors = [err.strip().splitlines()[-1] if err.strip() else "" for _, _, err in ranks]
        assert [rc for rc, _, _ in ranks] == [1, 1] and errors[0] == errors[1], errors
        assert errors[0].startswith("train.py: error: " + says) and shared in errors[0], errors[0]
        assert "Traceback" not in ranks[0][2] + ranks[1][2]
        assert torch.load(run / "last.pt", weights_only=True)["step"] == 2 and "resumed" not in (
            run / "log.txt").read_text()                                          # rank 0 did not train either
    # a new run into node-local folders stops at once: rank 1 does not see the lock that rank 0 holds
    new = [REPO / "train.py", *TINY, *TOKENIZER_RUN, "--steps", 1, "--out"]
    ranks = two_ranks(tmp_path, [*new, tmp_path / "node0"], [*new, tmp_path / "node1"])
    assert [rc for rc, _, _ in ranks] == [1, 1], ranks
    assert all(f"rank 1 does not see the lock file {tmp_path / 'node1' / '.lock'} that rank 0 holds: {shared}"
               in err for _, _, err in ranks)
    assert not (tmp_path / "node0" / "last.pt").exists() and not (tmp_path / "node0" / ".lock").exists()
    # one folder that every rank sees: both continue from step 2 and end at step 3 together
    ranks = two_ranks(tmp_path, [*resume, run], [*resume, run])
    assert [rc for rc, _, _ in ranks] == [0, 0], ranks[0][2][-2000:] + ranks[1][2][-2000:]
    assert f"resumed {run} at step 2" in ranks[0][1] and "weights identical on all 2 ranks" in ranks[0][1]
    assert torch.load(run / "last.pt", weights_only=True)["step"] == 3


SETUP_ONLY = """
import json, sys
sys.path.insert(0, {repo!r})
import runtime, train


class SetUp(Exception):
    pass


def report(run, batches):                                    # the first step: main's setup is complete
    print(json.dumps(dict(ema=runtime.weight_checksum(run.ema), model=runtime.weight_checksum(run.stage.parts))))
    raise SetUp


train.forward_backward = report
try:
    train.main(train.build_parser().parse_args(sys.argv[1:]))
except SetUp:
    pass
"""


def test_every_rank_holds_rank_0s_ema_after_setup(tmp_path):
    """Each rank draws its own random start (seed + rank); the EMA is copied after rank 0's weights reached every
    rank, so all EMAs are rank 0's (before, each rank's EMA held its own start); --init is read by rank 0 alone."""
    script = tmp_path / "setup_only.py"
    script.write_text(SETUP_ONLY.format(repo=str(REPO)))
    init = tmp_path / "init"
    run_train(*TOKENIZER_RUN, "--out", init, "--steps", 1, "--lr", 1e-2, "--warmup", 1)
    start = torch.load(init / "last.pt", weights_only=True)
    tok = Tokenizer(**start["config"]["tokenizer"])
    tok.load_state_dict(start["model"]["tokenizer"])
    for extra, want in (((), None), (("--init", init), runtime.weight_checksum(tok))):
        argv = [script, *TINY, *TOKENIZER_RUN, "--steps", 1, *extra, "--out", tmp_path / f"run{len(extra)}"]
        ranks = two_ranks(tmp_path, argv, argv)
        assert [rc for rc, _, _ in ranks] == [0, 0], ranks[0][2][-2000:] + ranks[1][2][-2000:]
        sums = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in ranks]
        assert sums[0]["ema"] == sums[1]["ema"] == sums[0]["model"] == sums[1]["model"], sums
        assert want is None or sums[0]["ema"] == pytest.approx(want, rel=1e-12), (sums, want)


DISK_FULL_ON_RANK_0 = """
import errno, os, sys
sys.path.insert(0, {repo!r})
import runtime, train
write = runtime._write_synced


def full(state, path):                                        # rank 0's disk fills up at the step-2 checkpoint
    if os.environ["RANK"] == "0" and state["step"] == 2:
        raise OSError(errno.ENOSPC, "No space left on device")
    write(state, path)


runtime._write_synced = full
sys.exit(runtime.run_cli("train.py", train.main, train.build_parser().parse_args(sys.argv[1:])))
"""


def test_a_write_failure_on_rank_0_stops_every_rank_with_its_line(tmp_path):
    """Rank 0 writes every file of a run; when a write fails there (a full disk), the other ranks stop with the same
    line at that point instead of running on into the next step's all-reduce (a hang, or a traceback)."""
    script = tmp_path / "disk_full.py"
    script.write_text(DISK_FULL_ON_RANK_0.format(repo=str(REPO)))
    out = tmp_path / "run"
    argv = [script, *TINY, *TOKENIZER_RUN, "--steps", 4, "--ckpt-every", 2, "--out", out]
    ranks = two_ranks(tmp_path, argv, argv)
    errors = [err.strip().splitlines()[-1] for _, _, err in ranks]
    assert [rc for rc, _, _ in ranks] == [1, 1] and errors[0] == errors[1], errors
    assert errors[0].startswith(f"train.py: error: the disk is full at {out}: cannot write the checkpoint "
                                f"{out / 'step_0000002.pt'}") and "continue with --resume" in errors[0]
    assert "Traceback" not in ranks[0][2] + ranks[1][2] and "step 3/" not in ranks[0][1] + ranks[1][1]


PERCEPTUAL_RANKS = """
import argparse, json, os, sys
import torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import projector, runtime, tokenizer
dist.init_process_group("gloo")
rank, lacking = dist.get_rank(), []                           # lacking: the ranks whose node has no weights


def load(folder):                                             # no network, no weights: only who has them matters
    if rank in lacking:
        raise OSError(f"could not download vgg16-397923af.pth on rank {{rank}} (URLError)")
    return torch.nn.Identity()


tokenizer.load_perceptual = load
results = []
for ranks, weights in json.loads(sys.argv[1]):               # every case in one process group: one launch
    lacking[:], said = [int(r) for r in ranks.split(",") if r], []
    try:
        net = tokenizer.perceptual_on_every_rank(weights, torch.device("cpu"), rank, dist.get_world_size(),
                                                 said.append)
        results.append(dict(net=net is not None, said=said))
    except runtime.UserError as e:
        results.append(dict(error=str(e)))
print(json.dumps(results))
dist.destroy_process_group()
"""


def test_missing_perceptual_weights_on_one_rank_stops_all_ranks(tmp_path):
    """The perceptual term is on every rank or on none: weights missing on another rank's node stop every rank with
    one message (before, that node silently trained without the term); none on rank 0 (auto): off everywhere."""
    script = tmp_path / "perceptual_ranks.py"
    script.write_text(PERCEPTUAL_RANKS.format(repo=str(REPO)))
    folder = str(tmp_path / "weights")
    cases = [("", "auto"), ("1", "auto"), ("1", folder), ("0", "auto"), ("0", folder)]   # (lacking ranks, weights)
    argv = [script, json.dumps(cases)]
    ranks = two_ranks(tmp_path, argv, argv)
    assert [rc for rc, _, _ in ranks] == [0, 0], ranks[0][2][-2000:] + ranks[1][2][-2000:]
    rank0, rank1 = (json.loads(out.strip().splitlines()[-1]) for _, out, _ in ranks)
    outcome = dict(zip(cases, zip(rank0, rank1)))

    assert outcome["", "auto"] == (dict(net=True, said=[]), dict(net=True, said=[]))
    for weights in ("auto", folder):
        first, second = outcome["1", weights]
        assert first == second and first["error"].startswith("rank 1 cannot load the perceptual weights that rank 0 "
                                                             "trains with (could not download"), first
    first, second = outcome["0", "auto"]             # rank 1 could load them, but rank 0 decides: off on both
    assert first["net"] is second["net"] is False and "Training WITHOUT the perceptual term" in first["said"][0]
    first, second = outcome["0", folder]                               # a folder given: no warning, an error
    assert first == second and first["error"].startswith(f"--perceptual-weights {folder}: could not")


# ==========================================================================================================
# sample.py and evaluate.py: command-line sampling, the evaluation protocols, CLIP score, the speed benchmark
# ==========================================================================================================

PROMPTS = ["a red circle on the left", "a blue square", "three small green triangles"]


def script(*argv, torchrun=False):
    """Start `python sample.py|evaluate.py ...` (or under torchrun, 2 CPU processes) in the repo; -> Popen."""
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun
           else [sys.executable])
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd + [str(a) for a in argv], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc):
    """Wait for a Popen -> (returncode, stdout, stderr)."""
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def pixels(path):
    return np.array(Image.open(path))


def in_process(argv, script=evaluate):
    """evaluate.main (or another script's main) on argv -> (result, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = script.main(script.build_parser().parse_args([str(a) for a in argv]))
    return result, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------------------------------------
# A tiny train.py-schema run written by hand: CLIP tower file, tokenizer checkpoint, flow checkpoint
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """-> {"flow", "tokenizer", "clip"} paths; the flow checkpoint's raw weights differ from its EMA weights."""
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    clip = CLIPTextEncoder("tiny", "random")
    save_file({k: v.contiguous() for k, v in clip.text.state_dict().items()}, root / "clip.safetensors")
    clip_cfg = {"tower": "tiny", "weights": str(root / "clip.safetensors")}
    tok = Tokenizer.from_preset("tiny", text_dim=64)
    with torch.no_grad():  # a decoder whose images depend visibly on the tokens (the official init barely does)
        for p in tok.decoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
        tok.decoder.conv_out.bias.fill_(0.5)
    tok_sd = tok.state_dict()
    torch.save({"stage": "tokenizer", "args": {}, "config": {"tokenizer": tok.config, "clip": clip_cfg}, "step": 0,
                "model": {"tokenizer": tok_sd}, "ema": {"tokenizer": tok_sd}}, root / "tokenizer.pt")
    dit, proj = FlowDiT(depth=1, width=32, heads=2), TextProjector(clip_dim=64, depth=1, heads=4, d_ff=64)
    with torch.no_grad():  # non-zero adaLN / output layers, so that the flow moves the tokens
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ema = {"dit": {k: v.clone() for k, v in dit.state_dict().items()}, "projector": proj.state_dict()}
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save({"stage": "flow", "args": {}, "step": 3,
                "config": {"clip": clip_cfg, "tokenizer": str(root / "tokenizer.pt"), "dit": dit.config,
                           "projector": proj.config},
                "model": {"dit": dit.state_dict(), "projector": proj.state_dict()}, "ema": ema}, root / "flow.pt")
    return {"flow": root / "flow.pt", "tokenizer": root / "tokenizer.pt", "clip": root / "clip.safetensors"}


TINY_OFFICIAL = dict(depth=2, width=64, heads=4)   # the fixture's DiT size


def write_official_dir(folder):
    """The official file layout (FlowTok-XL.pth, FlowTiTok_512.bin) holding the fixture's tiny official weights."""
    official = torch.load(TESTDATA / "official_tiny.pt", weights_only=True)
    folder.mkdir(exist_ok=True)
    torch.save(official["flowtok_state_dict"], folder / "FlowTok-XL.pth")
    torch.save(official["flowtitok_state_dict"], folder / "FlowTiTok_512.bin")
    return official


@pytest.fixture(scope="module")
def sample_runs(tiny_run, tmp_path_factory):
    """sample.py: torchrun x 2 (3 prompts x 2) and --official (tiny) as processes, while batch 1, batch 5 and
    --no-ema run in this process (sample.main, as the command line calls it)."""
    out = tmp_path_factory.mktemp("samples")
    common = ["--ckpt", tiny_run["flow"], *PROMPTS, "--n-per-prompt", "2", "--steps", "3", "--seed", "5",
              "--device", "cpu"]
    procs = {"ddp": script("sample.py", *common, "--batch-size", "2", "--out", out / "ddp", torchrun=True)}
    if TINY_OFFICIAL in flow_dit.FLOW_MODELS.values():  # --official on tiny official-layout files
        write_official_dir(out / "official_files")
        procs["official"] = script("sample.py", "--official", "FlowTok-XL", "--official-dir", out / "official_files",
                                   "--clip-weights", tiny_run["clip"], *PROMPTS[:2], "--steps", "2", "--device",
                                   "cpu", "--out", out / "official")
    runs = {name: (0, run_sample(*common, *extra, "--out", out / name), "")
            for name, extra in (("b1", ["--batch-size", "1"]), ("b5", ["--batch-size", "5"]), ("raw", ["--no-ema"]))}
    runs.update({name: finish(p) for name, p in procs.items()})
    return out, runs


NAMES = [f"{i:05d}_{j:02d}.png" for i in range(3) for j in range(2)]


def test_sample_cli_writes_named_samples_grid_and_prompts(sample_runs):
    out, runs = sample_runs
    rc, stdout, stderr = runs["b1"]
    assert rc == 0, stderr
    assert sorted(f for f in os.listdir(out / "b1") if f[0].isdigit()) == NAMES
    assert f"wrote 6 samples (3 prompts x 2) to {out / 'b1'}" in stdout and str(out / "b1" / "grid.png") in stdout
    assert pixels(out / "b1" / NAMES[0]).shape == (32, 32, 3)
    # one row per prompt (n-per-prompt 2): 2 columns x 3 rows of 32 px with 2 px padding
    grid = pixels(out / "b1" / "grid.png")
    assert grid.shape == (3 * 34 + 2, 2 * 34 + 2, 3)
    np.testing.assert_array_equal(grid[36:68, 36:68], pixels(out / "b1" / "00001_01.png"))
    assert (out / "b1" / "prompts.txt").read_text().splitlines() == PROMPTS
    assert len({pixels(out / "b1" / n).tobytes() for n in NAMES}) == 6      # every sample its own noise


def test_sample_cli_same_seed_same_pngs_for_any_batch_size(sample_runs):
    out, runs = sample_runs
    assert runs["b5"][0] == 0, runs["b5"][2]
    for name in NAMES:
        np.testing.assert_array_equal(pixels(out / "b1" / name), pixels(out / "b5" / name))


def test_sample_cli_no_ema_uses_the_raw_weights(sample_runs):
    out, runs = sample_runs
    assert runs["raw"][0] == 0, runs["raw"][2]
    assert all(not np.array_equal(pixels(out / "b1" / n), pixels(out / "raw" / n)) for n in NAMES)


def test_sample_torchrun_two_processes_cover_every_sample_once(sample_runs):
    out, runs = sample_runs
    rc, stdout, stderr = runs["ddp"]
    assert rc == 0, stderr
    assert stdout.count("wrote 6 samples") == 1                             # rank 0 reports, once
    assert sorted(f for f in os.listdir(out / "ddp") if f[0].isdigit()) == NAMES
    for name in NAMES:                                                      # same images as one process
        np.testing.assert_array_equal(pixels(out / "b1" / name), pixels(out / "ddp" / name))


def test_sample_ranks_that_write_to_node_local_folders_stop_with_one_line(tiny_run, tmp_path):
    """Rank 0 builds grid.png from the files every rank wrote: an --out that is another folder on rank 1 (a node's
    local disk) is a one-line error naming the shared filesystem, not a traceback; a checkpoint one rank lacks stops
    both ranks with the same line before anyone generates."""
    def argv(ckpt, out):
        return ["sample.py", "--ckpt", ckpt, *PROMPTS, "--steps", 2, "--device", "cpu", "--out", out]
    ranks = two_ranks(tmp_path, argv(tiny_run["flow"], tmp_path / "node0"), argv(tiny_run["flow"], tmp_path / "node1"))
    assert [rc for rc, _, _ in ranks] == [1, 0], ranks
    assert ranks[0][2].strip().splitlines()[-1] == (
        f"sample.py: error: rank 0 does not see 1 of the 3 files the ranks wrote (e.g. {tmp_path / 'node0'}"
        f"/00001_00.png): with several nodes, --out must be on a filesystem all nodes share")
    ranks = two_ranks(tmp_path, argv(tiny_run["flow"], tmp_path / "a"), argv(tmp_path / "none.pt", tmp_path / "a"))
    errors = [err.strip().splitlines()[-1] for _, _, err in ranks]
    assert [rc for rc, _, _ in ranks] == [1, 1] and errors[0] == errors[1], errors
    assert errors[0].startswith("sample.py: error: rank 1: no checkpoint at") and "none.pt" in errors[0], errors
    assert not list((tmp_path / "a").glob("*.png"))


class RecordingPipe:
    """A stand-in pipeline: records the prompts it generates, returns flat images of value 20 x the prompt."""

    def __init__(self, model="model-a"):
        self.seen, self.model, self.compiled = [], model, False

    def identity(self):
        return self.model

    def generate(self, prompts, steps, cfg, eps=None):
        self.seen += prompts
        return torch.stack([torch.full((3, 4, 4), int(p) * 20 / 255) for p in prompts])


def test_generate_folder_ranks_partition_the_jobs_and_resume(tmp_path):
    prompts = [str(i) for i in range(4)]
    made, pipes = [], []
    for rank in range(3):  # 3 ranks, 4 prompts x 2 samples = 8 jobs
        pipes.append(RecordingPipe())
        made.append(sample.generate_folder(pipes[-1], prompts, str(tmp_path), 2, batch_size=2, rank=rank, world=3))
    assert [m for m, _, _ in made] == [3, 3, 2] and sum(len(p.seen) for p in pipes) == 8
    assert sorted(os.listdir(tmp_path)) == [f"{i:05d}_{j:02d}.png" for i in range(4) for j in range(2)]
    assert pixels(tmp_path / "00003_01.png")[0, 0, 0] == 60
    os.remove(tmp_path / "00002_00.png")
    again = RecordingPipe()
    assert sample.generate_folder(again, prompts, str(tmp_path), 2, skip_existing=True) == (1, 7, 0)
    assert again.seen == ["2"] and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def run_sample(*argv):
    """sample.main on argv in this process -> stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sample.main(sample.build_parser().parse_args([str(a) for a in argv]))
    return out.getvalue()


def test_export_samples_like_the_run_and_loads_from_a_hub_cache(sample_runs, tiny_run, tmp_path, monkeypatch):
    """sample.py --export DIR: DIR as --ckpt gives the run's PNGs bitwise (fp32), a bf16 export is half the size and
    close; hf:OWNER/NAME resolves through a Hugging Face cache laid out as huggingface_hub lays it (offline)."""
    out, runs = sample_runs
    export = tmp_path / "export"
    assert "exported to" in run_sample("--ckpt", tiny_run["flow"], "--export", export, "--device", "cpu")
    config = json.loads((export / "config.json").read_text())
    assert config["format"] == "flowtok-export" and set(config["parts"]) == {"projector", "dit", "tokenizer"}
    assert config["clip"]["tower"] == "tiny" and config["source"]["step"] == 3
    common = [*PROMPTS, "--n-per-prompt", "2", "--steps", "3", "--seed", "5", "--device", "cpu"]
    run_sample("--ckpt", export, *common, "--out", tmp_path / "from_export")
    for name in NAMES:
        np.testing.assert_array_equal(pixels(tmp_path / "from_export" / name), pixels(out / "b1" / name))
    # the same weights: the run's images count as made by the export (--skip-existing reuses them)
    shutil.copytree(out / "b1", tmp_path / "b1")
    assert "reused 6, regenerated 0" in run_sample("--ckpt", export, *common, "--out", tmp_path / "b1",
                                                   "--skip-existing")
    # bf16: parameters halved, buffers (RoPE tables, position tables) kept in fp32
    half = tmp_path / "half"
    run_sample("--ckpt", tiny_run["flow"], "--export", half, "--export-dtype", "bf16", "--device", "cpu")
    from safetensors.torch import load_file
    full_t, half_t = load_file(export / "model.safetensors"), load_file(half / "model.safetensors")
    pipe = sample.load_export(export)
    params = {f"{n}.{k}" for n in ("projector", "dit", "tokenizer") for k, _ in getattr(pipe, n).named_parameters()}
    params |= {f"clip.{k}" for k, _ in pipe.clip.text.named_parameters()}
    assert {k for k, v in half_t.items() if v.dtype == torch.bfloat16} == params and set(half_t) == set(full_t)
    assert all(half_t[k].equal(full_t[k]) for k in half_t if k not in params) and len(half_t) > len(params)
    assert (half / "model.safetensors").stat().st_size < 0.6 * (export / "model.safetensors").stat().st_size
    # hf:OWNER/NAME[@REVISION] from a local Hub cache (models--OWNER--NAME/refs, snapshots/<commit>/files)
    import huggingface_hub.constants as hub
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--flowtok-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(export, repo / "snapshots" / commit)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    for spec in ("hf:someone/flowtok-tiny", f"hf:someone/flowtok-tiny@{commit}"):
        run_sample("--ckpt", spec, *common, "--out", tmp_path / "hub_out")
        np.testing.assert_array_equal(pixels(tmp_path / "hub_out" / NAMES[0]), pixels(out / "b1" / NAMES[0]))
    with pytest.raises(UserError, match=r"hf:someone/missing: not in the Hugging Face cache .*huggingface-cli "
                                        r"download someone/missing --local-dir DIR"):
        run_sample("--ckpt", "hf:someone/missing", "a", "--device", "cpu", "--out", tmp_path / "none")


def test_a_damaged_or_hostile_export_is_one_line_and_an_export_never_overwrites(tiny_run, tmp_path):
    export = tmp_path / "export"
    run_sample("--ckpt", tiny_run["flow"], "--export", export, "--device", "cpu")
    weights, config = export / "model.safetensors", json.loads((export / "config.json").read_text())
    assert config["model_sha256"] == runtime.file_sha256(weights)
    assert stat.S_IMODE(os.stat(weights).st_mode) == 0o666 & ~current_umask()          # 0644, not 0600
    blob = weights.read_bytes()
    with pytest.raises(UserError, match=f"--export {export} exists and is not an empty folder"):
        run_sample("--ckpt", tiny_run["flow"], "--export", export, "--device", "cpu")
    assert weights.read_bytes() == blob
    (tmp_path / "file").write_text("x")                                  # a write that fails: one line
    with pytest.raises(UserError, match=r"cannot write .*file/sub \(Not a directory.*\); nothing was exported"):
        run_sample("--ckpt", tiny_run["flow"], "--export", tmp_path / "file" / "sub", "--device", "cpu")

    def refused(change, match, payload=None):
        folder = tmp_path / f"bad{len(list(tmp_path.glob('bad*')))}"
        shutil.copytree(export, folder)
        cfg = copy.deepcopy(config)
        change(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
        if payload is not None:
            (folder / "model.safetensors").write_bytes(payload)
        with pytest.raises(UserError, match=match) as err:
            sample.load_pipeline(folder)
        assert "\n" not in str(err.value)
    refused(lambda c: c["parts"]["dit"].update(depth=10 ** 9), r"parts.dit.depth is 1000000000, outside 0..256")
    depth = config["parts"]["dit"]["depth"]
    refused(lambda c: c["parts"]["dit"].update(depth=depth + 1), rf"part 'dit' does not fit .*blocks.{depth}.* missing")
    refused(lambda c: c.update(parts=list(c["parts"])), r'"parts" is not an object naming a tokenizer')
    refused(lambda c: c.pop("dtype"), r'"dtype" is None, not one of fp32, bf16, fp16; not an export sample.py')
    refused(lambda c: c["parts"].pop("tokenizer"), r'"parts" is not an object naming a tokenizer')
    refused(lambda c: None, r"model.safetensors is not the file .*config.json records .*damaged or replaced",
            blob[:-100])
    refused(lambda c: c.pop("model_sha256"), r"model.safetensors: unreadable \(", blob[:-100])
    from safetensors.torch import load_file, save_file
    tensors = load_file(weights)
    tensors["dit.final_layer.linear.bias"] = torch.full_like(tensors["dit.final_layer.linear.bias"], float("nan"))
    save_file(tensors, tmp_path / "nan.safetensors", metadata={"format": sample.EXPORT_FORMAT})
    refused(lambda c: c.pop("model_sha256"), r"dit.final_layer.linear.bias holds NaN or infinite values",
            (tmp_path / "nan.safetensors").read_bytes())
    shutil.copytree(export, tmp_path / "nosource")              # optional fields may be absent
    (tmp_path / "nosource" / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "source"}))
    assert sample.load_pipeline(tmp_path / "nosource").info["step"] is None


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_skip_existing_regenerates_images_of_a_changed_prompt_or_seed(tiny_run, tmp_path):
    prompts, out = ["1", "2", "3"], str(tmp_path / "g")
    os.mkdir(out)
    first = RecordingPipe()
    assert sample.generate_folder(first, prompts, out, 1, seed=0, steps=2, cfg=2.0) == (3, 0, 0)
    names = [f"{i:05d}_00.png" for i in range(3)]
    records = [sample.read_record(tmp_path / "g" / n) for n in names]
    assert records == [sample.sample_record(p, i, 0, 0, 2, 2.0, "model-a") for i, p in enumerate(prompts)]
    assert len(set(records)) == 3 and all(len(r) == 64 for r in records)

    def rerun(prompts, seed=0, steps=2, cfg=2.0, model="model-a"):
        pipe = RecordingPipe(model)
        counts = sample.generate_folder(pipe, prompts, out, 1, seed=seed, steps=steps, cfg=cfg, skip_existing=True)
        return counts, pipe.seen
    assert rerun(prompts) == ((0, 3, 0), [])                               # same everything: all reused
    assert rerun(["1", "4", "3"]) == ((1, 2, 1), ["4"])                    # a changed prompt: that image only
    assert pixels(tmp_path / "g" / names[1])[0, 0, 0] == 80
    assert rerun(["1", "4", "3"], seed=1) == ((3, 0, 3), ["1", "4", "3"])  # another seed: every image
    assert rerun(["1", "4", "3"], seed=1, steps=3)[0] == (3, 0, 3)         # other settings or model: every image
    assert rerun(["1", "4", "3"], seed=1, steps=3, cfg=1.5)[0] == (3, 0, 3)
    assert rerun(["1", "4", "3"], seed=1, steps=3, cfg=1.5, model="model-b")[0] == (3, 0, 3)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "g" / names[2])   # an image with no record
    assert rerun(["1", "4", "3"], seed=1, steps=3, cfg=1.5, model="model-b") == ((1, 2, 1), ["3"])
    # the CLI: the record holds the model's weights, and the summary says what was reused and regenerated
    common = ["--ckpt", tiny_run["flow"], "--steps", "2", "--device", "cpu", "--out", tmp_path / "cli"]
    run_sample(*common, *PROMPTS[:2])
    stamp = os.path.getmtime(tmp_path / "cli" / names[0])
    text = run_sample(*common, PROMPTS[0], "a green diamond", "--skip-existing")
    assert "reused 1, regenerated 1" in text and "new 0" in text
    assert os.path.getmtime(tmp_path / "cli" / names[0]) == stamp
    text = run_sample(*common, PROMPTS[0], "a green diamond", "--skip-existing", "--no-ema")   # other weights
    assert "reused 0, regenerated 2" in text
    assert "sampler euler, 2 steps: 2 network passes (NFE) per image" in text
    text = run_sample(*common, PROMPTS[0], "a green diamond", "--skip-existing", "--no-ema", "--sampler", "heun",
                      "--time-shift", 2)                                          # another solver: other images
    assert "reused 0, regenerated 2" in text and "sampler heun, 2 steps: 4 network passes (NFE)" in text
    again = run_sample(*common, PROMPTS[0], "a green diamond", "--skip-existing", "--no-ema", "--sampler", "heun",
                       "--time-shift", 2)
    assert "reused 2, regenerated 0" in again
    text = run_sample(*common, PROMPTS[0], "a green diamond", "--skip-existing", "--no-ema")   # euler again
    # a PNG cut short after its record (a disk that lost its tail) is regenerated, not reused and then unreadable
    png = tmp_path / "cli" / names[0]
    png.write_bytes(png.read_bytes()[:-40])
    assert sample.read_record(png) is not None and sample.read_record(png, whole=True) is None
    (tmp_path / "cli" / f"{names[0]}.12345.tmp").write_bytes(b"half")      # what a killed sampler leaves
    text = run_sample(*common, PROMPTS[0], "a green diamond", "--skip-existing", "--no-ema")
    assert "reused 1, regenerated 1" in text and not list((tmp_path / "cli").glob("*.tmp"))
    with runtime.RunLock(str(tmp_path / "cli")):                          # two samplers on one folder
        with pytest.raises(UserError, match=f"{tmp_path / 'cli'} is in use by pid {os.getpid()}"):
            run_sample(*common, PROMPTS[0])


def test_sample_cli_bad_inputs_are_one_line_errors(tiny_run, tmp_path):
    regular = tmp_path / "file"
    regular.write_text("x")
    (tmp_path / "blank.txt").write_text("\n  \n")
    flow = tiny_run["flow"]
    cases = {  # argv -> what the one line must say
        ("--ckpt", tiny_run["tokenizer"], "a"): ["'tokenizer' checkpoint", "needs a 'flow'"],
        ("--ckpt", tmp_path / "missing.pt", "a"): ["no checkpoint at"],
        ("--ckpt", flow, "--prompts", tmp_path / "blank.txt"): ["no prompts"],
        ("--ckpt", flow, "a", "--out", regular / "sub"): ["not writable"],
        ("a", "b"): ["give --ckpt"],
        ("--official", "FlowTok-XL", "--official-dir", tmp_path, "a"):   # says which files and where from
            ["missing", "FlowTok-XL.pth, FlowTiTok_512.bin", "huggingface.co/turkeyju/FlowTok", "--official-dir"],
    }
    procs = {argv: script("sample.py", *argv, *([] if "--out" in argv else ["--out", tmp_path / f"o{k}"]))
             for k, argv in enumerate(cases)}          # each its own --out: one sampler per folder
    for argv, proc in procs.items():
        rc, _, stderr = finish(proc)
        lines = stderr.strip().splitlines()
        assert rc != 0 and "Traceback" not in stderr and len(lines) == 1, (argv, stderr)
        assert lines[0].startswith("sample.py: error:"), (argv, lines[0])
        assert all(want in lines[0] for want in cases[argv]), (argv, lines[0])


def test_official_pipeline_from_a_local_folder(tiny_run, tmp_path, monkeypatch):
    official = write_official_dir(tmp_path)
    kwargs = dict(official_dir=str(tmp_path), clip_weights=str(tiny_run["clip"]))
    sizes = {k: v for k, v in flow_dit.FLOW_MODELS.items() if v != TINY_OFFICIAL}
    monkeypatch.setattr(flow_dit, "FLOW_MODELS", sizes)                 # the table without the tiny size
    with pytest.raises(UserError, match="matches no size"):
        sample.load_official_pipeline("FlowTok-XL", **kwargs)
    monkeypatch.setattr(flow_dit, "FLOW_MODELS", {**sizes, "tiny": TINY_OFFICIAL})
    pipe = sample.load_official_pipeline("FlowTok-XL", **kwargs)       # the 64-d projector picks the tiny tower
    assert pipe.info["weights"] == "released" and pipe.dit.config["depth"] == 2 and pipe.clip.tower == "tiny"
    with torch.no_grad():  # the loaded DiT and tokenizer reproduce the official code's outputs
        x1 = euler_sample(pipe.dit, official["sampler_xT"], steps=5, cfg=2.0)
        torch.testing.assert_close(x1, official["sampler_out"], atol=1e-5, rtol=0)
        torch.testing.assert_close(pipe.tokenizer.decode_flow_tokens(x1, official["cond"]), official["pipe_img"],
                                   atol=1e-5, rtol=0)
    eps = torch.stack([sample.sample_noise(i, 0, 0) for i in range(2)])
    images = pipe.generate(PROMPTS[:2], steps=2, cfg=2.0, eps=eps)
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    with pytest.raises(UserError, match="expects 64-d text features"):
        sample.load_official_pipeline("FlowTok-XL", official_dir=str(tmp_path), clip_tower="demo")  # 128-d


def test_sample_cli_official_from_a_local_folder(sample_runs, tiny_run):
    out, runs = sample_runs
    if "official" not in runs:
        pytest.skip("flow_dit.FLOW_MODELS has no size for the fixture's tiny official DiT (64 wide, depth 2)")
    rc, stdout, stderr = runs["official"]
    assert rc == 0, stderr
    assert sorted(f for f in os.listdir(out / "official") if f[0].isdigit()) == ["00000_00.png", "00001_00.png"]
    # the PNGs are the official pipeline's images (the weights of the folder, 2 steps, CFG 2, seed 0's noise),
    # which test_official_pipeline_from_a_local_folder checks against the official code
    pipe = sample.load_official_pipeline("FlowTok-XL", official_dir=str(out / "official_files"),
                                         clip_weights=str(tiny_run["clip"]))
    eps = torch.stack([sample.sample_noise(i, 0, 0) for i in range(2)])
    want = sample.to_uint8(pipe.generate(PROMPTS[:2], steps=2, cfg=2.0, eps=eps)).astype(int)
    got = np.stack([pixels(out / "official" / f"0000{i}_00.png") for i in range(2)]).astype(int)
    assert np.abs(got - want).max() <= 1 and (got == want).mean() > 0.99   # 1 thread there, 2 here: rounding
    assert not np.array_equal(got[0], got[1])


# ----------------------------------------------------------------------------------------------------------
# evaluate.py: protocols on a tiny fake COCO / MJHQ, CLIP score, speed benchmark
# ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A fake COCO (3 images of mixed sizes, 3 captions each), a fake MJHQ (3 images, 2 categories) and random
    FID-Inception weights in the release file's key layout (no download)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    (root / "val2014").mkdir()
    images, anns = [], []
    for k in range(3):
        name = f"COCO_val2014_{k:012d}.jpg"
        Image.fromarray(rng.integers(0, 256, (30 + 7 * k, 40, 3), dtype=np.uint8)).save(root / "val2014" / name)
        images.append({"id": 100 + k, "file_name": name})
        anns += [{"id": 1000 + 10 * k + c, "image_id": 100 + k, "caption": f" image {k}\ncaption {c} "}
                 for c in range(3)]
    name = "COCO_val2014_000000000009.jpg"      # listed, never captioned: in --coco-reference all only
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "val2014" / name)
    images.append({"id": 109, "file_name": name})
    (root / "captions.json").write_text(json.dumps({"images": images, "annotations": anns}))
    meta = {}
    for k in range(3):
        category = ("people", "animals")[k % 2]
        (root / "mjhq" / category).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / "mjhq" / category / f"m{k}.jpg")
        meta[f"m{k}"] = {"category": category, "prompt": f"a {category} photo number {k}"}
    (root / "meta_data.json").write_text(json.dumps(meta))
    torch.manual_seed(0)
    net = evaluate.InceptionV3()
    with torch.no_grad():  # activations that stay O(1) through the ~100 layers
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
    torch.save(net.state_dict(), root / "inception.pth")
    return root


@pytest.fixture
def frechet_spy(monkeypatch):
    """Record the statistics the protocols compare; the distance on 16 dimensions (a 2048-d sqrtm costs ~1 min)."""
    calls, real = [], evaluate.frechet_distance

    def spy(mu1, sigma1, mu2, sigma2):
        calls.append((mu1, sigma1, mu2, sigma2))
        return real(mu1[:16], sigma1[:16, :16], mu2[:16], sigma2[:16, :16])
    monkeypatch.setattr(evaluate, "frechet_distance", spy)
    return calls


def protocol_args(tiny_run, corpus, out, *extra):
    return ["--ckpt", tiny_run["flow"], "--out", out, "--steps", "2", "--batch-size", "2", "--device", "cpu",
            "--inception-weights", corpus / "inception.pth", "--num-workers", "0", *extra]


def test_coco30k_smoke_run_block_warning_reuse_and_reference(tiny_run, corpus, frechet_spy, tmp_path):
    out = tmp_path / "coco"
    args = ["coco30k", "--coco-captions", corpus / "captions.json", "--coco-images", corpus / "val2014",
            *protocol_args(tiny_run, corpus, out, "--limit", "2")]
    fid, stdout, stderr = in_process(args)
    for line in ["protocol        COCO-30K", "pytorch-fid InceptionV3", "shorter side to 256 + centre crop",
                 "samples         2 (protocol: 30000), --limit 2", "seed            0", "2 Euler steps, cfg 2.0",
                 "precision fp32", f"weights         EMA ({tiny_run['flow']}, step 3)", "3 images ->"]:
        assert line in stdout, line
    assert "warning: 2 samples < the protocol's 30000" in stderr
    assert sorted(os.listdir(out / "samples")) == [f"{i:05d}_00.png" for i in range(2)]
    # one caption per distinct image, whitespace cleaned, in the seeded order; a --limit run is a prefix
    draw = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert len({d["id"] for d in draw}) == 2 and all(d["prompt"].startswith("image ") for d in draw)
    assert [d["prompt"] for d in draw] == (out / "prompts.txt").read_text().splitlines()
    full, _ = evaluate.coco_draw(corpus / "captions.json", None, seed=0)
    assert [d["prompt"] for d in full[:2]] == [d["prompt"] for d in draw] and len(full) == 3
    assert [d["prompt"] for d in evaluate.coco_draw(corpus / "captions.json", None, seed=1)[0]] != \
        [d["prompt"] for d in full]
    # the FID compares the saved reference statistics of all 3 val images with the statistics of the 2 samples
    (mu_r, sigma_r, mu_f, _), = frechet_spy
    assert "reference       the 3 drawn images (seed 0; --coco-reference)" in stdout
    with np.load(out / "ref_coco30k-drawn-seed0_crop256+bilinear.npz") as ref:
        assert int(ref["n"]) == 3 and str(ref["resize"]) == "crop256+bilinear"
        np.testing.assert_array_equal(ref["mu"], mu_r)
    drawn = evaluate.files_stats([corpus / "val2014" / d["file"] for d in full], net_for_ref(corpus), "bilinear",
                                 size=256)
    np.testing.assert_allclose(drawn.mu, mu_r, rtol=1e-5, atol=1e-6)
    net = evaluate.load_inception(str(corpus / "inception.pth"))
    files = [out / "samples" / f"{i:05d}_00.png" for i in range(2)]
    mine = evaluate.files_stats(files, net, "bilinear", size=256)
    np.testing.assert_allclose(mine.mu, mu_f, rtol=1e-5, atol=1e-6)
    assert json.loads((out / "results.json").read_text())["fid"] == fid and f"FID: {fid:.4f}" in stdout
    # a rerun reuses every sample and the saved reference; other sampling settings are refused
    stamp = os.path.getmtime(files[0])
    fid2, stdout2, stderr2 = in_process(args)
    assert "generated 0, reused 2" in stdout2 and "wrote the reference" not in stdout2 and fid2 == fid
    assert os.path.getmtime(files[0]) == stamp
    with pytest.raises(UserError, match=r"other settings \(steps 2 -> 3\)"):
        in_process([*args, "--steps", "3"])
    # --coco-reference all: every image the captions file lists (the uncaptioned one too), its own statistics file
    _, stdout3, _ = in_process([*args, "--coco-reference", "all"])
    assert "all 4 images of the captions file" in stdout3 and "generated 0, reused 2" in stdout3
    with np.load(out / "ref_coco30k-all_crop256+bilinear.npz") as ref:
        assert int(ref["n"]) == 4
    assert json.loads((out / "results.json").read_text())["reference_set"].startswith("all 4 images")


def net_for_ref(corpus):
    return evaluate.load_inception(str(corpus / "inception.pth"))


def test_pipeline_decodes_in_fp32_unless_asked(tiny_run):
    """As the official decode_tokens (no autocast): a bf16 pipeline still decodes in fp32 unless asked for bf16."""
    pipe = sample.load_pipeline(tiny_run["flow"], precision="bf16")
    seen, decode = [], pipe.tokenizer.decode_flow_tokens

    def spy(x1, text):
        out = decode(x1, text)
        seen.append((x1.dtype, out.dtype))
        return out
    pipe.tokenizer.decode_flow_tokens = spy
    eps = torch.randn(2, 77, 16, generator=torch.Generator().manual_seed(0))
    fp32 = pipe.generate(["a", "b"], steps=2, eps=eps)
    pipe.decode_precision = "bf16"
    bf16 = pipe.generate(["a", "b"], steps=2, eps=eps)
    assert seen == [(torch.float32, torch.float32), (torch.float32, torch.bfloat16)]
    assert 0 < (fp32 - bf16).abs().max() < 0.1


def test_mjhq30k_smoke_run(tiny_run, corpus, frechet_spy, tmp_path):
    out = tmp_path / "mjhq"
    fid, stdout, stderr = in_process(["mjhq30k", "--mjhq-meta", corpus / "meta_data.json", "--mjhq-images",
                                      corpus / "mjhq", *protocol_args(tiny_run, corpus, out, "--limit", "2")])
    for line in ["protocol        MJHQ-30K", "native resolution, then PIL bicubic on float32 (clean-fid's 'clean')",
                 "samples         2 (protocol: 30000)", "seed            0", "cfg 2.0", "precision fp32", "EMA",
                 "3 images ->"]:
        assert line in stdout, line
    assert "warning: 2 samples < the protocol's 30000" in stderr and np.isfinite(fid)
    assert sorted(os.listdir(out / "samples")) == ["00000_00.png", "00001_00.png"]
    (mu_r, _, mu_f, _), = frechet_spy
    with np.load(out / "ref_mjhq30k_clean.npz") as ref:   # all 3 images of the category folders
        assert int(ref["n"]) == 3 and str(ref["resize"]) == "clean"
        np.testing.assert_array_equal(ref["mu"], mu_r)
    assert not np.allclose(mu_r, mu_f)
    # no images and no statistics: a one-line error before anything is generated
    with pytest.raises(UserError, match="no reference"):
        in_process(["mjhq30k", "--mjhq-meta", corpus / "meta_data.json",
                    *protocol_args(tiny_run, corpus, tmp_path / "none")])
    assert not (tmp_path / "none").exists()


def test_clean_resize_is_pil_bicubic_on_floats():
    img = np.random.default_rng(0).integers(0, 256, (40, 60, 3)).astype(np.float32)
    out = evaluate.resize_clean(img, 299)
    ref = np.asarray(Image.fromarray(img[..., 1]).resize((299, 299), Image.BICUBIC)).clip(0, 255)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[..., 1], ref)
    x = evaluate.preprocess(torch.from_numpy(img.astype(np.uint8)).permute(2, 0, 1)[None], "clean")
    torch.testing.assert_close(x[0, 1], (torch.from_numpy(out[..., 1]) - 128) / 128)


class LookupCLIP(nn.Module):
    """Image k (all pixels k) and text k -> fixed feature vectors: CLIP-score known answers."""
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    texts = torch.tensor([[3.0, 4.0], [-1.0, 0.0], [0.0, 1.0]])

    def encode_image(self, x):
        return self.images[x[:, 0, 0, 0].long()]

    def encode_text(self, ids):
        return self.texts[ids[:, 0]]


def test_clip_scores_known_answers(tmp_path):
    files = []
    for k in range(3):
        files.append(tmp_path / f"{k:05d}_00.png")
        Image.fromarray(np.full((8, 8, 3), k, np.uint8)).save(files[-1])
    transform = lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1).float()   # noqa: E731
    tokenize = lambda texts: torch.tensor([["a", "b", "c"].index(t) for t in texts])[:, None]  # noqa: E731
    scores = evaluate.clip_scores(files, ["a", "b", "c"], (LookupCLIP(), transform, tokenize), batch_size=2)
    torch.testing.assert_close(scores, torch.tensor([60.0, 0.0, 100.0]))     # cos 0.6, -1 -> 0, 1


def tiny_open_clip(tmp_path):
    """A tiny random open_clip CLIP: tmp_path/tinyclip.json (its config) and tinyclip.pt -> the model."""
    import open_clip
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                           "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "tinyclip.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    net = open_clip.CLIP(**cfg)
    with torch.no_grad():  # varied features (a fresh tiny CLIP maps every image to nearly the same vector)
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    torch.save(net.state_dict(), tmp_path / "tinyclip.pt")
    return net


def test_clipscore_cli_on_a_tiny_random_open_clip(sample_runs, tmp_path):
    import open_clip
    net = tiny_open_clip(tmp_path)
    folder = sample_runs[0] / "b1"      # 3 prompts x 2 samples, grid.png and prompts.txt are skipped
    score, stdout, _ = in_process(["clipscore", folder, "--prompts", folder / "prompts.txt", "--clip-model",
                                   tmp_path / "tinyclip.json", "--clip-weights", tmp_path / "tinyclip.pt",
                                   "--device", "cpu", "--batch-size", "4"])
    transform = open_clip.image_transform(32, is_train=False)
    tokenize = open_clip.get_tokenizer("tinyclip")
    with torch.no_grad():
        img = net.eval().encode_image(torch.stack([transform(Image.open(folder / n).convert("RGB")) for n in NAMES]))
        txt = net.encode_text(tokenize([PROMPTS[int(n[:5])] for n in NAMES]))
    expected = (100 * torch.cosine_similarity(img, txt, dim=-1).clamp(min=0)).mean().item()
    assert expected > 0 and score == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert f"CLIP score: {score:.4f}" in stdout and "6 images of 3 prompts" in stdout
    (tmp_path / "two.txt").write_text("one\ntwo\n")
    with pytest.raises(UserError, match="prompt index 2"):
        in_process(["clipscore", folder, "--prompts", tmp_path / "two.txt", "--clip-model",
                    tmp_path / "tinyclip.json", "--clip-weights", tmp_path / "tinyclip.pt"])


@pytest.mark.parametrize("train, compiled", [(False, False), (True, False), (True, True)])
def test_speed_benchmark_tiny(train, compiled, monkeypatch, tmp_path):
    """bench.py and bench.py --train [--compile] (torch.compile stubbed: the warm-up passes run whole passes in
    order)."""
    argv = ["--model", "S", "--depth", "1", "--tokenizer-preset", "tiny", "--clip-tower", "tiny",
            "--batch-size", "2", "--steps", "2", "--precision", "fp32", "--device", "cpu", "--matmul-size", "256"]
    monkeypatch.setattr(torch, "compile", lambda m, **kw: m)
    rows, stdout, _ = in_process(argv + (["--train"] if train else []) + (["--compile"] if compiled else []), bench)
    stages = ["forward + backward", "update"] if train else ["text encoding", "projector", "flow (2 steps)",
                                                             "decoding", "PNG writing"]
    assert [r["stage"] for r in rows] == stages + ["total"]
    for stage in stages + ["total"]:
        assert any(line.startswith(stage) for line in stdout.splitlines()), stage
    assert all(r["seconds"] > 0 for r in rows) and rows[-1]["share"] == pytest.approx(1.0)
    assert sum(r["seconds"] for r in rows[:-1]) == pytest.approx(rows[-1]["seconds"])
    assert "samples/s" in stdout and "peak memory" in stdout and "matmul peak" in stdout
    flops = {r["stage"]: r["flops"] for r in rows}
    if compiled:  # compiled stages are not counted (the eager count applies)
        assert set(flops.values()) == {0}
    elif train:   # backward ~ 2x forward: ~3x the loss's forward count; AdamW and EMA are elementwise (none counted)
        _, _, (run, batch) = bench.speed_training(bench.build_parser().parse_args(argv), torch.device("cpu"),
                                                  str(tmp_path))
        forward = bench._flops(lambda: run.stage(run.stage.prepare(batch, torch.device("cpu"))))[1]
        assert 2.5 * forward < flops["forward + backward"] < 3.5 * forward and flops["update"] == 0
    else:       # the DiT: 2 steps x 2B tokens x 2 FLOPs per MAC x its weights, at least
        dit = FlowDiT(**{**flow_dit.FLOW_MODELS["S"], "depth": 1})
        assert flops["flow (2 steps)"] >= 2 * 2 * (2 * 2 * 77) * sum(p.numel() for p in dit.blocks.parameters()) * 0.5


def test_the_benchmark_times_the_trainers_step_on_its_loss(tmp_path):
    """bench.py --train times train.py's forward_backward and update (no copy of the step): the loss it accumulates
    is the stage's loss of its batch, its update moves the weights, and bench.py holds no backward and no sampler
    loop of its own."""
    args = bench.build_parser().parse_args(["--train", "--model", "S", "--depth", "1", "--clip-tower", "tiny",
                                            "--batch-size", "4", "--precision", "fp32", "--device", "cpu"])
    stages, _, (run, batch) = bench.speed_training(args, torch.device("cpu"), str(tmp_path))
    torch.manual_seed(0)                                         # the same dropout masks in both
    with torch.no_grad():
        want = run.stage(run.stage.prepare(batch, torch.device("cpu")))["loss"]
    before = copy.deepcopy(run.stage.parts.state_dict())
    fns = {name: fn for name, fn, _ in stages}
    assert set(fns) == {"forward + backward", "update"}
    torch.manual_seed(0)
    fns["forward + backward"](1)
    assert run.sums["loss"] == want and run.seen == 4
    fns["update"](1)
    assert run.step == 1 and any(not torch.equal(p, before[k]) for k, p in run.stage.parts.state_dict().items())
    source = (REPO / "bench.py").read_text()
    assert ".backward(" not in source and "euler_sample(" not in source and "for step in" not in source


def test_swiglu_padded_hidden_width_equals_the_plain_one():
    """The GPU path pads ViT-L's 2730 hidden units to 2736: same outputs and gradients, official shapes kept."""
    torch.manual_seed(0)
    mlp = tokenizer.SwiGLU(1024)
    assert mlp.w12.weight.shape == (2 * 2730, 1024) and mlp.w3.weight.shape == (1024, 2730)
    x = torch.randn(2, 5, 1024, requires_grad=True)
    outs, grads = [], []
    for padded in (False, True):
        mlp.pad_on_cpu = padded
        y = mlp(x)
        g = torch.autograd.grad(y.square().sum(), [x, mlp.w12.weight, mlp.w12.bias, mlp.w3.weight])
        outs.append(y)
        grads.append(g)
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert set(mlp.state_dict()) == {"w12.weight", "w12.bias", "w3.weight", "w3.bias"}


def test_gpu_speed_suite_runs_at_depth_1_on_cpu(monkeypatch):
    """`bench.py --suite gpu --compile` (README's GPU table) cannot rot: every case runs, each row's arithmetic holds;
    on a CPU without the CUDA graph rows. torch.compile is a stand-in here (the compiled test compiles for real)."""
    argv = ["--suite", "gpu", "--depth", "1", "--tokenizer-preset", "tiny", "--clip-tower", "tiny",
            "--batch-size", "2", "--steps", "2", "--precision", "fp32", "--device", "cpu", "--matmul-size", "128",
            "--loop-batches", "2", "--compile"]
    modes = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: modes.append(kw.get("mode")) or m)
    rows, stdout, _ = in_process(argv, bench)
    cases = [r["case"] for r in rows]
    assert cases == ["XL depth 1 text to image, batch 2", "XL sample.py's loop, 2 x 2 prompts to PNGs",
                     "H depth 1 text to image, batch 2", "H sample.py's loop, 2 x 2 prompts to PNGs",
                     "XL depth 1 training step, micro-batch 2",
                     "XL depth 1 training step, micro-batch 2, gradient checkpointing",
                     "H depth 1 training step, micro-batch 2",
                     "H depth 1 training step, micro-batch 2, gradient checkpointing",
                     "XL depth 1 text to image, batch 2, torch.compile",
                     "XL sample.py's loop, torch.compile, 2 x 2 prompts to PNGs",
                     "H depth 1 text to image, batch 2, torch.compile",
                     "H sample.py's loop, torch.compile, 2 x 2 prompts to PNGs"]
    assert modes == ["default"] * 4                  # the DiT and the decoder of XL and H; training rows eager
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows) and all(line.count("|") == 7 for line in table)
    for r in rows:
        if "seconds" in r:      # samples/s = batch / the stages' total time
            assert r["samples_per_s"] == pytest.approx(2 / sum(r["seconds"].values()))
            assert list(r["seconds"])[-1] == ("PNG writing" if "image" in r["case"] else "update")
        assert r["samples_per_s"] > 0
    # checkpointing recomputes the forward: counted FLOPs per sample grow by about a third of a step's
    plain, ckpt = rows[4], rows[5]
    fl = [r["flops_per_s"] * sum(r["seconds"].values()) for r in (plain, ckpt)]
    assert 1.2 < fl[1] / fl[0] < 1.45


def test_thread_pool_png_writer_writes_the_same_files(tmp_path):
    """PNGWriter (the sampler's background writer) gives byte-identical files to save_png one by one, records
    included, and raises a write error in the caller's thread."""
    images = np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    (tmp_path / "one").mkdir(), (tmp_path / "pool").mkdir()
    for k, img in enumerate(images):
        sample.save_png(img, str(tmp_path / "one" / f"{k}.png"), record=f"r{k}")
    with sample.PNGWriter(threads=3, backlog=2) as writer:
        writer.submit(images, [str(tmp_path / "pool" / f"{k}.png") for k in range(6)], [f"r{k}" for k in range(6)])
    for k in range(6):
        assert (tmp_path / "one" / f"{k}.png").read_bytes() == (tmp_path / "pool" / f"{k}.png").read_bytes()
        assert sample.read_record(str(tmp_path / "pool" / f"{k}.png")) == f"r{k}"
    with pytest.raises(OSError):
        with sample.PNGWriter() as writer:
            writer.submit(images[:1], [str(tmp_path / "missing" / "0.png")])


def test_compiled_sampling_equals_eager(tmp_path, monkeypatch):
    """sample.py --compile --compile-mode reduce-overhead: generate_folder pads the last batch to one shape, a CUDA
    graph step is marked before each DiT and decoder call (on a CPU: no graphs); PNGs equal eager's within rounding."""
    torch.manual_seed(0)
    clip = CLIPTextEncoder("tiny", "random")
    parts = (TextProjector(clip_dim=64), FlowDiT(**{**flow_dit.FLOW_MODELS["S"], "depth": 1}),
             Tokenizer.from_preset("tiny"))
    prompts = ["a red circle", "a blue square", "a green triangle"]
    (tmp_path / "eager").mkdir(), (tmp_path / "compiled").mkdir()
    modes, marks = [], []
    compile_, mark = torch.compile, torch.compiler.cudagraph_mark_step_begin
    monkeypatch.setattr(torch, "compile", lambda m, **kw: modes.append(kw.get("mode")) or compile_(m, **kw))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1) or mark())
    eager = sample.FlowTokPipeline(clip, *parts)
    sample.generate_folder(eager, prompts, tmp_path / "eager", steps=2, batch_size=2)
    assert not marks
    compiled = sample.FlowTokPipeline(clip, *copy.deepcopy(parts)).compile(mode="reduce-overhead")
    sample.generate_folder(compiled, prompts, tmp_path / "compiled", steps=2, batch_size=2)
    for i in range(3):
        a, b = (sample.read_png(tmp_path / d / f"{i:05d}_00.png").int() for d in ("eager", "compiled"))
        assert (a - b).abs().max() <= 1                    # uint8: one level of rounding at most
    assert compiled.tokenizer.decoder._orig_mod is not None and eager.compiled is False
    assert modes == ["reduce-overhead"] * 2 and compiled.compile_mode == "reduce-overhead"
    assert len(marks) == 2 * (2 + 1)                        # 2 batches x (2 DiT steps + 1 decoder call)
    assert sample.build_parser().parse_args(["--compile-mode", "reduce-overhead", "a"]).compile_mode == \
        "reduce-overhead" and sample.build_parser().parse_args(["a"]).compile_mode == "default"


# ==========================================================================================================
# image to text: the text autoencoder round trip, sample.py --caption, evaluate.py captions
# ==========================================================================================================

I2T_TINY = ["--image-size", "32", "--clip-tower", "tiny", "--num-workers", "0", "--log-every", "50",
            "--sample-every", "0", "--no-progress", "--projector-depth", "1", "--projector-ff", "64", "--seed", "0",
            "--global-batch", "6", "--warmup", "1", "--w-perceptual", "0", "--w-gan", "0"]
TAE_STEPS = 100   # converges with 5 of 5 seeds by 80 steps (~3 s): exact reconstruction of all 6 captions


def _train(*argv):
    """train.main in this process on a tiny CPU configuration."""
    return train.main(train.build_parser().parse_args(I2T_TINY + [str(a) for a in argv]))


def _shapes_pngs(folder, split, indices, size=40):
    """Render shapes-world samples to folder/<i>.png -> (paths, captions); 40 px, so the pipeline resizes them."""
    folder.mkdir(parents=True, exist_ok=True)
    images, attrs = data.shapes_batch(split, indices, size=size)
    paths = []
    for i, img in zip(indices, sample.to_uint8(images)):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(img).save(paths[-1])
    return paths, [data.caption_for(a) for a in attrs]


@pytest.fixture(scope="module")
def i2t_demo(tmp_path_factory):
    """A demo-style folder (tokenizer/, text-ae/, flow-i2t/) trained by train.py on 6 captioned shapes images."""
    root = tmp_path_factory.mktemp("i2t")
    paths, captions = _shapes_pngs(root / "corpus", "train", list(range(6)))
    assert len(set(captions)) == 6
    corpus = root / "corpus" / "train.jsonl"
    corpus.write_text("".join(json.dumps({"image": p.name, "caption": c}) + "\n" for p, c in zip(paths, captions)))
    demo, spec = root / "demo", f"jsonl:{corpus}"
    _train("--stage", "tokenizer", "--tokenizer-preset", "tiny", "--clip-weights", "random", "--data", spec,
           "--out", demo / "tokenizer", "--steps", 3, "--lr", 1e-3)
    clip = demo / "tokenizer" / "clip_text.safetensors"   # every stage shares the tokenizer run's random tower
    _train("--stage", "text-ae", "--clip-weights", clip, "--data", spec, "--out", demo / "text-ae", "--steps",
           TAE_STEPS, "--decoder-width", 32, "--decoder-depth", 1, "--decoder-ff", 64, "--decoder-vocab", "data",
           "--decoder-patch-size", 7, "--lr", 3e-3, "--ema", 0.9)   # grouped like the demo's (sampling reads it)
    _train("--stage", "flow-i2t", "--model", "tiny", "--tokenizer", demo / "tokenizer", "--text-ae", demo / "text-ae",
           "--clip-weights", clip, "--data", spec, "--out", demo / "flow-i2t", "--steps", 3, "--lr", 1e-3)
    return {"demo": demo, "clip": clip, "captions": captions, "images": paths, "root": root}


def _text_ae(ckpt, weights="ema"):
    """A text-ae checkpoint -> (projector, decoder) in eval mode; weights 'ema', 'model' or 'init' (untrained)."""
    proj = projector.TextProjector(**ckpt["config"]["projector"])
    dec = projector.TextDecoder(**ckpt["config"]["text_decoder"])
    if weights != "init":
        proj.load_state_dict(ckpt[weights]["projector"])
        dec.load_state_dict(ckpt[weights]["text_decoder"])
    return proj.eval(), dec.eval()


@torch.no_grad()
def test_text_autoencoder_reconstructs_its_training_captions_exactly(i2t_demo):
    captions = i2t_demo["captions"]
    ids, _ = projector.tokenize(captions)
    assert projector.detokenize(ids) == captions       # lossless BPE on these captions: compare with them directly
    ckpt = runtime.load_checkpoint(str(i2t_demo["demo"] / "text-ae"))
    assert ckpt["stage"] == "text-ae" and ckpt["step"] == TAE_STEPS
    feats = projector.CLIPTextEncoder("tiny", str(i2t_demo["clip"]))(ids)     # (6, 77, 64)
    decoded = {}
    for weights in ("ema", "model", "init"):
        proj, dec = _text_ae(ckpt, weights)
        _, mu, _ = proj(feats)                                                  # the posterior mean, (6, 77, 16)
        decoded[weights] = projector.detokenize(dec.decode(mu))
    assert decoded["ema"] == captions                  # what sampling uses (flow-i2t trains on these latents)
    assert decoded["model"] == captions
    assert sum(a == b for a, b in zip(decoded["init"], captions)) == 0   # untrained: the check can fail


def _run(*argv):
    """Start `python <script> ...` in the repo on one thread, offline -> Popen."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc):
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def test_sample_caption_cli_files_folders_and_errors(i2t_demo, tmp_path):
    folder = tmp_path / "folder"
    extra, _ = _shapes_pngs(folder, "heldout", [0, 1])
    (folder / "notes.txt").write_text("not an image")                          # ignored in a folder
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    common = ["sample.py", "--ckpt", i2t_demo["demo"], "--steps", 2, "--device", "cpu", "--batch-size", 2]
    first = i2t_demo["images"][0]
    procs = {"ok": _run(*common, "--caption", first, folder),
             "missing": _run(*common, "--caption", first, tmp_path / "missing.png"),
             "broken": _run(*common, "--caption", first, broken)}
    runs = {name: _finish(p) for name, p in procs.items()}
    rc, out, err = runs["ok"]
    assert rc == 0, err
    lines = out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(first), *map(str, extra)]   # one line per image, in order
    for line in lines:
        path, caption = line.split("\t")                                        # exactly one tab
        assert caption == caption.strip() and "<start_of_text>" not in caption and "<end_of_text>" not in caption
        assert "!" not in caption   # id 0 (padding) decodes to '!': it must never reach a caption
    for name, want in (("missing", "missing.png"), ("broken", "broken.png")):
        rc, out, err = runs[name]
        assert rc != 0 and out == "" and "Traceback" not in err, (name, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("sample.py: error:") and want in err, err


def _evaluate(*argv):
    """evaluate.main in this process -> (result, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        result = evaluate.main(evaluate.build_parser().parse_args([str(a) for a in argv]))
    return result, out.getvalue(), err.getvalue()


def _sample_captions(demo, files, *argv):
    """`sample.py --caption` in this process -> [(path, caption)]."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sample.main(sample.build_parser().parse_args(["--ckpt", str(demo), "--caption", *map(str, files),
                                                      "--device", "cpu", *map(str, argv)]))
    return [tuple(line.split("\t")) for line in out.getvalue().splitlines()]


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory):
    """A fake Karpathy split file: 5 test images (one only at IMAGES/filename), 1 val, 1 restval; 2 sentences each."""
    root = tmp_path_factory.mktemp("karpathy")
    paths, captions = _shapes_pngs(root / "render", "heldout", list(range(7)))
    entries = []
    for k, (p, c) in enumerate(zip(paths, captions)):
        name, where = f"COCO_val2014_{k:012d}.png", root / "images" / ("" if k == 3 else "val2014")
        where.mkdir(parents=True, exist_ok=True)
        p.rename(where / name)
        split = "test" if k < 5 else ("val", "restval")[k - 5]
        raws = [f"{c.capitalize()}.\n", f"  There is a {c.split()[2]} shape {k}  "]   # messy whitespace, cased
        sentences = [{"raw": r, "tokens": r.split(), "imgid": k, "sentid": 2 * k + j} for j, r in enumerate(raws)]
        entries.append({"filepath": "val2014", "filename": name, "imgid": k, "split": split, "cocoid": 500 - k,
                        "sentids": [2 * k, 2 * k + 1], "sentences": sentences})
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return root


def test_evaluate_captions_karpathy_smoke_run(i2t_demo, karpathy, tmp_path):
    out, demo = tmp_path / "cap", i2t_demo["demo"]
    model = ["--ckpt", demo, "--steps", 2, "--device", "cpu", "--seed", 3]
    args = ["captions", "--karpathy-split", karpathy / "dataset_coco.json", "--images", karpathy / "images",
            "--out", out, *model]
    result, stdout, stderr = _evaluate(*args, "--batch-size", 2, "--limit", 3)
    for line in [f"protocol        image to text: Karpathy split 'test' of {karpathy / 'dataset_coco.json'}",
                 "images          3 of the 5 in the split (--limit 3); PIL bicubic, shorter side to 32 + centre crop",
                 "references      6 (2.00 per image): the split's raw sentences", "BLEU-4 and CIDEr-D",
                 "ptb_tokenize", "seed            3", "2 Euler steps, cfg 2.0, precision fp32, batch 2",
                 f"weights         EMA (image to text: {demo / 'flow-i2t'})", "captioned 3, reused 0"]:
        assert line in stdout, line
    assert "warning: 3 of the split's 5 images" in stderr
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    split = json.loads((karpathy / "dataset_coco.json").read_text())["images"]
    assert [r["id"] for r in records] == [500, 499, 498]                       # cocoid, in the file's order
    assert [r["file"] for r in records] == [f"val2014/COCO_val2014_{k:012d}.png" for k in range(3)]
    assert [r["references"] for r in records] == [[" ".join(s["raw"].split()) for s in im["sentences"]]
                                                  for im in split[:3]]
    assert all(isinstance(r["caption"], str) and "<end_of_text>" not in r["caption"] for r in records)
    # the scores are the metrics of the written captions
    cands, refs = {r["id"]: r["caption"] for r in records}, {r["id"]: r["references"] for r in records}
    saved = json.loads((out / "results.json").read_text())
    assert saved["bleu4"] == projector.bleu4(cands, refs) and saved["cider_d"] == projector.cider_d(cands, refs)
    assert saved == result and saved["images"] == 3 and saved["split_images"] == 5 and saved["split"] == "test"
    assert f"BLEU-4: {saved['bleu4']:.4f}  CIDEr-D: {saved['cider_d']:.4f}" in stdout
    # the same captions as `sample.py --caption` on the same images in the same order (noise by image index)
    files = [karpathy / "images" / ("" if k == 3 else "val2014") / f"COCO_val2014_{k:012d}.png" for k in range(5)]
    by_sample = _sample_captions(demo, files, "--steps", 2, "--seed", 3, "--batch-size", 5)
    assert [c for _, c in by_sample[:3]] == [r["caption"] for r in records]
    # the full split reuses the 3 captions (any batch size), finds image 3 at IMAGES/filename, warns no more
    result, stdout, stderr = _evaluate(*args, "--batch-size", 3)
    assert "captioned 2, reused 3" in stdout and "images          5 of the 5 in the split;" in stdout
    assert "warning" not in stderr and result["images"] == 5
    full = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert full[:3] == records and [r["caption"] for r in full] == [c for _, c in by_sample]
    with pytest.raises(UserError, match=r"other settings \(steps 2 -> 3\)"):
        _evaluate(*args, "--steps", 3)
    # the same images as a COCO captions file (ids in this split's order) give the same captions
    coco = {"images": [{"id": 1000 + k, "file_name": r["file"]} for k, r in enumerate(full)],
            "annotations": [{"id": 10 * k + j, "image_id": 1000 + k, "caption": ref}
                            for k, r in enumerate(full) for j, ref in enumerate(r["references"])]}
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    result, stdout, _ = _evaluate("captions", "--captions-json", tmp_path / "captions.json", "--images",
                                  karpathy / "images", "--out", tmp_path / "coco", *model)
    assert "every captioned image of" in stdout and "images          5 of the 5 in the file;" in stdout
    coco_records = [json.loads(line) for line in (tmp_path / "coco" / "captions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in coco_records] == [1000 + k for k in range(5)]
    assert [(r["file"], r["caption"], r["references"]) for r in coco_records] == \
        [(r["file"], r["caption"], r["references"]) for r in full]


def test_evaluate_captions_errors(i2t_demo, karpathy, tmp_path):
    demo, images = i2t_demo["demo"], karpathy / "images"
    entries = json.loads((karpathy / "dataset_coco.json").read_text())["images"]

    def split_file(name, rows):
        path = tmp_path / name
        path.write_text(json.dumps({"images": rows}))
        return path

    def run(split_json, *extra, ckpt=demo, out=tmp_path / "out"):
        return _evaluate("captions", "--karpathy-split", split_json, "--images", images, "--ckpt", ckpt, "--out",
                         out, "--steps", 1, "--batch-size", 1, "--device", "cpu", *extra)

    # a missing image: named, before the model is loaded or anything is written
    gone = split_file("gone.json", [entries[0], dict(entries[1], filename="nowhere.png")])
    with pytest.raises(UserError, match=r"1 of the 2 images are missing .*val2014/nowhere\.png"):
        run(gone, out=tmp_path / "never")
    assert not (tmp_path / "never").exists()
    # an unreadable image: named; the captions made before it are kept and a rerun continues from them
    (images / "val2014" / "bad.png").write_bytes(b"garbage")
    bad = split_file("bad.json", [entries[0], entries[1], dict(entries[2], filename="bad.png"), entries[4]])
    with pytest.raises(UserError, match=r"bad\.png: unreadable image .*2 captions made so far"):
        run(bad, out=tmp_path / "partial")
    assert len((tmp_path / "partial" / "captions.jsonl").read_text().splitlines()) == 2
    (images / "val2014" / "bad.png").unlink()
    with pytest.raises(UserError, match="no image in split 'val' .*its splits: test"):
        run(split_file("test_only.json", entries[:2]), "--split", "val")
    with pytest.raises(UserError, match=r"image 499 \(val2014/COCO_val2014_000000000001.png\) has no ref"):
        run(split_file("bare.json", [entries[0], dict(entries[1], sentences=[{"raw": " \n"}])]))
    with pytest.raises(UserError, match="not a Karpathy split file"):
        run(split_file("coco_like.json", [{"id": 1, "file_name": "x.png"}]))
    with pytest.raises(UserError, match="'tokenizer' checkpoint"):
        run(karpathy / "dataset_coco.json", ckpt=demo / "tokenizer")
    with pytest.raises(UserError, match="--split picks a split of --karpathy-split"):
        _evaluate("captions", "--captions-json", tmp_path / "c.json", "--images", images, "--ckpt", demo, "--split",
                  "val")
    # the command line turns them into one line, exit status 1
    rc, out, err = _finish(_run("evaluate.py", "captions", "--karpathy-split", gone, "--images", images, "--ckpt",
                                demo, "--out", tmp_path / "cli"))
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("evaluate.py: error: 1 of the 2 images are missing") and "nowhere.png" in err


# ==========================================================================================================
# README: every command in it is a valid command line of our scripts
# ==========================================================================================================

def readme_commands():
    """The python / torchrun command lines of README.md's code blocks (continuations joined)."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in text.split("```")[1::2]:
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = part.split("#")[0].split()
                if words and words[0] in ("python", "torchrun"):
                    commands.append(words)
    return commands


def test_readme_commands_are_valid_command_lines():
    """Each README command parses with its script's own parser (flags, choices, subcommands).

    Smoke versions of what they do run elsewhere in this file: the demo (test_demo_*), training stages, resume
    and torchrun (test_every_stage_*, test_resume_*, test_two_process_*), pretokenize (test_pretokenised_*),
    sampling with our and official-layout checkpoints (test_sample_cli_*, test_official_pipeline_*), the
    protocols (test_coco30k_*, test_mjhq30k_*), clipscore and speed; `pip install` and pytest run in .ci/run.
    """
    import shlex
    parsers = {"train.py": train.build_parser, "sample.py": sample.build_parser, "bench.py": bench.build_parser,
               "evaluate.py": evaluate.build_parser, "data.py": data.build_parser, "demo.py": demo.build_parser}
    env = {"$NODE_RANK": "0", "$MASTER": "127.0.0.1"}
    commands = readme_commands()
    assert len(commands) >= 15
    for words in commands:
        if words[:3] == ["python", "-m", "pytest"]:
            continue
        script = next(i for i, w in enumerate(words) if w.endswith(".py"))
        argv = [env.get(w, w) for w in shlex.split(" ".join(words[script + 1:]))]
        try:
            parsers[words[script]]().parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: {' '.join(words)}")


def local_imports(sources):
    """{module: source text} -> {module: the local modules it imports anywhere (functions included)}."""
    graph = {}
    for name, text in sources.items():
        found = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        graph[name] = sorted(found & set(sources) - {name})
    return graph


def import_cycles(graph):
    """The cycles of an import graph, each as a list of modules (empty: a DAG)."""
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_imports_form_a_dag_in_the_readme_order():
    """Every import (also inside functions) points down README's order; the cycle finder finds planted cycles."""
    sources = {f.stem: f.read_text() for f in REPO.glob("*.py") if f.stem != "test_flowtok"}
    graph = local_imports(sources)
    assert import_cycles(graph) == []
    assert "tokenizer" not in graph["flow_dit"]                     # the DiT file never needs the image tokenizer
    order = ["runtime", "projector", "tokenizer", "flow_dit", "data", "sample", "evaluate", "train", "bench", "demo"]
    assert graph["runtime"] == []                                  # operations only: no FlowTok file below it
    assert sorted(graph) == sorted(order)
    line = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("Import order:"))
    assert [w.strip("`. ") for w in line.split(":", 1)[1].split("->")] == order
    for module, deps in graph.items():                                # strictly downwards
        assert all(order.index(d) < order.index(module) for d in deps), (module, deps)
    planted = dict(sources, flow_dit=sources["flow_dit"] + "\ndef f():\n    import train\n")
    assert import_cycles(local_imports(planted))                       # a lazy import closing a loop is found
    assert import_cycles({"a": ["b"], "b": ["c"], "c": ["a"]}) == [["a", "b", "c", "a"]]


# ==========================================================================================================
# The embedded demo
# ==========================================================================================================

def test_demo_preset_smoke_run(tmp_path):
    """demo.py --smoke: every stage for a few steps, the report, then sample.py on the result."""
    out = tmp_path / "demo"
    report = demo.run_demo(demo.build_parser().parse_args(["--smoke", "--out", str(out)]))
    saved = json.loads((out / "report.json").read_text())
    assert saved["tokenizer_psnr_db"] == report["tokenizer_psnr_db"] > 12
    assert saved["seed"] == 0 and saved["diverged"] == [] and set(saved["loss_spikes"]) == set(demo.DEMO)
    for key in ("prompt_accuracy_cfg2", "prompt_accuracy_no_cfg", "novel_pair_accuracy_cfg2", "caption_accuracy"):
        assert set(saved[key]) >= {"colour", "shape", "both", "size", "position"}
        assert all(0 <= v <= 1 for v in saved[key].values())
    assert saved["prompt_accuracy_cfg2"]["colour"] > 1 / 6 + 0.1          # above chance (6 colours)
    assert saved["heldout_prompts"] == 25 and saved["samples_per_prompt"] == 1
    assert set(saved["wall_time_s"]) == {"tokenizer", "pretokenize", "flow", "text-ae", "flow-i2t", "evaluation",
                                         "total"}
    assert (out / "heldout_grid.png").exists() and 0 <= saved["caption_cider_d"]
    for stage in ("tokenizer", "flow", "text-ae", "flow-i2t"):
        assert torch.load(out / stage / "last.pt", weights_only=True)["step"] == demo.DEMO[stage][1]
    # the README's next command works on the result (sample.main, as `python sample.py` calls it)
    run_sample("--ckpt", out, "a large red circle on the left", "--out", tmp_path / "s", "--steps", 4)
    assert Image.open(tmp_path / "s" / "00000_00.png").size == (32, 32)
    # running it again finds every stage trained and only re-evaluates
    again = demo.run_demo(demo.build_parser().parse_args(["--smoke", "--out", str(out)]))
    assert set(again["wall_time_s"]) == {"evaluation", "total", "pretokenize"}
    assert again["prompt_accuracy_cfg2"] == report["prompt_accuracy_cfg2"]
    # another seed is another run: its own folder, not this one's
    with pytest.raises(UserError, match=r"holds a demo of --seed 0: run it again with that seed, or give this seed"):
        demo.run_demo(demo.build_parser().parse_args(["--smoke", "--out", str(out), "--seed", "1"]))


def test_demo_seed_reaches_every_stage_and_a_diverged_stage_is_not_a_result(tmp_path, monkeypatch):
    """--seed N is every stage's --seed and the evaluation noise's; a stage whose SpikeWatch recorded an episode
    is named in report.json and on screen, and the demo exits 1 (UserError) instead of presenting the numbers."""
    seen, spike = {}, {"start": 350, "end": None, "best": 0.001, "best_step": 300, "peak": 0.05}

    def fake_train(args):
        seen[args.stage] = args.seed
        return {"stopped": None, "spikes": [spike] if args.stage == "tokenizer" else []}

    monkeypatch.setattr(train, "main", fake_train)
    monkeypatch.setattr(data, "pretokenize", lambda args: os.makedirs(args.out, exist_ok=True))
    acc = dict.fromkeys(("colour", "shape", "both", "size", "position"), 0.5)
    monkeypatch.setattr(demo, "demo_report", lambda out, smoke, seed: {
        "seed": seed, "tokenizer_psnr_db": 20.0, "samples_per_prompt": 1, "heldout_prompts": 1, "novel_prompts": 1,
        "prompt_accuracy_cfg2": acc, "prompt_accuracy_no_cfg": acc, "novel_pair_accuracy_cfg2": acc,
        "caption_accuracy": acc, "caption_cider_d": 0.0, "caption_examples": [], "grid": "grid.png"})
    with pytest.raises(UserError, match=r"^the tokenizer stage diverged .* the report above is not the recipe's"):
        demo.run_demo(demo.build_parser().parse_args(["--out", str(tmp_path / "d"), "--seed", "7"]))
    assert seen == dict.fromkeys(demo.DEMO, 7)
    saved = json.loads((tmp_path / "d" / "report.json").read_text())
    assert saved["seed"] == 7 and saved["diverged"] == ["tokenizer"] and saved["loss_spikes"]["tokenizer"] == [spike]
    assert demo.demo_args("flow", "x", False, 3).seed == 3


# ==========================================================================================================
# Tokenizer training: the one-stage TA-TiTok losses, rFID
# ==========================================================================================================

def test_discriminator_losses_known_answers():
    real = torch.tensor([[2.0, 0.5], [-1.0, 1.0]])
    fake = torch.tensor([[-2.0, 0.0], [0.5, -0.5]])
    disc = tokenizer.PatchDiscriminator(width=32, lecam_decay=0.999)
    disc.lecam_ema.copy_(torch.tensor([0.2, -0.1]))
    d = disc.loss(real, fake, w_lecam=0.001)
    # hinge: relu(1 - real) = 0, .5, 2, 0 (mean .625); relu(1 + fake) = 0, 1, 1.5, .5 (mean .75) -> (.625 + .75) / 2
    assert d["hinge"].item() == pytest.approx(0.6875, abs=1e-7)
    # LeCAM: means .625 and -.5 -> relu(.625 - (-.1))^2 + relu(.2 - (-.5))^2 = .725^2 + .7^2
    assert d["lecam"].item() == pytest.approx(1.015625, abs=1e-7)
    assert d["loss"].item() == pytest.approx(0.6875 + 0.001 * 1.015625, abs=1e-7)
    disc.update_lecam(real.mean(), fake.mean())
    assert disc.lecam_ema.tolist() == pytest.approx([0.999 * 0.2 + 0.001 * 0.625, 0.999 * -0.1 + 0.001 * -0.5])
    assert tokenizer.generator_gan_loss(fake).item() == pytest.approx(0.5)
    assert tokenizer.lecam_loss(torch.tensor(-1.0), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0)) == 0


def test_blur_downsampling_and_discriminator_shapes():
    blur = tokenizer.BlurDown()
    impulse = torch.zeros(1, 1, 8, 8)
    impulse[0, 0, 4, 4] = 1
    out = blur(impulse)[0, 0] * 64                     # kernel [1, 3, 3, 1] x [1, 3, 3, 1] / 64, stride 2, pad 1
    want = torch.zeros(4, 4)
    want[1:3, 1:3] = torch.tensor([[1.0, 3.0], [3.0, 9.0]])
    assert torch.allclose(out, want, atol=1e-6)
    ones = blur(torch.ones(1, 2, 8, 8))
    edge = torch.tensor([7 / 8, 1, 1, 7 / 8])          # one zero-padded row / column of the kernel at each border
    assert ones.shape == (1, 2, 4, 4) and torch.allclose(ones, torch.outer(edge, edge).expand(1, 2, 4, 4))
    for size in (32, 64):
        assert tokenizer.PatchDiscriminator(width=32)(torch.rand(2, 3, size, size)).shape == (2, 1, 16, 16)
    # conv5 3->128 | 3 x (conv3, GroupNorm): 128->128, 128->256, 256->512 | conv1 512->512, conv5 512->1
    n = sum(p.numel() for p in tokenizer.PatchDiscriminator().parameters())
    assert n == (3 * 25 + 1) * 128 + (128 * 9 + 3) * 128 + (128 * 9 + 3) * 256 + (256 * 9 + 3) * 512 + \
        (512 + 1) * 512 + 512 * 25 + 1


def test_adaptive_gan_weight_closed_form():
    torch.manual_seed(0)
    w, a, b = torch.randn(3, 3, requires_grad=True), torch.randn(3, 3), torch.randn(3, 3)
    got = tokenizer.adaptive_gan_weight((w * a).sum(), 2 * (w * b).sum(), w)   # gradients a and 2b
    assert got.item() == pytest.approx((a.norm() / (2 * b.norm() + 1e-4)).item(), rel=1e-6)
    assert not got.requires_grad


def test_no_decay_groups_follow_ta_titok():
    tok = Tokenizer.from_preset("tiny")
    exempt = {n for n, p in tok.named_parameters() if tokenizer.no_decay(n, p)}
    assert {"encoder.latent_tokens", "decoder.mask_token", "encoder.ln_pre.weight", "decoder.conv_out.bias",
            "decoder.text_guidance_positional_embedding", "encoder.patch_embed.weight"} <= exempt
    assert "decoder.conv_out.weight" not in exempt and "encoder.transformer.0.attn.qkv.weight" not in exempt


@pytest.fixture(scope="module")
def perceptual_dir(tmp_path_factory):
    """The three perceptual weight files, named and keyed like the standard downloads, with random weights."""
    import torchvision
    folder = tmp_path_factory.mktemp("perceptual")
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16().features.state_dict()
    torch.save({f"features.{k}": v for k, v in vgg.items()}, folder / "vgg16-397923af.pth")
    lins = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 128, 256, 512, 512))}
    torch.save(lins, folder / "lpips_vgg_v0.1.pth")
    torch.save(torchvision.models.convnext_small().state_dict(), folder / "convnext_small-0c510722.pth")
    return folder


def reference_lpips(features, lins, x, y):
    """LPIPS written out from the paper: VGG16 activations at relu1_2 .. relu5_3, channel-normalised,
    squared differences weighted per channel, averaged over positions, summed over the five layers."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(img):
        h, out = (img * 2 - 1 - shift) / scale, []
        for i in range(30):
            h = features[i](h.clone())
            if i in (3, 8, 15, 22, 29):
                out.append(h)
        return out
    total = 0
    for fx, fy, w in zip(taps(x), taps(y), lins):
        nx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        ny = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + ((nx - ny) ** 2 * w.view(1, -1, 1, 1)).sum(1).mean(dim=(1, 2))
    return total


def test_perceptual_loss_equals_a_second_construction(perceptual_dir):
    import torchvision
    net = tokenizer.load_perceptual(str(perceptual_dir))
    torch.manual_seed(1)
    x, y = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    vgg = torchvision.models.vgg16().features.eval()
    vgg.load_state_dict({k[9:]: v for k, v in torch.load(perceptual_dir / "vgg16-397923af.pth").items()})
    lins = [v.flatten() for v in torch.load(perceptual_dir / "lpips_vgg_v0.1.pth").values()]
    convnext = torchvision.models.convnext_small().eval()
    convnext.load_state_dict(torch.load(perceptual_dir / "convnext_small-0c510722.pth"))
    with torch.no_grad():
        lp = reference_lpips(vgg, lins, x, y)
        assert torch.allclose(net.lpips(x, y), lp, rtol=1e-5, atol=1e-6)
        mean, std = torch.tensor(tokenizer.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(tokenizer.IMAGENET_STD).view(
            1, 3, 1, 1)
        logits = [convnext((F.interpolate(v, size=224, mode="bilinear", antialias=True) - mean) / std) for v in (x, y)]
        want = (lp.mean() + 0.1 * F.mse_loss(*logits)) / 1.1
        assert net(x, y).item() == pytest.approx(want.item(), rel=1e-5)
        assert net(x, x).item() == 0
    net.train()                                      # stays in eval mode (no dropout, no stochastic depth)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x.requires_grad_(True)
    net(x, y).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_perceptual_weights_missing_or_offline(tmp_path, monkeypatch):
    with pytest.raises(OSError, match="lpips_vgg_v0.1.pth is missing"):
        (tmp_path / "partial").mkdir()
        torch.save({}, tmp_path / "partial" / "vgg16-397923af.pth")
        torch.save({}, tmp_path / "partial" / "convnext_small-0c510722.pth")
        tokenizer.load_perceptual(str(tmp_path / "partial"))

    def offline(url, dst, **kw):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(OSError, match="--perceptual-weights FOLDER"):
        tokenizer.load_perceptual()
    # training goes on without the term, and says so
    out = tmp_path / "run"
    run_train("--stage", "tokenizer", "--tokenizer-preset", "tiny", "--clip-weights", "random", "--data",
              "shapes:n=16", "--out", out, "--steps", 1, "--global-batch", 4, "--w-perceptual", 1.1)
    log = (out / "log.txt").read_text()
    assert "Training WITHOUT the perceptual term" in log and "losses: mse + 1e-06 kl;" in log
    assert "perceptual" not in log.split("step 1/1")[1].split("\n")[0]
    with pytest.raises(UserError, match="is missing"):
        run_train("--stage", "tokenizer", "--tokenizer-preset", "tiny", "--clip-weights", "random", "--data",
                  "shapes:n=16", "--out", tmp_path / "run2", "--steps", 1, "--global-batch", 4, "--w-perceptual", 1,
                  "--perceptual-weights", tmp_path / "partial")


def test_tokenizer_training_with_every_loss_reduces_error(perceptual_dir, tmp_path):
    out = tmp_path / "tok"
    run_train("--stage", "tokenizer", "--tokenizer-preset", "tiny", "--clip-weights", "random", "--data",
              "shapes:n=256", "--out", out, "--steps", 16, "--global-batch", 2, "--lr", 3e-3, "--warmup", 1,
              "--schedule", "constant", "--ema", 0, "--w-perceptual", 1.1, "--perceptual-weights", perceptual_dir,
              "--w-gan", 0.1, "--gan-start", 8, "--adaptive-gan", "--disc-width", 32)
    log = (out / "log.txt").read_text()
    assert "+ 1.1 perceptual + 0.1 adaptive gan from step 8" in log
    last = log.split("step 16/16")[1]
    for key in ("perceptual", "gan ", "gan_weight", "d_hinge", "d_lecam", "d_logits_real", "mse"):
        assert key in last
    ck = torch.load(out / "last.pt", weights_only=True)
    assert ck["discriminator"]["scheduler"]["last_epoch"] == 8                # stepped from step 8 on only
    assert ck["discriminator"]["model"]["lecam_ema"].abs().min() > 0
    images, _ = data.shapes_batch("heldout", list(range(32)), size=32)
    clip = CLIPTextEncoder("tiny", str(out / "clip_text.safetensors"))
    text = clip(projector.tokenize([""] * 32)[0])

    def error(tok):
        with torch.no_grad():
            return F.mse_loss(tok.decode(tok.encode(images)[0], text), images).item()
    torch.manual_seed(0)                                         # the run's initial weights (seed 0, rank 0)
    before, after = error(Tokenizer(**ck["config"]["tokenizer"])), error(tokenizer.load_tokenizer(str(out / "last.pt")))
    assert after < 0.8 * before, (before, after)


def test_gan_resume_after_sigkill_restores_both_optimizers_and_the_discriminator(tmp_path):
    args = ("--stage", "tokenizer", "--tokenizer-preset", "tiny", "--clip-weights", "random", "--data", "shapes:n=64",
            "--global-batch", 4, "--lr", 1e-3, "--warmup", 1, "--w-gan", 0.1, "--gan-start", 2, "--disc-width", 32,
            "--steps", 16, "--ckpt-every", 4)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    run_train(*args, "--out", whole)
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *TINY, *map(str, args), "--out", str(killed)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "step_0000004.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 4 <= torch.load(killed / "last.pt", weights_only=True)["step"] < 16
    run_train(*args, "--out", killed, "--resume")
    whole, killed = torch.load(whole / "last.pt", weights_only=True), torch.load(killed / "last.pt", weights_only=True)
    a, b = all_tensors(whole), all_tensors(killed)
    assert any(k.startswith("discriminator.optimizer.state") for k in a) and a.keys() == b.keys()
    assert "discriminator.model.lecam_ema" in a and whole["discriminator"]["scheduler"]["last_epoch"] == 14
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert whole["discriminator"]["scheduler"] == killed["discriminator"]["scheduler"]


def test_tokenizer_fine_tunes_from_the_official_file(tmp_path):
    folder = tmp_path / "official"
    write_official_dir(folder)
    out = tmp_path / "ft"
    run_train("--stage", "tokenizer", "--tokenizer-preset", "tiny", "--clip-weights", "random", "--data",
              "shapes:n=16", "--out", out, "--steps", 1, "--global-batch", 4, "--lr", 0, "--schedule", "constant",
              "--image-size", 64, "--init", folder / "FlowTiTok_512.bin")
    official = load_official_tokenizer(str(folder / "FlowTiTok_512.bin")).state_dict()
    mine = torch.load(out / "last.pt", weights_only=True)["model"]["tokenizer"]
    assert mine["encoder.rope_cos"].shape[0] == 4 * official["encoder.rope_cos"].shape[0]   # 64 px: 4x the patches
    cos, sin = reference_rope(8, 16)                                    # this run's own tables: an 8 x 8 grid
    for part in ("encoder", "decoder"):
        assert_exact(mine[f"{part}.rope_cos"], cos) and assert_exact(mine[f"{part}.rope_sin"], sin)
    same = [k for k in mine if "rope_" not in k]
    assert len(same) > 20 and all(torch.equal(mine[k], official[k]) for k in same)
    with pytest.raises(UserError, match="does not fit --tokenizer-preset demo"):
        run_train("--stage", "tokenizer", "--tokenizer-preset", "demo", "--clip-weights", "random", "--data",
                  "shapes:n=16", "--out", tmp_path / "bad", "--steps", 1, "--init", folder / "FlowTiTok_512.bin")


def reference_ssim(x, y):
    """SSIM of two (C, H, W) float64 arrays from Wang et al.'s formulas, with scipy's 2D correlation."""
    from scipy.signal import correlate2d
    g = np.exp(-(np.arange(11) - 5) ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    maps = []
    for a, b in zip(x, y):
        mu_a, mu_b = correlate2d(a, w, "valid"), correlate2d(b, w, "valid")
        var_a = correlate2d(a * a, w, "valid") - mu_a ** 2
        var_b = correlate2d(b * b, w, "valid") - mu_b ** 2
        cov = correlate2d(a * b, w, "valid") - mu_a * mu_b
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        maps.append((2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return np.mean(maps)


def test_ssim_and_psnr_known_answers():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 24, 20)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert evaluate.ssim(x, x).tolist() == pytest.approx([1.0, 1.0])
    got = evaluate.ssim(x, y)
    for i in range(2):
        assert got[i].item() == pytest.approx(reference_ssim(x[i].double().numpy(), y[i].double().numpy()), rel=1e-9)
    assert evaluate.psnr(x, (x + 0.1).clamp(max=2)).tolist() == pytest.approx([20.0, 20.0])


def test_rfid_command_matches_fid_of_the_saved_reconstructions(tiny_tokenizer, fid_weights, tmp_path, monkeypatch):
    weights, _ = fid_weights
    compared = []          # the statistics each FID compares (a 2048-d sqrtm costs ~10 s here; two per FID of 12)
    monkeypatch.setattr(evaluate, "frechet_distance", lambda *stats: compared.append(stats) or len(compared))
    folder, originals = tmp_path / "images", tmp_path / "originals"
    paths, captions = _shapes_pngs(folder / "sub", "heldout", list(range(12)))      # 40 px: resized to 32
    (folder / "sub" / "000.txt").write_text(captions[0])
    originals.mkdir()
    for p in paths:
        evaluate.resize_crop(Image.open(p).convert("RGB"), 32).save(originals / p.name)
    args = evaluate.build_parser().parse_args([
        "rfid", "--tokenizer", str(tiny_tokenizer), "--images", str(folder), "--inception-weights", str(weights),
        "--save-recon", str(tmp_path / "recon"), "--batch-size", "5", "--device", "cpu"])
    result = evaluate.main(args)
    assert result["images"] == 12
    recon = sorted((tmp_path / "recon").glob("*.png"))
    a = torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in sorted(originals.glob("*.png"))])
    b = torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in recon])
    a, b = a.permute(0, 3, 1, 2).double() / 255, b.permute(0, 3, 1, 2).double() / 255
    want_psnr = (-10 * torch.log10(((a - b) ** 2).mean(dim=(1, 2, 3)))).mean().item()
    assert result["psnr"] == pytest.approx(want_psnr, rel=1e-9)
    assert result["ssim"] == pytest.approx(np.mean([reference_ssim(x.numpy(), y.numpy()) for x, y in zip(a, b)]),
                                           rel=1e-9)
    evaluate.main(evaluate.build_parser().parse_args(
        ["fid", str(originals), str(tmp_path / "recon"), "--inception-weights", str(weights), "--device", "cpu",
         "--num-workers", "0"]))
    assert result["rfid"] == 1 and len(compared) == 2       # rFID: the Frechet distance of the statistics that
    for mine, cli in zip(*compared):                        # `evaluate.py fid` computes from the saved images
        np.testing.assert_allclose(mine, cli, rtol=1e-4, atol=1e-6 * np.abs(cli).max())


# ==========================================================================================================
# Cross-checks with the reference libraries (pip install -r requirements-dev.txt; each skips without its library)
# ==========================================================================================================

def test_tf_resize_inception_in_float64_equals_torch_fidelity(fid_weights, tmp_path):
    """The official evaluator (libs/evaluator.py) is torch-fidelity's InceptionV3 at float64: TF1 bilinear resize of
    0..255 values, (x - 128) / 128. Ours with --resize tf, in float64, on the same (random) weights."""
    tfid = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    theirs = tfid.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(
        fid_weights[0]), feature_extractor_internal_dtype="float64")
    ours = evaluate.load_inception(str(fid_weights[0])).double()
    images = torch.randint(0, 256, (2, 3, 37, 50), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = theirs(images)[0].double()                           # they hand features out as float32
        got = ours(evaluate.preprocess(images, "tf", torch.float64))
    assert got.dtype == torch.float64 and want.abs().mean() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_fid_equals_pytorch_fid(fid_weights, monkeypatch):
    pfid_inception = pytest.importorskip("pytorch_fid.inception")
    from pytorch_fid.fid_score import calculate_frechet_distance
    # pytorch-fid's InceptionV3 downloads its release file; hand its strict load our random weights instead
    state = torch.load(fid_weights[0], map_location="cpu", weights_only=True)
    monkeypatch.setattr(pfid_inception, "load_state_dict_from_url", lambda *args, **kwargs: state)
    theirs = pfid_inception.InceptionV3([pfid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    ours = evaluate.load_inception(str(fid_weights[0]))
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 37, 50), dtype=torch.uint8, generator=gen)
    with torch.no_grad():
        got = ours(evaluate.preprocess(images, "bilinear"))
        # pytorch-fid reads images with ToTensor (uint8 / 255), then resizes to 299 and scales to [-1, 1] itself
        want = theirs(images.float() / 255)[0].flatten(1)
    assert got.shape == want.shape == (2, 2048) and want.abs().mean() > 1e-2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    # the Frechet distance on the same features: our running statistics vs pytorch-fid's np.mean / np.cov
    rng = np.random.default_rng(0)
    for n, dim in [(300, 64), (20, 48)]:                      # full-rank covariances; fewer samples than dimensions
        sets = [np.abs(rng.standard_normal((n, dim)) @ rng.standard_normal((dim, dim))) + shift for shift in (1, 2)]
        mine, ref = [], []
        for feats in sets:
            acc = evaluate.FeatureStats(dim=dim)
            for chunk in np.array_split(feats, 3):
                acc.update(torch.from_numpy(chunk))
            mine += acc.mean_cov()
            ref += [np.mean(feats, axis=0), np.cov(feats, rowvar=False)]
        for a, b in zip(mine, ref):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
        want = calculate_frechet_distance(*ref)
        assert want > 1 and evaluate.frechet_distance(*ref) == pytest.approx(want, rel=1e-6)
        assert evaluate.frechet_distance(*mine) == pytest.approx(want, rel=1e-6)


def test_lpips_equals_the_lpips_package(tmp_path, monkeypatch):
    lpips = pytest.importorskip("lpips")
    import torchvision
    import warnings
    torch.manual_seed(0)
    with warnings.catch_warnings():       # lpips passes torchvision's deprecated `pretrained` (False: no download)
        warnings.simplefilter("ignore")
        theirs = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)   # random VGG16; its shipped v0.1 heads
    # our loader reads the files of a training run: their VGG16 keyed as torchvision's file, their shipped heads
    vgg = {f"features.{k.split('.', 2)[2]}": v for k, v in theirs.state_dict().items() if k.startswith("net.slice")}
    assert len(vgg) == 26                                     # 13 convolutions, weight and bias
    torch.save(vgg, tmp_path / "vgg16-397923af.pth")
    shutil.copy(Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth", tmp_path / "lpips_vgg_v0.1.pth")
    monkeypatch.setattr(torchvision.models, "convnext_small", nn.Identity)   # the ConvNeXt term is not LPIPS
    torch.save({}, tmp_path / "convnext_small-0c510722.pth")
    ours = tokenizer.load_perceptual(str(tmp_path)).lpips
    x = torch.rand(2, 3, 32, 32)
    x_near = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    pairs = [(torch.cat([x, x, x]), torch.cat([torch.rand_like(x), x_near, x])),  # far, near, identical
             (torch.rand(1, 3, 24, 40), torch.rand(1, 3, 24, 40))]            # not square
    with torch.no_grad():
        want = [theirs(a, b, normalize=True).flatten() for a, b in pairs]   # normalize: [0, 1] inputs, as ours
        for (a, b), w in zip(pairs, want):
            torch.testing.assert_close(ours(a, b), w, rtol=0, atol=1e-5)
    far, near, same = want[0].split(2)
    assert far.min() > 0.1 and want[1] > 0.1 and 0 < near.max() < 0.1 * far.min() and same.abs().max() == 0


# realistic COCO-style captions: punctuation, contractions, numbers, repeated words (clipping), short candidates
# (brevity penalty), a one-word one (no bigrams), a tie for the closest reference length (id 4: 9 words vs 8 and 10)
CAPTION_CANDIDATES = {
    1: "A man on a surfboard riding a wave in the ocean.",
    2: "A group of people standing around a kitchen.",
    3: "Two dogs playing with a frisbee in the grass!",
    4: "a plate of food with broccoli, rice and meat",
    5: "A red bus is driving down the street.",
    6: "A cat sitting on a laptop's keyboard",
    7: "dogs dogs dogs dogs",
    8: "Bus.",
    9: "A clock tower shows 12:30 next to a 3.5 meter statue",
}
CAPTION_REFERENCES = {
    1: ["A surfer rides a large wave in the ocean.", "A man on a surfboard riding a wave.",
        "Surfer in a black wetsuit riding a wave.", "A person surfing on a big wave", "a man surfing a wave"],
    2: ["People are gathered in a kitchen preparing food.", "Several people standing in a kitchen talking.",
        "A group of friends cooking together in the kitchen."],
    3: ["Two dogs chase a frisbee across a grassy field.", "A pair of dogs play in the grass with a toy.",
        "Two brown dogs running on the lawn", "dogs playing frisbee"],
    4: ["A plate with rice, broccoli and grilled chicken.", "A dish of meat and vegetables on a white plate.",
        "Food on a plate including broccoli."],
    5: ["A double decker bus on a city street.", "A red bus is driving down the road.",
        "The red double-decker bus is parked by the curb.", "a bus in London"],
    6: ["A cat lying on a computer keyboard.", "A kitten sits on top of a laptop.", "The cat's sitting on the laptop."],
    7: ["Three dogs sleeping on a couch.", "Dogs resting together on a sofa."],
    8: ["A city bus stopped at a bus stop.", "A white bus parked on the side of the road."],
    9: ["A tall clock tower in the middle of a city.", "The clock on the tower reads 12:30.",
         "A statue in front of a clock tower."],
}


def test_ptb_tokenize_equals_the_toolkit_tokenizer(tmp_path):
    ptb = pytest.importorskip("pycocoevalcap.tokenizer.ptbtokenizer")
    java = shutil.which("java")
    if java is None:
        pytest.skip("no java: the toolkit's PTBTokenizer is Stanford CoreNLP's (Java)")
    cases = ptb_toolkit_cases()
    (tmp_path / "captions.txt").write_text("\n".join(c for c, _ in cases))
    # ptbtokenizer.py's command and punctuation filter (it writes its input file into site-packages; this does not)
    out = subprocess.run([java, "-cp", str(Path(ptb.__file__).parent / ptb.STANFORD_CORENLP_3_4_1_JAR),
                          "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase",
                          str(tmp_path / "captions.txt")], capture_output=True, text=True, check=True, timeout=120)
    lines = out.stdout.split("\n")[:len(cases)]
    toolkit = [" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS) for line in lines]
    assert list(zip([c for c, _ in cases], toolkit)) == cases            # testdata/ptb_toolkit.txt is the toolkit's
    assert [" ".join(projector.ptb_tokenize(c)) for c, _ in cases] == toolkit


def test_bleu4_and_cider_d_equal_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu         # pure Python (its tokenizer, METEOR and SPICE need Java)
    from pycocoevalcap.cider.cider import Cider      # the toolkit's "CIDEr" is CIDEr-D: clipping, sigma-6 penalty
    corpora = [list(CAPTION_CANDIDATES), [1, 2, 3, 4, 5, 6], [7, 8], [4, 9]]      # idf differs with the corpus
    for ids in corpora:
        cands = {i: CAPTION_CANDIDATES[i] for i in ids}
        refs = {i: CAPTION_REFERENCES[i] for i in ids}
        # the toolkit scores PTB-tokenised text: our tokens, space-joined, as its tokenizer's output would be
        res = {i: [" ".join(projector.ptb_tokenize(c))] for i, c in cands.items()}
        gts = {i: [" ".join(projector.ptb_tokenize(r)) for r in rs] for i, rs in refs.items()}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        cider, _ = Cider().compute_score(gts, res)
        assert 0 < bleu[3] and 0 < cider
        assert projector.bleu4(cands, refs) == pytest.approx(bleu[3], rel=1e-9, abs=0)
        assert projector.cider_d(cands, refs) == pytest.approx(float(cider), rel=1e-9, abs=0)
