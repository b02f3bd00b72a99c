"""Zero-shot evaluation (docs/DESIGN.md, "Clean accuracy"); image pre-processing is in ``preprocess``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .preprocess import normalize


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames: list[str], templates: list[str], device="cpu") -> torch.Tensor:
    """Zero-shot weights, float32 [embed_dim, C]: per class, the mean of the L2-normalised text
    embeddings of every template filled with the class name, renormalised (docs/DESIGN.md protocol;
    Radford et al. 2021, §3.1.4 prompt ensembling)."""
    weights = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1)
        weights.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(weights, dim=1)


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int = 500, device="cpu", unit: bool = True) -> torch.Tensor:
    """Image embeddings, float32 [N, embed_dim], of uint8 images [N, 3, S, S] already at the
    model's geometry; L2-normalised unless ``unit`` is False (the linear probe's raw features)."""
    out = []
    for i in range(0, len(images), batch_size):
        emb = model.encode_image(normalize(images[i : i + batch_size].to(device))).float()
        out.append((F.normalize(emb, dim=-1) if unit else emb).cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


@torch.no_grad()
def encode_tokens(model, tokens: torch.Tensor, batch_size: int = 1000, device="cpu") -> torch.Tensor:
    """L2-normalised text embeddings, float32 [N, embed_dim] on ``device``, of int64 tokens [N, L]."""
    out = [F.normalize(model.encode_text(tokens[i : i + batch_size].to(device)).float(), dim=-1)
           for i in range(0, len(tokens), batch_size)]
    return torch.cat(out) if out else torch.empty(0, 0)


def encode_texts(model, tokenizer, captions: list[str], batch_size: int = 1000, device="cpu") -> torch.Tensor:
    """L2-normalised text embeddings, float32 [N, embed_dim] (on the CPU), of N captions."""
    return encode_tokens(model, tokenizer(captions), batch_size, device).cpu()


def predict(model, images: torch.Tensor, classifier: torch.Tensor, k: int = 5, batch_size: int = 500, device="cpu") -> torch.Tensor:
    """Top-k zero-shot class indices, int64 [N, k] (best first), of uint8 images [N, 3, S, S]
    at the model's geometry, against ``classifier`` [embed_dim, C]."""
    return topk_classes(encode_images(model, images, batch_size, device), classifier, k)


def topk_classes(features: torch.Tensor, classifier: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Top-k class indices, int64 [N, k], of image features [N, D] (normalised here) against
    ``classifier`` [D, C]."""
    logits = F.normalize(features, dim=-1) @ classifier.cpu()
    return logits.topk(min(k, logits.shape[1]), dim=1).indices


def topk_accuracy(topk: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose true label (int64 [N]) is among the first k of ``topk`` [N, >=k]."""
    if len(labels) == 0:
        raise ValueError("accuracy of an empty evaluation set is undefined")
    return (topk[:, :k] == labels.unsqueeze(1)).any(dim=1).double().mean().item()
