"""Tensor-parallel layers and the in-place sharding of a loaded TriModeModel (Megatron split).

Column-parallel q/k/v and gate/up keep this rank's output rows (no collective); row-parallel
o and down keep its input columns and all-reduce the partial sums; the embedding and
``diffusion_head`` are vocabulary-parallel over a vocabulary padded to a multiple of the
world size (the VLM's 131,073 is odd), padded rows zero and padded logits dropped after the
gather to rank 0. A draft-adapter LoRA follows its base layer: on a column-parallel layer
``A`` is replicated and ``B`` split by rows; on a row-parallel layer ``A`` is split by
columns and ``B`` replicated, so ``B (A_r x_r)`` joins the partial sum before the one
all-reduce (spec vlm-tp-quant 2.1, 2.2). KV heads are split when ``num_key_value_heads``
is a multiple of the world size and replicated (one per rank) when the world size is a
multiple of it. RMSNorm, RoPE and residuals are replicated.
Knows nothing about scheduling: ``runner.py`` replays rank 0's forwards on the other ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..model.model import Linear, TriModeModel


@dataclass(frozen=True)
class Shard:
    """This process's place in a tensor-parallel group (``group`` None: the default group)."""

    rank: int
    world: int
    group: object = None


def check_divisible(config, world: int) -> None:
    """Raise ValueError unless the model's heads and FFN split evenly over ``world`` ranks."""
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"tensor_parallel_size must be an integer >= 1; got {world!r}")
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    if heads % world:
        raise ValueError(f"tensor_parallel_size {world} does not divide num_attention_heads "
                         f"{heads}; use a divisor of {heads}")
    if kv % world and world % kv:
        raise ValueError(f"tensor_parallel_size {world} and num_key_value_heads {kv}: one must "
                         f"divide the other (KV heads are split or replicated)")
    if config.intermediate_size % world:
        raise ValueError(f"tensor_parallel_size {world} does not divide intermediate_size "
                         f"{config.intermediate_size}")


def padded_vocab(vocab: int, world: int) -> int:
    return -(-vocab // world) * world


def _linear(weight: torch.Tensor, cls=Linear, **extra) -> Linear:
    with torch.device("meta"):  # no throw-away random init of the full-size weight
        layer = cls(weight.shape[1], weight.shape[0], **extra)
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    return layer


def column_parallel(full: Linear, rows: torch.Tensor) -> Linear:
    """A Linear holding output ``rows`` of ``full`` (LoRA: A replicated, B's rows)."""
    layer = _linear(full.weight.detach()[rows])
    if full.lora_A is not None:
        layer.lora_A, layer.lora_B = full.lora_A, full.lora_B[rows].contiguous()
        layer.lora_scale = full.lora_scale
    return layer


class RowParallelLinear(Linear):
    """Holds input ``columns`` of a Linear; all-reduces the partial output (and LoRA delta)."""

    def __init__(self, in_features: int, out_features: int, shard: Shard | None = None):
        super().__init__(in_features, out_features)
        self.shard = shard

    @classmethod
    def from_full(cls, full: Linear, columns: torch.Tensor, shard: Shard) -> "RowParallelLinear":
        layer = _linear(full.weight.detach()[:, columns], cls, shard=shard)
        if full.lora_A is not None:
            layer.lora_A, layer.lora_B = full.lora_A[:, columns].contiguous(), full.lora_B
            layer.lora_scale = full.lora_scale
        return layer

    def forward(self, x: torch.Tensor, adapter_rows: torch.Tensor | None = None) -> torch.Tensor:
        out = super().forward(x, adapter_rows)
        dist.all_reduce(out, group=self.shard.group)
        return out


class VocabParallelEmbedding(nn.Module):
    """Rows ``[start, start + rows)`` of the padded embedding table; ids outside give zeros,
    then an all-reduce (exactly one rank contributes each id's row)."""

    def __init__(self, weight: torch.Tensor, start: int, shard: Shard):
        super().__init__()
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
        self.start, self.shard = start, shard

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        out = out * inside[..., None].to(out.dtype)
        dist.all_reduce(out, group=self.shard.group)
        return out


class ParallelHead(Linear):
    """Rows of the padded ``diffusion_head``; logits are gathered to rank 0 (the only rank
    that samples), which gets ``[..., vocab]``; other ranks get their local slice."""

    def __init__(self, in_features: int, out_features: int, shard: Shard | None = None,
                 vocab: int = 0):
        super().__init__(in_features, out_features)
        self.shard, self.vocab = shard, vocab

    def forward(self, x: torch.Tensor, adapter_rows: torch.Tensor | None = None) -> torch.Tensor:
        local = F.linear(x, self.weight).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.shard.world)] \
            if self.shard.rank == 0 else None
        dist.gather(local, parts, group=self.shard.group, group_dst=0)
        if self.shard.rank != 0:
            return local
        return torch.cat(parts, dim=-1)[..., : self.vocab]


def _vocab_rows(weight: torch.Tensor, shard: Shard) -> tuple[torch.Tensor, int]:
    vocab = weight.shape[0]
    per = padded_vocab(vocab, shard.world) // shard.world
    start = shard.rank * per
    rows = weight.detach()[start: min(start + per, vocab)]
    if rows.shape[0] < per:  # the last rank(s) hold the padding: zero rows
        rows = torch.cat([rows, rows.new_zeros(per - rows.shape[0], weight.shape[1])])
    return rows, start


def kv_heads_of(rank: int, world: int, kv_heads: int) -> range:
    """The KV heads rank ``rank`` holds: a 1/world slice, or one replicated head."""
    if kv_heads >= world:
        per = kv_heads // world
        return range(rank * per, (rank + 1) * per)
    head = rank // (world // kv_heads)
    return range(head, head + 1)


def _head_rows(heads: range, head_dim: int) -> torch.Tensor:
    return torch.arange(heads.start * head_dim, heads.stop * head_dim)


def shard_model(model: TriModeModel, shard: Shard) -> TriModeModel:
    """Replace ``model``'s layers in place by this rank's shards; returns it.

    The full weights (and any loaded draft adapter) must be present; they are dropped as
    each layer is replaced. Raises ValueError when the geometry does not split over
    ``shard.world`` ranks (see ``check_divisible``).
    """
    c = model.config
    check_divisible(c, shard.world)
    r, w, hd = shard.rank, shard.world, c.head_dim
    q_heads = range(r * c.num_attention_heads // w, (r + 1) * c.num_attention_heads // w)
    kv = kv_heads_of(r, w, c.num_key_value_heads)
    q_rows, kv_rows = _head_rows(q_heads, hd), _head_rows(kv, hd)
    ffn = c.intermediate_size // w
    ffn_rows = torch.arange(r * ffn, (r + 1) * ffn)
    for layer in model.encoder.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = column_parallel(attn.q_proj, q_rows)
        attn.k_proj = column_parallel(attn.k_proj, kv_rows)
        attn.v_proj = column_parallel(attn.v_proj, kv_rows)
        attn.o_proj = RowParallelLinear.from_full(attn.o_proj, q_rows, shard)
        attn.heads, attn.kv_heads = len(q_heads), len(kv)
        mlp.gate_proj = column_parallel(mlp.gate_proj, ffn_rows)
        mlp.up_proj = column_parallel(mlp.up_proj, ffn_rows)
        mlp.down_proj = RowParallelLinear.from_full(mlp.down_proj, ffn_rows, shard)
    rows, start = _vocab_rows(model.encoder.embed_tokens.weight, shard)
    embed = VocabParallelEmbedding(rows, start, shard)
    head_rows = rows if c.tie_word_embeddings else _vocab_rows(model.diffusion_head.weight, shard)[0]
    head = _linear(head_rows, ParallelHead, shard=shard, vocab=c.vocab_size)
    if c.tie_word_embeddings:
        head.weight = embed.weight
    model.encoder.embed_tokens, model.diffusion_head = embed, head
    model.kv_heads_local = len(kv)
    return model


def new_local_cache(model: TriModeModel, rows: int, capacity: int, zeroed: bool = True, cls=None):
    """A KV cache for a sharded model: this rank's KV heads only."""
    from ..model.kv_cache import KVCache

    c = model.config
    return (cls or KVCache)(c.num_hidden_layers, rows, model.kv_heads_local, c.head_dim,
                            capacity, model.dtype, model.device, zeroed)


def new_local_paged_cache(model: TriModeModel, pages: int, page_size: int, rows: int,
                          max_pages: int, zeroed: bool = True, cls=None):
    """A paged KV cache for a sharded model: this rank's KV heads only."""
    from ..model.paged_cache import PagedKVCache

    c = model.config
    return (cls or PagedKVCache)(c.num_hidden_layers, pages, page_size, model.kv_heads_local,
                                 c.head_dim, rows, max_pages, model.dtype, model.device, zeroed)
