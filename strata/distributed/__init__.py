"""Scale-out on torch.distributed and Ray.

One model over several processes: parallel_state.py owns the process groups and the collectives,
tensor_parallel.py the sharding rules by HF weight name and the all-reduce after each attention and MLP block,
expert_parallel.py the expert placement of --enable-expert-parallel, launcher.py the ranks (rank 0 runs the
engine and broadcasts each step's inputs; the workers run the same forward), ray_ranks.py the workers as Ray
actors. Many engines behind one endpoint: replica.py (an engine as a Ray actor), router.py and
replica_stream.py (routing, failures, migration and the prefill/decode hand-off).
"""
