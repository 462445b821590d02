"""captionfleet: a Kubernetes operator for image-captioning fleets, and the runtime that serves them.

The import package maps the top-level folders: ``operator/`` is ``captionfleet.operator`` and
``runtime/`` is ``captionfleet.runtime`` (see docs/architecture.md for why the folders have no
``__init__.py`` of their own).
"""

__version__ = "0.1.0"
