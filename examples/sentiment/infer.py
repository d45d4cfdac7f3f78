"""A model that loads its weights, shipped in the package, once at setup."""

import json
import math
import re
from pathlib import Path

import cog

WORD = re.compile(r"[a-z']+")


class Model(cog.Model):
    """Tell whether a text is positive or negative (a tiny bag-of-words model)."""

    def setup(self):
        # Next to this file, whatever the working directory is.
        with open(Path(__file__).with_name("weights.json"), encoding="utf-8") as f:
            model = json.load(f)
        self.bias = model["bias"]
        self.weights = model["weights"]
        self.negators = set(model["negators"])
        self.intensifiers = model["intensifiers"]

    @cog.input("text", type=str, help="The text to judge")
    @cog.input("evidence", type=int, default=3, min=0, max=10, help="How many words to show")
    def run(self, text, evidence):
        total = self.bias
        contributions = []
        flip_within = 0
        boost = 1.0
        for word in WORD.findall(text.lower()):
            if word in self.negators:
                flip_within = 3
                continue
            if word in self.intensifiers:
                boost = self.intensifiers[word]
                continue
            weight = self.weights.get(word)
            if weight is not None:
                weight *= boost
                if flip_within:
                    weight, flip_within = -weight, 0
                total += weight
                contributions.append((word, round(weight, 4)))
            boost = 1.0
            flip_within = max(0, flip_within - 1)
        score = 1 / (1 + math.exp(-total))
        contributions.sort(key=lambda item: (-abs(item[1]), item[0]))
        return {
            "label": "positive" if score >= 0.5 else "negative",
            "score": round(score, 4),
            "evidence": [[word, weight] for word, weight in contributions[:evidence]],
        }
