"""Training-set augmentation for the shapes-world fusion task: new question-image pairs.

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

from torch.utils.data import Dataset

from polymodal.data.scene import SceneObject, parse_claims


def question_pair(question: str) -> tuple[str, str]:
    """(colour, shape) asked about in "is there a red circle?"."""
    mentions = parse_claims(question).mentions
    if len(mentions) != 1 or mentions[0].colour is None or mentions[0].shape is None:
        raise ValueError(f"not a colour-shape question: {question!r}")
    return mentions[0].colour, mentions[0].shape


class QuestionPairs(Dataset):
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

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        if self.rng.random() < self.keep:
            return item
        objects = [SceneObject.from_dict(o) for o in item["row"]["objects"]]
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
