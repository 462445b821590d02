"""The bundled model's provenance: synthetic scenes, training, saving and scoring any BLIP directory."""
