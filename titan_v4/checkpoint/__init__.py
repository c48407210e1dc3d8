"""Reading released DeepSeek-V4 checkpoints (official and HF layouts) into titan-v4, and writing them.

names.py (the three spellings of every tensor), safetensors_file.py (the file format),
quantization.py (FP8 / FP4 decoding), source.py (where one tensor's values come from),
directory.py (a checkpoint directory checked against the model), reader.py (the DCP reader
torchtitan loads through), synthetic.py (random official-layout checkpoints for benchmarks).
"""
