"""Model zoo: plain-torch models with seeded weights, split at block boundaries.

A model is an ordered list of blocks; a pipeline stage is a contiguous block range. Block
weights are seeded per block, so any range can be built alone and matches the full model.
"""

from doramesh.models.profile import layer_table
from doramesh.models.seeding import BlockInit, block_generator, block_seed, seeded_factory
from doramesh.models.spec import ModelFactory, ModelSpec
from doramesh.models.weights import file_sha256, load_stage, stage_weights, write_stage_weights
from doramesh.models.zoo import (
    build_blocks,
    example_input,
    get_spec,
    names,
    register,
    require_served,
    resolve,
    skeleton_blocks,
    unregister,
)

__all__ = [
    "BlockInit",
    "ModelFactory",
    "ModelSpec",
    "block_generator",
    "block_seed",
    "build_blocks",
    "example_input",
    "file_sha256",
    "get_spec",
    "layer_table",
    "load_stage",
    "names",
    "register",
    "require_served",
    "resolve",
    "seeded_factory",
    "skeleton_blocks",
    "stage_weights",
    "unregister",
    "write_stage_weights",
]
