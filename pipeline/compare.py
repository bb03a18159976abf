"""Numerical comparison of two models' outputs on the same images.

Framework-neutral (numpy only): the verify stage feeds it outputs that each
framework and onnxruntime computed in their own processes.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass
class Comparison:
    """How far a candidate's outputs are from a reference's on the same images.

    Differences are |candidate - reference|; relative ones divide by |reference|
    (elements where the reference is 0 count as absolute). `disagreements` lists
    the images whose top-1 labels differ, each with both sides' two highest
    probabilities and whether the reference's top two logits are a near-tie.
    """

    count: int
    max_abs_logits: float
    max_rel_logits: float
    max_abs_probabilities: float
    max_rel_probabilities: float
    nonfinite_reference: int
    nonfinite_candidate: int
    top1_agreement: float
    required_atol_logits: float
    required_atol_probabilities: float
    disagreements: list
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None


def _differences(reference, candidate, rtol):
    difference = np.abs(candidate.astype(np.float64) - reference.astype(np.float64))
    scale = np.abs(reference.astype(np.float64))
    relative = np.where(scale > 0, difference / np.where(scale > 0, scale, 1.0), difference)
    # The atol that np.allclose(candidate, reference, atol, rtol) would need at this rtol.
    required = float(np.max(np.maximum(difference - rtol * scale, 0.0))) if difference.size else 0.0
    maximum = float(np.max(difference)) if difference.size else 0.0
    return maximum, float(np.max(relative)) if relative.size else 0.0, required


def _top2(probabilities, row, class_names):
    order = np.argsort(-probabilities[row])[:2]
    return [(class_names[i] if class_names else int(i), round(float(probabilities[row, i]), 6)) for i in order]


def compare_outputs(reference, candidate, *, rtol, atol, labels=None, class_names=None):
    """Compare two (logits, probabilities) pairs of float arrays [N, classes].

    `labels` (int [N]) adds both sides' accuracy. A top-1 disagreement is a
    near-tie when the reference's two highest logits are closer than twice the
    allowed logit difference (atol + rtol * |logit|), so that outputs within the
    tolerance could flip the order.
    """
    reference_logits, reference_probabilities = reference
    candidate_logits, candidate_probabilities = candidate
    if reference_logits.shape != candidate_logits.shape:
        raise ValueError(f"expected equal shapes, got reference {reference_logits.shape} "
                         f"and candidate {candidate_logits.shape}")

    max_abs_logits, max_rel_logits, required_logits = _differences(reference_logits, candidate_logits, rtol)
    max_abs_probabilities, max_rel_probabilities, required_probabilities = _differences(
        reference_probabilities, candidate_probabilities, rtol)

    reference_top1 = np.argmax(reference_logits, axis=1)
    candidate_top1 = np.argmax(candidate_logits, axis=1)
    disagreements = []
    for row in np.flatnonzero(reference_top1 != candidate_top1):
        top_two = np.sort(reference_logits[row])[-2:]
        margin = float(top_two[1] - top_two[0])
        allowed = 2 * (atol + rtol * float(np.max(np.abs(top_two))))
        disagreements.append({
            "index": int(row),
            "reference_top2": _top2(reference_probabilities, row, class_names),
            "candidate_top2": _top2(candidate_probabilities, row, class_names),
            "logit_margin": margin,
            "near_tie": margin <= allowed,
        })

    count = len(reference_logits)
    comparison = Comparison(
        count=count,
        max_abs_logits=max_abs_logits,
        max_rel_logits=max_rel_logits,
        max_abs_probabilities=max_abs_probabilities,
        max_rel_probabilities=max_rel_probabilities,
        nonfinite_reference=int(np.sum(~np.isfinite(reference_logits))),
        nonfinite_candidate=int(np.sum(~np.isfinite(candidate_logits))),
        top1_agreement=float(np.mean(reference_top1 == candidate_top1)) if count else 1.0,
        required_atol_logits=required_logits,
        required_atol_probabilities=required_probabilities,
        disagreements=disagreements,
    )
    if labels is not None:
        comparison.reference_accuracy = float(np.mean(reference_top1 == labels))
        comparison.candidate_accuracy = float(np.mean(candidate_top1 == labels))
    return comparison
