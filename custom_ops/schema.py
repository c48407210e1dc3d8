"""What the NamedTuples of an op's contract.py mean to torch.library, shared by every op.

A contract defines an op's arguments as one NamedTuple whose fields are annotated ``Tensor``,
``Optional[Tensor]``, ``int`` or ``float``, in the op's positional order; a backward op takes the
incoming gradients (``leading``, each a Tensor) before it. The op's results are one ``Tensor`` or a
NamedTuple of tensors (a custom op cannot return None, so every result is a ``Tensor`` in the schema).
The ops take contiguous tensors: the public functions pass their inputs tuple through
:func:`contiguous`.
"""

from typing import NamedTuple, Optional, Union

from torch import Tensor

_SCHEMA_TYPES = {Tensor: "Tensor", Optional[Tensor]: "Tensor?", int: "SymInt", float: "float"}


def tensor_fields(inputs: type[NamedTuple]) -> tuple[str, ...]:
    """The fields of an inputs tuple that hold a tensor (or None); the others are Python scalars."""
    return tuple(name for name, kind in inputs.__annotations__.items() if kind in (Tensor, Optional[Tensor]))


def schema(
    inputs: type[NamedTuple], results: Union[type[Tensor], type[NamedTuple]], leading: tuple[str, ...] = ()
) -> str:
    """The torch.library schema of an op taking ``leading`` Tensor arguments, then the fields of
    ``inputs``, and returning ``results``: e.g. ``"(Tensor grad, Tensor q, Tensor? indices, SymInt ratio)
    -> (Tensor, Tensor)"``."""
    args = [f"Tensor {name}" for name in leading]
    args += [f"{_SCHEMA_TYPES[kind]} {name}" for name, kind in inputs.__annotations__.items()]
    returns = "Tensor" if results is Tensor else "(" + ", ".join("Tensor" for _ in results._fields) + ")"
    return f"({', '.join(args)}) -> {returns}"


def contiguous(inputs: NamedTuple) -> NamedTuple:
    """The same inputs tuple with every tensor made contiguous (a copy where it is not): the ops take
    contiguous tensors."""
    return type(inputs)(*(value.contiguous() if isinstance(value, Tensor) else value for value in inputs))
