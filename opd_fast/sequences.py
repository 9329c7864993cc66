"""Which positions of generated sequences a distillation loss should count.

``model.generate`` returns ``[B, prompt + new]`` token ids in which every row runs to the longest completion:
after a row's first EOS come padding tokens (``pad_token_id``, often the EOS id itself). A loss that counts every
position after the prompt therefore also distills the teacher's opinion of padding; :func:`completion_mask`
counts a completion up to and including its first EOS (the model must learn to stop) and nothing after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def completion_mask(
    sequences: torch.Tensor, prompt_length: int, eos_token_id: int | Sequence[int] | None
) -> torch.Tensor:
    """``[B, T − 1]`` bool: position t counts when the token it predicts, ``sequences[:, t + 1]``, is a completion
    token at or before the first EOS of its row.

    sequences: ``[B, T]`` int token ids, each row a (left-padded) prompt of ``prompt_length`` tokens followed by
    its completion, as ``generate`` returns them. eos_token_id: the id, or the ids (``generation_config`` may hold
    a list), that end a completion; None counts every completion token. Pair the mask with the hidden states at
    positions ``[:, :-1]``, which predict the next token.
    """
    if sequences.dim() != 2 or sequences.dtype.is_floating_point:
        raise ValueError(f"sequences must be [batch, length] token ids; got {tuple(sequences.shape)} {sequences.dtype}")
    if not 0 < prompt_length < sequences.shape[1]:
        raise ValueError(
            f"prompt_length={prompt_length} must leave room for a completion in sequences of length "
            f"{sequences.shape[1]}: pass the prompts' padded length (prompt_ids.shape[1])"
        )
    completion = sequences[:, prompt_length:]
    counted = torch.ones_like(completion, dtype=torch.bool)
    if eos_token_id is not None:
        eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        is_eos = torch.isin(completion, eos_ids.to(completion.device))
        # A token counts while no EOS came before it: the first EOS itself still counts.
        eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
        counted = eos_before == 0
    mask = torch.zeros(sequences.shape[0], sequences.shape[1] - 1, dtype=torch.bool, device=sequences.device)
    mask[:, prompt_length - 1 :] = counted
    return mask
