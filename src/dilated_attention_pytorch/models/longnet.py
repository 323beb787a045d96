"""``LongNet``: encoder-decoder with dilated self-attention in both stacks and dense cross-attention (MAGNETO)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import _validation as V
from .config import LongNetConfig
from .decoding import DecodingState
from .layers import LongNetBlock, magneto_gamma
from .lm import check_token_ids
from .sampling import check_generate_args, decode_loop

__all__ = ["LongNet", "LongNetConfig"]


class LongNet(nn.Module):
    """Encoder (non-causal dilated attention, ``src_padding_mask``) + decoder (causal dilated attention,
    dense cross-attention to the encoder output). Shared token embedding, tied output head by default.

    MAGNETO init: encoder gain ``sqrt(log(3N_d)·log(2N_e)/3)``, decoder gain ``sqrt(log 3N_d)``.
    """

    def __init__(self, config: Optional[LongNetConfig] = None, **overrides) -> None:
        super().__init__()
        if config is None:
            config = LongNetConfig(**overrides)
        elif overrides:
            raise TypeError(f"pass either a config or keyword overrides, not both (got {sorted(overrides)})")
        if not isinstance(config, LongNetConfig):
            raise TypeError(f"config must be a LongNetConfig, but got {type(config).__name__}")
        self.config = c = config
        self.encoder_gamma = magneto_gamma("encoder", encoder_layers=c.encoder_layers, decoder_layers=c.decoder_layers)
        self.decoder_gamma = magneto_gamma("decoder", encoder_layers=c.encoder_layers, decoder_layers=c.decoder_layers)
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim)
        self.dropout = nn.Dropout(c.dropout)

        def block(gamma: float, cross: bool) -> LongNetBlock:
            return LongNetBlock(
                c.embed_dim, c.num_heads, ffn_dim=c.ffn_size, segment_lengths=c.segment_lengths,
                dilation_rates=c.dilation_rates, gamma=gamma, cross_attention=cross, num_kv_heads=c.num_kv_heads,
                dropout=c.dropout, attention_dropout=c.attention_dropout, offsets=c.offsets,
                head_groups=c.head_groups, positions=c.positions, attention_type=c.attention_type,
                layer_norm_eps=c.layer_norm_eps,
            )

        self.encoder = nn.ModuleList(block(self.encoder_gamma, False) for _ in range(c.encoder_layers))
        self.encoder_norm = nn.LayerNorm(c.embed_dim, eps=c.layer_norm_eps)
        self.decoder = nn.ModuleList(block(self.decoder_gamma, True) for _ in range(c.decoder_layers))
        self.decoder_norm = nn.LayerNorm(c.embed_dim, eps=c.layer_norm_eps)
        self.head = None if c.tie_embeddings else nn.Linear(c.embed_dim, c.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=c.embed_dim**-0.5)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=c.embed_dim**-0.5)

    def encode(self, src_ids: torch.Tensor, src_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """src_ids ``(b, s)`` -> memory ``(b, s, e)``; ``src_padding_mask (b, s)``, True = padding."""
        src_ids = check_token_ids("src_ids", src_ids, self.config.vocab_size)
        x = self.dropout(self.embed(src_ids))
        for layer in self.encoder:
            x = layer(x, is_causal=False, key_padding_mask=src_padding_mask)
        return self.encoder_norm(x)

    def memory_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [layer.cross_attn.memory_kv(memory) for layer in self.decoder]

    def decode(
        self,
        tgt_ids: torch.Tensor,
        memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
        memory_padding_mask: Optional[torch.Tensor] = None,
        state: Optional[DecodingState] = None,
    ) -> torch.Tensor:
        """tgt_ids ``(b, n)`` -> logits ``(b, n, vocab)``."""
        tgt_ids = check_token_ids("tgt_ids", tgt_ids, self.config.vocab_size)
        x = self.dropout(self.embed(tgt_ids))
        for i, layer in enumerate(self.decoder):
            x = layer(x, is_causal=True, cache=None if state is None else state.layers[i], memory_kv=memory_kv[i],
                      memory_padding_mask=memory_padding_mask)
        x = self.decoder_norm(x)
        return self.head(x) if self.head is not None else x @ self.embed.weight.t()

    def forward(
        self, src_ids: torch.Tensor, tgt_ids: torch.Tensor, src_padding_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Teacher forcing: logits ``(b, n, vocab)`` for ``tgt_ids (b, n)`` given ``src_ids (b, s)``."""
        src_ids = check_token_ids("src_ids", src_ids, self.config.vocab_size)
        tgt_ids = check_token_ids("tgt_ids", tgt_ids, self.config.vocab_size)
        if src_ids.shape[0] != tgt_ids.shape[0]:
            raise ValueError(
                f"src_ids and tgt_ids must have one batch size, but got {src_ids.shape[0]} and {tgt_ids.shape[0]}"
            )
        memory = self.encode(src_ids, src_padding_mask)
        return self.decode(tgt_ids, self.memory_kv(memory), src_padding_mask)

    def new_state(self, batch_size: int, device=None, dtype: Optional[torch.dtype] = None) -> DecodingState:
        V.check_int("batch_size", batch_size)
        p = self.embed.weight
        return DecodingState([
            layer.self_attn.new_cache(batch_size, device or p.device, dtype or p.dtype) for layer in self.decoder
        ])

    @torch.no_grad()
    def generate(
        self,
        src_ids: torch.Tensor,
        tgt_prefix: torch.Tensor,
        max_new_tokens: int,
        *,
        src_padding_mask: Optional[torch.Tensor] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        stop_token: Optional[int] = None,
        pad_token: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Continue ``tgt_prefix (b, n)`` (e.g. a start token) given ``src_ids``; same options as
        :meth:`LongNetLM.generate`. The encoder runs once; its keys/values are kept per layer."""
        src = check_token_ids("src_ids", src_ids, self.config.vocab_size)
        tgt = check_token_ids("tgt_prefix", tgt_prefix, self.config.vocab_size)
        a = check_generate_args(self.config.vocab_size, max_new_tokens, temperature, top_k, top_p, stop_token,
                                pad_token)
        if src.shape[0] != tgt.shape[0]:
            raise ValueError(
                f"src_ids and tgt_prefix must have one batch size, but got {src.shape[0]} and {tgt.shape[0]}"
            )
        if a.max_new_tokens == 0:
            return tgt
        was_training = self.training
        self.eval()
        try:
            kv = self.memory_kv(self.encode(src, src_padding_mask))
            state = self.new_state(tgt.shape[0])
            logits = self.decode(tgt, kv, src_padding_mask, state)[:, -1]
            return decode_loop(
                lambda tok: self.decode(tok, kv, src_padding_mask, state)[:, -1], logits, tgt, a.max_new_tokens,
                temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, stop_token=a.stop_token,
                pad_token=a.pad_token, generator=generator,
            )
        finally:
            self.train(was_training)
