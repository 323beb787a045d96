"""``LongNetLM``: decoder-only LongNet language model (MAGNETO, rotary/XPOS) with exact incremental decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from .. import _validation as V
from .config import LongNetLMConfig
from .decoding import DecodingState
from .layers import LongNetBlock, magneto_gamma
from .sampling import check_generate_args, decode_loop

__all__ = ["LongNetLM", "LongNetLMConfig", "check_prompt_lengths", "check_token_ids"]


def check_token_ids(name: str, ids, vocab_size: int) -> torch.Tensor:
    """Token ids: an integer tensor ``(batch, seq)`` with values in ``[0, vocab_size)``, as int64.

    The values are checked except while ``torch.compile`` traces (a data-dependent check would break
    the graph); out of range they would index outside the embedding."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids (batch, seq), but got {type(ids).__name__}")
    V.check_dense(name, ids)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of token ids (int64), but got dtype {ids.dtype}")
    if ids.dim() != 2:
        hint = "; for one sequence pass ids[None]" if ids.dim() == 1 else ""
        raise ValueError(f"{name} must have shape (batch, seq), but got shape {tuple(ids.shape)}{hint}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} must hold at least one token per sequence, but got shape {tuple(ids.shape)}")
    if not torch.compiler.is_compiling():
        low, high = (int(v) for v in torch.stack(torch.aminmax(ids)).tolist())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"{name} must lie in [0, vocab_size={vocab_size}), but got values in [{low}, {high}]"
            )
    return ids.long()


def check_prompt_lengths(lengths, batch_size: int, n: int) -> tuple[int, ...]:
    """Real tokens per prompt of a left-padded ``(batch, n)`` batch: one int in ``[1, n]`` per row (a sequence
    of ints or an integer tensor ``(batch,)``, read on the host)."""
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"prompt_lengths must hold integers, but got a tensor of dtype {lengths.dtype}")
        if tuple(lengths.shape) != (batch_size,):
            raise ValueError(f"prompt_lengths must have shape (batch,) = ({batch_size},), one length per prompt, "
                             f"but got shape {tuple(lengths.shape)}")
        lengths = lengths.tolist()
    elif isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence):
        raise TypeError(f"prompt_lengths must be a sequence of ints or an integer tensor, but got {lengths!r}")
    if len(lengths) != batch_size:
        raise ValueError(f"prompt_lengths must have one length per prompt (batch={batch_size}), but got "
                         f"{len(lengths)}: {list(lengths)!r}")
    values = tuple(V.check_int(f"prompt_lengths[{i}]", x, minimum=1) for i, x in enumerate(lengths))
    for i, x in enumerate(values):
        if x > n:
            raise ValueError(f"prompt_lengths[{i}] must be in [1, seq={n}] (the prompt's tokens, right-aligned in "
                             f"input_ids), but got {x}")
    return values


class LongNetLM(nn.Module):
    """Token embedding -> ``num_layers`` causal :class:`LongNetBlock` -> LayerNorm -> logits.

    ``forward(input_ids (b, n), state=None) -> logits (b, n, vocab)``. With a :class:`DecodingState`
    (:meth:`new_state`) the tokens continue the cached sequence; :meth:`generate` samples.
    """

    def __init__(self, config: Optional[LongNetLMConfig] = None, **overrides) -> None:
        super().__init__()
        if config is None:
            config = LongNetLMConfig(**overrides)
        elif overrides:
            raise TypeError(f"pass either a config or keyword overrides, not both (got {sorted(overrides)})")
        if not isinstance(config, LongNetLMConfig):
            raise TypeError(f"config must be a LongNetLMConfig, but got {type(config).__name__}")
        self.config = c = config
        self.gamma = magneto_gamma("decoder_only", decoder_layers=c.num_layers)
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim)
        self.dropout = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(
            LongNetBlock(
                c.embed_dim, c.num_heads, ffn_dim=c.ffn_size, segment_lengths=c.segment_lengths,
                dilation_rates=c.dilation_rates, gamma=self.gamma, num_kv_heads=c.num_kv_heads, dropout=c.dropout,
                attention_dropout=c.attention_dropout, offsets=c.offsets, head_groups=c.head_groups,
                positions=c.positions, attention_type=c.attention_type, layer_norm_eps=c.layer_norm_eps,
            )
            for _ in range(c.num_layers)
        )
        self.norm = nn.LayerNorm(c.embed_dim, eps=c.layer_norm_eps)
        self.head = None if c.tie_embeddings else nn.Linear(c.embed_dim, c.vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=c.embed_dim**-0.5)
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=c.embed_dim**-0.5)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_state(self, batch_size: int, device=None, dtype: Optional[torch.dtype] = None, *,
                  max_length: Optional[int] = None) -> DecodingState:
        """An empty decoding state for ``batch_size`` sequences (device/dtype default to the model's). With
        ``max_length`` (tokens per row, prompt included): fixed-shape caches
        (:class:`~dilated_attention_pytorch.models.static_decoding.StaticDilatedKVCache`), one token per step
        after the prompt (run eagerly: the model's rotary positions come from the host's counter, so a CUDA
        graph of its step would replay the captured positions)."""
        V.check_int("batch_size", batch_size)
        p = self.embed.weight
        return DecodingState([
            layer.self_attn.new_cache(batch_size, device or p.device, dtype or p.dtype, max_length=max_length)
            for layer in self.layers
        ])

    def forward(self, input_ids: torch.Tensor, state: Optional[DecodingState] = None, *,
                cu_seqlens: Optional[torch.Tensor] = None, sequence_starts=None) -> torch.Tensor:
        """input_ids ``(b, n)`` -> logits ``(b, n, vocab)`` (float32 or the model dtype). ``cu_seqlens``:
        packed documents over the ``b * n`` flattened tokens (see :func:`dilated_attention`), each
        document its own sequence (attention and positions); no ``state`` with it. ``sequence_starts``
        ``(b,)``: left padding, row ``i`` is the sequence from column ``start_i`` (positions and segments
        count from it; the logits of its padding columns mean nothing); with a ``state`` only on the prompt,
        and the state keeps the starts for the tokens that follow."""
        input_ids = check_token_ids("input_ids", input_ids, self.config.vocab_size)
        if cu_seqlens is not None and state is not None:
            raise ValueError("packed documents (cu_seqlens) take no decoding state")
        x = self.dropout(self.embed(input_ids))  # (b, n, e)
        varlen = {name: v for name, v in (("cu_seqlens", cu_seqlens), ("sequence_starts", sequence_starts))
                  if v is not None}
        for i, layer in enumerate(self.layers):
            x = layer(x, is_causal=True, cache=None if state is None else state.layers[i], **varlen)
        x = self.norm(x)
        return self.head(x) if self.head is not None else x @ self.embed.weight.t()  # (b, n, vocab)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        stop_token: Optional[int] = None,
        pad_token: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        prompt_lengths=None,
    ) -> torch.Tensor:
        """Continue every prompt of ``input_ids (b, n)`` (batched) with the decoding cache.

        Prompts of different lengths: left-pad them to one width ``n`` (any token ids) and pass
        ``prompt_lengths (b,)``, ints in ``[1, n]``: row ``i``'s prompt is ``input_ids[i, n - prompt_lengths[i]:]``,
        and its positions and segments count from its first token, so every step's logits are what that
        prompt gives alone (batch 1, no padding), to rounding (greedy: the same tokens); the padding is never
        read, and it stays in the result (row ``i``'s text is ``out[i, n - prompt_lengths[i]:]``). ``None``:
        every row is ``n`` tokens long.

        ``temperature=0`` is greedy (else a finite number > 0). Token ids and counts may be Python, NumPy
        or 0-d torch integers; every argument is checked before any work. A sequence stops at
        ``stop_token`` (kept); later positions hold
        ``pad_token`` (default ``stop_token``). Returns ``(b, n + m)``, ``m <= max_new_tokens``. Runs in
        eval mode (dropout off) and restores the training flag.
        """
        ids = check_token_ids("input_ids", input_ids, self.config.vocab_size)
        a = check_generate_args(self.config.vocab_size, max_new_tokens, temperature, top_k, top_p, stop_token,
                                pad_token)
        starts = None
        if prompt_lengths is not None:
            n = ids.shape[1]
            starts = tuple(n - x for x in check_prompt_lengths(prompt_lengths, ids.shape[0], n))
        if a.max_new_tokens == 0:
            return ids
        was_training = self.training
        self.eval()
        try:
            state = self.new_state(ids.shape[0])
            logits = self(ids, state, sequence_starts=starts)[:, -1]
            return decode_loop(
                lambda tok: self(tok, state)[:, -1], logits, ids, a.max_new_tokens, temperature=a.temperature,
                top_k=a.top_k, top_p=a.top_p, stop_token=a.stop_token, pad_token=a.pad_token, generator=generator,
            )
        finally:
            self.train(was_training)
