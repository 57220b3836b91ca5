"""Public fused ops, one file each: validation, backend choice, custom-op wiring, autograd."""
from fusedlm.ops.layer_norm import layer_norm

__all__ = ["layer_norm"]
