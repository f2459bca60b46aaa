"""Running the model on a device mesh.

    sharding.py   logical axis names and the ONE table that maps them onto the mesh axes
    attention.py  a DMA kernel inside shard_map (batch over data/fsdp/expert, kv-head groups over tensor)
    experts.py    expert-parallel CDMoE: tables sharded over `expert`, computed in shard_map
"""
