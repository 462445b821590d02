"""The CaptionModel spec as pydantic models: the one source of the CRD schema and of the operator's view.

Field names are the camelCase ones users type (``maxBatchSize``); Python code uses snake_case
attributes. Bounds, enums and defaults written here end up in the generated CRD
(``crds/captionmodels.captionfleet.io.yaml``), so the API server rejects what the models reject.
What a schema cannot say (weights summing to 100, unique names, ...) is checked in ``validation.py``.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

# A Kubernetes quantity ("500m", "16Gi", 2) by the API server's grammar (resource.Quantity), without a
# sign: a pod's requests and limits may not be negative.
QUANTITY_PATTERN = (
    r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
DURATION_PATTERN = r"^([0-9]+(ms|s|m|h))+$"
# Label keys and values (and nodeSelector, toleration keys): the API server's qualified-name rule, an
# optional DNS-subdomain prefix and "/" before a name of at most 63 characters.
_LABEL_NAME = r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)"
QUALIFIED_NAME_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?" + _LABEL_NAME + "$"
)
LABEL_VALUE_PATTERN = rf"^({_LABEL_NAME})?$"
# An image reference as the container runtimes parse it: [registry[:port]/]path[:tag][@digest].
_PATH_PART = r"[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*"
IMAGE_PATTERN = (
    r"^([A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*(:[0-9]+)?/)?"
    rf"{_PATH_PART}(/{_PATH_PART})*(:[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?(@[a-z0-9]+:[a-f0-9]{{32,}})?$"
)
# A key of a Secret (IsConfigMapKey): also its file name when mounted, so never '.', '..' or '..x'.
SECRET_KEY_PATTERN = r"^\.?[-_a-zA-Z0-9][-._a-zA-Z0-9]*$"
MAX_REPLICAS = 1000  # per version and fleet-wide: the autoscalers' bounds are int32 in the API
DNS_LABEL_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_HF_REPO = r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?(@[A-Za-z0-9._/-]+)?"
# A path or URL reaches the containers as an environment variable: no spaces, and no control characters
# (a NUL cannot be passed to a process at all, so the container would never start).
VISIBLE = r"[^\s\x00-\x1f\x7f]"
_PVC = rf"[a-z0-9]([-a-z0-9]*[a-z0-9])?/{VISIBLE}+"
MODEL_PATTERN = rf"^(hf://{_HF_REPO}|pvc://{_PVC}|file:///{VISIBLE}*|{_HF_REPO})$"


def _quantity(value: int | str) -> int | str:
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a quantity may not be negative")
        return value
    if not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError(f"{value!r} is not a quantity such as 500m, 2, 4Gi (no sign, no spaces)")
    return value


Quantity = Annotated[
    int | str,
    AfterValidator(_quantity),
    Field(json_schema_extra={"pattern": QUANTITY_PATTERN, "x-kubernetes-int-or-string": True}),
]
Image = Annotated[str, Field(pattern=IMAGE_PATTERN, max_length=512)]
Fraction = Annotated[float, Field(ge=0, le=1)]
"""A share or a probability: 0 to 1."""


MAX_PREFIX = 253
"""Most characters of a qualified name's DNS prefix (the pattern cannot count them)."""


def is_qualified_name(text: str) -> bool:
    """A label key or topologyKey: an optional DNS prefix and '/', then a name of at most 63 characters."""
    return bool(re.fullmatch(QUALIFIED_NAME_PATTERN, text)) and len(text.rpartition("/")[0]) <= MAX_PREFIX


def _label_key(key: str) -> str:
    """The pattern checks the rest (pydantic: its own message); the prefix's length is checked here."""
    prefix, slash, _ = key.rpartition("/")
    if slash and len(prefix) > MAX_PREFIX:
        raise ValueError(f"the prefix of {key[:40]!r}... is {len(prefix)} characters, at most {MAX_PREFIX}")
    return key


LabelKey = Annotated[str, Field(pattern=QUALIFIED_NAME_PATTERN, max_length=316), AfterValidator(_label_key)]
LabelValue = Annotated[str, Field(pattern=LABEL_VALUE_PATTERN, max_length=63)]
_DURATION_PART = re.compile(r"([0-9]+)(ms|s|m|h)")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def seconds(duration: str) -> float:
    """A duration such as ``1m30s`` in seconds."""
    return sum(int(n) * _SECONDS[unit] for n, unit in _DURATION_PART.findall(duration))


def iso(unix_s: float | None) -> str | None:
    """A status timestamp (RFC 3339, UTC, seconds) of a Unix time."""
    if unix_s is None:
        return None
    return datetime.datetime.fromtimestamp(unix_s, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def unix(text: Any) -> float | None:
    """The Unix time of a status timestamp; None when absent or unreadable (a status is user-editable)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _within(low: str, high: str) -> AfterValidator:
    def check(value: str) -> str:
        if not seconds(low) <= seconds(value) <= seconds(high):
            raise ValueError(f"{value} is outside {low}..{high}")
        return value

    return AfterValidator(check)


def _cel_within(low: str, high: str) -> Any:
    """The same bounds for the API server, in CEL (our durations are a subset of Go's, which CEL's
    ``duration()`` parses)."""
    rule = f"duration(self) >= duration('{low}') && duration(self) <= duration('{high}')"
    return Field(
        pattern=DURATION_PATTERN,
        json_schema_extra={
            "x-kubernetes-validations": [{"rule": rule, "message": f"must be {low} to {high}"}]
        },
    )


# The analysis loop makes a few API and HTTP calls per check, and the routers keep figures for the
# whole window: both are bounded so one CaptionModel cannot load the API server or a router's memory.
MIN_INTERVAL, MAX_INTERVAL = "500ms", "1h"
MIN_WINDOW, MAX_WINDOW = "1s", "24h"
Interval = Annotated[str, _cel_within(MIN_INTERVAL, MAX_INTERVAL), _within(MIN_INTERVAL, MAX_INTERVAL)]
Window = Annotated[str, _cel_within(MIN_WINDOW, MAX_WINDOW), _within(MIN_WINDOW, MAX_WINDOW)]
# Scale to zero: the idle time before a version goes to 0 pods, and how long a router holds a request
# for a version at zero. A second is the least the operator's demand poll can tell apart.
MIN_IDLE, MAX_IDLE = "1s", "24h"
MIN_HOLD, MAX_HOLD = "100ms", "10m"
IdleTime = Annotated[str, _cel_within(MIN_IDLE, MAX_IDLE), _within(MIN_IDLE, MAX_IDLE)]
HoldTime = Annotated[str, _cel_within(MIN_HOLD, MAX_HOLD), _within(MIN_HOLD, MAX_HOLD)]
# The router's deadline per request: a held request's counts on through its cold start.
MIN_DEADLINE, MAX_DEADLINE = "1s", "1h"
Deadline = Annotated[str, _cel_within(MIN_DEADLINE, MAX_DEADLINE), _within(MIN_DEADLINE, MAX_DEADLINE)]


def _extended_resource(name: str) -> str:
    """The API server's rule for an extended resource (IsExtendedResourceName): a domain-prefixed name
    outside ``kubernetes.io/`` (those are native resources), not ``requests.``-prefixed, and valid as
    a qualified name once prefixed by ``requests.`` (how ResourceQuota names it)."""
    if "/" not in name or "kubernetes.io/" in name:
        raise ValueError(
            f"{name!r} is not an extended resource: it needs a domain prefix outside kubernetes.io"
        )
    if name.startswith("requests."):
        raise ValueError(f"{name!r}: an extended resource may not start with requests.")
    if not re.fullmatch(QUALIFIED_NAME_PATTERN, f"requests.{name}") or len(name.split("/")[0]) > 244:
        raise ValueError(f"{name!r} is not a qualified name such as nvidia.com/gpu")
    return name


# The Field before the validator: pydantic leaves the pattern out of the JSON schema (so out of the CRD)
# when a validator function comes first.
ExtendedResource = Annotated[
    str,
    Field(
        pattern=QUALIFIED_NAME_PATTERN,
        max_length=316,
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.contains('/') && !self.contains('kubernetes.io/') && "
                    "!self.startsWith('requests.')",
                    "message": "must be a domain-prefixed extended resource outside kubernetes.io, "
                    "such as nvidia.com/gpu",
                }
            ]
        },
    ),
    AfterValidator(_extended_resource),
]


Precision = Literal["fp32", "fp16", "bf16", "int8"]
Decoder = Literal["native", "transformers"]


class SpecModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors, as with kubectl."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class StatusModel(BaseModel):
    """What the operator keeps in ``status`` (rollout, gate, shadow, cascade, versions): camelCase like
    the spec, but a field it does not know (written by another operator version) is ignored on reading
    back, not refused: the status is the operator's own memory, not a user's request."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


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
        default=None,
        ge=0,
        le=MAX_REPLICAS,
        description="Overrides the replica floor derived from the traffic share.",
    )
    max_replicas: int | None = Field(
        default=None,
        ge=1,
        le=MAX_REPLICAS,
        description="Overrides the replica ceiling derived from the traffic share.",
    )
    image: Image | None = Field(default=None, description="Runtime image for this version only.")


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

    gpu: int = Field(default=0, ge=0, le=16, description="GPUs (gpuResource) per pod; 0 runs on CPU.")
    gpu_resource: ExtendedResource = Field(
        default="nvidia.com/gpu",
        description="The extended resource a GPU is requested as (requests, limits and the toleration "
        "key): nvidia.com/gpu for whole GPUs, e.g. nvidia.com/gpu.shared for time-slicing or MPS "
        "(the NVIDIA device plugin with renameByDefault), nvidia.com/mig-1g.10gb for a MIG slice "
        "(MIG strategy mixed).",
    )
    cpu: Quantity = Field(default="1", description="CPU request per pod.")
    memory: Quantity = Field(default="4Gi", description="Memory request and limit per pod.")


class Toleration(SpecModel):
    """A core/v1 Toleration, with the API server's rules (ValidateTolerations)."""

    key: LabelKey | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    @model_validator(mode="after")
    def _as_the_api_server(self) -> Toleration:
        if not self.key and self.operator != "Exists":
            raise ValueError("operator must be Exists when key is empty")
        if self.operator == "Exists" and self.value:
            raise ValueError("value must be empty when operator is Exists")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


class Autoscaling(SpecModel):
    """Per-version autoscaling; the fleet-wide bounds are split by each version's traffic share."""

    provider: Literal["hpa", "keda", "none"] = Field(
        default="hpa",
        description="hpa: autoscaling/v2 on the queue depth with a CPU fallback; keda: a KEDA "
        "ScaledObject; none: fixed replicas (minReplicas of each version).",
    )
    min_replicas: int = Field(
        default=1,
        ge=0,
        le=MAX_REPLICAS,
        description="Fleet-wide floor at 100 % traffic; 0: a version idle for scaleToZeroAfter goes to "
        "0 pods and wakes when a request arrives (the router holds it meanwhile).",
    )
    max_replicas: int = Field(
        default=4, ge=1, le=MAX_REPLICAS, description="Fleet-wide ceiling at 100 % traffic."
    )
    target_queue_depth: int = Field(
        default=4, ge=1, le=10_000, description="Queued requests per pod the autoscaler aims for."
    )
    target_cpu_utilization: int = Field(
        default=80, ge=1, le=100, description="CPU utilisation (percent) used without the queue metric."
    )
    scale_to_zero_after: IdleTime = Field(
        default="15m",
        description=f"Idle time (no request on any router) after which a version whose floor is 0 goes "
        f"to 0 pods, {MIN_IDLE} to {MAX_IDLE}.",
    )


class Mirror(SpecModel):
    """The shadow phase: copies of live requests judged before the canary's weight leaves 0."""

    percent: int = Field(
        default=10,
        ge=1,
        le=100,
        description="Percent of the other versions' interactive caption requests each router copies to "
        "the canary in the background (marked bulk; the client's answer never waits for the copy).",
    )
    checks: int = Field(
        default=3,
        ge=1,
        le=100,
        description="Shadow checks (on the copies' error rate, p99 and agreement, at every interval, "
        "with minRequests copies) to pass before the first weight step.",
    )
    min_agreement: Fraction = Field(
        default=0.95,
        description="Lowest share of copies whose caption equals the stable's for the same request "
        "(exact after normalisation: case, punctuation and spacing aside).",
    )


class Analysis(SpecModel):
    """Canary analysis, as in Flagger: every ``interval`` the canary's figures over ``window`` decide."""

    interval: Interval = Field(
        default="1m", description=f"Time between checks, {MIN_INTERVAL} to {MAX_INTERVAL}."
    )
    error_rate_threshold: float = Field(
        default=1.0, ge=0, le=100, description="Highest acceptable error rate (percent of 5xx answers)."
    )
    min_requests: int = Field(default=100, ge=0, description="Requests a check needs before it counts.")
    window: Window = Field(
        default="5m",
        description=f"Time window each check looks back over, {MIN_WINDOW} to {MAX_WINDOW} (the routers "
        "keep figures that long).",
    )
    step_weight: int = Field(
        default=10,
        ge=1,
        le=100,
        description="Weight the canary gets once it has a ready pod, and is added per passed check.",
    )
    max_weight: int = Field(default=50, ge=1, le=100, description="Canary weight at which it is promoted.")
    threshold: int = Field(default=5, ge=1, le=100, description="Failed checks before a rollback.")
    latency_p99_ms: float | None = Field(
        default=None,
        ge=1,
        description="Highest acceptable p99 latency of the canary (ms, as the router sees it); unset: "
        "latency is not checked.",
    )
    mirror: Mirror | None = Field(default=None, description="A shadow phase before the first weight step.")
    max_confidence_drop: Fraction | None = Field(
        default=None,
        description="Largest acceptable fall of the canary's mean caption confidence below the stable's, "
        "over the window (both from the answers the routers relay); a check without confidence figures "
        "from a version that answered holds. Unset: not checked.",
    )


GateMetric = Literal["exactMatch", "bleu4", "cider"]
# builtin:scenes, or configMap:<a ConfigMap of the CaptionModel's namespace>.
GATE_DATASET_PATTERN = r"^(builtin:scenes|configMap:[a-z0-9]([-a-z0-9.]*[a-z0-9])?)$"
MIN_GATE_TIMEOUT, MAX_GATE_TIMEOUT = "1s", "1h"


class QualityGate(SpecModel):
    """Before a new canary gets any traffic, its captions on ``dataset`` are scored (as
    ``captionfleet eval`` scores them), and so are the stable version's; failing rolls it back."""

    dataset: str = Field(
        default="builtin:scenes",
        pattern=GATE_DATASET_PATTERN,
        max_length=263,
        description="builtin:scenes (40 held-out synthetic scenes, for the bundled models) or "
        "configMap:NAME (images in binaryData, COCO-style captions in data['captions.json']; at most "
        "500 images, and a ConfigMap holds at most 1 MiB).",
    )
    metric: GateMetric = Field(
        default="exactMatch", description="The score compared: exactMatch, bleu4 or cider."
    )
    min_score: float | None = Field(
        default=None, ge=0, description="Lowest acceptable score of the canary; unset: not checked."
    )
    max_drop: float | None = Field(
        default=None,
        ge=0,
        description="Largest acceptable fall of the canary's score below the stable version's on the same "
        "set; unset: the stable version is not scored.",
    )
    timeout: Annotated[
        str, _cel_within(MIN_GATE_TIMEOUT, MAX_GATE_TIMEOUT), _within(MIN_GATE_TIMEOUT, MAX_GATE_TIMEOUT)
    ] = Field(
        default="5m",
        description=f"Longest time the scoring may take ({MIN_GATE_TIMEOUT} to {MAX_GATE_TIMEOUT}), and "
        "the longest wait for a ready canary pod to score; slower fails the gate (a rollback).",
    )

    @model_validator(mode="after")
    def _judges_something(self) -> QualityGate:
        if self.min_score is None and self.max_drop is None:
            raise ValueError("a qualityGate needs minScore, maxDrop or both")
        return self


class Rollout(SpecModel):
    """Progressive delivery of the version marked ``canary``."""

    analysis: Analysis = Field(default_factory=Analysis)
    quality_gate: QualityGate | None = Field(default=None, description="Score the canary before any traffic.")
    paused: bool = Field(
        default=False,
        description="Freeze the rollout where it is: no steps, no promotion, no automatic rollback.",
    )


class SecretKeyRef(SpecModel):
    """One key of a Secret in the CaptionModel's namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253, description="The Secret's name.")
    key: str = Field(pattern=SECRET_KEY_PATTERN, max_length=253, description="The key in the Secret.")


class Cache(SpecModel):
    """The shared result cache; leave out ``cache`` for none. Exactly one of the two fields."""

    # Exactly one of the two fields, in the CRD's schema too.
    model_config = ConfigDict(json_schema_extra={"minProperties": 1, "maxProperties": 1})

    redis_url: str | None = Field(
        default=None,
        pattern=rf"^rediss?://{VISIBLE}+$",
        max_length=1024,
        description="redis:// URL; credentials in it (user-info, query) are Invalid: use redisUrlSecret.",
    )
    redis_url_secret: SecretKeyRef | None = Field(
        default=None,
        description="A Secret key holding the whole redis:// URL, credentials included; given to the "
        "runtimes through secretKeyRef, never read by the operator.",
    )


# host:port of a Redis, as KEDA's redis scalers take it: a DNS name or IPv4 address (or [IPv6]), a port.
REDIS_ADDRESS_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*|\[[0-9a-fA-F:.]+\]):[0-9]{1,5}$"
)


class Jobs(SpecModel):
    """The job API (``POST /v1/jobs``): its queue, job state and results live in one Redis, shared by
    every runtime pod; leave out ``jobs`` for none (the runtimes then answer 503 there)."""

    redis_url_secret: SecretKeyRef = Field(
        description="A Secret key holding the whole redis:// URL, credentials included; given to the "
        "runtimes through secretKeyRef, never read by the operator. Each version gets its own stream "
        "and keys in it."
    )
    redis_address: str | None = Field(
        default=None,
        pattern=REDIS_ADDRESS_PATTERN,
        max_length=260,
        description="host:port of the same Redis, for KEDA's redis-streams trigger (KEDA reads no URLs); "
        "needed with autoscaling.provider keda.",
    )
    redis_password_secret: SecretKeyRef | None = Field(
        default=None,
        description="A Secret key holding the Redis password, for KEDA (a TriggerAuthentication per "
        "version); unset: KEDA connects without one.",
    )
    redis_database: int = Field(
        default=0, ge=0, le=1_000_000, description="The database number of the URL, for KEDA."
    )
    redis_tls: bool = Field(default=False, description="KEDA connects with TLS (a rediss:// URL).")
    target_pending_items: int = Field(
        default=100,
        ge=1,
        le=1_000_000,
        description="Job items waiting per pod that KEDA aims for, on top of the interactive queue "
        "depth (the larger proposal wins).",
    )


class Moderation(SpecModel):
    """Moderation before captioning: each image is POSTed as JPEG (longest side at most 512 px) to
    ``url``, which answers ``{"allowed": bool, "reason": str}``; a refused image gets 422
    ``content_blocked`` and is never captioned. Leave out ``moderation`` for none."""

    url: str = Field(
        pattern=rf"^https?://{VISIBLE}+$",
        max_length=2048,
        description="http(s) URL of the moderation service; credentials in it (user-info, query): Invalid.",
    )
    timeout_ms: int = Field(
        default=2000,
        ge=1,
        le=60_000,
        description="Longest wait for a verdict; slower counts as the service being unavailable.",
    )
    failure_policy: Literal["Fail", "Ignore"] = Field(
        default="Fail",
        description="The service down, slow or answering nonsense: Fail answers 503 moderation_unavailable; "
        "Ignore captions the image unmoderated (counted in captionfleet_moderation_bypassed_total).",
    )
    allow_private_addresses: bool = Field(
        default=False,
        description="Let url be a private, loopback or link-local address, such as a cluster Service's "
        "(http://moderation.ns.svc); image URLs sent by clients stay public-only.",
    )


class Auth(SpecModel):
    """API keys: a Secret holding the key hashes, mounted into the router and the runtimes."""

    secret_name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    key: str = Field(
        default="api-keys", pattern=SECRET_KEY_PATTERN, max_length=253, description="Key in the Secret."
    )


class ColdStart(SpecModel):
    """What each router pod holds while a version at zero wakes up; beyond either bound a request is
    answered 503 cold_start with a Retry-After at once."""

    max_held: int = Field(
        default=100, ge=1, le=100_000, description="Requests held at once per router pod, over all versions."
    )
    timeout: HoldTime = Field(
        default="60s",
        description=f"Longest hold of one request (its own deadline still counts), {MIN_HOLD} to {MAX_HOLD}.",
    )


class Router(SpecModel):
    """The public endpoint of the fleet: the traffic-splitting router."""

    replicas: int = Field(default=2, ge=1, le=100)
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(default=80, ge=1, le=65535, description="Port of the router's Service.")
    request_timeout: Deadline = Field(
        default="30s",
        description="The router's deadline per request, arrival to answer, "
        f"{MIN_DEADLINE} to {MAX_DEADLINE} (a client's X-Request-Timeout-Ms may only shorten it). "
        "A request held through a cold start keeps counting it: with a version that may scale to "
        "zero, make it longer than the cold start (and coldStart.timeout), else held requests get 504.",
    )
    cold_start: ColdStart = Field(default_factory=ColdStart)


class Cascade(SpecModel):
    """A fast version first, the quality version only when the fast one is unsure (operator/cascade.py):
    name both, and exactly one of the two thresholds."""

    fast: str = Field(
        pattern=DNS_LABEL_PATTERN, max_length=30, description="The version every request goes to first."
    )
    quality: str = Field(
        pattern=DNS_LABEL_PATTERN,
        max_length=30,
        description="The version asked, with the same request, when the fast one is unsure.",
    )
    confidence_threshold: Fraction | None = Field(
        default=None, description="Escalate when the fast answer's confidence is below this."
    )
    target_escalation_rate: Fraction | None = Field(
        default=None,
        description="Share of requests to escalate; the threshold comes from the fast model's calibration "
        "(calibration.json) and is shown in status.cascade.threshold.",
    )


class CaptionModelSpec(SpecModel):
    versions: list[ModelVersion] = Field(min_length=1, max_length=10)
    image: Image | None = Field(
        default=None, description="Runtime and router image; default: the operator's."
    )
    image_pull_secrets: list[Annotated[str, Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)]] = Field(
        default_factory=list
    )
    batching: Batching = Field(default_factory=Batching)
    generation: Generation = Field(default_factory=Generation)
    resources: Resources = Field(default_factory=Resources)
    node_selector: dict[LabelKey, LabelValue] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    affinity: dict[str, Any] | None = Field(
        default=None,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        description="A core/v1 Affinity, copied into the runtime pods (the CRD holds its upstream schema).",
    )
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    rollout: Rollout = Field(default_factory=Rollout)
    cache: Cache | None = None
    jobs: Jobs | None = None
    moderation: Moderation | None = None
    auth: Auth | None = None
    router: Router = Field(default_factory=Router)
    cascade: Cascade | None = None

    def version(self, name: str) -> ModelVersion:
        return next(v for v in self.versions if v.name == name)

    def canary(self) -> ModelVersion | None:
        """The version in progressive rollout, if any."""
        return next((v for v in self.versions if v.canary), None)

    def stable(self) -> ModelVersion | None:
        """The non-canary version with the most traffic (the first of equals): the one a canary replaces."""
        candidates = [v for v in self.versions if not v.canary]
        return max(candidates, key=lambda v: v.weight) if candidates else None  # max keeps the first


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
