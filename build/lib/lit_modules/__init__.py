"""Thin LightningModules: losses, logging, freezing and checkpoint policy around `mindbridge`."""
from lit_modules.bridge import MemoryBridgeModule
from lit_modules.pretrain import MemoryPretrainModule

__all__ = ["MemoryBridgeModule", "MemoryPretrainModule"]
