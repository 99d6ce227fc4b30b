"""The model as a black box: sessions in, answers out, every query counted; image protection applied on the way in.

Input protection (Hui et al., IJCV 2026) sees the model only through generate-and-score, so the protector's cost is
the number of answers it asked for. `BlackBox` wraps any `generate(sessions) -> answers` function and counts every
answer; `protected` rewrites a session's images with an `ImageProtection`, taking the regions from each image's
PII marks (`SessionImage.marks`: the drawn document's exact boxes, or the boxes OCR found on a real form).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Protocol, Sequence, runtime_checkable

from PIL import Image

from probes.data.session import Session, SessionImage, Turn
from probes.leakage import generate_batch
from probes.models.loading import LoadedModel

Generate = Callable[[list[Session]], list[str]]


class BlackBox:
    """`generate` seen from outside. `queries` counts every answer generated through it (one per session)."""

    def __init__(self, generate: Generate) -> None:
        self._generate = generate
        self.queries = 0

    def __call__(self, sessions: Sequence[Session]) -> list[str]:
        sessions = list(sessions)
        answers = list(self._generate(sessions))
        if len(answers) != len(sessions):
            raise ValueError(f"black box: {len(sessions)} sessions in, {len(answers)} answers out")
        self.queries += len(sessions)
        return answers


def model_blackbox(loaded: LoadedModel, max_new_tokens: int = 32, batch_size: int = 8) -> BlackBox:
    """A loaded model as a black box: greedy answers through `probes.leakage.generate_batch`."""
    return BlackBox(lambda s: generate_batch(loaded, s, max_new_tokens=max_new_tokens, batch_size=batch_size))


@runtime_checkable
class Protection(Protocol):
    """Anything with `apply(image, boxes) -> image`: an `ImageProtection`, a learned `CellMasker`."""

    def apply(self, image: Image.Image, boxes: Sequence = ()) -> Image.Image: ...


def protected_image(image: SessionImage, protection: Protection, labels: Sequence[str] | None = None
                    ) -> SessionImage:
    """The image with `protection` applied, in memory (its marks kept: the regions do not move). Regional kinds
    protect the boxes of every mark, or only those of `labels`."""
    boxes = [b for label, bs in image.marks.items() if labels is None or label in labels for b in bs]
    return SessionImage.from_pil(protection.apply(image.load(), boxes), marks=image.marks)


def protected(session: Session, protection: Protection, labels: Sequence[str] | None = None) -> Session:
    """The session with every image protected (each image file read and transformed once per call)."""
    done: dict[int, SessionImage] = {}
    turns = []
    for turn in session.turns:
        images = []
        for im in turn.images:
            if id(im) not in done:
                done[id(im)] = protected_image(im, protection, labels)
            images.append(done[id(im)])
        turns.append(Turn(turn.role, turn.text, images=images, marks=list(turn.marks)))
    return replace(session, turns=turns)
