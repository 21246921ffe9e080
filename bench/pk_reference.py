#!/usr/bin/env python3
"""The product-key expert layer written the ordinary PyTorch way, timed: the reference that
`repro bench kernels --device cuda` prints beside its own kernels.

Router: top-k of each half of the sub-key logits, the k x k candidate sums, top-k of those
(torch.topk; its ties are not ordered as repro's, which does not matter for timing).
Experts: gather u and v rows (materialised [T, C, k, d]), einsum with x, the gate, einsum with
v; backward by autograd with a random dy. sgatlin: z = g * (u . x); sgatlin-gelu:
z = gelu(g * (u . x)); peer: z = gelu(u . x) * softmax_k(g), one pool shared by the channels.

Prints one line: `fwd_ms=<median> bwd_ms=<median> tokens=<T run> scale=<T asked / T run>`;
when the materialised gathers do not fit, it halves T (up to 4 times) and says so in `scale`
(the times are then per the smaller T; multiply by scale for the whole step).
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def route(logits, channels, sqrt_n, k):
    """logits [T, 2, C, sqrt_n] -> scores [T, C, k], pool indices [T, C, k] (within a channel)."""
    s1, i1 = logits[:, 0].topk(k, dim=-1)  # [T, C, k]
    s2, i2 = logits[:, 1].topk(k, dim=-1)
    cand = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # [T, C, k*k]
    g, pos = cand.topk(k, dim=-1)
    idx = i1.gather(-1, pos // k) * sqrt_n + i2.gather(-1, pos % k)
    return g, idx


def layer(kind, x, logits, u, v, channels, sqrt_n, k):
    g, idx = route(logits, channels, sqrt_n, k)
    n = sqrt_n * sqrt_n
    if kind != "peer":
        idx = idx + torch.arange(channels, device=x.device).view(1, channels, 1) * n
    ug, vg = u[idx], v[idx]  # [T, C, k, d] each
    a = torch.einsum("td,tckd->tck", x, ug)
    if kind == "sgatlin":
        z = g * a
    elif kind == "sgatlin-gelu":
        z = F.gelu(g * a)
    else:
        z = F.gelu(a) * torch.softmax(g, dim=-1)
    return torch.einsum("tck,tckd->td", z, vg)


def measure(args, tokens, dev):
    c, sn, k, d = args.channels, args.sqrt_n, args.k, args.d
    rows = sn * sn if args.kind == "peer" else c * sn * sn
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(tokens, d, device=dev, generator=gen, requires_grad=True)
    logits = torch.randn(tokens, 2, c, sn, device=dev, generator=gen, requires_grad=True)
    u = (torch.randn(rows, d, device=dev, generator=gen) / d**0.5).requires_grad_()
    v = (torch.randn(rows, d, device=dev, generator=gen) / d**0.5).requires_grad_()
    dy = torch.randn(tokens, d, device=dev, generator=gen)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    fwd, bwd = [], []
    for rep in range(args.reps + 1):
        for p in (x, logits, u, v):
            p.grad = None
        sync()
        t0 = time.perf_counter()
        y = layer(args.kind, x, logits, u, v, c, sn, k)
        sync()
        t1 = time.perf_counter()
        y.backward(dy)
        sync()
        t2 = time.perf_counter()
        del y
        if rep > 0:  # the first is a warm-up
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
    return statistics.median(fwd), statistics.median(bwd)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=["sgatlin", "sgatlin-gelu", "peer"], default="sgatlin")
    ap.add_argument("--tokens", type=int, default=65536)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--sqrt-n", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    dev = torch.device(args.device)
    tokens = args.tokens
    for _ in range(5):
        try:
            f, b = measure(args, tokens, dev)
            break
        except torch.cuda.OutOfMemoryError:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            tokens //= 2
    else:
        raise SystemExit(f"out of memory down to {tokens * 2} tokens")
    print(f"fwd_ms={f:.3f} bwd_ms={b:.3f} tokens={tokens} scale={args.tokens / tokens:g}")


if __name__ == "__main__":
    main()
