"""fusedlm's benchmark suite, installed as `fusedlm.benchmarks`; run it with `fusedlm bench`.

One module per op (layer_norm.py, ...) and one for the whole model (gpt.py), one harness (harness.py: timing, memory, rows), one
runner (run.py: presets, markdown, JSON, plots). An op module provides:

    OP, TITLE                      the op's name and the heading of its table
    VARIANTS                       {variant: object with .title and .baseline (a provider name)}
    cases(preset, device, dtypes)  the harness.Case list of "quick" / "full" on "cpu" / "cuda"
    make_inputs(case)              harness.Inputs: leaf tensors by keyword, one gradient per output
    providers(case)                harness.Provider list; fn None with `why` for one that cannot run here
    baseline(case)                 the provider the "vs base" ratio divides by
    min_bytes(case, mode)          the least memory traffic of the op, for GB/s
    REPEATS                        optional: {(device, preset): timed reps} where the runner's default is too many
    MODES                          optional: the harness modes to time (default all three)
    flops(case, mode)              optional: the op's floating-point operations, for a TFLOP/s column
    target(case)                   optional: the forward+backward speed-up over the baseline the
                                   fusedlm backend must reach (the issue's goals), or a list of
                                   (mode, provider, speed-up) goals, or None
"""
import importlib

OPS = ("layer_norm", "attention", "layernorm_mlp", "softmax_output", "lm_head", "gpt")


def load_op(op: str):
    """The benchmark module of `op`."""
    if op not in OPS:
        raise ValueError(f"bench: unknown op {op!r}; known: {', '.join(OPS)}")
    return importlib.import_module(f".{op}", __name__)
