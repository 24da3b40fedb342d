"""Stop checks: after each new token, decide whether the request is done and why.

Order (the first that holds wins, as in vLLM): the model's EOS unless `ignore_eos` (no stop_reason, even when the
id is also in `stop_token_ids`), a token of `stop_token_ids` (stop_reason = that id), the generation config's other
EOS ids (`sampling_params.all_stop_token_ids`) unless `ignore_eos`, then the length caps (`max_tokens`
output tokens, or `max_model_len` tokens in all). Stop and EOS tokens count only once `min_tokens` tokens came
before them, matching the sampler, which masks them for the first `min_tokens` positions. The stop token
itself stays in the output (the frontend hides it when detokenizing). Stop strings are the frontend's.
"""

from __future__ import annotations

from treadle_engine_core.request import Request, RequestStatus


def check_stop(request: Request, token_id: int, eos_token_ids: frozenset[int], max_model_len: int) -> bool:
    """Call after appending `token_id`; sets status / stop_reason and returns True if the request ended."""
    params = request.sampling_params
    num_output = len(request.output_token_ids)
    if num_output > params.min_tokens:
        if not params.ignore_eos and token_id in eos_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            return True
        if params.stop_token_ids and token_id in params.stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = token_id
            return True
        if not params.ignore_eos and token_id in params.all_stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            return True
    if num_output >= request.max_tokens or len(request.all_token_ids) >= max_model_len:
        request.status = RequestStatus.FINISHED_LENGTH_CAPPED
        return True
    return False


def append_and_check_stop(
    request: Request, token_ids: list[int], eos_token_ids: frozenset[int], max_model_len: int
) -> tuple[list[int], bool]:
    """Append tokens one by one until the request ends; returns (tokens kept, ended)."""
    kept: list[int] = []
    for tok in token_ids:
        if len(request.output_token_ids) >= request.max_tokens:  # max_tokens == 0: prompt only
            request.status = RequestStatus.FINISHED_LENGTH_CAPPED
            return kept, True
        request.append_output_token_ids([tok])
        kept.append(tok)
        if check_stop(request, tok, eos_token_ids, max_model_len):
            return kept, True
    return kept, False
