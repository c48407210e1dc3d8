"""Triton kernel or reference: how every ``v4::`` op is defined, and the one place that chooses.

:func:`op` defines an op of custom_ops from three parts of its package: the contract (contract.py:
the schema, and the predicate of which inputs the Triton kernels serve), the reference (reference.py:
the specification, and the implementation on every device) and the Triton function (triton/). It
registers one CUDA implementation, :meth:`RegisteredOp.cuda`, which decides per call:

* ``TITAN_V4_REFERENCE_OPS=1`` (flags.py): the reference;
* else, when the op's predicate accepts its argument: the Triton kernels;
* else (fp64 oracles, shapes the kernels do not cover): the reference.

The Triton function is named ``"module:function"`` and imported on the first call that runs it, never
when the op is defined: a CPU-only install has no working triton. :data:`OPS` records every op
defined here, so that the tests can enumerate them and check each one's choice.
"""

import importlib
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Union

import torch
from torch import Tensor

from . import flags
from .schema import schema


@dataclass
class RegisteredOp:
    """One op defined by :func:`op`, and what its CUDA implementation chooses between."""

    name: str  # "v4::sinkhorn"
    op: torch.library.CustomOpDef
    arguments: tuple[str, ...]  # the op's argument names, in positional order
    reads: int  # the position of the argument the predicate is given
    applies: Callable[[Tensor], bool]  # the predicate: whether the Triton kernels serve that argument
    reference: Callable[..., Any]  # the op's arguments -> its results, on the reference (the default)
    triton: Callable[..., Any]  # the same on the Triton kernels, imported on the first call
    triton_path: str  # "module:function" of the Triton function

    def cuda(self, *args):
        """The op's CUDA implementation: the Triton kernels where the predicate accepts the call's
        arguments and TITAN_V4_REFERENCE_OPS is not "1", else the reference."""
        # The flag is read before the predicate so that a refused value raises at every CUDA call,
        # whatever the inputs.
        if flags.reference_ops_only() or not self.applies(args[self.reads]):
            return self.reference(*args)
        return self.triton(*args)


#: Every op defined by :func:`op`, by qualified name ("v4::sinkhorn").
OPS: dict[str, RegisteredOp] = {}


def _direct(function: Callable[..., Any], *args):
    return function(*args)


def packed(inputs: type[NamedTuple]) -> Callable[..., Any]:
    """The ``via`` of an op whose functions take its arguments as one ``inputs`` tuple and return a
    Tensor or a NamedTuple of tensors (which the op returns as a plain tuple)."""

    def via(function: Callable[..., Any], *args):
        results = function(inputs(*args))
        return tuple(results) if isinstance(results, tuple) else results

    return via


def op(
    name: str,
    inputs: type[NamedTuple],
    results: Union[type[Tensor], type[NamedTuple]],
    *,
    leading: tuple[str, ...] = (),
    reference: Callable[..., Any],
    triton: str,
    applies: Callable[[Tensor], bool],
    reads: str,
    via: Callable[..., Any] = _direct,
) -> torch.library.CustomOpDef:
    """Defines the custom op ``name`` with ``reference`` as its implementation on every device, and
    registers its CUDA implementation (the choice above) and its record in :data:`OPS`.

    Args:
        name: ``"v4::<op>"``.
        inputs, results, leading: the op's contract (schema.py): it takes the ``leading`` Tensor
            arguments (a backward op's incoming gradients), then the fields of the NamedTuple
            ``inputs``, and returns ``results`` (``Tensor`` or a NamedTuple of tensors).
        reference: the reference function (reference.py).
        triton: ``"module:function"``: the Triton function, with ``reference``'s signature and results.
        applies: the predicate of the op's contract: ``applies(tensor) -> bool``.
        reads: the name of the argument ``applies`` is given (the queries or the streams; a backward
            op's gradients come first).
        via: how the op calls ``reference`` or the Triton function: ``via(function, *op_arguments)``
            returns the op's results (a tuple for several). By default ``function(*op_arguments)``;
            :func:`packed` for functions that take the contract's inputs tuple.

    Returns:
        The op (a ``torch.library.CustomOpDef``), for its fake and autograd registrations.
    """
    module, _, function = triton.partition(":")
    if not module or not function:
        raise ValueError(f"triton must be 'module:function', got {triton!r}")

    def on_reference(*args):
        return via(reference, *args)

    def on_triton(*args):
        return via(getattr(importlib.import_module(module), function), *args)

    custom_op = torch.library.custom_op(name, on_reference, mutates_args=(), schema=schema(inputs, results, leading))
    arguments = (*leading, *inputs._fields)
    record = RegisteredOp(name, custom_op, arguments, arguments.index(reads), applies, on_reference, on_triton, triton)
    custom_op.register_kernel("cuda", record.cuda)
    OPS[name] = record
    return custom_op
