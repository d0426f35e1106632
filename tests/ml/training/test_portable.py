"""Training away from the data: ml.training.pack -> ml.training.portable -> ml.training.package, end to end.

The portable trainer is what runs on a GPU host with a Keras backend but no TensorFlow; here
it runs on TensorFlow's CPU backend, at 32 px, one epoch.
"""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from ml.artifact import read_metadata
from ml.imaging import decode_image
from ml.predictor import Predictor
from ml.training import data, pack, package
from ml.training import portable as train_portable
from tests.conftest import CXR_DIR
from tests.ml.conftest import tiny_manifest

HELD = "ieee8023-covid-chestxray"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("portable")
    manifest = tiny_manifest(
        d / "manifest.csv", ("hannover-mhh", "nih-chestxray8-subset", HELD), per_source=10
    )
    out = d / "pack.npz"
    rc = pack.main(
        [
            *("--manifest", str(manifest), "--input-size", "32", "--out", str(out)),
            *("--exclude-source", HELD, "--heldout-source", HELD),
        ]
    )
    assert rc == 0
    return {"dir": d, "manifest": manifest, "pack": out, "split": d / "pack.split.csv"}


@pytest.fixture(scope="module")
def run(packed: dict) -> Path:
    out = packed["dir"] / "run"
    rc = train_portable.main(
        ["--pack", str(packed["pack"]), "--out", str(out), "--epochs", "1", "--batch-size", "8"]
    )
    assert rc == 0
    return out


def test_pack_holds_the_preprocessed_train_and_val_images(packed: dict) -> None:
    records = data.load_manifest(packed["manifest"])
    split = data.read_split(packed["split"], records)
    p = pack.read_pack(packed["pack"])
    assert p.meta["excluded_sources"] == [HELD] and p.meta["input_size"] == 32
    for name in ("train", "val"):
        kept = [r for r in split[name] if r.source != HELD]
        assert len(p.gray[name]) == len(kept) > 0
        assert p.target[name].tolist() == [r.target for r in kept]
        assert {p.meta["sources"][i] for i in p.source[name]} <= {r.source for r in kept}
        # JPEG at quality 95: what was packed is the serving preprocessing, give or take.
        exact = data.load_gray_images(kept, 32, p.meta["preprocess_version"])
        assert p.gray[name].dtype == np.uint8
        assert np.abs(p.gray[name] - exact).mean() < 3.0
    # The held-out source: all its images, none of them in train or val, test ones too.
    assert len(p.gray[pack.HELDOUT]) == sum(r.source == HELD for r in records)
    # The sha names the split after exclusion, as ml.training.train's split.csv would.
    _, sha = pack.split_without(records, data.read_split(packed["split"], records), [HELD])
    assert p.meta["split_sha256"] == sha


def test_pack_refuses_a_heldout_source_that_is_trained_on(packed: dict, tmp_path: Path) -> None:
    args = ["--manifest", str(packed["manifest"]), "--out", str(tmp_path / "p.npz")]
    with pytest.raises(SystemExit):
        pack.main([*args, "--heldout-source", HELD])
    assert pack.main([*args, "--exclude-source", "no-such-source"]) == 2


def test_read_pack_rejects_other_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", meta=np.array(json.dumps({"format": "x"})))
    with pytest.raises(ValueError, match="not a cxr-pack-1"):
        pack.read_pack(tmp_path / "other.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="cannot read pack"):
        pack.read_pack(tmp_path / "broken.npz")


def test_portable_run_records_weights_history_and_heldout_screening(run: Path) -> None:
    record = json.loads((run / train_portable.RUN_FILE).read_text())
    state = json.loads((run / train_portable.HISTORY_FILE).read_text())
    assert record["backend"] == "tensorflow" and record["excluded_sources"] == [HELD]
    assert state["epoch"] == 1 and state["best_epoch"] == 1
    assert {"loss", "auc", "val_auc", "lr"} <= set(state["history"][0])
    assert record["heldout"]["source"] == HELD and record["heldout"]["images"] > 0
    with np.load(run / train_portable.WEIGHTS_FILE) as z:
        assert len(z.files) == record["weights"] and z["w000"].dtype == np.float16


def test_package_makes_a_servable_artifact_with_a_validation_threshold(
    run: Path, packed: dict
) -> None:
    out = packed["dir"] / "model"
    args = ["--run", str(run), "--manifest", str(packed["manifest"]), "--out", str(out)]
    assert package.main([*args, "--split", str(packed["split"])]) == 0
    meta = read_metadata(out)
    assert meta.trained and meta.input_size == 32 and 0.0 <= meta.threshold <= 1.0
    assert meta.training_data["trained_by"] == "ml.training.portable"
    assert meta.training_data["excluded_sources"] == [HELD]
    assert meta.metrics["split"] == "val" and (out / "training_curves.png").is_file()
    assert not (out / "checkpoint").exists()
    # The artifact's split.csv is the one trained on: the held-out source is not in it.
    written = data.read_split(out / "split.csv", data.load_manifest(packed["manifest"]))
    assert all(r.source != HELD for name in ("train", "val") for r in written[name])
    image = next(r for r in written["test"]).path.read_bytes()
    (prediction,) = Predictor.load(out).predict([decode_image(image).pixels])
    assert 0.0 <= prediction.probability_covid <= 1.0


def test_package_refuses_a_split_the_run_was_not_trained_on(
    run: Path, packed: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    records = data.load_manifest(packed["manifest"])
    data.write_split(data.split_by_patient(records, 0.3, 0.15, seed=7), tmp_path / "other.csv")
    args = ["--run", str(run), "--manifest", str(packed["manifest"]), "--out", str(tmp_path)]
    assert package.main([*args, "--split", str(tmp_path / "other.csv")]) == 2
    assert "not the split the run was trained on" in capsys.readouterr().err
    assert package.main([*args, "--split", str(packed["split"]), "--run", str(tmp_path)]) == 2


def test_exclude_sources_refuses_unknown_or_one_class_splits(packed: dict) -> None:
    p = pack.read_pack(packed["pack"])
    with pytest.raises(ValueError, match="no source named"):
        train_portable.exclude_sources(p, ["nope"])
    with pytest.raises(ValueError, match="lacks COVID or non-COVID"):
        train_portable.exclude_sources(p, ["hannover-mhh"])


def test_augment_is_identity_at_inference_and_seeded_in_range_in_training() -> None:
    gray = np.tile(np.linspace(0, 255, 32, dtype=np.float32), (4, 32, 1))[..., None]
    for strength in ("mild", "strong", "patch"):
        layer = train_portable.Augment(strength, seed=3)
        np.testing.assert_array_equal(np.asarray(layer(gray, training=False)), gray)
        out = np.asarray(layer(gray, training=True))
        again = np.asarray(train_portable.Augment(strength, seed=3)(gray, training=True))
        assert out.shape == gray.shape and out.min() >= 0.0 and out.max() <= 255.0
        np.testing.assert_allclose(out, again, atol=1e-4)
        assert np.abs(out - gray).mean() > 1.0


def test_balanced_batches_draw_each_source_of_a_class_equally_often() -> None:
    y = np.array([1] * 90 + [1] * 10 + [0] * 100, dtype=np.float32)
    sources = np.array([0] * 90 + [1] * 10 + [2] * 100)
    x = np.zeros((200, 2, 2, 1), np.uint8)
    batches = train_portable.BalancedBatches(x, y, sources, batch_size=50, seed=0)
    drawn = []
    for _ in range(20):
        drawn += list(batches.order)
        batches.on_epoch_end()
    share = np.bincount(sources[drawn], minlength=3) / len(drawn)
    np.testing.assert_allclose(share, [0.25, 0.25, 0.5], atol=0.03)
    xb, yb = batches[0]
    assert xb.shape == (50, 2, 2, 1) and yb.shape == (50, 1)


class _Stub:
    stop_training = False

    class optimizer:  # noqa: N801 - stands in for model.optimizer
        learning_rate = 1e-3


class _Weights:
    def get_weights(self) -> list:
        return [np.zeros(1)]


def _epochs(seconds: list[float], auc: list[float], patience: int, budget_s: float | None):
    """Run BestAndDeadline over epochs of these durations; return it and the epochs run."""
    clock = iter(np.cumsum([0.0, *[x for s in seconds for x in (0.0, s)]]).tolist())
    keeper = train_portable.BestAndDeadline(
        _Weights(), patience, budget_s, clock=lambda: next(clock)
    )
    keeper.set_model(_Stub())
    for epoch, a in enumerate(auc):
        keeper.on_epoch_begin(epoch)
        keeper.on_epoch_end(epoch, {"val_auc": a})
        if keeper.model.stop_training:
            return keeper, epoch + 1
    return keeper, len(auc)


def test_best_and_deadline_keeps_the_best_and_stops_on_patience_or_budget() -> None:
    keeper, run = _epochs([1.0] * 6, [0.6, 0.8, 0.7, 0.75, 0.9, 0.9], patience=2, budget_s=None)
    assert run == 4 and keeper.stop_reason == "patience"
    assert keeper.best_epoch == 2 and keeper.best == 0.8
    # A slow first epoch (compiling) does not set the pace: 50 s, then 1 s epochs.
    aucs = [0.5 + i / 100 for i in range(21)]
    keeper, run = _epochs([50.0] + [1.0] * 20, aucs, patience=99, budget_s=60.0)
    assert keeper.stop_reason == "time budget" and run == 11  # ends at 60 s


def test_watch_heldout_scores_every_epoch_and_selects_nothing(
    packed: dict, tmp_path: Path, capsys
) -> None:
    # The fixture's held-out images are all COVID: add four of the source's non-COVID ones.
    with open(CXR_DIR / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    others = [r for r in rows if r["source"] == HELD and r["label"] != "covid" and r["patient_id"]]
    manifest = tmp_path / "manifest.csv"
    with open(packed["manifest"], newline="") as fh:
        tiny = list(csv.DictReader(fh))
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(tiny[0]))
        writer.writeheader()
        writer.writerows(tiny + [{**r, "file": str(CXR_DIR / r["file"])} for r in others[:4]])
    both = tmp_path / "both.npz"
    rc = pack.main(
        ["--manifest", str(manifest), "--input-size", "32", "--out", str(both),
         "--exclude-source", HELD, "--heldout-source", HELD]
    )  # fmt: skip
    assert rc == 0
    out = tmp_path / "watched"
    args = ["--pack", str(both), "--out", str(out), "--batch-size", "8"]
    assert train_portable.main([*args, "--epochs", "2", "--watch-heldout"]) == 0
    run = json.loads((out / "run.json").read_text())
    state = json.loads((out / "history.json").read_text())
    epochs = state["history"]
    assert len(epochs) == 2 and all(0.0 <= e["heldout_auc"] <= 1.0 for e in epochs)
    # The kept epoch is the best by val AUROC (the first on a tie), whatever heldout_auc says,
    # and its held-out score is what the run reports for the restored weights.
    best = max(epochs, key=lambda e: e["val_auc"])
    assert state["best_epoch"] == best["epoch"]
    assert run["heldout"]["auroc"] == pytest.approx(best["heldout_auc"], abs=1e-6)
    # Without a held-out source left out, there is nothing to watch.
    plain = packed["dir"] / "plain.npz"
    rc = pack.main(
        ["--manifest", str(packed["manifest"]), "--split", str(packed["split"]),
         "--input-size", "32", "--out", str(plain)]
    )  # fmt: skip
    assert rc == 0
    capsys.readouterr()
    assert train_portable.main(["--pack", str(plain), "--out", str(out), "--watch-heldout"]) == 2
    assert "--watch-heldout" in capsys.readouterr().err
