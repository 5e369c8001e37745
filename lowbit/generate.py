"""Text generation with transformers' ``generate``, timed: prompt (prefill) and decode rates apart."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float  # prompt forward pass up to the first new token
    decode_seconds: float  # the remaining new tokens

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        n = self.new_tokens - 1
        return n / self.decode_seconds if n > 0 and self.decode_seconds > 0 else float("nan")


class _Clock:
    """A streamer that only notes when each batch of tokens arrives (first call: the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, _value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompt: str | torch.Tensor, max_new_tokens: int = 128, *,
             exact_length: bool = False, chat: bool = False) -> Generation:
    """Greedy generation of up to ``max_new_tokens`` (exactly that many with ``exact_length``)."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt.reshape(1, -1)
    elif chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    clock = _Clock()
    start = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        min_new_tokens=max_new_tokens if exact_length else None, streamer=clock,
        pad_token_id=getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None,
    )
    end = time.perf_counter()
    new = out[0, ids.shape[1]:]
    first = clock.times[1] if len(clock.times) > 1 else end  # times[0]: the prompt handed to the streamer
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else ""
    return Generation(text, ids.shape[1], new.numel(), first - start, end - first)
