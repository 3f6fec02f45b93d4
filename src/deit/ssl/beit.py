"""BEiT (Bao et al., 2022): masked image modelling, the pretraining built for the vision transformer itself.

Each image is cut into the ViT's patches. About 40 % of them, in blocks
(``ssl.masking``), are replaced by one learned mask embedding before the
position embedding is added. The ViT then predicts, at every masked
position, the visual token of the patch it cannot see (``ssl.tokenizer``), by
cross-entropy over the codebook. Unmasked positions carry no loss.

Two choices differ from the paper, both so that every pretrained weight
loads into our DeiT students (``deit train --init``):

- the model's own absolute position embedding, where the paper uses relative
  position biases;
- no layer scale, which the students do not have.

The linear head that predicts the tokens is left behind with the mask embedding.

Without a tokenizer (``pretrain.mask_target: pixels``), the head predicts the
masked patches' normalised pixels instead, with an L1 loss, as SimMIM does:
the baseline the tokenizer has to beat.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deit.errors import ModelError
from deit.models import VisionTransformer
from deit.ssl.backbone import Backbone
from deit.ssl.method import Method
from deit.ssl.tokenizer import PatchTokenizer, patchify


class BEiT(Method):
    step_input = "view and mask"  # each image's mask is drawn from its seed (see pretrain.masked_image_losses)

    def __init__(self, backbone: Backbone, tokenizer: PatchTokenizer | None, *, mask_ratio: float = 0.4) -> None:
        super().__init__()
        self.mask_ratio = mask_ratio
        vit = backbone.model
        if not isinstance(vit, VisionTransformer):
            raise ModelError(f"BEiT pretrains our ViT / DeiT models, not {type(vit).__name__}: choose a deit_* model")
        patch_dim = vit.config.in_chans * vit.config.patch_size**2
        if tokenizer is not None:
            tokenizer.check(vit.config.patch_size, vit.config.in_chans)
        self.backbone = backbone
        self.tokenizer = tokenizer  # its codebook is a buffer: the checkpoint carries it; None: pixel targets
        self.mask_embedding = nn.Parameter(torch.zeros(1, 1, vit.config.embed_dim))
        nn.init.trunc_normal_(self.mask_embedding, std=0.02)
        self.token_head = nn.Linear(vit.config.embed_dim, tokenizer.size if tokenizer is not None else patch_dim)
        nn.init.trunc_normal_(self.token_head.weight, std=0.02)
        nn.init.zeros_(self.token_head.bias)

    def describe(self) -> str:
        if self.tokenizer is None:
            return "BEiT's targets: the masked patches' pixels"
        return f"BEiT's targets: the {self.tokenizer.describe()}"  # its tensors' as they are: resumed, the checkpoint's

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"mask_embedding"}  # an input token, undecayed like the class token

    def patch_features(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The ViT's output at each patch position (B, N, C), the masked patches' inputs replaced by the embedding."""
        vit = self.backbone.model
        x = vit.patch_embed(images)
        x = torch.where(masks.unsqueeze(-1), self.mask_embedding.to(x.dtype), x)
        x = torch.cat([vit.prefix_tokens(x.shape[0]), x], dim=1) + vit.pos_embed
        x = vit.norm(vit.blocks(vit.pos_drop(x)))
        return x[:, vit.num_prefix_tokens :]

    def losses(self, images: torch.Tensor, masks: torch.Tensor) -> dict[str, torch.Tensor]:
        predicted = self.token_head(self.patch_features(images, masks)[masks]).float()  # masked positions only
        if self.tokenizer is None:  # the pixel-target baseline: L1 to the masked patches' normalised pixels
            pixels = patchify(images.float(), self.backbone.model.config.patch_size)[masks]
            loss = F.l1_loss(predicted, pixels)
            return {"loss": loss, "pixel_loss": loss.detach()}
        targets = self.tokenizer(images)[masks]  # the visual tokens of the masked patches, (M,)
        logits = predicted
        loss = F.cross_entropy(logits, targets)
        accuracy = (logits.argmax(dim=1) == targets).float().mean()
        return {"loss": loss, "token_loss": loss.detach(), "token_accuracy": accuracy.detach()}
