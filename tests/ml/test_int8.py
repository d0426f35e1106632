"""The int8 variant: export with parity measured on validation, a failed parity makes a model of
its own, and `auto` picks int8 only on VNNI/AMX CPUs for a variant that passed."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ml.artifact import ArtifactError, read_metadata
from ml.backends import (
    INT8_FILE,
    INT8_INFO_FILE,
    cpu_flags,
    int8_pays,
    resolve_backend,
    serving_terms,
)
from ml.predictor import Predictor
from tests.conftest import CXR_DIR, FIXTURES, REPO
from tests.ml.conftest import tiny_manifest

VNNI = frozenset({"avx2", "avx512f", "avx512_vnni"})
AVX2 = frozenset({"avx2", "fma"})


@pytest.fixture(scope="module")
def int8_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The gated tiny model with its ONNX export and an int8 variant made from real X-rays.

    The targets cannot be met (|delta p| <= -1), so the variant is a model of its own.
    """
    from ml.export import export_onnx
    from ml.training.int8 import Targets, export_int8
    from ml.training.quantize import Recipe

    work = tmp_path_factory.mktemp("int8")
    model_dir = work / "tiny"
    shutil.copytree(tiny_model_dir, model_dir)
    export_onnx(model_dir)
    manifest = tiny_manifest(work / "manifest.csv", per_source=8)
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(model_dir / "split.csv", "w", newline="") as f:  # 4 + 4 of each class per split
        writer = csv.writer(f)
        writer.writerow(["file", "split"])
        for i, row in enumerate(rows):
            writer.writerow([row["file"], "train" if i % 8 < 4 else "val"])
    recipe = Recipe(calibration_images=8, equalise_images=8, histogram_bins=256, chunk=4)
    export_int8(model_dir, manifest, recipe=recipe, targets=Targets(max_abs_delta_p99=-1.0))
    return model_dir


def _info(model_dir: Path) -> dict:
    return json.loads((model_dir / INT8_INFO_FILE).read_text())


def _edited_copy(int8_dir: Path, tmp_path: Path, name: str, **parity: object) -> Path:
    """A copy of the variant whose json records other parity figures."""
    copy = tmp_path / name
    shutil.copytree(int8_dir, copy)
    info = _info(copy)
    info["parity"].update(parity)
    (copy / INT8_INFO_FILE).write_text(json.dumps(info))
    return copy


def _passed_copy(int8_dir: Path, tmp_path: Path) -> Path:
    """The same variant as if it had met every target (same file, json says passed)."""
    gate = {**_info(int8_dir)["parity"]["gate"], "changed": 0, "changed_by_kind": {}}
    copy = _edited_copy(int8_dir, tmp_path, "passed", passed=True, missed=[], gate=gate)
    info, meta = _info(copy), read_metadata(copy)
    info["serving"] = {"model_version": meta.model_version, "threshold": meta.threshold}
    (copy / INT8_INFO_FILE).write_text(json.dumps(info))
    return copy


def _without_gate(model_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ungated"
    shutil.copytree(model_dir, copy)
    for name in ("gate.json", "gate.npz"):
        (copy / name).unlink()
    return copy


def _images() -> list[np.ndarray]:
    from ml.imaging import decode_image

    return [decode_image(p.read_bytes()).pixels for p in sorted(FIXTURES.glob("*.png"))]


def test_export_records_recipe_and_parity_measured_on_validation(int8_dir: Path):
    info, meta = _info(int8_dir), read_metadata(int8_dir)
    assert info["file"] == INT8_FILE and info["weights_sha256"] == meta.weights_sha256
    assert info["precision"] == "int8" and info["outputs"] == ["covid_probability", "cam", "features"]
    recipe = info["recipe"]
    assert recipe["split"] == "train" and recipe["calibration_images"] == 8
    assert recipe["method"] == "percentile" and recipe["percentile"] == 99.99
    assert len(recipe["kept_fp32"]) == 3  # the stem's convolution, the head's and the CAM's products
    parity = info["parity"]
    assert parity["split"] == "val" and parity["images"] == 8
    for key in ("auroc_fp32", "auroc_int8", "label_agreement", "abs_delta_p99", "cam_correlation_p01",
                "features_rel_err_p99"):
        assert parity[key] is not None, key
    assert parity["gate"]["images"] == 8 and parity["gate"]["changed"] >= 0
    assert parity["gate"]["gate_version"] == json.loads((int8_dir / "gate.json").read_text())["version"]
    assert parity["passed"] is False and "abs_delta_p99" in parity["missed"]


def test_recorded_agreement_is_what_the_two_backends_give(int8_dir: Path):
    from ml.training.int8 import split_images

    meta = read_metadata(int8_dir)
    _, val = split_images(int8_dir, int8_dir.parent / "manifest.csv", int8_dir / "split.csv", meta, 0)
    from ml.preprocess import to_caffe

    batch = to_caffe(val.gray)
    fp32 = Predictor.load(int8_dir, backend="onnx").backend.forward(batch, explain=True)
    int8 = Predictor.load(int8_dir, backend="onnx-int8").backend.forward(batch, explain=True)
    parity = _info(int8_dir)["parity"]
    delta = np.abs(fp32.probability.astype(np.float64) - int8.probability)
    assert parity["abs_delta_max"] == pytest.approx(float(delta.max()), abs=1e-6)
    agree = ((fp32.probability >= meta.threshold) == (int8.probability >= meta.threshold)).mean()
    assert parity["label_agreement"] == pytest.approx(float(agree))
    assert int8.cam is not None and int8.cam.shape == fp32.cam.shape  # type: ignore[union-attr]
    assert int8.features.shape == fp32.features.shape and int8.features.dtype == np.float32


def test_a_failed_variant_is_a_model_of_its_own(int8_dir: Path, tmp_path: Path):
    info, meta = _info(int8_dir), read_metadata(int8_dir)
    serving = info["serving"]
    assert serving["model_version"] == meta.model_version + "+int8"
    assert 0.0 <= serving["threshold"] <= 1.0 and serving["metrics"]["split"] == "val"
    predictor = Predictor.load(_without_gate(int8_dir, tmp_path), backend="onnx-int8")
    for r in predictor.predict(_images(), explain=True):
        assert r.backend == "onnx-int8" and r.model_version == serving["model_version"]
        assert r.threshold == serving["threshold"]
        if r.abstain_reason is None:
            assert r.label == ("covid" if r.probability_covid >= serving["threshold"] else "non-covid")
            assert r.heatmap_png is not None and r.heatmap_png.startswith(b"\x89PNG")
    # ... which `auto` never picks, even on a VNNI CPU.
    assert resolve_backend("auto", int8_dir, meta, flags=VNNI) == "onnx"


def test_auto_picks_a_passed_variant_only_where_int8_pays(int8_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch):
    import ml.backends

    passed = _passed_copy(int8_dir, tmp_path)
    meta = read_metadata(passed)
    assert resolve_backend("auto", passed, meta, flags=VNNI) == "onnx-int8"
    assert resolve_backend("auto", passed, meta, flags=frozenset({"amx_int8", "amx_tile"})) == "onnx-int8"
    assert resolve_backend("auto", passed, meta, flags=AVX2) == "onnx"
    assert resolve_backend("auto", passed, meta, flags=frozenset()) == "onnx"
    [r] = Predictor.load(passed, backend="onnx-int8").predict(_images()[:1])
    assert (r.backend, r.model_version, r.threshold) == ("onnx-int8", meta.model_version, meta.threshold)
    # A variant whose file no longer matches its json is never picked, and refused when asked for.
    (passed / INT8_FILE).write_bytes((passed / INT8_FILE).read_bytes() + b"\0")
    assert resolve_backend("auto", passed, meta, flags=VNNI) == "onnx"
    with pytest.raises(ArtifactError):
        Predictor.load(passed, backend="onnx-int8")
    monkeypatch.setattr(ml.backends, "gpu_visible", lambda: True)
    assert resolve_backend("auto", int8_dir, meta, flags=VNNI) == "keras"


def test_a_variant_that_changes_the_gates_decisions_is_refused(int8_dir: Path, tmp_path: Path):
    gate = _info(int8_dir)["parity"]["gate"]
    changes = _edited_copy(int8_dir, tmp_path, "changes", gate={**gate, "changed": 3})
    with pytest.raises(ArtifactError) as err:
        Predictor.load(changes, backend="onnx-int8", require_gate=True)
    assert err.value.code == "int8_changes_gate" and "float32" in err.value.message
    stale = _edited_copy(int8_dir, tmp_path, "stale", gate={**gate, "changed": 0,
                                                            "gate_version": "gate-1-refitted"})
    with pytest.raises(ArtifactError) as err:
        Predictor.load(stale, backend="onnx-int8")
    assert err.value.code == "int8_gate_unmeasured"
    # `auto` does not pick a variant measured with another gate, even one that passed.
    passed_stale = _edited_copy(stale, tmp_path, "passed-stale", passed=True, missed=[])
    assert resolve_backend("auto", passed_stale, read_metadata(passed_stale), flags=VNNI) == "onnx"


def test_a_variant_of_its_own_is_served_behind_a_gate_fitted_on_its_own_features(
        int8_dir: Path, tmp_path: Path):
    from ml.gate import Gate
    from ml.training.gate import main as gate_main

    own = tmp_path / "own"
    shutil.copytree(int8_dir, own)
    meta, serving = read_metadata(own), _info(own)["serving"]
    float32_gate = Gate.load(own, meta)
    assert float32_gate is not None
    assert gate_main(["--model", str(own), "--backend", "onnx-int8", "--quick",
                      "--cxr", str(CXR_DIR), "--ood", str(CXR_DIR.parent / "ood")]) == 0
    info = json.loads((own / "gate.int8.json").read_text())
    assert info["variant"] == "int8" and info["model_version"] == serving["model_version"]
    assert info["engine_sha256"] == _info(own)["sha256"]
    predictor = Predictor.load(own, backend="onnx-int8", require_gate=True)
    assert predictor.gate is not None and predictor.gate.version == info["version"]
    assert predictor.gate.version != float32_gate.version
    results = predictor.predict(_images())
    assert {(r.backend, r.model_version, r.gate_version) for r in results} == {
        ("onnx-int8", serving["model_version"], info["version"])}
    # The float32 model keeps its own gate.
    fp32 = Predictor.load(own, backend="onnx", require_gate=True)
    assert fp32.gate is not None and fp32.gate.version == float32_gate.version
    # A gate fitted on another int8 file (the variant was re-exported since) is refused.
    (own / "gate.int8.json").write_text(json.dumps({**info, "engine_sha256": "0" * 64}))
    with pytest.raises(ArtifactError) as err:
        Predictor.load(own, backend="onnx-int8", require_gate=True)
    assert err.value.code == "invalid_model" and "--backend onnx-int8" in err.value.message


def test_a_gate_with_its_own_network_serves_the_variant_unchanged(int8_dir: Path, tmp_path: Path):
    """Its features do not come from the classifier, so int8 cannot move them: no own gate needed."""
    from ml.training.gate_quick import fit_quick_gate

    own = tmp_path / "own-network"
    shutil.copytree(int8_dir, own)
    for name in ("gate.int8.json", "gate.int8.npz"):
        (own / name).unlink(missing_ok=True)
    fit_quick_gate(own, CXR_DIR, CXR_DIR.parent / "ood", sorted(FIXTURES.glob("*.png")),
                   own_features_size=32)
    serving = _info(own)["serving"]
    gate_version = json.loads((own / "gate.json").read_text())["version"]
    int8 = Predictor.load(own, backend="onnx-int8", require_gate=True)
    fp32 = Predictor.load(own, backend="onnx", require_gate=True)
    images = _images()
    for predictor, version in ((int8, serving["model_version"]), (fp32, read_metadata(own).model_version)):
        results = predictor.predict(images)
        assert {(r.model_version, r.gate_version) for r in results} == {(version, gate_version)}
    # Exporting a variant again measures no gate parity: int8 cannot move the gate's features.
    from ml.training.int8 import Targets, export_int8
    from ml.training.quantize import Recipe

    manifest = tiny_manifest(tmp_path / "manifest.csv", per_source=8)
    info = export_int8(own, manifest, recipe=Recipe(calibration_images=8, equalise_images=8,
                                                   histogram_bins=256, chunk=4),
                       targets=Targets(max_abs_delta_p99=-1.0))
    assert "gate" not in info["parity"] and "gate_changes" not in info["parity"]["missed"]
    # The same images, the same verdicts, whichever engine classified them.
    assert ([r.abstain_reason for r in int8.predict(images)]
            == [r.abstain_reason for r in fp32.predict(images)])


def test_no_variant_means_float32_and_asking_for_one_says_how_to_make_it(int8_dir: Path, tmp_path: Path):
    plain = tmp_path / "plain"
    shutil.copytree(int8_dir, plain)
    (plain / INT8_INFO_FILE).unlink()
    assert resolve_backend("auto", plain, read_metadata(plain), flags=VNNI) == "onnx"
    with pytest.raises(ArtifactError) as err:
        Predictor.load(plain, backend="onnx-int8")
    assert err.value.code == "no_int8_export" and "--int8" in err.value.message


def test_serving_terms_never_let_a_failed_variant_pass_as_float32(int8_dir: Path):
    meta, info = read_metadata(int8_dir), _info(int8_dir)
    assert serving_terms(meta, {}) == (meta.threshold, meta.model_version)
    assert serving_terms(meta, info)[1].endswith("+int8")
    for bad in ({"model_version": meta.model_version, "threshold": 0.3},
                {"model_version": "other+int8", "threshold": 0.3},
                {"model_version": meta.model_version + "+int8", "threshold": 1.5}):
        with pytest.raises(ArtifactError):
            serving_terms(meta, {**info, "serving": bad})


def test_verdict_names_each_missed_target():
    from ml.training.int8 import Targets, verdict

    good = {"auroc_change": -0.001, "label_agreement": 0.995, "abs_delta_p99": 0.01,
            "cam_correlation_p01": 0.97, "gate": {"changed": 0}}
    assert verdict(good, Targets()) == []
    bad = {"auroc_change": -0.02, "label_agreement": 0.93, "abs_delta_p99": 0.44,
           "cam_correlation_p01": 0.5, "gate": {"changed": 3}}
    assert verdict(bad, Targets()) == ["auroc_change", "label_agreement", "abs_delta_p99",
                                       "cam_correlation_p01", "gate_changes"]


def test_cpu_flags_from_cpuinfo(tmp_path: Path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n\nprocessor\t: 1\n"
                   "flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert cpu_flags(x86) == {"fpu", "avx2", "avx512f", "avx512_vnni"} and int8_pays(cpu_flags(x86))
    assert not int8_pays(cpu_flags(arm)) and not int8_pays(cpu_flags(tmp_path / "missing"))


def test_int8_export_needs_the_images():
    out = subprocess.run([sys.executable, "-m", "ml.export", "models/dev", "--int8"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--int8 needs --manifest" in out.stderr
