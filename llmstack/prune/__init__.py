"""Pruning: magnitude, Wanda and SparseGPT, unstructured or N:M, and keeping the mask through
recovery fine-tuning.

  algorithms.py       one matrix: which weights go (and SparseGPT's update of the others)
  pruner.py           a whole model, block by block on calibration batches; the pruned checkpoint
  masks.py            the mask file; keeping pruned weights at zero while training (every engine)
  semi_structured.py  2:4 layers as sparse tensor-core matmuls for inference (CUDA)
  command.py          `llmstack prune`
"""
from llmstack.prune.masks import MASK_FILE, MaskKeeper, read_masks, write_masks
from llmstack.prune.pruner import METHODS, PruneError, PruneResult, check_options, prune_model, save_pruned

__all__ = ["MASK_FILE", "METHODS", "MaskKeeper", "PruneError", "PruneResult", "check_options", "prune_model",
           "read_masks", "save_pruned", "write_masks"]
