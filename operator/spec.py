"""The CaptionModel spec as pydantic models: the one source of the CRD schema and of the operator's view.

Field names are the camelCase ones users type (``maxBatchSize``); Python code uses snake_case
attributes. Bounds, enums and defaults written here end up in the generated CRD
(``crds/captionmodels.captionfleet.io.yaml``), so the API server rejects what the models reject.
What a schema cannot say (weights summing to 100, unique names, ...) is checked in ``validation.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "captionfleet.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "CaptionModel"
PLURAL = "captionmodels"
SINGULAR = "captionmodel"
SHORT_NAMES = ("capm",)

# A Kubernetes quantity ("500m", "16Gi", 2); the same pattern as the API server's own types.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DURATION_PATTERN = r"^([0-9]+(ms|s|m|h))+$"
DNS_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_HF_REPO = r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(@[A-Za-z0-9._/-]+)?"
_PVC = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?/[^\s]+"
MODEL_PATTERN = rf"^(hf://{_HF_REPO}|pvc://{_PVC}|file:///[^\s]*|{_HF_REPO})$"

Quantity = Annotated[
    int | str,
    Field(json_schema_extra={"pattern": QUANTITY_PATTERN, "x-kubernetes-int-or-string": True}),
]
Duration = Annotated[str, Field(pattern=DURATION_PATTERN)]
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def seconds(duration: str) -> float:
    """A duration such as ``1m30s`` in seconds."""
    return sum(int(n) * _SECONDS[unit] for n, unit in _DURATION_PART.findall(duration))


Precision = Literal["fp32", "fp16", "bf16", "int8"]
Decoder = Literal["native", "transformers"]


class SpecModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors, as with kubectl."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class ModelVersion(SpecModel):
    """One model version of the fleet: its own Deployment, Service and autoscaler."""

    name: str = Field(
        pattern=DNS_LABEL_PATTERN,
        max_length=30,
        description="Version name, unique in the CaptionModel (e.g. v1, blip-large); part of child names.",
    )
    model: str = Field(
        pattern=MODEL_PATTERN,
        max_length=512,
        description="Model source: hf://org/name[@revision] or a bare Hugging Face id (downloaded by an "
        "init container), pvc://claim/path (mounted read-only), or file:///path (already in the image).",
    )
    weight: int = Field(
        default=100, ge=0, le=100, description="Desired share of traffic in percent; weights sum to 100."
    )
    canary: bool = Field(
        default=False,
        description="This version is being rolled out progressively under rollout.analysis (at most one).",
    )
    precision: Precision = Field(
        default="fp32",
        description="Numeric precision of the weights; int8: linear layers dynamically quantised (CPU only).",
    )
    decoder: Decoder = Field(
        default="native",
        description="Caption decoder: native (batched beam search, same captions) or transformers.",
    )
    min_replicas: int | None = Field(
        default=None, ge=0, description="Overrides the replica floor derived from the traffic share."
    )
    max_replicas: int | None = Field(
        default=None, ge=1, description="Overrides the replica ceiling derived from the traffic share."
    )
    image: str | None = Field(default=None, min_length=1, description="Runtime image for this version only.")


class Batching(SpecModel):
    """Dynamic batching in each runtime pod."""

    max_batch_size: int = Field(default=8, ge=1, le=256, description="Images per forward pass at most.")
    max_queue_delay_ms: int = Field(
        default=10, ge=0, le=10_000, description="Longest wait for a batch to fill, from its oldest request."
    )
    max_queue_size: int = Field(
        default=256, ge=1, le=100_000, description="Queued requests per pod before answering 503."
    )


class Generation(SpecModel):
    """Defaults for requests that do not set these options."""

    num_beams: int = Field(default=3, ge=1, le=10, description="Beam-search width.")
    max_new_tokens: int = Field(default=30, ge=1, le=100, description="Longest caption, in tokens.")
    style: str | None = Field(
        default=None, pattern=r"^[a-z][a-z0-9-]*$", max_length=40, description="Default style preset."
    )


class Resources(SpecModel):
    """What each runtime pod asks for (requests; memory and GPUs are also the limits)."""

    gpu: int = Field(default=0, ge=0, le=16, description="nvidia.com/gpu per pod; 0 runs on CPU.")
    cpu: Quantity = Field(default="1", description="CPU request per pod.")
    memory: Quantity = Field(default="4Gi", description="Memory request and limit per pod.")


class Toleration(SpecModel):
    key: str | None = Field(default=None, max_length=316)
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)


class Autoscaling(SpecModel):
    """Per-version autoscaling; the fleet-wide bounds are split by each version's traffic share."""

    provider: Literal["hpa", "keda", "none"] = Field(
        default="hpa",
        description="hpa: autoscaling/v2 on the queue depth with a CPU fallback; keda: a KEDA "
        "ScaledObject; none: fixed replicas (minReplicas of each version).",
    )
    min_replicas: int = Field(
        default=1, ge=0, le=1000, description="Fleet-wide floor at 100 % traffic (0 needs keda)."
    )
    max_replicas: int = Field(default=4, ge=1, le=1000, description="Fleet-wide ceiling at 100 % traffic.")
    target_queue_depth: int = Field(
        default=4, ge=1, le=10_000, description="Queued requests per pod the autoscaler aims for."
    )
    target_cpu_utilization: int = Field(
        default=80, ge=1, le=100, description="CPU utilisation (percent) used without the queue metric."
    )


class Analysis(SpecModel):
    """Canary analysis, as in Flagger: every ``interval`` the canary's figures over ``window`` decide."""

    interval: Duration = Field(default="1m", description="Time between checks.")
    error_rate_threshold: float = Field(
        default=1.0, ge=0, le=100, description="Highest acceptable error rate (percent of 5xx answers)."
    )
    min_requests: int = Field(default=100, ge=0, description="Requests a check needs before it counts.")
    window: Duration = Field(default="5m", description="Time window each check looks back over.")
    step_weight: int = Field(default=10, ge=1, le=100, description="Weight added to the canary per check.")
    max_weight: int = Field(default=50, ge=1, le=100, description="Canary weight at which it is promoted.")
    threshold: int = Field(default=5, ge=1, le=100, description="Failed checks before a rollback.")
    latency_p99_ms: float | None = Field(
        default=None,
        ge=1,
        description="Highest acceptable p99 latency of the canary (ms, as the router sees it); unset: "
        "latency is not checked.",
    )


class Rollout(SpecModel):
    """Progressive delivery of the version marked ``canary``."""

    analysis: Analysis = Field(default_factory=Analysis)
    paused: bool = Field(
        default=False,
        description="Freeze the rollout where it is: no steps, no promotion, no automatic rollback.",
    )


class Cache(SpecModel):
    """The shared result cache; leave out ``cache`` for none."""

    redis_url: str = Field(pattern=r"^rediss?://[^\s]+$", max_length=1024, description="redis:// URL.")


class Auth(SpecModel):
    """API keys: a Secret holding the key hashes, mounted into the router and the runtimes."""

    secret_name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    key: str = Field(
        default="api-keys", pattern=r"^[-._a-zA-Z0-9]+$", max_length=253, description="Key in the Secret."
    )


class Router(SpecModel):
    """The public endpoint of the fleet: the traffic-splitting router."""

    replicas: int = Field(default=2, ge=1, le=100)
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(default=80, ge=1, le=65535, description="Port of the router's Service.")


class CaptionModelSpec(SpecModel):
    versions: list[ModelVersion] = Field(min_length=1, max_length=10)
    image: str | None = Field(
        default=None, min_length=1, description="Runtime and router image; default: the operator's."
    )
    image_pull_secrets: list[Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN)]] = Field(
        default_factory=list
    )
    batching: Batching = Field(default_factory=Batching)
    generation: Generation = Field(default_factory=Generation)
    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        description="A core/v1 Affinity, copied into the runtime pods.",
    )
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    rollout: Rollout = Field(default_factory=Rollout)
    cache: Cache | None = None
    auth: Auth | None = None
    router: Router = Field(default_factory=Router)

    def version(self, name: str) -> ModelVersion:
        return next(v for v in self.versions if v.name == name)


@dataclass(frozen=True)
class ModelSource:
    """A parsed ``model`` field: where the weights come from."""

    scheme: Literal["hf", "pvc", "file"]
    location: str  # hf: the repo id; pvc: the claim name; file: the absolute path
    path: str = ""  # pvc: the path inside the claim
    revision: str | None = None  # hf: a branch, tag or commit


def parse_model_source(text: str) -> ModelSource:
    """``hf://org/name@rev``, ``org/name``, ``pvc://claim/path`` or ``file:///path`` -> ModelSource."""
    if not re.fullmatch(MODEL_PATTERN, text):
        raise ValueError(
            f"model {text!r} is not hf://org/name[@revision], pvc://claim/path, file:///path "
            "or a Hugging Face id"
        )
    if text.startswith("pvc://"):
        claim, _, path = text.removeprefix("pvc://").partition("/")
        if ".." in path.split("/"):
            raise ValueError(f"model {text!r}: the path inside the claim may not contain '..'")
        return ModelSource("pvc", claim, path.strip("/"))
    if text.startswith("file://"):
        return ModelSource("file", text.removeprefix("file://"))
    repo, _, revision = text.removeprefix("hf://").partition("@")
    return ModelSource("hf", repo, revision=revision or None)


def parse_spec(spec: Any) -> CaptionModelSpec:
    """The CR's ``spec`` -> CaptionModelSpec; raises pydantic's ValidationError."""
    return CaptionModelSpec.model_validate(spec if spec is not None else {})
