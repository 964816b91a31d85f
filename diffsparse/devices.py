"""Device arguments checked before anything loads, for the CLI's `--device` and the testbed's `device=`."""

from __future__ import annotations


def as_device(device):
    """`device` as a `torch.device`, or a `ValueError` naming it when torch cannot read it (`"gpu"`, `None`)."""
    import torch  # here: `diffsparse --help` loads no torch

    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(
            f"device={device!r}: not a torch device; expected one such as 'cpu', 'cuda', 'cuda:1' or 'mps'"
        ) from None


def device_here(device):
    """`as_device(device)`, also a `ValueError` naming it when this machine lacks it (no such accelerator, or an
    index past its count) or when it computes nothing (`"meta"`): torch's own errors came as tracebacks, some after
    minutes of loading weights."""
    import torch

    parsed = as_device(device)
    if parsed.type == "cpu":
        return parsed
    backend = torch.backends.mps if parsed.type == "mps" else getattr(torch, parsed.type, None)
    if parsed.type == "meta":
        # Shapes only, no data: with no backend to ask, the check below was skipped and the run ended in a traceback
        # ("Tensor.item() cannot be called on meta tensors") after the tensors or the model were made.
        raise ValueError(f"device={device!r}: a meta tensor holds no values to compute with; use 'cpu' or an "
                         "accelerator this machine has, such as 'cuda', 'cuda:1' or 'mps'")
    available = getattr(backend, "is_available", None)
    if not callable(available):
        # A type torch names no module for (xla, which torch_xla registers; hip, vulkan, ...): whether torch can place
        # a tensor there. Before, "hip" ended in torch's traceback after the tensors or the weights were made.
        try:
            torch.empty(0, device=parsed)
        except (RuntimeError, ImportError) as error:  # "privateuseone" with no backend registered: an ImportError
            why = str(error).splitlines()[0]
            raise ValueError(f"device={device!r}: torch cannot place tensors on it here ({why}); use 'cpu' or an "
                             "accelerator this machine has") from None
    elif not available():
        raise ValueError(f"device={device!r}: this machine has no {parsed.type} device (torch sees none); use 'cpu'")
    count = getattr(backend, "device_count", None)
    if parsed.index is not None and callable(count) and parsed.index >= count():
        raise ValueError(f"device={device!r}: this machine has {count()} {parsed.type} device(s), indices 0 to "
                         f"{count() - 1}")
    return parsed
