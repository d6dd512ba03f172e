"""Training-set augmentation for the shapes world: new question-image pairs for the fusion
task (:class:`QuestionPairs`), new captions for text-to-image (:class:`FreshCaptions`).

A training split holds one spoken yes/no question per image, so a fused model sees each
image with one question only and soon memorises the pairs. Any training image can be asked
any training question, though, and the scene graph says the answer. :class:`QuestionPairs`
serves, for each training image, either its own question or another training sample's spoken
question, chosen so that "yes" and "no" stay equally likely and every "no" is a near miss
(its colour or its shape is in the scene), as in the world itself. Only the training split is
re-paired; evaluation always uses the stored pairs.
"""

from __future__ import annotations

import random

import numpy as np
from torch.utils.data import Dataset

from polymodal.data.scene import SceneObject, parse_claims
from polymodal.data.shapes import _join as join_phrases
from polymodal.data.shapes import caption, object_phrase


def question_pair(question: str) -> tuple[str, str]:
    """(colour, shape) asked about in "is there a red circle?"."""
    mentions = parse_claims(question).mentions
    if len(mentions) != 1 or mentions[0].colour is None or mentions[0].shape is None:
        raise ValueError(f"not a colour-shape question: {question!r}")
    return mentions[0].colour, mentions[0].shape


class _SceneItems(Dataset):
    """Training items served as they are with probability ``keep``, otherwise changed by
    :meth:`change` from their scene graph."""

    items: list[dict]
    keep: float

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        if self.rng.random() < self.keep:
            return item
        return self.change(item, [SceneObject.from_dict(o) for o in item["row"]["objects"]])

    def change(self, item: dict, objects: list[SceneObject]) -> dict:
        raise NotImplementedError


class QuestionPairs(_SceneItems):
    """Items whose question field comes from any training item, labelled from the scene graph.

    ``question`` is the batch field of the spoken question; ``question_column`` and
    ``text_column`` are the row columns that travel with it (its file and its text);
    ``label_column`` is set to "yes" or "no". Every other field (the image) stays the item's
    own. With probability ``keep`` an item keeps its own question.
    """

    def __init__(self, items: list[dict], question: str, *, question_column: str = "fusion_audio_file",
                 text_column: str = "fusion_question", label_column: str = "fusion_label", keep: float = 0.25,
                 seed: int = 0):
        self.items, self.question = items, question
        self.columns = (question_column, text_column)
        self.label_column = label_column
        self.keep = keep
        self.rng = random.Random(seed)
        self.by_pair: dict[tuple[str, str], list[int]] = {}
        for i, item in enumerate(items):
            self.by_pair.setdefault(question_pair(item["row"][text_column]), []).append(i)
        self.pairs = sorted(self.by_pair)

    def change(self, item: dict, objects: list[SceneObject]) -> dict:
        present = {(o.colour, o.shape) for o in objects}
        if self.rng.random() < 0.5:
            choices, label = [p for p in self.pairs if p in present], "yes"
        else:
            choices = [p for p in self.pairs if p not in present and any(p[0] == c or p[1] == s for c, s in present)]
            label = "no"
        if not choices:
            return item
        donor = self.items[self.rng.choice(self.by_pair[self.rng.choice(choices)])]
        row = dict(item["row"])
        for column in self.columns:
            row[column] = donor["row"][column]
        row[self.label_column] = label
        return {**item, self.question: donor[self.question], "row": row}


class FreshCaptions(_SceneItems):
    """Items whose caption is drawn afresh from the scene graph each time they are served.

    A world stores one caption per image, so a text-to-image model sees each scene described
    one way. With probability ``keep`` an item keeps its stored caption; otherwise it gets a
    new one from the world's own caption generator (other templates, synonyms, relations and
    counts), or, with probability ``unplaced`` of the new ones, its objects named without
    places in a random order ("a large red circle and a small blue star"), a sentence shape
    the world's captions never use (they place every object) but prompts often do.
    """

    def __init__(self, items: list[dict], *, caption_column: str = "text", keep: float = 0.5,
                 unplaced: float = 0.25, seed: int = 0):
        if items and "objects" not in items[0]["row"]:
            raise ValueError("augment: fresh_captions needs a shapes world (rows with an 'objects' scene graph)")
        self.items, self.column = items, caption_column
        self.keep, self.unplaced = keep, unplaced
        self.rng = np.random.default_rng(seed)

    def change(self, item: dict, objects: list[SceneObject]) -> dict:
        if self.rng.random() < self.unplaced:
            with_size = bool(self.rng.random() < 0.5)
            phrases = [object_phrase(self.rng, objects[i], with_size) for i in self.rng.permutation(len(objects))]
            text = join_phrases(phrases)
        else:
            text = caption(self.rng, objects)
        return {**item, "row": {**item["row"], self.column: text}}
