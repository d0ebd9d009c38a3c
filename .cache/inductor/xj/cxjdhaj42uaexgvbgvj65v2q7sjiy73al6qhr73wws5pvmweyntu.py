# AOT ID: ['0_backward']
from ctypes import c_void_p, c_long, c_int
import torch
import math
import random
import os
import tempfile
from math import inf, nan
from cmath import nanj
from torch._inductor.hooks import run_intermediate_hooks
from torch._inductor.utils import maybe_profile
from torch._inductor.codegen.memory_planning import _align as align
from torch import device, empty_strided
from torch._inductor.async_compile import AsyncCompile
from torch._inductor.select_algorithm import extern_kernels
from torch._inductor.runtime.runtime_utils import assert_tensor_metadata

aten = torch.ops.aten
inductor_ops = torch.ops.inductor
_quantized = torch.ops._quantized
assert_size_stride = torch._C._dynamo.guards.assert_size_stride
assert_size_stride_grouped = torch._C._dynamo.guards.assert_size_stride_grouped
assert_alignment = torch._C._dynamo.guards.assert_alignment
empty_strided_cpu = torch._C._dynamo.guards._empty_strided_cpu
empty_strided_cpu_pinned = torch._C._dynamo.guards._empty_strided_cpu_pinned
empty_strided_cuda = torch._C._dynamo.guards._empty_strided_cuda
empty_strided_xpu = torch._C._dynamo.guards._empty_strided_xpu
empty_strided_mtia = torch._C._dynamo.guards._empty_strided_mtia
reinterpret_tensor = torch._C._dynamo.guards._reinterpret_tensor
alloc_from_pool = torch.ops.inductor._alloc_from_pool
async_compile = AsyncCompile()
empty_strided_p2p = torch._C._distributed_c10d._SymmetricMemory.empty_strided_p2p


cpp_fused__to_copy_native_layer_norm_backward_select_backward_view_0 = async_compile.cpp_pybinding(['const at::BFloat16*', 'const at::BFloat16*', 'const float*', 'const float*', 'const float*', 'float*', 'float*', 'float*', 'float*', 'float*', 'float*', 'at::BFloat16*'], r'''
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(const at::BFloat16* in_ptr0,
                       const at::BFloat16* in_ptr1,
                       const float* in_ptr2,
                       const float* in_ptr3,
                       const float* in_ptr4,
                       float* out_ptr0,
                       float* out_ptr1,
                       float* out_ptr2,
                       float* out_ptr3,
                       float* out_ptr4,
                       float* out_ptr5,
                       at::BFloat16* out_ptr6)
{
    std::atomic<int> inductor_cpu_integer_div_error{0};
    inductor_cpu_integer_div_error_flag = &inductor_cpu_integer_div_error;
    #pragma omp parallel
    {
        int tid = omp_get_thread_num();
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(49152L); x0+=static_cast<int64_t>(32L))
            {
                {
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(49152L)))
                    {
                        auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                        tmp1.store(out_ptr0 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(8L); x0+=static_cast<int64_t>(1L))
            {
                #pragma GCC ivdep
                for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(5L); x1+=static_cast<int64_t>(1L))
                {
                    {
                        float tmp_acc0 = 0;
                        at::vec::VectorizedN<float,2> tmp_acc0_vec = at::vec::VectorizedN<float,2>(0);
                        float tmp_acc1 = 0;
                        at::vec::VectorizedN<float,2> tmp_acc1_vec = at::vec::VectorizedN<float,2>(0);
                        for(int64_t x2=static_cast<int64_t>(0L); x2<static_cast<int64_t>(64L); x2+=static_cast<int64_t>(32L))
                        {
                            {
                                if(C10_LIKELY(x2 >= static_cast<int64_t>(0) && x2 < static_cast<int64_t>(64L)))
                                {
                                    auto tmp4 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr1 + static_cast<int64_t>(x2 + 64L*x0), static_cast<int64_t>(32));
                                    auto tmp10 = at::vec::VectorizedN<float,2>::loadu(in_ptr2 + static_cast<int64_t>(x2), static_cast<int64_t>(32));
                                    auto tmp12 = at::vec::VectorizedN<float,2>::loadu(in_ptr3 + static_cast<int64_t>(x2 + 64L*x1 + 320L*x0), static_cast<int64_t>(32));
                                    auto tmp0 = x1;
                                    auto tmp1 = c10::convert<int32_t>(tmp0);
                                    auto tmp2 = static_cast<int32_t>(0);
                                    auto tmp3 = tmp1 == tmp2;
                                    auto tmp5 = at::vec::convert<float,2,at::BFloat16,1>(tmp4);
                                    auto tmp6 = static_cast<float>(0.0);
                                    auto tmp7 = at::vec::VecMask<float,2>::from(tmp3);
                                    auto tmp8 = at::vec::VectorizedN<float,2>(tmp6);
                                    auto tmp9 = decltype(tmp5)::blendv(tmp8, tmp5, tmp7.template cast<float,2>());
                                    auto tmp11 = tmp9 * tmp10;
                                    auto tmp13 = tmp11 * tmp12;
                                    tmp_acc0_vec = tmp_acc0_vec + tmp11;
                                    tmp_acc1_vec = tmp_acc1_vec + tmp13;
                                }
                            }
                        }
                        tmp_acc0 = tmp_acc0 + at::vec::vec_reduce_all<float, 2>([](at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y) { return x + y; }, tmp_acc0_vec);
                        out_ptr1[static_cast<int64_t>(x1 + 5L*x0)] = static_cast<float>(tmp_acc0);
                        tmp_acc1 = tmp_acc1 + at::vec::vec_reduce_all<float, 2>([](at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y) { return x + y; }, tmp_acc1_vec);
                        out_ptr2[static_cast<int64_t>(x1 + 5L*x0)] = static_cast<float>(tmp_acc1);
                    }
                    for(int64_t x2=static_cast<int64_t>(0L); x2<static_cast<int64_t>(64L); x2+=static_cast<int64_t>(32L))
                    {
                        {
                            if(C10_LIKELY(x2 >= static_cast<int64_t>(0) && x2 < static_cast<int64_t>(64L)))
                            {
                                auto tmp0 = in_ptr4[static_cast<int64_t>(x1 + 5L*x0)];
                                auto tmp5 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr1 + static_cast<int64_t>(x2 + 64L*x0), static_cast<int64_t>(32));
                                auto tmp11 = at::vec::VectorizedN<float,2>::loadu(in_ptr2 + static_cast<int64_t>(x2), static_cast<int64_t>(32));
                                auto tmp16 = out_ptr1[static_cast<int64_t>(x1 + 5L*x0)];
                                auto tmp19 = at::vec::VectorizedN<float,2>::loadu(in_ptr3 + static_cast<int64_t>(x2 + 64L*x1 + 320L*x0), static_cast<int64_t>(32));
                                auto tmp20 = out_ptr2[static_cast<int64_t>(x1 + 5L*x0)];
                                auto tmp1 = x1;
                                auto tmp2 = c10::convert<int32_t>(tmp1);
                                auto tmp3 = static_cast<int32_t>(0);
                                auto tmp4 = tmp2 == tmp3;
                                auto tmp6 = at::vec::convert<float,2,at::BFloat16,1>(tmp5);
                                auto tmp7 = static_cast<float>(0.0);
                                auto tmp8 = at::vec::VecMask<float,2>::from(tmp4);
                                auto tmp9 = at::vec::VectorizedN<float,2>(tmp7);
                                auto tmp10 = decltype(tmp6)::blendv(tmp9, tmp6, tmp8.template cast<float,2>());
                                auto tmp12 = tmp10 * tmp11;
                                auto tmp13 = static_cast<float>(64.0);
                                auto tmp14 = at::vec::VectorizedN<float,2>(tmp13);
                                auto tmp15 = tmp12 * tmp14;
                                auto tmp17 = at::vec::VectorizedN<float,2>(tmp16);
                                auto tmp18 = tmp15 - tmp17;
                                auto tmp21 = at::vec::VectorizedN<float,2>(tmp20);
                                auto tmp22 = tmp19 * tmp21;
                                auto tmp23 = tmp18 - tmp22;
                                auto tmp24 = at::vec::VectorizedN<float,2>(tmp0);
                                auto tmp25 = tmp24 * tmp23;
                                tmp25.store(out_ptr3 + static_cast<int64_t>(x2 + 64L*x1 + 320L*x0));
                            }
                        }
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(64L); x0+=static_cast<int64_t>(32L))
            {
                {
                    float tmp_acc0_arr[32];
                    for (int i = 0; i < 32; i++)
                    {
                        tmp_acc0_arr[i] = 0;
                    }
                    float tmp_acc1_arr[32];
                    for (int i = 0; i < 32; i++)
                    {
                        tmp_acc1_arr[i] = 0;
                    }
                    float tmp_acc0 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc0_vec = at::vec::VectorizedN<float,2>(0);
                    float tmp_acc1 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc1_vec = at::vec::VectorizedN<float,2>(0);
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(8L); x1+=static_cast<int64_t>(1L))
                    {
                        for(int64_t x2=static_cast<int64_t>(0L); x2<static_cast<int64_t>(5L); x2+=static_cast<int64_t>(1L))
                        {
                            {
                                if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                                {
                                    auto tmp4 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr1 + static_cast<int64_t>(x0 + 64L*x1), static_cast<int64_t>(32));
                                    auto tmp10 = at::vec::VectorizedN<float,2>::loadu(in_ptr3 + static_cast<int64_t>(x0 + 64L*x2 + 320L*x1), static_cast<int64_t>(32));
                                    auto tmp0 = x2;
                                    auto tmp1 = c10::convert<int32_t>(tmp0);
                                    auto tmp2 = static_cast<int32_t>(0);
                                    auto tmp3 = tmp1 == tmp2;
                                    auto tmp5 = at::vec::convert<float,2,at::BFloat16,1>(tmp4);
                                    auto tmp6 = static_cast<float>(0.0);
                                    auto tmp7 = at::vec::VecMask<float,2>::from(tmp3);
                                    auto tmp8 = at::vec::VectorizedN<float,2>(tmp6);
                                    auto tmp9 = decltype(tmp5)::blendv(tmp8, tmp5, tmp7.template cast<float,2>());
                                    auto tmp11 = tmp9 * tmp10;
                                    tmp_acc0_vec = tmp_acc0_vec + tmp11;
                                    tmp_acc1_vec = tmp_acc1_vec + tmp9;
                                }
                            }
                        }
                    }
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                    {
                        tmp_acc0_vec.store(out_ptr4 + static_cast<int64_t>(x0));
                        tmp_acc1_vec.store(out_ptr5 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(2560L); x0+=static_cast<int64_t>(32L))
            {
                {
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(2560L)))
                    {
                        auto tmp0 = at::vec::VectorizedN<float,2>::loadu(out_ptr3 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp1 = at::vec::convert<at::BFloat16,1,float,2>(tmp0);
                        tmp1.store(out_ptr6 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                    }
                }
            }
        }
    }
    inductor_cpu_integer_div_error_flag = nullptr;
    inductor_cpu_throw_if_integer_div_error(inductor_cpu_integer_div_error);
}
''')


cpp_fused__to_copy_gelu_gelu_backward_sum_view_1 = async_compile.cpp_pybinding(['at::BFloat16*', 'const at::BFloat16*', 'const at::BFloat16*', 'const at::BFloat16*', 'at::BFloat16*', 'float*', 'float*'], r'''
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(at::BFloat16* in_out_ptr0,
                       const at::BFloat16* in_ptr0,
                       const at::BFloat16* in_ptr1,
                       const at::BFloat16* in_ptr2,
                       at::BFloat16* out_ptr0,
                       float* out_ptr1,
                       float* out_ptr2)
{
    std::atomic<int> inductor_cpu_integer_div_error{0};
    inductor_cpu_integer_div_error_flag = &inductor_cpu_integer_div_error;
    #pragma omp parallel
    {
        int tid = omp_get_thread_num();
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(64L); x0+=static_cast<int64_t>(32L))
            {
                {
                    float tmp_acc0 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc0_vec = at::vec::VectorizedN<float,2>(0);
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(40L); x1+=static_cast<int64_t>(1L))
                    {
                        {
                            if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                            {
                                auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr0 + static_cast<int64_t>(x0 + 64L*x1), static_cast<int64_t>(32));
                                auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                                tmp_acc0_vec = tmp_acc0_vec + tmp1;
                            }
                        }
                    }
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                    {
                        auto at_BFloat16_tmp_acc0_vec = at::vec::convert<at::BFloat16,1,float,2>(tmp_acc0_vec);
                        at_BFloat16_tmp_acc0_vec.store(out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                    }
                }
                {
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                    {
                        auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                        tmp1.store(out_ptr1 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(16384L); x0+=static_cast<int64_t>(32L))
            {
                {
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(16384L)))
                    {
                        auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr1 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                        tmp1.store(out_ptr2 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(10240L); x0+=static_cast<int64_t>(32L))
            {
                {
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(10240L)))
                    {
                        auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp2 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr2 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                        auto tmp3 = at::vec::convert<float,2,at::BFloat16,1>(tmp2);
                        auto tmp4 = static_cast<float>(0.7071067811865476);
                        auto tmp5 = at::vec::VectorizedN<float,2>(tmp4);
                        auto tmp6 = tmp3 * tmp5;
                        auto tmp7 = tmp6.erf();
                        auto tmp8 = static_cast<float>(1.0);
                        auto tmp9 = at::vec::VectorizedN<float,2>(tmp8);
                        auto tmp10 = tmp7 + tmp9;
                        auto tmp11 = static_cast<float>(0.5);
                        auto tmp12 = at::vec::VectorizedN<float,2>(tmp11);
                        auto tmp13 = tmp10 * tmp12;
                        auto tmp14 = tmp3 * tmp3;
                        auto tmp15 = static_cast<float>(-0.5);
                        auto tmp16 = at::vec::VectorizedN<float,2>(tmp15);
                        auto tmp17 = tmp14 * tmp16;
                        auto tmp18 = tmp17.exp();
                        auto tmp19 = static_cast<float>(0.3989422804014327);
                        auto tmp20 = at::vec::VectorizedN<float,2>(tmp19);
                        auto tmp21 = tmp18 * tmp20;
                        auto tmp22 = tmp3 * tmp21;
                        auto tmp23 = tmp13 + tmp22;
                        auto tmp24 = tmp1 * tmp23;
                        auto tmp25 = at::vec::convert<at::BFloat16,1,float,2>(tmp24);
                        tmp25.store(in_out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                    }
                }
            }
        }
    }
    inductor_cpu_integer_div_error_flag = nullptr;
    inductor_cpu_throw_if_integer_div_error(inductor_cpu_integer_div_error);
}
''')


cpp_fused__to_copy_add_gelu_gelu_backward_native_layer_norm_backward_sum_view_2 = async_compile.cpp_pybinding(['float*', 'const at::BFloat16*', 'const at::BFloat16*', 'const at::BFloat16*', 'const float*', 'const float*', 'const float*', 'at::BFloat16*', 'float*', 'float*', 'float*', 'float*', 'float*', 'float*', 'at::BFloat16*'], r'''
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(float* in_out_ptr0,
                       const at::BFloat16* in_ptr0,
                       const at::BFloat16* in_ptr1,
                       const at::BFloat16* in_ptr2,
                       const float* in_ptr3,
                       const float* in_ptr4,
                       const float* in_ptr5,
                       at::BFloat16* out_ptr0,
                       float* out_ptr1,
                       float* out_ptr2,
                       float* out_ptr3,
                       float* out_ptr4,
                       float* out_ptr5,
                       float* out_ptr6,
                       at::BFloat16* out_ptr7)
{
    std::atomic<int> inductor_cpu_integer_div_error{0};
    inductor_cpu_integer_div_error_flag = &inductor_cpu_integer_div_error;
    #pragma omp parallel
    {
        int tid = omp_get_thread_num();
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(256L); x0+=static_cast<int64_t>(32L))
            {
                {
                    float tmp_acc0 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc0_vec = at::vec::VectorizedN<float,2>(0);
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(40L); x1+=static_cast<int64_t>(1L))
                    {
                        {
                            if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(256L)))
                            {
                                auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr0 + static_cast<int64_t>(x0 + 256L*x1), static_cast<int64_t>(32));
                                auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                                tmp_acc0_vec = tmp_acc0_vec + tmp1;
                            }
                        }
                    }
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(256L)))
                    {
                        auto at_BFloat16_tmp_acc0_vec = at::vec::convert<at::BFloat16,1,float,2>(tmp_acc0_vec);
                        at_BFloat16_tmp_acc0_vec.store(out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                    }
                }
                {
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(256L)))
                    {
                        auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                        tmp1.store(out_ptr1 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(16384L); x0+=static_cast<int64_t>(32L))
            {
                {
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(16384L)))
                    {
                        auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr1 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                        tmp1.store(out_ptr2 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(40L); x0+=static_cast<int64_t>(1L))
            {
                {
                    float tmp_acc0 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc0_vec = at::vec::VectorizedN<float,2>(0);
                    float tmp_acc1 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc1_vec = at::vec::VectorizedN<float,2>(0);
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(64L); x1+=static_cast<int64_t>(32L))
                    {
                        {
                            if(C10_LIKELY(x1 >= static_cast<int64_t>(0) && x1 < static_cast<int64_t>(64L)))
                            {
                                auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr2 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(32));
                                auto tmp2 = at::vec::VectorizedN<float,2>::loadu(in_ptr3 + static_cast<int64_t>(x1), static_cast<int64_t>(32));
                                auto tmp4 = at::vec::VectorizedN<float,2>::loadu(in_ptr4 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(32));
                                auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                                auto tmp3 = tmp1 * tmp2;
                                auto tmp5 = tmp3 * tmp4;
                                tmp_acc0_vec = tmp_acc0_vec + tmp3;
                                tmp_acc1_vec = tmp_acc1_vec + tmp5;
                            }
                        }
                    }
                    tmp_acc0 = tmp_acc0 + at::vec::vec_reduce_all<float, 2>([](at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y) { return x + y; }, tmp_acc0_vec);
                    out_ptr3[static_cast<int64_t>(x0)] = static_cast<float>(tmp_acc0);
                    tmp_acc1 = tmp_acc1 + at::vec::vec_reduce_all<float, 2>([](at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y) { return x + y; }, tmp_acc1_vec);
                    out_ptr4[static_cast<int64_t>(x0)] = static_cast<float>(tmp_acc1);
                }
                for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(64L); x1+=static_cast<int64_t>(32L))
                {
                    {
                        if(C10_LIKELY(x1 >= static_cast<int64_t>(0) && x1 < static_cast<int64_t>(64L)))
                        {
                            auto tmp0 = at::vec::VectorizedN<float,2>::loadu(in_out_ptr0 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(32));
                            auto tmp1 = in_ptr5[static_cast<int64_t>(x0)];
                            auto tmp2 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr2 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(32));
                            auto tmp4 = at::vec::VectorizedN<float,2>::loadu(in_ptr3 + static_cast<int64_t>(x1), static_cast<int64_t>(32));
                            auto tmp9 = out_ptr3[static_cast<int64_t>(x0)];
                            auto tmp12 = at::vec::VectorizedN<float,2>::loadu(in_ptr4 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(32));
                            auto tmp13 = out_ptr4[static_cast<int64_t>(x0)];
                            auto tmp3 = at::vec::convert<float,2,at::BFloat16,1>(tmp2);
                            auto tmp5 = tmp3 * tmp4;
                            auto tmp6 = static_cast<float>(64.0);
                            auto tmp7 = at::vec::VectorizedN<float,2>(tmp6);
                            auto tmp8 = tmp5 * tmp7;
                            auto tmp10 = at::vec::VectorizedN<float,2>(tmp9);
                            auto tmp11 = tmp8 - tmp10;
                            auto tmp14 = at::vec::VectorizedN<float,2>(tmp13);
                            auto tmp15 = tmp12 * tmp14;
                            auto tmp16 = tmp11 - tmp15;
                            auto tmp17 = at::vec::VectorizedN<float,2>(tmp1);
                            auto tmp18 = tmp17 * tmp16;
                            auto tmp19 = tmp0 + tmp18;
                            tmp19.store(in_out_ptr0 + static_cast<int64_t>(x1 + 64L*x0));
                        }
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(64L); x0+=static_cast<int64_t>(32L))
            {
                {
                    float tmp_acc0 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc0_vec = at::vec::VectorizedN<float,2>(0);
                    float tmp_acc1 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc1_vec = at::vec::VectorizedN<float,2>(0);
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(40L); x1+=static_cast<int64_t>(1L))
                    {
                        {
                            if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                            {
                                auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr2 + static_cast<int64_t>(x0 + 64L*x1), static_cast<int64_t>(32));
                                auto tmp2 = at::vec::VectorizedN<float,2>::loadu(in_ptr4 + static_cast<int64_t>(x0 + 64L*x1), static_cast<int64_t>(32));
                                auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                                auto tmp3 = tmp1 * tmp2;
                                tmp_acc0_vec = tmp_acc0_vec + tmp3;
                                tmp_acc1_vec = tmp_acc1_vec + tmp1;
                            }
                        }
                    }
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                    {
                        tmp_acc0_vec.store(out_ptr5 + static_cast<int64_t>(x0));
                        tmp_acc1_vec.store(out_ptr6 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(2560L); x0+=static_cast<int64_t>(32L))
            {
                {
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(2560L)))
                    {
                        auto tmp0 = at::vec::VectorizedN<float,2>::loadu(in_out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp1 = at::vec::convert<at::BFloat16,1,float,2>(tmp0);
                        tmp1.store(out_ptr7 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                    }
                }
            }
        }
    }
    inductor_cpu_integer_div_error_flag = nullptr;
    inductor_cpu_throw_if_integer_div_error(inductor_cpu_integer_div_error);
}
''')


cpp_fused__scaled_dot_product_flash_attention_for_cpu_backward__to_copy_sum_transpose_view_3 = async_compile.cpp_pybinding(['const at::BFloat16*', 'const at::BFloat16*', 'const float*', 'at::BFloat16*', 'float*', 'float*', 'float*'], r'''
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(const at::BFloat16* in_ptr0,
                       const at::BFloat16* in_ptr1,
                       const float* in_ptr2,
                       at::BFloat16* out_ptr0,
                       float* out_ptr1,
                       float* out_ptr2,
                       float* out_ptr3)
{
    std::atomic<int> inductor_cpu_integer_div_error{0};
    inductor_cpu_integer_div_error_flag = &inductor_cpu_integer_div_error;
    #pragma omp parallel
    {
        int tid = omp_get_thread_num();
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(64L); x0+=static_cast<int64_t>(32L))
            {
                {
                    float tmp_acc0 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc0_vec = at::vec::VectorizedN<float,2>(0);
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(40L); x1+=static_cast<int64_t>(1L))
                    {
                        {
                            if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                            {
                                auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr0 + static_cast<int64_t>(x0 + 64L*x1), static_cast<int64_t>(32));
                                auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                                tmp_acc0_vec = tmp_acc0_vec + tmp1;
                            }
                        }
                    }
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                    {
                        auto at_BFloat16_tmp_acc0_vec = at::vec::convert<at::BFloat16,1,float,2>(tmp_acc0_vec);
                        at_BFloat16_tmp_acc0_vec.store(out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                    }
                }
                {
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                    {
                        auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                        tmp1.store(out_ptr1 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(4096L); x0+=static_cast<int64_t>(32L))
            {
                {
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(4096L)))
                    {
                        auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr1 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                        tmp1.store(out_ptr2 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        #pragma omp single
        {
            {
                #pragma GCC ivdep
                for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(8L); x0+=static_cast<int64_t>(1L))
                {
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(2L); x1+=static_cast<int64_t>(16L))
                    {
                        for(int64_t x2=static_cast<int64_t>(0L); x2<static_cast<int64_t>(5L); x2+=static_cast<int64_t>(16L))
                        {
                            {
                                if(C10_LIKELY(x1 >= static_cast<int64_t>(0L) && x1 < static_cast<int64_t>(2L) && x2 >= static_cast<int64_t>(0L) && x2 < static_cast<int64_t>(5L)))
                                {
                                    alignas(std::max(std::size_t(16), alignof(float))) float tmp0[16*16];
                                    transpose_mxn<float,static_cast<int64_t>(5L),static_cast<int64_t>(2L),false>(in_ptr2 + static_cast<int64_t>(x1 + 2L*x2 + 10L*x0), static_cast<int64_t>(2L), tmp0, static_cast<int64_t>(5L));
                                    for (long x1_inner = 0; x1_inner < static_cast<int64_t>(2L); x1_inner++)
                                    {
                                        auto tmp1 = at::vec::Vectorized<float>::loadu(tmp0 + static_cast<int64_t>(5L*x1_inner), static_cast<int64_t>(5L));
                                        tmp1.store(out_ptr3 + static_cast<int64_t>(x2 + 5L*x1 + 5L*x1_inner + 10L*x0), static_cast<int64_t>(5L));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    inductor_cpu_integer_div_error_flag = nullptr;
    inductor_cpu_throw_if_integer_div_error(inductor_cpu_integer_div_error);
}
''')


cpp_fused__unsafe_view_clone_permute_stack_view_4 = async_compile.cpp_pybinding(['const at::BFloat16*', 'const at::BFloat16*', 'const at::BFloat16*', 'const at::BFloat16*', 'at::BFloat16*', 'at::BFloat16*', 'at::BFloat16*', 'at::BFloat16*'], r'''
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(const at::BFloat16* in_ptr0,
                       const at::BFloat16* in_ptr1,
                       const at::BFloat16* in_ptr2,
                       const at::BFloat16* in_ptr3,
                       at::BFloat16* out_ptr0,
                       at::BFloat16* out_ptr1,
                       at::BFloat16* out_ptr2,
                       at::BFloat16* out_ptr3)
{
    std::atomic<int> inductor_cpu_integer_div_error{0};
    inductor_cpu_integer_div_error_flag = &inductor_cpu_integer_div_error;
    #pragma omp parallel
    {
        int tid = omp_get_thread_num();
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(8L); x0+=static_cast<int64_t>(1L))
            {
                #pragma GCC ivdep
                for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(2L); x1+=static_cast<int64_t>(1L))
                {
                    #pragma GCC ivdep
                    for(int64_t x2=static_cast<int64_t>(0L); x2<static_cast<int64_t>(5L); x2+=static_cast<int64_t>(1L))
                    {
                        for(int64_t x3=static_cast<int64_t>(0L); x3<static_cast<int64_t>(32L); x3+=static_cast<int64_t>(32L))
                        {
                            {
                                if(C10_LIKELY(x3 >= static_cast<int64_t>(0) && x3 < static_cast<int64_t>(32L)))
                                {
                                    auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr0 + static_cast<int64_t>(x3 + 32L*x1 + 64L*x2 + 320L*x0), static_cast<int64_t>(32));
                                    tmp0.store(out_ptr0 + static_cast<int64_t>(x3 + 32L*x2 + 160L*x1 + 320L*x0), static_cast<int64_t>(32));
                                }
                            }
                        }
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(8L); x0+=static_cast<int64_t>(1L))
            {
                #pragma GCC ivdep
                for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(2L); x1+=static_cast<int64_t>(1L))
                {
                    #pragma GCC ivdep
                    for(int64_t x2=static_cast<int64_t>(0L); x2<static_cast<int64_t>(5L); x2+=static_cast<int64_t>(1L))
                    {
                        for(int64_t x3=static_cast<int64_t>(0L); x3<static_cast<int64_t>(32L); x3+=static_cast<int64_t>(32L))
                        {
                            {
                                if(C10_LIKELY(x3 >= static_cast<int64_t>(0) && x3 < static_cast<int64_t>(32L)))
                                {
                                    auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr1 + static_cast<int64_t>(x3 + 32L*x1 + 64L*x2 + 320L*x0), static_cast<int64_t>(32));
                                    tmp0.store(out_ptr1 + static_cast<int64_t>(x3 + 32L*x2 + 160L*x1 + 320L*x0), static_cast<int64_t>(32));
                                }
                            }
                        }
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(8L); x0+=static_cast<int64_t>(1L))
            {
                #pragma GCC ivdep
                for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(2L); x1+=static_cast<int64_t>(1L))
                {
                    #pragma GCC ivdep
                    for(int64_t x2=static_cast<int64_t>(0L); x2<static_cast<int64_t>(5L); x2+=static_cast<int64_t>(1L))
                    {
                        for(int64_t x3=static_cast<int64_t>(0L); x3<static_cast<int64_t>(32L); x3+=static_cast<int64_t>(32L))
                        {
                            {
                                if(C10_LIKELY(x3 >= static_cast<int64_t>(0) && x3 < static_cast<int64_t>(32L)))
                                {
                                    auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr2 + static_cast<int64_t>(x3 + 32L*x1 + 64L*x2 + 320L*x0), static_cast<int64_t>(32));
                                    tmp0.store(out_ptr2 + static_cast<int64_t>(x3 + 32L*x2 + 160L*x1 + 320L*x0), static_cast<int64_t>(32));
                                }
                            }
                        }
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(40L); x0+=static_cast<int64_t>(1L))
            {
                for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(192L); x1+=static_cast<int64_t>(32L))
                {
                    {
                        if(C10_LIKELY(x1 >= static_cast<int64_t>(0) && x1 < static_cast<int64_t>(192L)))
                        {
                            auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr3 + static_cast<int64_t>(32L*((static_cast<int64_t>(x0) % static_cast<int64_t>(5L))) + 160L*((static_cast<int64_t>(c10::div_floor_integer(static_cast<int64_t>(x1), static_cast<int64_t>(32L))) % static_cast<int64_t>(2L))) + 320L*(c10::div_floor_integer(static_cast<int64_t>(x0), static_cast<int64_t>(5L))) + 2560L*(c10::div_floor_integer(static_cast<int64_t>(x1), static_cast<int64_t>(64L))) + ((static_cast<int64_t>(x1) % static_cast<int64_t>(32L)))), static_cast<int64_t>(32));
                            tmp0.store(out_ptr3 + static_cast<int64_t>(x1 + 192L*x0), static_cast<int64_t>(32));
                        }
                    }
                }
            }
        }
    }
    inductor_cpu_integer_div_error_flag = nullptr;
    inductor_cpu_throw_if_integer_div_error(inductor_cpu_integer_div_error);
}
''')


cpp_fused__to_copy_add_native_layer_norm_backward_sum_view_5 = async_compile.cpp_pybinding(['float*', 'const at::BFloat16*', 'const at::BFloat16*', 'const at::BFloat16*', 'const float*', 'const float*', 'const float*', 'at::BFloat16*', 'float*', 'float*', 'float*', 'float*', 'float*', 'float*', 'at::BFloat16*'], r'''
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(float* in_out_ptr0,
                       const at::BFloat16* in_ptr0,
                       const at::BFloat16* in_ptr1,
                       const at::BFloat16* in_ptr2,
                       const float* in_ptr3,
                       const float* in_ptr4,
                       const float* in_ptr5,
                       at::BFloat16* out_ptr0,
                       float* out_ptr1,
                       float* out_ptr2,
                       float* out_ptr3,
                       float* out_ptr4,
                       float* out_ptr5,
                       float* out_ptr6,
                       at::BFloat16* out_ptr7)
{
    std::atomic<int> inductor_cpu_integer_div_error{0};
    inductor_cpu_integer_div_error_flag = &inductor_cpu_integer_div_error;
    #pragma omp parallel
    {
        int tid = omp_get_thread_num();
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(192L); x0+=static_cast<int64_t>(32L))
            {
                {
                    float tmp_acc0 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc0_vec = at::vec::VectorizedN<float,2>(0);
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(40L); x1+=static_cast<int64_t>(1L))
                    {
                        {
                            if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(192L)))
                            {
                                auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr0 + static_cast<int64_t>(x0 + 192L*x1), static_cast<int64_t>(32));
                                auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                                tmp_acc0_vec = tmp_acc0_vec + tmp1;
                            }
                        }
                    }
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(192L)))
                    {
                        auto at_BFloat16_tmp_acc0_vec = at::vec::convert<at::BFloat16,1,float,2>(tmp_acc0_vec);
                        at_BFloat16_tmp_acc0_vec.store(out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                    }
                }
                {
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(192L)))
                    {
                        auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                        tmp1.store(out_ptr1 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(12288L); x0+=static_cast<int64_t>(32L))
            {
                {
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(12288L)))
                    {
                        auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr1 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                        tmp1.store(out_ptr2 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(40L); x0+=static_cast<int64_t>(1L))
            {
                {
                    float tmp_acc0 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc0_vec = at::vec::VectorizedN<float,2>(0);
                    float tmp_acc1 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc1_vec = at::vec::VectorizedN<float,2>(0);
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(64L); x1+=static_cast<int64_t>(32L))
                    {
                        {
                            if(C10_LIKELY(x1 >= static_cast<int64_t>(0) && x1 < static_cast<int64_t>(64L)))
                            {
                                auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr2 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(32));
                                auto tmp2 = at::vec::VectorizedN<float,2>::loadu(in_ptr3 + static_cast<int64_t>(x1), static_cast<int64_t>(32));
                                auto tmp4 = at::vec::VectorizedN<float,2>::loadu(in_ptr4 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(32));
                                auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                                auto tmp3 = tmp1 * tmp2;
                                auto tmp5 = tmp3 * tmp4;
                                tmp_acc0_vec = tmp_acc0_vec + tmp3;
                                tmp_acc1_vec = tmp_acc1_vec + tmp5;
                            }
                        }
                    }
                    tmp_acc0 = tmp_acc0 + at::vec::vec_reduce_all<float, 2>([](at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y) { return x + y; }, tmp_acc0_vec);
                    out_ptr3[static_cast<int64_t>(x0)] = static_cast<float>(tmp_acc0);
                    tmp_acc1 = tmp_acc1 + at::vec::vec_reduce_all<float, 2>([](at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y) { return x + y; }, tmp_acc1_vec);
                    out_ptr4[static_cast<int64_t>(x0)] = static_cast<float>(tmp_acc1);
                }
                for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(64L); x1+=static_cast<int64_t>(32L))
                {
                    {
                        if(C10_LIKELY(x1 >= static_cast<int64_t>(0) && x1 < static_cast<int64_t>(64L)))
                        {
                            auto tmp0 = at::vec::VectorizedN<float,2>::loadu(in_out_ptr0 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(32));
                            auto tmp1 = in_ptr5[static_cast<int64_t>(x0)];
                            auto tmp2 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr2 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(32));
                            auto tmp4 = at::vec::VectorizedN<float,2>::loadu(in_ptr3 + static_cast<int64_t>(x1), static_cast<int64_t>(32));
                            auto tmp9 = out_ptr3[static_cast<int64_t>(x0)];
                            auto tmp12 = at::vec::VectorizedN<float,2>::loadu(in_ptr4 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(32));
                            auto tmp13 = out_ptr4[static_cast<int64_t>(x0)];
                            auto tmp3 = at::vec::convert<float,2,at::BFloat16,1>(tmp2);
                            auto tmp5 = tmp3 * tmp4;
                            auto tmp6 = static_cast<float>(64.0);
                            auto tmp7 = at::vec::VectorizedN<float,2>(tmp6);
                            auto tmp8 = tmp5 * tmp7;
                            auto tmp10 = at::vec::VectorizedN<float,2>(tmp9);
                            auto tmp11 = tmp8 - tmp10;
                            auto tmp14 = at::vec::VectorizedN<float,2>(tmp13);
                            auto tmp15 = tmp12 * tmp14;
                            auto tmp16 = tmp11 - tmp15;
                            auto tmp17 = at::vec::VectorizedN<float,2>(tmp1);
                            auto tmp18 = tmp17 * tmp16;
                            auto tmp19 = tmp0 + tmp18;
                            tmp19.store(in_out_ptr0 + static_cast<int64_t>(x1 + 64L*x0));
                        }
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(64L); x0+=static_cast<int64_t>(32L))
            {
                {
                    float tmp_acc0 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc0_vec = at::vec::VectorizedN<float,2>(0);
                    float tmp_acc1 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc1_vec = at::vec::VectorizedN<float,2>(0);
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(40L); x1+=static_cast<int64_t>(1L))
                    {
                        {
                            if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                            {
                                auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr2 + static_cast<int64_t>(x0 + 64L*x1), static_cast<int64_t>(32));
                                auto tmp2 = at::vec::VectorizedN<float,2>::loadu(in_ptr4 + static_cast<int64_t>(x0 + 64L*x1), static_cast<int64_t>(32));
                                auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                                auto tmp3 = tmp1 * tmp2;
                                tmp_acc0_vec = tmp_acc0_vec + tmp3;
                                tmp_acc1_vec = tmp_acc1_vec + tmp1;
                            }
                        }
                    }
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                    {
                        tmp_acc0_vec.store(out_ptr5 + static_cast<int64_t>(x0));
                        tmp_acc1_vec.store(out_ptr6 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(2560L); x0+=static_cast<int64_t>(32L))
            {
                {
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(2560L)))
                    {
                        auto tmp0 = at::vec::VectorizedN<float,2>::loadu(in_out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp1 = at::vec::convert<at::BFloat16,1,float,2>(tmp0);
                        tmp1.store(out_ptr7 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                    }
                }
            }
        }
    }
    inductor_cpu_integer_div_error_flag = nullptr;
    inductor_cpu_throw_if_integer_div_error(inductor_cpu_integer_div_error);
}
''')


cpp_fused__to_copy_add_convolution_backward_native_layer_norm_native_layer_norm_backward_slice_sum_transpose_view_6 = async_compile.cpp_pybinding(['float*', 'const at::BFloat16*', 'const at::BFloat16*', 'const float*', 'const float*', 'const float*', 'const float*', 'const float*', 'const float*', 'const float*', 'const float*', 'const at::BFloat16*', 'const float*', 'at::BFloat16*', 'float*', 'float*', 'float*', 'float*', 'float*', 'float*', 'float*', 'float*', 'float*', 'float*', 'float*', 'float*', 'float*', 'float*', 'at::BFloat16*'], r'''
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(float* in_out_ptr0,
                       const at::BFloat16* in_ptr0,
                       const at::BFloat16* in_ptr1,
                       const float* in_ptr2,
                       const float* in_ptr3,
                       const float* in_ptr4,
                       const float* in_ptr5,
                       const float* in_ptr6,
                       const float* in_ptr7,
                       const float* in_ptr8,
                       const float* in_ptr9,
                       const at::BFloat16* in_ptr10,
                       const float* in_ptr11,
                       at::BFloat16* out_ptr0,
                       float* out_ptr1,
                       float* out_ptr2,
                       float* out_ptr3,
                       float* out_ptr4,
                       float* out_ptr5,
                       float* out_ptr6,
                       float* out_ptr7,
                       float* out_ptr8,
                       float* out_ptr9,
                       float* out_ptr10,
                       float* out_ptr11,
                       float* out_ptr12,
                       float* out_ptr13,
                       float* out_ptr14,
                       at::BFloat16* out_ptr15)
{
    std::atomic<int> inductor_cpu_integer_div_error{0};
    inductor_cpu_integer_div_error_flag = &inductor_cpu_integer_div_error;
    #pragma omp parallel
    {
        int tid = omp_get_thread_num();
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(192L); x0+=static_cast<int64_t>(32L))
            {
                {
                    float tmp_acc0 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc0_vec = at::vec::VectorizedN<float,2>(0);
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(40L); x1+=static_cast<int64_t>(1L))
                    {
                        {
                            if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(192L)))
                            {
                                auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr0 + static_cast<int64_t>(x0 + 192L*x1), static_cast<int64_t>(32));
                                auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                                tmp_acc0_vec = tmp_acc0_vec + tmp1;
                            }
                        }
                    }
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(192L)))
                    {
                        auto at_BFloat16_tmp_acc0_vec = at::vec::convert<at::BFloat16,1,float,2>(tmp_acc0_vec);
                        at_BFloat16_tmp_acc0_vec.store(out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                    }
                }
                {
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(192L)))
                    {
                        auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(out_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                        tmp1.store(out_ptr1 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(12288L); x0+=static_cast<int64_t>(32L))
            {
                {
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(12288L)))
                    {
                        auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr1 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                        tmp1.store(out_ptr2 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(8L); x0+=static_cast<int64_t>(1L))
            {
                #pragma GCC ivdep
                for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(5L); x1+=static_cast<int64_t>(1L))
                {
                    for(int64_t x2=static_cast<int64_t>(0L); x2<static_cast<int64_t>(64L); x2+=static_cast<int64_t>(16L))
                    {
                        {
                            if(C10_LIKELY(x2 >= static_cast<int64_t>(0) && x2 < static_cast<int64_t>(64L)))
                            {
                                auto tmp0 = at::vec::Vectorized<float>::loadu(in_ptr2 + static_cast<int64_t>(x2 + 64L*x1 + 320L*x0), static_cast<int64_t>(16));
                                auto tmp1 = at::vec::Vectorized<float>::loadu(in_ptr3 + static_cast<int64_t>(x2 + 64L*x1), static_cast<int64_t>(16));
                                auto tmp3 = in_ptr4[static_cast<int64_t>(x1 + 5L*x0)];
                                auto tmp6 = in_ptr5[static_cast<int64_t>(x1 + 5L*x0)];
                                auto tmp9 = at::vec::Vectorized<float>::loadu(in_ptr6 + static_cast<int64_t>(x2), static_cast<int64_t>(16));
                                auto tmp11 = at::vec::Vectorized<float>::loadu(in_ptr7 + static_cast<int64_t>(x2), static_cast<int64_t>(16));
                                auto tmp13 = in_ptr8[static_cast<int64_t>(x1 + 5L*x0)];
                                auto tmp16 = in_ptr9[static_cast<int64_t>(x1 + 5L*x0)];
                                auto tmp2 = tmp0 + tmp1;
                                auto tmp4 = at::vec::Vectorized<float>(tmp3);
                                auto tmp5 = tmp2 - tmp4;
                                auto tmp7 = at::vec::Vectorized<float>(tmp6);
                                auto tmp8 = tmp5 * tmp7;
                                auto tmp10 = tmp8 * tmp9;
                                auto tmp12 = tmp10 + tmp11;
                                auto tmp14 = at::vec::Vectorized<float>(tmp13);
                                auto tmp15 = tmp12 - tmp14;
                                auto tmp17 = at::vec::Vectorized<float>(tmp16);
                                auto tmp18 = tmp15 * tmp17;
                                tmp18.store(out_ptr3 + static_cast<int64_t>(x2 + 64L*x1 + 320L*x0));
                            }
                        }
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(40L); x0+=static_cast<int64_t>(1L))
            {
                {
                    float tmp_acc0 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc0_vec = at::vec::VectorizedN<float,2>(0);
                    float tmp_acc1 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc1_vec = at::vec::VectorizedN<float,2>(0);
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(64L); x1+=static_cast<int64_t>(32L))
                    {
                        {
                            if(C10_LIKELY(x1 >= static_cast<int64_t>(0) && x1 < static_cast<int64_t>(64L)))
                            {
                                auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr10 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(32));
                                auto tmp2 = at::vec::VectorizedN<float,2>::loadu(in_ptr11 + static_cast<int64_t>(x1), static_cast<int64_t>(32));
                                auto tmp4 = at::vec::VectorizedN<float,2>::loadu(out_ptr3 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(32));
                                auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                                auto tmp3 = tmp1 * tmp2;
                                auto tmp5 = tmp3 * tmp4;
                                tmp_acc0_vec = tmp_acc0_vec + tmp3;
                                tmp_acc1_vec = tmp_acc1_vec + tmp5;
                            }
                        }
                    }
                    tmp_acc0 = tmp_acc0 + at::vec::vec_reduce_all<float, 2>([](at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y) { return x + y; }, tmp_acc0_vec);
                    out_ptr4[static_cast<int64_t>(x0)] = static_cast<float>(tmp_acc0);
                    tmp_acc1 = tmp_acc1 + at::vec::vec_reduce_all<float, 2>([](at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y) { return x + y; }, tmp_acc1_vec);
                    out_ptr5[static_cast<int64_t>(x0)] = static_cast<float>(tmp_acc1);
                }
                {
                    float tmp_acc0 = 0;
                    at::vec::Vectorized<float> tmp_acc0_vec = at::vec::Vectorized<float>(0);
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(64L); x1+=static_cast<int64_t>(16L))
                    {
                        {
                            if(C10_LIKELY(x1 >= static_cast<int64_t>(0) && x1 < static_cast<int64_t>(64L)))
                            {
                                auto tmp0 = at::vec::Vectorized<float>::loadu(in_out_ptr0 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(16));
                                auto tmp1 = in_ptr9[static_cast<int64_t>(x0)];
                                auto tmp4 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr10 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(16));
                                auto tmp6 = at::vec::Vectorized<float>::loadu(in_ptr11 + static_cast<int64_t>(x1), static_cast<int64_t>(16));
                                auto tmp10 = out_ptr4[static_cast<int64_t>(x0)];
                                auto tmp13 = at::vec::Vectorized<float>::loadu(out_ptr3 + static_cast<int64_t>(x1 + 64L*x0), static_cast<int64_t>(16));
                                auto tmp14 = out_ptr5[static_cast<int64_t>(x0)];
                                auto tmp21 = at::vec::Vectorized<float>::loadu(in_ptr6 + static_cast<int64_t>(x1), static_cast<int64_t>(16));
                                auto tmp2 = static_cast<float>(64.0);
                                auto tmp3 = tmp1 / tmp2;
                                auto tmp5 = at::vec::convert<float>(tmp4);
                                auto tmp7 = tmp5 * tmp6;
                                auto tmp8 = at::vec::Vectorized<float>(tmp2);
                                auto tmp9 = tmp7 * tmp8;
                                auto tmp11 = at::vec::Vectorized<float>(tmp10);
                                auto tmp12 = tmp9 - tmp11;
                                auto tmp15 = at::vec::Vectorized<float>(tmp14);
                                auto tmp16 = tmp13 * tmp15;
                                auto tmp17 = tmp12 - tmp16;
                                auto tmp18 = at::vec::Vectorized<float>(tmp3);
                                auto tmp19 = tmp18 * tmp17;
                                auto tmp20 = tmp0 + tmp19;
                                auto tmp22 = tmp20 * tmp21;
                                tmp20.store(in_out_ptr0 + static_cast<int64_t>(x1 + 64L*x0));
                                tmp_acc0_vec = tmp_acc0_vec + tmp22;
                            }
                        }
                    }
                    tmp_acc0 = tmp_acc0 + at::vec::vec_reduce_all<float, 1>([](at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y) { return x + y; }, tmp_acc0_vec);
                    out_ptr6[static_cast<int64_t>(x0)] = static_cast<float>(tmp_acc0);
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(64L); x0+=static_cast<int64_t>(32L))
            {
                {
                    float tmp_acc0 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc0_vec = at::vec::VectorizedN<float,2>(0);
                    float tmp_acc1 = 0;
                    at::vec::VectorizedN<float,2> tmp_acc1_vec = at::vec::VectorizedN<float,2>(0);
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(40L); x1+=static_cast<int64_t>(1L))
                    {
                        {
                            if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                            {
                                auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr10 + static_cast<int64_t>(x0 + 64L*x1), static_cast<int64_t>(32));
                                auto tmp2 = at::vec::VectorizedN<float,2>::loadu(out_ptr3 + static_cast<int64_t>(x0 + 64L*x1), static_cast<int64_t>(32));
                                auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                                auto tmp3 = tmp1 * tmp2;
                                tmp_acc0_vec = tmp_acc0_vec + tmp3;
                                tmp_acc1_vec = tmp_acc1_vec + tmp1;
                            }
                        }
                    }
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                    {
                        tmp_acc0_vec.store(out_ptr7 + static_cast<int64_t>(x0));
                        tmp_acc1_vec.store(out_ptr8 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(8L); x0+=static_cast<int64_t>(1L))
            {
                #pragma GCC ivdep
                for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(5L); x1+=static_cast<int64_t>(1L))
                {
                    {
                        float tmp_acc0 = 0;
                        at::vec::Vectorized<float> tmp_acc0_vec = at::vec::Vectorized<float>(0);
                        for(int64_t x2=static_cast<int64_t>(0L); x2<static_cast<int64_t>(64L); x2+=static_cast<int64_t>(16L))
                        {
                            {
                                if(C10_LIKELY(x2 >= static_cast<int64_t>(0) && x2 < static_cast<int64_t>(64L)))
                                {
                                    auto tmp0 = at::vec::Vectorized<float>::loadu(in_out_ptr0 + static_cast<int64_t>(x2 + 64L*x1 + 320L*x0), static_cast<int64_t>(16));
                                    auto tmp1 = at::vec::Vectorized<float>::loadu(in_ptr6 + static_cast<int64_t>(x2), static_cast<int64_t>(16));
                                    auto tmp3 = at::vec::Vectorized<float>::loadu(in_ptr2 + static_cast<int64_t>(x2 + 64L*x1 + 320L*x0), static_cast<int64_t>(16));
                                    auto tmp4 = at::vec::Vectorized<float>::loadu(in_ptr3 + static_cast<int64_t>(x2 + 64L*x1), static_cast<int64_t>(16));
                                    auto tmp6 = in_ptr4[static_cast<int64_t>(x1 + 5L*x0)];
                                    auto tmp9 = in_ptr5[static_cast<int64_t>(x1 + 5L*x0)];
                                    auto tmp2 = tmp0 * tmp1;
                                    auto tmp5 = tmp3 + tmp4;
                                    auto tmp7 = at::vec::Vectorized<float>(tmp6);
                                    auto tmp8 = tmp5 - tmp7;
                                    auto tmp10 = at::vec::Vectorized<float>(tmp9);
                                    auto tmp11 = tmp8 * tmp10;
                                    auto tmp12 = tmp2 * tmp11;
                                    tmp_acc0_vec = tmp_acc0_vec + tmp12;
                                }
                            }
                        }
                        tmp_acc0 = tmp_acc0 + at::vec::vec_reduce_all<float, 1>([](at::vec::Vectorized<float>& x, at::vec::Vectorized<float>& y) { return x + y; }, tmp_acc0_vec);
                        out_ptr9[static_cast<int64_t>(x1 + 5L*x0)] = static_cast<float>(tmp_acc0);
                    }
                    for(int64_t x2=static_cast<int64_t>(0L); x2<static_cast<int64_t>(64L); x2+=static_cast<int64_t>(16L))
                    {
                        {
                            if(C10_LIKELY(x2 >= static_cast<int64_t>(0) && x2 < static_cast<int64_t>(64L)))
                            {
                                auto tmp0 = in_ptr5[static_cast<int64_t>(x1 + 5L*x0)];
                                auto tmp3 = at::vec::Vectorized<float>::loadu(in_out_ptr0 + static_cast<int64_t>(x2 + 64L*x1 + 320L*x0), static_cast<int64_t>(16));
                                auto tmp4 = at::vec::Vectorized<float>::loadu(in_ptr6 + static_cast<int64_t>(x2), static_cast<int64_t>(16));
                                auto tmp8 = out_ptr6[static_cast<int64_t>(x1 + 5L*x0)];
                                auto tmp11 = at::vec::Vectorized<float>::loadu(in_ptr2 + static_cast<int64_t>(x2 + 64L*x1 + 320L*x0), static_cast<int64_t>(16));
                                auto tmp12 = at::vec::Vectorized<float>::loadu(in_ptr3 + static_cast<int64_t>(x2 + 64L*x1), static_cast<int64_t>(16));
                                auto tmp14 = in_ptr4[static_cast<int64_t>(x1 + 5L*x0)];
                                auto tmp19 = out_ptr9[static_cast<int64_t>(x1 + 5L*x0)];
                                auto tmp1 = static_cast<float>(64.0);
                                auto tmp2 = tmp0 / tmp1;
                                auto tmp5 = tmp3 * tmp4;
                                auto tmp6 = at::vec::Vectorized<float>(tmp1);
                                auto tmp7 = tmp5 * tmp6;
                                auto tmp9 = at::vec::Vectorized<float>(tmp8);
                                auto tmp10 = tmp7 - tmp9;
                                auto tmp13 = tmp11 + tmp12;
                                auto tmp15 = at::vec::Vectorized<float>(tmp14);
                                auto tmp16 = tmp13 - tmp15;
                                auto tmp17 = at::vec::Vectorized<float>(tmp0);
                                auto tmp18 = tmp16 * tmp17;
                                auto tmp20 = at::vec::Vectorized<float>(tmp19);
                                auto tmp21 = tmp18 * tmp20;
                                auto tmp22 = tmp10 - tmp21;
                                auto tmp23 = at::vec::Vectorized<float>(tmp2);
                                auto tmp24 = tmp23 * tmp22;
                                tmp24.store(out_ptr10 + static_cast<int64_t>(x2 + 64L*x1 + 320L*x0));
                            }
                        }
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(64L); x0+=static_cast<int64_t>(16L))
            {
                {
                    float tmp_acc0 = 0;
                    at::vec::Vectorized<float> tmp_acc0_vec = at::vec::Vectorized<float>(0);
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(8L); x1+=static_cast<int64_t>(1L))
                    {
                        for(int64_t x2=static_cast<int64_t>(0L); x2<static_cast<int64_t>(5L); x2+=static_cast<int64_t>(1L))
                        {
                            {
                                if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                                {
                                    auto tmp0 = at::vec::Vectorized<float>::loadu(in_out_ptr0 + static_cast<int64_t>(x0 + 64L*x2 + 320L*x1), static_cast<int64_t>(16));
                                    auto tmp1 = at::vec::Vectorized<float>::loadu(in_ptr2 + static_cast<int64_t>(x0 + 64L*x2 + 320L*x1), static_cast<int64_t>(16));
                                    auto tmp2 = at::vec::Vectorized<float>::loadu(in_ptr3 + static_cast<int64_t>(x0 + 64L*x2), static_cast<int64_t>(16));
                                    auto tmp4 = in_ptr4[static_cast<int64_t>(x2 + 5L*x1)];
                                    auto tmp7 = in_ptr5[static_cast<int64_t>(x2 + 5L*x1)];
                                    auto tmp3 = tmp1 + tmp2;
                                    auto tmp5 = at::vec::Vectorized<float>(tmp4);
                                    auto tmp6 = tmp3 - tmp5;
                                    auto tmp8 = at::vec::Vectorized<float>(tmp7);
                                    auto tmp9 = tmp6 * tmp8;
                                    auto tmp10 = tmp0 * tmp9;
                                    tmp_acc0_vec = tmp_acc0_vec + tmp10;
                                }
                            }
                        }
                    }
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                    {
                        tmp_acc0_vec.store(out_ptr11 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(64L); x0+=static_cast<int64_t>(16L))
            {
                {
                    float tmp_acc0 = 0;
                    at::vec::Vectorized<float> tmp_acc0_vec = at::vec::Vectorized<float>(0);
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(40L); x1+=static_cast<int64_t>(1L))
                    {
                        {
                            if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                            {
                                auto tmp0 = at::vec::Vectorized<float>::loadu(in_out_ptr0 + static_cast<int64_t>(x0 + 64L*x1), static_cast<int64_t>(16));
                                tmp_acc0_vec = tmp_acc0_vec + tmp0;
                            }
                        }
                    }
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                    {
                        tmp_acc0_vec.store(out_ptr12 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(320L); x0+=static_cast<int64_t>(16L))
            {
                {
                    float tmp_acc0 = 0;
                    at::vec::Vectorized<float> tmp_acc0_vec = at::vec::Vectorized<float>(0);
                    for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(8L); x1+=static_cast<int64_t>(1L))
                    {
                        {
                            if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(320L)))
                            {
                                auto tmp0 = at::vec::Vectorized<float>::loadu(out_ptr10 + static_cast<int64_t>(x0 + 320L*x1), static_cast<int64_t>(16));
                                tmp_acc0_vec = tmp_acc0_vec + tmp0;
                            }
                        }
                    }
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(320L)))
                    {
                        tmp_acc0_vec.store(out_ptr13 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
        #pragma omp single
        {
            {
                for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(64L); x0+=static_cast<int64_t>(16L))
                {
                    {
                        float tmp_acc0 = 0;
                        at::vec::Vectorized<float> tmp_acc0_vec = at::vec::Vectorized<float>(0);
                        for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(8L); x1+=static_cast<int64_t>(1L))
                        {
                            {
                                if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                                {
                                    auto tmp0 = at::vec::Vectorized<float>::loadu(out_ptr10 + static_cast<int64_t>(x0 + 320L*x1), static_cast<int64_t>(16));
                                    tmp_acc0_vec = tmp_acc0_vec + tmp0;
                                }
                            }
                        }
                        if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(64L)))
                        {
                            tmp_acc0_vec.store(out_ptr14 + static_cast<int64_t>(x0));
                        }
                    }
                }
            }
        }
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(8L); x0+=static_cast<int64_t>(1L))
            {
                for(int64_t x1=static_cast<int64_t>(0L); x1<static_cast<int64_t>(256L); x1+=static_cast<int64_t>(32L))
                {
                    {
                        if(C10_LIKELY(x1 >= static_cast<int64_t>(0) && x1 < static_cast<int64_t>(256L)))
                        {
                            auto tmp0 = at::vec::VectorizedN<float,2>::loadu(out_ptr10 + static_cast<int64_t>(64L + x1 + 320L*x0), static_cast<int64_t>(32));
                            auto tmp1 = at::vec::convert<at::BFloat16,1,float,2>(tmp0);
                            tmp1.store(out_ptr15 + static_cast<int64_t>(x1 + 256L*x0), static_cast<int64_t>(32));
                        }
                    }
                }
            }
        }
    }
    inductor_cpu_integer_div_error_flag = nullptr;
    inductor_cpu_throw_if_integer_div_error(inductor_cpu_integer_div_error);
}
''')


cpp_fused__to_copy_7 = async_compile.cpp_pybinding(['const at::BFloat16*', 'float*'], r'''
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(const at::BFloat16* in_ptr0,
                       float* out_ptr0)
{
    std::atomic<int> inductor_cpu_integer_div_error{0};
    inductor_cpu_integer_div_error_flag = &inductor_cpu_integer_div_error;
    #pragma omp parallel
    {
        int tid = omp_get_thread_num();
        {
            #pragma omp for
            for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(49152L); x0+=static_cast<int64_t>(32L))
            {
                {
                    if(C10_LIKELY(x0 >= static_cast<int64_t>(0) && x0 < static_cast<int64_t>(49152L)))
                    {
                        auto tmp0 = at::vec::Vectorized<at::BFloat16>::loadu(in_ptr0 + static_cast<int64_t>(x0), static_cast<int64_t>(32));
                        auto tmp1 = at::vec::convert<float,2,at::BFloat16,1>(tmp0);
                        tmp1.store(out_ptr0 + static_cast<int64_t>(x0));
                    }
                }
            }
        }
    }
    inductor_cpu_integer_div_error_flag = nullptr;
    inductor_cpu_throw_if_integer_div_error(inductor_cpu_integer_div_error);
}
''')


async_compile.wait(globals())
del async_compile

class Runner:
    def __init__(self, partitions):
        self.partitions = partitions

    def recursively_apply_fns(self, fns):
        new_callables = []
        for fn, c in zip(fns, self.partitions):
            new_callables.append(fn(c))
        self.partitions = new_callables

    def call(self, args):
        primals_4, primals_5, primals_6, primals_7, primals_13, primals_19, primals_25, primals_31, convert_element_type, convert_element_type_1, cat, getitem_1, rsqrt, getitem_3, rsqrt_1, view_1, getitem_4, getitem_5, getitem_6, getitem_7, getitem_8, mul_4, view_7, addmm_2, view_9, mul_9, view_11, getitem_13, getitem_14, getitem_15, getitem_16, getitem_17, mul_11, view_17, addmm_6, view_19, mul_16, convert_element_type_52, permute_16, div, permute_18, permute_22, div_1, permute_26, permute_32, div_2, permute_36, permute_40, div_3, permute_44, permute_50, tangents_1 = args
        args.clear()
        assert_size_stride_grouped((tangents_1, convert_element_type_52), ((8, 768), (8, 64)), ((768, 1), (64, 1)), 'input')
        buf0 = empty_strided_cpu((768, 64), (64, 1), torch.bfloat16)
        # Topologically Sorted Source Nodes: [permute_14, mm_1], Original ATen: [aten.t, aten.mm]
        extern_kernels.mm(reinterpret_tensor(tangents_1, (768, 8), (1, 768), 0), convert_element_type_52, out=buf0)
        del convert_element_type_52
        assert_size_stride(permute_16, (768, 64), (64, 1), 'input')
        buf1 = empty_strided_cpu((8, 64), (64, 1), torch.bfloat16)
        # Topologically Sorted Source Nodes: [mm_2], Original ATen: [aten.mm]
        extern_kernels.mm(tangents_1, permute_16, out=buf1)
        del permute_16
        del tangents_1
        buf2 = empty_strided_cpu((768, 64), (64, 1), torch.float32)
        assert_size_stride_grouped((primals_31, mul_16, div), ((64, ), (8, 5, 64), (8, 5, 1)), ((1, ), (320, 64, 1), (5, 1, 1)), 'input')
        buf3 = empty_strided_cpu((8, 5, 1), (5, 1, 40), torch.float32)
        buf4 = empty_strided_cpu((8, 5, 1), (5, 1, 40), torch.float32)
        buf5 = empty_strided_cpu((8, 5, 64), (320, 64, 1), torch.float32)
        buf6 = empty_strided_cpu((64, ), (1, ), torch.float32)
        buf7 = empty_strided_cpu((64, ), (1, ), torch.float32)
        buf8 = empty_strided_cpu((40, 64), (64, 1), torch.bfloat16)
        assert_size_stride(permute_18, (64, 256), (256, 1), 'input')
        cpp_fused__to_copy_native_layer_norm_backward_select_backward_view_0(buf0, buf1, primals_31, mul_16, div, buf2, buf3, buf4, buf5, buf6, buf7, buf8)
        del buf0
        del buf1
        del div
        del mul_16
        del primals_31
        buf9 = empty_strided_cpu((40, 256), (256, 1), torch.bfloat16)
        # Topologically Sorted Source Nodes: [mm_3], Original ATen: [aten.mm]
        extern_kernels.mm(buf8, permute_18, out=buf9)
        del permute_18
        assert_size_stride(view_19, (40, 256), (256, 1), 'input')
        buf10 = empty_strided_cpu((64, 256), (256, 1), torch.bfloat16)
        # Topologically Sorted Source Nodes: [permute_19, mm_4], Original ATen: [aten.t, aten.mm]
        extern_kernels.mm(reinterpret_tensor(buf8, (64, 40), (1, 64), 0), view_19, out=buf10)
        del view_19
        buf11 = empty_strided_cpu((1, 64), (64, 1), torch.bfloat16)
        buf13 = empty_strided_cpu((64, ), (1, ), torch.float32)
        buf12 = empty_strided_cpu((64, 256), (256, 1), torch.float32)
        assert_size_stride(addmm_6, (40, 256), (256, 1), 'input')
        buf14 = reinterpret_tensor(buf9, (8, 5, 256), (1280, 256, 1), 0); del buf9  # reuse
        assert_size_stride(permute_22, (256, 64), (64, 1), 'input')
        cpp_fused__to_copy_gelu_gelu_backward_sum_view_1(buf14, buf8, buf10, addmm_6, buf11, buf13, buf12)
        del addmm_6
        buf15 = buf8; del buf8  # reuse
        # Topologically Sorted Source Nodes: [view_23, convert_element_type_68, x_22, x_23, mul_26, mul_27, mul_28, exp, mul_29, mul_30, add_20, mul_31, convert_element_type_70, view_24, mm_5], Original ATen: [aten.view, aten.gelu_backward, aten.gelu, aten.mm]
        extern_kernels.mm(reinterpret_tensor(buf14, (40, 256), (256, 1), 0), permute_22, out=buf15)
        del permute_22
        assert_size_stride(view_17, (40, 64), (64, 1), 'input')
        buf16 = reinterpret_tensor(buf10, (256, 64), (64, 1), 0); del buf10  # reuse
        # Topologically Sorted Source Nodes: [view_23, convert_element_type_68, x_22, x_23, mul_26, mul_27, mul_28, exp, mul_29, mul_30, add_20, mul_31, convert_element_type_70, view_24, permute_23, mm_6], Original ATen: [aten.view, aten.gelu_backward, aten.gelu, aten.t, aten.mm]
        extern_kernels.mm(reinterpret_tensor(buf14, (256, 40), (1, 256), 0), view_17, out=buf16)
        del view_17
        buf17 = empty_strided_cpu((1, 256), (256, 1), torch.bfloat16)
        buf19 = empty_strided_cpu((256, ), (1, ), torch.float32)
        buf18 = empty_strided_cpu((256, 64), (64, 1), torch.float32)
        assert_size_stride_grouped((primals_25, mul_11, div_1), ((64, ), (8, 5, 64), (8, 5, 1)), ((1, ), (320, 64, 1), (5, 1, 1)), 'input')
        buf20 = buf4; del buf4  # reuse
        buf21 = buf3; del buf3  # reuse
        buf24 = buf5; del buf5  # reuse
        buf22 = empty_strided_cpu((64, ), (1, ), torch.float32)
        buf23 = empty_strided_cpu((64, ), (1, ), torch.float32)
        buf25 = empty_strided_cpu((40, 64), (64, 1), torch.bfloat16)
        assert_size_stride(permute_26, (64, 64), (64, 1), 'input')
        cpp_fused__to_copy_add_gelu_gelu_backward_native_layer_norm_backward_sum_view_2(buf24, buf14, buf16, buf15, primals_25, mul_11, div_1, buf17, buf19, buf18, buf20, buf21, buf22, buf23, buf25)
        del div_1
        del mul_11
        del primals_25
        buf26 = buf15; del buf15  # reuse
        # Topologically Sorted Source Nodes: [mm_7], Original ATen: [aten.mm]
        extern_kernels.mm(buf25, permute_26, out=buf26)
        del permute_26
        assert_size_stride(getitem_16, (8, 2, 5, 32), (320, 32, 64, 1), 'input')
        buf27 = empty_strided_cpu((64, 64), (64, 1), torch.bfloat16)
        # Topologically Sorted Source Nodes: [permute_27, transpose_2, x_18, x_19, mm_8], Original ATen: [aten.t, aten.transpose, aten.view, aten.mm]
        extern_kernels.mm(reinterpret_tensor(buf25, (64, 40), (1, 64), 0), reinterpret_tensor(getitem_16, (40, 64), (64, 1), 0), out=buf27)
        buf28 = buf11; del buf11  # reuse
        buf30 = empty_strided_cpu((64, ), (1, ), torch.float32)
        buf29 = empty_strided_cpu((64, 64), (64, 1), torch.float32)
        assert_size_stride(getitem_17, (8, 2, 5), (10, 1, 2), 'input')
        buf31 = empty_strided_cpu((8, 2, 5), (10, 5, 1), torch.float32)
        assert_size_stride_grouped((getitem_13, getitem_14, getitem_15), ((8, 2, 5, 32), (8, 2, 5, 32), (8, 2, 5, 32)), ((960, 32, 192, 1), (960, 32, 192, 1), (960, 32, 192, 1)), 'input')
        cpp_fused__scaled_dot_product_flash_attention_for_cpu_backward__to_copy_sum_transpose_view_3(buf25, buf27, getitem_17, buf28, buf30, buf29, buf31)
        del getitem_17
        # Topologically Sorted Source Nodes: [view_29, view_30, permute_30, _scaled_dot_product_flash_attention_for_cpu_backward], Original ATen: [aten.view, aten.transpose, aten._scaled_dot_product_flash_attention_for_cpu_backward]
        buf32 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(reinterpret_tensor(buf26, (8, 2, 5, 32), (320, 32, 64, 1), 0), getitem_13, getitem_14, getitem_15, getitem_16, buf31, 0.0, False)
        del getitem_13
        del getitem_14
        del getitem_15
        del getitem_16
        buf33 = buf32[0]
        assert_tensor_metadata(buf33, (8, 2, 5, 32), (320, 32, 64, 1), torch.bfloat16, 'torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default')
        # buffer buf33 (op: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default) is assumed to be not aligned
        buf34 = buf32[1]
        assert_tensor_metadata(buf34, (8, 2, 5, 32), (320, 32, 64, 1), torch.bfloat16, 'torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default')
        # buffer buf34 (op: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default) is assumed to be not aligned
        buf35 = buf32[2]
        assert_tensor_metadata(buf35, (8, 2, 5, 32), (320, 32, 64, 1), torch.bfloat16, 'torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default')
        # buffer buf35 (op: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default) is assumed to be not aligned
        del buf32
        buf39 = empty_strided_cpu((24, 2, 5, 32), (320, 160, 32, 1), torch.bfloat16)
        buf36 = reinterpret_tensor(buf39, (8, 2, 5, 32), (320, 160, 32, 1), 0)  # alias
        buf37 = reinterpret_tensor(buf39, (8, 2, 5, 32), (320, 160, 32, 1), 2560)  # alias
        buf38 = reinterpret_tensor(buf39, (8, 2, 5, 32), (320, 160, 32, 1), 5120)  # alias
        buf40 = empty_strided_cpu((40, 192), (192, 1), torch.bfloat16)
        assert_size_stride(permute_32, (192, 64), (64, 1), 'input')
        cpp_fused__unsafe_view_clone_permute_stack_view_4(buf33, buf34, buf35, buf39, buf36, buf37, buf38, buf40)
        del buf33
        del buf34
        del buf35
        del buf36
        del buf37
        del buf38
        buf41 = buf26; del buf26  # reuse
        # Topologically Sorted Source Nodes: [mm_9], Original ATen: [aten.mm]
        extern_kernels.mm(buf40, permute_32, out=buf41)
        del permute_32
        assert_size_stride(view_11, (40, 64), (64, 1), 'input')
        buf42 = empty_strided_cpu((192, 64), (64, 1), torch.bfloat16)
        # Topologically Sorted Source Nodes: [permute_33, mm_10], Original ATen: [aten.t, aten.mm]
        extern_kernels.mm(reinterpret_tensor(buf40, (192, 40), (1, 192), 0), view_11, out=buf42)
        del view_11
        buf43 = empty_strided_cpu((1, 192), (192, 1), torch.bfloat16)
        buf45 = empty_strided_cpu((192, ), (1, ), torch.float32)
        buf44 = empty_strided_cpu((192, 64), (64, 1), torch.float32)
        assert_size_stride_grouped((primals_19, mul_9, div_2), ((64, ), (8, 5, 64), (8, 5, 1)), ((1, ), (320, 64, 1), (5, 1, 1)), 'input')
        buf46 = buf21; del buf21  # reuse
        buf47 = buf20; del buf20  # reuse
        buf50 = buf24; del buf24  # reuse
        buf48 = empty_strided_cpu((64, ), (1, ), torch.float32)
        buf49 = empty_strided_cpu((64, ), (1, ), torch.float32)
        buf51 = buf25; del buf25  # reuse
        assert_size_stride(permute_36, (64, 256), (256, 1), 'input')
        cpp_fused__to_copy_add_native_layer_norm_backward_sum_view_5(buf50, buf40, buf42, buf41, primals_19, mul_9, div_2, buf43, buf45, buf44, buf46, buf47, buf48, buf49, buf51)
        del div_2
        del mul_9
        del primals_19
        buf52 = reinterpret_tensor(buf14, (40, 256), (256, 1), 0); del buf14  # reuse
        # Topologically Sorted Source Nodes: [mm_11], Original ATen: [aten.mm]
        extern_kernels.mm(buf51, permute_36, out=buf52)
        del permute_36
        assert_size_stride(view_9, (40, 256), (256, 1), 'input')
        buf53 = reinterpret_tensor(buf16, (64, 256), (256, 1), 0); del buf16  # reuse
        # Topologically Sorted Source Nodes: [permute_37, mm_12], Original ATen: [aten.t, aten.mm]
        extern_kernels.mm(reinterpret_tensor(buf51, (64, 40), (1, 64), 0), view_9, out=buf53)
        del view_9
        buf54 = buf28; del buf28  # reuse
        buf56 = empty_strided_cpu((64, ), (1, ), torch.float32)
        buf55 = empty_strided_cpu((64, 256), (256, 1), torch.float32)
        assert_size_stride(addmm_2, (40, 256), (256, 1), 'input')
        buf57 = reinterpret_tensor(buf52, (8, 5, 256), (1280, 256, 1), 0); del buf52  # reuse
        assert_size_stride(permute_40, (256, 64), (64, 1), 'input')
        cpp_fused__to_copy_gelu_gelu_backward_sum_view_1(buf57, buf51, buf53, addmm_2, buf54, buf56, buf55)
        del addmm_2
        buf58 = buf51; del buf51  # reuse
        # Topologically Sorted Source Nodes: [view_38, convert_element_type_99, x_11, x_12, mul_47, mul_48, mul_49, exp_1, mul_50, mul_51, add_24, mul_52, convert_element_type_101, view_39, mm_13], Original ATen: [aten.view, aten.gelu_backward, aten.gelu, aten.mm]
        extern_kernels.mm(reinterpret_tensor(buf57, (40, 256), (256, 1), 0), permute_40, out=buf58)
        del permute_40
        assert_size_stride(view_7, (40, 64), (64, 1), 'input')
        buf59 = reinterpret_tensor(buf53, (256, 64), (64, 1), 0); del buf53  # reuse
        # Topologically Sorted Source Nodes: [view_38, convert_element_type_99, x_11, x_12, mul_47, mul_48, mul_49, exp_1, mul_50, mul_51, add_24, mul_52, convert_element_type_101, view_39, permute_41, mm_14], Original ATen: [aten.view, aten.gelu_backward, aten.gelu, aten.t, aten.mm]
        extern_kernels.mm(reinterpret_tensor(buf57, (256, 40), (1, 256), 0), view_7, out=buf59)
        del view_7
        buf60 = buf17; del buf17  # reuse
        buf62 = empty_strided_cpu((256, ), (1, ), torch.float32)
        buf61 = empty_strided_cpu((256, 64), (64, 1), torch.float32)
        assert_size_stride_grouped((primals_13, mul_4, div_3), ((64, ), (8, 5, 64), (8, 5, 1)), ((1, ), (320, 64, 1), (5, 1, 1)), 'input')
        buf63 = buf47; del buf47  # reuse
        buf64 = buf46; del buf46  # reuse
        buf67 = buf50; del buf50  # reuse
        buf65 = empty_strided_cpu((64, ), (1, ), torch.float32)
        buf66 = empty_strided_cpu((64, ), (1, ), torch.float32)
        buf68 = buf41; del buf41  # reuse
        assert_size_stride(permute_44, (64, 64), (64, 1), 'input')
        cpp_fused__to_copy_add_gelu_gelu_backward_native_layer_norm_backward_sum_view_2(buf67, buf57, buf59, buf58, primals_13, mul_4, div_3, buf60, buf62, buf61, buf63, buf64, buf65, buf66, buf68)
        del buf57
        del buf59
        del buf60
        del div_3
        del mul_4
        del primals_13
        buf69 = buf58; del buf58  # reuse
        # Topologically Sorted Source Nodes: [mm_15], Original ATen: [aten.mm]
        extern_kernels.mm(buf68, permute_44, out=buf69)
        del permute_44
        assert_size_stride(getitem_7, (8, 2, 5, 32), (320, 32, 64, 1), 'input')
        buf70 = buf27; del buf27  # reuse
        # Topologically Sorted Source Nodes: [permute_45, transpose_1, x_7, x_8, mm_16], Original ATen: [aten.t, aten.transpose, aten.view, aten.mm]
        extern_kernels.mm(reinterpret_tensor(buf68, (64, 40), (1, 64), 0), reinterpret_tensor(getitem_7, (40, 64), (64, 1), 0), out=buf70)
        buf71 = buf54; del buf54  # reuse
        buf73 = empty_strided_cpu((64, ), (1, ), torch.float32)
        buf72 = empty_strided_cpu((64, 64), (64, 1), torch.float32)
        assert_size_stride(getitem_8, (8, 2, 5), (10, 1, 2), 'input')
        buf74 = buf31; del buf31  # reuse
        assert_size_stride_grouped((getitem_4, getitem_5, getitem_6), ((8, 2, 5, 32), (8, 2, 5, 32), (8, 2, 5, 32)), ((960, 32, 192, 1), (960, 32, 192, 1), (960, 32, 192, 1)), 'input')
        cpp_fused__scaled_dot_product_flash_attention_for_cpu_backward__to_copy_sum_transpose_view_3(buf68, buf70, getitem_8, buf71, buf73, buf72, buf74)
        del buf68
        del buf70
        del buf71
        del getitem_8
        # Topologically Sorted Source Nodes: [view_44, view_45, permute_48, _scaled_dot_product_flash_attention_for_cpu_backward_1], Original ATen: [aten.view, aten.transpose, aten._scaled_dot_product_flash_attention_for_cpu_backward]
        buf75 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default(reinterpret_tensor(buf69, (8, 2, 5, 32), (320, 32, 64, 1), 0), getitem_4, getitem_5, getitem_6, getitem_7, buf74, 0.0, False)
        del buf74
        del getitem_4
        del getitem_5
        del getitem_6
        del getitem_7
        buf76 = buf75[0]
        assert_tensor_metadata(buf76, (8, 2, 5, 32), (320, 32, 64, 1), torch.bfloat16, 'torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default')
        # buffer buf76 (op: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default) is assumed to be not aligned
        buf77 = buf75[1]
        assert_tensor_metadata(buf77, (8, 2, 5, 32), (320, 32, 64, 1), torch.bfloat16, 'torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default')
        # buffer buf77 (op: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default) is assumed to be not aligned
        buf78 = buf75[2]
        assert_tensor_metadata(buf78, (8, 2, 5, 32), (320, 32, 64, 1), torch.bfloat16, 'torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default')
        # buffer buf78 (op: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default) is assumed to be not aligned
        del buf75
        buf82 = reinterpret_tensor(buf40, (24, 2, 5, 32), (320, 160, 32, 1), 0); del buf40  # reuse
        buf79 = reinterpret_tensor(buf82, (8, 2, 5, 32), (320, 160, 32, 1), 0)  # alias
        buf80 = reinterpret_tensor(buf82, (8, 2, 5, 32), (320, 160, 32, 1), 2560)  # alias
        buf81 = reinterpret_tensor(buf82, (8, 2, 5, 32), (320, 160, 32, 1), 5120)  # alias
        buf83 = reinterpret_tensor(buf39, (40, 192), (192, 1), 0); del buf39  # reuse
        assert_size_stride(permute_50, (192, 64), (64, 1), 'input')
        cpp_fused__unsafe_view_clone_permute_stack_view_4(buf76, buf77, buf78, buf82, buf79, buf80, buf81, buf83)
        del buf76
        del buf77
        del buf78
        del buf79
        del buf80
        del buf81
        del buf82
        buf84 = buf69; del buf69  # reuse
        # Topologically Sorted Source Nodes: [mm_17], Original ATen: [aten.mm]
        extern_kernels.mm(buf83, permute_50, out=buf84)
        del permute_50
        assert_size_stride(view_1, (40, 64), (64, 1), 'input')
        buf85 = buf42; del buf42  # reuse
        # Topologically Sorted Source Nodes: [permute_51, mm_18], Original ATen: [aten.t, aten.mm]
        extern_kernels.mm(reinterpret_tensor(buf83, (192, 40), (1, 192), 0), view_1, out=buf85)
        del view_1
        buf86 = buf43; del buf43  # reuse
        buf88 = empty_strided_cpu((192, ), (1, ), torch.float32)
        buf87 = empty_strided_cpu((192, 64), (64, 1), torch.float32)
        assert_size_stride_grouped((cat, primals_4, getitem_1, rsqrt, primals_5, primals_6, getitem_3, rsqrt_1), ((8, 5, 64), (1, 5, 64), (8, 5, 1), (8, 5, 1), (64, ), (64, ), (8, 5, 1), (8, 5, 1)), ((320, 64, 1), (320, 64, 1), (5, 1, 1), (5, 1, 1), (1, ), (1, ), (5, 1, 1), (5, 1, 1)), 'input')
        buf90 = empty_strided_cpu((8, 5, 64), (320, 64, 1), torch.float32)
        assert_size_stride(primals_7, (64, ), (1, ), 'input')
        buf89 = buf64; del buf64  # reuse
        buf91 = buf63; del buf63  # reuse
        buf94 = buf67; del buf67  # reuse
        buf95 = empty_strided_cpu((8, 5, 1), (5, 1, 40), torch.float32)
        buf92 = empty_strided_cpu((64, ), (1, ), torch.float32)
        buf93 = empty_strided_cpu((64, ), (1, ), torch.float32)
        buf96 = empty_strided_cpu((8, 5, 1), (5, 1, 40), torch.float32)
        buf97 = empty_strided_cpu((8, 5, 64), (320, 64, 1), torch.float32)
        buf98 = empty_strided_cpu((64, ), (1, ), torch.float32)
        buf99 = empty_strided_cpu((64, ), (1, ), torch.float32)
        buf100 = empty_strided_cpu((1, 5, 64), (320, 64, 1), torch.float32)
        buf101 = empty_strided_cpu((1, 1, 64), (64, 64, 1), torch.float32)
        buf102 = empty_strided_cpu((8, 64, 2, 2), (256, 1, 128, 64), torch.bfloat16)
        assert_size_stride_grouped((convert_element_type_1, convert_element_type), ((8, 3, 32, 32), (64, 3, 16, 16)), ((3072, 1, 96, 3), (768, 1, 48, 3)), 'input')
        cpp_fused__to_copy_add_convolution_backward_native_layer_norm_native_layer_norm_backward_slice_sum_transpose_view_6(buf94, buf83, buf85, cat, primals_4, getitem_1, rsqrt, primals_5, primals_6, getitem_3, rsqrt_1, buf84, primals_7, buf86, buf88, buf87, buf90, buf89, buf91, buf95, buf92, buf93, buf96, buf97, buf98, buf99, buf100, buf101, buf102)
        del buf83
        del buf84
        del buf85
        del buf86
        del buf89
        del buf90
        del buf91
        del buf94
        del buf95
        del buf96
        del buf97
        del cat
        del getitem_1
        del getitem_3
        del primals_4
        del primals_5
        del primals_6
        del primals_7
        del rsqrt
        del rsqrt_1
        # Topologically Sorted Source Nodes: [slice_2, convert_element_type_123, permute_54, view_51, convolution_backward], Original ATen: [aten.slice, aten._to_copy, aten.transpose, aten.view, aten.convolution_backward]
        buf103 = torch.ops.aten.convolution_backward.default(buf102, convert_element_type_1, convert_element_type, [0], (16, 16), (0, 0), (1, 1), False, (0, 0), 1, [False, True, False])
        del buf102
        del convert_element_type
        del convert_element_type_1
        buf104 = buf103[1]
        assert_tensor_metadata(buf104, (64, 3, 16, 16), (768, 1, 48, 3), torch.bfloat16, 'torch.ops.aten.convolution_backward.default')
        # buffer buf104 (op: torch.ops.aten.convolution_backward.default) is assumed to be not aligned
        del buf103
        buf105 = empty_strided_cpu((64, 3, 16, 16), (768, 1, 48, 3), torch.float32)
        cpp_fused__to_copy_7(buf104, buf105)
        return (None, buf105, buf101, buf100, buf98, buf99, buf92, buf93, buf87, buf88, buf72, buf73, buf65, buf66, buf61, buf62, buf55, buf56, buf48, buf49, buf44, buf45, buf29, buf30, buf22, buf23, buf18, buf19, buf12, buf13, buf6, buf7, buf2, )

runner = Runner(partitions=[])
call = runner.call
recursively_apply_fns = runner.recursively_apply_fns


def get_args():
    from torch._dynamo.testing import rand_strided
    _shared_storage_16 = rand_strided((7680,), (1,), device='cpu', dtype=torch.bfloat16)
    _shared_storage_25 = rand_strided((7680,), (1,), device='cpu', dtype=torch.bfloat16)
    primals_4 = rand_strided((1, 5, 64), (320, 64, 1), device='cpu', dtype=torch.float32)
    primals_5 = rand_strided((64, ), (1, ), device='cpu', dtype=torch.float32)
    primals_6 = rand_strided((64, ), (1, ), device='cpu', dtype=torch.float32)
    primals_7 = rand_strided((64, ), (1, ), device='cpu', dtype=torch.float32)
    primals_13 = rand_strided((64, ), (1, ), device='cpu', dtype=torch.float32)
    primals_19 = rand_strided((64, ), (1, ), device='cpu', dtype=torch.float32)
    primals_25 = rand_strided((64, ), (1, ), device='cpu', dtype=torch.float32)
    primals_31 = rand_strided((64, ), (1, ), device='cpu', dtype=torch.float32)
    convert_element_type = rand_strided((64, 3, 16, 16), (768, 1, 48, 3), device='cpu', dtype=torch.bfloat16)
    convert_element_type_1 = rand_strided((8, 3, 32, 32), (3072, 1, 96, 3), device='cpu', dtype=torch.bfloat16)
    cat = rand_strided((8, 5, 64), (320, 64, 1), device='cpu', dtype=torch.float32)
    getitem_1 = rand_strided((8, 5, 1), (5, 1, 1), device='cpu', dtype=torch.float32)
    rsqrt = rand_strided((8, 5, 1), (5, 1, 1), device='cpu', dtype=torch.float32)
    getitem_3 = rand_strided((8, 5, 1), (5, 1, 1), device='cpu', dtype=torch.float32)
    rsqrt_1 = rand_strided((8, 5, 1), (5, 1, 1), device='cpu', dtype=torch.float32)
    view_1 = rand_strided((40, 64), (64, 1), device='cpu', dtype=torch.bfloat16)
    getitem_4 = torch.as_strided(_shared_storage_16, (8, 2, 5, 32), (960, 32, 192, 1))
    getitem_5 = torch.as_strided(_shared_storage_16, (8, 2, 5, 32), (960, 32, 192, 1))
    getitem_6 = torch.as_strided(_shared_storage_16, (8, 2, 5, 32), (960, 32, 192, 1))
    getitem_7 = rand_strided((8, 2, 5, 32), (320, 32, 64, 1), device='cpu', dtype=torch.bfloat16)
    getitem_8 = rand_strided((8, 2, 5), (10, 1, 2), device='cpu', dtype=torch.float32)
    mul_4 = rand_strided((8, 5, 64), (320, 64, 1), device='cpu', dtype=torch.float32)
    view_7 = rand_strided((40, 64), (64, 1), device='cpu', dtype=torch.bfloat16)
    addmm_2 = rand_strided((40, 256), (256, 1), device='cpu', dtype=torch.bfloat16)
    view_9 = rand_strided((40, 256), (256, 1), device='cpu', dtype=torch.bfloat16)
    mul_9 = rand_strided((8, 5, 64), (320, 64, 1), device='cpu', dtype=torch.float32)
    view_11 = rand_strided((40, 64), (64, 1), device='cpu', dtype=torch.bfloat16)
    getitem_13 = torch.as_strided(_shared_storage_25, (8, 2, 5, 32), (960, 32, 192, 1))
    getitem_14 = torch.as_strided(_shared_storage_25, (8, 2, 5, 32), (960, 32, 192, 1))
    getitem_15 = torch.as_strided(_shared_storage_25, (8, 2, 5, 32), (960, 32, 192, 1))
    getitem_16 = rand_strided((8, 2, 5, 32), (320, 32, 64, 1), device='cpu', dtype=torch.bfloat16)
    getitem_17 = rand_strided((8, 2, 5), (10, 1, 2), device='cpu', dtype=torch.float32)
    mul_11 = rand_strided((8, 5, 64), (320, 64, 1), device='cpu', dtype=torch.float32)
    view_17 = rand_strided((40, 64), (64, 1), device='cpu', dtype=torch.bfloat16)
    addmm_6 = rand_strided((40, 256), (256, 1), device='cpu', dtype=torch.bfloat16)
    view_19 = rand_strided((40, 256), (256, 1), device='cpu', dtype=torch.bfloat16)
    mul_16 = rand_strided((8, 5, 64), (320, 64, 1), device='cpu', dtype=torch.float32)
    convert_element_type_52 = rand_strided((8, 64), (64, 1), device='cpu', dtype=torch.bfloat16)
    permute_16 = rand_strided((768, 64), (64, 1), device='cpu', dtype=torch.bfloat16)
    div = rand_strided((8, 5, 1), (5, 1, 1), device='cpu', dtype=torch.float32)
    permute_18 = rand_strided((64, 256), (256, 1), device='cpu', dtype=torch.bfloat16)
    permute_22 = rand_strided((256, 64), (64, 1), device='cpu', dtype=torch.bfloat16)
    div_1 = rand_strided((8, 5, 1), (5, 1, 1), device='cpu', dtype=torch.float32)
    permute_26 = rand_strided((64, 64), (64, 1), device='cpu', dtype=torch.bfloat16)
    permute_32 = rand_strided((192, 64), (64, 1), device='cpu', dtype=torch.bfloat16)
    div_2 = rand_strided((8, 5, 1), (5, 1, 1), device='cpu', dtype=torch.float32)
    permute_36 = rand_strided((64, 256), (256, 1), device='cpu', dtype=torch.bfloat16)
    permute_40 = rand_strided((256, 64), (64, 1), device='cpu', dtype=torch.bfloat16)
    div_3 = rand_strided((8, 5, 1), (5, 1, 1), device='cpu', dtype=torch.float32)
    permute_44 = rand_strided((64, 64), (64, 1), device='cpu', dtype=torch.bfloat16)
    permute_50 = rand_strided((192, 64), (64, 1), device='cpu', dtype=torch.bfloat16)
    tangents_1 = rand_strided((8, 768), (768, 1), device='cpu', dtype=torch.bfloat16)
    return [primals_4, primals_5, primals_6, primals_7, primals_13, primals_19, primals_25, primals_31, convert_element_type, convert_element_type_1, cat, getitem_1, rsqrt, getitem_3, rsqrt_1, view_1, getitem_4, getitem_5, getitem_6, getitem_7, getitem_8, mul_4, view_7, addmm_2, view_9, mul_9, view_11, getitem_13, getitem_14, getitem_15, getitem_16, getitem_17, mul_11, view_17, addmm_6, view_19, mul_16, convert_element_type_52, permute_16, div, permute_18, permute_22, div_1, permute_26, permute_32, div_2, permute_36, permute_40, div_3, permute_44, permute_50, tangents_1]


def benchmark_compiled_module(args, times=10, repeat=10):
    from torch._inductor.utils import print_performance
    fn = lambda: call(list(args))
    return print_performance(fn, times=times, repeat=repeat, device='cpu')


if __name__ == "__main__":
    from torch._inductor.wrapper_benchmark import compiled_module_main
    args = get_args()
    compiled_module_main('None', lambda times, repeat: benchmark_compiled_module(args, times=times, repeat=repeat))
