"""Fused Pallas kernels for Dynamic Mask Attention, each beside the pieces it shares with the others.

They import only the references (`doge_jax.model.mask`, `doge_jax.model.dma_reference`), never the dispatcher
that chooses them (`doge_jax.model.attention_impl`).

- topk.py: the top-k window without a [T, S] mask (per-row thresholds, the sparse key order), plain XLA.
- gpu_dma.py / gpu_flash.py: the Triton kernel (`attention_impl="pallas_gpu"`): entry point (layouts, masks,
  rows with no key) and the three Pallas kernels with their custom_vjp.
- tpu_dma.py / tpu_flash.py: the Mosaic TPU kernel (`attention_impl="pallas_tpu"`).
- target.py: which platform the kernels are traced for (`target.backend()`; `target.lowering_for("tpu")` lowers
  the real Triton/Mosaic calls from a CPU host). Under a device mesh each kernel runs inside shard_map
  (`doge_jax.parallel.attention`).

GPU design, in one place:
- Tiles: a query tile is block_q positions × the R = N/K query heads of one kv head (block_q·R rows; default 64
  rows), keys in tiles of block_k (default 64). GQA never repeats K/V: each K/V tile serves the R heads at once,
  and dK/dV/d-bias of a kv head are finished sums (no atomics). fp32 online softmax, scores q·kᵀ·scale + dt.
- Top-k without a [T, S] mask: row t keeps key s iff allowed and dt[s] ≥ thr[t], thr[t] = the w-th largest dt the
  row may see (w = keep_window_size). Ties at thr are all kept, exactly like the reference; torch.topk keeps an
  arbitrary w of them (the two agree whenever dt has no tie at the threshold; A = 0 at init ties every key).
  Causal/padding masks: thr from one sort per bias head (topk.prefix_thresholds). Segment ids or a sliding
  window longer than w: thr by chunked top_k (exact, O(T·S) work, slow at long context).
- Long context (S ≥ 2w, causal/padding masks): keys are reordered inside chunks of ~sqrt(S·block_k) positions by
  the last query tile that can keep them; a tile then walks the first ntab[c] keys of each earlier chunk plus its
  own chunk: ≈ w + chunk + (S/chunk)·block_k/2 keys instead of ~S/2 (2.7× fewer at 16k, 4.7× at 32k, w = 2048).
- Backward: dQ walks like the forward; dK/dV/d-bias walk each key tile's range of query tiles. The bias gradient
  is a column sum of dS per kv head (G = K), or per query head (G = N): training reaches A and dt_proj.
"""
