"""Other wordings of an edit's relation, borrowed from records that are never edited.

An edit comes with one prompt; its paraphrases are held out for evaluation. Records that are
not edited show how the same relation is asked otherwise ("The mother tongue of {} is" ->
"{} grew up speaking"). `RewordingBank` finds the non-edited prompt templates nearest to an
edit's own template (TF-IDF over content words, scikit-learn) and fills their rewordings with the
edit's subject. No evaluation prompt of any edit is ever returned.
"""
from __future__ import annotations

import random
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer

from data.records import EditRecord
from data.splits import _eval_prompt_keys, _normalize, subject_template


class RewordingBank:
    """Rewording templates grouped by the prompt template they reword."""

    def __init__(self, templates: Sequence[tuple[str, str]], edits: Iterable[EditRecord] = ()):
        groups: dict[str, list[str]] = defaultdict(list)
        for prompt, reworded in templates:
            if reworded not in groups[prompt]:
                groups[prompt].append(reworded)
        self.prompts = list(groups)
        self.rewordings = [groups[p] for p in self.prompts]
        self.forbidden = _eval_prompt_keys(edits)   # held-out texts of every edit
        # Content words only: "Which is the {} of" is shared by every ZsRE relation.
        self.vectorizer = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b\w+\b")
        self.matrix = self.vectorizer.fit_transform([p.replace("{}", " ") for p in self.prompts]) \
            if self.prompts else None

    def __len__(self) -> int:
        return len(self.prompts)

    def similar(self, template: str) -> list[tuple[float, int]]:
        """(similarity, prompt index), most similar first, similarity > 0 only."""
        if self.matrix is None:
            return []
        sims = (self.vectorizer.transform([template.replace("{}", " ")]) @ self.matrix.T).toarray()[0]
        order = np.argsort(-sims, kind="stable")
        return [(float(sims[i]), int(i)) for i in order if sims[i] > 0]

    def for_prompt(self, subject: str, prompt: str, count: int, min_similarity: float = 0.5,
                   seed: str = "") -> list[str]:
        """Up to `count` other wordings of `prompt` about `subject`.

        From the prompt templates at least `min_similarity` alike, most alike first (the edit's
        own template, where other records use it), each one's rewordings in a random order.
        Never the prompt itself, never an evaluation prompt.
        """
        template = subject_template(prompt, subject)
        if template is None or count <= 0:
            return []
        rng = random.Random(f"rewordings:{seed}:{prompt}")
        chosen: list[str] = []
        seen = {_normalize(prompt)}
        for sim, i in self.similar(template):
            if sim < min_similarity or len(chosen) == count:
                break
            for reworded in rng.sample(self.rewordings[i], len(self.rewordings[i])):
                text = reworded.replace("{}", subject)
                if _normalize(text) not in seen and _normalize(text) not in self.forbidden:
                    seen.add(_normalize(text))
                    chosen.append(text)
                    if len(chosen) == count:
                        break
        return chosen
