"""Distillation rules: how a frozen prior's noise prediction becomes a loss on the render.

`base.py` holds the seam (`Rule`, `RuleOutput`); one file per family of rules. The registry of
rules, with each one's paper and equation, is `RULES` (`sds3d rules` prints it).
"""

from __future__ import annotations

from dataclasses import dataclass

from sds3d.rules.sds import SDSRuleConfig


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
}
RuleConfig = SDSRuleConfig  # a Union of the rules' configs once a rule needs its own fields

__all__ = ["RULES", "RuleConfig", "RuleInfo", "SDSRuleConfig"]
