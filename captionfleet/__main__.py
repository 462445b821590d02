"""``python -m captionfleet``: the ``captionfleet`` command.

``captionfleet`` is a namespace package with no ``__init__.py``: the build configuration maps
``captionfleet.operator`` to the top-level folder ``operator/`` and ``captionfleet.runtime`` to
``runtime/`` (``pyproject.toml``, ``[tool.setuptools.package-dir]``), so that nothing at the repository
root is found ahead of the standard library's ``operator`` (see docs/architecture.md).
"""

from captionfleet.cli import main

raise SystemExit(main())
