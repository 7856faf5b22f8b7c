"""sparsecraft: neural-network sparsity for PyTorch and Hugging Face (public API re-exports only).

    import sparsecraft
    result = sparsecraft.prune(model, "wanda", 0.5, "unstructured", calibration_token_ids)
    layer_sparsity = sparsecraft.allocate(model, "owl", 0.7, calibration=calibration_token_ids)
"""

__version__ = "0.2.0"

from sparsecraft.api import allocate, prune  # noqa: E402
from sparsecraft.engine.record import PruneResult  # noqa: E402
from sparsecraft import hf_quantizer as _hf_quantizer  # noqa: E402, F401  registers quant_method "sparsecraft"
from sparsecraft.methods import METHODS, get_method, register_method  # noqa: E402
from sparsecraft.models import load_model  # noqa: E402
from sparsecraft.patterns import NM, Block, Unstructured, parse_pattern, topk_mask  # noqa: E402

__all__ = ["METHODS", "NM", "Block", "PruneResult", "Unstructured", "__version__", "allocate", "get_method",
           "load_model", "parse_pattern", "prune", "register_method", "topk_mask"]
