"""One model over several processes with torch.distributed: tensor parallel (Megatron layout) on gloo.

parallel_state.py owns the process groups and the collectives, tensor_parallel.py the sharding rules by HF
weight name and the all-reduce after each attention and MLP block, launcher.py the ranks (rank 0 runs the
engine and broadcasts each step's inputs; the workers run the same forward).
"""
