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

from mindbridge.artifacts import bridge_name, load_bridge, load_bridge_adapters, load_gate, load_memory
from mindbridge.bridge import MemoryAugmentedLM
from mindbridge.loading import model_identity


def load_edited_llm(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, llm_name: str,
                    memories: Sequence[str | Path], gated: bool = True) -> MemoryAugmentedLM:
    """Attach memories (each with a bridge for `llm_name`) to a loaded LLM.

    With several memories, the projectors must come from one joint `stage=bridge
    memory=[DIR1,DIR2,...]` run (they are stored under a group name in each memory).
    Every bridge is checked against the memory's encoder and the LLM's identity; a mismatch is
    refused with an `ArtifactError` saying what differs. `gated`: each memory is read only for the
    prompts its read gate opens for (False: for every prompt, as the paper does).
    """
    identity = model_identity(llm, llm_name)
    loaded = [load_memory(directory) for directory in memories]
    # Several memories read together need the projectors trained together (Multi-MindBridge).
    name = bridge_name(llm_name, [manifest for _, manifest in loaded])
    bridges = [load_bridge(directory, name, identity, manifest) for directory, (_, manifest) in zip(memories, loaded)]
    # Adapters trained with a single memory's bridge (bridge.lora) go into the LLM itself.
    llm = load_bridge_adapters(memories[0], name, llm, bridges[0][1]) if len(memories) == 1 else llm
    gates = [load_gate(d, manifest) for d, (_, manifest) in zip(memories, loaded)] if gated else None
    return MemoryAugmentedLM(llm, tokenizer, [encoder for encoder, _ in loaded], [p for p, _ in bridges],
                             gates).eval()
