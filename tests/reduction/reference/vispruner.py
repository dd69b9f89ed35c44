"""VisPruner's selection (github.com/Theia-4869/VisPruner, llava/model/llava_arch.py lines 141-185, commit aefa01a;
Apache-2.0). Inputs as arguments."""

import torch


def vispruner(image_features, image_attentions, visual_token_num, important_ratio):
    """image_features: [B, N, C] patch features; image_attentions: [B, H, N] ([CLS] row over patches)."""
    B, N, C = image_features.shape
    device = image_features.device
    important_token_num = int(visual_token_num * important_ratio) # T_imp = T * r
    diverse_token_num = visual_token_num - important_token_num # T_div = T * (1 - r)

    # [VisPruner] Select important tokens using attention scores
    image_attentions = image_attentions.mean(dim=1) # (B, N)
    token_indices = image_attentions.argsort(dim=-1, descending=True) # (B, N)
    important_indices = token_indices[:, :important_token_num] # (B, T_imp)
    residual_indices = token_indices[:, important_token_num:] # (B, N - T_imp)

    # [VisPruner] Remove duplicate tokens by iterative matching and pruning
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True) # (B, N, C)
    while diverse_token_num > 0:
        R = residual_indices.shape[1]
        r = min(8, R - diverse_token_num)
        if r <= 0:
            break

        residual_tokens = image_normalized[torch.arange(B).unsqueeze(-1).expand(-1, R), residual_indices] # (B, R, C)
        a, b = residual_tokens[..., ::2, :], residual_tokens[..., 1::2, :] # (B, R // 2, C)
        scores = a @ b.transpose(-1, -2) # (B, R // 2, R // 2)
        scores = scores.max(dim=-1).values # (B, R // 2)

        distinct_indices = scores.argsort(dim=-1, descending=True)[:, r:] # (B, R // 2 - r)
        residual_indices = torch.cat([
            residual_indices[..., ::2][torch.arange(B).unsqueeze(-1).expand(-1, R // 2 - r), distinct_indices],
            residual_indices[..., 1::2]
        ], dim=-1) # (B, R - r)

    if diverse_token_num > 0:
        selected_indices = torch.cat([important_indices, residual_indices], dim=-1) # (B, T)
    else:
        selected_indices = important_indices # (B, T)
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=device)
    index_masks.scatter_(1, selected_indices, True)
    return index_masks
