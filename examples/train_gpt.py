"""Train a small GPT on the Python standard library's own source, character by character
(bytes), with flash_ext's attention or torch's SDPA, from the same seed and data order.

    python3 examples/train_gpt.py --attention flash_ext
    python3 examples/train_gpt.py --attention sdpa

Each run prints tokens/s and peak memory and writes its losses (JSON) and loss curve (PNG)
under --out; once both runs are there, a plot of the two together as well. The text is
every .py file of the running Python's standard library, in sorted order: on every machine,
no download.
"""

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import flash_ext

HERE = Path(__file__).resolve().parent


def load_text(max_bytes):
    """The standard library's .py files, concatenated in sorted order, as bytes (at most max_bytes)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


class Attention(nn.Module):
    def __init__(self, width, heads, backend):
        super().__init__()
        self.heads, self.backend = heads, backend
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        # (B, T, 3, H, D) viewed as three (B, H, T, D) tensors: no copies
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.backend == "flash_ext":
            y = flash_ext.attention(q, k, v, causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, width, heads, backend):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = Attention(width, heads, backend)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, context, layers, width, heads, backend):
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads, backend) for _ in range(layers))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") or name.endswith("mlp.2.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def batches(data, batch, context, gen, device):
    """Random windows of the text, the same sequence for every run with the same seed."""
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + context] for s in starts])
        y = torch.stack([data[s + 1:s + context + 1] for s in starts])
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--attention", choices=["flash_ext", "sdpa"], default="flash_ext")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-mb", type=float, default=16.0, help="how much of the standard library to read")
    p.add_argument("--eval-batches", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--no-plot", action="store_true")
    return p.parse_args(argv)


def train(opts):
    """Train; returns the run's record (losses, tokens/s, peak memory)."""
    torch.manual_seed(opts.seed)
    device = torch.device(opts.device)
    text = torch.frombuffer(bytearray(load_text(int(opts.text_mb * 2**20))), dtype=torch.uint8).long()
    split = int(0.9 * len(text))
    train_data, val_data = text[:split], text[split:]
    model = GPT(256, opts.context, opts.layers, opts.width, opts.heads, opts.attention).to(device)
    step_fn = torch.compile(model) if opts.compile else model
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optim = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                              lr=opts.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    lr_at = lambda s: opts.lr * min(1.0, (s + 1) / opts.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / opts.steps)))
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    data = batches(train_data, opts.batch, opts.context, torch.Generator().manual_seed(opts.seed), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    losses, timed_tokens, timed_seconds = [], 0, 0.0
    print(f"{opts.attention}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"{len(text) / 1e6:.1f}M bytes of text, {opts.steps} steps of {opts.batch}x{opts.context} tokens on {device}")
    for step in range(opts.steps):
        x, y = next(data)
        for group in optim.param_groups:
            group["lr"] = lr_at(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with amp:
            loss = step_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())  # synchronises
        if step >= min(10, opts.steps // 2):  # after warm-up (and compilation)
            timed_tokens += x.numel()
            timed_seconds += time.perf_counter() - start
        if step % 25 == 0 or step == opts.steps - 1:
            print(f"step {step:4d}  loss {losses[-1]:.4f}")

    model.eval()
    val_gen = torch.Generator().manual_seed(opts.seed + 1)
    with torch.no_grad(), amp:
        val_batches = batches(val_data, opts.batch, opts.context, val_gen, device)
        val_loss = sum(step_fn(*next(val_batches)).item() for _ in range(opts.eval_batches)) / opts.eval_batches
    record = {
        "attention": opts.attention, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "losses": losses, "final_train_loss": sum(losses[-10:]) / len(losses[-10:]), "val_loss": val_loss,
        "tokens_per_s": timed_tokens / timed_seconds if timed_seconds else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    peak = f"{record['peak_memory_gib']:.2f} GiB" if record["peak_memory_gib"] is not None else "n/a (CPU)"
    speed = f"{record['tokens_per_s']:,.0f}" if record["tokens_per_s"] else "n/a"
    print(f"{opts.attention}: final train loss {record['final_train_loss']:.4f} (mean of the last 10 steps), "
          f"val loss {val_loss:.4f}, {speed} tokens/s, peak memory {peak}")
    return record


def plot(out, records):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in records:
        ax.plot(r["losses"], label=f"{r['attention']} (val {r['val_loss']:.3f})", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats per byte)")
    ax.set_title("GPT on the Python standard library, bytes")
    ax.legend()
    fig.tight_layout()
    name = "loss_" + "_vs_".join(r["attention"] for r in records) + ".png"
    fig.savefig(out / name, dpi=120)
    plt.close(fig)
    return out / name


def main(argv=None):
    opts = parse_args(argv)
    record = train(opts)
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / f"train_{opts.attention}.json").write_text(json.dumps(record, indent=1))
    if not opts.no_plot:
        print("wrote", plot(opts.out, [record]))
        other = opts.out / f"train_{'sdpa' if opts.attention == 'flash_ext' else 'flash_ext'}.json"
        if other.exists():
            both = sorted([record, json.loads(other.read_text())], key=lambda r: r["attention"])
            print("wrote", plot(opts.out, both))
    return record


if __name__ == "__main__":
    main()
