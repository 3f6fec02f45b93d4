"""The weighted kNN classifier that scores features without training anything (Wu et al. 2018's monitor)."""

from __future__ import annotations

import torch


@torch.no_grad()
def knn_predict(
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    queries: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Predicted class of each query: its ``k`` most cosine-similar bank rows vote, each with exp(similarity / T).

    ``bank`` (N, D) and ``queries`` (M, D) are unit-length rows; queries go in
    chunks so that the (chunk, N) similarity matrix stays small.
    """
    predictions = []
    for start in range(0, len(queries), chunk):
        similarity, neighbours = (queries[start : start + chunk] @ bank.T).topk(min(k, len(bank)), dim=1)
        votes = torch.zeros(len(similarity), num_classes, device=queries.device)
        votes.scatter_add_(1, bank_labels[neighbours], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)
