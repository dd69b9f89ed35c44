# Copied verbatim (the body of one method) from DART's reference implementation, for the test of
# embedlens.reduction.dart to run the authors' own selection on the same tensors.
#
# Source: https://github.com/ZichenWen1/DART (read in its fork https://github.com/xqy1111111/DART, commit
# d6a5af6f24f9d0c2f3f3a8eb09b8ca7cef58b58a), file llava/model/language_model/modeling_llama_self.py, lines 397-449,
# method `LlamaModel.get_retained_image_token`, by Zichen Wen et al.
# Licensed under the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0), as that repository is.
# Changes: the method is a module-level function (its `self` is unused); `math` and `torch` are imported here.

import math

import torch


def get_retained_image_token(self, config, last_layer_state: torch.Tensor, any_states: torch.Tensor) -> torch.Tensor:
    DART_config = config.DART_config
    K = DART_config['K']  # pruned layer
    image_token_start_index = DART_config['image_token_start_index']
    image_token_length = DART_config['image_token_length']
    MAX_NUM_TRUNCTION = DART_config['max_num_trunction']

    pivot_image_token = DART_config['pivot_image_token']
    pivot_text_token = DART_config['pivot_text_token']


    reduction_ratio = DART_config['reduction_ratio']
    TOKEN_TOPK = math.ceil((MAX_NUM_TRUNCTION if MAX_NUM_TRUNCTION is not None else (image_token_length * (1 - reduction_ratio))) // (pivot_image_token + pivot_text_token))

    device = last_layer_state.device

    if config.text_length is not None:
        text_length = config.text_length
        image_token_length = any_states.shape[2] - text_length
        retain_token_num_for_llava_next = min(DART_config['retain_token_num_for_llava_next'], image_token_length - pivot_image_token)
        TOKEN_TOPK = int((retain_token_num_for_llava_next if retain_token_num_for_llava_next is not None else (image_token_length * (1 - reduction_ratio)))  // (pivot_image_token + pivot_text_token))

    any_states = any_states.permute(0, 2, 1, 3).reshape(any_states.shape[0], any_states.shape[2], -1)

    k_states_image_token = any_states[0][image_token_start_index:image_token_start_index + image_token_length, :]
    k_states_query_token = any_states[0][image_token_start_index + image_token_length:, :]

    k_states_image_token_L1_norm = torch.norm(k_states_image_token, p=1, dim=-1)
    k_states_query_token_L1_norm = torch.norm(k_states_query_token, p=1, dim=-1)

    image_indices = (k_states_image_token_L1_norm.topk(pivot_image_token).indices + image_token_start_index).tolist() 
    query_indices = (k_states_query_token_L1_norm.topk(pivot_text_token).indices + image_token_start_index + image_token_length).tolist()
    indices_set = set(image_indices + query_indices)

    valid_indices = set(range(image_token_start_index, image_token_start_index + image_token_length)) - set(image_indices)

    valid_indices_list = list(valid_indices)  
    for item in list(indices_set):
        valid_vectors = last_layer_state[0][valid_indices_list, :]
        cos_sim = -torch.nn.functional.cosine_similarity(last_layer_state[0][item, :], valid_vectors, dim=-1)
        top_k_indices = cos_sim.topk(TOKEN_TOPK).indices

        top_k_real_indices = [valid_indices_list[i] for i in top_k_indices]
        indices_set.update(top_k_real_indices)
        
        valid_indices.difference_update(top_k_real_indices)
        valid_indices_list = list(valid_indices)  

    indices_set.difference_update(query_indices)

    retained_image_tokens_index = torch.tensor(list(indices_set), device=device)

    return retained_image_tokens_index
