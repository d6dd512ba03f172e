"""Metrics a kind of data set brings of its own, beside the generic ones.

Generic evaluation (:mod:`polymodal.eval.contrastive`, :mod:`polymodal.eval.understanding`)
scores what any data set allows: retrieval, zero-shot over a ``label`` column, BLEU and CIDEr
against the stored caption, VQA exact match. A data set that knows more about its samples (the
shapes world knows each image's scene graph) adds metrics of its own. Which ones is looked up
in :data:`DATASET_METRICS`, one explicit table from the kind of a data set, as its description
names it (:func:`polymodal.data.describe.dataset_kind`), to the class holding its metrics. A
data set without a description, or of a kind the table does not list, gets the generic metrics
only; evaluation guesses nothing from the rows. (Validation during training is handed decoded
rows, not the data set they came from: :func:`dataset_metrics_of_rows` is its stopgap.)

A data set's metrics class answers :class:`DatasetMetrics`. To add a kind of data set, write
such a class in its own module and add a line to the table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch

from polymodal.data.describe import dataset_kind
from polymodal.eval.shapes import ShapesWorldMetrics


class DatasetMetrics(Protocol):
    """What a kind of data set adds to the generic metrics of each kind of model."""

    # whether generic zero-shot over a ``label`` column applies too (False when the data set's
    # own zero-shot tasks replace it)
    label_zero_shot: bool
    # the order VQA accuracies per question type are reported in (others follow, sorted)
    question_types: tuple[str, ...]

    def contrastive_metrics(self, embed_text: Callable[[list[str]], torch.Tensor], rows: Sequence[Mapping],
                            embeddings: Mapping[str, torch.Tensor], text: str) -> dict[str, float]:
        """Metrics of a contrastive model whose text tower is ``text``: ``embed_text(texts)``
        embeds texts with it, ``embeddings[tower][i]`` is row ``i`` embedded by each tower."""
        ...

    def reference_captions(self, row: Mapping, n: int) -> list[str]:
        """``n`` reference captions of ``row`` beside its stored one (BLEU, CIDEr)."""
        ...

    def caption_metrics(self, rows: Sequence[Mapping], captions: Sequence[str]) -> dict[str, float]:
        """Metrics of the ``captions`` generated for ``rows``."""
        ...


# kind of data set (the ``name`` in its description) -> the class holding its own metrics
DATASET_METRICS: dict[str, type[DatasetMetrics]] = {
    "shapes": ShapesWorldMetrics,
}


def dataset_metrics(location: str | os.PathLike) -> DatasetMetrics | None:
    """The metrics of its own that the data set at ``location`` brings, or None (generic only)."""
    cls = DATASET_METRICS.get(dataset_kind(location) or "")
    return cls() if cls is not None else None


def dataset_metrics_of_rows(rows: Sequence[Mapping]) -> DatasetMetrics | None:
    """For validation during training only: the trainer hands a family's validator the decoded
    rows of the validation split but not the data set they came from, so its description cannot
    be read. Rows that all carry a scene graph (``objects``) are taken for the shapes world, as
    validation always took them. Evaluation reads the description (:func:`dataset_metrics`);
    this guess can go once the trainer hands validators the data set's location."""
    return ShapesWorldMetrics() if rows and all("objects" in r for r in rows) else None
