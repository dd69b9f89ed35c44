"""FasterVLM's selection (github.com/Theia-4869/FasterVLM, llava/model/llava_arch.py lines 141-157 and
llava/model/multimodal_encoder/clip_encoder.py lines 36-42, commit f5d5f12; Apache-2.0). Inputs as arguments."""

import torch


def fastervlm(attentions, visual_token_num):
    """attentions: [B, H, T, T] of the select layer (T includes [CLS] at 0). Returns the [B, N] index mask."""
    image_attentions = attentions[:, :, 0, 1:]  # feature_select, select_feature == 'patch'
    B, N = image_attentions.shape[0], image_attentions.shape[-1]
    image_attentions = image_attentions.mean(dim=1) # (B, N)
    token_indices = torch.topk(image_attentions, k=visual_token_num, dim=1)[1] # (B, T)
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=attentions.device) # (B, N)
    index_masks.scatter_(1, token_indices, True) # (B, N)
    return index_masks
