"""Make a model artifact from an ml.training.portable run (weights trained elsewhere, e.g. a GPU).

    python -m ml.training.package --run RUN_DIR --manifest ../shared/data/cxr/manifest.csv \\
        --split SPLIT.csv --out models/cxr224

The split must be the one the run's pack was made from (its sha256 is checked). The weights
go through ml.training.train's own export: the threshold is chosen on the validation images, decoded
from the original files and scored by the exported float16 artifact, so it matches what is
served; then history.json, training_curves.png, split.csv and training_config.json, as a run
of ml.training.train leaves them. Research use only.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

from ml.artifact import ModelMetadata
from ml.training import data
from ml.training.checkpoints import CHECKPOINT_DIR, atomic_json
from ml.training.config import cli_parser
from ml.training.pack import split_without
from ml.training.portable import HISTORY_FILE, RUN_FILE, WEIGHTS_FILE


class PackageError(Exception):
    """The run, split or manifest cannot make an artifact."""


def package(
    run_dir: Path, manifest: str, split_file: str, out: Path, target: float
) -> ModelMetadata:
    """Write the artifact for run_dir to out and return its metadata."""
    from ml.model import architecture, build_classifier
    from ml.training.outputs import export, write_reports

    try:
        run = json.loads((run_dir / RUN_FILE).read_text())
        state = json.loads((run_dir / HISTORY_FILE).read_text())
        with np.load(run_dir / WEIGHTS_FILE, allow_pickle=False) as z:
            weights = [z[k].astype(np.float32) for k in sorted(z.files)]
    except (OSError, KeyError, ValueError) as exc:
        raise PackageError(f"{run_dir} is not a finished ml.training.portable run: {exc}") from exc
    meta, excluded = run["pack"], run["excluded_sources"]
    try:
        records = data.load_manifest(manifest)
        full = data.read_split(split_file, records)
        _, sha = split_without(records, full, meta["excluded_sources"])
        split, _ = split_without(records, full, excluded)
    except (OSError, ValueError) as exc:
        raise PackageError(f"split: {exc}") from exc
    if sha != meta["split_sha256"]:
        raise PackageError(
            f"{split_file} is not the split the run was trained on "
            f"(sha256 {sha[:12]}, the pack's {meta['split_sha256'][:12]})"
        )
    size = meta["input_size"]
    arch = architecture(size, backbone=run["args"].get("backbone", "resnet50"))
    model = build_classifier(arch)
    try:
        model.set_weights(weights)
    except ValueError as exc:
        raise PackageError(f"the run's weights do not fit {arch['name']} at {size} px: {exc}") from exc
    out.mkdir(parents=True, exist_ok=True)
    written_sha = data.write_split(split, out / "split.csv")
    training_data = {
        "splits": data.split_summary(split),
        "manifest": str(Path(manifest).resolve()),
        "split_file": "split.csv",
        "split_sha256": written_sha,
        "excluded_sources": excluded,
        "images_without_patient_id": "train only",
        "balance_sources": run["args"].get("balance_sources", False),
        "objective": "plain",
        "backbone": arch["name"],
        "init": run["args"].get("init", "none"),
        "augment": run["args"]["augment"],
        "input_size": size,
        "seed": run["args"]["seed"],
        "trained_by": "ml.training.portable",
        "pack_jpeg_quality": meta["jpeg_quality"],
    }
    artifact = export(
        out,
        split,
        model,
        state,
        training_data,
        arch=arch,
        preprocess_version=meta["preprocess_version"],
        target_sensitivity=target,
    )
    write_reports(out, state)
    shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)  # export's staging area
    atomic_json(
        out / "training_config.json",
        {
            "trained_by": "ml.training.portable",
            "args": run["args"],
            "resolved": run["resolved"],
            "versions": run["versions"],
            "backend": run["backend"],
            "device": [run["device"]],
            "seconds": run["seconds"],
            "stop_reason": run["stop_reason"],
            "images_per_second": run["images_per_second"],
            "pack": meta,
            "seed": run["args"]["seed"],
            "split_sha256": written_sha,
        },
    )
    return artifact


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    p = cli_parser("python -m ml.training.package", __doc__)
    p.add_argument("--run", required=True, type=Path, help="an ml.training.portable --out")
    p.add_argument("--manifest", required=True, help="the data set the pack was made from")
    p.add_argument("--split", required=True, help="the split.csv the pack was made from")
    p.add_argument("--out", required=True, type=Path, help="artifact directory")
    p.add_argument("--target-sensitivity", type=float, default=0.90, help="default: 0.90")
    args = p.parse_args(argv)
    try:
        meta = package(args.run, args.manifest, args.split, args.out, args.target_sensitivity)
    except PackageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: {meta.model_version} threshold={meta.threshold:.4f} "
        f"val_auroc={meta.metrics['val_auroc']:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
