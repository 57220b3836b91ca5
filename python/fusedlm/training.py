"""`fusedlm train` and `fusedlm generate`: a byte-level GPT trained and sampled with the fused model.

    fusedlm train [--data PATH] [--out CKPT] [--steps N] [--batch B] [--seq-len T] [--n-layer L] ...
    fusedlm generate --checkpoint CKPT --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] ...

Tokens are the bytes of the text (a vocabulary of 256, padded to 320 for the kernels' tiles), so no
tokenizer is needed and any file trains. train: the first 90% of the bytes train, the rest validates;
batches are random windows of seq_len + 1 bytes; AdamW (weight decay on the matrices only) with a
linear warm-up and a cosine decay to a tenth of the peak rate, gradients clipped to norm 1. It prints
the loss, the validation loss every --eval-every steps and tokens per second, and saves the model's
config, weights and final validation loss to CKPT. Without --data it trains on the Python sources of
the installed fusedlm package (about 0.3 MB of text: a smoke test, not a corpus).
generate: loads CKPT into fusedlm.GPT and prints the prompt with its continuation, drawn by
GPT.generate (KV cache, fusedlm.sample); --seed makes it repeat.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import time

import torch

from fusedlm.model import GPT, GPTConfig

BYTE_VOCAB = 256
VOCAB_SIZE = 320  # 256 bytes, padded to a multiple of 64; ids >= 256 never occur in the data


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=pathlib.Path, help="a text file (default: fusedlm's own Python sources)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("fusedlm-ckpt.pt"), help="checkpoint path")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=20, help="warm-up steps")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    _add_common(p)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=pathlib.Path, required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    _add_common(p)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--backend", default="auto", help="the ops' backend (default auto)")
    p.add_argument("--seed", type=int, default=0)


def _default_text() -> bytes:
    root = pathlib.Path(__file__).resolve().parent
    return b"\n".join(path.read_bytes() for path in sorted(root.rglob("*.py")))


def _batch(data: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator, device: str):
    """(inputs, targets), (batch, seq_len) int64: random windows and the same windows shifted by one."""
    starts = torch.randint(0, data.numel() - seq_len - 1, (batch,), generator=generator)
    windows = torch.stack([data[s:s + seq_len + 1] for s in starts.tolist()]).to(device)
    return windows[:, :-1], windows[:, 1:]


def _learning_rate(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def _evaluate(model: GPT, data: torch.Tensor, args, generator: torch.Generator) -> float:
    model.eval()
    losses = [model(*_batch(data, args.batch, args.seq_len, generator, args.device))[1].item()
              for _ in range(args.eval_batches)]
    model.train()
    return sum(losses) / len(losses)


def _require(command: str, args, positive=(), non_negative=(), files=()) -> None:
    """SystemExit with a message naming the option, for values the loops cannot take."""
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise SystemExit(f"fusedlm {command}: --{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    for name in non_negative:
        if getattr(args, name) < 0:
            raise SystemExit(f"fusedlm {command}: --{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in files:
        path = getattr(args, name)
        if path is not None and not path.is_file():
            raise SystemExit(f"fusedlm {command}: --{name} {path}: no such file")


def train(args) -> int:
    _require("train", args, positive=("steps", "batch", "seq_len", "n_layer", "n_head", "n_embd", "lr", "eval_every",
                                      "eval_batches"), non_negative=("warmup",), files=("data",))
    if args.n_embd % args.n_head:
        raise SystemExit(f"fusedlm train: --n-embd {args.n_embd} must be a multiple of --n-head {args.n_head}")
    text = args.data.read_bytes() if args.data is not None else _default_text()
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    split = int(0.9 * data.numel())
    train_data, val_data = data[:split], data[split:]
    if val_data.numel() <= args.seq_len + 1:
        raise SystemExit(f"fusedlm train: {len(text)} bytes of text are too few for --seq-len {args.seq_len} "
                         f"(the last 10% must hold more than one window)")
    torch.manual_seed(args.seed)
    config = GPTConfig(vocab_size=VOCAB_SIZE, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                       block_size=args.seq_len)
    model = GPT(config, backend=args.backend).to(device=args.device, dtype=getattr(torch, args.dtype))
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    others = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": matrices, "weight_decay": 0.1}, {"params": others, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(args.seed)
    print(f"fusedlm train: {len(text)} bytes ({train_data.numel()} train, {val_data.numel()} validation); "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {args.device} {args.dtype}, "
          f"backend {args.backend}", flush=True)
    val_loss = float("nan")
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(step, args)
        _, loss = model(*_batch(train_data, args.batch, args.seq_len, generator, args.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        last = step == args.steps - 1
        if step % args.eval_every == 0 or last:
            val_loss = _evaluate(model, val_data, args, generator)
            rate = (step + 1) * args.batch * args.seq_len / (time.perf_counter() - start)
            print(f"step {step:5d}  loss {loss.item():.4f}  val {val_loss:.4f}  {rate:,.0f} tokens/s", flush=True)
    torch.save({"config": dataclasses.asdict(config), "model": model.state_dict(), "step": args.steps,
                "val_loss": val_loss, "tokens": "bytes"}, args.out)
    print(f"fusedlm train: saved {args.out}", flush=True)
    return 0


def generate(args) -> int:
    _require("generate", args, positive=("top_k", "top_p"), non_negative=("max_new_tokens", "temperature"),
             files=("checkpoint",))
    checkpoint = torch.load(args.checkpoint, map_location=args.device, weights_only=True)
    if not isinstance(checkpoint, dict) or checkpoint.get("tokens") != "bytes":
        raise SystemExit(f"fusedlm generate: {args.checkpoint} is no `fusedlm train` checkpoint")
    config = GPTConfig(**checkpoint["config"])
    model = GPT(config, backend=args.backend).to(device=args.device, dtype=getattr(torch, args.dtype))
    model.load_state_dict(checkpoint["model"])
    model.eval()
    prompt = list(args.prompt.encode("utf-8")) or [ord("\n")]
    use_cache = len(prompt) + args.max_new_tokens - 1 <= config.block_size  # else rerun the cropped context
    idx = torch.tensor([prompt], device=args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                         generator=generator, use_cache=use_cache)
    ids = [i if i < BYTE_VOCAB else ord("?") for i in out[0].tolist()]
    print(bytes(ids).decode("utf-8", errors="replace"), flush=True)
    return 0
