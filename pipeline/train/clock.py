"""The tick: one optimizer step, counted the same way on every rank and saved in checkpoints.

Gradient-accumulation micro-steps share their tick. The noise stream is keyed on it, so it lives in
one object with one way to move it forward, and the ranks check that they agree on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TickClock:
    tick: int = 0
    micro_step: int = 0  # micro-steps taken inside the current tick

    def micro_step_done(self, grad_accum: int) -> bool:
        """Count a micro-step; True when it completed a tick (an optimizer step happened)."""
        self.micro_step += 1
        if self.micro_step < grad_accum:
            return False
        self.micro_step = 0
        self.tick += 1
        return True

    def state_dict(self) -> dict:
        return {"tick": self.tick, "micro_step": self.micro_step}

    def load_state_dict(self, state: dict) -> None:
        self.tick = int(state["tick"])
        self.micro_step = int(state.get("micro_step", 0))


class TickMismatch(RuntimeError):
    """Ranks disagree on the tick: their noise streams (and their optimizer steps) have diverged."""


def check_ticks_agree(tick: int, device: torch.device) -> None:
    """A collective: all-reduce (min, max) of the tick over ranks, and name every rank's tick if they differ."""
    import torch.distributed as dist

    bounds = torch.tensor([tick, -tick], dtype=torch.int64, device=device)
    dist.all_reduce(bounds, op=dist.ReduceOp.MIN)
    low, high = int(bounds[0]), -int(bounds[1])
    if low != high:
        ticks: list = [None] * dist.get_world_size()
        dist.all_gather_object(ticks, tick)
        listing = ", ".join(f"rank {rank}: {value}" for rank, value in enumerate(ticks))
        raise TickMismatch(f"ranks disagree on the tick (min {low}, max {high}): {listing}")
