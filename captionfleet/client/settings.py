"""``captionfleet caption``'s settings: one frozen dataclass, one documented default per field.

Every field is also a command-line option (``--endpoint``) and an environment variable
(``CAPTIONFLEET_ENDPOINT``); the images are the command's arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

from captionfleet.settings import setting
from captionfleet.settings.serve import ServeSettings

_RUNTIME = ServeSettings()
"""The runtime's defaults, which the client's job sizes must stay within."""


@dataclass(frozen=True)
class CaptionSettings:
    endpoint: str = setting(
        "http://127.0.0.1:8080", "Base URL of the fleet's router (or of one captionfleet serve)."
    )
    api_key: str = setting(
        "", "X-API-Key sent with every call (prefer the environment variable to the option); empty: none."
    )
    user_id: str = setting(
        "", "X-User-Id sent with every call: the user whose model version answers (sticky); empty: none."
    )
    output: str = setting(
        "results.jsonl",
        "JSON Lines written here, one line per image in input order: {index, id, result} or "
        "{index, id, error}. An interrupted run leaves <output>.state.json next to it; the same command "
        "resumes from it.",
    )
    resume: str = setting(
        "", "A job id to wait for and fetch instead of submitting images (e.g. one made elsewhere)."
    )
    direct_max_images: int = setting(
        16,
        "Up to this many images are captioned by POST /v1/caption calls (concurrency at once) instead of "
        "a job: a job's queue and polling only pay off beyond a handful.",
    )
    concurrency: int = setting(4, "Direct POST /v1/caption calls in flight at once.")
    max_job_items: int = setting(
        _RUNTIME.jobs_max_items, "Most images per job (the runtime's jobs_max_items); more make several jobs."
    )
    max_job_bytes: int = setting(
        _RUNTIME.jobs_max_bytes * 3 // 4,
        "Largest job body (its images base64-encoded, JSON); more are split into several jobs. Keep it "
        "below the router's and the runtimes' jobs_max_bytes (by default three quarters of theirs).",
    )
    poll_interval_s: float = setting(1.0, "Seconds between checks of a job's progress.")
    timeout_s: float = setting(
        300.0, "Time allowed for one HTTP call (a submission, a caption, a job's results)."
    )
    retries: int = setting(
        5,
        "Retries of a call answered 429, 502, 503 or 504 (after its Retry-After) or not answered at all "
        "(a job's submission: 429 and 503 only); then the run stops (the same command resumes it).",
    )
    style: str = setting("", "Caption style preset (descriptive, concise, ...); empty: the server's default.")
    prompt: str = setting("", "Caption prefix; empty: none.")
    suggestions: int = setting(0, "Alternative captions per image (1-5); 0: none.")
    num_beams: int = setting(0, "Beam width; 0: the server's default.")
    progress: bool = setting(True, "Show a progress bar on stderr.")

    def options(self) -> dict[str, object]:
        """The caption options the contract names, as JSON fields; unset ones left out."""
        chosen: dict[str, object] = {"style": self.style, "prompt": self.prompt}
        chosen |= {"suggestions": self.suggestions, "num_beams": self.num_beams}
        return {name: value for name, value in chosen.items() if value}

    def check(self) -> list[str]:
        """Problems that make these settings unusable, as messages (empty: fine)."""
        problems = []
        if not self.endpoint.startswith(("http://", "https://")):
            problems.append("endpoint must be an http:// or https:// URL")
        for name in ("concurrency", "max_job_items", "max_job_bytes", "poll_interval_s", "timeout_s"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0")
        for name in ("direct_max_images", "retries", "suggestions", "num_beams"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0")
        if not self.output:
            problems.append("output must name a file")
        return problems
