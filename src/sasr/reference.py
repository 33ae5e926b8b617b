"""The reference policy pi_ref that the GRPO KL term is measured against, and a moving average of the weights
(a teacher that trails the policy).

- LoRA, reference 'initial': the same weights with the adapter switched off (no extra memory).
- Otherwise a snapshot of the trainable parameters (the adapter, or every weight under full fine-tuning),
  taken when the model is loaded ('initial') or at the end of warm-up ('warmup'), swapped in for the
  reference forward and swapped back after. Under FSDP the snapshot and the swap are of each rank's shards.
"""

from __future__ import annotations

import contextlib

import torch

from sasr import fsdp
from sasr.logprobs import completion_distributions, completion_logprobs


class ReferencePolicy:
    def __init__(self, model: torch.nn.Module, use_lora: bool) -> None:
        self.model = model  # the unwrapped model (PeftModel under LoRA)
        self.use_lora = use_lora
        self.snapshot_: dict[str, torch.Tensor] | None = None

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def snapshot(self) -> None:
        """Freeze the current trainable weights as the reference."""
        fsdp.reshard(self.model)  # the parameters are the shards again
        self.snapshot_ = {n: p.detach().clone() for n, p in self._trainable().items()}

    @torch.no_grad()
    def _follow(self) -> None:
        """The snapshot onto its weights' device (the accelerator moves the model after it is taken)."""
        for name, p in self._trainable().items():
            if self.snapshot_[name].device != p.device:
                self.snapshot_[name] = self.snapshot_[name].to(p.device)

    @torch.no_grad()
    def _swap(self) -> None:
        fsdp.reshard(self.model)  # no gathered copy outlives the weights it was gathered from
        self._follow()
        for name, p in self._trainable().items():
            held = p.detach().clone()
            p.copy_(self.snapshot_[name])
            self.snapshot_[name].copy_(held)

    @contextlib.contextmanager
    def active(self):
        """Within this block the model computes pi_ref."""
        if self.snapshot_ is None:
            assert self.use_lora, "full fine-tuning needs a snapshot; call snapshot() after loading"
            with self.model.disable_adapter():
                yield
            return
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def distributions(
        self, input_ids, attention_mask, n_completion: int, temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """pi_ref's whole distribution at each completion position [B, T, V] and its sum q log q [B, T]."""
        with self.active():
            return completion_distributions(self.model, input_ids, attention_mask, n_completion, temperature)

    @torch.no_grad()
    def logprobs(self, input_ids, attention_mask, n_completion: int, temperature: float) -> torch.Tensor:
        with self.active():
            logps, _ = completion_logprobs(self.model, input_ids, attention_mask, n_completion, temperature)
        return logps


class AveragePolicy(ReferencePolicy):
    """An exponential moving average of the trainable weights, swapped in as the reference snapshot is: under
    LoRA it starts at zero (a zero adapter computes the base model), otherwise at the weights it is made with;
    each ``update`` sets it to (1 - rate) x itself + rate x the current weights."""

    def __init__(self, model: torch.nn.Module, use_lora: bool, rate: float) -> None:
        super().__init__(model, use_lora)
        self.rate = rate
        self.snapshot()
        if use_lora:
            for tensor in self.snapshot_.values():
                tensor.zero_()

    @torch.no_grad()
    def update(self) -> None:
        fsdp.reshard(self.model)
        self._follow()
        r = self.rate
        for name, p in self._trainable().items():
            average = self.snapshot_[name]
            if self.use_lora:  # the arithmetic of TRL's two EMA teachers, so that they are equal bit for bit
                average.copy_((1 - r) * average + r * p.detach())
            else:
                average.mul_(1.0 - r).add_(p.detach(), alpha=r)
