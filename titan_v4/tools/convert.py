"""Convert DeepSeek-V4 checkpoints between the official, HF and torchtitan DCP layouts.

    python -m titan_v4.tools.convert --input DIR --input-format {official,hf,dcp} \\
        --output DIR --output-format {hf,dcp} [--flavor NAME] [--dtype {bfloat16,float32}]

- `official`: DeepSeek's released safetensors (FP8 / FP4 weights are dequantised, exactly, to
  bf16); `hf`: HF transformers' names (titan_v4/checkpoint/names.py), which is also what
  `--output-format hf` writes: one safetensors file per layer plus the index and a config.json
  that transformers' `DeepseekV4ForCausalLM` loads (it ignores the MTP block, kept next to it
  under its official names); `dcp`: a torchtitan checkpoint (model weights in titan-v4's names),
  read from any `step-N` folder and written so that `[checkpoint] initial_load_path` loads it.
- The model comes from the input's config.json, or `--flavor` (needed for `dcp` input); with both,
  they must agree. The input is checked against it before anything is converted.
- HF output keeps every tensor's exact dtype (dequantised weights bf16, everything else as
  stored), DCP output the model's parameter dtypes (fp32, as torchtitan saves); `--dtype` casts
  every floating tensor instead.
- An input tensor with a NaN or infinite value (in a quantised weight: in its codes or its scales)
  is refused, naming the stored tensor and its file; the check runs on each block as it is read,
  so the output directory is left incomplete (an HF one without its index and config.json, a DCP
  one without its .metadata).
- It streams one block (a layer, an MTP depth, or the embedding / head group) at a time, so the
  host memory it needs is about one block, plus the file being written; progress is logged per
  block and the peak host memory at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from titan_v4.checkpoint.conversion import DCP, DTYPES, NonFiniteValueError, convert
from titan_v4.checkpoint.directory import HF, OFFICIAL, CheckpointMismatchError
from titan_v4.flavors import deepseek_v4_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m titan_v4.tools.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, required=True, help="checkpoint directory (a torchtitan step-N folder for dcp)")
    parser.add_argument("--input-format", choices=(OFFICIAL, HF, DCP), required=True)
    parser.add_argument("--output", type=Path, required=True, help="directory to write (created)")
    parser.add_argument("--output-format", choices=(HF, DCP), required=True)
    parser.add_argument("--flavor", choices=sorted(deepseek_v4_args), help="the model (default: the input's config.json)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast every floating tensor (default: hf exact, dcp fp32)")
    a = parser.parse_args(argv)
    if a.output.exists() and any(a.output.iterdir()):
        parser.error(f"--output {a.output} is not empty")
    try:
        convert(a.input, a.input_format, a.output, a.output_format, a.flavor, DTYPES.get(a.dtype))
    except (CheckpointMismatchError, NonFiniteValueError) as e:  # a bad input: its message is the last line, no traceback
        raise SystemExit(f"convert: {e}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
