"""FlowTok test suite: CPU, tiny configs, minutes. Run: python -m pytest -q test_flowtok.py

Known answers, equivalence with the official code (testdata/official_tiny.pt, produced by the official
FlowTok code at tiny sizes), round trips, resume and DDP checks, bad-input corpora and CLI runs.
"""
import json
import math
import os
from pathlib import Path

import pytest
import torch

import flow_dit
import projector
import tokenizer
from flow_dit import FLOW_MODELS, FlowDiT, build_flowtok, euler_sample, flowtok_loss, load_official_flowtok
from projector import CLIPTextEncoder, TextDecoder, TextProjector
from tokenizer import Tokenizer, load_official_tokenizer

TESTDATA = Path(__file__).parent / "testdata"
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
    tokenizer.load_strict(dit, dit_sd, "dit")
    tokenizer.load_strict(proj, proj_sd, "projector")
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
    tokenizer.load_strict(tok, tokenizer.convert_official_tokenizer(d["flowtitok_state_dict"]), "tok")
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
    with pytest.raises(ValueError, match="matches no size"):
        load_official_flowtok(official["flowtok_state_dict"])


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
    pos = torch.ones(2, 2, dtype=torch.bool)
    got = projector.contrastive_loss(z, p, torch.tensor(0.0), positives=pos)
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


def test_bf16_autocast_keeps_posteriors_and_losses_float32():
    torch.manual_seed(0)
    dit, proj = FlowDiT(depth=1, width=64, heads=4), TextProjector(clip_dim=64, depth=1, heads=4, d_ff=96)
    tok = Tokenizer.from_preset("tiny")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mean, logvar = tok.encode(torch.rand(2, 3, 32, 32))
        out = flowtok_loss(dit, proj, torch.randn(2, 77, 64), torch.randn(2, 77, 16), torch.rand(2),
                           torch.zeros(2, dtype=torch.bool))
    assert mean.dtype == logvar.dtype == torch.float32
    assert all(out[k].dtype == torch.float32 for k in ("loss", "diff", "kl", "contrastive", "mu", "logvar", "x0"))


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


# ----------------------------------------------------------------------------------------------------------
# Model core: CLIP text side
# ----------------------------------------------------------------------------------------------------------

def test_tokenize_matches_open_clip_and_reports_truncation():
    import open_clip
    texts = ["a large red circle on the left", "word " * 100, "", "Ünïcode & <b>html</b>  spaces"]
    ids, truncated = projector.tokenize(texts)
    assert torch.equal(ids, open_clip.SimpleTokenizer()(texts))
    assert truncated.tolist() == [False, True, False, False]
    assert ids[1, -1].item() == projector.EOT and ids[0, 0].item() == projector.SOT
    assert projector.detokenize(ids[:1]) == ["a large red circle on the left"]
    assert projector.detokenize(torch.tensor([[projector.SOT, projector.EOT] + [0] * 75])) == [""]


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

    import huggingface_hub

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(RuntimeError) as e:
        CLIPTextEncoder("tiny", weights="openai")
    assert "open_clip_model.safetensors" in str(e.value) and "--clip-weights" in str(e.value)


def test_text_decoder_and_reconstruction_loss():
    torch.manual_seed(0)
    dec = TextDecoder(width=32, depth=2, heads=4, d_ff=64, vocab=projector.CLIP_VOCAB)
    logits = dec(torch.randn(2, 77, 16))
    assert logits.shape == (2, 77, projector.CLIP_VOCAB)
    ids, _ = projector.tokenize(["a red circle", "a blue square on the left"])
    # perfect logits on SOT..EOT give ~0 loss whatever the padding positions predict
    perfect = torch.full((2, 77, projector.CLIP_VOCAB), -1e4)
    perfect.scatter_(2, ids[..., None], 1e4)
    perfect[:, -1] = 0.0                     # garbage after EOT is ignored
    assert projector.text_reconstruction_loss(perfect, ids).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.zeros(2, 77, projector.CLIP_VOCAB)
    uniform[:, -1, 0] = 1e4                  # a confident wrong guess after EOT must not count either
    expected = math.log(projector.CLIP_VOCAB)
    assert projector.text_reconstruction_loss(uniform, ids).item() == pytest.approx(expected, rel=1e-6)
