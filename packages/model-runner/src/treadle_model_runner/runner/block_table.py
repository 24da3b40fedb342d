"""BlockTable: the physical block ids of every batch row for one KV-cache group, persistent across steps.

Row r holds the block ids of the request in batch row r, in logical order; `num_blocks[r]` of them are valid.
The host copy is a numpy view of a (pinned, on CUDA) torch tensor, so a step's table goes to the device with one
non-blocking copy of rows [0, num_reqs). Slot mapping (cache slot of each scheduled token) is a vectorized
gather: slot = table[row, pos // block_size] * block_size + pos % block_size.
"""

from __future__ import annotations

import numpy as np
import torch


class BlockTable:
    def __init__(
        self, max_num_reqs: int, max_blocks_per_req: int, block_size: int, device: torch.device
    ) -> None:
        self.block_size = block_size
        self.max_blocks_per_req = max_blocks_per_req
        pin = device.type == "cuda"
        self.cpu = torch.zeros(max_num_reqs, max_blocks_per_req, dtype=torch.int32, pin_memory=pin)
        self.np = self.cpu.numpy()  # [max_num_reqs, max_blocks_per_req] physical block ids
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int32)  # valid entries per row
        self.device_table = torch.zeros(max_num_reqs, max_blocks_per_req, dtype=torch.int32, device=device)

    def set_row(self, row: int, block_ids: list[int]) -> None:
        self.num_blocks[row] = 0
        self.append(row, block_ids)

    def append(self, row: int, block_ids: list[int]) -> None:
        start = int(self.num_blocks[row])
        end = start + len(block_ids)
        if end > self.max_blocks_per_req:
            raise ValueError(
                f"request in row {row} holds {end} blocks, more than max_model_len allows "
                f"({self.max_blocks_per_req} blocks of {self.block_size} tokens)"
            )
        self.np[row, start:end] = block_ids
        self.num_blocks[row] = end

    def move_row(self, src: int, dst: int) -> None:
        n = int(self.num_blocks[src])
        self.np[dst, :n] = self.np[src, :n]
        self.num_blocks[dst] = n

    def slot_mapping(self, req_indices: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Cache slot [T] int64 of each token, from its batch row and absolute position."""
        block_ids = self.np[req_indices, positions // self.block_size].astype(np.int64)
        return block_ids * self.block_size + positions % self.block_size

    def commit(self, num_reqs: int) -> torch.Tensor:
        """Copy rows [0, num_reqs) to the device (non-blocking); returns the device view [num_reqs, max_blocks]."""
        self.device_table[:num_reqs].copy_(self.cpu[:num_reqs], non_blocking=True)
        return self.device_table[:num_reqs]
