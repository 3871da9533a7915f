"""Distillation rules: how a frozen prior's noise prediction becomes a loss on the render.

`base.py` holds the seam (`Rule`, `RuleOutput`) and the steps rules share; one file per family:
`sds.py` (sds, literal, csd, sjc), `guided.py` (nfsd, perp-neg: CFG rewritten), `inversion.py`
(ism, sdi: DDIM-inverted noise), `vsd.py` (vsd, esd: a trained particle score). The registry of
rules, with each one's paper and equation, is `RULES` (`sds3d rules` prints it); `RULE_CONFIGS`
maps a rule's name to its config class, and the union `RuleConfig` is what `RunConfig.rule` holds.
Every config extends `SDSRuleConfig`, so t-schedule, w(t), CFG and clipping mean the same in all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Union

from sds3d.rules.guided import NFSDRuleConfig, PerpNegRuleConfig
from sds3d.rules.inversion import ISMRuleConfig, SDIRuleConfig
from sds3d.rules.sds import SDSRuleConfig, SJCRuleConfig
from sds3d.rules.vsd import ESDRuleConfig, VSDRuleConfig


@dataclass(frozen=True)
class RuleInfo:
    paper: str
    equation: str


RULES: dict[str, RuleInfo] = {
    "sds": RuleInfo(
        "DreamFusion (Poole et al., arXiv:2209.14988), eq. 3",
        "∇θ = E_t,ε[w(t)(ε̂(x_t; y, t) − ε) ∂x/∂θ], the U-Net Jacobian omitted",
    ),
    "literal": RuleInfo(
        "DreamFusion §3.2 (the loss SDS simplifies)",
        "∇θ Σ w(t)‖ε̂(x_t; y, t) − ε‖², back-propagated through the denoiser",
    ),
    "csd": RuleInfo(
        "Classifier Score Distillation (Yu et al., arXiv:2310.19415)",
        "∇θ = E_t,ε[w(t)·s·(ε̂(x_t; y, t) − ε̂(x_t; ∅, t)) ∂x/∂θ]: SDS's guidance term alone",
    ),
    "sjc": RuleInfo(
        "Score Jacobian Chaining (Wang et al., arXiv:2212.00774), eq. 9-11 (PAAS)",
        "∇θ = E_n[(α_t/σ_t)(ε̂(x + (σ_t/α_t)n) − n) ∂x/∂θ], averaged over paas_samples draws of n",
    ),
    "nfsd": RuleInfo(
        "Noise-Free Score Distillation (Katzir et al., arXiv:2310.17590), eq. 9-11",
        "∇θ = E[w(t)(δ_D + s·δ_C) ∂x/∂θ], δ_C = ε_y − ε_∅, δ_D = ε_∅ (t < 200) or ε_∅ − ε_neg",
    ),
    "perp-neg": RuleInfo(
        "Perp-Neg (Armandpour et al., arXiv:2304.04968), eq. 8",
        "ε̂ = ε_∅ + s(e_pos − λΣ_i perp(e_i, e_pos)), the other views' texts as negatives; then SDS",
    ),
    "ism": RuleInfo(
        "Interval Score Matching, LucidDreamer (Liang et al., arXiv:2311.11284), eq. 14-17",
        "∇θ = E[w(t)(ε̂(x_t; y, t) − ε_∅(x_s; s)) ∂x/∂θ], x_s, x_t by DDIM inversion, s = t − δ_T",
    ),
    "sdi": RuleInfo(
        "Score Distillation via Inversion (Lukoianov et al., arXiv:2405.15891), eq. 10-12",
        "∇θ = E[w(t)(ε̂(α_t x + σ_t κ; y, t) − κ) ∂x/∂θ], κ the noise DDIM inversion of x to t implies",
    ),
    "vsd": RuleInfo(
        "Variational Score Distillation, ProlificDreamer (Wang et al., arXiv:2305.16213), eq. 9",
        "∇θ = E[w(t)(ε̂(x_t; y, t) − ε_φ(x_t; y, t, c)) ∂x/∂θ], ε_φ trained on the renders",
    ),
    "esd": RuleInfo(
        "Entropic Score Distillation (Wang et al., arXiv:2401.00909), eq. 12",
        "VSD with ε_φ = λ·ε_φ(x_t; y, t, ∅) + (1 − λ)·ε_φ(x_t; y, t, c): the views' entropy raised",
    ),
}

RuleConfig = Union[
    SDSRuleConfig, SJCRuleConfig, NFSDRuleConfig, PerpNegRuleConfig, ISMRuleConfig, SDIRuleConfig,
    VSDRuleConfig, ESDRuleConfig,
]  # fmt: skip
RULE_CONFIGS: dict[str, type] = {
    "sds": SDSRuleConfig,
    "literal": SDSRuleConfig,
    "csd": SDSRuleConfig,
    "sjc": SJCRuleConfig,
    "nfsd": NFSDRuleConfig,
    "perp-neg": PerpNegRuleConfig,
    "ism": ISMRuleConfig,
    "sdi": SDIRuleConfig,
    "vsd": VSDRuleConfig,
    "esd": ESDRuleConfig,
}
# Settings the rule's paper fixes, applied when switching to it (a study can still override them).
# The rules that rewrite CFG have no camera guidance: a preset's s_c does not carry over to them.
NO_CAMERA_GUIDANCE = {"camera_guidance_scale": 0.0}
PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    "sjc": {"weighting": "sjc"}, "ism": {"weighting": "ism"},
    "csd": NO_CAMERA_GUIDANCE, "nfsd": NO_CAMERA_GUIDANCE, "perp-neg": NO_CAMERA_GUIDANCE,
}  # fmt: skip
SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(SDSRuleConfig) if f.name != "kind")


def with_rule(current: SDSRuleConfig, name: str) -> SDSRuleConfig:
    """The rule `name` with `current`'s t-schedule, w(t), CFG and clipping (its own fields at their
    defaults, and the settings its paper fixes)."""
    from sds3d.errors import UserError

    if name not in RULE_CONFIGS:
        raise UserError(f"unknown rule {name!r}; choose from {', '.join(RULES)}")
    shared = {f: getattr(current, f) for f in SHARED_FIELDS} | PAPER_SETTINGS.get(name, {})
    return RULE_CONFIGS[name](**shared, kind=name)


__all__ = ["RULES", "RULE_CONFIGS", "RuleConfig", "RuleInfo", "SDSRuleConfig", "with_rule"]
