"""What a sweep's confirmation runs: the confirmed configuration and its twins ("arms"), each on the
same confirmation seeds. Config logic only (no Ray, no MLflow).

Arms, as overrides on the sweep's config:
- `noisy`: the confirmed configuration: the best search trial that had noise on (the best trial
  itself unless σ = 0 won the search), or with `sweep.confirm.only` the config as given;
- `zero`: the same with no noise at all (noise.sigma 0, noise.site norm: no NEFTune either);
- `neftune`, when some search trial had NEFTune on (noise.site embedding or both with
  noise.neftune_alpha > 0): norm noise off (σ = 0, site embedding) and NEFTune on at the α of the
  best such trial (the first of them in the trials table, i.e. the best final value of
  `sweep.metric`); with `confirm.only`, at the config's own α. Left out when the confirmed config is NEFTune alone
  (no norm noise), since it would be the `noisy` arm again.

Confirmation seed k (1..sweep.confirm.seeds) sets train.seed and noise.seed to the confirmed
config's plus k, in every arm: the pair (noisy, zero) at seed k differs only in the noise, and no
confirmation seed is the seed the search ran with.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict

from pipeline.config import Config, ConfigError
from pipeline.tune.space import effective_space, trial_overrides

ARMS = ("noisy", "zero", "neftune")
NEFTUNE_ALPHA = "noise.neftune_alpha"


class ConfirmPlan(BaseModel):
    """The confirmation runs: each arm's overrides on the sweep's config, run at every seed."""

    model_config = ConfigDict(frozen=True)

    source: str  # what is confirmed, for the report: "trial <id>" or "the config as given"
    arms: dict[str, tuple[str, ...]]
    seeds: tuple[int, ...]  # k = 1..n
    train_seed: int  # the confirmed config's train.seed and noise.seed; seed k adds k to both
    noise_seed: int
    note: str = ""  # why an arm is missing, shown with the verdict

    def overrides(self, arm: str, seed: int) -> list[str]:
        return [*self.arms[arm], f"train.seed={self.train_seed + seed}", f"noise.seed={self.noise_seed + seed}"]

    @property
    def runs(self) -> int:
        return len(self.arms) * len(self.seeds)


def norm_noise_on(cfg: Config) -> bool:
    return cfg.noise.sigma > 0 and cfg.noise.site in ("norm", "both")


def neftune_on(cfg: Config) -> bool:
    return cfg.noise.embedding_alpha > 0


def searches_neftune(cfg: Config) -> bool:
    return NEFTUNE_ALPHA in effective_space(cfg)


def check_confirm_only(cfg: Config) -> None:
    if cfg.sweep.confirm.only and not (norm_noise_on(cfg) or neftune_on(cfg)):
        raise ConfigError("sweep.confirm.only: the config has no noise (noise.sigma 0, no NEFTune): there is nothing to "
                          "compare with its σ = 0 twin")


def plan_confirmation(cfg: Config, ranked: list[tuple[str, float, dict]] | None) -> ConfirmPlan | None:
    """The plan for `cfg`'s sweep. `ranked`: the search trials as (trial id, final value of
    `sweep.metric`, Tune params), best first; None with `sweep.confirm.only`. None when no search trial had noise on."""
    if ranked is None:
        check_confirm_only(cfg)
        chosen, source, neftune_from = [], "the config as given", cfg
    else:
        scored = [(trial, cfg.with_overrides(trial_overrides(params)), params)
                  for trial, value, params in ranked if not math.isnan(value)]
        noisy = [(trial, params) for trial, trial_cfg, params in scored if norm_noise_on(trial_cfg) or neftune_on(trial_cfg)]
        if not noisy:
            return None
        trial, params = noisy[0]
        chosen, source = trial_overrides(params), f"trial {trial}"
        neftune_from = next((trial_cfg for _, trial_cfg, _ in scored if neftune_on(trial_cfg)), None)
    confirmed = cfg.with_overrides(chosen)
    quiet = ["noise.sigma=0", "noise.site=norm"]
    arms = {"noisy": tuple(chosen), "zero": (*chosen, *quiet)}
    note = ""
    if neftune_from is not None and neftune_on(neftune_from):
        if not norm_noise_on(confirmed):  # its noisy arm is NEFTune alone
            note = "the confirmed config is NEFTune alone: its noisy arm is the NEFTune run"
        else:
            arms["neftune"] = (*chosen, "noise.sigma=0", "noise.site=embedding",
                               f"{NEFTUNE_ALPHA}={neftune_from.noise.neftune_alpha}")
    elif searches_neftune(cfg):
        note = "the space searches noise.neftune_alpha, but no trial had NEFTune on (noise.site embedding or both)"
    return ConfirmPlan(source=source, arms=arms, seeds=tuple(range(1, cfg.sweep.confirm.seeds + 1)),
                       train_seed=confirmed.train.seed, noise_seed=confirmed.noise.seed, note=note)
