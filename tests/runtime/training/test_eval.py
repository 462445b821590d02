"""`captionfleet eval`: scores, the JSON report, COCO-style folders, and the bundled model's quality."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from captionfleet.cli import main
from captionfleet.evalsets import DatasetError
from captionfleet.runtime.engine.captioner import Captioner, bundled_model_dir, load_captioner
from captionfleet.runtime.training.evaluate import coco_set, evaluate, synthetic_set
from captionfleet.runtime.training.scenes import scene_at
from captionfleet.runtime.training.settings import HELD_OUT_SEED, TRAIN_SEED
from captionfleet.scoring import normalise_text, score_captions


@pytest.fixture(scope="module")
def bundled() -> Captioner:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_captioner(str(bundled_model_dir()))


@pytest.fixture(scope="module")
def held_out_json() -> dict[str, Any]:
    """`captionfleet eval --json` on the first 100 held-out scenes, through the real loading code."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    capture = _Capture()
    with capture:
        assert main(["eval", "--scenes", "100", "--json", "--progress", "false"]) == 0
    lines = capture.text.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one line: one JSON object"
    result: dict[str, Any] = json.loads(lines[0])
    return result


class _Capture:
    """stdout of a block (capsys cannot serve a module-scoped fixture)."""

    def __enter__(self) -> None:
        import contextlib
        import io

        self._buffer = io.StringIO()
        self._redirect = contextlib.redirect_stdout(self._buffer)
        self._redirect.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._redirect.__exit__(*exc)  # type: ignore[arg-type]
        self.text = self._buffer.getvalue()


def test_the_bundled_model_captions_held_out_scenes(held_out_json: dict[str, Any]) -> None:
    assert held_out_json["n"] == 100
    assert held_out_json["exact_match"] >= 0.95, held_out_json["mistakes"]
    assert held_out_json["bleu4"] >= 0.95
    assert held_out_json["cider"] > 5
    assert f"seed {HELD_OUT_SEED}" in held_out_json["dataset"]


def test_json_report_fields(held_out_json: dict[str, Any]) -> None:
    for key in ("n", "exact_match", "bleu1", "bleu4", "cider", "images_per_second", "seconds"):
        assert isinstance(held_out_json[key], (int, float)), key
    assert held_out_json["images_per_second"] > 0
    assert held_out_json["num_beams"] == 3 and held_out_json["max_new_tokens"] == 30  # serving defaults
    assert held_out_json["model"] == bundled_model_dir().name
    assert held_out_json["version"].startswith(bundled_model_dir().name)
    assert held_out_json["warnings"] == []
    first = held_out_json["examples"][0]
    assert first["references"] == [scene_at(HELD_OUT_SEED, 0).caption]


def test_scoring_the_training_seed_is_flagged(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--scenes", "4", "--seed", str(TRAIN_SEED), "--progress", "false"]) == 0
    table = capsys.readouterr().out
    assert "exact match" in table and "images/s" in table
    assert "warning: seed 0 is this model's training seed" in table


def _coco_folder(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    images = tmp_path / "images"
    images.mkdir()
    truths = []
    entries = []
    annotations = []
    for index in range(6):
        scene = scene_at(HELD_OUT_SEED + 1, index)
        name = f"scene-{index}.{'jpg' if index % 2 else 'png'}"
        # Larger than the scenes the model saw, in two formats: the engine resizes them as it would uploads.
        scene.render(256).save(images / name, quality=95)
        entries.append({"id": 100 + index, "file_name": name})
        # Capitals and punctuation do not count; a second, wrong reference does not hurt.
        annotations.append({"image_id": 100 + index, "caption": scene.caption.capitalize() + "."})
        annotations.append({"id": 7, "image_id": 100 + index, "caption": "a photo of something else"})
        truths.append(scene.caption)
    entries.append({"id": 999, "file_name": "missing.png"})  # listed, not in the folder: skipped
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"images": entries, "annotations": annotations}))
    return images, captions, truths


def test_a_coco_style_folder_is_scored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images, captions, _ = _coco_folder(tmp_path)
    argv = ["eval", "--images", str(images), "--captions", str(captions), "--json", "--progress", "false"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 6
    assert report["skipped"] == 1
    assert report["exact_match"] >= 5 / 6, report["mistakes"]
    assert report["examples"][0]["id"] == "100"

    assert main([*argv, "--limit", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 2


def test_folder_images_go_through_the_engines_decoding(tmp_path: Path, bundled: Captioner) -> None:
    images, captions, truths = _coco_folder(tmp_path)
    dataset = coco_set(images, captions)
    assert [item.references[0] for item in dataset.items] == [t.capitalize() + "." for t in truths]
    report = evaluate(bundled, dataset)
    by_file = {item.key: item for item in dataset.items}
    assert set(by_file) == {str(100 + i) for i in range(6)}
    assert report.n == 6 and report.device == "cpu"


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("not json", "not readable JSON"),
        (json.dumps([1, 2]), "'images' list"),
        (json.dumps({"images": []}), "'annotations' list"),
        (json.dumps({"images": [{"id": 1}], "annotations": []}), "images[0] needs an 'id' and a 'file_name'"),
        (json.dumps({"images": [], "annotations": [{"image_id": 1}]}), "annotations[0] needs"),
        (
            json.dumps({"images": [{"id": 1, "file_name": "a.png"}] * 2, "annotations": []}),
            "listed twice",
        ),
        (json.dumps({"images": [{"id": 1, "file_name": "nope.png"}], "annotations": []}), "none of the 1"),
    ],
)
def test_bad_captions_files_get_clear_errors(tmp_path: Path, document: str, message: str) -> None:
    captions = tmp_path / "captions.json"
    captions.write_text(document)
    with pytest.raises(DatasetError, match=re.escape(message)):
        coco_set(tmp_path, captions)
    with pytest.raises(SystemExit, match=re.escape(message)):
        main(["eval", "--images", str(tmp_path), "--captions", str(captions), "--progress", "false"])


def test_a_broken_image_file_names_the_file(tmp_path: Path, bundled: Captioner) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    captions = tmp_path / "captions.json"
    captions.write_text(
        json.dumps(
            {
                "images": [{"id": 1, "file_name": "broken.png"}],
                "annotations": [{"image_id": 1, "caption": "x"}],
            }
        )
    )
    with pytest.raises(DatasetError, match=r"broken\.png \(id 1\)"):
        evaluate(bundled, coco_set(tmp_path, captions))


def test_normalisation_ignores_case_punctuation_and_spacing() -> None:
    assert normalise_text("  A Red,  round BALL. ") == "a red round ball"
    assert normalise_text("a dog's toy -- (new)!") == "a dog s toy new"
    assert normalise_text("") == ""


def test_scores_of_perfect_partial_and_empty_captions() -> None:
    references = {str(i): [scene_at(5, i).caption] for i in range(20)}
    perfect = score_captions({k: v[0].upper() + "!" for k, v in references.items()}, references)
    assert perfect.n == 20 and perfect.exact_match == 1.0
    assert perfect.bleu4 == pytest.approx(1.0, abs=1e-6)
    assert perfect.cider > 5

    wrong = dict(perfect_pairs := {k: v[0] for k, v in references.items()})
    wrong["0"] = wrong["0"].replace("background", "ground")
    wrong["1"] = ""
    partial = score_captions(wrong, references)
    assert partial.exact_match == pytest.approx(18 / 20)
    assert partial.bleu4 < perfect.bleu4 and partial.cider < perfect.cider
    assert len(perfect_pairs) == 20

    with pytest.raises(ValueError, match="same ids"):
        score_captions({"a": "x"}, {"b": ["x"]})


def test_synthetic_sets_are_prefixes_of_each_other() -> None:
    small, large = synthetic_set(HELD_OUT_SEED, 3), synthetic_set(HELD_OUT_SEED, 6)
    assert [i.references for i in small.items] == [i.references for i in large.items[:3]]
    assert (
        small.items[0].image is not None and small.items[0].image.tobytes() == large.items[0].image.tobytes()
    )


def test_the_scorer_gives_pycocoevalcaps_numbers(held_out_json: dict[str, Any]) -> None:
    # captionfleet.scoring is plain Python (the operator's quality gate imports it); the COCO toolkit's
    # own BLEU and CIDEr-D are the reference, on real captions with mistakes and on odd cases.
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    from captionfleet.scoring import bleu, cider

    sets = [
        {
            "a": (
                "a large red circle above a small blue square",
                ["a large red circle above a small blue square"],
            ),
            "b": ("a small red circle", ["a large red circle on a white background", "a red circle"]),
            "c": ("a blue star blue star blue", ["a small blue star on a gray background"]),
            "d": (" ", ["a purple triangle"]),
        },
        {
            str(i): (m["caption"], m["references"])
            for i, m in enumerate(held_out_json["examples"] + held_out_json["mistakes"])
        },
    ]
    for items in sets:
        hypotheses = [normalise_text(h) or " " for h, _ in items.values()]
        references = [[normalise_text(r) for r in refs] for _, refs in items.values()]
        truth = {k: refs for k, refs in zip(items, references, strict=True)}
        result = {k: [h] for k, h in zip(items, hypotheses, strict=True)}
        expected_bleu, _ = Bleu(4).compute_score(truth, result, verbose=0)
        expected_cider, _ = Cider().compute_score(truth, result)
        assert bleu(hypotheses, references) == pytest.approx(expected_bleu, rel=1e-12, abs=1e-15)
        assert cider(hypotheses, references) == pytest.approx(float(expected_cider), rel=1e-12, abs=1e-12)
