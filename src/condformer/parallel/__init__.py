"""Training past one device on PyTorch's own distributed engine (torchrun, DDP, FSDP2, DeviceMesh, DCP).

One module per concept: :mod:`~condformer.parallel.global_batch` (MoE statistics over every rank's tokens),
:mod:`~condformer.parallel.fsdp` (FSDP2 sharding), :mod:`~condformer.parallel.expert_parallel` (experts
sharded over a mesh dimension, tokens moved by all-to-all), :mod:`~condformer.parallel.activation_checkpoint`
(recompute a layer's activations in the backward pass), :mod:`~condformer.parallel.sharded_checkpoint`
(``torch.distributed.checkpoint`` saves of sharded runs). Nothing here launches processes or implements a
collective: torchrun starts the ranks and ``torch.distributed`` moves the data.
"""
