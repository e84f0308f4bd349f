"""The tick: one optimizer step, counted the same way on every rank and saved in checkpoints.

Gradient-accumulation micro-steps share their tick. Later features (the noise schedule) key on
it, so it lives in one object with one way to move it forward.
"""

from __future__ import annotations

from dataclasses import dataclass


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
