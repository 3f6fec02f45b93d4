"""Self-supervised pretraining: the objectives of SimCLR, MoCo and BYOL, and what they share.

``losses`` holds the objectives as functions of embeddings, ``momentum`` the
slowly moving target networks and MoCo's queue of keys. The methods and
``deit pretrain`` build on them (issue 18; in progress).
"""
