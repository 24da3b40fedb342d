"""Chained block hashes for automatic prefix caching.

Theory. Full block i of a request (tokens [i*B, (i+1)*B)) is identified by
`h_i = sha256(h_{i-1} || tokens_i || extra_keys_i)`, with `h_{-1}` a fixed root. Chaining makes a block's hash
name its whole prefix, so two requests share block i only if every earlier token matches too. Extra keys
(the request's LoRA adapter id and its cache_salt, folded into block 0 only and inherited through the chain)
keep apart what must not be shared: the KV an adapter computes differs from the base model's for the same
tokens, and tenants with different salts never see each other's blocks. An adapter reloaded in place keeps its id
but not its weights: its generation (the reloads before the request arrived) goes in with the id, so requests
after a reload never match KV the old weights computed. The adapter id goes first, tagged and
fixed-width, so no salt can spell it. sha256 keeps collisions out of reach (a collision would silently serve another prompt's KV);
hashes are 32 bytes and are computed once per block, when it becomes full.

Only full blocks are hashed: a partial block's content is not final, so it is never shared.
"""

from __future__ import annotations

import hashlib
from array import array

from treadle_engine_core.request import Request

ROOT_HASH = hashlib.sha256(b"treadle-prefix-cache-v1").digest()


def hash_block(
    parent: bytes, token_ids: list[int], extra_key: bytes = b"", lora_id: int = 0, lora_generation: int = 0
) -> bytes:
    """sha256 over (parent hash, tokens as int64, LoRA adapter id and generation, extra key bytes)."""
    h = hashlib.sha256(parent)
    h.update(array("q", token_ids).tobytes())
    if lora_id:
        h.update(b"\x00lora\x00")
        h.update(lora_id.to_bytes(8, "little", signed=True))
        if lora_generation:
            h.update(lora_generation.to_bytes(8, "little", signed=True))
    if extra_key:
        h.update(b"\x00salt\x00")
        h.update(extra_key)
    return h.digest()


def update_block_hashes(request: Request, block_size: int) -> list[bytes]:
    """Extend `request.block_hashes` to cover every full block of its known tokens; return the list."""
    hashes = request.block_hashes
    num_full = len(request.all_token_ids) // block_size
    if len(hashes) >= num_full:
        return hashes
    tokens = request.all_token_ids
    parent = hashes[-1] if hashes else ROOT_HASH
    for i in range(len(hashes), num_full):
        salt = request.cache_salt.encode() if (i == 0 and request.cache_salt) else b""
        lora_id = request.lora_id if i == 0 else 0
        block = tokens[i * block_size : (i + 1) * block_size]
        parent = hash_block(parent, block, salt, lora_id, request.lora_generation if lora_id else 0)
        hashes.append(parent)
    return hashes
