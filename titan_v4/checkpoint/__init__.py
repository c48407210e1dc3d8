"""Every checkpoint format: released DeepSeek-V4 checkpoints (official FP8 / FP4 and HF layouts), the
HF config translation, the state-dict adapter torchtitan loads through, and conversion between the
official, HF and DCP layouts (docs/design.md lists the files; docs/deepseek_v4.md the format)."""
