"""The planner: a training job's memory per rank, collectives and step time on a cluster of any
size, computed in one CPU process (python -m titan_v4.tools.plan; docs/planner.md).

cluster.py builds a rank with the trainer's own code on a fake process group; state.py reads its
persistent bytes and FSDP units; activations.py runs its blocks on fake tensors; traffic.py lists
its collectives; roofline.py holds the measured rates; plan.py puts them together.
"""
