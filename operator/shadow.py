"""The shadow phase of a rollout (``rollout.analysis.mirror``), as pure decisions on the copies' figures.

Before its weight leaves 0, the canary gets copies of ``percent`` of the live requests from every
router (``runtime/router/shadow.py``): the status gives it ``mirror: <percent>`` and weight 0, so no
user is ever served by it. Each check reads its shadow figures over the window:

- fewer than ``minRequests`` copies: hold;
- the copies' error rate above ``errorRateThreshold``, their p99 above ``latencyP99Ms`` (when set), or
  their agreement with the primary's caption below ``mirror.minAgreement``: a failed check;
  ``threshold`` failed checks in a row roll the canary back (it never had a user);
- otherwise a passed shadow check; after ``mirror.checks`` of them the shadow phase is over and the
  canary starts at ``stepWeight``: the live analysis takes over.

The order of a rollout is quality gate, then these shadow checks, then weight steps; the state kept here
is a small part of ``status.rollout`` (``CanaryState.shadow``).
"""

from __future__ import annotations

from pydantic import Field

from captionfleet.operator.figures import ShadowFigures
from captionfleet.operator.spec import Analysis, StatusModel


class ShadowState(StatusModel):
    """The canary's shadow phase (``status.rollout.shadow``)."""

    percent: int = Field(description="Percent of the live requests copied to the canary.")
    passed: int = Field(default=0, description="Shadow checks passed so far.")
    done: bool = Field(default=False, description="The shadow checks passed: weight steps have begun.")
    copies: int = Field(default=0, description="Copies in the window of the last shadow check.")
    dropped: int = Field(default=0, description="Copies the routers dropped (too many in flight) then.")
    agreement: float | None = Field(
        default=None, description="Share of those copies with the stable's caption (after normalisation)."
    )
    token_overlap: float | None = Field(default=None, description="Their mean token overlap (word F1).")


def start(analysis: Analysis) -> ShadowState | None:
    """The shadow phase a fresh rollout begins with (after the quality gate), or None without mirror."""
    return ShadowState(percent=analysis.mirror.percent) if analysis.mirror is not None else None


def shadowing(state: ShadowState | None) -> bool:
    """Whether the canary is in its shadow phase (copies only, weight 0)."""
    return state is not None and not state.done


def mirror_percent(state: ShadowState | None) -> int:
    """What the routers copy to the canary now (0: nothing)."""
    return state.percent if state is not None and shadowing(state) else 0


def observed(state: ShadowState, figures: ShadowFigures) -> ShadowState:
    """The state with the figures of this check."""

    def rounded(value: float | None) -> float | None:
        return None if value is None else round(value, 4)

    return state.model_copy(
        update={
            "copies": figures.copies,
            "dropped": figures.dropped,
            "agreement": rounded(figures.agreement),
            "token_overlap": rounded(figures.token_overlap),
        }
    )


def problems(analysis: Analysis, figures: ShadowFigures) -> list[tuple[str, str]]:
    """(reason, sentence) for each threshold the copies cross."""
    found = []
    rate = figures.as_live().error_rate or 0.0
    if rate > analysis.error_rate_threshold:
        found.append(
            ("ShadowErrorRate", f"copies' error rate {rate:.2f} % > {analysis.error_rate_threshold:g} %")
        )
    limit = analysis.latency_p99_ms
    if limit is not None and figures.p99_ms is not None and figures.p99_ms > limit:
        found.append(("ShadowLatency", f"copies' p99 {figures.p99_ms:.0f} ms > {limit:g} ms"))
    wanted = analysis.mirror.min_agreement if analysis.mirror is not None else 0.0
    agreement = figures.agreement
    if agreement is None or agreement < wanted:
        shown = "none compared" if agreement is None else f"{agreement:.3f}"
        found.append(("ShadowAgreement", f"agreement with the stable {shown} < minAgreement {wanted:g}"))
    return found


def describe(figures: ShadowFigures) -> str:
    agreement, overlap = figures.agreement, figures.token_overlap
    text = f"{figures.copies} copies, {figures.errors} failed, {figures.dropped} dropped"
    if agreement is not None and overlap is not None:
        text += f", agreement {agreement:.3f}, token overlap {overlap:.3f}"
    return text + (f", p99 {figures.p99_ms:.0f} ms" if figures.p99_ms is not None else "")
