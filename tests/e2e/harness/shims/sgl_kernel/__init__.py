"""Test-harness stand-in for ``sgl_kernel`` (the real one is a CUDA build without these CPU ops).

SGLang's CPU path imports these names when its modules load (speculative decoding and KV-cache
helpers); an image request never calls them. Each raises if it ever is, so a test cannot pass on a
silent no-op.
"""

_NAMES = (
    "copy_all_layer_kv_cache_cpu", "assign_req_to_token_pool_cpu", "assign_extend_cache_locs_cpu",
    "assign_draft_cache_locs_contiguous_cpu", "build_tree_kernel_efficient_cpu", "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu", "verify_tree_greedy_cpu",
)


def _make(name: str):
    def not_available(*args, **kwargs):
        raise RuntimeError(f"sgl_kernel.{name} is a test-harness stand-in and was called")

    not_available.__name__ = name
    return not_available


for _name in _NAMES:
    globals()[_name] = _make(_name)
