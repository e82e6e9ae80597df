"""AdamW whose state lives only where it is needed, and the warmup + cosine learning-rate schedule.

State (first and second moments, and an fp32 master copy of any bf16/fp16 parameter) is created the first time a
parameter has a gradient and can be released when LISA freezes its block again. So a model of L blocks with n
active carries optimizer state for n blocks plus the always-trainable embeddings and head, never for all L: the
memory LISA promises and the reference implementations never delivered.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import torch


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (same update as torch.optim.AdamW) with lazy, releasable, fp32 state."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        assert closure is None, "closures are not supported"
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            # Parameters activated at different times have different step counts (bias corrections): one
            # batch of foreach kernels per count.
            by_step: dict[int, list[torch.nn.Parameter]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                    if p.dtype != torch.float32:
                        state["master"] = p.detach().float()
                state["step"] += 1
                by_step[state["step"]].append(p)
            for step, params in by_step.items():
                states = [self.state[p] for p in params]
                targets = [s.get("master", p) for s, p in zip(states, params)]
                grads = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in params]
                exp_avgs = [s["exp_avg"] for s in states]
                exp_avg_sqs = [s["exp_avg_sq"] for s in states]
                if wd:
                    torch._foreach_mul_(targets, 1 - lr * wd)
                torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
                torch._foreach_mul_(exp_avg_sqs, beta2)
                torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
                bias1, bias2 = 1 - beta1**step, 1 - beta2**step
                denom = torch._foreach_sqrt(exp_avg_sqs)
                torch._foreach_div_(denom, math.sqrt(bias2))
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(targets, exp_avgs, denom, -lr / bias1)
                for s, p in zip(states, params):
                    if "master" in s:
                        p.copy_(s["master"])

    def release(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Drop the state of frozen parameters; they start fresh if they are trained again (as LMFlow's LISA)."""
        for p in params:
            self.state.pop(p, None)

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values()
                   if isinstance(t, torch.Tensor))

    # torch.optim.Optimizer.load_state_dict casts floating state to each parameter's dtype, which would turn the
    # fp32 moments and master copies of bf16 parameters into bf16. Save and load by parameter index instead.
    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        index = {p: i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        return {"state": {index[p]: dict(s) for p, s in self.state.items()}, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        params = [p for g in self.param_groups for p in g["params"]]
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update(saved)
        self.state = defaultdict(dict)
        for i, saved in state_dict["state"].items():
            p = params[int(i)]
            self.state[p] = {k: v.to(p.device) if isinstance(v, torch.Tensor) else v for k, v in saved.items()}


def warmup_cosine(total_steps: int, warmup_ratio: float, decay: bool = True) -> Callable[[int], float]:
    """LR multiplier: linear warmup over `warmup_ratio` of the steps, then cosine decay to zero (or, with
    `decay=False`, the full rate to the end)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not decay:
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class LrSchedule:
    """The learning rate of every step of a model copy: `base` times warmup_cosine's factor. Every engine (ours and
    DeepSpeed's) sets each step's rate from it in `begin_step`; it is a pure function of the step, so a resumed run
    needs no scheduler state. `base * factor(step)` is the product torch's LambdaLR forms, to the bit."""

    def __init__(self, base: float, total_steps: int, warmup_ratio: float,
                 factor: Callable[[int], float] | None = None):
        """`factor`: another shape of schedule (LESS's linear decay) in place of warmup_cosine."""
        self.base = base
        self.factor = factor or warmup_cosine(total_steps, warmup_ratio)

    def __call__(self, step: int) -> float:
        return self.base * self.factor(step)
