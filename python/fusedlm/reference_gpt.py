"""The reference GPT: nanoGPT's model in plain PyTorch, built from the reference ops.

Parameter names follow nanoGPT and Hugging Face's GPT-2 (transformer.wte, transformer.wpe,
transformer.h[i].{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}, transformer.ln_f,
lm_head), so checkpoints and the patcher move between this model, fusedlm.GPT and GPT-2.

One tensor's path through a block (pre-norm, x is the residual stream):

    x = x + c_proj(attention(split_heads(c_attn(ln_1(x))), causal=True))
    x = layernorm_mlp(x, ln_2, mlp.c_fc, mlp.c_proj, activation="gelu_tanh")   # x + mlp(ln_2(x))

and after the last block logits = ln_f(x) @ wte^T (lm_head's weight is wte's). Every step is a
call to a reference op, so the fused model mirrors this file op for op.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from fusedlm.reference import attention, cross_entropy, layer_norm, layernorm_mlp, sample


@dataclass
class GPTConfig:
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024  # the longest sequence (number of position embeddings)
    bias: bool = True  # biases in the Linears and LayerNorms, as GPT-2
    dropout: float = 0.0  # on the embeddings and both residual branches (training only)
    layer_norm_eps: float = 1e-5


class KVCache:
    """Keys and values of the tokens seen so far, one (k, v) pair per layer, each (B, H, N, D).

    Grown by concatenation: clear rather than fast, which is what a reference is for.
    """

    def __init__(self, n_layer: int):
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer

    def __len__(self) -> int:
        """The number of cached positions (the position of the next token)."""
        first = self.layers[0]
        return 0 if first is None else first[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append this step's k, v to layer's cache; return the keys and values of all positions."""
        cached = self.layers[layer]
        if cached is not None:
            k = torch.cat([cached[0], k], dim=2)
            v = torch.cat([cached[1], v], dim=2)
        self.layers[layer] = (k, v)
        return k, v


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT's), computed by reference.layer_norm."""

    def __init__(self, n_embd: int, bias: bool, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None
        self.eps = eps

    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, eps=self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, kv_cache=None, layer=0):
        b, t, c = x.shape
        # (B, T, 3C) -> three (B, H, T, C/H)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
                   for z in self.c_attn(x).split(c, dim=2))
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        # With a cache, Nq = t < Nk: bottom-right aligned causal masking lets each new
        # token see every cached position and the new ones up to itself.
        y = attention(q, k, v, causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    """The feed-forward weights, applied together with the block's ln_2 in one layernorm_mlp call."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, ln: LayerNorm, residual=True):
        """(x +) c_proj(gelu_tanh(c_fc(ln(x))))."""
        return layernorm_mlp(x, ln.weight, ln.bias, self.c_fc.weight, self.c_fc.bias,
                             self.c_proj.weight, self.c_proj.bias, eps=ln.eps,
                             activation="gelu_tanh", residual=residual)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, config.bias, config.layer_norm_eps)
        self.mlp = MLP(config)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None, layer=0):
        x = x + self.resid_dropout(self.attn(self.ln_1(x), kv_cache, layer))
        if self.training and self.resid_dropout.p > 0:
            # Dropout sits between the MLP and the residual add, so the add cannot be fused.
            return x + self.resid_dropout(self.mlp(x, self.ln_2, residual=False))
        return self.mlp(x, self.ln_2)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.bias, config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied output weights
        self.apply(self._init_weights)
        # GPT-2: scale the init of the projections into the residual stream by 1/sqrt(2 n_layer).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, idx, kv_cache=None):
        """ln_f of the last block's output, (B, T, n_embd): what the output layer reads."""
        _, t = idx.shape
        start = len(kv_cache) if kv_cache is not None else 0
        if start + t > self.config.block_size:
            where = f" after {start} cached positions" if start else ""
            raise ValueError(f"GPT.forward: sequence length {t}{where} exceeds block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(start, start + t, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for layer, block in enumerate(self.transformer.h):
            x = block(x, kv_cache, layer)
        return self.transformer.ln_f(x)

    def forward(self, idx, targets=None, kv_cache=None):
        """idx: (B, T) int64 -> (logits (B, T, V), loss or None).

        targets: (B, T) int64, the next token of each position (-100 = ignore); the loss is
        the mean cross entropy over the non-ignored positions. kv_cache: a KVCache, read and
        extended; positions continue from its length. The reference always returns the logits;
        fusedlm.GPT returns None for them when targets are given (its loss never forms them).
        """
        x = self.hidden_states(idx, kv_cache)
        # One GEMM for both outputs: the loss is linear_cross_entropy(x, wte, targets) split
        # at the logits, so the baseline does not pay for the output projection twice.
        logits = self.lm_head(x)
        loss = None if targets is None else cross_entropy(logits, targets, ignore_index=-100)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, use_cache=True):
        """Append max_new_tokens tokens to idx (B, T), each drawn by reference.sample.

        use_cache=True runs the prompt once and then one token per step against a KVCache;
        every fed position needs a position embedding, so T + max_new_tokens - 1 must be
        <= block_size. use_cache=False reruns the whole (cropped to block_size) context each step.
        """
        limit = self.config.block_size
        if use_cache and idx.shape[1] + max_new_tokens - 1 > limit:
            raise ValueError(
                f"GPT.generate: prompt length {idx.shape[1]} + max_new_tokens {max_new_tokens} - 1 "
                f"exceeds block_size {limit} with use_cache=True; use use_cache=False to crop the context")
        kv_cache = KVCache(self.config.n_layer) if use_cache else None
        step_input = idx
        for _ in range(max_new_tokens):
            if not use_cache:
                step_input = idx[:, -limit:]
            x = self.hidden_states(step_input, kv_cache)[:, -1]
            next_id = sample(x, self.lm_head.weight, temperature=temperature, top_k=top_k,
                             top_p=top_p, generator=generator)
            step_input = next_id.unsqueeze(1)
            idx = torch.cat([idx, step_input], dim=1)
        return idx

    @classmethod
    def from_hf(cls, hf_model):
        """A GPT with the weights of a transformers GPT2LMHeadModel (same dtype and device).

        GPT-2's Conv1D stores weights as (in, out); nn.Linear as (out, in): they are transposed.
        """
        hc = hf_model.config
        act = getattr(hc, "activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"GPT.from_hf: activation_function must be a tanh GELU "
                             f"('gelu_new' or 'gelu_pytorch_tanh'), got {act!r}")
        if getattr(hc, "n_inner", None) not in (None, 4 * hc.n_embd):
            raise ValueError(f"GPT.from_hf: n_inner must be 4 * n_embd = {4 * hc.n_embd}, got {hc.n_inner}")
        if not getattr(hc, "scale_attn_weights", True) or getattr(hc, "scale_attn_by_inverse_layer_idx", False):
            raise ValueError("GPT.from_hf: only the 1/sqrt(head_dim) attention scale is supported "
                             "(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)")
        src = hf_model.transformer
        if not torch.equal(hf_model.lm_head.weight, src.wte.weight):
            raise ValueError("GPT.from_hf: lm_head.weight differs from transformer.wte.weight; "
                             "this model ties them")
        config = GPTConfig(vocab_size=hc.vocab_size, n_layer=hc.n_layer, n_head=hc.n_head,
                           n_embd=hc.n_embd, block_size=hc.n_positions, bias=True, dropout=0.0,
                           layer_norm_eps=hc.layer_norm_epsilon)
        ref = src.wte.weight
        model = cls(config).to(device=ref.device, dtype=ref.dtype)
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        hf_state = hf_model.state_dict()
        with torch.no_grad():
            for name, p in model.named_parameters():
                w = hf_state[name]
                p.copy_(w.t() if name.endswith(conv1d) else w)
        return model
