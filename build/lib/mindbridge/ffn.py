"""Where a transformer keeps its decoder layers, FFN blocks and FFN output projections, found by
attribute name: one lookup serves every family (Llama, GPT-2, GPT-J, Gemma, Mixtral and other
MoE blocks, OPT, GPT-NeoX), and nothing branches on `model_type`. Shared by every method that
edits or wraps an FFN."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

# Where decoder layers, FFN blocks and FFN output projections live, by attribute name. One
# lookup serves every family; nothing branches on `model_type`.
LAYER_LISTS = ("model.layers", "transformer.h", "model.decoder.layers", "gpt_neox.layers",
               "transformer.blocks", "model.language_model.layers", "language_model.model.layers")
FFN_BLOCKS = ("mlp", "block_sparse_moe", "feed_forward", "ffn")
OUT_PROJECTIONS = ("down_proj", "c_proj", "fc_out", "fc2", "dense_4h_to_h", "w2", "wo")
EXPERT_LISTS = ("experts",)


# --------------------------------------------------------------------------- locating the FFN


def _attr_path(root: nn.Module, dotted: str) -> Any:
    obj: Any = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's list of decoder blocks and its attribute path."""
    for path in LAYER_LISTS:
        layers = _attr_path(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers):
            return path, layers
    raise ValueError(f"NeuralDB cannot find the decoder layers of {type(model).__name__} "
                     f"(looked for {', '.join(LAYER_LISTS)}).")


@dataclass
class FFNSite:
    """The module NeuralDB wraps in one layer: `parent.<attr>`.

    kind "out_proj": the FFN's output projection; its input is the FFN's intermediate
    activation k (spec §2). kind "moe_block": a mixture-of-experts block whose experts are fused
    tensors with no single output projection; the block's input is the key and the block's
    output (what is added to the residual stream) receives r.
    """

    layer: int
    path: str
    parent: nn.Module
    attr: str
    kind: str

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.attr)


def out_dim(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if getattr(module, "nf", None) is not None:         # transformers Conv1D: weight is (in, out)
        return int(module.nf)
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def in_dim(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    weight = getattr(module, "weight", None)
    if getattr(module, "nf", None) is not None and isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    return int(weight.shape[1]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def unwrapped(module: nn.Module) -> nn.Module:
    """The module a method's wrapper stands in for: wrappers (NeuralDB's gate, WISE's side memory)
    keep the module they replace as `.inner`, so the FFN is found the same with or without one."""
    inner = getattr(module, "inner", None)
    return inner if isinstance(inner, nn.Module) else module


def hidden_size(model: PreTrainedModel) -> int:
    return int(model.get_input_embeddings().weight.shape[1])


def locate_ffn(model: PreTrainedModel, layer: int) -> FFNSite:
    """The FFN output module of decoder layer `layer` (the one resolver for every family)."""
    path, layers = decoder_layers(model)
    if not -len(layers) <= layer < len(layers):
        raise ValueError(f"layer {layer} is out of range: {type(model).__name__} has {len(layers)} layers.")
    layer = layer % len(layers)
    block = layers[layer]
    d = hidden_size(model)
    for name in FFN_BLOCKS:
        ffn = getattr(block, name, None)
        if ffn is None:
            continue
        core = unwrapped(ffn)
        if any(isinstance(getattr(core, e, None), nn.Module) for e in EXPERT_LISTS):
            return FFNSite(layer, f"{path}.{layer}.{name}", block, name, "moe_block")
        for proj in OUT_PROJECTIONS:
            module = getattr(core, proj, None)
            module = unwrapped(module) if module is not None else None
            if isinstance(module, nn.Module) and out_dim(module) == d:
                return FFNSite(layer, f"{path}.{layer}.{name}.{proj}", core, proj, "out_proj")
    raise ValueError(f"Cannot find the FFN output projection of layer {layer} in {type(block).__name__} "
                     f"(looked for {', '.join(FFN_BLOCKS)} holding {', '.join(OUT_PROJECTIONS)} or experts).")


def key_dim(site: FFNSite, model: PreTrainedModel) -> int:
    """Width of the keys at this site: the FFN intermediate size, or the hidden size for MoE."""
    inner = site.module
    inner = unwrapped(inner)
    if site.kind == "moe_block":
        return hidden_size(model)
    dim = in_dim(inner)
    if dim is None:
        raise ValueError(f"cannot read the input width of {site.path} ({type(inner).__name__}).")
    return dim


# --------------------------------------------------------------------------- the gate


class StopForward(Exception):
    """Raised by a probe once it has what it needs: layers above l* are not run."""
