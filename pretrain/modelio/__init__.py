"""Model I/O for offline readers (eval, export, init_from, the data build's CLIP-score filter).

Everything here loads safetensors, or pickles with ``torch.load(weights_only=True)``: a poisoned file gives an
error, never runs code. TorchScript archives (which run code) only behind
``allow_torchscript=True``.
"""
from pretrain.modelio.hf import is_hf_dir, read_hf_dir, save_hf_dir
from pretrain.modelio.load import (TorchScriptRefused, UnsafeCheckpointError, consolidated_state_dict,
                                   is_run_dir, load_model, load_model_from_run, load_state_dict_file)
from pretrain.modelio.tags import CHECKPOINT_DIR, MARKER, complete_tags, newest_complete_tag, read_marker, tag_for

__all__ = ["CHECKPOINT_DIR", "MARKER", "TorchScriptRefused", "UnsafeCheckpointError", "complete_tags",
           "consolidated_state_dict", "is_hf_dir", "is_run_dir", "load_model", "load_model_from_run", "load_state_dict_file",
           "newest_complete_tag", "read_hf_dir", "read_marker", "save_hf_dir", "tag_for"]
