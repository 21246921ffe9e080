#!/usr/bin/env python3
"""PyTorch (CPU, float32) reference of the models `repro` trains, for `repro bench train`.

    bench/.venv/bin/python bench/torch_train.py --config JSON --batch B --steps S --threads N

Builds the model described by a ModelConfig JSON (the fields of src/nn/config.rs), trains it on
random token batches (fixed seed) with AdamW + global-norm clipping, and prints ONE line of JSON:
    {"tokens_per_s": ..., "peak_rss_bytes": ..., "total_params": ..., "loss": ..., "isa": ...,
     "torch_version": ..., "variant": ..., "variant_fwd_bwd_ms": {...}, ...}
isa is torch.backends.cpu.get_cpu_capability(). peak_rss_bytes is VmHWM, restarted after the
variant trials (below) so that they do not count.

Written as a fluent PyTorch user would, eager mode: where a kind has more than one reasonable
formulation, all are built over the SAME parameters, checked to compute the same function
(logits and gradients equal up to rounding; one that disagrees with the first is left out,
with a warning, and forcing it is an error), timed on a
forward + backward of the whole model at start-up, and the fastest is used for the timed steps
(`variant`; --variant forces one):
  moe            loop (per expert: gather its tokens, addmm, scatter-add), grouped (slots sorted
                 by expert, padded to the largest group, one baddbmm over all experts), dense
                 (every expert on every token, weighted by the top-k-masked probabilities).
  sgatlin(-gelu), peer
                 index (advanced indexing materialises the selected u and v rows, einsum),
                 embedding_bag (F.embedding for the u rows, F.embedding_bag with
                 per_sample_weights, mode='sum', for the v side, which is never materialised).

The modules mirror src/nn shape for shape, so total_params equals ModelConfig::total_params:
  backbone  tied embedding [vocab, d]; per block: RMSNorm, wq/wk/wv/wo [d, d] (no biases; wq/wk/wv
            fused into one [d, 3d] matmul, same parameters), QK-norm (RMSNorm over the head dim,
            learned scale), RoPE (rotate-half, base 10000), causal softmax, RMSNorm, FFW;
            final RMSNorm; logits = h @ embed^T. RMSNorm eps 1e-6, GELU = tanh approximation.
  mlp       gelu(h W1) W2, no biases.
  swiglu    clamped SwiGLU with biases: z = h W1 + b1 = [gate | lin],
            y = min(gate,7) * sigmoid(1.702 min(gate,7)) * (clamp(lin,-7,7) + 1), out = y W2 + b2.
  moe       16 clamped-SwiGLU experts (width d_ffw, biases; stored stacked [E, ...]), gate [d, E]
            without bias, top-k on the logits, weights = softmax over ALL E logits (not
            renormalised), no aux loss.
  sgatlin   product-key router (W_key [d, d_key], W_sub [d_key, 2 C sqrtN], logits laid out
            [half][channel][sqrtN] as in the Rust router), per-channel pools U, V [C, N, d],
            y = sum_{c,i} act(g_ci * <u_ci, x>) v_ci with act = identity (gelu for sgatlin-gelu).
  peer      one pool U, V [N, d] shared by C heads; query projection [d, 2 C d_key] (columns
            [half][head][d_key]), sub-keys [2 C sqrtN, d_key] (rows [half][head][key]), logits
            scaled 1/sqrt(2 d_key); y = sum gelu(<u, x>) * softmax_k(g) * v.
Training: AdamW(lr 1e-3, betas 0.9/0.999, eps 1e-8, decoupled weight decay 0.1 on everything
except the norm scales, as in src/nn/optim.rs), global-norm clip 1.0, mean token cross-entropy.
No torch.compile: this is the eager-mode baseline.
"""

import argparse
import json
import math
import resource
import sys
import time
import warnings

# The venv has no NumPy; torch warns about it at import time. Harmless here.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

FFN_KINDS = ("mlp", "swiglu", "moe", "peer", "sgatlin", "sgatlin-gelu")
FIELDS = ("vocab", "d_model", "n_layers", "seq_len", "ffn", "channels", "experts", "topk",
          "d_key", "d_ffw")
RMS_EPS = 1e-6
ROPE_BASE = 10000.0
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0


class ConfigError(ValueError):
    pass


# ----------------------------------------------------------------------------- config

def isqrt(n):
    return math.isqrt(n)


def parse_config(text):
    """Parse and validate a ModelConfig JSON exactly like config.rs (all fields required,
    unknown fields rejected, ModelConfig::validate rules)."""
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config is not valid JSON: {e}")
    if not isinstance(cfg, dict):
        raise ConfigError("--config must be a JSON object")
    unknown = sorted(set(cfg) - set(FIELDS))
    if unknown:
        raise ConfigError(f"model config: unknown field(s) {unknown} (expected {list(FIELDS)})")
    missing = [f for f in FIELDS if f not in cfg]
    if missing:
        raise ConfigError(f"model config: missing field(s) {missing}")
    if cfg["ffn"] not in FFN_KINDS:
        raise ConfigError(f"unknown ffn kind `{cfg['ffn']}` (expected {', '.join(FFN_KINDS)})")
    for f in FIELDS:
        if f == "ffn":
            continue
        v = cfg[f]
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"model config: `{f}` must be a non-negative integer, got {v!r}")

    def pos(name):
        if cfg[name] == 0:
            raise ConfigError(f"model config: `{name}` must be positive")

    for f in ("vocab", "d_model", "n_layers", "seq_len"):
        pos(f)
    d = cfg["d_model"]
    if d > 64 and d % 64 != 0:
        raise ConfigError(f"model config: `d_model` = {d} must be a multiple of the head dim 64 "
                          "(or at most 64, one head)")
    if min(d, 64) % 2 != 0:
        raise ConfigError(f"model config: `d_model` = {d} must be even (RoPE rotates pairs)")
    kind = cfg["ffn"]
    if kind in ("mlp", "swiglu"):
        pos("d_ffw")
    elif kind == "moe":
        for f in ("d_ffw", "experts", "topk"):
            pos(f)
        if cfg["topk"] > cfg["experts"]:
            raise ConfigError(f"model config: moe `topk` = {cfg['topk']} exceeds "
                              f"`experts` = {cfg['experts']}")
    else:
        for f in ("channels", "experts", "topk", "d_key"):
            pos(f)
        r = isqrt(cfg["experts"])
        if r * r != cfg["experts"]:
            raise ConfigError(f"model config: `experts` = {cfg['experts']} must be a perfect "
                              "square for product-key routing")
        if cfg["topk"] >= r:
            raise ConfigError(f"model config: `topk` = {cfg['topk']} must be below "
                              f"sqrt(experts) = {r}")
    return cfg


def rust_total_params(cfg):
    """ModelConfig::total_params from src/nn/config.rs, for the cross-check."""
    d, c, n, k, dk, f = (cfg[x] for x in ("d_model", "channels", "experts", "topk", "d_key",
                                          "d_ffw"))
    s = isqrt(n)
    kind = cfg["ffn"]
    if kind == "mlp":
        ffn = 2 * d * f
    elif kind == "swiglu":
        ffn = d * 2 * f + 2 * f + f * d + d
    elif kind == "moe":
        ffn = d * n + n * (d * 2 * f + 2 * f + f * d + d)
    elif kind in ("sgatlin", "sgatlin-gelu"):
        ffn = d * dk + dk * 2 * c * s + 2 * c * n * d
    else:  # peer
        ffn = d * 2 * c * dk + 2 * c * s * dk + 2 * n * d
    hd = min(d, 64)
    backbone = cfg["vocab"] * d + cfg["n_layers"] * (4 * d * d + 2 * d + 2 * hd) + d
    return backbone + cfg["n_layers"] * ffn


# ----------------------------------------------------------------------------- helpers

def lecun_(t, fan_in):
    """Truncated normal with std 1/sqrt(fan_in), cut at 2 std (flax lecun_normal-like)."""
    std = 1.0 / math.sqrt(fan_in)
    return nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std)


def linear(d_in, d_out, bias=False):
    layer = nn.Linear(d_in, d_out, bias=bias)
    lecun_(layer.weight, d_in)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


def gelu(x):
    return F.gelu(x, approximate="tanh")


def clamped_swiglu(z):
    gate, lin = z.chunk(2, dim=-1)
    gate = gate.clamp(max=SWIGLU_LIMIT)
    lin = lin.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
    return gate * torch.sigmoid(SWIGLU_ALPHA * gate) * (lin + 1.0)


def product_key_topk(logits, k):
    """logits [T, 2, C, sqrtN] -> scores g [T, C, k] (raw s1 + s2, differentiable) and
    indices [T, C, k] in 0..N (i1 * sqrtN + i2), best first."""
    s = logits.shape[-1]
    s1, i1 = logits[:, 0].topk(k, dim=-1)                     # [T, C, k]
    s2, i2 = logits[:, 1].topk(k, dim=-1)
    cand = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # [T, C, k*k]
    g, j = cand.topk(k, dim=-1)                               # [T, C, k]
    idx = i1.gather(-1, j // k) * s + i2.gather(-1, j % k)
    return g, idx


# ----------------------------------------------------------------------------- FFN layers

class Mlp(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.w1, self.w2 = linear(d, f), linear(f, d)

    def forward(self, x):
        return self.w2(gelu(self.w1(x)))


class Swiglu(nn.Module):
    """Clamped SwiGLU with biases; w1 produces [gate | lin] (2f), as in ffn/swiglu.rs."""

    def __init__(self, d, f):
        super().__init__()
        self.w1, self.w2 = linear(d, 2 * f, bias=True), linear(f, d, bias=True)

    def forward(self, x):
        return self.w2(clamped_swiglu(self.w1(x)))


class Moe(nn.Module):
    """Experts stored stacked ([E, d, 2f], [E, 2f], [E, f, d], [E, d]: the parameters of E
    clamped-SwiGLU layers), so that every dispatch below computes with the same tensors."""

    VARIANTS = ("loop", "grouped", "dense")

    def __init__(self, d, f, n_experts, k):
        super().__init__()
        self.k, self.n_experts = k, n_experts
        self.variant = "loop"
        self.gate = linear(d, n_experts)
        self.w1 = nn.Parameter(lecun_(torch.empty(n_experts, d, 2 * f), d))
        self.b1 = nn.Parameter(torch.zeros(n_experts, 2 * f))
        self.w2 = nn.Parameter(lecun_(torch.empty(n_experts, f, d), f))
        self.b2 = nn.Parameter(torch.zeros(n_experts, d))

    def forward(self, x):
        logits = self.gate(x)                          # [T, E]
        probs = logits.softmax(dim=-1)                 # over all experts, not renormalised
        top = logits.topk(self.k, dim=-1).indices      # [T, k]
        return getattr(self, "_" + self.variant)(x, probs, top)

    def _loop(self, x, probs, top):
        # The textbook CPU dispatch: per expert, gather its tokens, run it, scatter-add back.
        w1, b1, w2, b2 = (p.unbind(0) for p in (self.w1, self.b1, self.w2, self.b2))
        out = torch.zeros_like(x)
        for e in range(self.n_experts):
            tok = (top == e).any(dim=-1).nonzero().squeeze(1)
            if tok.numel() == 0:
                continue
            h = torch.addmm(b1[e], x.index_select(0, tok), w1[e])
            y = torch.addmm(b2[e], clamped_swiglu(h), w2[e])
            out.index_add_(0, tok, y * probs.index_select(0, tok)[:, e:e + 1])
        return out

    def _grouped(self, x, probs, top):
        # No Python loop: sort the (token, expert) slots by expert, pad every expert's group to
        # the largest, run all experts as one batched matmul, scatter-add back.
        t, d = x.shape
        flat_e = top.reshape(-1)                                # [T k], slot -> expert
        order = flat_e.argsort(stable=True)
        e_sorted = flat_e.index_select(0, order)
        t_sorted = order // self.k                              # slot -> token
        counts = torch.bincount(flat_e, minlength=self.n_experts)
        cap = int(counts.max())
        pos = torch.arange(flat_e.numel()) - (counts.cumsum(0) - counts).index_select(0, e_sorted)
        row = e_sorted * cap + pos                              # slot -> row of [E cap]
        xs = x.new_zeros(self.n_experts * cap, d).index_copy(0, row, x.index_select(0, t_sorted))
        h = torch.baddbmm(self.b1.unsqueeze(1), xs.view(self.n_experts, cap, d), self.w1)
        y = torch.baddbmm(self.b2.unsqueeze(1), clamped_swiglu(h), self.w2).view(-1, d)
        w = probs[t_sorted, e_sorted].unsqueeze(1)
        return torch.zeros_like(x).index_add(0, t_sorted, y.index_select(0, row) * w)

    def _dense(self, x, probs, top):
        # Every expert on every token (E/k times the FLOPs, no gathers), weighted by the
        # router probabilities masked to the top k.
        t, d = x.shape
        xe = x.unsqueeze(0).expand(self.n_experts, t, d)
        h = torch.baddbmm(self.b1.unsqueeze(1), xe, self.w1)              # [E, T, 2f]
        y = torch.baddbmm(self.b2.unsqueeze(1), clamped_swiglu(h), self.w2)  # [E, T, d]
        gate = torch.zeros_like(probs).scatter(1, top, probs.gather(1, top))
        return torch.einsum("te,etd->td", gate, y)


class Sgatlin(nn.Module):
    VARIANTS = ("index", "embedding_bag")

    def __init__(self, d, c, n, k, dk, use_gelu):
        super().__init__()
        self.c, self.n, self.k, self.s = c, n, k, isqrt(n)
        self.use_gelu = use_gelu
        self.variant = "index"
        self.w_key = linear(d, dk)                     # W_key: d x d_key
        self.w_sub = linear(dk, 2 * c * self.s)        # W_sub: d_key x 2*C*sqrtN
        std = 1.0 / math.sqrt(n)                       # fan-in N, as in the reference code
        self.u = nn.Parameter(nn.init.trunc_normal_(torch.empty(c, n, d), std=std,
                                                    a=-2 * std, b=2 * std))
        self.v = nn.Parameter(nn.init.trunc_normal_(torch.empty(c, n, d), std=std,
                                                    a=-2 * std, b=2 * std))
        self.register_buffer("chan_offset", (torch.arange(c) * n).view(1, c, 1),
                             persistent=False)

    def forward(self, x):
        t, d = x.shape
        logits = self.w_sub(self.w_key(x)).view(t, 2, self.c, self.s)  # [half][channel][key]
        g, idx = product_key_topk(logits, self.k)                      # [T, C, k]
        rows = idx + self.chan_offset                                  # rows of the [C*N, d] pool
        u, v = self.u.view(-1, d), self.v.view(-1, d)
        if self.variant == "index":
            # Gather the selected expert vectors, [T, C, k, d] each, and contract.
            u_sel, v_sel = u[rows], v[rows]
            z = g * torch.einsum("tckd,td->tck", u_sel, x)
            if self.use_gelu:
                z = gelu(z)
            return torch.einsum("tck,tckd->td", z, v_sel)
        # embedding_bag: u rows gathered by F.embedding, the v side fused (never materialised).
        flat = rows.view(t, -1)                                        # one bag per token
        a = torch.bmm(F.embedding(flat, u), x.unsqueeze(-1)).view_as(g)
        z = g * a
        if self.use_gelu:
            z = gelu(z)
        return F.embedding_bag(flat, v, per_sample_weights=z.view(t, -1), mode="sum")


class Peer(nn.Module):
    VARIANTS = ("index", "embedding_bag")

    def __init__(self, d, c, n, k, dk):
        super().__init__()
        self.variant = "index"
        self.c, self.n, self.k, self.s, self.dk = c, n, k, isqrt(n), dk
        self.scale = 1.0 / math.sqrt(2 * dk)
        self.w_query = linear(d, 2 * c * dk)           # columns [half][head][d_key]
        self.keys = nn.Parameter(nn.init.trunc_normal_(torch.empty(2 * c * self.s, dk),
                                                       std=1.0, a=-2.0, b=2.0))
        std = 1.0 / math.sqrt(n)
        self.u = nn.Parameter(nn.init.trunc_normal_(torch.empty(n, d), std=std,
                                                    a=-2 * std, b=2 * std))
        self.v = nn.Parameter(nn.init.trunc_normal_(torch.empty(n, d), std=std,
                                                    a=-2 * std, b=2 * std))

    def forward(self, x):
        t = x.shape[0]
        q = self.w_query(x).view(t, 2, self.c, self.dk)
        keys = self.keys.view(2, self.c, self.s, self.dk)             # rows [half][head][key]
        logits = torch.einsum("thcd,hcsd->thcs", q, keys) * self.scale
        g, idx = product_key_topk(logits, self.k)                      # [T, C, k]
        w = g.softmax(dim=-1)
        if self.variant == "index":
            u_sel = self.u[idx]                                        # [T, C, k, d]
            v_sel = self.v[idx]
            coef = gelu(torch.einsum("tckd,td->tck", u_sel, x)) * w
            return torch.einsum("tck,tckd->td", coef, v_sel)
        flat = idx.view(t, -1)                                         # one bag per token
        a = torch.bmm(F.embedding(flat, self.u), x.unsqueeze(-1)).view_as(w)
        coef = gelu(a) * w
        return F.embedding_bag(flat, self.v, per_sample_weights=coef.view(t, -1), mode="sum")


def make_ffn(cfg):
    d, c, n, k, dk, f = (cfg[x] for x in ("d_model", "channels", "experts", "topk", "d_key",
                                          "d_ffw"))
    kind = cfg["ffn"]
    if kind == "mlp":
        return Mlp(d, f)
    if kind == "swiglu":
        return Swiglu(d, f)
    if kind == "moe":
        return Moe(d, f, n, k)
    if kind == "peer":
        return Peer(d, c, n, k, dk)
    return Sgatlin(d, c, n, k, dk, use_gelu=(kind == "sgatlin-gelu"))


# ----------------------------------------------------------------------------- backbone

def rope_tables(seq_len, hd):
    half = hd // 2
    freq = ROPE_BASE ** (-(2.0 * torch.arange(half, dtype=torch.float64)) / hd)
    ang = torch.arange(seq_len, dtype=torch.float64)[:, None] * freq[None, :]
    return ang.cos().float(), ang.sin().float()               # [T, hd/2]


def apply_rope(x, cos, sin):
    """x [B, H, T, hd], rotate-half convention (as cpu/rope.rs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class Attention(nn.Module):
    def __init__(self, d, n_heads, hd):
        super().__init__()
        self.h, self.hd = n_heads, hd
        self.wqkv = linear(d, 3 * d)    # wq, wk, wv fused: 3 d^2 params, like the Rust model
        self.wo = linear(d, d)
        self.q_norm = nn.RMSNorm(hd, eps=RMS_EPS)
        self.k_norm = nn.RMSNorm(hd, eps=RMS_EPS)

    def forward(self, x, cos, sin):
        b, t, d = x.shape
        q, k, v = self.wqkv(x).view(b, t, 3, self.h, self.hd).permute(2, 0, 3, 1, 4)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)   # scale 1/sqrt(hd)
        return self.wo(o.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["d_model"]
        hd = min(d, 64)
        self.attn_norm = nn.RMSNorm(d, eps=RMS_EPS)
        self.attn = Attention(d, d // hd, hd)
        self.ffn_norm = nn.RMSNorm(d, eps=RMS_EPS)
        self.ffn = make_ffn(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        b, t, d = x.shape
        return x + self.ffn(self.ffn_norm(x).view(b * t, d)).view(b, t, d)


class Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg["d_model"]
        self.embed = nn.Embedding(cfg["vocab"], d)
        nn.init.normal_(self.embed.weight, std=1.0 / math.sqrt(d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg["n_layers"]))
        self.final_norm = nn.RMSNorm(d, eps=RMS_EPS)
        cos, sin = rope_tables(cfg["seq_len"], min(d, 64))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x, self.rope_cos, self.rope_sin)
        return self.final_norm(x) @ self.embed.weight.t()      # tied, f32 logits


# ----------------------------------------------------------------------------- variants

def set_variant(model, variant):
    for blk in model.blocks:
        blk.ffn.variant = variant


def forward_backward(model, inp, tgt, vocab):
    model.zero_grad(set_to_none=True)
    logits = model(inp)
    F.cross_entropy(logits.view(-1, vocab), tgt.reshape(-1)).backward()
    return logits


def close(a, b, rtol):
    """|a - b| small against the size of a, as a whole tensor (summation order differs)."""
    return bool((a - b).norm() <= rtol * a.norm() + 1e-12)


def choose_variant(model, inp, tgt, vocab, forced=None):
    """For a kind with several PyTorch formulations (FFN class VARIANTS), check that they compute
    the same function (logits and gradients equal to rounding; this pass is also each
    one's warm-up), then time one forward + backward of the whole model with each, taking turns
    twice (so that load from elsewhere falls on all of them), and keep the fastest by its best
    time. Returns (variant, {variant: best ms}) or (None, {}) for kinds with one form."""
    variants = getattr(model.blocks[0].ffn, "VARIANTS", None)
    if not variants:
        return None, {}
    ref_logits, ref_grads, times = None, None, {}
    agreeing = []
    for v in variants:
        set_variant(model, v)
        logits = forward_backward(model, inp, tgt, vocab).detach()
        grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                 for p in model.parameters()]
        if ref_logits is None:
            ref_logits, ref_grads = logits, grads
            agreeing.append(v)
        else:
            # Relative to the whole (sums in another order differ by rounding, which grows
            # with the model; a wrong formula is off by far more). A variant that disagrees
            # is not timed, so the opponent always computes the reference function.
            names = [n for n, _ in model.named_parameters()]
            bad = None
            if not close(ref_logits, logits, 1e-4):
                err = (logits - ref_logits).abs().max().item()
                bad = f"the forward pass (max |diff| {err:.3g})"
            else:
                for name, g, r in zip(names, grads, ref_grads):
                    # A norm scale's gradient sums many terms of both signs, so its rounding
                    # is large against it; 1% still tells a wrong formula.
                    if not close(r, g, 1e-2):
                        bad = f"the gradient of {name}"
                        break
            if bad is None:
                agreeing.append(v)
            elif forced == v:
                raise SystemExit(f"torch_train.py: variant {v} disagrees with {variants[0]} "
                                 f"on {bad}")
            else:
                print(f"torch_train.py: variant {v} disagrees with {variants[0]} on {bad}; "
                      f"not used", file=sys.stderr)
        del logits, grads
    variants = agreeing
    del ref_logits, ref_grads
    if forced is None:
        for _ in range(2):
            for v in variants:
                set_variant(model, v)
                t0 = time.perf_counter()
                forward_backward(model, inp, tgt, vocab)
                ms = (time.perf_counter() - t0) * 1e3
                times[v] = min(times.get(v, math.inf), ms)
    model.zero_grad(set_to_none=True)
    chosen = forced if forced is not None else min(times, key=times.get)
    set_variant(model, chosen)
    return chosen, times


def release_and_reset_peak():
    """Return freed memory to the system and restart the peak-RSS count (VmHWM) from the
    current resident set, so that the variant trials do not count in the peak. Returns
    whether the reset took."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="ModelConfig as a JSON object")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variant", help="use this formulation instead of timing them all "
                    "(moe: loop, grouped, dense; sgatlin, sgatlin-gelu, peer: index, "
                    "embedding_bag); the self-check still runs")
    args = ap.parse_args()
    try:
        cfg = parse_config(args.config)
        for name in ("batch", "steps", "threads"):
            if getattr(args, name) <= 0:
                raise ConfigError(f"--{name} must be positive")
    except ConfigError as e:
        print(f"torch_train.py: error: {e}", file=sys.stderr)
        sys.exit(2)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = Model(cfg)
    total_params = sum(p.numel() for p in model.parameters())
    expected = rust_total_params(cfg)
    if total_params != expected:
        print(f"torch_train.py: warning: total_params {total_params} != Rust "
              f"ModelConfig::total_params {expected}", file=sys.stderr)
    variants = getattr(model.blocks[0].ffn, "VARIANTS", ())
    if args.variant is not None and args.variant not in variants:
        print(f"torch_train.py: error: --variant {args.variant} is not one of "
              f"{list(variants) or 'nothing (this kind has one form)'}", file=sys.stderr)
        sys.exit(2)

    # Decoupled weight decay on everything but the norm scales (src/nn/optim.rs).
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if "norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8, foreach=True)

    gen = torch.Generator().manual_seed(args.seed)
    vocab, seq = cfg["vocab"], cfg["seq_len"]

    def batch():
        rows = torch.randint(vocab, (args.batch, seq + 1), generator=gen)
        return rows[:, :-1], rows[:, 1:]

    variant, variant_ms = choose_variant(model, *batch(), vocab, args.variant)
    peak_reset = release_and_reset_peak()

    def step():
        inp, tgt = batch()
        logits = model(inp)
        loss = F.cross_entropy(logits.view(-1, vocab), tgt.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        return loss

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss = loss.item()
    secs = time.perf_counter() - t0

    print(json.dumps({
        "tokens_per_s": args.steps * args.batch * seq / secs,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_rss_reset_after_variant_trials": peak_reset,
        "total_params": total_params,
        "loss": loss,
        "isa": torch.backends.cpu.get_cpu_capability(),
        "torch_version": torch.__version__,
        "variant": variant,
        "variant_fwd_bwd_ms": variant_ms,
    }))


if __name__ == "__main__":
    main()
