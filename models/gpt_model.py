"""A decoder-only GPT of the kind the Dion2 paper trains.

Pre-norm blocks with RMSNorm, rotary position embeddings, QK-norm, causal attention through
`scaled_dot_product_attention`, a 4x ReLU-squared MLP, no biases, and an untied embedding and
lm_head. The model can be built on the meta device and materialised later with `init_weights()`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

ROLES = ("matrix", "vector", "embedding", "lm_head")


@dataclass
class GPTConfig:
    """The model's shape. `vocab_size` is padded to a multiple of 128 for the embedding tables."""

    model_dim: int = 768
    n_layer: int = 12
    n_head: int = 6
    sequence_length: int = 1024
    vocab_size: int = 50257

    @property
    def padded_vocab_size(self):
        return math.ceil(self.vocab_size / 128) * 128

    @property
    def head_dim(self):
        return self.model_dim // self.n_head


def rotary_tables(sequence_length, head_dim, base=10000.0, device=None):
    """Return (cos, sin), each sequence_length x head_dim/2, in fp32."""
    inv_freq = base ** -(torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(sequence_length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate x (batch, time, heads, head_dim) by the position angles of its time axis."""
    t = x.size(1)
    cos, sin = cos[None, :t, None, :].to(x.dtype), sin[None, :t, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with QK-norm and rotary embeddings."""

    def __init__(self, config):
        super().__init__()
        d = config.model_dim
        self.head_dim = config.head_dim
        # Separate q, k and v (not one fused matrix) so tensor parallelism can shard each by heads.
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim)
        self.k_norm = nn.RMSNorm(self.head_dim)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its own heads.
        q = self.q_norm(self.q(x).view(b, t, -1, self.head_dim))
        k = self.k_norm(self.k(x).view(b, t, -1, self.head_dim))
        v = self.v(x).view(b, t, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.out(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """The 4x ReLU-squared feed-forward layer."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.model_dim, 4 * config.model_dim, bias=False)
        self.proj = nn.Linear(4 * config.model_dim, config.model_dim, bias=False)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    """A pre-norm transformer block."""

    def __init__(self, config):
        super().__init__()
        self.attn_norm = nn.RMSNorm(config.model_dim)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = nn.RMSNorm(config.model_dim)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class GPT(nn.Module):
    """The language model. `forward(idx)` gives logits; `forward(idx, targets)` the mean loss."""

    def __init__(self, config):
        super().__init__()
        if config.model_dim % config.n_head or config.head_dim % 2:
            raise ValueError(
                f"model_dim {config.model_dim} must split into n_head {config.n_head} heads of an even size"
            )
        self.config = config
        self.embed = nn.Embedding(config.padded_vocab_size, config.model_dim)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.final_norm = nn.RMSNorm(config.model_dim)
        self.lm_head = nn.Linear(config.model_dim, config.padded_vocab_size, bias=False)
        cos, sin = rotary_tables(config.sequence_length, config.head_dim, device=self.embed.weight.device)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)

    def param_roles(self):
        """Map each role in ROLES to its list of (name, parameter); every parameter has one role.

        matrix: the hidden weight matrices; vector: the norm gains; embedding: the token
        embedding; lm_head: the output projection.
        """
        roles = {role: [] for role in ROLES}
        for name, module in self.named_modules():
            role = None
            if module is self.embed:
                role = "embedding"
            elif module is self.lm_head:
                role = "lm_head"
            elif isinstance(module, nn.Linear):
                role = "matrix"
            elif isinstance(module, nn.RMSNorm):
                role = "vector"
            if role is not None:
                roles[role] += [(f"{name}.{n}", p) for n, p in module.named_parameters(recurse=False)]
        return roles

    def head_matrices(self):
        """The hidden matrices whose rows are one block per attention head: q, k and v."""
        return [
            p
            for block in self.blocks
            for p in (block.attn.q.weight, block.attn.k.weight, block.attn.v.weight)
        ]

    @torch.no_grad()
    def init_weights(self, seed):
        """Initialise every parameter and buffer in place, deterministically for `seed`.

        Values are drawn on the CPU in a fixed order, so they depend neither on the device nor
        on how the parameters are sharded.
        Hidden matrices are N(0, 1/fan_in); the output projections of each block and the
        lm_head start at zero (so the first loss is exactly ln(padded vocab)); the embedding
        is N(0, 1); norm gains are one.
        """
        generator = torch.Generator().manual_seed(seed)
        zero_init = {self.lm_head.weight} | {
            p for b in self.blocks for p in (b.attn.out.weight, b.mlp.proj.weight)
        }
        for param in self.parameters():
            if param in zero_init:
                value = torch.zeros(param.shape)
            elif param.ndim == 1:
                value = torch.ones(param.shape)
            elif param is self.embed.weight:
                value = torch.randn(param.shape, generator=generator)
            else:
                value = torch.randn(param.shape, generator=generator) / math.sqrt(param.shape[1])
            value = value.to(param.device)
            # A sharded parameter takes its own shard of the same full tensor on every rank.
            param.copy_(
                distribute_tensor(value, param.device_mesh, param.placements)
                if isinstance(param, DTensor)
                else value
            )
        cos, sin = rotary_tables(self.config.sequence_length, self.config.head_dim)
        self.rotary_cos.copy_(cos)
        self.rotary_sin.copy_(sin)

    def forward(self, idx, targets=None):
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, self.rotary_cos, self.rotary_sin)
        logits = self.lm_head(self.final_norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """Sample `max_new_tokens` continuations of idx (batch x time); returns the longer idx."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.sequence_length :])[:, -1].float()
            logits[:, self.config.vocab_size :] = -float("inf")  # padding ids are never real
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits[logits < kth] = -float("inf")
                probs = F.softmax(logits, dim=-1)
                next_id = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx
