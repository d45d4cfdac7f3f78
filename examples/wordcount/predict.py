"""Counts the words of a text or a text file: today's Cog API (BasePredictor, Input with
constraints, an optional file input, an object output)."""

import collections
import re
from typing import List, Optional

from cog import BaseModel, BasePredictor, Input, Path

WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)*")


class Output(BaseModel):
    words: int
    distinct: int
    top: List[str]


class Predictor(BasePredictor):
    def setup(self):
        # Loaded once per container, as weights would be.
        self.common = {"a", "an", "and", "in", "is", "it", "of", "on", "the", "to"}

    def predict(
        self,
        text: str = Input(description="The text to count", default="", max_length=100_000),
        document: Optional[Path] = Input(
            description="A UTF-8 text file, counted instead of the text", default=None
        ),
        top: int = Input(description="How many of the most frequent words", default=3, ge=1, le=20),
        skip_common: bool = Input(description="Leave out 'the', 'and', ...", default=True),
    ) -> Output:
        if document is not None:
            text = document.read_text(encoding="utf-8")
        words = [word.lower() for word in WORD.findall(text)]
        counted = collections.Counter(
            word for word in words if not (skip_common and word in self.common)
        )
        ranked = sorted(counted.items(), key=lambda item: (-item[1], item[0]))
        return Output(
            words=len(words), distinct=len(set(words)), top=[word for word, _ in ranked[:top]]
        )
