"""The version of captionfleet: one place, read by the CLI, the OpenAPI document and both distributions'
build configurations (``pyproject.toml`` and ``packaging/operator/pyproject.toml``)."""

__version__ = "0.1.0"
