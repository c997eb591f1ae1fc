"""Using an edited model from Python: an LLM plus one or more memories, ready to generate.

    from mindbridge.api import load_edited_llm
    from mindbridge.loading import load_causal_lm
    llm, tok = load_causal_lm("smollm2_package")
    edited = load_edited_llm(llm, tok, "smollm2", ["outputs/.../memory"])
    edited.generate(["When was the inception of IAAF Combined Events Challenge?"])
    edited.generate([...], use_memory=False)   # the unedited model, for comparison
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mindbridge.artifacts import load_bridge, load_memory
from mindbridge.bridge import MemoryAugmentedLM
from mindbridge.loading import model_identity


def load_edited_llm(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, llm_name: str,
                    memories: Sequence[str | Path]) -> MemoryAugmentedLM:
    """Attach memories (each with a bridge for `llm_name`) to a loaded LLM.

    Every bridge is checked against the memory's encoder and the LLM's identity; a mismatch is
    refused with an `ArtifactError` saying what differs.
    """
    identity = model_identity(llm, llm_name)
    encoders, projectors = [], []
    for directory in memories:
        encoder, manifest = load_memory(directory)
        projector, _ = load_bridge(directory, llm_name, identity, manifest)
        encoders.append(encoder)
        projectors.append(projector)
    return MemoryAugmentedLM(llm, tokenizer, encoders, projectors).eval()
