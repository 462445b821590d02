"""The kopf operator that reconciles CaptionModel resources into captioning fleets.

Imported as ``captionfleet.operator``. The folder name never shadows the standard library's
``operator``: that module is already loaded by the interpreter's start-up before any path of ours is
searched, and nothing here puts the repository root on ``sys.path``.
"""
