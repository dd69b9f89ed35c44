"""CDPruner's selection (github.com/Theia-4869/CDPruner, llava/model/llava_arch.py lines 141-185, commit 9541616;
Apache-2.0). Inputs as arguments: `image_features` are the projector's output, `image_embeds` / `text_embeds` what
the relevance compares (the reference: CLIP's projected image and text embeddings)."""

import torch


def cdpruner(image_features, image_embeds, text_embeds, visual_token_num):
    B, N, C = image_features.shape
    device = image_features.device

    # [CDPruner] Calculate cosine similarity
    image_normalized = image_features / image_features.norm(dim=-1, keepdim=True) # (B, N, D)
    image_normalized = image_normalized.float() # (B, N, D)
    similarity = torch.matmul(image_normalized, image_normalized.transpose(1, 2)) # (B, N, N)

    # [CDPruner] Calculate query relevance
    image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True) # (B, N, C)
    text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True) # (M, C)
    relevance = torch.matmul(image_embeds, text_embeds.t()) # (B, N, M)
    relevance = (-relevance).mean(dim=-1) # (B, N)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min()) # (B, N)

    # [CDPruner] Construct kernel matrix
    kernel = relevance.unsqueeze(2) * similarity * relevance.unsqueeze(1) # (B, N, N)

    # [CDPruner] Fast MAP inference of conditional DPP
    cis = torch.zeros((visual_token_num, B, N), device=device) # (T, B, N)
    di2s = torch.diagonal(kernel, dim1=1, dim2=2).clone() # (B, N)
    select_idx = torch.empty((visual_token_num, B), dtype=torch.long, device=device) # (T, B)
    for i in range(visual_token_num):
        j = torch.argmax(di2s, dim=-1)
        select_idx[i] = j

        eis = (kernel[torch.arange(B), j] - torch.einsum('tb,tbn->bn', cis[:i, torch.arange(B), j], cis[:i])) \
            / torch.sqrt(di2s[torch.arange(B), j]).unsqueeze(-1)
        cis[i, :, :] = eis
        di2s -= torch.square(eis)
        di2s[torch.arange(B), j] = -float('inf')

    select_idx = torch.sort(select_idx.t()).values # (B, T)
    index_masks = torch.zeros(B, N, dtype=torch.bool, device=device)
    index_masks.scatter_(1, select_idx, True)
    return index_masks
