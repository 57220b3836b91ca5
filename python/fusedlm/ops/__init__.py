"""Public fused ops, one file each: validation, backend choice, custom-op wiring, autograd."""
from fusedlm.ops.attention import attention
from fusedlm.ops.layer_norm import layer_norm
from fusedlm.ops.layernorm_mlp import layernorm_mlp
from fusedlm.ops.lm_head import lm_head_softmax, sample
from fusedlm.ops.softmax_output import linear_cross_entropy

__all__ = ["attention", "layer_norm", "layernorm_mlp", "linear_cross_entropy", "lm_head_softmax", "sample"]
