"""FlowTok's flow: a plain DiT velocity field that carries text tokens straight into image tokens.

Every formula of the flow lives in this file:

    source   x0 = z(text)                       (B, 77, 16)  TextProjector sample, t = 0
    target   x1 = tokenizer sample * 1.0143     (B, 77, 16)  image tokens, t = 1
    time     t = sigmoid(n), n ~ N(0, 1)                     logit-normal
    path     x_t = (1 - (1 - s) t) x0 + t x1,  s = sigma_min = 1e-5
    target   v* = x1 - (1 - s) x0                            (no stop-gradient: x0 is trained through both)
    CFG      10% of samples get the null indicator and a target rolled among the null samples
    loss     mean_b ||v(x_t, t, null) - v*||^2 / 1232  +  w_con * L_align(z, MLP(E))  +  w_kl * KL(mu, logvar)
    sampling Euler on the official grid, v = v_u + s (v_c - v_u), both branches in ONE batched pass;
             `solve` adds Heun, midpoint and 2nd-order Adams-Bashforth on a (shiftable) uniform grid

The DiT sees only x_t, t and the 2-way null indicator: no cross-attention, no text input besides the
starting point. Image-to-text uses the same model and sampler with source and target swapped.
Official names: parameter names match the released FlowTok-XL/H checkpoints (see load_official_flowtok).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from projector import KL_TERMS, TextProjector, contrastive_loss
from runtime import load_strict, read_state_dict

SIGMA_MIN = 1e-5
CFG_PROB = 0.1           # fraction of training samples that get the null indicator
DEFAULT_STEPS = 20       # Euler steps when sampling (the official sampler)
DEFAULT_CFG = 2.0        # guidance scale when sampling (the official sampler)


# ----------------------------------------------------------------------------------------------------------
# Building blocks (DiT, adaLN-Zero)
# ----------------------------------------------------------------------------------------------------------

def sincos_positions(n, dim):
    """Fixed 1D sin-cos table (n, dim), MAE style: [sin(p w_k) | cos(p w_k)], w_k = 10000^(-k/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(n, dtype=torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def timestep_embedding(t, dim=256, max_period=10000):
    """t (B,) in [0, 1], used raw (no x1000) -> (B, dim) = [cos(t f_k) | sin(t f_k)], f_k = e^(-ln(P) k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """t -> Linear(256, D) -> SiLU -> Linear(D, D)."""

    def __init__(self, width, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t):
        return self.mlp(timestep_embedding(t, self.freq_dim))


class LabelEmbedder(nn.Module):
    """The CFG indicator: row 0 = conditional, row 1 = null (unconditional)."""

    def __init__(self, width):
        super().__init__()
        self.embedding_table = nn.Embedding(2, width)

    def forward(self, null):
        return self.embedding_table(null.long())


class Attention(nn.Module):
    """Multi-head self-attention over the tokens (no mask)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    """fc2(GELU_tanh(fc1(x)))."""

    def __init__(self, width, hidden):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block: six modulation vectors from the condition c gate attention and MLP."""

    def __init__(self, width, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then Linear(D, out)."""

    def __init__(self, width, out):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ----------------------------------------------------------------------------------------------------------
# The velocity model
# ----------------------------------------------------------------------------------------------------------

class FlowDiT(nn.Module):
    """v(x_t, t, null): (B, 77, 16), (B,) in [0, 1], (B,) bool -> velocity (B, 77, 16).

    patch_size groups that many consecutive latent tokens into one transformer token (77 = 7 x 11, so 1, 7 or
    11): a CPU speed knob for the demo. The default 1 is the official model.
    """

    def __init__(self, depth=28, width=1152, heads=16, mlp_ratio=4.0, channels=16, num_tokens=77, patch_size=1):
        super().__init__()
        if num_tokens % patch_size:
            raise ValueError(f"patch_size {patch_size} must divide the {num_tokens} tokens")
        self.config = dict(depth=depth, width=width, heads=heads, mlp_ratio=mlp_ratio, channels=channels,
                           num_tokens=num_tokens, patch_size=patch_size)
        self.channels, self.patch_size = channels, patch_size
        self.x_embedder = nn.Linear(channels * patch_size, width)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(width)
        self.register_buffer("pos_embed", sincos_positions(num_tokens // patch_size, width)[None])  # (1, N, D)
        self.blocks = nn.ModuleList([DiTBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(width, channels * patch_size)
        self.grad_checkpointing = False
        self.initialize_weights()

    def initialize_weights(self):
        """Official (DiT) init: Xavier Linear, N(0, 0.02) embeddings, adaLN and output zeroed (output starts at 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                      self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, null):
        B, L, C = x.shape
        h = self.x_embedder(x.reshape(B, L // self.patch_size, C * self.patch_size)) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(null)                     # (B, D): the only conditioning
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        return self.final_layer(h, c).reshape(B, L, C)


FLOW_MODELS = {
    "S": dict(depth=12, width=384, heads=6),
    "B": dict(depth=12, width=768, heads=12),
    "L": dict(depth=24, width=1024, heads=16),
    "XL": dict(depth=28, width=1152, heads=16),
    "H": dict(depth=36, width=1280, heads=20),
    # not in the paper: CPU sizes for the tests and the embedded demo
    "tiny": dict(depth=2, width=64, heads=4),
    "demo": dict(depth=4, width=128, heads=4),
}


# The registry of velocity networks v(x_t (B, 77, 16), t (B,), null (B,) bool) -> (B, 77, 16): name -> class. A new
# network is one class with that forward and a `config` dict of its constructor's arguments, registered here
# (or by a test: VELOCITY_NETS["toy"] = Toy); train.py --backbone NAME trains it, and every loader builds it by the
# name its checkpoint records.
VELOCITY_NETS = {"dit": FlowDiT}


def velocity_net(backbone="dit", **config):
    """The one place a velocity network is built: VELOCITY_NETS[backbone](**config), its `config` recording the
    backbone's name. Configs recorded before backbones had names (no `backbone`) are the DiT."""
    if backbone not in VELOCITY_NETS:
        raise ValueError(f"unknown velocity network {backbone!r} (registered in flow_dit.VELOCITY_NETS: "
                         f"{', '.join(VELOCITY_NETS)})")
    net = VELOCITY_NETS[backbone](**config)
    net.config = {"backbone": backbone, **net.config}
    return net


def build_flowtok(size, projector_kwargs=None, **dit_kwargs):
    """FLOW_MODELS[size] -> (FlowDiT, TextProjector) with the official text-projector defaults."""
    if size not in FLOW_MODELS:
        raise ValueError(f"unknown FlowTok size {size!r}; choose from {list(FLOW_MODELS)}")
    return FlowDiT(**{**FLOW_MODELS[size], **dit_kwargs}), TextProjector(**(projector_kwargs or {}))


# ----------------------------------------------------------------------------------------------------------
# Flow matching: path, CFG trick, loss, sampler
# ----------------------------------------------------------------------------------------------------------

def draw_time_and_null(n_t, n_null, cfg_prob=CFG_PROB):
    """Per-sample standard normals (B,), (B,) -> t = sigmoid(n_t) (logit-normal) and null = Phi(n_null) < cfg_prob.

    Both come from normals so that one per-sample noise vector (data.py, seeded by stream position) holds every
    random draw of a sample: resuming and any number of ranks or workers reproduce them exactly.
    """
    uniform = 0.5 * (1 + torch.erf(n_null / math.sqrt(2)))                 # Phi: uniform in (0, 1)
    return torch.sigmoid(n_t), uniform < cfg_prob


def flow_path(x0, x1, t):
    """x_t = (1 - (1 - s) t) x0 + t x1 and the target velocity v* = x1 - (1 - s) x0."""
    tt = t.float()[:, None, None]
    return (1 - (1 - SIGMA_MIN) * tt) * x0 + tt * x1, x1 - (1 - SIGMA_MIN) * x0


def cfg_shuffle(x1, null):
    """The official CFG training trick: null samples get the next null sample's target (cyclically).

    With null indices i_1 < ... < i_k: x1[i_j] <- x1[i_(j+1)], x1[i_k] <- x1[i_1]; with k <= 1 no sample is
    null. Tensor-only (no boolean indexing, no host sync); returns (x1', null'); the input is not modified.
    """
    k = null.sum()
    null = null & (k > 1)
    order = torch.argsort((~null).int(), stable=True)             # null indices first, increasing
    rank = torch.cumsum(null.int(), 0) - 1                         # position of each null sample among them
    src = order[(rank + 1) % k.clamp(min=1)]                       # the next null sample, cyclically
    src = torch.where(null, src, torch.arange(len(null), device=null.device))
    return x1[src], null


def expected_null_fraction(batch, cfg_prob=CFG_PROB):
    """The expected fraction of samples trained unconditionally in batches of `batch` under cfg_shuffle's rule.

    A sample stays null when it is drawn null (cfg_prob) and at least one of the other batch - 1 is too:
    cfg_prob * (1 - (1 - cfg_prob)^(batch - 1)); 10.0% at the official 128, 5.2% at 8, 0 at 1.
    """
    return cfg_prob * (1 - (1 - cfg_prob) ** (batch - 1))


def flow_loss(dit, x0, x1, t, null):
    """Flow matching with the CFG trick for one (per-GPU) batch, any direction: source x0 -> target x1."""
    x1, null = cfg_shuffle(x1, null)      # within this micro-batch, as officially per GPU (flow_matching.py:262-268)
    xt, target = flow_path(x0, x1, t)
    pred = dit(xt, t, null)
    diff = ((pred.float() - target) ** 2).mean(dim=(1, 2))                 # (B,)
    return dict(diff=diff.mean(), diff_per_sample=diff, x0=x0, x1=x1, xt=xt, target=target, pred=pred, null=null)


def flowtok_loss(dit, projector, clip_feats, x1, t, null, eps=None, w_con=1.0, w_kl=0.01, kl="official",
                 groups=None, gather=None):
    """The text-to-image objective: flow loss from z(text) + w_con * L_align + w_kl * KL; float32 scalars.

    clip_feats (B, 77, C) frozen CLIP features; x1 (B, 77, 16) flow-space image tokens; t (B,); null (B,) bool
    CFG draws (before the "k <= 1" rule); eps (B, 77, 16) text noise (None: drawn). w_con / w_kl = 0 drops a
    term. groups: optional (B,) caption ids (equal ids are all positives). gather: optional function that
    concatenates a tensor over all ranks (contrastive negatives from every GPU instead of the local batch).
    """
    # Every term is computed on this micro-batch alone, as the official code does on its per-GPU batch of 128
    # (diffusion/flow_matching.py:237-257 of the FlowTok release): the contrastive softmax over its samples,
    # the official KL summed over them; the trainer averages micro-batches and DDP averages processes.
    z, mu, logvar = projector(clip_feats, eps)
    out = flow_loss(dit, z, x1, t, null)
    out.update(mu=mu, logvar=logvar)
    zero = out["diff"].new_zeros(())
    if w_con:
        p = projector.align(clip_feats)
        if gather is not None:
            z, p, groups = gather(z), gather(p), None if groups is None else gather(groups)
        out["contrastive"] = w_con * contrastive_loss(z, p, projector.log_temperature, groups)
    else:
        out["contrastive"] = zero
    out["kl"] = w_kl * KL_TERMS[kl][0](mu, logvar) if w_kl else zero
    out["loss"] = out["diff"] + out["contrastive"] + out["kl"]
    return out


def sampling_schedule(steps, device=None):
    """The official Euler grid: evaluate at linspace(0, 1 - s, N), step by diff(linspace(s, 1, N + 1))."""
    t_eval = torch.linspace(0, 1 - SIGMA_MIN, steps, device=device)
    dt = torch.diff(torch.linspace(SIGMA_MIN, 1.0, steps + 1, device=device))
    return t_eval, dt


@torch.no_grad()
def euler_sample(dit, x0, steps=DEFAULT_STEPS, cfg=DEFAULT_CFG, trajectory=False, before_step=None):
    """Integrate dx/dt = v from x0 (t = 0) to t = 1 with classifier-free guidance done as ONE batched pass.

    v = v_u + cfg * (v_c - v_u); cfg == 1 runs the conditional branch alone. Returns x1 (B, 77, 16), or the
    (steps + 1, B, 77, 16) trajectory. before_step() runs before each DiT call (sample.py marks a CUDA graph step
    there); each step reads the DiT's output before the next call, so a graph may reuse its output buffer.
    """
    t_eval, dt = sampling_schedule(steps, x0.device)
    x, traj = x0, [x0]
    for i in range(steps):
        if before_step is not None:
            before_step()
        x = x + dt[i] * guided_velocity(dit, x, t_eval[i], cfg)
        traj.append(x)
    return torch.stack(traj) if trajectory else x


def guided_velocity(dit, x, t, cfg):
    """v at (x (B, 77, 16), t: a float or 0-d tensor) with CFG as ONE batched pass: v_u + cfg * (v_c - v_u);
    cfg == 1: the conditional branch alone."""
    guided = cfg != 1.0
    inp = torch.cat([x, x]) if guided else x
    null = torch.arange(len(inp), device=x.device) >= len(x)               # [cond x B | null x B]
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).expand(len(inp))
    v = dit(inp, t, null).float()
    if guided:
        v_c, v_u = v.chunk(2)
        v = v_u + cfg * (v_c - v_u)
    return v


def time_grid(steps, shift=1.0, device=None):
    """steps + 1 times from 0 to 1; shift > 1 puts more of them near t = 1 (t -> shift t / (1 + (shift - 1) t))."""
    t = torch.linspace(0, 1, steps + 1, device=device, dtype=torch.float64)
    return (shift * t / (1 + (shift - 1) * t)).tolist()


@torch.no_grad()
def solve(dit, x0, steps=DEFAULT_STEPS, cfg=DEFAULT_CFG, sampler="euler", shift=1.0, before_step=None):
    """x0 (t = 0) -> x1 (t = 1) with `sampler` -> (x1, network passes). euler: the official sampler (euler_sample,
    its own grid, bitwise as before); on time_grid(steps, shift): heun and midpoint (2nd order, 2 passes a step;
    Heun's last pass is at t = 1), ab2 (2nd-order Adams-Bashforth for uneven steps: 1 pass a step, the previous
    velocity reused; its first step is Euler's)."""
    if sampler == "euler":
        return euler_sample(dit, x0, steps, cfg, before_step=before_step), steps

    def v(x, t):
        if before_step is not None:     # a CUDA graph step reuses its output buffer: keep a copy of what is kept
            before_step()
            return guided_velocity(dit, x, t, cfg).clone()
        return guided_velocity(dit, x, t, cfg)
    ts, x, previous = time_grid(steps, shift), x0, None
    for k in range(steps):
        t, h = ts[k], ts[k + 1] - ts[k]
        v1 = v(x, t)
        if sampler == "heun":
            x = x + h / 2 * (v1 + v(x + h * v1, t + h))
        elif sampler == "midpoint":
            x = x + h * v(x + h / 2 * v1, t + h / 2)
        elif sampler == "ab2":
            r = 0.0 if previous is None else h / previous[1]    # step ratio h_k / h_(k-1); 0: Euler's first step
            x = x + h * ((1 + r / 2) * v1 - (r / 2) * (v1 if previous is None else previous[0]))
            previous = (v1, h)
        else:
            raise ValueError(f"unknown sampler {sampler!r}: one of {', '.join(SAMPLERS)}")
    return x, steps * SAMPLERS[sampler]


SAMPLERS = {"euler": 1, "heun": 2, "midpoint": 2, "ab2": 1}    # name -> network passes per step (NFE = steps x)


# ----------------------------------------------------------------------------------------------------------
# Official checkpoints (FlowTok-XL.pth, FlowTok-H.pth)
# ----------------------------------------------------------------------------------------------------------

def convert_official_flowtok(sd):
    """Official FlowTok state dict -> (dit_sd, projector_sd); raises if any key is left unconsumed."""
    dit, proj, qkv, left = {}, {}, {}, []
    for k, v in sd.items():
        if k.split(".")[0] in ("pos_embed", "x_embedder", "t_embedder", "y_embedder", "blocks", "final_layer"):
            dit[k] = v
        elif k == "t2t_temperature":
            proj["log_temperature"] = v
        elif k.startswith("context_projector."):
            proj["align_mlp." + k.removeprefix("context_projector.")] = v
        elif k.startswith("context_encoder."):
            k = k.removeprefix("context_encoder.").replace(".attn.W_O.", ".proj.").replace(".feed_forward.", ".")
            if ".attn.W_" in k:                            # "layers.0.attn.W_Q.weight": fused into qkv below
                layer, rest = k.split(".attn.W_")
                qkv.setdefault(f"{layer}.qkv.{rest[2:]}", {})[rest[0]] = v
            else:
                proj[k] = v
        else:
            left.append(k)
    for k, parts in qkv.items():                           # one GEMM instead of three: rows [Q; K; V]
        if sorted(parts) != ["K", "Q", "V"]:
            left.append(f"{k} (only {sorted(parts)} of Q, K, V)")
            continue
        proj[k] = torch.cat([parts["Q"], parts["K"], parts["V"]], dim=0)
    if left:
        raise ValueError(f"unexpected keys in the FlowTok checkpoint: {left[:10]}")
    return dit, proj


def load_official_flowtok(src, heads=None, projector_heads=8):
    """The official FlowTok checkpoint (path or state dict, plain or wrapped) -> (FlowDiT, TextProjector).

    The DiT size is inferred from the shapes (heads from FLOW_MODELS, or given); every key must be consumed.
    """
    dit_sd, proj_sd = convert_official_flowtok(read_state_dict(src))
    try:
        width = dit_sd["x_embedder.weight"].shape[0]
        depth = 1 + max(int(k.split(".")[1]) for k in dit_sd if k.startswith("blocks."))
        clip_dim = proj_sd["linear.weight"].shape[1]
        proj_cfg = dict(clip_dim=clip_dim, depth=1 + max(int(k.split(".")[1]) for k in proj_sd
                                                         if k.startswith("layers.")),
                        heads=projector_heads, d_ff=proj_sd["layers.0.ffn_1.weight"].shape[0],
                        channels=proj_sd["linear.weight"].shape[0] // 2,
                        align_hidden=proj_sd["align_mlp.0.weight"].shape[0])
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a FlowTok checkpoint (cannot read its sizes: {e})") from None
    if heads is None:
        match = [n for n, c in FLOW_MODELS.items() if (c["width"], c["depth"]) == (width, depth)]
        if not match:
            raise ValueError(f"FlowTok checkpoint of width {width} and depth {depth} matches no size in "
                             f"FLOW_MODELS; pass heads=")
        heads = FLOW_MODELS[match[0]]["heads"]
    with torch.device("meta"):
        dit = FlowDiT(depth=depth, width=width, heads=heads, channels=dit_sd["x_embedder.weight"].shape[1])
        projector = TextProjector(**proj_cfg)
    load_strict(dit, dit_sd, "FlowTok DiT")
    load_strict(projector, proj_sd, "FlowTok text projector")
    return dit, projector
