"""The tab's dataset preview: per concept what was found, how it buckets and what was skipped."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...config.schema import TrainingConfig, training_resolutions
from ...errors import ConfigError
from .buckets import bucket_spec
from .concepts import concept_labels, expand_concepts_noted
from .scan import ConceptScan, bucket_counts, scan_concept


def dataset_preview(config: TrainingConfig, class_root: Path | None) -> list[dict[str, Any]]:
    """One dict per effective concept; never raises for data problems (they are in 'error'/'skipped')."""
    concepts, skipped_folders, notes = expand_concepts_noted(config)
    try:
        resolutions = training_resolutions(config)
    except ConfigError as error:
        return [{"index": -1, "error": str(error), "skipped": [], "warnings": []}]
    labels = concept_labels(config, concepts)
    rows = [_row(scan_concept(i, c, config, class_root, labels[i]), config, resolutions)
            for i, c in enumerate(concepts)]
    if rows and skipped_folders:
        rows[0]["skipped"] = [[str(p), r] for p, r in skipped_folders] + rows[0]["skipped"]
    if rows and notes:
        rows[0]["warnings"] = notes + rows[0]["warnings"]
    return rows


def _row(scan: ConceptScan, config: TrainingConfig, resolutions: list[int]) -> dict[str, Any]:
    records = scan.images + scan.validation
    return {
        "index": scan.index,
        "instance_dir": str(scan.instance_dir) if scan.instance_dir else "",
        "instance_token": scan.concept.instance_token,
        "class_token": scan.concept.class_token,
        "repeats": scan.concept.repeats,
        "images": len(records),
        "training_images": len(scan.images),
        "validation_images": len(scan.validation),
        "captions": scan.captions,
        "example_captions": [r.caption for r in scan.images[:3]],
        "masks": sum(1 for r in records if r.mask_path is not None),
        "buckets": {r: bucket_counts(records, bucket_spec(config, r)) for r in resolutions},
        "class_dir": str(scan.class_dir) if scan.class_dir else "",
        "class_images": len(scan.class_images),
        "class_missing": scan.class_missing,
        "skipped": [[str(p), reason] for p, reason in scan.skipped],
        "warnings": list(scan.warnings) + list(scan.size_warnings),
        "error": scan.error,
    }
