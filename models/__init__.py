"""idforge's tensor side: identity and variation samplers, face generators, face embedders.

Everything here runs on tensors with no service in sight: it imports torch, numpy, diffusers,
transformers, safetensors and PIL only, never the API or the workers. Every random draw takes an
explicit seed or a portable `models.seeding.Stream`, so a dataset is reproducible from (job seed, identity, sample).
"""
