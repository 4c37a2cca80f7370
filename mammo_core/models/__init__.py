"""The networks: DenseNet parts, the fused Freeze1-3 model, the hash decoders.

Modules:
- ``densenet_parts``: Building blocks the paper adds to DenseNet-121: attention between dense blocks, a closing
  transition.
- ``fused``: The paper's feature extractor: DenseNet-121 truncated after its third dense block, three ways frozen.
- ``hashing``: The divide-and-encode hash decoder (Lai et al., CVPR 2015, as the paper uses it) and its FC ablation.
- ``hashing_stack``: The 48 decoders of the hashing stage trained together, one optimiser step for all.
"""
