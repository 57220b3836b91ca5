"""The GPT model: nanoGPT's model, built from fusedlm's ops, with one switch, `backend`.

    fusedlm.GPT(config)                    backend="auto": the fused kernels (C++ on the CPU, the GPU
                                           kernels on CUDA tensors), the loss by linear_cross_entropy
    fusedlm.reference.GPT(config)          backend="reference": the same modules on fusedlm.reference,
                                           plain PyTorch, the logits formed and then the cross-entropy

Parameter names follow nanoGPT and Hugging Face's GPT-2 (transformer.wte, transformer.wpe,
transformer.h[i].{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}, transformer.ln_f,
lm_head), so state dicts move between the two models and GPT-2 checkpoints load (GPT.from_hf).

One tensor's path through a block (pre-norm, x is the residual stream):

    x = x + c_proj(attention(split_heads(c_attn(ln_1(x))), causal=True))
    x = layernorm_mlp(x, ln_2, mlp.c_fc, mlp.c_proj, activation="gelu_tanh")   # x + mlp(ln_2(x))

and after the last block, with h = ln_f(x):

    training (targets given):  loss = linear_cross_entropy(h, wte, targets)   (logits never formed)
    otherwise:                 logits = h @ wte^T                             (lm_head's weight is wte's)

Each step is one call of a public op (python/fusedlm/ops/<op>.py) with the model's backend; from
there the dispatcher takes the tensor to its kernel. The modules are also fusedlm.nn's
(CausalSelfAttention, LayerNorm; fusedlm.nn adds LayerNormMLP and LinearCrossEntropyLoss).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from fusedlm import ops, reference
from fusedlm.dispatch import BACKENDS
from fusedlm.validation import check_choice


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
    """Keys and values of the tokens seen so far, per layer, each (B, H, N, D).

    Each layer's k and v live in buffers of room for `capacity` positions that double when full, so
    a generation of N tokens copies O(N) positions rather than the O(N^2) of concatenating every
    step; update returns views of the filled part (strided along N, which the attention kernels read
    without a copy). With gradients enabled it concatenates instead (generate runs without them).
    """

    def __init__(self, n_layer: int):
        if isinstance(n_layer, bool) or not isinstance(n_layer, int) or n_layer < 1:
            raise ValueError(f"KVCache: n_layer must be a positive integer, got {n_layer!r}")
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * n_layer
        self.lengths = [0] * n_layer

    def __len__(self) -> int:
        """The number of cached positions (the position of the next token)."""
        return self.lengths[0]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append this step's k, v to layer's cache; return the keys and values of all positions."""
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"KVCache: layer {layer} out of range for a cache of {len(self.layers)} layers")
        n, new = self.lengths[layer], k.shape[2]
        buffers = self.layers[layer]
        if buffers is not None:
            b = buffers[0]
            if k.shape[:2] != b.shape[:2] or k.shape[3] != b.shape[3] or k.dtype != b.dtype or k.device != b.device:
                raise ValueError(f"KVCache: layer {layer} holds (B, H, D) = ({b.shape[0]}, {b.shape[1]}, {b.shape[3]}) "
                                 f"{b.dtype} on {b.device}; got k of shape {tuple(k.shape)} {k.dtype} on {k.device} "
                                 "(a new batch needs a new cache)")
        if torch.is_grad_enabled():
            # Under autograd concatenate: attention saves the k, v it reads, which later writes into the
            # buffers would overwrite (even when only q needs a gradient).
            if buffers is not None:
                k, v = torch.cat([buffers[0][:, :, :n], k], dim=2), torch.cat([buffers[1][:, :, :n], v], dim=2)
            self.layers[layer], self.lengths[layer] = (k, v), n + new
            return k, v
        if buffers is None or n + new > buffers[0].shape[2]:
            capacity = max(2 * (n + new), 16)
            grown = tuple(t.new_empty(t.shape[:2] + (capacity, t.shape[3])) for t in (k, v))
            if buffers is not None:
                for old, buf in zip(buffers, grown):
                    buf[:, :, :n].copy_(old[:, :, :n])
            buffers = self.layers[layer] = grown
        buffers[0][:, :, n:n + new].copy_(k)
        buffers[1][:, :, n:n + new].copy_(v)
        self.lengths[layer] = n + new
        return buffers[0][:, :, :n + new], buffers[1][:, :, :n + new]


def _check_backend(where: str, backend) -> str:
    check_choice(where, "backend", backend, BACKENDS)
    return backend


class LayerNorm(nn.Module):
    """LayerNorm (or RMSNorm) with an optional bias, by fusedlm.layer_norm.

    forward(x) -> norm(x); forward(x, residual) -> (norm(x + residual), x + residual), the add fused.
    """

    def __init__(self, n_embd: int, bias: bool = True, eps: float = 1e-5, *, norm: str = "layernorm",
                 backend: str = "auto"):
        super().__init__()
        check_choice("LayerNorm", "norm", norm, reference.NORMS)
        if norm == "rmsnorm" and bias:
            raise ValueError("LayerNorm: norm='rmsnorm' has no bias; pass bias=False")
        self.weight = nn.Parameter(torch.ones(n_embd))
        self.bias = nn.Parameter(torch.zeros(n_embd)) if bias else None
        self.eps = eps
        self.norm = norm
        self.backend = _check_backend("LayerNorm", backend)

    def forward(self, x, residual=None):
        return ops.layer_norm(x, self.weight, self.bias, eps=self.eps, norm=self.norm, residual=residual,
                              backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, norm={self.norm!r}, eps={self.eps}, backend={self.backend!r}"


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: c_attn (the q, k, v projections in one Linear), fusedlm.attention,
    c_proj. n_kv_head < n_head gives grouped-query attention (n_head % n_kv_head == 0): c_attn's output
    is then [q (n_head heads) | k (n_kv_head) | v (n_kv_head)], and the kernels read each k, v head for
    its group of query heads without repeating it.

    forward(x (B, T, n_embd), kv_cache=None, layer=0) -> (B, T, n_embd). With a KVCache, this step's
    keys and values are appended to layer `layer`'s and the T new queries attend to every cached
    position and to the new ones up to themselves (causal masking aligned bottom-right).
    """

    def __init__(self, n_embd: int, n_head: int, bias: bool = True, *, n_kv_head: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        for name, value in (("n_embd", n_embd), ("n_head", n_head), ("n_kv_head", n_kv_head)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CausalSelfAttention: {name} must be a positive integer, got {value!r}")
        if n_embd % n_head != 0:
            raise ValueError(f"CausalSelfAttention: n_embd ({n_embd}) must be a multiple of n_head ({n_head})")
        if n_head % n_kv_head != 0:
            raise ValueError(f"CausalSelfAttention: n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, n_embd // n_head
        self.c_attn = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * self.head_dim, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.backend = _check_backend("CausalSelfAttention", backend)

    def forward(self, x, kv_cache=None, layer=0):
        if x.dim() != 3:
            raise ValueError(f"CausalSelfAttention: x must be 3-D (B, T, n_embd), got shape {tuple(x.shape)}")
        b, t, c = x.shape
        widths = (self.n_head * self.head_dim, self.n_kv_head * self.head_dim, self.n_kv_head * self.head_dim)
        # (B, T, (H + 2 Hkv) D) -> q (B, H, T, D), k and v (B, Hkv, T, D): strided views, no copy
        q, k, v = (z.view(b, t, -1, self.head_dim).transpose(1, 2) for z in self.c_attn(x).split(widths, dim=2))
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        y = ops.attention(q, k, v, causal=True, backend=self.backend)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    """The feed-forward weights, applied together with the block's ln_2 in one layernorm_mlp call."""

    def __init__(self, n_embd: int, n_hidden: int, bias: bool = True, *, activation: str = "gelu_tanh",
                 recompute: bool = False, backend: str = "auto"):
        super().__init__()
        check_choice("MLP", "activation", activation, reference.ACTIVATIONS)
        gated = activation in reference.GATED_ACTIVATIONS
        self.c_fc = nn.Linear(n_embd, (2 if gated else 1) * n_hidden, bias=bias)
        self.c_proj = nn.Linear(n_hidden, n_embd, bias=bias)
        self.activation = activation
        self.recompute = recompute
        self.backend = _check_backend("MLP", backend)

    def forward(self, x, ln: LayerNorm, residual=True):
        """(x +) c_proj(act(c_fc(ln(x))))."""
        return ops.layernorm_mlp(x, ln.weight, ln.bias, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight,
                                 self.c_proj.bias, eps=ln.eps, norm=ln.norm, activation=self.activation,
                                 residual=residual, recompute=self.recompute, backend=self.backend)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, backend: str):
        super().__init__()
        d, bias, eps = config.n_embd, config.bias, config.layer_norm_eps
        self.ln_1 = LayerNorm(d, bias, eps, backend=backend)
        self.attn = CausalSelfAttention(d, config.n_head, bias, backend=backend)
        self.ln_2 = LayerNorm(d, bias, eps, backend=backend)
        self.mlp = MLP(d, 4 * d, bias, backend=backend)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None, layer=0):
        x = x + self.resid_dropout(self.attn(self.ln_1(x), kv_cache, layer))
        if self.training and self.resid_dropout.p > 0:
            # Dropout sits between the MLP and the residual add, so the add cannot be fused.
            return x + self.resid_dropout(self.mlp(x, self.ln_2, residual=False))
        return self.mlp(x, self.ln_2)


class GPT(nn.Module):
    """GPT-2's architecture (pre-norm blocks, learned positions, tied output weights) on fusedlm's ops.

    backend: the ops' backend for every layer ("auto", "cpu", "cuda", "triton", "reference"); None takes
    the class's BACKEND ("auto" here, "reference" for fusedlm.reference.GPT).
    """

    BACKEND = "auto"

    def __init__(self, config: GPTConfig, backend: str | None = None):
        super().__init__()
        self.config = config
        self.backend = _check_backend("GPT", self.BACKEND if backend is None else backend)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, self.backend) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, config.bias, config.layer_norm_eps, backend=self.backend),
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
        """idx: (B, T) int64 -> (logits (B, T, V) or None, loss or None).

        targets: (B, T) int64, the next token of each position (-100 = ignore); the loss is the mean
        cross entropy over the non-ignored positions. With targets the kernel backends return logits
        None: linear_cross_entropy takes the loss from the hidden states and wte without forming the
        (B T, V) logits. The reference forms them (one GEMM serves both outputs) and returns both.
        kv_cache: a KVCache, read and extended; positions continue from its length.
        """
        x = self.hidden_states(idx, kv_cache)
        if targets is None:
            return self.lm_head(x), None
        if self.backend == "reference":
            logits = self.lm_head(x)
            return logits, reference.cross_entropy(logits, targets, ignore_index=-100)
        return None, ops.linear_cross_entropy(x, self.lm_head.weight, targets, ignore_index=-100,
                                              backend=self.backend)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 generator=None, use_cache=True):
        """Append max_new_tokens tokens to idx (B, T), each drawn by fusedlm.sample (reference.sample
        for the reference backend) from the last position's hidden state: the output projection and
        softmax fused, temperature=0 greedy.

        use_cache=True runs the prompt once and then one token per step against a KVCache;
        every fed position needs a position embedding, so T + max_new_tokens - 1 must be
        <= block_size. use_cache=False reruns the whole (cropped to block_size) context each step.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"GPT.generate: max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        limit = self.config.block_size
        if use_cache and idx.shape[1] + max_new_tokens - 1 > limit:
            raise ValueError(
                f"GPT.generate: prompt length {idx.shape[1]} + max_new_tokens {max_new_tokens} - 1 "
                f"exceeds block_size {limit} with use_cache=True; use use_cache=False to crop the context")
        draw = reference.sample if self.backend == "reference" else ops.sample
        kv_cache = KVCache(self.config.n_layer) if use_cache else None
        step_input = idx
        for _ in range(max_new_tokens):
            if not use_cache:
                step_input = idx[:, -limit:]
            x = self.hidden_states(step_input, kv_cache)[:, -1]
            next_id = draw(x, self.lm_head.weight, temperature=temperature, top_k=top_k, top_p=top_p,
                           generator=generator)
            step_input = next_id.unsqueeze(1)
            idx = torch.cat([idx, step_input], dim=1)
        return idx

    @classmethod
    def from_hf(cls, hf_model, backend: str | None = None):
        """A GPT with the weights of a transformers GPT2LMHeadModel (same dtype and device).

        GPT-2's Conv1D stores weights as (in, out); nn.Linear as (out, in): they are transposed.
        """
        hc = hf_model.config
        if getattr(hc, "model_type", None) != "gpt2":
            raise ValueError(f"GPT.from_hf: takes a transformers GPT2LMHeadModel, got a {type(hf_model).__name__} "
                             f"(model type {getattr(hc, 'model_type', None)!r}); fusedlm.patch(model) fuses other "
                             "models in place")
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
        model = cls(config, backend).to(device=ref.device, dtype=ref.dtype)
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        hf_state = hf_model.state_dict()
        with torch.no_grad():
            for name, p in model.named_parameters():
                w = hf_state[name]
                p.copy_(w.t() if name.endswith(conv1d) else w)
        return model
