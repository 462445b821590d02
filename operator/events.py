"""The Events the operator posts on a CaptionModel: every reason in one enum, so none is misspelt.

Reconciliation and the analysis return Events as data; only the handlers post them (kopf).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

EventType = Literal["Normal", "Warning"]


class Reason(StrEnum):
    CREATED = "Created"
    DELETED = "Deleted"
    ORPHANED = "Orphaned"
    RECONCILED = "Reconciled"
    INVALID_SPEC = "InvalidSpec"
    RECOVERED = "Recovered"
    APPLY_FAILED = "ApplyFailed"
    NAME_CONFLICT = "NameConflict"
    KEDA_NOT_INSTALLED = "KedaNotInstalled"
    CANARY_STEP = "CanaryStep"
    SHADOW_CHECK_PASSED = "ShadowCheckPassed"
    PROMOTED = "Promoted"
    CHECK_FAILED = "CheckFailed"
    ROLLED_BACK = "RolledBack"
    ROLLOUT_ACTION = "RolloutAction"
    FIGURES_UNAVAILABLE = "FiguresUnavailable"  # a check without figures (Warning, when its cause is new)
    ROLLOUT_RESTARTED = "RolloutRestarted"  # the canary's spec changed mid-rollout: a fresh rollout
    CASCADE_THRESHOLD = "CascadeThreshold"
    CASCADE_CALIBRATION = "CascadeCalibrationUnavailable"
    # The quality gate (gate.py): passed (Normal), failed and rolled back, or could not run (Warning).
    QUALITY_GATE_PASSED = "QualityGatePassed"
    QUALITY_GATE_FAILED = "QualityGateFailed"
    QUALITY_GATE_ERROR = "QualityGateError"
    NO_OPERATOR_KEY = "NoOperatorKey"  # spec.auth, and the operator has no key to pass it with
    # Scale to zero (coldstart.py): a version went to 0 pods, is woken by held requests, is ready again.
    SCALED_TO_ZERO = "ScaledToZero"
    WAKING = "Waking"
    WOKE = "Woke"
    # Why a version's pods do not start (pods.py; Warning, once per problem).
    SECRET_MISSING = "SecretMissing"
    CONTAINER_CONFIG_ERROR = "ContainerConfigError"
    VOLUME_MOUNT_FAILED = "VolumeMountFailed"
    IMAGE_PULL_FAILED = "ImagePullFailed"
    MODEL_DOWNLOAD_FAILING = "ModelDownloadFailing"
    CONTAINER_FAILING = "ContainerFailing"
    UNSCHEDULABLE = "Unschedulable"
    # One per phase change of the fleet (refresh_status): the phase's own name.
    PENDING = "Pending"
    PROGRESSING = "Progressing"
    READY = "Ready"
    DEGRADED = "Degraded"
    INVALID = "Invalid"


# What a periodic resync or an analysis check reports of a reconciliation: repairs and decisions, not
# "all is still well" (that would repeat every interval).
# A pod problem's Warning is posted once, when it is first seen, by whichever reconciliation sees it.
POD_PROBLEMS = frozenset(
    {
        Reason.SECRET_MISSING,
        Reason.CONTAINER_CONFIG_ERROR,
        Reason.VOLUME_MOUNT_FAILED,
        Reason.IMAGE_PULL_FAILED,
        Reason.MODEL_DOWNLOAD_FAILING,
        Reason.CONTAINER_FAILING,
        Reason.UNSCHEDULABLE,
    }
)
REPAIRS = frozenset({Reason.CREATED, Reason.DELETED, Reason.APPLY_FAILED}) | POD_PROBLEMS


@dataclass(frozen=True)
class Event:
    type: EventType
    reason: Reason
    message: str

    @classmethod
    def normal(cls, reason: Reason, message: str) -> Event:
        return cls("Normal", reason, message)

    @classmethod
    def warning(cls, reason: Reason, message: str) -> Event:
        return cls("Warning", reason, message)
