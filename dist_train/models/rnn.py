"""RNN/LSTM/GRU sequence classifiers over right-padded token sequences, run packed.

Lengths reach the model through the input itself: token `pad_id` (default 0) is padding, and a
sequence's length is its count of non-padding tokens (padding must come after the tokens). The
packed run skips the padding entirely, so a sequence's logits do not depend on how much padding
its batch carries.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from ..errors import UserError

CELLS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}


class RecurrentLayer(nn.Module):
    """One recurrent layer (both directions when bidirectional); a block for checkpointing and FSDP."""

    def __init__(self, cell: str, input_dim: int, hidden_dim: int, bidirectional: bool):
        super().__init__()
        self.rnn = CELLS[cell](input_dim, hidden_dim, batch_first=True, bidirectional=bidirectional)

    def forward(self, packed: PackedSequence) -> tuple[PackedSequence, torch.Tensor]:
        out, hidden = self.rnn(packed)
        if isinstance(hidden, tuple):  # LSTM: (h_n, c_n)
            hidden = hidden[0]
        return out, hidden  # hidden: (directions, B, H), in the batch's original order


class RNNClassifier(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        cell: str,
        embed_dim: int,
        hidden_dim: int,
        num_layers: int,
        bidirectional: bool,
        dropout: float,
        pad_id: int,
    ):
        super().__init__()
        self.pad_id = pad_id
        directions = 2 if bidirectional else 1
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=pad_id)
        # One module per layer rather than nn.LSTM(num_layers=...): the framework finds repeated
        # blocks in `blocks` (activation checkpointing, FSDP per-block sharding).
        self.blocks = nn.ModuleList(
            RecurrentLayer(cell, embed_dim if i == 0 else hidden_dim * directions, hidden_dim, bidirectional)
            for i in range(num_layers)
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim * directions, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (B, T) -> logits (B, num_classes)
        # Packing needs the lengths on the host (one device sync per batch on GPU); an all-padding
        # row is given length 1 so that packing accepts it.
        lengths = (tokens != self.pad_id).sum(dim=1).clamp(min=1).cpu()
        packed = pack_padded_sequence(self.dropout(self.embed(tokens)), lengths, batch_first=True, enforce_sorted=False)
        for i, block in enumerate(self.blocks):
            if i > 0:  # dropout between layers, as nn.LSTM(dropout=...) does
                packed = PackedSequence(
                    self.dropout(packed.data), packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
                )
            packed, hidden = block(packed)
        # Final state of the last layer: the last real token forwards, the first one backwards.
        final = hidden.transpose(0, 1).reshape(tokens.shape[0], -1)  # (B, directions * H)
        return self.head(self.dropout(final))


def rnn_classifier(
    vocab_size: int = 256,
    num_classes: int = 2,
    cell: str = "lstm",
    embed_dim: int = 64,
    hidden_dim: int = 128,
    num_layers: int = 1,
    bidirectional: bool = False,
    dropout: float = 0.0,
    pad_id: int = 0,
) -> RNNClassifier:
    """`cell`: rnn (tanh), lstm or gru. Inputs are token ids, right-padded with `pad_id`."""
    if cell not in CELLS:
        raise UserError(f"rnn_classifier: unknown cell {cell!r} (known: {', '.join(CELLS)})")
    if num_layers < 1 or not 0 <= pad_id < vocab_size:
        raise UserError("rnn_classifier: num_layers must be >= 1 and 0 <= pad_id < vocab_size")
    return RNNClassifier(
        vocab_size, num_classes, cell, embed_dim, hidden_dim, num_layers, bidirectional, dropout, pad_id
    )
