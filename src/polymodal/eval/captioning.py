"""Caption metrics: BLEU-4 and CIDEr-D (the COCO caption evaluation code, ``pycocoevalcap``),
and the scene-graph judge of the shapes world.

Captions are tokenised here (lowercase words and numbers, punctuation dropped) instead of
with the COCO toolkit's Java PTB tokenizer; for plain English captions the two agree.

The scene-graph judge parses each generated caption back into objects
(:func:`polymodal.data.scene.parse_claims`) and checks it against the stored scene: a caption
is *correct* when it mentions every object of the scene with the right shape and colour and
makes no false claim (about size, position, count or relation either).
"""

from __future__ import annotations

from collections.abc import Sequence

from polymodal.data.scene import SceneObject, check_caption, parse_claims, words_of


def tokenize(text: str) -> str:
    return " ".join(words_of(text))


def bleu_cider(references: Sequence[Sequence[str]], candidates: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 and CIDEr-D of ``candidates[i]`` against ``references[i]`` (one or more each)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(references) != len(candidates) or not candidates:
        raise ValueError(f"need one candidate per reference list; got {len(candidates)} and {len(references)}")
    gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [tokenize(c) or "<empty>"] for i, c in enumerate(candidates)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"BLEU-1": bleu[0], "BLEU-4": bleu[3], "CIDEr": float(cider)}


def judge_caption(caption: str, objects: Sequence[SceneObject]) -> dict[str, bool]:
    """Whether ``caption`` names every object's shape and colour, and whether all it says is true."""
    mentions = parse_claims(caption).mentions
    covered = all(any(m.shape == o.shape and m.colour == o.colour for m in mentions) for o in objects)
    counted = sum(m.count or 1 for m in mentions if m.shape and m.colour)
    truthful = not check_caption(caption, list(objects))
    return {"objects_right": covered and counted == len(objects) and truthful, "all_true": truthful}


def scene_graph_scores(captions: Sequence[str], scenes: Sequence[Sequence[SceneObject]]) -> dict[str, float]:
    """Share of captions with every object's shape and colour right (and nothing false), and
    share with no false claim."""
    if len(captions) != len(scenes) or not captions:
        raise ValueError("need one scene per caption")
    verdicts = [judge_caption(c, s) for c, s in zip(captions, scenes, strict=True)]
    return {"scene-graph objects right": sum(v["objects_right"] for v in verdicts) / len(verdicts),
            "scene-graph all true": sum(v["all_true"] for v in verdicts) / len(verdicts)}
