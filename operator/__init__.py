"""The kopf operator that reconciles CaptionModel resources into captioning fleets.

Imported as ``captionfleet.operator`` (``captionfleet/operator`` links to this folder).
"""

if __name__ == "operator":
    # The folder name clashes with the standard library's ``operator``. When the repository root comes
    # first on sys.path (``python -m ...`` or ``python -c`` run from here, before anything imported the
    # real one), the interpreter finds this folder instead. Hand it the standard library's module, using
    # only the frozen import machinery and os.path: importlib.util and pathlib need ``operator`` themselves.
    import _frozen_importlib as _bootstrap
    import _frozen_importlib_external as _external
    import os as _os
    import sys as _sys

    _stdlib_dir = _os.path.dirname(_os.__file__)  # noqa: PTH120 - pathlib imports operator
    _spec = _external.spec_from_file_location("operator", _os.path.join(_stdlib_dir, "operator.py"))  # noqa: PTH118
    assert _spec is not None and _spec.loader is not None
    _stdlib_operator = _bootstrap.module_from_spec(_spec)
    _spec.loader.exec_module(_stdlib_operator)
    _sys.modules["operator"] = _stdlib_operator
