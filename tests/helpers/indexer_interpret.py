"""Runs the indexer's Triton launchers on the CPU under the Triton interpreter and saves the results.

``python -m tests.helpers.indexer_interpret CASES.pt RESULTS.pt``: CASES.pt holds a list of dicts
``{"op": "scores" | "topk" | "teacher", "inputs": <the op's NamedTuple as a tuple>, "grad": tensor or
None}``; RESULTS.pt receives one dict of output tensors per case.

Why a separate process: Triton reads ``TRITON_INTERPRET`` when ``@triton.jit`` decorates a kernel (in
``triton.jit``'s decorator, through ``triton.knobs.runtime.interpret``; the same in triton 3.6 and
3.9), i.e. when the kernel module is first imported. Setting the variable inside the pytest process
would turn every later-imported kernel into an interpreted one for the rest of the session, and could
not undo kernels imported earlier; a child process started with the variable set isolates it.
"""

import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("run with TRITON_INTERPRET=1 (see the module docstring)")

import torch  # noqa: E402

from custom_ops.indexer.contract import ScoresInputs, TeacherInputs, TopkInputs  # noqa: E402
from custom_ops.indexer.triton.scores_bwd import indexer_scores_bwd  # noqa: E402
from custom_ops.indexer.triton.scores_fwd import indexer_scores_fwd, indexer_topk  # noqa: E402
from custom_ops.indexer.triton.teacher import indexer_teacher  # noqa: E402


def run(case: dict) -> dict:
    op, inputs = case["op"], case["inputs"]
    if op == "scores":
        inputs = ScoresInputs(*inputs)
        out = {"scores": indexer_scores_fwd(inputs)}
        if case["grad"] is not None:
            out.update(indexer_scores_bwd(inputs, case["grad"])._asdict())
        return out
    if op == "topk":
        return {"picks": indexer_topk(TopkInputs(*inputs))}
    if op == "teacher":
        return indexer_teacher(TeacherInputs(*inputs))._asdict()
    raise ValueError(f"unknown op {op!r}")


def main(cases_path: str, results_path: str) -> None:
    cases = torch.load(cases_path)
    torch.save([run(case) for case in cases], results_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
