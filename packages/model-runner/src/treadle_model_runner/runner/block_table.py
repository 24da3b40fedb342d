"""BlockTable: the physical block ids of every batch row for one KV-cache group, persistent across steps.

Row r holds the block ids of the request in batch row r, in logical order; `num_blocks[r]` of them are valid.
The table lives twice: a host numpy mirror (`np`), where the scheduler's diffs land (`set_row`, `append`,
`move_row`), and a device-resident copy (`device_table`) that attention and the slot mapping read.

Invariant: after `commit()`, `device_table` equals `np` row for row, entries past `num_blocks` included (padding
requests of a decode graph read rows past num_reqs, so they must match too; a vacated row's first entry is the
null block, which is all a padding request reads). Every host write marks its row
dirty; `commit()` sends only dirty rows: it gathers them into a pinned staging buffer, copies it and the row
indices to the device with non-blocking copies, and scatters them with one `index_copy_`. A steady decode batch
that crossed no block boundary commits nothing. The staging buffer must not be rewritten before the copies read
it: the runner waits on the step's `copies_done` event before the next step's diff (see inputs.py).
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
        self.np = np.zeros((max_num_reqs, max_blocks_per_req), dtype=np.int32)  # physical block ids (host)
        self.num_blocks = np.zeros(max_num_reqs, dtype=np.int32)  # valid entries per row
        self.is_dirty = np.zeros(max_num_reqs, dtype=bool)  # row written on the host since the last commit
        # [max_num_reqs, max_blocks_per_req] int32 physical block ids on the device (persistent: graphs read it)
        self.device_table = torch.zeros(max_num_reqs, max_blocks_per_req, dtype=torch.int32, device=device)
        pin = device.type == "cuda"
        self._staged_rows = torch.zeros(max_num_reqs, max_blocks_per_req, dtype=torch.int32, pin_memory=pin)
        self._staged_index = torch.zeros(max_num_reqs, dtype=torch.int64, pin_memory=pin)
        self._device_rows = torch.zeros(max_num_reqs, max_blocks_per_req, dtype=torch.int32, device=device)
        self._device_index = torch.zeros(max_num_reqs, dtype=torch.int64, device=device)
        self.num_committed_rows = 0  # rows sent to the device by the last commit (for tests and stats)

    def set_row(self, row: int, block_ids: list[int]) -> None:
        self.num_blocks[row] = 0
        self.append(row, block_ids)
        self.is_dirty[row] = True  # even with no block ids: the row now belongs to another request

    def append(self, row: int, block_ids: list[int]) -> None:
        start = int(self.num_blocks[row])
        end = start + len(block_ids)
        if end > self.max_blocks_per_req:
            raise ValueError(
                f"request in row {row} holds {end} blocks, more than max_model_len allows "
                f"({self.max_blocks_per_req} blocks of {self.block_size} tokens)"
            )
        if end > start:
            self.np[row, start:end] = block_ids
            self.is_dirty[row] = True
        self.num_blocks[row] = end

    def move_row(self, src: int, dst: int) -> None:
        n = int(self.num_blocks[src])
        self.np[dst, :n] = self.np[src, :n]
        self.num_blocks[dst] = n
        self.is_dirty[dst] = True
        self.clear_row(src)

    def clear_row(self, row: int) -> None:
        """Empty a vacated row: its first entry becomes the null block, the only one a padding request reads
        (a stale id could lie past a smaller cache, e.g. the graph-memory probe's one block)."""
        self.np[row, 0] = 0
        self.num_blocks[row] = 0
        self.is_dirty[row] = True

    def commit(self, num_reqs: int) -> torch.Tensor:
        """Send the dirty rows to the device (non-blocking); returns the device view [num_reqs, max_blocks]."""
        rows = np.flatnonzero(self.is_dirty)
        n = rows.size
        self.num_committed_rows = n
        if n:
            staged_rows, staged_index = self._staged_rows.numpy(), self._staged_index.numpy()
            np.take(self.np, rows, axis=0, out=staged_rows[:n])
            staged_index[:n] = rows
            self._device_rows[:n].copy_(self._staged_rows[:n], non_blocking=True)
            self._device_index[:n].copy_(self._staged_index[:n], non_blocking=True)
            self.device_table.index_copy_(0, self._device_index[:n], self._device_rows[:n])
            self.is_dirty[:] = False
        return self.device_table[:num_reqs]
