"""Session 14 one-off: which mask makes the 192-key tile (lse from registers) fail its GPU
test? Prints the relative error of out and lse against the f32 reference per case."""
import numpy as np

from pallas_kernels.flash_attention_mgpu import MosaicBlockSizes, flash_attention_mgpu
from tests.test_attention_mgpu import _inputs, _packed_segments, _reference

CASES = [  # name, T, S, causal, window, softcap, segments, block_k
    ("all, S 1024", 1024, 1024, False, (200, 100), 30.0, True, 192),
    ("all, S 1152 (no tail)", 1152, 1152, False, (200, 100), 30.0, True, 192),
    ("segments, S 1152", 1152, 1152, False, None, None, True, 192),
    ("segments, S 1024", 1024, 1024, False, None, None, True, 192),
    ("window (200, 100), S 1024", 1024, 1024, False, (200, 100), None, False, 192),
    ("softcap, S 1024", 1024, 1024, False, None, 30.0, False, 192),
    ("all, bk128, S 1000", 1024, 1000, False, (200, 100), 30.0, True, 128),
    ("all, bk128 lse-smem, S 1152", 1152, 1152, False, (200, 100), 30.0, True, 128),
]
for name, T, S, causal, window, softcap, segments, bk in CASES:
    q, k, v = _inputs(1, T, S, 4, 2, 128, "bfloat16", 0)
    seg = _packed_segments(1, T, S, 0) if segments else None
    bs = MosaicBlockSizes(block_k=bk, num_stages=2, overlap_softmax=True,
                          lse_through_smem=bk == 128)
    try:
        out, lse = flash_attention_mgpu(q, k, v, causal=causal, window=window, softcap=softcap,
                                        segment_ids=seg, block_sizes=bs)
        args = seg if seg is not None else (None, None)
        r_out, r_lse = _reference(q, k, v, *args, causal=causal, window=window,
                                  softcap=softcap, scale=None)
        o, ro = np.asarray(out, np.float32), np.asarray(r_out, np.float32)
        l, rl = np.asarray(lse), np.asarray(r_lse, np.float32)
        fin = np.isfinite(rl)
        bad_rows = np.argwhere(np.abs(o - ro).max(axis=(2, 3)) > 0.05)
        print(f"{name:32s} out rel {np.linalg.norm(o - ro) / np.linalg.norm(ro):.2e} "
              f"lse max {np.abs(l[fin] - rl[fin]).max():.2e} inf-mismatch "
              f"{int((np.isfinite(l) != fin).sum())} bad rows {len(bad_rows)} "
              f"first {bad_rows[:3].tolist()}", flush=True)
    except Exception as e:  # noqa: BLE001
        print(f"{name:32s} error {type(e).__name__}: {str(e)[:300]}", flush=True)
