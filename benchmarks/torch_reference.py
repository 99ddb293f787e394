"""PyTorch reference of abot's transformer and AdamW step, for side-by-side speed figures.

benchmarks/speedrun.py trains it too, with `make_optimizers` (AdamW, or PyTorch's own Muon on the blocks'
matrices + AdamW on the rest) and scores it with `next_token_loss`, abot's next-token loss formula.

Same model as abot/models/transformer.py: pre-RMSNorm, rotate-half RoPE, causal SDPA, SwiGLU MLP of
mlp_multiple * d_model, tied embeddings, GPT-2 init; AdamW (betas 0.9/0.95, decay on matrices), global-norm
clip 1.0. float32 on the CPU (benchmarks/train_speed.py, when torch is installed: `pip install
torch==2.13.0`); on CUDA (benchmarks/gpu_speed.py) float32 master weights with bfloat16 autocast, eager or
`torch.compile` of forward + loss, and the fused AdamW kernel: PyTorch's fastest standard recipe.

    python benchmarks/torch_reference.py --device cuda --precision bfloat16 --compile --dims 768,12,12,1024,16
prints one JSON line: tokens_per_s, step_s, peak_mem_gb (CUDA), threads.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F


def rope_tables(seq: int, d_head: int, theta: float):
    inv = theta ** (-torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    return angles.cos(), angles.sin()


def rotate_half(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def init_params(vocab: int, d: int, layers: int, mlp_multiple: float = 4.0, device: str = "cpu") -> dict:
    h, std = int(mlp_multiple * d), 0.02
    out_std = std / math.sqrt(2 * layers)
    normal = lambda *shape, s=std: (torch.randn(*shape, device=device) * s).requires_grad_()  # noqa: E731
    ones = lambda n: torch.ones(n, device=device, requires_grad=True)  # noqa: E731
    params = {"embed": normal(vocab, d), "final_norm": ones(d)}
    for i in range(layers):
        for name, shape, s in [("wq", (d, d), std), ("wk", (d, d), std), ("wv", (d, d), std), ("wo", (d, d), out_std),
                               ("w_gate", (d, h), std), ("w_up", (d, h), std), ("w_down", (h, d), out_std)]:
            params[f"{i}.{name}"] = normal(*shape, s=s)
        params[f"{i}.attn_norm"] = ones(d)
        params[f"{i}.mlp_norm"] = ones(d)
    return params


def forward(params: dict, tokens, layers: int, heads: int, cos, sin, eps: float = 1e-5):
    x = params["embed"][tokens]
    b, t, d = x.shape
    for i in range(layers):
        p = lambda n: params[f"{i}.{n}"]  # noqa: E731
        h = F.rms_norm(x, (d,), p("attn_norm"), eps)
        q, k, v = ((h @ p(w)).view(b, t, heads, d // heads).transpose(1, 2) for w in ("wq", "wk", "wv"))
        q, k = rotate_half(q, cos, sin), rotate_half(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + a @ p("wo")
        h = F.rms_norm(x, (d,), p("mlp_norm"), eps)
        x = x + (F.silu(h @ p("w_gate")) * (h @ p("w_up"))) @ p("w_down")
    x = F.rms_norm(x, (d,), params["final_norm"], eps)
    return x @ params["embed"].T


def next_token_loss(params: dict, tokens, layers: int, heads: int, cos, sin):
    """Mean next-token cross-entropy on (batch, seq + 1) windows: abot.losses.next_token's formula."""
    logits = forward(params, tokens[:, :-1], layers, heads, cos, sin)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def make_optimizers(params: dict, name: str, lr: float, weight_decay: float = 0.02, fused: bool = False,
                    ns_steps: int = 5, b1: float = 0.9) -> list:
    """The optimizers of one recipe, to be stepped together: "adamw", or "muon" (PyTorch's own).

    "muon": `torch.optim.Muon` on the blocks' matrices, with `adjust_lr_fn="match_rms_adamw"` (0.2
    sqrt(max(rows, cols)), as abot's muon_adamw) so that one lr serves both groups, and AdamW on the rest
    (embedding, norms). AdamW: betas b1/0.95 (b1 0.9 by default), weight decay on matrices only.
    """
    hidden = {k: p for k, p in params.items() if name == "muon" and "." in k and p.ndim == 2}
    rest = [p for k, p in params.items() if k not in hidden]
    groups = [{"params": [p for p in rest if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0}]
    opts = [torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(b1, 0.95), eps=1e-8,
                              **({"fused": True} if fused else {}))]
    if name == "muon":
        opts.append(torch.optim.Muon(list(hidden.values()), lr=lr, weight_decay=weight_decay,
                                     adjust_lr_fn="match_rms_adamw", ns_steps=ns_steps))
    elif name != "adamw":
        raise ValueError(f"optimizer {name!r}: 'adamw' or 'muon'")
    return opts


def bench(d: int, layers: int, heads: int, seq: int, batch: int, vocab: int, steps: int, warmup: int = 3,
          device: str = "cpu", precision: str = "float32", compile: bool = False) -> dict:
    torch.manual_seed(0)
    cuda = device == "cuda"
    params = init_params(vocab, d, layers, device=device)
    (opt,) = make_optimizers(params, "adamw", 1e-3, fused=cuda)
    cos, sin = (t.to(device) for t in rope_tables(seq, d // heads, 10000.0))
    tokens = torch.randint(0, vocab, (batch, seq + 1), device=device)

    def loss_fn(params, tokens):
        return next_token_loss(params, tokens, layers, heads, cos, sin)

    if compile:
        loss_fn = torch.compile(loss_fn)
    autocast = (torch.autocast(device, dtype=getattr(torch, precision)) if precision != "float32"
                else contextlib.nullcontext())
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        with autocast:
            loss = loss_fn(params, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"tokens_per_s": batch * seq / step_s, "step_s": step_s, "threads": torch.get_num_threads(),
            "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", required=True, help="d_model,n_layers,n_heads,seq_len,batch")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    d, layers, heads, seq, batch = (int(x) for x in args.dims.split(","))
    print(json.dumps(bench(d, layers, heads, seq, batch, args.vocab, args.steps, device=args.device,
                           precision=args.precision, compile=args.compile)))


if __name__ == "__main__":
    main()
