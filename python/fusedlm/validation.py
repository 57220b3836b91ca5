"""Input checks shared by the public ops. Every message names the op and the argument:
`attention: q must be 4-D (B, H, N, D), got shape (2, 8, 64)`."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def fmt_shape(shape) -> str:
    """(2, 8, 64) and (64,) as Python prints tuples."""
    return str(tuple(int(s) for s in shape))


def fmt_dtype(dtype: torch.dtype) -> str:
    """float32, not torch.float32."""
    return str(dtype).replace("torch.", "")


def _shape(t: torch.Tensor) -> str:
    return fmt_shape(t.shape)


def check_tensor(op: str, name: str, t, *, dtypes=FLOAT_DTYPES, ndim=None, min_ndim=None, allow_empty=False):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(fmt_dtype(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {fmt_dtype(t.dtype)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {_shape(t)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dimension(s), got shape {_shape(t)}")
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"{op}: {name} is empty, got shape {_shape(t)}")


def check_same(op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor, *, dtype=True, device=True):
    if device and t.device != ref.device:
        raise ValueError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(
            f"{op}: {name} must have the dtype of {ref_name} ({fmt_dtype(ref.dtype)}), "
            f"got {fmt_dtype(t.dtype)}"
        )


def check_shape(op: str, name: str, t: torch.Tensor, expected: tuple, what: str = ""):
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{op}: {name} must have shape {fmt_shape(expected)}{what}, got {_shape(t)}")


def check_choice(op: str, name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{op}: {name} must be one of {tuple(choices)}, got {value!r}")


FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32
INT64_RANGE = (-2**63, 2**63 - 1)


def check_number(op: str, name: str, value, *, integer=False, float32=False) -> None:
    """A finite Python number (an int within int64 when `integer`); bools and tensors are refused.
    float32: the kernels take the value as a float32, so it must be 0 or of magnitude in
    [FLOAT32_TINY, FLOAT32_MAX] (a larger one would become inf there, a smaller one 0 or a denormal)."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or value != value or abs(value) == float("inf"):
        what = "an integer" if integer else "a finite number"
        raise TypeError(f"{op}: {name} must be {what}, got {value!r}")
    if integer and not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
        raise ValueError(f"{op}: {name} must fit in int64, got {value!r}")
    if float32 and value != 0 and not FLOAT32_TINY <= abs(value) <= FLOAT32_MAX:
        raise ValueError(f"{op}: {name} must be 0 or of magnitude within float32's normal range "
                         f"[{FLOAT32_TINY:.4g}, {FLOAT32_MAX:.4g}] (the kernels compute in float32), got {value!r}")


def check_flag(op: str, name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be True or False, got {value!r}")
