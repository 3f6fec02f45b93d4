"""Self-supervised pretraining: SimCLR, MoCo, BYOL, BEiT, DeepCluster, CPC and CMC, and what they share.

``method`` is what every method is to the training loop, ``pretrain`` builds
one and gives the step its objective; each method is one file. ``probe`` and
``transfer`` use what was learned: a linear probe, and ``deit train --init``.
"""
