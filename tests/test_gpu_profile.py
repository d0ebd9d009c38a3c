"""The GPU benchmarks' profile tables: kernels sorted into families by name, and their times
summed per family (checked by hand on kernel names from the committed CUDA profiles)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_profile import family_lines, kernel_family, profile_lines  # noqa: E402

# names as the profiler printed them on an H200 (benchmarks/results/*_cuda.txt), with their family
KERNELS = {
    "nvjet_sm90_tst_192x192_64x4_1x2_h_bz_coopB_bias_TNN": "matrix products and convolutions",
    "void cutlass__5x_cudnn::Kernel<cutlass_tensorop_f16_s16816fprop_optimized_f16_128x128_3": "matrix products and convolutions",
    "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1_cga1": "attention",
    "triton_per_fused__to_copy_add_native_layer_norm_backward_view_11": "compiled fusions (inductor)",
    "triton_poi_fused_gelu_gelu_backward_view_8": "compiled fusions (inductor)",
    "row_adamw": "unicom's Triton kernels",
    "margin_softmax_backward": "unicom's Triton kernels",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float, fals": "layer norm and softmax",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, at:": "layer norm and softmax",
    "void at_cuda_detail::cub::detail::radix_sort::DeviceRadixSortOnesweepKernel<at_cuda_det": "sort and top-k",
    "at::native::mbtopk::computeDigitCumSum(short*, unsigned int*, unsigned int)": "sort and top-k",
    "Memcpy DtoH (Device -> Pageable)": "copies and fills",
    "Memset (Device)": "copies and fills",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, std::": "copies and fills",
    "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, s": "elementwise, gathers and scatters",
    "void at::native::vectorized_gather_kernel<16, long>(char*, char*, long*, int, long, lon": "elementwise, gathers and scatters",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormTwoO": "reductions",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymou": "optimiser",
    "void nvjpeg::rgba2rgb<(nvjpegOutputFormat_t)3, nvjpeg::RGBAToRGBConversion::LaunchParam": "image decoding and resizing",
    "void at::native::(anonymous namespace)::upsample_gen2d_aa_out_frame<float, float, at::n": "image decoding and resizing",
    "void cudnn::engines_precompiled::nchwToNhwcKernel<__half, __half, float, false, true, (": "other",
}


def test_kernels_are_sorted_into_families_by_name():
    assert {name: kernel_family(name) for name in KERNELS} == KERNELS


def test_family_times_are_the_sums_of_their_kernels_per_step():
    def event(key, count, us):
        return SimpleNamespace(key=key, count=count, self_device_time_total=us)

    rows = [event("nvjet_sm90_a", 6, 3000.0), event("nvjet_sm90_b", 3, 1500.0),
            event("row_adamw", 3, 300.0), event("Memset (Device)", 9, 60.0)]
    busy = (3000 + 1500 + 300 + 60) / 3 / 1000  # ms per step over 3 steps
    assert family_lines(rows, steps=3, busy=busy) == [
        "| kernel family | calls / step | ms / step | share |", "|---|---:|---:|---:|",
        "| matrix products and convolutions | 3 | 1.500 | 92.6% |",
        "| unicom's Triton kernels | 1 | 0.100 | 6.2% |",
        "| copies and fills | 3 | 0.020 | 1.2% |",
    ]


def test_on_the_cpu_the_profile_is_a_table_of_operators_without_families():
    a, b = torch.randn(64, 64), torch.randn(64, 64)
    lines, busy = profile_lines(lambda: a @ b, steps=2, top=3)
    assert busy is None
    assert lines[0] == "### profile" and "CPU operators busy" in lines[2]
    assert lines[4] == "| CPU operator | calls / step | ms / step | share |"
    assert not any("kernel family" in line for line in lines)
    assert any(line.startswith("| aten::mm ") for line in lines[6:9])
