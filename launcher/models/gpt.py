"""GPT-style decoder-only transformer (pre-norm, causal attention, learned positions), with its
tensor-parallel plan (Megatron's split: attention heads and the MLP's hidden units over the tp ranks)."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"gpt width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.head_dim = width // heads
        # q, k and v apart (not one fused Linear): a column split of each gives every tp rank whole heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq = x.shape[0], x.shape[1]
        # -1 heads: under tensor parallelism q/k/v hold only this rank's heads
        q, k, v = (f(x).view(batch, seq, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, seq, -1))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads, dropout)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder of ``layers`` blocks of ``width`` with ``heads``; input token ids [batch, seq_len],
    output logits [batch, seq_len, vocab]."""

    def __init__(self, vocab: int = 50257, seq_len: int = 1024, layers: int = 12, width: int = 768,
                 heads: int = 12, mlp_ratio: int = 4, dropout: float = 0.0, tie_weights: bool = True) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(seq_len, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[Block(width, heads, mlp_ratio, dropout) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        if tie_weights:
            self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        seq = idx.shape[1]
        if seq > self.seq_len:
            raise ValueError(f"sequence length {seq} exceeds the model's seq_len {self.seq_len}")
        positions = torch.arange(seq, device=idx.device).unsqueeze(0)  # [1, seq]: split like the tokens
        x = self.drop(self.tok(idx) + self.pos(positions))
        return self.head(self.ln_f(self.blocks(x)))

    def tensor_parallel_plan(self, tp: int, sequence_parallel: bool) -> Dict[str, str]:
        """Megatron's split (styles of ``lmsdp.comm.tensor_parallel``): q/k/v colwise and the output
        projection rowwise with the heads divided; the MLP's first Linear colwise, second rowwise;
        embeddings by vocabulary/position rows; the tied LM head colwise, gathered for the loss (both
        whole when tp does not divide the vocabulary);
        norms on sequence shards under ``sequence_parallel`` (else replicated)."""
        heads = self.blocks[0].attn.heads if len(self.blocks) else tp
        if heads % tp:
            raise ValueError(f"{tp} does not divide the gpt's {heads} attention heads; allowed tp: a divisor of {heads}")
        if sequence_parallel and self.seq_len % tp:
            raise ValueError(f"{tp} does not divide seq_len {self.seq_len} (comm.sequence_parallel splits "
                             "the sequence); allowed tp: a divisor of seq_len")
        norm = "sequence_parallel" if sequence_parallel else "replicate"
        vocab = self.tok.num_embeddings
        if sequence_parallel and vocab % tp:
            raise ValueError(f"{tp} does not divide the vocabulary ({vocab}), which comm.sequence_parallel splits "
                             "by rows; allowed: a tp dividing it, or sequence_parallel: false (the embeddings "
                             "and head then stay whole)")
        # a vocabulary tp does not divide (GPT-2's 50257) keeps the tied embedding and head whole on every
        # tp rank (Megatron pads the vocabulary instead, which changes the model's logits); the blocks split
        split_vocab = vocab % tp == 0
        plan = {"tok": "rowwise" if split_vocab else "replicate",
                "pos": "rowwise" if self.seq_len % tp == 0 else "replicate", "ln_f": norm,
                "head": "colwise_gather" if split_vocab else "replicate"}
        for i in range(len(self.blocks)):
            b = f"blocks.{i}"
            plan.update({f"{b}.ln1": norm, f"{b}.attn": "gather_input", f"{b}.attn.q": "colwise",
                         f"{b}.attn.k": "colwise", f"{b}.attn.v": "colwise", f"{b}.attn.proj": "rowwise",
                         f"{b}.ln2": norm, f"{b}.mlp": "gather_input", f"{b}.mlp.0": "colwise",
                         f"{b}.mlp.2": "rowwise"})
        return plan
