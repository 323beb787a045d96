"""Choosing the next token from logits: greedy, temperature, top-k, top-p (nucleus)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .. import _validation as V

__all__ = ["GenerateArgs", "check_generate_args", "check_sampling", "sample_next_token"]


def check_sampling(
    temperature: float, top_k: Optional[int], top_p: Optional[float]
) -> tuple[float, Optional[int], Optional[float]]:
    """``temperature`` finite >= 0 (0 = greedy), ``top_k`` None or an int >= 1, ``top_p`` None or in (0, 1];
    NumPy and 0-d torch numbers are taken too. Returns them as Python numbers."""
    temperature = V.check_float("temperature (0 = greedy)", temperature, minimum=0.0)
    if top_k is not None:
        top_k = V.check_int("top_k", top_k, minimum=1)
    if top_p is not None:
        top_p = V.check_float("top_p", top_p, minimum=0.0, inclusive=False)
        if top_p > 1:
            raise ValueError(f"top_p must be None or a number in (0, 1], but got {top_p!r}")
    return temperature, top_k, top_p


class GenerateArgs(NamedTuple):
    max_new_tokens: int
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    stop_token: Optional[int]
    pad_token: Optional[int]


def check_generate_args(vocab_size: int, max_new_tokens, temperature, top_k, top_p, stop_token,
                        pad_token) -> GenerateArgs:
    """Every sampling argument of ``generate``, checked before any work; token ids in ``[0, vocab_size)``."""
    max_new_tokens = V.check_int("max_new_tokens", max_new_tokens, minimum=0)
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
    tokens = []
    for name, tok in (("stop_token", stop_token), ("pad_token", pad_token)):
        if tok is not None:
            tok = V.check_int(name, tok, minimum=0)
            if tok >= vocab_size:
                raise ValueError(f"{name} must be None or a token id in [0, vocab_size={vocab_size}), but got {tok}")
        tokens.append(tok)
    return GenerateArgs(max_new_tokens, temperature, top_k, top_p, *tokens)


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """logits ``(b, vocab)`` -> token ids ``(b,)``. ``temperature=0`` is greedy (top-k/top-p then ignored
    by definition: the argmax is inside every top-k/top-p set)."""
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass strictly before each token
        drop_sorted = before >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def decode_loop(
    next_logits,
    logits: torch.Tensor,
    prefix: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float,
    top_k: Optional[int],
    top_p: Optional[float],
    stop_token: Optional[int],
    pad_token: Optional[int],
    generator: Optional[torch.Generator],
) -> torch.Tensor:
    """Sample up to ``max_new_tokens`` after ``prefix (b, n)``; ``logits (b, vocab)`` predict the first one and
    ``next_logits(tokens (b, 1)) -> (b, vocab)`` advances the model's cache. A sequence that emits
    ``stop_token`` is finished: later positions get ``pad_token`` (default: ``stop_token``); the loop ends
    when every sequence is finished, so the result may be shorter than ``n + max_new_tokens``."""
    temperature, top_k, top_p = check_sampling(temperature, top_k, top_p)
    pad = stop_token if pad_token is None else pad_token
    finished = torch.zeros(prefix.shape[0], dtype=torch.bool, device=prefix.device)
    tokens = [prefix]
    for step in range(max_new_tokens):
        tok = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if stop_token is not None:
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            finished = finished | (tok == stop_token)
        tokens.append(tok[:, None])
        if step + 1 == max_new_tokens or bool(finished.all()):
            break
        logits = next_logits(tok[:, None])
    return torch.cat(tokens, dim=1)
